//! `ivshm bench channel`: `ivshm-channel` next to the hardware's and the kernel's floors, each
//! comparison measured in alternating blocks of one run on the same CPUs (ratios, not absolute
//! figures, are what to read):
//!
//! - 64-byte round trips, busy-poll (`Spin::Forever`) vs two threads ping-ponging a flag on one
//!   shared cache line (the floor for polling, issue 8's reference), and vs the same with one
//!   flag line per direction (the floor of any channel with a ring per direction: each message
//!   moves a line the other side read last, so the writer must first take it back);
//! - 64-byte round trips, blocking at once (`Spin::Never`) vs a raw eventfd ping-pong
//!   (blocking `read(2)`/`write(2)`); neither side has a timeout (with one, the channel's wait
//!   is a `poll(2)` and a `read(2)`);
//! - throughput with 64 KiB and 1 MiB messages (sender and receiver copy from and into
//!   64-byte aligned private buffers), with the default spin budget and busy-polling, vs a
//!   single-thread `memcpy` of the same size (issue 8's reference) and vs two threads handing
//!   chunks of that size over through shared memory (busy-polling a flag per chunk, as many
//!   chunks in flight as the channel's ring holds): the hardware's limit for moving bytes from
//!   one CPU to another, which a channel cannot beat;
//! - the CPU time of a receiver blocked for 1 s on an empty channel (default spin budget).
//!
//! The channel runs over a memfd region with eventfd doorbells (`LocalBus`) or, with
//! `--doorbell peer`, over an in-process ivshm server's region with `ivshm-client`'s
//! `PeerDoorbell` on both sides.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::builder::RangedU64ValueParser;
use clap::Args;
use ivshm_channel::local::LocalBus;
use ivshm_channel::{
    Channel, ChannelError, ChannelOptions, Doorbell, FormatOptions, Geometry, Region, Spin,
};
use ivshm_client::{ConnectOptions, Peer, PeerDoorbell};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use rustix::event::{eventfd, EventfdFlags};

use crate::args;

use super::bench::{
    micros, pin_to, placement_cpus, ratio, read_eventfd, summarize, write_eventfd, Placement,
    Summary, TempSocket, MAX_ROUNDS,
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
    /// Bytes moved per throughput measurement block (a size: 1M to 64G).
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = args::size_between(1 << 20, 64 << 30))]
    pub bytes: u64,
    /// Where the two threads of every variant run: `split` (two CPUs, default: busy-polling
    /// needs a CPU per side), `same` (one CPU: busy-poll variants are skipped, they would
    /// measure the scheduler's time slice), `free`.
    #[arg(long, value_enum, default_value_t = Placement::Split)]
    pub placement: Placement,
    /// Seconds the idle receiver is watched (0.01 to 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = idle_seconds)]
    pub idle_seconds: f64,
    /// Ring size of the round-trip channels (a size, a power of two from 4K to 64M).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = ring_size)]
    pub ring_size: u32,
    /// Smallest ring of the throughput channels (a size, a power of two from 4K to 64M): a
    /// ring is this size or four messages (three in flight), whichever is larger: 1 MiB for 64
    /// KiB messages and 4 MiB for 1 MiB messages by default. The hand-over reference gets as
    /// many chunks in flight.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = ring_size)]
    pub throughput_ring: u32,
    /// Run the two measuring threads under `SCHED_FIFO` (root or `CAP_SYS_NICE`): other
    /// programs on the machine cannot preempt them, so the figures show the hardware rather
    /// than the scheduler. They hold their CPUs while they spin (the kernel keeps 5% of each
    /// CPU for everything else).
    #[arg(long)]
    pub realtime: bool,
    /// The doorbell under the channel: `local` (eventfds of a `LocalBus`) or `peer` (two host
    /// peers of an in-process ivshm server, `ivshm_client::PeerDoorbell`).
    #[arg(long, value_enum, default_value_t = DoorbellKind::Local)]
    pub doorbell: DoorbellKind,
}

/// The doorbell of `bench channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DoorbellKind {
    /// memfd + eventfds (`ivshm_channel::local`).
    Local,
    /// Host peers of an in-process server (`ivshm_client::PeerDoorbell`).
    Peer,
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

/// Parses `--ring-size`: a size, a power of two from 4 KiB to 64 MiB.
fn ring_size(s: &str) -> Result<u32, String> {
    let v = args::size_between(4 << 10, 64 << 20)(s)?;
    match u32::try_from(v) {
        Ok(v) if v.is_power_of_two() => Ok(v),
        _ => Err(format!("{s} is not a power of two")),
    }
}

/// Where the two threads of every variant run, and at which priority.
#[derive(Debug, Clone, Copy)]
struct Threads {
    cpus: Option<(usize, usize)>,
    realtime: bool,
}

impl Threads {
    /// Moves the calling thread to the first (`0`) or the second (`1`) thread's CPU and, with
    /// `--realtime`, under `SCHED_FIFO`. Best effort, as `pin_to` (`channel` checked once that
    /// the priority can be had).
    fn enter(&self, which: usize) {
        if let Some((a, b)) = self.cpus {
            pin_to(if which == 0 { a } else { b });
        }
        if self.realtime {
            if let Err(e) = set_realtime(true) {
                tracing::warn!("could not run a benchmark thread under SCHED_FIFO: {e}");
            }
        }
    }
}

/// Puts the calling thread under `SCHED_FIFO` at the lowest real-time priority (`true`), or
/// back under `SCHED_OTHER`. Through `libc`: rustix has no `sched_setscheduler`.
fn set_realtime(on: bool) -> std::io::Result<()> {
    let (policy, priority) = if on {
        (libc::SCHED_FIFO, 1)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid `sched_param` that outlives the call; pid 0 is the calling
    // thread; the call reads nothing else of ours.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Round trips per timed sample (the clock costs ~20 ns, as much as a tenth of a round trip).
const BATCH: usize = 50;
/// Alternating blocks per comparison.
const BLOCKS: usize = 10;
/// Alternating blocks per throughput comparison.
const THROUGHPUT_BLOCKS: usize = 5;
const LONG: Option<Duration> = Some(Duration::from_secs(30));
/// Message sizes of the throughput rows.
const THROUGHPUT_SIZES: [usize; 2] = [64 << 10, 1 << 20];

/// One round-trip comparison: the channel and its references.
#[derive(Debug, Clone)]
pub struct RoundTrips {
    /// What is measured.
    pub what: String,
    /// The channel's figure.
    pub channel: Summary,
    /// The references: name and figure.
    pub references: Vec<(String, Summary)>,
}

/// A throughput comparison: every variant with its figures (medians over blocks).
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Message size.
    pub size: usize,
    /// Ring size of the channels.
    pub ring: u32,
    /// Messages of this size the ring holds at once (also the hand-over's chunks in flight).
    pub in_flight: usize,
    /// Single-thread memcpy, bytes per second (issue 8's reference).
    pub memcpy: f64,
    /// The other variants, references first, then the channel's.
    pub variants: Vec<Variant>,
}

/// One variant of a throughput comparison.
#[derive(Debug, Clone)]
pub struct Variant {
    /// What is measured.
    pub what: String,
    /// Bytes per second.
    pub rate: f64,
    /// The median over blocks of its rate over memcpy's in the same block (measured back to
    /// back, so that a burst of load on the machine weighs on both).
    pub vs_memcpy: Option<f64>,
    /// For the channel: the same against the best a copying channel can do here (two copies
    /// on one CPU with `--placement same`, the hand-over between two CPUs otherwise).
    pub vs_ceiling: Option<(&'static str, f64)>,
}

/// Result of `bench channel`.
#[derive(Debug)]
pub struct ChannelReport {
    /// Round-trip comparisons.
    pub round_trips: Vec<RoundTrips>,
    /// Why busy-poll variants were skipped, if they were.
    pub skipped: Option<String>,
    /// Throughput comparisons.
    pub throughput: Vec<Throughput>,
    /// CPU time of the idle receiver and the wall time it was watched.
    pub idle: (Duration, Duration),
    /// CPUs of the two threads.
    pub pinned: Option<(usize, usize)>,
    /// Round trips per variant.
    pub rounds: usize,
    /// Ring size of the round-trip channels.
    pub ring: u32,
    /// The doorbell used.
    pub doorbell: DoorbellKind,
    /// The measuring threads ran under `SCHED_FIFO`.
    pub realtime: bool,
}

fn gbps(bytes_per_s: f64) -> String {
    format!("{:.2} GB/s", bytes_per_s / 1e9)
}

impl ChannelReport {
    /// The printed report.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "channel bench: {} round trips per variant (samples of {BATCH}), alternating blocks; {}{}; \
             {} doorbell; round-trip rings of {} KiB",
            self.rounds,
            match self.pinned {
                Some((a, b)) => format!("threads on CPUs {a} and {b}"),
                None => "threads not pinned".into(),
            },
            if self.realtime { " under SCHED_FIFO" } else { "" },
            match self.doorbell {
                DoorbellKind::Local => "LocalDoorbell (eventfd)",
                DoorbellKind::Peer => "PeerDoorbell (ivshm-server host peers)",
            },
            self.ring >> 10,
        )];
        for p in &self.round_trips {
            let mut line = format!(
                "{}: channel median {} p99 {}",
                p.what,
                micros(p.channel.median),
                micros(p.channel.p99),
            );
            for (name, r) in &p.references {
                line += &format!(
                    " | {name} median {} p99 {}: ratio {} (p99 {})",
                    micros(r.median),
                    micros(r.p99),
                    ratio(p.channel.median, r.median),
                    ratio(p.channel.p99, r.p99),
                );
            }
            out.push(line);
        }
        if let Some(why) = &self.skipped {
            out.push(format!("busy-poll variants skipped: {why}"));
        }
        for t in &self.throughput {
            out.push(format!(
                "throughput {} KiB messages (ring {} KiB, {} messages in flight): single-thread \
                 memcpy {}",
                t.size >> 10,
                t.ring >> 10,
                t.in_flight,
                gbps(t.memcpy)
            ));
            for v in &t.variants {
                let mut line = format!("  {}: {}", v.what, gbps(v.rate));
                if let Some(r) = v.vs_memcpy {
                    line += &format!(", {r:.2}x memcpy");
                }
                if let Some((name, r)) = v.vs_ceiling {
                    line += &format!(", {r:.2}x {name}");
                }
                out.push(line);
            }
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

/// What keeps a channel pair's server alive (`LocalBus` channels need nothing: their regions
/// hold the mapping and the eventfds).
type Backing = Option<(TempSocket, ServerHandle)>;

/// Both ends of one channel with rings of `ring` bytes (peers 0 and 1 of a `LocalBus`, or two
/// host peers of an in-process server), and what keeps them alive.
fn channel_pair(
    kind: DoorbellKind,
    ring: u32,
    spin: Spin,
) -> anyhow::Result<(Channel, Channel, Backing)> {
    let fmt = FormatOptions {
        channels: 1,
        ring_size_max: ring,
    };
    let size = Geometry {
        channels: 1,
        ring_size: ring,
    }
    .layout_size()
    .max(1 << 20)
    .next_power_of_two();
    let opts = ChannelOptions {
        spin,
        ..ChannelOptions::default()
    };
    let (a, b, backing) = match kind {
        DoorbellKind::Local => {
            let bus = LocalBus::new(size, 2, 1)?;
            let a = Region::open_or_format(bus.map()?, Arc::new(bus.doorbell(0)?), fmt)?;
            let b = Region::open(bus.map()?, Arc::new(bus.doorbell(1)?))?;
            (a, b, None)
        }
        DoorbellKind::Peer => {
            let sock = TempSocket::new("channel")?;
            let mut region = RegionConfig::new(sock.path());
            region.vectors = 1;
            region.memory.size = size;
            let server = ServerHandle::spawn(ServerConfig::single(region))
                .context("starting the in-process server")?;
            let peer = |path: &std::path::Path| -> anyhow::Result<Arc<PeerDoorbell>> {
                Ok(Arc::new(PeerDoorbell::new(Peer::connect(
                    path,
                    ConnectOptions::default(),
                )?)?))
            };
            let (pa, pb) = (peer(&sock.path())?, peer(&sock.path())?);
            let (ma, mb) = (pa.peer().map()?, pb.peer().map()?);
            let a = Region::open_or_format(ma, pa as Arc<dyn Doorbell>, fmt)?;
            let b = Region::open(mb, pb as Arc<dyn Doorbell>)?;
            (a, b, Some((sock, server)))
        }
    };
    if a.geometry().ring_size != ring {
        bail!("the region got rings of {} bytes", a.geometry().ring_size);
    }
    let x = a.channel("bench", opts)?;
    let y = b.channel("bench", opts)?;
    Ok((x, y, backing))
}

/// Runs `rounds` round trips: `pong` in a thread on the second CPU, `ping` here (on the first
/// for the duration), timing batches of [`BATCH`]; pushes per-round-trip samples.
fn round_trips<P, Q>(
    th: Threads,
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
    // The other thread starts where this one runs: under `--realtime` it must have moved to
    // its CPU before this one spins (a real-time thread is never preempted by its equal).
    let started = Barrier::new(2);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let t = s.spawn(|| -> anyhow::Result<()> {
            th.enter(1);
            started.wait();
            for _ in 0..total {
                pong()?;
            }
            Ok(())
        });
        started.wait();
        th.enter(0);
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

/// A cache line of its own.
#[repr(align(128))]
struct Line(AtomicU64);

fn spin_until(line: &Line, value: u64) {
    while line.0.load(Ordering::Acquire) != value {
        std::hint::spin_loop();
    }
}

/// A reference measurement: given the number of rounds, pushes its samples.
type Reference<'a> = Box<dyn FnMut(usize, &mut Vec<Duration>) -> anyhow::Result<()> + 'a>;

/// Compares channel round trips (both ends with `spin`) with `references` in alternating
/// blocks.
fn compare(
    a: &ChannelArgs,
    th: Threads,
    spin: Spin,
    mut references: Vec<Reference<'_>>,
) -> anyhow::Result<(Summary, Vec<Summary>)> {
    let (mut x, mut y, _backing) = channel_pair(a.doorbell, a.ring_size, spin)?;
    let msg = [0x5au8; 64];
    // No timeout, as the raw eventfd ping-pong has none: a timed wait costs one poll(2) more.
    let wait = None;
    let mut chan = Vec::new();
    let mut refs = vec![Vec::new(); references.len()];
    let per_block = a.rounds.div_ceil(BLOCKS).max(BATCH);
    let mut scratch = Vec::new();
    // Block 0 is a warm-up of every variant, unmeasured.
    for block in 0..=BLOCKS {
        let (x, y) = (&mut x, &mut y);
        let mut buf_x = [0u8; 64];
        let mut buf_y = [0u8; 64];
        round_trips(
            th,
            per_block,
            if block == 0 { &mut scratch } else { &mut chan },
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
        for (r, samples) in references.iter_mut().zip(refs.iter_mut()) {
            scratch.clear();
            r(per_block, if block == 0 { &mut scratch } else { samples })?;
        }
    }
    Ok((
        summarize(&mut chan),
        refs.iter_mut().map(|s| summarize(s)).collect(),
    ))
}

/// Two threads ping-pong one flag on one cache line.
fn cache_line_floor(th: Threads, rounds: usize, samples: &mut Vec<Duration>) -> anyhow::Result<()> {
    let line = Line(AtomicU64::new(0));
    let (mut i, mut j) = (0u64, 0u64);
    round_trips(
        th,
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

/// Two threads ping-pong with one flag line per direction (each writes its own, reads the
/// other's).
fn line_per_direction_floor(
    th: Threads,
    rounds: usize,
    samples: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    let (ping_line, pong_line) = (Line(AtomicU64::new(0)), Line(AtomicU64::new(0)));
    let (mut i, mut j) = (0u64, 0u64);
    round_trips(
        th,
        rounds,
        samples,
        || {
            i += 1;
            ping_line.0.store(i, Ordering::Release);
            spin_until(&pong_line, i);
            Ok(())
        },
        || {
            j += 1;
            spin_until(&ping_line, j);
            pong_line.0.store(j, Ordering::Release);
            Ok(())
        },
    )
}

fn eventfd_floor(
    th: Threads,
    rounds: usize,
    samples: &mut Vec<Duration>,
    fds: &(OwnedFd, OwnedFd),
) -> anyhow::Result<()> {
    let (to_pong, to_ping) = fds;
    round_trips(
        th,
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

/// Runs `send` for `n` messages here (on the first CPU) and `recv` for as many in a thread (on
/// the second), started together; returns the bytes per second for `n * size` bytes.
fn two_threads<S, R>(
    th: Threads,
    n: u64,
    size: usize,
    mut send: S,
    mut recv: R,
) -> anyhow::Result<f64>
where
    S: FnMut() -> anyhow::Result<()>,
    R: FnMut() -> anyhow::Result<()> + Send,
{
    let barrier = Barrier::new(2);
    let elapsed = std::thread::scope(|s| -> anyhow::Result<Duration> {
        let receiver = s.spawn(|| -> anyhow::Result<()> {
            th.enter(1);
            barrier.wait();
            for _ in 0..n {
                recv()?;
            }
            Ok(())
        });
        barrier.wait();
        th.enter(0);
        let t = Instant::now();
        for _ in 0..n {
            send()?;
        }
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiving thread panicked"))??;
        Ok(t.elapsed())
    })?;
    Ok((n * size as u64) as f64 / elapsed.as_secs_f64())
}

/// How the throughput sender hands a message to the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendPath {
    /// `Sender::send` from a buffer of the message's size: copied into the ring.
    Copy,
    /// `Sender::reserve`, then the message written in place in [`PIECE`]-byte pieces from one
    /// small buffer (a producer that builds its message in the ring: a serializer, a reader of
    /// a file or a device), then `commit`: the message's bytes are stored into the ring once and
    /// never copied from a buffer of their size.
    InPlace,
}

/// Piece size of [`SendPath::InPlace`].
const PIECE: usize = 4096;

/// Channel throughput with `size`-byte messages over `bytes` bytes, in bytes per second; the
/// receiver copies each message out with `recv_into`.
fn channel_throughput(
    th: Threads,
    x: &mut Channel,
    y: &mut Channel,
    size: usize,
    bytes: u64,
    path: SendPath,
) -> anyhow::Result<f64> {
    let n = (bytes / size as u64).max(1);
    let src = Aligned::new(size, 0xa5);
    let piece = Aligned::new(PIECE, 0xa5);
    let mut dst = Aligned::new(size, 0);
    let rate = two_threads(
        th,
        n,
        size,
        || match path {
            SendPath::Copy => Ok(x.send(src.get(), LONG)?),
            SendPath::InPlace => {
                let mut r = x.sender().reserve(size, LONG)?;
                let mut at = 0;
                while at < size {
                    let len = PIECE.min(size - at);
                    if !r.write_at(at, &piece.get()[..len])? {
                        bail!("a piece did not fit in its reservation");
                    }
                    at += len;
                }
                Ok(r.commit()?)
            }
        },
        || {
            y.receiver().recv_into(dst.get_mut(), LONG)?;
            Ok(())
        },
    )?;
    if dst.get()[size - 1] != 0xa5 {
        bail!("the receiver did not get the bytes sent");
    }
    Ok(rate)
}

/// Shared memory for the hand-over reference: `slots` chunks of `size` bytes and a flag each.
struct Handoff {
    chunks: Aligned,
    /// Per slot: the number of the last chunk written into it (1-based), then read from it.
    written: Vec<Line>,
    read: Vec<Line>,
    size: usize,
}

/// Two threads hand `size`-byte chunks over through `slots` chunks of shared memory: the
/// sender copies its buffer into a free slot and sets its flag, the receiver waits for the
/// flag (busy-polling), copies the chunk out and frees the slot. What any channel does at
/// least, without a protocol: the cost of moving the bytes from one CPU's cache to the other's.
fn handoff_throughput(th: Threads, h: &mut Handoff, bytes: u64) -> anyhow::Result<f64> {
    let size = h.size;
    let slots = h.written.len() as u64;
    let n = (bytes / size as u64).max(1);
    for l in h.written.iter().chain(&h.read) {
        l.0.store(0, Ordering::Relaxed);
    }
    let base = h.chunks.get_mut().as_mut_ptr() as usize;
    let (written, read) = (&h.written, &h.read);
    let src = Aligned::new(size, 0xa5);
    let mut dst = Aligned::new(size, 0);
    let (mut i, mut j) = (0u64, 0u64);
    let rate = two_threads(
        th,
        n,
        size,
        || {
            let k = (i % slots) as usize;
            if i >= slots {
                spin_until(&read[k], i + 1 - slots);
            }
            // SAFETY: slot k lies inside `chunks` (k < slots, slots * size bytes), which lives
            // until both threads are joined; the receiver does not touch slot k until the flag
            // below says so, nor we again until it frees it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.get().as_ptr(),
                    (base + k * size) as *mut u8,
                    size,
                );
            }
            i += 1;
            written[k].0.store(i, Ordering::Release);
            Ok(())
        },
        || {
            let k = (j % slots) as usize;
            spin_until(&written[k], j + 1);
            // SAFETY: as above; the sender does not touch slot k until it is freed below.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (base + k * size) as *const u8,
                    dst.get_mut().as_mut_ptr(),
                    size,
                );
            }
            j += 1;
            read[k].0.store(j, Ordering::Release);
            Ok(())
        },
    )?;
    if dst.get()[size - 1] != 0xa5 {
        bail!("the hand-over reference did not move the bytes");
    }
    Ok(rate)
}

/// Single-thread memcpy between two 64-byte aligned buffers, in bytes per second.
fn memcpy_throughput(th: Threads, size: usize, bytes: u64) -> f64 {
    th.enter(0);
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

/// One thread copies each chunk into the next slot of a buffer the size of the channel's ring,
/// then out of it into a second buffer: what a channel that copies in and out costs at least
/// when both ends share one CPU (in bytes per second).
fn two_copies_throughput(th: Threads, size: usize, ring: u32, bytes: u64) -> f64 {
    th.enter(0);
    let n = (bytes / size as u64).max(1);
    let slots = (ring as usize / size).max(1);
    let src = Aligned::new(size, 0xa5);
    let mut middle = Aligned::new(slots * size, 0);
    let mut dst = Aligned::new(size, 0);
    let t = Instant::now();
    for i in 0..n {
        let k = (i % slots as u64) as usize * size;
        let slot = &mut middle.get_mut()[k..k + size];
        slot.copy_from_slice(std::hint::black_box(src.get()));
        dst.get_mut()
            .copy_from_slice(std::hint::black_box(&middle.get()[k..k + size]));
        std::hint::black_box(dst.get_mut());
    }
    (n * size as u64) as f64 / t.elapsed().as_secs_f64()
}

/// The median over blocks of `a[i] / b[i]` (`None` if either was not measured).
fn block_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.is_empty() || a.len() != b.len() {
        return None;
    }
    let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    Some(median(&mut r))
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

/// The throughput rows of `size`-byte messages.
fn throughput(a: &ChannelArgs, th: Threads, busy: bool, size: usize) -> anyhow::Result<Throughput> {
    let ring = a.throughput_ring.max((4 * size as u32).next_power_of_two());
    // On one CPU, block at once (spinning only burns the other thread's time slice).
    let spin = if busy { Spin::default() } else { Spin::Never };
    let spin_name = if busy { "default spin" } else { "spin 0" };
    let (mut x, mut y, _backing) = channel_pair(a.doorbell, ring, spin)?;
    let (mut ix, mut iy, _in_place_backing) = channel_pair(a.doorbell, ring, spin)?;
    let mut busy_pair = if busy {
        Some(channel_pair(a.doorbell, ring, Spin::Forever)?)
    } else {
        None
    };
    // As many chunks in flight as the ring holds messages.
    let in_flight = ring as usize / (size + 64);
    let mut handoff = busy.then(|| Handoff {
        chunks: Aligned::new(in_flight.max(2) * size, 0),
        written: (0..in_flight.max(2))
            .map(|_| Line(AtomicU64::new(0)))
            .collect(),
        read: (0..in_flight.max(2))
            .map(|_| Line(AtomicU64::new(0)))
            .collect(),
        size,
    });
    // Per variant, its rate in every block; memcpy first.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 6];
    // A warm-up block of every variant, then alternating blocks.
    for block in 0..=THROUGHPUT_BLOCKS {
        let bytes = if block == 0 { a.bytes / 8 } else { a.bytes };
        let m = memcpy_throughput(th, size, bytes);
        let two = two_copies_throughput(th, size, ring, bytes);
        let h = match &mut handoff {
            Some(h) => Some(handoff_throughput(th, h, bytes)?),
            None => None,
        };
        let c = channel_throughput(th, &mut x, &mut y, size, bytes, SendPath::Copy)?;
        let b = match &mut busy_pair {
            Some((bx, by, _)) => Some(channel_throughput(th, bx, by, size, bytes, SendPath::Copy)?),
            None => None,
        };
        let i = channel_throughput(th, &mut ix, &mut iy, size, bytes, SendPath::InPlace)?;
        if block > 0 {
            for (v, r) in [Some(m), Some(two), h, Some(c), b, Some(i)]
                .into_iter()
                .enumerate()
            {
                rates[v].extend(r);
            }
        }
    }
    let (ceiling, ceiling_name) = if busy {
        (2, "hand-over")
    } else {
        (1, "two copies")
    };
    let names = [
        String::new(),
        "one thread copying in and out of a ring-sized buffer (two copies, one CPU)".to_string(),
        format!("two threads handing chunks over through shared memory (busy-poll, {in_flight} in flight)"),
        format!("channel, send + recv_into ({spin_name}; two copies)"),
        "channel, send + recv_into (busy-poll; two copies)".to_string(),
        format!(
            "channel, message built in place (reserve, write_at of {} KiB pieces from one \
             small buffer, commit) + recv_into ({spin_name}; one copy)",
            PIECE >> 10
        ),
    ];
    let memcpy = rates[0].clone();
    let mut variants = Vec::new();
    for (v, what) in names.into_iter().enumerate().skip(1) {
        if rates[v].is_empty() {
            continue;
        }
        variants.push(Variant {
            what,
            vs_memcpy: block_ratio(&rates[v], &memcpy),
            vs_ceiling: if v >= 3 {
                block_ratio(&rates[v], &rates[ceiling]).map(|r| (ceiling_name, r))
            } else {
                None
            },
            rate: median(&mut rates[v]),
        });
    }
    Ok(Throughput {
        size,
        ring,
        in_flight,
        memcpy: median(&mut rates[0]),
        variants,
    })
}

/// Runs `bench channel`.
pub fn channel(a: &ChannelArgs) -> anyhow::Result<ChannelReport> {
    let cpus = placement_cpus(a.placement);
    if cpus.is_none() && a.placement == Placement::Split {
        bail!("--placement split needs two CPUs; this process may use only one");
    }
    if a.realtime {
        set_realtime(true).context(
            "--realtime: could not run under SCHED_FIFO (it needs root or CAP_SYS_NICE)",
        )?;
    }
    let th = Threads {
        cpus,
        realtime: a.realtime,
    };
    let original = rustix::thread::sched_getaffinity(None).ok();
    let report = measure(a, th);
    if a.realtime {
        // Back to normal for whatever this thread does next; failing that changes no figure.
        let _ = set_realtime(false);
    }
    if let Some(set) = original {
        // Undo this thread's pinning; failing that only affects later figures.
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }
    report
}

/// The measurements of [`channel`], on the threads `th` says.
fn measure(a: &ChannelArgs, th: Threads) -> anyhow::Result<ChannelReport> {
    let cpus = th.cpus;
    let mut round_trips = Vec::new();
    let mut skipped = None;
    if matches!(cpus, Some((p, q)) if p == q) {
        skipped = Some("both threads share one CPU (--placement same)".into());
    } else {
        let (c, r) = compare(
            a,
            th,
            Spin::Forever,
            vec![
                Box::new(|n, s: &mut Vec<Duration>| cache_line_floor(th, n, s)),
                Box::new(|n, s: &mut Vec<Duration>| line_per_direction_floor(th, n, s)),
            ],
        )
        .context("busy-poll round trips")?;
        round_trips.push(RoundTrips {
            what: "64 B round trip, busy-poll".into(),
            channel: c,
            references: vec![
                ("flag on one shared cache line".into(), r[0]),
                ("one flag line per direction".into(), r[1]),
            ],
        });
    }
    let fds = (
        eventfd(0, EventfdFlags::CLOEXEC)?,
        eventfd(0, EventfdFlags::CLOEXEC)?,
    );
    let (c, r) = compare(
        a,
        th,
        Spin::Never,
        vec![Box::new(|n, s: &mut Vec<Duration>| {
            eventfd_floor(th, n, s, &fds)
        })],
    )
    .context("blocking round trips")?;
    round_trips.push(RoundTrips {
        what: "64 B round trip, blocking (spin 0)".into(),
        channel: c,
        references: vec![("raw eventfd ping-pong".into(), r[0])],
    });

    let busy = skipped.is_none();
    let throughput = THROUGHPUT_SIZES
        .iter()
        .map(|&size| throughput(a, th, busy, size))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("throughput")?;

    // The idle receiver.
    let (x, mut y, _backing) = channel_pair(a.doorbell, a.ring_size, Spin::default())?;
    // In range when parsed from the command line; anything else (NaN included) is 1 s.
    let watch = Duration::try_from_secs_f64(a.idle_seconds)
        .ok()
        .filter(|w| *w <= Duration::from_secs(3600))
        .unwrap_or(Duration::from_secs(1));
    let idle = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<(Duration, Duration)> {
            th.enter(1);
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
    Ok(ChannelReport {
        round_trips,
        skipped,
        throughput,
        idle,
        pinned: cpus,
        rounds: a.rounds,
        ring: a.ring_size,
        doorbell: a.doorbell,
        realtime: a.realtime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_refused() {
        for bad in ["nan", "inf", "-1", "0", "1e9", "x"] {
            assert!(idle_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(idle_seconds("0.5"), Ok(0.5));
        for bad in [
            "0",
            "4095",
            "5000",
            "134217728",
            "128M",
            "x",
            "-4096",
            "12K",
        ] {
            assert!(ring_size(bad).is_err(), "{bad}");
        }
        assert_eq!(ring_size("65536"), Ok(65536));
        assert_eq!(ring_size("64K"), Ok(65536));
    }

    fn quick(doorbell: DoorbellKind) -> ChannelReport {
        channel(&quick_args(doorbell)).unwrap()
    }

    fn quick_args(doorbell: DoorbellKind) -> ChannelArgs {
        ChannelArgs {
            rounds: 200,
            bytes: 4 << 20,
            placement: Placement::Same,
            idle_seconds: 0.05,
            ring_size: 64 << 10,
            throughput_ring: 64 << 10,
            doorbell,
            realtime: false,
        }
    }

    #[test]
    fn channel_bench_runs_every_variant() {
        let r = quick(DoorbellKind::Local);
        assert!(r.skipped.is_some(), "busy-poll is skipped on one CPU");
        assert_eq!(r.round_trips.len(), 1);
        assert_eq!(r.throughput.len(), 2);
        // Four messages' worth (above --throughput-ring), three in flight.
        assert_eq!(
            (r.throughput[0].ring, r.throughput[0].in_flight),
            (256 << 10, 3)
        );
        assert_eq!(r.throughput[1].ring, 4 << 20);
        // On one CPU: memcpy, two copies on one thread, the channel copying, built in place;
        // no busy-polling and no hand-over.
        for t in &r.throughput {
            let what: Vec<_> = t.variants.iter().map(|v| v.what.as_str()).collect();
            assert_eq!(what.len(), 3, "{what:?}");
            assert!(what[0].starts_with("one thread copying in and out"));
            assert!(what[1].contains("send + recv_into (spin 0; two copies)"));
            assert!(what[2].contains("built in place") && what[2].contains("one copy"));
            assert!(t
                .variants
                .iter()
                .all(|v| v.rate > 0.0 && v.vs_memcpy.is_some()));
            assert_eq!(t.variants[1].vs_ceiling.map(|c| c.0), Some("two copies"));
        }
        assert!(r.idle.1 >= Duration::from_millis(50));
        let lines = r.lines();
        assert!(lines.iter().any(|l| l.contains("raw eventfd ping-pong")));
        assert!(lines.iter().any(|l| l.starts_with("idle receiver")));
        assert!(lines.iter().any(|l| l.starts_with(
            "throughput 1024 KiB messages (ring 4096 KiB, 3 messages in flight): single-thread memcpy"
        )));
        assert!(lines.iter().any(|l| l
            .starts_with("  channel, send + recv_into (spin 0; two copies): ")
            && l.contains("x memcpy, ")
            && l.ends_with("x two copies")));
    }

    #[test]
    fn realtime_runs_every_variant_or_says_why_not() {
        let a = ChannelArgs {
            realtime: true,
            ..quick_args(DoorbellKind::Local)
        };
        match channel(&a) {
            Ok(r) => {
                assert!(r.lines()[0].contains("under SCHED_FIFO"));
                assert_eq!(r.throughput.len(), 2);
            }
            Err(e) => assert!(
                format!("{e:#}").contains("needs root or CAP_SYS_NICE"),
                "{e:#}"
            ),
        }
        // The calling thread is back under the normal policy.
        // SAFETY: a plain query of the calling thread's policy.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }

    #[test]
    fn channel_bench_runs_over_host_peers() {
        let r = quick(DoorbellKind::Peer);
        assert!(r.lines()[0].contains("PeerDoorbell"));
        assert_eq!(r.round_trips.len(), 1);
    }

    #[test]
    fn busy_variants_run_on_two_threads() {
        // Not pinned (one CPU may be all this test gets): the figures do not matter here.
        let a = ChannelArgs {
            rounds: 100,
            bytes: 1 << 20,
            placement: Placement::Free,
            idle_seconds: 0.01,
            ring_size: 64 << 10,
            throughput_ring: 64 << 10,
            doorbell: DoorbellKind::Local,
            realtime: false,
        };
        let th = Threads {
            cpus: None,
            realtime: false,
        };
        let (c, r) = compare(
            &a,
            th,
            Spin::Forever,
            vec![
                Box::new(|n, s: &mut Vec<Duration>| cache_line_floor(th, n, s)),
                Box::new(|n, s: &mut Vec<Duration>| line_per_direction_floor(th, n, s)),
            ],
        )
        .unwrap();
        assert!(!c.median.is_zero() && r.len() == 2);
        let t = throughput(&a, th, true, 64 << 10).unwrap();
        // Two CPUs: the hand-over and busy-polling too; the channel's ceiling is the hand-over.
        assert_eq!(t.variants.len(), 5);
        assert!(t.variants[1]
            .what
            .starts_with("two threads handing chunks over"));
        assert!(t.variants[3].what.contains("busy-poll; two copies"));
        assert_eq!(t.variants[2].vs_ceiling.map(|c| c.0), Some("hand-over"));
    }
}
