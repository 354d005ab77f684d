//! The directory backend: an unlinked file in a directory, like QEMU's server `-m DIR`.
//!
//! The file is created with `O_TMPFILE` (never visible by name) or, where the filesystem does not
//! support that, as `DIR/ivshmem.XXXXXX` with `O_EXCL` and unlinked at once. On hugetlbfs the
//! size must be a multiple of the huge page size: it is rounded up, with a log line.
//!
//! The directory may be one others can write (a shared hugetlbfs mount): it is opened once and
//! everything else is relative to its fd, the named fallback never follows a link
//! (`O_CREAT | O_EXCL | O_NOFOLLOW`), and a file that still has a name after the unlink
//! (someone linked it elsewhere first) is refused.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::{set_size, BackendError, SharedMemory};
use crate::size::format_size;

/// `HUGETLBFS_MAGIC` from `<linux/magic.h>`.
pub const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// Creates an unlinked file of `size` bytes in `dir` (rounded up to the huge page size on
/// hugetlbfs).
pub fn create(dir: &Path, size: u64) -> Result<SharedMemory, BackendError> {
    let fd = create_unlinked(dir)?;
    let size = match huge_page_size(&fd)? {
        Some(page) => {
            let rounded = round_up_to_multiple(size, page)
                .ok_or(BackendError::HugePageRounding { size, page })?;
            if rounded != size {
                tracing::warn!(
                    dir = %dir.display(),
                    requested = size,
                    size = rounded,
                    "{} is on hugetlbfs with {} pages: size {} rounded up to {}",
                    dir.display(),
                    format_size(page),
                    format_size(size),
                    format_size(rounded)
                );
            }
            rounded
        }
        None => size,
    };
    set_size(fd.as_fd(), size, "file")?;
    tracing::debug!(dir = %dir.display(), size, "created unlinked file");
    Ok(SharedMemory::new(
        fd,
        size,
        format!("file in {}", dir.display()),
    ))
}

/// The huge page size if `fd` lives on hugetlbfs.
fn huge_page_size(fd: &OwnedFd) -> Result<Option<u64>, BackendError> {
    let fs = rustix::fs::fstatfs(fd).map_err(|e| BackendError::sys("fstatfs", e))?;
    // `f_type` is a signed word; the magic is compared on its low 32 bits.
    if (fs.f_type as u64) & 0xffff_ffff != HUGETLBFS_MAGIC {
        return Ok(None);
    }
    Ok(u64::try_from(fs.f_bsize).ok().filter(|b| *b > 0))
}

/// Rounds `size` up to a multiple of `unit` (`unit > 0`), or `None` on overflow.
pub fn round_up_to_multiple(size: u64, unit: u64) -> Option<u64> {
    if unit == 0 {
        return Some(size);
    }
    size.div_ceil(unit).checked_mul(unit)
}

fn create_unlinked(dir: &Path) -> Result<OwnedFd, BackendError> {
    let mode = Mode::RUSR | Mode::WUSR;
    let dir_fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BackendError::sys(format!("opening directory {}", dir.display()), e))?;
    match rustix::fs::openat(
        &dir_fd,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        mode,
    ) {
        Ok(fd) => return Ok(fd),
        // Filesystems without O_TMPFILE say EOPNOTSUPP (or EISDIR on old kernels).
        Err(Errno::OPNOTSUPP) | Err(Errno::ISDIR) | Err(Errno::INVAL) => {}
        Err(e) => {
            return Err(BackendError::sys(
                format!("creating a file in {}", dir.display()),
                e,
            ))
        }
    }
    create_named_then_unlink(&dir_fd, dir, mode)
}

/// mkstemp-style fallback: `DIR/ivshmem.<unique>` with `O_EXCL`, unlinked immediately.
fn create_named_then_unlink(
    dir_fd: &OwnedFd,
    dir: &Path,
    mode: Mode,
) -> Result<OwnedFd, BackendError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("ivshmem.{}.{n}.{nanos:x}", std::process::id());
        let path = dir.join(&name);
        match rustix::fs::openat(
            dir_fd,
            name.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => {
                rustix::fs::unlinkat(dir_fd, name.as_str(), AtFlags::empty())
                    .map_err(|e| BackendError::sys(format!("unlinking {}", path.display()), e))?;
                let links = rustix::fs::fstat(&fd)
                    .map_err(|e| BackendError::sys("fstat", e))?
                    .st_nlink;
                if links != 0 {
                    return Err(BackendError::sys(
                        format!(
                            "{} was linked elsewhere before it was unlinked; refusing it",
                            path.display()
                        ),
                        Errno::EXIST,
                    ));
                }
                return Ok(fd);
            }
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(BackendError::sys(format!("creating {}", path.display()), e)),
        }
    }
    Err(BackendError::sys(
        format!("creating a unique file in {}", dir.display()),
        Errno::EXIST,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fd_size;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ivshm-dir-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn file_is_sized_and_leaves_no_name() {
        let dir = temp_dir("tmpfile");
        let mem = create(&dir, 3 << 20).unwrap();
        assert_eq!(fd_size(mem.fd()).unwrap(), 3 << 20);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn fallback_leaves_no_name() {
        let dir = temp_dir("named");
        let dir_fd =
            rustix::fs::open(&dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let fd = create_named_then_unlink(&dir_fd, &dir, Mode::RUSR | Mode::WUSR).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        drop(fd);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn missing_dir_is_an_error() {
        create(Path::new("/nonexistent/ivshm"), 4096).unwrap_err();
    }

    #[test]
    fn rounding_to_huge_pages() {
        assert_eq!(round_up_to_multiple(1, 2 << 20), Some(2 << 20));
        assert_eq!(round_up_to_multiple(2 << 20, 2 << 20), Some(2 << 20));
        assert_eq!(round_up_to_multiple(3 << 20, 2 << 20), Some(4 << 20));
        assert_eq!(round_up_to_multiple(u64::MAX, 2 << 20), None);
    }

    #[test]
    fn hugetlbfs_if_mounted() {
        // Only meaningful where hugetlbfs is mounted and huge pages are reserved.
        let dir = Path::new("/dev/hugepages");
        let Ok(fs) = rustix::fs::statfs(dir) else {
            return;
        };
        if (fs.f_type as u64) & 0xffff_ffff != HUGETLBFS_MAGIC {
            return;
        }
        if let Ok(mem) = create(dir, 4096) {
            assert_eq!(mem.size() % (fs.f_bsize as u64), 0);
            assert_eq!(fd_size(mem.fd()).unwrap(), mem.size());
        }
    }
}
