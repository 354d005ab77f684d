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
//! - Waiting reads our own vector's eventfd: one blocking `read(2)` per wake-up without a
//!   timeout, `poll(2)` and `read(2)` with one; no epoll, no timer fd. For that the eventfds of
//!   our own vectors are made blocking when the doorbell is made ([`Peer::wait`] only watches
//!   them, edge-triggered, and never reads them; the flag belongs to the open file, shared with
//!   the peer).
//! - Leaves: call [`PeerDoorbell::process_server_messages`] when [`PeerDoorbell::socket_fd`] is
//!   readable (or now and then) and pass every `Left` id to `Region::peer_left`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ivshm_channel::doorbell::{take_eventfd, wait_eventfd};
use ivshm_channel::{Doorbell, DoorbellError};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
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

impl PeerDoorbell {
    /// Wraps a connected peer; makes its own vectors' eventfds blocking (see the module
    /// documentation).
    pub fn new(peer: Peer) -> Result<PeerDoorbell, ClientError> {
        let own = (0..peer.vectors())
            .filter_map(|v| peer.own_vector_fd(v))
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::sys("dup")(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
        for fd in &own {
            let flags = fcntl_getfl(fd).map_err(ClientError::sys("fcntl"))?;
            fcntl_setfl(fd, flags - OFlags::NONBLOCK).map_err(ClientError::sys("fcntl"))?;
        }
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
        wait_eventfd(self.own_fd(vector)?, timeout)
    }

    fn take(&self, vector: u16) -> Result<bool, DoorbellError> {
        take_eventfd(self.own_fd(vector)?)
    }

    fn fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.own_fd(vector).ok()
    }
}
