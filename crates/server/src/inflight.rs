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
//!   being sent to: the server keeps that peer's messages, finds the peers holding the most
//!   unread messages ([`unread_messages`]), drops them, and tries again (see `Server`).
//!
//! [`SendBuffers::calibrate`] measures, once, how much one message costs in a send buffer on
//! this kernel, and checks that the gate works.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::sockopt::set_socket_send_buffer_size;
use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

use ivshm_proto::fd_passing::send_message;
use ivshm_proto::v0::{encode, MESSAGE_LEN};

/// About how many messages (so fds) a peer can have unread before the server stops sending to
/// it and queues instead.
pub const MAX_UNREAD: usize = 64;

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
