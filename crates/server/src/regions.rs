//! Every region the server serves, by id, together with their listening sockets.
//!
//! The registry owns both the regions and the [`ListenerTable`], so the rule "every socket
//! serves a region that exists, and a region's sockets go with it" holds by construction:
//! sockets are added only for a region that is here, and dropping or retiring a region removes
//! its sockets (files, table entries and epoll registrations) in the same call.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ivshm_mem::{apply_pow2_policy, BackendError};
use ivshm_policy::guest_shm::whole_pages;
use rustix::io::Errno;
use thiserror::Error;

use crate::config::{validate_named_region, ConfigError, RegionConfig};
use crate::event_loop::Poller;
use crate::ids::{IdPolicy, IdReuse};
use crate::inflight::pick_hog;
use crate::limits::{fd_exhaustion_message, is_fd_exhaustion, ReserveFd};
use crate::listener::Listener;
use crate::listener_table::{ListenerTable, RegionSocket, SocketKey, VmSocket};
use crate::named::{NamedRegionConfig, Origin, VmLimits};
use crate::observer::Observer;
use crate::peer::{Connections, RemovalReason};
use crate::region::{LoopContext, Region, RegionInfo, RegionSpec};
use crate::stats::Stats;
use crate::ServerError;

/// A region's id in the registry (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct RegionId(usize);

/// Why a named region could not be created.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub(crate) enum CreateError {
    /// a region of that name exists
    ///
    /// A region of that name exists.
    Exists,
    /// a region of that name was removed and stays until its {count} connected peer(s) {peers:?}
    /// leave; create it again after that (a configuration or factory create of the name makes the
    /// kept region serve again, with the same memory)
    ///
    /// A region of that name was removed and is kept for its connected peers: one name is
    /// one region, so no second one is made beside it.
    Kept {
        /// How many.
        count: usize,
        /// The peers keeping it.
        peers: Vec<u16>,
    },
    /// the server holds its limit of {limit} run-time regions (max_regions); remove one or raise
    /// the limit
    ///
    /// The server holds its limit of run-time regions.
    TooMany {
        /// The limit (`max_regions`).
        limit: usize,
    },
    /// VM {vm} holds its limit of {limit} region(s) made through its factory (max_regions); remove
    /// one or raise the limit
    ///
    /// The VM's factory has made as many regions as it may hold.
    VmRegions {
        /// The VM.
        vm: String,
        /// Its limit.
        limit: usize,
    },
    /// VM {vm}'s regions made through its factory hold {held} bytes; {size} more would pass its
    /// limit of {limit} bytes (max_bytes)
    ///
    /// The region would take the VM's factory-made regions past their byte limit.
    VmBytes {
        /// The VM.
        vm: String,
        /// Its limit.
        limit: u64,
        /// What its regions hold now.
        held: u64,
        /// The size asked for (after rounding).
        size: u64,
    },
    /// {0}
    ///
    /// The region's settings cannot work.
    Config(ConfigError),
    /// {0}
    ///
    /// The region's memory could not be created.
    Memory(BackendError),
}

impl From<ConfigError> for CreateError {
    fn from(error: ConfigError) -> Self {
        Self::Config(error)
    }
}

impl From<BackendError> for CreateError {
    fn from(error: BackendError) -> Self {
        Self::Memory(error)
    }
}

/// Why a socket could not be added to a region.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub(crate) enum AddSocketError {
    /// the region is gone
    ///
    /// The region is gone.
    NoRegion,
    /// cannot watch the socket: {0}
    ///
    /// The event loop could not watch the socket.
    Watch(Errno),
}

/// What became of a socket taken out of a region (its file is gone).
#[derive(Debug)]
pub(crate) struct RemovedSocket {
    path: PathBuf,
    region: String,
    /// Peers that joined through it (they stay connected to the region).
    peers: Vec<u16>,
}

impl fmt::Display for RemovedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "removed socket {}", self.path.display())?;
        if !self.peers.is_empty() {
            write!(
                f,
                "; its {} connected peer(s) {:?} stay connected to region {} until they leave",
                self.peers.len(),
                self.peers,
                self.region
            )?;
        }
        Ok(())
    }
}

/// What retiring a region did.
#[derive(Debug)]
pub(crate) enum Retired {
    /// It had no peers: it is gone.
    Removed {
        /// Its name.
        name: String,
    },
    /// Its sockets are gone; it goes when its connected peers leave.
    Detached {
        /// Its name.
        name: String,
        /// The peers connected to it.
        peers: Vec<u16>,
    },
}

impl fmt::Display for Retired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retired::Removed { name } => write!(f, "removed region {name}"),
            Retired::Detached { name, peers } => write!(
                f,
                "region {name} removed from every VM directory; it stays until its {} \
                 connected peer(s) {peers:?} leave",
                peers.len()
            ),
        }
    }
}

/// What the loop lends the registry while it handles a peer or listener event.
pub(crate) struct EventContext<'a> {
    pub(crate) stats: &'a Stats,
    pub(crate) connections: &'a mut Connections,
    pub(crate) observer: &'a mut dyn Observer,
}

impl EventContext<'_> {
    /// What a region gets, with the number of peers connected over all regions.
    fn lend(&mut self, total_peers: usize) -> LoopContext<'_> {
        LoopContext {
            stats: self.stats,
            connections: self.connections,
            total_peers,
            observer: self.observer,
        }
    }
}

/// Every region and its sockets.
#[derive(Debug)]
pub(crate) struct Regions {
    regions: BTreeMap<RegionId, Region>,
    next: usize,
    listeners: ListenerTable,
    /// Notifications a peer may have waiting beyond its handshake.
    queue_limit: usize,
    /// Whether the server has started: regions made from now on are logged as they are
    /// made ([`Region::log_serving`]); those made during start-up, when it succeeds.
    started: bool,
    /// Mark the channel sides of peers that leave.
    mark_departures: bool,
    /// Regions a factory made that no peer has joined yet, and when they were made or last
    /// offered by a factory answer ([`Regions::offered`]).
    unused: BTreeMap<RegionId, Instant>,
    /// Fds in flight have run out and peers' reading is being watched
    /// ([`relieve_fds_in_flight`](Self::relieve_fds_in_flight)).
    relieving: bool,
}

/// The VM a factory `create` is for, and what it may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Creator<'a> {
    pub(crate) vm: &'a str,
    pub(crate) limits: VmLimits,
}

impl Regions {
    /// No regions; sockets are watched by `poller`.
    pub(crate) fn new(poller: Arc<Poller>, queue_limit: usize, mark_departures: bool) -> Self {
        Regions {
            regions: BTreeMap::new(),
            next: 0,
            listeners: ListenerTable::new(poller),
            queue_limit,
            started: false,
            mark_departures,
            unused: BTreeMap::new(),
            relieving: false,
        }
    }

    /// The server is set up: logs what every region serves, and every later region as it is
    /// made.
    pub(crate) fn started(&mut self) {
        self.started = true;
        for region in self.regions.values() {
            region.log_serving();
        }
    }

    fn next_id(&mut self) -> RegionId {
        let id = RegionId(self.next);
        self.next += 1;
        id
    }

    /// Creates a standalone region: its memory and its own socket.
    pub(crate) fn add_standalone(&mut self, config: &RegionConfig) -> Result<(), ServerError> {
        let m = &config.memory;
        let spec = RegionSpec {
            name: config.name.clone(),
            backend: m.backend.clone(),
            size: m.size,
            pow2: m.pow2,
            vectors: config.vectors,
            peer_limit: 1 << 16,
            id_policy: IdPolicy::Increasing,
            id_reuse: IdReuse::Safe,
            origin: Origin::Standalone,
            persist: true,
            creator: None,
        };
        let id = self.next_id();
        let region =
            Region::new(id, &spec, self.queue_limit, self.mark_departures).map_err(|error| {
                ServerError::Memory {
                    region: spec.name.clone(),
                    error,
                }
            })?;
        let listener = Listener::bind(&config.listener)?;
        self.listeners
            .add(id, None, listener)
            .map_err(ServerError::Epoll)?;
        self.regions.insert(id, region);
        Ok(())
    }

    /// Creates a named region (memory only: sockets are added for the VMs that may see it).
    /// Run-time regions (factory, control) count against `max_run_time`.
    ///
    /// The size is rounded up to whole 4 KiB pages before the power-of-two policy applies: a
    /// `guest_shm` client can reach every named region (factory `find`), and the QNX header
    /// counts a region's `size` in whole pages, all of them backed (a `create x,100` line gives
    /// one page; with `pow2 = "off"`, `0x1800` bytes give two).
    pub(crate) fn create_named(
        &mut self,
        config: &NamedRegionConfig,
        origin: Origin,
        max_run_time: usize,
        creator: Option<Creator<'_>>,
    ) -> Result<RegionId, CreateError> {
        validate_named_region(config)?;
        let size = whole_pages(config.size).ok_or(BackendError::TooLarge(config.size))?;
        if self.find_named(config.name.as_str()).is_some() {
            return Err(CreateError::Exists);
        }
        if let Some(id) = self.find_kept(config.name.as_str()) {
            let peers = self.regions.get(&id).map(Region::peer_ids);
            let peers = peers.unwrap_or_default();
            return Err(CreateError::Kept {
                count: peers.len(),
                peers,
            });
        }
        if origin.is_run_time() {
            let held = self
                .regions
                .values()
                .filter(|r| r.origin().is_run_time())
                .count();
            if held >= max_run_time {
                return Err(CreateError::TooMany {
                    limit: max_run_time,
                });
            }
        }
        if let Some(creator) = &creator {
            self.check_vm_limits(creator, config, size)?;
        }
        let spec = RegionSpec {
            name: config.name.to_string(),
            backend: config.backend.kind(config.name.as_str()),
            size,
            pow2: config.pow2,
            vectors: config.vectors,
            peer_limit: config.peer_limit,
            id_policy: config.id_policy,
            id_reuse: config.id_reuse,
            origin,
            persist: config.persist,
            creator: creator.map(|c| c.vm.to_string()),
        };
        let id = self.next_id();
        let region = Region::new(id, &spec, self.queue_limit, self.mark_departures)?;
        if self.started {
            region.log_serving();
        }
        if spec.creator.is_some() {
            self.unused.insert(id, Instant::now());
        }
        self.regions.insert(id, region);
        Ok(id)
    }

    /// Whether `creator`'s VM may have one more region of `size` bytes (before the
    /// power-of-two policy of `config`, which is applied here too).
    fn check_vm_limits(
        &self,
        creator: &Creator<'_>,
        config: &NamedRegionConfig,
        size: u64,
    ) -> Result<(), CreateError> {
        let mine = self
            .regions
            .values()
            .filter(|r| r.creator() == Some(creator.vm));
        let (count, held) = mine.fold((0usize, 0u64), |(count, held), r| {
            (count + 1, held.saturating_add(r.size()))
        });
        if count >= creator.limits.max_regions {
            return Err(CreateError::VmRegions {
                vm: creator.vm.to_string(),
                limit: creator.limits.max_regions,
            });
        }
        if let Some(limit) = creator.limits.max_bytes {
            // A size the policy refuses is refused when the memory is made.
            let size = apply_pow2_policy(size, config.pow2).unwrap_or(size);
            if held.saturating_add(size) > limit {
                return Err(CreateError::VmBytes {
                    vm: creator.vm.to_string(),
                    limit,
                    held,
                    size,
                });
            }
        }
        Ok(())
    }

    /// When the next factory-made region that nobody joined is due to go, `timeout` after it
    /// was made.
    pub(crate) fn next_unused_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.unused
            .values()
            .min()
            .and_then(|made| made.checked_add(timeout))
    }

    /// A factory answer has just handed out region `id`'s socket: if nobody has joined it yet,
    /// its `unused_timeout` starts again now, so the client told of it has the whole time to
    /// join (counted from the region's creation, a region asked for again just before its
    /// time was up went right after the answer that offered it).
    pub(crate) fn offered(&mut self, id: RegionId) {
        if let Some(since) = self.unused.get_mut(&id) {
            *since = Instant::now();
        }
    }

    /// Removes the factory-made regions that no peer joined within `timeout` of being made
    /// (or of the last factory answer that offered them).
    /// Returns what happened.
    pub(crate) fn reclaim_unused(&mut self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let due: Vec<RegionId> = self
            .unused
            .iter()
            .filter(|(_, made)| now.saturating_duration_since(**made) >= timeout)
            .map(|(&id, _)| id)
            .collect();
        let mut changes = Vec::new();
        for id in due {
            self.unused.remove(&id);
            let Some(region) = self.regions.get(&id) else {
                continue;
            };
            let creator = region.creator().unwrap_or("-").to_string();
            if region.had_peers() || region.peer_count() > 0 {
                continue;
            }
            if let Some(retired) = self.retire(id) {
                changes.push(format!(
                    "{retired}: no peer joined it within {timeout:?} of its creation by VM \
                     {creator}'s factory"
                ));
            }
        }
        changes
    }

    /// The live (not detached) named region called `name`.
    pub(crate) fn find_named(&self, name: &str) -> Option<RegionId> {
        self.regions
            .iter()
            .find(|(_, r)| r.is_live_named() && r.name() == name)
            .map(|(&id, _)| id)
    }

    /// The named region called `name` that was removed (retired by a reload, or by a control
    /// `remove`) and is kept for its connected peers.
    pub(crate) fn find_kept(&self, name: &str) -> Option<RegionId> {
        self.regions
            .iter()
            .find(|(_, r)| r.origin() != Origin::Standalone && r.is_detached() && r.name() == name)
            .map(|(&id, _)| id)
    }

    /// Makes the kept region called `name` (see [`find_kept`](Self::find_kept)) serve again,
    /// owned by `origin`, so that a name asked for again never gets a second region with other
    /// memory beside the one its peers use. Returns it and its peers; its sockets are added by
    /// the next socket sync.
    pub(crate) fn revive_kept(
        &mut self,
        name: &str,
        origin: Origin,
    ) -> Option<(RegionId, Vec<u16>)> {
        let id = self.find_kept(name)?;
        let region = self.regions.get_mut(&id)?;
        region.revive(origin);
        self.unused.remove(&id);
        Some((id, region.peer_ids()))
    }

    /// Region `id`.
    pub(crate) fn get(&self, id: RegionId) -> Option<&Region> {
        self.regions.get(&id)
    }

    /// The configuration now owns region `id`: it counts against no VM and is never reclaimed
    /// as unused.
    pub(crate) fn adopt_as_configured(&mut self, id: RegionId) {
        if let Some(region) = self.regions.get_mut(&id) {
            region.adopt_as_configured();
        }
        self.unused.remove(&id);
    }

    /// Every region, in creation order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (RegionId, &Region)> {
        self.regions.iter().map(|(&id, region)| (id, region))
    }

    /// Peers connected now, over all regions.
    pub(crate) fn peer_count(&self) -> usize {
        self.regions.values().map(Region::peer_count).sum()
    }

    /// Facts about region `id`; its socket is its first one.
    pub(crate) fn info(&self, id: RegionId) -> Option<RegionInfo> {
        let region = self.regions.get(&id)?;
        let socket = self
            .listeners
            .of_region(id)
            .next()
            .map_or(Path::new(""), |(_, s)| s.path());
        Some(region.info(socket))
    }

    /// Adds a socket in a VM directory to region `id` and watches it.
    pub(crate) fn add_socket(
        &mut self,
        id: RegionId,
        vm: VmSocket,
        listener: Listener,
    ) -> Result<SocketKey, AddSocketError> {
        if !self.regions.contains_key(&id) {
            return Err(AddSocketError::NoRegion);
        }
        self.listeners
            .add(id, Some(vm), listener)
            .map_err(AddSocketError::Watch)
    }

    /// Removes socket `key` (its file goes); peers that joined through it stay.
    pub(crate) fn remove_socket(&mut self, key: SocketKey) -> Option<RemovedSocket> {
        let socket = self.listeners.remove(key)?;
        let region = self.regions.get(&socket.region());
        Some(RemovedSocket {
            path: socket.path().to_path_buf(),
            region: region.map(|r| r.name().to_string()).unwrap_or_default(),
            peers: region.map(|r| r.peers_via(key)).unwrap_or_default(),
        })
    }

    /// Every socket, in the order they were added.
    pub(crate) fn sockets(&self) -> impl Iterator<Item = (SocketKey, &RegionSocket)> {
        self.listeners.iter()
    }

    /// The sockets of region `id`.
    /// The sockets in `vm`'s directory: file name and identity (device, inode) as bound.
    pub(crate) fn vm_socket_files(&self, vm: &str) -> Vec<(String, (u64, u64))> {
        self.listeners
            .iter()
            .filter(|(_, s)| s.is_in(vm))
            .filter_map(|(_, s)| {
                let name = s.path().file_name()?.to_str()?.to_string();
                Some((name, s.identity()))
            })
            .collect()
    }

    pub(crate) fn sockets_of(
        &self,
        id: RegionId,
    ) -> impl Iterator<Item = (SocketKey, &RegionSocket)> {
        self.listeners.of_region(id)
    }

    /// The socket of region `id` in `vm`'s directory.
    pub(crate) fn socket_in(&self, id: RegionId, vm: &str) -> Option<&Path> {
        self.listeners
            .of_region(id)
            .find(|(_, s)| s.is_in(vm))
            .map(|(_, s)| s.path())
    }

    /// Drops region `id` now, with its sockets.
    pub(crate) fn drop_region(&mut self, id: RegionId) {
        self.listeners.remove_region(id);
        self.regions.remove(&id);
        self.unused.remove(&id);
    }

    /// Retires region `id`: removed now if it has no peers, else its sockets go and it goes when
    /// its last peer leaves.
    pub(crate) fn retire(&mut self, id: RegionId) -> Option<Retired> {
        let region = self.regions.get_mut(&id)?;
        let name = region.name().to_string();
        let peers = region.peer_ids();
        if peers.is_empty() {
            self.drop_region(id);
            return Some(Retired::Removed { name });
        }
        region.detach();
        self.listeners.remove_region(id);
        Some(Retired::Detached { name, peers })
    }

    /// Drops region `id` if it should not outlive its peers ([`Region::is_done`]).
    pub(crate) fn reap(&mut self, id: RegionId) {
        let Some(region) = self.regions.get(&id) else {
            return;
        };
        if region.is_done() {
            tracing::info!(
                region = %region.name(),
                "removing region {}: its last peer left",
                region.name()
            );
            self.drop_region(id);
        }
    }

    /// Accepts every connection waiting on socket `key` and lets its region join it. Out of
    /// fds, a waiting connection is accepted into the reserve fd's slot and closed; if even
    /// that fails, the region stops accepting until fds are freed ([`resume_accepting`]).
    /// Returns how many peers were removed meanwhile.
    ///
    /// [`resume_accepting`]: Self::resume_accepting
    pub(crate) fn accept_all(
        &mut self,
        key: SocketKey,
        ctx: &mut EventContext<'_>,
        reserve: &mut ReserveFd,
    ) -> usize {
        let Some(id) = self.listeners.get(key).map(RegionSocket::region) else {
            return 0;
        };
        let mut removed = 0;
        loop {
            if self.listeners.is_paused(id) {
                return removed;
            }
            match self.listeners.accept(key) {
                Ok(Some(connection)) => removed += self.join(id, key, connection, ctx),
                Ok(None) => return removed,
                // `accept` needs a free fd before it even looks at the queue.
                Err(errno) if is_fd_exhaustion(errno) => {
                    let total_peers = self.peer_count();
                    let Some(region) = self.regions.get(&id) else {
                        return removed;
                    };
                    let (name, vectors) = (region.name().to_string(), region.vectors());
                    let stats = ctx.stats;
                    let counters = region.counters();
                    let vm = self
                        .listeners
                        .get(key)
                        .and_then(|s| s.vm())
                        .map_or_else(|| "-".to_string(), |s| s.vm.clone());
                    let refused = || {
                        stats.refused();
                        counters.refused();
                    };
                    match self.listeners.refuse_one(key, reserve, refused) {
                        Ok(true) => tracing::error!(
                            region = %name,
                            vm = %vm,
                            peer = %"-",
                            %errno,
                            "{}",
                            fd_exhaustion_message(total_peers, vectors, "refused a new peer")
                        ),
                        Ok(false) => return removed,
                        Err(e) => {
                            tracing::error!(
                                region = %name,
                                errno = %e,
                                "{}",
                                fd_exhaustion_message(
                                    total_peers,
                                    vectors,
                                    "not accepting new peers until one leaves"
                                )
                            );
                            self.listeners.pause(id);
                            return removed;
                        }
                    }
                }
                Err(errno) => {
                    let name = self.regions.get(&id).map(|r| r.name().to_string());
                    tracing::error!(region = name.unwrap_or_default(), %errno, "accept failed");
                    return removed;
                }
            }
        }
    }

    fn join(
        &mut self,
        id: RegionId,
        key: SocketKey,
        connection: OwnedFd,
        ctx: &mut EventContext<'_>,
    ) -> usize {
        let total_peers = self.peer_count();
        let Some(region) = self.regions.get_mut(&id) else {
            return 0;
        };
        ctx.observer.accepted(region.name(), connection.as_fd());
        let vm = self
            .listeners
            .get(key)
            .and_then(|s| s.vm())
            .map_or("-", |s| s.vm.as_str());
        let removed = region.join(connection, key, vm, &mut ctx.lend(total_peers));
        if region.had_peers() {
            self.unused.remove(&id);
        }
        removed
    }

    /// Handles readiness of peer `peer` of region `id`. Returns how many peers were removed.
    pub(crate) fn on_peer_event(
        &mut self,
        (id, peer): (RegionId, u16),
        readable: bool,
        writable: bool,
        ctx: &mut EventContext<'_>,
    ) -> usize {
        let total_peers = self.peer_count();
        let Some(region) = self.regions.get_mut(&id) else {
            return 0;
        };
        region.on_peer_event(peer, readable, writable, &mut ctx.lend(total_peers))
    }

    /// Some sends were refused with `ETOOMANYREFS` (the server's user has as many fds in flight
    /// as its open-file limit): drops the peer that sits on unread fds and has read nothing for
    /// the longest ([`pick_hog`]: never one that keeps reading), then sends the refused
    /// messages again. Those that are still refused wait for the next try (the loop retries
    /// while some are waiting): the peers they are for are not at fault and stay. Returns how
    /// many peers were removed.
    pub(crate) fn relieve_fds_in_flight(&mut self, ctx: &mut EventContext<'_>) -> usize {
        if !ctx.connections.has_starved() {
            if std::mem::take(&mut self.relieving) {
                self.regions.values_mut().for_each(Region::forget_stalls);
            }
            return 0;
        }
        self.relieving = true;
        let now = Instant::now();
        let mut readings = Vec::new();
        for (&region, r) in &mut self.regions {
            readings.extend(
                r.readings(ctx.connections, now)
                    .map(|(id, reading)| ((region, id), reading)),
            );
        }
        let total_peers = self.peer_count();
        let mut removed = 0;
        if let Some(((region, id), reading)) = pick_hog(readings) {
            if let Some(r) = self.regions.get_mut(&region) {
                let reason = RemovalReason::HeldFds {
                    unread: reading.unread,
                };
                removed += r.drop_peer(id, reason, &mut ctx.lend(total_peers));
            }
        }
        for (region, id) in ctx.connections.starved() {
            let total_peers = self.peer_count();
            if let Some(r) = self.regions.get_mut(&region) {
                removed += r.flush_peer(id, &mut ctx.lend(total_peers));
            }
        }
        removed
    }

    /// Fds were freed: regions that stopped accepting for lack of fds accept again.
    pub(crate) fn resume_accepting(&mut self) {
        for id in self.listeners.resume_all() {
            if let Some(region) = self.regions.get(&id) {
                tracing::info!(region = %region.name(), "accepting new peers again");
            }
        }
    }

    /// Closes every socket (their files go), then removes the peers of every region one at a
    /// time in join order, each removal told to the peers still there (see
    /// [`Server::remove_all_peers`](crate::Server::remove_all_peers)).
    pub(crate) fn remove_all_peers(&mut self, ctx: &mut EventContext<'_>) {
        let ids: Vec<RegionId> = self.regions.keys().copied().collect();
        for &id in &ids {
            self.listeners.remove_region(id);
        }
        for id in ids {
            let total_peers = self.peer_count();
            if let Some(region) = self.regions.get_mut(&id) {
                region.remove_in_join_order(&mut ctx.lend(total_peers));
            }
        }
    }

    /// Drops every region and socket (peers are disconnected, socket files removed).
    pub(crate) fn clear(&mut self) {
        let ids: Vec<RegionId> = self.regions.keys().copied().collect();
        for id in ids {
            self.drop_region(id);
        }
    }

    /// Logs every region and its peers.
    pub(crate) fn log_status(&self) {
        for (&id, region) in &self.regions {
            region.log_status(self.listeners.of_region(id).count());
        }
    }
}
