//! File descriptors in tests: bounded waits for readability and for a listening UNIX socket,
//! eventfd doorbells, fd counts.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

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

/// Waits (at most [`WAIT_GUARD`]) until a UNIX socket listens at `path` ([`is_listening`]),
/// so a client that connects next is accepted.
pub fn wait_listening(path: &Path) {
    let deadline = Instant::now() + WAIT_GUARD;
    while !is_listening(path) {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {} after {WAIT_GUARD:?}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether a UNIX socket listens at `path`. QEMU's server binds `path`, then listens:
/// `/proc/net/unix` lists the socket under `path`, with the flag `__SO_ACCEPTCON` once it
/// listens. `ivshm`'s server listens under a temporary name and renames it to `path` (so it is
/// not listed under `path`): there, a socket file at `path` is enough.
pub fn is_listening(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let mut listed = table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() >= 8 && fields[7] == wanted)
            .then(|| u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & 0x10000 != 0))
    });
    let is_socket = std::fs::symlink_metadata(path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
    let listening = match listed.next() {
        Some(accepting) => accepting,
        None => is_socket,
    };
    is_socket && listening
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
