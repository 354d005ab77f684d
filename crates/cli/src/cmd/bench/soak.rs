//! `ivshm bench soak --duration D`: everything at once against one server for a while, checking
//! that its file descriptors, its memory and its answers stay as they should.
//!
//! The server is `ivshm serve --config` in a child process (an in-process server inside unit
//! tests, where its fds and memory cannot be told from the test's: then they are not checked).
//! Its configuration has a region `hub` and two VMs, a run-time region quota and a short
//! `unused_timeout`. Threads then run, all at once until the duration is over:
//!
//! - **doorbells**: two peers of `hub` ring each other, round trip after round trip;
//! - **churn**: peers join `hub` and leave;
//! - **factory**: creates through the VM's factory (past its quota: `GSS_NOMEM`, expected),
//!   half of them joined and left (the region goes with its peer), half never joined (the
//!   region is reclaimed after `unused_timeout`), and `find`s of `hub`;
//! - **reloads**: the file is rewritten with and without a second VM and reloaded through the
//!   control socket, which also answers `stats`;
//! - **bad peers**: connections to `hub` that write garbage (the server must close them),
//!   never read, stop half-way through their handshake, or read one message and then hold on;
//!   garbage and endless lines to the factory and control sockets (refused), and a factory
//!   client that sends a thousand requests and never reads the answers.
//!
//! Every second the server's open fds and resident memory are sampled (for the report: under
//! load its fds move with the moment's peers and with the queues of peers slow to read, which
//! keep the eventfds of peers that have since left open until they are sent). About six times
//! per run, and at the end, comes a [`lull`]: every worker pauses, the server settles, and its
//! fds and memory are sampled. The run fails (exit status 1) if an answer is wrong, a doorbell
//! does not come back, an honest peer is dropped, a lull holds more than [`FD_SLACK`] fds
//! beyond the first lull or more memory than [`RSS_SLACK_BYTES`] and [`RSS_SLACK_SHARE`]
//! allow, the server's counters do not add up (every join ended in a leave or a drop), or once
//! everything has stopped the server holds more fds than before the load ([`FD_SLACK_IDLE`]).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ivshm_client::{ConnectOptions, Event, Peer, PeerEvent};
use ivshm_policy::GuestShmStatus;
use ivshm_proto::control::{ControlRequest, ControlResponse, ControlResult, StatsReport};
use ivshm_proto::factory::{decode_line, encode_line, FactoryRequest, FactoryResponse};

use super::server::BenchServer;
use super::TempSocket;

/// Open fds a lull may hold beyond the first lull (a reload adds or removes a VM: its
/// directory and factory socket).
pub const FD_SLACK: usize = 4;
/// Open fds the idle server may hold beyond what it held before the load.
pub const FD_SLACK_IDLE: usize = 4;
/// Bytes of resident memory a lull may hold beyond the first lull, ...
pub const RSS_SLACK_BYTES: u64 = 4 << 20;
/// ... or this share of it, whichever is more.
pub const RSS_SLACK_SHARE: f64 = 0.10;

/// Doorbell round trips between two pauses of a millisecond.
const DOORBELL_BURST: u64 = 64;

/// The churn's pause between a leave and the next join.
const CHURN_PAUSE: Duration = Duration::from_millis(1);

/// Factory-made regions the soak's VM may have at once.
const QUOTA: usize = 8;

/// `ivshm bench soak`.
#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long the load runs: a whole number with s, m or h (`20s`, `10m`, `1h`).
    #[arg(long, value_parser = crate::args::duration, default_value = "60s")]
    pub duration: Duration,
}

/// One sample of the server.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Since the load started.
    pub at: Duration,
    /// Open fds (`None` in process).
    pub fds: Option<usize>,
    /// Resident bytes (`None` in process).
    pub rss: Option<u64>,
}

/// What a soak did and found.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// How long the load ran.
    pub load: Duration,
    /// How long the whole soak took (the load and the lulls).
    pub duration: Duration,
    /// Samples under load, one per second.
    pub samples: Vec<Sample>,
    /// Samples in the lulls (see [`lull`]).
    pub lulls: Vec<Sample>,
    /// Open fds before the load and once it had stopped and settled.
    pub idle_fds: (Option<usize>, Option<usize>),
    /// The server's counters once the load had stopped.
    pub counters: Option<StatsReport>,
    /// Operations done, by kind, in a fixed order.
    pub operations: Vec<(&'static str, u64)>,
    /// What went wrong (empty: nothing).
    pub failures: Vec<String>,
}

/// Counters and failures the workers share.
#[derive(Default)]
struct Tally {
    round_trips: AtomicU64,
    joins: AtomicU64,
    creates: AtomicU64,
    quota_refusals: AtomicU64,
    finds: AtomicU64,
    reloads: AtomicU64,
    stats: AtomicU64,
    bad_peers: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        if let Ok(mut failures) = self.failures.lock() {
            if failures.len() < 100 {
                failures.push(what);
            }
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Stops the workers, or pauses them for a lull.
#[derive(Default)]
struct Switch {
    stop: AtomicBool,
    pause: AtomicBool,
    /// Workers waiting in [`Switch::go`] for the pause to end.
    paused: AtomicUsize,
    /// Workers that have ended (a failure ends its worker; the others go on).
    ended: AtomicUsize,
}

impl Switch {
    /// Whether a worker goes on (false once stopped); during a pause it waits here.
    fn go(&self) -> bool {
        if self.pause.load(Ordering::Acquire) {
            self.paused.fetch_add(1, Ordering::AcqRel);
            while self.pause.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.paused.fetch_sub(1, Ordering::AcqRel);
        }
        !self.stop.load(Ordering::Acquire)
    }
}

/// A lull: every worker paused between two operations (the doorbell pair still connected), the
/// server left to settle (factory-made regions nobody joined reclaimed after `unused_timeout`,
/// the last leaves processed) until its fds stay the same, then sampled. Under load the fds
/// move with the moment's peers and queues; in a lull they must come back to the same number.
fn lull(
    server: &BenchServer,
    switch: &Switch,
    workers: usize,
    start: Instant,
    tally: &Tally,
) -> Sample {
    switch.pause.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(30);
    let still =
        || switch.paused.load(Ordering::Acquire) + switch.ended.load(Ordering::Acquire) >= workers;
    while !still() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !still() {
        tally.fail("the workers did not pause within 30 s (one is stuck)".into());
    }
    // unused_timeout is 1 s.
    std::thread::sleep(Duration::from_millis(1500));
    let mut fds = server.open_fds();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = server.open_fds();
        if now == fds {
            break;
        }
        fds = now;
    }
    let sample = Sample {
        at: start.elapsed(),
        fds,
        rss: server.resident_bytes(),
    };
    switch.pause.store(false, Ordering::Release);
    sample
}

/// Where the soak's server lives.
struct Layout {
    root: PathBuf,
    config: PathBuf,
}

impl Layout {
    fn hub(&self) -> PathBuf {
        self.root.join("soak").join("hub.sock")
    }

    fn factory(&self) -> PathBuf {
        self.root.join("soak").join("factory.sock")
    }

    fn control(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// Writes the configuration, with or without the second VM. Ids are reused at once
    /// (`id_reuse = "immediate"`): the soak's peers are this library's, which take a reused
    /// id, and with the default every id the churn frees would be held back for as long as
    /// the doorbell pair stays, so joins would soon be refused.
    fn write_config(&self, spare: bool) -> anyhow::Result<()> {
        let mut text = format!(
            "root = {:?}\n[defaults]\nvectors = 2\npeer_limit = 256\nid_reuse = \"immediate\"\n\
             max_regions_per_vm = {QUOTA}\nunused_timeout = \"1s\"\n[[region]]\nname = \"hub\"\n\
             size = \"64K\"\n[vm.soak]\n",
            self.root.display().to_string()
        );
        if spare {
            text.push_str("[vm.spare]\nrules = [\"allow hub\"]\n");
        }
        std::fs::write(&self.config, text)
            .with_context(|| format!("writing {}", self.config.display()))
    }
}

/// Runs the soak.
pub fn soak(a: &SoakArgs) -> anyhow::Result<SoakReport> {
    let base = TempSocket::new("soak")?;
    let layout = Layout {
        root: base.dir().join("root"),
        config: base.dir().join("ivshm.toml"),
    };
    layout.write_config(false)?;
    let args: Vec<OsString> = vec!["--config".into(), layout.config.clone().into()];
    let config = layout.config.clone();
    let mut server = BenchServer::start(&args, &layout.factory(), move || {
        ivshm_server::config_file::load(&config)
            .unwrap_or_else(|e| panic!("the soak's own configuration does not load: {e}"))
    })?;
    // The factory socket was waited for; the region's and the control socket come with it
    // but not necessarily before it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while [layout.hub(), layout.control()]
        .iter()
        .any(|p| std::fs::symlink_metadata(p).is_err())
    {
        if Instant::now() > deadline {
            bail!(
                "the server did not create {} in 30 s",
                layout.hub().display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let idle_before = server.open_fds();
    let tally = Arc::new(Tally::default());
    let switch = Arc::new(Switch::default());
    let layout = Arc::new(layout);
    let pair = doorbell_pair(&layout)?;
    let mut workers = vec![{
        let (tally, switch) = (tally.clone(), switch.clone());
        std::thread::spawn(move || {
            if let Err(e) = doorbells(pair, &tally, &switch) {
                tally.fail(format!("doorbells: {e:#}"));
            }
            switch.ended.fetch_add(1, Ordering::AcqRel);
        })
    }];
    type Worker = fn(&Layout, &Tally, &Switch) -> anyhow::Result<()>;
    let jobs: [(&str, Worker); 5] = [
        ("churn", churn),
        ("factory", factory),
        ("reloads", reloads),
        ("bad peers", bad_peers),
        ("bad peers", bad_peers),
    ];
    for (name, job) in jobs {
        let (layout, tally, switch) = (layout.clone(), tally.clone(), switch.clone());
        workers.push(std::thread::spawn(move || {
            if let Err(e) = job(&layout, &tally, &switch) {
                tally.fail(format!("{name}: {e:#}"));
            }
            switch.ended.fetch_add(1, Ordering::AcqRel);
        }));
    }
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut lulls = Vec::new();
    let report_every = (a.duration / 10).max(Duration::from_secs(2));
    let lull_every = (a.duration / 6).max(Duration::from_secs(2));
    let (mut next_report, mut next_lull) = (report_every, lull_every);
    let mut load_time = Duration::ZERO;
    let mut since = Instant::now();
    while load_time + since.elapsed() < a.duration {
        std::thread::sleep(Duration::from_secs(1).min(a.duration));
        let sample = Sample {
            at: start.elapsed(),
            fds: server.open_fds(),
            rss: server.resident_bytes(),
        };
        samples.push(sample);
        if !server.is_running() {
            tally.fail("the server exited".into());
            break;
        }
        if sample.at >= next_report {
            next_report += report_every;
            eprintln!("{}", progress_line(&sample, &tally));
        }
        let loaded = load_time + since.elapsed();
        if loaded >= next_lull || loaded >= a.duration {
            next_lull += lull_every;
            load_time = loaded;
            lulls.push(lull(&server, &switch, workers.len(), start, &tally));
            since = Instant::now();
        }
    }
    switch.stop.store(true, Ordering::Release);
    for worker in workers {
        if worker.join().is_err() {
            tally.fail("a worker panicked".into());
        }
    }
    // Unused regions go after unused_timeout (1 s); the last peers' leaves are processed.
    std::thread::sleep(Duration::from_millis(2500));
    let idle_after = server.open_fds();
    let mut failures =
        std::mem::take(&mut *tally.failures.lock().unwrap_or_else(|e| e.into_inner()));
    failures.extend(check_growth(&lulls, idle_before, idle_after));
    let counters = match control(&layout, &ControlRequest::Stats) {
        Ok(ControlResult::Stats { stats }) => {
            failures.extend(check_counters(&stats, tally.joins.load(Ordering::Relaxed)));
            Some(stats)
        }
        Ok(other) => {
            failures.push(format!("stats answered {other:?}"));
            None
        }
        Err(e) => {
            failures.push(format!("stats after the load: {e:#}"));
            None
        }
    };
    if let Err(e) = server.stop() {
        failures.push(format!("stopping the server: {e:#}"));
    }
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(SoakReport {
        load: load_time,
        duration: start.elapsed(),
        samples,
        lulls,
        idle_fds: (idle_before, idle_after),
        counters,
        operations: vec![
            ("doorbell round trips", count(&tally.round_trips)),
            ("joins and leaves", count(&tally.joins)),
            ("factory creates", count(&tally.creates)),
            ("quota refusals", count(&tally.quota_refusals)),
            ("factory finds", count(&tally.finds)),
            ("reloads", count(&tally.reloads)),
            ("stats", count(&tally.stats)),
            ("bad peers", count(&tally.bad_peers)),
        ],
        failures,
    })
}

fn progress_line(sample: &Sample, tally: &Tally) -> String {
    format!(
        "soak {:>5.0} s: fds {}  RSS {}  round trips {}  joins {}  creates {}  reloads {}  bad peers {}",
        sample.at.as_secs_f64(),
        sample.fds.map_or_else(|| "n/a".into(), |f| f.to_string()),
        sample.rss.map_or_else(|| "n/a".into(), mib),
        tally.round_trips.load(Ordering::Relaxed),
        tally.joins.load(Ordering::Relaxed),
        tally.creates.load(Ordering::Relaxed),
        tally.reloads.load(Ordering::Relaxed),
        tally.bad_peers.load(Ordering::Relaxed),
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The server's counters after the load: nobody connected any more, every join ended in a
/// leave or a drop, and at least the joins the soak made (its bad peers join too).
fn check_counters(stats: &StatsReport, joins: u64) -> Vec<String> {
    let mut failures = Vec::new();
    if stats.peers_connected != 0 {
        failures.push(format!(
            "{} peers still connected after the load",
            stats.peers_connected
        ));
    }
    if stats.joins < joins || stats.leaves + stats.drops != stats.joins {
        failures.push(format!(
            "the server counted {} joins, {} leaves and {} drops; the soak made {joins} joins \
             and every peer went",
            stats.joins, stats.leaves, stats.drops
        ));
    }
    failures
}

/// The first half of the samples after a warm-up of a tenth, and the second half.
fn halves(samples: &[Sample]) -> (&[Sample], &[Sample]) {
    let warm = samples.len() / 10;
    let half = samples.len() / 2;
    (
        samples.get(warm..half).unwrap_or(&[]),
        samples.get(half..).unwrap_or(&[]),
    )
}

/// `floor–peak` of the fds and the peak RSS of some samples, for the report.
fn describe(samples: &[Sample]) -> String {
    let fds = samples.iter().filter_map(|s| s.fds);
    let (floor, peak) = (fds.clone().min(), fds.max());
    match (floor, peak, samples.iter().filter_map(|s| s.rss).max()) {
        (Some(floor), Some(peak), Some(rss)) => {
            format!("fds {floor}–{peak}, RSS peak {}", mib(rss))
        }
        _ => "fds and RSS n/a (in-process server)".into(),
    }
}

/// The growth checks: every lull against the first, and the idle server against itself
/// before the load.
fn check_growth(
    lulls: &[Sample],
    idle_before: Option<usize>,
    idle_after: Option<usize>,
) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some((first, later)) = lulls.split_first() {
        for lull in later {
            if let (Some(a), Some(b)) = (first.fds, lull.fds) {
                if b > a + FD_SLACK {
                    failures.push(format!(
                        "open fds grew: {a} in the first lull, {b} in the one at {:.0} s \
                         (bound +{FD_SLACK})",
                        lull.at.as_secs_f64()
                    ));
                }
            }
            if let (Some(a), Some(b)) = (first.rss, lull.rss) {
                let slack = RSS_SLACK_BYTES.max((a as f64 * RSS_SLACK_SHARE) as u64);
                if b > a + slack {
                    failures.push(format!(
                        "memory grew: {} in the first lull, {} in the one at {:.0} s (bound +{})",
                        mib(a),
                        mib(b),
                        lull.at.as_secs_f64(),
                        mib(slack)
                    ));
                }
            }
        }
    }
    if let (Some(before), Some(after)) = (idle_before, idle_after) {
        if after > before + FD_SLACK_IDLE {
            failures.push(format!(
                "the idle server holds {after} fds, {before} before the load (bound +{FD_SLACK_IDLE})"
            ));
        }
    }
    failures
}

impl SoakReport {
    /// The report's lines.
    pub fn lines(&self) -> Vec<String> {
        let (first, second) = halves(&self.samples);
        let idle = |f: Option<usize>| f.map_or("n/a".into(), |f| f.to_string());
        let mut out = vec![
            format!(
                "soak: {:.0} s of doorbells, joins and leaves, factory creates, reloads and bad peers against one server ({:.0} s with the lulls, {} samples)",
                self.load.as_secs_f64(),
                self.duration.as_secs_f64(),
                self.samples.len()
            ),
            format!(
                "server, first half (after a tenth's warm-up): {}",
                describe(first)
            ),
            format!("server, second half: {}", describe(second)),
            format!(
                "server idle: {} fds before the load, {} after it (unused regions reclaimed)",
                idle(self.idle_fds.0),
                idle(self.idle_fds.1)
            ),
            format!(
                "server in the lulls (load paused, server settled): {}",
                self.lulls
                    .iter()
                    .map(|l| format!(
                        "{:.0} s: {} fds, {}",
                        l.at.as_secs_f64(),
                        idle(l.fds),
                        l.rss.map_or("n/a".into(), mib)
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            format!(
                "bounds: each lull within +{FD_SLACK} fds and +{} or +{:.0}% RSS of the first lull, idle fds after within +{FD_SLACK_IDLE} of before",
                mib(RSS_SLACK_BYTES),
                RSS_SLACK_SHARE * 100.0
            ),
        ];
        if let Some(c) = &self.counters {
            let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
                m.iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(what, n)| format!("{what} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push(format!(
                "server's counters: {} joins, {} leaves, {} drops, {} connected; removals: {}; refusals: {}",
                c.joins,
                c.leaves,
                c.drops,
                c.peers_connected,
                nonzero(&c.removals),
                nonzero(&c.refusals)
            ));
        }
        out.push(format!(
            "operations: {}",
            self.operations
                .iter()
                .map(|(what, n)| format!("{what} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if self.failures.is_empty() {
            out.push("failures: none".into());
        } else {
            out.push(format!("failures: {}", self.failures.len()));
            out.extend(self.failures.iter().map(|f| format!("  {f}")));
        }
        out
    }
}

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// The next doorbell on `peer`; joins and leaves (the churn) are skipped, except the leave of
/// `partner` (an honest peer dropped).
fn next_doorbell(peer: &mut Peer, partner: u16) -> anyhow::Result<()> {
    loop {
        match peer.wait(WAIT)? {
            Some(Event::Doorbell { .. }) => return Ok(()),
            Some(Event::Peer(PeerEvent::Left { id })) if id == partner => {
                bail!("the server reported peer {id} gone while it was ringing")
            }
            Some(Event::Peer(_)) => {}
            Some(other) => bail!("unexpected event {other:?} (an honest peer dropped?)"),
            None => bail!("no doorbell within 10 s"),
        }
    }
}

/// Two peers of `hub` that know each other, made before the rest of the load starts: with
/// peers coming and going, `b`'s id may be one that `a` still holds for a peer whose leave it
/// has not read yet.
fn doorbell_pair(layout: &Layout) -> anyhow::Result<(Peer, Peer)> {
    let mut a = Peer::connect(&layout.hub(), ConnectOptions::default())?;
    let b = Peer::connect(&layout.hub(), ConnectOptions::default())?;
    let (a_id, b_id) = (a.id(), b.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.peer_vectors(b_id) != Some(2) {
        if Instant::now() > deadline {
            bail!("peer {a_id} never heard of peer {b_id}'s 2 vectors");
        }
        a.wait(Some(Duration::from_millis(50)))?;
    }
    Ok((a, b))
}

/// The two peers ring each other.
fn doorbells((mut a, mut b): (Peer, Peer), tally: &Tally, switch: &Switch) -> anyhow::Result<()> {
    let (a_id, b_id) = (a.id(), b.id());
    let mut n = 0u64;
    while switch.go() {
        a.notify(b_id, 1)?;
        next_doorbell(&mut b, a_id)?;
        b.notify(a_id, 0)?;
        next_doorbell(&mut a, b_id)?;
        Tally::count(&tally.round_trips);
        n += 1;
        // Unpaced, the ping-pong takes both cores and the rest of the load (the server
        // included) crawls: a millisecond's pause every DOORBELL_BURST round trips.
        if n % DOORBELL_BURST == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

/// Peers join `hub` and leave.
fn churn(layout: &Layout, tally: &Tally, switch: &Switch) -> anyhow::Result<()> {
    while switch.go() {
        let peer = Peer::connect(&layout.hub(), ConnectOptions::default())?;
        full_vectors(peer)?;
        Tally::count(&tally.joins);
        // Unpaced, thousands of joins a second on two cores starve the honest peers of CPU
        // until they are more than `max_queued_messages` behind and dropped (the server's
        // policy for a peer that does not keep up): a soak is about staying flat for long.
        std::thread::sleep(CHURN_PAUSE);
    }
    Ok(())
}

/// Waits until `peer` has its 2 vectors: a server busier than the client's settle time sends
/// the last ones after [`Peer::connect`] has returned (they are added as they come).
fn full_vectors(mut peer: Peer) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while peer.vectors() < 2 {
        if Instant::now() > deadline {
            bail!(
                "a joining peer got {} vectors in 10 s, not 2",
                peer.vectors()
            );
        }
        peer.wait(Some(Duration::from_millis(100)))?;
    }
    if peer.vectors() != 2 {
        bail!("a joining peer got {} vectors, not 2", peer.vectors());
    }
    Ok(())
}

/// One request line, one answer line, on a fresh connection.
fn exchange(socket: &Path, request: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    let mut line = Vec::new();
    BufReader::new(stream).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        bail!("no answer from {}", socket.display());
    }
    Ok(line)
}

fn factory_request(layout: &Layout, request: &FactoryRequest) -> anyhow::Result<FactoryResponse> {
    let line = exchange(&layout.factory(), &encode_line(request))?;
    Ok(decode_line(&line)?)
}

/// Creates through the factory, joins half of what it made, and finds `hub`.
fn factory(layout: &Layout, tally: &Tally, switch: &Switch) -> anyhow::Result<()> {
    let mut n = 0u64;
    while switch.go() {
        n += 1;
        let name = format!("soak{}", n % (2 * QUOTA as u64));
        let answer = factory_request(
            layout,
            &FactoryRequest::Create {
                name: name.clone(),
                size: 65536,
            },
        )?;
        match answer.status {
            GuestShmStatus::Ok => {
                Tally::count(&tally.creates);
                if n % 2 == 0 {
                    let socket = answer
                        .region
                        .as_ref()
                        .map(|r| PathBuf::from(&r.socket))
                        .context("an OK answer without its region")?;
                    // Joining and leaving makes the region go with its last peer.
                    full_vectors(Peer::connect(&socket, ConnectOptions::default())?)?;
                    Tally::count(&tally.joins);
                }
            }
            GuestShmStatus::NoMem if answer.message.contains("max_regions") => {
                Tally::count(&tally.quota_refusals);
                std::thread::sleep(Duration::from_millis(20));
            }
            other => bail!("create {name}: {other}: {}", answer.message),
        }
        let found = factory_request(layout, &FactoryRequest::Find { name: "hub".into() })?;
        if found.status != GuestShmStatus::Ok {
            bail!("find hub: {}: {}", found.status, found.message);
        }
        Tally::count(&tally.finds);
    }
    Ok(())
}

fn control(layout: &Layout, request: &ControlRequest) -> anyhow::Result<ControlResult> {
    let line = exchange(&layout.control(), &encode_line(request))?;
    let response: ControlResponse = decode_line(&line)?;
    match (response.ok, response.result) {
        (true, Some(result)) => Ok(result),
        _ => bail!("{request:?}: {}", response.error.unwrap_or_default()),
    }
}

/// Reloads with and without the second VM, and reads the counters.
fn reloads(layout: &Layout, tally: &Tally, switch: &Switch) -> anyhow::Result<()> {
    let mut spare = false;
    while switch.go() {
        spare = !spare;
        layout.write_config(spare)?;
        match control(layout, &ControlRequest::Reload)? {
            ControlResult::Reloaded { .. } => Tally::count(&tally.reloads),
            other => bail!("reload answered {other:?}"),
        }
        // Once the doorbell peers are ringing, they are always there.
        let ringing = tally.round_trips.load(Ordering::Relaxed) > 0;
        match control(layout, &ControlRequest::Stats)? {
            ControlResult::Stats { stats } if stats.peers_connected >= 2 || !ringing => {
                Tally::count(&tally.stats);
            }
            other => bail!("stats answered {other:?} (the doorbell peers are gone?)"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    layout.write_config(false)?;
    control(layout, &ControlRequest::Reload)?;
    Ok(())
}

/// Bad clients, in turn: on `hub`, garbage writers, never-readers, half handshakes and readers
/// that stop; on the factory socket, a garbage line, an endless line and a client that sends
/// requests and never reads its answers; on the control socket, a garbage line.
fn bad_peers(layout: &Layout, tally: &Tally, switch: &Switch) -> anyhow::Result<()> {
    let mut kind = 0u64;
    while switch.go() {
        kind += 1;
        match kind % 8 {
            0..=3 => bad_hub_peer(layout, kind)?,
            // Not JSON: an answer that says so (a refusal), on the factory and control sockets.
            4 => {
                let answer: FactoryResponse =
                    decode_line(&exchange(&layout.factory(), b"{not json\n")?)?;
                if answer.status == GuestShmStatus::Ok {
                    bail!("the factory accepted a garbage line: {answer:?}");
                }
            }
            5 => {
                let answer: ControlResponse =
                    decode_line(&exchange(&layout.control(), b"{\"op\": \"nonsense\"}\n")?)?;
                if answer.ok {
                    bail!("the control socket accepted a garbage request: {answer:?}");
                }
            }
            // A line past the factory's limit: an answer that refuses it, or the connection closed.
            6 => {
                let mut stream = UnixStream::connect(layout.factory())?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.set_write_timeout(Some(Duration::from_secs(10)))?;
                let endless = vec![b'x'; ivshm_proto::factory::MAX_LINE + 4096];
                // The server may close before reading it all.
                let _ = stream
                    .write_all(&endless)
                    .and_then(|()| stream.write_all(b"\n"));
                let mut line = Vec::new();
                let _ = BufReader::new(&stream).read_until(b'\n', &mut line);
                if !line.is_empty() {
                    let answer: FactoryResponse = decode_line(&line)?;
                    if answer.status == GuestShmStatus::Ok {
                        bail!("the factory accepted an endless line: {answer:?}");
                    }
                }
            }
            // Requests whose answers are never read, then gone.
            _ => {
                let mut stream = UnixStream::connect(layout.factory())?;
                stream.set_write_timeout(Some(Duration::from_millis(200)))?;
                let find = encode_line(&FactoryRequest::Find { name: "hub".into() });
                for _ in 0..1000 {
                    if stream.write_all(&find).is_err() {
                        break; // the server stopped reading us or closed: what it should do
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Tally::count(&tally.bad_peers);
    }
    Ok(())
}

/// One bad v0 peer of `hub` (`kind % 4`).
fn bad_hub_peer(layout: &Layout, kind: u64) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(layout.hub())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    match kind % 4 {
        // Writes garbage: the server must close the connection (after the messages it had
        // already sent).
        0 => {
            stream.write_all(b"not a v0 peer: peers never write")?;
            let mut rest = Vec::new();
            match stream.read_to_end(&mut rest) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => bail!("a garbage writer was not closed: {e}"),
            }
        }
        // Never reads.
        1 => std::thread::sleep(Duration::from_millis(200)),
        // Half a handshake: the version and the id, then gone.
        2 => {
            let mut first = [0u8; 16];
            stream.read_exact(&mut first)?;
        }
        // Reads its first message, then holds on.
        _ => {
            let mut first = [0u8; 8];
            stream.read_exact(&mut first)?;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: u64, fds: usize, rss: u64) -> Sample {
        Sample {
            at: Duration::from_secs(at),
            fds: Some(fds),
            rss: Some(rss),
        }
    }

    #[test]
    fn counters_that_do_not_add_up_fail() {
        let stats = |joins, leaves, drops, peers_connected| StatsReport {
            joins,
            leaves,
            drops,
            peers_connected,
            ..StatsReport::default()
        };
        assert!(check_counters(&stats(100, 90, 10, 0), 80).is_empty());
        // Someone is still connected, a join never ended, fewer joins than the soak made.
        assert_eq!(check_counters(&stats(100, 89, 10, 1), 80).len(), 2);
        assert_eq!(check_counters(&stats(100, 89, 10, 0), 80).len(), 1);
        assert_eq!(check_counters(&stats(100, 90, 10, 0), 101).len(), 1);
    }

    #[test]
    fn growth_past_the_bounds_fails_and_noise_does_not() {
        // A reload's VM comes and goes; memory moves a little.
        let flat: Vec<Sample> = [40, 42, 40, 44, 42, 40]
            .iter()
            .zip(0..)
            .map(|(&fds, i)| sample(i, fds, (8 << 20) + i * 4096))
            .collect();
        assert!(check_growth(&flat, Some(10), Some(14)).is_empty());
        let leaking: Vec<Sample> = (0..6)
            .map(|i| sample(i, 40 + 3 * i as usize, 8 << 20))
            .collect();
        let failures = check_growth(&leaking, Some(10), Some(15));
        // The lulls at 6, 9, 12 and 15 fds past the first; the idle server.
        assert_eq!(failures.len(), 5, "{failures:?}");
        assert!(failures[0].contains("46 in the one at 2 s"), "{failures:?}");
        let bloating: Vec<Sample> = (0..6)
            .map(|i| sample(i, 40, (8 << 20) + (i << 21)))
            .collect();
        let failures = check_growth(&bloating, None, None);
        // 4 MiB of slack: the lulls at 6, 8 and 10 MiB more.
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert!(failures[0].starts_with("memory grew"), "{failures:?}");
    }
}
