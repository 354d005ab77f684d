//! The epoll set a peer waits on, and what each ready fd in it is.
//!
//! [`Peer::wait`](crate::Peer::wait) blocks on it; [`Peer::poll_fd`](crate::Peer::poll_fd)
//! hands it out so a caller can put the peer in its own poll loop (the epoll fd becomes readable
//! when any fd in the set is).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::epoll;
use rustix::event::Timespec;
use rustix::io::Errno;

/// What a ready fd in the set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The server socket.
    Socket,
    /// The reconnect timer.
    Timer,
    /// The end-of-burst grace timer (joins short of vectors).
    BurstTimer,
    /// The deadline of a [`Peer::wait`](crate::Peer::wait) with a timeout.
    DeadlineTimer,
    /// Our own vector with this index.
    Vector(usize),
}

const SOCKET_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
const BURST_TIMER_TOKEN: u64 = u64::MAX - 2;
const DEADLINE_TIMER_TOKEN: u64 = u64::MAX - 3;

impl Source {
    fn token(self) -> u64 {
        match self {
            Source::Socket => SOCKET_TOKEN,
            Source::Timer => TIMER_TOKEN,
            Source::BurstTimer => BURST_TIMER_TOKEN,
            Source::DeadlineTimer => DEADLINE_TIMER_TOKEN,
            Source::Vector(v) => v as u64,
        }
    }

    fn from_token(t: u64) -> Source {
        match t {
            SOCKET_TOKEN => Source::Socket,
            TIMER_TOKEN => Source::Timer,
            BURST_TIMER_TOKEN => Source::BurstTimer,
            DEADLINE_TIMER_TOKEN => Source::DeadlineTimer,
            v => Source::Vector(usize::try_from(v).unwrap_or(usize::MAX)),
        }
    }
}

/// The epoll set of the fds a peer waits on: its server socket, its reconnect timer and its
/// end-of-burst timer (level-triggered), and its own vectors' eventfds (edge-triggered).
#[derive(Debug)]
pub(crate) struct WaitSet {
    epoll: OwnedFd,
}

impl WaitSet {
    pub(crate) fn new() -> Result<Self, Errno> {
        Ok(WaitSet {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    /// Watches `fd` for readability: level-triggered, except own vectors, which are
    /// edge-triggered so that a doorbell is reported without reading its counter (see
    /// [`Peer::wait`](crate::Peer::wait)).
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, source: Source) -> Result<(), Errno> {
        let flags = match source {
            Source::Vector(_) => epoll::EventFlags::IN | epoll::EventFlags::ET,
            _ => epoll::EventFlags::IN,
        };
        epoll::add(
            &self.epoll,
            fd,
            epoll::EventData::new_u64(source.token()),
            flags,
        )
    }

    pub(crate) fn remove(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        match epoll::delete(&self.epoll, fd) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until something is ready (`block`), or only looks (`!block`), and puts what is
    /// ready into `out` (cleared first). Timeouts are the deadline timer's business: waiting
    /// with a timeout here would make the kernel arm and cancel a timer on every call.
    pub(crate) fn wait(&self, block: bool, out: &mut Vec<Source>) -> Result<(), Errno> {
        out.clear();
        let now = Timespec::default();
        let timeout = if block { None } else { Some(&now) };
        let mut ready = [std::mem::MaybeUninit::<epoll::Event>::uninit(); 16];
        let (events, _) = loop {
            match epoll::wait(&self.epoll, &mut ready, timeout) {
                Ok(got) => break got,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        };
        out.extend(events.iter().map(|e| Source::from_token(e.data.u64())));
        Ok(())
    }
}
