//! Errors of regions and channels.

use ivshm_mem::OutOfBounds;
use thiserror::Error;

use crate::doorbell::DoorbellError;
use crate::layout::LayoutError;

/// What was found wrong in a channel's shared memory (the peer wrote something the protocol
/// does not allow).
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum Corruption {
    /// record at position {position:#x} has length {len}, allowed 1..={max}
    ///
    /// A published record's length is 0 or larger than the ring allows.
    RecordLength {
        /// The record's position.
        position: u32,
        /// The length found.
        len: u32,
        /// The largest message of the ring.
        max: u32,
    },
    /// tail {tail:#x} is not a multiple of 64
    ///
    /// The consumer's `tail` is not on a record boundary.
    TailMisaligned {
        /// The tail found.
        tail: u32,
    },
    /// tail moved from {old:#x} to {new:#x}, outside the published range up to {head:#x}
    ///
    /// The consumer's `tail` moved backwards or past what was published.
    TailOutOfRange {
        /// The tail we knew.
        old: u32,
        /// The tail found.
        new: u32,
        /// Our published position.
        head: u32,
    },
    /// the directory entry changed under the channel ({what})
    ///
    /// The directory entry's ring fields differ from the ones the layout prescribes (checked
    /// when the channel is opened).
    EntryChanged {
        /// Which field.
        what: &'static str,
    },
    /// side word {word:#010x} holds no valid state
    ///
    /// A side word holds a state that does not exist.
    SideWord {
        /// The word found.
        word: u32,
    },
    /// access outside the region: {0}
    ///
    /// An offset derived from the region left it (cannot happen with a validated geometry;
    /// reported instead of touching memory outside the region).
    OutOfBounds(OutOfBounds),
}

impl From<OutOfBounds> for Corruption {
    fn from(error: OutOfBounds) -> Self {
        Corruption::OutOfBounds(error)
    }
}

/// Opening or using a region failed.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum RegionError {
    /// invalid channel region: {0}
    ///
    /// The region header is invalid or of an unknown version.
    Layout(LayoutError),
    /// the region is not formatted for channels (all zero); format it first
    ///
    /// The region is all zero (not formatted) and formatting was not asked for.
    NotFormatted,
    /// another party started formatting the region and did not finish
    ///
    /// Another party is formatting the region and did not finish in time.
    FormatInProgress,
    /// the region's memory must be 64-byte aligned
    ///
    /// The region's memory is not 64-byte aligned.
    Misaligned,
    /// {channels} channels do not fit in a region of {size} bytes
    ///
    /// The requested layout does not fit the region.
    DoesNotFit {
        /// Channels asked for.
        channels: u32,
        /// Region size.
        size: u64,
    },
    /// the channel directory is locked by peer {holder} and it did not release it in time (if that
    /// peer left, the lock is freed when its departure is marked: Region::peer_left, or the ivshm
    /// server)
    ///
    /// The directory lock is held by another peer that did not release it in time.
    DirectoryLocked {
        /// The holder's peer id.
        holder: u16,
    },
    /// all {channels} channel entries of the region are in use
    ///
    /// No free directory entry.
    DirectoryFull {
        /// Entries in the region.
        channels: u32,
    },
    /// invalid channel name {name:?}: 1 to 31 bytes, no NUL
    ///
    /// The name is empty, longer than 31 bytes or contains a NUL.
    BadName {
        /// The name.
        name: String,
    },
    /// channel {name:?} already has two endpoints (peers {a} and {b})
    ///
    /// Both sides of the named channel are taken.
    Busy {
        /// The name.
        name: String,
        /// Side A's peer.
        a: u16,
        /// Side B's peer.
        b: u16,
    },
    /// vector {vector} does not exist: the doorbell has {vectors} vectors
    ///
    /// The vector is not one of ours.
    BadVector {
        /// The vector asked for.
        vector: u16,
        /// Vectors of the doorbell.
        vectors: u16,
    },
    /// the channel directory is corrupt: {0}
    ///
    /// The directory (not one channel) is corrupt.
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
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum ChannelError {
    /// message of {len} bytes is larger than the channel's largest message ({max} bytes)
    ///
    /// The message is larger than the ring can carry (messages are never split).
    TooLarge {
        /// The message length.
        len: usize,
        /// The largest message.
        max: u32,
    },
    /// empty messages are not allowed
    ///
    /// Messages carry at least one byte.
    Empty,
    /// the operation would block
    ///
    /// Non-blocking: the ring is full (send) or empty (receive). The doorbell is armed.
    WouldBlock,
    /// timed out
    ///
    /// The timeout passed.
    Timeout,
    /// the message has {needed} bytes, the buffer only {got}
    ///
    /// The receive buffer is smaller than the message (the message stays queued).
    BufferTooSmall {
        /// The message length.
        needed: usize,
        /// The buffer length.
        got: usize,
    },
    /// the peer closed the channel
    ///
    /// The peer closed its side (every message it sent before was delivered).
    PeerClosed,
    /// peer {peer} left the region
    ///
    /// The peer left the region (its side was marked gone).
    PeerGone {
        /// The peer's id.
        peer: u16,
    },
    /// our side of the channel was detached by another party
    ///
    /// Our own side was closed or marked gone by someone else.
    Detached,
    /// channel {channel:?} is corrupt: {what}
    ///
    /// The channel's shared memory holds something the protocol does not allow; the channel is
    /// failed (every later call returns this error), other channels are unaffected.
    ChannelCorrupt {
        /// The channel's name.
        channel: String,
        /// What was wrong.
        what: Corruption,
    },
    /// doorbell: {0}
    ///
    /// The doorbell failed.
    Doorbell(DoorbellError),
}

impl From<DoorbellError> for ChannelError {
    fn from(error: DoorbellError) -> Self {
        ChannelError::Doorbell(error)
    }
}
