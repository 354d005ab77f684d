//! The server programs as users run them: `ivshmem-server` (foreground and daemon) and
//! `ivshm serve`, each checked with a raw v0 peer and a clean SIGTERM shutdown.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{kill_process, pidfd_open, Pid, PidfdFlags, Signal};

mod common;
use common::{stream_stderr, wait_line, Peer, Received};

/// Failure guard for every wait (never a timing assertion).
const GUARD: Duration = Duration::from_secs(30);

fn temp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ivshm-bin-{tag}-{}", std::process::id()))
}

/// Reads the child's stderr until a `listening on PATH` line; returns PATH.
fn wait_listening(child: &mut Child) -> PathBuf {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(path) = line.strip_prefix("listening on ") {
                let _ = tx.send(PathBuf::from(path));
            }
        }
    });
    rx.recv_timeout(GUARD)
        .expect("server did not report listening")
}

/// Waits (with the guard) for process `pid` to exit.
fn wait_exit(pid: u32) {
    let pid = Pid::from_raw(pid as i32).unwrap();
    let Ok(pidfd) = pidfd_open(pid, PidfdFlags::empty()) else {
        return; // already gone
    };
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let limit = rustix::time::Timespec {
        tv_sec: GUARD.as_secs() as i64,
        tv_nsec: 0,
    };
    assert_eq!(
        poll(&mut fds, Some(&limit)).unwrap(),
        1,
        "process did not exit"
    );
}

fn terminate(pid: u32) {
    kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::TERM).unwrap();
    wait_exit(pid);
}

impl Peer {
    /// Checks the handshake of the first peer: 0, id 0, -1 + shm of `size`, 0 + fd × vectors.
    fn first_handshake(&mut self, size: u64, vectors: usize) {
        let (v, fd) = self.recv();
        assert_eq!((v, fd.is_some()), (0, false));
        let (v, fd) = self.recv();
        assert_eq!((v, fd.is_some()), (0, false));
        let (v, fd) = self.recv();
        assert_eq!(v, -1);
        let shm = fd.expect("shm fd");
        assert_eq!(rustix::fs::fstat(&shm).unwrap().st_size as u64, size);
        for _ in 0..vectors {
            let (v, fd) = self.recv();
            assert_eq!((v, fd.is_some()), (0, true));
        }
    }
}

#[test]
fn ivshmem_server_foreground_serves_and_stops_on_sigterm() {
    let socket = temp("fg.sock");
    let shm_name = format!("ivshm-bin-fg-{}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ivshmem-server"))
        .args(["-F", "-S"])
        .arg(&socket)
        .args(["-M", &shm_name, "-l3M", "-n", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(wait_listening(&mut child), socket);
    let mut peer = Peer::connect(&socket);
    // 3 MiB is rounded up to 4 MiB (with a log line) for QEMU's power-of-two BAR.
    peer.first_handshake(4 << 20, 2);
    terminate(child.id());
    assert!(child.wait().unwrap().success());
    assert!(!socket.exists(), "socket removed on exit");
    // Like QEMU's server, the shm object is kept.
    let shm_path = PathBuf::from(format!("/dev/shm/{shm_name}"));
    assert!(shm_path.exists());
    rustix::shm::unlink(shm_name.as_str()).unwrap();
}

#[test]
fn ivshmem_server_daemonizes_after_it_listens_and_writes_its_pid_file() {
    let socket = temp("daemon.sock");
    let pid_file = temp("daemon.pid");
    let dir = temp("daemon-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ivshmem-server"))
        .arg("-S")
        .arg(&socket)
        .arg("-p")
        .arg(&pid_file)
        .arg("-m")
        .arg(&dir)
        .args(["-l", "1M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = rx
        .recv_timeout(GUARD)
        .expect("launcher did not exit")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // When the launcher has exited, the daemon serves and its pid file exists.
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut peer = Peer::connect(&socket);
    peer.first_handshake(1 << 20, 1);
    // A new session: the daemon leads its own.
    let daemon = Pid::from_raw(pid as i32).unwrap();
    assert_eq!(rustix::process::getsid(Some(daemon)).unwrap(), daemon);
    terminate(pid);
    assert!(!socket.exists());
    assert!(!pid_file.exists());
    // The file in -m DIR was never visible by name.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--pidfile")
        .arg(&pid_file)
        .args(["--backend", "shm", "--shm-name", &shm_name])
        .args(["--size", "2M", "--vectors", "3", "--socket-mode", "660"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(wait_listening(&mut child), socket);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::symlink_metadata(&socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o660);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        child.id().to_string()
    );
    let mut peer = Peer::connect(&socket);
    peer.first_handshake(2 << 20, 3);
    terminate(child.id());
    assert!(child.wait().unwrap().success());
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

/// Starts `ivshm serve` under `sh -c "ulimit -n LIMIT; exec ..."` (no limit when `None`) and
/// streams every stderr line into a channel.
fn spawn_serve_with_log(args: &[&str], fd_limit: Option<u32>) -> (Child, mpsc::Receiver<String>) {
    let ulimit = fd_limit.map_or(String::new(), |n| format!("ulimit -n {n}; "));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{ulimit}exec \"$0\" serve \"$@\""))
        .arg(env!("CARGO_BIN_EXE_ivshm"))
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (rx, _log) = stream_stderr(&mut child);
    (child, rx)
}

#[test]
fn ivshm_serve_says_when_it_rounds_the_size_up() {
    let socket = temp("pow2.sock");
    let socket_arg = socket.to_string_lossy().to_string();
    let (mut child, rx) = spawn_serve_with_log(&["--socket", &socket_arg, "--size", "3M"], None);
    let line = wait_line(&rx, "not a power of two");
    assert!(line.contains("rounded up to 4 MiB"), "{line}");
    wait_line(&rx, "listening on");
    let mut peer = Peer::connect(&socket);
    peer.first_handshake(4 << 20, 1);
    terminate(child.id());
    assert!(child.wait().unwrap().success());
}

#[test]
fn ivshm_serve_out_of_fds_refuses_says_what_to_do_and_keeps_serving() {
    let socket = temp("emfile.sock");
    let socket_arg = socket.to_string_lossy().to_string();
    let (mut child, rx) =
        spawn_serve_with_log(&["--socket", &socket_arg, "--vectors", "2"], Some(24));
    wait_line(&rx, "listening on");
    let mut first = Peer::connect(&socket);
    first.first_handshake(4 << 20, 2);
    // Each peer costs the server 3 fds; within 24 fds some connection must be refused
    // (closed before any message).
    let mut peers = Vec::new();
    let refused = (0..24).any(|_| {
        let mut peer = Peer::connect(&socket);
        let mut byte = [0u8; 1];
        let n = rustix::net::recv(&peer.sock, &mut byte, rustix::net::RecvFlags::PEEK).unwrap();
        if n.0 == 0 {
            return true;
        }
        let (version, _) = peer.recv();
        assert_eq!(version, 0);
        peers.push(peer);
        false
    });
    assert!(refused, "no connection was refused within the fd limit");
    let line = wait_line(&rx, "out of file descriptors");
    assert!(line.contains("open file limit 24"), "{line}");
    assert!(line.contains("raise the hard limit"), "{line}");
    // Once a peer has left (the server logs it), a new one is served again.
    peers.clear();
    wait_line(&rx, "left: closed its connection");
    let mut again = Peer::connect(&socket);
    let (version, fd) = again.recv();
    assert_eq!((version, fd.is_some()), (0, false));
    terminate(child.id());
    assert!(child.wait().unwrap().success());
    assert!(!socket.exists());
}

#[test]
fn ivshm_serve_cleans_up_on_sigint_too() {
    let socket = temp("sigint.sock");
    let pid_file = temp("sigint.pid");
    let socket_arg = socket.to_string_lossy().to_string();
    let pid_arg = pid_file.to_string_lossy().to_string();
    let (mut child, rx) =
        spawn_serve_with_log(&["--socket", &socket_arg, "--pidfile", &pid_arg], None);
    wait_line(&rx, "listening on");
    assert!(pid_file.exists() && socket.exists());
    let mut peer = Peer::connect(&socket);
    peer.first_handshake(4 << 20, 1);
    kill_process(Pid::from_raw(child.id() as i32).unwrap(), Signal::INT).unwrap();
    wait_exit(child.id());
    assert!(child.wait().unwrap().success());
    assert!(!socket.exists(), "socket removed on SIGINT");
    assert!(!pid_file.exists(), "pid file removed on SIGINT");
    // The peer sees its connection closed.
    assert!(matches!(peer.receive(), Received::Closed));
}
