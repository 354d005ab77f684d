//! `ivshm bench`: benchmarks that compare variants in one run.
//!
//! - `doorbell`: two host peers (two threads) on an in-process `ivshm-server` ping-pong a
//!   doorbell through `ivshm-client` (`Peer::notify` + `Peer::wait`), next to a raw eventfd
//!   ping-pong between two threads (blocking reads), and to the same raw ping-pong waiting as
//!   the library does (each eventfd edge-triggered in an epoll set: the floor of a wait that
//!   can watch more than one fd), measured in alternating blocks of the same run.
//! - `channel`: `ivshm-channel` against its floors (see `bench_channel`).
//! - `join`: N peers (4 vectors each) join `ivshm serve` one after the other; reports the
//!   total, the time per join, how it grows with N and the server's memory per peer, next to
//!   a reference that makes the same sends with blocking calls (alternating joins).
//! - `soak`: everything at once against one server for a while, checking its fds, memory and
//!   answers stay flat (the private module `soak`).
//! - the doorbell-versus-polling ping-pong of `ivshm guest bench` ([`run_pingpong`]), in a
//!   guest or, with `--socket`, as a host peer ([`pingpong_as_host_peer`]).

mod server;
mod soak;

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::builder::RangedU64ValueParser;
use clap::{Args, Subcommand};
use ivshm_client::{ConnectOptions, Event, Peer, PeerEvent};
use ivshm_guest::doorbell::{wait_eventfd, WaitedOn};
use ivshm_guest::pingpong::{self, PingPongConfig};
use ivshm_guest::DoorbellError;
use ivshm_proto::{MessageReader, Received};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use rustix::event::{epoll, eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
use server::BenchServer;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Doorbell round trips through the library versus a raw eventfd ping-pong.
    Doorbell(DoorbellArgs),
    /// Time N peers joining the server, for several N, next to a blocking reference; the
    /// server's memory per peer.
    Join(JoinArgs),
    /// Joins, leaves, doorbells, factory creates, reloads and bad peers at once for a while;
    /// fails if the server's fds or memory grow or an answer is wrong.
    Soak(soak::SoakArgs),
    /// The blocking reference of `bench join` in a process of its own (started by `bench
    /// join`, so that the fds of the reference do not count against the joiners' process).
    #[command(hide = true)]
    JoinReference(JoinReferenceArgs),
    /// ivshm-channel round trips and throughput versus the hardware's and kernel's floors.
    Channel(super::bench_channel::ChannelArgs),
    /// TCP through two bridges over a region versus plain TCP loopback.
    Bridge(super::bench_bridge::BridgeBenchArgs),
}

/// Most round trips per variant of `bench doorbell`, measured or warm-up (each measured one
/// keeps a 16-byte sample; a million take about a minute).
pub const MAX_ROUNDS: u64 = 1_000_000;

/// Most peers in one row of `bench join`: every id of a region (ids are 16 bits).
pub const MAX_JOIN_PEERS: u64 = 1 << 16;

/// `ivshm bench doorbell`.
#[derive(Args, Debug, Clone)]
pub struct DoorbellArgs {
    /// Measured round trips per variant (1 to 1000000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20_000,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_ROUNDS)
    )]
    pub rounds: usize,
    /// Unmeasured round trips per variant first (0 to 1000000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1_000,
        value_parser = RangedU64ValueParser::<usize>::new().range(0..=MAX_ROUNDS)
    )]
    pub warmup: usize,
    /// Where the pinging and ponging threads of both variants run: `same` (one CPU: the
    /// software path without cross-CPU wake-ups, steadiest), `split` (two CPUs: adds the
    /// cross-CPU wake-up, as between guests on different cores), `free` (the scheduler decides;
    /// figures vary from run to run).
    #[arg(long, value_enum, default_value_t = Placement::Same)]
    pub placement: Placement,
}

/// Thread placement for `bench doorbell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// Both threads on one CPU.
    Same,
    /// The pinging thread on one CPU, the ponging thread on another.
    Split,
    /// Not pinned.
    Free,
}

/// `ivshm bench join`.
#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    /// Peer counts to time, comma-separated (each 1 to 65536).
    #[arg(
        long,
        value_name = "N",
        value_delimiter = ',',
        default_value = "10,100,500",
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_JOIN_PEERS)
    )]
    pub peers: Vec<usize>,
    /// Vectors per peer (1 to 64).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4,
        value_parser = RangedU64ValueParser::<usize>::new()
            .range(1..=ivshm_proto::v0::MAX_VECTORS as u64)
    )]
    pub vectors: usize,
}

/// `ivshm bench join-reference` (hidden; started by `bench join`).
#[derive(Args, Debug, Clone)]
pub struct JoinReferenceArgs {
    /// Where to listen.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Vectors per peer.
    #[arg(
        long,
        value_name = "N",
        value_parser = RangedU64ValueParser::<usize>::new()
            .range(1..=ivshm_proto::v0::MAX_VECTORS as u64)
    )]
    pub vectors: usize,
    /// Joins to serve.
    #[arg(
        long,
        value_name = "N",
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_JOIN_PEERS)
    )]
    pub peers: usize,
}

/// Runs one benchmark.
pub fn run(c: BenchCommand) -> anyhow::Result<()> {
    match c {
        BenchCommand::Doorbell(a) => {
            let report = doorbell(&a)?;
            print_lines(&report.lines())
        }
        BenchCommand::Join(a) => {
            let report = join(&a)?;
            print_lines(&report.lines())
        }
        BenchCommand::Soak(a) => {
            let report = soak::soak(&a)?;
            print_lines(&report.lines())?;
            if !report.failures.is_empty() {
                bail!("the soak failed: {} failure(s)", report.failures.len());
            }
            Ok(())
        }
        BenchCommand::JoinReference(a) => join_reference(&a),
        BenchCommand::Channel(a) => {
            let report = super::bench_channel::channel(&a)?;
            print_lines(&report.lines())
        }
        BenchCommand::Bridge(a) => {
            let report = super::bench_bridge::bridge(&a)?;
            print_lines(&report.lines())
        }
    }
}

fn print_lines(lines: &[String]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}")?;
        out.flush()?;
    }
    Ok(())
}

/// A private directory for a benchmark's server socket, removed on drop.
pub(crate) struct TempSocket {
    dir: PathBuf,
}

impl TempSocket {
    pub(crate) fn new(tag: &str) -> anyhow::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ivshm-bench-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempSocket { dir })
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server_config(path: &Path, vectors: usize) -> ServerConfig {
    let mut region = RegionConfig::new(path);
    region.vectors = vectors;
    region.memory.size = 1 << 20;
    ServerConfig::single(region)
}

fn spawn_server(path: &Path, vectors: usize) -> anyhow::Result<ServerHandle> {
    ServerHandle::spawn(server_config(path, vectors)).context("starting the in-process server")
}

/// Median and 99th percentile of a set of durations.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// The median.
    pub median: Duration,
    /// The 99th percentile.
    pub p99: Duration,
}

pub(crate) fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let at = |q: f64| -> Duration {
        if samples.is_empty() {
            return Duration::ZERO;
        }
        let i = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[i.min(samples.len() - 1)]
    };
    Summary {
        median: at(0.5),
        p99: at(0.99),
    }
}

/// Result of `bench doorbell`.
#[derive(Debug)]
pub struct DoorbellReport {
    /// Round trips per variant.
    pub rounds: usize,
    /// Through `ivshm-client` and the server's eventfds.
    pub library: Summary,
    /// Raw eventfd ping-pong (blocking reads).
    pub raw: Summary,
    /// Raw eventfd ping-pong, each side waiting in `epoll_wait` on its eventfd (edge-triggered,
    /// never read), as [`Peer::wait`] does.
    pub raw_epoll: Summary,
    /// The CPUs the pinging and the ponging threads of both variants were pinned to (`None`:
    /// not pinned).
    pub pinned: Option<(usize, usize)>,
}

pub(crate) fn micros(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

pub(crate) fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "n/a".into();
    }
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
}

impl DoorbellReport {
    fn lines(&self) -> Vec<String> {
        vec![
            format!(
                "doorbell round trips: {} per variant, alternating blocks",
                self.rounds
            ),
            format!(
                "library (Peer::notify + Peer::wait, ivshm-server): median {}  p99 {}",
                micros(self.library.median),
                micros(self.library.p99)
            ),
            format!(
                "raw eventfd ping-pong (two threads):              median {}  p99 {}",
                micros(self.raw.median),
                micros(self.raw.p99)
            ),
            format!(
                "raw eventfd ping-pong through epoll (as the library waits): median {}  p99 {}",
                micros(self.raw_epoll.median),
                micros(self.raw_epoll.p99)
            ),
            format!(
                "ratio library/raw: median {}  p99 {}",
                ratio(self.library.median, self.raw.median),
                ratio(self.library.p99, self.raw.p99)
            ),
            format!(
                "ratio library/raw-epoll (the library's own cost): median {}  p99 {}; \
                 raw-epoll/raw (the kernel's cost of a wait on an epoll set): median {}  p99 {}",
                ratio(self.library.median, self.raw_epoll.median),
                ratio(self.library.p99, self.raw_epoll.p99),
                ratio(self.raw_epoll.median, self.raw.median),
                ratio(self.raw_epoll.p99, self.raw.p99)
            ),
            match self.pinned {
                Some((ping, pong)) => format!(
                    "all variants: pinging thread on CPU {ping}, ponging threads on CPU {pong}"
                ),
                None => "threads not pinned (the scheduler placed them)".to_string(),
            },
        ]
    }
}

/// The CPUs for the pinging and the ponging threads: the first one (twice) or the first two
/// this thread may run on; `None` for `free`, or `split` with a single CPU.
pub(crate) fn placement_cpus(placement: Placement) -> Option<(usize, usize)> {
    let allowed = sched_getaffinity(None).ok()?;
    let mut cpus = (0..CpuSet::MAX_CPU).filter(|&cpu| allowed.is_set(cpu));
    match placement {
        Placement::Free => None,
        Placement::Same => cpus.next().map(|cpu| (cpu, cpu)),
        Placement::Split => Some((cpus.next()?, cpus.next()?)),
    }
}

/// Pins the calling thread to `cpu`. Best effort: without it the figures only vary more, as
/// the scheduler moves the threads of one variant differently from the other's.
pub(crate) fn pin_to(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu);
    if let Err(e) = sched_setaffinity(None, &set) {
        tracing::warn!("could not pin a benchmark thread to CPU {cpu}: {e}");
    }
}

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// Waits for the next doorbell on `peer`, skipping peer events.
fn next_doorbell(peer: &mut Peer) -> anyhow::Result<usize> {
    loop {
        match peer.wait(WAIT)? {
            Some(Event::Doorbell { vector }) => return Ok(vector),
            Some(Event::Peer(_)) => {}
            Some(other) => bail!("unexpected event {other:?}"),
            None => bail!("no doorbell within 10 s"),
        }
    }
}

pub(crate) fn read_eventfd(fd: &OwnedFd) -> anyhow::Result<()> {
    let mut buf = [0u8; 8];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => bail!("eventfd read: {e}"),
        }
    }
}

pub(crate) fn write_eventfd(fd: &OwnedFd) -> anyhow::Result<()> {
    ivshm_client::doorbell::ring(fd.as_fd()).context("eventfd write")
}

/// An eventfd waited on as [`Peer::wait`] waits on its own vectors: alone in an epoll set,
/// edge-triggered, its counter never read (the reference for the library's own cost).
struct EpollDoorbell {
    epoll: OwnedFd,
    _eventfd: OwnedFd,
}

impl EpollDoorbell {
    fn new(eventfd: OwnedFd) -> anyhow::Result<EpollDoorbell> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            &eventfd,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )?;
        Ok(EpollDoorbell {
            epoll,
            _eventfd: eventfd,
        })
    }

    /// Blocks until the eventfd is rung (at least once since the last wait).
    fn wait(&self) -> anyhow::Result<()> {
        let mut ready = [std::mem::MaybeUninit::<epoll::Event>::uninit(); 4];
        loop {
            match epoll::wait(&self.epoll, &mut ready, None) {
                Ok((events, _)) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(rustix::io::Errno::INTR) => continue,
                Err(e) => bail!("epoll_wait: {e}"),
            }
        }
    }
}

/// Runs `bench doorbell`.
pub fn doorbell(a: &DoorbellArgs) -> anyhow::Result<DoorbellReport> {
    const BLOCKS: usize = 10;
    let sock = TempSocket::new("doorbell")?;
    let _server = spawn_server(&sock.path(), 1)?;
    let mut pinger = Peer::connect(&sock.path(), ConnectOptions::default())?;
    let mut ponger = Peer::connect(&sock.path(), ConnectOptions::default())?;
    let (ping_id, pong_id) = (pinger.id(), ponger.id());
    match pinger.wait(WAIT)? {
        Some(Event::Peer(PeerEvent::Joined { id, .. })) if id == pong_id => {}
        other => bail!("expected peer {pong_id} to join, got {other:?}"),
    }
    let total = a
        .warmup
        .checked_add(a.rounds)
        .context("--warmup + --rounds overflows")?;
    // The same placement for both variants, so neither gets a luckier one. The server thread
    // (started above) is not pinned; it is idle while doorbells ring.
    let pinned = placement_cpus(a.placement);
    if pinned.is_none() && a.placement == Placement::Split {
        bail!("--placement split needs two CPUs; this process may use only one");
    }
    let original_affinity = sched_getaffinity(None).ok();
    let pong_cpu = pinned.map(|(_, pong)| pong);
    // The library ponger answers every doorbell; the raw ponger every eventfd read.
    let lib_thread = std::thread::spawn(move || -> anyhow::Result<()> {
        if let Some(cpu) = pong_cpu {
            pin_to(cpu);
        }
        for _ in 0..total {
            next_doorbell(&mut ponger)?;
            ponger.notify(ping_id, 0)?;
        }
        Ok(())
    });
    let to_pong = eventfd(0, EventfdFlags::CLOEXEC)?;
    let to_ping = eventfd(0, EventfdFlags::CLOEXEC)?;
    let raw_thread = {
        let to_pong = to_pong.try_clone()?;
        let to_ping = to_ping.try_clone()?;
        std::thread::spawn(move || -> anyhow::Result<()> {
            if let Some(cpu) = pong_cpu {
                pin_to(cpu);
            }
            for _ in 0..total {
                read_eventfd(&to_pong)?;
                write_eventfd(&to_ping)?;
            }
            Ok(())
        })
    };
    let epoll_to_pong = eventfd(0, EventfdFlags::CLOEXEC)?;
    let epoll_to_ping = eventfd(0, EventfdFlags::CLOEXEC)?;
    let epoll_thread = {
        let to_pong = EpollDoorbell::new(epoll_to_pong.try_clone()?)?;
        let to_ping = epoll_to_ping.try_clone()?;
        std::thread::spawn(move || -> anyhow::Result<()> {
            if let Some(cpu) = pong_cpu {
                pin_to(cpu);
            }
            for _ in 0..total {
                to_pong.wait()?;
                write_eventfd(&to_ping)?;
            }
            Ok(())
        })
    };
    let epoll_ping = EpollDoorbell::new(epoll_to_ping)?;
    let epoll_round = |measure: &mut Vec<Duration>| -> anyhow::Result<()> {
        let t = Instant::now();
        write_eventfd(&epoll_to_pong)?;
        epoll_ping.wait()?;
        measure.push(t.elapsed());
        Ok(())
    };
    let mut lib_round = |measure: &mut Vec<Duration>| -> anyhow::Result<()> {
        let t = Instant::now();
        pinger.notify(pong_id, 0)?;
        next_doorbell(&mut pinger)?;
        measure.push(t.elapsed());
        Ok(())
    };
    let raw_round = |measure: &mut Vec<Duration>| -> anyhow::Result<()> {
        let t = Instant::now();
        write_eventfd(&to_pong)?;
        read_eventfd(&to_ping)?;
        measure.push(t.elapsed());
        Ok(())
    };
    if let Some((ping, _)) = pinned {
        pin_to(ping);
    }
    let mut scratch = Vec::new();
    for _ in 0..a.warmup {
        lib_round(&mut scratch)?;
        raw_round(&mut scratch)?;
        epoll_round(&mut scratch)?;
    }
    let mut lib = Vec::with_capacity(a.rounds);
    let mut raw = Vec::with_capacity(a.rounds);
    let mut raw_epoll = Vec::with_capacity(a.rounds);
    for block in 0..BLOCKS {
        let n = a.rounds / BLOCKS + usize::from(block < a.rounds % BLOCKS);
        for _ in 0..n {
            lib_round(&mut lib)?;
        }
        for _ in 0..n {
            raw_round(&mut raw)?;
        }
        for _ in 0..n {
            epoll_round(&mut raw_epoll)?;
        }
    }
    if let Some(set) = original_affinity {
        // Undo the pinning of this thread; failing that only affects later figures.
        let _ = sched_setaffinity(None, &set);
    }
    lib_thread
        .join()
        .map_err(|_| anyhow::anyhow!("library ponger panicked"))??;
    raw_thread
        .join()
        .map_err(|_| anyhow::anyhow!("raw ponger panicked"))??;
    epoll_thread
        .join()
        .map_err(|_| anyhow::anyhow!("raw epoll ponger panicked"))??;
    Ok(DoorbellReport {
        rounds: a.rounds,
        library: summarize(&mut lib),
        raw: summarize(&mut raw),
        raw_epoll: summarize(&mut raw_epoll),
        pinned,
    })
}

/// One peer count's join timings.
#[derive(Debug, Clone)]
pub struct JoinRow {
    /// Peers that joined.
    pub peers: usize,
    /// Time for all of them.
    pub total: Duration,
    /// Mean time per join.
    pub per_join: Duration,
    /// The last join (with `peers - 1` peers already there).
    pub last_join: Duration,
    /// Resident memory the server (`ivshm serve` in a child process) gained per connected
    /// peer, in bytes (`None` with an in-process server, as in unit tests).
    pub rss_per_peer: Option<f64>,
    /// Mean time per join of the reference: the same sends and receives made with plain
    /// blocking calls by a thread with no event loop.
    pub reference_per_join: Duration,
}

/// Result of `bench join`.
#[derive(Debug)]
pub struct JoinReport {
    /// Vectors per peer.
    pub vectors: usize,
    /// One row per peer count, in the order asked.
    pub rows: Vec<JoinRow>,
}

impl JoinReport {
    fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "peers joining one after the other, {} vectors each (ivshm serve), \
                 next to a reference making the same sends and receives with blocking calls; \
                 RSS is the server process's",
            self.vectors
        )];
        let first = self.rows.first().cloned();
        for r in &self.rows {
            let growth = match &first {
                Some(f) if !f.per_join.is_zero() => format!(
                    "{:.2}x per-join time for {:.0}x peers",
                    r.per_join.as_secs_f64() / f.per_join.as_secs_f64(),
                    r.peers as f64 / f.peers.max(1) as f64
                ),
                _ => "n/a".into(),
            };
            // The last joiner is told of N-1 peers: time per peer it learns about. Flat across
            // rows means join time grows linearly with N, as protocol v0 dictates.
            let per_existing = match u32::try_from(r.peers.saturating_sub(1)) {
                Ok(others) if others > 0 => micros(r.last_join / others),
                _ => "n/a".into(),
            };
            let rss = r
                .rss_per_peer
                .map_or_else(|| "n/a".into(), |b| format!("{:.2} KB", b / 1024.0));
            out.push(format!(
                "N={:<5} total {:>10.3} ms  per join {:>9}  last join {:>9} \
                 ({per_existing} per existing peer)  growth {growth}  RSS per peer {rss}  \
                 reference per join {:>9}  ratio {}",
                r.peers,
                r.total.as_secs_f64() * 1e3,
                micros(r.per_join),
                micros(r.last_join),
                micros(r.reference_per_join),
                ratio(r.per_join, r.reference_per_join),
            ));
        }
        out
    }
}

/// Open fds a server (or the reference) holds besides its peers' (listening socket, epoll,
/// memory, signal and timer fds, the reserve fd, stdio), with room to spare: `ivshm serve`
/// holds about 20.
const SERVER_OWN_FDS: usize = 64;

/// Open fds of this process besides its joiners' sockets.
const BENCH_OWN_FDS: usize = 64;

/// Raises the fd limit so that `peers` peers with `vectors` vectors fit: each costs the server
/// (and the reference, in its own process) one socket and one eventfd per vector, and this
/// process two sockets (one joiner of each). The soft limit goes to the hard one; as root the
/// hard limit goes up too when that is not enough, if it may (the children inherit both).
fn raise_fd_limit(peers: usize, vectors: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let needed =
        u64::try_from(peers.saturating_mul(vectors + 1) + SERVER_OWN_FDS).unwrap_or(u64::MAX);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let hard = match (limit.maximum, nr_open) {
        (Some(hard), Some(max)) if hard < needed && rustix::process::geteuid().is_root() => {
            Some(needed.min(max))
        }
        (hard, _) => hard,
    };
    if limit.current != hard || limit.maximum != hard {
        let raised = Rlimit {
            current: hard,
            maximum: hard,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            // Not allowed to raise the hard limit (no CAP_SYS_RESOURCE): the soft one still
            // goes up to it.
            tracing::debug!("could not raise RLIMIT_NOFILE to {raised:?}: {e}");
            let soft = Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if let Err(e) = setrlimit(Resource::Nofile, soft) {
                tracing::warn!("could not raise RLIMIT_NOFILE: {e}");
            }
        }
    }
}

/// Fails, before anything starts, if `peers` peers with `vectors` vectors each cannot fit in
/// the open-file limit `limit` (`None`: unlimited) of the server, or of this process holding
/// its joiners (and the reference's fds when it runs in this process too).
fn check_fd_limit(
    peers: usize,
    vectors: usize,
    limit: Option<u64>,
    reference_in_process: bool,
) -> anyhow::Result<()> {
    let Some(limit) = limit.and_then(|l| usize::try_from(l).ok()) else {
        return Ok(());
    };
    let per_peer = vectors + 1;
    let server = peers
        .saturating_mul(per_peer)
        .saturating_add(SERVER_OWN_FDS);
    if server > limit {
        let fit = limit.saturating_sub(SERVER_OWN_FDS) / per_peer;
        bail!(
            "{peers} peers x {vectors} vectors need {} fds in the server (a socket and {vectors} \
             eventfd(s) per peer) plus up to {SERVER_OWN_FDS} of its own, more than its \
             open-file limit of {limit} (RLIMIT_NOFILE; its hard limit goes higher only with \
             CAP_SYS_RESOURCE, e.g. `prlimit --nofile=N:N` as root, or LimitNOFILE= in a \
             unit): at most {fit} peers x {vectors} vectors fit",
            peers.saturating_mul(per_peer)
        );
    }
    let own = peers.saturating_mul(2).saturating_add(BENCH_OWN_FDS);
    let here = if reference_in_process {
        own.saturating_add(peers.saturating_mul(per_peer))
    } else {
        own
    };
    if here > limit {
        bail!(
            "{peers} peers x {vectors} vectors need {here} fds in this process (two joiner \
             sockets per peer{}), more than its open-file limit of {limit} (RLIMIT_NOFILE)",
            if reference_in_process {
                " and the in-process reference's socket and eventfds per peer"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// A peer that joins and then only reads and closes whatever it receives.
struct LightJoiner {
    socket: OwnedFd,
    reader: MessageReader,
}

impl LightJoiner {
    /// Connects and reads until its own `vectors` eventfds arrived; every fd is closed at once.
    fn join(path: &Path, vectors: usize) -> anyhow::Result<LightJoiner> {
        let socket = ivshm_client::connect_socket(path)?;
        let mut reader = MessageReader::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut index = 0usize;
        let mut own_id = None;
        let mut own = 0;
        while own < vectors {
            match reader.receive(socket.as_fd())? {
                Received::Message { value, fd } => {
                    match index {
                        0 if value != 0 => bail!("server sent version {value}"),
                        1 => own_id = Some(value),
                        _ if Some(value) == own_id && fd.is_some() => own += 1,
                        _ => {}
                    }
                    index += 1;
                    drop(fd);
                }
                Received::WouldBlock => wait_readable(&socket, deadline)?,
                Received::Closed => bail!("the server closed the connection during a join"),
            }
        }
        Ok(LightJoiner { socket, reader })
    }

    /// Reads and discards whatever is queued (other peers' join fds).
    fn drain(&mut self) -> anyhow::Result<()> {
        loop {
            match self.reader.receive(self.socket.as_fd())? {
                Received::Message { .. } => {}
                Received::WouldBlock => return Ok(()),
                Received::Closed => bail!("the server closed a joiner's connection"),
            }
        }
    }
}

fn wait_readable(socket: &OwnedFd, deadline: Instant) -> anyhow::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out waiting for the server");
    }
    let timeout = Timespec::try_from(left)?;
    let mut fds = [PollFd::new(socket, PollFlags::IN)];
    match poll(&mut fds, Some(&timeout)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => bail!("poll: {e}"),
    }
}

/// Runs `bench join`: for each peer count, the server's joins and the reference's,
/// alternating one join each (so both see the same load on the machine).
pub fn join(a: &JoinArgs) -> anyhow::Result<JoinReport> {
    if a.vectors == 0 || a.vectors > ivshm_proto::v0::MAX_VECTORS {
        bail!("--vectors must be 1..=64");
    }
    let most = a.peers.iter().copied().max().unwrap_or(0);
    raise_fd_limit(most, a.vectors);
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    check_fd_limit(most, a.vectors, limit, server::ivshm_program().is_none())?;
    let mut rows = Vec::new();
    for &n in &a.peers {
        let sock = TempSocket::new("join")?;
        let path = sock.path();
        let args: Vec<OsString> = vec![
            "--socket".into(),
            path.clone().into(),
            "--vectors".into(),
            a.vectors.to_string().into(),
            "--size".into(),
            "1M".into(),
        ];
        let server = BenchServer::start(&args, &path, || server_config(&path, a.vectors))?;
        let reference = ReferenceServer::start(a.vectors, n)?;
        let mut joined: Vec<LightJoiner> = Vec::with_capacity(n);
        let mut reference_joined: Vec<LightJoiner> = Vec::with_capacity(n);
        let before = server.resident_bytes();
        let (mut total, mut last_join, mut reference_total) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for i in 0..n {
            last_join = join_one(&path, a.vectors, &mut joined)
                .with_context(|| format!("peer {i} of {n} joining"))?;
            total += last_join;
            reference_total += join_one(&reference.path(), a.vectors, &mut reference_joined)
                .with_context(|| format!("peer {i} of {n} joining the reference"))?;
        }
        let after = server.resident_bytes();
        drop(joined);
        server.stop()?;
        reference.finish()?;
        let rss_per_peer = before
            .zip(after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / n.max(1) as f64);
        rows.push(JoinRow {
            peers: n,
            total,
            per_join: mean(total, n),
            last_join,
            rss_per_peer,
            reference_per_join: mean(reference_total, n),
        });
    }
    Ok(JoinReport {
        vectors: a.vectors,
        rows,
    })
}

fn mean(total: Duration, n: usize) -> Duration {
    if n == 0 {
        Duration::ZERO
    } else {
        total / u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Joins one light peer to the server at `path` and adds it to `joined`; the join is timed
/// from connect to the joiner's own eventfds, and the others read theirs after it (untimed).
fn join_one(
    path: &Path,
    vectors: usize,
    joined: &mut Vec<LightJoiner>,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let j = LightJoiner::join(path, vectors)?;
    let took = t.elapsed();
    for other in joined.iter_mut() {
        other.drain()?;
    }
    joined.push(j);
    Ok(took)
}

/// The reference for `n` joins: a server that accepts each connection and makes exactly the
/// server's sends of a join, in its order (the newcomer's eventfds to every existing peer;
/// version, id, the memory fd, every existing peer's eventfds and the newcomer's own to the
/// newcomer) with blocking calls and no event loop. It runs in a process of its own
/// (`ivshm bench join-reference`) when this program is `ivshm`, so that its fds count against
/// its own open-file limit, as the server's do (a thread in this process in unit tests).
enum ReferenceServer {
    /// A thread of this process.
    Thread {
        sock: TempSocket,
        done: std::sync::mpsc::Sender<()>,
        thread: std::thread::JoinHandle<anyhow::Result<()>>,
    },
    /// `ivshm bench join-reference`: it says `ready` on its stdout once it listens and exits
    /// when its stdin closes.
    Child {
        sock: TempSocket,
        child: ReferenceChild,
    },
}

/// The reference's process, killed if it is still running when dropped (a `bench join` that
/// failed half-way leaves it waiting for joins).
struct ReferenceChild(std::process::Child);

impl Drop for ReferenceChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Accepts `n` joins on `listener` and makes the server's sends of each (see
/// [`ReferenceServer`]), then keeps the connections open until `finished` returns.
fn serve_reference(
    listener: &std::os::unix::net::UnixListener,
    vectors: usize,
    n: usize,
    finished: impl FnOnce(),
) -> anyhow::Result<()> {
    use ivshm_proto::fd_passing::send_message_blocking;
    let memory = ivshm_mem::backend::create(
        &ivshm_mem::BackendKind::Memfd,
        1 << 20,
        ivshm_mem::Pow2Policy::RoundUp,
    )?;
    let mut peers: Vec<(std::os::unix::net::UnixStream, Vec<OwnedFd>)> = Vec::new();
    for id in 0..n {
        let (stream, _) = listener.accept()?;
        let own = (0..vectors)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        let id = i64::try_from(id)?;
        // In the server's order: the peers already there first, then the newcomer.
        for (other, _) in &peers {
            for fd in &own {
                send_message_blocking(other.as_fd(), id, Some(fd.as_fd()))?;
            }
        }
        let new = stream.as_fd();
        send_message_blocking(new, 0, None)?;
        send_message_blocking(new, id, None)?;
        send_message_blocking(new, -1, Some(memory.fd()))?;
        for (other, (_, fds)) in peers.iter().enumerate() {
            for fd in fds {
                send_message_blocking(new, i64::try_from(other)?, Some(fd.as_fd()))?;
            }
        }
        for fd in &own {
            send_message_blocking(new, id, Some(fd.as_fd()))?;
        }
        peers.push((stream, own));
    }
    // The connections stay open until the joiners have read everything.
    finished();
    Ok(())
}

/// `ivshm bench join-reference`: the reference in this process, for `bench join`.
fn join_reference(a: &JoinReferenceArgs) -> anyhow::Result<()> {
    let listener = std::os::unix::net::UnixListener::bind(&a.socket)
        .with_context(|| format!("binding {}", a.socket.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    serve_reference(&listener, a.vectors, a.peers, || {
        // Until `bench join` closes our stdin (or exits).
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    })
}

impl ReferenceServer {
    fn start(vectors: usize, n: usize) -> anyhow::Result<ReferenceServer> {
        let sock = TempSocket::new("join-reference")?;
        if let Some(program) = server::ivshm_program() {
            return Self::spawn(&program, sock, vectors, n);
        }
        let listener = std::os::unix::net::UnixListener::bind(sock.path())
            .with_context(|| format!("binding {}", sock.path().display()))?;
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            serve_reference(&listener, vectors, n, || {
                let _ = finished.recv();
            })
        });
        Ok(ReferenceServer::Thread { sock, done, thread })
    }

    fn spawn(
        program: &Path,
        sock: TempSocket,
        vectors: usize,
        n: usize,
    ) -> anyhow::Result<ReferenceServer> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(program)
            .arg("bench")
            .arg("join-reference")
            .arg("--socket")
            .arg(sock.path())
            .args(["--vectors", &vectors.to_string(), "--peers", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} bench join-reference", program.display()))?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        }
        if line.trim() != "ready" {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("the join reference did not start ({status})");
        }
        Ok(ReferenceServer::Child {
            sock,
            child: ReferenceChild(child),
        })
    }

    fn path(&self) -> PathBuf {
        match self {
            ReferenceServer::Thread { sock, .. } | ReferenceServer::Child { sock, .. } => {
                sock.path()
            }
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            ReferenceServer::Thread { done, thread, .. } => {
                let _ = done.send(());
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("the reference server panicked"))?
            }
            ReferenceServer::Child { mut child, .. } => {
                drop(child.0.stdin.take());
                let status = child.0.wait().context("waiting for the join reference")?;
                if !status.success() {
                    bail!("the join reference failed ({status})");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_bench_runs_both_variants() {
        let r = doorbell(&DoorbellArgs {
            rounds: 30,
            warmup: 5,
            placement: Placement::Same,
        })
        .unwrap();
        let (ping, pong) = r.pinned.unwrap();
        assert_eq!(ping, pong, "same placement: one CPU");
        assert_eq!(r.rounds, 30);
        let lines = r.lines();
        assert!(lines[4].starts_with("ratio library/raw"));
        assert!(lines[5].starts_with("ratio library/raw-epoll"));
    }

    #[test]
    fn join_bench_runs() {
        let r = join(&JoinArgs {
            peers: vec![2, 5],
            vectors: 4,
        })
        .unwrap();
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.rows[1].peers, 5);
        assert!(!r.rows[1].reference_per_join.is_zero());
        let lines = r.lines();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[2].contains("RSS per peer") && lines[2].contains("ratio"),
            "{lines:?}"
        );
    }

    #[test]
    fn join_says_up_front_what_does_not_fit_in_the_fd_limit() {
        // 4,096 peers x 4 vectors: 20,480 fds in the server, over a limit of 20,000.
        let e = check_fd_limit(4096, 4, Some(20_000), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("4096 peers x 4 vectors need 20480 fds in the server")
                && e.contains("open-file limit of 20000")
                && e.contains("at most 3987 peers x 4 vectors fit"),
            "{e}"
        );
        check_fd_limit(3987, 4, Some(20_000), false).unwrap();
        check_fd_limit(4096, 3, Some(20_000), false).unwrap();
        check_fd_limit(1 << 16, 64, None, true).unwrap();
        // The reference in this process: its fds count here too.
        check_fd_limit(2500, 4, Some(20_000), true).unwrap();
        let e = check_fd_limit(3000, 4, Some(20_000), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("21064 fds in this process"), "{e}");
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let s = summarize(&mut v);
        assert_eq!(s.median, Duration::from_micros(51));
        assert_eq!(s.p99, Duration::from_micros(99));
    }
}

/// The ping-pong of `ivshm guest bench`, wherever it runs.
#[derive(Args, Debug)]
pub struct PingPongArgs {
    /// The other side's peer ID.
    #[arg(long, value_name = "ID")]
    peer: u16,
    /// Answer a pinger instead of driving (start this side first).
    #[arg(long)]
    respond: bool,
    /// Round trips per phase (at least 1).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Vector rung in both directions.
    #[arg(long, value_name = "V", default_value_t = 0)]
    vector: u16,
    /// Offset of the 16-byte control block in shared memory (both sides must agree).
    #[arg(long, value_name = "OFFSET", value_parser = crate::args::offset, default_value = "0")]
    offset: usize,
    /// Longest wait for one step, in seconds (the responder's first wait too).
    #[arg(long, value_name = "SECONDS", value_parser = crate::args::seconds, default_value = "60")]
    timeout: Duration,
}

/// The ping-pong as a host peer of the server at `socket`: same protocol, the doorbells are
/// the server's eventfds.
pub fn pingpong_as_host_peer(a: &PingPongArgs, socket: &Path) -> anyhow::Result<()> {
    let peer = Peer::connect(socket, ConnectOptions::default())
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mapping = peer.map()?;
    let (id, vectors) = (peer.id(), u16::try_from(peer.vectors()).unwrap_or(u16::MAX));
    let doorbells = HostPeerDoorbells::new(peer, a.timeout)?;
    run_pingpong(a, id, vectors, mapping.view(), &doorbells)
}

/// Ping-pong doorbells of a host peer: ring through the target's eventfd, wait on our own.
struct HostPeerDoorbells {
    peer: std::cell::RefCell<Peer>,
    /// How long a ring waits for its target to be announced by the server.
    join_wait: Duration,
}

impl HostPeerDoorbells {
    /// Makes the peer's own vector eventfds non-blocking, as waiting on them needs.
    fn new(peer: Peer, join_wait: Duration) -> anyhow::Result<HostPeerDoorbells> {
        for vector in 0..peer.vectors() {
            if let Some(fd) = peer.own_vector_fd(vector) {
                ivshm_client::doorbell::set_nonblocking(fd).with_context(|| {
                    format!("making the eventfd of own vector {vector} non-blocking")
                })?;
            }
        }
        Ok(HostPeerDoorbells {
            peer: std::cell::RefCell::new(peer),
            join_wait,
        })
    }
}

impl pingpong::Doorbells for HostPeerDoorbells {
    /// Rings `target`'s vector. A target that joined after us is known only once the server's
    /// messages about it are read: they are read here (never through `Peer::wait`, which would
    /// also take our own doorbells), waiting up to `join_wait` for them.
    fn ring(&self, target: u16, vector: u16) -> Result<(), DoorbellError> {
        let mut peer = self.peer.borrow_mut();
        let deadline = Instant::now() + self.join_wait;
        loop {
            match peer.notify(target, usize::from(vector)) {
                Err(
                    ivshm_client::ClientError::UnknownPeer(_)
                    | ivshm_client::ClientError::UnknownVector { .. },
                ) if Instant::now() < deadline => {
                    peer.process_server_messages()
                        .map_err(|e| DoorbellError::Ring(Box::new(e)))?;
                    if peer.peer_vectors(target).is_none() {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let timeout = Timespec::try_from(left.min(Duration::from_millis(100)))
                            .unwrap_or(Timespec {
                                tv_sec: 0,
                                tv_nsec: 100_000_000,
                            });
                        let socket = peer.socket_fd();
                        let mut fds = [PollFd::new(&socket, PollFlags::IN)];
                        let _ = poll(&mut fds, Some(&timeout));
                    }
                }
                Err(ivshm_client::ClientError::UnknownPeer(_)) => {
                    return Err(DoorbellError::Ring(
                        format!(
                            "peer {target} is not connected to the server (no join within {} \
                             s): start the other side first, or check --peer (`ivshm peers \
                             --socket PATH` lists the ids)",
                            self.join_wait.as_secs_f64()
                        )
                        .into(),
                    ));
                }
                other => return other.map_err(|e| DoorbellError::Ring(Box::new(e))),
            }
        }
    }

    fn wait_rung(&self, vector: u16, timeout: Duration) -> Result<u64, DoorbellError> {
        let peer = self.peer.borrow();
        let vectors = u16::try_from(peer.vectors()).unwrap_or(u16::MAX);
        let fd = peer
            .own_vector_fd(usize::from(vector))
            .ok_or(DoorbellError::VectorOutOfRange { vector, vectors })?;
        wait_eventfd(fd, timeout)?.ok_or(DoorbellError::Timeout {
            vector: WaitedOn(Some(vector)),
            timeout,
        })
    }
}

/// Prints `self ...`, then runs the responder or the pinger and prints its report.
pub fn run_pingpong(
    a: &PingPongArgs,
    id: u16,
    vectors: u16,
    memory: ivshm_guest::SharedView<'_>,
    doorbells: &impl pingpong::Doorbells,
) -> anyhow::Result<()> {
    let config = PingPongConfig {
        peer: a.peer,
        vector: a.vector,
        round_trips: a.count,
        timeout: a.timeout,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "self id={id} vectors={vectors} size={}", memory.len())?;
    out.flush()?;
    if a.respond {
        let report = pingpong::run_responder(memory, a.offset, doorbells, &config)?;
        writeln!(
            out,
            "responded doorbells={} polls={}",
            report.doorbells, report.polls
        )?;
    } else {
        let report = pingpong::run_pinger(memory, a.offset, doorbells, &config)?;
        writeln!(
            out,
            "doorbell round_trips={} lost=0 mean_ns={}",
            report.doorbell_round_trips,
            report.doorbell_mean().as_nanos()
        )?;
        writeln!(
            out,
            "polling round_trips={} mean_ns={}",
            report.polling_round_trips,
            report.polling_mean().as_nanos()
        )?;
        writeln!(out, "ratio doorbell/polling={:.2}", report.ratio())?;
    }
    out.flush()?;
    Ok(())
}
