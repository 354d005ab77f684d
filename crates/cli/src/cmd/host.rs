//! Host peer commands (`ivshm peers|notify|listen|read|write`), per `docs/cli.md`.
//!
//! Each command connects to the server as a v0 peer (so other peers see it join and leave, as
//! with QEMU's `ivshmem-client`), does its job and disconnects. Machine-readable output goes to
//! stdout, flushed after every line.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ivshm_client::{ConnectOptions, Event, Peer, PeerEvent};
use ivshm_mem::parse_size;

use crate::args;

/// The socket path QEMU's programs use by default.
pub const DEFAULT_SOCKET: &str = "/tmp/ivshmem_socket";

/// Host peer commands.
#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// List own id, vectors, region size and the other peers with their vectors.
    Peers(PeersArgs),
    /// Ring vector V (or all vectors) of peer N.
    Notify(NotifyArgs),
    /// Print one line per doorbell and per peer join/leave.
    Listen(ListenArgs),
    /// Print bytes of the shared region as hex (or raw).
    Read(ReadArgs),
    /// Write hex bytes or a file's contents into the shared region.
    Write(WriteArgs),
}

/// Where the server is.
#[derive(Args, Debug)]
pub struct SocketArgs {
    /// The server's UNIX socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, value_parser = args::socket_path)]
    pub socket: PathBuf,
}

/// `ivshm peers`.
#[derive(Args, Debug)]
pub struct PeersArgs {
    #[command(flatten)]
    socket: SocketArgs,
}

/// `ivshm notify`.
#[derive(Args, Debug)]
pub struct NotifyArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// The peer id to ring.
    #[arg(long, value_name = "ID")]
    peer: u16,
    /// The vector to ring, or `all` for every vector of the peer.
    #[arg(long, value_name = "V")]
    vector: VectorArg,
}

/// One vector or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorArg {
    /// One vector.
    One(usize),
    /// Every vector of the peer.
    All,
}

impl std::str::FromStr for VectorArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(VectorArg::All);
        }
        s.parse()
            .map(VectorArg::One)
            .map_err(|_| format!("invalid vector {s:?}: expected a number or `all`"))
    }
}

/// `ivshm listen`.
#[derive(Args, Debug)]
pub struct ListenArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Exit 0 after this many event lines (without it: listen until interrupted, or until the
    /// server goes away unless --reconnect).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Fail (exit 1) if `--count` events did not arrive within this many seconds (without
    /// --count: listen this long, then exit 1; without it: no time limit).
    #[arg(long, value_name = "SECONDS", value_parser = args::seconds)]
    timeout: Option<Duration>,
    /// Keep running when the server goes away: print `server gone`, reconnect when it is back,
    /// then print `reconnected` and the `self`/`peer` lines of the new connection.
    #[arg(long)]
    reconnect: bool,
}

/// `ivshm read`.
#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Where to start (bytes; K/M/G suffixes and 0x hex accepted).
    #[arg(long, value_name = "OFFSET", value_parser = parse_size)]
    offset: u64,
    /// How many bytes.
    #[arg(long, value_name = "LEN", value_parser = parse_size)]
    len: u64,
    /// Write the raw bytes instead of hex.
    #[arg(long)]
    raw: bool,
}

/// `ivshm write`.
#[derive(Args, Debug)]
pub struct WriteArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Where to start (bytes; K/M/G suffixes and 0x hex accepted).
    #[arg(long, value_name = "OFFSET", value_parser = parse_size)]
    offset: u64,
    /// Hex bytes (`deadbeef`) or `@FILE` for a file's contents.
    #[arg(value_name = "HEX|@FILE")]
    data: String,
}

/// Runs one host command.
pub fn run(c: HostCommand) -> anyhow::Result<()> {
    match c {
        HostCommand::Peers(a) => peers(&a),
        HostCommand::Notify(a) => notify(&a),
        HostCommand::Listen(a) => listen(&a),
        HostCommand::Read(a) => read(&a),
        HostCommand::Write(a) => write(&a),
    }
}

fn connect(socket: &SocketArgs, timeout: Option<Duration>) -> anyhow::Result<Peer> {
    connect_with(socket, timeout, ConnectOptions::default())
}

fn connect_with(
    socket: &SocketArgs,
    timeout: Option<Duration>,
    mut opts: ConnectOptions,
) -> anyhow::Result<Peer> {
    if let Some(t) = timeout {
        opts.timeout = opts.timeout.min(t);
    }
    Peer::connect(&socket.socket, opts).with_context(|| {
        format!(
            "cannot join the ivshmem server at {}",
            socket.socket.display()
        )
    })
}

/// Writes one line to stdout and flushes it.
pub(crate) fn line(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(text)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn print_self_and_peers(peer: &Peer) -> anyhow::Result<()> {
    line(format_args!(
        "self id={} vectors={} size={}",
        peer.id(),
        peer.vectors(),
        peer.shm_size()
    ))?;
    for id in peer.peer_ids() {
        let vectors = peer.peer_vectors(id).unwrap_or(0);
        line(format_args!("peer id={id} vectors={vectors}"))?;
    }
    Ok(())
}

fn peers(a: &PeersArgs) -> anyhow::Result<()> {
    let peer = connect(&a.socket, None)?;
    print_self_and_peers(&peer)
}

fn notify(a: &NotifyArgs) -> anyhow::Result<()> {
    let peer = connect(&a.socket, None)?;
    let vectors = if a.peer == peer.id() {
        peer.vectors()
    } else {
        peer.peer_vectors(a.peer).with_context(|| {
            format!(
                "peer {} is not connected (peers: {:?})",
                a.peer,
                peer.peer_ids()
            )
        })?
    };
    let targets: Vec<usize> = match a.vector {
        VectorArg::All => (0..vectors).collect(),
        VectorArg::One(v) => vec![v],
    };
    for v in targets {
        peer.notify(a.peer, v)
            .with_context(|| format!("ringing vector {v} of peer {}", a.peer))?;
    }
    Ok(())
}

/// The line `ivshm listen` prints for an event.
fn event_line(event: &Event) -> String {
    match event {
        Event::Doorbell { vector } => format!("doorbell vector={vector}"),
        Event::Peer(PeerEvent::Joined { id, vectors }) => {
            format!("join peer={id} vectors={vectors}")
        }
        Event::Peer(PeerEvent::Left { id }) => format!("leave peer={id}"),
        Event::ServerGone => "server gone".to_string(),
        Event::Reconnected { .. } => "reconnected".to_string(),
    }
}

/// Whether an event line counts towards `--count` (doorbells, joins and leaves do; the
/// connection's own news does not).
fn counts(event: &Event) -> bool {
    matches!(event, Event::Doorbell { .. } | Event::Peer(_))
}

/// The peers `ivshm listen` has told about (a `peer` line or a `join` line), so that each
/// join and leave is printed once: a peer that joins while the connection is being set up is
/// in the `peer` lines already and its queued `Joined` event is no news (nor is a `Left` of a
/// peer that was never told about, one that came and went during the set-up).
#[derive(Debug, Default)]
struct ToldPeers(BTreeSet<u16>);

impl ToldPeers {
    /// The peers of the `peer` lines just printed for `peer`.
    fn listed(peer: &Peer) -> ToldPeers {
        ToldPeers(peer.peer_ids().into_iter().collect())
    }

    /// Whether `event` is news to print, remembering the peers it tells about.
    fn is_news(&mut self, event: &Event) -> bool {
        match event {
            Event::Peer(PeerEvent::Joined { id, .. }) => self.0.insert(*id),
            Event::Peer(PeerEvent::Left { id }) => self.0.remove(id),
            _ => true,
        }
    }
}

fn listen(a: &ListenArgs) -> anyhow::Result<()> {
    let timeout = a.timeout;
    let start = Instant::now();
    let deadline = timeout.and_then(|t| start.checked_add(t));
    let opts = ConnectOptions {
        reconnect: a.reconnect,
        ..ConnectOptions::default()
    };
    let mut peer = connect_with(&a.socket, timeout, opts)?;
    print_self_and_peers(&peer)?;
    let mut told = ToldPeers::listed(&peer);
    let mut seen = 0u64;
    loop {
        if a.count.is_some_and(|k| seen >= k) {
            return Ok(());
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let event = peer.wait(left).context("waiting for events")?;
        match event {
            Some(Event::ServerGone) if !a.reconnect => {
                bail!("the server closed the connection (use --reconnect to wait for it)")
            }
            Some(ev) if told.is_news(&ev) => {
                line(format_args!("{}", event_line(&ev)))?;
                if counts(&ev) {
                    seen += 1;
                }
                if matches!(ev, Event::Reconnected { .. }) {
                    print_self_and_peers(&peer)?;
                    told = ToldPeers::listed(&peer);
                }
            }
            Some(ev) => tracing::debug!(?ev, "already told"),
            None => {
                let secs = timeout.map_or(0.0, |t| t.as_secs_f64());
                match a.count {
                    Some(k) => bail!("timed out after {secs} s: {seen} of {k} events arrived"),
                    None => bail!("timed out after {secs} s"),
                }
            }
        }
    }
}

/// Checks `offset..offset+len` against the region and converts to `usize`.
fn region_range(offset: u64, len: u64, size: u64) -> anyhow::Result<(usize, usize)> {
    let end = offset
        .checked_add(len)
        .with_context(|| format!("offset {offset} + length {len} overflows"))?;
    if end > size {
        bail!("offset {offset} + length {len} is beyond the {size}-byte region");
    }
    Ok((usize::try_from(offset)?, usize::try_from(len)?))
}

fn read(a: &ReadArgs) -> anyhow::Result<()> {
    let peer = connect(&a.socket, None)?;
    let (offset, len) = region_range(a.offset, a.len, peer.shm_size())?;
    let mapping = peer.map().context("mapping the shared region")?;
    let view = mapping.view();
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; len.min(1 << 16)];
    let mut done = 0;
    while done < len {
        let n = buf.len().min(len - done);
        let chunk = &mut buf[..n];
        view.read(offset + done, chunk)?;
        if a.raw {
            out.write_all(chunk)?;
        } else {
            out.write_all(hex_encode(chunk).as_bytes())?;
        }
        done += n;
    }
    if !a.raw {
        out.write_all(b"\n")?;
    }
    out.flush().context("writing to stdout")
}

fn write(a: &WriteArgs) -> anyhow::Result<()> {
    let data = match a.data.strip_prefix('@') {
        Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
        None => hex_decode(&a.data)?,
    };
    let peer = connect(&a.socket, None)?;
    let (offset, _) = region_range(a.offset, data.len() as u64, peer.shm_size())?;
    let mapping = peer.map().context("mapping the shared region")?;
    mapping.view().write(offset, &data)?;
    Ok(())
}

/// Lowercase hex, no separators.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Parses hex bytes (`deadbeef`, optional `0x`, case-insensitive).
pub fn hex_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.len() % 2 != 0 {
        bail!("hex data {text:?} has an odd number of digits");
    }
    let digit = |c: u8| -> anyhow::Result<u8> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => bail!(
                "invalid hex data {text:?}: {:?} is not a hex digit (use @FILE for a file)",
                char::from(c)
            ),
        }
    };
    t.as_bytes()
        .chunks(2)
        .map(|p| Ok((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex_encode(&[0xde, 0xad, 0x00, 0x0f]), "dead000f");
        assert_eq!(hex_decode("DEad000f").unwrap(), vec![0xde, 0xad, 0, 0xf]);
        assert_eq!(hex_decode("0x01").unwrap(), vec![1]);
        assert_eq!(hex_decode("").unwrap(), Vec::<u8>::new());
        hex_decode("abc").unwrap_err();
        hex_decode("zz").unwrap_err();
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(region_range(4, 4, 8).unwrap(), (4, 4));
        region_range(4, 5, 8).unwrap_err();
        region_range(u64::MAX, 2, 8).unwrap_err();
    }

    #[test]
    fn vector_arg_parses() {
        assert_eq!("all".parse::<VectorArg>().unwrap(), VectorArg::All);
        assert_eq!("3".parse::<VectorArg>().unwrap(), VectorArg::One(3));
        "x".parse::<VectorArg>().unwrap_err();
    }
}
