//! The built `ivshm` host commands and `ivshmem-client` against an in-process server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ivshm_client::{ConnectOptions, Event, Peer, PeerEvent};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::process::{HostProcess, Stream};
use ivshm_test_support::WAIT_GUARD;

const TEN_S: Option<Duration> = Some(Duration::from_secs(10));

fn socket_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-cli-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("sock")
}

fn server(path: &Path, vectors: usize) -> ServerHandle {
    let mut region = RegionConfig::new(path);
    region.vectors = vectors;
    region.memory.size = 64 << 10;
    ServerHandle::spawn(ServerConfig::single(region)).unwrap()
}

fn peer(path: &Path) -> Peer {
    Peer::connect(path, ConnectOptions::default()).unwrap()
}

fn ivshm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn next_event(p: &mut Peer) -> Event {
    p.wait(TEN_S).unwrap().expect("no event within 10 s")
}

/// Starts a program (stdin a pipe) with its output captured line by line.
fn spawn_lines(name: &str, mut cmd: Command) -> HostProcess {
    cmd.env("RUST_LOG", "warn");
    HostProcess::spawn_with_stdin(name, cmd).unwrap()
}

/// The next stdout line.
fn line(p: &HostProcess) -> String {
    p.next_line(Stream::Stdout, WAIT_GUARD).unwrap()
}

#[test]
fn peers_lists_self_and_others() {
    let path = socket_path("peers");
    let _s = server(&path, 2);
    let mut a = peer(&path);
    let p = path.to_str().unwrap();
    let out = stdout(&ivshm(&["peers", "--socket", p]));
    assert_eq!(out, "self id=1 vectors=2 size=65536\npeer id=0 vectors=2\n");
    // `a` saw the command's peer join and leave.
    assert_eq!(
        next_event(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 2 })
    );
    assert_eq!(next_event(&mut a), Event::Peer(PeerEvent::Left { id: 1 }));
}

#[test]
fn notify_rings_one_or_all_vectors() {
    let path = socket_path("notify");
    let _s = server(&path, 2);
    let mut a = peer(&path);
    let p = path.to_str().unwrap();
    stdout(&ivshm(&[
        "notify", "--socket", p, "--peer", "0", "--vector", "1",
    ]));
    let mut doorbells = Vec::new();
    while doorbells.is_empty() {
        if let Event::Doorbell { vector } = next_event(&mut a) {
            doorbells.push(vector);
        }
    }
    assert_eq!(doorbells, vec![1]);
    stdout(&ivshm(&[
        "notify", "--socket", p, "--peer", "0", "--vector", "all",
    ]));
    let mut doorbells = Vec::new();
    while doorbells.len() < 2 {
        if let Event::Doorbell { vector } = next_event(&mut a) {
            doorbells.push(vector);
        }
    }
    doorbells.sort();
    assert_eq!(doorbells, vec![0, 1]);

    let bad = ivshm(&["notify", "--socket", p, "--peer", "7", "--vector", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("peer 7"));
    let bad = ivshm(&["notify", "--socket", p, "--peer", "0", "--vector", "5"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no vector 5"));
}

#[test]
fn listen_prints_doorbells_joins_and_leaves() {
    let path = socket_path("listen");
    let _s = server(&path, 2);
    let mut a = peer(&path);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    cmd.args(["listen", "--count", "3", "--timeout", "20", "--socket"])
        .arg(&path);
    let mut child = spawn_lines("ivshm listen", cmd);
    assert_eq!(line(&child), "self id=1 vectors=2 size=65536");
    assert_eq!(line(&child), "peer id=0 vectors=2");
    assert_eq!(
        next_event(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 2 })
    );
    a.notify(1, 1).unwrap();
    assert_eq!(line(&child), "doorbell vector=1");
    let b = peer(&path);
    assert_eq!(line(&child), "join peer=2 vectors=2");
    drop(b);
    assert_eq!(line(&child), "leave peer=2");
    assert!(child.wait_exit(WAIT_GUARD).unwrap().success());
}

/// A peer that joins while `listen` sets up its connection is told about once: in the `peer`
/// lines, not again as a `join` (the server here is scripted so that peer 1's vector arrives
/// in the same burst as our own: always inside the connect window).
#[test]
fn listen_tells_of_a_peer_that_joins_during_the_connect_window_once() {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;
    let path = socket_path("listen-window");
    let listener = UnixListener::bind(&path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    cmd.args(["listen", "--count", "1", "--timeout", "20", "--socket"])
        .arg(&path);
    let mut child = spawn_lines("ivshm listen", cmd);
    let (stream, _) = listener.accept().unwrap();
    let send = |value: i64, fd: Option<std::os::fd::BorrowedFd<'_>>| {
        ivshm_proto::send_message_blocking(stream.as_fd(), value, fd).unwrap();
    };
    let shm = rustix::fs::memfd_create("listen-window", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&shm, 4096).unwrap();
    let eventfd = || rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let (own, other) = (eventfd(), eventfd());
    send(0, None); // version
    send(0, None); // our id
    send(-1, Some(shm.as_fd()));
    send(0, Some(own.as_fd())); // our vector: the connect window is open
    send(1, Some(other.as_fd())); // peer 1 joins with as many vectors as we have
    assert_eq!(line(&child), "self id=0 vectors=1 size=4096");
    assert_eq!(line(&child), "peer id=1 vectors=1");
    send(1, None); // peer 1 leaves: the one event of --count 1
    assert_eq!(line(&child), "leave peer=1");
    assert!(child.wait_exit(WAIT_GUARD).unwrap().success());
    assert_eq!(
        child.lines(Stream::Stdout).len(),
        3,
        "{:?}",
        child.lines(Stream::Stdout)
    );
}

#[test]
fn listen_times_out_with_status_1() {
    let path = socket_path("listen-timeout");
    let _s = server(&path, 1);
    let p = path.to_str().unwrap();
    let out = ivshm(&["listen", "--count", "1", "--timeout", "0.3", "--socket", p]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "self id=0 vectors=1 size=65536\n"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
}

#[test]
fn read_and_write_the_region() {
    let path = socket_path("rw");
    let _s = server(&path, 1);
    let a = peer(&path);
    let map = a.map().unwrap();
    let p = path.to_str().unwrap();
    stdout(&ivshm(&[
        "write", "--socket", p, "--offset", "0x100", "DEADbeef",
    ]));
    let mut buf = [0u8; 4];
    map.view().read(0x100, &mut buf).unwrap();
    assert_eq!(buf, [0xde, 0xad, 0xbe, 0xef]);

    map.view().write(1024, b"hello").unwrap();
    let out = stdout(&ivshm(&[
        "read", "--socket", p, "--offset", "1K", "--len", "5",
    ]));
    assert_eq!(out, "68656c6c6f\n");
    let raw = ivshm(&[
        "read", "--socket", p, "--offset", "1024", "--len", "5", "--raw",
    ]);
    assert_eq!(raw.stdout, b"hello");

    let file = path.with_file_name("data.bin");
    std::fs::write(&file, b"\x00\x01from a file").unwrap();
    let arg = format!("@{}", file.display());
    stdout(&ivshm(&["write", "--socket", p, "--offset", "60K", &arg]));
    let mut buf = [0u8; 13];
    map.view().read(60 << 10, &mut buf).unwrap();
    assert_eq!(&buf, b"\x00\x01from a file");

    let bad = ivshm(&["read", "--socket", p, "--offset", "64K", "--len", "1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("beyond"));
    let bad = ivshm(&["write", "--socket", p, "--offset", "0", "xyz"]);
    assert!(!bad.status.success());
}

#[test]
fn ivshmem_client_dumps_rings_and_reports() {
    let path = socket_path("qemu-client");
    let _s = server(&path, 2);
    let mut a = peer(&path);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshmem-client"));
    cmd.arg("-v").arg("-S").arg(&path);
    let mut child = spawn_lines("ivshmem-client", cmd);
    // Help first, then the connection (the prompt has no newline, so it prefixes the line).
    assert_eq!(line(&child), "dump: dump peers (including us)");
    for _ in 0..3 {
        line(&child);
    }
    assert_eq!(
        line(&child),
        format!("cmd> connect to client {}", path.display())
    );
    assert_eq!(line(&child), "our_id=1");
    assert!(line(&child).starts_with("shm_fd="));
    assert!(line(&child).starts_with("listen on server socket "));
    // Like QEMU's client, it reads the vectors after the handshake, one message at a time.
    assert_eq!(line(&child), "new peer id = 0");
    for (v, id) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        let l = line(&child);
        assert!(l.starts_with(&format!("  new vector {v} (fd=")), "{l}");
        assert!(l.ends_with(&format!(") for peer id {id}")), "{l}");
    }
    assert_eq!(
        next_event(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 2 })
    );
    child.stdin().unwrap().write_all(b"dump\n").unwrap();
    assert_eq!(line(&child), "our_id = 1");
    assert!(line(&child).starts_with("  vector 0 is enabled (fd="));
    assert!(line(&child).starts_with("  vector 1 is enabled (fd="));
    assert_eq!(line(&child), "peer_id = 0");
    line(&child);
    line(&child);
    child
        .stdin()
        .unwrap()
        .write_all(b"int 0 1;int 9 0\n")
        .unwrap();
    assert!(line(&child).starts_with("cmd> notify peer 0 on vector 1, fd "));
    assert_eq!(next_event(&mut a), Event::Doorbell { vector: 1 });
    assert_eq!(line(&child), "cannot find peer_id = 9");
    a.notify(1, 0).unwrap();
    assert!(line(&child).starts_with("cmd> received event on fd "));
    assert_eq!(line(&child), "receive notification from peer_id=1 vector=0");
}

#[test]
fn ivshmem_client_retries_until_the_server_is_there_and_after_it_left() {
    let path = socket_path("qemu-client-retry");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshmem-client"));
    cmd.arg("-S").arg(&path);
    let child = spawn_lines("ivshmem-client", cmd);
    assert_eq!(
        child.next_line(Stream::Stderr, WAIT_GUARD).unwrap(),
        "cannot connect to server, retry in 1 second"
    );
    for _ in 0..4 {
        line(&child); // the help text
    }
    let first = server(&path, 1);
    assert!(line(&child).starts_with("cmd> listen on server socket "));
    first.shutdown().unwrap();
    assert_eq!(line(&child), "disconnected from server");
    let _second = server(&path, 1);
    assert!(line(&child).starts_with("listen on server socket "));
}

#[test]
fn listen_with_reconnect_survives_a_server_restart() {
    let path = socket_path("listen-reconnect");
    let first = server(&path, 1);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    cmd.args([
        "listen",
        "--reconnect",
        "--count",
        "1",
        "--timeout",
        "60",
        "--socket",
    ])
    .arg(&path);
    let mut child = spawn_lines("ivshm listen --reconnect", cmd);
    assert_eq!(line(&child), "self id=0 vectors=1 size=65536");
    first.shutdown().unwrap();
    assert_eq!(line(&child), "server gone");
    // A different server on the same path: the listener joins it and says what it got.
    let _second = server(&path, 2);
    assert_eq!(line(&child), "reconnected");
    assert_eq!(line(&child), "self id=0 vectors=2 size=65536");
    let _b = peer(&path);
    // Only this join counts towards --count 1 (server gone / reconnected do not).
    assert_eq!(line(&child), "join peer=1 vectors=2");
    assert!(child.wait_exit(WAIT_GUARD).unwrap().success());
}

#[test]
fn listen_without_reconnect_fails_when_the_server_goes() {
    let path = socket_path("listen-gone");
    let s = server(&path, 1);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    cmd.args(["listen", "--timeout", "60", "--socket"])
        .arg(&path);
    let mut child = spawn_lines("ivshm listen", cmd);
    assert_eq!(line(&child), "self id=0 vectors=1 size=65536");
    s.shutdown().unwrap();
    assert_eq!(child.wait_exit(WAIT_GUARD).unwrap().code(), Some(1));
    let stderr = child.lines(Stream::Stderr).join("\n");
    assert!(stderr.contains("--reconnect"), "{stderr}");
}
