//! Locating what a guest needs: the kernel and modules fetched by `scripts/guest-assets`,
//! busybox, and QEMU itself.
//!
//! Tests call [`require_e2e!`](crate::require_e2e) which returns the [`GuestAssets`] or
//! skips the test (loudly) when they are missing and `IVSHM_E2E=1` is not set.

use std::path::{Path, PathBuf};

use crate::workspace;

/// The environment variable that makes missing assets an error instead of a skip.
pub const E2E_ENV: &str = "IVSHM_E2E";
/// The environment variable naming the guest asset cache directory.
pub const CACHE_ENV: &str = "IVSHM_CACHE";
/// The QEMU program the harness runs.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";
/// Where Debian's `busybox-static` installs busybox.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// The VFIO modules in the order they must be loaded (names of `<cache>/modules/<name>.ko`).
pub const VFIO_MODULES: &[&str] = &[
    "irqbypass",
    "vfio",
    "vfio_iommu_type1",
    "vfio_virqfd",
    "vfio-pci-core",
    "vfio-pci",
];

/// Something a guest needs is missing.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum AssetsError {
    /// {what} not found at {path} (run scripts/install-deps and scripts/guest-assets)
    ///
    /// A file is not where it should be.
    Missing {
        /// What the file is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// {QEMU_PROGRAM:} not found on PATH (run scripts/install-deps)
    ///
    /// QEMU is not on `PATH`.
    NoQemu,
}

/// Everything needed to boot a test guest.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// The guest kernel (`<cache>/vmlinuz`).
    pub kernel: PathBuf,
    /// The directory of `.ko` files (`<cache>/modules`).
    pub modules_dir: PathBuf,
    /// The static busybox binary.
    pub busybox: PathBuf,
    /// The `qemu-system-x86_64` program.
    pub qemu: PathBuf,
    /// The cache directory itself (initramfs images are cached under it).
    pub cache_dir: PathBuf,
}

/// Whether `IVSHM_E2E=1` is set, i.e. end-to-end tests must run and not skip.
pub fn e2e_required() -> bool {
    std::env::var(E2E_ENV).is_ok_and(|v| v == "1")
}

/// The guest asset cache directory: `$IVSHM_CACHE`, default `<repo>/.cache/guest`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace::root().join(".cache").join("guest"),
    }
}

/// What a test does with something it needs: `Ok(Some(found))`; or, when it is missing,
/// `Ok(None)` after a loud `SKIPPED: <test>: <error>` line, unless `IVSHM_E2E=1` makes the
/// error the result.
pub fn skip_unless_required<T, E: std::fmt::Display>(
    test_name: &str,
    found: Result<T, E>,
) -> Result<Option<T>, E> {
    match found {
        Ok(found) => Ok(Some(found)),
        Err(err) if e2e_required() => Err(err),
        Err(err) => {
            eprintln!("SKIPPED: {test_name}: {err} (set {E2E_ENV}=1 to make this an error)");
            Ok(None)
        }
    }
}

fn require_file(what: &'static str, path: PathBuf) -> Result<PathBuf, AssetsError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(AssetsError::Missing { what, path })
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

impl GuestAssets {
    /// Finds all assets; fails naming the first one missing.
    pub fn locate() -> Result<Self, AssetsError> {
        let cache_dir = cache_dir();
        let kernel = require_file("guest kernel", cache_dir.join("vmlinuz"))?;
        let modules_dir = cache_dir.join("modules");
        for module in VFIO_MODULES {
            require_file(
                "guest kernel module",
                modules_dir.join(format!("{module}.ko")),
            )?;
        }
        let busybox = require_file("static busybox", PathBuf::from(BUSYBOX_PATH))?;
        let qemu = find_on_path(QEMU_PROGRAM).ok_or(AssetsError::NoQemu)?;
        Ok(Self {
            kernel,
            modules_dir,
            busybox,
            qemu,
            cache_dir,
        })
    }

    /// For tests: `Ok(Some(assets))` when everything is there, `Ok(None)` after printing a loud
    /// `SKIPPED:` line when something is missing and `IVSHM_E2E` is not `1`, and the error when
    /// something is missing and `IVSHM_E2E=1`.
    pub fn for_test(test_name: &str) -> Result<Option<Self>, AssetsError> {
        skip_unless_required(test_name, Self::locate())
    }

    /// The path of module `name` (without `.ko`) in the cache.
    pub fn module(&self, name: &str) -> PathBuf {
        self.modules_dir.join(format!("{name}.ko"))
    }

    /// The kernel path, for messages.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }
}

/// The running test's name: `<module>::<thread name>` (libtest names each test's thread
/// after the test), or just `module` outside a test thread.
pub fn current_test_name(module: &str) -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => format!("{module}::{name}"),
        _ => module.to_string(),
    }
}

/// Returns the [`GuestAssets`] for an end-to-end test, or returns from the calling test after
/// printing `SKIPPED: ...` to stderr when they are missing and `IVSHM_E2E=1` is not set.
/// With `IVSHM_E2E=1`, missing assets fail the test.
///
/// ```no_run
/// # fn main() {
/// let assets = ivshm_e2e::require_e2e!();
/// # let _ = assets;
/// # }
/// ```
#[macro_export]
macro_rules! require_e2e {
    () => {
        match $crate::assets::GuestAssets::for_test(&$crate::assets::current_test_name(
            module_path!(),
        )) {
            Ok(Some(assets)) => assets,
            Ok(None) => return,
            Err(err) => panic!(
                "end-to-end assets missing and {}=1: {err}",
                $crate::assets::E2E_ENV
            ),
        }
    };
}
