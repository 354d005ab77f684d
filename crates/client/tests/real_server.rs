//! Several peers against the real `ivshm-server`, in-process.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{socket_path, TEN_S};
use ivshm_client::{ConnectOptions, Event, Peer, PeerEvent};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};

fn server(path: &Path, vectors: usize, size: u64) -> ServerHandle {
    let mut region = RegionConfig::new(path);
    region.vectors = vectors;
    region.memory.size = size;
    ServerHandle::spawn(ServerConfig::single(region)).unwrap()
}

fn connect(path: &Path) -> Peer {
    Peer::connect(path, ConnectOptions::default()).unwrap()
}

/// Waits for the next event that is not a doorbell/peer event we do not care about.
fn next(peer: &mut Peer) -> Event {
    peer.wait(TEN_S).unwrap().expect("no event within 10 s")
}

#[test]
fn peers_join_leave_ring_and_share_memory() {
    let path = socket_path("real");
    let _server = server(&path, 3, 1 << 20);

    let mut a = connect(&path);
    assert_eq!((a.id(), a.vectors(), a.shm_size()), (0, 3, 1 << 20));
    assert!(a.peer_ids().is_empty());

    let mut b = connect(&path);
    assert_eq!((b.id(), b.vectors()), (1, 3));
    assert_eq!(b.peer_ids(), vec![0]);
    assert_eq!(b.peer_vectors(0), Some(3));
    assert_eq!(
        next(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 3 })
    );

    // notify(p, v) arrives as Doorbell { vector: v } at p.
    a.notify(1, 2).unwrap();
    assert_eq!(next(&mut b), Event::Doorbell { vector: 2 });
    b.notify(0, 0).unwrap();
    assert_eq!(next(&mut a), Event::Doorbell { vector: 0 });
    b.notify(0, 1).unwrap();
    assert_eq!(next(&mut a), Event::Doorbell { vector: 1 });

    // Memory written by one is read by the other.
    let ma = a.map().unwrap();
    let mb = b.map().unwrap();
    ma.view().write(12345, b"written by a").unwrap();
    let mut buf = [0u8; 12];
    mb.view().read(12345, &mut buf).unwrap();
    assert_eq!(&buf, b"written by a");
    mb.view().write_u64(4096, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(ma.view().read_u64(4096).unwrap(), 0x1122_3344_5566_7788);

    // A third peer comes and goes: both others see it.
    let c = connect(&path);
    assert_eq!(c.id(), 2);
    assert_eq!(c.peer_ids(), vec![0, 1]);
    for p in [&mut a, &mut b] {
        assert_eq!(
            next(p),
            Event::Peer(PeerEvent::Joined { id: 2, vectors: 3 })
        );
    }
    drop(c);
    for p in [&mut a, &mut b] {
        assert_eq!(next(p), Event::Peer(PeerEvent::Left { id: 2 }));
        assert_eq!(p.peer_ids().len(), 1);
    }
    assert!(a.notify(2, 0).is_err());
    assert_eq!(a.wait(Some(Duration::ZERO)).unwrap(), None);
}

#[test]
fn server_restart_is_reported_and_survived() {
    let path = socket_path("restart");
    let first = server(&path, 1, 4096);
    let opts = ConnectOptions {
        reconnect: true,
        reconnect_delay: Duration::from_millis(20),
        reconnect_max_delay: Duration::from_millis(200),
        ..Default::default()
    };
    let mut a = Peer::connect(&path, opts.clone()).unwrap();
    let mut plain = connect(&path);
    assert_eq!(
        next(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 1 })
    );
    first.shutdown().unwrap();
    assert_eq!(next(&mut a), Event::ServerGone);
    assert_eq!(next(&mut plain), Event::ServerGone);
    assert!(!plain.is_connected());
    // Peers still reach each other while the server is away.
    a.notify(1, 0).unwrap();
    assert_eq!(next(&mut plain), Event::Doorbell { vector: 0 });

    let _second = server(&path, 2, 8192);
    assert_eq!(next(&mut a), Event::Reconnected { id: 0 });
    assert_eq!((a.vectors(), a.shm_size()), (2, 8192));
    assert!(a.peer_ids().is_empty());
    // The peer without reconnect stays disconnected and can reconnect by hand.
    assert_eq!(plain.wait(Some(Duration::from_millis(100))).unwrap(), None);
    assert_eq!(plain.reconnect().unwrap(), 1);
    assert_eq!(
        next(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 2 })
    );
}

#[test]
fn a_server_without_vectors_can_be_joined() {
    let path = socket_path("novectors");
    let mut region = RegionConfig::new(&path);
    region.vectors = 0;
    region.memory.size = 4096;
    let _server = ServerHandle::spawn(ServerConfig::single(region)).unwrap();
    let a = connect(&path);
    let b = connect(&path);
    assert_eq!((a.id(), b.id()), (0, 1));
    assert_eq!((a.vectors(), b.vectors()), (0, 0));
    // Without eventfds the protocol never mentions other peers: they stay invisible.
    assert!(b.peer_ids().is_empty());
    assert!(a.notify(1, 0).is_err());
    // The memory is still shared.
    a.map().unwrap().view().write(8, b"plain").unwrap();
    let mut buf = [0u8; 5];
    b.map().unwrap().view().read(8, &mut buf).unwrap();
    assert_eq!(&buf, b"plain");
}

/// A doorbell costs one system call in `wait` (issue 10: a raw eventfd ping-pong makes four per
/// round trip, the library made six): own vectors are watched edge-triggered and their
/// counters are not read, so the ring is still in the counter after `wait` reported it. Rings
/// before a wait are reported once (they coalesce), a later ring again, and a timeout still
/// ends a wait with nothing to report.
#[test]
fn a_doorbell_is_reported_without_reading_its_counter() {
    let path = socket_path("edge");
    let _server = server(&path, 2, 1 << 16);
    let mut a = connect(&path);
    let b = connect(&path);
    while a.peer_vectors(b.id()).is_none() {
        a.wait(TEN_S).unwrap();
    }
    b.notify(a.id(), 1).unwrap();
    b.notify(a.id(), 1).unwrap();
    assert_eq!(next(&mut a), Event::Doorbell { vector: 1 });
    assert_eq!(a.wait(Some(Duration::from_millis(20))).unwrap(), None);
    let fd = a.own_vector_fd(1).unwrap();
    assert_eq!(ivshm_client::doorbell::drain(fd).unwrap(), Some(2));
    b.notify(a.id(), 1).unwrap();
    assert_eq!(next(&mut a), Event::Doorbell { vector: 1 });
    assert_eq!(a.wait(Some(Duration::ZERO)).unwrap(), None);
}

/// A region that gives a departed peer's id to the next peer at once (`id_reuse =
/// "immediate"`, for peers like these that handle it): A sees B leave and C join with B's id,
/// and ringing that id reaches C.
#[test]
fn a_peer_that_reuses_a_departed_peers_id_is_a_new_peer() {
    let base = std::env::temp_dir().join(format!("ivshm-client-reuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let text = format!(
        "root = {:?}\n[[region]]\nname = \"r\"\nsize = \"64K\"\nvectors = 2\n\
         id_reuse = \"immediate\"\n[vm.host]\n",
        base.join("root").display().to_string()
    );
    let config = ivshm_server::config_file::parse(&text, Path::new("reuse.toml")).unwrap();
    let _server = ServerHandle::spawn(config).unwrap();
    let path = base.join("root").join("host").join("r.sock");

    let mut a = connect(&path);
    let b = connect(&path);
    assert_eq!((a.id(), b.id()), (0, 1));
    assert_eq!(
        next(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 2 })
    );
    drop(b);
    assert_eq!(next(&mut a), Event::Peer(PeerEvent::Left { id: 1 }));
    let mut c = connect(&path);
    assert_eq!(c.id(), 1, "B's id, at once");
    assert_eq!(
        next(&mut a),
        Event::Peer(PeerEvent::Joined { id: 1, vectors: 2 })
    );
    a.notify(1, 1).unwrap();
    assert_eq!(next(&mut c), Event::Doorbell { vector: 1 });
    c.notify(0, 0).unwrap();
    assert_eq!(next(&mut a), Event::Doorbell { vector: 0 });
    let _ = std::fs::remove_dir_all(&base);
}
