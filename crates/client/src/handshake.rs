//! The v0 handshake as a sans-I/O state machine.
//!
//! Fed one received message at a time (`value`, and the fd that came with it), it checks
//! everything exactly as QEMU's `ivshmem-doorbell` device does at realize time:
//!
//! 1. the first message must be version `0` without an fd;
//! 2. the second must be our own id (`0..=65535`) without an fd;
//! 3. then any messages, in any order, until `-1` with the shared-memory fd: eventfds of other
//!    peers and our own ones go into the [`PeerTable`]; a value outside `-1..=65535`, `-1`
//!    without an fd, or a disconnect of our own id fails the handshake.
//!
//! Unlike QEMU's device (which fails realize), an eventfd beyond the vector maximum (64) is
//! closed with a warning, and a disconnect of an unknown peer is ignored with a warning (QEMU's
//! device silently accepts it). Every fd that is not kept is closed: fds are [`OwnedFd`]s,
//! dropped on every error path.
//!
//! The handshake is complete when the shared memory arrives. QEMU's server sends our own
//! vectors *after* it; reading those is the connection's job (it keeps applying messages to the
//! returned [`PeerTable`]).

use std::os::fd::OwnedFd;

use ivshm_proto::v0::{parse_own_id, parse_version, ProtocolError, MAX_VECTORS, SHM_MARKER};
use thiserror::Error;

use crate::peer_table::{MessageError, PeerTable};

/// Why a handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum HandshakeError {
    /// {0}
    ///
    /// The version or id message was wrong, or a later message was not valid v0.
    Protocol(ProtocolError),
    /// {0}
    ///
    /// A message that QEMU's device rejects during setup.
    Message(MessageError),
    /// handshake already finished
    ///
    /// The machine was fed after it had completed or failed.
    Finished,
}

impl From<ProtocolError> for HandshakeError {
    fn from(error: ProtocolError) -> Self {
        Self::Protocol(error)
    }
}

impl From<MessageError> for HandshakeError {
    fn from(error: MessageError) -> Self {
        Self::Message(error)
    }
}

/// Where the handshake is.
#[derive(Debug)]
enum Stage {
    Version,
    OwnId,
    Messages(PeerTable),
    Finished,
}

/// The result of a successful handshake.
#[derive(Debug)]
pub struct Established {
    /// Our own id.
    pub own_id: u16,
    /// The shared-memory fd.
    pub shm: OwnedFd,
    /// Peers and vectors received before the shared memory.
    pub table: PeerTable,
}

/// What one fed message did.
#[derive(Debug)]
pub enum Step {
    /// Keep feeding.
    Continue,
    /// The handshake is done.
    Complete(Established),
}

/// The handshake state machine. See the module docs.
#[derive(Debug)]
pub struct Handshake {
    stage: Stage,
    max_vectors: usize,
    warnings: Vec<MessageError>,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new(MAX_VECTORS)
    }
}

impl Handshake {
    /// A handshake accepting up to `max_vectors` eventfds per peer (clamped to 64).
    pub fn new(max_vectors: usize) -> Self {
        Handshake {
            stage: Stage::Version,
            max_vectors: max_vectors.min(MAX_VECTORS),
            warnings: Vec::new(),
        }
    }

    /// Problems that were tolerated so far (extra vectors closed, unknown peers gone).
    pub fn warnings(&self) -> &[MessageError] {
        &self.warnings
    }

    /// Feeds one received message. After `Complete` or an error, the machine is finished.
    pub fn feed(&mut self, value: i64, fd: Option<OwnedFd>) -> Result<Step, HandshakeError> {
        let stage = std::mem::replace(&mut self.stage, Stage::Finished);
        match stage {
            Stage::Finished => Err(HandshakeError::Finished),
            Stage::Version => {
                parse_version(value, fd.is_some())?;
                self.stage = Stage::OwnId;
                Ok(Step::Continue)
            }
            Stage::OwnId => {
                let id = parse_own_id(value, fd.is_some())?;
                self.stage = Stage::Messages(PeerTable::new(id, self.max_vectors));
                Ok(Step::Continue)
            }
            Stage::Messages(mut table) => {
                if value == SHM_MARKER {
                    return match fd {
                        Some(shm) => Ok(Step::Complete(Established {
                            own_id: table.own_id(),
                            shm,
                            table,
                        })),
                        None => Err(ProtocolError::MissingShmFd.into()),
                    };
                }
                match table.apply(value, fd) {
                    Ok(_) => {}
                    Err(MessageError::Protocol(p)) => return Err(p.into()),
                    Err(e) if e.is_warning() => {
                        tracing::warn!("during handshake: {e}");
                        self.warnings.push(e);
                    }
                    Err(e) => return Err(e.into()),
                }
                self.stage = Stage::Messages(table);
                Ok(Step::Continue)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustix::event::{eventfd, EventfdFlags};

    fn efd() -> OwnedFd {
        eventfd(0, EventfdFlags::CLOEXEC).unwrap()
    }

    fn run(msgs: Vec<(i64, bool)>) -> Result<Option<Established>, HandshakeError> {
        let mut h = Handshake::default();
        for (value, with_fd) in msgs {
            match h.feed(value, with_fd.then(efd))? {
                Step::Continue => {}
                Step::Complete(e) => return Ok(Some(e)),
            }
        }
        Ok(None)
    }

    #[test]
    fn qemu_server_order_completes() {
        // version, id 3, shm, (own vectors come later)
        let e = run(vec![(0, false), (3, false), (-1, true)])
            .unwrap()
            .unwrap();
        assert_eq!(e.own_id, 3);
        assert_eq!(e.table.own_vector_count(), 0);
    }

    #[test]
    fn messages_before_shm_in_any_order_are_kept() {
        let e = run(vec![
            (0, false),
            (3, false),
            (3, true),
            (1, true),
            (1, true),
            (3, true),
            (-1, true),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.table.own_vector_count(), 2);
        assert_eq!(e.table.peer_vector_count(1), Some(2));
    }

    #[test]
    fn every_malformed_sequence_qemu_rejects() {
        use HandshakeError as H;
        use ProtocolError as P;
        let cases: Vec<(Vec<(i64, bool)>, HandshakeError)> = vec![
            (vec![(1, false)], H::Protocol(P::UnsupportedVersion(1))),
            (vec![(-1, true)], H::Protocol(P::UnexpectedFd { value: -1 })),
            (vec![(0, true)], H::Protocol(P::UnexpectedFd { value: 0 })),
            (
                vec![(0, false), (5, true)],
                H::Protocol(P::UnexpectedFd { value: 5 }),
            ),
            (
                vec![(0, false), (-1, false)],
                H::Protocol(P::InvalidOwnId(-1)),
            ),
            (
                vec![(0, false), (65536, false)],
                H::Protocol(P::InvalidOwnId(65536)),
            ),
            (
                vec![(0, false), (1, false), (-1, false)],
                H::Protocol(P::MissingShmFd),
            ),
            (
                vec![(0, false), (1, false), (-2, true)],
                H::Protocol(P::InvalidValue(-2)),
            ),
            (
                vec![(0, false), (1, false), (65536, true)],
                H::Protocol(P::InvalidValue(65536)),
            ),
            (
                vec![(0, false), (1, false), (i64::MAX, false)],
                H::Protocol(P::InvalidValue(i64::MAX)),
            ),
            (
                vec![(0, false), (1, false), (1, false)],
                H::Message(MessageError::OwnIdGone { id: 1 }),
            ),
        ];
        for (msgs, want) in cases {
            assert_eq!(run(msgs.clone()).unwrap_err(), want, "{msgs:?}");
        }
    }

    #[test]
    fn tolerated_problems_are_warnings() {
        let mut h = Handshake::new(1);
        h.feed(0, None).unwrap();
        h.feed(2, None).unwrap();
        h.feed(7, None).unwrap(); // unknown peer gone
        h.feed(4, Some(efd())).unwrap();
        h.feed(4, Some(efd())).unwrap(); // beyond 1 vector: closed
        assert!(matches!(
            h.feed(-1, Some(efd())).unwrap(),
            Step::Complete(_)
        ));
        assert_eq!(
            h.warnings(),
            &[
                MessageError::UnknownPeerGone { id: 7 },
                MessageError::TooManyVectors { id: 4, max: 1 }
            ]
        );
    }

    #[test]
    fn finished_machine_refuses_more() {
        let mut h = Handshake::default();
        h.feed(9, None).unwrap_err();
        assert_eq!(h.feed(0, None).unwrap_err(), HandshakeError::Finished);
    }

    // Arbitrary message sequences (never a panic, never an fd leaked, `Finished` after the
    // end) are a property test in `tests/handshake_fds.rs`, its own binary so it can count fds.
    proptest! {
        #[test]
        fn valid_prefix_then_shm_always_completes(
            id in 0u16..=u16::MAX,
            vectors in proptest::collection::vec(0u16..4, 0..20),
        ) {
            let mut h = Handshake::default();
            h.feed(0, None).unwrap();
            h.feed(i64::from(id), None).unwrap();
            for v in &vectors {
                h.feed(i64::from(*v), Some(efd())).unwrap();
            }
            let done = h.feed(-1, Some(efd())).unwrap();
            prop_assert!(matches!(done, Step::Complete(ref e) if e.own_id == id));
        }
    }
}
