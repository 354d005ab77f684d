//! One connected peer (its socket, id, eventfds and outgoing queue), and the table of every
//! peer connection by serial with its place in the epoll set.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use rustix::io::Errno;
use rustix::net::{recv, RecvFlags};

use crate::event_loop::{Poller, Token};
use crate::inflight::{Reading, SendBuffers};
use crate::queue::{Flushed, OutgoingQueue, QueueFull};
use crate::regions::RegionId;

/// Why a peer went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemovalReason {
    /// It closed its socket (a normal leave).
    Closed,
    /// It wrote to its socket; peers never send anything in protocol version 0.
    SentData,
    /// Its outgoing queue overflowed: it stopped reading.
    StoppedReading(QueueFull),
    /// The server ran out of fds in flight (`ETOOMANYREFS`) and this peer held the most
    /// messages unread (each may carry an fd).
    HeldFds {
        /// Its unread messages.
        unread: usize,
    },
    /// Sending to it failed.
    SendFailed(Errno),
    /// Reading its socket failed.
    ReadFailed(Errno),
    /// The event loop could not watch its socket.
    PollFailed(Errno),
    /// The server removed every peer before stopping ([`Server::remove_all_peers`](crate::Server::remove_all_peers)).
    ServerStopping,
}

impl RemovalReason {
    /// The metric label of every reason, in [`index`](Self::index) order.
    pub const LABELS: [&'static str; 8] = [
        "closed",
        "sent_data",
        "stopped_reading",
        "held_fds",
        "send_failed",
        "read_failed",
        "poll_failed",
        "server_stopping",
    ];

    /// The reason's position in [`LABELS`](Self::LABELS).
    pub fn index(&self) -> usize {
        match self {
            RemovalReason::Closed => 0,
            RemovalReason::SentData => 1,
            RemovalReason::StoppedReading(_) => 2,
            RemovalReason::HeldFds { .. } => 3,
            RemovalReason::SendFailed(_) => 4,
            RemovalReason::ReadFailed(_) => 5,
            RemovalReason::PollFailed(_) => 6,
            RemovalReason::ServerStopping => 7,
        }
    }

    /// True for every reason except a clean close and the server stopping.
    pub fn is_drop(&self) -> bool {
        !matches!(self, RemovalReason::Closed | RemovalReason::ServerStopping)
    }
}

impl fmt::Display for RemovalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemovalReason::Closed => write!(f, "closed its connection"),
            RemovalReason::SentData => {
                write!(f, "sent data (peers must not write to the server socket)")
            }
            RemovalReason::StoppedReading(full) => write!(f, "{full}"),
            RemovalReason::HeldFds { unread } => write!(
                f,
                "it held {unread} messages (with their fds) unread when the server ran out of \
                 fds in flight (ETOOMANYREFS)"
            ),
            RemovalReason::SendFailed(e) => write!(f, "send failed: {e}"),
            RemovalReason::ReadFailed(e) => write!(f, "read failed: {e}"),
            RemovalReason::PollFailed(e) => write!(f, "could not watch its socket: {e}"),
            RemovalReason::ServerStopping => write!(f, "the server is stopping"),
        }
    }
}

/// Every peer connection by serial (its epoll token): the region and peer id it belongs to.
///
/// The only code that puts a peer socket into the epoll set or takes it out, so the table and
/// the set agree by construction.
#[derive(Debug)]
pub(crate) struct Connections {
    poller: Arc<Poller>,
    owners: HashMap<u64, (RegionId, u16)>,
    next_serial: u64,
    /// Send buffer sizes for peer sockets (the bound on what a peer can leave unread).
    buffers: SendBuffers,
    /// Connections whose last send was refused with `ETOOMANYREFS` (by serial).
    starved: BTreeSet<u64>,
}

impl Connections {
    pub(crate) fn new(poller: Arc<Poller>) -> Self {
        Connections {
            poller,
            owners: HashMap::new(),
            next_serial: 0,
            buffers: SendBuffers::calibrate(),
            starved: BTreeSet::new(),
        }
    }

    /// The connections whose last send was refused for lack of fds in flight, with their
    /// region and peer id.
    pub(crate) fn starved(&self) -> Vec<(RegionId, u16)> {
        self.starved
            .iter()
            .filter_map(|serial| self.owners.get(serial).copied())
            .collect()
    }

    /// Whether some connection waits for fds in flight to be freed.
    pub(crate) fn has_starved(&self) -> bool {
        !self.starved.is_empty()
    }

    /// Makes `socket` peer `id` of `region` and watches it; returns the peer. Serials increase
    /// with every join and are never reused (unlike peer ids).
    pub(crate) fn add(
        &mut self,
        region: RegionId,
        id: u16,
        socket: OwnedFd,
        eventfds: Vec<Arc<OwnedFd>>,
        queue: OutgoingQueue,
    ) -> Result<Peer, Errno> {
        let serial = self.next_serial;
        // Gated: no fd until it has read its first messages (see `inflight`).
        let gated = match self.buffers.start(socket.as_fd()) {
            Ok(()) => self.buffers.gate_works(),
            Err(errno) => {
                tracing::warn!(%errno, "cannot size a peer socket's send buffer");
                false
            }
        };
        self.poller.add(socket.as_fd(), Token::Peer(serial))?;
        self.next_serial += 1;
        self.owners.insert(serial, (region, id));
        Ok(Peer {
            id,
            serial,
            socket,
            eventfds,
            queue,
            writable_interest: false,
            gated,
            sent_total: 0,
            handshake_end: None,
            stall: None,
        })
    }

    /// Forgets `peer` and stops watching its socket (closed when the peer is dropped).
    pub(crate) fn remove(&mut self, peer: &Peer) {
        self.owners.remove(&peer.serial);
        self.starved.remove(&peer.serial);
        let _ = self.poller.remove(peer.socket.as_fd());
    }

    /// The region and peer id of connection `serial` (`None` once it has gone, e.g. earlier in
    /// the same batch of events).
    pub(crate) fn owner(&self, serial: u64) -> Option<(RegionId, u16)> {
        self.owners.get(&serial).copied()
    }
}

/// A connected peer.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) id: u16,
    pub(crate) serial: u64,
    socket: OwnedFd,
    /// One eventfd per vector, shared with queued messages until they are sent.
    pub(crate) eventfds: Vec<Arc<OwnedFd>>,
    pub(crate) queue: OutgoingQueue,
    writable_interest: bool,
    /// It has not read its first messages yet: it gets no fds.
    gated: bool,
    /// Messages sent to it since it joined.
    sent_total: u64,
    /// How many messages had been sent to it when its whole handshake had gone out.
    handshake_end: Option<u64>,
    /// While fds in flight have run out: how many messages it had read when the server saw
    /// that count last change, and when (see [`Peer::reading`]).
    stall: Option<(u64, Instant)>,
}

impl Peer {
    /// Its connection.
    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Looks at what arrived on the socket: `None` if nothing (spurious wake-up), else why the
    /// peer must go.
    pub(crate) fn check_input(&self) -> Option<RemovalReason> {
        let mut buf = [0u8; 64];
        loop {
            return match recv(&self.socket, &mut buf, RecvFlags::DONTWAIT) {
                Ok((0, _)) => Some(RemovalReason::Closed),
                Ok(_) => Some(RemovalReason::SentData),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => None,
                // It closed with messages still unread: a leave all the same.
                Err(Errno::CONNRESET) => Some(RemovalReason::Closed),
                Err(e) => Some(RemovalReason::ReadFailed(e)),
            };
        }
    }

    /// How many messages it has not read yet (at most).
    pub(crate) fn unread(&self, connections: &Connections) -> usize {
        connections
            .buffers
            .unread_messages(self.socket.as_fd())
            .unwrap_or(0)
    }

    /// What it has read, as seen `now` (called at each retry while fds in flight have run out;
    /// see `inflight::pick_hog`): its stall starts when the server first looks, and again
    /// whenever it has read something since the last look.
    pub(crate) fn reading(&mut self, connections: &Connections, now: Instant) -> Reading {
        let unread = self.unread(connections);
        let read = self.sent_total.saturating_sub(unread as u64);
        let since = match self.stall {
            Some((seen, since)) if seen == read => since,
            _ => {
                self.stall = Some((read, now));
                now
            }
        };
        Reading {
            unread,
            read,
            read_handshake: self.handshake_end.is_some_and(|end| read >= end),
            stalled_for: now.saturating_duration_since(since),
        }
    }

    /// Fds in flight are available again: the stalls seen during the shortage are forgotten.
    pub(crate) fn forget_stall(&mut self) {
        self.stall = None;
    }

    /// Its socket became writable: if it was gated, it has read its first messages, so it may
    /// be sent fds from now on (up to the cap of its send buffer).
    pub(crate) fn on_writable(&mut self, connections: &Connections) {
        if self.gated {
            self.gated = false;
            if let Err(errno) = connections.buffers.open(self.socket.as_fd()) {
                tracing::warn!(%errno, "cannot size a peer socket's send buffer");
            }
        }
    }

    /// Sends what the socket takes and arms or disarms writability interest accordingly.
    /// A send refused with `ETOOMANYREFS` leaves the message queued and the connection marked
    /// starved in `connections` (the loop frees fds and retries, see `Regions::relieve`).
    pub(crate) fn flush(
        &mut self,
        connections: &mut Connections,
        sent: &mut u64,
    ) -> Result<(), RemovalReason> {
        let before = *sent;
        let flushed = self.queue.flush(self.socket.as_fd(), sent, !self.gated);
        self.sent_total += sent.saturating_sub(before);
        if self.handshake_end.is_none() && self.queue.handshake_left() == 0 {
            self.handshake_end = Some(self.sent_total);
        }
        let state = flushed.map_err(|e| match e {
            // The peer has closed its end: a leave, not a fault.
            Errno::PIPE | Errno::CONNRESET => RemovalReason::Closed,
            e => RemovalReason::SendFailed(e),
        })?;
        if state == Flushed::TooManyRefs {
            connections.starved.insert(self.serial);
        } else {
            connections.starved.remove(&self.serial);
        }
        let want_writable = matches!(state, Flushed::WouldBlock | Flushed::Gated);
        if want_writable != self.writable_interest {
            connections
                .poller
                .set_writable_interest(self.socket.as_fd(), Token::Peer(self.serial), want_writable)
                .map_err(RemovalReason::PollFailed)?;
            self.writable_interest = want_writable;
        }
        Ok(())
    }
}
