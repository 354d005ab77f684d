//! File descriptors in tests: bounded waits for readability, eventfd doorbells, fd counts.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::WAIT_GUARD;

fn timespec(timeout: Duration) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    }
}

/// Whether `fd` becomes readable within `timeout` (`EINTR` is retried with the full timeout).
pub fn readable_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let limit = timespec(timeout);
    loop {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&limit)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll failed: {e}"),
        }
    }
}

/// Waits until `fd` is readable; panics after [`WAIT_GUARD`].
pub fn wait_readable(fd: BorrowedFd<'_>) {
    assert!(
        readable_within(fd, WAIT_GUARD),
        "timed out after {WAIT_GUARD:?} waiting for a readable fd"
    );
}

/// True if `fd` is readable right now (no waiting).
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    readable_within(fd, Duration::ZERO)
}

/// Rings an eventfd (adds 1, as QEMU's device and the server's peers do).
pub fn ring(fd: impl AsFd) {
    rustix::io::write(fd, &1u64.to_ne_bytes()).expect("writing an eventfd");
}

/// Reads an eventfd's counter (it must be readable now).
pub fn take(fd: impl AsFd) -> u64 {
    let mut buf = [0u8; 8];
    assert_eq!(
        rustix::io::read(fd, &mut buf).expect("reading an eventfd"),
        8
    );
    u64::from_ne_bytes(buf)
}

/// Waits (at most [`WAIT_GUARD`]) for an eventfd to be rung and returns its counter.
pub fn wait_rung(fd: impl AsFd) -> u64 {
    wait_readable(fd.as_fd());
    take(fd)
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("reading /proc/self/fd")
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};

    #[test]
    fn an_eventfd_rung_twice_reads_two_and_is_then_quiet() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
        assert!(!readable_now(fd.as_fd()));
        ring(&fd);
        ring(&fd);
        assert_eq!(wait_rung(&fd), 2);
        assert!(!readable_now(fd.as_fd()));
    }
}
