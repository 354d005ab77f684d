//! The channel's fast path in one thread, for counting instructions per operation:
//!
//! ```sh
//! cargo build -p ivshm-channel --release --example fastpath
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/fastpath 64 1000      # and again with 101000
//! ```
//!
//! It opens both ends of one channel over a memfd and makes `ROUNDS` round trips of `SIZE`-byte
//! messages (A sends, B receives into a buffer, B sends it back, A receives), busy-polling
//! (no system call on this path). The difference between the totals of two runs with different
//! `ROUNDS`, divided by the difference of rounds, is the cost of one round trip: two sends and
//! two receives. Instruction counts are repeatable on a loaded machine, times are not.

use std::sync::Arc;

use ivshm_channel::local::LocalBus;
use ivshm_channel::{ChannelOptions, FormatOptions, Region, Spin};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().as_deref().unwrap_or("64").parse()?;
    let rounds: u64 = args.next().as_deref().unwrap_or("1000").parse()?;
    let ring: u32 = args.next().as_deref().unwrap_or("1048576").parse()?;
    let bus = LocalBus::new(8 << 20, 2, 1)?;
    let fmt = FormatOptions {
        channels: 2,
        ring_size_max: ring,
    };
    let a = Region::open_or_format(bus.map()?, Arc::new(bus.doorbell(0)?), fmt)?;
    let b = Region::open(bus.map()?, Arc::new(bus.doorbell(1)?))?;
    let opts = ChannelOptions {
        spin: Spin::Forever,
        ..ChannelOptions::default()
    };
    let mut x = a.channel("fastpath", opts)?;
    let mut y = b.channel("fastpath", opts)?;
    let msg = vec![0x5a_u8; size];
    let (mut bx, mut by) = (vec![0u8; size], vec![0u8; size]);
    for _ in 0..rounds {
        x.send(&msg, None)?;
        y.receiver().recv_into(&mut by, None)?;
        y.send(&by, None)?;
        x.receiver().recv_into(&mut bx, None)?;
    }
    assert_eq!(bx, msg);
    Ok(())
}
