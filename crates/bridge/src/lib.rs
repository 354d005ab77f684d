//! A socket bridge over an ivshm channel: connections accepted on one side (a TCP or unix
//! address) are opened on the other side (connecting to another address), and their bytes,
//! half-closes and resets cross the shared-memory region, like `socat` or an ssh tunnel
//! between a VM and the host, or between two VMs, with no network device.
//!
//! The wire format is specified in `docs/bridge.md`: one channel (named like the bridge)
//! carries every connection, multiplexed in frames ([`frame`]) with per-connection credit-based
//! flow control, so a slow connection never stalls the others. [`session`] is the protocol as a
//! state machine without I/O; [`Bridge`] is the epoll loop (one thread, no async runtime) that
//! runs it over the channel and the sockets; [`addr`] parses `tcp:HOST:PORT` and `unix:PATH`.
//!
//! The region and how departed peers are learnt of come from a [`Link`]: a host peer of an
//! ivshm server, a guest's ivshmem device, or a memfd shared by two local processes.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ivshm_bridge::{Bridge, Config, Link, Mode};
//! use ivshm_channel::{local::LocalBus, FormatOptions, Region};
//!
//! struct Local(Region);
//! impl Link for Local {
//!     fn region(&self) -> &Region { &self.0 }
//!     fn events_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> { None }
//!     fn process_events(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> { Ok(()) }
//! }
//!
//! let bus = LocalBus::new(16 << 20, 2, 1)?;
//! let region = Region::open_or_format(bus.map()?, Arc::new(bus.doorbell(0)?), FormatOptions::default())?;
//! let link = Local(region);
//! let listen = "tcp:127.0.0.1:2222".parse::<ivshm_bridge::Address>()?.resolve(true)?;
//! let mut bridge = Bridge::new(&link, Config::new("ssh", Mode::Listen(listen)))?;
//! let (stop, _stop_writer) = rustix::pipe::pipe()?;
//! bridge.run(std::os::fd::AsFd::as_fd(&stop))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod addr;
pub mod bridge;
pub mod frame;
pub mod session;

pub use addr::{Address, AddressError, Endpoint};
pub use bridge::{Bridge, BridgeError, Config, Link, Mode, Status};
