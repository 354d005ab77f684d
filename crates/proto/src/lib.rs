//! Wire protocols and device ABIs of ivshm (dependency-light: no VMM crates).
//!
//! - [`v0`]: QEMU's ivshmem server ↔ peer protocol, version 0 (what `ivshmem-doorbell` speaks):
//!   the pure message codec and its meaning.
//! - [`fd_passing`]: sending and receiving one 8-byte message with at most one file descriptor
//!   (`SCM_RIGHTS`) over a UNIX stream socket, robust to partial reads and writes.
//! - [`factory`]: the factory protocol of a VM directory's `factory.sock` (create or find a named
//!   region) and the JSON-lines framing it shares with [`control`], the server's control socket.
//! - [`socket_path`]: how long a UNIX socket path may be (`sun_path`), checked wherever a
//!   socket path is taken.
//!
//! The device ABIs, each fact defined once for device models, guests and tests:
//!
//! - [`ivshmem`]: the ivshmem PCI device: IDs, BARs, BAR0 registers, the Doorbell encoding.
//! - [`guest_shm`]: QNX's `guest_shm` device: PCI IDs, factory and control page layout, the
//!   `GSS_*` status codes.
//! - [`jailhouse`]: Jailhouse's ivshmem v2 PCI IDs.
//! - [`pci_resource`]: the parser of Linux's sysfs `resource` file, where a guest finds BARs.
//!
//! Codecs here are pure functions; the only I/O is the thin socket layer in [`fd_passing`].

pub mod control;
pub mod factory;
pub mod fd_passing;
pub mod guest_shm;
pub mod ivshmem;
pub mod jailhouse;
pub mod pci_resource;
pub mod socket_path;
pub mod v0;

pub use fd_passing::{
    send_message, send_message_blocking, FdPassingError, MessageReader, Received, SendProgress,
};
pub use socket_path::{check_socket_path, SocketPathTooLong, MAX_SOCKET_PATH};
pub use v0::{decode, encode, Message, ProtocolError};
