//! `ivshm bridge` processes on one host, both host peers of an in-process ivshm server:
//! 64 concurrent TCP connections with random 1–16 MiB streams both ways (one half-closes at
//! once, one is killed mid-way), unix addresses, the other bridge killed and restarted, and a
//! hostile peer writing garbage frames into the channel.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ivshm_bridge::frame::{Frame, Hello, Role};
use ivshm_channel::{ChannelError, ChannelOptions, Region};
use ivshm_client::{ConnectOptions, Peer, PeerDoorbell};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::process::{HostProcess, Stream};

const T: Duration = Duration::from_secs(60);

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-bridge-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn server(path: &Path) -> ServerHandle {
    let mut region = RegionConfig::new(path);
    region.vectors = 1;
    region.memory.size = 32 << 20;
    ServerHandle::spawn(ServerConfig::single(region)).unwrap()
}

/// An `ivshm bridge` process; `direction` is `--listen ADDR` or `--connect ADDR`.
fn bridge(name: &str, socket: &Path, direction: [&str; 2]) -> HostProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    cmd.args(["bridge", "--socket"])
        .arg(socket)
        .args(["--name", name, "--channels", "8", "--ring-size", "1M"])
        .args(direction)
        .env("RUST_LOG", "info");
    HostProcess::spawn(name, cmd).unwrap()
}

/// The address a listening bridge printed.
fn listening(p: &HostProcess) -> String {
    let line = p
        .wait_line_containing(Stream::Stderr, "listening on ", T)
        .unwrap();
    let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
    rest[..rest.find(';').unwrap()].to_string()
}

fn session_up(p: &HostProcess) {
    p.wait_line_containing(Stream::Stderr, "session up", T)
        .unwrap();
}

/// Waits until `p`'s stderr so far contains `needle`, wherever.
fn wait_stderr(p: &HostProcess, needle: &str) {
    let deadline = std::time::Instant::now() + T;
    while !p.output(Stream::Stderr).contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} in:\n{}",
            p.output(Stream::Stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tcp_of(addr: &str) -> SocketAddr {
    addr.strip_prefix("tcp:").unwrap().parse().unwrap()
}

/// A seeded byte stream (xorshift64), the same on both ends.
struct Gen(u64);

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Fills `buf` (its length a multiple of 8, or the stream's last piece).
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let b = self.next().to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

const CHUNK: usize = 64 << 10;

/// Writes `len` bytes of the stream `seed` (then nothing: the caller closes or shuts).
fn send_stream(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<()> {
    let mut g = Gen::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        g.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads exactly the stream `seed` of `len` bytes followed by EOF; compares every byte.
fn expect_stream(r: &mut impl Read, seed: u64, len: u64) -> std::io::Result<()> {
    let mut g = Gen::new(seed);
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        g.fill(&mut want[..n]);
        r.read_exact(&mut got[..n])?;
        if got[..n] != want[..n] {
            return Err(std::io::Error::other(format!(
                "stream {seed:#x}: wrong bytes at offset {}",
                len - left
            )));
        }
        left -= n as u64;
    }
    let mut one = [0u8; 1];
    match r.read(&mut one)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "stream {seed:#x}: bytes after the end"
        ))),
    }
}

/// What the client announces: seed, bytes it sends, bytes it wants back.
fn header(seed: u64, up: u64, down: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(&seed.to_le_bytes());
    h[8..16].copy_from_slice(&up.to_le_bytes());
    h[16..].copy_from_slice(&down.to_le_bytes());
    h
}

/// Server side of one connection: sends `down` bytes of stream `seed ^ 1` (then shuts its
/// write side) while checking `up` bytes of stream `seed` and the EOF. Returns the seed, the
/// check of what was read and the result of the writing.
fn serve_one(mut s: TcpStream) -> (u64, std::io::Result<()>, std::io::Result<()>) {
    s.set_read_timeout(Some(T)).unwrap();
    let mut h = [0u8; 24];
    if let Err(e) = s.read_exact(&mut h) {
        return (0, Err(e), Ok(()));
    }
    let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
    let (seed, up, down) = (word(0), word(8), word(16));
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let r = send_stream(&mut w, seed ^ 1, down);
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let read = expect_stream(&mut s, seed, up);
    let wrote = writer.join().unwrap();
    (seed, read, wrote)
}

#[test]
fn sixty_four_connections_with_a_half_close_and_a_kill() {
    let dir = scratch("tcp64");
    let socket = dir.join("ivshm.sock");
    let _server = server(&socket);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = format!("tcp:{}", backend.local_addr().unwrap());
    let l = bridge("tcp64", &socket, ["--listen", "tcp:127.0.0.1:0"]);
    let c = bridge("tcp64", &socket, ["--connect", &backend_addr]);
    let front = tcp_of(&listening(&l));
    session_up(&l);
    session_up(&c);

    const N: u64 = 64;
    const HALF_CLOSER: u64 = 7;
    const KILLED: u64 = 13;
    // Sizes 1..16 MiB from a seeded generator: the same every run (IVSHM_BRIDGE_SEED=N picks
    // another set).
    let seed = std::env::var("IVSHM_BRIDGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1b51_d9e5_u64);
    eprintln!("sizes from seed {seed}");
    let mut sizes = Gen::new(seed);
    let mut size = || (1 << 20) + sizes.next() % (15 << 20);
    let plans: Vec<(u64, u64, u64)> = (0..N)
        .map(|i| {
            let (up, down) = (size(), size());
            let id = (i << 32) | (seed & 0xffff_ffff);
            match i {
                HALF_CLOSER => (id, 1000, down),
                _ => (id, up, down),
            }
        })
        .collect();
    let srv = std::thread::spawn(move || {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let (s, _) = backend.accept().unwrap();
                std::thread::spawn(move || serve_one(s))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let clients: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, &(id, up, down))| {
            let mut s = TcpStream::connect(front).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            std::thread::spawn(move || -> std::io::Result<()> {
                s.write_all(&header(id, up, down))?;
                let mut r = s.try_clone()?;
                if i as u64 == KILLED {
                    // Half the stream, then a reset (SO_LINGER 0) while both directions flow.
                    send_stream(&mut s, id, up / 2)?;
                    let mut some = vec![0u8; 4096];
                    r.read_exact(&mut some)?;
                    rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO))?;
                    return Ok(());
                }
                if i as u64 == HALF_CLOSER {
                    // Its whole (short) stream and the half-close first, then read 1..16 MiB.
                    send_stream(&mut s, id, up)?;
                    s.shutdown(Shutdown::Write)?;
                    return expect_stream(&mut r, id ^ 1, down);
                }
                let reader = std::thread::spawn(move || expect_stream(&mut r, id ^ 1, down));
                send_stream(&mut s, id, up)?;
                s.shutdown(Shutdown::Write)?;
                reader.join().unwrap()
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap();
        assert!(r.is_ok(), "client {i}: {r:?}");
    }
    let results = srv.join().unwrap();
    let killed_id = plans[KILLED as usize].0;
    for (id, read, wrote) in results {
        if id == killed_id {
            // The stream is cut short, by a reset: whichever of the server's reader and writer
            // meets the reset first gets ECONNRESET (the other then sees an end of file or a
            // broken pipe).
            let e = read.expect_err("the killed connection's server read the whole stream");
            let reset = |r: &std::io::Result<()>| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset);
            assert!(
                e.kind() == ErrorKind::ConnectionReset || reset(&wrote),
                "no reset: read {e}, write {wrote:?}"
            );
        } else {
            assert!(read.is_ok(), "server side of {id:#x}: {read:?}");
            assert!(wrote.is_ok(), "server side of {id:#x} writing: {wrote:?}");
        }
    }
    // Both bridges are still up, and said nothing about protocol errors.
    for p in [&l, &c] {
        let err = p.output(Stream::Stderr);
        assert!(!err.contains("broke the protocol"), "{err}");
        assert!(!err.contains("session ended"), "{err}");
    }
}

#[test]
fn unix_addresses_and_the_other_bridge_killed_and_restarted() {
    let dir = scratch("unix");
    let socket = dir.join("ivshm.sock");
    let _server = server(&socket);
    let front = dir.join("front.sock");
    let back = dir.join("back.sock");
    let backend = UnixListener::bind(&back).unwrap();
    let front_arg = format!("unix:{}", front.display());
    let back_arg = format!("unix:{}", back.display());
    let l = bridge("unix", &socket, ["--listen", &front_arg]);
    let mut c = bridge("unix", &socket, ["--connect", &back_arg]);
    session_up(&l);
    session_up(&c);

    // A transfer both ways with a half-close.
    let mut s = UnixStream::connect(&front).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let (mut b, _) = backend.accept().unwrap();
    b.set_read_timeout(Some(T)).unwrap();
    let t = std::thread::spawn(move || {
        expect_stream(&mut b, 5, 3 << 20).unwrap();
        send_stream(&mut b, 6, 2 << 20).unwrap();
        b.shutdown(Shutdown::Write).unwrap();
        b
    });
    send_stream(&mut s, 5, 3 << 20).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    expect_stream(&mut s, 6, 2 << 20).unwrap();
    drop(t.join().unwrap());

    // A connection open while the other bridge is killed: it ends, it does not hang.
    let mut open = UnixStream::connect(&front).unwrap();
    open.set_read_timeout(Some(T)).unwrap();
    open.write_all(b"x").unwrap();
    let (_b2, _) = backend.accept().unwrap();
    c.signal(rustix::process::Signal::KILL);
    c.wait_exit(T).unwrap();
    let mut buf = [0u8; 8];
    let r = open.read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}"
    );
    // Either may come first: the channel reports the peer gone (the server marked it), or the
    // server's leave message arrives.
    wait_stderr(&l, "left the region");
    wait_stderr(&l, "session ended");

    // The bridge comes back: a new session, and new connections work.
    let c2 = bridge("unix", &socket, ["--connect", &back_arg]);
    session_up(&c2);
    l.wait_line_containing(Stream::Stderr, "session up", T)
        .unwrap();
    let mut s = UnixStream::connect(&front).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"again").unwrap();
    let (mut b, _) = backend.accept().unwrap();
    let mut five = [0u8; 5];
    b.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"again");
}

/// Joins the server as a host peer and opens the bridge's channel as the other side.
fn hostile_channel(socket: &Path, name: &str) -> (ivshm_channel::Channel, Region) {
    let peer = Peer::connect(socket, ConnectOptions::default()).unwrap();
    let memory = peer.map().unwrap();
    let doorbell = Arc::new(PeerDoorbell::new(peer).unwrap());
    let region = Region::open(memory, doorbell).unwrap();
    let ch = region.channel(name, ChannelOptions::default()).unwrap();
    (ch, region)
}

#[test]
fn a_hostile_peer_writing_garbage_frames() {
    let dir = scratch("hostile");
    let socket = dir.join("ivshm.sock");
    let _server = server(&socket);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = format!("tcp:{}", backend.local_addr().unwrap());
    let l = bridge("hostile", &socket, ["--listen", "tcp:127.0.0.1:0"]);
    let front = tcp_of(&listening(&l));
    // Garbage of every kind, session after session: the bridge logs and starts over.
    let mut rng = Gen::new(42);
    let hello = Frame::Hello(Hello {
        role: Role::Connect,
        window: 4096,
        max_data: 4096,
        max_connections: 4,
        keepalive_ms: 1000,
        session: 9,
    })
    .to_vec();
    for round in 0..6u64 {
        let (mut ch, _region) = hostile_channel(&socket, "hostile");
        let mut buf = Vec::new();
        ch.recv(&mut buf, Some(T)).unwrap();
        if round % 2 == 1 {
            ch.send(&hello, Some(T)).unwrap();
        }
        // Random bytes; a few messages that look like frames with random fields.
        for _ in 0..20 {
            let len = 1 + (rng.next() % 300) as usize;
            let mut m = vec![0u8; len];
            rng.fill(&mut m);
            if len >= 16 && rng.next() % 2 == 0 {
                m[0] = 1 + (rng.next() % 9) as u8;
                m[1..4].fill(0);
                m[12..16].fill(0);
            }
            match ch.send(&m, Some(T)) {
                Ok(()) => {}
                Err(ChannelError::PeerClosed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // The bridge gives up on this session (closes its side) and opens a new channel.
        loop {
            match ch.recv(&mut buf, Some(T)) {
                Ok(_) => {}
                Err(ChannelError::PeerClosed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        drop(ch);
    }
    let err = l.output(Stream::Stderr);
    assert!(err.contains("broke the protocol"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A well-behaved bridge works afterwards.
    let c = bridge("hostile", &socket, ["--connect", &backend_addr]);
    session_up(&c);
    let mut s = TcpStream::connect(front).unwrap();
    s.write_all(b"fine").unwrap();
    let (mut b, _) = backend.accept().unwrap();
    let mut four = [0u8; 4];
    b.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"fine");
}

#[test]
fn out_of_file_descriptors_is_named_and_connections_wait_their_turn() {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;

    const LIMIT: u64 = 48;
    let dir = scratch("nofile");
    let socket = dir.join("ivshm.sock");
    let _server = server(&socket);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = format!("tcp:{}", backend.local_addr().unwrap());
    // The backend hands every connection's bytes (read to its end) to the test.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for s in backend.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                let _ = tx.send(got);
            });
        }
    });
    // The listening bridge may open LIMIT descriptors (soft and hard limit).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    cmd.args(["bridge", "--socket"])
        .arg(&socket)
        .args(["--name", "nofile", "--channels", "8", "--ring-size", "1M"])
        .args(["--listen", "tcp:127.0.0.1:0"])
        .env("RUST_LOG", "info");
    let limit = rustix::process::Rlimit {
        current: Some(LIMIT),
        maximum: Some(LIMIT),
    };
    // SAFETY: between fork and exec the closure only makes one system call (setrlimit), which
    // is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                .map_err(std::io::Error::from)
        });
    }
    let l = HostProcess::spawn("nofile", cmd).unwrap();
    let _c = bridge("nofile", &socket, ["--connect", &backend_addr]);
    let front = tcp_of(&listening(&l));
    session_up(&l);
    wait_stderr(
        &l,
        &format!("--max-connections 1024 does not fit this process's open-file limit (RLIMIT_NOFILE {LIMIT}"),
    );

    // More connections than descriptors: the bridge says which limit it hit; the rest wait.
    let clients: Vec<TcpStream> = (0..2 * LIMIT)
        .map(|i| {
            let mut s = TcpStream::connect(front).unwrap();
            s.write_all(format!("client {i}").as_bytes()).unwrap();
            s
        })
        .collect();
    wait_stderr(&l, &format!("limit RLIMIT_NOFILE is {LIMIT}"));
    // Every client half-closes: each connection ends, its descriptor is freed, and the waiting
    // ones are accepted in turn; every client's bytes reach the backend.
    for s in &clients {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut seen: Vec<String> = (0..2 * LIMIT)
        .map(|_| String::from_utf8(rx.recv_timeout(T).unwrap()).unwrap())
        .collect();
    seen.sort();
    let mut want: Vec<String> = (0..2 * LIMIT).map(|i| format!("client {i}")).collect();
    want.sort();
    assert_eq!(seen, want);
    drop(clients);
    let err = l.output(Stream::Stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// `ivshm guest bridge` over two fake ivshmem-doorbell devices of one BAR2 file (sysfs mode:
/// the loop polls): a TCP stream each way with a half-close, checked byte for byte.
#[test]
fn guest_bridges_over_two_fake_devices_by_polling() {
    use ivshm_test_support::sysfs::{doorbell_resource, FakeFunction, FakeSysfs};

    let tree = FakeSysfs::new();
    let size = 4 << 20;
    let function = |address| FakeFunction {
        resource: doorbell_resource(size as u64),
        ..FakeFunction::doorbell(address)
    };
    let a = tree.add_with_bar_files(&function("0000:00:03.0"), 7, size);
    let b = tree.add_with_bar_files(&function("0000:00:04.0"), 8, size);
    std::fs::remove_file(b.join("resource2")).unwrap();
    std::fs::hard_link(a.join("resource2"), b.join("resource2")).unwrap();
    let sysfs = tree.sysfs();
    let guest = |dev: &str, direction: [&str; 2]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ivshm"));
        cmd.args(["guest", "bridge", "--mode", "sysfs", "--sysfs"])
            .arg(&sysfs)
            .args(["--dev", dev, "--name", "fake", "--channels", "4"])
            .args(direction)
            .env("RUST_LOG", "info");
        HostProcess::spawn(dev, cmd).unwrap()
    };
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = format!("tcp:{}", backend.local_addr().unwrap());
    let l = guest("0000:00:03.0", ["--listen", "tcp:127.0.0.1:0"]);
    let c = guest("0000:00:04.0", ["--connect", &backend_addr]);
    let front = tcp_of(&listening(&l));
    session_up(&l);
    session_up(&c);
    let server = std::thread::spawn(move || {
        let (s, _) = backend.accept().unwrap();
        serve_one(s)
    });
    let mut s = TcpStream::connect(front).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let (seed, up, down) = (77, 3 << 20, 5 << 20);
    s.write_all(&header(seed, up, down)).unwrap();
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || expect_stream(&mut r, seed ^ 1, down));
    send_stream(&mut s, seed, up).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    reader.join().unwrap().unwrap();
    let (_, read, wrote) = server.join().unwrap();
    read.unwrap();
    wrote.unwrap();
}
