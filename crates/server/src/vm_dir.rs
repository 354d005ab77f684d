//! Every file-system operation on the socket root and the VM directories in it: making them
//! with their owner, group and mode, binding sockets in them, removing them. The rest of the
//! server names files in a VM directory only through [`VmDirectory`].
//!
//! VM directories are owned by (or writable for) the users running the VMs; keeping the path
//! operations here keeps the place to defend against planted links and races small.

use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{Gid, Mode, Uid};
use rustix::io::Errno;
use thiserror::Error;

use crate::config::ListenerConfig;
use crate::group::GroupError;
use crate::listener::{Listener, ListenerError};
use crate::named::DirectoryConfig;

/// The socket root or a VM directory cannot be set up.
#[derive(Debug, Error)]
pub enum DirError {
    /// The socket root's path cannot be made absolute (factory answers carry absolute paths).
    #[error("{}: {source}", path.display())]
    Absolute {
        /// The socket root as configured.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating the socket root failed.
    #[error("creating {}: {source}", path.display())]
    CreateRoot {
        /// The socket root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating a VM directory failed.
    #[error("creating {}: {source}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
    /// A socket's name no longer names the socket the server bound (replaced or a link).
    #[error("{} is no longer the socket the server bound; left alone", path.display())]
    Replaced {
        /// The path.
        path: PathBuf,
    },
    /// The VM directory's path exists and is not a directory.
    #[error("{} exists and is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The directory's group cannot be resolved.
    #[error("group of {}: {source}", path.display())]
    Group {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: GroupError,
    },
    /// Changing the owner of a directory or socket failed.
    #[error("changing owner of {}: {source}", path.display())]
    Owner {
        /// The directory or socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
    /// Changing the mode of a directory failed.
    #[error("changing mode of {}: {source}", path.display())]
    Mode {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
    /// A socket in a VM directory cannot be bound.
    #[error(transparent)]
    Socket(#[from] ListenerError),
}

/// Makes `root` absolute (against the working directory), creating it with mode 0755 if it
/// does not exist. Returns the absolute path.
pub(crate) fn make_root(root: &Path) -> Result<PathBuf, DirError> {
    let root = std::path::absolute(root).map_err(|source| DirError::Absolute {
        path: root.to_path_buf(),
        source,
    })?;
    if root.is_dir() {
        return Ok(root);
    }
    std::fs::create_dir_all(&root).map_err(|source| DirError::CreateRoot {
        path: root.clone(),
        source,
    })?;
    rustix::fs::chmod(&root, Mode::from_raw_mode(0o755)).map_err(|source| DirError::Mode {
        path: root.clone(),
        source,
    })?;
    Ok(root)
}

/// `root` made absolute, if it can be (for comparing a reloaded root with the one in use).
pub(crate) fn absolute_root(root: &Path) -> PathBuf {
    std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf())
}

/// A VM's directory `<root>/<vm>/`.
#[derive(Debug)]
pub(crate) struct VmDirectory {
    path: PathBuf,
}

impl VmDirectory {
    /// Makes (or reuses) the directory of VM `name` under `root` and gives it the mode, owner
    /// and group of `config`.
    pub(crate) fn create(
        root: &Path,
        name: &str,
        config: &DirectoryConfig,
    ) -> Result<VmDirectory, DirError> {
        let dir = VmDirectory {
            path: root.join(name),
        };
        dir.ensure(config)?;
        Ok(dir)
    }

    /// Makes the directory if it is missing and gives it the mode, owner and group of `config`
    /// (sockets in it keep theirs).
    pub(crate) fn ensure(&self, config: &DirectoryConfig) -> Result<(), DirError> {
        let path = &self.path;
        match rustix::fs::mkdir(path, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(source) => {
                return Err(DirError::Create {
                    path: path.clone(),
                    source,
                })
            }
        }
        if !path.is_dir() {
            return Err(DirError::NotADirectory { path: path.clone() });
        }
        let gid = config
            .group
            .as_ref()
            .map(|g| g.resolve())
            .transpose()
            .map_err(|source| DirError::Group {
                path: path.clone(),
                source,
            })?;
        if config.owner.is_some() || gid.is_some() {
            rustix::fs::chown(
                path,
                config.owner.map(Uid::from_raw),
                gid.map(Gid::from_raw),
            )
            .map_err(|source| DirError::Owner {
                path: path.clone(),
                source,
            })?;
        }
        rustix::fs::chmod(path, Mode::from_raw_mode(config.dir_mode)).map_err(|source| {
            DirError::Mode {
                path: path.clone(),
                source,
            }
        })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of file `name` in the directory.
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Binds socket `name` in the directory with the directory's socket mode and group, owned
    /// by the directory's owner (so that a VMM running as that user can connect), if one is
    /// configured.
    pub(crate) fn bind(&self, name: &str, config: &DirectoryConfig) -> Result<Listener, DirError> {
        let path = self.file(name);
        let listener = Listener::bind(&ListenerConfig {
            path: path.clone(),
            mode: config.socket_mode,
            group: config.group.clone(),
        })?;
        if let Some(owner) = config.owner {
            rustix::fs::chown(&path, Some(Uid::from_raw(owner)), None)
                .map_err(|source| DirError::Owner { path, source })?;
        }
        Ok(listener)
    }

    /// Gives the existing socket `name` in the directory the socket mode, group and owner of
    /// `config` (a reload that changed them), provided the file is still the socket bound as
    /// `identity` (device, inode). Safe against a planted link or a swapped file: the
    /// directory is opened without following a link, the name is opened `O_PATH|O_NOFOLLOW`
    /// relative to it and checked (a socket, the same inode), and the changes go to that open
    /// file through `/proc/self/fd` — never to whatever the name points at by then.
    pub(crate) fn restamp(
        &self,
        name: &str,
        identity: (u64, u64),
        config: &DirectoryConfig,
    ) -> Result<(), DirError> {
        use rustix::fs::{FileType, OFlags};
        use std::os::fd::AsRawFd;
        let path = self.file(name);
        let owner_error = |source| DirError::Owner {
            path: path.clone(),
            source,
        };
        let dir = rustix::fs::open(
            &self.path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| DirError::Create {
            path: self.path.clone(),
            source,
        })?;
        let file = rustix::fs::openat(
            &dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(owner_error)?;
        let stat = rustix::fs::fstat(&file).map_err(owner_error)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::Socket
            || (stat.st_dev, stat.st_ino) != identity
        {
            return Err(DirError::Replaced { path: path.clone() });
        }
        let gid = config
            .group
            .as_ref()
            .map(|g| g.resolve())
            .transpose()
            .map_err(|source| DirError::Group {
                path: path.clone(),
                source,
            })?;
        // The open file itself, whatever the name points at now.
        let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
        if config.owner.is_some() || gid.is_some() {
            rustix::fs::chown(
                by_fd.as_str(),
                config.owner.map(Uid::from_raw),
                gid.map(Gid::from_raw),
            )
            .map_err(owner_error)?;
        }
        rustix::fs::chmod(by_fd.as_str(), Mode::from_raw_mode(config.socket_mode)).map_err(
            |source| DirError::Mode {
                path: path.clone(),
                source,
            },
        )
    }

    /// Removes the directory if it is empty (its sockets are gone).
    pub(crate) fn remove_if_empty(&self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}
