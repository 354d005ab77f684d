//! The doorbell side of an ivshmem-doorbell device, abstracted from how peers are found:
//! a [`DoorbellLink`] gives the own ID and vector eventfds (we are rung on) and each peer's
//! vector eventfds (we ring). `ivshm_client::Peer` fits this shape; [`LocalDoorbellBus`]
//! is an in-process implementation for tests and for VMMs hosting several guests.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use rustix::event::{eventfd, EventfdFlags};

/// A change in the set of peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    /// A peer joined with this many vectors.
    Joined {
        /// Peer ID.
        id: u16,
        /// Its vector count.
        vectors: usize,
    },
    /// A peer left.
    Left {
        /// Peer ID.
        id: u16,
    },
}

/// Errors from a doorbell link.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum LinkError {
    /// doorbell link: {0}
    ///
    /// A system call failed.
    Sys(rustix::io::Errno),
    /// doorbell link: the server connection: {0}
    ///
    /// The connection to the ivshmem server failed (an `ivshm_client::Peer` as the link).
    Client(ivshm_client::ClientError),
    /// doorbell link: a member of the local bus panicked while it held the bus's lock
    ///
    /// A member of a [`LocalDoorbellBus`] panicked while it held the bus's lock.
    BusPoisoned,
    /// doorbell link backend: {0}
    ///
    /// Another implementation's backend failed, with its error.
    Backend(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl From<rustix::io::Errno> for LinkError {
    fn from(error: rustix::io::Errno) -> Self {
        LinkError::Sys(error)
    }
}

/// One v0 peer's view of its doorbells.
pub trait DoorbellLink: Send {
    /// Own ID (the guest's IVPosition).
    fn own_id(&self) -> u16;
    /// Own vector count.
    fn own_vector_count(&self) -> usize;
    /// Eventfd signalled when someone rings our vector `vector`.
    fn own_vector_fd(&self, vector: usize) -> Option<BorrowedFd<'_>>;
    /// IDs of the other peers currently known, in increasing order; never the own ID.
    fn peer_ids(&self) -> Vec<u16>;
    /// Eventfd to write to ring `peer`'s vector `vector`; `None` for an unknown peer or a
    /// vector it does not have. For the own ID this is [`DoorbellLink::own_vector_fd`]: a
    /// peer may ring itself, as QEMU's device and client allow, so a doorbell needs no special
    /// case for its own ID.
    fn peer_vector_fd(&self, peer: u16, vector: usize) -> Option<BorrowedFd<'_>>;
    /// A descriptor that becomes readable when [`DoorbellLink::process_events`] has work.
    fn event_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Applies pending peer joins/leaves without blocking and returns them.
    fn process_events(&mut self) -> Result<Vec<PeerChange>, LinkError>;
}

/// Writes 1 to an eventfd (rings it).
pub fn ring_eventfd(fd: BorrowedFd<'_>) -> Result<(), rustix::io::Errno> {
    rustix::io::write(fd, &1u64.to_ne_bytes()).map(|_| ())
}

/// Blocks until `fd` is readable (`true`) or `stop` is (`false`): the wait of a thread that
/// services one descriptor until it is told to stop. `EINTR` is retried; another poll error
/// ends the wait as a stop.
pub fn wait_readable_or_stop(fd: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> bool {
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&stop, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => return fds[1].revents().is_empty(),
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

/// Reads and clears an eventfd's counter without blocking; returns 0 when it was clear.
pub fn drain_eventfd(fd: BorrowedFd<'_>) -> Result<u64, rustix::io::Errno> {
    let mut pollfd = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let ready = rustix::event::poll(&mut pollfd, Some(&rustix::time::Timespec::default()))?;
    if ready == 0 {
        return Ok(0);
    }
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(8) => Ok(u64::from_ne_bytes(buf)),
        Ok(_) => Ok(0),
        Err(rustix::io::Errno::AGAIN) => Ok(0),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Default)]
struct BusState {
    next_id: u16,
    /// Each member's vector eventfds (the originals; members hold duplicates).
    members: BTreeMap<u16, Arc<Vec<OwnedFd>>>,
    /// Per member: pending changes and the eventfd that announces them.
    mailboxes: BTreeMap<u16, (VecDeque<PeerChange>, Arc<OwnedFd>)>,
}

/// An in-process stand-in for an ivshmem server: hands out IDs (monotonic like the v0
/// server) and per-vector eventfds, and tells members about joins and leaves.
#[derive(Debug, Clone, Default)]
pub struct LocalDoorbellBus {
    state: Arc<Mutex<BusState>>,
}

impl LocalDoorbellBus {
    /// A bus with no members.
    pub fn new() -> LocalDoorbellBus {
        LocalDoorbellBus::default()
    }

    /// Joins with `vectors` vectors and returns the member's link.
    pub fn join(&self, vectors: usize) -> Result<LocalDoorbellLink, LinkError> {
        let own: Vec<OwnedFd> = (0..vectors)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK))
            .collect::<Result<_, _>>()?;
        let own = Arc::new(own);
        let announce = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let mut state = self.state.lock().map_err(|_| LinkError::BusPoisoned)?;
        let id = state.next_id;
        state.next_id = state.next_id.wrapping_add(1);
        let peers = state.members.clone();
        for (other, (queue, fd)) in state.mailboxes.iter_mut() {
            if *other != id {
                queue.push_back(PeerChange::Joined { id, vectors });
                ring_eventfd(fd.as_fd())?;
            }
        }
        state.members.insert(id, own.clone());
        state
            .mailboxes
            .insert(id, (VecDeque::new(), announce.clone()));
        Ok(LocalDoorbellLink {
            bus: self.clone(),
            id,
            own,
            peers,
            announce,
        })
    }
}

/// A member of a [`LocalDoorbellBus`]. Leaves the bus on drop.
#[derive(Debug)]
pub struct LocalDoorbellLink {
    bus: LocalDoorbellBus,
    id: u16,
    own: Arc<Vec<OwnedFd>>,
    peers: BTreeMap<u16, Arc<Vec<OwnedFd>>>,
    announce: Arc<OwnedFd>,
}

impl DoorbellLink for LocalDoorbellLink {
    fn own_id(&self) -> u16 {
        self.id
    }

    fn own_vector_count(&self) -> usize {
        self.own.len()
    }

    fn own_vector_fd(&self, vector: usize) -> Option<BorrowedFd<'_>> {
        self.own.get(vector).map(|f| f.as_fd())
    }

    fn peer_ids(&self) -> Vec<u16> {
        self.peers.keys().copied().collect()
    }

    fn peer_vector_fd(&self, peer: u16, vector: usize) -> Option<BorrowedFd<'_>> {
        if peer == self.id {
            return self.own_vector_fd(vector);
        }
        self.peers.get(&peer)?.get(vector).map(|f| f.as_fd())
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.announce.as_fd())
    }

    fn process_events(&mut self) -> Result<Vec<PeerChange>, LinkError> {
        drain_eventfd(self.announce.as_fd())?;
        let mut state = self.bus.state.lock().map_err(|_| LinkError::BusPoisoned)?;
        let changes: Vec<PeerChange> = match state.mailboxes.get_mut(&self.id) {
            Some((queue, _)) => queue.drain(..).collect(),
            None => Vec::new(),
        };
        for change in &changes {
            match *change {
                PeerChange::Joined { id, .. } => {
                    if let Some(fds) = state.members.get(&id) {
                        self.peers.insert(id, fds.clone());
                    }
                }
                PeerChange::Left { id } => {
                    self.peers.remove(&id);
                }
            }
        }
        Ok(changes)
    }
}

impl Drop for LocalDoorbellLink {
    fn drop(&mut self) {
        let Ok(mut state) = self.bus.state.lock() else {
            return;
        };
        state.members.remove(&self.id);
        state.mailboxes.remove(&self.id);
        for (queue, fd) in state.mailboxes.values_mut() {
            queue.push_back(PeerChange::Left { id: self.id });
            // Best effort: a full eventfd counter still reads as readable.
            let _ = ring_eventfd(fd.as_fd());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that panics while it holds the bus's lock leaves the bus unusable; the others
    /// are told so by a typed error (no panic, no string to parse).
    #[test]
    fn a_poisoned_bus_is_a_typed_error() {
        let bus = LocalDoorbellBus::new();
        let mut a = bus.join(1).unwrap();
        let state = bus.state.clone();
        let _ = std::thread::spawn(move || {
            let _guard = state.lock().unwrap();
            panic!("a member panics holding the bus's lock");
        })
        .join();
        assert!(matches!(a.process_events(), Err(LinkError::BusPoisoned)));
        assert!(matches!(bus.join(1), Err(LinkError::BusPoisoned)));
    }

    /// A client error stays typed and is said once: in the message, not again as a source.
    #[test]
    fn a_client_error_is_kept_typed_and_said_once() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        let error = LinkError::Client(ivshm_client::ClientError::ServerGone);
        send_sync(&error);
        assert_eq!(
            error.to_string(),
            "doorbell link: the server connection: the server closed the connection"
        );
        assert!(std::error::Error::source(&error).is_none());
    }
}
