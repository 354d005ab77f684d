//! The server: its regions and the one epoll loop that serves them all.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::event::epoll::{Event, EventFlags};
use rustix::io::Errno;

use crate::config::ServerConfig;
use crate::endpoints::Endpoints;
use crate::event_loop::{token_of, Poller, Token};
use crate::limits::{raise_nofile_limit, ReserveFd};
use crate::named::Origin;
use crate::observer::{Observer, ObserverSlot};
use crate::region::{LoopContext, Region, RegionInfo};
use crate::stats::Stats;
use crate::vm_dirs::Named;
use crate::ServerError;

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
    pub(crate) poller: Poller,
    /// Regions by index (indices are never reused).
    pub(crate) regions: BTreeMap<usize, Region>,
    next_region: usize,
    /// Listener key → region index.
    pub(crate) listener_owner: HashMap<usize, usize>,
    next_listener: usize,
    pub(crate) connections: HashMap<u64, (usize, u16)>,
    next_serial: u64,
    pub(crate) reserve: ReserveFd,
    pub(crate) stats: Arc<Stats>,
    pub(crate) max_queued_messages: usize,
    /// VM directories, factories, control socket.
    pub(crate) named: Option<Named>,
    pub(crate) endpoints: Endpoints,
    observer: ObserverSlot,
}

impl Server {
    /// Validates `config`, raises the fd limit, creates every region's memory and binds its
    /// sockets (VM directories, factories and the control socket too). When this returns,
    /// peers can connect (they are served once the loop runs).
    pub fn new(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let limit = raise_nofile_limit();
        tracing::debug!(soft = ?limit.soft, hard = ?limit.hard, "open file limit");
        let poller = Poller::new().map_err(ServerError::Epoll)?;
        let mut server = Server {
            poller,
            regions: BTreeMap::new(),
            next_region: 0,
            listener_owner: HashMap::new(),
            next_listener: 0,
            connections: HashMap::new(),
            next_serial: 0,
            reserve: ReserveFd::new(),
            stats: Arc::new(Stats::default()),
            max_queued_messages: config.max_queued_messages,
            named: None,
            endpoints: Endpoints::default(),
            observer: ObserverSlot::default(),
        };
        for region in &config.regions {
            let index = server.allocate_region_index();
            let key = server.allocate_listener_key(index);
            let region = Region::new(index, region, config.max_queued_messages, key)?;
            for socket in region.sockets() {
                server
                    .poller
                    .add(socket.listener.fd(), Token::Listener(socket.key))
                    .map_err(ServerError::Epoll)?;
            }
            server.regions.insert(index, region);
        }
        if let Some(named) = config.named {
            server.setup_named(named)?;
        }
        Ok(server)
    }

    pub(crate) fn allocate_region_index(&mut self) -> usize {
        let index = self.next_region;
        self.next_region += 1;
        index
    }

    pub(crate) fn allocate_listener_key(&mut self, region: usize) -> usize {
        let key = self.next_listener;
        self.next_listener += 1;
        self.listener_owner.insert(key, region);
        key
    }

    /// Installs `observer`: the loop calls it as connections come and peers go (see
    /// [`Observer`]).
    pub fn set_observer(&mut self, observer: impl Observer + Send + 'static) {
        self.observer.set(Box::new(observer));
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The socket path of every standalone region, in configuration order.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        self.regions
            .values()
            .filter(|r| r.origin == Origin::Standalone)
            .map(|r| r.socket_path().to_path_buf())
            .collect()
    }

    /// Facts about every region, in creation order.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.regions.values().map(Region::info).collect()
    }

    /// Peers connected now, over all regions.
    pub fn peer_count(&self) -> usize {
        self.regions.values().map(Region::peer_count).sum()
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
            self.poller.wait(&mut events).map_err(ServerError::Epoll)?;
            let removed_before = self.removed_count();
            let mut touched: Vec<usize> = Vec::new();
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
                                self.reload_and_log();
                                self.log_status();
                            }
                        }
                    }
                    Some(Token::Listener(key)) => {
                        peers_or_listeners = true;
                        let Some(&index) = self.listener_owner.get(&key) else {
                            continue;
                        };
                        if let Some((region, mut ctx)) = self.region_with_context(index) {
                            region.accept_all(key, &mut ctx);
                        }
                    }
                    Some(Token::Peer(serial)) => {
                        peers_or_listeners = true;
                        // A peer removed earlier in this batch has no entry any more.
                        let Some(&(index, id)) = self.connections.get(&serial) else {
                            continue;
                        };
                        let readable = flags.intersects(
                            EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR,
                        );
                        let writable = flags.contains(EventFlags::OUT);
                        if let Some((region, mut ctx)) = self.region_with_context(index) {
                            region.on_peer_event(id, readable, writable, &mut ctx);
                            touched.push(index);
                        }
                    }
                    Some(Token::Aux(key)) => self.on_endpoint_event(key, flags),
                    None => tracing::debug!("event with an unknown token"),
                }
            }
            // Peers that went away freed fds: listeners paused for lack of fds resume.
            if self.removed_count() != removed_before {
                for region in self.regions.values_mut().filter(|r| r.accept_paused()) {
                    region.resume_accepting(&self.poller);
                }
                for index in touched {
                    self.reap(index);
                }
            }
            if peers_or_listeners {
                self.observer.get().wakeup_handled();
            }
        }
    }

    /// Region `index` and what the loop lends it while it handles an event.
    fn region_with_context(&mut self, index: usize) -> Option<(&mut Region, LoopContext<'_>)> {
        let total_peers = self.peer_count();
        let region = self.regions.get_mut(&index)?;
        let ctx = LoopContext {
            poller: &self.poller,
            stats: &self.stats,
            connections: &mut self.connections,
            next_serial: &mut self.next_serial,
            reserve: &mut self.reserve,
            total_peers,
            observer: self.observer.get(),
        };
        Some((region, ctx))
    }

    /// Removes region `index` if it is empty and should not outlive its peers: detached ones,
    /// and run-time ones that are not to persist once their last peer has left.
    pub(crate) fn reap(&mut self, index: usize) {
        let Some(region) = self.regions.get(&index) else {
            return;
        };
        let runtime = matches!(region.origin, Origin::Factory | Origin::Control);
        let goes = region.peer_count() == 0
            && (region.detached || (runtime && !region.persist && region.had_peers));
        if goes {
            tracing::info!(
                region = %region.name(),
                "removing region {}: its last peer left",
                region.name()
            );
            self.drop_region(index);
        }
    }

    /// Drops region `index` now (its sockets go with it).
    pub(crate) fn drop_region(&mut self, index: usize) {
        if let Some(region) = self.regions.remove(&index) {
            for socket in region.sockets() {
                self.listener_owner.remove(&socket.key);
                let _ = self.poller.remove(socket.listener.fd());
            }
        }
    }

    fn removed_count(&self) -> u64 {
        let s = self.stats.snapshot();
        s.peers_left + s.peers_dropped
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
        for region in self.regions.values() {
            region.log_status();
        }
    }
}

impl Drop for Server {
    /// Closes every socket and connection, then removes the VM directories if they are empty.
    fn drop(&mut self) {
        self.regions.clear();
        self.endpoints = Endpoints::default();
        if let Some(named) = &self.named {
            for vm in named.vms.values() {
                let _ = std::fs::remove_dir(&vm.dir);
            }
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
