//! `ivshm bench channel`: `ivshm-channel` next to the hardware's and the kernel's floors, each
//! pair measured in alternating blocks of one run on the same CPUs (ratios, not absolute
//! figures, are what to read):
//!
//! - 64-byte round trips, busy-poll (`Spin::Forever`) vs two threads ping-ponging a flag on a
//!   shared cache line (the floor for polling);
//! - 64-byte round trips, blocking at once (`Spin::Never`) vs a raw eventfd ping-pong
//!   (blocking `read(2)`/`write(2)`); neither side has a timeout (with one, the channel's wait
//!   is a `poll(2)` and a `read(2)`);
//! - throughput with 64 KiB and 1 MiB messages (sender and receiver copy from and into
//!   64-byte aligned private buffers) vs a single-thread `memcpy` of the same size;
//! - the CPU time of a receiver blocked for 1 s on an empty channel (default spin budget).
//!
//! The channel runs over a memfd region with eventfd doorbells (`LocalBus`), in one process.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ivshm_channel::local::LocalBus;
use ivshm_channel::{Channel, ChannelError, ChannelOptions, FormatOptions, Region, Spin};
use rustix::event::{eventfd, EventfdFlags};

use clap::builder::RangedU64ValueParser;

use super::bench::{
    micros, pin_to, placement_cpus, ratio, read_eventfd, summarize, write_eventfd, Placement,
    Summary, MAX_ROUNDS,
};

/// `ivshm bench channel`.
#[derive(Args, Debug, Clone)]
pub struct ChannelArgs {
    /// Measured round trips per variant (1 to 1000000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20_000,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_ROUNDS)
    )]
    pub rounds: usize,
    /// Bytes moved per throughput measurement block (1 MiB to 64 GiB).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 1 << 30,
        value_parser = RangedU64ValueParser::<u64>::new().range((1 << 20)..=(64 << 30))
    )]
    pub bytes: u64,
    /// Where the two threads of every variant run: `split` (two CPUs, default: busy-polling
    /// needs a CPU per side), `same` (one CPU: busy-poll round trips are skipped, they would
    /// measure the scheduler's time slice), `free`.
    #[arg(long, value_enum, default_value_t = Placement::Split)]
    pub placement: Placement,
    /// Seconds the idle receiver is watched (0.01 to 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = idle_seconds)]
    pub idle_seconds: f64,
}

/// Parses `--idle-seconds`: a finite number of seconds from 0.01 to 3600.
fn idle_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds from 0.01 to 3600"
        )),
    }
}

/// Round trips per timed sample (the clock costs ~20 ns, as much as a tenth of a round trip).
const BATCH: usize = 50;
/// Alternating blocks per pair of variants.
const BLOCKS: usize = 10;
const LONG: Option<Duration> = Some(Duration::from_secs(30));

/// One comparison: the channel and its reference.
#[derive(Debug, Clone)]
pub struct Pair {
    /// What is measured.
    pub what: String,
    /// The channel's figure.
    pub channel: Summary,
    /// The reference's figure.
    pub reference: Summary,
    /// How the reference is named.
    pub reference_name: String,
}

/// A throughput comparison.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Message size.
    pub size: usize,
    /// Channel, bytes per second (median of blocks).
    pub channel: f64,
    /// memcpy, bytes per second (median of blocks).
    pub memcpy: f64,
}

/// Result of `bench channel`.
#[derive(Debug)]
pub struct ChannelReport {
    /// Round-trip comparisons.
    pub round_trips: Vec<Pair>,
    /// Why busy-poll round trips were skipped, if they were.
    pub skipped: Option<String>,
    /// Throughput comparisons.
    pub throughput: Vec<Throughput>,
    /// CPU time of the idle receiver and the wall time it was watched.
    pub idle: (Duration, Duration),
    /// CPUs of the two threads.
    pub pinned: Option<(usize, usize)>,
    /// Round trips per variant.
    pub rounds: usize,
}

fn gbps(bytes_per_s: f64) -> String {
    format!("{:.2} GB/s", bytes_per_s / 1e9)
}

impl ChannelReport {
    /// The printed report.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "channel bench: {} round trips per variant (samples of {BATCH}), alternating blocks; {}",
            self.rounds,
            match self.pinned {
                Some((a, b)) => format!("threads on CPUs {a} and {b}"),
                None => "threads not pinned".into(),
            }
        )];
        for p in &self.round_trips {
            out.push(format!(
                "{}: channel median {} p99 {} | {} median {} p99 {} | ratio {} (p99 {})",
                p.what,
                micros(p.channel.median),
                micros(p.channel.p99),
                p.reference_name,
                micros(p.reference.median),
                micros(p.reference.p99),
                ratio(p.channel.median, p.reference.median),
                ratio(p.channel.p99, p.reference.p99),
            ));
        }
        if let Some(why) = &self.skipped {
            out.push(format!("busy-poll round trips skipped: {why}"));
        }
        for t in &self.throughput {
            out.push(format!(
                "throughput {} KiB messages: channel {} | single-thread memcpy {} | ratio {:.2}x",
                t.size >> 10,
                gbps(t.channel),
                gbps(t.memcpy),
                t.channel / t.memcpy
            ));
        }
        out.push(format!(
            "idle receiver (default spin budget, then blocked in recv): {} of CPU in {:.2} s",
            micros(self.idle.0),
            self.idle.1.as_secs_f64()
        ));
        out
    }
}

/// A 64-byte aligned buffer of `len` bytes inside a vector.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Aligned {
        let storage = vec![fill; len + 64];
        let start = storage.as_ptr().align_offset(64);
        Aligned {
            storage,
            start,
            len,
        }
    }
    fn get(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Both ends of channel `name` over one bus (peers 0 and 1).
fn channel_pair(bus: &LocalBus, name: &str, spin: Spin) -> anyhow::Result<(Channel, Channel)> {
    let fmt = FormatOptions {
        channels: 8,
        ring_size_max: 4 << 20,
    };
    let a = Region::open_or_format(bus.map()?, Arc::new(bus.doorbell(0)?), fmt)?;
    let b = Region::open(bus.map()?, Arc::new(bus.doorbell(1)?))?;
    let opts = ChannelOptions {
        spin,
        ..ChannelOptions::default()
    };
    Ok((a.channel(name, opts)?, b.channel(name, opts)?))
}

/// Runs `rounds` round trips: `pong` in a thread on `cpus.1`, `ping` here (pinned to `cpus.0`
/// for the duration), timing batches of [`BATCH`]; pushes per-round-trip samples.
fn round_trips<P, Q>(
    cpus: Option<(usize, usize)>,
    rounds: usize,
    samples: &mut Vec<Duration>,
    mut ping: P,
    mut pong: Q,
) -> anyhow::Result<()>
where
    P: FnMut() -> anyhow::Result<()>,
    Q: FnMut() -> anyhow::Result<()> + Send,
{
    let batches = rounds.div_ceil(BATCH);
    let total = batches * BATCH;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let t = s.spawn(move || -> anyhow::Result<()> {
            if let Some((_, cpu)) = cpus {
                pin_to(cpu);
            }
            for _ in 0..total {
                pong()?;
            }
            Ok(())
        });
        if let Some((cpu, _)) = cpus {
            pin_to(cpu);
        }
        for _ in 0..batches {
            let t = Instant::now();
            for _ in 0..BATCH {
                ping()?;
            }
            samples.push(t.elapsed() / BATCH as u32);
        }
        t.join()
            .map_err(|_| anyhow::anyhow!("ponging thread panicked"))??;
        Ok(())
    })
}

/// The flag ping-pong: the pinger writes an odd value, the ponger answers with the next even.
#[repr(align(128))]
struct Line(AtomicU64);

fn spin_until(line: &Line, value: u64) {
    while line.0.load(Ordering::Acquire) != value {
        std::hint::spin_loop();
    }
}

/// Compares `channel` round trips (both ends with `spin`) with `reference` in alternating
/// blocks; `reference` is given the number of rounds and the sample vector.
fn compare<R>(
    a: &ChannelArgs,
    cpus: Option<(usize, usize)>,
    spin: Spin,
    mut reference: R,
) -> anyhow::Result<(Summary, Summary)>
where
    R: FnMut(usize, &mut Vec<Duration>) -> anyhow::Result<()>,
{
    let bus = LocalBus::new(64 << 20, 2, 1)?;
    let (mut x, mut y) = channel_pair(&bus, "bench-rtt", spin)?;
    let msg = [0x5au8; 64];
    // No timeout, as the raw eventfd ping-pong has none: a timed wait costs one poll(2) more.
    let wait = None;
    let (mut chan, mut refs) = (Vec::new(), Vec::new());
    let per_block = a.rounds.div_ceil(BLOCKS).max(BATCH);
    // Warm-up of both, unmeasured.
    let mut scratch = Vec::new();
    for block in 0..=BLOCKS {
        let (c, r) = if block == 0 {
            (&mut scratch, None)
        } else {
            (&mut chan, Some(&mut refs))
        };
        {
            let (x, y) = (&mut x, &mut y);
            let mut buf_x = [0u8; 64];
            let mut buf_y = [0u8; 64];
            round_trips(
                cpus,
                per_block,
                c,
                || {
                    x.send(&msg, wait)?;
                    x.receiver().recv_into(&mut buf_x, wait)?;
                    Ok(())
                },
                || {
                    y.receiver().recv_into(&mut buf_y, wait)?;
                    y.send(&buf_y, wait)?;
                    Ok(())
                },
            )?;
        }
        match r {
            Some(r) => reference(per_block, r)?,
            None => reference(per_block, &mut Vec::new())?,
        }
    }
    Ok((summarize(&mut chan), summarize(&mut refs)))
}

fn cache_line_floor(
    cpus: Option<(usize, usize)>,
    rounds: usize,
    samples: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    let line = Line(AtomicU64::new(0));
    let (mut i, mut j) = (0u64, 0u64);
    round_trips(
        cpus,
        rounds,
        samples,
        || {
            i += 2;
            line.0.store(i - 1, Ordering::Release);
            spin_until(&line, i);
            Ok(())
        },
        || {
            j += 2;
            spin_until(&line, j - 1);
            line.0.store(j, Ordering::Release);
            Ok(())
        },
    )
}

fn eventfd_floor(
    cpus: Option<(usize, usize)>,
    rounds: usize,
    samples: &mut Vec<Duration>,
    fds: &(OwnedFd, OwnedFd),
) -> anyhow::Result<()> {
    let (to_pong, to_ping) = fds;
    round_trips(
        cpus,
        rounds,
        samples,
        || {
            write_eventfd(to_pong)?;
            read_eventfd(to_ping)
        },
        || {
            read_eventfd(to_pong)?;
            write_eventfd(to_ping)
        },
    )
}

/// Channel throughput with `size`-byte messages over `bytes` bytes, in bytes per second.
fn channel_throughput(
    cpus: Option<(usize, usize)>,
    x: &mut Channel,
    y: &mut Channel,
    size: usize,
    bytes: u64,
) -> anyhow::Result<f64> {
    let n = (bytes / size as u64).max(1);
    let src = Aligned::new(size, 0xa5);
    let mut dst = Aligned::new(size, 0);
    let barrier = Barrier::new(2);
    let elapsed = std::thread::scope(|s| -> anyhow::Result<Duration> {
        let receiver = s.spawn(|| -> anyhow::Result<()> {
            if let Some((_, cpu)) = cpus {
                pin_to(cpu);
            }
            barrier.wait();
            for _ in 0..n {
                y.receiver().recv_into(dst.get_mut(), LONG)?;
            }
            Ok(())
        });
        if let Some((cpu, _)) = cpus {
            pin_to(cpu);
        }
        barrier.wait();
        let t = Instant::now();
        for _ in 0..n {
            x.send(src.get(), LONG)?;
        }
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiving thread panicked"))??;
        Ok(t.elapsed())
    })?;
    if dst.get()[size - 1] != 0xa5 {
        bail!("the receiver did not get the bytes sent");
    }
    Ok((n * size as u64) as f64 / elapsed.as_secs_f64())
}

/// Single-thread memcpy between two 64-byte aligned buffers, in bytes per second.
fn memcpy_throughput(cpu: Option<usize>, size: usize, bytes: u64) -> f64 {
    if let Some(cpu) = cpu {
        pin_to(cpu);
    }
    let n = (bytes / size as u64).max(1);
    let src = Aligned::new(size, 0xa5);
    let mut dst = Aligned::new(size, 0);
    let t = Instant::now();
    for _ in 0..n {
        dst.get_mut()
            .copy_from_slice(std::hint::black_box(src.get()));
        std::hint::black_box(dst.get_mut());
    }
    (n * size as u64) as f64 / t.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Runs `bench channel`.
pub fn channel(a: &ChannelArgs) -> anyhow::Result<ChannelReport> {
    let cpus = placement_cpus(a.placement);
    if cpus.is_none() && a.placement == Placement::Split {
        bail!("--placement split needs two CPUs; this process may use only one");
    }
    let original = rustix::thread::sched_getaffinity(None).ok();
    let mut round_trips = Vec::new();
    let mut skipped = None;
    if matches!(cpus, Some((p, q)) if p == q) {
        skipped = Some("both threads share one CPU (--placement same)".into());
    } else {
        let (c, r) = compare(a, cpus, Spin::Forever, |n, s| cache_line_floor(cpus, n, s))
            .context("busy-poll round trips")?;
        round_trips.push(Pair {
            what: "64 B round trip, busy-poll".into(),
            channel: c,
            reference: r,
            reference_name: "flag on a shared cache line".into(),
        });
    }
    let fds = (
        eventfd(0, EventfdFlags::CLOEXEC)?,
        eventfd(0, EventfdFlags::CLOEXEC)?,
    );
    let (c, r) = compare(a, cpus, Spin::Never, |n, s| eventfd_floor(cpus, n, s, &fds))
        .context("blocking round trips")?;
    round_trips.push(Pair {
        what: "64 B round trip, blocking (spin 0)".into(),
        channel: c,
        reference: r,
        reference_name: "raw eventfd ping-pong".into(),
    });

    // Throughput: the default spin budget on two CPUs; on one CPU, block at once.
    let spin = if skipped.is_some() {
        Spin::Never
    } else {
        Spin::default()
    };
    let bus = LocalBus::new(64 << 20, 2, 1)?;
    let (mut x, mut y) = channel_pair(&bus, "bench-throughput", spin)?;
    let mut throughput = Vec::new();
    for size in [64usize << 10, 1 << 20] {
        let (mut ch, mut mc) = (Vec::new(), Vec::new());
        // A warm-up block, then alternating blocks.
        channel_throughput(cpus, &mut x, &mut y, size, a.bytes / 8)?;
        for _ in 0..5 {
            ch.push(channel_throughput(cpus, &mut x, &mut y, size, a.bytes)?);
            mc.push(memcpy_throughput(cpus.map(|c| c.0), size, a.bytes));
        }
        throughput.push(Throughput {
            size,
            channel: median(&mut ch),
            memcpy: median(&mut mc),
        });
    }
    drop((x, y));

    // The idle receiver.
    let (x, mut y) = channel_pair(&bus, "bench-idle", Spin::default())?;
    // In range when parsed from the command line; anything else (NaN included) is 1 s.
    let watch = Duration::try_from_secs_f64(a.idle_seconds)
        .ok()
        .filter(|w| *w <= Duration::from_secs(3600))
        .unwrap_or(Duration::from_secs(1));
    let idle = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<(Duration, Duration)> {
            if let Some((_, cpu)) = cpus {
                pin_to(cpu);
            }
            let mut buf = Vec::new();
            let (cpu0, t) = (thread_cpu(), Instant::now());
            match y.recv(&mut buf, Some(watch)) {
                Err(ChannelError::Timeout) => {}
                other => bail!("the idle receiver got {other:?}"),
            }
            Ok((thread_cpu().saturating_sub(cpu0), t.elapsed()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("idle receiver panicked"))?
    })?;
    drop(x);
    if let Some(set) = original {
        // Undo this thread's pinning; failing that only affects later figures.
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }
    Ok(ChannelReport {
        round_trips,
        skipped,
        throughput,
        idle,
        pinned: cpus,
        rounds: a.rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_idle_seconds_are_refused() {
        for bad in ["nan", "inf", "-1", "0", "1e9", "x"] {
            assert!(idle_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(idle_seconds("0.5"), Ok(0.5));
    }

    #[test]
    fn channel_bench_runs_every_variant() {
        let r = channel(&ChannelArgs {
            rounds: 200,
            bytes: 4 << 20,
            placement: Placement::Same,
            idle_seconds: 0.05,
        })
        .unwrap();
        assert!(r.skipped.is_some(), "busy-poll is skipped on one CPU");
        assert_eq!(r.round_trips.len(), 1);
        assert_eq!(r.throughput.len(), 2);
        assert!(r.idle.1 >= Duration::from_millis(50));
        let lines = r.lines();
        assert!(lines.iter().any(|l| l.contains("raw eventfd ping-pong")));
        assert!(lines.iter().any(|l| l.starts_with("idle receiver")));
    }
}
