//! A region's listening UNIX socket: safe creation with a mode and group, safe removal.
//!
//! - A stale socket file (nobody listening: `connect` says `ECONNREFUSED`) is removed; a live
//!   one (another server) or a path that is not a socket is an error, never removed.
//! - The socket is bound under a temporary name in the same directory, given its mode and group,
//!   then renamed into place, so nobody can connect while it still has the default permissions.
//!   If the temporary name would be too long for a socket address, it binds the final path and
//!   changes its mode right after. A final path too long for a socket address
//!   ([`MAX_SOCKET_PATH`]) is an error before anything is created: bound under a short name and
//!   renamed, it would be a socket no client can connect to.
//! - On drop, the path is removed only if it is still our socket (same device and inode).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FileType, Gid, Mode};
use rustix::io::Errno;
use rustix::net::{
    accept_with, bind, connect, listen, socket_with, AddressFamily, SocketAddrUnix, SocketFlags,
    SocketType,
};
use thiserror::Error;

use ivshm_proto::socket_path::{check_socket_path, SocketPathTooLong};

use crate::config::ListenerConfig;
use crate::group::GroupError;

/// How many connections may wait to be accepted.
const BACKLOG: i32 = 128;

/// Errors setting up a listener.
#[derive(Debug, Error)]
pub enum ListenerError {
    /// Another process listens on the path.
    #[error("{0} is in use: another server is listening on it")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// The directory that should hold the socket does not exist.
    #[error("cannot create socket {path}: directory {dir} does not exist (create it first)")]
    NoDirectory {
        /// The socket path.
        path: PathBuf,
        /// Its missing directory.
        dir: PathBuf,
    },
    /// The path does not fit in a socket address.
    #[error(transparent)]
    PathTooLong(#[from] SocketPathTooLong),
    /// The socket group could not be resolved.
    #[error("socket group: {0}")]
    Group(#[from] GroupError),
    /// A system call failed.
    #[error("{what} {path}: {errno}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The error.
        errno: Errno,
    },
}

fn sys<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> ListenerError + 'a {
    move |errno| ListenerError::Sys {
        what,
        path: path.to_path_buf(),
        errno,
    }
}

/// A bound, listening, non-blocking UNIX stream socket that removes its path on drop.
#[derive(Debug)]
pub struct Listener {
    socket: OwnedFd,
    path: PathBuf,
    identity: (u64, u64),
}

impl Listener {
    /// Binds and listens according to `config`.
    pub fn bind(config: &ListenerConfig) -> Result<Listener, ListenerError> {
        let path = config.path.as_path();
        check_socket_path(path)?;
        let gid = config.group.as_ref().map(|g| g.resolve()).transpose()?;
        check_directory(path)?;
        remove_if_stale(path)?;
        let socket = socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(sys("creating socket for", path))?;
        let mode = Mode::from_raw_mode(config.mode);
        match temporary_name(path)
            .and_then(|tmp| SocketAddrUnix::new(tmp.as_path()).ok().map(|a| (tmp, a)))
        {
            Some((tmp, addr)) => {
                bind(&socket, &addr).map_err(sys("binding", &tmp))?;
                let prepared = set_owner_and_mode(&tmp, mode, gid)
                    .and_then(|()| listen(&socket, BACKLOG).map_err(sys("listening on", &tmp)))
                    .and_then(|()| {
                        rustix::fs::rename(&tmp, path).map_err(sys("renaming socket to", path))
                    });
                if let Err(e) = prepared {
                    let _ = rustix::fs::unlink(&tmp);
                    return Err(e);
                }
            }
            None => {
                let addr = SocketAddrUnix::new(path).map_err(sys("socket address", path))?;
                bind(&socket, &addr).map_err(sys("binding", path))?;
                let prepared = set_owner_and_mode(path, mode, gid)
                    .and_then(|()| listen(&socket, BACKLOG).map_err(sys("listening on", path)));
                if let Err(e) = prepared {
                    let _ = rustix::fs::unlink(path);
                    return Err(e);
                }
            }
        }
        let stat = rustix::fs::lstat(path).map_err(sys("stat", path))?;
        Ok(Listener {
            socket,
            path: path.to_path_buf(),
            identity: (stat.st_dev, stat.st_ino),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket file's device and inode when it was bound: the file is this listener's only
    /// while they match.
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// The listening socket (for the event loop).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Accepts one connection as a non-blocking, close-on-exec socket; `Ok(None)` when none
    /// is waiting.
    pub fn accept(&self) -> Result<Option<OwnedFd>, Errno> {
        loop {
            match accept_with(&self.socket, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
                Ok(fd) => return Ok(Some(fd)),
                Err(Errno::INTR) | Err(Errno::CONNABORTED) => continue,
                Err(Errno::AGAIN) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        match rustix::fs::lstat(&self.path) {
            Ok(stat) if (stat.st_dev, stat.st_ino) == self.identity => {
                match rustix::fs::unlink(&self.path) {
                    Ok(()) => tracing::debug!(path = %self.path.display(), "removed socket"),
                    Err(errno) => {
                        tracing::warn!(path = %self.path.display(), %errno, "could not remove socket")
                    }
                }
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "socket path now belongs to something else; leaving it"
            ),
            Err(_) => {}
        }
    }
}

fn set_owner_and_mode(path: &Path, mode: Mode, gid: Option<u32>) -> Result<(), ListenerError> {
    if let Some(gid) = gid {
        let gid = Gid::from_raw(gid);
        rustix::fs::chown(path, None, Some(gid)).map_err(sys("changing group of", path))?;
    }
    rustix::fs::chmod(path, mode).map_err(sys("changing mode of", path))
}

/// The directory of `path` (`.` for a bare name).
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Fails with [`ListenerError::NoDirectory`] when the socket's directory is missing (binding
/// would otherwise report the temporary name it uses).
fn check_directory(path: &Path) -> Result<(), ListenerError> {
    let dir = directory_of(path);
    match rustix::fs::stat(dir) {
        Err(Errno::NOENT) => Err(ListenerError::NoDirectory {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        }),
        // Anything else (not a directory, no permission) is reported by bind with its path.
        _ => Ok(()),
    }
}

/// A fresh name next to `path`, or `None` if it would not fit in a socket address.
fn temporary_name(path: &Path) -> Option<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = directory_of(path).join(format!(".ivshm-{}-{n}.sock", std::process::id()));
    check_socket_path(&tmp).is_ok().then_some(tmp)
}

/// Removes `path` if it is a socket nobody listens on; errors if it is live or not a socket.
fn remove_if_stale(path: &Path) -> Result<(), ListenerError> {
    let stat = match rustix::fs::lstat(path) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(sys("stat", path)(e)),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
        return Err(ListenerError::NotASocket(path.to_path_buf()));
    }
    let probe = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(sys("creating socket for", path))?;
    let addr = SocketAddrUnix::new(path).map_err(sys("socket address", path))?;
    match connect(&probe, &addr) {
        Err(Errno::CONNREFUSED) => {
            tracing::info!(path = %path.display(), "removing stale socket (nobody listens on it)");
            rustix::fs::unlink(path).map_err(sys("removing stale socket", path))
        }
        Err(Errno::NOENT) => Ok(()),
        // Connected, or the backlog is full (EAGAIN): someone is listening.
        Ok(()) | Err(Errno::AGAIN) => Err(ListenerError::InUse(path.to_path_buf())),
        Err(e) => Err(sys("probing", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn test_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ivshm-listener-{tag}-{}", std::process::id()))
    }

    #[test]
    fn default_mode_is_0600_and_path_is_removed_on_drop() {
        let path = test_path("mode");
        let l = Listener::bind(&ListenerConfig::new(&path)).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        drop(l);
        assert!(!path.exists());
    }

    #[test]
    fn mode_and_group_are_applied() {
        let path = test_path("group");
        let mut cfg = ListenerConfig::new(&path);
        cfg.mode = 0o660;
        cfg.group = Some(crate::group::GroupSpec::Name("root".into()));
        let l = Listener::bind(&cfg).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 0);
        drop(l);
    }

    #[test]
    fn live_socket_is_not_removed_stale_one_is() {
        let path = test_path("live");
        let l = Listener::bind(&ListenerConfig::new(&path)).unwrap();
        assert!(matches!(
            Listener::bind(&ListenerConfig::new(&path)),
            Err(ListenerError::InUse(_))
        ));
        // Make it stale: a socket file nobody listens on.
        drop(l); // removes the path
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale); // leaves the file behind
        assert!(path.exists());
        let l2 = Listener::bind(&ListenerConfig::new(&path)).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(l2.accept().unwrap().is_some());
    }

    #[test]
    fn regular_file_is_never_removed() {
        let path = test_path("file");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            Listener::bind(&ListenerConfig::new(&path)),
            Err(ListenerError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named_in_the_error() {
        let dir = test_path("nodir");
        let path = dir.join("x.sock");
        let err = Listener::bind(&ListenerConfig::new(&path)).unwrap_err();
        assert!(matches!(&err, ListenerError::NoDirectory { dir: d, .. } if *d == dir));
        let text = err.to_string();
        assert!(text.contains(&*path.to_string_lossy()), "{text}");
        assert!(text.contains("create it first"), "{text}");
    }

    /// A path longer than a socket address holds is refused up front, even when the temporary
    /// name it would be bound under is short enough: nothing is created.
    #[test]
    fn a_path_too_long_for_a_socket_address_is_refused() {
        let dir = test_path("long");
        std::fs::create_dir_all(&dir).unwrap();
        let name = "s".repeat(ivshm_proto::MAX_SOCKET_PATH + 1 - dir.as_os_str().len());
        let path = dir.join(name);
        assert_eq!(path.as_os_str().len(), ivshm_proto::MAX_SOCKET_PATH + 2);
        let err = Listener::bind(&ListenerConfig::new(&path)).unwrap_err();
        assert!(
            matches!(&err, ListenerError::PathTooLong(e) if e.len == 109),
            "{err}"
        );
        assert!(err.to_string().contains("at most 107 bytes"), "{err}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing created"
        );
        let fits = dir.join("s".repeat(ivshm_proto::MAX_SOCKET_PATH - 1 - dir.as_os_str().len()));
        assert_eq!(fits.as_os_str().len(), ivshm_proto::MAX_SOCKET_PATH);
        let l = Listener::bind(&ListenerConfig::new(&fits)).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&fits).unwrap();
        assert!(l.accept().unwrap().is_some());
        drop(l);
        std::fs::remove_dir(dir).unwrap();
    }

    #[test]
    fn accept_is_non_blocking() {
        let path = test_path("accept");
        let l = Listener::bind(&ListenerConfig::new(&path)).unwrap();
        assert!(l.accept().unwrap().is_none());
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(l.accept().unwrap().is_some());
    }
}
