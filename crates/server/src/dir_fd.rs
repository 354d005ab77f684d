//! Directories held open by file descriptor, and the only file-system calls the server makes in
//! them.
//!
//! The server runs as root next to users who own directories it works in (a VM's directory is
//! owned by the VM's user; a standalone socket may live in `/tmp`). A path names a file only
//! until someone renames, replaces or links it, so every operation here is relative to a
//! directory fd and never follows a link in its last component:
//!
//! - directories are opened with `O_DIRECTORY | O_NOFOLLOW` (a link is refused, not followed)
//!   and changed through their fd (`fchown`, `fchmod`);
//! - entries are examined with `fstatat(AT_SYMLINK_NOFOLLOW)` or opened with
//!   `O_PATH | O_NOFOLLOW`, removed with `unlinkat` (which removes a name, never what a link
//!   points to) and moved with `renameat2`;
//! - a socket is bound, given its owner, group and mode, and made listening inside a
//!   [`Staging`] directory that only the server can enter (made by it, mode 0700, checked
//!   through its fd), then renamed into place: a name in someone else's directory never refers
//!   to a file whose owner or mode the server is still changing;
//! - `bind` and `connect` take paths, so they are given `/proc/self/fd/<dir fd>/<name>`, which
//!   the kernel resolves through the open directory (and which is short whatever the
//!   directory's path).
//!
//! What remains by path: opening a directory the configuration names (its parents are the
//! administrator's; the socket root's are checked, see `vm_dir`).

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, RenameFlags, Stat, Uid};
use rustix::io::Errno;

/// A file's identity: device and inode.
pub(crate) type Identity = (u64, u64);

/// The identity of `stat`.
pub(crate) fn identity(stat: &Stat) -> Identity {
    (stat.st_dev, stat.st_ino)
}

/// The file type of `stat`.
pub(crate) fn file_type(stat: &Stat) -> FileType {
    FileType::from_raw_mode(stat.st_mode)
}

/// A directory held open, with the path it was opened by (for messages, and for the socket
/// paths clients are given). Cloning shares the fd.
#[derive(Debug, Clone)]
pub(crate) struct Dir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY);

impl Dir {
    /// Opens the directory at `path`, following links on the way (a path from the
    /// configuration or the command line).
    pub(crate) fn open(path: &Path) -> Result<Dir, Errno> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(Dir {
            fd: Arc::new(fd),
            path: path.to_path_buf(),
        })
    }

    /// Opens the directory at `path`; its last component must not be a link (`ELOOP`).
    pub(crate) fn open_no_link(path: &Path) -> Result<Dir, Errno> {
        let fd = rustix::fs::open(path, DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| link_is_loop(e, || rustix::fs::lstat(path)))?;
        Ok(Dir {
            fd: Arc::new(fd),
            path: path.to_path_buf(),
        })
    }

    /// Opens subdirectory `name`; a link there is refused (`ELOOP`), anything but a directory
    /// too (`ENOTDIR`).
    pub(crate) fn open_child(&self, name: &str) -> Result<Dir, Errno> {
        let fd = rustix::fs::openat(&*self.fd, name, DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| link_is_loop(e, || self.entry(name)?.ok_or(Errno::NOENT)))?;
        Ok(Dir {
            fd: Arc::new(fd),
            path: self.path.join(name),
        })
    }

    /// Makes subdirectory `name` with `mode` (less the umask); `Ok(false)` if a file of that
    /// name exists already (what it is, is for [`open_child`](Self::open_child) to find out).
    pub(crate) fn make_child(&self, name: &str, mode: u32) -> Result<bool, Errno> {
        match rustix::fs::mkdirat(&*self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The path it was opened by.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of entry `name`.
    pub(crate) fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// The fd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `fstat` of the directory itself.
    pub(crate) fn stat(&self) -> Result<Stat, Errno> {
        rustix::fs::fstat(&*self.fd)
    }

    /// What entry `name` is, without following it; `None` if there is none.
    pub(crate) fn entry(&self, name: impl AsRef<Path>) -> Result<Option<Stat>, Errno> {
        match rustix::fs::statat(&*self.fd, name.as_ref(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The names of the directory's entries (without `.` and `..`), read through its fd.
    pub(crate) fn names(&self) -> Result<Vec<std::ffi::OsString>, Errno> {
        let mut reader = rustix::fs::Dir::read_from(&*self.fd)?;
        let mut names = Vec::new();
        while let Some(entry) = reader.read() {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(std::ffi::OsString::from_vec(name));
            }
        }
        Ok(names)
    }

    /// Removes entry `name` (a name: if it is a link, the link goes, not its target).
    pub(crate) fn unlink(&self, name: impl AsRef<Path>) -> Result<(), Errno> {
        rustix::fs::unlinkat(&*self.fd, name.as_ref(), AtFlags::empty())
    }

    /// Removes entry `name` if it still is the file `id` (between the check and the removal
    /// only the name can change, and then the name someone else put there goes).
    pub(crate) fn unlink_if(&self, name: impl AsRef<Path>, id: Identity) -> Result<bool, Errno> {
        match self.entry(name.as_ref())? {
            Some(stat) if identity(&stat) == id => self.unlink(name).map(|()| true),
            _ => Ok(false),
        }
    }

    /// Removes subdirectory `name` if it is empty and still the directory `id`.
    pub(crate) fn remove_dir_if(&self, name: &str, id: Identity) -> Result<bool, Errno> {
        match self.entry(name)? {
            Some(stat) if identity(&stat) == id => {
                rustix::fs::unlinkat(&*self.fd, name, AtFlags::REMOVEDIR).map(|()| true)
            }
            _ => Ok(false),
        }
    }

    /// Changes the directory's owner and group (those that are `Some`) and mode through its fd.
    pub(crate) fn set_owner_and_mode(
        &self,
        owner: Option<u32>,
        group: Option<u32>,
        mode: u32,
    ) -> Result<(), OwnerOrMode> {
        // The mode first: once the directory is another user's, changing its mode would need
        // CAP_FOWNER (a service may have only CAP_CHOWN).
        rustix::fs::fchmod(&*self.fd, Mode::from_raw_mode(mode)).map_err(OwnerOrMode::Mode)?;
        if owner.is_some() || group.is_some() {
            rustix::fs::fchown(
                &*self.fd,
                owner.map(Uid::from_raw),
                group.map(Gid::from_raw),
            )
            .map_err(OwnerOrMode::Owner)?;
        }
        Ok(())
    }

    /// A path that names entry `name` through this directory's fd, for `bind` and `connect`
    /// (which take paths): `/proc/self/fd/<fd>/<name>` while `/proc` is mounted, else the
    /// entry's path.
    pub(crate) fn kernel_path(&self, name: impl AsRef<Path>) -> PathBuf {
        if proc_fd_available() {
            Path::new("/proc/self/fd")
                .join(self.fd.as_raw_fd().to_string())
                .join(name)
        } else {
            self.join(name)
        }
    }

    /// Moves entry `from` of `self` to `to` in `target`, unless `to` exists (`EEXIST`).
    pub(crate) fn move_new(&self, from: &str, target: &Dir, to: &Path) -> Result<(), Errno> {
        match rustix::fs::renameat_with(&*self.fd, from, &*target.fd, to, RenameFlags::NOREPLACE) {
            // A file system without renameat2's flags: a hard link does not replace either.
            Err(Errno::INVAL) | Err(Errno::NOSYS) => {
                rustix::fs::linkat(&*self.fd, from, &*target.fd, to, AtFlags::empty())?;
                self.unlink(from)
            }
            other => other,
        }
    }

    /// Moves entry `from` of `self` to `to` in `target`, replacing what is there (a name: a
    /// link there is replaced, not followed).
    pub(crate) fn move_over(&self, from: &str, target: &Dir, to: &Path) -> Result<(), Errno> {
        rustix::fs::renameat(&*self.fd, from, &*target.fd, to)
    }

    /// Creates regular file `name` with `mode` (less the umask), open for writing; `Ok(None)`
    /// if an entry of that name exists (`O_CREAT | O_EXCL | O_NOFOLLOW`: never an existing
    /// file, nor what a link there points to).
    pub(crate) fn create_new_file(
        &self,
        name: impl AsRef<Path>,
        mode: u32,
    ) -> Result<Option<OwnedFd>, Errno> {
        match rustix::fs::openat(
            &*self.fd,
            name.as_ref(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        ) {
            Ok(file) => Ok(Some(file)),
            Err(Errno::EXIST) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens entry `name` with `O_PATH | O_NOFOLLOW`: a handle on that very file (or link),
    /// which no rename can redirect.
    pub(crate) fn open_entry(&self, name: impl AsRef<Path>) -> Result<OwnedFd, Errno> {
        rustix::fs::openat(
            &*self.fd,
            name.as_ref(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }
}

/// `O_DIRECTORY | O_NOFOLLOW` on a link fails with `ENOTDIR`: tell a link (`ELOOP`) from
/// another kind of file by looking at it.
fn link_is_loop(errno: Errno, look: impl FnOnce() -> Result<Stat, Errno>) -> Errno {
    match errno {
        Errno::NOTDIR => match look() {
            Ok(stat) if file_type(&stat) == FileType::Symlink => Errno::LOOP,
            _ => errno,
        },
        other => other,
    }
}

/// Which of owner or mode could not be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnerOrMode {
    /// `fchown`/`fchownat` failed.
    Owner(Errno),
    /// `fchmod`/`fchmodat` failed.
    Mode(Errno),
}

/// Whether `/proc/self/fd` can name files through descriptors (checked once).
fn proc_fd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// The path `connect` needs to reach the file behind `fd` (an `O_PATH` handle): through
/// `/proc/self/fd`, or `fallback` without `/proc`.
pub(crate) fn path_of_handle(fd: BorrowedFd<'_>, fallback: &Path) -> PathBuf {
    if proc_fd_available() {
        Path::new("/proc/self/fd").join(fd.as_raw_fd().to_string())
    } else {
        fallback.to_path_buf()
    }
}

/// A directory only the server can enter, made inside `parent` and removed on drop: files are
/// prepared here (where nobody else can rename, replace or link them) and then moved into
/// `parent`. Made with mode 0700 and checked through its fd to be the server's and 0700, so a
/// directory someone else slipped in under the same name is never used.
#[derive(Debug)]
pub(crate) struct Staging {
    parent: Dir,
    name: String,
    dir: Dir,
    id: Identity,
}

impl Staging {
    /// Makes a fresh staging directory in `parent`.
    pub(crate) fn new(parent: &Dir) -> Result<Staging, Errno> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let euid = rustix::process::geteuid().as_raw();
        let mut last = Errno::EXIST;
        for _ in 0..16 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!(".ivshm-staging-{}-{n}-{nanos:x}", std::process::id());
            match parent.make_child(&name, 0o700) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return Err(e),
            }
            let dir = match parent.open_child(&name) {
                Ok(dir) => dir,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let stat = dir.stat()?;
            // Ours, as made: anything else was put there by someone else between the mkdir and
            // the open (the name is theirs now; leave it).
            if stat.st_uid != euid || file_type(&stat) != FileType::Directory {
                last = Errno::PERM;
                continue;
            }
            let id = identity(&stat);
            let staging = Staging {
                parent: parent.clone(),
                name,
                dir,
                id,
            };
            // The umask may have taken bits; a staging directory is 0700 exactly.
            rustix::fs::fchmod(staging.dir.fd(), Mode::from_raw_mode(0o700))?;
            return Ok(staging);
        }
        Err(last)
    }

    /// The staging directory.
    pub(crate) fn dir(&self) -> &Dir {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // What is left inside (a socket that failed half-way) goes first.
        let _ = self.dir.unlink(STAGED);
        let _ = self.parent.remove_dir_if(&self.name, self.id);
    }
}

/// The name of the one file a [`Staging`] directory holds.
pub(crate) const STAGED: &str = "s";

/// Changes the owner and group (those that are `Some`) and the mode of entry `name` of a
/// [`Staging`] directory (nobody else can touch its entries, so the path is safe).
pub(crate) fn set_staged_owner_and_mode(
    staging: &Staging,
    name: &str,
    owner: Option<u32>,
    group: Option<u32>,
    mode: u32,
) -> Result<(), OwnerOrMode> {
    let fd = staging.dir.fd();
    // The mode first (see `Dir::set_owner_and_mode`).
    rustix::fs::chmodat(fd, name, Mode::from_raw_mode(mode), AtFlags::empty())
        .map_err(OwnerOrMode::Mode)?;
    if owner.is_some() || group.is_some() {
        rustix::fs::chownat(
            fd,
            name,
            owner.map(Uid::from_raw),
            group.map(Gid::from_raw),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(OwnerOrMode::Owner)?;
    }
    Ok(())
}

/// Changes the owner and group (those that are `Some`) and the mode of the file behind `fd`,
/// an `O_PATH` handle ([`Dir::open_entry`]) the caller has checked: `fchownat(AT_EMPTY_PATH)`,
/// and `chmod` through `/proc/self/fd` (a handle cannot be `fchmod`ed).
pub(crate) fn set_handle_owner_and_mode(
    fd: BorrowedFd<'_>,
    owner: Option<u32>,
    group: Option<u32>,
    mode: u32,
) -> Result<(), OwnerOrMode> {
    if !proc_fd_available() {
        return Err(OwnerOrMode::Mode(Errno::OPNOTSUPP));
    }
    let by_fd = Path::new("/proc/self/fd").join(fd.as_raw_fd().to_string());
    // The mode first (see `Dir::set_owner_and_mode`).
    rustix::fs::chmod(&by_fd, Mode::from_raw_mode(mode)).map_err(OwnerOrMode::Mode)?;
    if owner.is_some() || group.is_some() {
        rustix::fs::chownat(
            fd,
            "",
            owner.map(Uid::from_raw),
            group.map(Gid::from_raw),
            AtFlags::EMPTY_PATH,
        )
        .map_err(OwnerOrMode::Owner)?;
    }
    Ok(())
}

/// The last component of `path` as a name in its directory (`None` for `/`, `..` or empty).
pub(crate) fn file_name(path: &Path) -> Option<&OsStr> {
    path.file_name().filter(|n| !n.as_bytes().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ivshm-dirfd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn links_are_refused_not_followed() {
        let base = temp("links");
        std::fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let dir = Dir::open(&base).unwrap();
        assert_eq!(dir.open_child("link").unwrap_err(), Errno::LOOP);
        assert_eq!(
            Dir::open_no_link(&base.join("link")).unwrap_err(),
            Errno::LOOP
        );
        dir.open_child("real").unwrap();
        let link = dir.entry("link").unwrap().unwrap();
        assert_eq!(file_type(&link), FileType::Symlink);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn staging_is_private_and_goes_away() {
        use std::os::unix::fs::PermissionsExt;
        let base = temp("staging");
        let dir = Dir::open(&base).unwrap();
        let staging = Staging::new(&dir).unwrap();
        let meta = std::fs::metadata(staging.dir().path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        std::fs::write(staging.dir().join(STAGED), b"x").unwrap();
        drop(staging);
        assert_eq!(std::fs::read_dir(&base).unwrap().count(), 0);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn new_names_never_replace() {
        let base = temp("move");
        let dir = Dir::open(&base).unwrap();
        std::fs::write(base.join("a"), b"a").unwrap();
        std::fs::write(base.join("b"), b"b").unwrap();
        assert_eq!(
            dir.move_new("a", &dir, Path::new("b")).unwrap_err(),
            Errno::EXIST
        );
        dir.move_new("a", &dir, Path::new("c")).unwrap();
        assert_eq!(std::fs::read(base.join("c")).unwrap(), b"a");
        dir.move_over("c", &dir, Path::new("b")).unwrap();
        assert_eq!(std::fs::read(base.join("b")).unwrap(), b"a");
        std::fs::remove_dir_all(base).unwrap();
    }
}
