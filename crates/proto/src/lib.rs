//! Wire protocols spoken by ivshm.
//!
//! - [`v0`]: QEMU's ivshmem server ↔ peer protocol, version 0 (what `ivshmem-doorbell` speaks):
//!   the pure message codec and its meaning.
//! - [`fd_passing`]: sending and receiving one 8-byte message with at most one file descriptor
//!   (`SCM_RIGHTS`) over a UNIX stream socket, robust to partial reads and writes.
//!
//! - [`factory`]: the factory protocol of a VM directory's `factory.sock` (create or find a named
//!   region) and the JSON-lines framing it shares with [`control`], the server's control socket.
//!
//! Codecs here are pure functions; the only I/O is the thin socket layer in [`fd_passing`].

pub mod control;
pub mod factory;
pub mod fd_passing;
pub mod v0;

pub use fd_passing::{
    send_message, send_message_blocking, FdPassingError, MessageReader, Received, SendProgress,
};
pub use v0::{decode, encode, Message, ProtocolError};
