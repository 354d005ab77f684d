//! `ivshm bridge` (a host peer of an ivshm server) and the flags it shares with
//! `ivshm guest bridge`: carry the connections of a TCP or unix address over a channel of the
//! region, to a bridge on the other side (`docs/bridge.md`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::builder::RangedU64ValueParser;
use clap::Args;
use ivshm_bridge::{Address, Bridge, Config, Link, Mode};
use ivshm_channel::{ChannelOptions, FormatOptions, Region};
use ivshm_client::PeerDoorbell;
use ivshm_server::signals::SignalPipes;
use tracing::{info, warn};

use super::chan::{departed, HostEnd};
use super::guest_chan::{with_end, ChanDeviceArgs};
use super::host::SocketArgs;
use crate::args;

/// Most connections one bridge handles at once (`--max-connections`).
pub const MAX_CONNECTIONS: u64 = 1 << 20;

/// What both bridge commands take.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("direction").required(true).args(["listen", "connect"])))]
pub struct BridgeFlags {
    /// The channel's name, the same on both sides (1 to 31 bytes).
    #[arg(long, value_name = "NAME", value_parser = args::channel_name)]
    pub name: String,
    /// Accept connections on ADDR (tcp:HOST:PORT or unix:PATH) and open each on the other side.
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    pub listen: Option<Address>,
    /// Connect to ADDR (tcp:HOST:PORT or unix:PATH) for each connection the other side opens.
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    pub connect: Option<Address>,
    /// Bytes of each connection buffered on this side for its socket: the other side may send
    /// that much before this side grants more (K/M suffixes; 1 to 4G-1).
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = window)]
    pub window: u32,
    /// Connections at once; the listening side refuses more (resets them) with a log line
    /// naming this limit (1 to 1048576).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1024,
        value_parser = RangedU64ValueParser::<u32>::new().range(1..=MAX_CONNECTIONS)
    )]
    pub max_connections: u32,
    /// Send a frame at least this often; the other side is given up (its connections reset)
    /// after four of its intervals without a frame (0.1 to 3600 seconds).
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = keepalive)]
    pub keepalive: Duration,
    /// Own doorbell vector the other side rings for this channel.
    #[arg(long, value_name = "V", default_value_t = 0)]
    pub vector: u16,
    /// Keep polling (no sleep) this many microseconds after the last work: lower latency when
    /// CPUs are spare, worse when they are not (0 to 1000000).
    #[arg(
        long,
        value_name = "MICROS",
        default_value_t = 0,
        value_parser = RangedU64ValueParser::<u64>::new().range(0..=1_000_000)
    )]
    pub spin: u64,
    /// Directory entries when this bridge formats a blank region (ignored once formatted).
    #[arg(
        long,
        value_name = "CHANNELS",
        default_value_t = FormatOptions::default().channels,
        value_parser = RangedU64ValueParser::<u32>::new().range(1..=65536)
    )]
    pub channels: u32,
    /// Largest ring size when this bridge formats a blank region (ignored once formatted).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = args::ring_size)]
    pub ring_size: u32,
}

fn parse_address(s: &str) -> Result<Address, String> {
    s.parse()
        .map_err(|e: ivshm_bridge::AddressError| e.to_string())
}

fn window(s: &str) -> Result<u32, String> {
    let v = ivshm_mem::parse_size(s).map_err(|e| e.to_string())?;
    u32::try_from(v)
        .ok()
        .filter(|&v| v >= 1)
        .ok_or_else(|| format!("{s}: the window is 1 byte to 4294967295 bytes"))
}

fn keepalive(s: &str) -> Result<Duration, String> {
    let d = args::seconds(s)?;
    if (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("{s}: the keepalive is 0.1 to 3600 seconds"))
    }
}

impl BridgeFlags {
    /// How to format a blank region.
    pub fn format(&self) -> FormatOptions {
        FormatOptions {
            channels: self.channels,
            ring_size_max: self.ring_size,
        }
    }

    /// The bridge's configuration (resolves the address).
    pub fn config(&self) -> anyhow::Result<Config> {
        let mode = match (&self.listen, &self.connect) {
            (Some(a), _) => Mode::Listen(a.resolve(true)?),
            (None, Some(a)) => Mode::Connect(a.resolve(false)?),
            (None, None) => anyhow::bail!("--listen or --connect is needed"),
        };
        let mut config = Config::new(&self.name, mode);
        config.window = self.window;
        config.max_connections = self.max_connections;
        config.keepalive = self.keepalive;
        config.spin = Duration::from_micros(self.spin);
        config.channel = ChannelOptions {
            vector: self.vector,
            ..ChannelOptions::default()
        };
        Ok(config)
    }
}

/// Descriptors a bridge needs besides one per connection (epoll, channel, listener, stdio).
const FD_RESERVE: u64 = 64;

/// Raises the soft open-file limit to the hard one (each connection costs this process a
/// descriptor) and warns, naming both limits, when `--max-connections` still does not fit.
fn fit_fd_limit(max_connections: u32) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!("could not raise the open-file limit (RLIMIT_NOFILE): {e}");
        }
    }
    if let Some(n) = getrlimit(Resource::Nofile).current {
        if n < u64::from(max_connections) + FD_RESERVE {
            warn!(
                "--max-connections {max_connections} does not fit this process's open-file limit \
                 (RLIMIT_NOFILE {n}, {FD_RESERVE} kept for the bridge itself): about {} \
                 connections at once; raise it with `ulimit -n`",
                n.saturating_sub(FD_RESERVE)
            );
        }
    }
}

/// Runs a bridge over `link` until SIGINT or SIGTERM.
pub fn run_bridge(link: &dyn Link, flags: &BridgeFlags) -> anyhow::Result<()> {
    let config = flags.config()?;
    fit_fd_limit(config.max_connections);
    let signals = SignalPipes::install().context("installing signal handlers")?;
    let mut bridge = Bridge::new(link, config)?;
    bridge.run(signals.stop_fd())?;
    Ok(())
}

/// `ivshm bridge`.
#[derive(Args, Debug)]
pub struct HostBridgeArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    flags: BridgeFlags,
}

/// A host peer's region: the server's leave messages mark the departed peers' channel sides.
pub struct HostLink {
    doorbell: Arc<PeerDoorbell>,
    socket: OwnedFd,
    region: Region,
}

impl Link for HostLink {
    fn region(&self) -> &Region {
        &self.region
    }

    fn events_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket.as_fd())
    }

    fn process_events(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let events = self.doorbell.process_server_messages()?;
        for id in departed(&events) {
            let marked = self.region.peer_left(id)?;
            info!("peer {id} left the region ({marked} channel side(s) marked gone)");
        }
        Ok(())
    }
}

impl HostLink {
    /// Joins the server at `socket` as a host peer, maps its memory and opens the channel
    /// region in it (formatting it with `format` if it is blank).
    pub fn join(socket: &SocketArgs, format: FormatOptions) -> anyhow::Result<HostLink> {
        let host = HostEnd::connect(socket)?;
        let end = host.end();
        info!(
            "joined {} as peer {} ({} bytes, {} vector(s))",
            socket.socket.display(),
            end.doorbell.own_id(),
            end.size,
            end.doorbell.vectors()
        );
        let socket = host.doorbell.socket_fd()?;
        let region = Region::open_or_format(end.memory, host.doorbell.clone(), format)
            .context("opening the channel region")?;
        Ok(HostLink {
            doorbell: host.doorbell,
            socket,
            region,
        })
    }
}

/// Runs `ivshm bridge`.
pub fn run(a: &HostBridgeArgs) -> anyhow::Result<()> {
    let link = HostLink::join(&a.socket, a.flags.format())?;
    run_bridge(&link, &a.flags)
}

/// `ivshm guest bridge`.
#[derive(Args, Debug)]
pub struct GuestBridgeArgs {
    #[command(flatten)]
    device: ChanDeviceArgs,
    #[command(flatten)]
    flags: BridgeFlags,
}

/// A guest's region: departed peers are marked by the server (or noticed by the keepalive).
struct GuestLink(Region);

impl Link for GuestLink {
    fn region(&self) -> &Region {
        &self.0
    }

    fn events_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn process_events(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

/// Runs `ivshm guest bridge`.
pub fn run_guest(a: &GuestBridgeArgs) -> anyhow::Result<()> {
    with_end(&a.device, |end| {
        info!(
            "opened the device as peer {} ({} bytes, {} vector(s))",
            end.doorbell.own_id(),
            end.size,
            end.doorbell.vectors()
        );
        let region =
            Region::open_or_format(end.memory.clone(), end.doorbell.clone(), a.flags.format())
                .context("opening the channel region")?;
        run_bridge(&GuestLink(region), &a.flags)
    })
}
