//! Mappings of shared memory and a safe, volatile view on them.
//!
//! Memory shared with another process or VM can change under us at any moment, so Rust
//! references (`&[u8]`, `&mut [u8]`) to it would be unsound. [`SharedView`] therefore never hands
//! out plain references: bytes are copied in and out with volatile accesses, and words are
//! accessed either with single aligned volatile loads/stores (which is also what MMIO registers
//! need) or through atomics.

use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use rustix::io::Errno;
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use thiserror::Error;

/// Mapping a file descriptor failed.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum MapError {
    /// cannot map zero bytes
    ///
    /// A zero-length mapping was asked for.
    Empty,
    /// mmap of {len} bytes at offset {offset} failed: {errno}
    ///
    /// `mmap` failed.
    Mmap {
        /// Requested length.
        len: usize,
        /// Requested file offset.
        offset: u64,
        /// The error.
        errno: Errno,
    },
}

/// access of {len} bytes at offset {offset} is outside a {size}-byte region or misaligned
///
/// An access outside the view, or misaligned for its width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct OutOfBounds {
    /// Offset asked for.
    pub offset: usize,
    /// Length asked for.
    pub len: usize,
    /// Size of the view.
    pub size: usize,
}

/// An owned `MAP_SHARED`, read-write mapping; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all access goes through
// `SharedView`, whose accesses are volatile or atomic, so sharing across threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only gives out `SharedView`s.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset`, shared and read-write.
    pub fn map_fd(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Mapping, MapError> {
        if len == 0 {
            return Err(MapError::Empty);
        }
        // SAFETY: a fresh mapping at an address the kernel chooses cannot alias any existing
        // Rust object; we own it until drop.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }
        .map_err(|errno| MapError::Mmap { len, offset, errno })?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(MapError::Mmap {
            len,
            offset,
            errno: Errno::INVAL,
        })?;
        Ok(Mapping { ptr, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings cannot be made.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The view through which the memory is read and written.
    pub fn view(&self) -> SharedView<'_> {
        // SAFETY: the mapping stays valid for reads and writes as long as `self` is borrowed.
        unsafe { SharedView::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we created this mapping with exactly this address and length, and no view can
        // outlive `self` (views borrow it).
        if let Err(e) = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::warn!("munmap failed: {e}");
        }
    }
}

/// A bounds-checked window on memory that others may change at any time.
///
/// Every access is volatile or atomic. `Copy`, like a slice reference.
#[derive(Debug, Clone, Copy)]
pub struct SharedView<'a> {
    ptr: *mut u8,
    len: usize,
    _life: PhantomData<&'a AtomicU32>,
}

// SAFETY: all accesses through the view are volatile or atomic; the memory is meant to be shared.
unsafe impl Send for SharedView<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedView<'_> {}

impl<'a> SharedView<'a> {
    /// Wraps raw memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and valid for reads and writes for `'a`, and nothing may
    /// hold Rust references into it for that time.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> SharedView<'a> {
        SharedView {
            ptr,
            len,
            _life: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length view.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address (for handing to a VMM or the kernel).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> Result<*mut u8, OutOfBounds> {
        let err = OutOfBounds {
            offset,
            len,
            size: self.len,
        };
        let end = offset.checked_add(len).ok_or(err)?;
        if end > self.len {
            return Err(err);
        }
        // SAFETY: offset + len <= self.len, so the result stays inside the mapping.
        let p = unsafe { self.ptr.add(offset) };
        if (p as usize) % align != 0 {
            return Err(err);
        }
        Ok(p)
    }

    /// A smaller window inside this one.
    pub fn subview(&self, offset: usize, len: usize) -> Result<SharedView<'a>, OutOfBounds> {
        let p = self.check(offset, len, 1)?;
        // SAFETY: the range lies inside ours, which is valid for 'a.
        Ok(unsafe { SharedView::from_raw_parts(p, len) })
    }

    /// Copies bytes out, with volatile loads.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        let p = self.check(offset, buf.len(), 1)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `check` proved p..p+buf.len() is inside the valid mapping.
            *b = unsafe { p.add(i).read_volatile() };
        }
        Ok(())
    }

    /// Copies bytes in, with volatile stores.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        let p = self.check(offset, data.len(), 1)?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `check` proved p..p+data.len() is inside the valid mapping.
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// One aligned volatile 32-bit load in native byte order (safe for MMIO registers).
    pub fn read_u32(&self, offset: usize) -> Result<u32, OutOfBounds> {
        let p = self.check(offset, 4, 4)?;
        // SAFETY: in bounds and 4-byte aligned, per `check`.
        Ok(unsafe { p.cast::<u32>().read_volatile() })
    }

    /// One aligned volatile 32-bit store in native byte order (safe for MMIO registers).
    pub fn write_u32(&self, offset: usize, value: u32) -> Result<(), OutOfBounds> {
        let p = self.check(offset, 4, 4)?;
        // SAFETY: in bounds and 4-byte aligned, per `check`.
        unsafe { p.cast::<u32>().write_volatile(value) };
        Ok(())
    }

    /// One aligned volatile 64-bit load in native byte order.
    pub fn read_u64(&self, offset: usize) -> Result<u64, OutOfBounds> {
        let p = self.check(offset, 8, 8)?;
        // SAFETY: in bounds and 8-byte aligned, per `check`.
        Ok(unsafe { p.cast::<u64>().read_volatile() })
    }

    /// One aligned volatile 64-bit store in native byte order.
    pub fn write_u64(&self, offset: usize, value: u64) -> Result<(), OutOfBounds> {
        let p = self.check(offset, 8, 8)?;
        // SAFETY: in bounds and 8-byte aligned, per `check`.
        unsafe { p.cast::<u64>().write_volatile(value) };
        Ok(())
    }

    /// The aligned 32-bit word at `offset` as an atomic.
    pub fn atomic_u32(&self, offset: usize) -> Result<&'a AtomicU32, OutOfBounds> {
        let p = self.check(offset, 4, 4)?;
        // SAFETY: in bounds, aligned, valid for 'a; atomics tolerate concurrent modification.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// The aligned 64-bit word at `offset` as an atomic.
    pub fn atomic_u64(&self, offset: usize) -> Result<&'a AtomicU64, OutOfBounds> {
        let p = self.check(offset, 8, 8)?;
        // SAFETY: in bounds, aligned, valid for 'a; atomics tolerate concurrent modification.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    fn memfd(len: u64) -> std::os::fd::OwnedFd {
        let fd = memfd_create("ivshm-test", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, len).unwrap();
        fd
    }

    #[test]
    fn two_mappings_of_one_fd_share_bytes() {
        let fd = memfd(8192);
        let a = Mapping::map_fd(fd.as_fd(), 0, 8192).unwrap();
        let b = Mapping::map_fd(fd.as_fd(), 4096, 4096).unwrap();
        a.view().write(4096 + 10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        b.view().read(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        a.view().write_u32(4096, 0xdead_beef).unwrap();
        assert_eq!(b.view().read_u32(0).unwrap(), 0xdead_beef);
        b.view().atomic_u64(8).unwrap().store(7, Ordering::SeqCst);
        assert_eq!(a.view().read_u64(4096 + 8).unwrap(), 7);
    }

    #[test]
    fn bounds_and_alignment_are_enforced() {
        let fd = memfd(4096);
        let m = Mapping::map_fd(fd.as_fd(), 0, 4096).unwrap();
        let v = m.view();
        v.write(4090, &[0; 6]).unwrap();
        assert!(v.write(4090, &[0; 7]).is_err());
        v.read_u32(4094).unwrap_err();
        v.read_u32(2).unwrap_err();
        v.read_u64(4).unwrap_err();
        v.atomic_u32(4096).unwrap_err();
        v.subview(usize::MAX, 2).unwrap_err();
        let s = v.subview(100, 8).unwrap();
        assert_eq!(s.len(), 8);
        assert!(s.write(4, &[1; 5]).is_err());
        assert!(matches!(
            Mapping::map_fd(fd.as_fd(), 0, 0),
            Err(MapError::Empty)
        ));
    }
}
