//! What the program tests share: a raw v0 peer that reads what the server sends.
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ivshm_proto::fd_passing::MessageReader;
pub use ivshm_proto::fd_passing::Received;

/// Failure guard for every read (never a timing assertion).
pub const READ_GUARD: Duration = Duration::from_secs(30);

/// A raw v0 peer: a connection to a region socket and the messages on it.
pub struct Peer {
    pub sock: UnixStream,
    reader: MessageReader,
}

impl Peer {
    /// Connects to a region socket (reads fail after [`READ_GUARD`]).
    pub fn connect(path: &Path) -> Peer {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(READ_GUARD)).unwrap();
        Peer {
            sock,
            reader: MessageReader::new(),
        }
    }

    /// Whatever comes next: a message, or the end of the connection.
    pub fn receive(&mut self) -> Received {
        self.reader.receive(self.sock.as_fd()).unwrap()
    }

    /// The next message: its value and its fd, if one came with it.
    pub fn recv(&mut self) -> (i64, Option<OwnedFd>) {
        match self.receive() {
            Received::Message { value, fd } => (value, fd),
            other => panic!("no message: {other:?}"),
        }
    }
}
