//! Per-test scratch space on the host: a temporary directory and a shared-memory file, both
//! removed on drop.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh directory under the system temporary directory (short paths, so UNIX socket paths
/// inside it stay under the 108-byte limit); removed with its contents on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `/tmp/ivshm-e2e-<pid>-<n>` (or under `$TMPDIR`).
    pub fn new() -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(unique_name("ivshm-e2e"));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A file in `/dev/shm` of a fixed size, for `ivshmem-plain` with `memory-backend-file`;
/// removed on drop. The host reads and writes it with `pread`/`pwrite`, which see the same
/// pages the guest maps.
#[derive(Debug)]
pub struct ShmFile {
    path: PathBuf,
    file: File,
    size: u64,
}

impl ShmFile {
    /// Creates `/dev/shm/ivshm-e2e-<pid>-<n>` of `size` bytes (zero-filled).
    pub fn new(size: u64) -> std::io::Result<Self> {
        let path = Path::new("/dev/shm").join(unique_name("ivshm-e2e"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.set_len(size)?;
        Ok(Self { path, file, size })
    }

    /// The file's path (give it to [`crate::GuestBuilder::ivshmem_plain`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        self.file.read_exact_at(&mut bytes, offset)?;
        Ok(bytes)
    }

    /// Writes `bytes` at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_file_reads_back_writes_and_is_removed() {
        let shm = ShmFile::new(4096).unwrap();
        shm.write_at(100, b"abc").unwrap();
        assert_eq!(shm.read_at(99, 5).unwrap(), b"\0abc\0");
        let path = shm.path().to_path_buf();
        drop(shm);
        assert!(!path.exists());
    }

    #[test]
    fn scratch_dir_is_removed() {
        let dir = ScratchDir::new().unwrap();
        std::fs::write(dir.join("f"), b"x").unwrap();
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }
}
