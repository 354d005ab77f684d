//! Peers that come and go, ring, and live through a server restart leave no fd behind.
//!
//! Its own test binary with a single test, so counting `/proc/self/fd` is not disturbed by
//! other tests running in parallel.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{socket_path, TEN_S};
use ivshm_client::{ConnectOptions, Event, Peer, PeerEvent};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::fds::open_fds;

/// The server releases a leaving peer's fds on its own thread: wait (bounded) for the count.
fn wait_for_count(want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds() != want {
        assert!(
            Instant::now() < deadline,
            "fd count stayed at {} (want {want})",
            open_fds()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn server(path: &Path) -> ServerHandle {
    let mut region = RegionConfig::new(path);
    region.vectors = 2;
    region.memory.size = 4096;
    ServerHandle::spawn(ServerConfig::single(region)).unwrap()
}

#[test]
fn no_fd_is_leaked() {
    let path = socket_path("leak");
    let before_server = open_fds();
    let first = server(&path);
    let baseline = open_fds();
    for _ in 0..10 {
        let mut a = Peer::connect(&path, ConnectOptions::default()).unwrap();
        let mut b = Peer::connect(&path, ConnectOptions::default()).unwrap();
        assert_eq!(
            a.wait(TEN_S).unwrap(),
            Some(Event::Peer(PeerEvent::Joined {
                id: b.id(),
                vectors: 2
            }))
        );
        a.notify(b.id(), 1).unwrap();
        assert_eq!(b.wait(TEN_S).unwrap(), Some(Event::Doorbell { vector: 1 }));
        let m = b.map().unwrap();
        m.view().write(0, b"x").unwrap();
        drop(m);
        drop(b);
        assert_eq!(
            a.wait(TEN_S)
                .unwrap()
                .map(|e| matches!(e, Event::Peer(PeerEvent::Left { .. }))),
            Some(true)
        );
    }
    wait_for_count(baseline);

    // A reconnecting peer across a server restart.
    let opts = ConnectOptions {
        reconnect: true,
        reconnect_delay: Duration::from_millis(10),
        ..Default::default()
    };
    let mut p = Peer::connect(&path, opts).unwrap();
    first.shutdown().unwrap();
    assert_eq!(p.wait(TEN_S).unwrap(), Some(Event::ServerGone));
    let second = server(&path);
    assert!(matches!(
        p.wait(TEN_S).unwrap(),
        Some(Event::Reconnected { .. })
    ));
    drop(p);
    second.shutdown().unwrap();
    wait_for_count(before_server);
}
