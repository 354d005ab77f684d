//! Two bridges in threads of the test process over a memfd region (`LocalBus`, peers 0 and 1),
//! and the sockets around them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ivshm_bridge::{Bridge, BridgeError, Config, Endpoint, Link, Mode, Status};
use ivshm_channel::local::LocalBus;
use ivshm_channel::{FormatOptions, Region};

/// A region with no departure events (both peers are threads of this process).
pub struct LocalLink(pub Region);

impl Link for LocalLink {
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

/// The bus both bridges share: 16 MiB, 8 channels of 1 MiB rings.
pub fn bus() -> Arc<LocalBus> {
    Arc::new(LocalBus::new(16 << 20, 3, 1).unwrap())
}

pub fn region(bus: &LocalBus, peer: u16) -> Region {
    let fmt = FormatOptions {
        channels: 8,
        ring_size_max: 1 << 20,
    };
    Region::open_or_format(
        bus.map().unwrap(),
        Arc::new(bus.doorbell(peer).unwrap()),
        fmt,
    )
    .unwrap()
}

/// A bridge running in a thread; stopped (and joined) on drop.
pub struct Running {
    pub local: Option<Endpoint>,
    pub status: Arc<Status>,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<Result<(), BridgeError>>>,
}

impl Running {
    pub fn start(bus: &Arc<LocalBus>, peer: u16, config: Config) -> Running {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (tx, rx) = mpsc::channel();
        let (stop_read, stop_write) = rustix::pipe::pipe().unwrap();
        let bus = bus.clone();
        let thread = std::thread::spawn(move || {
            let link = LocalLink(region(&bus, peer));
            let mut bridge = match Bridge::new(&link, config) {
                Ok(b) => b,
                Err(e) => {
                    tx.send(Err(e.to_string())).unwrap();
                    return Ok(());
                }
            };
            tx.send(Ok((bridge.local().cloned(), bridge.status())))
                .unwrap();
            bridge.run(stop_read.as_fd())
        });
        let (local, status) = rx.recv().unwrap().unwrap();
        Running {
            local,
            status,
            stop: Some(stop_write),
            thread: Some(thread),
        }
    }

    /// Stops the bridge and returns how its loop ended.
    pub fn stop(mut self) -> Result<(), BridgeError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), BridgeError> {
        if let Some(w) = self.stop.take() {
            rustix::io::write(&w, b"x").unwrap();
        }
        match self.thread.take() {
            Some(t) => t.join().unwrap(),
            None => Ok(()),
        }
    }

    /// Waits until `n` sessions came up.
    pub fn wait_sessions(&self, n: u64) {
        wait_for(|| {
            self.status
                .sessions
                .load(std::sync::atomic::Ordering::Relaxed)
                >= n
                && self.status.up.load(std::sync::atomic::Ordering::Relaxed)
        });
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

pub fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn config(name: &str, mode: Mode) -> Config {
    let mut c = Config::new(name, mode);
    c.retry = Duration::from_millis(50);
    // No keepalive frames: a lost wake-up would hang a test instead of being hidden by the
    // next ping.
    c.keepalive = Duration::from_secs(3600);
    c
}

pub fn tcp_any() -> Endpoint {
    "tcp:127.0.0.1:0"
        .parse::<ivshm_bridge::Address>()
        .unwrap()
        .resolve(true)
        .unwrap()
}

/// A simple deterministic byte stream.
pub struct Stream(u64);

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}
