//! The POSIX shm backend: a named object in `/dev/shm` (`shm_open`), like QEMU's server `-M`.
//!
//! An existing object of the same name is reused, as QEMU does (and logged, since its contents
//! survive); it is resized when its size differs. The object is removed when the returned
//! [`SharedMemory`] drops, unless `keep` is set.

use rustix::fs::Mode;
use rustix::io::Errno;
use rustix::shm;

use super::{fd_size, set_size, BackendError, SharedMemory};

/// Opens or creates the shm object `name` with `size` bytes (mode 0600 when created).
pub fn create(name: &str, size: u64, keep: bool) -> Result<SharedMemory, BackendError> {
    let mode = Mode::RUSR | Mode::WUSR;
    let (fd, created) = match shm::open(
        name,
        shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR,
        mode,
    ) {
        Ok(fd) => (fd, true),
        Err(Errno::EXIST) => {
            let fd = shm::open(name, shm::OFlags::RDWR, mode).map_err(|e| {
                BackendError::sys(format!("opening existing POSIX shm object {name:?}"), e)
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
    // From here on, a failure must not leave a freshly created object behind.
    let created_guard = CreatedObject {
        name,
        armed: created && !keep,
    };
    if created {
        tracing::info!(name, size, "created POSIX shm object");
    } else {
        let old = fd_size(rustix::fd::AsFd::as_fd(&fd))?;
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
    if fd_size(rustix::fd::AsFd::as_fd(&fd))? != size {
        set_size(rustix::fd::AsFd::as_fd(&fd), size, "POSIX shm object")?;
    }
    created_guard.disarm();
    let mem = SharedMemory::new(fd, size, format!("POSIX shm {name}"));
    Ok(if keep {
        mem
    } else {
        mem.remove_shm_on_drop(name.to_string())
    })
}

/// Removes a just-created object if creation fails half-way.
struct CreatedObject<'a> {
    name: &'a str,
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
            let _ = shm::unlink(self.name);
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

    #[test]
    fn bad_name_is_an_error() {
        assert!(create("a/b", 4096, false).is_err());
    }
}
