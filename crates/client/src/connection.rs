//! One connection to a v0 server: connecting the socket and running the handshake over it,
//! with a deadline.
//!
//! After the shared memory arrives, QEMU's server still sends the eventfds of the peers already
//! there and then our own ones. [`establish`] keeps reading until our own vectors have arrived:
//! when other peers are known, until our count reaches theirs (the server gives every peer the
//! same number); otherwise until the socket has been quiet for `ConnectOptions::settle`
//! (a server configured with 0 vectors sends none). Own vectors that still arrive later (a
//! server stalled for longer than that) are added as they come.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

use ivshm_proto::{MessageReader, Received};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::error::{ClientError, ConnectHint};
use crate::events::PeerEvent;
use crate::handshake::{Handshake, Step};
use crate::options::ConnectOptions;
use crate::peer_table::{MessageError, PeerTable};

/// A connected, handshaken session.
#[derive(Debug)]
pub(crate) struct Session {
    pub socket: OwnedFd,
    pub reader: MessageReader,
    pub shm: OwnedFd,
    pub shm_size: u64,
    pub table: PeerTable,
    /// Joins/leaves seen while waiting for our own vectors (peers that came after us).
    pub early_events: Vec<PeerEvent>,
}

/// What [`Session::read_available`] read.
#[derive(Debug, Default)]
pub(crate) struct Read {
    /// Joins and leaves.
    pub events: Vec<PeerEvent>,
    /// Own vectors that arrived (late, after the handshake): to be watched.
    pub own_vectors: Vec<usize>,
    /// The server closed the connection (or it broke).
    pub closed: bool,
}

impl Session {
    /// Reads every message the server has sent so far without blocking and applies it to the
    /// peer table. Invalid messages are dropped with a warning, as QEMU's device does after
    /// setup. When the connection ends, joins still short of vectors are reported.
    pub(crate) fn read_available(&mut self) -> Read {
        let mut read = Read::default();
        loop {
            match self.reader.receive(self.socket.as_fd()) {
                Ok(Received::Message { value, fd }) => match self.table.apply(value, fd) {
                    Ok(applied) => {
                        read.events.extend(applied.events);
                        read.own_vectors.extend(applied.own_vector);
                    }
                    // QEMU's device accepts this silently; with 0-vector peers it is normal.
                    Err(e @ MessageError::UnknownPeerGone { .. }) => {
                        tracing::debug!("ignoring server message {value}: {e}");
                    }
                    Err(e) => tracing::warn!("ignoring server message {value}: {e}"),
                },
                Ok(Received::WouldBlock) => return read,
                Ok(Received::Closed) => {
                    read.events.extend(self.table.end_of_burst());
                    read.closed = true;
                    return read;
                }
                Err(e) => {
                    tracing::warn!("dropping the connection to the server: {e}");
                    read.events.extend(self.table.end_of_burst());
                    read.closed = true;
                    return read;
                }
            }
        }
    }
}

/// Connects a non-blocking UNIX stream socket to `path`.
pub fn connect_socket(path: &Path) -> Result<OwnedFd, ClientError> {
    let err = |error| ClientError::Connect {
        path: path.to_path_buf(),
        error,
        hint: ConnectHint(error),
    };
    let socket = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = SocketAddrUnix::new(path).map_err(err)?;
    loop {
        match connect(&socket, &addr) {
            Ok(()) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(err(e)),
        }
    }
    rustix::io::ioctl_fionbio(&socket, true).map_err(ClientError::sys("setting O_NONBLOCK"))?;
    Ok(socket)
}

/// Waits for the next whole message until `deadline`; `Ok(None)` when the deadline passed.
fn receive_until(
    socket: &OwnedFd,
    reader: &mut MessageReader,
    deadline: Instant,
) -> Result<Option<(i64, Option<OwnedFd>)>, ClientError> {
    loop {
        match reader.receive(socket.as_fd())? {
            Received::Message { value, fd } => return Ok(Some((value, fd))),
            Received::Closed => return Err(ClientError::ClosedDuringHandshake),
            Received::WouldBlock => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let timeout = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(socket, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(ClientError::sys("poll")(e)),
        }
    }
}

/// Connects to `path` and runs the whole handshake (see the module docs).
pub(crate) fn establish(path: &Path, opts: &ConnectOptions) -> Result<Session, ClientError> {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let socket = connect_socket(path)?;
    let mut reader = MessageReader::new();
    let mut handshake = Handshake::new(opts.max_vectors);
    let mut first = true;
    let established = loop {
        let received = match receive_until(&socket, &mut reader, deadline) {
            // Closed before any message: the server refused us (see `ClientError::Refused`).
            Err(ClientError::ClosedDuringHandshake) if first => Err(ClientError::Refused),
            other => other,
        };
        first = false;
        let Some((value, fd)) = received? else {
            return Err(ClientError::HandshakeTimeout(opts.timeout));
        };
        if let Step::Complete(e) = handshake.feed(value, fd)? {
            break e;
        }
    };
    let shm_size = rustix::fs::fstat(&established.shm)
        .map_err(ClientError::sys("fstat of the shared memory"))?
        .st_size;
    let shm_size = u64::try_from(shm_size).unwrap_or(0);
    let mut table = established.table;
    let mut early_events = Vec::new();
    // Read our own vectors (see the module docs for when to stop).
    loop {
        let own = table.own_vector_count();
        let others = table.max_peer_vector_count();
        let wait_until = if own > 0 && others > 0 && own >= others {
            // Complete; only take what is already there.
            Instant::now()
        } else {
            (Instant::now() + opts.settle).min(deadline)
        };
        match receive_until(&socket, &mut reader, wait_until) {
            Ok(Some((value, fd))) => match table.apply(value, fd) {
                Ok(applied) => early_events.extend(applied.events),
                Err(e) => tracing::warn!("after the shared memory: {e}"),
            },
            Ok(None) => break,
            Err(ClientError::ClosedDuringHandshake) => {
                // The server went away right after the handshake; the caller sees it on the
                // first read of the socket.
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if table.own_vector_count() == 0 {
        tracing::info!("the server gave us no vectors: this peer cannot be rung");
    }
    // Peers still short of vectors stay pending: the caller's burst timer finishes them.
    tracing::debug!(
        own_id = table.own_id(),
        vectors = table.own_vector_count(),
        peers = table.peer_ids().len(),
        shm_size,
        elapsed = ?start.elapsed(),
        "handshake complete"
    );
    Ok(Session {
        socket,
        reader,
        shm: established.shm,
        shm_size,
        table,
        early_events,
    })
}
