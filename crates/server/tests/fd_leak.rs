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
                    (1, false) if !silent_gone => silent_gone = true,
                    (v, true) if v == i64::from(next) && joined < 4 => joined += 1,
                    (v, false) if v == i64::from(next) && joined == 4 => left = true,
                    other => panic!("unexpected message {other:?}"),
                }
            }
            next += 1;
        }
        assert!(silent_gone, "the silent peer should have been dropped");
        drop(silent);
        assert_eq!(
            open_fds(),
            serving_one_peer,
            "after the churn the running server holds more fds than for its one peer"
        );
        drop(observer);
        let stats = server.shutdown().unwrap();
        assert_eq!(stats.peers_joined, 62);
        assert_eq!(stats.peers_connected, 0);
    }
    assert_eq!(open_fds(), before, "fds leaked");
}
