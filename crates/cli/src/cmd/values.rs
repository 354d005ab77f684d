//! Flag values that need more checking than their type gives, one parser per concept, used as
//! clap `value_parser`s by every command that takes such a value: a bad value is refused while
//! the command line is parsed (exit status 2, clap's message naming the flag), never later.

use std::path::PathBuf;

/// A UNIX socket path: at most [`ivshm_proto::MAX_SOCKET_PATH`] bytes, what a socket address
/// holds (a longer one can be neither listened on nor connected to).
pub fn socket_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    ivshm_proto::check_socket_path(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_in_a_socket_address() {
        let longest = format!("/{}", "s".repeat(106));
        assert_eq!(socket_path(&longest), Ok(PathBuf::from(&longest)));
        let err = socket_path(&format!("{longest}s")).unwrap_err();
        assert!(err.contains("is 108 bytes long"), "{err}");
        assert!(err.contains("at most 107 bytes"), "{err}");
    }
}
