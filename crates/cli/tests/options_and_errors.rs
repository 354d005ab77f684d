//! Options are honoured or refused, never ignored, and errors say what to do: found by walking
//! through the docs as a new user (issue 13).
//!
//! - `--shm-name`, `--keep-shm` and `--dir` without the backend they belong to, and numbers
//!   that would do nothing (`region create --vectors 0`, `bench doorbell --rounds 0`), are
//!   usage errors (exit 2, clap's message naming the flag);
//! - no control socket, a peer refused at a region's peer limit and a stale socket say what
//!   happened and what to do;
//! - a cause is printed once, and a start that fails never logs that it serves.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use ivshm_test_support::process::{HostProcess, Stream};
use ivshm_test_support::WAIT_GUARD as GUARD;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-opts-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `ivshm args` to its end, killed after the guard timeout (a flag that is ignored
/// instead of refused starts a server that would never end).
fn ivshm(args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.args(args).env_remove("RUST_LOG");
    let mut process = HostProcess::spawn("ivshm", command).unwrap();
    let code = match process.wait_exit(GUARD) {
        Ok(status) => status.code(),
        Err(e) => panic!("ivshm {args:?} did not end: {e}"),
    };
    (code, process.output(Stream::Stderr))
}

/// Asserts exit status `code` and that stderr contains every one of `needles`; returns stderr.
fn fails(args: &[&str], code: i32, needles: &[&str]) -> String {
    let (status, stderr) = ivshm(args);
    assert_eq!(status, Some(code), "ivshm {args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "ivshm {args:?}: no {needle:?} in {stderr}"
        );
    }
    stderr
}

#[test]
fn backend_options_without_their_backend_are_refused() {
    let dir = scratch("backend");
    let socket = dir.join("s.sock");
    let socket = socket.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--shm-name", "x"],
            "--shm-name applies only to --backend shm",
        ),
        (&["--keep-shm"], "--keep-shm applies only to --backend shm"),
        (
            &["--dir", "/dev/hugepages"],
            "--dir applies only to --backend dir",
        ),
        (
            &["--backend", "shm", "--dir", "/tmp"],
            "the backend is shm; add --backend dir",
        ),
        (&["--backend", "dir"], "--backend dir needs --dir DIR"),
    ];
    for (flags, message) in cases {
        let mut args = vec!["serve", "--socket", socket];
        args.extend_from_slice(flags);
        fails(&args, 2, &[message, "Usage: ivshm serve"]);
        assert!(!Path::new(socket).exists(), "{args:?} started a server");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn numbers_that_would_do_nothing_are_refused_alike() {
    fails(&["serve", "--vectors", "0"], 2, &["--vectors"]);
    fails(
        &["region", "create", "r", "--size", "4K", "--vectors", "0"],
        2,
        &["--vectors <N>", "0 is not in 1..=64"],
    );
    fails(
        &["region", "create", "r", "--size", "4K", "--vectors", "65"],
        2,
        &["--vectors <N>"],
    );
    fails(
        &["region", "create", "r", "--size", "4K", "--peer-limit", "0"],
        2,
        &["--peer-limit <N>"],
    );
    fails(
        &["bench", "doorbell", "--rounds", "0"],
        2,
        &["--rounds <N>"],
    );
    fails(&["bench", "join", "--peers", "10,0"], 2, &["--peers <N>"]);
    fails(&["bench", "join", "--vectors", "0"], 2, &["--vectors <N>"]);
    fails(
        &["guest", "bench", "--peer", "0", "--count", "0"],
        2,
        &["--count <N>"],
    );
}

#[test]
fn no_control_socket_says_which_server_has_one_and_how_to_point_at_it() {
    let dir = scratch("control");
    let missing = dir.join("control.sock");
    let stderr = fails(
        &["regions", "--control", missing.to_str().unwrap()],
        1,
        &[
            &format!("connecting to the control socket {}", missing.display()),
            "no server listens there",
            "ivshm serve --config FILE",
            "--control PATH",
        ],
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // A socket file with nobody behind it.
    drop(UnixListener::bind(&missing).unwrap());
    fails(
        &["stats", "--control", missing.to_str().unwrap()],
        1,
        &["no server listens on it", "ivshm serve --config FILE"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stale_socket_in_a_vm_directory_names_both_ways_to_start_a_server() {
    let dir = scratch("stale");
    let socket = dir.join("mem.sock");
    drop(UnixListener::bind(&socket).unwrap());
    fails(
        &["peers", "--socket", socket.to_str().unwrap()],
        1,
        &[
            "no server listens on it",
            "ivshm serve --socket PATH",
            "ivshm serve --config FILE",
        ],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_peer_refused_at_the_peer_limit_is_told_so() {
    let dir = scratch("limit");
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[[region]]\nname = \"small\"\nsize = 4096\nvectors = 1\n\
             peer_limit = 1\n[vm.vm0]\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.arg("serve").arg("--config").arg(&config);
    let mut server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    server
        .wait_line_containing(Stream::Stderr, "factory.sock", GUARD)
        .unwrap();
    let socket = root.join("vm0/small.sock");
    let mut listen = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    listen.arg("listen").arg("--socket").arg(&socket);
    let listener = HostProcess::spawn("ivshm listen", listen).unwrap();
    listener
        .wait_line_containing(Stream::Stdout, "self id=0", GUARD)
        .unwrap();
    fails(
        &["peers", "--socket", socket.to_str().unwrap()],
        1,
        &["refused this peer", "peer limit", "ivshm regions"],
    );
    drop(listener);
    assert!(server.terminate(GUARD).unwrap().success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_cause_is_printed_once_and_a_failed_start_never_claims_to_serve() {
    let dir = scratch("once");
    let socket = dir.join("s.sock");
    let stderr = fails(
        &[
            "serve",
            "--socket",
            socket.to_str().unwrap(),
            "--socket-group",
            "no-such-group-ivshm",
        ],
        1,
        &["no group named \"no-such-group-ivshm\""],
    );
    assert_eq!(stderr.matches("no group named").count(), 1, "{stderr}");
    assert!(!stderr.contains("serving"), "{stderr}");

    // A start that succeeds says what it serves, before it says it listens.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.arg("serve").arg("--socket").arg(&socket);
    let mut server = HostProcess::spawn("ivshm serve", command).unwrap();
    server
        .wait_line_containing(Stream::Stderr, "listening on", GUARD)
        .unwrap();
    let log = server.lines(Stream::Stderr);
    let serving = log.iter().position(|l| l.contains("serving 4 MiB"));
    let listening = log.iter().position(|l| l.contains("listening on"));
    assert!(serving.is_some() && serving < listening, "{log:#?}");
    assert!(server.terminate(GUARD).unwrap().success());
    let _ = std::fs::remove_dir_all(dir);
}
