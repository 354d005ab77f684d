//! The server programs as users run them: `ivshmem-server` (foreground and daemon) and
//! `ivshm serve`, each checked with a raw v0 peer and a clean SIGTERM shutdown.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ivshm_test_support::process::{
    start_daemon, terminate_pid, DaemonGuard, HostProcess, Signal, Stream,
};
use ivshm_test_support::v0::{RawPeer, Received};
use ivshm_test_support::WAIT_GUARD as GUARD;
use rustix::process::Pid;

fn temp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ivshm-bin-{tag}-{}", std::process::id()))
}

/// Waits for the server's `listening on PATH` line; returns PATH.
fn wait_listening(server: &HostProcess) -> PathBuf {
    let line = server
        .wait_line(Stream::Stderr, "listening on", GUARD, |l| {
            l.starts_with("listening on ")
        })
        .unwrap();
    PathBuf::from(line.trim_start_matches("listening on "))
}

/// Waits (with the guard) for a stderr line containing `needle`; returns it.
fn wait_line(server: &HostProcess, needle: &str) -> String {
    server
        .wait_line_containing(Stream::Stderr, needle, GUARD)
        .unwrap()
}

/// Connects to `socket` and checks the handshake of the first peer: 0, id 0, -1 + shm of
/// `size`, 0 + fd × vectors.
fn first_peer(socket: &Path, size: u64, vectors: usize) -> RawPeer {
    let mut peer = RawPeer::connect(socket);
    let joined = peer.handshake(vectors, &[]);
    assert_eq!(joined.id, 0);
    assert_eq!(rustix::fs::fstat(&joined.shm).unwrap().st_size as u64, size);
    peer
}

#[test]
fn ivshmem_server_foreground_serves_and_stops_on_sigterm() {
    let socket = temp("fg.sock");
    let shm_name = format!("ivshm-bin-fg-{}", std::process::id());
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshmem-server"));
    command
        .args(["-F", "-v", "-S"])
        .arg(&socket)
        .args(["-M", &shm_name, "-l3M", "-n", "2"]);
    let mut server = HostProcess::spawn("ivshmem-server -F", command).unwrap();
    let bind = format!("create & bind socket {}", socket.display());
    server.wait_stdout_line(&bind, GUARD).unwrap();
    // 3 MiB is rounded up to 4 MiB (silently, as QEMU does) for QEMU's power-of-two BAR.
    let _peer = first_peer(&socket, 4 << 20, 2);
    server.wait_stdout_line("new peer id = 0", GUARD).unwrap();
    assert!(server.terminate(GUARD).unwrap().success());
    assert!(!socket.exists(), "socket removed on exit");
    // Like QEMU 7.2's server, the shm object is removed at exit.
    assert!(!PathBuf::from(format!("/dev/shm/{shm_name}")).exists());
    let stdout = server.lines(Stream::Stdout);
    assert_eq!(
        stdout[stdout.len() - 3..],
        ["server disconnected", "close server", "free peer 0"]
    );
    assert_eq!(server.lines(Stream::Stderr), Vec::<String>::new());
}

#[test]
fn ivshmem_server_daemonizes_after_it_listens_and_writes_its_pid_file() {
    let socket = temp("daemon.sock");
    let pid_file = temp("daemon.pid");
    let dir = temp("daemon-dir");
    let output = temp("daemon.out");
    std::fs::create_dir_all(&dir).unwrap();
    // Like QEMU's, the daemon keeps the launcher's stdout and stderr (a file here).
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshmem-server"));
    command
        .arg("-S")
        .arg(&socket)
        .arg("-p")
        .arg(&pid_file)
        .arg("-m")
        .arg(&dir)
        .args(["-l", "1M"]);
    // When the launcher has exited, the daemon serves and its pid file exists.
    let (pid, _daemon) = start_daemon(command, &output, &pid_file, GUARD);
    let _peer = first_peer(&socket, 1 << 20, 1);
    // A new session: the daemon leads its own; and it kept the working directory.
    let daemon = Pid::from_raw(pid as i32).unwrap();
    assert_eq!(rustix::process::getsid(Some(daemon)).unwrap(), daemon);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        std::env::current_dir().unwrap()
    );
    terminate_pid(pid, GUARD);
    assert!(!socket.exists());
    assert!(!pid_file.exists());
    // The file in -m DIR was never visible by name.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir(&dir).unwrap();
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "server disconnected\n"
    );
    std::fs::remove_file(&output).unwrap();
}

#[test]
fn ivshmem_server_daemon_start_failures_are_the_launchers_exit_code() {
    let dir = temp("daemon-fail");
    std::fs::create_dir_all(&dir).unwrap();
    let shm_name = format!("ivshm-bin-daemon-fail-{}", std::process::id());
    // Neither start should leave a daemon; if one does, it goes with the test.
    let _daemons = DaemonGuard::new(&shm_name);
    let run = |pid_file: &Path, socket: &Path| {
        Command::new(env!("CARGO_BIN_EXE_ivshmem-server"))
            .arg("-S")
            .arg(socket)
            .arg("-p")
            .arg(pid_file)
            .args(["-M", &shm_name])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The pid file cannot be written: QEMU's launcher has exited 0 by then; ours says 1.
    let socket = dir.join("sock");
    let out = run(&dir.join("no/such/dir/pid"), &socket);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "cannot write pid file: No such file or directory\n"
    );
    assert!(!socket.exists());
    assert!(!PathBuf::from(format!("/dev/shm/{shm_name}")).exists());
    // The socket cannot be bound: QEMU fails before it forks, and so do we.
    let out = run(&dir.join("pid"), &dir.join("no/such/dir/sock"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "cannot bind\n");
    assert!(!dir.join("pid").exists());
    assert!(!PathBuf::from(format!("/dev/shm/{shm_name}")).exists());
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn ivshmem_server_rejects_verbose_in_daemon_mode() {
    let output = Command::new(env!("CARGO_BIN_EXE_ivshmem-server"))
        .arg("-v")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot use verbose in daemon mode"),
        "{stderr}"
    );
}

#[test]
fn ivshm_serve_runs_in_the_foreground_and_cleans_up() {
    let socket = temp("serve.sock");
    let pid_file = temp("serve.pid");
    let shm_name = format!("ivshm-bin-serve-{}", std::process::id());
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--pidfile")
        .arg(&pid_file)
        .args(["--backend", "shm", "--shm-name", &shm_name])
        .args(["--size", "2M", "--vectors", "3", "--socket-mode", "660"]);
    let mut server = HostProcess::spawn("ivshm serve", command).unwrap();
    assert_eq!(wait_listening(&server), socket);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::symlink_metadata(&socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o660);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        server.pid().to_string()
    );
    let _peer = first_peer(&socket, 2 << 20, 3);
    assert!(server.terminate(GUARD).unwrap().success());
    assert!(!socket.exists());
    assert!(!pid_file.exists());
    // Without --keep-shm the shm object is removed.
    assert!(!PathBuf::from(format!("/dev/shm/{shm_name}")).exists());
}

#[test]
fn ivshm_serve_refuses_non_power_of_two_when_asked() {
    let socket = temp("refuse.sock");
    let output = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(["--size", "3M", "--pow2", "refuse"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a power of two"), "{stderr}");
    assert!(!socket.exists());
}

/// Starts `ivshm serve` under `sh -c "ulimit -n LIMIT; exec ..."` (no limit when `None`) with
/// its output captured.
fn spawn_serve_with_log(args: &[&str], fd_limit: Option<u32>) -> HostProcess {
    let ulimit = fd_limit.map_or(String::new(), |n| format!("ulimit -n {n}; "));
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{ulimit}exec \"$0\" serve \"$@\""))
        .arg(env!("CARGO_BIN_EXE_ivshm"))
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    HostProcess::spawn("ivshm serve", command).unwrap()
}

#[test]
fn ivshm_serve_says_when_it_rounds_the_size_up() {
    let socket = temp("pow2.sock");
    let socket_arg = socket.to_string_lossy().to_string();
    let mut server = spawn_serve_with_log(&["--socket", &socket_arg, "--size", "3M"], None);
    let line = wait_line(&server, "not a power of two");
    assert!(line.contains("rounded up to 4 MiB"), "{line}");
    wait_line(&server, "listening on");
    let _peer = first_peer(&socket, 4 << 20, 1);
    assert!(server.terminate(GUARD).unwrap().success());
}

#[test]
fn ivshm_serve_out_of_fds_refuses_says_what_to_do_and_keeps_serving() {
    let socket = temp("emfile.sock");
    let socket_arg = socket.to_string_lossy().to_string();
    let mut server = spawn_serve_with_log(&["--socket", &socket_arg, "--vectors", "2"], Some(24));
    wait_line(&server, "listening on");
    let _first = first_peer(&socket, 4 << 20, 2);
    // Each peer costs the server 3 fds; within 24 fds some connection must be refused
    // (closed before any message).
    let mut peers = Vec::new();
    let refused = (0..24).any(|_| {
        let mut peer = RawPeer::connect(&socket);
        if peer.closed_before_any_message() {
            return true;
        }
        peer.expect(0, false);
        peers.push(peer);
        false
    });
    assert!(refused, "no connection was refused within the fd limit");
    let line = wait_line(&server, "out of file descriptors");
    assert!(line.contains("open file limit 24"), "{line}");
    assert!(line.contains("raise the hard limit"), "{line}");
    // Once a peer has left (the server logs it), a new one is served again.
    peers.clear();
    wait_line(&server, "left: closed its connection");
    let mut again = RawPeer::connect(&socket);
    again.expect(0, false);
    assert!(server.terminate(GUARD).unwrap().success());
    assert!(!socket.exists());
}

#[test]
fn ivshm_serve_cleans_up_on_sigint_too() {
    let socket = temp("sigint.sock");
    let pid_file = temp("sigint.pid");
    let socket_arg = socket.to_string_lossy().to_string();
    let pid_arg = pid_file.to_string_lossy().to_string();
    let mut server = spawn_serve_with_log(&["--socket", &socket_arg, "--pidfile", &pid_arg], None);
    wait_line(&server, "listening on");
    assert!(pid_file.exists() && socket.exists());
    let mut peer = first_peer(&socket, 4 << 20, 1);
    server.signal(Signal::INT);
    assert!(server.wait_exit(GUARD).unwrap().success());
    assert!(!socket.exists(), "socket removed on SIGINT");
    assert!(!pid_file.exists(), "pid file removed on SIGINT");
    // The peer sees its connection closed.
    assert!(matches!(peer.receive(), Received::Closed));
}
