//! `ivshm-test-support`: what the ivshm crates' tests share, in one place instead of a copy per
//! test directory. Used only as a dev-dependency (and by the `ivshm-e2e` harness); never
//! published.
//!
//! - [`v0`]: a raw protocol-version-0 peer that checks every message a server sends
//!   ([`v0::RawPeer`]), the way QEMU's `ivshmem` device sees a server.
//! - [`fds`]: waiting for an fd with a guard timeout, ringing and reading eventfds, counting
//!   this process's open fds.
//! - [`process`]: child processes whose stdout and stderr are captured line by line, with
//!   waits for a line and for the exit (every wait bounded, failures show the last lines).
//! - [`orphan`]: children that die with the test process.
//! - [`sysfs`]: a fake Linux sysfs tree (PCI functions, drivers, IOMMU groups) for guest-side
//!   tests without a VM.
//! - [`users`]: threads that act as an unprivileged user (the attacker of the server's
//!   hardening tests, or an in-process server that must not be root).
//!
//! Every wait here has a failure guard ([`WAIT_GUARD`] unless the caller gives one): a test
//! that hangs fails with a message instead; no wait is a timing assertion.

use std::time::Duration;

pub mod fds;
pub mod orphan;
pub mod process;
pub mod sysfs;
pub mod users;
pub mod v0;

/// The failure guard of every wait that takes no timeout: long enough for a loaded 2-core
/// machine, short enough that a hung test fails in reasonable time.
pub const WAIT_GUARD: Duration = Duration::from_secs(30);

/// A UNIX socket path no other caller in this process gets:
/// `$TMPDIR/ivshm-test-<tag>-<pid>-<n>.sock` (not created; a stale file from an earlier run of
/// the same pid is removed).
pub fn socket_path(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("ivshm-test-{tag}-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}
