//! The server marks the channel sides of a peer that leaves (`docs/channel-spec.md`, "Peers
//! that leave"): a survivor that never reads its server socket (as a guest, which gets no
//! leave events) is woken and gets `PeerGone`, the departed peer's directory lock is freed,
//! regions without channels and regions with a hostile header are left alone, and the marking
//! can be switched off.

use std::sync::Arc;
use std::time::Duration;

use ivshm_channel::layout::{H_LOCK, H_MAGIC, LOCK_HELD, MAGIC};
use ivshm_channel::{ChannelError, ChannelOptions, FormatOptions, Region, Spin};
use ivshm_client::{ConnectOptions, Peer, PeerDoorbell, PeerEvent};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::socket_path;

const LONG: Option<Duration> = Some(Duration::from_secs(30));

fn server(tag: &str, mark: bool) -> ServerHandle {
    let mut region = RegionConfig::new(socket_path(tag));
    region.vectors = 2;
    region.memory.size = 1 << 20;
    let mut config = ServerConfig::single(region);
    config.mark_channel_departures = mark;
    ServerHandle::spawn(config).unwrap()
}

fn peer(server: &ServerHandle) -> Arc<PeerDoorbell> {
    let peer = Peer::connect(server.socket_path(), ConnectOptions::default()).unwrap();
    Arc::new(PeerDoorbell::new(peer).unwrap())
}

/// Waits until `survivor` hears that `id` left: the server marks before it tells.
fn wait_left(survivor: &PeerDoorbell, id: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = survivor.process_server_messages().unwrap();
        if events
            .iter()
            .any(|e| matches!(e, PeerEvent::Left { id: left } if *left == id))
        {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no leave of {id}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn opts() -> ChannelOptions {
    ChannelOptions {
        vector: 1,
        spin: Spin::Never,
        ..ChannelOptions::default()
    }
}

/// Peer `b` "crashes": its endpoint of `name` stays attached (never closed: leaked), it holds
/// the directory lock if `holding_lock`, and its connection to the server breaks. Returns its
/// id.
fn crash_with_channel_open(b: &Arc<PeerDoorbell>, name: &str, holding_lock: bool) -> u16 {
    let id = b.peer().id();
    let memory = b.peer().map().unwrap();
    if holding_lock {
        memory
            .view()
            .write_u32(H_LOCK, LOCK_HELD | u32::from(id))
            .unwrap();
    }
    let region = Region::open(b.peer().map().unwrap(), b.clone()).unwrap();
    let channel = if holding_lock {
        None
    } else {
        Some(region.channel(name, opts()).unwrap())
    };
    let socket = b.socket_fd().unwrap();
    std::mem::forget(channel);
    std::mem::forget(region);
    rustix::net::shutdown(&socket, rustix::net::Shutdown::Both).unwrap();
    id
}

#[test]
fn a_departed_peers_sides_are_marked_gone_and_a_sleeping_survivor_wakes() {
    let server = server("chan-departed", true);
    let a = peer(&server);
    let b = peer(&server);
    let ra = Region::open_or_format(a.peer().map().unwrap(), a.clone(), FormatOptions::default())
        .unwrap();
    let mut x = ra.channel("left-behind", opts()).unwrap();
    // A peer that dies holding the directory lock.
    let lock_holder = peer(&server);
    crash_with_channel_open(&lock_holder, "", true);
    let memory = a.peer().map().unwrap();
    let view = memory.view();
    std::thread::scope(|s| {
        // A sleeps in recv and never reads its server socket (as a guest could not).
        let waiter = s.spawn(move || {
            let mut buf = Vec::new();
            let result = x.recv(&mut buf, LONG);
            (result, x)
        });
        std::thread::sleep(Duration::from_millis(50));
        let b_id = crash_with_channel_open(&b, "left-behind", false);
        let (result, x) = waiter.join().unwrap();
        assert!(
            matches!(result, Err(ChannelError::PeerGone { peer }) if peer == b_id),
            "{result:?}"
        );
        // The lock holder's leave frees the lock (it may come after B's).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while view.read_u32(H_LOCK).unwrap() != 0 {
            assert!(std::time::Instant::now() < deadline, "lock not freed");
            std::thread::sleep(Duration::from_millis(10));
        }
        let listed = ra.channels().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].b.state, listed[0].b.peer), ("gone", b_id));
        assert_eq!(listed[0].a.state, "attached");
        drop(x);
    });
    // The directory works for the survivor (lock free, the gone channel reclaimed on close).
    drop(ra.channel("next", opts()).unwrap());
}

#[test]
fn marking_can_be_switched_off() {
    let server = server("chan-nomark", false);
    let a = peer(&server);
    let b = peer(&server);
    let ra = Region::open_or_format(a.peer().map().unwrap(), a.clone(), FormatOptions::default())
        .unwrap();
    let mut x = ra.channel("unmarked", opts()).unwrap();
    let b_id = crash_with_channel_open(&b, "unmarked", false);
    wait_left(&a, b_id);
    let mut buf = Vec::new();
    assert!(matches!(
        x.recv(&mut buf, Some(Duration::from_millis(300))),
        Err(ChannelError::Timeout)
    ));
    let listed = ra.channels().unwrap();
    assert_eq!((listed[0].b.state, listed[0].b.peer), ("attached", b_id));
}

#[test]
fn regions_without_channels_or_with_a_hostile_header_are_left_alone() {
    let server = server("chan-foreign", true);
    let a = peer(&server);
    let memory = a.peer().map().unwrap();
    let view = memory.view();
    let len = view.len();
    // Not a channel region: a pattern, and the lock word set as if a peer held it.
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    view.write(0, &pattern).unwrap();
    let b = peer(&server);
    view.write_u32(H_LOCK, LOCK_HELD | u32::from(b.peer().id()))
        .unwrap();
    let mut expected = pattern.clone();
    expected[H_LOCK..H_LOCK + 4].copy_from_slice(&view.read_u32(H_LOCK).unwrap().to_le_bytes());
    let b_id = b.peer().id();
    drop(b);
    wait_left(&a, b_id);
    let mut now = vec![0u8; len];
    view.read(0, &mut now).unwrap();
    assert!(now == expected, "a region without channels was written");

    // The channel magic over a header that describes no valid layout (a hostile peer's).
    view.write_u32(H_MAGIC, MAGIC).unwrap();
    expected[..4].copy_from_slice(&MAGIC.to_le_bytes());
    let d = peer(&server);
    view.write_u32(H_LOCK, LOCK_HELD | u32::from(d.peer().id()))
        .unwrap();
    expected[H_LOCK..H_LOCK + 4].copy_from_slice(&view.read_u32(H_LOCK).unwrap().to_le_bytes());
    let d_id = d.peer().id();
    drop(d);
    wait_left(&a, d_id);
    // The server goes on serving.
    let e = peer(&server);
    assert!(e.peer().id() > 0);
    view.read(0, &mut now).unwrap();
    assert!(
        now == expected,
        "a region with an invalid header was written"
    );
}
