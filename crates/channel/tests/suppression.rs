//! Notification suppression: a side rings the other's doorbell only when the other said it is
//! going to sleep (armed its event word), and then once per arming, however many messages or
//! how much space follow. Counted at the doorbell: every `ring` call of each peer.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ivshm_channel::local::{LocalBus, LocalDoorbell};
use ivshm_channel::{
    Channel, ChannelError, ChannelOptions, Doorbell, DoorbellError, FormatOptions, Region, Spin,
};

const ZERO: Option<Duration> = Some(Duration::ZERO);

/// A local doorbell that counts the rings it makes.
#[derive(Debug)]
struct Counting {
    inner: LocalDoorbell,
    rings: Arc<AtomicUsize>,
}

impl Doorbell for Counting {
    fn own_id(&self) -> u16 {
        self.inner.own_id()
    }
    fn vectors(&self) -> u16 {
        self.inner.vectors()
    }
    fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError> {
        self.rings.fetch_add(1, Ordering::SeqCst);
        self.inner.ring(peer, vector)
    }
    fn wait(&self, vector: u16, timeout: Option<Duration>) -> Result<bool, DoorbellError> {
        self.inner.wait(vector, timeout)
    }
    fn take(&self, vector: u16) -> Result<bool, DoorbellError> {
        self.inner.take(vector)
    }
    fn fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.inner.fd(vector)
    }
}

/// Both ends of one channel with 1 KiB rings, and the ring counters of their peers.
fn counted_pair() -> (
    LocalBus,
    Channel,
    Channel,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
) {
    let bus = LocalBus::new(1 << 20, 2, 1).unwrap();
    let (ra, rb) = (Arc::default(), Arc::default());
    let counting = |id, rings: &Arc<AtomicUsize>| {
        Arc::new(Counting {
            inner: bus.doorbell(id).unwrap(),
            rings: rings.clone(),
        })
    };
    let fmt = FormatOptions {
        channels: 2,
        ring_size_max: 1024,
    };
    let a = Region::open_or_format(bus.map().unwrap(), counting(0, &ra), fmt).unwrap();
    let b = Region::open(bus.map().unwrap(), counting(1, &rb)).unwrap();
    let opts = ChannelOptions {
        spin: Spin::Never,
        ..ChannelOptions::default()
    };
    let x = a.channel("quiet", opts).unwrap();
    let y = b.channel("quiet", opts).unwrap();
    (bus, x, y, ra, rb)
}

#[test]
fn nobody_rings_a_side_that_did_not_arm() {
    let (_bus, mut x, mut y, x_rings, y_rings) = counted_pair();
    let mut buf = Vec::new();
    // 2,000 messages each way, never more than the ring holds in flight, received without
    // waiting (so never armed): no doorbell at all.
    for i in 0..2000u32 {
        let m = vec![i as u8; 1 + i as usize % 300];
        x.send(&m, ZERO).unwrap();
        y.send(&m, ZERO).unwrap();
        assert_eq!(y.recv(&mut buf, ZERO).unwrap(), m.len());
        assert_eq!(x.recv(&mut buf, ZERO).unwrap(), m.len());
    }
    assert_eq!(x_rings.load(Ordering::SeqCst), 0, "x rang an unarmed y");
    assert_eq!(y_rings.load(Ordering::SeqCst), 0, "y rang an unarmed x");
}

#[test]
fn an_armed_side_is_rung_once_per_arming() {
    let (_bus, mut x, mut y, x_rings, y_rings) = counted_pair();
    let mut buf = Vec::new();
    // y finds its ring empty (WouldBlock arms it); x's next sends: one ring, then none.
    assert!(matches!(
        y.receiver().try_recv(&mut buf),
        Err(ChannelError::WouldBlock)
    ));
    for i in 0..4u8 {
        x.send(&[i; 100], ZERO).unwrap();
    }
    assert_eq!(x_rings.load(Ordering::SeqCst), 1, "one ring per arming");
    assert!(y.take_doorbell().unwrap());
    for _ in 0..4 {
        y.recv(&mut buf, ZERO).unwrap();
    }
    // x fills its ring and WouldBlock arms it for space; y's receives ring it once.
    while x.sender().try_send(&[9; 100]).is_ok() {}
    assert!(matches!(
        x.sender().try_send(&[9; 100]),
        Err(ChannelError::WouldBlock)
    ));
    let before = y_rings.load(Ordering::SeqCst);
    while y.receiver().try_recv(&mut buf).is_ok() {}
    assert_eq!(
        y_rings.load(Ordering::SeqCst) - before,
        1,
        "one ring when the space x waits for is free"
    );
    assert!(x.take_doorbell().unwrap());
}
