//! Every file-system operation on the socket root and the VM directories in it: checking the
//! root, making the VM directories with their owner, group and mode, binding sockets in them,
//! removing them. The rest of the server names files in a VM directory only through
//! [`VmDirectory`].
//!
//! The design (`docs/security.md` has the threat model):
//!
//! - **The root belongs to the server.** It is opened once, refusing a symbolic link, and must
//!   be owned by the server's user and not writable by its group or others; its parent
//!   directories must be owned by root or the server's user and not writable by others unless
//!   sticky. Checked at start and again on every reload (which also notices a root replaced
//!   since start). So nobody else can create, rename or replace a VM directory.
//! - **A VM directory may belong to the VM's user** (`owner`): that user can put anything in it
//!   at any time. The server opens it through the root's fd with `O_NOFOLLOW` (a link is
//!   refused with an error that names it), changes its owner and mode through that fd, and in
//!   it only renames prepared sockets into place and removes names
//!   ([`Listener::bind_in`]): sockets get their owner, group and mode in a private staging
//!   directory first. No call in a VM directory follows a link or changes a file's owner or
//!   mode by name.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Stat};
use rustix::io::Errno;
use thiserror::Error;

use crate::dir_fd::{file_type, identity, set_handle_owner_and_mode, Dir, Identity, OwnerOrMode};
use crate::group::GroupError;
use crate::listener::{probe, Listener, ListenerError, Probe, SocketPerms};
use crate::named::{is_vm_socket_name, DirectoryConfig};

/// Which directory a [`DirError::Writable`] is about; its `Display` ends that message's advice
/// (a parent may instead be made sticky, the root itself may not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritableDir {
    /// The socket root.
    Root,
    /// A parent of the socket root.
    Parent,
}

impl std::fmt::Display for WritableDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Root => Ok(()),
            Self::Parent => f.write_str(" or make it sticky (chmod +t)"),
        }
    }
}

/// The socket root or a VM directory cannot be set up.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum DirError {
    /// {path}: {error}
    ///
    /// The socket root's path cannot be made absolute (factory answers carry absolute paths).
    Absolute {
        /// The socket root as configured.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// creating {path}: {error}
    ///
    /// Creating the socket root failed.
    CreateRoot {
        /// The socket root.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// creating {path}: {error}
    ///
    /// Creating a VM directory failed.
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: Errno,
    },
    /// opening {path}: {error}
    ///
    /// Opening the socket root or a VM directory failed.
    Open {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: Errno,
    },
    /// {path} is a symbolic link; refusing to follow it (the server would create sockets and change
    /// owners and modes wherever it points): replace it with a directory
    ///
    /// The socket root or a VM directory is a symbolic link.
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// {path} exists and is not a directory
    ///
    /// The VM directory's path exists and is not a directory.
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// {path} is owned by uid {uid}, not by {expected}: its owner could replace the server's
    /// directories with links; make it {expected}'s or choose another root
    ///
    /// The socket root (or one of its parents) belongs to another user.
    Owner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Who should own it.
        expected: String,
    },
    /// {path} is writable by its group or others (mode {mode:04o}): they could replace the server's
    /// directories with links; remove the write permission (chmod go-w){which}
    ///
    /// The socket root (or one of its parents) is writable by others.
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// The root or a parent of it (a sticky parent is safe).
        which: WritableDir,
    },
    /// {path} is no longer the directory the server started with (it was removed or replaced);
    /// restart the server
    ///
    /// The socket root is not the directory the server started with.
    RootReplaced {
        /// The socket root.
        path: PathBuf,
    },
    /// {path} is no longer the socket the server bound; left alone
    ///
    /// A socket's name no longer names the socket the server bound (replaced or a link).
    Replaced {
        /// The path.
        path: PathBuf,
    },
    /// group of {path}: {error}
    ///
    /// The directory's group cannot be resolved.
    Group {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: GroupError,
    },
    /// changing owner of {path}: {error}
    ///
    /// Changing the owner of a directory failed.
    ChangeOwner {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: Errno,
    },
    /// changing mode of {path}: {error}
    ///
    /// Changing the mode of a directory failed.
    Mode {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: Errno,
    },
    /// {0}
    ///
    /// A socket in a VM directory cannot be bound.
    Socket(ListenerError),
}

impl From<ListenerError> for DirError {
    fn from(error: ListenerError) -> Self {
        Self::Socket(error)
    }
}

/// `root` made absolute, if it can be (for comparing a reloaded root with the one in use).
pub(crate) fn absolute_root(root: &Path) -> PathBuf {
    std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf())
}

/// The socket root, held open and checked (see the module docs).
#[derive(Debug)]
pub(crate) struct SocketRoot {
    dir: Dir,
    id: Identity,
}

impl SocketRoot {
    /// Makes `root` absolute (against the working directory), creates it with mode 0755 if it
    /// does not exist, opens it and checks it and its parents.
    pub(crate) fn open(root: &Path) -> Result<SocketRoot, DirError> {
        let root = std::path::absolute(root).map_err(|error| DirError::Absolute {
            path: root.to_path_buf(),
            error,
        })?;
        if let Some(parent) = root.parent() {
            std::fs::create_dir_all(parent).map_err(|error| DirError::CreateRoot {
                path: root.clone(),
                error,
            })?;
            check_parents(parent)?;
        }
        let created = match rustix::fs::mkdir(&root, rustix::fs::Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(error) => {
                return Err(DirError::CreateRoot {
                    path: root,
                    error: error.into(),
                })
            }
        };
        let dir = open_dir(&root, Dir::open_no_link(&root))?;
        if created {
            // The umask may have left group or other write bits.
            dir.set_owner_and_mode(None, None, 0o755)
                .map_err(|e| owner_or_mode_error(&root, e))?;
        }
        let stat = dir.stat().map_err(|error| DirError::Open {
            path: root.clone(),
            error,
        })?;
        check_own(&root, &stat)?;
        Ok(SocketRoot {
            id: identity(&stat),
            dir,
        })
    }

    /// The root's absolute path.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Checks the root again (on reload): the same directory as at start, still the server's
    /// and not writable by others, parents included.
    pub(crate) fn recheck(&self) -> Result<(), DirError> {
        let path = self.dir.path();
        if let Some(parent) = path.parent() {
            check_parents(parent)?;
        }
        let now = open_dir(path, Dir::open_no_link(path))?;
        let stat = now.stat().map_err(|error| DirError::Open {
            path: path.to_path_buf(),
            error,
        })?;
        if identity(&stat) != self.id {
            return Err(DirError::RootReplaced {
                path: path.to_path_buf(),
            });
        }
        check_own(path, &stat)
    }

    /// Removes VM directory `dir` if it is empty (its sockets are gone).
    fn remove_if_empty(&self, dir: &VmDirectory) {
        let _ = self.dir.remove_dir_if(&dir.name, dir.id);
    }
}

/// Opens a directory, turning `ELOOP` into [`DirError::Symlink`] and `ENOTDIR` into
/// [`DirError::NotADirectory`].
fn open_dir(path: &Path, opened: Result<Dir, Errno>) -> Result<Dir, DirError> {
    opened.map_err(|error| match error {
        Errno::LOOP => DirError::Symlink {
            path: path.to_path_buf(),
        },
        Errno::NOTDIR => DirError::NotADirectory {
            path: path.to_path_buf(),
        },
        error => DirError::Open {
            path: path.to_path_buf(),
            error,
        },
    })
}

fn owner_or_mode_error(path: &Path, e: OwnerOrMode) -> DirError {
    match e {
        OwnerOrMode::Owner(error) => DirError::ChangeOwner {
            path: path.to_path_buf(),
            error,
        },
        OwnerOrMode::Mode(error) => DirError::Mode {
            path: path.to_path_buf(),
            error,
        },
    }
}

/// The server's own directory: owned by its user, not writable by group or others.
fn check_own(path: &Path, stat: &Stat) -> Result<(), DirError> {
    let euid = rustix::process::geteuid().as_raw();
    if stat.st_uid != euid {
        return Err(DirError::Owner {
            path: path.to_path_buf(),
            uid: stat.st_uid,
            expected: format!("the server's user (uid {euid})"),
        });
    }
    if stat.st_mode & 0o022 != 0 {
        return Err(DirError::Writable {
            path: path.to_path_buf(),
            mode: stat.st_mode & 0o7777,
            which: WritableDir::Root,
        });
    }
    Ok(())
}

/// Every directory the root's path goes through (following links as the kernel does, and the
/// directories the links themselves are in): owned by root or the server's user, and not
/// writable by group or others unless sticky (like `/tmp`, where nobody can rename another's
/// entries).
fn check_parents(parent: &Path) -> Result<(), DirError> {
    let euid = rustix::process::geteuid().as_raw();
    let mut checked = std::collections::BTreeSet::new();
    // Each prefix of the path as written, resolved: covers the directories links live in and
    // the ones they lead to.
    for prefix in parent.ancestors() {
        let Ok(real) = std::fs::canonicalize(prefix) else {
            continue;
        };
        for dir in real.ancestors() {
            if !checked.insert(dir.to_path_buf()) {
                continue;
            }
            let stat = rustix::fs::stat(dir).map_err(|error| DirError::Open {
                path: dir.to_path_buf(),
                error,
            })?;
            if stat.st_uid != 0 && stat.st_uid != euid {
                return Err(DirError::Owner {
                    path: dir.to_path_buf(),
                    uid: stat.st_uid,
                    expected: format!("root or the server's user (uid {euid})"),
                });
            }
            let sticky = stat.st_mode & 0o1000 != 0;
            if stat.st_mode & 0o022 != 0 && !sticky {
                return Err(DirError::Writable {
                    path: dir.to_path_buf(),
                    mode: stat.st_mode & 0o7777,
                    which: WritableDir::Parent,
                });
            }
        }
    }
    Ok(())
}

/// A VM's directory `<root>/<vm>/`, held open.
#[derive(Debug)]
pub(crate) struct VmDirectory {
    name: String,
    dir: Dir,
    id: Identity,
}

impl VmDirectory {
    /// Makes (or reuses) the directory of VM `name` in `root` and gives it the mode, owner and
    /// group of `config`. A link (or anything but a directory) at its name is an error.
    pub(crate) fn create(
        root: &SocketRoot,
        name: &str,
        config: &DirectoryConfig,
    ) -> Result<VmDirectory, DirError> {
        let path = root.dir.join(name);
        root.dir
            .make_child(name, 0o700)
            .map_err(|error| DirError::Create {
                path: path.clone(),
                error,
            })?;
        let dir = open_dir(&path, root.dir.open_child(name))?;
        let stat = dir.stat().map_err(|error| DirError::Open {
            path: path.clone(),
            error,
        })?;
        if file_type(&stat) != FileType::Directory {
            return Err(DirError::NotADirectory { path });
        }
        let vm_dir = VmDirectory {
            name: name.to_string(),
            dir,
            id: identity(&stat),
        };
        vm_dir.ensure(config)?;
        Ok(vm_dir)
    }

    /// Gives the directory the mode, owner and group of `config` (sockets in it keep theirs).
    pub(crate) fn ensure(&self, config: &DirectoryConfig) -> Result<(), DirError> {
        let path = self.dir.path();
        let gid = config
            .group
            .as_ref()
            .map(|g| g.resolve())
            .transpose()
            .map_err(|error| DirError::Group {
                path: path.to_path_buf(),
                error,
            })?;
        self.dir
            .set_owner_and_mode(config.owner, gid, config.dir_mode)
            .map_err(|e| owner_or_mode_error(path, e))
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path of file `name` in the directory.
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Binds socket `name` in the directory with the directory's socket mode and group, owned
    /// by the directory's owner (so that a VMM running as that user can connect), if one is
    /// configured.
    pub(crate) fn bind(&self, name: &str, config: &DirectoryConfig) -> Result<Listener, DirError> {
        let group = config
            .group
            .as_ref()
            .map(|g| g.resolve())
            .transpose()
            .map_err(ListenerError::from)?;
        let perms = SocketPerms {
            mode: config.socket_mode,
            owner: config.owner,
            group,
        };
        Ok(Listener::bind_in(&self.dir, Path::new(name), &perms)?)
    }

    /// Gives the existing socket `name` in the directory the socket mode, group and owner of
    /// `config` (a reload that changed them), provided the file is still the socket bound as
    /// `identity` (device, inode). Safe against a planted link or a swapped file: the name is
    /// opened `O_PATH|O_NOFOLLOW` relative to the directory's fd and checked (a socket, the
    /// same inode), and the changes go to that open file — never to whatever the name points
    /// at by then.
    pub(crate) fn restamp(
        &self,
        name: &str,
        identity: Identity,
        config: &DirectoryConfig,
    ) -> Result<(), DirError> {
        let path = self.file(name);
        let file = self.dir.open_entry(name).map_err(|error| DirError::Open {
            path: path.clone(),
            error,
        })?;
        let stat = rustix::fs::fstat(&file).map_err(|error| DirError::Open {
            path: path.clone(),
            error,
        })?;
        if file_type(&stat) != FileType::Socket || crate::dir_fd::identity(&stat) != identity {
            return Err(DirError::Replaced { path });
        }
        let gid = config
            .group
            .as_ref()
            .map(|g| g.resolve())
            .transpose()
            .map_err(|error| DirError::Group {
                path: path.clone(),
                error,
            })?;
        set_handle_owner_and_mode(file.as_fd(), config.owner, gid, config.socket_mode)
            .map_err(|e| owner_or_mode_error(&path, e))
    }

    /// Removes the sockets nobody listens on from the directory: a server that was killed
    /// (or lost power) leaves its sockets behind, and a run-time region's socket would then
    /// refuse every connection until a restart of the server binds that name again, which
    /// nothing does. Only entries with the names the server gives sockets (`*.sock`) that are
    /// sockets (examined without following a link, relative to the directory's fd) and refuse
    /// a connection (probed through an `O_PATH` handle on that very file) are removed, and
    /// only while the name still is that file. Links, other files, other names and sockets
    /// someone listens on stay. Returns the paths removed.
    pub(crate) fn remove_stale_sockets(&self) -> Vec<PathBuf> {
        let names = match self.dir.names() {
            Ok(names) => names,
            Err(errno) => {
                tracing::warn!(
                    directory = %self.path().display(),
                    %errno,
                    "cannot list the directory to remove stale sockets"
                );
                return Vec::new();
            }
        };
        let mut removed = Vec::new();
        for name in names {
            let Some(text) = name.to_str().filter(|n| is_vm_socket_name(n)) else {
                continue;
            };
            let path = self.file(text);
            let Ok(Some(stat)) = self.dir.entry(text) else {
                continue;
            };
            if file_type(&stat) != FileType::Socket {
                continue;
            }
            match probe(&self.dir, Path::new(text), &path) {
                Ok(Probe::Stale) => match self.dir.unlink_if(text, identity(&stat)) {
                    Ok(true) => removed.push(path),
                    Ok(false) => {}
                    Err(errno) => tracing::warn!(
                        path = %path.display(),
                        %errno,
                        "cannot remove a stale socket"
                    ),
                },
                Ok(Probe::Live | Probe::Gone) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        removed
    }

    /// Removes the directory if it is empty (its sockets are gone).
    pub(crate) fn remove_if_empty(&self, root: &SocketRoot) {
        root.remove_if_empty(self);
    }
}
