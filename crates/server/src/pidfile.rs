//! A pid file that is removed again when the server stops.
//!
//! A pid file often lives in a directory others can write (`/tmp`, a shared run directory), so
//! nothing here follows a link planted at its path:
//! - the pid is written to a fresh file of our own in the same directory, created relative to
//!   a directory fd with `O_CREAT | O_EXCL | O_NOFOLLOW` (which never opens an existing entry,
//!   a symlink included), then renamed over the path: `rename` replaces the directory entry
//!   itself, so a symlink there is replaced and its target left untouched, and a reader sees
//!   the old file or the whole new one, never a half-written one;
//! - on drop the path is removed only if it still names our file (same device and inode,
//!   looked up without following a link; the file is kept open meanwhile, so that no other
//!   file can get its inode number), so a file someone put there since stays.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::dir_fd::{identity, Dir, Identity};

/// cannot write pid file {path}: {error}
///
/// The pid file could not be written.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct PidFileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub error: std::io::Error,
}

/// A written pid file; removed on drop if the path still names it.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// The directory holding it.
    dir: Dir,
    /// Its name in `dir`.
    name: OsString,
    /// The file we wrote, held open so that its inode number stays its own.
    _file: OwnedFd,
    /// Its device and inode.
    identity: Identity,
}

/// Temporary names tried before giving up (each is taken only if some other file has it).
const TEMPORARY_NAME_TRIES: u32 = 100;

impl PidFile {
    /// Writes this process's pid (and a newline) to `path`, replacing what was there (a stale
    /// pid file, or a symlink, which is replaced and never followed). `path` must end in a
    /// file name; a directory there is an error.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        let err = |error: std::io::Error| PidFileError {
            path: path.to_path_buf(),
            error,
        };
        let name = path.file_name().ok_or_else(|| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path does not end in a file name",
            ))
        })?;
        let dir_path = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // The directory is the administrator's choice (its path may have links).
        let dir = Dir::open(dir_path).map_err(|e| err(e.into()))?;
        let pid = std::process::id();
        let (file, identity) = write_replacing(&dir, name, pid).map_err(err)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            dir,
            name: name.to_os_string(),
            _file: file,
            identity,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `pid` into a new file in `dir` and renames it to `name`; returns the file and its
/// device and inode.
fn write_replacing(dir: &Dir, name: &OsStr, pid: u32) -> std::io::Result<(OwnedFd, Identity)> {
    let (file, temporary) = create_temporary(dir, pid)?;
    let written = (|| {
        let stat = rustix::fs::fstat(&file)?;
        let mut file = std::fs::File::from(file);
        writeln!(file, "{pid}")?;
        dir.move_over(&temporary, dir, Path::new(name))?;
        Ok((OwnedFd::from(file), identity(&stat)))
    })();
    if written.is_err() {
        let _ = dir.unlink(&temporary);
    }
    written
}

/// A new, empty file of our own in `dir` (never an existing entry), and its name.
fn create_temporary(dir: &Dir, pid: u32) -> std::io::Result<(OwnedFd, String)> {
    for n in 0..TEMPORARY_NAME_TRIES {
        let temporary = format!(".ivshm-pid-{pid}-{n}.tmp");
        match dir.create_new_file(&temporary, 0o644) {
            Ok(Some(file)) => return Ok((file, temporary)),
            Ok(None) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{TEMPORARY_NAME_TRIES} temporary names next to it are all taken"),
    ))
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if !matches!(self.dir.unlink_if(&self.name, self.identity), Ok(true)) {
            tracing::warn!(path = %self.path.display(), "the pid file is no longer ours; leaving it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ivshm-pid-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn own_pid_line() -> String {
        format!("{}\n", std::process::id())
    }

    #[test]
    fn written_and_removed() {
        let dir = scratch("plain");
        let path = dir.join("pid");
        let pid = PidFile::create(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), own_pid_line());
        assert_eq!(entries(&dir), ["pid"], "no temporary file left behind");
        drop(pid);
        assert!(!path.exists());
        std::fs::remove_dir(dir).unwrap();
    }

    #[test]
    fn a_stale_pid_file_is_replaced() {
        let dir = scratch("stale");
        let path = dir.join("pid");
        std::fs::write(&path, "1\n").unwrap();
        let pid = PidFile::create(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), own_pid_line());
        drop(pid);
        assert!(!path.exists());
        std::fs::remove_dir(dir).unwrap();
    }

    /// A symlink planted at the path is replaced by the pid file; the file it points to is
    /// neither written nor removed, and a dangling link's target is not created.
    #[test]
    fn a_planted_symlink_is_replaced_never_followed() {
        let dir = scratch("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.join("pid");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let pid = PidFile::create(&path).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), own_pid_line());
        drop(pid);
        assert!(!path.exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        let absent = dir.join("absent");
        std::os::unix::fs::symlink(&absent, &path).unwrap();
        drop(PidFile::create(&path).unwrap());
        assert!(!absent.exists(), "the dangling link's target was created");
        assert_eq!(entries(&dir), ["victim"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// When the path names something else by the time the server stops (a link, another
    /// file), that stays.
    #[test]
    fn only_our_own_file_is_removed() {
        let dir = scratch("replaced");
        let path = dir.join("pid");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let pid = PidFile::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        drop(pid);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unwritable_is_an_error_and_leaves_nothing() {
        PidFile::create(Path::new("/nonexistent/dir/pid")).unwrap_err();
        let dir = scratch("isdir");
        std::fs::create_dir(dir.join("pid")).unwrap();
        let err = PidFile::create(&dir.join("pid")).unwrap_err();
        assert!(err.to_string().contains("pid"), "{err}");
        assert_eq!(entries(&dir), ["pid"], "the temporary file is removed");
        PidFile::create(Path::new("/")).unwrap_err();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
