//! Value parsers shared by the subcommands' flags, each defined once: sizes and offsets in
//! [`ivshm_mem::parse_size`]'s grammar, seconds, and octal file modes as the server's
//! configuration file reads them ([`ivshm_server::config::parse_file_mode`]).
//!
//! Sizes take `value_parser = ivshm_mem::parse_size` directly; this module adds the ones that
//! need a conversion on top.

use std::time::Duration;

/// An offset or length in memory: a size ([`ivshm_mem::parse_size`]) that fits in `usize`.
pub fn offset(s: &str) -> Result<usize, String> {
    let value = ivshm_mem::parse_size(s).map_err(|e| e.to_string())?;
    usize::try_from(value).map_err(|_| format!("{s} is too large"))
}

/// A duration in seconds, fractions allowed (`0.5`, `60`).
pub fn seconds(s: &str) -> Result<Duration, String> {
    let seconds: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("`{s}` is not a valid number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_offsets() {
        assert_eq!(seconds("1.5").unwrap(), Duration::from_millis(1500));
        assert!(seconds("-1").is_err());
        assert!(seconds("soon").is_err());
        assert_eq!(offset("4K").unwrap(), 4096);
        assert_eq!(offset("0x10").unwrap(), 16);
        assert!(offset("lots").is_err());
    }
}
