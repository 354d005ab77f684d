//! Issue 9 end to end: `ivshm guest bridge` in a q35 + intel-iommu guest (VFIO, MSI-X doorbells
//! in guest user space) and `ivshm bridge` on the host, one `ivshm serve` region between them,
//! no network device in the guest.
//!
//! - busybox `nc -l` in the guest and a TCP client on the host exchange a 16 MiB file each way
//!   over one bridged connection, both directions at once: the SHA-256 of what each side
//!   received matches what the other sent (the guest's `nc` half-closes when its file ends,
//!   the host half-closes when it has everything).
//! - The guest's bridge listening and busybox `nc` connecting in the guest: a 16 MiB file up to
//!   a host TCP server, and one back.
//! - The guest is killed (QEMU killed): the host bridges see its peer leave and end their
//!   sessions (a connection made meanwhile is closed or reset, it does not hang); a new guest
//!   on the same server starts its bridge, and a new connection works.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ivshm_e2e::guest_tool::vfio_doorbell_guest;
use ivshm_e2e::host::run_to_completion;
use ivshm_e2e::ivshm::ivshm_command;
use ivshm_e2e::{
    require_e2e, BackgroundCommand, GuestAssets, HostProcess, IvshmServer, QemuGuest, ScratchDir,
    Stream,
};

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);
/// Bound on a 16 MiB transfer each way between a TCG guest and the host.
const TRANSFER: Duration = Duration::from_secs(900);
const FILE: usize = 16 << 20;

/// A host `ivshm bridge` on `socket`; `direction` is `--listen ADDR` or `--connect ADDR`.
fn host_bridge(socket: &Path, name: &str, direction: [&str; 2]) -> HostProcess {
    let mut command = ivshm_command(["bridge", "--socket"]).unwrap();
    command.arg(socket).args(["--name", name]).args(direction);
    HostProcess::spawn(&format!("host bridge {name}"), command).unwrap()
}

/// The address a listening bridge printed (`listening on tcp:127.0.0.1:PORT; ...`).
fn listening(p: &HostProcess) -> SocketAddr {
    let line = p
        .wait_line_containing(Stream::Stderr, "listening on tcp:", STEP)
        .unwrap();
    let rest = &line[line.find("listening on tcp:").unwrap() + "listening on tcp:".len()..];
    rest[..rest.find(';').unwrap()].parse().unwrap()
}

/// `n` bytes of a seeded xorshift stream.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The SHA-256 (hex) of `bytes`, by the host's `sha256sum`.
fn sha256(dir: &Path, tag: &str, bytes: &[u8]) -> String {
    let path = dir.join(tag);
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    assert!(out.status.success(), "sha256sum: {out:?}");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// The SHA-256 (hex) of a guest file, by busybox `sha256sum`.
fn guest_sha256(guest: &mut QemuGuest, path: &str) -> String {
    let out = guest.run_ok(&format!("sha256sum {path}"), STEP).unwrap();
    out.lines()
        .find_map(|l| l.split_whitespace().next().filter(|w| w.len() == 64))
        .unwrap_or_else(|| panic!("no checksum in {out:?}"))
        .to_string()
}

/// Sends `data` on `s` while reading everything the other side sends until its end of file;
/// half-closes only once both are done (busybox `nc` exits at the end of file from the
/// network, so it must have sent its file first).
fn exchange(mut s: TcpStream, data: Vec<u8>) -> Vec<u8> {
    s.set_read_timeout(Some(TRANSFER)).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&data));
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap().unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    got
}

fn guest(assets: &GuestAssets, name: &str, socket: &Path) -> QemuGuest {
    let mut g = vfio_doorbell_guest(assets, name, socket, 1)
        .spawn()
        .unwrap();
    g.wait_ready(BOOT).unwrap();
    // The guest has no network device, but its programs talk over loopback.
    g.run_ok("ip link set lo up && echo up", STEP).unwrap();
    g
}

/// Starts `ivshm guest bridge --name {args}` in the background of `g` and waits for its
/// session with the host's bridge.
fn guest_bridge(g: &mut QemuGuest, tag: &str, args: &str) -> BackgroundCommand {
    let command = format!("ivshm guest bridge --name {args}");
    let gb = g.spawn_background(tag, &command).unwrap();
    gb.wait_output(g, "session up", STEP).unwrap();
    gb
}

/// Stops the guest's bridge (SIGTERM: it resets its connections and closes its channel side),
/// which frees the VFIO device for the next one.
fn stop_guest_bridge(g: &mut QemuGuest, gb: BackgroundCommand) {
    g.run_ok("kill $(pidof ivshm); sleep 1; echo stopped", STEP)
        .unwrap();
    let _ = gb.finish(g, STEP);
}

/// Everything the guest's background commands printed so far (for a failure message).
fn guest_logs(g: &mut QemuGuest) -> String {
    g.run("tail -n 20 /tmp/ivshm-e2e-background/*", STEP)
        .map(|o| o.output)
        .unwrap_or_default()
}

#[test]
fn busybox_nc_through_the_bridges_both_ways_and_a_guest_killed_and_restarted() {
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let socket: PathBuf = dir.join("ivshm.sock");
    let _server = IvshmServer::start(&socket, &["--vectors", "1", "--size", "32M"], STEP).unwrap();
    let mut init = ivshm_command(["chan", "init", "--socket"]).unwrap();
    init.arg(&socket)
        .args(["--channels", "8", "--ring-size", "1M"]);
    run_to_completion("ivshm chan init", init, STEP).unwrap();

    // Host: connections to 127.0.0.1:PORT go into the guest (channel nc-in); the guest's
    // connections come out to a TCP server of this test (channel nc-out).
    let hb_in = host_bridge(&socket, "nc-in", ["--listen", "tcp:127.0.0.1:0"]);
    let front = listening(&hb_in);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let back_arg = format!("tcp:{}", backend.local_addr().unwrap());
    let hb_out = host_bridge(&socket, "nc-out", ["--connect", &back_arg]);

    let mut g = guest(&assets, "bridge-1", &socket);
    // One process has the VFIO device at a time: the guest bridge of nc-in first.
    let gb = guest_bridge(&mut g, "bridge-in", "nc-in --connect tcp:127.0.0.1:7000");
    hb_in
        .wait_line_containing(Stream::Stderr, "session up", STEP)
        .unwrap();

    // 16 MiB each way on one connection: host → guest `nc -l` → /tmp/in, the guest's /tmp/out
    // back to the host.
    g.run_ok(
        "head -c 16777216 /dev/urandom > /tmp/out && echo made",
        STEP,
    )
    .unwrap();
    let sent_out = guest_sha256(&mut g, "/tmp/out");
    let nc = g
        .spawn_background("nc-in", "nc -l -p 7000 < /tmp/out > /tmp/in")
        .unwrap();
    // Until busybox nc listens, the guest bridge's connect is refused and the host's
    // connection reset: retry.
    let data = random_bytes(0x5eed, FILE);
    let sent_in = sha256(dir.path(), "sent-in", &data);
    let started = Instant::now();
    let got = loop {
        let s = TcpStream::connect(front).unwrap();
        // Wait for the guest's side to be connected before sending 16 MiB.
        s.set_read_timeout(Some(STEP)).unwrap();
        let mut first = [0u8; 1];
        match s.peek(&mut first) {
            Ok(1) => break exchange(s, data.clone()),
            _ => {
                if started.elapsed() > STEP {
                    panic!("the guest's nc never answered:\n{}", guest_logs(&mut g));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let done = nc.finish(&mut g, TRANSFER).unwrap();
    assert!(done.success(), "guest nc: {}", done.output);
    assert_eq!(got.len(), FILE, "bytes from the guest");
    assert_eq!(
        sha256(dir.path(), "got-out", &got),
        sent_out,
        "guest → host"
    );
    assert_eq!(guest_sha256(&mut g, "/tmp/in"), sent_in, "host → guest");
    eprintln!(
        "16 MiB each way through nc-in: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The guest's bridge listens, busybox nc connects in the guest: 16 MiB up to the host's
    // server, 16 MiB back.
    stop_guest_bridge(&mut g, gb);
    let gb = guest_bridge(&mut g, "bridge-out", "nc-out --listen tcp:127.0.0.1:7001");
    hb_out
        .wait_line_containing(Stream::Stderr, "session up", STEP)
        .unwrap();
    let back = random_bytes(0xbac4, FILE);
    let sent_back = sha256(dir.path(), "sent-back", &back);
    let server = std::thread::spawn(move || {
        let (s, _) = backend.accept().unwrap();
        exchange(s, back)
    });
    let started = Instant::now();
    let nc = g
        .spawn_background("nc-out", "nc 127.0.0.1 7001 < /tmp/out > /tmp/back")
        .unwrap();
    let done = nc.finish(&mut g, TRANSFER).unwrap();
    assert!(done.success(), "guest nc: {}", done.output);
    let got = server.join().unwrap();
    assert_eq!(sha256(dir.path(), "got-up", &got), sent_out, "guest → host");
    assert_eq!(guest_sha256(&mut g, "/tmp/back"), sent_back, "host → guest");
    eprintln!(
        "16 MiB each way through nc-out: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    stop_guest_bridge(&mut g, gb);

    // The guest's nc-in bridge again, then the guest is killed.
    let ended = count(&hb_in, "session ended");
    let up = count(&hb_in, "session up");
    let _gb = guest_bridge(&mut g, "bridge-in-2", "nc-in --connect tcp:127.0.0.1:7000");
    wait_count(&hb_in, "session up", up + 1);
    drop(g);
    let killed = Instant::now();
    wait_count(&hb_in, "session ended", ended + 1);
    eprintln!(
        "guest killed: the host bridge ended its session after {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    // No other side: a connection is closed or reset at once, it does not hang.
    let mut s = TcpStream::connect(front).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    assert!(
        matches!(r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );

    // A new guest, its bridge, and a new connection.
    let mut g = guest(&assets, "bridge-2", &socket);
    let _gb = guest_bridge(&mut g, "bridge-in", "nc-in --connect tcp:127.0.0.1:7000");
    wait_count(&hb_in, "session up", up + 2);
    let nc = g
        .spawn_background("nc-again", "nc -l -p 7000 > /tmp/again")
        .unwrap();
    let started = Instant::now();
    loop {
        let mut s = TcpStream::connect(front).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        // The guest's nc half-closes at once (its stdin is empty): an end of file (not a
        // reset, as while nc is not listening yet) says the connection reached it.
        let mut rest = Vec::new();
        if s.read_to_end(&mut rest).is_ok() {
            s.write_all(b"hello again\n").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            break;
        }
        if started.elapsed() > STEP {
            panic!("the guest's nc never answered:\n{}", guest_logs(&mut g));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let done = nc.finish(&mut g, STEP).unwrap();
    assert!(done.success(), "guest nc: {}", done.output);
    let again = g.run_ok("cat /tmp/again", STEP).unwrap();
    assert!(again.contains("hello again"), "{again}");
    drop(hb_out);
    g.poweroff(STEP).unwrap();
}

/// How many stderr lines of `p` contain `needle` so far.
fn count(p: &HostProcess, needle: &str) -> usize {
    p.output(Stream::Stderr).matches(needle).count()
}

/// Waits until `p`'s stderr has `n` lines containing `needle`.
fn wait_count(p: &HostProcess, needle: &str, n: usize) {
    let deadline = Instant::now() + STEP;
    while count(p, needle) < n {
        assert!(
            Instant::now() < deadline,
            "{needle:?} {n} times:\n{}",
            p.output(Stream::Stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
