//! Raw v0 test peers built on `ivshm_proto`, and an in-process server per test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use ivshm_proto::fd_passing::{MessageReader, Received};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use rustix::time::Timespec;

/// Guard against hangs: no single wait in a test may take longer than this.
pub const WAIT_LIMIT_SECS: i64 = 20;

/// A unique socket path for one test.
pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("ivshm-srv-{tag}-{}-{n}.sock", std::process::id()))
}

/// A server with one memfd region of `size` bytes and `vectors` vectors.
pub fn start_server(tag: &str, vectors: usize, size: u64) -> ServerHandle {
    let mut region = RegionConfig::new(socket_path(tag));
    region.vectors = vectors;
    region.memory.size = size;
    ServerHandle::spawn(ServerConfig::single(region)).unwrap()
}

/// Waits until `fd` is readable; panics after the guard timeout.
pub fn wait_readable(fd: BorrowedFd<'_>) {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let limit = Timespec {
        tv_sec: WAIT_LIMIT_SECS,
        tv_nsec: 0,
    };
    let n = poll(&mut fds, Some(&limit)).unwrap();
    assert!(
        n > 0,
        "timed out after {WAIT_LIMIT_SECS}s waiting for a readable fd"
    );
}

/// True if `fd` is readable right now (no waiting).
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&zero)).unwrap() > 0
}

/// One message as a test peer saw it.
#[derive(Debug)]
pub struct Msg {
    pub value: i64,
    pub fd: Option<OwnedFd>,
}

/// A v0 peer speaking raw messages.
pub struct RawPeer {
    pub sock: OwnedFd,
    reader: MessageReader,
}

impl RawPeer {
    pub fn connect(path: &std::path::Path) -> RawPeer {
        Self::connect_socket(Self::new_socket(), path)
    }

    /// A fresh, unconnected, non-blocking socket.
    pub fn new_socket() -> OwnedFd {
        socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap()
    }

    /// Connects an existing socket (no new fd needed).
    pub fn connect_socket(sock: OwnedFd, path: &std::path::Path) -> RawPeer {
        connect(&sock, &SocketAddrUnix::new(path).unwrap()).unwrap();
        RawPeer {
            sock,
            reader: MessageReader::new(),
        }
    }

    /// The next message (waits, with the guard timeout).
    pub fn recv(&mut self) -> Msg {
        loop {
            match self.reader.receive(self.sock.as_fd()).unwrap() {
                Received::Message { value, fd } => return Msg { value, fd },
                Received::WouldBlock => wait_readable(self.sock.as_fd()),
                Received::Closed => panic!("server closed the connection"),
            }
        }
    }

    /// Waits for the server to close the connection (skipping any messages before it).
    pub fn expect_closed(&mut self) -> usize {
        let mut skipped = 0;
        loop {
            match self.reader.receive(self.sock.as_fd()) {
                Ok(Received::Message { .. }) => skipped += 1,
                Ok(Received::WouldBlock) => wait_readable(self.sock.as_fd()),
                Ok(Received::Closed) | Err(_) => return skipped,
            }
        }
    }

    /// Receives one message and checks its value and whether it carries an fd.
    pub fn expect(&mut self, value: i64, with_fd: bool) -> Option<OwnedFd> {
        let m = self.recv();
        assert_eq!(m.value, value, "unexpected message value");
        assert_eq!(m.fd.is_some(), with_fd, "fd presence for message {value}");
        m.fd
    }

    /// Receives the whole handshake of a new peer that expects `existing` peers (in id order)
    /// with `vectors` each, checking every message in QEMU's order.
    pub fn handshake(&mut self, vectors: usize, existing: &[u16]) -> Joined {
        self.expect(0, false);
        let id = self.recv();
        assert!(id.fd.is_none());
        let id = u16::try_from(id.value).unwrap();
        let shm = self.expect(-1, true).unwrap();
        let mut peers = BTreeMap::new();
        for &other in existing {
            let fds = (0..vectors)
                .map(|_| self.expect(i64::from(other), true).unwrap())
                .collect();
            peers.insert(other, fds);
        }
        let own = (0..vectors)
            .map(|_| self.expect(i64::from(id), true).unwrap())
            .collect();
        Joined {
            id,
            shm,
            peers,
            own,
        }
    }

    /// Receives the join notification of `id` (one message per vector, each with an eventfd).
    pub fn expect_join(&mut self, id: u16, vectors: usize) -> Vec<OwnedFd> {
        (0..vectors)
            .map(|_| self.expect(i64::from(id), true).unwrap())
            .collect()
    }

    /// Receives the leave notification of `id` (the id without an fd).
    pub fn expect_leave(&mut self, id: u16) {
        self.expect(i64::from(id), false);
    }
}

/// What a peer learned from its handshake.
pub struct Joined {
    pub id: u16,
    pub shm: OwnedFd,
    pub peers: BTreeMap<u16, Vec<OwnedFd>>,
    pub own: Vec<OwnedFd>,
}

/// Rings an eventfd (writes 1, as QEMU does).
pub fn ring(fd: &OwnedFd) {
    rustix::io::write(fd, &1u64.to_ne_bytes()).unwrap();
}

/// Reads an eventfd's counter (it must be readable).
pub fn take(fd: &OwnedFd) -> u64 {
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::read(fd, &mut buf).unwrap(), 8);
    u64::from_ne_bytes(buf)
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
