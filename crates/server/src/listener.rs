//! A region's listening UNIX socket: safe creation with a mode, owner and group, safe removal.
//!
//! - The socket is bound in a private staging directory next to its final name (made by the
//!   server, mode 0700), given its owner, group and mode there and made listening,
//!   then renamed into place. So nobody can connect while it still has the default permissions,
//!   and nothing the server changes the owner or mode of can be swapped for a link: the
//!   directory holding the socket may belong to someone else (a VM's directory belongs to the
//!   VM's user), and the server only ever renames into it and removes names from it.
//! - Something already at the final name is examined without following it: a stale socket
//!   (nobody listening: `connect` through an `O_PATH` handle says `ECONNREFUSED`) is replaced;
//!   a live one (another server) or anything that is not a socket (a file, a link, a
//!   directory) is an error, never removed.
//! - A final path too long for a socket address
//!   ([`ivshm_proto::MAX_SOCKET_PATH`]) is an error before
//!   anything is created: it would be a socket no client can connect to.
//! - On drop, the name is removed only if it is still our socket (same device and inode).
//!
//! Every call is relative to the directory's fd (the private module `dir_fd`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use rustix::io::Errno;
use rustix::net::{
    accept_with, bind, connect, listen, socket_with, AddressFamily, SocketAddrUnix, SocketFlags,
    SocketType,
};
use thiserror::Error;

use ivshm_proto::socket_path::{check_socket_path, SocketPathTooLong};

use crate::config::ListenerConfig;
use crate::dir_fd::{
    file_name, file_type, identity, path_of_handle, set_staged_owner_and_mode, Dir, Identity,
    OwnerOrMode, Staging, STAGED,
};
use crate::group::GroupError;

/// How many connections may wait to be accepted.
const BACKLOG: i32 = 128;

/// Errors setting up a listener.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum ListenerError {
    /// {0} is in use: another server is listening on it
    ///
    /// Another process listens on the path.
    InUse(PathBuf),
    /// {0} exists and is not a socket; refusing to remove it
    ///
    /// The path exists and is not a socket.
    NotASocket(PathBuf),
    /// cannot create socket {path}: directory {dir} does not exist (create it first)
    ///
    /// The directory that should hold the socket does not exist.
    NoDirectory {
        /// The socket path.
        path: PathBuf,
        /// Its missing directory.
        dir: PathBuf,
    },
    /// {0}
    ///
    /// The path does not fit in a socket address.
    PathTooLong(SocketPathTooLong),
    /// socket group: {0}
    ///
    /// The socket group could not be resolved.
    Group(GroupError),
    /// {what} {path}: {errno}
    ///
    /// A system call failed.
    Sys {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The error.
        errno: Errno,
    },
}

impl From<SocketPathTooLong> for ListenerError {
    fn from(error: SocketPathTooLong) -> Self {
        Self::PathTooLong(error)
    }
}

impl From<GroupError> for ListenerError {
    fn from(error: GroupError) -> Self {
        ListenerError::Group(error)
    }
}

fn sys<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> ListenerError + 'a {
    move |errno| ListenerError::Sys {
        what,
        path: path.to_path_buf(),
        errno,
    }
}

/// Who may connect to a socket: its mode, and the owner and group to give it (unchanged when
/// `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketPerms {
    pub(crate) mode: u32,
    pub(crate) owner: Option<u32>,
    pub(crate) group: Option<u32>,
}

/// A bound, listening, non-blocking UNIX stream socket that removes its name on drop.
#[derive(Debug)]
pub struct Listener {
    socket: OwnedFd,
    /// The directory holding it.
    dir: Dir,
    /// Its name there.
    name: PathBuf,
    path: PathBuf,
    identity: Identity,
}

impl Listener {
    /// Binds and listens according to `config`.
    pub fn bind(config: &ListenerConfig) -> Result<Listener, ListenerError> {
        let path = config.path.as_path();
        check_socket_path(path)?;
        let gid = config.group.as_ref().map(|g| g.resolve()).transpose()?;
        let dir_path = directory_of(path);
        let name = file_name(path).ok_or_else(|| sys("socket name of", path)(Errno::INVAL))?;
        let dir = match Dir::open(dir_path) {
            Ok(dir) => dir,
            Err(Errno::NOENT) => {
                return Err(ListenerError::NoDirectory {
                    path: path.to_path_buf(),
                    dir: dir_path.to_path_buf(),
                })
            }
            Err(e) => return Err(sys("opening the directory of", path)(e)),
        };
        let perms = SocketPerms {
            mode: config.mode,
            owner: None,
            group: gid,
        };
        Listener::bind_in(&dir, Path::new(name), &perms)
    }

    /// Binds and listens on `name` in `dir` with `perms` (see the module docs for how).
    pub(crate) fn bind_in(
        dir: &Dir,
        name: &Path,
        perms: &SocketPerms,
    ) -> Result<Listener, ListenerError> {
        let path = dir.join(name);
        check_socket_path(&path)?;
        let staging = Staging::new(dir).map_err(sys("making a staging directory for", &path))?;
        let socket = socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(sys("creating socket for", &path))?;
        let staged = staging.dir().kernel_path(STAGED);
        let addr = SocketAddrUnix::new(staged.as_path()).map_err(sys("socket address", &path))?;
        bind(&socket, &addr).map_err(sys("binding", &path))?;
        set_staged_owner_and_mode(&staging, STAGED, perms.owner, perms.group, perms.mode).map_err(
            |e| match e {
                OwnerOrMode::Owner(errno) => sys("changing owner and group of", &path)(errno),
                OwnerOrMode::Mode(errno) => sys("changing mode of", &path)(errno),
            },
        )?;
        listen(&socket, BACKLOG).map_err(sys("listening on", &path))?;
        let stat = staging
            .dir()
            .entry(STAGED)
            .map_err(sys("stat", &path))?
            .ok_or_else(|| sys("stat", &path)(Errno::NOENT))?;
        place(staging.dir(), dir, name, &path)?;
        Ok(Listener {
            socket,
            dir: dir.clone(),
            name: name.to_path_buf(),
            path,
            identity: identity(&stat),
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
        match self.dir.unlink_if(&self.name, self.identity) {
            Ok(true) => tracing::debug!(path = %self.path.display(), "removed socket"),
            Ok(false) => {
                if let Ok(Some(_)) = self.dir.entry(&self.name) {
                    tracing::warn!(
                        path = %self.path.display(),
                        "socket path now belongs to something else; leaving it"
                    );
                }
            }
            Err(errno) => {
                tracing::warn!(path = %self.path.display(), %errno, "could not remove socket");
            }
        }
    }
}

/// Moves the prepared socket from `staging` to `name` in `dir`: a new name, or over a stale
/// socket; a live socket or anything else there is an error (and stays).
fn place(staging: &Dir, dir: &Dir, name: &Path, path: &Path) -> Result<(), ListenerError> {
    // Someone may create or remove the name between the look and the move: look again.
    for _ in 0..8 {
        let Some(stat) = dir.entry(name).map_err(sys("stat", path))? else {
            match staging.move_new(STAGED, dir, name) {
                Ok(()) => return Ok(()),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(sys("renaming socket to", path)(e)),
            }
        };
        if file_type(&stat) != FileType::Socket {
            return Err(ListenerError::NotASocket(path.to_path_buf()));
        }
        match probe(dir, name, path)? {
            Probe::Live => return Err(ListenerError::InUse(path.to_path_buf())),
            Probe::Gone => continue,
            Probe::Stale => {
                tracing::info!(path = %path.display(), "replacing stale socket (nobody listens on it)");
                return staging
                    .move_over(STAGED, dir, name)
                    .map_err(sys("renaming socket to", path));
            }
        }
    }
    Err(sys("renaming socket to", path)(Errno::AGAIN))
}

/// What a probe connection found at a socket's name.
pub(crate) enum Probe {
    /// Someone listens on it.
    Live,
    /// Nobody listens on it.
    Stale,
    /// The name is gone or is no socket any more.
    Gone,
}

/// Connects to socket `name` in `dir` through an `O_PATH` handle on that very file (a
/// connect by path would follow a link put there meanwhile).
pub(crate) fn probe(dir: &Dir, name: &Path, path: &Path) -> Result<Probe, ListenerError> {
    let handle = match dir.open_entry(name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Probe::Gone),
        Err(e) => return Err(sys("opening", path)(e)),
    };
    let stat = rustix::fs::fstat(&handle).map_err(sys("stat", path))?;
    if file_type(&stat) != FileType::Socket {
        return Ok(Probe::Gone);
    }
    let target = path_of_handle(handle.as_fd(), path);
    let probe = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(sys("creating socket for", path))?;
    let addr = SocketAddrUnix::new(target.as_path()).map_err(sys("socket address", path))?;
    match connect(&probe, &addr) {
        Err(Errno::CONNREFUSED) => Ok(Probe::Stale),
        Err(Errno::NOENT) => Ok(Probe::Gone),
        // Connected, or the backlog is full (EAGAIN): someone is listening.
        Ok(()) | Err(Errno::AGAIN) => Ok(Probe::Live),
        Err(e) => Err(sys("probing", path)(e)),
    }
}

/// The directory of `path` (`.` for a bare name).
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
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

    /// A link planted at the socket's path (in `/tmp`, say) is refused and stays; the file it
    /// points to keeps its mode and contents, and no socket appears where it points.
    #[test]
    fn a_link_at_the_path_is_refused_never_followed() {
        let path = test_path("link");
        let target = test_path("link-target");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let mut config = ListenerConfig::new(&path);
        config.mode = 0o666;
        assert!(matches!(
            Listener::bind(&config),
            Err(ListenerError::NotASocket(_))
        ));
        assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
        assert_ne!(mode, 0o666);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&target).unwrap();
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
