//! Building the `ivshm` program: statically linked for guests, normally for the host; and the
//! C library's static archive for C programs in guests ([`crate::c_chat`]).
//!
//! Each is built at most once per test process ([`OnceLock`]); across processes a lock file
//! (`flock`) serialises the builds (Cargo also locks its target directory).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rustix::fs::{flock, FlockOperation};

use crate::workspace;

/// The target triple of the static guest binary.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The package holding the `ivshm` binary.
pub const CLI_PACKAGE: &str = "ivshm-cli";
/// The name of the program.
pub const IVSHM_BIN: &str = "ivshm";
/// The package of the C library.
pub const CAPI_PACKAGE: &str = "ivshm-capi";
/// The C library's static archive.
pub const CAPI_STATICLIB: &str = "libivshm.a";
/// The lock file serialising the static builds across test processes.
const STATIC_LOCK: &str = "e2e-static-build.lock";

/// A build failed.
#[derive(Debug, Clone, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum BuildError {
    /// cannot run {what}: {message}
    ///
    /// `cargo` could not be started or the lock file could not be taken.
    Io {
        /// What was being done.
        what: String,
        /// The I/O error, as text (so the error can be cached and cloned).
        message: String,
    },
    /// `{command}` failed with {status}
    ///
    /// `cargo build` failed.
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
    },
    /// The C compiler failed.
    /// Then, after a line break, what it printed on stderr. A doc comment cannot hold the line
    /// break, so `#[displaydoc]` gives the message.
    #[displaydoc("`{command}` failed with {status}:\n{stderr}")]
    Compile {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// built, but {0} does not exist
    ///
    /// The build succeeded but the binary is not where expected.
    NotFound(PathBuf),
}

fn io_error(what: impl Into<String>, err: impl std::fmt::Display) -> BuildError {
    BuildError::Io {
        what: what.into(),
        message: err.to_string(),
    }
}

/// Holds an exclusive `flock` on a file until dropped.
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn take(path: &Path) -> Result<Self, BuildError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_error(format!("mkdir {}", dir.display()), e))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io_error(format!("open {}", path.display()), e))?;
        flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| io_error(format!("flock {}", path.display()), e))?;
        Ok(Self { _file: file })
    }
}

fn run_cargo(mut command: Command, lock_name: &str) -> Result<(), BuildError> {
    let _lock = BuildLock::take(&workspace::target_dir().join(lock_name))?;
    let description = format!("{command:?}");
    eprintln!("e2e: building: {description}");
    let status = command
        .current_dir(workspace::root())
        .status()
        .map_err(|e| io_error(&description, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(BuildError::Failed {
            command: description,
            status: status.to_string(),
        })
    }
}

fn existing(path: PathBuf) -> Result<PathBuf, BuildError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(BuildError::NotFound(path))
    }
}

/// The target directory of the static guest build: `<target>/static`.
pub fn static_target_dir() -> PathBuf {
    workspace::target_dir().join("static")
}

/// `cargo {subcommand} -p {package} {args} --target GUEST_TARGET` into `<target>/static`,
/// statically linked (`+crt-static`), debug profile without debug info (smaller guest images).
/// The static `ivshm` and the static `libivshm.a` share this target directory, so their common
/// dependencies are compiled once.
fn static_cargo(subcommand: &str, package: &str, args: &[&str]) -> Command {
    let mut command = Command::new(workspace::cargo());
    command
        .args([subcommand, "-p", package])
        .args(args)
        .args(["--target", GUEST_TARGET])
        .env("CARGO_TARGET_DIR", static_target_dir())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .env("CARGO_PROFILE_DEV_STRIP", "debuginfo")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    command
}

/// Where the static build puts its outputs.
fn static_output_dir() -> PathBuf {
    static_target_dir().join(GUEST_TARGET).join("debug")
}

fn build_static_ivshm() -> Result<PathBuf, BuildError> {
    let command = static_cargo("build", CLI_PACKAGE, &["--bin", IVSHM_BIN]);
    run_cargo(command, STATIC_LOCK)?;
    existing(static_output_dir().join(IVSHM_BIN))
}

fn build_static_libivshm() -> Result<PathBuf, BuildError> {
    // Only the staticlib: a cdylib cannot be linked with +crt-static (cargo would drop it with
    // a warning).
    let command = static_cargo(
        "rustc",
        CAPI_PACKAGE,
        &["--lib", "--crate-type", "staticlib"],
    );
    run_cargo(command, STATIC_LOCK)?;
    existing(static_output_dir().join(CAPI_STATICLIB))
}

fn build_host_ivshm() -> Result<PathBuf, BuildError> {
    let mut command = Command::new(workspace::cargo());
    command.args(["build", "-p", CLI_PACKAGE, "--bin", IVSHM_BIN]);
    run_cargo(command, "e2e-host-build.lock")?;
    existing(workspace::target_dir().join("debug").join(IVSHM_BIN))
}

/// The statically linked `ivshm` for guests (built once per process, debug profile, in
/// `<target>/static`).
pub fn static_ivshm() -> Result<PathBuf, BuildError> {
    static BUILT: OnceLock<Result<PathBuf, BuildError>> = OnceLock::new();
    BUILT.get_or_init(build_static_ivshm).clone()
}

/// The C library's `libivshm.a` for guests, built like [`static_ivshm`] (once per process, in
/// `<target>/static`): C programs linked with it and `cc -static` run in the busybox guest.
pub fn static_libivshm() -> Result<PathBuf, BuildError> {
    static BUILT: OnceLock<Result<PathBuf, BuildError>> = OnceLock::new();
    BUILT.get_or_init(build_static_libivshm).clone()
}

/// The host `ivshm` (`cargo build -p ivshm-cli --bin ivshm`, i.e. `<target>/debug/ivshm`),
/// built once per process.
pub fn host_ivshm() -> Result<PathBuf, BuildError> {
    static BUILT: OnceLock<Result<PathBuf, BuildError>> = OnceLock::new();
    BUILT.get_or_init(build_host_ivshm).clone()
}
