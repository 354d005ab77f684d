//! One bridge session (a channel between two bridges) as a state machine without I/O: the
//! connection table, credits, half-closes and terminal frames of `docs/bridge.md`.
//!
//! The event loop (`bridge.rs`) owns the channel and the sockets. It tells the session what
//! happened on the sockets ([`Session::accept`], [`Session::connected`], [`Session::data`],
//! [`Session::eof`], [`Session::wrote`], [`Session::socket_failed`]) and hands it every
//! received message ([`Session::on_message`]); the session answers with [`Action`]s for the
//! sockets ([`Session::next_action`]) and frames to send ([`Session::next_control`], and the
//! headers of `DATA` frames the loop fills itself).
//!
//! Everything from the other side is checked: a frame that breaks the rules of one connection
//! resets that connection (its socket is reset, a `RESET` goes back, a log line says why); a
//! frame that breaks the session's rules ([`SessionError`]) ends the session. Memory is bounded
//! by what this side announced: per connection at most `window` bytes wait for the local
//! socket, and at most `max_connections` connections (including those waiting for the other
//! side's last frame) exist.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::frame::{self, Frame, FrameError, Hello, Reason, Role, HEADER_LEN};

/// This side's parameters (announced in its `HELLO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Listen or connect.
    pub role: Role,
    /// Bytes of each connection we buffer for the local socket (the other side's initial
    /// credit; ≥ 1).
    pub window: u32,
    /// Largest `DATA` payload we accept (≥ 1; at most what our channel carries minus the
    /// header).
    pub max_data: u32,
    /// Connections we handle at once (≥ 1).
    pub max_connections: u32,
    /// We send a frame at least this often.
    pub keepalive: Duration,
    /// Names our session in the other side's logs.
    pub session: u64,
}

/// The session broke the protocol (it is ended; every connection is reset).
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum SessionError {
    /// bad frame: {0}
    ///
    /// A message is not a frame.
    Frame(FrameError),
    /// the first frame is type {kind}, not HELLO
    ///
    /// The first frame was not `HELLO`.
    NoHello {
        /// The type received.
        kind: u8,
    },
    /// a second HELLO in one session
    ///
    /// A second `HELLO`.
    HelloAgain,
    /// the other bridge also uses --{0}: one side must --listen and the other --connect
    ///
    /// Both sides have the same role.
    SameRole(&'static str),
    /// frame type {kind} for connection {conn}, which does not exist
    ///
    /// A frame names a connection that does not exist.
    UnknownConn {
        /// The type.
        kind: u8,
        /// The id.
        conn: u32,
    },
    /// frame type {kind} is not sent to the {role} side
    ///
    /// A frame only the other role sends.
    WrongDirection {
        /// The type.
        kind: u8,
        /// Our role.
        role: &'static str,
    },
    /// OPEN of connection {0}, which is in use
    ///
    /// `OPEN` of an id in use.
    OpenInUse(u32),
    /// the other side opened more than our --max-connections {0} connections
    ///
    /// More connections than we announced.
    TooManyConnections(u32),
    /// nothing received for {0:?} (the other bridge promised a frame every {1:?})
    ///
    /// Nothing received for too long.
    Silent(Duration, Duration),
}

impl From<FrameError> for SessionError {
    fn from(error: FrameError) -> Self {
        SessionError::Frame(error)
    }
}

/// What the event loop must do with a connection's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Connector: connect a new socket for this connection.
    Connect(usize),
    /// Bytes wait in the connection's buffer: write them when the socket is writable
    /// ([`Session::pending`], [`Session::wrote`]).
    Flush(usize),
    /// Credit arrived: the socket may be read again.
    Readable(usize),
    /// Shut the socket's write side (everything is written).
    ShutWrite(usize),
    /// Close the socket normally (both directions ended).
    Close(usize),
    /// Close the socket with a reset.
    Reset(usize),
    /// The connection is gone from the session: drop whatever is left of it.
    Release(usize),
}

/// A `DATA` payload the loop writes to the socket itself ([`Session::on_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    /// The connection.
    pub slot: usize,
    /// Where the payload starts in the message.
    pub offset: usize,
}

/// Why [`Session::accept`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum Refusal {
    /// no session with the other bridge yet
    ///
    /// No `HELLO` from the other side yet.
    NotReady,
    /// --max-connections {0} reached on this side
    ///
    /// Our `--max-connections`.
    OwnLimit(u32),
    /// the other bridge's --max-connections {0} reached
    ///
    /// The other side's `--max-connections`.
    PeerLimit(u32),
    /// this side connects; it does not accept
    ///
    /// Only the listening side accepts.
    NotListening,
}

#[derive(Debug, Default)]
struct Control {
    open: Option<Vec<u8>>,
    opened: bool,
    credit: u64,
    shut: bool,
    terminal: Option<Terminal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    Close,
    Reset(Reason),
}

/// One connection.
#[derive(Debug)]
struct Conn {
    id: u32,
    /// Listener: the OPEN went out. Connector: the socket connected and OPENED went out.
    announced: bool,
    /// Connector: the socket connected.
    connected: bool,
    /// Listener: OPENED received.
    peer_opened: bool,
    /// Channel → socket: bytes waiting for the socket.
    out: VecDeque<u8>,
    /// DATA bytes received, and what we allowed (window + CREDIT queued).
    received: u64,
    granted: u64,
    /// Written to the socket, not yet credited.
    unacked: u64,
    /// SHUT received.
    peer_shut: bool,
    /// ShutWrite asked of the loop.
    write_shut: bool,
    /// Socket → channel: bytes we may still send.
    credit: u64,
    /// EOF read from the socket (SHUT queued).
    read_eof: bool,
    /// The socket is gone (closed, reset or failed).
    socket_gone: bool,
    ctl: Control,
    in_control_queue: bool,
    /// A terminal frame was queued (no frame of this connection follows it).
    terminal_queued: bool,
    /// A terminal frame went out.
    terminal_sent: bool,
    /// The other side's terminal frame arrived.
    terminal_received: bool,
}

impl Conn {
    fn new(id: u32, window: u32, peer_window: u32) -> Conn {
        Conn {
            id,
            announced: false,
            connected: false,
            peer_opened: false,
            out: VecDeque::new(),
            received: 0,
            granted: window.into(),
            unacked: 0,
            peer_shut: false,
            write_shut: false,
            credit: peer_window.into(),
            read_eof: false,
            socket_gone: false,
            ctl: Control::default(),
            in_control_queue: false,
            terminal_queued: false,
            terminal_sent: false,
            terminal_received: false,
        }
    }
}

/// One bridge session.
#[derive(Debug)]
pub struct Session {
    params: Params,
    peer: Option<Hello>,
    /// Largest DATA payload we send: min(their max_data, what our channel carries).
    send_max: u32,
    channel_payload_max: u32,
    slots: Vec<Option<Conn>>,
    free_slots: Vec<usize>,
    ids: HashMap<u32, usize>,
    next_id: u32,
    control: VecDeque<usize>,
    actions: VecDeque<Action>,
    hello_sent: bool,
    last_sent: Instant,
    last_received: Instant,
    /// Connection protocol errors since the last call of `take_conn_errors`, for the log.
    conn_errors: Vec<String>,
}

fn one(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

impl Session {
    /// A new session; `channel_message_max` is the largest message our channel carries.
    pub fn new(params: Params, channel_message_max: usize, now: Instant) -> Session {
        let channel_payload_max = one(channel_message_max.saturating_sub(HEADER_LEN) as u64);
        Session {
            params,
            peer: None,
            send_max: 0,
            channel_payload_max,
            slots: Vec::new(),
            free_slots: Vec::new(),
            ids: HashMap::new(),
            next_id: 1,
            control: VecDeque::new(),
            actions: VecDeque::new(),
            hello_sent: false,
            last_sent: now,
            last_received: now,
            conn_errors: Vec::new(),
        }
    }

    /// Our `HELLO`.
    pub fn hello(&self) -> Hello {
        Hello {
            role: self.params.role,
            window: self.params.window,
            max_data: self.params.max_data.min(self.channel_payload_max).max(1),
            max_connections: self.params.max_connections,
            keepalive_ms: one(self.params.keepalive.as_millis() as u64)
                .clamp(frame::KEEPALIVE_MIN_MS, frame::KEEPALIVE_MAX_MS),
            session: self.params.session,
        }
    }

    /// The other side's `HELLO`, once received.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Connections in the table (including those waiting for the other side's last frame).
    pub fn connections(&self) -> usize {
        self.ids.len()
    }

    /// The other side's id of the connection in `slot`.
    pub fn conn_id(&self, slot: usize) -> Option<u32> {
        self.conn(slot).map(|c| c.id)
    }

    fn conn(&self, slot: usize) -> Option<&Conn> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    fn conn_mut(&mut self, slot: usize) -> Option<&mut Conn> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// The next action for the event loop.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Connection protocol errors (already handled: the connection was reset) to log.
    pub fn take_conn_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.conn_errors)
    }

    fn insert(&mut self, conn: Conn) -> usize {
        let id = conn.id;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(conn);
                s
            }
            None => {
                self.slots.push(Some(conn));
                self.slots.len() - 1
            }
        };
        self.ids.insert(id, slot);
        slot
    }

    fn release(&mut self, slot: usize) {
        if let Some(c) = self.slots.get_mut(slot).and_then(Option::take) {
            self.ids.remove(&c.id);
            self.free_slots.push(slot);
            self.actions.push_back(Action::Release(slot));
        }
    }

    fn queue_control(&mut self, slot: usize) {
        if let Some(c) = self.conn_mut(slot) {
            if !c.in_control_queue {
                c.in_control_queue = true;
                self.control.push_back(slot);
            }
        }
    }

    // ---- the local side ----

    /// Listener: a connection was accepted; returns its slot. `origin` describes the client
    /// for the other side's logs.
    pub fn accept(&mut self, origin: &str) -> Result<usize, Refusal> {
        if self.params.role != Role::Listen {
            return Err(Refusal::NotListening);
        }
        let Some(peer) = self.peer else {
            return Err(Refusal::NotReady);
        };
        let in_use = self.ids.len() as u64;
        if in_use >= u64::from(self.params.max_connections) {
            return Err(Refusal::OwnLimit(self.params.max_connections));
        }
        if in_use >= u64::from(peer.max_connections) {
            return Err(Refusal::PeerLimit(peer.max_connections));
        }
        // A free id: the table holds fewer than 2^32 - 1 ids, so this ends.
        let mut id = self.next_id;
        while id == 0 || self.ids.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        let mut conn = Conn::new(id, self.params.window, peer.window);
        let origin = origin.as_bytes();
        conn.ctl.open = Some(origin[..origin.len().min(frame::ORIGIN_MAX)].to_vec());
        let slot = self.insert(conn);
        self.queue_control(slot);
        Ok(slot)
    }

    /// Connector: the socket of `slot` connected.
    pub fn connected(&mut self, slot: usize) {
        if let Some(c) = self.conn_mut(slot) {
            if c.terminal_queued || c.socket_gone {
                return;
            }
            c.connected = true;
            c.ctl.opened = true;
            let flush = !c.out.is_empty();
            let shut = c.peer_shut && c.out.is_empty();
            self.queue_control(slot);
            if flush {
                self.actions.push_back(Action::Flush(slot));
            }
            if shut {
                self.shut_write(slot);
            }
        }
    }

    /// Connector: connecting `slot` failed.
    pub fn connect_failed(&mut self, slot: usize, reason: Reason) {
        if let Some(c) = self.conn_mut(slot) {
            c.socket_gone = true;
        }
        self.terminate(slot, Terminal::Reset(reason));
    }

    /// How many bytes may be read from `slot`'s socket now (0: do not read).
    pub fn read_budget(&self, slot: usize) -> usize {
        match self.conn(slot) {
            Some(c)
                if c.announced
                    && !c.read_eof
                    && !c.terminal_queued
                    && !c.socket_gone
                    && c.ctl.open.is_none() =>
            {
                c.credit.min(u64::from(self.send_max)) as usize
            }
            _ => 0,
        }
    }

    /// `n` bytes (1..=[`Session::read_budget`]) were read from `slot`'s socket: returns the
    /// header of the `DATA` frame that carries them.
    pub fn data(&mut self, slot: usize, n: usize) -> Option<[u8; HEADER_LEN]> {
        let budget = self.read_budget(slot);
        let c = self.conn_mut(slot)?;
        if n == 0 || n > budget {
            return None;
        }
        c.credit -= n as u64;
        Some(frame::header(frame::kind::DATA, c.id, 0))
    }

    /// The socket of `slot` reached end of file (its reader half-closed).
    pub fn eof(&mut self, slot: usize) {
        if let Some(c) = self.conn_mut(slot) {
            if c.read_eof || c.terminal_queued {
                return;
            }
            c.read_eof = true;
            c.ctl.shut = true;
            self.queue_control(slot);
            self.maybe_close(slot);
        }
    }

    /// The socket of `slot` failed or was reset (the loop closed it).
    pub fn socket_failed(&mut self, slot: usize) {
        if let Some(c) = self.conn_mut(slot) {
            c.socket_gone = true;
            c.out = VecDeque::new();
        }
        self.terminate(slot, Terminal::Reset(Reason::Socket));
    }

    /// The bytes waiting for `slot`'s socket (two slices, in order).
    pub fn pending(&self, slot: usize) -> (&[u8], &[u8]) {
        match self.conn(slot) {
            Some(c) => c.out.as_slices(),
            None => (&[], &[]),
        }
    }

    /// `n` bytes of [`Session::pending`] were written to the socket.
    pub fn wrote(&mut self, slot: usize, n: usize) {
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        let n = n.min(c.out.len());
        c.out.drain(..n);
        if c.out.is_empty() && c.out.capacity() > (1 << 20) {
            c.out = VecDeque::new();
        }
        self.consumed(slot, n);
    }

    /// After [`Direct`]: `written` bytes went to the socket, `rest` waits for it.
    pub fn direct_written(&mut self, slot: usize, written: usize, rest: &[u8]) {
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        if !rest.is_empty() && !c.socket_gone {
            c.out.extend(rest);
            self.actions.push_back(Action::Flush(slot));
        }
        self.consumed(slot, written);
    }

    /// `n` bytes reached the socket: grant credit, shut the socket after the other side's SHUT.
    fn consumed(&mut self, slot: usize, n: usize) {
        let quarter = u64::from(self.params.window / 4).max(1);
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        c.unacked += n as u64;
        let mut queue = false;
        // Grant more once a quarter of the window was consumed (not after the peer's SHUT:
        // it sends nothing more).
        if c.unacked >= quarter && !c.peer_shut && !c.terminal_queued {
            c.ctl.credit += c.unacked;
            c.granted += c.unacked;
            c.unacked = 0;
            queue = true;
        }
        let shut = c.out.is_empty() && c.peer_shut && !c.write_shut;
        if queue {
            self.queue_control(slot);
        }
        if shut {
            self.shut_write(slot);
        }
    }

    fn shut_write(&mut self, slot: usize) {
        if let Some(c) = self.conn_mut(slot) {
            if c.write_shut || c.socket_gone {
                return;
            }
            c.write_shut = true;
            self.actions.push_back(Action::ShutWrite(slot));
            self.maybe_close(slot);
        }
    }

    /// Both directions ended on this side: close the socket and send `CLOSE`.
    fn maybe_close(&mut self, slot: usize) {
        if let Some(c) = self.conn_mut(slot) {
            if c.read_eof && c.write_shut && !c.terminal_queued {
                c.socket_gone = true;
                self.actions.push_back(Action::Close(slot));
                self.terminate(slot, Terminal::Close);
            }
        }
    }

    /// Queues our terminal frame (once); the socket must already be handled by the caller.
    fn terminate(&mut self, slot: usize, t: Terminal) {
        if let Some(c) = self.conn_mut(slot) {
            if c.terminal_queued {
                return;
            }
            c.terminal_queued = true;
            c.ctl.credit = 0;
            c.ctl.terminal = Some(t);
            self.queue_control(slot);
        }
    }

    /// Resets a connection because of the other side: socket reset, `RESET` sent.
    fn fail_conn(&mut self, slot: usize, why: &str) {
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        let id = c.id;
        c.out = VecDeque::new();
        let had_socket = !c.socket_gone;
        c.socket_gone = true;
        if had_socket {
            self.actions.push_back(Action::Reset(slot));
        }
        self.conn_errors
            .push(format!("connection {id}: {why}; reset"));
        self.terminate(slot, Terminal::Reset(Reason::Protocol));
    }

    // ---- frames out ----

    /// Encodes the next frame to send into `out` (cleared first): `HELLO` first, then the
    /// connections' control frames in order, then a `PING` if one is due. `false`: nothing.
    pub fn next_control(&mut self, out: &mut Vec<u8>, now: Instant) -> bool {
        out.clear();
        if !self.hello_sent {
            self.hello_sent = true;
            Frame::Hello(self.hello()).encode(out);
            self.last_sent = now;
            return true;
        }
        while let Some(&slot) = self.control.front() {
            let Some(c) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                self.control.pop_front();
                continue;
            };
            let id = c.id;
            let frame = if let Some(origin) = c.ctl.open.take() {
                c.announced = true;
                Frame::Open {
                    conn: id,
                    origin: &origin,
                }
                .encode(out);
                // Its socket may be read from now on.
                self.actions.push_back(Action::Readable(slot));
                None
            } else if c.ctl.opened {
                c.ctl.opened = false;
                c.announced = true;
                self.actions.push_back(Action::Readable(slot));
                Some(Frame::Opened { conn: id })
            } else if c.ctl.credit > 0 {
                let bytes = one(c.ctl.credit);
                c.ctl.credit -= u64::from(bytes);
                Some(Frame::Credit { conn: id, bytes })
            } else if c.ctl.shut {
                c.ctl.shut = false;
                Some(Frame::Shut { conn: id })
            } else if let Some(t) = c.ctl.terminal.take() {
                c.terminal_sent = true;
                let release = c.terminal_received;
                let f = match t {
                    Terminal::Close => Frame::Close { conn: id },
                    Terminal::Reset(reason) => Frame::Reset { conn: id, reason },
                };
                f.encode(out);
                self.control.pop_front();
                c.in_control_queue = false;
                if release {
                    self.release(slot);
                }
                self.last_sent = now;
                return true;
            } else {
                self.control.pop_front();
                c.in_control_queue = false;
                continue;
            };
            if let Some(f) = frame {
                f.encode(out);
            }
            self.last_sent = now;
            return true;
        }
        // Pings only once the other side is there (nobody would read them before).
        if self.peer.is_some()
            && now.saturating_duration_since(self.last_sent) >= self.params.keepalive
        {
            Frame::Ping.encode(out);
            self.last_sent = now;
            return true;
        }
        false
    }

    /// Whether control frames wait to be sent ([`Session::next_control`] has work).
    pub fn wants_to_send(&self) -> bool {
        !self.hello_sent || !self.control.is_empty()
    }

    /// A `DATA` frame went out (for the keepalive).
    pub fn sent_data(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// When the session must next be looked at for keepalives, or an error if the other side
    /// has been silent for longer than four of its keepalive intervals (at least 1 s).
    pub fn check_timers(&self, now: Instant) -> Result<Instant, SessionError> {
        let mut next = self.last_sent + self.params.keepalive;
        if let Some(peer) = self.peer {
            let promised = Duration::from_millis(peer.keepalive_ms.into());
            let limit = (promised * 4).max(Duration::from_secs(1));
            let silent = now.saturating_duration_since(self.last_received);
            if silent > limit {
                return Err(SessionError::Silent(silent, promised));
            }
            next = next.min(self.last_received + limit + Duration::from_millis(1));
        }
        Ok(next)
    }

    // ---- frames in ----

    /// Handles one received message. `Some(Direct)`: the message is `DATA` for a connection
    /// with nothing buffered; the loop writes `msg[offset..]` to the socket itself (saving a
    /// copy) and reports with [`Session::direct_written`].
    pub fn on_message(&mut self, msg: &[u8], now: Instant) -> Result<Option<Direct>, SessionError> {
        let frame = Frame::decode(msg)?;
        self.last_received = now;
        let Some(_) = self.peer else {
            let Frame::Hello(h) = frame else {
                return Err(SessionError::NoHello { kind: msg[0] });
            };
            if h.role == self.params.role {
                return Err(SessionError::SameRole(h.role.as_str()));
            }
            self.peer = Some(h);
            self.send_max = h.max_data.min(self.channel_payload_max).max(1);
            return Ok(None);
        };
        let role = self.params.role;
        let wrong = |kind| SessionError::WrongDirection {
            kind,
            role: role.as_str(),
        };
        let conn = match frame {
            Frame::Hello(_) => return Err(SessionError::HelloAgain),
            Frame::Ping => return Ok(None),
            Frame::Open { conn, .. } => {
                if role != Role::Connect {
                    return Err(wrong(frame::kind::OPEN));
                }
                if self.ids.contains_key(&conn) {
                    return Err(SessionError::OpenInUse(conn));
                }
                if self.ids.len() as u64 >= u64::from(self.params.max_connections) {
                    return Err(SessionError::TooManyConnections(
                        self.params.max_connections,
                    ));
                }
                let peer_window = self.peer.map_or(1, |p| p.window);
                let slot = self.insert(Conn::new(conn, self.params.window, peer_window));
                self.actions.push_back(Action::Connect(slot));
                return Ok(None);
            }
            Frame::Opened { conn }
            | Frame::Data { conn, .. }
            | Frame::Credit { conn, .. }
            | Frame::Shut { conn }
            | Frame::Close { conn }
            | Frame::Reset { conn, .. } => conn,
        };
        let kind = msg[0];
        let Some(&slot) = self.ids.get(&conn) else {
            return Err(SessionError::UnknownConn { kind, conn });
        };
        if matches!(frame, Frame::Opened { .. }) && role != Role::Listen {
            return Err(wrong(kind));
        }
        let max_data = self.hello().max_data;
        let Some(c) = self.slots[slot].as_mut() else {
            return Err(SessionError::UnknownConn { kind, conn });
        };
        if c.terminal_received {
            // We still owe our terminal frame; the other side sends nothing after its own.
            let why = format!("frame type {kind} after the other side's CLOSE or RESET");
            self.fail_conn(slot, &why);
            return Ok(None);
        }
        match frame {
            Frame::Opened { .. } => {
                if c.peer_opened {
                    self.fail_conn(slot, "a second OPENED");
                } else {
                    c.peer_opened = true;
                }
            }
            Frame::Data { data, .. } => {
                let len = data.len() as u64;
                if role == Role::Listen && !c.peer_opened {
                    self.fail_conn(slot, "DATA before OPENED");
                } else if c.peer_shut {
                    self.fail_conn(slot, "DATA after SHUT");
                } else if len > u64::from(max_data) {
                    let why = format!("DATA of {len} bytes, more than our max_data {max_data}");
                    self.fail_conn(slot, &why);
                } else if c.received + len > c.granted {
                    let why = format!(
                        "DATA beyond the credit: {} bytes allowed, {} sent",
                        c.granted,
                        c.received + len
                    );
                    self.fail_conn(slot, &why);
                } else if !c.terminal_queued {
                    // (Dropped silently once we reset the connection ourselves.)
                    c.received += len;
                    if c.out.is_empty() && (c.connected || role == Role::Listen) {
                        // Nothing queued before it: the loop writes it from the message.
                        return Ok(Some(Direct {
                            slot,
                            offset: HEADER_LEN,
                        }));
                    }
                    c.out.extend(data);
                }
            }
            Frame::Credit { bytes, .. } => {
                let window = self.peer.map_or(0, |p| p.window);
                let credit = c.credit + u64::from(bytes);
                if credit > u64::from(window) {
                    let why = format!(
                        "CREDIT to {credit} bytes, more than the other side's window {window}"
                    );
                    self.fail_conn(slot, &why);
                } else if !c.read_eof && !c.terminal_queued {
                    let was_zero = c.credit == 0;
                    c.credit = credit;
                    if was_zero {
                        self.actions.push_back(Action::Readable(slot));
                    }
                }
            }
            Frame::Shut { .. } => {
                if role == Role::Listen && !c.peer_opened {
                    self.fail_conn(slot, "SHUT before OPENED");
                } else if c.peer_shut {
                    self.fail_conn(slot, "a second SHUT");
                } else {
                    c.peer_shut = true;
                    c.ctl.credit = 0;
                    let ready = c.out.is_empty() && (c.connected || role == Role::Listen);
                    if ready {
                        self.shut_write(slot);
                    }
                }
            }
            Frame::Close { .. } => {
                if !c.peer_shut || !c.read_eof {
                    self.fail_conn(slot, "CLOSE before both sides sent SHUT");
                    // Their terminal arrived all the same.
                }
                self.terminal_in(slot);
            }
            Frame::Reset { reason, .. } => {
                let had_socket = !c.socket_gone;
                c.socket_gone = true;
                c.out = VecDeque::new();
                if had_socket {
                    self.actions.push_back(Action::Reset(slot));
                }
                self.terminate(slot, Terminal::Reset(reason));
                self.terminal_in(slot);
            }
            Frame::Hello(_) | Frame::Open { .. } | Frame::Ping => {}
        }
        Ok(None)
    }

    /// The other side's terminal frame arrived: free the connection once ours went out.
    fn terminal_in(&mut self, slot: usize) {
        let Some(c) = self.conn_mut(slot) else {
            return;
        };
        c.terminal_received = true;
        if c.terminal_sent {
            self.release(slot);
        }
    }

    /// Every connection's slot (to reset their sockets when the session ends).
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|_| i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: u32 = 4096;

    fn params(role: Role) -> Params {
        Params {
            role,
            window: WINDOW,
            max_data: 1024,
            max_connections: 4,
            keepalive: Duration::from_secs(1),
            session: 1,
        }
    }

    fn session(role: Role) -> Session {
        Session::new(params(role), 1 << 16, Instant::now())
    }

    /// Hands `msg` to `s`; a direct payload is buffered as if the socket took none of it.
    fn receive(s: &mut Session, msg: &[u8]) -> Result<(), SessionError> {
        if let Some(d) = s.on_message(msg, Instant::now())? {
            s.direct_written(d.slot, 0, &msg[d.offset..]);
        }
        Ok(())
    }

    /// Moves every frame `from` wants to send into `to`.
    fn deliver(from: &mut Session, to: &mut Session) -> Result<usize, SessionError> {
        let mut buf = Vec::new();
        let mut n = 0;
        while from.next_control(&mut buf, Instant::now()) {
            receive(to, &buf)?;
            n += 1;
        }
        Ok(n)
    }

    fn actions(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.next_action()).collect()
    }

    fn up() -> (Session, Session) {
        let (mut l, mut c) = (session(Role::Listen), session(Role::Connect));
        deliver(&mut l, &mut c).unwrap();
        deliver(&mut c, &mut l).unwrap();
        (l, c)
    }

    /// A connection accepted on `l` and connected on `c`: (slot on l, slot on c).
    fn open(l: &mut Session, c: &mut Session) -> (usize, usize) {
        let ls = l.accept("test").unwrap();
        deliver(l, c).unwrap();
        let Some(Action::Connect(cs)) = actions(c)
            .into_iter()
            .find(|a| matches!(a, Action::Connect(_)))
        else {
            panic!("no Connect");
        };
        c.connected(cs);
        deliver(c, l).unwrap();
        actions(l);
        actions(c);
        (ls, cs)
    }

    fn data(s: &mut Session, slot: usize, bytes: &[u8]) -> Vec<u8> {
        let h = s.data(slot, bytes.len()).expect("budget");
        let mut f = h.to_vec();
        f.extend_from_slice(bytes);
        f
    }

    #[test]
    fn nothing_before_hello_and_one_role_each() {
        let mut l = session(Role::Listen);
        assert_eq!(l.accept("x"), Err(Refusal::NotReady));
        assert_eq!(
            l.on_message(&Frame::Ping.to_vec(), Instant::now()),
            Err(SessionError::NoHello {
                kind: frame::kind::PING
            })
        );
        let mut l2 = session(Role::Listen);
        let mut other = session(Role::Listen);
        assert_eq!(
            deliver(&mut other, &mut l2),
            Err(SessionError::SameRole("listen"))
        );
        let (mut l, mut c) = up();
        assert_eq!(
            deliver(&mut session(Role::Connect), &mut l),
            Err(SessionError::HelloAgain)
        );
        assert_eq!(c.accept("x"), Err(Refusal::NotListening));
    }

    #[test]
    fn a_connection_opens_carries_bytes_half_closes_and_is_freed_on_both_sides() {
        let (mut l, mut c) = up();
        let (ls, cs) = open(&mut l, &mut c);
        assert_eq!(l.read_budget(ls), 1024);
        // l → c
        let f = data(&mut l, ls, b"hello");
        receive(&mut c, &f).unwrap();
        assert_eq!(actions(&mut c), vec![Action::Flush(cs)]);
        assert_eq!(c.pending(cs).0, b"hello");
        c.wrote(cs, 5);
        // l's client half-closes; c shuts its socket's write side once everything is written.
        l.eof(ls);
        deliver(&mut l, &mut c).unwrap();
        assert_eq!(actions(&mut c), vec![Action::ShutWrite(cs)]);
        // c's server answers and closes: both sides close and free the id.
        let f = data(&mut c, cs, b"bye");
        receive(&mut l, &f).unwrap();
        l.wrote(ls, 3);
        c.eof(cs);
        assert_eq!(actions(&mut c), vec![Action::Close(cs)]);
        deliver(&mut c, &mut l).unwrap();
        assert_eq!(
            actions(&mut l),
            vec![Action::Flush(ls), Action::ShutWrite(ls), Action::Close(ls)]
        );
        deliver(&mut l, &mut c).unwrap();
        assert_eq!(actions(&mut c), vec![Action::Release(cs)]);
        assert_eq!(actions(&mut l), vec![Action::Release(ls)]);
        assert_eq!((l.connections(), c.connections()), (0, 0));
    }

    #[test]
    fn credit_bounds_the_sender_and_the_receiver_checks_it() {
        let (mut l, mut c) = up();
        let (ls, cs) = open(&mut l, &mut c);
        // The sender stops at the window.
        let mut sent = 0;
        while l.read_budget(ls) > 0 {
            let n = l.read_budget(ls);
            let f = data(&mut l, ls, &vec![1; n]);
            receive(&mut c, &f).unwrap();
            sent += n;
        }
        assert_eq!(sent, WINDOW as usize);
        // Writing a quarter of it grants that much again.
        c.wrote(cs, WINDOW as usize / 4);
        deliver(&mut c, &mut l).unwrap();
        assert_eq!(l.read_budget(ls), WINDOW as usize / 4);
        assert!(actions(&mut l).contains(&Action::Readable(ls)));
        // A hostile sender going beyond the credit gets its connection reset (only it).
        let mut f = frame::header(frame::kind::DATA, l.conn_id(ls).unwrap(), 0).to_vec();
        f.extend_from_slice(&[0; 1025]);
        receive(&mut c, &f).unwrap();
        assert_eq!(c.take_conn_errors().len(), 1, "max_data checked");
        let (mut l, mut c) = up();
        let (ls, cs) = open(&mut l, &mut c);
        let id = l.conn_id(ls).unwrap();
        for _ in 0..4 {
            let mut f = frame::header(frame::kind::DATA, id, 0).to_vec();
            f.extend_from_slice(&[0; 1024]);
            receive(&mut c, &f).unwrap();
        }
        assert!(c.take_conn_errors().is_empty());
        let mut f = frame::header(frame::kind::DATA, id, 0).to_vec();
        f.push(0);
        receive(&mut c, &f).unwrap();
        let errors = c.take_conn_errors();
        assert!(errors[0].contains("beyond the credit"), "{errors:?}");
        assert!(actions(&mut c).contains(&Action::Reset(cs)));
        let mut buf = Vec::new();
        assert!(c.next_control(&mut buf, Instant::now()));
        assert_eq!(
            Frame::decode(&buf),
            Ok(Frame::Reset {
                conn: id,
                reason: Reason::Protocol
            })
        );
        // CREDIT beyond the window likewise.
        let (mut l, mut c) = up();
        let (ls, _) = open(&mut l, &mut c);
        let id = l.conn_id(ls).unwrap();
        l.on_message(
            &Frame::Credit { conn: id, bytes: 1 }.to_vec(),
            Instant::now(),
        )
        .unwrap();
        assert!(l.take_conn_errors()[0].contains("more than the other side's window"));
    }

    #[test]
    fn a_reset_frees_the_id_after_both_terminals_and_ids_are_reused() {
        let (mut l, mut c) = up();
        let (ls, cs) = open(&mut l, &mut c);
        let id = l.conn_id(ls).unwrap();
        l.socket_failed(ls);
        deliver(&mut l, &mut c).unwrap();
        assert_eq!(actions(&mut c), vec![Action::Reset(cs)]);
        deliver(&mut c, &mut l).unwrap();
        assert_eq!(actions(&mut c), vec![Action::Release(cs)]);
        assert_eq!(actions(&mut l), vec![Action::Release(ls)]);
        // Frames for a freed id end the session.
        assert_eq!(
            c.on_message(&Frame::Shut { conn: id }.to_vec(), Instant::now()),
            Err(SessionError::UnknownConn {
                kind: frame::kind::SHUT,
                conn: id
            })
        );
    }

    #[test]
    fn limits_are_named_and_enforced() {
        let (mut l, mut c) = up();
        for _ in 0..4 {
            open(&mut l, &mut c);
        }
        assert_eq!(l.accept("x"), Err(Refusal::OwnLimit(4)));
        let mut extra = Frame::Open {
            conn: 999,
            origin: b"",
        }
        .to_vec();
        assert_eq!(
            c.on_message(&extra, Instant::now()),
            Err(SessionError::TooManyConnections(4))
        );
        extra = Frame::Open {
            conn: 1,
            origin: b"",
        }
        .to_vec();
        assert_eq!(
            c.on_message(&extra, Instant::now()),
            Err(SessionError::OpenInUse(1))
        );
    }

    #[test]
    fn silence_ends_the_session() {
        let (l, _c) = up();
        let later = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            l.check_timers(later),
            Err(SessionError::Silent(..))
        ));
    }

    proptest! {
        /// Whatever the other side sends after a valid HELLO: no panic, the table stays
        /// within max_connections, and each connection buffers at most the window.
        #[test]
        fn hostile_frames_never_break_the_bounds(
            frames in proptest::collection::vec(
                (1u8..=9, 0u32..6, 0u32..6000, proptest::collection::vec(any::<u8>(), 0..300)),
                0..120,
            ),
            role in prop_oneof![Just(Role::Listen), Just(Role::Connect)],
        ) {
            let mut s = session(role);
            let peer_role = if role == Role::Listen { Role::Connect } else { Role::Listen };
            let mut hello = session(peer_role);
            let mut buf = Vec::new();
            hello.next_control(&mut buf, Instant::now());
            receive(&mut s, &buf).unwrap();
            for (k, conn, arg, payload) in frames {
                if role == Role::Listen && k == frame::kind::OPEN {
                    let _ = s.accept("x");
                }
                let mut msg = frame::header(k, conn, arg).to_vec();
                msg.extend_from_slice(&payload);
                let _ = receive(&mut s, &msg);
                for a in actions(&mut s) {
                    match a {
                        Action::Connect(slot) => s.connected(slot),
                        Action::Flush(slot) => {
                            let n = s.pending(slot).0.len() / 2;
                            s.wrote(slot, n);
                        }
                        _ => {}
                    }
                }
                while s.next_control(&mut buf, Instant::now()) {}
                prop_assert!(s.connections() <= 4);
                for slot in s.slots().collect::<Vec<_>>() {
                    let (a, b) = s.pending(slot);
                    prop_assert!(a.len() + b.len() <= WINDOW as usize);
                }
            }
        }
    }
}
