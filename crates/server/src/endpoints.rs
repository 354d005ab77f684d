//! Factory and control sockets and their connections: JSON lines served from the same loop.
//!
//! A connection is read until `EAGAIN`; every complete line is answered at once (responses are
//! queued and written as the socket takes them). A client that sends more than it reads is
//! disconnected once [`MAX_OUTPUT`] bytes of responses wait for it.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use ivshm_policy::GuestShmStatus;
use ivshm_proto::control::{ControlRequest, ControlResponse};
use ivshm_proto::factory::{
    decode_line, encode_line, FactoryRequest, FactoryResponse, LineBuffer, LineError, VERSION,
};
use rustix::event::epoll::EventFlags;
use rustix::io::Errno;
use rustix::net::{recv, send, RecvFlags, SendFlags};

use crate::event_loop::Token;
use crate::limits::is_fd_exhaustion;
use crate::listener::Listener;
use crate::server::Server;

/// Responses waiting beyond this many bytes mean the client does not read: it is dropped.
pub const MAX_OUTPUT: usize = 1 << 20;

/// Connections one factory or control socket serves at once; more are accepted and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// What a socket serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Service {
    /// The factory of a VM.
    Factory(String),
    /// The control socket.
    Control,
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
}

#[derive(Debug)]
pub(crate) enum Endpoint {
    Listener(Listener, Service),
    Connection(LineConnection),
}

/// Every factory and control socket and connection, by key (the [`Token::Aux`] payload).
#[derive(Debug, Default)]
pub(crate) struct Endpoints {
    map: HashMap<u64, Endpoint>,
    next: u64,
}

impl Endpoints {
    fn insert(&mut self, endpoint: Endpoint) -> u64 {
        let key = self.next;
        self.next += 1;
        self.map.insert(key, endpoint);
        key
    }

    /// Removes an endpoint (closing it).
    pub(crate) fn remove(&mut self, key: u64) -> Option<Endpoint> {
        self.map.remove(&key)
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
            Endpoint::Listener(..) => true,
        });
    }
}

impl Server {
    /// Watches a factory or control listener; returns its key.
    pub(crate) fn add_endpoint_listener(
        &mut self,
        listener: Listener,
        service: Service,
    ) -> Result<u64, Errno> {
        let key = self.endpoints.next;
        self.poller.add(listener.fd(), Token::Aux(key))?;
        self.endpoints.insert(Endpoint::Listener(listener, service));
        Ok(key)
    }

    pub(crate) fn on_endpoint_event(&mut self, key: u64, flags: EventFlags) {
        match self.endpoints.map.get(&key) {
            Some(Endpoint::Listener(..)) => self.accept_endpoint_connections(key),
            Some(Endpoint::Connection(_)) => self.serve_connection(key, flags),
            None => {}
        }
    }

    fn accept_endpoint_connections(&mut self, key: u64) {
        loop {
            let Some(Endpoint::Listener(listener, service)) = self.endpoints.map.get(&key) else {
                return;
            };
            let service = service.clone();
            match listener.accept() {
                Ok(Some(fd)) if self.endpoints.connections_of(&service) >= MAX_CONNECTIONS => {
                    drop(fd);
                    tracing::warn!(
                        ?service,
                        "refused a connection: {MAX_CONNECTIONS} are open on this socket"
                    );
                }
                Ok(Some(fd)) => {
                    let connection = LineConnection {
                        fd,
                        service,
                        input: LineBuffer::new(),
                        output: Vec::new(),
                        writable_interest: false,
                        peer_closed: false,
                    };
                    let conn_key = self.endpoints.insert(Endpoint::Connection(connection));
                    let watched = match self.endpoints.map.get(&conn_key) {
                        Some(Endpoint::Connection(c)) => {
                            self.poller.add(c.fd.as_fd(), Token::Aux(conn_key))
                        }
                        _ => Err(Errno::INVAL),
                    };
                    if let Err(errno) = watched {
                        tracing::error!(%errno, "cannot watch a factory/control connection");
                        self.endpoints.remove(conn_key);
                    }
                }
                Ok(None) => return,
                Err(errno) if is_fd_exhaustion(errno) => {
                    // Accept into the reserve fd's slot and close, so the listener does not
                    // stay readable forever.
                    let refused = self.reserve.release_for(|| listener.accept());
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

    fn serve_connection(&mut self, key: u64, flags: EventFlags) {
        let Some(Endpoint::Connection(mut connection)) = self.endpoints.map.remove(&key) else {
            return;
        };
        if flags.intersects(EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR)
            && !connection.peer_closed
        {
            connection.read_available();
            while let Some(line) = connection.input.next_line() {
                let response = self.answer(&connection.service, line);
                connection.output.extend_from_slice(&response);
            }
        }
        match connection.flush(&self.poller, key) {
            Ok(()) if connection.output.len() > MAX_OUTPUT => {
                tracing::warn!("dropping a factory/control client that does not read its answers");
            }
            Ok(()) if connection.peer_closed && connection.output.is_empty() => {}
            Ok(()) => {
                self.endpoints
                    .map
                    .insert(key, Endpoint::Connection(connection));
            }
            Err(errno) => tracing::debug!(%errno, "factory/control connection ended"),
        }
    }

    /// The response line to one request line.
    fn answer(&mut self, service: &Service, line: Result<Vec<u8>, LineError>) -> Vec<u8> {
        match service {
            Service::Factory(vm) => {
                let response = match line.and_then(|l| decode_line::<FactoryRequest>(&l)) {
                    Ok(request) => self.factory_request(vm, request),
                    Err(error) => {
                        self.stats.factory_request();
                        self.stats.refusal(GuestShmStatus::UnknownFailure);
                        FactoryResponse {
                            version: VERSION,
                            status: GuestShmStatus::UnknownFailure.qnx_name().to_string(),
                            code: GuestShmStatus::UnknownFailure.as_u32(),
                            message: error.to_string(),
                            region: None,
                        }
                    }
                };
                encode_line(&response)
            }
            Service::Control => {
                let response = match line.and_then(|l| decode_line::<ControlRequest>(&l)) {
                    Ok(request) => self.control_request(request),
                    Err(error) => ControlResponse::error(error.to_string()),
                };
                encode_line(&response)
            }
        }
    }
}

impl LineConnection {
    /// Reads what is there (bounded per event, so one client cannot starve the loop).
    fn read_available(&mut self) {
        let mut buf = [0u8; 4096];
        for _ in 0..64 {
            match recv(&self.fd, &mut buf, RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.peer_closed = true;
                    return;
                }
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
    fn flush(&mut self, poller: &crate::event_loop::Poller, key: u64) -> Result<(), Errno> {
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
