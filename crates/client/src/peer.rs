//! [`Peer`]: one v0 connection to a server (ours or QEMU's `ivshmem-server`).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ivshm_mem::Mapping;
use ivshm_proto::v0::MAX_VECTORS;

use crate::connection::{establish, Session, DEFAULT_SETTLE};
use crate::doorbell;
use crate::error::ClientError;
use crate::events::{Event, Poller, Source};
use crate::reconnect::{Backoff, RetryTimer};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Time allowed for connecting and the whole handshake (default 5 s).
    pub timeout: Duration,
    /// Most eventfds kept per peer, ours included; extra ones are closed with a warning
    /// (default and maximum 64, QEMU's limit).
    pub max_vectors: usize,
    /// Reconnect when the server closes the socket (default false). See [`crate::reconnect`].
    pub reconnect: bool,
    /// First delay before reconnecting (default 100 ms); doubles after each failure.
    pub reconnect_delay: Duration,
    /// Longest delay between reconnect attempts (default 5 s).
    pub reconnect_max_delay: Duration,
    /// How long the socket must stay quiet after our first own vector before the handshake
    /// counts as complete, when no other peer says how many vectors to expect; also how long
    /// a peer that sent fewer vectors than we have waits before its join is reported
    /// (default 50 ms). See [`crate::peer_table`] for the join rule.
    pub settle: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            timeout: Duration::from_secs(5),
            max_vectors: MAX_VECTORS,
            reconnect: false,
            reconnect_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            settle: DEFAULT_SETTLE,
        }
    }
}

/// One v0 connection to a server: our id, the shared memory, the peer table and the doorbells.
///
/// Every method is non-blocking except [`Peer::connect`], [`Peer::wait`] and
/// [`Peer::reconnect`]. To drive a peer from your own poll loop, watch [`Peer::poll_fd`] and,
/// whenever it is readable, call `wait(Some(Duration::ZERO))` until it returns `Ok(None)`.
#[derive(Debug)]
pub struct Peer {
    pub(crate) path: PathBuf,
    pub(crate) opts: ConnectOptions,
    pub(crate) session: Session,
    pub(crate) connected: bool,
    pub(crate) poller: Poller,
    pub(crate) timer: RetryTimer,
    pub(crate) burst_timer: RetryTimer,
    /// When pending joins are reported if no more vectors arrive.
    pub(crate) burst_deadline: Option<Instant>,
    pub(crate) backoff: Backoff,
    pub(crate) queue: VecDeque<Event>,
    /// Reused buffer of ready sources.
    pub(crate) ready: Vec<Source>,
}

impl Peer {
    /// Connects to the server at `socket` and completes the handshake within `opts.timeout`.
    pub fn connect(socket: &Path, opts: ConnectOptions) -> Result<Peer, ClientError> {
        let session = establish(socket, &opts)?;
        let poller = Poller::new().map_err(ClientError::sys("epoll_create"))?;
        let timer = RetryTimer::new().map_err(ClientError::sys("timerfd_create"))?;
        poller
            .add(timer.fd(), Source::Timer)
            .map_err(ClientError::sys("epoll_ctl"))?;
        let burst_timer = RetryTimer::new().map_err(ClientError::sys("timerfd_create"))?;
        poller
            .add(burst_timer.fd(), Source::BurstTimer)
            .map_err(ClientError::sys("epoll_ctl"))?;
        let backoff = Backoff::new(opts.reconnect_delay, opts.reconnect_max_delay);
        let mut peer = Peer {
            path: socket.to_path_buf(),
            opts,
            session,
            connected: true,
            poller,
            timer,
            burst_timer,
            burst_deadline: None,
            backoff,
            queue: VecDeque::new(),
            ready: Vec::new(),
        };
        peer.register_session()?;
        Ok(peer)
    }

    /// Puts the session's socket and own vectors into the epoll set and queues early events.
    pub(crate) fn register_session(&mut self) -> Result<(), ClientError> {
        let s = &mut self.session;
        self.poller
            .add(s.socket.as_fd(), Source::Socket)
            .map_err(ClientError::sys("epoll_ctl"))?;
        for (v, fd) in s.table.own_vectors() {
            doorbell::set_nonblocking(fd).map_err(ClientError::sys("fcntl"))?;
            self.poller
                .add(fd, Source::Vector(v))
                .map_err(ClientError::sys("epoll_ctl"))?;
        }
        self.queue.extend(s.early_events.drain(..).map(Event::Peer));
        self.burst_deadline = None;
        self.burst_ended_for_now()
    }

    /// Our own id (what a guest reads from IVPosition). May change on reconnect.
    pub fn id(&self) -> u16 {
        self.session.table.own_id()
    }

    /// How many own vectors (eventfds others ring to reach us) we have.
    pub fn vectors(&self) -> usize {
        self.session.table.own_vector_count()
    }

    /// The shared-memory fd.
    pub fn shm_fd(&self) -> BorrowedFd<'_> {
        self.session.shm.as_fd()
    }

    /// The shared-memory size (`fstat` of its fd).
    pub fn shm_size(&self) -> u64 {
        self.session.shm_size
    }

    /// Maps the whole shared memory, read-write and shared.
    pub fn map(&self) -> Result<Mapping, ClientError> {
        let size = self.shm_size();
        let len = usize::try_from(size).map_err(|_| ClientError::TooLarge(size))?;
        Ok(Mapping::map_fd(self.shm_fd(), 0, len)?)
    }

    /// Our own vector `vector`'s eventfd (to hand to KVM as an irqfd, for example).
    pub fn own_vector_fd(&self, vector: usize) -> Option<BorrowedFd<'_>> {
        self.session.table.own_vector(vector)
    }

    /// The other peers, sorted by id.
    pub fn peer_ids(&self) -> Vec<u16> {
        self.session.table.peer_ids()
    }

    /// How many vectors peer `peer` has (`None` if unknown).
    pub fn peer_vectors(&self, peer: u16) -> Option<usize> {
        self.session.table.peer_vector_count(peer)
    }

    /// The eventfd that rings vector `vector` of peer `peer` (our own id gives our own vectors).
    pub fn peer_vector_fd(&self, peer: u16, vector: usize) -> Option<BorrowedFd<'_>> {
        if peer == self.id() {
            return self.own_vector_fd(vector);
        }
        self.session.table.peer_vector(peer, vector)
    }

    /// Rings vector `vector` of peer `peer` (8-byte write of 1 to its eventfd). Ringing our
    /// own id rings our own vector, like QEMU's device and client allow.
    pub fn notify(&self, peer: u16, vector: usize) -> Result<(), ClientError> {
        let vectors = if peer == self.id() {
            self.vectors()
        } else {
            self.peer_vectors(peer)
                .ok_or(ClientError::UnknownPeer(peer))?
        };
        let fd = self
            .peer_vector_fd(peer, vector)
            .ok_or(ClientError::UnknownVector {
                peer,
                vector,
                vectors,
            })?;
        doorbell::ring(fd).map_err(ClientError::sys("eventfd write"))
    }

    /// The server socket: when readable, call [`Peer::process_server_messages`]. It changes
    /// on reconnect.
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.session.socket.as_fd()
    }

    /// The epoll fd holding the socket, own vectors and reconnect timer: readable when
    /// `wait(Some(Duration::ZERO))` has something to do. It stays the same across reconnects.
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        self.poller.fd()
    }

    /// True while connected to the server.
    pub fn is_connected(&self) -> bool {
        self.connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_can_move_to_and_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Peer>();
        send_sync::<ClientError>();
    }
}
