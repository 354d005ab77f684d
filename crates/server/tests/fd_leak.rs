//! No fd leaks: the server runs in-process, so `/proc/self/fd` counts both sides.
//! (Its own test binary: other tests running in parallel would change the count.)

use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::fds::open_fds;
use ivshm_test_support::socket_path;
use ivshm_test_support::v0::RawPeer;

#[test]
fn churn_of_joins_leaves_and_drops_leaks_no_fd() {
    let before = open_fds();
    {
        let mut region = RegionConfig::new(socket_path("leak"));
        region.vectors = 4;
        region.memory.size = 1 << 20;
        let mut config = ServerConfig::single(region);
        config.max_queued_messages = 4;
        let server = ServerHandle::spawn(config).unwrap();
        let path = server.socket_path().to_path_buf();
        let mut observer = RawPeer::connect(&path);
        let j = observer.handshake(4, &[]);
        drop(j);
        // While the server runs: what it holds with one peer connected. A leak that only
        // shutdown cleans up (fds of departed peers kept somewhere) shows up against this.
        let serving_one_peer = open_fds();
        // A silent peer that will be dropped for not reading, holding queued eventfds.
        let silent = RawPeer::connect(&path);
        let mut next = 1u16;
        observer.expect_join(next, 4);
        next += 1;
        let mut silent_gone = false;
        // Two peers that stay put 8 vectors in the silent peer's queue, past its bound of 4
        // (the churn below would not: the vectors of a peer that left are taken back).
        let mut stayers = Vec::new();
        for _ in 0..2 {
            // It reads its handshake (whoever is there by then), so fds may be sent to it.
            let mut p = RawPeer::connect(&path);
            p.expect(0, false);
            assert_eq!(p.recv().value, i64::from(next));
            let mut own = 0;
            while own < 4 {
                let m = p.recv();
                own += usize::from(m.value == i64::from(next) && m.fd.is_some());
            }
            let mut joined = 0;
            while joined < 4 {
                let m = observer.recv();
                match (m.value, m.fd.is_some()) {
                    (1, false) if !silent_gone => silent_gone = true,
                    (v, true) if v == i64::from(next) => joined += 1,
                    other => panic!("unexpected message {other:?}"),
                }
            }
            stayers.push((next, p));
            next += 1;
        }
        // They go before the churn (they do not read either).
        for (id, stayer) in stayers {
            drop(stayer);
            loop {
                match observer.recv() {
                    m if m.value == 1 && m.fd.is_none() && !silent_gone => silent_gone = true,
                    m if m.value == i64::from(id) && m.fd.is_none() => break,
                    m => panic!("unexpected message {:?}", (m.value, m.fd.is_some())),
                }
            }
        }
        assert!(silent_gone, "the silent peer should have been dropped");
        for round in 0..60 {
            let mut p = RawPeer::connect(&path);
            // Alternate: full handshake, partial handshake, none, and a garbage writer.
            match round % 4 {
                0 => {
                    let _ = p.recv();
                }
                1 => {
                    for _ in 0..5 {
                        let _ = p.recv();
                    }
                }
                2 => {}
                _ => {
                    let _ = p.recv();
                    rustix::io::write(&p.sock, b"x").unwrap();
                }
            }
            drop(p);
            let (mut joined, mut left) = (0, false);
            while !(joined == 4 && left) {
                let m = observer.recv();
                match (m.value, m.fd.is_some()) {
                    (v, true) if v == i64::from(next) && joined < 4 => joined += 1,
                    (v, false) if v == i64::from(next) && joined == 4 => left = true,
                    other => panic!("unexpected message {other:?}"),
                }
            }
            next += 1;
        }
        drop(silent);
        assert_eq!(
            open_fds(),
            serving_one_peer,
            "after the churn the running server holds more fds than for its one peer"
        );
        drop(observer);
        let stats = server.shutdown().unwrap();
        assert_eq!(stats.peers_joined, 64);
        assert_eq!(stats.peers_connected, 0);
    }
    assert_eq!(open_fds(), before, "fds leaked");
}
