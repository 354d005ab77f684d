//! How long a UNIX socket path may be.
//!
//! A socket address holds its path in `sun_path`: 108 bytes on Linux, the terminating NUL
//! included, so a path has at most [`MAX_SOCKET_PATH`] = 107 bytes. (Linux's own system calls
//! also take a 108-byte path without its NUL, but QEMU, the C library's conventions and Rust's
//! standard library refuse it: a socket there is out of reach for them.) A longer path can be
//! neither bound nor connected to; a server that bound a short temporary name and renamed it
//! to a long one would listen where no client can reach it. Every place that takes a socket path checks
//! it with [`check_socket_path`] before anything else.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The longest UNIX socket path in bytes (`sun_path` is 108 bytes, NUL included).
pub const MAX_SOCKET_PATH: usize = 107;

/// socket path {path} is {len} bytes long; a UNIX socket path has at most {MAX_SOCKET_PATH:} bytes
/// (sun_path): use a shorter one
///
/// A socket path longer than [`MAX_SOCKET_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct SocketPathTooLong {
    /// The path.
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: usize,
}

/// Fails if `path` does not fit in a socket address.
pub fn check_socket_path(path: &Path) -> Result<(), SocketPathTooLong> {
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH {
        return Err(SocketPathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit is `sun_path` less its NUL, as the standard library has it: the longest
    /// accepted path makes an address, one more byte does not.
    #[test]
    fn the_limit_is_sun_path_less_its_nul() {
        use std::os::unix::net::SocketAddr;
        let longest = PathBuf::from(format!("/{}", "x".repeat(MAX_SOCKET_PATH - 1)));
        assert_eq!(check_socket_path(&longest), Ok(()));
        SocketAddr::from_pathname(&longest).unwrap();
        let too_long = PathBuf::from(format!("/{}", "x".repeat(MAX_SOCKET_PATH)));
        SocketAddr::from_pathname(&too_long).unwrap_err();
        let err = check_socket_path(&too_long).unwrap_err();
        assert_eq!(err.len, 108);
        let text = err.to_string();
        assert!(text.contains("is 108 bytes long"), "{text}");
        assert!(text.contains("at most 107 bytes"), "{text}");
    }
}
