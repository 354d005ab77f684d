//! `ivshm chan ...` (a host peer of a server) and the channel half of `ivshm guest chan ...`
//! (a guest's ivshmem device): message channels over the region (`ivshm-channel`), with the
//! same flags and output on both sides (see `docs/cli.md`).
//!
//! A command opens the region as the channel library does (formatting it with the defaults if
//! it is blank), opens the named channel, does its job, and closes its side. Status lines and
//! received messages go to stdout, one line each, flushed (as `ivshm listen` does).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use ivshm_channel::traffic::{exchange, Exchange};
use ivshm_channel::{
    Channel, ChannelError, ChannelInfo, ChannelOptions, Doorbell, FormatOptions, PeerStatus,
    Region, RegionError, RegionMemory, SideInfo,
};
use ivshm_client::{ConnectOptions, Peer, PeerDoorbell, PeerEvent};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::host::{hex_encode, line, SocketArgs};
use crate::args::{self, channel_name, ring_size};

/// Host channel commands (`ivshm chan ...`), as a peer of the server at `--socket`.
#[derive(Subcommand, Debug)]
pub enum ChanCommand {
    /// Format the region for channels (destroys the channels of a formatted one with --force).
    Init(HostInitArgs),
    /// List the region's channels and their sides.
    List(HostListArgs),
    /// Send messages on a channel: the arguments, or the lines of stdin.
    Send(HostSendArgs),
    /// Receive messages from a channel and print one line each.
    Recv(HostRecvArgs),
    /// Checked traffic both ways on channels (numbered, checksummed messages; for tests).
    #[command(hide = true)]
    Exchange(HostExchangeArgs),
}

/// What `init` formats.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Channels the directory holds, 1..=65536.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub channels: u32,
    /// The largest ring size wanted (bytes, K/M/G); the largest power of two at most this that
    /// lets every channel fit the region is used. Default 1M.
    #[arg(long, value_name = "SIZE", value_parser = ring_size)]
    pub ring_size: Option<u32>,
    /// Format even if the region is formatted already (its channels are destroyed).
    #[arg(long)]
    pub force: bool,
}

/// What `list` shows.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only channels with this peer on a side.
    #[arg(long, value_name = "ID")]
    pub peer: Option<u16>,
}

/// The channel a command uses, and its bounds.
#[derive(Args, Debug)]
pub struct ChannelArgs {
    /// The channel's name (1 to 31 bytes): both ends open the same name.
    #[arg(long, value_parser = channel_name)]
    pub name: String,
    /// Fail unless the other end is this peer id.
    #[arg(long, value_name = "ID")]
    pub peer: Option<u16>,
    /// Our doorbell vector for this channel (the other end rings it).
    #[arg(long, value_name = "V", default_value_t = 0)]
    pub vector: u16,
    /// Stop after this many messages. Without it, `send` sends every message given and `recv`
    /// runs until the other end closes.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Fail (exit 1) if the command has not finished within this many seconds. Without it,
    /// the command waits as long as it takes.
    #[arg(long, value_name = "SECONDS", value_parser = args::seconds)]
    pub timeout: Option<Duration>,
}

/// `send`'s messages.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The channel.
    #[command(flatten)]
    pub channel: ChannelArgs,
    /// Messages: text, or `@FILE` for a file's contents. None: each line of stdin is one
    /// message (empty lines are skipped). With `--count N`, N messages, the given ones repeated
    /// in turn.
    #[arg(value_name = "MESSAGE|@FILE")]
    pub messages: Vec<String>,
}

/// How `recv` prints a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `message len=<L> data=<text>`, bytes outside printable ASCII escaped (`\n`, `\\`, `\xNN`).
    Text,
    /// `message len=<L> hex=<lowercase hex>`.
    Hex,
    /// The payloads only, back to back (status lines go to stderr).
    Raw,
}

/// `recv`'s output.
#[derive(Args, Debug)]
pub struct RecvArgs {
    /// The channel.
    #[command(flatten)]
    pub channel: ChannelArgs,
    /// How to print each message.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write each message to a file `DIR/<n>` (n from 1) instead, and print
    /// `message len=<L> file=<path>`.
    #[arg(long, value_name = "DIR", conflicts_with = "format")]
    pub out_dir: Option<PathBuf>,
}

/// The hidden `exchange`: checked traffic on channels (`ivshm_channel::traffic`).
#[derive(Args, Debug)]
pub struct ExchangeArgs {
    /// A channel (repeat for several, each exchanged in its own threads at once).
    #[arg(long = "name", value_name = "NAME", value_parser = channel_name, required = true)]
    pub names: Vec<String>,
    /// Messages each way on each channel (without it, 1000).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub count: u64,
    /// The longest message (capped at the channel's largest).
    #[arg(long, default_value = "64K", value_parser = args::offset)]
    pub max_len: usize,
    /// Bound on each blocking send or receive (without it, 60 seconds).
    #[arg(long, value_name = "SECONDS", value_parser = args::seconds, default_value = "60")]
    pub timeout: Duration,
    /// Count messages that do not verify and go on (only channel errors end the exchange).
    #[arg(long)]
    pub tolerate_damage: bool,
}

/// `ivshm chan init`.
#[derive(Args, Debug)]
pub struct HostInitArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    init: InitArgs,
}

/// `ivshm chan list`.
#[derive(Args, Debug)]
pub struct HostListArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    list: ListArgs,
}

/// `ivshm chan send`.
#[derive(Args, Debug)]
pub struct HostSendArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    send: SendArgs,
}

/// `ivshm chan recv`.
#[derive(Args, Debug)]
pub struct HostRecvArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    recv: RecvArgs,
}

/// `ivshm chan exchange`.
#[derive(Args, Debug)]
pub struct HostExchangeArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    exchange: ExchangeArgs,
}

/// Runs one `ivshm chan` command.
pub fn run(c: ChanCommand) -> anyhow::Result<()> {
    match c {
        ChanCommand::Init(a) => {
            let host = HostEnd::connect(&a.socket)?;
            init(&host.end(), &a.init)
        }
        ChanCommand::List(a) => {
            let host = HostEnd::connect(&a.socket)?;
            list(&host.end(), &a.list)
        }
        ChanCommand::Send(a) => {
            let host = HostEnd::connect_with(&a.socket, a.send.channel.timeout)?;
            let region = host.open()?;
            let _watch = host.watch_leaves(&region);
            send(&host.end(), &region, &a.send)
        }
        ChanCommand::Recv(a) => {
            let host = HostEnd::connect_with(&a.socket, a.recv.channel.timeout)?;
            let region = host.open()?;
            let _watch = host.watch_leaves(&region);
            recv(&host.end(), &region, &a.recv)
        }
        ChanCommand::Exchange(a) => {
            let host = HostEnd::connect(&a.socket)?;
            let region = host.open()?;
            let _watch = host.watch_leaves(&region);
            run_exchange(&host.end(), &region, &a.exchange)
        }
    }
}

/// What every command needs of its end: the doorbell, the memory, and how to say who it is.
pub struct End<M: RegionMemory + Clone> {
    /// Our doorbell.
    pub doorbell: Arc<dyn Doorbell>,
    /// The region's memory.
    pub memory: M,
    /// The region's size in bytes.
    pub size: u64,
}

impl<M: RegionMemory + Clone> End<M> {
    /// `self id=<ID> vectors=<N> size=<BYTES>`, as `ivshm listen` and `ivshm guest wait` print.
    fn self_line(&self) -> String {
        format!(
            "self id={} vectors={} size={}",
            self.doorbell.own_id(),
            self.doorbell.vectors(),
            self.size
        )
    }

    /// Opens the region, formatting it with the defaults if it is blank.
    pub fn open(&self) -> anyhow::Result<Region> {
        Region::open_or_format(
            self.memory.clone(),
            self.doorbell.clone(),
            FormatOptions::default(),
        )
        .context("opening the channel region")
    }
}

/// A host peer of the server as a command's end.
pub(crate) struct HostEnd {
    pub(crate) doorbell: Arc<PeerDoorbell>,
    memory: Arc<ivshm_mem::Mapping>,
    size: u64,
}

/// A shared mapping as region memory for several opens.
#[derive(Debug, Clone)]
pub struct SharedMapping(Arc<ivshm_mem::Mapping>);

// SAFETY: an `ivshm_mem::Mapping` keeps its address and length while it lives (the `Arc`
// keeps it alive), `mmap` returns page-aligned memory, and it hands out only `SharedView`s.
unsafe impl RegionMemory for SharedMapping {
    fn view(&self) -> ivshm_mem::SharedView<'_> {
        self.0.view()
    }
}

impl HostEnd {
    pub(crate) fn connect(socket: &SocketArgs) -> anyhow::Result<HostEnd> {
        Self::connect_with(socket, None)
    }

    fn connect_with(socket: &SocketArgs, timeout: Option<Duration>) -> anyhow::Result<HostEnd> {
        let mut opts = ConnectOptions::default();
        if let Some(t) = timeout {
            opts.timeout = opts.timeout.min(t);
        }
        let peer = Peer::connect(&socket.socket, opts).with_context(|| {
            format!(
                "cannot join the ivshmem server at {}",
                socket.socket.display()
            )
        })?;
        let memory = peer.map().context("mapping the shared region")?;
        let size = peer.shm_size();
        Ok(HostEnd {
            doorbell: Arc::new(PeerDoorbell::new(peer)?),
            memory: Arc::new(memory),
            size,
        })
    }

    pub(crate) fn end(&self) -> End<SharedMapping> {
        End {
            doorbell: self.doorbell.clone(),
            memory: SharedMapping(self.memory.clone()),
            size: self.size,
        }
    }

    fn open(&self) -> anyhow::Result<Region> {
        self.end().open()
    }

    /// Marks the channels of peers the server reports gone, from a thread that reads the
    /// server socket while the command runs (for servers that do not mark them themselves).
    fn watch_leaves(&self, region: &Region) -> LeaveWatcher {
        LeaveWatcher::start(self.doorbell.clone(), region.clone())
    }
}

/// Reads the server's messages while a command runs and marks the channel sides of peers
/// that left (`Region::peer_left`). A leave followed by a join of the same id in what was read
/// is skipped: the id belongs to a new peer by then.
struct LeaveWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The ids of `events` that left and did not join again later in the list
/// ([`PeerEvent::departed`]).
pub(crate) fn departed(events: &[PeerEvent]) -> Vec<u16> {
    PeerEvent::departed(events)
}

impl LeaveWatcher {
    fn start(doorbell: Arc<PeerDoorbell>, region: Region) -> LeaveWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let Ok(socket) = doorbell.socket_fd() else {
                return;
            };
            let tick = Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            while !flag.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(&socket, PollFlags::IN)];
                match poll(&mut fds, Some(&tick)) {
                    Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                    Ok(_) => {}
                    Err(_) => return,
                }
                let Ok(events) = doorbell.process_server_messages() else {
                    // The server went away: nobody will report leaves any more.
                    return;
                };
                for id in departed(&events) {
                    match region.peer_left(id) {
                        Ok(marked) => tracing::debug!(peer = id, marked, "peer left"),
                        Err(e) => {
                            tracing::warn!(peer = id, "marking the channels of peer {id}: {e}");
                        }
                    }
                }
            }
        });
        LeaveWatcher {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LeaveWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The line describing the region's layout (`init` and `list` print it).
fn region_line(region: &Region) -> String {
    let g = region.geometry();
    format!(
        "region channels={} ring_size={} max_message={} layout_size={}",
        g.channels,
        g.ring_size,
        g.max_message(),
        g.layout_size()
    )
}

/// `ivshm chan init` / `ivshm guest chan init`.
pub fn init<M: RegionMemory + Clone>(end: &End<M>, a: &InitArgs) -> anyhow::Result<()> {
    line(format_args!("{}", end.self_line()))?;
    match Region::open(end.memory.clone(), end.doorbell.clone()) {
        Ok(region) if !a.force => bail!(
            "the region is formatted already ({}); --force formats it again and destroys its channels",
            region_line(&region).trim_start_matches("region ")
        ),
        Ok(_) | Err(RegionError::NotFormatted) => {}
        Err(e) if a.force => tracing::debug!("formatting over an invalid header: {e}"),
        Err(e) => {
            return Err(e).context(
                "the region holds something else than an empty or channel layout; --force formats it",
            )
        }
    }
    let format = FormatOptions {
        channels: a.channels,
        ring_size_max: a
            .ring_size
            .unwrap_or(FormatOptions::default().ring_size_max),
    };
    let region = Region::format(end.memory.clone(), end.doorbell.clone(), format)
        .context("formatting the region")?;
    line(format_args!("{}", region_line(&region)))
}

fn side_text(side: &SideInfo) -> String {
    match side.state {
        "empty" => "empty".to_string(),
        state => format!("{state}:{}:{}", side.peer, side.vector),
    }
}

fn channel_line(c: &ChannelInfo) -> String {
    format!(
        "channel name={} index={} side_a={} side_b={}",
        escape(&c.name),
        c.index,
        side_text(&c.a),
        side_text(&c.b)
    )
}

/// `ivshm chan list` / `ivshm guest chan list`.
pub fn list<M: RegionMemory + Clone>(end: &End<M>, a: &ListArgs) -> anyhow::Result<()> {
    line(format_args!("{}", end.self_line()))?;
    let region = match Region::open(end.memory.clone(), end.doorbell.clone()) {
        Ok(region) => region,
        Err(RegionError::NotFormatted) => return line(format_args!("region unformatted")),
        Err(e) => return Err(e).context("reading the channel region"),
    };
    line(format_args!("{}", region_line(&region)))?;
    let on_side = |s: &SideInfo, p: u16| s.state != "empty" && s.peer == p;
    for c in region.channels().context("reading the channel directory")? {
        if a.peer
            .is_some_and(|p| !on_side(&c.a, p) && !on_side(&c.b, p))
        {
            continue;
        }
        line(format_args!("{}", channel_line(&c)))?;
    }
    Ok(())
}

/// A command's deadline from `--timeout`.
struct Deadline {
    at: Option<Instant>,
    timeout: Option<Duration>,
}

impl Deadline {
    fn new(timeout: Option<Duration>) -> Deadline {
        Deadline {
            at: timeout.and_then(|t| Instant::now().checked_add(t)),
            timeout,
        }
    }

    fn left(&self) -> Option<Duration> {
        self.at.map(|d| d.saturating_duration_since(Instant::now()))
    }

    fn seconds(&self) -> f64 {
        self.timeout.map_or(0.0, |t| t.as_secs_f64())
    }
}

/// Opens `a.name` and prints `channel name=<N> side=<a|b>`.
fn open_channel(region: &Region, a: &ChannelArgs, out: &Out) -> anyhow::Result<Channel> {
    let opts = ChannelOptions {
        vector: a.vector,
        ..ChannelOptions::default()
    };
    let channel = region
        .channel(&a.name, opts)
        .with_context(|| format!("opening channel {:?}", a.name))?;
    let side = match channel.side() {
        ivshm_channel::Side::A => "a",
        ivshm_channel::Side::B => "b",
    };
    out.status(format_args!(
        "channel name={} side={side}",
        escape(a.name.as_bytes())
    ))?;
    Ok(channel)
}

/// Checks the other end against `--peer` once it is there (printing `peer id=<P>` once);
/// `Ok(true)` once it joined, `Ok(false)` before; `closed_ok`: a closed other end counts as
/// joined (it left its messages), else it is an error, as a departed one always is.
fn check_peer(
    channel: &Channel,
    a: &ChannelArgs,
    told: &mut bool,
    out: &Out,
    closed_ok: bool,
) -> anyhow::Result<bool> {
    let context = || format!("channel {:?}", a.name);
    let peer = match channel.peer_status().with_context(context)? {
        PeerStatus::NotJoined => return Ok(false),
        PeerStatus::Attached(peer) => peer,
        PeerStatus::Closed(peer) if closed_ok => peer,
        PeerStatus::Closed(_) => return Err(ChannelError::PeerClosed).with_context(context),
        PeerStatus::Gone(peer) => {
            return Err(ChannelError::PeerGone { peer }).with_context(context)
        }
    };
    if let Some(want) = a.peer {
        if peer != want {
            bail!(
                "channel {:?} is open at peer {peer}, not at peer {want} (--peer)",
                a.name
            );
        }
    }
    if !*told {
        *told = true;
        out.status(format_args!("peer id={peer}"))?;
    }
    Ok(true)
}

/// Where status lines go: stdout, or stderr when stdout carries raw payloads.
struct Out {
    raw: bool,
}

impl Out {
    fn status(&self, text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
        if self.raw {
            eprintln!("{text}");
            Ok(())
        } else {
            line(text)
        }
    }
}

/// The message of a failed channel operation, for the user.
fn channel_failure(e: ChannelError, what: &str, done: u64, deadline: &Deadline) -> anyhow::Error {
    match e {
        ChannelError::Timeout => anyhow::anyhow!(
            "timed out after {} s: {what} {done} message(s)",
            deadline.seconds()
        ),
        e => anyhow::Error::new(e).context(format!("after {what} {done} message(s)")),
    }
}

/// The messages `send` sends, in order.
fn messages(a: &SendArgs) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<Vec<u8>>>>> {
    if a.messages.is_empty() {
        let lines = std::io::stdin()
            .lock()
            .split(b'\n')
            .map(|l| {
                l.map(|mut l| {
                    if l.last() == Some(&b'\r') {
                        l.pop();
                    }
                    l
                })
                .context("reading stdin")
            })
            .filter(|l| !matches!(l, Ok(l) if l.is_empty()));
        let limit = a.channel.count.unwrap_or(u64::MAX);
        return Ok(Box::new(
            lines.take(usize::try_from(limit).unwrap_or(usize::MAX)),
        ));
    }
    let given = a
        .messages
        .iter()
        .map(|m| match m.strip_prefix('@') {
            Some(file) => std::fs::read(file).with_context(|| format!("reading {file}")),
            None => Ok(m.clone().into_bytes()),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(empty) = given.iter().position(Vec::is_empty) {
        bail!(
            "message {} ({:?}) is empty: messages carry at least one byte",
            empty + 1,
            a.messages[empty]
        );
    }
    let count = a.channel.count.unwrap_or(given.len() as u64);
    Ok(Box::new(
        given
            .into_iter()
            .cycle()
            .take(usize::try_from(count).unwrap_or(usize::MAX))
            .map(Ok),
    ))
}

/// `ivshm chan send` / `ivshm guest chan send`: prints the `self` and `channel` lines, then
/// `sent len=<L>` per message; waits (within `--timeout`) until the other end has joined, so
/// that what it sent is there for it after it closes its side.
pub fn send<M: RegionMemory + Clone>(
    end: &End<M>,
    region: &Region,
    a: &SendArgs,
) -> anyhow::Result<()> {
    let deadline = Deadline::new(a.channel.timeout);
    let out = Out { raw: false };
    let to_send = messages(a)?;
    out.status(format_args!("{}", end.self_line()))?;
    let mut channel = open_channel(region, &a.channel, &out)?;
    let mut told = false;
    let mut sent = 0u64;
    for message in to_send {
        let message = message?;
        check_peer(&channel, &a.channel, &mut told, &out, false)?;
        channel
            .send(&message, deadline.left())
            .map_err(|e| channel_failure(e, "sent", sent, &deadline))?;
        sent += 1;
        out.status(format_args!("sent len={}", message.len()))?;
    }
    // The other end must have joined before we close: a channel nobody joined is freed when
    // its creator closes, with what it holds.
    let mut pause = Duration::from_millis(1);
    while !check_peer(&channel, &a.channel, &mut told, &out, true)? {
        if deadline.left().is_some_and(|l| l.is_zero()) {
            bail!(
                "timed out after {} s: nobody opened channel {:?} to take the {sent} message(s) sent",
                deadline.seconds(),
                a.channel.name
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

/// Escapes bytes for a text line: printable ASCII but `\` as is, `\\`, `\n`, `\r`, `\t`,
/// everything else `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

/// `ivshm chan recv` / `ivshm guest chan recv`: prints the `self` and `channel` lines, then one
/// line per message (`--format`, `--out-dir`); ends after `--count` messages, or with `closed`
/// when the other end closed (exit 0), or with an error when it left or the time ran out.
pub fn recv<M: RegionMemory + Clone>(
    end: &End<M>,
    region: &Region,
    a: &RecvArgs,
) -> anyhow::Result<()> {
    let deadline = Deadline::new(a.channel.timeout);
    let raw = a.out_dir.is_none() && a.format == Format::Raw;
    let out = Out { raw };
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    out.status(format_args!("{}", end.self_line()))?;
    let mut channel = open_channel(region, &a.channel, &out)?;
    let mut told = false;
    let mut got = 0u64;
    let mut buf = Vec::new();
    while a.channel.count.is_none_or(|k| got < k) {
        check_peer(&channel, &a.channel, &mut told, &out, true)?;
        match channel.recv(&mut buf, deadline.left()) {
            Ok(_) => {}
            Err(ChannelError::PeerClosed) if a.channel.count.is_none() => {
                return out.status(format_args!("closed"));
            }
            Err(ChannelError::PeerClosed) => bail!(
                "the other end closed channel {:?} after {got} of {} message(s)",
                a.channel.name,
                a.channel.count.unwrap_or_default()
            ),
            Err(e) => return Err(channel_failure(e, "received", got, &deadline)),
        }
        got += 1;
        check_peer(&channel, &a.channel, &mut told, &out, true)?;
        if let Some(dir) = &a.out_dir {
            let path = dir.join(got.to_string());
            std::fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
            line(format_args!(
                "message len={} file={}",
                buf.len(),
                path.display()
            ))?;
            continue;
        }
        match a.format {
            Format::Text => line(format_args!(
                "message len={} data={}",
                buf.len(),
                escape(&buf)
            ))?,
            Format::Hex => line(format_args!(
                "message len={} hex={}",
                buf.len(),
                hex_encode(&buf)
            ))?,
            Format::Raw => {
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(&buf)
                    .and_then(|()| stdout.flush())
                    .context("writing to stdout")?;
            }
        }
    }
    Ok(())
}

/// The hidden `exchange`: every channel of `a.names` at once, each in two threads
/// (`ivshm_channel::traffic::exchange`); prints `channel ...` lines once all are open, then one
/// `exchanged ...` line per channel; fails on the first channel that failed.
pub fn run_exchange<M: RegionMemory + Clone>(
    end: &End<M>,
    region: &Region,
    a: &ExchangeArgs,
) -> anyhow::Result<()> {
    let vectors = end.doorbell.vectors().max(1);
    let out = Out { raw: false };
    let mut channels = Vec::new();
    for (i, name) in a.names.iter().enumerate() {
        let args = ChannelArgs {
            name: name.clone(),
            peer: None,
            vector: (i % usize::from(vectors)) as u16,
            count: None,
            timeout: None,
        };
        channels.push(open_channel(region, &args, &out)?);
    }
    let ex = Exchange {
        count: a.count,
        max_len: a.max_len,
        timeout: Some(a.timeout),
        tolerate_damage: a.tolerate_damage,
    };
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = channels
            .into_iter()
            .map(|c| {
                let name = c.name().to_string();
                (name, s.spawn(move || exchange(c, &ex)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| (name, h.join()))
            .collect()
    });
    let mut first_error = None;
    for (name, result) in results {
        match result {
            Ok(Ok(r)) => line(format_args!(
                "exchanged name={} sent={} received={} damaged={} sent_bytes={} received_bytes={} seconds={:.3}",
                escape(name.as_bytes()),
                r.sent,
                r.received,
                r.damaged,
                r.sent_bytes,
                r.received_bytes,
                r.elapsed.as_secs_f64()
            ))?,
            Ok(Err(e)) => {
                let e = anyhow::Error::new(e).context(format!("channel {name:?}"));
                eprintln!("error: {}", crate::report::one_line(&e));
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("channel {name:?}: exchange panicked"));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_is_not_printable() {
        assert_eq!(escape(b"hi there"), "hi there");
        assert_eq!(escape(b"a\\b\nc\td\r"), "a\\\\b\\nc\\td\\r");
        assert_eq!(escape(&[0, 0x7f, 0xc3, 0xa9]), "\\x00\\x7f\\xc3\\xa9");
    }

    #[test]
    fn a_leave_followed_by_a_join_of_the_same_id_is_not_marked() {
        let events = [
            PeerEvent::Left { id: 3 },
            PeerEvent::Left { id: 4 },
            PeerEvent::Joined { id: 3, vectors: 1 },
            PeerEvent::Left { id: 5 },
        ];
        assert_eq!(departed(&events), [4, 5]);
    }

    #[test]
    fn ring_sizes_and_names_are_checked() {
        assert_eq!(ring_size("64K"), Ok(65536));
        ring_size("64").unwrap_err();
        ring_size("4G").unwrap_err();
        channel_name("").unwrap_err();
        channel_name(&"x".repeat(32)).unwrap_err();
        assert_eq!(channel_name("demo").unwrap(), "demo");
    }
}
