//! One 8-byte message plus at most one file descriptor over a UNIX stream socket.
//!
//! The fd travels with the first byte of its message (`SCM_RIGHTS`). A stream socket may deliver
//! or accept a message in pieces, so the sender resumes from an offset and [`MessageReader`]
//! accumulates bytes (and the fd) until a whole message is there. Receiving never crosses a
//! message boundary, so an fd is always attributed to the right message.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use thiserror::Error;

use crate::v0::{decode, MESSAGE_LEN};

/// How many fds one receive makes room for: a correct sender sends at most one; room for a few
/// more lets us detect (and close) extras instead of losing them to truncation.
const RECV_FD_ROOM: usize = 4;

/// Errors while passing messages.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum FdPassingError {
    /// socket error: {0}
    ///
    /// The socket call failed.
    Io(Errno),
    /// received file descriptors were truncated by the kernel
    ///
    /// The kernel had to drop ancillary data (fds) because our buffer was too small.
    FdsTruncated,
    /// {0} file descriptors arrived with one message (at most 1 allowed)
    ///
    /// More than one fd arrived for one message.
    TooManyFds(usize),
    /// connection closed after {0} of 8 bytes of a message
    ///
    /// The peer closed the connection in the middle of a message.
    TruncatedMessage(usize),
}

/// How far a partially sent message has got.
pub type SendProgress = usize;

/// Sends `message[offset..]`, attaching `fd` only when `offset == 0`.
///
/// Returns how many bytes went out (possibly fewer than asked on a non-blocking socket; call
/// again with the new offset). `EAGAIN` comes back as `Err(Errno::AGAIN)`; `SIGPIPE` is never
/// raised (`MSG_NOSIGNAL`).
pub fn send_message(
    socket: BorrowedFd<'_>,
    message: &[u8; MESSAGE_LEN],
    offset: SendProgress,
    fd: Option<BorrowedFd<'_>>,
) -> Result<usize, Errno> {
    let rest = message.get(offset..).unwrap_or(&[]);
    if rest.is_empty() {
        return Ok(0);
    }
    let iov = [IoSlice::new(rest)];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let (0, Some(fd)) = (offset, fd) {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            // Cannot happen: the buffer is sized for exactly one fd.
            return Err(Errno::NOBUFS);
        }
    }
    loop {
        match sendmsg(socket, &iov, &mut control, SendFlags::NOSIGNAL) {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Sends one whole message on a blocking socket (retrying partial writes).
pub fn send_message_blocking(
    socket: BorrowedFd<'_>,
    value: i64,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), Errno> {
    let message = crate::v0::encode(value);
    let mut offset = 0;
    while offset < MESSAGE_LEN {
        offset += send_message(socket, &message, offset, fd)?;
    }
    Ok(())
}

/// What one [`MessageReader::receive`] call produced.
#[derive(Debug)]
pub enum Received {
    /// A whole message, with the fd that came with it.
    Message {
        /// The decoded value.
        value: i64,
        /// The fd attached to the message, if any.
        fd: Option<OwnedFd>,
    },
    /// Non-blocking socket with no (complete) message yet; bytes so far are kept.
    WouldBlock,
    /// The other side closed the connection cleanly between messages.
    Closed,
}

/// Accumulates one message at a time from a stream socket.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: [u8; MESSAGE_LEN],
    filled: usize,
    fd: Option<OwnedFd>,
}

impl MessageReader {
    /// A reader with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when part of a message has been read.
    pub fn is_mid_message(&self) -> bool {
        self.filled > 0
    }

    /// Reads until one whole message is available, the socket would block, or it closes.
    ///
    /// On a protocol violation at this layer (several fds, truncated fds, a connection closed
    /// mid-message) it returns an error; any fds received are closed, never leaked.
    pub fn receive(&mut self, socket: BorrowedFd<'_>) -> Result<Received, FdPassingError> {
        while self.filled < MESSAGE_LEN {
            let mut space =
                [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(RECV_FD_ROOM))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let unread = &mut self.buf[self.filled..];
            let mut iov = [IoSliceMut::new(unread)];
            let msg = match recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(msg) => msg,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(Received::WouldBlock),
                Err(e) => return Err(FdPassingError::Io(e)),
            };
            let mut received: Vec<OwnedFd> = Vec::new();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    received.extend(fds);
                }
            }
            if msg.flags.contains(ReturnFlags::CTRUNC) {
                self.reset();
                return Err(FdPassingError::FdsTruncated);
            }
            let fd_count = received.len() + usize::from(self.fd.is_some());
            if fd_count > 1 {
                self.reset();
                return Err(FdPassingError::TooManyFds(fd_count));
            }
            if let Some(fd) = received.pop() {
                self.fd = Some(fd);
            }
            if msg.bytes == 0 {
                let filled = self.filled;
                self.reset();
                return if filled == 0 {
                    Ok(Received::Closed)
                } else {
                    Err(FdPassingError::TruncatedMessage(filled))
                };
            }
            self.filled += msg.bytes;
        }
        let value = decode(self.buf);
        let fd = self.fd.take();
        self.filled = 0;
        Ok(Received::Message { value, fd })
    }

    fn reset(&mut self) {
        self.filled = 0;
        self.fd = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v0::encode;
    use rustix::event::{eventfd, EventfdFlags};
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap()
    }

    #[test]
    fn message_with_fd_round_trips() {
        let (a, b) = pair();
        let efd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        send_message_blocking(a.as_fd(), 42, Some(efd.as_fd())).unwrap();
        send_message_blocking(a.as_fd(), -1, None).unwrap();
        let mut r = MessageReader::new();
        match r.receive(b.as_fd()).unwrap() {
            Received::Message { value, fd } => {
                assert_eq!(value, 42);
                // The received fd is the same eventfd: a write through it is seen on ours.
                rustix::io::write(fd.unwrap(), &1u64.to_ne_bytes()).unwrap();
                let mut buf = [0u8; 8];
                rustix::io::read(&efd, &mut buf).unwrap();
                assert_eq!(u64::from_ne_bytes(buf), 1);
            }
            other => panic!("{other:?}"),
        }
        match r.receive(b.as_fd()).unwrap() {
            Received::Message { value, fd } => {
                assert_eq!(value, -1);
                assert!(fd.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.receive(b.as_fd()).unwrap(),
            Received::WouldBlock
        ));
        drop(a);
        assert!(matches!(r.receive(b.as_fd()).unwrap(), Received::Closed));
    }

    /// Sends raw bytes with any number of fds attached, bypassing the codec.
    fn send_raw(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let sent = sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .unwrap();
        assert_eq!(sent, bytes.len());
    }

    #[test]
    fn partial_messages_are_reassembled_with_their_fd() {
        let (a, b) = pair();
        let efd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let msg = encode(0x1234);
        // The first 3 bytes carry the fd, the rest follows later.
        send_raw(a.as_fd(), &msg[..3], &[efd.as_fd()]);
        let mut r = MessageReader::new();
        assert!(matches!(
            r.receive(b.as_fd()).unwrap(),
            Received::WouldBlock
        ));
        assert!(r.is_mid_message());
        assert_eq!(send_message(a.as_fd(), &msg, 3, None).unwrap(), 5);
        match r.receive(b.as_fd()).unwrap() {
            Received::Message { value, fd } => {
                assert_eq!(value, 0x1234);
                assert!(fd.is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_fds_in_one_message_is_an_error_and_leaks_nothing() {
        let (a, b) = pair();
        let e1 = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let e2 = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        send_raw(a.as_fd(), &encode(5), &[e1.as_fd(), e2.as_fd()]);
        let mut r = MessageReader::new();
        assert!(matches!(
            r.receive(b.as_fd()),
            Err(FdPassingError::TooManyFds(2))
        ));
    }

    #[test]
    fn close_mid_message_is_an_error() {
        let (a, b) = pair();
        let msg = encode(9);
        assert_eq!(send_message(a.as_fd(), &msg, 4, None).unwrap(), 4);
        drop(a);
        let mut r = MessageReader::new();
        assert!(matches!(
            r.receive(b.as_fd()),
            Err(FdPassingError::TruncatedMessage(4))
        ));
    }
}
