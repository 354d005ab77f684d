//! What the drop-in programs `ivshmem-server` and `ivshmem-client` share: QEMU's `getopt(3)`
//! command-line handling, the C library's error texts, and their logging set-up.

pub mod getopt;
pub mod qemu_numbers;

/// Installs the `tracing` subscriber on stderr: `RUST_LOG` if set, else `default_level`.
pub fn init_logging(default_level: &str) {
    crate::logging::init(default_level);
}

/// The C library's text for `errno` (`strerror`), as QEMU's programs print it: `No such file
/// or directory`, `Success` for 0.
pub fn strerror(errno: rustix::io::Errno) -> String {
    strerror_code(errno.raw_os_error())
}

/// [`strerror`] of a raw `errno` value, 0 included.
pub fn strerror_code(code: i32) -> String {
    let text = std::io::Error::from_raw_os_error(code).to_string();
    // std adds " (os error N)" to the C library's text.
    match text.strip_suffix(&format!(" (os error {code})")) {
        Some(bare) => bare.to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno;

    #[test]
    fn strerror_is_the_c_librarys_text() {
        assert_eq!(strerror(Errno::NOENT), "No such file or directory");
        assert_eq!(strerror(Errno::ADDRINUSE), "Address already in use");
        assert_eq!(strerror_code(0), "Success");
    }
}
