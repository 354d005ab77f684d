//! Shared set-up for the channel tests.

use std::sync::Arc;

use ivshm_channel::local::LocalBus;
use ivshm_channel::{Channel, ChannelOptions, FormatOptions, Region, Spin};

/// Two regions (peers 0 and 1) over one memfd of `size` bytes, formatted with `channels`
/// channels of rings of at most `ring` bytes.
pub fn regions(size: u64, channels: u32, ring: u32) -> (LocalBus, Region, Region) {
    let bus = LocalBus::new(size, 2, 1).unwrap();
    let fmt = FormatOptions {
        channels,
        ring_size_max: ring,
    };
    let a = Region::open_or_format(bus.map().unwrap(), Arc::new(bus.doorbell(0).unwrap()), fmt)
        .unwrap();
    let b = Region::open(bus.map().unwrap(), Arc::new(bus.doorbell(1).unwrap())).unwrap();
    (bus, a, b)
}

/// Both ends of channel `name`.
pub fn pair(a: &Region, b: &Region, name: &str, spin: Spin) -> (Channel, Channel) {
    let opts = ChannelOptions {
        spin,
        ..ChannelOptions::default()
    };
    let x = a.channel(name, opts).unwrap();
    let y = b.channel(name, opts).unwrap();
    (x, y)
}

/// A message of `len` bytes whose content depends on `seq` (so that a lost, duplicated or
/// reordered message is seen).
pub fn message(seq: u64, len: usize) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
