//! Doorbells and memory without a server: a memfd and one eventfd per (peer, vector), for tests
//! and host-only use, in one process or in several.
//!
//! [`LocalBus::new`] makes the memfd (sealed, `ivshm-mem`'s memfd backend) and the eventfds;
//! [`LocalBus::doorbell`] gives peer `id`'s [`LocalDoorbell`] and [`LocalBus::map`] a mapping.
//!
//! **Other processes** get them by fd inheritance, chosen over `SCM_RIGHTS` so that this crate
//! stays free of sockets (the ivshm server is the way for unrelated processes):
//! [`LocalBus::pass_to`] makes a `Command` inherit the memfd and every eventfd and names them
//! in the `IVSHM_LOCAL_BUS` environment variable together with the child's peer id;
//! in the child, [`LocalBus::from_env`] takes them over. The format of the variable is
//! `v1:<id>:<peers>:<vectors>:<memfd>:<eventfd>,<eventfd>,...` (eventfds in peer-major order).
//!
//! Eventfds are blocking: `wait` without a timeout is one `read(2)` (as cheap as a raw eventfd
//! ping-pong); with a timeout, `poll(2)` then `read(2)`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ivshm_mem::{Mapping, SharedMemory};
use rustix::event::{eventfd, EventfdFlags};
use rustix::io::Errno;
use thiserror::Error;

use crate::doorbell::{take_eventfd, wait_eventfd, Doorbell, DoorbellError};

/// The environment variable that passes a bus to a child process.
pub const ENV: &str = "IVSHM_LOCAL_BUS";

/// Making or inheriting a local bus failed.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum LocalError {
    /// creating the memory: {0}
    ///
    /// Creating the memfd failed.
    Memory(ivshm_mem::BackendError),
    /// mapping the memory: {0}
    ///
    /// Mapping it failed.
    Map(ivshm_mem::MapError),
    /// {op} failed: {errno}
    ///
    /// A system call failed.
    Sys {
        /// What was done.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// peer {id} does not exist on this bus ({peers} peers)
    ///
    /// Peer id out of range.
    NoSuchPeer {
        /// The id asked for.
        id: u16,
        /// Peers on the bus.
        peers: u16,
    },
    /// a bus needs 1..=256 peers and 1..=64 vectors (asked {peers} and {vectors})
    ///
    /// Zero peers or vectors, or too many eventfds.
    Shape {
        /// Peers asked for.
        peers: u16,
        /// Vectors asked for.
        vectors: u16,
    },
    /// {ENV:} is invalid: {0}
    ///
    /// The environment variable is malformed or names fds that are not open.
    BadEnv(String),
}

impl From<ivshm_mem::BackendError> for LocalError {
    fn from(error: ivshm_mem::BackendError) -> Self {
        LocalError::Memory(error)
    }
}

impl From<ivshm_mem::MapError> for LocalError {
    fn from(error: ivshm_mem::MapError) -> Self {
        LocalError::Map(error)
    }
}

fn sys(op: &'static str) -> impl Fn(Errno) -> LocalError {
    move |errno| LocalError::Sys { op, errno }
}

/// A memfd region and the eventfds of every (peer, vector).
#[derive(Debug)]
pub struct LocalBus {
    memory: OwnedFd,
    size: u64,
    peers: u16,
    vectors: u16,
    /// `peers * vectors` eventfds, peer-major.
    fds: Arc<Vec<OwnedFd>>,
}

impl LocalBus {
    /// A bus of `peers` peers with `vectors` vectors each over a fresh memfd of `size` bytes.
    pub fn new(size: u64, peers: u16, vectors: u16) -> Result<LocalBus, LocalError> {
        if !(1..=256).contains(&peers) || !(1..=64).contains(&vectors) {
            return Err(LocalError::Shape { peers, vectors });
        }
        let mem: SharedMemory = ivshm_mem::backend::memfd::create(size)?;
        let memory = mem.try_clone_fd()?;
        let fds = (0..u32::from(peers) * u32::from(vectors))
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC).map_err(sys("eventfd")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LocalBus {
            memory,
            size,
            peers,
            vectors,
            fds: Arc::new(fds),
        })
    }

    /// The memfd.
    pub fn memory_fd(&self) -> BorrowedFd<'_> {
        self.memory.as_fd()
    }

    /// A new shared mapping of the whole memfd.
    pub fn map(&self) -> Result<Mapping, LocalError> {
        let len = usize::try_from(self.size).map_err(|_| LocalError::Sys {
            op: "mmap",
            errno: Errno::NOMEM,
        })?;
        Ok(Mapping::map_fd(self.memory.as_fd(), 0, len)?)
    }

    /// Peer `id`'s doorbell.
    pub fn doorbell(&self, id: u16) -> Result<LocalDoorbell, LocalError> {
        if id >= self.peers {
            return Err(LocalError::NoSuchPeer {
                id,
                peers: self.peers,
            });
        }
        Ok(LocalDoorbell {
            id,
            peers: self.peers,
            vectors: self.vectors,
            fds: self.fds.clone(),
        })
    }

    /// Makes `cmd`'s child inherit the bus as peer `id` (see the module documentation). Keep
    /// the bus alive until the child is spawned.
    pub fn pass_to(&self, cmd: &mut Command, id: u16) -> Result<(), LocalError> {
        if id >= self.peers {
            return Err(LocalError::NoSuchPeer {
                id,
                peers: self.peers,
            });
        }
        let mut raw: Vec<RawFd> = vec![self.memory.as_raw_fd()];
        raw.extend(self.fds.iter().map(|f| f.as_raw_fd()));
        let list = raw[1..]
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(",");
        cmd.env(
            ENV,
            format!("v1:{id}:{}:{}:{}:{list}", self.peers, self.vectors, raw[0]),
        );
        let inherit = move || -> std::io::Result<()> {
            for &fd in &raw {
                // SAFETY: `fd` is open in the parent (the bus is alive while the command
                // spawns) and so in the forked child; the borrow ends with this statement.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        };
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl(2),
        // which is async-signal-safe; it allocates nothing (the fd list was built before).
        unsafe { std::os::unix::process::CommandExt::pre_exec(cmd, inherit) };
        Ok(())
    }

    /// In a child started with [`LocalBus::pass_to`]: the bus's memory (mapped) and our
    /// doorbell; `Ok(None)` when the variable is not set.
    pub fn from_env() -> Result<Option<(Mapping, LocalDoorbell)>, LocalError> {
        let Ok(value) = std::env::var(ENV) else {
            return Ok(None);
        };
        let bad = |why: &str| LocalError::BadEnv(why.to_string());
        let parts: Vec<&str> = value.split(':').collect();
        let [version, id, peers, vectors, mem, fds] = parts[..] else {
            return Err(bad("expected six ':'-separated fields"));
        };
        if version != "v1" {
            return Err(bad("unknown version"));
        }
        let num = |s: &str| s.parse::<u16>().map_err(|_| bad("a number is invalid"));
        let (id, peers, vectors) = (num(id)?, num(peers)?, num(vectors)?);
        if id >= peers || !(1..=256).contains(&peers) || !(1..=64).contains(&vectors) {
            return Err(bad("peer id, peer or vector count out of range"));
        }
        let fd_of = |s: &str| -> Result<OwnedFd, LocalError> {
            let raw: RawFd = s.parse().map_err(|_| bad("an fd is invalid"))?;
            if raw < 3 {
                return Err(bad("an fd is invalid"));
            }
            // SAFETY: checking with F_GETFD whether the number is open touches nothing.
            let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
            rustix::io::fcntl_getfd(borrowed).map_err(|_| bad("an fd is not open"))?;
            rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC)
                .map_err(sys("fcntl"))?;
            // SAFETY: the parent passed this open fd for us alone (`pass_to`); nothing else in
            // this process owns it, and it is taken over once (the variable is removed below).
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        };
        let list: Vec<&str> = fds.split(',').collect();
        if list.len() != usize::from(peers) * usize::from(vectors) {
            return Err(bad("wrong number of eventfds"));
        }
        let mut seen = std::collections::HashSet::new();
        if !std::iter::once(mem)
            .chain(list.iter().copied())
            .all(|s| seen.insert(s))
        {
            return Err(bad("an fd is named twice"));
        }
        let memory = fd_of(mem)?;
        let fds = list.into_iter().map(fd_of).collect::<Result<Vec<_>, _>>()?;
        std::env::remove_var(ENV);
        let size = ivshm_mem::backend::fd_size(memory.as_fd())?;
        let bus = LocalBus {
            memory,
            size,
            peers,
            vectors,
            fds: Arc::new(fds),
        };
        Ok(Some((bus.map()?, bus.doorbell(id)?)))
    }
}

/// One peer's doorbell on a [`LocalBus`]: ringing writes the target's eventfd, waiting reads
/// our own.
#[derive(Debug, Clone)]
pub struct LocalDoorbell {
    id: u16,
    peers: u16,
    vectors: u16,
    fds: Arc<Vec<OwnedFd>>,
}

impl LocalDoorbell {
    fn fd_of(&self, peer: u16, vector: u16) -> Result<BorrowedFd<'_>, DoorbellError> {
        if peer >= self.peers {
            return Err(DoorbellError::UnknownPeer { peer });
        }
        if vector >= self.vectors {
            return Err(DoorbellError::UnknownVector {
                peer,
                vector,
                vectors: self.vectors,
            });
        }
        let i = usize::from(peer) * usize::from(self.vectors) + usize::from(vector);
        Ok(self.fds[i].as_fd())
    }
}

impl Doorbell for LocalDoorbell {
    fn own_id(&self) -> u16 {
        self.id
    }

    fn vectors(&self) -> u16 {
        self.vectors
    }

    fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError> {
        let fd = self.fd_of(peer, vector)?;
        loop {
            match rustix::io::write(fd, &1u64.to_ne_bytes()) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    return Err(DoorbellError::Sys {
                        op: "eventfd write",
                        errno,
                    })
                }
            }
        }
    }

    fn wait(&self, vector: u16, timeout: Option<Duration>) -> Result<bool, DoorbellError> {
        wait_eventfd(self.fd_of(self.id, vector)?, timeout)
    }

    fn take(&self, vector: u16) -> Result<bool, DoorbellError> {
        take_eventfd(self.fd_of(self.id, vector)?)
    }

    fn fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.fd_of(self.id, vector).ok()
    }
}
