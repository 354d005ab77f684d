//! The doorbell a channel waits on and rings: a small trait over whatever delivers
//! notifications between the peers of a region.
//!
//! Implementations:
//! - [`crate::local::LocalDoorbell`]: eventfds made by [`crate::local::LocalBus`] (tests,
//!   host-only use, several processes by fd inheritance);
//! - a host peer of an ivshm server (`ivshm-client`'s `Peer`: own vectors are eventfds, peers'
//!   vectors are eventfds the server handed over) implements it outside this crate;
//! - a Linux guest's ivshmem device (`ivshm-guest`: Doorbell register writes, MSI-X eventfds
//!   under VFIO, or a polling fallback without interrupts) likewise.
//!
//! Every implementation runs the same conformance suite (module `conformance`, behind the
//! `conformance` feature).
//!
//! Semantics (what the channel relies on):
//! - `ring(peer, vector)` makes a `wait` on that peer's `vector` return, now or at its next
//!   call: rings are remembered until consumed, and several rings may be coalesced into one.
//! - `wait(vector, timeout)` returns `Ok(true)` once `vector` was rung (consuming the pending
//!   rings) and `Ok(false)` when the timeout passed first. It may return `Ok(true)` spuriously.
//!   `None` waits without a time limit. The channel calls it from one thread per vector at a
//!   time (see [`crate::channel`]), so an implementation may block in a plain `read(2)`.
//! - `fd(vector)`, when the implementation has one, becomes readable while `vector` has a
//!   pending ring, for the caller's own poll loop; [`Doorbell::take`] consumes without blocking.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use thiserror::Error;

/// A doorbell failed.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum DoorbellError {
    /// peer {peer} is unknown to the doorbell
    ///
    /// The peer to ring is not known (never joined, or left).
    UnknownPeer {
        /// The peer id.
        peer: u16,
    },
    /// vector {vector} does not exist on peer {peer} ({vectors} vectors)
    ///
    /// The vector does not exist (on that peer, or on us).
    UnknownVector {
        /// The peer id.
        peer: u16,
        /// The vector asked for.
        vector: u16,
        /// How many vectors the peer has.
        vectors: u16,
    },
    /// {op} failed: {errno}
    ///
    /// A system call failed.
    Sys {
        /// What was done.
        op: &'static str,
        /// The error.
        errno: rustix::io::Errno,
    },
    /// {0}
    ///
    /// An implementation's own error (e.g. the ivshm client's or the guest device's).
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Delivers notifications between the peers of one region (see the module documentation for
/// the exact semantics every implementation provides).
pub trait Doorbell: Send + Sync + std::fmt::Debug {
    /// Our own peer id in the region (what a guest reads from IVPosition).
    fn own_id(&self) -> u16;

    /// How many vectors we have (rings to us name one of `0..vectors()`).
    fn vectors(&self) -> u16;

    /// Rings vector `vector` of peer `peer` (our own id rings our own vector).
    fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError>;

    /// Waits until our vector `vector` is rung (`Ok(true)`, pending rings consumed) or
    /// `timeout` passes (`Ok(false)`); `None` waits without a limit.
    fn wait(&self, vector: u16, timeout: Option<Duration>) -> Result<bool, DoorbellError>;

    /// Consumes pending rings of our vector `vector` without blocking: `Ok(true)` if there were.
    fn take(&self, vector: u16) -> Result<bool, DoorbellError>;

    /// A file descriptor that is readable while our vector `vector` has a pending ring, for the
    /// caller's poll loop (`None`: this implementation polls memory and has none).
    fn fd(&self, vector: u16) -> Option<BorrowedFd<'_>>;
}

/// Waiting on a *blocking* eventfd the cheapest way, for [`Doorbell`] implementations whose
/// vectors are eventfds: without a timeout one `read(2)` (no `poll`, no epoll); with one,
/// `poll(2)` and then `read(2)`. `Ok(true)`: it had been rung (the counter is consumed), `Ok(false)`:
/// the timeout passed (or a signal interrupted the poll: a spurious return the channel
/// tolerates). One thread per fd at a time (the channel's contract): another reader between
/// the poll and the read would make the read block until the next ring.
pub fn wait_eventfd(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<bool, DoorbellError> {
    if timeout.is_some() && !eventfd_readable(fd, timeout)? {
        return Ok(false);
    }
    read_eventfd(fd)?;
    Ok(true)
}

/// Consumes the pending rings of a blocking eventfd without blocking: `poll(2)` with a zero
/// timeout, then `read(2)` if it is readable. `Ok(true)` if there were.
pub fn take_eventfd(fd: BorrowedFd<'_>) -> Result<bool, DoorbellError> {
    if !eventfd_readable(fd, Some(Duration::ZERO))? {
        return Ok(false);
    }
    read_eventfd(fd)?;
    Ok(true)
}

fn read_eventfd(fd: BorrowedFd<'_>) -> Result<(), DoorbellError> {
    let mut buf = [0u8; 8];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(errno) => {
                return Err(DoorbellError::Sys {
                    op: "eventfd read",
                    errno,
                })
            }
        }
    }
}

/// Polls `fd` for at most `timeout` (`None`: forever): true when readable.
fn eventfd_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<bool, DoorbellError> {
    let ts = timeout.map(|t| Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    match poll(&mut fds, ts.as_ref()) {
        Ok(n) => Ok(n > 0),
        Err(Errno::INTR) => Ok(false),
        Err(errno) => Err(DoorbellError::Sys { op: "poll", errno }),
    }
}
