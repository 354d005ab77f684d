//! A region: one shared-memory object, its vectors per peer, its listener and its peers.
//!
//! Joining follows QEMU's `ivshmem_server_handle_new_conn` message for message:
//! to the new peer `0` (version), its id, `-1` + shm fd; to every existing peer the new id once
//! per vector with the new peer's eventfds; to the new peer each existing peer's id once per
//! vector with that peer's eventfds (in the order the peers joined, like QEMU's peer list),
//! then its own id once per vector with its own eventfds.
//! Leaving: every remaining peer gets the id without an fd.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use ivshm_mem::{format_size, SharedMemory};
use ivshm_policy::GuestShmStatus;
use ivshm_proto::v0::{PROTOCOL_VERSION, SHM_MARKER};
use rustix::event::{eventfd, EventfdFlags};
use rustix::io::Errno;

use crate::config::RegionConfig;
use crate::event_loop::{Poller, Token};
use crate::ids::{lowest_free, IdAllocator, IdPolicy};
use crate::limits::{fd_exhaustion_message, is_fd_exhaustion, ReserveFd};
use crate::listener::Listener;
use crate::named::Origin;
use crate::observer::Observer;
use crate::peer::{Peer, RemovalReason};
use crate::queue::OutgoingQueue;
use crate::stats::Stats;
use crate::ServerError;

/// What the loop lends a region while it handles an event.
pub(crate) struct LoopContext<'a> {
    pub(crate) poller: &'a Poller,
    pub(crate) stats: &'a Stats,
    /// Peer connection serial → (region index, peer id).
    pub(crate) connections: &'a mut HashMap<u64, (usize, u16)>,
    pub(crate) next_serial: &'a mut u64,
    pub(crate) reserve: &'a mut ReserveFd,
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
}

/// A listening socket of a region: its own (standalone) or one in a VM's directory.
#[derive(Debug)]
pub(crate) struct RegionSocket {
    /// Its key in the server's listener table (the epoll token).
    pub(crate) key: usize,
    /// The VM whose directory holds it, and the VM's name for the region.
    pub(crate) vm: Option<(String, String)>,
    pub(crate) listener: Listener,
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
    pub(crate) origin: Origin,
    pub(crate) persist: bool,
}

/// A served region.
#[derive(Debug)]
pub(crate) struct Region {
    index: usize,
    name: String,
    memory: SharedMemory,
    /// A duplicate of the memory fd that queued messages share.
    shm_fd: Arc<OwnedFd>,
    vectors: usize,
    queue_limit: usize,
    ids: IdAllocator,
    id_policy: IdPolicy,
    peer_limit: usize,
    peers: BTreeMap<u16, Peer>,
    /// The socket key each peer joined through.
    via: BTreeMap<u16, usize>,
    sockets: Vec<RegionSocket>,
    /// The listeners are out of the epoll set because fds ran out.
    accept_paused: bool,
    pub(crate) origin: Origin,
    pub(crate) persist: bool,
    /// Removed: no sockets any more, dropped when its last peer leaves.
    pub(crate) detached: bool,
    /// Some peer joined once (a run-time region goes when its last peer leaves).
    pub(crate) had_peers: bool,
}

impl Region {
    /// A standalone region: the memory and its own listener (key `key`).
    pub(crate) fn new(
        index: usize,
        config: &RegionConfig,
        queue_limit: usize,
        key: usize,
    ) -> Result<Region, ServerError> {
        let m = &config.memory;
        let spec = RegionSpec {
            name: config.name.clone(),
            backend: m.backend.clone(),
            size: m.size,
            pow2: m.pow2,
            vectors: config.vectors,
            peer_limit: 1 << 16,
            id_policy: IdPolicy::Increasing,
            origin: Origin::Standalone,
            persist: true,
        };
        let mut region = Region::with_memory(index, &spec, queue_limit)?;
        let listener = Listener::bind(&config.listener)?;
        region.sockets.push(RegionSocket {
            key,
            vm: None,
            listener,
        });
        Ok(region)
    }

    /// A region without sockets yet (named regions get theirs in VM directories).
    pub(crate) fn with_memory(
        index: usize,
        spec: &RegionSpec,
        queue_limit: usize,
    ) -> Result<Region, ServerError> {
        let memory =
            ivshm_mem::backend::create(&spec.backend, spec.size, spec.pow2).map_err(|source| {
                ServerError::Memory {
                    region: spec.name.clone(),
                    source,
                }
            })?;
        let shm_fd = Arc::new(
            memory
                .try_clone_fd()
                .map_err(|source| ServerError::Memory {
                    region: spec.name.clone(),
                    source,
                })?,
        );
        tracing::info!(
            region = %spec.name,
            size = memory.size(),
            vectors = spec.vectors,
            peer_limit = spec.peer_limit,
            origin = spec.origin.as_str(),
            "serving {} of {} with {} vector(s) per peer",
            format_size(memory.size()),
            memory.description(),
            spec.vectors
        );
        Ok(Region {
            index,
            name: spec.name.clone(),
            memory,
            shm_fd,
            vectors: spec.vectors,
            queue_limit,
            ids: IdAllocator::new(),
            id_policy: spec.id_policy,
            peer_limit: spec.peer_limit,
            peers: BTreeMap::new(),
            via: BTreeMap::new(),
            sockets: Vec::new(),
            accept_paused: false,
            origin: spec.origin,
            persist: spec.persist,
            detached: false,
            had_peers: false,
        })
    }

    /// The region's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Its sockets.
    pub(crate) fn sockets(&self) -> &[RegionSocket] {
        &self.sockets
    }

    /// Adds a socket (already watched by the poller unless accepting is paused).
    pub(crate) fn add_socket(&mut self, socket: RegionSocket, poller: &Poller) {
        if !self.accept_paused {
            if let Err(errno) = poller.add(socket.listener.fd(), Token::Listener(socket.key)) {
                tracing::error!(region = %self.name, %errno, "cannot watch a socket");
            }
        }
        self.sockets.push(socket);
    }

    /// Removes the socket with `key` (its file goes with it); peers that joined through it
    /// stay. Returns it.
    pub(crate) fn remove_socket(&mut self, key: usize, poller: &Poller) -> Option<RegionSocket> {
        let at = self.sockets.iter().position(|s| s.key == key)?;
        let socket = self.sockets.remove(at);
        let _ = poller.remove(socket.listener.fd());
        Some(socket)
    }

    /// Ids of the connected peers.
    pub(crate) fn peer_ids(&self) -> Vec<u16> {
        self.peers.keys().copied().collect()
    }

    /// Ids of the peers that joined through socket `key`.
    pub(crate) fn peers_via(&self, key: usize) -> Vec<u16> {
        self.via
            .iter()
            .filter(|(_, &k)| k == key)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Whether the region admits no more peers.
    pub(crate) fn is_full(&self) -> bool {
        self.peers.len() >= self.peer_limit
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub(crate) fn info(&self) -> RegionInfo {
        RegionInfo {
            name: self.name.clone(),
            socket: self.socket_path().to_path_buf(),
            size: self.memory.size(),
            vectors: self.vectors,
            memory: self.memory.description().to_string(),
            peer_limit: self.peer_limit,
            id_policy: self.id_policy,
        }
    }

    /// Logs the region and its peers (on `SIGHUP`).
    pub(crate) fn log_status(&self) {
        tracing::info!(
            region = %self.name,
            sockets = self.sockets.len(),
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

    /// Accepts every waiting connection on socket `key`.
    pub(crate) fn accept_all(&mut self, key: usize, ctx: &mut LoopContext<'_>) {
        if self.accept_paused {
            return;
        }
        loop {
            let Some(socket) = self.sockets.iter().find(|s| s.key == key) else {
                return;
            };
            match socket.listener.accept() {
                Ok(Some(connection)) => {
                    ctx.observer.accepted(&self.name, connection.as_fd());
                    self.join(connection, key, ctx)
                }
                Ok(None) => return,
                // `accept` needs a free fd before it even looks at the queue.
                Err(e) if is_fd_exhaustion(e) => {
                    if !self.refuse_for_lack_of_fds(key, e, ctx) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(region = %self.name, errno = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// Out of fds at `accept`: accept a waiting connection into the reserve fd's slot and close
    /// it. Returns true if one was refused (there may be more). If even that is impossible,
    /// stops accepting until a peer leaves, so the loop does not spin on a readable listener.
    fn refuse_for_lack_of_fds(
        &mut self,
        key: usize,
        errno: Errno,
        ctx: &mut LoopContext<'_>,
    ) -> bool {
        let Some(socket) = self.sockets.iter().find(|s| s.key == key) else {
            return false;
        };
        let listener = &socket.listener;
        let stats = ctx.stats;
        // Counted before the close, so whoever sees the connection closed sees the count.
        let result = ctx.reserve.release_for(|| {
            listener.accept().map(|socket| {
                let refused = socket.is_some();
                if refused {
                    stats.refused();
                }
                refused
            })
        });
        match result {
            Ok(true) => {
                tracing::error!(
                    region = %self.name,
                    %errno,
                    "{}",
                    fd_exhaustion_message(ctx.total_peers, self.vectors, "refused a new peer")
                );
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::error!(
                    region = %self.name,
                    errno = %e,
                    "{}",
                    fd_exhaustion_message(
                        ctx.total_peers,
                        self.vectors,
                        "not accepting new peers until one leaves"
                    )
                );
                for socket in &self.sockets {
                    let _ = ctx.poller.remove(socket.listener.fd());
                }
                self.accept_paused = true;
                false
            }
        }
    }

    /// True while accepting is paused for lack of fds.
    pub(crate) fn accept_paused(&self) -> bool {
        self.accept_paused
    }

    /// Watches the listener again after fds were freed.
    pub(crate) fn resume_accepting(&mut self, poller: &Poller) {
        if !self.accept_paused {
            return;
        }
        for socket in &self.sockets {
            if let Err(errno) = poller.add(socket.listener.fd(), Token::Listener(socket.key)) {
                tracing::error!(region = %self.name, %errno, "cannot watch a socket again");
            }
        }
        self.accept_paused = false;
        tracing::info!(region = %self.name, "accepting new peers again");
    }

    /// Gives a new connection an id, its eventfds and its handshake, and tells the others.
    fn join(&mut self, socket: OwnedFd, key: usize, ctx: &mut LoopContext<'_>) {
        if self.is_full() {
            // Accepted and closed at once: the peer sees its connection closed before any
            // message, as it would if the server were gone.
            drop(socket);
            ctx.stats.refused_with(GuestShmStatus::ClientMax);
            tracing::warn!(
                region = %self.name,
                peers = self.peers.len(),
                "refused a peer: the region has its limit of {} peer(s) ({})",
                self.peer_limit,
                GuestShmStatus::ClientMax
            );
            return;
        }
        let peers = &self.peers;
        let allocated = match self.id_policy {
            IdPolicy::Increasing => self.ids.allocate(|i| peers.contains_key(&i)),
            IdPolicy::LowestFree => lowest_free(self.peer_limit, |i| peers.contains_key(&i)),
        };
        let Some(id) = allocated else {
            tracing::error!(region = %self.name, "no free peer id; refusing a new peer");
            ctx.stats.refused();
            return;
        };
        let eventfds = match self.create_eventfds() {
            Ok(fds) => fds,
            Err(errno) => {
                if is_fd_exhaustion(errno) {
                    tracing::error!(
                        region = %self.name,
                        %errno,
                        "{}",
                        fd_exhaustion_message(
                            ctx.total_peers,
                            self.vectors,
                            &format!("refusing peer {id}")
                        )
                    );
                } else {
                    tracing::error!(region = %self.name, %errno, "eventfd failed; refusing peer {id}");
                }
                ctx.stats.refused();
                return;
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
        ctx.stats.doorbell_fds(handed_out as u64);

        let serial = *ctx.next_serial;
        *ctx.next_serial += 1;
        let peer = Peer::new(id, serial, socket, eventfds, queue);
        if let Err(errno) = ctx.poller.add(peer.socket(), peer.token()) {
            tracing::error!(region = %self.name, %errno, "cannot watch the socket of peer {id}; refusing it");
            ctx.stats.refused();
            return;
        }
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
        ctx.connections.insert(serial, (self.index, id));
        self.peers.insert(id, peer);
        self.via.insert(id, key);
        self.had_peers = true;
        ctx.stats.joined();
        tracing::info!(
            region = %self.name,
            peer = id,
            peers = self.peers.len(),
            "peer {id} joined"
        );
        self.flush_all(ctx, &mut failed);
        self.remove_all(failed, ctx);
    }

    fn create_eventfds(&self) -> Result<Vec<Arc<OwnedFd>>, Errno> {
        (0..self.vectors)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map(Arc::new))
            .collect()
    }

    /// Handles readiness of peer `id`'s socket.
    pub(crate) fn on_peer_event(
        &mut self,
        id: u16,
        readable: bool,
        writable: bool,
        ctx: &mut LoopContext<'_>,
    ) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if readable {
            if let Some(reason) = peer.check_input() {
                self.remove_all(vec![(id, reason)], ctx);
                return;
            }
        }
        if writable {
            let mut sent = 0;
            let result = peer.flush(ctx.poller, &mut sent);
            ctx.stats.sent(sent);
            if let Err(reason) = result {
                self.remove_all(vec![(id, reason)], ctx);
            }
        }
    }

    /// Flushes every peer with something queued; failures are added to `failed`.
    fn flush_all(&mut self, ctx: &mut LoopContext<'_>, failed: &mut Vec<(u16, RemovalReason)>) {
        let mut sent = 0;
        for peer in self.peers.values_mut() {
            if peer.queue.is_empty() {
                continue;
            }
            if let Err(reason) = peer.flush(ctx.poller, &mut sent) {
                failed.push((peer.id, reason));
            }
        }
        ctx.stats.sent(sent);
    }

    /// Removes peers, telling every remaining peer; peers that fail to take that news are
    /// removed in turn (a worklist, so a cascade cannot recurse).
    fn remove_all(&mut self, mut work: Vec<(u16, RemovalReason)>, ctx: &mut LoopContext<'_>) {
        while let Some((id, reason)) = work.pop() {
            let Some(peer) = self.peers.remove(&id) else {
                continue;
            };
            ctx.connections.remove(&peer.serial);
            self.via.remove(&id);
            let _ = ctx.poller.remove(peer.socket());
            ctx.stats.removed(reason.is_drop());
            ctx.observer.removed(&self.name, id, &reason);
            if reason.is_drop() {
                tracing::warn!(region = %self.name, peer = id, peers = self.peers.len(), "dropped peer {id}: {reason}");
            } else {
                tracing::info!(region = %self.name, peer = id, peers = self.peers.len(), "peer {id} left: {reason}");
            }
            drop(peer);
            for other in self.peers.values_mut() {
                if let Err(full) = other.queue.push(i64::from(id), None) {
                    work.push((other.id, RemovalReason::StoppedReading(full)));
                }
            }
            self.flush_all(ctx, &mut work);
        }
    }

    /// The first socket's path (empty when it has none).
    pub(crate) fn socket_path(&self) -> &Path {
        self.sockets
            .first()
            .map(|s| s.listener.path())
            .unwrap_or(Path::new(""))
    }
}
