//! Factory and control sockets and their connections: JSON lines served from the same loop;
//! and the optional HTTP metrics listener (TCP) and its connections ([`crate::metrics`]).
//!
//! A connection is read until `EAGAIN`; every complete line is answered at once (responses are
//! queued and written as the socket takes them). A client that sends more than it reads is
//! disconnected once [`MAX_OUTPUT`] bytes of responses wait for it.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use ivshm_proto::factory::{LineBuffer, LineError};
use rustix::event::epoll::EventFlags;
use rustix::io::Errno;
use rustix::net::{recv, send, RecvFlags, SendFlags, SocketFlags};

use crate::event_loop::{Poller, Token};
use crate::limits::{is_fd_exhaustion, ReserveFd};
use crate::listener::Listener;
use crate::metrics::{self, RequestReader};

/// Responses waiting beyond this many bytes mean the client does not read: it is dropped.
pub const MAX_OUTPUT: usize = 1 << 20;

/// Connections one factory or control socket serves at once; more are accepted and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Bytes a metrics connection is read per event.
const METRICS_READ: usize = 16 << 10;

/// What a socket serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Service {
    /// The factory of a VM.
    Factory(String),
    /// The control socket.
    Control,
    /// The HTTP metrics listener.
    Metrics,
}

/// An accepted factory or control connection.
#[derive(Debug)]
pub(crate) struct LineConnection {
    fd: OwnedFd,
    service: Service,
    input: LineBuffer,
    output: Vec<u8>,
    writable_interest: bool,
    /// The client closed its end: close once everything is written.
    peer_closed: bool,
    /// Answered (HTTP): close once everything is written.
    done: bool,
    /// When it was accepted (metrics connections time out).
    accepted: Instant,
    /// The HTTP request being read (metrics connections).
    http: RequestReader,
}

#[derive(Debug)]
enum Endpoint {
    Listener(Listener, Service),
    /// The metrics listener (TCP).
    MetricsListener(OwnedFd),
    Connection(LineConnection),
}

/// What an endpoint key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndpointKind {
    /// A factory or control socket.
    Listener,
    /// A connection to one.
    Connection,
}

/// Every factory and control socket and connection, by key (the [`Token::Aux`] payload), and
/// their place in the epoll set: the only code that adds them to it or takes them out.
#[derive(Debug)]
pub(crate) struct Endpoints {
    poller: Arc<Poller>,
    map: HashMap<u64, Endpoint>,
    next: u64,
}

impl Endpoints {
    pub(crate) fn new(poller: Arc<Poller>) -> Self {
        Endpoints {
            poller,
            map: HashMap::new(),
            next: 0,
        }
    }

    /// Watches the metrics listener (a non-blocking TCP socket); returns its key.
    pub(crate) fn add_metrics_listener(&mut self, fd: OwnedFd) -> Result<u64, Errno> {
        let key = self.next;
        self.poller.add(fd.as_fd(), Token::Aux(key))?;
        self.next += 1;
        self.map.insert(key, Endpoint::MetricsListener(fd));
        Ok(key)
    }

    /// Closes metrics connections older than [`metrics::REQUEST_TIMEOUT`] (called as the loop
    /// goes round, so a client that never finishes its request holds nothing for long).
    pub(crate) fn expire_metrics_connections(&mut self) {
        let now = Instant::now();
        self.map.retain(|_, endpoint| match endpoint {
            Endpoint::Connection(c) if c.service == Service::Metrics => {
                now.duration_since(c.accepted) < metrics::REQUEST_TIMEOUT
            }
            _ => true,
        });
    }

    /// Whether a metrics connection is open (the loop then wakes up to expire it).
    pub(crate) fn has_metrics_connections(&self) -> bool {
        self.connections_of(&Service::Metrics) > 0
    }

    /// Watches a factory or control listener; returns its key.
    pub(crate) fn add_listener(
        &mut self,
        listener: Listener,
        service: Service,
    ) -> Result<u64, Errno> {
        let key = self.next;
        self.poller.add(listener.fd(), Token::Aux(key))?;
        self.next += 1;
        self.map.insert(key, Endpoint::Listener(listener, service));
        Ok(key)
    }

    /// The file name and identity (device, inode as bound) of listener `key`'s socket.
    pub(crate) fn listener_file(&self, key: u64) -> Option<(String, (u64, u64))> {
        match self.map.get(&key) {
            Some(Endpoint::Listener(listener, _)) => Some((
                listener.path().file_name()?.to_str()?.to_string(),
                listener.identity(),
            )),
            _ => None,
        }
    }

    /// Removes an endpoint (closing it; a listener's file goes with it).
    pub(crate) fn remove(&mut self, key: u64) {
        self.map.remove(&key);
    }

    /// Closes every socket and connection.
    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }

    /// What `key` names, if it is here.
    pub(crate) fn kind(&self, key: u64) -> Option<EndpointKind> {
        self.map.get(&key).map(|e| match e {
            Endpoint::Listener(..) | Endpoint::MetricsListener(_) => EndpointKind::Listener,
            Endpoint::Connection(_) => EndpointKind::Connection,
        })
    }

    fn connections_of(&self, service: &Service) -> usize {
        self.map
            .values()
            .filter(|e| matches!(e, Endpoint::Connection(c) if &c.service == service))
            .count()
    }

    /// Closes every connection to `service` (a VM that is gone).
    pub(crate) fn close_connections_of(&mut self, service: &Service) {
        self.map.retain(|_, endpoint| match endpoint {
            Endpoint::Connection(c) => &c.service != service,
            Endpoint::Listener(..) | Endpoint::MetricsListener(_) => true,
        });
    }

    /// Accepts every connection waiting on listener `key` (beyond [`MAX_CONNECTIONS`] per
    /// socket they are closed at once; out of fds, one is accepted into the reserve fd's slot
    /// and closed).
    pub(crate) fn accept_all(&mut self, key: u64, reserve: &mut ReserveFd) {
        loop {
            let (accepted, service) = match self.map.get(&key) {
                Some(Endpoint::Listener(listener, service)) => (listener.accept(), service.clone()),
                Some(Endpoint::MetricsListener(fd)) => (
                    match rustix::net::accept_with(fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
                    {
                        Ok(fd) => Ok(Some(fd)),
                        Err(Errno::AGAIN) => Ok(None),
                        Err(e) => Err(e),
                    },
                    Service::Metrics,
                ),
                _ => return,
            };
            if service == Service::Metrics
                && matches!(accepted, Ok(Some(_)))
                && self.connections_of(&service) >= metrics::MAX_CONNECTIONS
            {
                // The oldest metrics connection makes room: a client that holds connections
                // open cannot lock the scrapers out.
                if let Some(oldest) = self
                    .map
                    .iter()
                    .filter(|(_, e)| matches!(e, Endpoint::Connection(c) if c.service == Service::Metrics))
                    .min_by_key(|(_, e)| match e {
                        Endpoint::Connection(c) => c.accepted,
                        _ => Instant::now(),
                    })
                    .map(|(k, _)| *k)
                {
                    self.map.remove(&oldest);
                }
            }
            match accepted {
                Ok(Some(fd)) if self.connections_of(&service) >= MAX_CONNECTIONS => {
                    drop(fd);
                    tracing::warn!(
                        ?service,
                        "refused a connection: {MAX_CONNECTIONS} are open on this socket"
                    );
                }
                Ok(Some(fd)) => {
                    let conn_key = self.next;
                    if let Err(errno) = self.poller.add(fd.as_fd(), Token::Aux(conn_key)) {
                        tracing::error!(%errno, "cannot watch a factory/control connection");
                        continue;
                    }
                    self.next += 1;
                    let connection = LineConnection {
                        fd,
                        service,
                        input: LineBuffer::new(),
                        output: Vec::new(),
                        writable_interest: false,
                        peer_closed: false,
                        done: false,
                        accepted: Instant::now(),
                        http: RequestReader::default(),
                    };
                    self.map.insert(conn_key, Endpoint::Connection(connection));
                }
                Ok(None) => return,
                Err(errno) if is_fd_exhaustion(errno) => {
                    // Accept into the reserve fd's slot and close, so the listener does not
                    // stay readable forever.
                    let refused = reserve.release_for(|| match self.map.get(&key) {
                        Some(Endpoint::Listener(listener, _)) => listener.accept(),
                        Some(Endpoint::MetricsListener(fd)) => {
                            rustix::net::accept_with(fd, SocketFlags::CLOEXEC).map(Some)
                        }
                        _ => Ok(None),
                    });
                    tracing::error!(%errno, "out of file descriptors: refused a factory/control connection");
                    if !matches!(refused, Ok(Some(_))) {
                        return;
                    }
                }
                Err(errno) => {
                    tracing::error!(%errno, "accept on a factory/control socket failed");
                    return;
                }
            }
        }
    }

    /// Takes connection `key` out to serve it; [`restore`](Self::restore) puts it back.
    pub(crate) fn take_connection(&mut self, key: u64) -> Option<LineConnection> {
        match self.map.remove(&key) {
            Some(Endpoint::Connection(connection)) => Some(connection),
            Some(other) => {
                self.map.insert(key, other);
                None
            }
            None => None,
        }
    }

    /// Writes what connection `key` has queued and puts it back, unless it is done (closed by
    /// the client with nothing left to write), broken, or does not read its answers.
    pub(crate) fn restore(&mut self, key: u64, mut connection: LineConnection) {
        match connection.flush(&self.poller, key) {
            Ok(()) if connection.output.len() > MAX_OUTPUT => {
                tracing::warn!("dropping a factory/control client that does not read its answers");
            }
            Ok(())
                if (connection.peer_closed || connection.done) && connection.output.is_empty() => {}
            Ok(()) => {
                self.map.insert(key, Endpoint::Connection(connection));
            }
            Err(errno) => tracing::debug!(%errno, "factory/control connection ended"),
        }
    }
}

impl LineConnection {
    /// What it is connected to.
    pub(crate) fn service(&self) -> &Service {
        &self.service
    }

    /// Reads what the event `flags` say is there; false if nothing is to be read.
    pub(crate) fn read(&mut self, flags: EventFlags) -> bool {
        if self.peer_closed
            || !flags
                .intersects(EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR)
        {
            return false;
        }
        self.read_available();
        true
    }

    /// The next complete request line read.
    pub(crate) fn next_request(&mut self) -> Option<Result<Vec<u8>, LineError>> {
        self.input.next_line()
    }

    /// Queues a response (written by [`Endpoints::restore`]).
    pub(crate) fn respond(&mut self, response: &[u8]) {
        self.output.extend_from_slice(response);
    }

    /// The HTTP request of a metrics connection.
    pub(crate) fn http(&mut self) -> &mut RequestReader {
        &mut self.http
    }

    /// Queues the last response: the connection closes once it is written.
    pub(crate) fn respond_and_close(&mut self, response: &[u8]) {
        self.output.extend_from_slice(response);
        self.done = true;
    }

    /// Whether the last response is queued.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Reads what is there (bounded per event, so one client cannot starve the loop). A
    /// metrics request is a few short lines: at most [`METRICS_READ`] bytes are taken per
    /// event, and nothing is kept once it is answered, so a client that streams after (or
    /// instead of) its request costs neither memory nor time.
    fn read_available(&mut self) {
        let mut buf = [0u8; 4096];
        let rounds = if self.service == Service::Metrics {
            METRICS_READ / buf.len()
        } else {
            64
        };
        for _ in 0..rounds {
            match recv(&self.fd, &mut buf, RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.peer_closed = true;
                    return;
                }
                Ok(_) if self.done => {}
                Ok((n, _)) => self.input.push(buf.get(..n).unwrap_or_default()),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return,
                Err(_) => {
                    self.peer_closed = true;
                    return;
                }
            }
        }
    }

    /// Writes what the socket takes; watches writability while something waits.
    fn flush(&mut self, poller: &Poller, key: u64) -> Result<(), Errno> {
        while !self.output.is_empty() {
            match send(
                &self.fd,
                &self.output,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            ) {
                Ok(0) => return Err(Errno::PIPE),
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break,
                Err(e) => return Err(e),
            }
        }
        let want = !self.output.is_empty();
        if want != self.writable_interest {
            poller.set_writable_interest(self.fd.as_fd(), Token::Aux(key), want)?;
            self.writable_interest = want;
        }
        Ok(())
    }
}
