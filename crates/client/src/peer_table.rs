//! The peer table: which peers exist and the eventfds of each of their vectors, plus our own.
//!
//! Pure bookkeeping, no I/O: it is fed the classified messages of the v0 protocol and says what
//! changed. It owns every received eventfd (`OwnedFd`), so anything it rejects or forgets is
//! closed.
//!
//! # Join rule
//!
//! The v0 protocol has no "peer joined" message: a server (ours or QEMU's) sends a new peer's
//! N eventfds back to back, one message per vector, and assumes every peer uses the same N. A
//! peer therefore counts as **joined** when
//! 1. its vector count reaches our own vector count, or
//! 2. fewer arrived and the server's burst ended: the socket stayed without readable data for
//!    a short grace period (`ConnectOptions::settle`, default 50 ms;
//!    [`PeerTable::end_of_burst`]). The grace period absorbs a server that is preempted
//!    between two messages of one burst; with a server that gives every peer as many vectors
//!    as we have (ours and QEMU's do), rule 1 always applies and nothing waits.
//!
//! Peers whose first vector arrives before any of our own vectors are the peers that were
//! already there when we connected (QEMU's server sends them before our own vectors): they are
//! *present* from the start and never reported as joining. A peer that leaves before its join was
//! reported is reported as joined, then left, so every `Left` follows a `Joined`.
//!
//! Vectors beyond the configured maximum (64 by default, QEMU's limit) are closed and reported as
//! [`MessageError::TooManyVectors`], which callers treat as a warning.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use ivshm_proto::v0::{classify, Message, ProtocolError};
use thiserror::Error;

use crate::events::PeerEvent;

/// A message the table could not apply. The message's fd, if any, has been closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum MessageError {
    /// {0}
    ///
    /// Not a valid v0 message (value out of range, `-1` without an fd).
    Protocol(ProtocolError),
    /// server sent unexpected shared memory message
    ///
    /// A second shared-memory message (QEMU: "server sent unexpected shared memory message").
    UnexpectedSharedMemory,
    /// server announced that our own id {id} left
    ///
    /// The server said that we ourselves left (QEMU: "invalid peer").
    OwnIdGone {
        /// Our own id.
        id: u16,
    },
    /// server announced that unknown peer {id} left
    ///
    /// The server said a peer left that we never heard of.
    UnknownPeerGone {
        /// The unknown id.
        id: u16,
    },
    /// too many eventfds received for peer {id}: at most {max} vectors, extra fd closed
    ///
    /// More eventfds for one peer than the maximum; the extra fd was closed.
    TooManyVectors {
        /// Whose vector it was (possibly our own id).
        id: u16,
        /// The maximum in force.
        max: usize,
    },
}

impl From<ProtocolError> for MessageError {
    fn from(error: ProtocolError) -> Self {
        Self::Protocol(error)
    }
}

impl MessageError {
    /// True for problems QEMU's device merely warns about (the message is dropped, nothing
    /// else changes); false for those it rejects during setup.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            MessageError::TooManyVectors { .. } | MessageError::UnknownPeerGone { .. }
        )
    }
}

/// What applying one message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Our own vector with this index arrived (register it to be woken when it is rung).
    pub own_vector: Option<usize>,
    /// Peer events that became known, in order.
    pub events: Vec<PeerEvent>,
}

/// One other peer's vectors.
#[derive(Debug)]
struct PeerVectors {
    /// Vector `i` is `fds[i]`.
    fds: Vec<OwnedFd>,
    /// Its presence is known to the user: it was there at connect, or `Joined` was reported.
    announced: bool,
}

/// Our own id and vectors, and every other peer's vectors.
#[derive(Debug)]
pub struct PeerTable {
    own_id: u16,
    own: Vec<OwnedFd>,
    peers: BTreeMap<u16, PeerVectors>,
    max_vectors: usize,
}

impl PeerTable {
    /// An empty table for a peer with id `own_id` that accepts up to `max_vectors` per peer.
    pub fn new(own_id: u16, max_vectors: usize) -> Self {
        PeerTable {
            own_id,
            own: Vec::new(),
            peers: BTreeMap::new(),
            max_vectors,
        }
    }

    /// Our own id.
    pub fn own_id(&self) -> u16 {
        self.own_id
    }

    /// How many of our own vectors arrived.
    pub fn own_vector_count(&self) -> usize {
        self.own.len()
    }

    /// Our own vector `vector` (the eventfd others ring to reach us).
    pub fn own_vector(&self, vector: usize) -> Option<BorrowedFd<'_>> {
        self.own.get(vector).map(AsFd::as_fd)
    }

    /// Ids of the peers the user knows about (present at connect or reported joined), sorted.
    pub fn peer_ids(&self) -> Vec<u16> {
        self.peers
            .iter()
            .filter(|(_, p)| p.announced)
            .map(|(id, _)| *id)
            .collect()
    }

    /// How many vectors a known peer has.
    pub fn peer_vector_count(&self, id: u16) -> Option<usize> {
        self.peers
            .get(&id)
            .filter(|p| p.announced)
            .map(|p| p.fds.len())
    }

    /// The eventfd that rings vector `vector` of peer `id`.
    pub fn peer_vector(&self, id: u16, vector: usize) -> Option<BorrowedFd<'_>> {
        self.peers
            .get(&id)
            .filter(|p| p.announced)
            .and_then(|p| p.fds.get(vector))
            .map(AsFd::as_fd)
    }

    /// The largest vector count among other peers seen so far (announced or not).
    pub fn max_peer_vector_count(&self) -> usize {
        self.peers.values().map(|p| p.fds.len()).max().unwrap_or(0)
    }

    /// Applies one message received after the handshake's version and id messages.
    ///
    /// The shared-memory message is not the table's business: `-1` with an fd is answered with
    /// [`MessageError::UnexpectedSharedMemory`] (the handshake intercepts the first one).
    pub fn apply(&mut self, value: i64, fd: Option<OwnedFd>) -> Result<Applied, MessageError> {
        match classify(value, fd.is_some())? {
            Message::SharedMemory => Err(MessageError::UnexpectedSharedMemory),
            Message::PeerVector { id } => match fd {
                Some(fd) => self.add_vector(id, fd),
                // classify() only says PeerVector when an fd is there.
                None => Err(MessageError::Protocol(ProtocolError::InvalidValue(value))),
            },
            Message::PeerGone { id } => self.remove(id),
        }
    }

    fn add_vector(&mut self, id: u16, fd: OwnedFd) -> Result<Applied, MessageError> {
        let max = self.max_vectors;
        if id == self.own_id {
            if self.own.len() >= max {
                return Err(MessageError::TooManyVectors { id, max });
            }
            self.own.push(fd);
            return Ok(Applied {
                own_vector: Some(self.own.len() - 1),
                events: Vec::new(),
            });
        }
        let own_count = self.own.len();
        // Peers first seen before any own vector were there before us.
        let peer = self.peers.entry(id).or_insert_with(|| PeerVectors {
            fds: Vec::new(),
            announced: own_count == 0,
        });
        if peer.fds.len() >= max {
            return Err(MessageError::TooManyVectors { id, max });
        }
        peer.fds.push(fd);
        let mut applied = Applied::default();
        if !peer.announced && peer.fds.len() >= own_count {
            peer.announced = true;
            applied.events.push(PeerEvent::Joined {
                id,
                vectors: peer.fds.len(),
            });
        }
        Ok(applied)
    }

    fn remove(&mut self, id: u16) -> Result<Applied, MessageError> {
        if id == self.own_id {
            return Err(MessageError::OwnIdGone { id });
        }
        let Some(peer) = self.peers.remove(&id) else {
            return Err(MessageError::UnknownPeerGone { id });
        };
        let mut applied = Applied::default();
        if !peer.announced {
            applied.events.push(PeerEvent::Joined {
                id,
                vectors: peer.fds.len(),
            });
        }
        applied.events.push(PeerEvent::Left { id });
        // Dropping `peer` closes its eventfds.
        Ok(applied)
    }

    /// True when some peer's vectors are still arriving (its join is not reported yet).
    pub fn has_pending(&self) -> bool {
        self.peers.values().any(|p| !p.announced)
    }

    /// The server's burst ended (no more readable data): peers still waiting for vectors count
    /// as joined with the vectors they have.
    pub fn end_of_burst(&mut self) -> Vec<PeerEvent> {
        let mut events = Vec::new();
        for (id, peer) in self.peers.iter_mut() {
            if !peer.announced {
                peer.announced = true;
                events.push(PeerEvent::Joined {
                    id: *id,
                    vectors: peer.fds.len(),
                });
            }
        }
        events
    }

    /// Every own vector fd with its index (for registering them all).
    pub fn own_vectors(&self) -> impl Iterator<Item = (usize, BorrowedFd<'_>)> {
        self.own.iter().enumerate().map(|(i, fd)| (i, fd.as_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};

    fn efd() -> OwnedFd {
        eventfd(0, EventfdFlags::CLOEXEC).unwrap()
    }

    fn joined(id: u16, vectors: usize) -> PeerEvent {
        PeerEvent::Joined { id, vectors }
    }

    #[test]
    fn peers_before_own_vectors_are_present_without_events() {
        let mut t = PeerTable::new(5, 64);
        for _ in 0..2 {
            assert_eq!(t.apply(1, Some(efd())).unwrap(), Applied::default());
        }
        assert_eq!(t.apply(5, Some(efd())).unwrap().own_vector, Some(0));
        assert_eq!(t.apply(5, Some(efd())).unwrap().own_vector, Some(1));
        assert_eq!(t.peer_ids(), vec![1]);
        assert_eq!(t.peer_vector_count(1), Some(2));
        assert_eq!(t.own_vector_count(), 2);
        assert!(t.end_of_burst().is_empty());
    }

    #[test]
    fn join_is_reported_when_count_reaches_own_count() {
        let mut t = PeerTable::new(0, 64);
        t.apply(0, Some(efd())).unwrap();
        t.apply(0, Some(efd())).unwrap();
        assert!(t.apply(3, Some(efd())).unwrap().events.is_empty());
        assert!(t.peer_ids().is_empty(), "not joined yet");
        assert!(t.peer_vector(3, 0).is_none());
        assert_eq!(t.apply(3, Some(efd())).unwrap().events, vec![joined(3, 2)]);
        assert_eq!(t.peer_ids(), vec![3]);
        assert!(t.peer_vector(3, 1).is_some());
        // A third vector (a peer with more vectors than us) is kept, not re-announced.
        assert!(t.apply(3, Some(efd())).unwrap().events.is_empty());
        assert_eq!(t.peer_vector_count(3), Some(3));
        assert_eq!(
            t.apply(3, None).unwrap().events,
            vec![PeerEvent::Left { id: 3 }]
        );
        assert!(t.peer_ids().is_empty());
    }

    #[test]
    fn short_join_completes_at_end_of_burst() {
        let mut t = PeerTable::new(0, 64);
        for _ in 0..4 {
            t.apply(0, Some(efd())).unwrap();
        }
        t.apply(7, Some(efd())).unwrap();
        assert_eq!(t.end_of_burst(), vec![joined(7, 1)]);
        assert!(t.end_of_burst().is_empty());
    }

    #[test]
    fn leave_before_join_reports_both() {
        let mut t = PeerTable::new(0, 64);
        t.apply(0, Some(efd())).unwrap();
        t.apply(0, Some(efd())).unwrap();
        t.apply(9, Some(efd())).unwrap();
        assert_eq!(
            t.apply(9, None).unwrap().events,
            vec![joined(9, 1), PeerEvent::Left { id: 9 }]
        );
    }

    /// Reads an eventfd's counter without blocking (0 when it was not rung).
    fn rung(fd: &OwnedFd) -> u64 {
        let mut buf = [0u8; 8];
        match rustix::io::read(fd, &mut buf) {
            Ok(_) => u64::from_ne_bytes(buf),
            Err(rustix::io::Errno::AGAIN) => 0,
            Err(e) => panic!("eventfd read: {e}"),
        }
    }

    fn efd_nonblocking() -> OwnedFd {
        eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
    }

    #[test]
    fn a_reused_id_is_a_new_peer_with_its_own_eventfds() {
        let mut t = PeerTable::new(0, 64);
        t.apply(0, Some(efd())).unwrap();
        let old = efd_nonblocking();
        let old_view = old.try_clone().unwrap();
        assert_eq!(t.apply(3, Some(old)).unwrap().events, vec![joined(3, 1)]);
        assert_eq!(
            t.apply(3, None).unwrap().events,
            vec![PeerEvent::Left { id: 3 }]
        );
        assert!(t.peer_vector(3, 0).is_none());
        // A new peer with the same id: a join of its own, with its own eventfd.
        let new = efd_nonblocking();
        let new_view = new.try_clone().unwrap();
        assert_eq!(t.apply(3, Some(new)).unwrap().events, vec![joined(3, 1)]);
        assert_eq!(t.peer_ids(), vec![3]);
        let vector = t.peer_vector(3, 0).unwrap();
        rustix::io::write(vector, &1u64.to_ne_bytes()).unwrap();
        assert_eq!(rung(&new_view), 1, "ringing 3 reaches the new peer");
        assert_eq!(rung(&old_view), 0, "and not the one that left");
    }

    proptest::proptest! {
        /// Whatever arrives: no panic, and the events exactly explain how the listed peers
        /// change (a `Joined` id was not listed, a `Left` id was; peers present at connect
        /// are listed without an event).
        #[test]
        fn events_explain_the_peer_list(
            msgs in proptest::collection::vec(
                (-2i64..6, proptest::bool::ANY, proptest::bool::ANY),
                0..80,
            )
        ) {
            use std::collections::BTreeSet;
            let mut t = PeerTable::new(0, 3);
            for (value, with_fd, burst_end) in msgs {
                let mut visible: BTreeSet<u16> = t.peer_ids().into_iter().collect();
                let own_before = t.own_vector_count();
                let mut events = Vec::new();
                if let Ok(applied) = t.apply(value, with_fd.then(efd)) {
                    events.extend(applied.events);
                }
                if burst_end {
                    events.extend(t.end_of_burst());
                }
                for e in events {
                    match e {
                        PeerEvent::Joined { id, vectors } => {
                            proptest::prop_assert!(visible.insert(id), "{} joined twice", id);
                            proptest::prop_assert!(vectors <= 3);
                        }
                        PeerEvent::Left { id } => {
                            proptest::prop_assert!(visible.remove(&id), "{} left unseen", id);
                        }
                    }
                }
                let listed: BTreeSet<u16> = t.peer_ids().into_iter().collect();
                // Peers first seen before our own vectors appear without an event.
                let silent: BTreeSet<u16> = listed.difference(&visible).copied().collect();
                proptest::prop_assert!(visible.is_subset(&listed));
                if own_before > 0 {
                    proptest::prop_assert!(silent.is_empty(), "{:?} appeared silently", silent);
                }
                proptest::prop_assert!(t.own_vector_count() <= 3);
            }
        }
    }

    #[test]
    fn rejected_messages() {
        let mut t = PeerTable::new(2, 1);
        assert_eq!(
            t.apply(-1, Some(efd())),
            Err(MessageError::UnexpectedSharedMemory)
        );
        assert_eq!(
            t.apply(-1, None),
            Err(MessageError::Protocol(ProtocolError::MissingShmFd))
        );
        assert_eq!(
            t.apply(-2, None),
            Err(MessageError::Protocol(ProtocolError::InvalidValue(-2)))
        );
        assert_eq!(
            t.apply(65536, Some(efd())),
            Err(MessageError::Protocol(ProtocolError::InvalidValue(65536)))
        );
        assert_eq!(t.apply(2, None), Err(MessageError::OwnIdGone { id: 2 }));
        let e = t.apply(4, None).unwrap_err();
        assert_eq!(e, MessageError::UnknownPeerGone { id: 4 });
        assert!(e.is_warning());
        t.apply(2, Some(efd())).unwrap();
        let e = t.apply(2, Some(efd())).unwrap_err();
        assert_eq!(e, MessageError::TooManyVectors { id: 2, max: 1 });
        assert!(e.is_warning());
        t.apply(4, Some(efd())).unwrap();
        assert_eq!(
            t.apply(4, Some(efd())),
            Err(MessageError::TooManyVectors { id: 4, max: 1 })
        );
        assert_eq!(t.own_vector_count(), 1);
        assert_eq!(t.peer_vector_count(4), Some(1));
    }
}
