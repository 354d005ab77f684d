//! The server: the owners of its state and the one epoll loop that dispatches to them.
//!
//! Each concern has one owner with private state: [`Regions`] (regions and their listening
//! sockets), [`Connections`] (peer connections), [`NamedRegions`] (named regions' VMs and
//! configuration), [`Endpoints`] (factory and control sockets and their connections). The
//! loop here only routes events and requests to them.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ivshm_proto::factory::LineError;
use rustix::event::epoll::{Event, EventFlags};
use rustix::io::Errno;

use crate::config::ServerConfig;
use crate::control;
use crate::endpoints::{EndpointKind, Endpoints, Service};
use crate::event_loop::{token_of, Poller, Token};
use crate::factory;
use crate::limits::{raise_nofile_limit, ReserveFd};
use crate::listener_table::SocketKey;
use crate::metrics;
use crate::named::Origin;
use crate::named_regions::NamedRegions;
use crate::observer::{Observer, ObserverSlot};
use crate::peer::Connections;
use crate::region::RegionInfo;
use crate::regions::{EventContext, RegionId, Regions};
use crate::service_notify::ServiceNotifier;
use crate::stats::Stats;
use crate::ServerError;

/// How often sends refused with `ETOOMANYREFS` are tried again (the peers they are for wait;
/// each try first drops the peer holding the most unread fds).
pub(crate) const FDS_IN_FLIGHT_RETRY: Duration = Duration::from_millis(100);

/// What readiness of a control fd means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// Return from [`Server::run_until`].
    Stop,
    /// Log every region and peer, then go on.
    LogStatus,
    /// Re-read the configuration file (if the server has one), then log the status.
    Reload,
}

/// A file descriptor the loop watches besides its sockets (a signal pipe, an eventfd).
///
/// It must be non-blocking: when it becomes readable the loop reads it until `EAGAIN`, then acts.
#[derive(Debug, Clone, Copy)]
pub struct Control<'a> {
    /// The fd.
    pub fd: BorrowedFd<'a>,
    /// What its readiness means.
    pub action: ControlAction,
}

/// An ivshmem server: regions with their listeners and peers, served by one thread.
///
/// Dropping it closes every peer connection, removes the socket files and removes named shm
/// objects that are not to be kept.
#[derive(Debug)]
pub struct Server {
    poller: Arc<Poller>,
    /// Regions and their listening sockets.
    regions: Regions,
    /// Peer connections by serial.
    connections: Connections,
    /// Factory and control sockets and their connections.
    endpoints: Endpoints,
    /// VMs and the named configuration (`None` without named regions).
    named: Option<NamedRegions>,
    /// The spare fd used to refuse connections when fds run out.
    reserve: ReserveFd,
    stats: Arc<Stats>,
    /// Told about accepted connections, joins, removals and wake-ups.
    observer: ObserverSlot,
    /// The service manager to tell about reloads (`RELOADING=1`, then `READY=1`).
    notifier: Option<ServiceNotifier>,
}

impl Server {
    /// Validates `config`, raises the fd limit, creates every region's memory and binds its
    /// sockets (VM directories, factories and the control socket too). When this returns,
    /// peers can connect (they are served once the loop runs).
    pub fn new(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let limit = raise_nofile_limit();
        tracing::debug!(soft = ?limit.soft, hard = ?limit.hard, "open file limit");
        let poller = Arc::new(Poller::new().map_err(ServerError::Epoll)?);
        let mut server = Server {
            regions: Regions::new(
                poller.clone(),
                config.max_queued_messages,
                config.mark_channel_departures,
            ),
            connections: Connections::new(poller.clone()),
            endpoints: Endpoints::new(poller.clone()),
            poller,
            named: None,
            reserve: ReserveFd::new(),
            stats: Arc::new(Stats::default()),
            observer: ObserverSlot::default(),
            notifier: None,
        };
        for region in &config.regions {
            server.regions.add_standalone(region)?;
        }
        if let Some(named) = config.named {
            server.named = Some(NamedRegions::setup(
                named,
                &mut server.regions,
                &mut server.endpoints,
            )?);
        }
        server.regions.started();
        Ok(server)
    }

    /// Installs `observer`: the loop calls it as connections come and peers go (see
    /// [`Observer`]).
    pub fn set_observer(&mut self, observer: impl Observer + Send + 'static) {
        self.observer.set(Box::new(observer));
    }

    /// Removes every peer of every region the way QEMU's `ivshmem-server` does when it stops:
    /// one at a time in join order, each removal announced to the peers still there (the last
    /// peer hears of every other's leave before its own connection closes). Without this,
    /// dropping the server just closes every connection, so peers keep their doorbells to each
    /// other. Messages that the sockets do not take at once are lost.
    ///
    /// The regions' listening sockets are closed and removed first, so a peer that reconnects
    /// at once finds no socket, rather than a connection that is reset a moment later.
    pub fn remove_all_peers(&mut self) {
        let mut ctx = EventContext {
            stats: &self.stats,
            connections: &mut self.connections,
            observer: self.observer.get(),
        };
        self.regions.remove_all_peers(&mut ctx);
    }

    /// Tells `notifier` (a service manager) about reloads from now on: `RELOADING=1` before
    /// and `READY=1` after each [`ControlAction::Reload`]. Readiness and stopping are the
    /// caller's to send (it knows when it is ready).
    pub fn set_notifier(&mut self, notifier: ServiceNotifier) {
        self.notifier = Some(notifier);
    }

    /// The notifier set by [`set_notifier`](Self::set_notifier).
    pub fn notifier(&self) -> Option<&ServiceNotifier> {
        self.notifier.as_ref()
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The socket path of every standalone region, in configuration order.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        self.regions
            .iter()
            .filter(|(_, r)| r.origin() == Origin::Standalone)
            .filter_map(|(id, _)| self.regions.info(id))
            .map(|info| info.socket)
            .collect()
    }

    /// Facts about every region, in creation order.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.regions
            .iter()
            .filter_map(|(id, _)| self.regions.info(id))
            .collect()
    }

    /// A one-line summary for a service manager's status: regions, peers, VMs.
    pub fn status_line(&self) -> String {
        let vms = self.named.as_ref().map_or(0, |n| n.vms().iter().count());
        format!(
            "serving {} region(s), {} peer(s), {} VM director(ies)",
            self.regions.iter().count(),
            self.peer_count(),
            vms
        )
    }

    /// Peers connected now, over all regions.
    pub fn peer_count(&self) -> usize {
        self.regions.peer_count()
    }

    /// Serves until a [`ControlAction::Stop`] control becomes readable. Peer misbehaviour never
    /// ends the loop; only a failing epoll does.
    pub fn run_until(&mut self, controls: &[Control<'_>]) -> Result<(), ServerError> {
        for (i, control) in controls.iter().enumerate() {
            self.poller
                .add(control.fd, Token::Control(i))
                .map_err(ServerError::Epoll)?;
        }
        let result = self.serve(controls);
        for control in controls {
            let _ = self.poller.remove(control.fd);
        }
        result
    }

    fn serve(&mut self, controls: &[Control<'_>]) -> Result<(), ServerError> {
        let mut events: Vec<Event> = Vec::with_capacity(256);
        loop {
            self.poller
                .wait(&mut events, self.next_wakeup())
                .map_err(ServerError::Epoll)?;
            self.endpoints.expire_metrics_connections();
            self.reclaim_unused();
            let mut lost_peers: Vec<RegionId> = Vec::new();
            let mut freed_fds = self.relieve_fds_in_flight();
            // Peers went away in this batch (their fds are closed), and from which regions.
            let mut peers_or_listeners = false;
            for event in &events {
                let flags = event.flags;
                match token_of(event) {
                    Some(Token::Control(i)) => {
                        let Some(control) = controls.get(i) else {
                            continue;
                        };
                        drain(control.fd);
                        match control.action {
                            ControlAction::Stop => {
                                tracing::info!(peers = self.peer_count(), "shutting down");
                                return Ok(());
                            }
                            ControlAction::LogStatus => self.log_status(),
                            ControlAction::Reload => {
                                if let Some(notifier) = &self.notifier {
                                    notifier.reloading();
                                }
                                self.reload_and_log();
                                self.log_status();
                                if let Some(notifier) = &self.notifier {
                                    notifier.ready(&self.status_line());
                                }
                            }
                        }
                    }
                    Some(Token::Listener(key)) => {
                        peers_or_listeners = true;
                        let mut ctx = EventContext {
                            stats: &self.stats,
                            connections: &mut self.connections,
                            observer: self.observer.get(),
                        };
                        let removed =
                            self.regions
                                .accept_all(SocketKey(key), &mut ctx, &mut self.reserve);
                        freed_fds |= removed > 0;
                    }
                    Some(Token::Peer(serial)) => {
                        peers_or_listeners = true;
                        // A peer removed earlier in this batch has no entry any more.
                        let Some(owner) = self.connections.owner(serial) else {
                            continue;
                        };
                        let readable = flags.intersects(
                            EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR,
                        );
                        let writable = flags.contains(EventFlags::OUT);
                        let mut ctx = EventContext {
                            stats: &self.stats,
                            connections: &mut self.connections,
                            observer: self.observer.get(),
                        };
                        let removed = self
                            .regions
                            .on_peer_event(owner, readable, writable, &mut ctx);
                        if removed > 0 {
                            freed_fds = true;
                            lost_peers.push(owner.0);
                        }
                    }
                    Some(Token::Aux(key)) => match self.endpoints.kind(key) {
                        Some(EndpointKind::Listener) => {
                            self.endpoints.accept_all(key, &mut self.reserve);
                        }
                        Some(EndpointKind::Connection) => self.serve_connection(key, flags),
                        None => {}
                    },
                    None => tracing::debug!("event with an unknown token"),
                }
            }
            // Sends refused for lack of fds in flight in this batch: make room, try again.
            freed_fds |= self.relieve_fds_in_flight();
            // Peers that went away freed fds: listeners paused for lack of fds resume, and
            // regions that should not outlive their peers go.
            if freed_fds {
                lost_peers.extend(self.regions.iter().map(|(id, _)| id));
                self.regions.resume_accepting();
                for id in lost_peers {
                    self.regions.reap(id);
                }
            }
            if peers_or_listeners {
                self.observer.get().wakeup_handled();
            }
        }
    }

    /// How long the loop may sleep: until a metrics connection may time out (1 s), until the
    /// next retry of sends refused for lack of fds in flight ([`FDS_IN_FLIGHT_RETRY`]), until
    /// the next factory-made region nobody joined is due to go; no limit when nothing waits.
    fn next_wakeup(&self) -> Option<Duration> {
        let metrics = self
            .endpoints
            .has_metrics_connections()
            .then_some(Duration::from_secs(1));
        let starved = self
            .connections
            .has_starved()
            .then_some(FDS_IN_FLIGHT_RETRY);
        let unused = self
            .unused_timeout()
            .and_then(|timeout| self.regions.next_unused_deadline(timeout))
            .map(|due| due.saturating_duration_since(Instant::now()));
        metrics.into_iter().chain(starved).chain(unused).min()
    }

    /// How long a factory-made region may wait for its first peer (`unused_timeout`).
    fn unused_timeout(&self) -> Option<Duration> {
        self.named
            .as_ref()
            .and_then(|n| n.defaults().unused_timeout)
    }

    /// Removes the factory-made regions that nobody joined in time.
    fn reclaim_unused(&mut self) {
        let Some(timeout) = self.unused_timeout() else {
            return;
        };
        if self
            .regions
            .next_unused_deadline(timeout)
            .is_some_and(|due| due <= Instant::now())
        {
            for change in self.regions.reclaim_unused(timeout) {
                tracing::info!("{change}");
            }
        }
    }

    /// Drops the worst holder of unread fds and retries refused sends, if any were refused.
    /// Returns whether peers were removed.
    fn relieve_fds_in_flight(&mut self) -> bool {
        if !self.connections.has_starved() {
            return false;
        }
        let mut ctx = EventContext {
            stats: &self.stats,
            connections: &mut self.connections,
            observer: self.observer.get(),
        };
        self.regions.relieve_fds_in_flight(&mut ctx) > 0
    }

    /// Opens the HTTP metrics listener on `address` (`GET /metrics`, see [`crate::metrics`]),
    /// served by this loop; returns the address it listens on (port 0 picks a free one).
    pub fn listen_metrics(
        &mut self,
        address: std::net::SocketAddr,
    ) -> Result<std::net::SocketAddr, ServerError> {
        let listener = metrics::bind(address)?;
        self.serve_metrics(listener)
    }

    /// Serves `GET /metrics` on `listener` (from [`metrics::bind`]) in this loop; returns the
    /// address it listens on. An address other than loopback is logged as a warning: every
    /// host that reaches it sees the region and VM names and the peer counts.
    pub fn serve_metrics(
        &mut self,
        listener: std::net::TcpListener,
    ) -> Result<std::net::SocketAddr, ServerError> {
        let bound = listener
            .local_addr()
            .and_then(|a| listener.set_nonblocking(true).map(|()| a))
            .map_err(|error| ServerError::Metrics {
                address: "the metrics listener".to_string(),
                error,
            })?;
        self.endpoints
            .add_metrics_listener(std::os::fd::OwnedFd::from(listener))
            .map_err(ServerError::Epoll)?;
        tracing::info!("metrics on http://{bound}/metrics");
        if let Some(warning) = metrics::exposure_warning(bound) {
            tracing::warn!("{warning}");
        }
        Ok(bound)
    }

    /// The metrics text (Prometheus exposition format) now.
    pub fn metrics_text(&self) -> String {
        let regions: Vec<_> = self
            .regions
            .iter()
            .filter_map(|(id, _)| control::region_report(&self.regions, id))
            .collect();
        let vms = self
            .named
            .as_ref()
            .map(|named| control::vm_reports(named, &self.regions))
            .unwrap_or_default();
        metrics::render_prometheus(&control::stats_report(&self.stats), &regions, &vms)
    }

    /// Reads factory or control connection `key` and answers every complete request line.
    fn serve_connection(&mut self, key: u64, flags: EventFlags) {
        let Some(mut connection) = self.endpoints.take_connection(key) else {
            return;
        };
        if *connection.service() == Service::Metrics {
            if connection.read(flags) {
                while let Some(line) = connection.next_request() {
                    if connection.is_done() {
                        break;
                    }
                    if let Some(request) = connection.http().push(line.map_err(|_| ())) {
                        let response = metrics::response(&request, || self.metrics_text());
                        connection.respond_and_close(&response);
                    }
                }
            }
            self.endpoints.restore(key, connection);
            return;
        }
        if connection.read(flags) {
            while let Some(line) = connection.next_request() {
                let response = self.answer(connection.service(), line);
                connection.respond(&response);
            }
        }
        self.endpoints.restore(key, connection);
    }

    /// The response line to one request line on a factory or control socket.
    fn answer(&mut self, service: &Service, line: Result<Vec<u8>, LineError>) -> Vec<u8> {
        match service {
            Service::Factory(vm) => factory::answer_line(
                self.named.as_ref(),
                &mut self.regions,
                &self.stats,
                vm,
                line,
            ),
            // Metrics connections are answered in serve_connection.
            Service::Metrics => Vec::new(),
            Service::Control => control::answer_line(
                control::Subject {
                    named: self.named.as_mut(),
                    regions: &mut self.regions,
                    endpoints: &mut self.endpoints,
                    stats: &self.stats,
                },
                line,
            ),
        }
    }

    /// Reloads (on `SIGHUP`) and logs the outcome.
    fn reload_and_log(&mut self) {
        let Some(named) = self.named.as_mut().filter(|n| n.has_source()) else {
            return;
        };
        match named.reload(&mut self.regions, &mut self.endpoints) {
            Ok(changes) => crate::named_regions::log_reload(&changes),
            Err(e) => tracing::error!("reload failed, nothing changed: {e}"),
        }
    }

    fn log_status(&self) {
        let s = self.stats.snapshot();
        tracing::info!(
            peers = s.peers_connected,
            joined = s.peers_joined,
            left = s.peers_left,
            dropped = s.peers_dropped,
            refused = s.peers_refused,
            messages = s.messages_sent,
            "status"
        );
        self.regions.log_status();
    }
}

impl Drop for Server {
    /// Closes every socket and connection, then removes the VM directories if they are empty.
    fn drop(&mut self) {
        self.regions.clear();
        self.endpoints.clear();
        if let Some(named) = &self.named {
            named.remove_dirs();
        }
    }
}

/// Reads a non-blocking control fd until it is empty.
fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 64];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return,
            Ok(_) | Err(Errno::INTR) => continue,
            Err(_) => return,
        }
    }
}
