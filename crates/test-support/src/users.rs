//! Acting as another user inside a test: a thread whose credentials are an unprivileged user's.
//!
//! Linux keeps credentials per thread (the C library's `setuid` changes every thread; the raw
//! system calls change only the caller), and a thread inherits the credentials of the thread
//! that creates it. So a test running as root can start a thread that becomes `nobody` and
//! plays the attacker (a VM's user planting links in its own directory), or that starts an
//! in-process server which then runs as `nobody` (its own thread inherits the credentials),
//! while the rest of the test process stays root. Changing every uid away from 0 also clears
//! the thread's capabilities, as for a real unprivileged process.
//!
//! Resource limits (`RLIMIT_NOFILE`) stay per process: a test that lowers them needs its own
//! test binary.

use std::thread::JoinHandle;

use rustix::fs::{Gid, Uid};
use rustix::io::Errno;

/// `nobody`'s uid on Debian (and most distributions).
pub const NOBODY_UID: u32 = 65534;
/// `nogroup`'s gid on Debian (`nobody` on Fedora).
pub const NOGROUP_GID: u32 = 65534;

/// Whether this process may act as another user (it runs as root). Tests that need it print
/// `SKIPPED: ...` and return when it may not.
pub fn can_switch_users() -> bool {
    rustix::process::geteuid().is_root()
}

/// Makes the calling thread (only it) run as `uid`:`gid` with no supplementary groups.
pub fn become_user(uid: u32, gid: u32) -> Result<(), Errno> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    rustix::thread::set_thread_res_uid(uid, uid, uid)
}

/// Runs `f` on a new thread that is `uid`:`gid` (no supplementary groups) from its first
/// instruction; threads it starts are that user too. Panics if the switch fails.
pub fn spawn_as<T: Send + 'static>(
    uid: u32,
    gid: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::spawn(move || {
        become_user(uid, gid).unwrap_or_else(|e| panic!("becoming uid {uid} gid {gid}: {e}"));
        f()
    })
}

/// Runs `f` as `uid`:`gid` on a thread of its own and returns its result (for starting
/// something that must run as that user, such as an in-process server, whose threads inherit
/// the credentials).
pub fn run_as<T: Send + 'static>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_as(uid, gid, f)
        .join()
        .unwrap_or_else(|_| panic!("the thread running as uid {uid} panicked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_runs_as_nobody_while_the_process_stays_root() {
        if !can_switch_users() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let (uid, gid) = run_as(NOBODY_UID, NOGROUP_GID, || {
            (rustix::process::geteuid(), rustix::process::getegid())
        });
        assert_eq!((uid.as_raw(), gid.as_raw()), (NOBODY_UID, NOGROUP_GID));
        assert!(rustix::process::geteuid().is_root());
        // Root's files are out of reach of the switched thread.
        let denied = run_as(NOBODY_UID, NOGROUP_GID, || {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/etc/passwd")
                .is_err()
        });
        assert!(denied);
    }
}
