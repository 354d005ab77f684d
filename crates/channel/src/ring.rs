//! One ring: a single producer and a single consumer of variable-length records.
//!
//! Each side keeps the ring's geometry and its own position privately; the only values read
//! from shared memory are the other side's words (`tail` for the producer; a record's `seq` and
//! `len` for the consumer, and the event words), each read once into a local and validated
//! before use. See `docs/channel-spec.md` ("Rings") for the protocol; the memory orderings
//! below are the ones it prescribes.

use crate::error::Corruption;
use crate::layout::{
    max_message, need_event, payload_offset, record_size, seq_of, RECORD_ALIGN, REC_LEN, REC_SEQ,
    RING_CONTROL_SIZE, R_DATA_EVENT, R_SPACE_EVENT, R_TAIL,
};
use crate::shm::Shm;
use crate::sync::{fence, Ordering};

/// Where a ring lives, computed from the validated region geometry (never re-read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingGeometry {
    /// Offset of the control block in the region.
    control: usize,
    /// Offset of the data area in the region.
    data: usize,
    /// Data bytes, a power of two.
    size: u32,
}

impl RingGeometry {
    /// The ring whose control block is at `control` with `size` data bytes (from a validated
    /// [`crate::layout::Geometry`], so that the whole ring is inside the region).
    pub(crate) fn new(control: usize, size: u32) -> RingGeometry {
        RingGeometry {
            control,
            data: control + RING_CONTROL_SIZE as usize,
            size,
        }
    }

    /// The largest message.
    pub(crate) fn max_message(&self) -> u32 {
        max_message(self.size)
    }

    fn mask(&self) -> u32 {
        self.size - 1
    }

    /// Offset in the region of the byte at ring position `pos` (+ `extra` bytes, within a
    /// record header).
    fn at(&self, pos: u32, extra: usize) -> usize {
        self.data + (pos & self.mask()) as usize + extra
    }

    /// Puts a freshly allocated ring in its initial state: nothing published, nothing consumed,
    /// no events asked for, the record header at position 0 invalid.
    pub(crate) fn init(&self, shm: &Shm) -> Result<(), Corruption> {
        shm.store(self.control + R_TAIL, 0, Ordering::Relaxed)?;
        shm.store(
            self.control + R_DATA_EVENT,
            crate::layout::EVENT_NONE,
            Ordering::Relaxed,
        )?;
        shm.store(
            self.control + R_SPACE_EVENT,
            crate::layout::EVENT_NONE,
            Ordering::Relaxed,
        )?;
        shm.store(self.at(0, REC_SEQ), 0, Ordering::Relaxed)?;
        Ok(())
    }

    /// Copies `dst.len()` bytes starting at ring position `pos` out, wrapping at the end.
    fn copy_out(&self, shm: &Shm, pos: u32, dst: &mut [u8]) -> Result<(), Corruption> {
        let off = (pos & self.mask()) as usize;
        let first = dst.len().min(self.size as usize - off);
        let (a, b) = dst.split_at_mut(first);
        shm.read(self.data + off, a)?;
        if !b.is_empty() {
            shm.read(self.data, b)?;
        }
        Ok(())
    }

    /// Copies `src` in at ring position `pos`, wrapping at the end.
    fn copy_in(&self, shm: &Shm, pos: u32, src: &[u8]) -> Result<(), Corruption> {
        let off = (pos & self.mask()) as usize;
        let first = src.len().min(self.size as usize - off);
        let (a, b) = src.split_at(first);
        shm.write(self.data + off, a)?;
        if !b.is_empty() {
            shm.write(self.data, b)?;
        }
        Ok(())
    }
}

/// The producing side of a ring.
#[derive(Debug)]
pub(crate) struct Producer {
    geo: RingGeometry,
    /// Our position: bytes of records published (mod 2^32).
    pos: u32,
    /// The consumer's `tail` as last read and validated (never ahead of the real one).
    cached_tail: u32,
}

/// A published record that the consumer asked to be told about.
pub(crate) type Notify = bool;

impl Producer {
    /// The producer of a freshly initialised ring.
    pub(crate) fn new(geo: RingGeometry) -> Producer {
        Producer {
            geo,
            pos: 0,
            cached_tail: 0,
        }
    }

    /// The ring's largest message.
    pub(crate) fn max_message(&self) -> u32 {
        self.geo.max_message()
    }

    fn used(&self) -> u32 {
        self.pos.wrapping_sub(self.cached_tail)
    }

    /// Reads the consumer's `tail` once and validates it: a multiple of 64 between the last
    /// value we saw and our position.
    fn refresh_tail(&mut self, shm: &Shm) -> Result<(), Corruption> {
        let tail = shm.load(self.geo.control + R_TAIL, Ordering::Acquire)?;
        if tail % RECORD_ALIGN != 0 {
            return Err(Corruption::TailMisaligned { tail });
        }
        if tail.wrapping_sub(self.cached_tail) > self.used() {
            return Err(Corruption::TailOutOfRange {
                old: self.cached_tail,
                new: tail,
                head: self.pos,
            });
        }
        self.cached_tail = tail;
        Ok(())
    }

    fn fits(&self, record: u32) -> bool {
        // used <= size <= 2^30 and record <= size: no overflow.
        self.used() + record <= self.geo.size
    }

    /// Publishes `msg` (1..=max_message bytes, checked by the caller) if it fits: `Ok(None)`
    /// when the ring is full, else whether the consumer asked to be rung.
    pub(crate) fn try_send(&mut self, shm: &Shm, msg: &[u8]) -> Result<Option<Notify>, Corruption> {
        debug_assert!(!msg.is_empty() && msg.len() <= self.max_message() as usize);
        let len = msg.len() as u32;
        let record = record_size(len);
        if !self.fits(record) {
            self.refresh_tail(shm)?;
            if !self.fits(record) {
                return Ok(None);
            }
        }
        let old = self.pos;
        let next = old.wrapping_add(record);
        // Invalidate the next record's header, unless that place is the oldest unconsumed
        // record (ring full after this one): there, the old `seq` does not match `next`.
        if next.wrapping_sub(self.cached_tail) < self.geo.size {
            shm.store(self.geo.at(next, REC_SEQ), 0, Ordering::Relaxed)?;
        }
        // Payload first, then the header words back to back: the consumer polls the header
        // line, and two separate writes to it would each have to take the line back.
        self.geo
            .copy_in(shm, old.wrapping_add(payload_offset(len)), msg)?;
        shm.store(self.geo.at(old, REC_LEN), len, Ordering::Relaxed)?;
        // Publish: everything above happens-before a consumer's acquire load of `seq`.
        shm.store(self.geo.at(old, REC_SEQ), seq_of(old), Ordering::Release)?;
        self.pos = next;
        // Full fence between publishing and reading the consumer's event (the consumer has the
        // mirror image): either it sees our record, or we see its event and ring.
        fence(Ordering::SeqCst);
        let event = shm.load(self.geo.control + R_DATA_EVENT, Ordering::Relaxed)?;
        Ok(Some(need_event(event, next, old)))
    }

    /// Before sleeping on a full ring: asks the consumer to ring when enough space for a
    /// `len`-byte message is free, then looks again. `Ok(true)`: it fits now, do not sleep.
    pub(crate) fn arm_space(&mut self, shm: &Shm, len: u32) -> Result<bool, Corruption> {
        let record = record_size(len);
        // The tail value at which the record fits; ring me when tail moves past need - 1.
        let need = self.pos.wrapping_add(record).wrapping_sub(self.geo.size);
        shm.store(
            self.geo.control + R_SPACE_EVENT,
            need.wrapping_sub(1),
            Ordering::Relaxed,
        )?;
        fence(Ordering::SeqCst);
        self.refresh_tail(shm)?;
        Ok(self.fits(record))
    }
}

/// A validated record the consumer found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    /// Payload bytes.
    pub(crate) len: u32,
    /// Ring position of the payload.
    payload: u32,
    /// Ring bytes the record takes.
    size: u32,
}

/// The consuming side of a ring.
#[derive(Debug)]
pub(crate) struct Consumer {
    geo: RingGeometry,
    /// Our position: bytes consumed (mod 2^32); the shared `tail` is only ever written from it.
    pos: u32,
}

impl Consumer {
    /// The consumer of a freshly initialised ring.
    pub(crate) fn new(geo: RingGeometry) -> Consumer {
        Consumer { geo, pos: 0 }
    }

    /// The next record, if published: `seq` and `len` read once each and validated.
    pub(crate) fn peek(&self, shm: &Shm) -> Result<Option<Record>, Corruption> {
        let seq = shm.load(self.geo.at(self.pos, REC_SEQ), Ordering::Acquire)?;
        if seq != seq_of(self.pos) {
            return Ok(None);
        }
        let len = shm.load(self.geo.at(self.pos, REC_LEN), Ordering::Relaxed)?;
        let max = self.geo.max_message();
        if len == 0 || len > max {
            return Err(Corruption::RecordLength {
                position: self.pos,
                len,
                max,
            });
        }
        Ok(Some(Record {
            len,
            payload: self.pos.wrapping_add(payload_offset(len)),
            size: record_size(len),
        }))
    }

    /// Copies `dst.len()` bytes of `record`'s payload from byte `offset` (the caller checks
    /// `offset + dst.len() <= record.len`).
    pub(crate) fn read(
        &self,
        shm: &Shm,
        record: &Record,
        offset: u32,
        dst: &mut [u8],
    ) -> Result<(), Corruption> {
        debug_assert!(offset as usize + dst.len() <= record.len as usize);
        self.geo
            .copy_out(shm, record.payload.wrapping_add(offset), dst)
    }

    /// Frees `record` (the one [`Consumer::peek`] returned): publishes the new `tail` and says
    /// whether the producer asked to be rung.
    pub(crate) fn release(&mut self, shm: &Shm, record: &Record) -> Result<Notify, Corruption> {
        let old = self.pos;
        self.pos = old.wrapping_add(record.size);
        // Release: our reads of the record happen-before the producer reuses its bytes.
        shm.store(self.geo.control + R_TAIL, self.pos, Ordering::Release)?;
        fence(Ordering::SeqCst);
        let event = shm.load(self.geo.control + R_SPACE_EVENT, Ordering::Relaxed)?;
        Ok(need_event(event, self.pos, old))
    }

    /// Before sleeping on an empty ring: asks the producer to ring at the next record, then
    /// looks again. `Ok(true)`: a record is there now, do not sleep.
    pub(crate) fn arm_data(&self, shm: &Shm) -> Result<bool, Corruption> {
        shm.store(self.geo.control + R_DATA_EVENT, self.pos, Ordering::Relaxed)?;
        fence(Ordering::SeqCst);
        Ok(self.peek(shm)?.is_some())
    }
}
