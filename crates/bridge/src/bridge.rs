//! [`Bridge`]: one epoll loop that carries the connections of one socket address over one
//! channel of a region, as `docs/bridge.md` describes.
//!
//! The loop owns the listening socket (listening side), the connections' sockets, the channel
//! and the protocol state ([`Session`]). Each turn it receives what the channel holds (at most
//! [`RECV_BATCH`] messages, so sockets get their turn), applies the session's [`Action`]s to the
//! sockets, sends control frames, then reads the sockets that have data and credit, one `DATA`
//! frame each in turn (round robin), until the ring is full. Sockets are edge-triggered; the
//! channel's doorbell fd, the listening socket, the link's event fd and the stop fd are
//! level-triggered. When the ring is full or empty the channel call returns `WouldBlock` with
//! the ring armed, so the doorbell fd becomes readable when the other side makes progress.
//!
//! When the session ends (the other bridge closed the channel or left, it broke the protocol,
//! it fell silent), every connection is reset and the channel is opened again by name: the
//! other bridge, once back, joins it and a new session starts.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ivshm_channel::{Channel, ChannelError, ChannelOptions, Region, RegionError};
use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendFlags, Shutdown};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::addr::{self, Endpoint, Listener};
use crate::frame::{Reason, Role, HEADER_LEN};
use crate::session::{Action, Params, Refusal, Session, SessionError};

/// Messages received from the channel per turn of the loop before the sockets get a turn.
pub const RECV_BATCH: usize = 64;

/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How the region learns of departed peers, and the region itself.
pub trait Link {
    /// The channel region.
    fn region(&self) -> &Region;
    /// A file descriptor that is readable when [`Link::process_events`] has work (a host
    /// peer: the server's socket), if any.
    fn events_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Handles what made [`Link::events_fd`] readable, e.g. marks the channel sides of a peer
    /// that left as gone (`Region::peer_left`). An error ends the bridge (the server went
    /// away).
    fn process_events(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// Listen or connect, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Accept connections here and open them on the other side.
    Listen(Endpoint),
    /// Connect here for each connection the other side opens.
    Connect(Endpoint),
}

/// A bridge's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The channel's name (1..=31 bytes), the same on both sides.
    pub name: String,
    /// Listen or connect.
    pub mode: Mode,
    /// Bytes per connection buffered for the local socket (the other side's credit).
    pub window: u32,
    /// Largest `DATA` payload (also bounded by the channel's largest message).
    pub max_data: u32,
    /// Connections at once (the listening side refuses more, naming the limit).
    pub max_connections: u32,
    /// Send a frame at least this often; the other side is given up after four of its own
    /// intervals of silence.
    pub keepalive: Duration,
    /// The channel's doorbell vector and spin budget.
    pub channel: ChannelOptions,
    /// How long to wait before opening the channel again after an error.
    pub retry: Duration,
    /// How long the loop keeps polling (without sleeping) after its last work.
    pub spin: Duration,
}

impl Config {
    /// Defaults: window 1 MiB, `DATA` up to 256 KiB, 1024 connections, keepalive 2 s,
    /// vector 0, retry after 1 s.
    pub fn new(name: &str, mode: Mode) -> Config {
        Config {
            name: name.into(),
            mode,
            window: 1 << 20,
            max_data: 256 << 10,
            max_connections: 1024,
            keepalive: Duration::from_secs(2),
            channel: ChannelOptions::default(),
            retry: Duration::from_secs(1),
            spin: Duration::ZERO,
        }
    }
}

/// The bridge stopped with an error.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum BridgeError {
    /// cannot listen on {0}
    ///
    /// Binding the listening address failed.
    Listen(addr::AddressError),
    /// {op} failed: {errno}
    ///
    /// The event loop's own system calls failed.
    Sys {
        /// What was done.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// the region's link failed: {0}
    ///
    /// The link failed (e.g. the ivshm server went away).
    Link(Box<dyn std::error::Error + Send + Sync>),
    /// channel {name:?} cannot be opened: {error}
    ///
    /// The channel name cannot be used.
    Channel {
        /// The name.
        name: String,
        /// Why.
        error: RegionError,
    },
}

fn sys(op: &'static str) -> impl Fn(Errno) -> BridgeError {
    move |errno| BridgeError::Sys { op, errno }
}

/// Counters other threads (tests, benchmarks) may watch.
#[derive(Debug, Default)]
pub struct Status {
    /// A session is up (the other bridge's `HELLO` arrived).
    pub up: AtomicBool,
    /// Sessions that came up so far.
    pub sessions: AtomicU64,
    /// Connections opened so far (accepted, or connected for the other side).
    pub opened: AtomicU64,
    /// Connections refused so far (no session, or a limit).
    pub refused: AtomicU64,
    /// Sessions ended by an error of the other side (bad frames, broken rules, silence).
    pub protocol_errors: AtomicU64,
}

const TOKEN_STOP: u64 = 1;
const TOKEN_DOORBELL: u64 = 2;
const TOKEN_EVENTS: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const CONN_BIT: u64 = 1 << 63;

fn conn_token(slot: usize, gen: u32) -> u64 {
    CONN_BIT | (u64::from(gen & 0x7fff_ffff) << 32) | (slot as u64 & 0xffff_ffff)
}

#[derive(Debug)]
struct Sock {
    fd: OwnedFd,
    gen: u32,
    connecting: bool,
    /// Edge-triggered: data (or EOF) may be waiting until a read says otherwise.
    readable: bool,
    writable: bool,
    /// The peer hung up (or an error is pending): read until EOF or an error.
    hup: bool,
    /// In the read queue.
    queued: bool,
}

impl Sock {
    /// Writes as much of `data` as the socket takes now (never blocks, no SIGPIPE).
    fn send(&mut self, data: &[u8]) -> Result<usize, Errno> {
        self.send_vectored(data, &[])
    }

    fn send_vectored(&mut self, a: &[u8], b: &[u8]) -> Result<usize, Errno> {
        let total = a.len() + b.len();
        let mut done = 0;
        while done < total && self.writable && !self.connecting {
            let iov = if done < a.len() {
                [IoSlice::new(&a[done..]), IoSlice::new(b)]
            } else {
                [IoSlice::new(&b[done - a.len()..]), IoSlice::new(&[])]
            };
            match rustix::net::sendmsg(
                &self.fd,
                &iov,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => done += n,
                Err(Errno::AGAIN) => self.writable = false,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

#[derive(Debug)]
struct Live {
    channel: Channel,
    session: Session,
    /// Length of the frame in `pending_buf` that met a full ring.
    pending: Option<usize>,
    /// Slots whose sockets may have data to read, in turn.
    read_queue: VecDeque<usize>,
}

/// Why a session ends, and how soon to open the channel again.
struct End {
    why: String,
    retry: bool,
    protocol: bool,
}

/// One bridge: a listening or connecting address, a channel name, a region.
pub struct Bridge<'a> {
    link: &'a dyn Link,
    config: Config,
    epoll: OwnedFd,
    listener: Option<Listener>,
    live: Option<Live>,
    socks: Vec<Option<Sock>>,
    next_gen: u32,
    retry_at: Option<Instant>,
    /// Accepting paused (the listener out of the epoll set) until then: the process is out of
    /// file descriptors.
    accept_paused_until: Option<Instant>,
    doorbell_registered: bool,
    polling: bool,
    /// Something happened in this turn of the loop; when the last thing happened.
    worked: bool,
    last_work: Instant,
    status: Arc<Status>,
    last_note: Option<String>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    pending_buf: Vec<u8>,
    ctl_buf: Vec<u8>,
}

impl std::fmt::Debug for Bridge<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("config", &self.config)
            .field("listener", &self.listener)
            .field("up", &self.status.up)
            .finish_non_exhaustive()
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn reason_of(errno: Errno) -> Reason {
    if errno == Errno::CONNREFUSED {
        Reason::Refused
    } else {
        Reason::ConnectFailed
    }
}

impl<'a> Bridge<'a> {
    /// Sets the bridge up: binds the listening address (so that [`Bridge::local`] is known
    /// before [`Bridge::run`]) and makes the epoll instance. The channel is opened by `run`.
    pub fn new(link: &'a dyn Link, config: Config) -> Result<Bridge<'a>, BridgeError> {
        let listener = match &config.mode {
            Mode::Listen(e) => Some(Listener::bind(e).map_err(BridgeError::Listen)?),
            Mode::Connect(_) => None,
        };
        let epoll = epoll::create(CreateFlags::CLOEXEC).map_err(sys("epoll_create"))?;
        let frame_max = config.max_data as usize + HEADER_LEN;
        Ok(Bridge {
            link,
            epoll,
            listener,
            live: None,
            socks: Vec::new(),
            next_gen: 0,
            retry_at: None,
            accept_paused_until: None,
            doorbell_registered: false,
            polling: false,
            worked: false,
            last_work: Instant::now(),
            status: Arc::default(),
            last_note: None,
            rx_buf: Vec::new(),
            tx_buf: vec![0; frame_max],
            pending_buf: vec![0; frame_max],
            ctl_buf: Vec::with_capacity(HEADER_LEN + 64),
            config,
        })
    }

    /// The listening address (with the port the kernel chose for port 0).
    pub fn local(&self) -> Option<&Endpoint> {
        self.listener.as_ref().map(|l| &l.local)
    }

    /// Counters for other threads.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    fn add_fd(&self, fd: BorrowedFd<'_>, token: u64, flags: EventFlags) -> Result<(), Errno> {
        epoll::add(&self.epoll, fd, EventData::new_u64(token), flags)
    }

    /// Runs until `stop` becomes readable (every connection is then reset) or the link fails.
    pub fn run(&mut self, stop: BorrowedFd<'_>) -> Result<(), BridgeError> {
        self.add_fd(stop, TOKEN_STOP, EventFlags::IN)
            .map_err(sys("epoll_ctl"))?;
        if let Some(fd) = self.link.events_fd() {
            self.add_fd(fd, TOKEN_EVENTS, EventFlags::IN)
                .map_err(sys("epoll_ctl"))?;
        }
        if let Some(l) = &self.listener {
            self.add_fd(l.fd(), TOKEN_LISTENER, EventFlags::IN)
                .map_err(sys("epoll_ctl"))?;
            info!(
                "bridge {:?}: listening on {}; connections go over channel {:?}",
                self.config.name, l.local, self.config.name
            );
        }
        let mut events: Vec<Event> = Vec::with_capacity(256);
        loop {
            let now = Instant::now();
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
                if let Some(l) = &self.listener {
                    self.add_fd(l.fd(), TOKEN_LISTENER, EventFlags::IN)
                        .map_err(sys("epoll_ctl"))?;
                }
            }
            if self.live.is_none() && self.retry_at.is_none_or(|t| now >= t) {
                self.open_session(now)?;
            }
            let busy = self.pump(now);
            if std::mem::take(&mut self.worked) {
                self.last_work = now;
            }
            // Busy-poll (epoll with no wait, the ring on every turn) for `spin` after the last
            // work: a reply that comes back soon is seen without a wake-up.
            let spinning = now.saturating_duration_since(self.last_work) < self.config.spin;
            let timeout = if busy || spinning {
                Some(Duration::ZERO)
            } else {
                self.timeout(Instant::now())
            };
            events.clear();
            let timespec = timeout.map(|t| rustix::time::Timespec {
                tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(t.subsec_nanos()),
            });
            match epoll::wait(&self.epoll, spare_capacity(&mut events), timespec.as_ref()) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(sys("epoll_wait")(e)),
            }
            if !events.is_empty() {
                self.worked = true;
            }
            for ev in &events {
                let (token, flags) = (ev.data.u64(), ev.flags);
                match token {
                    TOKEN_STOP => {
                        self.stop();
                        return Ok(());
                    }
                    TOKEN_DOORBELL => {
                        if let Some(live) = &self.live {
                            if let Err(e) = live.channel.take_doorbell() {
                                debug!("consuming the doorbell: {e}");
                            }
                        }
                    }
                    TOKEN_EVENTS => {
                        if let Err(e) = self.link.process_events() {
                            self.end_session(&End {
                                why: format!("the region's link failed: {e}"),
                                retry: false,
                                protocol: false,
                            });
                            return Err(BridgeError::Link(e));
                        }
                    }
                    TOKEN_LISTENER => self.accept_all(),
                    t if t & CONN_BIT != 0 => self.socket_event(t, flags),
                    _ => {}
                }
            }
            self.apply_actions();
        }
    }

    /// How long the loop may sleep: until the next keepalive or retry; 1 ms while the
    /// doorbell has no fd (a polling guest device).
    fn timeout(&mut self, now: Instant) -> Option<Duration> {
        let mut next: Option<Instant> = self.retry_at.filter(|_| self.live.is_none());
        if let Some(t) = self.accept_paused_until {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let Some(live) = &self.live {
            match live.session.check_timers(now) {
                Ok(t) => next = Some(next.map_or(t, |n| n.min(t))),
                Err(_) => return Some(Duration::ZERO),
            }
            if self.polling {
                return Some(Duration::from_millis(1));
            }
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    /// Logs `text` at info level, or at debug level if it repeats the previous note (a peer
    /// that keeps failing the same way does not flood the log).
    fn note(&mut self, text: String) {
        if self.last_note.as_deref() == Some(text.as_str()) {
            debug!("{text}");
        } else {
            warn!("{text}");
            self.last_note = Some(text);
        }
    }

    fn open_session(&mut self, now: Instant) -> Result<(), BridgeError> {
        let name = self.config.name.clone();
        let channel = match self.link.region().channel(&name, self.config.channel) {
            Ok(c) => c,
            Err(e @ (RegionError::BadName { .. } | RegionError::BadVector { .. })) => {
                return Err(BridgeError::Channel { name, error: e });
            }
            Err(e) => {
                self.note(format!(
                    "bridge {name:?}: cannot open the channel: {e}; trying again in {:?}",
                    self.config.retry
                ));
                self.retry_at = Some(now + self.config.retry);
                return Ok(());
            }
        };
        self.retry_at = None;
        if !self.doorbell_registered {
            match channel.poll_fd() {
                Some(fd) => self
                    .add_fd(fd, TOKEN_DOORBELL, EventFlags::IN)
                    .map_err(sys("epoll_ctl"))?,
                None => self.polling = true,
            }
            self.doorbell_registered = true;
        }
        let max = channel.max_message();
        self.rx_buf.resize(max, 0);
        let params = Params {
            role: match self.config.mode {
                Mode::Listen(_) => Role::Listen,
                Mode::Connect(_) => Role::Connect,
            },
            window: self.config.window.max(1),
            max_data: self.config.max_data.max(1),
            max_connections: self.config.max_connections.max(1),
            keepalive: self.config.keepalive,
            session: random_u64(),
        };
        debug!(
            "bridge {name:?}: channel open as side {:?}, waiting for the other bridge",
            channel.side()
        );
        self.live = Some(Live {
            channel,
            session: Session::new(params, max, now),
            pending: None,
            read_queue: VecDeque::new(),
        });
        Ok(())
    }

    /// Ends the session: resets every connection, closes the channel.
    fn end_session(&mut self, end: &End) {
        let Some(live) = self.live.take() else {
            return;
        };
        let mut reset = 0;
        for slot in live.session.slots() {
            if let Some(sock) = self.socks.get_mut(slot).and_then(Option::take) {
                let _ = epoll::delete(&self.epoll, &sock.fd);
                addr::close_with_reset(sock.fd);
                reset += 1;
            }
        }
        drop(live);
        let was_up = self.status.up.swap(false, Ordering::Relaxed);
        if end.protocol {
            self.status.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        let text = format!(
            "bridge {:?}: session ended: {}{}",
            self.config.name,
            end.why,
            if reset > 0 {
                format!("; {reset} connection(s) reset")
            } else {
                String::new()
            }
        );
        if end.protocol {
            self.note(text);
        } else {
            info!("{text}");
            if was_up {
                self.last_note = None;
            }
        }
        self.retry_at = Some(if end.retry {
            Instant::now() + self.config.retry
        } else {
            Instant::now()
        });
    }

    fn stop(&mut self) {
        info!("bridge {:?}: stopping", self.config.name);
        self.end_session(&End {
            why: "the bridge is stopping".into(),
            retry: false,
            protocol: false,
        });
    }

    fn channel_end(e: &ChannelError) -> End {
        let (why, retry) = match e {
            ChannelError::PeerClosed => ("the other bridge closed the channel".into(), false),
            ChannelError::PeerGone { peer } => (
                format!("the other bridge's peer {peer} left the region"),
                false,
            ),
            e => (format!("channel error: {e}"), true),
        };
        End {
            why,
            retry,
            protocol: matches!(e, ChannelError::ChannelCorrupt { .. }),
        }
    }

    /// One round of channel and socket work; true if there is more to do at once.
    fn pump(&mut self, now: Instant) -> bool {
        let Some(live) = self.live.as_mut() else {
            return false;
        };
        let mut more = false;
        // 1. What the other side sent.
        let mut received = 0;
        let mut end = None;
        while received < RECV_BATCH {
            match live
                .channel
                .receiver()
                .recv_into(&mut self.rx_buf, Some(Duration::ZERO))
            {
                Ok(n) => {
                    received += 1;
                    let was_up = live.session.peer().is_some();
                    match live.session.on_message(&self.rx_buf[..n], now) {
                        Ok(None) => {}
                        Ok(Some(d)) => {
                            let data = &self.rx_buf[d.offset..n];
                            let sock = self.socks.get_mut(d.slot).and_then(Option::as_mut);
                            match sock.map_or(Ok(0), |s| s.send(data)) {
                                Ok(k) => live.session.direct_written(d.slot, k, &data[k..]),
                                Err(e) => {
                                    let id = live.session.conn_id(d.slot).unwrap_or(0);
                                    debug!("connection {id}: write failed: {e}; reset");
                                    if let Some(sock) = self.socks[d.slot].take() {
                                        let _ = epoll::delete(&self.epoll, &sock.fd);
                                        addr::close_with_reset(sock.fd);
                                    }
                                    live.session.socket_failed(d.slot);
                                }
                            }
                        }
                        Err(e) => {
                            end = Some(End {
                                why: format!("the other bridge broke the protocol: {e}"),
                                retry: true,
                                protocol: true,
                            });
                            break;
                        }
                    }
                    if !was_up {
                        if let Some(p) = live.session.peer() {
                            info!(
                                "bridge {:?}: session up with the other bridge ({}, peer {}, session {:016x}, window {}, max_data {}, max_connections {})",
                                self.config.name,
                                p.role.as_str(),
                                live.channel.peer().map_or_else(|| "?".into(), |p| p.to_string()),
                                p.session,
                                p.window,
                                p.max_data,
                                p.max_connections
                            );
                            self.status.up.store(true, Ordering::Relaxed);
                            self.status.sessions.fetch_add(1, Ordering::Relaxed);
                            self.last_note = None;
                        }
                    }
                }
                Err(ChannelError::WouldBlock) => break,
                Err(e) => {
                    end = Some(Self::channel_end(&e));
                    break;
                }
            }
        }
        if received == RECV_BATCH {
            more = true;
        }
        if received > 0 {
            self.worked = true;
        }
        for text in live.session.take_conn_errors() {
            warn!("bridge {:?}: {text}", self.config.name);
        }
        if let Some(end) = end {
            self.end_session(&end);
            return true;
        }
        if let Err(e) = live.session.check_timers(now) {
            let protocol = matches!(e, SessionError::Silent(..));
            self.end_session(&End {
                why: e.to_string(),
                retry: false,
                protocol,
            });
            return true;
        }
        self.apply_actions();
        // 2. Control frames, then data, until the ring is full.
        match self.send_all(now) {
            Ok(m) => more |= m,
            Err(e) => {
                let end = Self::channel_end(&e);
                self.end_session(&end);
                return true;
            }
        }
        self.apply_actions();
        // Reading the sockets (EOF, errors) and the actions may have queued control frames: they
        // go out in the next round, at once, unless the ring is full (then its doorbell wakes
        // us).
        if let Some(live) = &self.live {
            more |= live.pending.is_none() && live.session.wants_to_send();
        }
        more
    }

    /// Sends the pending frame, the control frames and then data; true if sockets still have
    /// data to send and the ring has room (another round at once).
    fn send_all(&mut self, now: Instant) -> Result<bool, ChannelError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(false);
        };
        let sender = live.channel.sender();
        if let Some(len) = live.pending {
            match sender.try_send(&self.pending_buf[..len]) {
                Ok(()) => live.pending = None,
                Err(ChannelError::WouldBlock) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        while live.session.next_control(&mut self.ctl_buf, now) {
            match sender.try_send(&self.ctl_buf) {
                Ok(()) => {}
                Err(ChannelError::WouldBlock) => {
                    self.pending_buf[..self.ctl_buf.len()].copy_from_slice(&self.ctl_buf);
                    live.pending = Some(self.ctl_buf.len());
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        // Data, one frame per readable connection in turn.
        let turns = live.read_queue.len();
        for _ in 0..turns {
            let Some(slot) = live.read_queue.pop_front() else {
                break;
            };
            let Some(sock) = self.socks.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            sock.queued = false;
            let budget = live
                .session
                .read_budget(slot)
                .min(self.tx_buf.len() - HEADER_LEN);
            if budget == 0 || !sock.readable {
                continue;
            }
            let buf = &mut self.tx_buf[HEADER_LEN..HEADER_LEN + budget];
            match rustix::io::read(&sock.fd, buf) {
                Ok(0) => {
                    sock.readable = false;
                    live.session.eof(slot);
                }
                Ok(n) => {
                    if let Some(h) = live.session.data(slot, n) {
                        self.tx_buf[..HEADER_LEN].copy_from_slice(&h);
                    }
                    live.session.sent_data(now);
                    // A short read emptied the socket (a stream socket returns what it has):
                    // the next edge says when there is more. After a hang-up, read on until
                    // EOF (its edge may have come with this data).
                    if n == budget || sock.hup {
                        sock.queued = true;
                        live.read_queue.push_back(slot);
                    } else {
                        sock.readable = false;
                    }
                    match sender.try_send(&self.tx_buf[..HEADER_LEN + n]) {
                        Ok(()) => {}
                        Err(ChannelError::WouldBlock) => {
                            std::mem::swap(&mut self.tx_buf, &mut self.pending_buf);
                            live.pending = Some(HEADER_LEN + n);
                            return Ok(false);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(Errno::AGAIN) => sock.readable = false,
                Err(Errno::INTR) => {
                    sock.queued = true;
                    live.read_queue.push_back(slot);
                }
                Err(e) => {
                    let id = live.session.conn_id(slot).unwrap_or(0);
                    debug!("connection {id}: read failed: {e}; reset");
                    if let Some(sock) = self.socks[slot].take() {
                        let _ = epoll::delete(&self.epoll, &sock.fd);
                        addr::close_with_reset(sock.fd);
                    }
                    live.session.socket_failed(slot);
                }
            }
        }
        Ok(!live.read_queue.is_empty())
    }

    fn accept_all(&mut self) {
        // A bounded batch: the listener is level-triggered, the rest comes next turn.
        for _ in 0..64 {
            let Some(accepted) = self.listener.as_ref().map(Listener::accept) else {
                return;
            };
            let (fd, origin) = match accepted {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(e @ (Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)) => {
                    // The pending connection stays in the backlog; a level-triggered listener
                    // would wake the loop at once for ever, so it leaves the epoll set for a
                    // while. The log names the limit.
                    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                        .current
                        .map_or_else(|| "unlimited".to_string(), |n| n.to_string());
                    self.note(format!(
                        "bridge {:?}: cannot accept a connection: {e} (this process's open-file \
                         limit RLIMIT_NOFILE is {limit}; `ulimit -n` raises it); new connections \
                         wait in the listen backlog",
                        self.config.name
                    ));
                    if let Some(l) = &self.listener {
                        let _ = epoll::delete(&self.epoll, l.fd());
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
                Err(e) => {
                    warn!("bridge {:?}: accept failed: {e}", self.config.name);
                    return;
                }
            };
            let refusal = match self.live.as_mut() {
                Some(live) => live.session.accept(&origin),
                None => Err(Refusal::NotReady),
            };
            match refusal {
                Ok(slot) => {
                    let id = self
                        .live
                        .as_ref()
                        .and_then(|l| l.session.conn_id(slot))
                        .unwrap_or(0);
                    if let Err(e) = self.add_sock(slot, fd, false) {
                        warn!("connection {id}: cannot watch the socket: {e}; reset");
                        if let Some(live) = self.live.as_mut() {
                            live.session.socket_failed(slot);
                        }
                    } else {
                        self.status.opened.fetch_add(1, Ordering::Relaxed);
                        info!("connection {id}: accepted {origin}");
                    }
                }
                Err(why) => {
                    self.status.refused.fetch_add(1, Ordering::Relaxed);
                    addr::close_with_reset(fd);
                    warn!("bridge {:?}: refusing {origin}: {why}", self.config.name);
                }
            }
            self.apply_actions();
        }
    }

    fn add_sock(&mut self, slot: usize, fd: OwnedFd, connecting: bool) -> Result<(), Errno> {
        self.next_gen = self.next_gen.wrapping_add(1) & 0x7fff_ffff;
        let gen = self.next_gen;
        let flags = EventFlags::IN | EventFlags::OUT | EventFlags::RDHUP | EventFlags::ET;
        self.add_fd(fd.as_fd(), conn_token(slot, gen), flags)?;
        if self.socks.len() <= slot {
            self.socks.resize_with(slot + 1, || None);
        }
        if let Some(old) = self.socks[slot].take() {
            let _ = epoll::delete(&self.epoll, &old.fd);
        }
        self.socks[slot] = Some(Sock {
            fd,
            gen,
            connecting,
            readable: false,
            writable: !connecting,
            hup: false,
            queued: false,
        });
        Ok(())
    }

    fn remove_sock(&mut self, slot: usize) -> Option<OwnedFd> {
        let sock = self.socks.get_mut(slot).and_then(Option::take)?;
        let _ = epoll::delete(&self.epoll, &sock.fd);
        Some(sock.fd)
    }

    fn socket_event(&mut self, token: u64, flags: EventFlags) {
        let slot = (token & 0xffff_ffff) as usize;
        let gen = ((token >> 32) & 0x7fff_ffff) as u32;
        let Some(sock) = self.socks.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if sock.gen != gen {
            return;
        }
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let trouble = flags.intersects(EventFlags::ERR | EventFlags::HUP);
        if sock.connecting {
            if !(flags.contains(EventFlags::OUT) || trouble) {
                return;
            }
            let id = live.session.conn_id(slot).unwrap_or(0);
            match addr::finish_connect(sock.fd.as_fd()) {
                Ok(()) => {
                    sock.connecting = false;
                    sock.writable = true;
                    sock.readable = true;
                    if !sock.queued {
                        sock.queued = true;
                        live.read_queue.push_back(slot);
                    }
                    live.session.connected(slot);
                    self.status.opened.fetch_add(1, Ordering::Relaxed);
                    info!("connection {id}: connected to {}", self.target());
                }
                Err(e) => {
                    info!(
                        "connection {id}: connecting to {} failed: {e}",
                        self.target()
                    );
                    if let Some(fd) = self.remove_sock(slot) {
                        drop(fd);
                    }
                    if let Some(live) = self.live.as_mut() {
                        live.session.connect_failed(slot, reason_of(e));
                    }
                }
            }
            return;
        }
        if trouble || flags.contains(EventFlags::RDHUP) {
            sock.hup = true;
        }
        if trouble || flags.intersects(EventFlags::IN | EventFlags::RDHUP) {
            sock.readable = true;
            if !sock.queued {
                sock.queued = true;
                live.read_queue.push_back(slot);
            }
        }
        if trouble || flags.contains(EventFlags::OUT) {
            sock.writable = true;
            self.flush(slot);
        }
    }

    fn target(&self) -> String {
        match &self.config.mode {
            Mode::Connect(e) | Mode::Listen(e) => e.to_string(),
        }
    }

    /// Writes what waits for `slot`'s socket, as far as it takes it.
    fn flush(&mut self, slot: usize) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let Some(sock) = self.socks.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let (a, b) = live.session.pending(slot);
        if a.is_empty() {
            return;
        }
        match sock.send_vectored(a, b) {
            Ok(n) => live.session.wrote(slot, n),
            Err(e) => {
                let id = live.session.conn_id(slot).unwrap_or(0);
                debug!("connection {id}: write failed: {e}; reset");
                if let Some(sock) = self.socks[slot].take() {
                    let _ = epoll::delete(&self.epoll, &sock.fd);
                    addr::close_with_reset(sock.fd);
                }
                live.session.socket_failed(slot);
            }
        }
    }

    fn apply_actions(&mut self) {
        loop {
            let Some(action) = self.live.as_mut().and_then(|l| l.session.next_action()) else {
                return;
            };
            match action {
                Action::Connect(slot) => self.connect(slot),
                Action::Flush(slot) => self.flush(slot),
                Action::Readable(slot) => {
                    if let (Some(live), Some(Some(sock))) =
                        (self.live.as_mut(), self.socks.get_mut(slot))
                    {
                        if sock.readable && !sock.queued {
                            sock.queued = true;
                            live.read_queue.push_back(slot);
                        }
                    }
                }
                Action::ShutWrite(slot) => {
                    if let Some(Some(sock)) = self.socks.get(slot) {
                        let _ = rustix::net::shutdown(&sock.fd, Shutdown::Write);
                    }
                }
                Action::Close(slot) => {
                    let id = self.conn_id(slot);
                    if self.remove_sock(slot).is_some() {
                        info!("connection {id}: closed");
                    }
                }
                Action::Reset(slot) => {
                    let id = self.conn_id(slot);
                    if let Some(fd) = self.remove_sock(slot) {
                        info!("connection {id}: reset by the other side");
                        addr::close_with_reset(fd);
                    }
                }
                Action::Release(slot) => {
                    if let Some(fd) = self.remove_sock(slot) {
                        addr::close_with_reset(fd);
                    }
                }
            }
        }
    }

    fn conn_id(&self, slot: usize) -> u32 {
        self.live
            .as_ref()
            .and_then(|l| l.session.conn_id(slot))
            .unwrap_or(0)
    }

    fn connect(&mut self, slot: usize) {
        let Mode::Connect(endpoint) = self.config.mode.clone() else {
            return;
        };
        let id = self.conn_id(slot);
        match addr::start_connect(&endpoint) {
            Ok((fd, done)) => {
                if let Err(e) = self.add_sock(slot, fd, !done) {
                    warn!("connection {id}: cannot watch the socket: {e}; reset");
                    if let Some(live) = self.live.as_mut() {
                        live.session.connect_failed(slot, Reason::ConnectFailed);
                    }
                    return;
                }
                if done {
                    if let Some(live) = self.live.as_mut() {
                        live.session.connected(slot);
                    }
                    self.status.opened.fetch_add(1, Ordering::Relaxed);
                    info!("connection {id}: connected to {endpoint}");
                }
            }
            Err(e) => {
                info!("connection {id}: connecting to {endpoint} failed: {e}");
                if let Some(live) = self.live.as_mut() {
                    live.session.connect_failed(slot, reason_of(e));
                }
            }
        }
    }
}
