//! Memory backends: where a shared region's file descriptor comes from.
//!
//! - [`memfd`]: an anonymous `memfd` (sealed so its size cannot change), the default.
//! - [`posix_shm`]: a named POSIX shared-memory object (`shm_open`), like QEMU's
//!   `ivshmem-server -M` and `memory-backend-shm`; removed on drop unless kept.
//! - [`dir_file`]: an unlinked file in a directory (`ivshmem-server -m`), e.g. a hugetlbfs mount,
//!   where sizes are rounded up to the huge page size.
//!
//! [`create`] applies the power-of-two policy ([`Pow2Policy`]) first, then asks the backend.
//! Every size is a `u64`: sizes of 4 GiB and more work.

pub mod dir_file;
pub mod memfd;
pub mod posix_shm;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::io::Errno;
use thiserror::Error;

use crate::size::{apply_pow2_policy, format_size, Pow2Error, Pow2Policy};

/// Which backend creates the memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// An anonymous memfd.
    Memfd,
    /// A named POSIX shared-memory object (`/dev/shm/NAME`).
    PosixShm {
        /// The object name, with or without a leading `/` (as `shm_open` accepts).
        name: String,
        /// Keep the object when the [`SharedMemory`] is dropped (QEMU 7.2's server removes it at
        /// exit; older ones kept it).
        keep: bool,
    },
    /// An unlinked file in a directory, e.g. a hugetlbfs mount.
    DirFile {
        /// The directory.
        dir: PathBuf,
    },
}

/// The largest file size (`off_t` is an `i64`).
const MAX_FILE_SIZE: i64 = i64::MAX;

/// Errors creating shared memory.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum BackendError {
    /// {0}
    ///
    /// The requested size is not allowed by the power-of-two policy.
    Size(Pow2Error),
    /// {what}: {errno}
    ///
    /// A system call failed.
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        errno: Errno,
    },
    /// sizing {what} to {size} bytes: {errno}
    ///
    /// The object could not be given its size (`ftruncate`).
    Resize {
        /// What was being sized.
        what: String,
        /// The size asked for.
        size: u64,
        /// The error.
        errno: Errno,
    },
    /// size {size} bytes cannot be rounded up to a multiple of the {page}-byte huge page size
    ///
    /// The size is not a multiple of the huge page size and cannot be rounded up.
    HugePageRounding {
        /// The size asked for.
        size: u64,
        /// The huge page size.
        page: u64,
    },
    /// POSIX shm object {name:?} is a symbolic link; refusing to follow it (anyone can write to /dev/shm):
    /// remove it
    ///
    /// A symbolic link is where the POSIX shm object should be.
    ShmLink {
        /// The object's name.
        name: String,
    },
    /// POSIX shm object {name:?} exists and is not a regular file; refusing to use it
    ///
    /// The POSIX shm object's name is taken by something that is not a regular file.
    ShmNotRegular {
        /// The object's name.
        name: String,
    },
    /// POSIX shm object {name:?} exists and is owned by uid {uid}, not by this process's user (uid
    /// {euid}): its owner could read and write the region; remove it or choose another name
    ///
    /// The POSIX shm object exists and belongs to another user.
    ShmForeign {
        /// The object's name.
        name: String,
        /// Its owner.
        uid: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// size {0} bytes is larger than the largest file size ({MAX_FILE_SIZE:})
    ///
    /// The size does not fit in `off_t`.
    TooLarge(u64),
}

impl From<Pow2Error> for BackendError {
    fn from(error: Pow2Error) -> Self {
        Self::Size(error)
    }
}

impl BackendError {
    pub(crate) fn sys(what: impl Into<String>, errno: Errno) -> Self {
        BackendError::Sys {
            what: what.into(),
            errno,
        }
    }
}

/// A shared-memory object: its fd and size. A named POSIX shm object is removed on drop unless
/// it is to be kept.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    size: u64,
    /// The POSIX shm object to remove on drop, and its identity.
    shm_to_remove: Option<(String, posix_shm::ObjectId)>,
    description: String,
}

impl SharedMemory {
    pub(crate) fn new(fd: OwnedFd, size: u64, description: String) -> Self {
        SharedMemory {
            fd,
            size,
            shm_to_remove: None,
            description,
        }
    }

    pub(crate) fn remove_shm_on_drop(mut self, object: String, id: posix_shm::ObjectId) -> Self {
        self.shm_to_remove = Some((object, id));
        self
    }

    /// The file descriptor (what peers receive).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The size in bytes (what `fstat` reports).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Human-readable description of the backing object, for logs (`memfd`, `shm /ivshmem`,
    /// `file in /dev/hugepages`).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// A duplicate of the fd (`dup`), e.g. to hand to code that owns its fds. A named shm object
    /// is still removed when this value drops.
    pub fn try_clone_fd(&self) -> Result<OwnedFd, BackendError> {
        self.fd.try_clone().map_err(|e| {
            BackendError::sys(
                "dup of shared-memory fd",
                Errno::from_io_error(&e).unwrap_or(Errno::BADF),
            )
        })
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if let Some((name, id)) = self.shm_to_remove.take() {
            match posix_shm::remove(&name, id) {
                Ok(true) => tracing::info!(name = %name, "removed POSIX shm object"),
                Ok(false) => tracing::warn!(
                    name = %name,
                    "POSIX shm object was replaced by another file; leaving that one"
                ),
                Err(errno) => {
                    tracing::warn!(name = %name, %errno, "could not remove POSIX shm object");
                }
            }
        }
    }
}

/// Creates shared memory of `requested` bytes with `kind`, after applying `policy` (a warning
/// with both sizes is logged when it rounds up).
pub fn create(
    kind: &BackendKind,
    requested: u64,
    policy: Pow2Policy,
) -> Result<SharedMemory, BackendError> {
    let size = apply_pow2_policy(requested, policy)?;
    if size != requested {
        tracing::warn!(
            requested,
            size,
            "size {} is not a power of two (QEMU's ivshmem needs one for its PCI BAR): rounded up to {}",
            format_size(requested),
            format_size(size)
        );
    }
    if size > i64::MAX as u64 {
        return Err(BackendError::TooLarge(size));
    }
    match kind {
        BackendKind::Memfd => memfd::create(size),
        BackendKind::PosixShm { name, keep } => posix_shm::create(name, size, *keep),
        BackendKind::DirFile { dir } => dir_file::create(dir, size),
    }
}

/// Sets the size of `fd` to `size` bytes (`ftruncate`).
pub(crate) fn set_size(fd: BorrowedFd<'_>, size: u64, what: &str) -> Result<(), BackendError> {
    rustix::fs::ftruncate(fd, size).map_err(|errno| BackendError::Resize {
        what: what.to_string(),
        size,
        errno,
    })
}

/// The size `fstat` reports for `fd`.
pub fn fd_size(fd: BorrowedFd<'_>) -> Result<u64, BackendError> {
    let stat = rustix::fs::fstat(fd).map_err(|e| BackendError::sys("fstat", e))?;
    u64::try_from(stat.st_size).map_err(|_| BackendError::sys("fstat size", Errno::INVAL))
}
