//! The `ivshm-channel` doorbell conformance suite against host peers of a real in-process
//! ivshm server, and channels between two host peers over the server's region.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{socket_path, TEN_S};
use ivshm_channel::{
    conformance, ChannelError, ChannelOptions, Doorbell, FormatOptions, Region, Spin,
};
use ivshm_client::{ConnectOptions, Peer, PeerDoorbell, PeerEvent};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};

/// Answers to b's id; never rings or waits (the leaked side never blocks).
#[derive(Debug)]
struct Ghost(u16);

impl Doorbell for Ghost {
    fn own_id(&self) -> u16 {
        self.0
    }
    fn vectors(&self) -> u16 {
        1
    }
    fn ring(&self, _: u16, _: u16) -> Result<(), ivshm_channel::DoorbellError> {
        Ok(())
    }
    fn wait(&self, _: u16, _: Option<Duration>) -> Result<bool, ivshm_channel::DoorbellError> {
        Ok(false)
    }
    fn take(&self, _: u16) -> Result<bool, ivshm_channel::DoorbellError> {
        Ok(false)
    }
    fn fd(&self, _: u16) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A server; `mark`: it marks the channel sides of departed peers itself.
fn server(path: &std::path::Path, mark: bool) -> ServerHandle {
    let mut region = RegionConfig::new(path);
    region.vectors = 2;
    region.memory.size = 4 << 20;
    let mut config = ServerConfig::single(region);
    config.mark_channel_departures = mark;
    ServerHandle::spawn(config).unwrap()
}

fn peer(path: &std::path::Path) -> PeerDoorbell {
    PeerDoorbell::new(Peer::connect(path, ConnectOptions::default()).unwrap()).unwrap()
}

#[test]
fn host_peers_conform() {
    let path = socket_path("chan-conformance");
    let _server = server(&path, true);
    let a = peer(&path);
    // b joins after a: a learns of b while ringing it (the ring reads the server's socket).
    let b = peer(&path);
    conformance::run_all(&a, &b);
    assert!(a
        .take_events()
        .iter()
        .any(|e| matches!(e, PeerEvent::Joined { id, .. } if *id == b.own_id())));
}

#[test]
fn channels_between_host_peers_conform_and_see_a_leave() {
    let path = socket_path("chan-peers");
    // The host peer marks the leave (the server would mark it first otherwise).
    let _server = server(&path, false);
    let a = Arc::new(peer(&path));
    let b = Arc::new(peer(&path));
    let ma = a.peer().map().unwrap();
    let mb = b.peer().map().unwrap();
    let ra = Region::open_or_format(ma, a.clone(), FormatOptions::default()).unwrap();
    let rb = Region::open(mb, b.clone()).unwrap();
    conformance::channel_round_trips(&ra, &rb, "over-the-server");
    assert!(conformance::channel_poll_loop(&ra, &rb, "poll-loop"));

    // b leaves while a waits on a channel: a reads the leave from the server and marks it.
    let opts = ChannelOptions {
        spin: Spin::Never,
        ..ChannelOptions::default()
    };
    let mut x = ra.channel("leave", opts).unwrap();
    let b_id = b.own_id();
    // b's side is opened through a handle that is leaked (b "crashes" without closing it),
    // with a stand-in doorbell so that leaking it does not keep b's connection alive.
    let ghost = Region::open(b.peer().map().unwrap(), Arc::new(Ghost(b_id))).unwrap();
    std::mem::forget(ghost.channel("leave", opts).unwrap());
    drop(rb);
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<u16> = a
            .process_server_messages()
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                PeerEvent::Left { id } => Some(id),
                _ => None,
            })
            .collect();
        if left.contains(&b_id) {
            assert_eq!(ra.peer_left(b_id).unwrap(), 1);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no leave event");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut buf = Vec::new();
    assert!(matches!(
        x.recv(&mut buf, TEN_S),
        Err(ChannelError::PeerGone { peer }) if peer == b_id
    ));
}
