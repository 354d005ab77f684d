//! Out of file descriptors: the server refuses the new peer (closes its connection), keeps
//! serving the others, and accepts peers again once fds are available.
//! (Its own test binary: it lowers this process's fd limit.)

mod common;

use std::os::fd::AsFd;

use common::start_server;
use ivshm_test_support::fds::wait_readable;
use ivshm_test_support::v0::RawPeer;
use rustix::net::{recv, RecvFlags};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The smallest fd limit that leaves exactly `free` fd numbers available (new fds take the
/// lowest free numbers, so holes below the limit count as room).
fn limit_leaving(free: u64) -> u64 {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    let mut available = 0;
    let mut limit = 0;
    while available < free {
        if !open.contains(&limit) {
            available += 1;
        }
        limit += 1;
    }
    limit
}

/// Waits until the server has either started the handshake (data) or closed the connection.
fn was_refused(peer: &RawPeer) -> bool {
    wait_readable(peer.sock.as_fd());
    let mut byte = [0u8; 1];
    let (n, _) = recv(&peer.sock, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT).unwrap();
    n == 0
}

#[test]
fn a_peer_is_refused_when_fds_run_out_and_others_keep_working() {
    // With an even number of free fds `accept` fails (the reserve-fd path); with an odd number
    // `accept` succeeds and `eventfd` fails.
    refused_when_only(8);
    refused_when_only(9);
}

fn refused_when_only(free: u64) {
    let server = start_server("emfile", 1, 1 << 20);
    let path = server.socket_path().to_path_buf();
    let mut observer = RawPeer::connect(&path);
    observer.handshake(1, &[]);

    // Our sockets exist before the limit drops, so only the server allocates fds below.
    let sockets: Vec<_> = (0..64).map(|_| RawPeer::new_socket()).collect();
    let original = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(limit_leaving(free)),
            maximum: original.maximum,
        },
    )
    .unwrap();

    // Each joined peer costs the server 2 fds (its socket and one eventfd); the observer does
    // not read, so it receives no fds. The limit is reached after a few peers.
    let mut peers = Vec::new();
    let mut refused = false;
    for sock in sockets {
        let peer = RawPeer::connect_socket(sock, &path);
        let r = was_refused(&peer);
        peers.push(peer);
        if r {
            refused = true;
            break;
        }
    }
    setrlimit(Resource::Nofile, original).unwrap();
    assert!(refused, "no peer was refused although fds ran out");
    assert_eq!(server.stats().peers_refused, 1);

    // The observer saw every joined peer (and no refused one), and keeps being served.
    let joined = peers.len() - 1;
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..joined {
        let m = observer.recv();
        assert!(m.fd.is_some());
        ids.insert(m.value);
    }
    assert_eq!(ids.len(), joined);
    drop(peers);
    let mut left = std::collections::BTreeSet::new();
    for _ in 0..joined {
        let m = observer.recv();
        assert!(m.fd.is_none());
        left.insert(m.value);
    }
    assert_eq!(left, ids);
    let mut late = RawPeer::connect(&path);
    let j = late.handshake(1, &[0]);
    observer.expect_join(j.id, 1);
    let stats = server.shutdown().unwrap();
    assert_eq!(stats.peers_refused, 1);
}
