//! One ring: a single producer and a single consumer of variable-length records.
//!
//! Each side keeps the ring's geometry and its own position privately; the only values read
//! from shared memory are the other side's words (`tail` for the producer; a record's `seq` and
//! `len` for the consumer, and the event words), each read once into a local and validated
//! before use. See `docs/channel-spec.md` ("Sending and receiving") for the protocol; the
//! memory orderings below are the ones it prescribes.
//!
//! The fast path is short on purpose (it is most of the cost of a message between two CPUs
//! that poll): the ring's memory is a [`RingMem`], bounds-checked once, whose addresses are
//! masked positions; a send is the invalidation of the next header (usually done ahead, see
//! [`Producer`]), the payload copy, two header stores and the event check; a receive is two
//! header loads, the copy out, the `tail` store and the event check. Nothing allocates.

use std::mem::MaybeUninit;

use crate::error::Corruption;
use crate::layout::{
    max_message, need_event, payload_offset, record_size, seq_of, RECORD_ALIGN, REC_LEN, REC_SEQ,
    R_DATA_EVENT, R_SPACE_EVENT, R_TAIL,
};
use crate::shm::RingMem;
use crate::sync::{fence, Ordering};

/// How far ahead of its position the producer invalidates record headers at once, in bytes
/// (see [`Producer`]).
const CLEAN_AHEAD: u32 = 1024;

/// Puts a freshly allocated ring in its initial state: nothing published, nothing consumed, no
/// events asked for, the record header at position 0 invalid.
pub(crate) fn init(mem: &RingMem) {
    mem.store_control(R_TAIL, 0, Ordering::Relaxed);
    mem.store_control(R_DATA_EVENT, crate::layout::EVENT_NONE, Ordering::Relaxed);
    mem.store_control(R_SPACE_EVENT, crate::layout::EVENT_NONE, Ordering::Relaxed);
    mem.store_record(0, REC_SEQ, 0, Ordering::Relaxed);
}

/// The producing side of a ring.
///
/// **Invalidating ahead.** Before a record is published, the `seq` word at the position right
/// after it must not read as "published" (it may hold stale bytes of an earlier lap: a payload
/// can contain anything). Storing 0 there with every record would write one more cache line per
/// message just before the publishing store, which then waits for it. Instead the producer
/// zeroes the `seq` words of every 64-byte slot in the free space up to [`CLEAN_AHEAD`] bytes
/// ahead, after publishing, and remembers how far it got (`clean`): a slot in `pos..clean` was
/// zeroed after our last write to it and nothing has been written there since (records are
/// written in order at `pos` and beyond, and only up to their own end), so a later record ending
/// there needs no store. The spec allows this ("at the latest before publishing").
#[derive(Debug)]
pub(crate) struct Producer {
    mem: RingMem,
    /// Our position: bytes of records published (mod 2^32).
    pos: u32,
    /// The consumer's `tail` as last read and validated (never ahead of the real one).
    cached_tail: u32,
    /// Record slots in `pos..clean` have an invalidated `seq` (see above); `clean - pos` is at
    /// most the free space.
    clean: u32,
}

/// A published record that the consumer asked to be told about.
pub(crate) type Notify = bool;

impl Producer {
    /// The producer of a freshly initialised ring.
    pub(crate) fn new(mem: RingMem) -> Producer {
        Producer {
            mem,
            pos: 0,
            cached_tail: 0,
            // `init` invalidated the slot at 0.
            clean: RECORD_ALIGN,
        }
    }

    /// The ring's largest message.
    #[inline]
    pub(crate) fn max_message(&self) -> u32 {
        max_message(self.mem.size())
    }

    #[inline(always)]
    fn used(&self) -> u32 {
        self.pos.wrapping_sub(self.cached_tail)
    }

    #[inline(always)]
    fn fits(&self, record: u32) -> bool {
        // used <= size <= 2^30 and record <= size: no overflow.
        self.used() + record <= self.mem.size()
    }

    /// Reads the consumer's `tail` once and validates it: a multiple of 64 between the last
    /// value we saw and our position.
    #[cold]
    #[inline(never)]
    fn refresh_tail(&mut self) -> Result<(), Corruption> {
        let tail = self.mem.load_control(R_TAIL, Ordering::Acquire);
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

    /// Makes room for a record of `record` bytes: true if it fits (reading `tail` only when the
    /// cached copy says it does not).
    #[inline(always)]
    fn room(&mut self, record: u32) -> Result<bool, Corruption> {
        if self.fits(record) {
            return Ok(true);
        }
        self.refresh_tail()?;
        Ok(self.fits(record))
    }

    /// Reserves the next record for a `len`-byte message (1..=max_message, checked by the
    /// caller) if it fits: `Ok(None)` when the ring is full. Nothing is visible to the consumer
    /// until [`Producer::commit`]; the payload is written with [`Producer::write`] meanwhile.
    #[inline(always)]
    pub(crate) fn reserve(&mut self, len: u32) -> Result<Option<Slot>, Corruption> {
        debug_assert!(len >= 1 && len <= self.max_message());
        let record = record_size(len);
        if !self.room(record)? {
            return Ok(None);
        }
        Ok(Some(Slot {
            pos: self.pos,
            len,
            payload: self.pos.wrapping_add(payload_offset(len)),
        }))
    }

    /// Copies `src` into `slot`'s payload at byte `offset` (the caller checks `offset +
    /// src.len() <= slot.len`).
    #[inline(always)]
    pub(crate) fn write(&self, slot: &Slot, offset: u32, src: &[u8]) -> Result<(), Corruption> {
        debug_assert!(offset as usize + src.len() <= slot.len as usize);
        Ok(self.mem.write(slot.payload.wrapping_add(offset), src)?)
    }

    /// Publishes `slot` (the one [`Producer::reserve`] returned, its payload written) and says
    /// whether the consumer asked to be rung.
    #[inline(always)]
    pub(crate) fn commit(&mut self, slot: &Slot) -> Notify {
        let old = slot.pos;
        debug_assert_eq!(old, self.pos);
        let next = old.wrapping_add(record_size(slot.len));
        let free_end = self.cached_tail.wrapping_add(self.mem.size());
        // The slot after this record must not look published. If it is the oldest unconsumed
        // record (the ring is full after this one), its `seq` is already `next - size + 1`.
        if self.clean.wrapping_sub(old) <= next.wrapping_sub(old) && next != free_end {
            self.mem.store_record(next, REC_SEQ, 0, Ordering::Relaxed);
            self.clean = next.wrapping_add(RECORD_ALIGN);
        }
        self.mem
            .store_record(old, REC_LEN, slot.len, Ordering::Relaxed);
        // Publish: the payload and `len` happen-before a consumer's acquire load of `seq`.
        self.mem
            .store_record(old, REC_SEQ, seq_of(old), Ordering::Release);
        self.pos = next;
        // Full fence between publishing and reading the consumer's event (the consumer has the
        // mirror image): either it sees our record, or we see its event and ring.
        fence(Ordering::SeqCst);
        let event = self.mem.load_control(R_DATA_EVENT, Ordering::Relaxed);
        self.clean_ahead(free_end);
        need_event(event, next, old)
    }

    /// Invalidates the slots ahead (see [`Producer`]), after the publishing store so that it
    /// does not wait for them, in batches of [`CLEAN_AHEAD`] bytes.
    #[inline(always)]
    fn clean_ahead(&mut self, free_end: u32) {
        // Slots clean beyond pos (pos itself is clean if clean - pos >= 64).
        let clean = self.clean.wrapping_sub(self.pos);
        if clean > RECORD_ALIGN && clean <= CLEAN_AHEAD {
            return;
        }
        self.clean_batch(free_end);
    }

    #[inline(never)]
    fn clean_batch(&mut self, free_end: u32) {
        let free = free_end.wrapping_sub(self.pos);
        let mut from = self.clean.wrapping_sub(self.pos);
        if from > free {
            // `clean` fell behind `pos` (a record jumped past it): start at `pos`.
            from = 0;
        }
        let until = free.min(from.max(RECORD_ALIGN) + CLEAN_AHEAD);
        let mut at = from;
        while at < until {
            self.mem
                .store_record(self.pos.wrapping_add(at), REC_SEQ, 0, Ordering::Relaxed);
            at += RECORD_ALIGN;
        }
        self.clean = self.pos.wrapping_add(at);
    }

    /// Gives up `slot` without publishing it. Its payload bytes may have overwritten slots we
    /// had invalidated ahead: only the slot at our position (whose `seq` word a payload never
    /// covers) stays clean.
    pub(crate) fn cancel(&mut self, slot: &Slot) {
        debug_assert_eq!(slot.pos, self.pos);
        if self.clean.wrapping_sub(self.pos) > RECORD_ALIGN {
            self.clean = self.pos.wrapping_add(RECORD_ALIGN);
        }
    }

    /// Before sleeping on a full ring: asks the consumer to ring when enough space for a
    /// `len`-byte message is free, then looks again. `Ok(true)`: it fits now, do not sleep.
    pub(crate) fn arm_space(&mut self, len: u32) -> Result<bool, Corruption> {
        let record = record_size(len);
        // The tail value at which the record fits; ring me when tail moves past need - 1.
        let need = self.pos.wrapping_add(record).wrapping_sub(self.mem.size());
        self.mem
            .store_control(R_SPACE_EVENT, need.wrapping_sub(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.refresh_tail()?;
        Ok(self.fits(record))
    }
}

/// A record reserved by the producer, not yet published.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Ring position of the record.
    pos: u32,
    /// Payload bytes.
    pub(crate) len: u32,
    /// Ring position of the payload.
    payload: u32,
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
    mem: RingMem,
    /// Our position: bytes consumed (mod 2^32); the shared `tail` is only ever written from it.
    pos: u32,
}

impl Consumer {
    /// The consumer of a freshly initialised ring.
    pub(crate) fn new(mem: RingMem) -> Consumer {
        Consumer { mem, pos: 0 }
    }

    /// The next record, if published: `seq` and `len` read once each and validated.
    #[inline(always)]
    pub(crate) fn peek(&self) -> Result<Option<Record>, Corruption> {
        let seq = self.mem.load_record(self.pos, REC_SEQ, Ordering::Acquire);
        if seq != seq_of(self.pos) {
            return Ok(None);
        }
        let len = self.mem.load_record(self.pos, REC_LEN, Ordering::Relaxed);
        let max = max_message(self.mem.size());
        if len.wrapping_sub(1) >= max {
            return Err(self.bad_length(len));
        }
        Ok(Some(Record {
            len,
            payload: self.pos.wrapping_add(payload_offset(len)),
            size: record_size(len),
        }))
    }

    #[cold]
    fn bad_length(&self, len: u32) -> Corruption {
        Corruption::RecordLength {
            position: self.pos,
            len,
            max: max_message(self.mem.size()),
        }
    }

    /// Copies `dst.len()` bytes of `record`'s payload from byte `offset` (the caller checks
    /// `offset + dst.len() <= record.len`).
    #[inline(always)]
    pub(crate) fn read(
        &self,
        record: &Record,
        offset: u32,
        dst: &mut [u8],
    ) -> Result<(), Corruption> {
        debug_assert!(offset as usize + dst.len() <= record.len as usize);
        Ok(self.mem.read(record.payload.wrapping_add(offset), dst)?)
    }

    /// Copies the whole payload of `record` into `dst` (`record.len` bytes), initialising it.
    #[inline(always)]
    pub(crate) fn read_uninit(
        &self,
        record: &Record,
        dst: &mut [MaybeUninit<u8>],
    ) -> Result<(), Corruption> {
        debug_assert!(dst.len() <= record.len as usize);
        Ok(self.mem.read_uninit(record.payload, dst)?)
    }

    /// Frees `record` (the one [`Consumer::peek`] returned): publishes the new `tail` and says
    /// whether the producer asked to be rung.
    #[inline(always)]
    pub(crate) fn release(&mut self, record: &Record) -> Notify {
        let old = self.pos;
        self.pos = old.wrapping_add(record.size);
        // Release: our reads of the record happen-before the producer reuses its bytes.
        self.mem.store_control(R_TAIL, self.pos, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = self.mem.load_control(R_SPACE_EVENT, Ordering::Relaxed);
        need_event(event, self.pos, old)
    }

    /// Before sleeping on an empty ring: asks the producer to ring at the next record, then
    /// looks again. `Ok(true)`: a record is there now, do not sleep.
    pub(crate) fn arm_data(&self) -> Result<bool, Corruption> {
        self.mem
            .store_control(R_DATA_EVENT, self.pos, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(self.peek()?.is_some())
    }
}
