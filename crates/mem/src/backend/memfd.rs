//! The memfd backend: an anonymous, sized, sealed memfd.
//!
//! Seals: `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`. QEMU's `ivshmem-doorbell` only `fstat`s
//! and `mmap`s the fd it receives, so fixing the size is invisible to it, and it guarantees that
//! every peer sees the same size (no peer can shrink the region under another's mapping, which
//! would turn that peer's accesses into `SIGBUS`). Writes are never sealed.

use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};

use super::{set_size, BackendError, SharedMemory};

/// The seals every memfd region carries.
pub const SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// Creates a memfd of `size` bytes and seals its size.
pub fn create(size: u64) -> Result<SharedMemory, BackendError> {
    let fd = memfd_create("ivshmem", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| BackendError::sys("memfd_create", e))?;
    set_size(rustix::fd::AsFd::as_fd(&fd), size, "memfd")?;
    fcntl_add_seals(&fd, SEALS).map_err(|e| BackendError::sys("sealing memfd", e))?;
    tracing::debug!(size, "created sealed memfd");
    Ok(SharedMemory::new(fd, size, "memfd".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fd_size;
    use rustix::fs::fcntl_get_seals;

    #[test]
    fn memfd_is_sized_and_sealed() {
        let mem = create(4 << 20).unwrap();
        assert_eq!(mem.size(), 4 << 20);
        assert_eq!(fd_size(mem.fd()).unwrap(), 4 << 20);
        let seals = fcntl_get_seals(mem.fd()).unwrap();
        assert!(seals.contains(SEALS));
        assert!(!seals.contains(SealFlags::WRITE));
        assert!(!seals.contains(SealFlags::FUTURE_WRITE));
        // Shrinking and growing are refused; the size is unchanged.
        assert!(rustix::fs::ftruncate(mem.fd(), 4096).is_err());
        assert!(rustix::fs::ftruncate(mem.fd(), 8 << 20).is_err());
        assert_eq!(fd_size(mem.fd()).unwrap(), 4 << 20);
    }

    #[test]
    fn memfd_of_5_gib_is_sparse_and_mappable() {
        let size = 5u64 << 30;
        let mem = create(size).unwrap();
        assert_eq!(fd_size(mem.fd()).unwrap(), size);
        let map = crate::Mapping::map_fd(mem.fd(), 0, size as usize).unwrap();
        let last = size as usize - 8;
        map.view().write_u64(last, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(map.view().read_u64(last).unwrap(), 0x1122_3344_5566_7788);
    }
}
