//! Ringing and draining eventfds, the doorbells of ivshmem.
//!
//! Ringing writes the 8-byte native-endian integer 1 (what QEMU and its server do); the
//! receiver reads the 8-byte counter, which also resets it, so rings that happen before the
//! read are coalesced into one.

use std::os::fd::BorrowedFd;

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::io::Errno;

/// Rings an eventfd once.
pub fn ring(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let one = 1u64.to_ne_bytes();
    loop {
        match rustix::io::write(fd, &one) {
            Ok(8) => return Ok(()),
            Ok(_) => return Err(Errno::IO),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads (and so resets) an eventfd's counter without blocking (the fd must be non-blocking).
///
/// Returns `Ok(None)` when it had not been rung.
pub fn drain(fd: BorrowedFd<'_>) -> Result<Option<u64>, Errno> {
    let mut buf = [0u8; 8];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(8) => return Ok(Some(u64::from_ne_bytes(buf))),
            Ok(_) => return Err(Errno::IO),
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Makes an fd non-blocking (like QEMU's device does with the eventfds it receives).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = fcntl_getfl(fd)?;
    if !flags.contains(OFlags::NONBLOCK) {
        fcntl_setfl(fd, flags | OFlags::NONBLOCK)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};
    use std::os::fd::AsFd;

    #[test]
    fn rings_coalesce_into_one_read() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        set_nonblocking(fd.as_fd()).unwrap();
        assert_eq!(drain(fd.as_fd()).unwrap(), None);
        ring(fd.as_fd()).unwrap();
        ring(fd.as_fd()).unwrap();
        assert_eq!(drain(fd.as_fd()).unwrap(), Some(2));
        assert_eq!(drain(fd.as_fd()).unwrap(), None);
    }
}
