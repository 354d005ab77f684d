//! Message channels between peers of one shared-memory region: VMs and host programs alike.
//!
//! A *channel region* (its layout is the versioned specification `docs/channel-spec.md`) holds a
//! header, a directory of named channels and two rings per channel, one per direction. Two
//! programs that share the region and open the same name get the two ends of one channel
//! ([`Region::channel`]); each sends messages of 1 byte up to the ring's capacity, delivered
//! whole, in order, exactly once. Waiting spins briefly, then sleeps on a [`Doorbell`]; a sender
//! rings only a receiver that said it is going to sleep.
//!
//! The other side may be hostile: every value read from shared memory is read once, validated
//! against private copies of the geometry, and a channel whose memory breaks the protocol fails
//! with [`ChannelError::ChannelCorrupt`] (other channels keep working), never a panic, an
//! access outside the region or an unbounded loop. Only the `shm` module touches the shared
//! memory (atomics and raw copies into private buffers, no Rust references).
//!
//! ```
//! use std::sync::Arc;
//! use ivshm_channel::{local::LocalBus, ChannelOptions, FormatOptions, Region};
//!
//! // Two peers (ids 0 and 1) with one vector each, sharing a 1 MiB memfd.
//! let bus = LocalBus::new(1 << 20, 2, 1)?;
//! let a = Region::open_or_format(bus.map()?, Arc::new(bus.doorbell(0)?), FormatOptions::default())?;
//! let b = Region::open(bus.map()?, Arc::new(bus.doorbell(1)?))?;
//! let mut left = a.channel("demo", ChannelOptions::default())?;
//! let mut right = b.channel("demo", ChannelOptions::default())?;
//! left.send(b"hello", None)?;
//! let mut buf = Vec::new();
//! right.recv(&mut buf, None)?;
//! assert_eq!(buf, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules: [`layout`] (every constant of the spec), `shm` (the audited memory access), `ring`
//! (one ring's protocol), [`channel`] (endpoints, waiting), [`region`] (directory), `wait`
//! (one vector shared by several waiting threads), [`doorbell`] (the trait), [`local`]
//! (memfd + eventfd doorbells for tests and host-only use), [`traffic`] (checked traffic for
//! soak tests and self-checks).

pub mod channel;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod doorbell;
pub mod error;
pub mod layout;
pub mod local;
pub mod region;
pub mod traffic;

mod ring;
mod shm;
mod sync;
mod wait;

pub use channel::{Channel, Message, PeerStatus, Receiver, Reservation, Sender, Side, Spin};
pub use doorbell::{Doorbell, DoorbellError};
pub use error::{ChannelError, Corruption, RegionError};
pub use layout::{Geometry, LayoutError};
pub use region::{
    mark_departed, ChannelInfo, ChannelOptions, Departure, FormatOptions, Region, RegionMemory,
    SideInfo,
};
