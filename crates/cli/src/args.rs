//! Value parsers shared by the subcommands' flags, one per concept, each defined once: sizes
//! and offsets in [`ivshm_mem::parse_size`]'s grammar, seconds, socket paths, and octal file
//! modes as the server's configuration file reads them
//! ([`ivshm_server::config::parse_file_mode`]).
//!
//! Sizes take `value_parser = ivshm_mem::parse_size` directly and bounded counts clap's
//! ranged integer parsers (`value_parser!(u64).range(..)`); this module adds the ones that need
//! a check or a conversion on top. Every parser refuses a bad value while the command line is
//! parsed (exit status 2 with clap's message naming the flag), so no command meets a value it
//! cannot use: no value of any flag may make a program panic.

use std::path::PathBuf;
use std::time::Duration;

/// The longest duration a flag takes: 100 years, in seconds. Longer waits are as good as
/// forever, and deadlines far beyond it overflow the clock (`Instant + Duration` panics).
pub const MAX_SECONDS: u64 = 100 * 365 * 24 * 60 * 60;

/// An offset or length in memory: a size ([`ivshm_mem::parse_size`]) that fits in `usize`.
pub fn offset(s: &str) -> Result<usize, String> {
    let value = ivshm_mem::parse_size(s).map_err(|e| e.to_string())?;
    usize::try_from(value).map_err(|_| format!("{s} is too large"))
}

/// A size ([`ivshm_mem::parse_size`]) from `min` to `max` bytes: the parser of a size flag
/// with bounds (`value_parser = args::size_between(1 << 20, 64 << 30)`).
pub fn size_between(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s| {
        let value = ivshm_mem::parse_size(s).map_err(|e| e.to_string())?;
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(format!(
                "{s} is outside {} to {}",
                ivshm_mem::format_size(min),
                ivshm_mem::format_size(max)
            ))
        }
    }
}

/// A duration in seconds, fractions allowed (`0.5`, `60`, `1e3`): a finite, non-negative
/// number of at most [`MAX_SECONDS`].
pub fn seconds(s: &str) -> Result<Duration, String> {
    let seconds: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!(
            "`{s}` is not a number of seconds: a finite number from 0 is needed"
        ));
    }
    if seconds > MAX_SECONDS as f64 {
        return Err(format!(
            "{s} seconds is longer than the longest wait, {MAX_SECONDS} seconds (100 years)"
        ));
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{s}` seconds: {e}"))
}

/// A time written as a whole number with a unit (`20s`, `10m`, `1h`, `300ms`:
/// [`ivshm_server::config::parse_duration`]), at most 100 years.
pub fn duration(s: &str) -> Result<Duration, String> {
    let time = ivshm_server::config::parse_duration(s)?;
    if time > Duration::from_secs(MAX_SECONDS) {
        return Err(format!(
            "{s} is longer than the longest wait, {MAX_SECONDS} seconds (100 years)"
        ));
    }
    Ok(time)
}

/// A UNIX socket path: at most [`ivshm_proto::MAX_SOCKET_PATH`] bytes, what a socket address
/// holds (a longer one can be neither listened on nor connected to).
pub fn socket_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    ivshm_proto::check_socket_path(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

/// An address to listen on: `IP:PORT` (`127.0.0.1:9464`, `[::1]:9464`; port 0 picks a free
/// one). Host names are not looked up: the address bound is the one written.
pub fn listen_address(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "`{s}` is not IP:PORT (e.g. 127.0.0.1:9464, or [::1]:9464 for IPv6; host names \
             such as localhost are not looked up)"
        )
    })
}

/// A channel name: 1 to [`ivshm_channel::layout::NAME_MAX`] bytes, no NUL (what a directory
/// entry of a channel region holds).
pub fn channel_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > ivshm_channel::layout::NAME_MAX || s.contains('\0') {
        return Err(format!(
            "invalid channel name {s:?}: 1 to {} bytes, no NUL",
            ivshm_channel::layout::NAME_MAX
        ));
    }
    Ok(s.to_string())
}

/// A channel ring size (bytes, K/M/G suffixes) within the layout's bounds.
pub fn ring_size(s: &str) -> Result<u32, String> {
    let size = ivshm_mem::parse_size(s).map_err(|e| e.to_string())?;
    let (min, max) = (
        ivshm_channel::layout::RING_SIZE_MIN,
        ivshm_channel::layout::RING_SIZE_MAX,
    );
    u32::try_from(size)
        .ok()
        .filter(|&v| (min..=max).contains(&v))
        .ok_or_else(|| format!("ring size {s} is outside {min}..={max} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_ip_and_port() {
        assert_eq!(
            listen_address("127.0.0.1:9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(listen_address("[::1]:0").unwrap().port(), 0);
        for bad in [
            "localhost:9464",
            "127.0.0.1",
            "9464",
            ":9464",
            "127.0.0.1:99999",
            "",
        ] {
            let e = listen_address(bad).unwrap_err();
            assert!(e.contains("is not IP:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_seconds_and_offsets() {
        assert_eq!(seconds("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(seconds("0").unwrap(), Duration::ZERO);
        assert_eq!(seconds("-0").unwrap(), Duration::ZERO);
        assert_eq!(seconds("1e3").unwrap(), Duration::from_secs(1000));
        assert_eq!(
            seconds(&MAX_SECONDS.to_string()).unwrap(),
            Duration::from_secs(MAX_SECONDS)
        );
        seconds("soon").unwrap_err();
        for bad in [
            "-1",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "1e300",
            "2e19",
            "18446744073709551615",
        ] {
            let err = seconds(bad).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(seconds("3153600001").unwrap_err().contains("100 years"));
        let bytes = size_between(1 << 20, 64 << 30);
        assert_eq!(bytes("1G"), Ok(1 << 30));
        assert_eq!(bytes("1048576"), Ok(1 << 20));
        assert_eq!(bytes("64GiB"), Ok(64 << 30));
        assert_eq!(
            bytes("1023K").unwrap_err(),
            "1023K is outside 1 MiB to 64 GiB"
        );
        bytes("65G").unwrap_err();
        bytes("lots").unwrap_err();
        assert_eq!(offset("4K").unwrap(), 4096);
        assert_eq!(offset("0x10").unwrap(), 16);
        offset("lots").unwrap_err();
    }

    #[test]
    fn socket_paths_fit_in_a_socket_address() {
        let longest = format!("/{}", "s".repeat(106));
        assert_eq!(socket_path(&longest), Ok(PathBuf::from(&longest)));
        let err = socket_path(&format!("{longest}s")).unwrap_err();
        assert!(err.contains("is 108 bytes long"), "{err}");
        assert!(err.contains("at most 107 bytes"), "{err}");
    }
}
