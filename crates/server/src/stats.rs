//! Counters a server keeps, readable from other threads while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

use ivshm_policy::GuestShmStatus;

use crate::peer::RemovalReason;

/// Live counters (shared with [`ServerHandle`](crate::ServerHandle) through an `Arc`).
#[derive(Debug, Default)]
pub struct Stats {
    joined: AtomicU64,
    left: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    messages_sent: AtomicU64,
    connected: AtomicU64,
    doorbell_fds: AtomicU64,
    factory_requests: AtomicU64,
    /// Refusals by `GSS_*` status, indexed by the status code.
    refusals: [AtomicU64; REFUSAL_KINDS],
    /// Removals by reason, indexed by [`RemovalReason::index`].
    removals: [AtomicU64; REMOVAL_KINDS],
}

/// How many removal reasons are counted ([`RemovalReason::LABELS`]).
pub const REMOVAL_KINDS: usize = RemovalReason::LABELS.len();

/// How many status codes refusals are counted by (`GSS_OK` through `GSS_DOES_NOT_EXIST`).
pub const REFUSAL_KINDS: usize = GuestShmStatus::ALL.len();

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Peers that completed joining (got an id and their handshake was queued).
    pub peers_joined: u64,
    /// Peers that left by closing their socket.
    pub peers_left: u64,
    /// Peers the server dropped: they wrote to the socket, stopped reading, or a send failed.
    pub peers_dropped: u64,
    /// Connections refused before joining (out of fds or ids).
    pub peers_refused: u64,
    /// Whole messages written to peer sockets.
    pub messages_sent: u64,
    /// Peers connected now.
    pub peers_connected: u64,
    /// Eventfds handed out (a peer's own and the other peers' doorbells).
    pub doorbell_fds: u64,
    /// Factory requests answered.
    pub factory_requests: u64,
    /// Refused v0 connections and factory requests, indexed by `GSS_*` code
    /// ([`GuestShmStatus::as_u32`]). v0 connections refused at a region's peer limit count as
    /// `GSS_CLIENT_MAX`, those refused for lack of fds or ids as `GSS_UNKNOWN_FAILURE`.
    pub refusals: [u64; REFUSAL_KINDS],
    /// Peers removed, by reason ([`RemovalReason::LABELS`] order): leaves, drops and the
    /// server stopping.
    pub removals: [u64; REMOVAL_KINDS],
}

impl StatsSnapshot {
    /// Refusals with `status`.
    pub fn refusals_with(&self, status: GuestShmStatus) -> u64 {
        self.refusals
            .get(status.as_u32() as usize)
            .copied()
            .unwrap_or(0)
    }
}

impl Stats {
    pub(crate) fn joined(&self) {
        self.joined.fetch_add(1, Ordering::Relaxed);
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn removed(&self, reason: &RemovalReason) {
        if let Some(counter) = self.removals.get(reason.index()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if reason.is_drop() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.left.fetch_add(1, Ordering::Relaxed);
        }
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// A v0 connection refused for lack of fds or ids.
    pub(crate) fn refused(&self) {
        self.refused_with(GuestShmStatus::UnknownFailure);
    }

    /// A v0 connection refused with `status`.
    pub(crate) fn refused_with(&self, status: GuestShmStatus) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.refusal(status);
    }

    /// A refusal with `status` (v0 connection or factory request).
    pub(crate) fn refusal(&self, status: GuestShmStatus) {
        if let Some(counter) = self.refusals.get(status.as_u32() as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn doorbell_fds(&self, n: u64) {
        if n > 0 {
            self.doorbell_fds.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn factory_request(&self) {
        self.factory_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, messages: u64) {
        if messages > 0 {
            self.messages_sent.fetch_add(messages, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            peers_joined: self.joined.load(Ordering::Relaxed),
            peers_left: self.left.load(Ordering::Relaxed),
            peers_dropped: self.dropped.load(Ordering::Relaxed),
            peers_refused: self.refused.load(Ordering::Relaxed),
            messages_sent: self.messages_sent.load(Ordering::Relaxed),
            peers_connected: self.connected.load(Ordering::Relaxed),
            doorbell_fds: self.doorbell_fds.load(Ordering::Relaxed),
            factory_requests: self.factory_requests.load(Ordering::Relaxed),
            refusals: std::array::from_fn(|i| self.refusals[i].load(Ordering::Relaxed)),
            removals: std::array::from_fn(|i| self.removals[i].load(Ordering::Relaxed)),
        }
    }
}
