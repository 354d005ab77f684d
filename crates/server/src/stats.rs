//! Counters a server keeps, readable from other threads while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters (shared with [`ServerHandle`](crate::ServerHandle) through an `Arc`).
#[derive(Debug, Default)]
pub struct Stats {
    joined: AtomicU64,
    left: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    messages_sent: AtomicU64,
    connected: AtomicU64,
}

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
}

impl Stats {
    pub(crate) fn joined(&self) {
        self.joined.fetch_add(1, Ordering::Relaxed);
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn removed(&self, dropped: bool) {
        if dropped {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.left.fetch_add(1, Ordering::Relaxed);
        }
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
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
        }
    }
}
