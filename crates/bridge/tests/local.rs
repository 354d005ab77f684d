//! Two bridges over a memfd region in one process: bytes, half-closes, resets, limits, a slow
//! connection next to a fast one, unix addresses, the other bridge restarting, and a hostile
//! other side.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{bus, config, region, tcp_any, wait_for, Running, Stream};
use ivshm_bridge::frame::{self, Frame, Hello, Role};
use ivshm_bridge::{Endpoint, Mode};
use ivshm_channel::{ChannelError, ChannelOptions};

const T: Duration = Duration::from_secs(30);

fn tcp_addr(e: &Endpoint) -> SocketAddr {
    match e {
        Endpoint::Tcp(a) => *a,
        Endpoint::Unix(_) => panic!("not tcp"),
    }
}

/// A listening bridge (peer 0) and a connecting one (peer 1) to `target`.
fn pair(name: &str, target: Endpoint) -> (Arc<ivshm_channel::local::LocalBus>, Running, Running) {
    let bus = bus();
    let l = Running::start(&bus, 0, config(name, Mode::Listen(tcp_any())));
    let c = Running::start(&bus, 1, config(name, Mode::Connect(target)));
    l.wait_sessions(1);
    c.wait_sessions(1);
    (bus, l, c)
}

fn connect(l: &Running) -> TcpStream {
    let s = TcpStream::connect(tcp_addr(l.local.as_ref().unwrap())).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn read_all(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    Stream::new(seed).fill(&mut v);
    v
}

/// Server: reads until EOF, checks, then answers with its own stream and closes.
fn request_response_server(listener: &TcpListener, expect: &[u8], answer: &[u8]) {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let got = read_all(&mut s).unwrap();
    assert!(
        got == expect,
        "server got {} bytes, wanted {}",
        got.len(),
        expect.len()
    );
    s.write_all(answer).unwrap();
}

#[test]
fn bytes_and_half_close_cross_both_ways() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = Endpoint::Tcp(server.local_addr().unwrap());
    let (_bus, l, _c) = pair("half", target);
    let (req, resp) = (bytes(1, 3 << 20), bytes(2, 5 << 20));
    let (req2, resp2) = (req.clone(), resp.clone());
    let t = std::thread::spawn(move || request_response_server(&server, &req2, &resp2));
    let mut s = connect(&l);
    s.write_all(&req).unwrap();
    // Half-close: the server sees EOF, yet still answers on the other direction.
    s.shutdown(Shutdown::Write).unwrap();
    let got = read_all(&mut s).unwrap();
    assert!(got == resp, "client got {} bytes", got.len());
    t.join().unwrap();
    assert_eq!(l.status.opened.load(Ordering::Relaxed), 1);
}

#[test]
fn many_connections_at_once_each_intact() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = Endpoint::Tcp(server.local_addr().unwrap());
    let (_bus, l, _c) = pair("many", target);
    const N: u64 = 24;
    let srv = std::thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..N {
            let (mut s, _) = server.accept().unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            handles.push(std::thread::spawn(move || {
                // First 8 bytes: the client's seed; answer with seed + 1000 while reading.
                let mut seed = [0u8; 8];
                s.read_exact(&mut seed).unwrap();
                let seed = u64::from_le_bytes(seed);
                let mut w = s.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    w.write_all(&bytes(seed + 1000, 1 << 20)).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let got = read_all(&mut s).unwrap();
                assert!(got == bytes(seed, (1 << 20) + (seed as usize * 977)));
                writer.join().unwrap();
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    let clients: Vec<_> = (0..N)
        .map(|seed| {
            let mut s = connect(&l);
            std::thread::spawn(move || {
                s.write_all(&seed.to_le_bytes()).unwrap();
                let mut r = s.try_clone().unwrap();
                let reader = std::thread::spawn(move || read_all(&mut r).unwrap());
                s.write_all(&bytes(seed, (1 << 20) + (seed as usize * 977)))
                    .unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                assert!(reader.join().unwrap() == bytes(seed + 1000, 1 << 20));
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    srv.join().unwrap();
}

#[test]
fn a_reset_crosses_and_the_others_continue() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = Endpoint::Tcp(server.local_addr().unwrap());
    let (_bus, l, _c) = pair("reset", target);
    let mut victim = connect(&l);
    victim.write_all(b"hello").unwrap();
    let (mut sv, _) = server.accept().unwrap();
    sv.set_read_timeout(Some(T)).unwrap();
    let mut five = [0u8; 5];
    sv.read_exact(&mut five).unwrap();
    let mut other = connect(&l);
    let (mut so, _) = server.accept().unwrap();
    so.set_read_timeout(Some(T)).unwrap();
    // Close with a reset (SO_LINGER 0).
    rustix::net::sockopt::set_socket_linger(&victim, Some(Duration::ZERO)).unwrap();
    drop(victim);
    let mut buf = [0u8; 16];
    let err = loop {
        match sv.read(&mut buf) {
            Ok(0) => panic!("the server saw a clean EOF, not a reset"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    // The other connection is untouched.
    other.write_all(b"still here").unwrap();
    let mut ten = [0u8; 10];
    so.read_exact(&mut ten).unwrap();
    assert_eq!(&ten, b"still here");
    so.write_all(b"yes").unwrap();
    let mut three = [0u8; 3];
    other.read_exact(&mut three).unwrap();
    assert_eq!(&three, b"yes");
    // And a reset from the server's side reaches the client as a reset.
    rustix::net::sockopt::set_socket_linger(&so, Some(Duration::ZERO)).unwrap();
    drop(so);
    let err = loop {
        match other.read(&mut buf) {
            Ok(0) => panic!("the client saw a clean EOF, not a reset"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn a_refused_connect_resets_the_client() {
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_bus, l, _c) = pair("refused", Endpoint::Tcp(closed));
    let mut s = connect(&l);
    let mut buf = [0u8; 4];
    let r = s.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}"
    );
}

#[test]
fn a_slow_connection_does_not_stall_another() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = Endpoint::Tcp(server.local_addr().unwrap());
    let (_bus, l, _c) = pair("slow", target);
    // The slow one: its server never reads, its client writes 8 MiB (far more than the
    // window and the kernel's buffers) from a thread that blocks.
    let slow = connect(&l);
    let (slow_server, _) = server.accept().unwrap();
    let mut w = slow.try_clone().unwrap();
    let _stuck = std::thread::spawn(move || {
        let _ = w.write_all(&vec![7u8; 8 << 20]);
    });
    std::thread::sleep(Duration::from_millis(200));
    // The fast one moves 16 MiB meanwhile.
    let mut fast = connect(&l);
    let (mut fast_server, _) = server.accept().unwrap();
    fast_server.set_read_timeout(Some(T)).unwrap();
    let data = bytes(9, 16 << 20);
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        fast.write_all(&d2).unwrap();
        fast.shutdown(Shutdown::Write).unwrap();
        fast
    });
    let got = read_all(&mut fast_server).unwrap();
    assert!(got == data);
    drop(writer.join().unwrap());
    drop(slow_server);
    drop(slow);
}

#[test]
fn the_listener_refuses_beyond_max_connections_and_says_so() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = Endpoint::Tcp(server.local_addr().unwrap());
    let bus = bus();
    let mut cfg = config("limit", Mode::Listen(tcp_any()));
    cfg.max_connections = 2;
    let l = Running::start(&bus, 0, cfg);
    let _c = Running::start(&bus, 1, config("limit", Mode::Connect(target)));
    l.wait_sessions(1);
    let _a = connect(&l);
    let _b = connect(&l);
    let mut third = connect(&l);
    let mut buf = [0u8; 1];
    let r = third.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert_eq!(l.status.refused.load(Ordering::Relaxed), 1);
}

#[test]
fn unix_addresses_on_both_sides() {
    let dir = std::env::temp_dir().join(format!("ivshm-bridge-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let front = dir.join("front.sock");
    let back = dir.join("back.sock");
    let server = UnixListener::bind(&back).unwrap();
    let bus = bus();
    let l = Running::start(
        &bus,
        0,
        config("unix", Mode::Listen(Endpoint::Unix(front.clone()))),
    );
    let c = Running::start(
        &bus,
        1,
        config("unix", Mode::Connect(Endpoint::Unix(back.clone()))),
    );
    l.wait_sessions(1);
    let mut s = UnixStream::connect(&front).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let data = bytes(5, 2 << 20);
    let d2 = data.clone();
    let t = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let got = read_all(&mut s).unwrap();
        assert!(got == d2);
        s.write_all(b"done").unwrap();
    });
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s).unwrap(), b"done");
    t.join().unwrap();
    drop(c);
    l.stop().unwrap();
    // The listening socket file is removed when the bridge stops.
    assert!(!front.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stale_unix_socket_is_replaced_and_a_live_one_refused() {
    let dir = std::env::temp_dir().join(format!("ivshm-bridge-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves the file behind
    let e = Endpoint::Unix(path.clone());
    let first = ivshm_bridge::addr::Listener::bind(&e).unwrap();
    let err = ivshm_bridge::addr::Listener::bind(&e).unwrap_err();
    assert!(err.to_string().contains("not a stale socket"), "{err}");
    drop(first);
    std::fs::write(&path, b"a file").unwrap();
    let err = ivshm_bridge::addr::Listener::bind(&e).unwrap_err();
    assert!(err.to_string().contains("not a stale socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"a file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_other_bridge_restarts_and_new_connections_work() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = Endpoint::Tcp(server.local_addr().unwrap());
    let (bus, l, c) = pair("restart", target.clone());
    let mut open = connect(&l);
    open.write_all(b"x").unwrap();
    let (_s1, _) = server.accept().unwrap();
    c.stop().unwrap();
    // The open connection is reset, not left hanging.
    let mut buf = [0u8; 1];
    let r = open.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}"
    );
    wait_for(|| !l.status.up.load(Ordering::Relaxed));
    let _c2 = Running::start(&bus, 1, config("restart", Mode::Connect(target)));
    l.wait_sessions(2);
    let mut s = connect(&l);
    s.write_all(b"again").unwrap();
    let (mut s2, _) = server.accept().unwrap();
    let mut five = [0u8; 5];
    s2.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"again");
}

/// A hostile "bridge" on peer 1: opens the channel, reads the listener's HELLO, sends `msgs`.
fn hostile(bus: &ivshm_channel::local::LocalBus, name: &str, msgs: &[Vec<u8>]) {
    let r = region(bus, 1);
    let mut ch = r.channel(name, ChannelOptions::default()).unwrap();
    let mut buf = Vec::new();
    ch.recv(&mut buf, Some(T)).unwrap();
    assert!(matches!(Frame::decode(&buf), Ok(Frame::Hello(_))));
    for m in msgs {
        ch.send(m, Some(T)).unwrap();
    }
    // Until the listener gives up on us.
    loop {
        match ch.recv(&mut buf, Some(T)) {
            Ok(_) => {}
            Err(ChannelError::PeerClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
}

fn hello(role: Role) -> Vec<u8> {
    Frame::Hello(Hello {
        role,
        window: 1 << 16,
        max_data: 1 << 16,
        max_connections: 8,
        keepalive_ms: 1000,
        session: 7,
    })
    .to_vec()
}

#[test]
fn garbage_from_the_other_side_ends_the_session_and_a_good_bridge_works_after() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = Endpoint::Tcp(server.local_addr().unwrap());
    let bus = bus();
    let l = Running::start(&bus, 0, config("hostile", Mode::Listen(tcp_any())));
    let bad_sessions: Vec<Vec<Vec<u8>>> = vec![
        vec![vec![0xff; 40]],                                  // not a frame
        vec![frame::header(frame::kind::PING, 0, 0).to_vec()], // no HELLO first
        vec![hello(Role::Listen)],                             // same role
        vec![hello(Role::Connect), hello(Role::Connect)],      // HELLO twice
        vec![
            hello(Role::Connect),
            Frame::Open {
                conn: 1,
                origin: b"",
            }
            .to_vec(),
        ], // OPEN to the listener
        vec![
            hello(Role::Connect),
            Frame::Data {
                conn: 77,
                data: b"zz",
            }
            .to_vec(),
        ], // unknown connection
        vec![{
            let mut h = hello(Role::Connect);
            h[20] = 9; // version 9
            h
        }],
    ];
    for (i, msgs) in bad_sessions.iter().enumerate() {
        hostile(&bus, "hostile", msgs);
        let n = i as u64 + 1;
        wait_for(|| l.status.protocol_errors.load(Ordering::Relaxed) >= n);
    }
    let _c = Running::start(&bus, 1, config("hostile", Mode::Connect(target)));
    l.wait_sessions(1);
    let mut s = connect(&l);
    s.write_all(b"fine").unwrap();
    let (mut s2, _) = server.accept().unwrap();
    let mut four = [0u8; 4];
    s2.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"fine");
}

#[test]
fn a_connection_that_breaks_the_rules_is_reset_alone() {
    // The hostile side is the connector; the listener's client sees its connection reset
    // while the session (and a second connection) live on.
    let bus = bus();
    let l = Running::start(&bus, 0, config("rules", Mode::Listen(tcp_any())));
    let r = region(&bus, 1);
    let mut ch = r.channel("rules", ChannelOptions::default()).unwrap();
    let mut buf = Vec::new();
    ch.recv(&mut buf, Some(T)).unwrap();
    ch.send(&hello(Role::Connect), Some(T)).unwrap();
    l.wait_sessions(1);
    let mut a = connect(&l);
    let mut b = connect(&l);
    let mut ids = Vec::new();
    while ids.len() < 2 {
        ch.recv(&mut buf, Some(T)).unwrap();
        if let Ok(Frame::Open { conn, .. }) = Frame::decode(&buf) {
            ids.push(conn);
            ch.send(&Frame::Opened { conn }.to_vec(), Some(T)).unwrap();
        }
    }
    // Connection a: a second OPENED (credit and the other rules are in the session's unit
    // tests).
    ch.send(&Frame::Opened { conn: ids[0] }.to_vec(), Some(T))
        .unwrap();
    // Connection b: fine.
    ch.send(
        &Frame::Data {
            conn: ids[1],
            data: b"ok",
        }
        .to_vec(),
        Some(T),
    )
    .unwrap();
    let mut two = [0u8; 2];
    b.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"ok");
    let mut sink = vec![0u8; 1 << 20];
    let err = loop {
        match a.read(&mut sink) {
            Ok(0) => panic!("clean EOF instead of a reset"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    // The listener answered with RESET (reason: protocol error).
    loop {
        ch.recv(&mut buf, Some(T)).unwrap();
        if let Ok(Frame::Reset { conn, reason }) = Frame::decode(&buf) {
            assert_eq!(conn, ids[0]);
            assert_eq!(reason, frame::Reason::Protocol);
            break;
        }
    }
    assert_eq!(l.status.protocol_errors.load(Ordering::Relaxed), 0);
    assert!(l.status.up.load(Ordering::Relaxed));
}
