//! The error type of [`Peer`](crate::Peer) operations.

use std::path::PathBuf;

use ivshm_mem::MapError;
use ivshm_proto::FdPassingError;
use rustix::io::Errno;
use thiserror::Error;

use crate::handshake::HandshakeError;

/// Errors of the host peer library.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum ClientError {
    /// cannot connect to {path}: {error}{hint}
    ///
    /// The socket could not be created or connected.
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        error: Errno,
        /// What a user can do about it (empty for most errors).
        hint: ConnectHint,
    },
    /// handshake with the server failed: {0}
    ///
    /// The server sent something the handshake rejects.
    Handshake(HandshakeError),
    /// the server did not complete the handshake within {0:?}
    ///
    /// The handshake did not complete in time.
    HandshakeTimeout(std::time::Duration),
    /// the server closed the connection before sending anything: it refused this peer. An ivshm
    /// server does that when the region already has its peer limit of peers (`ivshm regions` shows
    /// peers=P/LIMIT; the factory answers GSS_CLIENT_MAX), when every id it may give is in use or
    /// held back (an id whose holder left is not given again while a peer that saw it leave is
    /// connected, because QEMU 7.2 guests abort on that; `ivshm regions` shows held-ids=[..]), or
    /// when it has no file descriptors left; its log names the reason
    ///
    /// The server closed the connection before sending anything: it refused the peer.
    Refused,
    /// the server closed the connection during the handshake
    ///
    /// The server closed the connection during the handshake.
    ClosedDuringHandshake,
    /// receiving from the server failed: {0}
    ///
    /// Receiving a message failed.
    Receive(FdPassingError),
    /// the server closed the connection
    ///
    /// The server has gone (closed the socket); see `ConnectOptions::reconnect`.
    ServerGone,
    /// {what} failed: {error}
    ///
    /// A system call failed.
    Sys {
        /// What was being done.
        what: &'static str,
        /// The error.
        error: Errno,
    },
    /// cannot map the shared memory: {0}
    ///
    /// The shared memory could not be mapped.
    Map(MapError),
    /// shared memory of {0} bytes is too large to map here
    ///
    /// The shared memory is too large to map in this address space.
    TooLarge(u64),
    /// unknown peer {0}
    ///
    /// `notify` named a peer that is not in the peer table.
    UnknownPeer(u16),
    /// peer {peer} has no vector {vector} (it has {vectors})
    ///
    /// `notify` named a vector the peer does not have.
    UnknownVector {
        /// The peer.
        peer: u16,
        /// The vector asked for.
        vector: usize,
        /// How many vectors it has.
        vectors: usize,
    },
}

impl From<HandshakeError> for ClientError {
    fn from(error: HandshakeError) -> Self {
        ClientError::Handshake(error)
    }
}

impl From<FdPassingError> for ClientError {
    fn from(error: FdPassingError) -> Self {
        ClientError::Receive(error)
    }
}

impl From<MapError> for ClientError {
    fn from(error: MapError) -> Self {
        ClientError::Map(error)
    }
}

/// What a user can do about a failed connect, for its error: its `Display` (empty, or a
/// parenthesised advice after a space) ends [`ClientError::Connect`]'s message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectHint(pub Errno);

impl std::fmt::Display for ConnectHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(connect_hint(self.0))
    }
}

/// What a user can do about a failed connect.
fn connect_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::NOENT => {
            " (no socket there: start a server, e.g. `ivshm serve --socket PATH`, or check the \
             path; a named region's socket is in its VM's directory, `ivshm vms` lists them)"
        }
        Errno::CONNREFUSED => {
            " (the socket file is there but no server listens on it: the server that made it \
             stopped or was killed. Start it again: `ivshm serve --socket PATH`, or `ivshm \
             serve --config FILE` for a socket in a VM directory, which also clears such \
             leftovers)"
        }
        Errno::ACCESS | Errno::PERM => {
            " (the socket's mode or group does not let this user connect: run as its owner or \
             give the server a socket mode and group for this user)"
        }
        _ => "",
    }
}

impl ClientError {
    /// Wraps a failed system call.
    pub(crate) fn sys(what: &'static str) -> impl FnOnce(Errno) -> ClientError {
        move |error| ClientError::Sys { what, error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(error: Errno) -> String {
        ClientError::Connect {
            path: PathBuf::from("/run/x.sock"),
            error,
            hint: ConnectHint(error),
        }
        .to_string()
    }

    #[test]
    fn connect_errors_say_what_to_do() {
        let missing = connect_error(Errno::NOENT);
        assert!(
            missing.starts_with("cannot connect to /run/x.sock: "),
            "{missing}"
        );
        assert!(
            missing.contains("no socket there: start a server"),
            "{missing}"
        );
        assert!(connect_error(Errno::CONNREFUSED).contains("no server listens on it"));
        assert!(connect_error(Errno::CONNREFUSED).contains("--config FILE"));
        assert!(connect_error(Errno::ACCESS).contains("mode or group"));
        let other = connect_error(Errno::NOMEM);
        assert!(
            !other.contains("server") && !other.contains("mode or group"),
            "{other}"
        );
    }
}
