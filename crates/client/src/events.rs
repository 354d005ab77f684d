//! What a [`Peer`](crate::Peer) reports: doorbells on its own vectors, peers joining and
//! leaving, the server going and coming back.

/// A change in the set of other peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer joined with this many vectors (see the join rule in [`crate::peer_table`]).
    Joined {
        /// Its id.
        id: u16,
        /// How many of its vectors we can ring.
        vectors: usize,
    },
    /// A peer left; its vectors are closed.
    Left {
        /// Its id.
        id: u16,
    },
}

impl PeerEvent {
    /// The ids of `events` that left and did not join again later in the list: the peers whose
    /// channel sides to mark gone (`ivshm_channel::Region::peer_left`). A leave followed by a
    /// join of the same id is skipped: the id belongs to a new peer by then.
    pub fn departed(events: &[PeerEvent]) -> Vec<u16> {
        events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                PeerEvent::Left { id }
                    if !events[i + 1..].iter().any(
                        |later| matches!(later, PeerEvent::Joined { id: j, .. } if j == id),
                    ) =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .collect()
    }
}

/// Something that happened to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Our own vector `vector` was rung (at least once since the last report: rings coalesce).
    Doorbell {
        /// The vector index.
        vector: usize,
    },
    /// A peer joined or left.
    Peer(PeerEvent),
    /// The server closed the connection. Doorbells between existing peers keep working; no
    /// more join/leave news arrives until a reconnect.
    ServerGone,
    /// A new connection to a (possibly restarted) server is up. The id, the shared memory and
    /// the peer table may have changed: re-read them and map the memory again.
    Reconnected {
        /// Our new id.
        id: u16,
    },
}
