//! The server: its regions and the one epoll loop that serves them all.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::event::epoll::{Event, EventFlags};
use rustix::io::Errno;

use crate::config::ServerConfig;
use crate::event_loop::{token_of, Poller, Token};
use crate::limits::{raise_nofile_limit, ReserveFd};
use crate::region::{LoopContext, Region, RegionInfo};
use crate::stats::Stats;
use crate::ServerError;

/// What readiness of a control fd means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// Return from [`Server::run_until`].
    Stop,
    /// Log every region and peer, then go on.
    LogStatus,
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
    poller: Poller,
    regions: Vec<Region>,
    connections: HashMap<u64, (usize, u16)>,
    next_serial: u64,
    reserve: ReserveFd,
    stats: Arc<Stats>,
}

impl Server {
    /// Validates `config`, raises the fd limit, creates every region's memory and binds its
    /// socket. When this returns, peers can connect (they are served once the loop runs).
    pub fn new(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let limit = raise_nofile_limit();
        tracing::debug!(soft = ?limit.soft, hard = ?limit.hard, "open file limit");
        let poller = Poller::new().map_err(ServerError::Epoll)?;
        let mut regions = Vec::with_capacity(config.regions.len());
        for (index, region) in config.regions.iter().enumerate() {
            let region = Region::new(index, region, config.max_queued_messages)?;
            poller
                .add(region.listener().fd(), Token::Listener(index))
                .map_err(ServerError::Epoll)?;
            regions.push(region);
        }
        Ok(Server {
            poller,
            regions,
            connections: HashMap::new(),
            next_serial: 0,
            reserve: ReserveFd::new(),
            stats: Arc::new(Stats::default()),
        })
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The socket path of every region, in configuration order.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        self.regions
            .iter()
            .map(|r| r.socket_path().to_path_buf())
            .collect()
    }

    /// Facts about every region, in configuration order.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.regions.iter().map(Region::info).collect()
    }

    /// Peers connected now, over all regions.
    pub fn peer_count(&self) -> usize {
        self.regions.iter().map(Region::peer_count).sum()
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
                        }
                    }
                    Some(Token::Listener(index)) => {
                        let total_peers = self.peer_count();
                        let mut ctx = LoopContext {
                            poller: &self.poller,
                            stats: &self.stats,
                            connections: &mut self.connections,
                            next_serial: &mut self.next_serial,
                            reserve: &mut self.reserve,
                            total_peers,
                        };
                        if let Some(region) = self.regions.get_mut(index) {
                            region.accept_all(&mut ctx);
                        }
                    }
                    Some(Token::Peer(serial)) => {
                        // A peer removed earlier in this batch has no entry any more.
                        let Some(&(index, id)) = self.connections.get(&serial) else {
                            continue;
                        };
                        let readable = flags.intersects(
                            EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR,
                        );
                        let writable = flags.contains(EventFlags::OUT);
                        let total_peers = self.peer_count();
                        let mut ctx = LoopContext {
                            poller: &self.poller,
                            stats: &self.stats,
                            connections: &mut self.connections,
                            next_serial: &mut self.next_serial,
                            reserve: &mut self.reserve,
                            total_peers,
                        };
                        if let Some(region) = self.regions.get_mut(index) {
                            region.on_peer_event(id, readable, writable, &mut ctx);
                        }
                    }
                    None => tracing::debug!("event with an unknown token"),
                }
            }
            // Peers that went away freed fds: listeners paused for lack of fds resume.
            if self.removed_count() != removed_before {
                for region in self.regions.iter_mut().filter(|r| r.accept_paused()) {
                    region.resume_accepting(&self.poller);
                }
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
        for region in &self.regions {
            region.log_status();
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
