//! QEMU 7.2's own `ivshmem-server` and `ivshmem-client`, the reference programs the drop-ins
//! are compared with and that interop tests use as peers.
//!
//! `scripts/qemu-ivshmem-tools` builds them from Debian's source package of the installed QEMU
//! into `<repo>/.cache/qemu-ivshmem/<source version>/` and points `.../current` at it. Tests
//! find them through [`QemuTools::locate`]: the directory `$IVSHM_QEMU_TOOLS` if set, else that
//! `current` link. [`require_qemu_tools!`](crate::require_qemu_tools) skips a test (loudly)
//! when they are missing, and fails it under `IVSHM_E2E=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::assets::skip_unless_required;
use crate::workspace;

/// The environment variable naming the directory that holds the two programs.
pub const QEMU_TOOLS_ENV: &str = "IVSHM_QEMU_TOOLS";
/// QEMU's server program.
pub const SERVER: &str = "ivshmem-server";
/// QEMU's client program.
pub const CLIENT: &str = "ivshmem-client";

/// QEMU's {program} not found at {path} (run scripts/qemu-ivshmem-tools, or set {QEMU_TOOLS_ENV:})
///
/// The reference programs are missing.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct MissingTool {
    /// Which program.
    pub program: &'static str,
    /// Where it was looked for.
    pub path: PathBuf,
}

/// The two programs, and the Debian source version they were built from.
#[derive(Debug, Clone)]
pub struct QemuTools {
    /// QEMU's `ivshmem-server`.
    pub server: PathBuf,
    /// QEMU's `ivshmem-client`.
    pub client: PathBuf,
    /// The Debian source version (e.g. `1:7.2+dfsg-7+deb12u18`), or `unknown`.
    pub version: String,
}

/// The directory the programs are looked for in: `$IVSHM_QEMU_TOOLS`, else
/// `<repo>/.cache/qemu-ivshmem/current`.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os(QEMU_TOOLS_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace::root()
            .join(".cache")
            .join("qemu-ivshmem")
            .join("current"),
    }
}

fn executable(program: &'static str, dir: &Path) -> Result<PathBuf, MissingTool> {
    let path = dir.join(program);
    let runnable = std::fs::metadata(&path).is_ok_and(|m| {
        m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
    });
    if runnable {
        Ok(path)
    } else {
        Err(MissingTool { program, path })
    }
}

impl QemuTools {
    /// Finds both programs in [`tools_dir`].
    pub fn locate() -> Result<Self, MissingTool> {
        let dir = tools_dir();
        let server = executable(SERVER, &dir)?;
        let client = executable(CLIENT, &dir)?;
        let version = std::fs::read_to_string(dir.join("version"))
            .map_or_else(|_| "unknown".to_string(), |v| v.trim().to_string());
        Ok(Self {
            server,
            client,
            version,
        })
    }

    /// For tests: `Ok(Some(tools))` when both are there, `Ok(None)` after printing a loud
    /// `SKIPPED:` line when they are missing and `IVSHM_E2E` is not `1`, and the error when
    /// they are missing and `IVSHM_E2E=1`.
    pub fn for_test(test_name: &str) -> Result<Option<Self>, MissingTool> {
        skip_unless_required(test_name, Self::locate())
    }

    /// A command that runs QEMU's `program` with its stdout line-buffered (`stdbuf -oL`): its C
    /// library would buffer a pipe until exit, so a test could not follow it live. The
    /// program's output is unchanged.
    pub fn line_buffered(program: &Path) -> Command {
        let mut command = Command::new("stdbuf");
        command.arg("-oL").arg(program);
        command
    }
}

/// Returns the [`QemuTools`] for a test, or returns from the calling test after printing
/// `SKIPPED: ...` when they are missing and `IVSHM_E2E=1` is not set (with it: fails).
#[macro_export]
macro_rules! require_qemu_tools {
    () => {
        match $crate::qemu_tools::QemuTools::for_test(&$crate::assets::current_test_name(
            module_path!(),
        )) {
            Ok(Some(tools)) => tools,
            Ok(None) => return,
            Err(err) => panic!(
                "QEMU's reference programs missing and {}=1: {err}",
                $crate::assets::E2E_ENV
            ),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_names_the_program_and_the_remedy() {
        let err = executable(SERVER, Path::new("/nonexistent/qemu-tools")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/qemu-tools/ivshmem-server"),
            "{text}"
        );
        assert!(text.contains("scripts/qemu-ivshmem-tools"), "{text}");
    }
}
