//! Errors of regions and channels.

use ivshm_mem::OutOfBounds;
use thiserror::Error;

use crate::doorbell::DoorbellError;
use crate::layout::LayoutError;

/// What was found wrong in a channel's shared memory (the peer wrote something the protocol
/// does not allow).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Corruption {
    /// A published record's length is 0 or larger than the ring allows.
    #[error("record at position {position:#x} has length {len}, allowed 1..={max}")]
    RecordLength {
        /// The record's position.
        position: u32,
        /// The length found.
        len: u32,
        /// The largest message of the ring.
        max: u32,
    },
    /// The consumer's `tail` is not on a record boundary.
    #[error("tail {tail:#x} is not a multiple of 64")]
    TailMisaligned {
        /// The tail found.
        tail: u32,
    },
    /// The consumer's `tail` moved backwards or past what was published.
    #[error("tail moved from {old:#x} to {new:#x}, outside the published range up to {head:#x}")]
    TailOutOfRange {
        /// The tail we knew.
        old: u32,
        /// The tail found.
        new: u32,
        /// Our published position.
        head: u32,
    },
    /// The directory entry's ring fields differ from the ones the layout prescribes (checked
    /// when the channel is opened).
    #[error("the directory entry changed under the channel ({what})")]
    EntryChanged {
        /// Which field.
        what: &'static str,
    },
    /// A side word holds a state that does not exist.
    #[error("side word {word:#010x} holds no valid state")]
    SideWord {
        /// The word found.
        word: u32,
    },
    /// An offset derived from the region left it (cannot happen with a validated geometry;
    /// reported instead of touching memory outside the region).
    #[error("access outside the region: {0}")]
    OutOfBounds(OutOfBounds),
}

impl From<OutOfBounds> for Corruption {
    fn from(error: OutOfBounds) -> Self {
        Corruption::OutOfBounds(error)
    }
}

/// Opening or using a region failed.
#[derive(Debug, Error)]
pub enum RegionError {
    /// The region header is invalid or of an unknown version.
    #[error("invalid channel region: {0}")]
    Layout(LayoutError),
    /// The region is all zero (not formatted) and formatting was not asked for.
    #[error("the region is not formatted for channels (all zero); format it first")]
    NotFormatted,
    /// Another party is formatting the region and did not finish in time.
    #[error("another party started formatting the region and did not finish")]
    FormatInProgress,
    /// The region's memory is not 64-byte aligned.
    #[error("the region's memory must be 64-byte aligned")]
    Misaligned,
    /// The requested layout does not fit the region.
    #[error("{channels} channels do not fit in a region of {size} bytes")]
    DoesNotFit {
        /// Channels asked for.
        channels: u32,
        /// Region size.
        size: u64,
    },
    /// The directory lock is held by another peer that did not release it in time.
    #[error("the channel directory is locked by peer {holder} and it did not release it in time (if that peer left, the lock is freed when its departure is marked: Region::peer_left, or the ivshm server)")]
    DirectoryLocked {
        /// The holder's peer id.
        holder: u16,
    },
    /// No free directory entry.
    #[error("all {channels} channel entries of the region are in use")]
    DirectoryFull {
        /// Entries in the region.
        channels: u32,
    },
    /// The name is empty, longer than 31 bytes or contains a NUL.
    #[error("invalid channel name {name:?}: 1 to 31 bytes, no NUL")]
    BadName {
        /// The name.
        name: String,
    },
    /// Both sides of the named channel are taken.
    #[error("channel {name:?} already has two endpoints (peers {a} and {b})")]
    Busy {
        /// The name.
        name: String,
        /// Side A's peer.
        a: u16,
        /// Side B's peer.
        b: u16,
    },
    /// The vector is not one of ours.
    #[error("vector {vector} does not exist: the doorbell has {vectors} vectors")]
    BadVector {
        /// The vector asked for.
        vector: u16,
        /// Vectors of the doorbell.
        vectors: u16,
    },
    /// The directory (not one channel) is corrupt.
    #[error("the channel directory is corrupt: {0}")]
    Corrupt(Corruption),
}

impl From<LayoutError> for RegionError {
    fn from(error: LayoutError) -> Self {
        RegionError::Layout(error)
    }
}

impl From<Corruption> for RegionError {
    fn from(error: Corruption) -> Self {
        RegionError::Corrupt(error)
    }
}

/// A channel operation failed.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The message is larger than the ring can carry (messages are never split).
    #[error("message of {len} bytes is larger than the channel's largest message ({max} bytes)")]
    TooLarge {
        /// The message length.
        len: usize,
        /// The largest message.
        max: u32,
    },
    /// Messages carry at least one byte.
    #[error("empty messages are not allowed")]
    Empty,
    /// Non-blocking: the ring is full (send) or empty (receive). The doorbell is armed.
    #[error("the operation would block")]
    WouldBlock,
    /// The timeout passed.
    #[error("timed out")]
    Timeout,
    /// The receive buffer is smaller than the message (the message stays queued).
    #[error("the message has {needed} bytes, the buffer only {got}")]
    BufferTooSmall {
        /// The message length.
        needed: usize,
        /// The buffer length.
        got: usize,
    },
    /// The peer closed its side (every message it sent before was delivered).
    #[error("the peer closed the channel")]
    PeerClosed,
    /// The peer left the region (its side was marked gone).
    #[error("peer {peer} left the region")]
    PeerGone {
        /// The peer's id.
        peer: u16,
    },
    /// Our own side was closed or marked gone by someone else.
    #[error("our side of the channel was detached by another party")]
    Detached,
    /// The channel's shared memory holds something the protocol does not allow; the channel is
    /// failed (every later call returns this error), other channels are unaffected.
    #[error("channel {channel:?} is corrupt: {what}")]
    ChannelCorrupt {
        /// The channel's name.
        channel: String,
        /// What was wrong.
        what: Corruption,
    },
    /// The doorbell failed.
    #[error("doorbell: {0}")]
    Doorbell(DoorbellError),
}

impl From<DoorbellError> for ChannelError {
    fn from(error: DoorbellError) -> Self {
        ChannelError::Doorbell(error)
    }
}
