//! A region: one shared-memory object, its vectors per peer, its peers and its lifetime.
//! Its sockets are in the [`ListenerTable`](crate::listener_table::ListenerTable).
//!
//! Joining follows QEMU's `ivshmem_server_handle_new_conn` message for message:
//! to the new peer `0` (version), its id, `-1` + shm fd; to every existing peer the new id once
//! per vector with the new peer's eventfds; to the new peer each existing peer's id once per
//! vector with that peer's eventfds (in the order the peers joined, like QEMU's peer list),
//! then its own id once per vector with its own eventfds.
//! Leaving: every remaining peer gets the id without an fd.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use ivshm_mem::{format_size, BackendError, SharedMemory};
use ivshm_policy::GuestShmStatus;
use ivshm_proto::v0::{PROTOCOL_VERSION, SHM_MARKER};
use rustix::event::{eventfd, EventfdFlags};
use rustix::io::Errno;

use crate::departures::ChannelDepartures;
use crate::ids::{IdPolicy, IdReuse, NoFreeId, PeerIds};
use crate::inflight::Reading;
use crate::limits::{fd_exhaustion_message, is_fd_exhaustion};
use crate::listener_table::SocketKey;
use crate::named::Origin;
use crate::observer::Observer;
use crate::peer::{Connections, Peer, RemovalReason};
use crate::queue::OutgoingQueue;
use crate::regions::RegionId;
use crate::stats::Stats;

/// What the loop lends a region while it handles an event.
pub(crate) struct LoopContext<'a> {
    pub(crate) stats: &'a Stats,
    pub(crate) connections: &'a mut Connections,
    /// Peers connected over all regions (for log lines).
    pub(crate) total_peers: usize,
    /// Told about accepted connections, joins and removals.
    pub(crate) observer: &'a mut dyn Observer,
}

/// Public facts about a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Its name.
    pub name: String,
    /// Where peers connect.
    pub socket: std::path::PathBuf,
    /// Size of the shared memory in bytes (after rounding).
    pub size: u64,
    /// Vectors per peer.
    pub vectors: usize,
    /// The backing object, for humans.
    pub memory: String,
    /// Peers admitted at once.
    pub peer_limit: usize,
    /// How peer ids are chosen.
    pub id_policy: IdPolicy,
    /// When the id of a peer that left may be given again.
    pub id_reuse: IdReuse,
}

/// Why a region admits no more peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Full {
    /// It has its peer limit of peers.
    Limit(usize),
    /// It has room, but every id it may give is in use or held back.
    NoId(NoFreeId),
}

/// Completes "the region ...".
impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Limit(limit) => write!(f, "has its limit of {limit} peer(s)"),
            Full::NoId(e) => write!(f, "has no id it may give a new peer: {e}"),
        }
    }
}

/// How a region is set up, whatever made it.
#[derive(Debug, Clone)]
pub(crate) struct RegionSpec {
    pub(crate) name: String,
    pub(crate) backend: ivshm_mem::BackendKind,
    pub(crate) size: u64,
    pub(crate) pow2: ivshm_mem::Pow2Policy,
    pub(crate) vectors: usize,
    pub(crate) peer_limit: usize,
    pub(crate) id_policy: IdPolicy,
    pub(crate) id_reuse: IdReuse,
    pub(crate) origin: Origin,
    pub(crate) persist: bool,
    /// The VM whose factory made it (counted against that VM's limits).
    pub(crate) creator: Option<String>,
}

/// A served region.
#[derive(Debug)]
pub(crate) struct Region {
    id: RegionId,
    name: String,
    memory: SharedMemory,
    /// A duplicate of the memory fd that queued messages share.
    shm_fd: Arc<OwnedFd>,
    vectors: usize,
    queue_limit: usize,
    /// Its peers' ids: in use, held back, the next one.
    ids: PeerIds,
    peer_limit: usize,
    peers: BTreeMap<u16, Peer>,
    /// The socket each peer joined through.
    via: BTreeMap<u16, SocketKey>,
    /// The VM whose directory each peer joined through (`-` for a standalone socket), for
    /// log lines.
    via_vm: BTreeMap<u16, String>,
    origin: Origin,
    persist: bool,
    /// The VM whose factory made it (counted against that VM's limits).
    creator: Option<String>,
    /// Removed: no sockets any more, dropped when its last peer leaves.
    detached: bool,
    /// Some peer joined once (a run-time region goes when its last peer leaves).
    had_peers: bool,
    /// This region's share of the server's counters (the same events, counted here too).
    counters: Stats,
    /// Marks the channel sides of peers that leave.
    departures: ChannelDepartures,
}

impl Region {
    /// A region with its memory and no peers (its sockets are added to the listener table);
    /// `mark_departures`: mark the channel sides of peers that leave (see `departures`).
    pub(crate) fn new(
        id: RegionId,
        spec: &RegionSpec,
        queue_limit: usize,
        mark_departures: bool,
    ) -> Result<Region, BackendError> {
        let memory = ivshm_mem::backend::create(&spec.backend, spec.size, spec.pow2)?;
        let shm_fd = Arc::new(memory.try_clone_fd()?);
        Ok(Region {
            id,
            name: spec.name.clone(),
            memory,
            shm_fd,
            vectors: spec.vectors,
            queue_limit,
            ids: PeerIds::new(spec.id_policy, spec.id_reuse, spec.peer_limit),
            peer_limit: spec.peer_limit,
            peers: BTreeMap::new(),
            via: BTreeMap::new(),
            via_vm: BTreeMap::new(),
            origin: spec.origin,
            persist: spec.persist,
            creator: spec.creator.clone(),
            detached: false,
            had_peers: false,
            counters: Stats::default(),
            departures: ChannelDepartures::new(mark_departures),
        })
    }

    /// Logs what it serves (once it does: after its sockets are bound and, at start, once the
    /// whole server is set up, so a start that fails never claims to serve).
    pub(crate) fn log_serving(&self) {
        tracing::info!(
            region = %self.name,
            size = self.memory.size(),
            vectors = self.vectors,
            peer_limit = self.peer_limit,
            origin = self.origin.as_str(),
            "serving {} of {} with {} vector(s) per peer",
            format_size(self.memory.size()),
            self.memory.description(),
            self.vectors
        );
    }

    /// Counts an event in the server's counters and in this region's.
    fn count(&self, ctx: &LoopContext<'_>, event: impl Fn(&Stats)) {
        event(ctx.stats);
        event(&self.counters);
    }

    /// This region's counters.
    pub(crate) fn counters(&self) -> &Stats {
        &self.counters
    }

    /// Messages queued for its peers now: the total and the longest queue.
    pub(crate) fn queue_depths(&self) -> (u64, u64) {
        self.peers.values().fold((0, 0), |(total, longest), peer| {
            let len = peer.queue.len() as u64;
            (total + len, longest.max(len))
        })
    }

    /// The region's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Vectors per peer.
    pub(crate) fn vectors(&self) -> usize {
        self.vectors
    }

    /// Who made it.
    pub(crate) fn origin(&self) -> Origin {
        self.origin
    }

    /// The configuration now owns it (a `[[region]]` or a VM's `create` names it).
    pub(crate) fn adopt_as_configured(&mut self) {
        // No VM's quota counts it any more.
        self.creator = None;
        self.origin = Origin::Config;
    }

    /// Whether it stays after its last peer leaves.
    pub(crate) fn persists(&self) -> bool {
        self.persist
    }

    /// Whether it was removed while peers were connected (it has no sockets any more and goes
    /// with its last peer).
    pub(crate) fn is_detached(&self) -> bool {
        self.detached
    }

    /// Marks it removed: it goes when its last peer leaves.
    pub(crate) fn detach(&mut self) {
        self.detached = true;
    }

    /// Undoes [`detach`](Self::detach): the region serves again (sockets are added for it),
    /// now owned by `origin` (the configuration or the factory that asked for it again).
    pub(crate) fn revive(&mut self, origin: Origin) {
        self.detached = false;
        self.origin = origin;
    }

    /// The VM whose factory made it, while that VM's limits count it.
    pub(crate) fn creator(&self) -> Option<&str> {
        self.creator.as_deref()
    }

    /// Its size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.memory.size()
    }

    /// Whether a peer has ever joined it.
    pub(crate) fn had_peers(&self) -> bool {
        self.had_peers
    }

    /// Whether it should go now: it has no peers and is detached, or it was made at run time,
    /// is not to persist, and its last peer has left.
    pub(crate) fn is_done(&self) -> bool {
        self.peers.is_empty()
            && (self.detached || (self.origin.is_run_time() && !self.persist && self.had_peers))
    }

    /// A live named region (not standalone, not detached).
    pub(crate) fn is_live_named(&self) -> bool {
        self.origin != Origin::Standalone && !self.detached
    }

    /// Ids of the connected peers.
    pub(crate) fn peer_ids(&self) -> Vec<u16> {
        self.peers.keys().copied().collect()
    }

    /// Ids of the peers that joined through socket `key`.
    pub(crate) fn peers_via(&self, key: SocketKey) -> Vec<u16> {
        self.via
            .iter()
            .filter(|(_, &k)| k == key)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Ids held back: their holders left while peers that are still connected were (see
    /// [`IdReuse::Safe`]).
    pub(crate) fn held_ids(&self) -> Vec<u16> {
        self.ids.held()
    }

    /// Whether the region admits another peer; if not, why.
    pub(crate) fn room(&self) -> Result<(), Full> {
        if self.peers.len() >= self.peer_limit {
            return Err(Full::Limit(self.peer_limit));
        }
        self.ids.check().map_err(Full::NoId)
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Its facts, with `socket` its first socket's path (empty when it has none).
    pub(crate) fn info(&self, socket: &std::path::Path) -> RegionInfo {
        RegionInfo {
            name: self.name.clone(),
            socket: socket.to_path_buf(),
            size: self.memory.size(),
            vectors: self.vectors,
            memory: self.memory.description().to_string(),
            peer_limit: self.peer_limit,
            id_policy: self.ids.policy(),
            id_reuse: self.ids.reuse(),
        }
    }

    /// Logs the region and its peers (on `SIGHUP`).
    pub(crate) fn log_status(&self, sockets: usize) {
        tracing::info!(
            region = %self.name,
            sockets,
            peers = self.peers.len(),
            origin = self.origin.as_str(),
            "{} of {}, {} vector(s) per peer",
            format_size(self.memory.size()),
            self.memory.description(),
            self.vectors
        );
        for peer in self.peers.values() {
            tracing::info!(region = %self.name, peer = peer.id, queued = peer.queue.len(), "peer");
        }
    }

    /// Gives a new connection (through socket `key`, in the directory of VM `vm`, `-` for a
    /// standalone socket) an id, its eventfds and its handshake, and tells the others. Returns
    /// how many peers were removed (others that could not take the news). Joins, leaves and
    /// refusals are logged one line each, with the region, the VM and the peer id.
    pub(crate) fn join(
        &mut self,
        socket: OwnedFd,
        key: SocketKey,
        vm: &str,
        ctx: &mut LoopContext<'_>,
    ) -> usize {
        let allocated = self
            .room()
            .and_then(|()| self.ids.allocate().map_err(Full::NoId));
        let id = match allocated {
            Ok(id) => id,
            Err(full) => {
                // Accepted and closed at once: the peer sees its connection closed before any
                // message, as it would if the server were gone.
                drop(socket);
                self.count(ctx, |s| s.refused_with(GuestShmStatus::ClientMax));
                tracing::warn!(
                    region = %self.name,
                    vm = %vm,
                    peer = %"-",
                    peers = self.peers.len(),
                    "refused a peer: the region {full} ({})",
                    GuestShmStatus::ClientMax
                );
                return 0;
            }
        };
        let eventfds = match self.create_eventfds() {
            Ok(fds) => fds,
            Err(errno) => {
                if is_fd_exhaustion(errno) {
                    tracing::error!(
                        region = %self.name,
                        vm = %vm,
                        peer = id,
                        %errno,
                        "{}",
                        fd_exhaustion_message(
                            ctx.total_peers,
                            self.vectors,
                            &format!("refusing peer {id}")
                        )
                    );
                } else {
                    tracing::error!(region = %self.name, vm = %vm, peer = id, %errno, "eventfd failed; refusing peer {id}");
                }
                self.count(ctx, |s| s.refused());
                return 0;
            }
        };

        let mut queue = OutgoingQueue::new(self.queue_limit);
        queue.push_handshake(PROTOCOL_VERSION, None);
        queue.push_handshake(i64::from(id), None);
        queue.push_handshake(SHM_MARKER, Some(self.shm_fd.clone()));
        // In join order, as QEMU's server walks its peer list (ids may not be: they wrap, and
        // lowest-free regions reuse them). Serials increase with every join.
        let mut others: Vec<&Peer> = self.peers.values().collect();
        others.sort_by_key(|p| p.serial);
        for other in others {
            for fd in &other.eventfds {
                queue.push_handshake(i64::from(other.id), Some(fd.clone()));
            }
        }
        for fd in &eventfds {
            queue.push_handshake(i64::from(id), Some(fd.clone()));
        }
        // The others' doorbells to the new peer, its own, and its doorbells to every other.
        let handed_out =
            (self.peers.len() * self.vectors) + eventfds.len() * (self.peers.len() + 1);
        self.count(ctx, |s| s.doorbell_fds(handed_out as u64));

        let peer = match ctx.connections.add(self.id, id, socket, eventfds, queue) {
            Ok(peer) => peer,
            Err(errno) => {
                tracing::error!(region = %self.name, %errno, "cannot watch the socket of peer {id}; refusing it");
                self.count(ctx, |s| s.refused());
                return 0;
            }
        };
        ctx.observer.joined(&self.name, id, peer.socket());

        let mut failed = Vec::new();
        for other in self.peers.values_mut() {
            for fd in &peer.eventfds {
                if let Err(full) = other.queue.push(i64::from(id), Some(fd.clone())) {
                    failed.push((other.id, RemovalReason::StoppedReading(full)));
                    break;
                }
            }
        }
        self.peers.insert(id, peer);
        self.ids.joined(id);
        self.via.insert(id, key);
        self.via_vm.insert(id, vm.to_string());
        self.had_peers = true;
        self.count(ctx, |s| s.joined());
        tracing::info!(
            region = %self.name,
            vm = %vm,
            peer = id,
            peers = self.peers.len(),
            "peer {id} joined"
        );
        self.flush_all(ctx, &mut failed);
        self.remove_all(failed, ctx)
    }

    fn create_eventfds(&self) -> Result<Vec<Arc<OwnedFd>>, Errno> {
        (0..self.vectors)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map(Arc::new))
            .collect()
    }

    /// Handles readiness of peer `id`'s socket. Returns how many peers were removed.
    pub(crate) fn on_peer_event(
        &mut self,
        id: u16,
        readable: bool,
        writable: bool,
        ctx: &mut LoopContext<'_>,
    ) -> usize {
        let Some(peer) = self.peers.get_mut(&id) else {
            return 0;
        };
        if readable {
            if let Some(reason) = peer.check_input() {
                return self.remove_all(vec![(id, reason)], ctx);
            }
        }
        if writable {
            peer.on_writable(ctx.connections);
            let mut sent = 0;
            let result = peer.flush(ctx.connections, &mut sent);
            self.count(ctx, |s| s.sent(sent));
            if let Err(reason) = result {
                return self.remove_all(vec![(id, reason)], ctx);
            }
        }
        0
    }

    /// Removes every peer, one at a time in join order, telling the remaining ones each time.
    /// Returns how many went.
    pub(crate) fn remove_in_join_order(&mut self, ctx: &mut LoopContext<'_>) -> usize {
        let mut order: Vec<(u64, u16)> = self.peers.values().map(|p| (p.serial, p.id)).collect();
        order.sort_unstable();
        order
            .into_iter()
            .map(|(_, id)| self.remove_all(vec![(id, RemovalReason::ServerStopping)], ctx))
            .sum()
    }

    /// What each peer has read, as seen `now` (see [`Peer::reading`]).
    pub(crate) fn readings<'a>(
        &'a mut self,
        connections: &'a Connections,
        now: Instant,
    ) -> impl Iterator<Item = (u16, Reading)> + 'a {
        self.peers
            .values_mut()
            .map(move |peer| (peer.id, peer.reading(connections, now)))
    }

    /// Fds in flight are available again: every peer's stall is forgotten.
    pub(crate) fn forget_stalls(&mut self) {
        self.peers.values_mut().for_each(Peer::forget_stall);
    }

    /// Drops peer `id` for `reason`, telling the others. Returns how many peers went.
    pub(crate) fn drop_peer(
        &mut self,
        id: u16,
        reason: RemovalReason,
        ctx: &mut LoopContext<'_>,
    ) -> usize {
        self.remove_all(vec![(id, reason)], ctx)
    }

    /// Sends what peer `id` has queued (again). Returns how many peers were removed.
    pub(crate) fn flush_peer(&mut self, id: u16, ctx: &mut LoopContext<'_>) -> usize {
        let Some(peer) = self.peers.get_mut(&id) else {
            return 0;
        };
        let mut sent = 0;
        let result = peer.flush(ctx.connections, &mut sent);
        self.count(ctx, |s| s.sent(sent));
        match result {
            Ok(()) => 0,
            Err(reason) => self.remove_all(vec![(id, reason)], ctx),
        }
    }

    /// Flushes every peer with something queued; failures are added to `failed`.
    fn flush_all(&mut self, ctx: &mut LoopContext<'_>, failed: &mut Vec<(u16, RemovalReason)>) {
        let mut sent = 0;
        for peer in self.peers.values_mut() {
            if peer.queue.is_empty() {
                continue;
            }
            if let Err(reason) = peer.flush(ctx.connections, &mut sent) {
                failed.push((peer.id, reason));
            }
        }
        self.count(ctx, |s| s.sent(sent));
    }

    /// Removes peers, telling every remaining peer; peers that fail to take that news are
    /// removed in turn (a worklist, so a cascade cannot recurse). Returns how many went (their
    /// fds are closed).
    fn remove_all(
        &mut self,
        mut work: Vec<(u16, RemovalReason)>,
        ctx: &mut LoopContext<'_>,
    ) -> usize {
        let mut removed = 0;
        while let Some((id, reason)) = work.pop() {
            let Some(peer) = self.peers.remove(&id) else {
                continue;
            };
            ctx.connections.remove(&peer);
            self.ids.left(id);
            self.via.remove(&id);
            let vm = self.via_vm.remove(&id).unwrap_or_else(|| "-".into());
            removed += 1;
            self.count(ctx, |s| s.removed(&reason));
            ctx.observer.removed(&self.name, id, &reason);
            if reason.is_drop() {
                tracing::warn!(region = %self.name, vm = %vm, peer = id, peers = self.peers.len(), "dropped peer {id}: {reason}");
            } else {
                tracing::info!(region = %self.name, vm = %vm, peer = id, peers = self.peers.len(), "peer {id} left: {reason}");
            }
            drop(peer);
            // Before the others hear of it: their channels with the departed peer fail now.
            let peers = &self.peers;
            self.departures
                .peer_left(&self.name, &self.memory, id, |survivor| {
                    peers.get(&survivor).map(|p| p.eventfds.as_slice())
                });
            let vectors = self.vectors;
            for other in self.peers.values_mut() {
                // The departed peer's vectors this one has not been sent yet are taken back;
                // if that was all of them it never heard of the peer and is not told it left.
                // So a peer slow to read (or paused) holds news of the peers present only,
                // however fast others join and leave: they cannot get it dropped for not
                // keeping up, nor keep their eventfds open in its queue.
                let withdrawn = other.queue.withdraw_vectors(id);
                if vectors > 0 && withdrawn == vectors {
                    continue;
                }
                if let Err(full) = other.queue.push(i64::from(id), None) {
                    work.push((other.id, RemovalReason::StoppedReading(full)));
                }
            }
            self.flush_all(ctx, &mut work);
        }
        removed
    }
}
