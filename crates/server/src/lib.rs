//! The ivshmem server as a library: QEMU's protocol version 0, byte for byte, served from one
//! single-threaded epoll loop.
//!
//! A [`Server`] holds a set of regions (one shared-memory object each, with its own listening
//! socket and peers); today the command-line programs configure one, the library takes any
//! number. Use it in-process:
//!
//! ```no_run
//! use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
//! let handle = ServerHandle::spawn(ServerConfig::single(RegionConfig::new("/tmp/sock")))?;
//! // ... connect peers to handle.socket_path() ...
//! let stats = handle.shutdown()?;
//! # Ok::<(), ivshm_server::ServerError>(())
//! ```
//!
//! or drive the loop yourself with [`Server::new`] and [`Server::run_until`] (the binaries pass
//! the signal pipes of [`signals::SignalPipes`]).
//!
//! Modules: [`config`] (what to serve), [`ids`] (QEMU's id allocation), [`queue`] (a peer's
//! outgoing messages), [`listener`] (socket creation and removal), [`group`] (`/etc/group`),
//! [`limits`] (fd limits), [`signals`], [`pidfile`], [`stats`]; the loop, regions and peers are internal.

pub mod config;
pub mod config_file;
mod control;
mod endpoints;
mod event_loop;
mod factory;
pub mod group;
mod handle;
pub mod ids;
pub mod limits;
pub mod listener;
pub mod named;
mod peer;
pub mod pidfile;
pub mod queue;
mod region;
mod server;
pub mod signals;
pub mod stats;
mod vm_dirs;

use thiserror::Error;

pub use config::{ConfigError, ListenerConfig, MemoryConfig, RegionConfig, ServerConfig};
pub use config_file::FileConfigError;
pub use group::GroupSpec;
pub use handle::ServerHandle;
pub use ids::IdPolicy;
pub use named::{NamedConfig, NamedRegionConfig, VmConfig};
pub use peer::RemovalReason;
pub use region::RegionInfo;
pub use server::{Control, ControlAction, Server};
pub use stats::{Stats, StatsSnapshot};

/// Errors that stop a server from starting or running.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A region's memory could not be created.
    #[error("region {region}: {source}")]
    Memory {
        /// The region.
        region: String,
        /// Why.
        source: ivshm_mem::BackendError,
    },
    /// A listening socket could not be set up.
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    Epoll(rustix::io::Errno),
    /// The server thread could not start.
    #[error("starting the server thread: {0}")]
    Thread(std::io::Error),
    /// The server thread panicked.
    #[error("the server thread panicked")]
    Panicked,
    /// A VM directory or the socket root could not be set up.
    #[error("{0}")]
    Setup(String),
}
