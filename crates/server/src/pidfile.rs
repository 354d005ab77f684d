//! A pid file that is removed again when the server stops.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The pid file could not be written.
#[derive(Debug, Error)]
#[error("cannot write pid file {path}: {source}")]
pub struct PidFileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// A written pid file; removed on drop if it still holds our pid.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's pid (and a newline) to `path`, replacing what was there.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        let pid = std::process::id();
        let err = |source| PidFileError {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::create(path).map_err(err)?;
        writeln!(file, "{pid}").map_err(err)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .map(|s| s.trim() == self.pid.to_string())
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_removed() {
        let path = std::env::temp_dir().join(format!("ivshm-pid-{}", std::process::id()));
        let pid = PidFile::create(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(pid);
        assert!(!path.exists());
    }

    #[test]
    fn unwritable_is_an_error() {
        assert!(PidFile::create(Path::new("/nonexistent/dir/pid")).is_err());
    }
}
