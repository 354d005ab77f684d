//! The doorbell conformance suite against the local (memfd + eventfd) doorbells.

use std::sync::Arc;

use ivshm_channel::conformance;
use ivshm_channel::local::LocalBus;
use ivshm_channel::{FormatOptions, Region};

#[test]
fn local_doorbells_conform() {
    let bus = LocalBus::new(1 << 20, 2, 2).unwrap();
    let (a, b) = (bus.doorbell(0).unwrap(), bus.doorbell(1).unwrap());
    conformance::run_all(&a, &b);
}

#[test]
fn channels_over_local_doorbells_conform() {
    let bus = LocalBus::new(1 << 20, 2, 1).unwrap();
    let a = Region::open_or_format(
        bus.map().unwrap(),
        Arc::new(bus.doorbell(0).unwrap()),
        FormatOptions::default(),
    )
    .unwrap();
    let b = Region::open(bus.map().unwrap(), Arc::new(bus.doorbell(1).unwrap())).unwrap();
    conformance::channel_round_trips(&a, &b, "conformance");
    assert!(conformance::channel_poll_loop(&a, &b, "poll-loop"));
}
