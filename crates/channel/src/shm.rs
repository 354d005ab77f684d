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
//! Multi-byte fields are little-endian in the region: atomics convert with `to_le`/`from_le`
//! (free on little-endian machines).
//!
//! With `--cfg loom` the same interface is backed by a model: one loom `AtomicU32` per 4-byte
//! word (created on first use), and byte copies done as relaxed loads and stores of those words,
//! so that loom explores what a reader may see of data written by another thread.

use ivshm_mem::OutOfBounds;

use crate::sync::Ordering;

#[cfg(not(loom))]
pub(crate) use real::Shm;

#[cfg(loom)]
pub(crate) use model::Shm;

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
    }
}

#[cfg(loom)]
mod model {
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

        fn word(&self, offset: usize) -> Arc<AtomicU32> {
            let mut words = self.words.lock().unwrap_or_else(|e| e.into_inner());
            words
                .entry(offset)
                .or_insert_with(|| Arc::new(AtomicU32::new(0)))
                .clone()
        }

        pub(crate) fn load(&self, offset: usize, order: Ordering) -> Result<u32, OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            Ok(self.word(offset).load(order))
        }

        pub(crate) fn store(
            &self,
            offset: usize,
            value: u32,
            order: Ordering,
        ) -> Result<(), OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            self.word(offset).store(value, order);
            Ok(())
        }

        pub(crate) fn compare_exchange(
            &self,
            offset: usize,
            current: u32,
            new: u32,
        ) -> Result<Result<u32, u32>, OutOfBounds> {
            check(offset, 4, 4, self.len)?;
            Ok(self.word(offset).compare_exchange(
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
                let bytes = self.word(base).load(Ordering::Relaxed).to_le_bytes();
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
                let word = self.word(base);
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
}
