//! [`Peer`]: one v0 connection to a server (ours or QEMU's `ivshmem-server`).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ivshm_mem::Mapping;

use crate::connection::{establish, Session};
use crate::deadline::Deadline;
use crate::doorbell;
use crate::error::ClientError;
use crate::events::{Event, PeerEvent};
use crate::options::ConnectOptions;
use crate::reconnect::{Backoff, RetryTimer};
use crate::wait_set::{Source, WaitSet};

/// One v0 connection to a server: our id, the shared memory, the peer table and the doorbells.
///
/// Every method is non-blocking except [`Peer::connect`], [`Peer::wait`] and
/// [`Peer::reconnect`]. To drive a peer from your own poll loop, watch [`Peer::poll_fd`] and,
/// whenever it is readable, call `wait(Some(Duration::ZERO))` until it returns `Ok(None)`.
#[derive(Debug)]
pub struct Peer {
    path: PathBuf,
    opts: ConnectOptions,
    session: Session,
    connected: bool,
    wait_set: WaitSet,
    timer: RetryTimer,
    burst_timer: RetryTimer,
    /// Wakes a [`Peer::wait`] at its deadline. Armed lazily: it stays armed after a wait
    /// returns, and a later wait re-arms it only when its deadline is earlier (see
    /// [`Peer::wait`]).
    deadline_timer: RetryTimer,
    /// When the deadline timer fires (`None`: disarmed or fired).
    armed_deadline: Option<Deadline>,
    /// When pending joins are reported if no more vectors arrive.
    burst_deadline: Option<Instant>,
    backoff: Backoff,
    queue: VecDeque<Event>,
    /// Reused buffer of ready sources.
    ready: Vec<Source>,
}

impl Peer {
    /// Connects to the server at `socket` and completes the handshake within `opts.timeout`.
    pub fn connect(socket: &Path, opts: ConnectOptions) -> Result<Peer, ClientError> {
        let session = establish(socket, &opts)?;
        let wait_set = WaitSet::new().map_err(ClientError::sys("epoll_create"))?;
        let timer = RetryTimer::new().map_err(ClientError::sys("timerfd_create"))?;
        wait_set
            .add(timer.fd(), Source::Timer)
            .map_err(ClientError::sys("epoll_ctl"))?;
        let burst_timer = RetryTimer::new().map_err(ClientError::sys("timerfd_create"))?;
        wait_set
            .add(burst_timer.fd(), Source::BurstTimer)
            .map_err(ClientError::sys("epoll_ctl"))?;
        let deadline_timer = RetryTimer::new().map_err(ClientError::sys("timerfd_create"))?;
        wait_set
            .add(deadline_timer.fd(), Source::DeadlineTimer)
            .map_err(ClientError::sys("epoll_ctl"))?;
        let backoff = Backoff::new(opts.reconnect_delay, opts.reconnect_max_delay);
        let mut peer = Peer {
            path: socket.to_path_buf(),
            opts,
            session,
            connected: true,
            wait_set,
            timer,
            burst_timer,
            deadline_timer,
            armed_deadline: None,
            burst_deadline: None,
            backoff,
            queue: VecDeque::new(),
            ready: Vec::with_capacity(16),
        };
        peer.register_session()?;
        Ok(peer)
    }

    /// Puts the session's socket and own vectors into the epoll set and queues early events.
    fn register_session(&mut self) -> Result<(), ClientError> {
        let s = &mut self.session;
        self.wait_set
            .add(s.socket.as_fd(), Source::Socket)
            .map_err(ClientError::sys("epoll_ctl"))?;
        for (v, fd) in s.table.own_vectors() {
            doorbell::set_nonblocking(fd).map_err(ClientError::sys("fcntl"))?;
            self.wait_set
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
    ///
    /// [`Peer::wait`] reports its rings without reading its counter (the fd is watched
    /// edge-triggered), so whoever else reads it sees every ring since it was last read.
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
        // One look-up on the doorbell's path; the reason is worked out only on failure.
        match self.peer_vector_fd(peer, vector) {
            Some(fd) => doorbell::ring(fd).map_err(ClientError::sys("eventfd write")),
            None => Err(self.notify_error(peer, vector)),
        }
    }

    /// Why peer `peer`'s vector `vector` cannot be rung.
    fn notify_error(&self, peer: u16, vector: usize) -> ClientError {
        let vectors = if peer == self.id() {
            self.vectors()
        } else {
            match self.peer_vectors(peer) {
                Some(vectors) => vectors,
                None => return ClientError::UnknownPeer(peer),
            }
        };
        ClientError::UnknownVector {
            peer,
            vector,
            vectors,
        }
    }

    /// The server socket: when readable, call [`Peer::process_server_messages`]. It changes
    /// on reconnect.
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.session.socket.as_fd()
    }

    /// The epoll fd holding the socket, own vectors and reconnect timer: readable when
    /// `wait(Some(Duration::ZERO))` has something to do. It stays the same across reconnects.
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        self.wait_set.fd()
    }

    /// True while connected to the server.
    pub fn is_connected(&self) -> bool {
        self.connected
    }
}

impl Peer {
    /// The socket has no more data for now: give joins that are short of vectors a grace
    /// period before reporting them (see [`crate::peer_table`]).
    fn burst_ended_for_now(&mut self) -> Result<(), ClientError> {
        if self.session.table.has_pending() {
            self.burst_deadline = Some(Instant::now() + self.opts.settle);
            self.burst_timer
                .arm(self.opts.settle)
                .map_err(ClientError::sys("timerfd_settime"))?;
        } else {
            self.burst_deadline = None;
        }
        Ok(())
    }

    /// Reports pending joins whose grace period is over.
    fn finish_due_burst(&mut self) -> Vec<PeerEvent> {
        match self.burst_deadline {
            Some(d) if Instant::now() >= d => {
                self.burst_deadline = None;
                self.session.table.end_of_burst()
            }
            _ => Vec::new(),
        }
    }

    /// Reads every message the server has sent so far without blocking and returns the
    /// joins and leaves they make.
    ///
    /// A join short of vectors is reported by the first call after its grace period
    /// (`ConnectOptions::settle`); [`Peer::poll_fd`] becomes readable then.
    ///
    /// Invalid messages are dropped with a warning, as QEMU's device does after setup. When
    /// the server has closed the socket it returns [`ClientError::ServerGone`] (every call
    /// does until a reconnect; the peer table keeps what had arrived) and, if reconnecting is
    /// enabled, schedules the first attempt (driven by [`Peer::wait`]).
    pub fn process_server_messages(&mut self) -> Result<Vec<PeerEvent>, ClientError> {
        if !self.connected {
            return Err(ClientError::ServerGone);
        }
        let (mut events, gone) = self.drain_socket()?;
        if gone {
            self.server_gone(false)?;
            return Err(ClientError::ServerGone);
        }
        events.extend(self.finish_due_burst());
        Ok(events)
    }

    /// Reads the socket until it would block; returns the events and whether it closed.
    fn drain_socket(&mut self) -> Result<(Vec<PeerEvent>, bool), ClientError> {
        let read = self.session.read_available();
        for v in read.own_vectors {
            self.register_own_vector(v)?;
        }
        if !read.closed {
            self.burst_ended_for_now()?;
        }
        Ok((read.events, read.closed))
    }

    fn register_own_vector(&mut self, v: usize) -> Result<(), ClientError> {
        if let Some(fd) = self.session.table.own_vector(v) {
            tracing::debug!("own vector {v} arrived after the handshake");
            doorbell::set_nonblocking(fd).map_err(ClientError::sys("fcntl"))?;
            self.wait_set
                .add(fd, Source::Vector(v))
                .map_err(ClientError::sys("epoll_ctl"))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` (`None`: forever) for the next event. `Ok(None)`: nothing
    /// happened in time. `Some(Duration::ZERO)` never blocks.
    ///
    /// Reconnect attempts (when enabled) happen inside this call and may block up to
    /// `ConnectOptions::timeout` each.
    ///
    /// A doorbell costs one `epoll_wait` here: own vectors are watched edge-triggered, so
    /// their counters are not read (rings between two reports coalesce into one
    /// [`Event::Doorbell`]), and the timeout is a timer that stays armed across calls instead
    /// of one the kernel arms for every wait. A timeout of 100 ms or more is measured on the
    /// coarse monotonic clock, so it may end a few milliseconds late (never early).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, ClientError> {
        let look_only = timeout.is_some_and(|t| t.is_zero());
        // A deadline too far to represent is forever.
        let deadline = timeout.filter(|_| !look_only).and_then(Deadline::after);
        if look_only && self.armed_deadline.is_some() {
            // Polled from the caller's loop: a deadline left from an earlier wait would make
            // poll_fd readable for nothing.
            self.deadline_timer
                .disarm()
                .map_err(ClientError::sys("timerfd_settime"))?;
            self.armed_deadline = None;
        }
        // A deadline just taken from a timeout of 100 ms or more has not passed yet.
        let mut fresh = timeout.is_some_and(|t| t >= crate::deadline::COARSE_ENOUGH);
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Ok(Some(ev));
            }
            let block = match deadline {
                _ if look_only => false,
                Some(d) if !std::mem::take(&mut fresh) && d.passed() => false,
                Some(d) => {
                    self.arm_deadline(d)?;
                    true
                }
                None => true,
            };
            let mut ready = std::mem::take(&mut self.ready);
            let waited = self.wait_set.wait(block, &mut ready);
            // The doorbell alone: straight back to the caller.
            if let (Ok(()), [Source::Vector(vector)]) = (&waited, &ready[..]) {
                let vector = *vector;
                if self.session.table.own_vector(vector).is_some() {
                    self.ready = ready;
                    return Ok(Some(Event::Doorbell { vector }));
                }
            }
            let handled = waited
                .map_err(ClientError::sys("epoll_wait"))
                .and_then(|()| ready.iter().try_for_each(|s| self.handle(*s)));
            self.ready = ready;
            handled?;
            if self.queue.is_empty() && !block {
                return Ok(None);
            }
        }
    }

    /// Makes the deadline timer fire no later than `deadline`.
    fn arm_deadline(&mut self, deadline: Deadline) -> Result<(), ClientError> {
        if self
            .armed_deadline
            .is_some_and(|armed| armed.not_after(&deadline))
        {
            return Ok(());
        }
        self.deadline_timer
            .arm(deadline.left())
            .map_err(ClientError::sys("timerfd_settime"))?;
        self.armed_deadline = Some(deadline);
        Ok(())
    }

    fn handle(&mut self, source: Source) -> Result<(), ClientError> {
        match source {
            Source::Socket if self.connected => {
                let (events, gone) = self.drain_socket()?;
                self.queue.extend(events.into_iter().map(Event::Peer));
                if gone {
                    self.server_gone(true)?;
                }
            }
            Source::Socket => {}
            Source::Timer => self.retry()?,
            Source::DeadlineTimer => {
                self.deadline_timer
                    .consume()
                    .map_err(ClientError::sys("timerfd read"))?;
                self.armed_deadline = None;
            }
            Source::BurstTimer => {
                self.burst_timer
                    .consume()
                    .map_err(ClientError::sys("timerfd read"))?;
                let events = self.finish_due_burst();
                self.queue.extend(events.into_iter().map(Event::Peer));
            }
            // Edge-triggered: each report is a ring since the last one (rings in between
            // coalesce); the counter is not read, which saves a system call per doorbell.
            Source::Vector(v) => {
                if self.session.table.own_vector(v).is_some() {
                    self.queue.push_back(Event::Doorbell { vector: v });
                }
            }
        }
        Ok(())
    }
}

impl Peer {
    /// The socket closed: stop watching it, report, and schedule a reconnect if enabled.
    fn server_gone(&mut self, queue_event: bool) -> Result<(), ClientError> {
        self.connected = false;
        self.wait_set
            .remove(self.session.socket.as_fd())
            .map_err(ClientError::sys("epoll_ctl"))?;
        if queue_event {
            self.queue.push_back(Event::ServerGone);
        }
        tracing::info!(
            "the server at {} closed the connection",
            self.path.display()
        );
        if self.opts.reconnect {
            self.backoff.reset();
            let delay = self.backoff.next_delay();
            self.timer
                .arm(delay)
                .map_err(ClientError::sys("timerfd_settime"))?;
        }
        Ok(())
    }

    /// Tries once to connect again now. On success the id, shared memory and peer table are
    /// replaced (see [`crate::reconnect`]) and the new id is returned.
    pub fn reconnect(&mut self) -> Result<u16, ClientError> {
        let session = establish(&self.path, &self.opts)?;
        // Forget the old connection: unregister its fds, then drop them.
        let _ = self.wait_set.remove(self.session.socket.as_fd());
        for (_, fd) in self.session.table.own_vectors() {
            let _ = self.wait_set.remove(fd);
        }
        self.session = session;
        self.connected = true;
        self.timer
            .disarm()
            .map_err(ClientError::sys("timerfd_settime"))?;
        self.backoff.reset();
        self.register_session()?;
        let id = self.id();
        tracing::info!("reconnected to {} as peer {id}", self.path.display());
        Ok(id)
    }

    /// The retry timer fired: try to reconnect, re-arm on failure.
    fn retry(&mut self) -> Result<(), ClientError> {
        self.timer
            .consume()
            .map_err(ClientError::sys("timerfd read"))?;
        if self.connected || !self.opts.reconnect {
            return Ok(());
        }
        // Events of the new session are queued by register_session after Reconnected.
        let before = self.queue.len();
        match self.reconnect() {
            Ok(id) => {
                let early: Vec<Event> = self.queue.drain(before..).collect();
                self.queue.push_back(Event::Reconnected { id });
                self.queue.extend(early);
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                tracing::debug!("reconnect failed ({e}); next attempt in {delay:?}");
                self.timer
                    .arm(delay)
                    .map_err(ClientError::sys("timerfd_settime"))?;
            }
        }
        Ok(())
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
