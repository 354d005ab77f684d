//! A peer's outgoing messages: bytes, how far the first one got, and the fd each one carries.
//!
//! Peer sockets are non-blocking. A message that cannot go out at once waits here; the fd it
//! carries is kept alive (shared `Arc`) until it has been sent, even if its owner has left.
//! Handshake messages are exempt from the bound; everything queued after them counts, so a peer
//! that stops reading is detected by [`OutgoingQueue::push`] failing. The vectors of a peer that
//! leaves before they went out are taken back ([`OutgoingQueue::withdraw_vectors`]), so what
//! waits is bounded by the peers present, not by how fast others come and go.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ivshm_proto::fd_passing::send_message;
use ivshm_proto::v0::{encode, MESSAGE_LEN};
use rustix::io::Errno;
use thiserror::Error;

/// Messages of memory an empty queue may keep. A joining peer's handshake is one message per
/// vector of every other peer; kept after it has gone out, it would make the server's memory
/// grow with the square of the number of peers.
const KEPT_CAPACITY: usize = 32;

/// One queued message.
#[derive(Debug)]
struct Outgoing {
    bytes: [u8; MESSAGE_LEN],
    fd: Option<Arc<OwnedFd>>,
}

/// outgoing queue full ({limit} messages waiting): the peer stopped reading its socket
///
/// The queue already holds its maximum of notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct QueueFull {
    /// The bound.
    pub limit: usize,
}

/// The state of a queue after a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything went out.
    Empty,
    /// The socket is full; wait for it to become writable.
    WouldBlock,
    /// The next message carries an fd and fds may not be sent yet (the peer has not read its
    /// first messages); wait for the socket to become writable.
    Gated,
    /// The kernel refused the next message's fd (`ETOOMANYREFS`: the sending user has as many
    /// fds in flight as its `RLIMIT_NOFILE`); the message stays queued.
    TooManyRefs,
}

/// Outgoing messages of one peer.
#[derive(Debug)]
pub struct OutgoingQueue {
    items: VecDeque<Outgoing>,
    /// Bytes of the front message already sent.
    offset: usize,
    /// Handshake messages still queued at the front (not counted against the bound).
    handshake_left: usize,
    limit: usize,
}

impl OutgoingQueue {
    /// An empty queue that holds at most `limit` messages beyond the handshake.
    pub fn new(limit: usize) -> Self {
        OutgoingQueue {
            items: VecDeque::new(),
            offset: 0,
            handshake_left: 0,
            limit,
        }
    }

    /// Queues a handshake message (not bounded). Must come before any [`push`](Self::push).
    pub fn push_handshake(&mut self, value: i64, fd: Option<Arc<OwnedFd>>) {
        self.items.push_back(Outgoing {
            bytes: encode(value),
            fd,
        });
        self.handshake_left += 1;
    }

    /// Queues a notification, or fails if the peer already has `limit` waiting.
    pub fn push(&mut self, value: i64, fd: Option<Arc<OwnedFd>>) -> Result<(), QueueFull> {
        if self.items.len() - self.handshake_left >= self.limit {
            return Err(QueueFull { limit: self.limit });
        }
        self.items.push_back(Outgoing {
            bytes: encode(value),
            fd,
        });
        Ok(())
    }

    /// Takes back the queued messages that carry vectors of peer `id` and have not begun to go
    /// out (`id` has left before this peer was sent them); returns how many. Handshake
    /// messages among them stop counting as such.
    pub fn withdraw_vectors(&mut self, id: u16) -> usize {
        let bytes = encode(i64::from(id));
        // A message partly sent has its fd on the way: it stays.
        let started = usize::from(self.offset > 0);
        let (mut index, mut withdrawn, mut from_handshake) = (0, 0, 0);
        let handshake_left = self.handshake_left;
        self.items.retain(|item| {
            let i = index;
            index += 1;
            let withdraw = i >= started && item.fd.is_some() && item.bytes == bytes;
            if withdraw {
                withdrawn += 1;
                from_handshake += usize::from(i < handshake_left);
            }
            !withdraw
        });
        self.handshake_left -= from_handshake;
        withdrawn
    }

    /// Handshake messages not sent yet (0: the whole handshake has gone out).
    pub fn handshake_left(&self) -> usize {
        self.handshake_left
    }

    /// Number of messages waiting (including a partly sent one).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many messages it has room for without allocating (its memory, in messages).
    pub fn capacity(&self) -> usize {
        self.items.capacity()
    }

    /// Sends as much as the socket takes; with `fds_allowed` false it stops before the first
    /// message that carries an fd. `sent` is increased by the number of whole messages that
    /// went out. A send error other than `EAGAIN` and `ETOOMANYREFS` is returned (the peer must
    /// be dropped).
    pub fn flush(
        &mut self,
        socket: BorrowedFd<'_>,
        sent: &mut u64,
        fds_allowed: bool,
    ) -> Result<Flushed, Errno> {
        while let Some(front) = self.items.front() {
            let fd = front.fd.as_ref().map(|f| f.as_fd());
            if fd.is_some() && !fds_allowed && self.offset == 0 {
                return Ok(Flushed::Gated);
            }
            match send_message(socket, &front.bytes, self.offset, fd) {
                Ok(0) => return Err(Errno::PIPE),
                Ok(n) => self.offset += n,
                Err(Errno::AGAIN) => return Ok(Flushed::WouldBlock),
                Err(Errno::TOOMANYREFS) => return Ok(Flushed::TooManyRefs),
                Err(e) => return Err(e),
            }
            if self.offset >= MESSAGE_LEN {
                self.offset = 0;
                self.items.pop_front();
                self.handshake_left = self.handshake_left.saturating_sub(1);
                *sent += 1;
            }
        }
        // A handshake's worth of memory is not kept once it has gone out (see
        // `KEPT_CAPACITY`).
        if self.items.capacity() > KEPT_CAPACITY {
            self.items = VecDeque::new();
        }
        Ok(Flushed::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivshm_proto::fd_passing::{MessageReader, Received};
    use rustix::event::{eventfd, EventfdFlags};
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

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
    fn bound_counts_only_messages_after_the_handshake() {
        let mut q = OutgoingQueue::new(2);
        for v in 0..10 {
            q.push_handshake(v, None);
        }
        q.push(1, None).unwrap();
        q.push(2, None).unwrap();
        assert_eq!(q.push(3, None), Err(QueueFull { limit: 2 }));
        assert_eq!(q.len(), 12);
    }

    #[test]
    fn flush_sends_in_order_with_fds_and_resumes_after_would_block() {
        let (a, b) = pair();
        let efd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).unwrap());
        let mut q = OutgoingQueue::new(usize::MAX);
        let mut n = 0i64;
        let mut sent = 0;
        // Fill the socket until it would block.
        loop {
            q.push(n, Some(efd.clone())).unwrap();
            n += 1;
            if q.flush(a.as_fd(), &mut sent, true).unwrap() == Flushed::WouldBlock {
                break;
            }
        }
        assert!(!q.is_empty());
        // Drain the receiver, flushing whenever there is room, and check every message.
        let mut reader = MessageReader::new();
        let mut expected = 0i64;
        while expected < n {
            match reader.receive(b.as_fd()).unwrap() {
                Received::Message { value, fd } => {
                    assert_eq!(value, expected);
                    assert!(fd.is_some());
                    expected += 1;
                }
                Received::WouldBlock => {
                    q.flush(a.as_fd(), &mut sent, true).unwrap();
                }
                Received::Closed => panic!("closed"),
            }
        }
        assert_eq!(sent, n as u64);
        assert!(q.is_empty());
    }

    #[test]
    fn withdrawing_takes_back_only_unsent_vectors_of_that_peer() {
        let efd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).unwrap());
        let mut q = OutgoingQueue::new(4);
        q.push_handshake(0, None); // version
        q.push_handshake(9, None); // our id
        q.push_handshake(7, Some(efd.clone())); // peer 7's vector, in the handshake
        q.push_handshake(9, Some(efd.clone())); // our own vector
        q.push(7, Some(efd.clone())).unwrap(); // (again: a second vector of 7)
        q.push(5, Some(efd.clone())).unwrap();
        q.push(7, None).unwrap(); // a leave of an earlier 7 (no fd): news, kept
        assert_eq!(q.withdraw_vectors(7), 2);
        assert_eq!(q.len(), 5);
        // The handshake shrank with it: three left, so the bound still counts two after them.
        q.push(1, None).unwrap();
        q.push(2, None).unwrap();
        assert_eq!(q.push(3, None), Err(QueueFull { limit: 4 }));
        assert_eq!(q.withdraw_vectors(9), 1);
        assert_eq!(q.withdraw_vectors(8), 0);
        // The withdrawn clones are closed: peer 5's vector and the test's own are left.
        assert_eq!(Arc::strong_count(&efd), 2);
    }

    /// A message partly sent keeps its place: its fd went with its first byte.
    #[test]
    fn a_partly_sent_vector_is_not_withdrawn() {
        let efd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).unwrap());
        let mut q = OutgoingQueue::new(16);
        q.push(7, Some(efd.clone())).unwrap();
        q.push(7, Some(efd.clone())).unwrap();
        q.offset = 3; // as after a short send
        assert_eq!(q.withdraw_vectors(7), 1);
        assert_eq!(q.len(), 1);
    }

    /// A handshake of thousands of messages (a peer joining a large region) does not leave its
    /// memory behind once it has gone out: every peer would keep one, and memory would grow
    /// with the square of the number of peers.
    #[test]
    fn a_drained_queue_keeps_no_handshake_sized_memory() {
        let (a, b) = pair();
        let efd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).unwrap());
        let mut q = OutgoingQueue::new(16);
        for n in 0..10_000 {
            q.push_handshake(n, Some(efd.clone()));
        }
        let mut reader = MessageReader::new();
        let mut sent = 0;
        while q.flush(a.as_fd(), &mut sent, true).unwrap() == Flushed::WouldBlock {
            while let Received::Message { .. } = reader.receive(b.as_fd()).unwrap() {}
        }
        assert!(q.is_empty());
        assert!(
            q.capacity() <= 64,
            "{} messages of memory kept",
            q.capacity()
        );
    }

    #[test]
    fn send_to_closed_peer_is_an_error() {
        let (a, b) = pair();
        drop(b);
        let mut q = OutgoingQueue::new(4);
        q.push(1, None).unwrap();
        let mut sent = 0;
        q.flush(a.as_fd(), &mut sent, true).unwrap_err();
    }
}
