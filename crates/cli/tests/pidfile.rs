//! `ivshm serve --pidfile` and `ivshmem-server -p` with a symlink planted at the pid file's
//! path: the link is replaced by the pid file, the file it points to stays untouched while the
//! server runs and after it stopped, and the pid file goes on exit.

use std::path::{Path, PathBuf};
use std::process::Command;

use ivshm_test_support::process::{start_daemon, terminate_pid, HostProcess, Stream};
use ivshm_test_support::WAIT_GUARD as GUARD;

const PRECIOUS: &[u8] = b"precious: must stay as it is\n";

/// A fresh directory with `victim` (a file with [`PRECIOUS`]) and `pid` (a symlink to it).
fn planted(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ivshm-pidfile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, PRECIOUS).unwrap();
    let pid = dir.join("pid");
    std::os::unix::fs::symlink(&victim, &pid).unwrap();
    (dir, victim, pid)
}

/// The pid file is a regular file (not the link) holding `pid`; the victim is untouched.
fn assert_replaced(pid_file: &Path, victim: &Path, pid: u32) {
    assert_eq!(
        std::fs::read(victim).unwrap(),
        PRECIOUS,
        "the link was followed"
    );
    let meta = std::fs::symlink_metadata(pid_file).unwrap();
    assert!(meta.is_file(), "the pid file is {meta:?}");
    assert_eq!(
        std::fs::read_to_string(pid_file).unwrap(),
        format!("{pid}\n")
    );
}

#[test]
fn ivshm_serve_replaces_a_planted_pidfile_link_and_never_follows_it() {
    let (dir, victim, pid_file) = planted("serve");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .arg("--pidfile")
        .arg(&pid_file);
    let mut server = HostProcess::spawn("ivshm serve", command).unwrap();
    server
        .wait_line_containing(Stream::Stderr, "listening on", GUARD)
        .unwrap();
    assert_replaced(&pid_file, &victim, server.pid());
    assert!(server.terminate(GUARD).unwrap().success());
    assert!(!pid_file.exists(), "the pid file is removed on exit");
    assert_eq!(std::fs::read(&victim).unwrap(), PRECIOUS);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ivshmem_server_daemon_replaces_a_planted_pidfile_link_and_never_follows_it() {
    let (dir, victim, pid_file) = planted("dropin");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshmem-server"));
    command
        .arg("-S")
        .arg(dir.join("s.sock"))
        .arg("-p")
        .arg(&pid_file)
        .arg("-m")
        .arg(&dir)
        .args(["-l", "64K"]);
    // The launcher exits once the daemon has written its pid file.
    let (pid, _daemon) = start_daemon(command, &dir.join("log"), &pid_file, GUARD);
    assert_replaced(&pid_file, &victim, pid);
    terminate_pid(pid, GUARD);
    assert!(!pid_file.exists(), "the pid file is removed on exit");
    assert_eq!(std::fs::read(&victim).unwrap(), PRECIOUS);
    std::fs::remove_dir_all(dir).unwrap();
}
