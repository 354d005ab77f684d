//! Checked traffic: numbered, checksummed messages of random sizes, and an [`exchange`] that
//! sends one stream on a channel while it receives and verifies the other, both at once.
//!
//! For soak tests and self-checks between any two endpoints (two host processes, a guest and
//! the host, two guests): both ends need to agree only on the channel's name and the number of
//! messages. The messages of a stream are a pure function of the stream id and the sequence
//! number, so the receiver regenerates each one and compares it whole; on top of that, every
//! message of 12 bytes or more carries its sequence number in its first 8 bytes and a checksum
//! (32-bit FNV-1a of the bytes before it) in its last 4, so that a lost, duplicated, reordered
//! or damaged message is named precisely.
//!
//! Lengths are log-uniform between 1 byte and the largest length asked for (as many messages
//! of 1–2 bytes as of 32–64 KiB): small messages test the record headers and wrap-around,
//! large ones the copies.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::channel::{Channel, Receiver, Sender, Side};
use crate::error::ChannelError;

/// A message did not verify, or the channel failed.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum TrafficError {
    /// message {seq} has {got} bytes, {want} expected (lost, duplicated or reordered)
    ///
    /// The message has another length than the one generated for its place in the stream.
    Length {
        /// Its place in the stream.
        seq: u64,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// message {seq} carries sequence number {got} (lost, duplicated or reordered)
    ///
    /// The sequence number in the message is not its place in the stream.
    Sequence {
        /// Its place in the stream.
        seq: u64,
        /// The sequence number found.
        got: u64,
    },
    /// message {seq} ({len} bytes) fails its checksum (damaged)
    ///
    /// The checksum in the message does not match its bytes.
    Checksum {
        /// Its place in the stream.
        seq: u64,
        /// Its length.
        len: usize,
    },
    /// message {seq} differs from what was sent from byte {at} on (damaged)
    ///
    /// The message differs from the generated one.
    Content {
        /// Its place in the stream.
        seq: u64,
        /// The first differing byte.
        at: usize,
    },
    /// {what} message {seq}: {error}
    ///
    /// Sending or receiving failed.
    Channel {
        /// `sending` or `receiving`.
        what: &'static str,
        /// The message's place in its stream.
        seq: u64,
        /// The channel's error.
        error: ChannelError,
    },
    /// the sending thread panicked
    ///
    /// The sending thread panicked (a bug, reported rather than propagated).
    SenderPanicked,
}

/// One direction of traffic: which stream, and the longest message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    /// The stream id (messages of different streams differ).
    pub id: u64,
    /// The longest message (at least 1).
    pub max_len: usize,
}

impl Stream {
    /// The stream a side of channel `name` sends (the receiver computes the other side's).
    pub fn of(name: &str, side: Side, max_len: usize) -> Stream {
        let id = fnv1a(name.as_bytes()) as u64;
        let id = (id << 1) | u64::from(side == Side::B);
        Stream {
            id,
            max_len: max_len.max(1),
        }
    }

    /// Message `seq` of the stream, written into `buf` (cleared first).
    pub fn message(&self, seq: u64, buf: &mut Vec<u8>) {
        let mut rng = XorShift::new(self.id, seq);
        // At most a ring's largest size (and no shift overflow below).
        let max_len = self.max_len.clamp(1, 1 << 30);
        // Log-uniform length: a random number of bits, then a value below that power of two.
        let bits = u64::from(usize::BITS - max_len.leading_zeros());
        let len = loop {
            let b = rng.next() % (bits + 1);
            let len = 1 + (rng.next() & ((1u64 << b) - 1)) as usize;
            if len <= max_len {
                break len;
            }
        };
        buf.clear();
        buf.reserve(len);
        while buf.len() < len {
            let word = rng.next().to_le_bytes();
            let take = (len - buf.len()).min(8);
            buf.extend_from_slice(&word[..take]);
        }
        if len >= 12 {
            buf[..8].copy_from_slice(&seq.to_le_bytes());
            let sum = fnv1a(&buf[..len - 4]);
            buf[len - 4..].copy_from_slice(&sum.to_le_bytes());
        }
    }

    /// Checks that `got` is message `seq` of the stream (`scratch` holds the regenerated one).
    pub fn verify(&self, seq: u64, got: &[u8], scratch: &mut Vec<u8>) -> Result<(), TrafficError> {
        let len = got.len();
        if len >= 12 {
            let mut number = [0u8; 8];
            number.copy_from_slice(&got[..8]);
            let number = u64::from_le_bytes(number);
            if number != seq {
                return Err(TrafficError::Sequence { seq, got: number });
            }
            if fnv1a(&got[..len - 4]).to_le_bytes() != got[len - 4..] {
                return Err(TrafficError::Checksum { seq, len });
            }
        }
        self.message(seq, scratch);
        if scratch.len() != len {
            return Err(TrafficError::Length {
                seq,
                got: len,
                want: scratch.len(),
            });
        }
        match got.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
            Some(at) => Err(TrafficError::Content { seq, at }),
            None => Ok(()),
        }
    }
}

/// 32-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// xorshift64 seeded from a stream and a sequence number.
struct XorShift(u64);

impl XorShift {
    fn new(stream: u64, seq: u64) -> XorShift {
        let seed = (stream.rotate_left(29) ^ seq).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// What [`exchange`] should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Messages to send, and to receive.
    pub count: u64,
    /// The longest message (capped at the channel's largest message).
    pub max_len: usize,
    /// Bound on each blocking send or receive (`None`: none).
    pub timeout: Option<Duration>,
    /// Count messages that do not verify ([`ExchangeReport::damaged`]) and go on, instead of
    /// failing at the first: for runs against a peer that damages messages on purpose, where
    /// only the channel's own errors end the exchange.
    pub tolerate_damage: bool,
}

/// What an exchange moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeReport {
    /// Messages sent.
    pub sent: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Messages received (and verified, unless counted in `damaged`).
    pub received: u64,
    /// Messages received that did not verify (only with [`Exchange::tolerate_damage`]).
    pub damaged: u64,
    /// Bytes received.
    pub received_bytes: u64,
    /// Wall time from start to the last message.
    pub elapsed: Duration,
}

fn send_stream(tx: &mut Sender, stream: Stream, ex: &Exchange) -> Result<(u64, u64), TrafficError> {
    let mut buf = Vec::new();
    let mut bytes = 0u64;
    for seq in 0..ex.count {
        stream.message(seq, &mut buf);
        tx.send(&buf, ex.timeout)
            .map_err(|error| TrafficError::Channel {
                what: "sending",
                seq,
                error,
            })?;
        bytes += buf.len() as u64;
    }
    Ok((ex.count, bytes))
}

/// Received messages, bytes and damaged messages.
type Received = (u64, u64, u64);

fn receive_stream(
    rx: &mut Receiver,
    stream: Stream,
    ex: &Exchange,
) -> Result<Received, TrafficError> {
    let (mut buf, mut scratch) = (Vec::new(), Vec::new());
    let (mut bytes, mut damaged) = (0u64, 0u64);
    for seq in 0..ex.count {
        rx.recv(&mut buf, ex.timeout)
            .map_err(|error| TrafficError::Channel {
                what: "receiving",
                seq,
                error,
            })?;
        match stream.verify(seq, &buf, &mut scratch) {
            Ok(()) => {}
            Err(_) if ex.tolerate_damage => damaged += 1,
            Err(e) => return Err(e),
        }
        bytes += buf.len() as u64;
    }
    Ok((ex.count, bytes, damaged))
}

/// Sends `ex.count` messages of this side's stream on `channel` (from a second thread) while
/// receiving and verifying as many of the other side's; both ends of a channel call it. The
/// channel is closed when both directions are done (the peer still gets every message sent).
pub fn exchange(channel: Channel, ex: &Exchange) -> Result<ExchangeReport, TrafficError> {
    let max_len = ex.max_len.min(channel.max_message());
    let side = channel.side();
    let other = match side {
        Side::A => Side::B,
        Side::B => Side::A,
    };
    let name = channel.name().to_string();
    let ours = Stream::of(&name, side, max_len);
    let theirs = Stream::of(&name, other, max_len);
    let (mut tx, mut rx) = channel.split();
    let start = Instant::now();
    let (sent, received) = std::thread::scope(|s| {
        let sender = s.spawn(|| send_stream(&mut tx, ours, ex));
        let received = receive_stream(&mut rx, theirs, ex);
        let sent = sender.join().unwrap_or(Err(TrafficError::SenderPanicked));
        (sent, received)
    });
    let elapsed = start.elapsed();
    // A receive failure usually explains the send failure (the peer went away): report it first.
    let (received, received_bytes, damaged) = received?;
    let (sent, sent_bytes) = sent?;
    Ok(ExchangeReport {
        sent,
        sent_bytes,
        received,
        damaged,
        received_bytes,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_reproducible_log_uniform_and_verified() {
        let s = Stream::of("t", Side::A, 64 << 10);
        let (mut a, mut b, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        let mut small = 0;
        let mut large = 0;
        for seq in 0..4000 {
            s.message(seq, &mut a);
            s.message(seq, &mut b);
            assert_eq!(a, b);
            assert!((1..=64 << 10).contains(&a.len()));
            small += usize::from(a.len() <= 64);
            large += usize::from(a.len() > 16 << 10);
            s.verify(seq, &a, &mut scratch).unwrap();
        }
        assert!(small > 400 && large > 200, "{small} {large}");
        // The other side's stream differs.
        let t = Stream::of("t", Side::B, 64 << 10);
        s.message(7, &mut a);
        t.message(7, &mut b);
        assert_ne!(a, b);
        // Damage is named.
        let mut seq = 100;
        s.message(seq, &mut a);
        while a.len() < 12 {
            seq += 1;
            s.message(seq, &mut a);
        }
        assert_eq!(a[..8], seq.to_le_bytes());
        assert!(matches!(
            s.verify(seq + 1, &a, &mut scratch),
            Err(TrafficError::Sequence { .. })
        ));
        let mid = a.len() / 2;
        a[mid] ^= 1;
        assert!(matches!(
            s.verify(seq, &a, &mut scratch),
            Err(TrafficError::Checksum { .. })
        ));
    }

    #[test]
    fn a_stream_of_tiny_messages_stays_in_bounds() {
        let s = Stream::of("tiny", Side::B, 1);
        let mut m = Vec::new();
        for seq in 0..100 {
            s.message(seq, &mut m);
            assert_eq!(m.len(), 1);
        }
    }
}
