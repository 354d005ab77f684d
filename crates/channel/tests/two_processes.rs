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
use ivshm_channel::{Channel, ChannelOptions, FormatOptions, Region, Spin};

const MESSAGES: u64 = 20_000;
const LONG: Option<Duration> = Some(Duration::from_secs(60));

/// Message `seq` of a direction: its length is log-uniform in 1..=65536 (many small, some
/// large); bytes 0..8 (when they fit) carry `seq`, the last 4 a checksum of the rest.
fn message(direction: u64, seq: u64) -> Vec<u8> {
    let mut x = (seq ^ (direction << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let bits = next() % 17;
    let len = 1 + (next() % (1u64 << bits)) as usize;
    let mut m: Vec<u8> = (0..len).map(|_| next() as u8).collect();
    if len >= 12 {
        m[..8].copy_from_slice(&seq.to_le_bytes());
        let sum = checksum(&m[..len - 4]);
        m[len - 4..].copy_from_slice(&sum.to_le_bytes());
    }
    m
}

fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Sends our direction and receives the other at once (two threads on one endpoint).
fn run_side(ch: Channel, send_dir: u64, recv_dir: u64) {
    let (mut tx, mut rx) = ch.split();
    std::thread::scope(|s| {
        s.spawn(move || {
            for seq in 0..MESSAGES {
                tx.send(&message(send_dir, seq), LONG)
                    .unwrap_or_else(|e| panic!("send {seq}: {e}"));
            }
            // Keep the side open until the peer has everything: dropping closes it.
            tx
        });
        let mut buf = Vec::new();
        for seq in 0..MESSAGES {
            rx.recv(&mut buf, LONG)
                .unwrap_or_else(|e| panic!("recv {seq}: {e}"));
            let want = message(recv_dir, seq);
            if buf.len() >= 12 {
                let n = buf.len();
                assert_eq!(
                    &buf[..8],
                    &seq.to_le_bytes(),
                    "message {seq}: wrong sequence number"
                );
                assert_eq!(
                    checksum(&buf[..n - 4]).to_le_bytes(),
                    buf[n - 4..],
                    "message {seq}: bad checksum"
                );
            }
            assert_eq!(buf, want, "message {seq} of direction {recv_dir}");
        }
    });
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
    run_side(ch, 1, 0);
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
    run_side(ch, 0, 1);
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed: {status}");
}
