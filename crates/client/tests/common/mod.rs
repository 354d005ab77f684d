//! A scripted fake v0 server for tests, built from `ivshm_proto`; fd waits come from
//! `ivshm-test-support`.
#![allow(dead_code, unused_imports)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ivshm_proto::send_message_blocking;
use rustix::event::{eventfd, EventfdFlags};

pub use ivshm_test_support::fds::{wait_readable, wait_rung};

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

pub const TEN_S: Option<Duration> = Some(Duration::from_secs(10));
