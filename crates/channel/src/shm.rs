//! The only code that touches the shared memory of a channel region (audited).
//!
//! [`Shm`] is a base address and a length. It never hands out a Rust reference, slice or
//! `&mut` into the region: every access is either a 32-bit atomic on an aligned word (built
//! for the duration of one operation with `AtomicU32::from_ptr`, as `ivshm-mem`'s
//! `SharedView::atomic_u32` does) or a raw copy between the region and a private buffer of the
//! caller (`ptr::copy_nonoverlapping`). Every access is bounds-checked against the length, so a
//! wrong offset is an error, never an access outside the region.
//!
//! Why not `ivshm_mem::SharedView` for everything: its byte copies are volatile loops, one byte
//! per access (~1–2 GB/s), while a channel must move payloads at `memcpy` speed. The payload
//! copy here is a plain `memcpy` from raw pointers into memory we own: the region's bytes may
//! change during the copy (another process or VM writes them), which can only put arbitrary
//! byte values into our private buffer (every `u8` is valid), and the source is never read
//! again for that data: every value the protocol depends on (lengths, positions, states) is
//! read with one atomic load into a local. `SharedView` is still what a region is built from
//! ([`crate::RegionMemory`]): it carries the address, length and lifetime of a mapping.
//!
//! **Hot-path accessors.** [`Shm::word`] and [`Shm::ring`] check bounds once, when a channel is
//! opened, and give a [`Word`] (one side word) and a [`RingMem`] (one ring's control block and
//! data area) whose accesses need no check: a `RingMem` computes every address from a position
//! masked with the ring size and a field offset masked into its block, so no argument can make
//! it leave the ring. They are copies of the `Shm` they come from, valid as long as it is.
//!
//! Multi-byte fields are little-endian in the region: atomics convert with `to_le`/`from_le`
//! (free on little-endian machines).
//!
//! With `--cfg loom` the same interface is backed by a model: one loom `AtomicU32` per 4-byte
//! word (created on first use), and byte copies done as relaxed loads and stores of those words,
//! so that loom explores what a reader may see of data written by another thread.

use ivshm_mem::OutOfBounds;

use crate::sync::Ordering;

use std::mem::MaybeUninit;

use crate::layout::{RECORD_ALIGN, RING_CONTROL_SIZE};

#[cfg(not(loom))]
pub(crate) use real::{RingMem, Shm, Word};

#[cfg(loom)]
pub(crate) use model::Shm;
#[cfg(loom)]
pub(crate) use model_views::{RingMem, Word};

/// Offset in a ring's control block of the word at `field`, kept inside the block and 4-byte
/// aligned whatever `field` is (the callers pass the layout's constants).
#[inline(always)]
fn control_offset(field: usize) -> usize {
    debug_assert!(field % 4 == 0 && field < RING_CONTROL_SIZE as usize);
    field & (RING_CONTROL_SIZE as usize - 4)
}

/// Offset in a ring's data area of the word at `field` (0..64) of the record at position `pos`:
/// inside the area and 4-byte aligned whatever the arguments (`size` is a power of two, at
/// least 128).
#[inline(always)]
fn record_offset(size: u32, pos: u32, field: usize) -> usize {
    debug_assert!(pos % RECORD_ALIGN == 0 && field % 4 == 0 && field < RECORD_ALIGN as usize);
    (pos & (size - 1) & !(RECORD_ALIGN - 1)) as usize + (field & (RECORD_ALIGN as usize - 4))
}

/// Where `len` bytes from ring position `pos` lie in a data area of `size` bytes: the offset of
/// the first byte and how many bytes come before the wrap. `None` if `len > size`.
#[inline(always)]
fn span(size: u32, pos: u32, len: usize) -> Option<(usize, usize)> {
    if len > size as usize {
        return None;
    }
    let off = (pos & (size - 1)) as usize;
    Some((off, len.min(size as usize - off)))
}

/// Checks that a ring with its control block at `control` and `size` data bytes lies inside
/// `len` bytes and is 64-byte aligned; `size` must be a power of two of at least 128.
fn check_ring(control: usize, size: u32, len: usize) -> Result<(), OutOfBounds> {
    let bytes = RING_CONTROL_SIZE as usize + size as usize;
    if !size.is_power_of_two() || size < 2 * RECORD_ALIGN {
        return Err(out_of_bounds(control, bytes, len));
    }
    check(control, bytes, RECORD_ALIGN as usize, len)
}

fn out_of_bounds(offset: usize, len: usize, size: usize) -> OutOfBounds {
    OutOfBounds { offset, len, size }
}

/// Checks that `offset..offset+len` lies inside `size` bytes and that `offset` is a multiple of
/// `align`.
fn check(offset: usize, len: usize, align: usize, size: usize) -> Result<(), OutOfBounds> {
    match offset.checked_add(len) {
        Some(end) if end <= size && offset % align == 0 => Ok(()),
        _ => Err(out_of_bounds(offset, len, size)),
    }
}

#[cfg(not(loom))]
mod real {
    use super::*;
    use crate::sync::AtomicU32;

    /// A region's memory: base address and length (see the module documentation).
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Shm {
        base: *mut u8,
        len: usize,
    }

    // SAFETY: `Shm` is an address and a length; every access through it is atomic or a raw copy
    // into private memory, which is sound from any thread.
    unsafe impl Send for Shm {}
    // SAFETY: as above; `&Shm` only allows those accesses.
    unsafe impl Sync for Shm {}

    impl Shm {
        /// Wraps `len` bytes at `base`.
        ///
        /// # Safety
        /// `base..base+len` must stay mapped, readable and writable for as long as this value
        /// (or a copy) is used, `base` must be 4-byte aligned, and nothing may hold Rust
        /// references into the range.
        pub(crate) unsafe fn new(base: *mut u8, len: usize) -> Shm {
            Shm { base, len }
        }

        /// Bytes in the region.
        pub(crate) fn len(&self) -> usize {
            self.len
        }

        /// Runs `f` on the atomic word at `offset`.
        #[inline(always)]
        fn with_word<R>(
            &self,
            offset: usize,
            f: impl FnOnce(&AtomicU32) -> R,
        ) -> Result<R, OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            // SAFETY: `check` proved offset..offset+4 is inside the mapping (valid for reads and
            // writes while `self` is used, per `new`) and 4-byte aligned (base is 4-byte
            // aligned); an `AtomicU32` tolerates concurrent modification by other threads,
            // processes or VMs, and the reference does not outlive this call.
            let word = unsafe { AtomicU32::from_ptr(self.base.add(offset).cast::<u32>()) };
            Ok(f(word))
        }

        /// Atomic load of the little-endian u32 at `offset`.
        #[inline(always)]
        pub(crate) fn load(&self, offset: usize, order: Ordering) -> Result<u32, OutOfBounds> {
            self.with_word(offset, |w| u32::from_le(w.load(order)))
        }

        /// Atomic store of a little-endian u32 at `offset`.
        #[inline(always)]
        pub(crate) fn store(
            &self,
            offset: usize,
            value: u32,
            order: Ordering,
        ) -> Result<(), OutOfBounds> {
            self.with_word(offset, |w| w.store(value.to_le(), order))
        }

        /// Atomic compare-and-exchange (acquire-release) of the u32 at `offset`: `Ok(previous)`
        /// when it held `current` and now holds `new`, `Err(actual)` otherwise.
        pub(crate) fn compare_exchange(
            &self,
            offset: usize,
            current: u32,
            new: u32,
        ) -> Result<Result<u32, u32>, OutOfBounds> {
            self.with_word(offset, |w| {
                w.compare_exchange(
                    current.to_le(),
                    new.to_le(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .map(u32::from_le)
                .map_err(u32::from_le)
            })
        }

        /// Copies `dst.len()` bytes from `offset` into `dst`.
        #[inline(always)]
        pub(crate) fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
            check(offset, dst.len(), 1, self.len)?;
            // SAFETY: the source range is inside the mapping (`check`); `dst` is private memory
            // of the caller and cannot overlap the region (no reference into the region
            // exists). A concurrent writer can only make us copy arbitrary byte values, all
            // valid `u8`s; the source is not read again.
            unsafe {
                std::ptr::copy_nonoverlapping(self.base.add(offset), dst.as_mut_ptr(), dst.len());
            };
            Ok(())
        }

        /// Copies `src` into the region at `offset`.
        #[inline(always)]
        pub(crate) fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
            check(offset, src.len(), 1, self.len)?;
            // SAFETY: the destination range is inside the mapping (`check`) and writable;
            // `src` is the caller's private memory and cannot overlap it.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(offset), src.len());
            };
            Ok(())
        }

        /// Sets `len` bytes at `offset` to zero.
        pub(crate) fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
            check(offset, len, 1, self.len)?;
            // SAFETY: the range is inside the writable mapping (`check`).
            unsafe { std::ptr::write_bytes(self.base.add(offset), 0, len) };
            Ok(())
        }

        /// The word at `offset`, checked once (see the module documentation).
        pub(crate) fn word(&self, offset: usize) -> Result<Word, OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            // SAFETY: offset..offset+4 is inside the mapping (`check`).
            Ok(Word(unsafe { self.base.add(offset) }.cast()))
        }

        /// The ring whose control block is at `control`, with `size` data bytes (a power of two,
        /// at least 128), checked once to lie inside the region (see the module documentation).
        pub(crate) fn ring(&self, control: usize, size: u32) -> Result<RingMem, OutOfBounds> {
            check_ring(control, size, self.len)?;
            // SAFETY: the control block and the data area after it are inside the mapping
            // (`check_ring`).
            let ctl = unsafe { self.base.add(control) };
            Ok(RingMem {
                ctl,
                // SAFETY: as above; the data area starts right after the control block.
                data: unsafe { ctl.add(RING_CONTROL_SIZE as usize) },
                size,
            })
        }
    }

    /// One 32-bit word of a region, bounds-checked when made by [`Shm::word`]; valid as long as
    /// the `Shm` it came from.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Word(*mut u32);

    // SAFETY: an address inside a region whose accesses are all atomic (as `Shm`'s).
    unsafe impl Send for Word {}
    // SAFETY: as above.
    unsafe impl Sync for Word {}

    impl Word {
        #[inline(always)]
        fn atomic(&self) -> &AtomicU32 {
            // SAFETY: the word is inside the mapping (checked by `Shm::word`, which stays mapped
            // while this copy of it is used) and 4-byte aligned; an atomic tolerates concurrent
            // modification by other threads, processes or VMs; the reference lives for one
            // access.
            unsafe { AtomicU32::from_ptr(self.0) }
        }

        /// Atomic load.
        #[inline(always)]
        pub(crate) fn load(&self, order: Ordering) -> u32 {
            u32::from_le(self.atomic().load(order))
        }

        /// Atomic compare-and-exchange (acquire-release), as [`Shm::compare_exchange`].
        pub(crate) fn compare_exchange(&self, current: u32, new: u32) -> Result<u32, u32> {
            self.atomic()
                .compare_exchange(
                    current.to_le(),
                    new.to_le(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .map(u32::from_le)
                .map_err(u32::from_le)
        }
    }

    /// One ring's memory, bounds-checked when made by [`Shm::ring`]; valid as long as the `Shm`
    /// it came from. Every address is computed from a masked position or field (see the module
    /// documentation), so no argument can make an access leave the ring.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct RingMem {
        ctl: *mut u8,
        data: *mut u8,
        size: u32,
    }

    // SAFETY: addresses inside a region whose accesses are atomics or raw copies (as `Shm`'s).
    unsafe impl Send for RingMem {}
    // SAFETY: as above.
    unsafe impl Sync for RingMem {}

    impl RingMem {
        /// Data bytes.
        #[inline(always)]
        pub(crate) fn size(&self) -> u32 {
            self.size
        }

        #[inline(always)]
        fn control_word(&self, field: usize) -> &AtomicU32 {
            // SAFETY: `control_offset` keeps the word inside the control block, which is inside
            // the mapping (`Shm::ring`); 4-byte aligned (the block is 64-byte aligned); atomics
            // tolerate concurrent modification; the reference lives for one access.
            unsafe { AtomicU32::from_ptr(self.ctl.add(control_offset(field)).cast()) }
        }

        #[inline(always)]
        fn record_word(&self, pos: u32, field: usize) -> &AtomicU32 {
            // SAFETY: `record_offset` keeps the word inside the data area (as above).
            unsafe {
                AtomicU32::from_ptr(self.data.add(record_offset(self.size, pos, field)).cast())
            }
        }

        /// Atomic load of the control word at `field`.
        #[inline(always)]
        pub(crate) fn load_control(&self, field: usize, order: Ordering) -> u32 {
            u32::from_le(self.control_word(field).load(order))
        }

        /// Atomic store of the control word at `field`.
        #[inline(always)]
        pub(crate) fn store_control(&self, field: usize, value: u32, order: Ordering) {
            self.control_word(field).store(value.to_le(), order);
        }

        /// Atomic load of the word at `field` of the record at position `pos`.
        #[inline(always)]
        pub(crate) fn load_record(&self, pos: u32, field: usize, order: Ordering) -> u32 {
            u32::from_le(self.record_word(pos, field).load(order))
        }

        /// Atomic store of the word at `field` of the record at position `pos`.
        #[inline(always)]
        pub(crate) fn store_record(&self, pos: u32, field: usize, value: u32, order: Ordering) {
            self.record_word(pos, field).store(value.to_le(), order);
        }

        /// Copies `len` bytes from ring position `pos` (wrapping at the end of the data area) to
        /// `dst`; `len` must not exceed the ring size.
        ///
        /// # Safety
        /// `dst` must be valid for writes of `len` bytes and not inside the region.
        #[inline(always)]
        unsafe fn copy_out(&self, pos: u32, dst: *mut u8, len: usize) -> Result<(), OutOfBounds> {
            let (off, first) =
                span(self.size, pos, len).ok_or(out_of_bounds(0, len, self.size as usize))?;
            // SAFETY: `span` keeps both source ranges inside the data area (off + first <=
            // size, len - first <= size), which is inside the mapping; `dst` is valid for `len`
            // bytes and private (caller). A concurrent writer can only make us copy arbitrary
            // byte values, all valid `u8`s; the source is not read again.
            unsafe {
                std::ptr::copy_nonoverlapping(self.data.add(off), dst, first);
                if first < len {
                    std::ptr::copy_nonoverlapping(self.data, dst.add(first), len - first);
                }
            }
            Ok(())
        }

        /// Copies `dst.len()` bytes from ring position `pos` into `dst` (see `copy_out`).
        #[inline(always)]
        pub(crate) fn read(&self, pos: u32, dst: &mut [u8]) -> Result<(), OutOfBounds> {
            // SAFETY: `dst` is private memory of the caller, valid for its length.
            unsafe { self.copy_out(pos, dst.as_mut_ptr(), dst.len()) }
        }

        /// Copies `dst.len()` bytes from ring position `pos` into `dst`, initialising it.
        #[inline(always)]
        pub(crate) fn read_uninit(
            &self,
            pos: u32,
            dst: &mut [MaybeUninit<u8>],
        ) -> Result<(), OutOfBounds> {
            // SAFETY: as `read`; every byte of `dst` is written on success.
            unsafe { self.copy_out(pos, dst.as_mut_ptr().cast(), dst.len()) }
        }

        /// Copies `src` to ring position `pos`, wrapping at the end of the data area; `src` must
        /// not be longer than the ring.
        #[inline(always)]
        pub(crate) fn write(&self, pos: u32, src: &[u8]) -> Result<(), OutOfBounds> {
            let (off, first) = span(self.size, pos, src.len()).ok_or(out_of_bounds(
                0,
                src.len(),
                self.size as usize,
            ))?;
            // SAFETY: both destination ranges are inside the data area (`span`), writable;
            // `src` is private memory of the caller and cannot overlap the region.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(off), first);
                if first < src.len() {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr().add(first),
                        self.data,
                        src.len() - first,
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(loom)]
mod model {
    use super::model_views::{RingMem, Word};
    use super::*;
    use crate::sync::AtomicU32;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// The model of a region: one loom atomic per 4-byte word, created on first use (zero).
    #[derive(Debug, Clone)]
    pub(crate) struct Shm {
        len: usize,
        words: Arc<std::sync::Mutex<HashMap<usize, Arc<AtomicU32>>>>,
    }

    impl Shm {
        /// Real memory is not modelled: a zeroed model region of the same length.
        ///
        /// # Safety
        /// None needed (kept `unsafe` to match the real constructor).
        pub(crate) unsafe fn new(_base: *mut u8, len: usize) -> Shm {
            Shm::model(len)
        }

        /// A zeroed model region of `len` bytes.
        pub(crate) fn model(len: usize) -> Shm {
            Shm {
                len,
                words: Arc::default(),
            }
        }

        /// Bytes in the region.
        pub(crate) fn len(&self) -> usize {
            self.len
        }

        fn atomic(&self, offset: usize) -> Arc<AtomicU32> {
            let mut words = self.words.lock().unwrap_or_else(|e| e.into_inner());
            words
                .entry(offset)
                .or_insert_with(|| Arc::new(AtomicU32::new(0)))
                .clone()
        }

        pub(crate) fn load(&self, offset: usize, order: Ordering) -> Result<u32, OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            Ok(self.atomic(offset).load(order))
        }

        pub(crate) fn store(
            &self,
            offset: usize,
            value: u32,
            order: Ordering,
        ) -> Result<(), OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            self.atomic(offset).store(value, order);
            Ok(())
        }

        pub(crate) fn compare_exchange(
            &self,
            offset: usize,
            current: u32,
            new: u32,
        ) -> Result<Result<u32, u32>, OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            Ok(self.atomic(offset).compare_exchange(
                current,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ))
        }

        pub(crate) fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
            check(offset, dst.len(), 1, self.len)?;
            let mut i = 0;
            while i < dst.len() {
                let at = offset + i;
                let base = at & !3;
                let bytes = self.atomic(base).load(Ordering::Relaxed).to_le_bytes();
                let mut b = at - base;
                while b < 4 && i < dst.len() {
                    dst[i] = bytes[b];
                    b += 1;
                    i += 1;
                }
            }
            Ok(())
        }

        pub(crate) fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
            check(offset, src.len(), 1, self.len)?;
            let mut i = 0;
            while i < src.len() {
                let at = offset + i;
                let base = at & !3;
                let word = self.atomic(base);
                let first = at - base;
                let whole = first == 0 && src.len() - i >= 4;
                let mut bytes = if whole {
                    [0; 4]
                } else {
                    word.load(Ordering::Relaxed).to_le_bytes()
                };
                let mut b = first;
                while b < 4 && i < src.len() {
                    bytes[b] = src[i];
                    b += 1;
                    i += 1;
                }
                word.store(u32::from_le_bytes(bytes), Ordering::Relaxed);
            }
            Ok(())
        }

        pub(crate) fn word(&self, offset: usize) -> Result<Word, OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            Ok(Word {
                shm: self.clone(),
                offset,
            })
        }

        pub(crate) fn ring(&self, control: usize, size: u32) -> Result<RingMem, OutOfBounds> {
            check_ring(control, size, self.len)?;
            Ok(RingMem {
                shm: self.clone(),
                ctl: control,
                data: control + RING_CONTROL_SIZE as usize,
                size,
            })
        }

        pub(crate) fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
            check(offset, len, 1, self.len)?;
            let words = self.words.lock().unwrap_or_else(|e| e.into_inner());
            let touched: Vec<_> = words
                .iter()
                .filter(|(&o, _)| o + 4 > offset && o < offset + len)
                .map(|(_, w)| w.clone())
                .collect();
            drop(words);
            for w in touched {
                w.store(0, Ordering::Relaxed);
            }
            Ok(())
        }
    }
}

#[cfg(loom)]
mod model_views {
    use super::*;
    use crate::sync::Ordering;

    /// The model of one word (see the real `Word`).
    #[derive(Debug, Clone)]
    pub(crate) struct Word {
        pub(super) shm: super::model::Shm,
        pub(super) offset: usize,
    }

    impl Word {
        pub(crate) fn load(&self, order: Ordering) -> u32 {
            self.shm.load(self.offset, order).expect("checked word")
        }

        pub(crate) fn compare_exchange(&self, current: u32, new: u32) -> Result<u32, u32> {
            self.shm
                .compare_exchange(self.offset, current, new)
                .expect("checked word")
        }
    }

    /// The model of one ring's memory (see the real `RingMem`).
    #[derive(Debug, Clone)]
    pub(crate) struct RingMem {
        pub(super) shm: super::model::Shm,
        pub(super) ctl: usize,
        pub(super) data: usize,
        pub(super) size: u32,
    }

    impl RingMem {
        pub(crate) fn size(&self) -> u32 {
            self.size
        }

        pub(crate) fn load_control(&self, field: usize, order: Ordering) -> u32 {
            let at = self.ctl + control_offset(field);
            self.shm.load(at, order).expect("checked ring")
        }

        pub(crate) fn store_control(&self, field: usize, value: u32, order: Ordering) {
            let at = self.ctl + control_offset(field);
            self.shm.store(at, value, order).expect("checked ring");
        }

        pub(crate) fn load_record(&self, pos: u32, field: usize, order: Ordering) -> u32 {
            let at = self.data + record_offset(self.size, pos, field);
            self.shm.load(at, order).expect("checked ring")
        }

        pub(crate) fn store_record(&self, pos: u32, field: usize, value: u32, order: Ordering) {
            let at = self.data + record_offset(self.size, pos, field);
            self.shm.store(at, value, order).expect("checked ring");
        }

        pub(crate) fn read(&self, pos: u32, dst: &mut [u8]) -> Result<(), OutOfBounds> {
            let (off, first) = span(self.size, pos, dst.len()).ok_or(out_of_bounds(
                0,
                dst.len(),
                self.size as usize,
            ))?;
            let (a, b) = dst.split_at_mut(first);
            self.shm.read(self.data + off, a)?;
            self.shm.read(self.data, b)
        }

        pub(crate) fn read_uninit(
            &self,
            pos: u32,
            dst: &mut [MaybeUninit<u8>],
        ) -> Result<(), OutOfBounds> {
            let mut tmp = vec![0u8; dst.len()];
            self.read(pos, &mut tmp)?;
            for (d, s) in dst.iter_mut().zip(tmp) {
                d.write(s);
            }
            Ok(())
        }

        pub(crate) fn write(&self, pos: u32, src: &[u8]) -> Result<(), OutOfBounds> {
            let (off, first) = span(self.size, pos, src.len()).ok_or(out_of_bounds(
                0,
                src.len(),
                self.size as usize,
            ))?;
            let (a, b) = src.split_at(first);
            self.shm.write(self.data + off, a)?;
            self.shm.write(self.data, b)
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked_and_little_endian() {
        let mut buf = vec![0u64; 8];
        // SAFETY: the buffer is ours, 8-byte aligned, lives until the end of the test, and no
        // reference to it is used while `shm` is.
        let shm = unsafe { Shm::new(buf.as_mut_ptr().cast(), 64) };
        shm.store(4, 0x0403_0201, Ordering::Relaxed).unwrap();
        let mut b = [0u8; 4];
        shm.read(4, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        shm.load(62, Ordering::Relaxed).unwrap_err();
        shm.load(2, Ordering::Relaxed).unwrap_err();
        shm.load(64, Ordering::Relaxed).unwrap_err();
        assert!(shm.read(60, &mut [0; 5]).is_err());
        assert!(shm.write(usize::MAX, &[1]).is_err());
        shm.write(60, &[9; 4]).unwrap();
        assert_eq!(shm.load(60, Ordering::Relaxed).unwrap(), 0x0909_0909);
        assert_eq!(shm.compare_exchange(4, 0, 1).unwrap(), Err(0x0403_0201));
        assert_eq!(
            shm.compare_exchange(4, 0x0403_0201, 1).unwrap(),
            Ok(0x0403_0201)
        );
        shm.zero(0, 64).unwrap();
        assert_eq!(shm.load(4, Ordering::Relaxed).unwrap(), 0);
        drop(buf);
    }

    #[test]
    fn ring_views_stay_inside_their_ring() {
        // A ring of 128 data bytes at offset 64, between guard bytes.
        let mut buf = vec![0u64; 128];
        // SAFETY: as above.
        let shm = unsafe { Shm::new(buf.as_mut_ptr().cast(), 1024) };
        assert!(shm.ring(64, 1024).is_err(), "does not fit");
        assert!(shm.ring(32, 128).is_err(), "misaligned");
        assert!(shm.ring(64, 96).is_err(), "not a power of two");
        assert!(shm.ring(64, 64).is_err(), "too small");
        assert!(shm.word(1022).is_err() && shm.word(2).is_err());
        shm.write(0, &[0xee; 1024]).unwrap();
        let ring = shm.ring(64, 128).unwrap();
        let data = 64 + RING_CONTROL_SIZE as usize;
        // Positions wrap, fields stay in their record and block.
        ring.store_record(128 + 64, 4, 7, Ordering::Relaxed);
        assert_eq!(shm.load(data + 64 + 4, Ordering::Relaxed).unwrap(), 7);
        ring.store_control(256, 9, Ordering::Relaxed);
        assert_eq!(shm.load(64 + 256, Ordering::Relaxed).unwrap(), 9);
        // Copies wrap at the end of the data area; longer than the ring is refused.
        ring.write(96, &[1; 64]).unwrap();
        let mut back = [0u8; 64];
        ring.read(96 + 128, &mut back).unwrap();
        assert_eq!(back, [1; 64]);
        assert_eq!(
            shm.load(data + 124, Ordering::Relaxed).unwrap(),
            0x0101_0101
        );
        assert_eq!(shm.load(data, Ordering::Relaxed).unwrap(), 0x0101_0101);
        assert!(ring.write(0, &[0; 129]).is_err());
        assert!(ring.read(0, &mut [0; 129]).is_err());
        // Nothing outside the ring was touched.
        let mut guard = [0u8; 64];
        shm.read(0, &mut guard).unwrap();
        assert_eq!(guard, [0xee; 64]);
        shm.read(data + 128, &mut guard).unwrap();
        assert_eq!(guard, [0xee; 64]);
        let word = shm.word(8).unwrap();
        assert_eq!(word.compare_exchange(0xeeee_eeee, 3), Ok(0xeeee_eeee));
        assert_eq!(word.load(Ordering::Relaxed), 3);
        drop(buf);
    }
}
