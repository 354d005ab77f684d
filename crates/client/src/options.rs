//! How a [`Peer`](crate::Peer) connects: timeouts, vector limit, reconnecting, the settle time.

use std::time::Duration;

use ivshm_proto::v0::MAX_VECTORS;

/// How long connecting waits for more own vectors after the last one when no other peer tells it
/// how many to expect, and how long a join short of vectors waits for more.
pub(crate) const DEFAULT_SETTLE: Duration = Duration::from_millis(50);

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Time allowed for connecting and the whole handshake (default 5 s).
    pub timeout: Duration,
    /// Most eventfds kept per peer, ours included; extra ones are closed with a warning
    /// (default and maximum 64, QEMU's limit).
    pub max_vectors: usize,
    /// Reconnect when the server closes the socket (default false). See [`crate::reconnect`].
    pub reconnect: bool,
    /// First delay before reconnecting (default 100 ms); doubles after each failure.
    pub reconnect_delay: Duration,
    /// Longest delay between reconnect attempts (default 5 s).
    pub reconnect_max_delay: Duration,
    /// How long the socket must stay quiet after our first own vector before the handshake
    /// counts as complete, when no other peer says how many vectors to expect; also how long
    /// a peer that sent fewer vectors than we have waits before its join is reported
    /// (default 50 ms). See [`crate::peer_table`] for the join rule.
    pub settle: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            timeout: Duration::from_secs(5),
            max_vectors: MAX_VECTORS,
            reconnect: false,
            reconnect_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            settle: DEFAULT_SETTLE,
        }
    }
}
