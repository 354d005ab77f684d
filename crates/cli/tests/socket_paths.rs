//! A socket path longer than a socket address holds (107 bytes) is refused up front, before
//! anything is created, by every program and command that takes one (with the limit and the
//! length; the drop-in server in QEMU's words): none may listen where no client can connect.

use std::path::{Path, PathBuf};
use std::process::Command;

use ivshm_test_support::process::{HostProcess, Stream};
use ivshm_test_support::WAIT_GUARD;

/// A fresh directory with a short path, and in it a socket path of 108 bytes.
fn scratch(tag: &str) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("ivshm-sp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let name = "s".repeat(107 - dir.as_os_str().len());
    let long = dir.join(name).to_str().unwrap().to_string();
    assert_eq!(long.len(), 108);
    (dir, long)
}

/// Runs `program args` in `dir` (killed if it does not exit within the guard); returns its
/// exit status and stderr.
fn run(program: &str, args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let mut command = Command::new(program);
    command.args(args).current_dir(dir).env("RUST_LOG", "warn");
    let mut process = HostProcess::spawn(program, command).unwrap();
    let status = process
        .wait_exit(WAIT_GUARD)
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    (status.code(), process.lines(Stream::Stderr).join("\n"))
}

/// Exit status `code`, the limit and the length on stderr, nothing listening, nothing created.
fn assert_refused(program: &str, args: &[&str], dir: &Path, code: i32) {
    let (status, stderr) = run(program, args, dir);
    let what = format!("{program} {args:?}: {stderr}");
    assert_eq!(status, Some(code), "{what}");
    assert!(stderr.contains("is 108 bytes long"), "{what}");
    assert!(stderr.contains("at most 107 bytes"), "{what}");
    assert!(!stderr.contains("listening on"), "{what}");
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert!(left.is_empty(), "{what}: created {left:?}");
}

#[test]
fn every_command_refuses_a_socket_path_too_long_for_a_socket_address() {
    let ivshm = env!("CARGO_BIN_EXE_ivshm");
    let (dir, long) = scratch("ivshm");
    let s = long.as_str();
    for args in [
        &["serve", "--socket", s][..],
        &["peers", "--socket", s],
        &["notify", "--socket", s, "--peer", "0", "--vector", "0"],
        &["listen", "--socket", s],
        &["read", "--socket", s, "--offset", "0", "--len", "1"],
        &["write", "--socket", s, "--offset", "0", "00"],
        &["regions", "--control", s],
        &["vms", "--control", s],
        &["stats", "--control", s],
        &["reload", "--control", s],
        &["region", "create", "x", "--size", "4K", "--control", s],
        &["region", "remove", "x", "--control", s],
        &["guest", "bench", "--peer", "0", "--socket", s],
    ] {
        assert_refused(ivshm, args, &dir, 2);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The drop-in server refuses the path before it creates anything, in QEMU's words: `cannot
/// bind` on stderr, and with `-v` QEMU's `could not copy unix socket path` on stdout. (The
/// drop-in client, like QEMU's, retries every second whatever the reason, and with `-v` says
/// the same.)
#[test]
fn the_drop_in_server_refuses_a_socket_path_too_long_for_a_socket_address() {
    let (dir, long) = scratch("dropin");
    let server = env!("CARGO_BIN_EXE_ivshmem-server");
    for verbose in [false, true] {
        let mut args = vec!["-F", "-S", long.as_str(), "-m", "."];
        if verbose {
            args.push("-v");
        }
        let mut command = Command::new(server);
        command.args(&args).current_dir(&dir);
        let mut process = HostProcess::spawn(server, command).unwrap();
        let status = process.wait_exit(WAIT_GUARD).unwrap();
        let (stdout, stderr) = (process.lines(Stream::Stdout), process.lines(Stream::Stderr));
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr:?}");
        assert_eq!(stderr, ["cannot bind"], "{args:?}");
        assert_eq!(
            stdout
                .iter()
                .any(|l| l == "could not copy unix socket path"),
            verbose,
            "{args:?}: {stdout:?}"
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{args:?}: created {left:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The configuration file's sockets: the control socket, and in each VM directory the socket
/// of a region with the longest name.
#[test]
fn serve_config_refuses_a_root_too_long_for_its_sockets() {
    let ivshm = env!("CARGO_BIN_EXE_ivshm");
    let (dir, _) = scratch("config");
    let root = dir.join("r".repeat(107 - 13 - dir.as_os_str().len()));
    let file = std::env::temp_dir().join(format!("ivshm-sp-{}.toml", std::process::id()));
    std::fs::write(&file, format!("root = {:?}\n", root.to_str().unwrap())).unwrap();
    let file_arg = file.to_str().unwrap();
    assert_refused(ivshm, &["serve", "--config", file_arg], &dir, 1);
    assert_refused(
        ivshm,
        &["policy", "check", "--config", file_arg, "--vm", "v", "x"],
        &dir,
        1,
    );
    // root (39 bytes) + "/" + VM (31) + "/" + region name (31) + ".sock" = 108 bytes.
    let root = dir.join("r".repeat(39 - 1 - dir.as_os_str().len()));
    assert_eq!(root.as_os_str().len(), 39);
    let vm = "v".repeat(31);
    std::fs::write(
        &file,
        format!("root = {:?}\n[vm.{vm}]\n", root.to_str().unwrap()),
    )
    .unwrap();
    let (status, stderr) = run(ivshm, &["serve", "--config", file_arg], &dir);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("a region socket in it"), "{stderr}");
    assert!(stderr.contains("more than the 107 bytes"), "{stderr}");
    std::fs::remove_file(file).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
