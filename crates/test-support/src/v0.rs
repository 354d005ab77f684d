//! A raw protocol-version-0 peer: connects to a region socket and checks every message the
//! server sends, in QEMU's order (`ivshmem_server_handle_new_conn`): version `0`, the peer's
//! id, `-1` with the shared-memory fd, each existing peer's id once per vector with an eventfd,
//! then its own id once per vector. A join is the newcomer's id once per vector with its
//! eventfds; a leave is the id without an fd.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use ivshm_proto::fd_passing::MessageReader;
pub use ivshm_proto::fd_passing::Received;
use rustix::net::{
    connect, recv, socket_with, AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::fds::wait_readable;

/// One message as a test peer saw it.
#[derive(Debug)]
pub struct Msg {
    /// The 64-bit value.
    pub value: i64,
    /// The fd that came with it.
    pub fd: Option<OwnedFd>,
}

/// What a peer learned from its handshake.
#[derive(Debug)]
pub struct Joined {
    /// Its id.
    pub id: u16,
    /// The shared memory.
    pub shm: OwnedFd,
    /// The other peers' eventfds (its doorbells to them), by id.
    pub peers: BTreeMap<u16, Vec<OwnedFd>>,
    /// Its own eventfds (rung by the others).
    pub own: Vec<OwnedFd>,
}

/// A v0 peer speaking raw messages over a non-blocking socket; every wait is guarded by
/// [`WAIT_GUARD`](crate::WAIT_GUARD).
#[derive(Debug)]
pub struct RawPeer {
    /// The connection (non-blocking).
    pub sock: OwnedFd,
    reader: MessageReader,
}

impl RawPeer {
    /// Connects to the region socket at `path`.
    pub fn connect(path: &Path) -> RawPeer {
        Self::connect_socket(Self::new_socket(), path)
    }

    /// A fresh, unconnected, non-blocking socket (to hold an fd before the server runs out).
    pub fn new_socket() -> OwnedFd {
        socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .expect("creating a socket")
    }

    /// Connects an existing socket (no new fd needed).
    pub fn connect_socket(sock: OwnedFd, path: &Path) -> RawPeer {
        let addr = SocketAddrUnix::new(path).expect("socket address");
        connect(&sock, &addr).unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
        RawPeer {
            sock,
            reader: MessageReader::new(),
        }
    }

    /// Whatever comes next: a message, or the end of the connection (waits; never
    /// [`Received::WouldBlock`]).
    pub fn receive(&mut self) -> Received {
        loop {
            match self.reader.receive(self.sock.as_fd()) {
                Ok(Received::WouldBlock) => wait_readable(self.sock.as_fd()),
                Ok(received) => return received,
                Err(e) => panic!("receiving from the server: {e}"),
            }
        }
    }

    /// The next message (waits); panics if the server closed the connection.
    pub fn recv(&mut self) -> Msg {
        match self.receive() {
            Received::Message { value, fd } => Msg { value, fd },
            other => panic!("no message, the server closed the connection: {other:?}"),
        }
    }

    /// Waits for the server to close the connection, skipping messages before it; returns how
    /// many were skipped.
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

    /// Waits for the first byte or the end: true if the server closed the connection before
    /// sending anything (a refusal). Nothing is consumed.
    pub fn closed_before_any_message(&self) -> bool {
        wait_readable(self.sock.as_fd());
        let mut byte = [0u8; 1];
        match recv(&self.sock, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Ok((n, _)) => n == 0,
            Err(rustix::io::Errno::CONNRESET) => true,
            Err(e) => panic!("peeking at the connection: {e}"),
        }
    }

    /// Receives one message and checks its value and whether it carries an fd.
    pub fn expect(&mut self, value: i64, with_fd: bool) -> Option<OwnedFd> {
        let m = self.recv();
        assert_eq!(m.value, value, "unexpected message value");
        assert_eq!(m.fd.is_some(), with_fd, "fd presence for message {value}");
        m.fd
    }

    /// Receives the whole handshake of a new peer that expects `existing` peers (in the order
    /// they joined) with `vectors` each, checking every message in QEMU's order.
    pub fn handshake(&mut self, vectors: usize, existing: &[u16]) -> Joined {
        self.expect(0, false);
        let id = self.recv();
        assert!(id.fd.is_none(), "the id came with an fd");
        let id = u16::try_from(id.value).expect("a peer id in 0..=65535");
        let shm = self.expect(-1, true).expect("shm fd");
        let mut peers = BTreeMap::new();
        for &other in existing {
            peers.insert(other, self.expect_join(other, vectors));
        }
        let own = self.expect_join(id, vectors);
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
            .map(|_| self.expect(i64::from(id), true).expect("an eventfd"))
            .collect()
    }

    /// Receives the leave notification of `id` (the id without an fd).
    pub fn expect_leave(&mut self, id: u16) {
        self.expect(i64::from(id), false);
    }
}
