//! The POSIX shm backend: a named object in `/dev/shm`, like QEMU's server `-M`.
//!
//! An existing object of the same name is reused, as QEMU does (and logged, since its contents
//! survive); it is resized when its size differs. The object is removed when the returned
//! [`SharedMemory`] drops, unless `keep` is set.
//!
//! `/dev/shm` is a directory every local user can write, and its names are shared by all of
//! them, so the object is opened as `shm_open` would but more carefully: relative to the
//! directory's fd with `O_NOFOLLOW` (a link planted at the name is refused, never followed),
//! and an existing object is reused only if it is a regular file owned by this process's user
//! (one made by someone else would let them read and write the region). On drop the name is
//! removed only if it still names this object.

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{fd_size, set_size, BackendError, SharedMemory};

/// Where POSIX shared-memory objects live on Linux.
pub const SHM_DIR: &str = "/dev/shm";

/// An object's identity (device, inode), to remove only what was created.
pub(crate) type ObjectId = (u64, u64);

/// The name of the object in [`SHM_DIR`]: `name` without its leading `/`s; it must be a
/// single file name.
fn object_name(name: &str) -> Result<&str, BackendError> {
    let object = name.trim_start_matches('/');
    if object.is_empty()
        || object == "."
        || object == ".."
        || object.len() > 255
        || object.bytes().any(|b| b == b'/' || b == 0)
    {
        return Err(BackendError::sys(
            format!("POSIX shm name {name:?} (one file name, at most 255 bytes)"),
            Errno::INVAL,
        ));
    }
    Ok(object)
}

fn shm_dir() -> Result<OwnedFd, BackendError> {
    rustix::fs::open(
        SHM_DIR,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BackendError::sys(format!("opening {SHM_DIR}"), e))
}

/// Opens or creates the shm object `name` with `size` bytes (mode 0600 when created).
pub fn create(name: &str, size: u64, keep: bool) -> Result<SharedMemory, BackendError> {
    let object = object_name(name)?;
    let dir = shm_dir()?;
    let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    let (fd, created) = match rustix::fs::openat(
        &dir,
        object,
        flags | OFlags::CREATE | OFlags::EXCL,
        Mode::RUSR | Mode::WUSR,
    ) {
        Ok(fd) => (fd, true),
        Err(Errno::EXIST) => {
            // Non-blocking, so that a FIFO planted at the name cannot hold the open.
            let fd = rustix::fs::openat(&dir, object, flags | OFlags::NONBLOCK, Mode::empty())
                .map_err(|e| match e {
                    Errno::LOOP => BackendError::ShmLink {
                        name: name.to_string(),
                    },
                    e => {
                        BackendError::sys(format!("opening existing POSIX shm object {name:?}"), e)
                    }
                })?;
            (fd, false)
        }
        Err(e) => {
            return Err(BackendError::sys(
                format!("creating POSIX shm object {name:?}"),
                e,
            ))
        }
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| BackendError::sys("fstat", e))?;
    let id = (stat.st_dev, stat.st_ino);
    // From here on, a failure must not leave a freshly created object behind.
    let created_guard = CreatedObject {
        object,
        id,
        armed: created && !keep,
    };
    if !created {
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(BackendError::ShmNotRegular {
                name: name.to_string(),
            });
        }
        let euid = rustix::process::geteuid().as_raw();
        if stat.st_uid != euid {
            return Err(BackendError::ShmForeign {
                name: name.to_string(),
                uid: stat.st_uid,
                euid,
            });
        }
    }
    if created {
        tracing::info!(name, size, "created POSIX shm object");
    } else {
        let old = fd_size(fd.as_fd())?;
        tracing::info!(
            name,
            old_size = old,
            size,
            "reusing existing POSIX shm object (its contents are kept)"
        );
        if old > size {
            tracing::warn!(
                name,
                old_size = old,
                size,
                "shrinking existing POSIX shm object"
            );
        }
    }
    if fd_size(fd.as_fd())? != size {
        set_size(fd.as_fd(), size, "POSIX shm object")?;
    }
    created_guard.disarm();
    let mem = SharedMemory::new(fd, size, format!("POSIX shm {name}"));
    Ok(if keep {
        mem
    } else {
        mem.remove_shm_on_drop(object.to_string(), id)
    })
}

/// Removes object `object` if its name still names the object `id`.
pub(crate) fn remove(object: &str, id: ObjectId) -> Result<bool, Errno> {
    let dir = rustix::fs::open(
        SHM_DIR,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let stat = rustix::fs::statat(&dir, object, AtFlags::SYMLINK_NOFOLLOW)?;
    if (stat.st_dev, stat.st_ino) != id {
        return Ok(false);
    }
    rustix::fs::unlinkat(&dir, object, AtFlags::empty()).map(|()| true)
}

/// Removes a just-created object if creation fails half-way.
struct CreatedObject<'a> {
    object: &'a str,
    id: ObjectId,
    armed: bool,
}

impl CreatedObject<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CreatedObject<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove(self.object, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn unique_name(tag: &str) -> String {
        format!("ivshm-test-{tag}-{}", std::process::id())
    }

    #[test]
    fn created_sized_and_removed_on_drop() {
        let name = unique_name("removed");
        let path = format!("/dev/shm/{name}");
        let mem = create(&name, 1 << 20, false).unwrap();
        assert_eq!(fd_size(mem.fd()).unwrap(), 1 << 20);
        assert!(Path::new(&path).exists());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        drop(mem);
        assert!(!Path::new(&path).exists());
    }

    #[test]
    fn kept_object_survives_and_is_reused_and_resized() {
        let name = unique_name("kept");
        let path = format!("/dev/shm/{name}");
        let mem = create(&name, 1 << 20, true).unwrap();
        let map = crate::Mapping::map_fd(mem.fd(), 0, 4096).unwrap();
        map.view().write(0, b"hello").unwrap();
        drop(map);
        drop(mem);
        assert!(Path::new(&path).exists());
        // Reused: contents survive; resized to the new size.
        let again = create(&name, 2 << 20, false).unwrap();
        assert_eq!(fd_size(again.fd()).unwrap(), 2 << 20);
        let map = crate::Mapping::map_fd(again.fd(), 0, 4096).unwrap();
        let mut buf = [0u8; 5];
        map.view().read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        drop(map);
        drop(again);
        assert!(!Path::new(&path).exists());
    }

    /// A link planted at the object's name (in `/dev/shm`, which everyone can write) is
    /// refused, not followed: the file it points to keeps its size and contents.
    #[test]
    fn a_planted_link_is_refused_and_its_target_untouched() {
        let name = unique_name("link");
        let path = format!("/dev/shm/{name}");
        let victim = std::env::temp_dir().join(format!("{name}-victim"));
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = create(&name, 1 << 20, false).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&victim).unwrap();
    }

    /// An object someone else made under the name is refused: reusing it would give its owner
    /// the region's memory.
    #[test]
    fn an_object_of_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: making a file another user's needs root");
            return;
        }
        let name = unique_name("foreign");
        let path = format!("/dev/shm/{name}");
        std::fs::write(&path, b"theirs").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let err = create(&name, 4096, false).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
        std::fs::remove_file(&path).unwrap();
    }

    /// Dropping the region removes its object only if the name still names it.
    #[test]
    fn a_replaced_object_is_not_removed() {
        let name = unique_name("replaced");
        let path = format!("/dev/shm/{name}");
        let mem = create(&name, 4096, false).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(mem);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_name_is_an_error() {
        create("a/b", 4096, false).unwrap_err();
    }
}
