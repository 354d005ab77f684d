//! [`PeerDoorbell`]: a host peer as the doorbell of `ivshm-channel` channels (feature
//! `channel`).
//!
//! The dependency points from this crate to the channel crate, so that the channel crate stays
//! free of sockets: it only knows its `Doorbell` trait.
//!
//! - Ringing writes the target peer's eventfd ([`Peer::notify`]). A peer that joined after our
//!   last look at the server socket is not in the peer table yet: the server's pending messages
//!   are read (only the socket, never our own vectors) and the ring is tried again. The joins
//!   and leaves read that way are kept for [`PeerDoorbell::take_events`].
//! - Waiting polls our own vector's eventfd and reads it: one `poll(2)` and one `read(2)` per
//!   wake-up (the peer's eventfds are non-blocking), no epoll, no timer fd.
//! - Leaves: call [`PeerDoorbell::process_server_messages`] when [`PeerDoorbell::socket_fd`] is
//!   readable (or now and then) and pass every `Left` id to `Region::peer_left`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ivshm_channel::{Doorbell, DoorbellError};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::error::ClientError;
use crate::events::PeerEvent;
use crate::peer::Peer;

/// A host peer used as a channel doorbell.
#[derive(Debug)]
pub struct PeerDoorbell {
    peer: Mutex<Peer>,
    /// Our own vectors' eventfds (duplicates: waiting does not lock the peer).
    own: Vec<OwnedFd>,
    id: u16,
    /// Joins and leaves read while ringing, for `take_events`.
    events: Mutex<Vec<PeerEvent>>,
}

fn errno(op: &'static str) -> impl Fn(Errno) -> DoorbellError {
    move |errno| DoorbellError::Sys { op, errno }
}

impl PeerDoorbell {
    /// Wraps a connected peer.
    pub fn new(peer: Peer) -> Result<PeerDoorbell, ClientError> {
        let own = (0..peer.vectors())
            .filter_map(|v| peer.own_vector_fd(v))
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::sys("dup")(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
        Ok(PeerDoorbell {
            id: peer.id(),
            peer: Mutex::new(peer),
            own,
            events: Mutex::new(Vec::new()),
        })
    }

    /// The peer (locked; do not call its `wait`, which would consume our vectors' rings).
    pub fn peer(&self) -> MutexGuard<'_, Peer> {
        self.peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server socket, readable when [`PeerDoorbell::process_server_messages`] has work.
    pub fn socket_fd(&self) -> Result<OwnedFd, ClientError> {
        self.peer()
            .socket_fd()
            .try_clone_to_owned()
            .map_err(|e| ClientError::sys("dup")(Errno::from_io_error(&e).unwrap_or(Errno::IO)))
    }

    /// Reads the server's pending messages; returns the joins and leaves since the last call
    /// (including those read while ringing).
    pub fn process_server_messages(&self) -> Result<Vec<PeerEvent>, ClientError> {
        let fresh = self.peer().process_server_messages()?;
        let mut events = self.take_events();
        events.extend(fresh);
        Ok(events)
    }

    /// The joins and leaves read while ringing.
    pub fn take_events(&self) -> Vec<PeerEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn own_fd(&self, vector: u16) -> Result<BorrowedFd<'_>, DoorbellError> {
        self.own
            .get(usize::from(vector))
            .map(|f| f.as_fd())
            .ok_or(DoorbellError::UnknownVector {
                peer: self.id,
                vector,
                vectors: self.own.len() as u16,
            })
    }

    /// Reads the (non-blocking) eventfd: true if it had been rung.
    fn drain(fd: BorrowedFd<'_>) -> Result<bool, DoorbellError> {
        crate::doorbell::drain(fd)
            .map(|count| count.is_some())
            .map_err(errno("eventfd read"))
    }
}

fn timespec(t: Duration) -> Timespec {
    Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    }
}

impl Doorbell for PeerDoorbell {
    fn own_id(&self) -> u16 {
        self.id
    }

    fn vectors(&self) -> u16 {
        self.own.len() as u16
    }

    fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError> {
        let mut p = self.peer();
        match p.notify(peer, usize::from(vector)) {
            Err(ClientError::UnknownPeer(_)) => {
                // Maybe it joined since we last read the socket.
                match p.process_server_messages() {
                    Ok(events) => self
                        .events
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(events),
                    Err(e) => return Err(DoorbellError::Other(Box::new(e))),
                }
                p.notify(peer, usize::from(vector))
            }
            other => other,
        }
        .map_err(|e| match e {
            ClientError::UnknownPeer(peer) => DoorbellError::UnknownPeer { peer },
            ClientError::UnknownVector {
                peer,
                vector,
                vectors,
            } => DoorbellError::UnknownVector {
                peer,
                vector: vector.try_into().unwrap_or(u16::MAX),
                vectors: vectors.try_into().unwrap_or(u16::MAX),
            },
            e => DoorbellError::Other(Box::new(e)),
        })
    }

    fn wait(&self, vector: u16, timeout: Option<Duration>) -> Result<bool, DoorbellError> {
        let fd = self.own_fd(vector)?;
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        loop {
            // `None`: no limit (no timeout, or one too large for the clock).
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            match poll(&mut fds, left.map(timespec).as_ref()) {
                Ok(0) => {}
                // Readable: one read consumes the count (another thread may have been first).
                Ok(_) => {
                    if Self::drain(fd)? {
                        return Ok(true);
                    }
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(errno("poll")(e)),
            }
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(false);
            }
        }
    }

    fn take(&self, vector: u16) -> Result<bool, DoorbellError> {
        Self::drain(self.own_fd(vector)?)
    }

    fn fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.own_fd(vector).ok()
    }
}
