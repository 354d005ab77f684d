//! Two host processes exchange checksummed messages of random sizes (1 B to 64 KiB) over a
//! memfd region with eventfd doorbells inherited by the child, both directions at once: none
//! lost, none duplicated, none reordered, none damaged.
//!
//! The child is this test binary again, running only `child_side` with `IVSHM_LOCAL_BUS` set
//! (`LocalBus::pass_to`); in a normal run `child_side` finds no bus and returns at once.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ivshm_channel::local::LocalBus;
use ivshm_channel::traffic::{exchange, Exchange};
use ivshm_channel::{Channel, ChannelOptions, FormatOptions, Region, Spin};

const MESSAGES: u64 = 20_000;

/// Sends our stream and receives the other at once (two threads on one endpoint): sizes
/// log-uniform in 1 B..64 KiB, each message numbered and checksummed and compared whole
/// (`ivshm_channel::traffic`).
fn run_side(ch: Channel) {
    let ex = Exchange {
        count: MESSAGES,
        max_len: 64 << 10,
        timeout: Some(Duration::from_secs(60)),
        tolerate_damage: false,
    };
    let report = exchange(ch, &ex).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.sent, report.received), (MESSAGES, MESSAGES));
}

fn options() -> ChannelOptions {
    ChannelOptions {
        spin: Spin::default(),
        ..ChannelOptions::default()
    }
}

#[test]
fn child_side() {
    let Some((memory, doorbell)) = LocalBus::from_env().unwrap() else {
        return;
    };
    let region = Region::open(memory, Arc::new(doorbell)).unwrap();
    let ch = region.channel("two-processes", options()).unwrap();
    run_side(ch);
}

#[test]
fn two_processes_exchange_checksummed_messages_both_ways() {
    let bus = LocalBus::new(4 << 20, 2, 1).unwrap();
    let fmt = FormatOptions {
        channels: 4,
        ring_size_max: 256 << 10,
    };
    let region =
        Region::open_or_format(bus.map().unwrap(), Arc::new(bus.doorbell(0).unwrap()), fmt)
            .unwrap();
    let ch = region.channel("two-processes", options()).unwrap();
    assert!(ch.max_message() >= 64 << 10);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_side", "--nocapture", "--test-threads=1"]);
    bus.pass_to(&mut cmd, 1).unwrap();
    let mut child = cmd.spawn().unwrap();
    run_side(ch);
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed: {status}");
}
