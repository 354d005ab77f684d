//! A scripted fake v0 server for tests, built from `ivshm_proto`.
#![allow(dead_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ivshm_proto::send_message_blocking;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique socket path in a fresh directory.
pub fn socket_path(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!(
        "ivshm-client-test-{}-{tag}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("sock")
}

pub fn listen(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).unwrap()
}

pub fn efd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

pub fn memfd(size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("fake-ivshm", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// Sends one message with an optional fd.
pub fn send(stream: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) {
    send_message_blocking(stream.as_fd(), value, fd).unwrap();
}

/// The messages QEMU's server sends a new peer `id`: version, id, shm, the others' vectors,
/// then its own. Returns the own eventfds (the server side keeps copies).
pub fn greet(
    stream: &UnixStream,
    id: u16,
    shm: &OwnedFd,
    others: &[(u16, &[OwnedFd])],
    own: &[OwnedFd],
) {
    send(stream, 0, None);
    send(stream, i64::from(id), None);
    send(stream, -1, Some(shm.as_fd()));
    for (pid, fds) in others {
        for fd in fds.iter() {
            send(stream, i64::from(*pid), Some(fd.as_fd()));
        }
    }
    for fd in own {
        send(stream, i64::from(id), Some(fd.as_fd()));
    }
}

/// Reads an eventfd, waiting up to 10 s for it to be rung; returns its counter.
pub fn wait_rung(fd: &OwnedFd) -> u64 {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let ten = Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    assert_eq!(
        poll(&mut fds, Some(&ten)).unwrap(),
        1,
        "eventfd not rung in 10 s"
    );
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::read(fd, &mut buf).unwrap(), 8);
    u64::from_ne_bytes(buf)
}

pub const TEN_S: Option<Duration> = Some(Duration::from_secs(10));

/// Waits up to 10 s for `fd` to become readable.
pub fn wait_readable(fd: BorrowedFd<'_>) {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let ten = Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    assert_eq!(
        poll(&mut fds, Some(&ten)).unwrap(),
        1,
        "fd not readable in 10 s"
    );
}
