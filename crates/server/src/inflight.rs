//! File descriptors in flight: sent to a peer and not yet received by it.
//!
//! The kernel counts every fd passed over a UNIX socket against the *sending* user until the
//! receiver takes it (or closes its socket), and refuses further fds with `ETOOMANYREFS` once
//! that count passes the sender's `RLIMIT_NOFILE` — unless the sender has `CAP_SYS_RESOURCE`
//! (root). Closing our end of a connection does not give the count back: the fds stay queued on
//! the peer's side until the peer reads them or closes. So a connection that does not read
//! costs the server as long as it stays open, and only a bound on what is sent to it, not a
//! drop, protects the others. Each queued message is also kernel memory (its `truesize`, about
//! 768 bytes), which matters for a root server too.
//!
//! The server therefore bounds what each peer can have unread, with the kernel enforcing it
//! through the peer socket's send buffer (`SO_SNDBUF`), so there is no accounting per message:
//!
//! - **Gate.** A new peer's socket starts with the smallest send buffer. Its first two messages
//!   (version and id, no fds) fill it past the writable threshold (a quarter of the buffer); the
//!   fd-carrying messages wait until the socket becomes writable again, which happens only
//!   when the peer has read. A connection that never reads is never sent an fd.
//! - **Cap.** Once the peer has read, its send buffer holds about [`MAX_UNREAD`] messages: the
//!   kernel refuses more (`EAGAIN`), the rest waits in the server's queue (bounded by
//!   `max_queued_messages`), and sending resumes when the peer has read three quarters of
//!   them. Each message carries at most one fd, so a peer never has more than about
//!   `MAX_UNREAD` fds unread.
//! - **`ETOOMANYREFS`** (the user's count is full anyway, e.g. from other processes of the same
//!   user, or from peers already gone that keep their sockets open) is not the fault of the peer
//!   being sent to: the server keeps that peer's messages, drops one peer that sits on unread
//!   fds ([`pick_hog`]) and tries again (see `Server`).
//!
//! **Who is a hog.** Not simply the peer with the most unread messages: an honest peer that
//! reads everything, but slowly (a loaded machine), can have as many unread as a connection
//! that never reads, and every peer's count is capped at about [`MAX_UNREAD`]. What tells them
//! apart is whether they read: while fds in flight have run out, the server looks at each
//! peer's count of messages read ([`Reading`]: sent minus unread) every time it retries, and
//! a peer is a candidate only once it has read nothing for [`STALL_GRACE`] while holding at
//! least half of `MAX_UNREAD`. Among candidates, those that have not even read their whole
//! handshake go first (no working peer is in that state for long: QEMU and the client library
//! read it at once; a connection that never reads is); then the one that has read nothing for
//! the longest; then the one that has read the fewest messages since it joined; then the one
//! with the most unread. So an honest peer that paused is never dropped while a connection
//! that never read its handshake holds fds, nor while one that stopped reading before it did.
//!
//! [`SendBuffers::calibrate`] measures, once, how much one message costs in a send buffer on
//! this kernel, and checks that the gate works.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::sockopt::set_socket_send_buffer_size;
use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

use ivshm_proto::fd_passing::send_message;
use ivshm_proto::v0::{encode, MESSAGE_LEN};

/// About how many messages (so fds) a peer can have unread before the server stops sending to
/// it and queues instead.
pub const MAX_UNREAD: usize = 64;

/// How long a peer holding unread fds must have read nothing, while fds in flight have run out,
/// before it may be dropped for it (the server's retry interval: a peer is seen not reading at
/// two retries at least).
pub(crate) const STALL_GRACE: Duration = Duration::from_millis(100);

/// What the server saw of a peer's reading, while fds in flight have run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reading {
    /// Messages sent to it and not read yet (at most).
    pub(crate) unread: usize,
    /// Messages it has read since it joined.
    pub(crate) read: u64,
    /// Whether it has read its whole handshake.
    pub(crate) read_handshake: bool,
    /// How long it has read nothing (since the server first looked, in this shortage).
    pub(crate) stalled_for: Duration,
}

/// The peer to drop when fds in flight have run out (see the module docs): among those that
/// hold at least half of [`MAX_UNREAD`] unread and have read nothing for [`STALL_GRACE`]: if
/// any of those holding that much has not read its whole handshake, only such a one; the one
/// that has read nothing for the longest, then the one that has read the fewest messages,
/// then the one with the most unread. `None`: nobody is at fault (yet).
pub(crate) fn pick_hog<K>(
    candidates: impl IntoIterator<Item = (K, Reading)>,
) -> Option<(K, Reading)> {
    let holding: Vec<(K, Reading)> = candidates
        .into_iter()
        .filter(|(_, r)| r.unread >= MAX_UNREAD / 2)
        .collect();
    // While a connection that has not read its handshake holds fds, nobody else is at fault
    // (it may be within its grace: then nobody goes yet).
    let never_read = holding.iter().any(|(_, r)| !r.read_handshake);
    holding
        .into_iter()
        .filter(|(_, r)| r.stalled_for >= STALL_GRACE && !(never_read && r.read_handshake))
        .max_by(|(_, a), (_, b)| {
            a.stalled_for
                .cmp(&b.stalled_for)
                .then(b.read.cmp(&a.read))
                .then(a.unread.cmp(&b.unread))
        })
}

/// `SIOCOUTQ` (the same number as `TIOCOUTQ`): bytes (here: buffer space) of the messages
/// sent on a socket and not yet read by its peer.
const SIOCOUTQ: rustix::ioctl::Opcode = linux_raw_sys::ioctl::TIOCOUTQ as rustix::ioctl::Opcode;

/// What a queued message costs in a send buffer when it cannot be measured.
const FALLBACK_TRUESIZE: usize = 512;

/// The send buffer sizes the server gives peer sockets, measured for this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendBuffers {
    /// Buffer space one queued message takes (its `truesize`).
    truesize: usize,
    /// Whether two unread messages keep the smallest buffer from being writable (so the gate
    /// works on this kernel).
    gate_works: bool,
}

impl SendBuffers {
    /// Measures what one message with an fd costs and whether the gate works.
    pub(crate) fn calibrate() -> SendBuffers {
        let measured = measure();
        let (truesize, gate_works) = match measured {
            Ok(m) => m,
            Err(errno) => {
                tracing::warn!(%errno, "could not measure socket buffer costs; assuming defaults");
                (FALLBACK_TRUESIZE, false)
            }
        };
        if !gate_works {
            tracing::warn!(
                "this kernel's smallest socket buffer holds two messages: peers get fds before \
                 they have read anything"
            );
        }
        tracing::debug!(truesize, gate_works, "peer socket send buffers calibrated");
        SendBuffers {
            truesize,
            gate_works,
        }
    }

    /// Whether new peers start gated.
    pub(crate) fn gate_works(&self) -> bool {
        self.gate_works
    }

    /// Gives a new peer's socket its first send buffer: the smallest (gated), or the capped
    /// one when the gate does not work here.
    pub(crate) fn start(&self, socket: BorrowedFd<'_>) -> Result<(), Errno> {
        if self.gate_works {
            set_socket_send_buffer_size(socket, 1)
        } else {
            self.open(socket)
        }
    }

    /// Gives a peer that has read its first messages the capped send buffer.
    pub(crate) fn open(&self, socket: BorrowedFd<'_>) -> Result<(), Errno> {
        // The kernel doubles the value it is given.
        set_socket_send_buffer_size(socket, MAX_UNREAD * self.truesize / 2)
    }

    /// How many messages sent on `socket` its peer has not read yet (at most; a partly read
    /// message counts).
    pub(crate) fn unread_messages(&self, socket: BorrowedFd<'_>) -> Result<usize, Errno> {
        Ok(unread_bytes(socket)?.div_ceil(self.truesize.max(1)))
    }
}

/// `SIOCOUTQ` of `socket`.
fn unread_bytes(socket: BorrowedFd<'_>) -> Result<usize, Errno> {
    // SAFETY: SIOCOUTQ reads no argument and writes one `int` into the getter's buffer, which
    // is exactly that type.
    let bytes = unsafe {
        rustix::ioctl::ioctl(
            socket,
            rustix::ioctl::Getter::<SIOCOUTQ, rustix::ffi::c_int>::new(),
        )
    }?;
    Ok(usize::try_from(bytes).unwrap_or(0))
}

/// On a socket pair: the cost of one message carrying an fd, and whether two unread messages
/// leave the smallest send buffer unwritable.
fn measure() -> Result<(usize, bool), Errno> {
    let (ours, theirs) = pair()?;
    let fd = eventfd(0, EventfdFlags::CLOEXEC)?;
    send_one(ours.as_fd(), Some(fd.as_fd()))?;
    let truesize = unread_bytes(ours.as_fd())?;
    drop((ours, theirs));
    let (ours, _theirs) = pair()?;
    set_socket_send_buffer_size(&ours, 1)?;
    send_one(ours.as_fd(), None)?;
    send_one(ours.as_fd(), None)?;
    let mut fds = [PollFd::new(&ours, PollFlags::OUT)];
    let writable = poll(&mut fds, Some(&rustix::time::Timespec::default()))? > 0;
    Ok((
        if truesize == 0 {
            FALLBACK_TRUESIZE
        } else {
            truesize
        },
        !writable,
    ))
}

fn pair() -> Result<(OwnedFd, OwnedFd), Errno> {
    socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
}

fn send_one(socket: BorrowedFd<'_>, fd: Option<BorrowedFd<'_>>) -> Result<(), Errno> {
    match send_message(socket, &encode(0), 0, fd)? {
        MESSAGE_LEN => Ok(()),
        _ => Err(Errno::IO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(unread: usize, read: u64, stalled_ms: u64) -> Reading {
        Reading {
            unread,
            read,
            read_handshake: read >= 7,
            stalled_for: Duration::from_millis(stalled_ms),
        }
    }

    /// The case that dropped an honest peer under load: it had as many unread as the hogs (or
    /// one more; every count is capped near `MAX_UNREAD`) and came first in peer order. It has
    /// been reading; the hogs have not: a hog goes.
    #[test]
    fn a_peer_that_reads_is_not_the_hog_even_with_the_most_unread() {
        let honest = ("honest", reading(MAX_UNREAD + 1, 400, 0));
        let hog = ("hog", reading(MAX_UNREAD, 1, 2_000));
        assert_eq!(pick_hog([honest, hog]).map(|(k, _)| k), Some("hog"));
        // Reading now and then is enough: paused for less than the grace, it is no candidate.
        let paused = ("paused", reading(MAX_UNREAD + 1, 400, 99));
        assert_eq!(pick_hog([paused]), None);
    }

    /// An honest peer paused for a while (the test thread of a loaded machine) is a candidate,
    /// but one that stopped reading before it goes first; at an equal stall (both first seen
    /// at the same retry), the one that has read the fewest messages (a connection that read
    /// its first message and stopped) goes first, whatever the counts.
    #[test]
    fn the_longest_stalled_then_the_one_that_read_least_goes_first() {
        let honest = ("honest", reading(MAX_UNREAD + 1, 400, 300));
        let older = ("older", reading(MAX_UNREAD / 2, 10, 301));
        assert_eq!(pick_hog([honest, older]).map(|(k, _)| k), Some("older"));
        let same = ("same", reading(MAX_UNREAD / 2, 10, 300));
        assert_eq!(pick_hog([honest, same]).map(|(k, _)| k), Some("same"));
        assert_eq!(pick_hog([same, honest]).map(|(k, _)| k), Some("same"));
        // Below half of MAX_UNREAD a peer is not holding much: never dropped for it.
        let light = ("light", reading(MAX_UNREAD / 2 - 1, 0, 10_000));
        assert_eq!(pick_hog([light]), None);
        // Alone and stalled, a peer is the hog.
        assert_eq!(pick_hog([honest]).map(|(k, _)| k), Some("honest"));
    }

    /// A connection that never read its whole handshake goes before an honest peer that
    /// read it and then paused, even one paused for longer (it joined later, while the honest
    /// peer was already paused).
    #[test]
    fn a_connection_that_never_read_its_handshake_goes_first() {
        let honest = ("honest", reading(MAX_UNREAD, 400, 5_000));
        let never = ("never", reading(MAX_UNREAD / 2, 1, 100));
        assert_eq!(pick_hog([honest, never]).map(|(k, _)| k), Some("never"));
        assert_eq!(pick_hog([never, honest]).map(|(k, _)| k), Some("never"));
        // Within its grace it is not dropped yet, and neither is the honest peer.
        let fresh = ("fresh", reading(MAX_UNREAD, 1, 10));
        assert_eq!(pick_hog([honest, fresh]), None);
    }

    #[test]
    fn calibration_measures_a_message_and_the_gate_holds_here() {
        let buffers = SendBuffers::calibrate();
        assert!(buffers.truesize >= 256, "{buffers:?}");
        assert!(buffers.gate_works, "{buffers:?}");
    }

    #[test]
    fn the_cap_bounds_unread_messages_and_they_are_counted() {
        let buffers = SendBuffers::calibrate();
        let (ours, theirs) = pair().unwrap();
        buffers.open(ours.as_fd()).unwrap();
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let mut sent = 0;
        while send_one(ours.as_fd(), Some(fd.as_fd())).is_ok() {
            sent += 1;
            assert!(
                sent <= 2 * MAX_UNREAD,
                "the send buffer took {sent} messages"
            );
        }
        assert!(sent >= MAX_UNREAD / 2, "only {sent} messages fit");
        assert_eq!(buffers.unread_messages(ours.as_fd()).unwrap(), sent);
        let mut reader = ivshm_proto::MessageReader::new();
        reader.receive(theirs.as_fd()).unwrap();
        assert_eq!(buffers.unread_messages(ours.as_fd()).unwrap(), sent - 1);
    }
}
