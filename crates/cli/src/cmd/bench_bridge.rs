//! `ivshm bench bridge`: TCP through two bridges on one host (client → bridge → region →
//! bridge → server) next to the same TCP over plain loopback, in alternating blocks of one run:
//!
//! - bulk throughput: the client writes `--bytes` and half-closes, the server reads to the end
//!   and answers one byte; the time from the first write to that byte;
//! - round trips of a 64-byte request and a 64-byte response on one connection.
//!
//! Everything runs in this process: an in-process ivshm server, two host peers each running a
//! [`Bridge`] in its own thread (one epoll loop each, as `ivshm bridge` runs), the TCP server
//! and the client. The bridges and sockets are as `ivshm bridge` makes them (`TCP_NODELAY` on
//! every socket of both variants).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::builder::RangedU64ValueParser;
use clap::Args;
use ivshm_bridge::{Bridge, Config, Endpoint, Mode};
use ivshm_channel::FormatOptions;
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};

use crate::args;

use super::bench::{micros, ratio, summarize, Summary, TempSocket, MAX_ROUNDS};
use super::bridge::HostLink;
use super::host::SocketArgs;

/// `ivshm bench bridge`.
#[derive(Args, Debug, Clone)]
pub struct BridgeBenchArgs {
    /// Bytes per throughput transfer (1 MiB to 64 GiB).
    #[arg(
        long,
        value_name = "BYTES",
        default_value = "256M",
        value_parser = args::size_between(1 << 20, 64 << 30)
    )]
    pub bytes: u64,
    /// Measured round trips per variant (1 to 1000000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5_000,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_ROUNDS)
    )]
    pub rounds: usize,
    /// Alternating blocks per variant (1 to 100).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=100)
    )]
    pub blocks: usize,
    /// Size of the in-process server's region.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = args::size_between(1 << 20, 4 << 30))]
    pub size: u64,
    /// Largest ring size the region is formatted with (4 channels).
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = ring)]
    pub ring_size: u32,
    /// The bridges' --spin (microseconds, 0 to 1000000).
    #[arg(
        long,
        value_name = "MICROS",
        default_value_t = 0,
        value_parser = RangedU64ValueParser::<u64>::new().range(0..=1_000_000)
    )]
    pub spin: u64,
    /// The bridges' --window.
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = ring)]
    pub window: u32,
}

fn ring(s: &str) -> Result<u32, String> {
    let v = ivshm_mem::parse_size(s).map_err(|e| e.to_string())?;
    u32::try_from(v)
        .ok()
        .filter(|v| (4096..=1 << 30).contains(v))
        .ok_or_else(|| format!("{s}: 4K to 1G"))
}

/// Result of `bench bridge`.
#[derive(Debug)]
pub struct BridgeReport {
    /// Bytes per transfer.
    pub bytes: u64,
    /// Through the bridges and over loopback, bytes per second (median of blocks).
    pub throughput: (f64, f64),
    /// Round trips through the bridges and over loopback.
    pub round_trip: (Summary, Summary),
    /// Round trips per variant.
    pub rounds: usize,
    /// Ring size of the bridges' channel.
    pub ring_size: u32,
}

impl BridgeReport {
    /// The printed report.
    pub fn lines(&self) -> Vec<String> {
        let (b, l) = self.throughput;
        let (rb, rl) = self.round_trip;
        vec![
            format!(
                "bridge bench: client -> bridge -> region ({} KiB rings) -> bridge -> server, next to TCP loopback, alternating blocks",
                self.ring_size >> 10
            ),
            format!(
                "throughput ({} MiB per transfer): bridges {:.2} GB/s | loopback {:.2} GB/s | ratio {:.2}x (goal >= 0.5x)",
                self.bytes >> 20,
                b / 1e9,
                l / 1e9,
                b / l
            ),
            format!(
                "64-byte request/response, {} round trips per variant: bridges median {} p99 {} | loopback median {} p99 {} | ratio {} (p99 {}) (goal <= 3x)",
                self.rounds,
                micros(rb.median),
                micros(rb.p99),
                micros(rl.median),
                micros(rl.p99),
                ratio(rb.median, rl.median),
                ratio(rb.p99, rl.p99)
            ),
        ]
    }
}

/// A bridge in a thread, stopped on drop.
struct Running {
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    fn start(
        socket: &std::path::Path,
        format: FormatOptions,
        config: Config,
    ) -> anyhow::Result<(
        Running,
        Option<Endpoint>,
        std::sync::Arc<ivshm_bridge::Status>,
    )> {
        let (tx, rx) = mpsc::channel();
        let (stop_read, stop_write) = rustix::pipe::pipe()?;
        let socket = socket.to_path_buf();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let started = (|| {
                let link = HostLink::join(&SocketArgs { socket }, format)?;
                Ok::<_, anyhow::Error>(link)
            })();
            let link = match started {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Ok(());
                }
            };
            let mut bridge = match Bridge::new(&link, config) {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Ok(());
                }
            };
            let _ = tx.send(Ok((bridge.local().cloned(), bridge.status())));
            bridge.run(stop_read.as_fd())?;
            Ok(())
        });
        let (local, status) = rx
            .recv()
            .context("the bridge thread ended")?
            .map_err(anyhow::Error::msg)?;
        Ok((
            Running {
                stop: Some(stop_write),
                thread: Some(thread),
            },
            local,
            status,
        ))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(w) = self.stop.take() {
            let _ = rustix::io::write(&w, b"x");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const T: Option<Duration> = Some(Duration::from_secs(60));

/// The TCP server: the first byte says what a connection is for: `T` (read to the end, answer
/// one byte) or `E` (echo 64-byte messages until the end).
fn serve(listener: &TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { return };
        std::thread::spawn(move || -> std::io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(T)?;
            let mut kind = [0u8; 1];
            s.read_exact(&mut kind)?;
            if kind[0] == b'T' {
                let mut buf = vec![0u8; 1 << 20];
                while s.read(&mut buf)? > 0 {}
                s.write_all(b"k")?;
            } else {
                let mut msg = [0u8; 64];
                while s.read_exact(&mut msg).is_ok() {
                    s.write_all(&msg)?;
                }
            }
            Ok(())
        });
    }
}

fn connect(addr: SocketAddr, kind: u8) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(T)?;
    s.write_all(&[kind])?;
    Ok(s)
}

/// One bulk transfer: bytes per second.
fn transfer(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = connect(addr, b'T')?;
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut k = [0u8; 1];
    s.read_exact(&mut k)
        .context("waiting for the server's answer")?;
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// `rounds` round trips on one connection (after 100 unmeasured ones).
fn round_trips(addr: SocketAddr, rounds: usize, out: &mut Vec<Duration>) -> anyhow::Result<()> {
    let mut s = connect(addr, b'E')?;
    let mut msg = [7u8; 64];
    for i in 0..rounds + 100 {
        let start = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut msg)?;
        if i >= 100 {
            out.push(start.elapsed());
        }
    }
    Ok(())
}

/// Runs `bench bridge`.
pub fn bridge(a: &BridgeBenchArgs) -> anyhow::Result<BridgeReport> {
    let sock = TempSocket::new("bridge")?;
    let mut region = RegionConfig::new(sock.path());
    region.vectors = 1;
    region.memory.size = a.size;
    let _server = ServerHandle::spawn(ServerConfig::single(region))
        .context("starting the in-process server")?;
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    let direct = tcp.local_addr()?;
    std::thread::spawn(move || serve(&tcp));
    let format = FormatOptions {
        channels: 4,
        ring_size_max: a.ring_size,
    };
    let listen = Endpoint::Tcp("127.0.0.1:0".parse()?);
    let mut lc = Config::new("bench", Mode::Listen(listen));
    lc.window = a.window;
    lc.spin = Duration::from_micros(a.spin);
    let mut cc = Config::new("bench", Mode::Connect(Endpoint::Tcp(direct)));
    cc.window = a.window;
    cc.spin = Duration::from_micros(a.spin);
    let (_l, local, status) = Running::start(&sock.path(), format, lc)?;
    let (_c, _, _) = Running::start(&sock.path(), format, cc)?;
    let Some(Endpoint::Tcp(bridged)) = local else {
        bail!("the listening bridge has no TCP address");
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status.up.load(Ordering::Relaxed) {
        if Instant::now() > deadline {
            bail!("the two bridges did not start a session within 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Warm-up of both paths.
    transfer(bridged, 16 << 20)?;
    transfer(direct, 16 << 20)?;
    let (mut tb, mut tl) = (Vec::new(), Vec::new());
    for _ in 0..a.blocks {
        tb.push(transfer(bridged, a.bytes)?);
        tl.push(transfer(direct, a.bytes)?);
    }
    let (mut rb, mut rl) = (Vec::new(), Vec::new());
    let per_block = a.rounds.div_ceil(a.blocks);
    for _ in 0..a.blocks {
        round_trips(bridged, per_block, &mut rb)?;
        round_trips(direct, per_block, &mut rl)?;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(BridgeReport {
        bytes: a.bytes,
        throughput: (median(&mut tb), median(&mut tl)),
        round_trip: (summarize(&mut rb), summarize(&mut rl)),
        rounds: rb.len(),
        ring_size: a.ring_size,
    })
}
