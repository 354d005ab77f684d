//! The epoll instance behind the server's single-threaded loop, and what its tokens mean.

use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::io::Errno;

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// A region's listening socket, by its key in the server's listener table.
    Listener(usize),
    /// A peer connection, by its unique serial number (never reused, unlike peer ids).
    Peer(u64),
    /// The `n`-th control fd given to `run_until`.
    Control(usize),
    /// A factory or control socket, or one of their connections, by key.
    Aux(u64),
}

const KIND_SHIFT: u32 = 62;
const PAYLOAD_MASK: u64 = (1 << KIND_SHIFT) - 1;

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Peer(serial) => serial & PAYLOAD_MASK,
            Token::Listener(n) => (1 << KIND_SHIFT) | (n as u64 & PAYLOAD_MASK),
            Token::Control(n) => (2 << KIND_SHIFT) | (n as u64 & PAYLOAD_MASK),
            Token::Aux(n) => (3 << KIND_SHIFT) | (n & PAYLOAD_MASK),
        }
    }

    fn decode(raw: u64) -> Option<Token> {
        let payload = raw & PAYLOAD_MASK;
        match raw >> KIND_SHIFT {
            0 => Some(Token::Peer(payload)),
            1 => usize::try_from(payload).ok().map(Token::Listener),
            2 => usize::try_from(payload).ok().map(Token::Control),
            3 => Some(Token::Aux(payload)),
            _ => None,
        }
    }
}

/// The epoll instance.
#[derive(Debug)]
pub(crate) struct Poller {
    epoll: OwnedFd,
}

/// Flags every registration asks for: readable, and peer hang-up.
fn base_flags() -> EventFlags {
    EventFlags::IN | EventFlags::RDHUP
}

impl Poller {
    pub(crate) fn new() -> Result<Poller, Errno> {
        Ok(Poller {
            epoll: epoll::create(CreateFlags::CLOEXEC)?,
        })
    }

    /// Watches `fd` for readability (level-triggered).
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: Token) -> Result<(), Errno> {
        epoll::add(
            &self.epoll,
            fd,
            EventData::new_u64(token.encode()),
            base_flags(),
        )
    }

    /// Turns interest in writability on or off.
    pub(crate) fn set_writable_interest(
        &self,
        fd: BorrowedFd<'_>,
        token: Token,
        writable: bool,
    ) -> Result<(), Errno> {
        let flags = if writable {
            base_flags() | EventFlags::OUT
        } else {
            base_flags()
        };
        epoll::modify(&self.epoll, fd, EventData::new_u64(token.encode()), flags)
    }

    /// Stops watching `fd`.
    pub(crate) fn remove(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        epoll::delete(&self.epoll, fd)
    }

    /// Waits for events, at most `timeout` (none: until one comes); `EINTR` and the timeout
    /// return an empty list.
    pub(crate) fn wait(
        &self,
        events: &mut Vec<Event>,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), Errno> {
        events.clear();
        let timespec = timeout.map(|t| rustix::time::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        match epoll::wait(&self.epoll, spare_capacity(events), timespec.as_ref()) {
            Ok(_) | Err(Errno::INTR) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Decodes an event's token.
pub(crate) fn token_of(event: &Event) -> Option<Token> {
    let data = event.data;
    Token::decode(data.u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Peer(0),
            Token::Peer(PAYLOAD_MASK),
            Token::Listener(0),
            Token::Listener(12345),
            Token::Control(1),
            Token::Aux(0),
            Token::Aux(77),
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
    }
}
