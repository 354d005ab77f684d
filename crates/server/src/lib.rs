//! The ivshmem server as a library: QEMU's protocol version 0, byte for byte, served from one
//! single-threaded epoll loop.
//!
//! A [`Server`] holds a set of regions (one shared-memory object each, with its peers). Two kinds:
//!
//! * **standalone** regions ([`RegionConfig`]), each on a socket of its own: QEMU's server, what
//!   `ivshm serve` without `--config` and `ivshmem-server` run;
//! * **named** regions ([`named`], configured by [`NamedConfig`] or a TOML file read by
//!   [`config_file`]) with QNX `vdev shmem` semantics: per-VM directories under a socket root
//!   holding one v0 socket per region the VM's policy lets it see (named by the VM's name for
//!   it) and a `factory.sock` (create / find, [`ivshm_proto::factory`]); a `control.sock`
//!   ([`ivshm_proto::control`]) to list, create and remove regions, list VMs, read counters and
//!   reload the file. Regions have a peer limit (a peer beyond it is accepted and closed at once,
//!   counted as a `GSS_CLIENT_MAX` refusal) and an [`IdPolicy`]. Regions made at run time go
//!   when their last peer leaves unless they persist; configured ones live as long as the server
//!   (or until a reload drops them and their last peer has left). `docs/named-regions.md` has
//!   the whole picture.
//!
//! Use it in-process:
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
//! Modules: [`access`] (who can reach a socket), [`config`] (what to serve), [`named`] (named regions and VMs), [`config_file`]
//! (the TOML file), [`ids`] (id allocation), [`queue`] (a peer's outgoing messages),
//! [`listener`] (socket creation and removal), [`group`] (`/etc/group`), [`limits`] (fd
//! limits), [`signals`], [`pidfile`], [`stats`], [`observer`] (hooks for programs that report
//! joins and leaves themselves), [`service_notify`] (systemd readiness). Internally each concern has one owner with
//! private state, and the loop (`server`) only routes events to them: `regions` (every region
//! and, through `listener_table`, its listening sockets and their epoll registration), `peer`
//! (peer connections), `departures` (marking the channel sides of peers that leave, in regions
//! that hold `ivshm-channel` channels), `named_regions` and `vms` (the named configuration and the VMs),
//! `vm_dir` (every path operation in the socket root and VM directories), `endpoints`
//! (factory and control sockets), `factory` and `control` (answering their requests).

pub mod access;
pub mod config;
pub mod config_file;
mod control;
mod departures;
mod dir_fd;
mod endpoints;
mod event_loop;
mod factory;
pub mod group;
mod handle;
pub mod ids;
mod inflight;
pub mod limits;
pub mod listener;
mod listener_table;
pub mod metrics;
pub mod named;
mod named_regions;
pub mod observer;
mod peer;
pub mod pidfile;
pub mod queue;
mod region;
mod regions;
mod server;
pub mod service_notify;
pub mod signals;
pub mod stats;
mod vm_dir;
mod vms;

use thiserror::Error;

pub use config::{ConfigError, ListenerConfig, MemoryConfig, RegionConfig, ServerConfig};
pub use config_file::FileConfigError;
pub use group::GroupSpec;
pub use handle::ServerHandle;
pub use ids::IdPolicy;
pub use inflight::MAX_UNREAD;
pub use named::{NamedConfig, NamedRegionConfig, VmConfig, VmLimits};
pub use observer::Observer;
pub use peer::RemovalReason;
pub use region::RegionInfo;
pub use server::{Control, ControlAction, Server};
pub use stats::{Stats, StatsSnapshot};
pub use vm_dir::DirError;

/// Errors that stop a server from starting or running.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum ServerError {
    /// {0}
    ///
    /// The configuration cannot work.
    Config(ConfigError),
    /// region {region}: {error}
    ///
    /// A region's memory could not be created.
    Memory {
        /// The region.
        region: String,
        /// Why.
        error: ivshm_mem::BackendError,
    },
    /// {0}
    ///
    /// A listening socket could not be set up.
    Listener(listener::ListenerError),
    /// metrics listener on {address}: {error}
    ///
    /// The metrics listener could not be opened.
    Metrics {
        /// The address asked for.
        address: String,
        /// Why.
        error: std::io::Error,
    },
    /// event loop: {0}
    ///
    /// The event loop failed.
    Epoll(rustix::io::Errno),
    /// starting the server thread: {0}
    ///
    /// The server thread could not start.
    Thread(std::io::Error),
    /// the server thread panicked
    ///
    /// The server thread panicked.
    Panicked,
    /// {0}
    ///
    /// A VM directory or the socket root could not be set up.
    Directory(DirError),
}

impl From<ConfigError> for ServerError {
    fn from(error: ConfigError) -> Self {
        Self::Config(error)
    }
}

impl From<listener::ListenerError> for ServerError {
    fn from(error: listener::ListenerError) -> Self {
        Self::Listener(error)
    }
}

impl From<DirError> for ServerError {
    fn from(error: DirError) -> Self {
        Self::Directory(error)
    }
}
