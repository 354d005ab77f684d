//! The server against raw v0 peers: every message and fd on the wire, as QEMU's server sends.

mod common;

use std::os::fd::AsFd;

use common::start_server;
use ivshm_mem::Mapping;
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::fds::{readable_now, ring, take, wait_readable};
use ivshm_test_support::socket_path;
use ivshm_test_support::v0::RawPeer;

#[test]
fn ids_count_up_from_zero_and_handshakes_follow_qemus_order() {
    let server = start_server("order", 2, 4 << 20);
    let path = server.socket_path().to_path_buf();

    let mut a = RawPeer::connect(&path);
    let ja = a.handshake(2, &[]);
    assert_eq!(ja.id, 0);
    assert_eq!(
        rustix::fs::fstat(&ja.shm).unwrap().st_size,
        4 << 20,
        "shm fd has the region size"
    );

    let mut b = RawPeer::connect(&path);
    let jb = b.handshake(2, &[0]);
    assert_eq!(jb.id, 1);
    // A is told about B: B's id once per vector, each with an eventfd.
    let a_sees_b = a.expect_join(1, 2);

    let mut c = RawPeer::connect(&path);
    let jc = c.handshake(2, &[0, 1]);
    assert_eq!(jc.id, 2);
    let a_sees_c = a.expect_join(2, 2);
    let b_sees_c = b.expect_join(2, 2);

    // The fds are the right ones: ringing what A got for (B, v) wakes B's own vector v only.
    for (v, fd) in a_sees_b.iter().enumerate() {
        ring(fd);
        wait_readable(jb.own[v].as_fd());
        assert_eq!(take(&jb.own[v]), 1);
        assert!(!readable_now(jb.own[1 - v].as_fd()));
    }
    // And C's vectors as seen by A and by B are the same eventfds C owns.
    ring(&a_sees_c[1]);
    ring(&b_sees_c[1]);
    wait_readable(jc.own[1].as_fd());
    assert_eq!(take(&jc.own[1]), 2);
    assert!(!readable_now(jc.own[0].as_fd()));
    // What C got for A in its handshake reaches A.
    ring(&jc.peers[&0][0]);
    wait_readable(ja.own[0].as_fd());
    assert_eq!(take(&ja.own[0]), 1);

    let stats = server.shutdown().unwrap();
    assert_eq!(stats.peers_joined, 3);
    // 3 handshakes (3+2, 3+2+2, 3+2+2+2 messages) and 3 join notifications of 2 messages.
    assert_eq!(stats.messages_sent, 5 + 7 + 9 + 3 * 2);
}

#[test]
fn leave_is_told_to_every_other_peer_and_ids_are_not_reused() {
    let server = start_server("leave", 1, 1 << 20);
    let path = server.socket_path().to_path_buf();
    let mut a = RawPeer::connect(&path);
    a.handshake(1, &[]);
    let mut b = RawPeer::connect(&path);
    b.handshake(1, &[0]);
    a.expect_join(1, 1);
    let mut c = RawPeer::connect(&path);
    c.handshake(1, &[0, 1]);
    a.expect_join(2, 1);
    b.expect_join(2, 1);

    drop(b);
    a.expect_leave(1);
    c.expect_leave(1);

    // The next peer gets 3, not the freed 1, and sees only 0 and 2.
    let mut d = RawPeer::connect(&path);
    let jd = d.handshake(1, &[0, 2]);
    assert_eq!(jd.id, 3);
    a.expect_join(3, 1);
    c.expect_join(3, 1);

    let stats = server.shutdown().unwrap();
    assert_eq!(stats.peers_left, 1);
    assert_eq!(stats.peers_dropped, 0);
    // Shutdown closes every connection and removes the socket.
    assert_eq!(a.expect_closed(), 0);
    assert!(!path.exists());
}

#[test]
fn region_contents_are_shared() {
    let server = start_server("shared", 1, 2 << 20);
    let path = server.socket_path().to_path_buf();
    let mut a = RawPeer::connect(&path);
    let ja = a.handshake(1, &[]);
    let mut b = RawPeer::connect(&path);
    let jb = b.handshake(1, &[0]);
    let ma = Mapping::map_fd(ja.shm.as_fd(), 0, 2 << 20).unwrap();
    let mb = Mapping::map_fd(jb.shm.as_fd(), 0, 2 << 20).unwrap();
    ma.view().write(12345, b"shared bytes").unwrap();
    let mut buf = [0u8; 12];
    mb.view().read(12345, &mut buf).unwrap();
    assert_eq!(&buf, b"shared bytes");
    mb.view().write_u64((2 << 20) - 8, 0xfeed_f00d).unwrap();
    assert_eq!(ma.view().read_u64((2 << 20) - 8).unwrap(), 0xfeed_f00d);
    drop(server);
}

#[test]
fn sixty_four_vectors() {
    let server = start_server("v64", 64, 1 << 20);
    let path = server.socket_path().to_path_buf();
    let mut a = RawPeer::connect(&path);
    let ja = a.handshake(64, &[]);
    assert_eq!(ja.own.len(), 64);
    let mut b = RawPeer::connect(&path);
    let jb = b.handshake(64, &[0]);
    let a_sees_b = a.expect_join(1, 64);
    for v in [0, 31, 63] {
        ring(&a_sees_b[v]);
        wait_readable(jb.own[v].as_fd());
        assert_eq!(take(&jb.own[v]), 1);
    }
    ring(&jb.peers[&0][63]);
    wait_readable(ja.own[63].as_fd());
    assert!(!readable_now(ja.own[62].as_fd()));
    drop(server);
}

#[test]
fn memfd_regions_of_4_gib_and_more_work() {
    // 5 GiB rounds up to 8 GiB (power of two for QEMU's BAR); memfd pages are allocated lazily.
    let server = start_server("big", 1, 5 << 30);
    assert_eq!(server.regions()[0].size, 8 << 30);
    let path = server.socket_path().to_path_buf();
    let mut a = RawPeer::connect(&path);
    let ja = a.handshake(1, &[]);
    let size = rustix::fs::fstat(&ja.shm).unwrap().st_size as u64;
    assert_eq!(size, 8 << 30);
    let m = Mapping::map_fd(ja.shm.as_fd(), 0, size as usize).unwrap();
    let last = size as usize - 8;
    m.view().write_u64(last, 42).unwrap();
    let mut b = RawPeer::connect(&path);
    let jb = b.handshake(1, &[0]);
    let mb = Mapping::map_fd(jb.shm.as_fd(), 0, size as usize).unwrap();
    assert_eq!(mb.view().read_u64(last).unwrap(), 42);
    drop(server);
}

#[test]
fn a_peer_killed_after_any_handshake_step_leaves_cleanly() {
    const VECTORS: usize = 2;
    let server = start_server("killed", VECTORS, 1 << 20);
    let path = server.socket_path().to_path_buf();
    let mut a = RawPeer::connect(&path);
    a.handshake(VECTORS, &[]);
    let mut b = RawPeer::connect(&path);
    b.handshake(VECTORS, &[0]);
    a.expect_join(1, VECTORS);

    // A new peer's handshake here: version, id, shm, 2 existing peers x 2, own x 2 = 9.
    let handshake_len = 3 + 2 * VECTORS + VECTORS;
    let mut next_id = 2u16;
    for k in 0..=handshake_len {
        let mut x = RawPeer::connect(&path);
        for _ in 0..k {
            x.recv();
        }
        drop(x);
        for observer in [&mut a, &mut b] {
            observer.expect_join(next_id, VECTORS);
            observer.expect_leave(next_id);
        }
        next_id += 1;
    }
    // The others are still served: a new peer sees exactly A and B.
    let mut c = RawPeer::connect(&path);
    let jc = c.handshake(VECTORS, &[0, 1]);
    assert_eq!(jc.id, next_id);
    a.expect_join(next_id, VECTORS);
    b.expect_join(next_id, VECTORS);
    let stats = server.shutdown().unwrap();
    // Closing, even with messages unread, is a leave, not a fault.
    assert_eq!(stats.peers_left, handshake_len as u64 + 1);
    assert_eq!(stats.peers_dropped, 0);
}

#[test]
fn a_peer_that_writes_is_dropped_and_the_others_are_told() {
    let server = start_server("garbage", 1, 1 << 20);
    let path = server.socket_path().to_path_buf();
    let mut a = RawPeer::connect(&path);
    a.handshake(1, &[]);
    let mut g = RawPeer::connect(&path);
    g.handshake(1, &[0]);
    a.expect_join(1, 1);
    rustix::io::write(&g.sock, b"garbage!").unwrap();
    a.expect_leave(1);
    // The server closed the writer's connection.
    g.expect_closed();
    let mut c = RawPeer::connect(&path);
    assert_eq!(c.handshake(1, &[0]).id, 2);
    a.expect_join(2, 1);
    let stats = server.shutdown().unwrap();
    assert_eq!(stats.peers_dropped, 1);
}

/// A peer that does not read for a while (a paused VM, a busy program) while others join and
/// leave thousands of times is not dropped and does not hold their eventfds: the vectors of a
/// peer that left before they were sent are taken back (and its leave is not news). What waits
/// for a peer is bounded by the peers present, not by how fast others come and go.
#[test]
fn a_peer_that_pauses_reading_survives_a_flood_of_joins_and_leaves() {
    let mut region = RegionConfig::new(socket_path("flood"));
    region.memory.size = 1 << 20;
    let mut config = ServerConfig::single(region);
    config.max_queued_messages = 8;
    let server = ServerHandle::spawn(config).unwrap();
    let path = server.socket_path().to_path_buf();

    let mut observer = RawPeer::connect(&path);
    observer.handshake(1, &[]);
    // Reads its handshake, then pauses.
    let mut paused = RawPeer::connect(&path);
    paused.handshake(1, &[0]);
    observer.expect_join(1, 1);
    // 2,000 joins and leaves: 4,000 messages, far past its socket buffer (64) and its queue (8).
    for id in 2u16..2002 {
        drop(RawPeer::connect(&path));
        observer.expect_join(id, 1);
        observer.expect_leave(id);
    }
    // Still connected: it reads what was sent before its buffer filled (joins and leaves of
    // the first churners), then hears of a new peer.
    let mut late = RawPeer::connect(&path);
    let late_id = late.handshake(1, &[0, 1]).id;
    observer.expect_join(late_id, 1);
    let mut announced = std::collections::BTreeSet::new();
    loop {
        let m = paused.recv();
        let id = u16::try_from(m.value).unwrap();
        match m.fd {
            Some(_) if id == late_id => break,
            Some(_) => assert!(announced.insert(id), "peer {id} announced twice"),
            // A leave only of a peer it heard of.
            None => assert!(announced.remove(&id), "leave of peer {id}, never announced"),
        }
    }
    assert!(
        announced.is_empty(),
        "announced and never left: {announced:?}"
    );
    let stats = server.shutdown().unwrap();
    assert_eq!(stats.peers_dropped, 0);
}

#[test]
fn a_peer_that_never_reads_is_dropped_and_the_others_are_unaffected() {
    let mut region = RegionConfig::new(socket_path("silent"));
    region.memory.size = 1 << 20;
    let mut config = ServerConfig::single(region);
    config.max_queued_messages = 8;
    let server = ServerHandle::spawn(config).unwrap();
    let path = server.socket_path().to_path_buf();

    let mut observer = RawPeer::connect(&path);
    observer.handshake(1, &[]);
    // Never reads a single byte.
    let silent = RawPeer::connect(&path);
    observer.expect_join(1, 1);

    // Peers that join and stay queue their vectors for the silent peer (it is never sent an fd
    // before it has read) until its queue is full. The observer reads everything and must see
    // the silent peer dropped; the loop bound only guards against a server that never drops it.
    let mut dropped = false;
    let mut stayers = Vec::new();
    for id in 2u16..100 {
        // It reads its handshake, so it is sent what comes later (and is not dropped).
        let mut stayer = RawPeer::connect(&path);
        stayer.expect(0, false);
        stayer.expect(i64::from(id), false);
        while !matches!(stayer.recv(), m if m.value == i64::from(id) && m.fd.is_some()) {}
        stayers.push(stayer);
        // The observer sees the new peer join; the silent peer's leave may come before or
        // after (it is dropped when a push finds its queue full).
        let mut joined = false;
        while !joined {
            let m = observer.recv();
            match (m.value, m.fd.is_some()) {
                (1, false) if !dropped => dropped = true,
                (v, true) if v == i64::from(id) => joined = true,
                other => panic!("unexpected message {other:?}"),
            }
        }
        if dropped {
            break;
        }
    }
    assert!(dropped, "the silent peer was never dropped");
    assert!(stayers.len() > 8, "dropped before its queue was full");
    for (id, stayer) in (2u16..).zip(stayers) {
        drop(stayer);
        observer.expect_leave(id);
    }
    // The observer is still served normally.
    let mut late = RawPeer::connect(&path);
    let jl = late.handshake(1, &[0]);
    observer.expect_join(jl.id, 1);
    let stats = server.shutdown().unwrap();
    assert_eq!(stats.peers_dropped, 1);
    drop(silent);
}

#[test]
fn regions_of_one_server_are_independent() {
    let mut r1 = RegionConfig::new(socket_path("multi-a"));
    r1.name = "a".into();
    r1.memory.size = 1 << 20;
    let mut r2 = RegionConfig::new(socket_path("multi-b"));
    r2.name = "b".into();
    r2.memory.size = 2 << 20;
    r2.vectors = 3;
    let mut config = ServerConfig::single(r1);
    config.regions.push(r2);
    let server = ServerHandle::spawn(config).unwrap();
    let [ra, rb] = [&server.regions()[0], &server.regions()[1]];
    let mut a0 = RawPeer::connect(&ra.socket);
    let ja0 = a0.handshake(1, &[]);
    let mut b0 = RawPeer::connect(&rb.socket);
    let jb0 = b0.handshake(3, &[]);
    assert_eq!((ja0.id, jb0.id), (0, 0));
    assert_eq!(rustix::fs::fstat(&jb0.shm).unwrap().st_size, 2 << 20);
    let mut b1 = RawPeer::connect(&rb.socket);
    b1.handshake(3, &[0]);
    b0.expect_join(1, 3);
    // A peer of region a learns nothing about region b: its next message is a's own news.
    let mut a1 = RawPeer::connect(&ra.socket);
    assert_eq!(a1.handshake(1, &[0]).id, 1);
    a0.expect_join(1, 1);
    drop(server);
}

#[test]
fn posix_shm_region_is_removed_on_shutdown_unless_kept() {
    let name = format!("ivshm-srv-test-{}", std::process::id());
    let shm_path = std::path::PathBuf::from(format!("/dev/shm/{name}"));
    for keep in [true, false] {
        let mut region = RegionConfig::new(socket_path("shm"));
        region.memory.size = 1 << 20;
        region.memory.backend = ivshm_mem::BackendKind::PosixShm {
            name: name.clone(),
            keep,
        };
        let server = ServerHandle::spawn(ServerConfig::single(region)).unwrap();
        let mut a = RawPeer::connect(server.socket_path());
        let ja = a.handshake(1, &[]);
        assert_eq!(rustix::fs::fstat(&ja.shm).unwrap().st_size, 1 << 20);
        assert!(shm_path.exists());
        server.shutdown().unwrap();
        assert_eq!(shm_path.exists(), keep);
    }
}

#[test]
fn zero_vectors_like_qemus_dash_n_0() {
    let server = start_server("v0", 0, 1 << 20);
    let path = server.socket_path().to_path_buf();
    let mut a = RawPeer::connect(&path);
    let ja = a.handshake(0, &[]);
    assert!(ja.own.is_empty());
    let mut b = RawPeer::connect(&path);
    assert_eq!(b.handshake(0, &[0]).id, 1);
    // No eventfds, so no join notification; the leave still comes, as with QEMU's server.
    drop(b);
    a.expect_leave(1);
    drop(server);
}

#[test]
fn a_new_peer_hears_of_the_others_in_join_order_even_when_ids_are_reused() {
    // A lowest-free region that reuses ids at once (`immediate`, for peers that handle it), so
    // join order and id order differ; QEMU's server walks its peer list, i.e. join order, and so
    // must we.
    let root = std::env::temp_dir().join(format!("ivshm-srv-order-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let text = format!(
        "root = {:?}\n[defaults]\nvectors = 1\nid_policy = \"lowest-free\"\n\
         id_reuse = \"immediate\"\n\
         [[region]]\nname = \"bus\"\nsize = \"1M\"\n[vm.host]\nrules = [\"allow *\"]\n",
        root.display().to_string()
    );
    let config =
        ivshm_server::config_file::parse(&text, std::path::Path::new("order.toml")).unwrap();
    let server = ServerHandle::spawn(config).unwrap();
    let path = root.join("host").join("bus.sock");

    let mut a = RawPeer::connect(&path);
    assert_eq!(a.handshake(1, &[]).id, 0);
    let mut b = RawPeer::connect(&path);
    assert_eq!(b.handshake(1, &[0]).id, 1);
    let mut c = RawPeer::connect(&path);
    assert_eq!(c.handshake(1, &[0, 1]).id, 2);
    drop(a);
    b.expect_join(2, 1);
    b.expect_leave(0);
    // D takes the freed id 0 but joined last.
    let mut d = RawPeer::connect(&path);
    assert_eq!(d.handshake(1, &[1, 2]).id, 0);
    // E is told about 1, 2, then 0: join order, not id order.
    let mut e = RawPeer::connect(&path);
    assert_eq!(e.handshake(1, &[1, 2, 0]).id, 3);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn no_peer_is_told_of_a_new_peer_with_an_id_it_saw_leave() {
    // The named regions' defaults: lowest-free ids, reused safely. QEMU 7.2's ivshmem-doorbell
    // writes a new peer's eventfds into the array it freed when that id's last holder left, so
    // an id is given again only once every connected peer joined after that leave.
    let root = std::env::temp_dir().join(format!("ivshm-srv-reuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let text = format!(
        "root = {:?}\n[defaults]\nvectors = 1\n\
         [[region]]\nname = \"bus\"\nsize = \"1M\"\n[vm.host]\nrules = [\"allow *\"]\n",
        root.display().to_string()
    );
    let config =
        ivshm_server::config_file::parse(&text, std::path::Path::new("reuse.toml")).unwrap();
    let server = ServerHandle::spawn(config).unwrap();
    let path = root.join("host").join("bus.sock");

    let mut a = RawPeer::connect(&path);
    assert_eq!(a.handshake(1, &[]).id, 0);
    let mut b = RawPeer::connect(&path);
    assert_eq!(b.handshake(1, &[0]).id, 1);
    a.expect_join(1, 1);
    let mut c = RawPeer::connect(&path);
    assert_eq!(c.handshake(1, &[0, 1]).id, 2);
    a.expect_join(2, 1);
    // B leaves; A and C saw it, so 1 is held: D gets 3, and A and C hear of 3, never of 1.
    drop(b);
    a.expect_leave(1);
    c.expect_leave(1);
    let mut d = RawPeer::connect(&path);
    assert_eq!(d.handshake(1, &[0, 2]).id, 3);
    a.expect_join(3, 1);
    c.expect_join(3, 1);
    // A leaves; C and D saw it: 0 is held too. E gets 4.
    drop(a);
    c.expect_leave(0);
    d.expect_leave(0);
    let mut e = RawPeer::connect(&path);
    assert_eq!(e.handshake(1, &[2, 3]).id, 4);
    c.expect_join(4, 1);
    d.expect_join(4, 1);
    // C, the last peer that saw B leave, leaves: 1 is free again at once (D and E joined after
    // B left), and it is the lowest free id; 0 stays held (D and E saw A leave), and so does
    // C's 2.
    drop(c);
    d.expect_leave(2);
    e.expect_leave(2);
    let mut f = RawPeer::connect(&path);
    assert_eq!(f.handshake(1, &[3, 4]).id, 1);
    d.expect_join(1, 1);
    e.expect_join(1, 1);
    // Nothing else arrived: no peer was told of anything more.
    for peer in [&d, &e, &f] {
        assert!(!readable_now(peer.sock.as_fd()));
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}
