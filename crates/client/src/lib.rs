//! A host peer for QEMU's ivshmem server protocol (version 0).
//!
//! [`Peer::connect`] joins a server (ours, or QEMU's `contrib/ivshmem-server`) the way QEMU's
//! `ivshmem-doorbell` device does, validating every message as the device does. A peer then:
//! - maps the shared memory ([`Peer::map`]),
//! - keeps the peer table: other peers' ids and the eventfds of their vectors
//!   ([`Peer::peer_ids`], [`Peer::peer_vector_fd`]),
//! - rings a peer's vector ([`Peer::notify`]),
//! - waits for doorbells on its own vectors and for peers joining and leaving, either blocking
//!   ([`Peer::wait`]) or from the caller's poll loop ([`Peer::poll_fd`],
//!   [`Peer::process_server_messages`]),
//! - optionally reconnects when the server restarts ([`reconnect`]).
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use ivshm_client::{ConnectOptions, Event, Peer, PeerEvent};
//!
//! let mut peer = Peer::connect(Path::new("/tmp/ivshmem_socket"), ConnectOptions::default())?;
//! println!("I am peer {} with {} vectors", peer.id(), peer.vectors());
//! let memory = peer.map()?;
//! memory.view().write(0, b"hello")?;
//! for other in peer.peer_ids() {
//!     peer.notify(other, 0)?;
//! }
//! while let Some(event) = peer.wait(Some(Duration::from_secs(5)))? {
//!     match event {
//!         Event::Doorbell { vector } => println!("rung on vector {vector}"),
//!         Event::Peer(PeerEvent::Joined { id, vectors }) => println!("{id} joined ({vectors})"),
//!         Event::Peer(PeerEvent::Left { id }) => println!("{id} left"),
//!         Event::ServerGone => break,
//!         Event::Reconnected { .. } => {}
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Joins.** The protocol has no join message; see [`peer_table`] for the rule (a peer has
//! joined when it has as many vectors as we do, or when the server's burst of its vectors
//! ended). Peers already there at connect are listed by [`Peer::peer_ids`] without events.
//!
//! **Reconnects.** With `ConnectOptions { reconnect: true, .. }` a peer whose server went
//! away ([`Event::ServerGone`]) reconnects with backoff and reports [`Event::Reconnected`]:
//! the id, the shared memory and the peer table may all have changed (see [`reconnect`]).
//!
//! Modules, by concern (each depends only on those listed before it; no cycles):
//! - [`events`]: what is reported ([`Event`], [`PeerEvent`]),
//! - `options`: [`ConnectOptions`],
//! - [`doorbell`]: ringing and draining eventfds,
//! - `wait_set`: the epoll set a peer waits on,
//! - [`reconnect`]: backoff and the retry timer,
//! - [`peer_table`]: ids → eventfds, and the rule that decides when a peer has joined,
//! - [`handshake`]: the sans-I/O handshake state machine,
//! - [`error`]: the error type, [`ClientError`],
//! - `connection`: connecting and the handshake with a deadline, reading the socket,
//! - `peer`: [`Peer`], which ties them together.

pub mod channel_doorbell;
pub mod doorbell;
pub mod error;
pub mod events;
pub mod handshake;
pub mod peer_table;
pub mod reconnect;

mod connection;
mod deadline;
mod options;
mod peer;
mod wait_set;

pub use channel_doorbell::PeerDoorbell;
pub use connection::connect_socket;
pub use error::{ClientError, ConnectHint};
pub use events::{Event, PeerEvent};
pub use handshake::{Handshake, HandshakeError};
pub use options::ConnectOptions;
pub use peer::Peer;
pub use peer_table::{MessageError, PeerTable};
