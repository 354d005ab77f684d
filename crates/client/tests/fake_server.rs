//! The peer against a scripted fake server: exact messages, malformed ones, server death and
//! reconnect.

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::{socket_path, TEN_S};
use ivshm_client::{ClientError, ConnectOptions, Event, HandshakeError, Peer, PeerEvent};
use ivshm_mem::Mapping;
use ivshm_proto::send_message_blocking;
use ivshm_proto::v0::ProtocolError;
use ivshm_test_support::fds::{wait_readable, wait_rung};
use rustix::event::{eventfd, EventfdFlags};

/// Runs `script` on the first accepted connection in a thread while the test connects.
fn with_server<F>(tag: &str, script: F) -> (std::path::PathBuf, thread::JoinHandle<()>)
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let path = socket_path(tag);
    let listener = listen(&path);
    let h = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        script(stream);
    });
    (path, h)
}

fn quick() -> ConnectOptions {
    ConnectOptions {
        timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

#[test]
fn handshake_doorbells_memory_joins_and_leaves() {
    let shm = memfd(8192);
    let server_map = Mapping::map_fd(shm.as_fd(), 0, 8192).unwrap();
    let peer1 = [efd(), efd()];
    let own = [efd(), efd()];
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (path, server) = {
        let shm = shm.try_clone().unwrap();
        let peer1: Vec<_> = peer1.iter().map(|f| f.try_clone().unwrap()).collect();
        let own: Vec<_> = own.iter().map(|f| f.try_clone().unwrap()).collect();
        with_server("basic", move |s| {
            greet(&s, 3, &shm, &[(1, &peer1)], &own);
            // Wait for the test to say when to announce a join and a leave.
            assert_eq!(rx.recv().unwrap(), "join");
            let p5 = [efd(), efd()];
            send(&s, 5, Some(p5[0].as_fd()));
            send(&s, 5, Some(p5[1].as_fd()));
            assert_eq!(rx.recv().unwrap(), "leave");
            send(&s, 5, None);
            // A short join: one vector where two are expected, then the burst ends.
            let p6 = efd();
            send(&s, 6, Some(p6.as_fd()));
            assert_eq!(rx.recv().unwrap(), "done");
        })
    };
    let mut peer = Peer::connect(&path, quick()).unwrap();
    assert_eq!(peer.id(), 3);
    assert_eq!(peer.vectors(), 2);
    assert_eq!(peer.shm_size(), 8192);
    assert_eq!(peer.peer_ids(), vec![1]);
    assert_eq!(peer.peer_vectors(1), Some(2));

    // notify(1, 1) is an 8-byte write of 1 to peer 1's vector-1 eventfd.
    peer.notify(1, 1).unwrap();
    assert_eq!(wait_rung(&peer1[1]), 1);
    assert!(matches!(
        peer.notify(1, 2),
        Err(ClientError::UnknownVector {
            peer: 1,
            vector: 2,
            vectors: 2
        })
    ));
    assert!(matches!(
        peer.notify(4, 0),
        Err(ClientError::UnknownPeer(4))
    ));

    // Ringing our own vector 1 (as another peer would) is reported as a doorbell.
    ivshm_client::doorbell::ring(own[1].as_fd()).unwrap();
    assert_eq!(
        peer.wait(TEN_S).unwrap(),
        Some(Event::Doorbell { vector: 1 })
    );

    // The memory is shared.
    let map = peer.map().unwrap();
    server_map.view().write(100, b"from server").unwrap();
    let mut buf = [0u8; 11];
    map.view().read(100, &mut buf).unwrap();
    assert_eq!(&buf, b"from server");
    map.view().write(4000, b"from peer").unwrap();
    let mut buf = [0u8; 9];
    server_map.view().read(4000, &mut buf).unwrap();
    assert_eq!(&buf, b"from peer");

    tx.send("join").unwrap();
    assert_eq!(
        peer.wait(TEN_S).unwrap(),
        Some(Event::Peer(PeerEvent::Joined { id: 5, vectors: 2 }))
    );
    assert_eq!(peer.peer_ids(), vec![1, 5]);
    tx.send("leave").unwrap();
    assert_eq!(
        peer.wait(TEN_S).unwrap(),
        Some(Event::Peer(PeerEvent::Left { id: 5 }))
    );
    assert_eq!(
        peer.wait(TEN_S).unwrap(),
        Some(Event::Peer(PeerEvent::Joined { id: 6, vectors: 1 }))
    );
    assert_eq!(peer.peer_ids(), vec![1, 6]);
    assert_eq!(peer.wait(Some(Duration::ZERO)).unwrap(), None);
    tx.send("done").unwrap();
    server.join().unwrap();
    assert_eq!(peer.wait(TEN_S).unwrap(), Some(Event::ServerGone));
    assert!(!peer.is_connected());
    assert!(matches!(
        peer.process_server_messages(),
        Err(ClientError::ServerGone)
    ));
    // Doorbells between peers still work without the server.
    peer.notify(1, 0).unwrap();
    assert_eq!(wait_rung(&peer1[0]), 1);
}

fn connect_err<F>(tag: &str, opts: ConnectOptions, script: F) -> ClientError
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let (path, server) = with_server(tag, script);
    let err = Peer::connect(&path, opts).unwrap_err();
    server.join().unwrap();
    err
}

#[test]
fn malformed_handshakes_are_rejected() {
    use HandshakeError::Protocol as P;
    let e = connect_err("v1", quick(), |s| send(&s, 1, None));
    assert!(matches!(
        e,
        ClientError::Handshake(P(ProtocolError::UnsupportedVersion(1)))
    ));

    let e = connect_err("vfd", quick(), |s| send(&s, 0, Some(efd().as_fd())));
    assert!(matches!(
        e,
        ClientError::Handshake(P(ProtocolError::UnexpectedFd { value: 0 }))
    ));

    let e = connect_err("badid", quick(), |s| {
        send(&s, 0, None);
        send(&s, 70000, None);
    });
    assert!(matches!(
        e,
        ClientError::Handshake(P(ProtocolError::InvalidOwnId(70000)))
    ));

    let e = connect_err("noshmfd", quick(), |s| {
        send(&s, 0, None);
        send(&s, 2, None);
        send(&s, -1, None);
    });
    assert!(matches!(
        e,
        ClientError::Handshake(P(ProtocolError::MissingShmFd))
    ));

    let e = connect_err("badval", quick(), |s| {
        send(&s, 0, None);
        send(&s, 2, None);
        send(&s, -7, Some(efd().as_fd()));
    });
    assert!(matches!(
        e,
        ClientError::Handshake(P(ProtocolError::InvalidValue(-7)))
    ));

    let e = connect_err("owngone", quick(), |s| {
        send(&s, 0, None);
        send(&s, 2, None);
        send(&s, 2, None);
    });
    assert!(matches!(
        e,
        ClientError::Handshake(HandshakeError::Message(
            ivshm_client::MessageError::OwnIdGone { id: 2 }
        ))
    ));

    let e = connect_err("closed", quick(), |s| {
        send(&s, 0, None);
        drop(s);
    });
    assert!(matches!(e, ClientError::ClosedDuringHandshake));

    // Closed before any message: how a server refuses a peer (a region at its peer limit, no
    // fds left); the error says so and where to look.
    let e = connect_err("refused", quick(), drop);
    assert!(matches!(e, ClientError::Refused), "{e:?}");
    let message = e.to_string();
    assert!(message.contains("refused this peer"), "{message}");
    assert!(message.contains("peer limit"), "{message}");
    assert!(message.contains("ivshm regions"), "{message}");

    let short = ConnectOptions {
        timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let e = connect_err("silent", short, move |s| {
        send(&s, 0, None);
        // Say nothing more; the client gives up and closes (read sees EOF).
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &s, &mut b).unwrap(), 0);
    });
    assert!(matches!(e, ClientError::HandshakeTimeout(_)));

    let e = Peer::connect(&socket_path("nobody"), quick()).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }));
}

#[test]
fn invalid_messages_after_the_handshake_are_dropped() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (path, server) = with_server("after", move |s| {
        let shm = memfd(4096);
        greet(&s, 0, &shm, &[], &[efd()]);
        rx.recv().unwrap();
        send(&s, -9, None); // invalid value
        send(&s, -1, Some(memfd(4096).as_fd())); // second shm
        send(&s, 0, None); // our own id gone
        send(&s, 44, None); // unknown peer gone
        for _ in 0..65 {
            send(&s, 0, Some(efd().as_fd())); // own vectors beyond 64 are closed
        }
        send(&s, 8, Some(efd().as_fd()));
        rx.recv().unwrap();
    });
    let mut peer = Peer::connect(&path, quick()).unwrap();
    assert_eq!(peer.vectors(), 1);
    tx.send(()).unwrap();
    assert_eq!(
        peer.wait(TEN_S).unwrap(),
        Some(Event::Peer(PeerEvent::Joined { id: 8, vectors: 1 }))
    );
    assert_eq!(peer.vectors(), 64);
    assert_eq!(peer.id(), 0);
    assert!(peer.own_vector_fd(63).is_some());
    tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn process_server_messages_is_non_blocking() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (path, server) = with_server("nonblock", move |s| {
        let shm = memfd(4096);
        greet(&s, 1, &shm, &[], &[efd()]);
        rx.recv().unwrap();
        send(&s, 2, Some(efd().as_fd()));
        rx.recv().unwrap();
    });
    let mut peer = Peer::connect(&path, quick()).unwrap();
    assert_eq!(peer.process_server_messages().unwrap(), vec![]);
    tx.send(()).unwrap();
    // Wait for the socket to be readable, then process.
    wait_readable(peer.socket_fd());
    assert_eq!(
        peer.process_server_messages().unwrap(),
        vec![PeerEvent::Joined { id: 2, vectors: 1 }]
    );
    tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn reconnects_after_the_server_restarts() {
    let path = socket_path("reconnect");
    let listener = listen(&path);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = {
        let path = path.clone();
        thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            greet(&s, 4, &memfd(4096), &[], &[efd()]);
            rx.recv().unwrap();
            // The server dies: socket closed, listener gone.
            drop(s);
            drop(listener);
            let _ = std::fs::remove_file(&path);
            // Some time later a new server comes up at the same path.
            thread::sleep(Duration::from_millis(300));
            let listener = listen(&path);
            let (s, _) = listener.accept().unwrap();
            let other = [efd(), efd()];
            greet(&s, 9, &memfd(8192), &[(2, &other)], &[efd(), efd()]);
            rx.recv().unwrap();
        })
    };
    let opts = ConnectOptions {
        reconnect: true,
        reconnect_delay: Duration::from_millis(50),
        reconnect_max_delay: Duration::from_millis(200),
        ..quick()
    };
    let mut peer = Peer::connect(&path, opts).unwrap();
    assert_eq!((peer.id(), peer.shm_size()), (4, 4096));
    tx.send(()).unwrap();
    assert_eq!(peer.wait(TEN_S).unwrap(), Some(Event::ServerGone));
    assert_eq!(
        peer.wait(TEN_S).unwrap(),
        Some(Event::Reconnected { id: 9 })
    );
    assert!(peer.is_connected());
    assert_eq!((peer.id(), peer.vectors(), peer.shm_size()), (9, 2, 8192));
    assert_eq!(peer.peer_ids(), vec![2]);
    tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn poll_fd_wakes_a_foreign_loop() {
    let own = efd();
    let own2 = own.try_clone().unwrap();
    let (path, server) = with_server("pollfd", move |s| {
        greet(&s, 0, &memfd(4096), &[], &[own2]);
        // Keep the connection open until the client is done.
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut &s, &mut b);
    });
    let mut peer = Peer::connect(&path, quick()).unwrap();
    ivshm_client::doorbell::ring(own.as_fd()).unwrap();
    wait_readable(peer.poll_fd());
    assert_eq!(
        peer.wait(Some(Duration::ZERO)).unwrap(),
        Some(Event::Doorbell { vector: 0 })
    );
    assert_eq!(peer.wait(Some(Duration::ZERO)).unwrap(), None);
    drop(peer);
    server.join().unwrap();
}

#[test]
fn a_join_split_by_a_pause_is_reported_once_complete() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (path, server) = with_server("split", move |s| {
        greet(&s, 0, &memfd(4096), &[], &[efd(), efd()]);
        rx.recv().unwrap();
        // The server is preempted between the two vectors of a joining peer.
        send(&s, 1, Some(efd().as_fd()));
        thread::sleep(Duration::from_millis(30));
        send(&s, 1, Some(efd().as_fd()));
        rx.recv().unwrap();
    });
    let opts = ConnectOptions {
        settle: Duration::from_secs(1),
        ..quick()
    };
    let mut peer = Peer::connect(&path, opts).unwrap();
    tx.send(()).unwrap();
    assert_eq!(
        peer.wait(TEN_S).unwrap(),
        Some(Event::Peer(PeerEvent::Joined { id: 1, vectors: 2 }))
    );
    tx.send(()).unwrap();
    server.join().unwrap();
}

// The scripted fake v0 server, built from `ivshm_proto`.

/// Listens on `path` (replacing a stale socket).
fn listen(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).unwrap()
}

/// A non-blocking eventfd.
fn efd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

/// A memfd of `size` bytes.
fn memfd(size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("fake-ivshm", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// Sends one message with an optional fd.
fn send(stream: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) {
    send_message_blocking(stream.as_fd(), value, fd).unwrap();
}

/// The messages QEMU's server sends a new peer `id`: version, id, shm, the others' vectors,
/// then its own. Returns the own eventfds (the server side keeps copies).
fn greet(
    stream: &UnixStream,
    id: u16,
    shm: &OwnedFd,
    others: &[(u16, &[OwnedFd])],
    own: &[OwnedFd],
) {
    send(stream, 0, None);
    send(stream, i64::from(id), None);
    send(stream, -1, Some(shm.as_fd()));
    for (pid, fds) in others {
        for fd in fds.iter() {
            send(stream, i64::from(*pid), Some(fd.as_fd()));
        }
    }
    for fd in own {
        send(stream, i64::from(id), Some(fd.as_fd()));
    }
}
