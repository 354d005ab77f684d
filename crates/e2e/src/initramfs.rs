//! Building the guest's initramfs: busybox, optional extra files (e.g. the static `ivshm`),
//! kernel modules loaded at boot, and an `/init` that runs an interactive shell on the serial
//! console as its child (PID 1 is never the interactive shell) and starts a new one whenever
//! it exits.
//!
//! Images are uncompressed newc cpio archives (the kernel needs no decompressor, which is
//! faster under TCG), cached by content hash in `<cache>/initramfs/<hash>.cpio`.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::cpio::CpioWriter;

/// Printed by `/init` once the shell is about to start; [`crate::QemuGuest::wait_ready`]
/// waits for it.
pub const READY_MARKER: &str = "IVSHM-E2E-READY";
/// Printed by `/init` at the start of a line when a boot step failed (e.g. `insmod`).
pub const ERROR_MARKER: &str = "IVSHM-E2E-ERROR";
/// Printed by `/init` (followed by ` status=<N>, ...`) when the console shell exited; `/init`
/// then starts a new one.
pub const SHELL_EXITED_MARKER: &str = "IVSHM-E2E-SHELL-EXITED";

/// Cached images unused for this long are deleted when a new one is written (each use
/// refreshes an image's modification time).
const PRUNE_AFTER: Duration = Duration::from_secs(3600);

/// Building the initramfs failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum InitramfsError {
    /// {what} {path}: {error}
    ///
    /// Reading an input file or writing the image failed.
    Io {
        /// What was being done.
        what: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// guest path {0:?} must be absolute and must not contain `..`
    ///
    /// A guest path is not absolute or contains `..`.
    BadGuestPath(String),
}

/// A file copied from the host into the guest image.
#[derive(Debug, Clone)]
struct GuestFile {
    guest_path: String,
    host_path: PathBuf,
    mode: u32,
}

/// What goes into a guest initramfs. Build it with [`InitramfsSpec::build`].
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    busybox: PathBuf,
    files: Vec<GuestFile>,
    modules: Vec<PathBuf>,
    init_commands: Vec<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|error| InitramfsError::Io {
        what: "reading",
        path: path.to_path_buf(),
        error,
    })
}

fn module_file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || "module.ko".to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn check_guest_path(path: &str) -> Result<(), InitramfsError> {
    if !path.starts_with('/') || path.split('/').any(|part| part == "..") || path == "/" {
        return Err(InitramfsError::BadGuestPath(path.to_string()));
    }
    Ok(())
}

/// Every ancestor directory of `path` (without the root), e.g. `/a/b/c` → `/a`, `/a/b`.
fn ancestors(path: &str) -> impl Iterator<Item = String> + '_ {
    path.match_indices('/')
        .skip(1)
        .map(move |(index, _)| path[..index].to_string())
}

impl InitramfsSpec {
    /// An image with busybox (from `busybox`, a static binary) and the standard `/init`.
    pub fn new(busybox: impl Into<PathBuf>) -> Self {
        Self {
            busybox: busybox.into(),
            files: Vec::new(),
            modules: Vec::new(),
            init_commands: Vec::new(),
        }
    }

    /// Copies `host_path` into the image at `guest_path` (absolute) with permission `mode`.
    pub fn file(
        &mut self,
        guest_path: &str,
        host_path: impl Into<PathBuf>,
        mode: u32,
    ) -> &mut Self {
        self.files.push(GuestFile {
            guest_path: guest_path.to_string(),
            host_path: host_path.into(),
            mode,
        });
        self
    }

    /// Adds a kernel module (`.ko`, uncompressed) to `/lib/modules/` and loads it at boot,
    /// in the order added. A failed load prints an [`ERROR_MARKER`] line.
    pub fn module(&mut self, host_path: impl Into<PathBuf>) -> &mut Self {
        self.modules.push(host_path.into());
        self
    }

    /// Adds a shell command `/init` runs after mounting and loading modules, before the
    /// ready marker.
    pub fn init_command(&mut self, line: impl Into<String>) -> &mut Self {
        self.init_commands.push(line.into());
        self
    }

    /// The `/init` script. It stays PID 1 and runs the console shell as a child (in its own
    /// session, with the console as controlling terminal, without job control so no job
    /// notices land in command output); orphans are reparented to `/init`, which reaps them.
    ///
    /// Busybox's shell exits (status 0, as on end of input) when one of its background jobs
    /// ends while it reads the console. So `/init` respawns it, printing
    /// [`SHELL_EXITED_MARKER`]: a plain `cmd &` works, only shell variables set by earlier
    /// commands are lost. [`crate::QemuGuest::spawn_background`] detaches its command from
    /// the shell (`( ( cmd ) & )`), so the shell never sees it end.
    pub fn init_script(&self) -> String {
        let mut script = String::from(
            "#!/bin/sh\n\
             /bin/busybox --install -s\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sysfs /sys\n\
             mount -t devtmpfs devtmpfs /dev\n\
             mount -t tmpfs tmpfs /tmp\n\
             dmesg -n 1\n",
        );
        for module in &self.modules {
            let name = module_file_name(module);
            script.push_str(&format!(
                "insmod /lib/modules/{name} || echo \"{ERROR_MARKER}: insmod {name} failed\"\n"
            ));
        }
        for line in &self.init_commands {
            script.push_str(line);
            script.push('\n');
        }
        script.push_str(&format!(
            "export PS1='' PS2=''\n\
             stty -echo\n\
             echo {READY_MARKER}\n\
             while :; do\n\
             setsid cttyhack sh +m\n\
             echo \"{SHELL_EXITED_MARKER} status=$?, starting a new shell\"\n\
             done\n"
        ));
        script
    }

    /// Writes the image (or finds it cached) under `<cache_dir>/initramfs/` and returns its path.
    pub fn build(&self, cache_dir: &Path) -> Result<PathBuf, InitramfsError> {
        for file in &self.files {
            check_guest_path(&file.guest_path)?;
        }
        let busybox = read(&self.busybox)?;
        let files = self
            .files
            .iter()
            .map(|f| Ok((f, read(&f.host_path)?)))
            .collect::<Result<Vec<_>, InitramfsError>>()?;
        let modules = self
            .modules
            .iter()
            .map(|m| Ok((module_file_name(m), read(m)?)))
            .collect::<Result<Vec<_>, InitramfsError>>()?;
        let init = self.init_script();

        let mut hasher = DefaultHasher::new();
        (&busybox, &init).hash(&mut hasher);
        for (file, contents) in &files {
            (&file.guest_path, file.mode, contents).hash(&mut hasher);
        }
        for (name, contents) in &modules {
            (name, contents).hash(&mut hasher);
        }
        let dir = cache_dir.join("initramfs");
        let path = dir.join(format!("{:016x}.cpio", hasher.finish()));
        if path.is_file() {
            // Refresh the time so pruning by other test processes keeps it (best effort).
            let _ = std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(path);
        }
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |error| InitramfsError::Io { what, path, error }
        };
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        prune(&dir);

        let mut directories: BTreeSet<String> = [
            "/bin",
            "/sbin",
            "/usr",
            "/usr/bin",
            "/usr/sbin",
            "/dev",
            "/proc",
            "/sys",
            "/tmp",
            "/run",
            "/root",
            "/etc",
            "/lib",
            "/lib/modules",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        for (file, _) in &files {
            directories.extend(ancestors(&file.guest_path));
        }
        // Unique per process and call: concurrent builders each write their own file and the
        // rename makes one of them the cached image.
        static BUILDS: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.{}.{}.tmp",
            hasher.finish(),
            std::process::id(),
            BUILDS.fetch_add(1, Ordering::Relaxed)
        ));
        let out = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        let write = || -> std::io::Result<()> {
            let mut cpio = CpioWriter::new(std::io::BufWriter::new(out));
            for directory in &directories {
                cpio.directory(directory, 0o755)?;
            }
            cpio.char_device("/dev/console", 0o600, 5, 1)?;
            cpio.file("/bin/busybox", 0o755, &busybox)?;
            cpio.symlink("/bin/sh", "busybox")?;
            cpio.file("/init", 0o755, init.as_bytes())?;
            for (name, contents) in &modules {
                cpio.file(&format!("/lib/modules/{name}"), 0o644, contents)?;
            }
            for (file, contents) in &files {
                cpio.file(&file.guest_path, file.mode, contents)?;
            }
            cpio.finish()?
                .into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()
        };
        if let Err(error) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(InitramfsError::Io {
                what: "writing",
                path: tmp,
                error,
            });
        }
        std::fs::rename(&tmp, &path).map_err(io("renaming to", &path))?;
        Ok(path)
    }
}

/// Deletes cached images not modified for [`PRUNE_AFTER`] (best effort).
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age > PRUNE_AFTER);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_an_archive_once_and_reuses_it() {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let busybox = dir.join("busybox");
        let module = dir.join("x.ko");
        let tool = dir.join("tool");
        std::fs::write(&busybox, b"not really busybox").unwrap();
        std::fs::write(&module, b"module bytes").unwrap();
        std::fs::write(&tool, b"tool bytes").unwrap();
        let mut spec = InitramfsSpec::new(&busybox);
        spec.module(&module).file("/opt/bin/tool", &tool, 0o755);

        let first = spec.build(dir.path()).unwrap();
        let second = spec.build(dir.path()).unwrap();
        assert_eq!(first, second);
        let bytes = std::fs::read(&first).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        for needle in [
            "dev/console\0",
            "bin/busybox\0",
            "not really busybox",
            "lib/modules/x.ko\0",
            "module bytes",
            "opt/bin\0",
            "opt/bin/tool\0",
            "tool bytes",
            "insmod /lib/modules/x.ko",
            "TRAILER!!!",
        ] {
            assert!(text.contains(needle), "{needle:?} missing");
        }

        // Different contents, different image.
        std::fs::write(&tool, b"other tool").unwrap();
        assert_ne!(spec.build(dir.path()).unwrap(), first);
    }

    #[test]
    fn ancestors_lists_parent_directories() {
        assert_eq!(ancestors("/a/b/c").collect::<Vec<_>>(), vec!["/a", "/a/b"]);
        assert_eq!(ancestors("/a").count(), 0);
    }

    #[test]
    fn guest_paths_must_be_absolute_without_dotdot() {
        check_guest_path("/bin/ivshm").unwrap();
        assert!(check_guest_path("bin/ivshm").is_err());
        assert!(check_guest_path("/a/../b").is_err());
        assert!(check_guest_path("/").is_err());
    }

    #[test]
    fn init_loads_modules_then_runs_the_shell_as_a_child() {
        let mut spec = InitramfsSpec::new("/bin/busybox");
        spec.module("/x/vfio.ko")
            .module("/x/vfio-pci.ko")
            .init_command("echo hi");
        let script = spec.init_script();
        let vfio = script.find("insmod /lib/modules/vfio.ko").unwrap();
        let vfio_pci = script.find("insmod /lib/modules/vfio-pci.ko").unwrap();
        let hi = script.find("echo hi").unwrap();
        let ready = script.find(READY_MARKER).unwrap();
        assert!(vfio < vfio_pci && vfio_pci < hi && hi < ready);
        let shell = script.find("\nsetsid cttyhack sh +m\n").unwrap();
        assert!(ready < shell);
        assert!(!script.contains("exec "), "PID 1 must not become the shell");
        assert!(script[..shell].ends_with("\nwhile :; do"));
        assert!(script.trim_end().ends_with("done"));
    }
}
