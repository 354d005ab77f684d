//! What a peer waits for, and the epoll set it waits with.
//!
//! A [`Peer`] keeps one epoll instance holding its server socket, its own vector
//! eventfds and its reconnect timer. [`Peer::wait`] blocks on it;
//! [`Peer::poll_fd`] hands it out so a caller can put the peer in its own
//! poll loop (the epoll fd becomes readable when any of them is).
//!
//! This module also holds the peer's event processing: reading the server socket
//! ([`Peer::process_server_messages`]), reporting joins that are short of vectors after their
//! grace period, and draining own-vector eventfds into [`Event::Doorbell`]s.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use ivshm_proto::Received;
use rustix::event::epoll;
use rustix::event::Timespec;
use rustix::io::Errno;

use crate::doorbell;
use crate::error::ClientError;
use crate::peer::Peer;
use crate::peer_table::MessageError;

/// A change in the set of other peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer joined with this many vectors (see the join rule in [`crate::peer_table`]).
    Joined {
        /// Its id.
        id: u16,
        /// How many of its vectors we can ring.
        vectors: usize,
    },
    /// A peer left; its vectors are closed.
    Left {
        /// Its id.
        id: u16,
    },
}

/// Something that happened to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Our own vector `vector` was rung (at least once since the last report: rings coalesce).
    Doorbell {
        /// The vector index.
        vector: usize,
    },
    /// A peer joined or left.
    Peer(PeerEvent),
    /// The server closed the connection. Doorbells between existing peers keep working; no
    /// more join/leave news arrives until a reconnect.
    ServerGone,
    /// A new connection to a (possibly restarted) server is up. The id, the shared memory and
    /// the peer table may have changed: re-read them and map the memory again.
    Reconnected {
        /// Our new id.
        id: u16,
    },
}

/// What a ready fd in the set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The server socket.
    Socket,
    /// The reconnect timer.
    Timer,
    /// The end-of-burst grace timer (joins short of vectors).
    BurstTimer,
    /// Our own vector with this index.
    Vector(usize),
}

const SOCKET_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
const BURST_TIMER_TOKEN: u64 = u64::MAX - 2;

impl Source {
    fn token(self) -> u64 {
        match self {
            Source::Socket => SOCKET_TOKEN,
            Source::Timer => TIMER_TOKEN,
            Source::BurstTimer => BURST_TIMER_TOKEN,
            Source::Vector(v) => v as u64,
        }
    }

    fn from_token(t: u64) -> Source {
        match t {
            SOCKET_TOKEN => Source::Socket,
            TIMER_TOKEN => Source::Timer,
            BURST_TIMER_TOKEN => Source::BurstTimer,
            v => Source::Vector(usize::try_from(v).unwrap_or(usize::MAX)),
        }
    }
}

/// An epoll set of the fds a peer waits on (level-triggered).
#[derive(Debug)]
pub(crate) struct Poller {
    epoll: OwnedFd,
}

impl Poller {
    pub(crate) fn new() -> Result<Self, Errno> {
        Ok(Poller {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    pub(crate) fn add(&self, fd: BorrowedFd<'_>, source: Source) -> Result<(), Errno> {
        epoll::add(
            &self.epoll,
            fd,
            epoll::EventData::new_u64(source.token()),
            epoll::EventFlags::IN,
        )
    }

    pub(crate) fn remove(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        match epoll::delete(&self.epoll, fd) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` (`None`: forever) and puts what became ready into `out`
    /// (cleared first).
    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        out: &mut Vec<Source>,
    ) -> Result<(), Errno> {
        out.clear();
        let timeout = match timeout {
            // Durations beyond Timespec's range are as good as forever.
            Some(d) => Timespec::try_from(d).ok(),
            None => None,
        };
        let mut ready = [std::mem::MaybeUninit::<epoll::Event>::uninit(); 16];
        let (events, _) = loop {
            match epoll::wait(&self.epoll, &mut ready, timeout.as_ref()) {
                Ok(got) => break got,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        };
        out.extend(events.iter().map(|e| Source::from_token(e.data.u64())));
        Ok(())
    }
}

impl Peer {
    /// The socket has no more data for now: give joins that are short of vectors a grace
    /// period before reporting them (see [`crate::peer_table`]).
    pub(crate) fn burst_ended_for_now(&mut self) -> Result<(), ClientError> {
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
        let mut events = Vec::new();
        loop {
            let s = &mut self.session;
            let received = s.reader.receive(s.socket.as_fd());
            match received {
                Ok(Received::Message { value, fd }) => match s.table.apply(value, fd) {
                    Ok(applied) => {
                        events.extend(applied.events);
                        if let Some(v) = applied.own_vector {
                            self.register_own_vector(v)?;
                        }
                    }
                    // QEMU's device accepts this silently; with 0-vector peers it is normal.
                    Err(e @ MessageError::UnknownPeerGone { .. }) => {
                        tracing::debug!("ignoring server message {value}: {e}")
                    }
                    Err(e) => tracing::warn!("ignoring server message {value}: {e}"),
                },
                Ok(Received::WouldBlock) => {
                    self.burst_ended_for_now()?;
                    return Ok((events, false));
                }
                Ok(Received::Closed) => {
                    events.extend(self.session.table.end_of_burst());
                    return Ok((events, true));
                }
                Err(e) => {
                    tracing::warn!("dropping the connection to the server: {e}");
                    events.extend(self.session.table.end_of_burst());
                    return Ok((events, true));
                }
            }
        }
    }

    fn register_own_vector(&mut self, v: usize) -> Result<(), ClientError> {
        if let Some(fd) = self.session.table.own_vector(v) {
            tracing::debug!("own vector {v} arrived after the handshake");
            doorbell::set_nonblocking(fd).map_err(ClientError::sys("fcntl"))?;
            self.poller
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
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, ClientError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Ok(Some(ev));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let mut ready = std::mem::take(&mut self.ready);
            let waited = self.poller.wait(left, &mut ready);
            let handled = waited
                .map_err(ClientError::sys("epoll_wait"))
                .and_then(|()| ready.iter().try_for_each(|s| self.handle(*s)));
            self.ready = ready;
            handled?;
            if self.queue.is_empty() && left.is_some_and(|l| l.is_zero()) {
                return Ok(None);
            }
        }
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
            Source::BurstTimer => {
                self.burst_timer
                    .consume()
                    .map_err(ClientError::sys("timerfd read"))?;
                let events = self.finish_due_burst();
                self.queue.extend(events.into_iter().map(Event::Peer));
            }
            Source::Vector(v) => {
                if let Some(fd) = self.session.table.own_vector(v) {
                    match doorbell::drain(fd) {
                        Ok(Some(_)) => self.queue.push_back(Event::Doorbell { vector: v }),
                        Ok(None) => {}
                        Err(e) => return Err(ClientError::sys("eventfd read")(e)),
                    }
                }
            }
        }
        Ok(())
    }
}
