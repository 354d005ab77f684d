//! The channel region layout, version 1: every offset, width and constant of
//! `docs/channel-spec.md`, defined once.
//!
//! All multi-byte fields are little-endian. Offsets of header fields are from the start of the
//! region, of entry fields from the start of the entry, of ring control fields from the start of
//! the ring's control block, of record fields from the start of the record. A test
//! (`tests/spec_table.rs`) parses the spec's tables and compares them with these constants: the
//! document and this module change together.
//!
//! Besides the constants, this module holds the pure arithmetic of the layout (record sizes,
//! geometry) and the validation of a header read from shared memory ([`Geometry::validate`]).

use thiserror::Error;

/// The layout version this code reads and writes.
pub const VERSION: u32 = 1;
/// Region header `magic`: the bytes `ICHN` (a little-endian u32).
pub const MAGIC: u32 = u32::from_le_bytes(*b"ICHN");
/// `magic` while a formatter writes the header (the bytes `ICHF`).
pub const MAGIC_FORMATTING: u32 = u32::from_le_bytes(*b"ICHF");

/// Region header size in bytes.
pub const HEADER_SIZE: u32 = 128;
/// Header: `magic` (u32, atomic: stored last by the formatter with release, loaded with acquire).
pub const H_MAGIC: usize = 0;
/// Header: `version` (u32).
pub const H_VERSION: usize = 4;
/// Header: `layout_size` (u64): bytes from the region start to the end of the last ring.
pub const H_LAYOUT_SIZE: usize = 8;
/// Header: `header_size` (u32) = [`HEADER_SIZE`].
pub const H_HEADER_SIZE: usize = 16;
/// Header: `channel_count` (u32): number of directory entries.
pub const H_CHANNEL_COUNT: usize = 20;
/// Header: `entry_size` (u32) = [`ENTRY_SIZE`].
pub const H_ENTRY_SIZE: usize = 24;
/// Header: `ring_size` (u32): data bytes of every ring, a power of two.
pub const H_RING_SIZE: usize = 28;
/// Header: `directory_offset` (u64) = [`HEADER_SIZE`].
pub const H_DIRECTORY_OFFSET: usize = 32;
/// Header: `rings_offset` (u64): start of the first ring's control block.
pub const H_RINGS_OFFSET: usize = 40;
/// Header: `ring_control_size` (u32) = [`RING_CONTROL_SIZE`].
pub const H_RING_CONTROL_SIZE: usize = 48;
/// Header: `flags` (u32), 0 in version 1.
pub const H_FLAGS: usize = 52;
/// Header: `lock` (u32, atomic): the directory lock, 0 when free, else [`LOCK_HELD`] | peer id.
pub const H_LOCK: usize = 64;

/// Bit set in a held `lock` word (the holder's peer id is in the low 16 bits).
pub const LOCK_HELD: u32 = 0x8000_0000;

/// Directory entry size in bytes.
pub const ENTRY_SIZE: u32 = 128;
/// Entry: `state` (u32, atomic): [`STATE_FREE`] or [`STATE_ACTIVE`].
pub const E_STATE: usize = 0;
/// Entry: `generation` (u32): incremented each time the entry is allocated.
pub const E_GENERATION: usize = 4;
/// Entry: `name` (32 bytes): 1..=31 bytes, no NUL inside, NUL-padded.
pub const E_NAME: usize = 8;
/// Entry: `side_a` (u32, atomic): the creator's side word.
pub const E_SIDE_A: usize = 40;
/// Entry: `side_b` (u32, atomic): the joiner's side word.
pub const E_SIDE_B: usize = 44;
/// Entry: `ring_ab_offset` (u64): control block of the ring side A sends on.
pub const E_RING_AB_OFFSET: usize = 48;
/// Entry: `ring_ba_offset` (u64): control block of the ring side B sends on.
pub const E_RING_BA_OFFSET: usize = 56;
/// Entry: `ring_ab_size` (u32): data bytes of the A→B ring.
pub const E_RING_AB_SIZE: usize = 64;
/// Entry: `ring_ba_size` (u32): data bytes of the B→A ring.
pub const E_RING_BA_SIZE: usize = 68;

/// Entry state: unused.
pub const STATE_FREE: u32 = 0;
/// Entry state: holds a channel.
pub const STATE_ACTIVE: u32 = 1;

/// Bytes of a channel name at most (the name field holds one more, a NUL).
pub const NAME_MAX: usize = 31;
/// Size of the name field.
pub const NAME_FIELD: usize = 32;

/// Side word: mask of the peer id (bits 0..16).
pub const SIDE_PEER_MASK: u32 = 0xffff;
/// Side word: shift of the doorbell vector (bits 16..24).
pub const SIDE_VECTOR_SHIFT: u32 = 16;
/// Side word: shift of the side state (bits 24..28).
pub const SIDE_STATE_SHIFT: u32 = 24;
/// Side state: nobody (a joiner may take it).
pub const SIDE_EMPTY: u32 = 0;
/// Side state: an endpoint is attached.
pub const SIDE_ATTACHED: u32 = 1;
/// Side state: the endpoint closed its side.
pub const SIDE_CLOSED: u32 = 2;
/// Side state: the endpoint's peer left (marked by whoever learnt it).
pub const SIDE_GONE: u32 = 3;

/// Size of a ring's control block (three 128-byte blocks and a reserved one).
pub const RING_CONTROL_SIZE: u32 = 512;
/// Ring control: `tail` (u32, atomic, written by the consumer): bytes consumed.
pub const R_TAIL: usize = 0;
/// Ring control: `data_event` (u32, atomic, written by the consumer): ring me when the
/// producer's position moves past this value.
pub const R_DATA_EVENT: usize = 128;
/// Ring control: `space_event` (u32, atomic, written by the producer): ring me when `tail`
/// moves past this value.
pub const R_SPACE_EVENT: usize = 256;

/// Records start at multiples of this many bytes of ring position.
pub const RECORD_ALIGN: u32 = 64;
/// Record: `len` (u32): payload bytes, 1..=ring_size - 64.
pub const REC_LEN: usize = 0;
/// Record: `seq` (u32, atomic): position + 1 once published (release), 0 when invalidated.
pub const REC_SEQ: usize = 4;
/// Payloads of at most this many bytes start right after the 8-byte record header (one
/// cache line for header and payload); longer ones start at record offset 64 (cache-line
/// aligned).
pub const INLINE_MAX: u32 = 56;
/// Payload offset in a record of a short payload.
pub const PAYLOAD_INLINE: u32 = 8;
/// Payload offset in a record of a long payload.
pub const PAYLOAD_ALIGNED: u32 = 64;

/// Smallest ring size (data bytes).
pub const RING_SIZE_MIN: u32 = 128;
/// Largest ring size (data bytes).
pub const RING_SIZE_MAX: u32 = 1 << 30;
/// Fewest channels a region may have.
pub const CHANNELS_MIN: u32 = 1;
/// Most channels a region may have.
pub const CHANNELS_MAX: u32 = 65_536;
/// Alignment of `rings_offset`.
pub const RINGS_ALIGN: u64 = 4096;
/// Initial value of the event words: a position no producer reaches for 4 GiB.
pub const EVENT_NONE: u32 = u32::MAX;

/// Where a record's payload starts, relative to the record.
pub const fn payload_offset(len: u32) -> u32 {
    if len <= INLINE_MAX {
        PAYLOAD_INLINE
    } else {
        PAYLOAD_ALIGNED
    }
}

/// Ring bytes a record with `len` payload bytes takes (`len` ≤ [`RING_SIZE_MAX`]).
pub const fn record_size(len: u32) -> u32 {
    (payload_offset(len) + len).div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// The largest message a ring of `ring_size` data bytes carries.
pub const fn max_message(ring_size: u32) -> u32 {
    ring_size - PAYLOAD_ALIGNED
}

/// The `seq` value of a published record at `position`.
pub const fn seq_of(position: u32) -> u32 {
    position.wrapping_add(1)
}

/// True when an event value `event` asks to be rung for a move from `old` to `new`
/// (virtio's `vring_need_event`: `event` in `[old, new)`, modulo 2^32).
pub const fn need_event(event: u32, new: u32, old: u32) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A side word.
pub const fn side_word(state: u32, peer: u16, vector: u8) -> u32 {
    (state << SIDE_STATE_SHIFT) | ((vector as u32) << SIDE_VECTOR_SHIFT) | peer as u32
}

/// The parts of a side word: (state, peer, vector). Reserved bits make the state invalid
/// (returned as a state above [`SIDE_GONE`]).
pub const fn side_parts(word: u32) -> (u32, u16, u8) {
    (
        word >> SIDE_STATE_SHIFT,
        (word & SIDE_PEER_MASK) as u16,
        ((word >> SIDE_VECTOR_SHIFT) & 0xff) as u8,
    )
}

/// What was wrong with a region header.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum LayoutError {
    /// not a channel region (magic {found:#010x}, expected {MAGIC:#010x})
    ///
    /// The region does not start with the channel magic.
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// channel layout version {found} is not supported (this build reads version {VERSION:})
    ///
    /// The region was formatted by a layout version this code does not know.
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// region header field {field} is {value}, expected {expected}
    ///
    /// A header field has a value version 1 does not allow.
    BadField {
        /// The field's name in the spec.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What was allowed.
        expected: String,
    },
    /// the channel layout needs {needed} bytes but the region has {size}
    ///
    /// The layout does not fit the memory.
    TooSmall {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        size: u64,
    },
}

/// The shape of a region: a private, validated copy of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Directory entries (channels the region can hold at once).
    pub channels: u32,
    /// Data bytes of every ring.
    pub ring_size: u32,
}

/// The raw header fields, as read once from shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    /// `magic`.
    pub magic: u32,
    /// `version`.
    pub version: u32,
    /// `layout_size`.
    pub layout_size: u64,
    /// `header_size`.
    pub header_size: u32,
    /// `channel_count`.
    pub channel_count: u32,
    /// `entry_size`.
    pub entry_size: u32,
    /// `ring_size`.
    pub ring_size: u32,
    /// `directory_offset`.
    pub directory_offset: u64,
    /// `rings_offset`.
    pub rings_offset: u64,
    /// `ring_control_size`.
    pub ring_control_size: u32,
    /// `flags`.
    pub flags: u32,
}

fn expect(field: &'static str, value: u64, wanted: u64) -> Result<(), LayoutError> {
    if value == wanted {
        Ok(())
    } else {
        Err(LayoutError::BadField {
            field,
            value,
            expected: wanted.to_string(),
        })
    }
}

impl Geometry {
    /// Checks the channel count and ring size against version 1's limits.
    pub fn check(self) -> Result<Geometry, LayoutError> {
        if !(CHANNELS_MIN..=CHANNELS_MAX).contains(&self.channels) {
            return Err(LayoutError::BadField {
                field: "channel_count",
                value: self.channels.into(),
                expected: format!("{CHANNELS_MIN}..={CHANNELS_MAX}"),
            });
        }
        if !self.ring_size.is_power_of_two()
            || !(RING_SIZE_MIN..=RING_SIZE_MAX).contains(&self.ring_size)
        {
            return Err(LayoutError::BadField {
                field: "ring_size",
                value: self.ring_size.into(),
                expected: format!("a power of two in {RING_SIZE_MIN}..={RING_SIZE_MAX}"),
            });
        }
        Ok(self)
    }

    /// Offset of the first ring.
    pub fn rings_offset(self) -> u64 {
        let dir_end = u64::from(HEADER_SIZE) + u64::from(self.channels) * u64::from(ENTRY_SIZE);
        dir_end.div_ceil(RINGS_ALIGN) * RINGS_ALIGN
    }

    /// Bytes of one ring: control block and data.
    pub fn ring_stride(self) -> u64 {
        u64::from(RING_CONTROL_SIZE) + u64::from(self.ring_size)
    }

    /// Bytes from the region start to the end of the last ring.
    pub fn layout_size(self) -> u64 {
        self.rings_offset() + u64::from(self.channels) * 2 * self.ring_stride()
    }

    /// Offset of directory entry `index`.
    pub fn entry_offset(self, index: u32) -> u64 {
        u64::from(HEADER_SIZE) + u64::from(index) * u64::from(ENTRY_SIZE)
    }

    /// Offset of the control block of entry `index`'s A→B ring (`b_to_a` false) or B→A ring.
    pub fn ring_offset(self, index: u32, b_to_a: bool) -> u64 {
        self.rings_offset() + (2 * u64::from(index) + u64::from(b_to_a)) * self.ring_stride()
    }

    /// The largest message of this region's rings.
    pub fn max_message(self) -> u32 {
        max_message(self.ring_size)
    }

    /// The header a formatter writes for this geometry.
    pub fn header(self) -> RawHeader {
        RawHeader {
            magic: MAGIC,
            version: VERSION,
            layout_size: self.layout_size(),
            header_size: HEADER_SIZE,
            channel_count: self.channels,
            entry_size: ENTRY_SIZE,
            ring_size: self.ring_size,
            directory_offset: u64::from(HEADER_SIZE),
            rings_offset: self.rings_offset(),
            ring_control_size: RING_CONTROL_SIZE,
            flags: 0,
        }
    }

    /// The largest geometry with `channels` channels whose layout fits `region_size` bytes, with
    /// rings of at most `ring_size_max` bytes; `None` if not even the smallest rings fit.
    pub fn fit(region_size: u64, channels: u32, ring_size_max: u32) -> Option<Geometry> {
        let mut ring_size = ring_size_max.clamp(RING_SIZE_MIN, RING_SIZE_MAX);
        if !ring_size.is_power_of_two() {
            ring_size = ring_size.next_power_of_two() / 2;
        }
        loop {
            let g = Geometry {
                channels,
                ring_size,
            }
            .check()
            .ok()?;
            if g.layout_size() <= region_size {
                return Some(g);
            }
            if ring_size == RING_SIZE_MIN {
                return None;
            }
            ring_size /= 2;
        }
    }

    /// Validates a header read from a region of `region_size` bytes: every field is checked
    /// against what version 1 computes from `channel_count` and `ring_size`.
    pub fn validate(h: &RawHeader, region_size: u64) -> Result<Geometry, LayoutError> {
        if h.magic != MAGIC {
            return Err(LayoutError::BadMagic { found: h.magic });
        }
        if h.version != VERSION {
            return Err(LayoutError::UnsupportedVersion { found: h.version });
        }
        let g = Geometry {
            channels: h.channel_count,
            ring_size: h.ring_size,
        }
        .check()?;
        let want = g.header();
        expect("header_size", h.header_size.into(), want.header_size.into())?;
        expect("entry_size", h.entry_size.into(), want.entry_size.into())?;
        expect(
            "directory_offset",
            h.directory_offset,
            want.directory_offset,
        )?;
        expect("rings_offset", h.rings_offset, want.rings_offset)?;
        expect(
            "ring_control_size",
            h.ring_control_size.into(),
            want.ring_control_size.into(),
        )?;
        expect("flags", h.flags.into(), 0)?;
        expect("layout_size", h.layout_size, want.layout_size)?;
        if want.layout_size > region_size {
            return Err(LayoutError::TooSmall {
                needed: want.layout_size,
                size: region_size,
            });
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_sizes() {
        assert_eq!(record_size(1), 64);
        assert_eq!(record_size(56), 64);
        assert_eq!(record_size(57), 128);
        assert_eq!(record_size(64), 128);
        assert_eq!(record_size(65), 192);
        assert_eq!(record_size(max_message(4096)), 4096);
        assert_eq!(payload_offset(56), 8);
        assert_eq!(payload_offset(57), 64);
    }

    #[test]
    fn need_event_is_virtios() {
        assert!(need_event(0, 64, 0));
        assert!(!need_event(64, 64, 0));
        assert!(need_event(64, 192, 64));
        assert!(!need_event(EVENT_NONE, 64, 0));
        // Across the 2^32 wrap.
        assert!(need_event(u32::MAX - 63, 0, u32::MAX - 63));
    }

    #[test]
    fn side_words_round_trip() {
        let w = side_word(SIDE_ATTACHED, 0xbeef, 7);
        assert_eq!(side_parts(w), (SIDE_ATTACHED, 0xbeef, 7));
        assert_eq!(side_parts(0xf000_0000).0, 0xf0);
    }

    #[test]
    fn geometry_fits_and_validates() {
        let g = Geometry::fit(4 << 20, 64, 1 << 20).unwrap();
        assert_eq!(g.channels, 64);
        assert!(g.layout_size() <= 4 << 20);
        assert_eq!(g.ring_size, 16 << 10);
        assert_eq!(Geometry::validate(&g.header(), 4 << 20), Ok(g));
        assert_eq!(g.rings_offset() % RINGS_ALIGN, 0);
        let mut h = g.header();
        h.version = 2;
        assert_eq!(
            Geometry::validate(&h, 4 << 20),
            Err(LayoutError::UnsupportedVersion { found: 2 })
        );
        let mut h = g.header();
        h.rings_offset += 64;
        assert!(matches!(
            Geometry::validate(&h, 4 << 20),
            Err(LayoutError::BadField {
                field: "rings_offset",
                ..
            })
        ));
        assert!(matches!(
            Geometry::validate(&g.header(), 4096),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(Geometry::fit(4096, 64, 1 << 20).is_none());
    }
}
