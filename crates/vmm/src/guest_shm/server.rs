//! [`Factory`] over the server's factory protocol (`ivshm_proto::factory`, JSON lines on a
//! VM's `factory.sock`): the server applies the VM's policy and answers with a v0 region
//! socket; the connection then is an ordinary v0 peer ([`ivshm_client::Peer`]).
//!
//! Control-page semantics over v0, for regions the factory offers with 16 vectors:
//!
//! * `idx` = the peer's v0 id (the factory's regions hand out the lowest free id below 16;
//!   a connection whose id is 16 or more is refused with `GSS_CLIENT_MAX`);
//! * attached bitmap = own id and every known peer id;
//! * `notify(mask)` rings vector *my idx* of each peer in `mask` — one vector per possible
//!   sender, so the receiver knows who rang;
//! * a doorbell on own vector *v* sets pending bit *v*; a thread per connection waits on the
//!   peer's events, records doorbells and joins/leaves, and signals the device interrupt.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ivshm_client::{ConnectOptions, Event, Peer};
use ivshm_policy::RegionName;
use ivshm_proto::factory::{decode_line, encode_line, FactoryRequest, FactoryResponse};
use ivshm_proto::guest_shm::{GuestShmStatus, MAX_CLIENTS, PAGE_SIZE};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};

use crate::guest_shm::{dup, Attachment, Factory, RegionConnection};
use crate::ivshmem::link::ring_eventfd;

/// A VM's factory reached through the server's `factory.sock`.
#[derive(Debug, Clone)]
pub struct ServerFactory {
    socket: PathBuf,
    timeout: Duration,
}

impl ServerFactory {
    /// Talks to the factory at `socket`; every request and region join must finish within
    /// `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> ServerFactory {
        ServerFactory {
            socket: socket.into(),
            timeout,
        }
    }

    fn request(&self, request: &FactoryRequest) -> Result<FactoryResponse, GuestShmStatus> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(socket = %self.socket.display(), "guest_shm factory {what}: {e}");
            GuestShmStatus::UnknownFailure
        };
        let stream = UnixStream::connect(&self.socket).map_err(|e| fail("connect", &e))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| fail("timeout", &e))?;
        (&stream)
            .write_all(&encode_line(request))
            .map_err(|e| fail("write", &e))?;
        let mut line = Vec::new();
        BufReader::new(&stream)
            .take(ivshm_proto::factory::MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| fail("read", &e))?;
        decode_line(&line).map_err(|e| fail("response", &e))
    }

    fn attach(
        &self,
        request: &FactoryRequest,
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let response = self.request(request)?;
        if response.status != GuestShmStatus::Ok {
            return Err(response.status);
        }
        let offer = response.region.ok_or(GuestShmStatus::UnknownFailure)?;
        let opts = ConnectOptions {
            timeout: self.timeout,
            ..ConnectOptions::default()
        };
        let peer = Peer::connect(Path::new(&offer.socket), opts).map_err(|e| {
            tracing::warn!(socket = %offer.socket, error = %e, "guest_shm: joining the region failed");
            GuestShmStatus::UnknownFailure
        })?;
        if usize::from(peer.id()) >= MAX_CLIENTS {
            return Err(GuestShmStatus::ClientMax);
        }
        let memory = Arc::new(peer.map().map_err(|_| GuestShmStatus::NoMem)?);
        let pages =
            u32::try_from(peer.shm_size() / PAGE_SIZE as u64).map_err(|_| GuestShmStatus::NoMem)?;
        let connection = ServerConnection::start(peer, interrupt)?;
        Ok(Attachment {
            connection: Box::new(connection),
            memory,
            pages,
        })
    }
}

/// The guest's name from the factory page's field, or `GSS_ILLEGAL_NAME`.
fn guest_name(field: &[u8]) -> Result<String, GuestShmStatus> {
    RegionName::from_factory_field(field)
        .map(RegionName::into_string)
        .map_err(|_| GuestShmStatus::IllegalName)
}

impl Factory for ServerFactory {
    fn create_or_attach(
        &mut self,
        name: &[u8],
        pages: u32,
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let request = FactoryRequest::Create {
            name: guest_name(name)?,
            size: u64::from(pages) * PAGE_SIZE as u64,
        };
        self.attach(&request, interrupt)
    }

    fn find(
        &mut self,
        name: &[u8],
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let request = FactoryRequest::Find {
            name: guest_name(name)?,
        };
        self.attach(&request, interrupt)
    }
}

struct Shared {
    /// `None` after detach (dropping the peer closes its socket; the server tells others).
    peer: Mutex<Option<Peer>>,
    pending: AtomicU32,
}

/// A control page over a v0 peer.
struct ServerConnection {
    shared: Arc<Shared>,
    idx: u32,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl ServerConnection {
    fn start(peer: Peer, interrupt: BorrowedFd<'_>) -> Result<ServerConnection, GuestShmStatus> {
        let idx = u32::from(peer.id());
        let shared = Arc::new(Shared {
            peer: Mutex::new(Some(peer)),
            pending: AtomicU32::new(0),
        });
        let stop = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|_| GuestShmStatus::UnknownFailure)?;
        let stop_thread = dup(stop.as_fd())?;
        let interrupt = dup(interrupt)?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("guest_shm-conn".into())
            .spawn(move || watch(&thread_shared, &stop_thread, &interrupt))
            .map_err(|_| GuestShmStatus::UnknownFailure)?;
        Ok(ServerConnection {
            shared,
            idx,
            stop,
            thread: Some(thread),
        })
    }
}

/// Waits for the peer's events: doorbells set pending bits, joins/leaves change the bitmap;
/// either signals the device interrupt.
fn watch(shared: &Shared, stop: &OwnedFd, interrupt: &OwnedFd) {
    let poll_fd = match shared.peer.lock().as_deref() {
        Ok(Some(p)) => match p.poll_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => return,
        },
        _ => return,
    };
    loop {
        let mut fds = [
            PollFd::new(&poll_fd, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        let mut changed = false;
        let Ok(mut guard) = shared.peer.lock() else {
            return;
        };
        let Some(peer) = guard.as_mut() else {
            return;
        };
        loop {
            match peer.wait(Some(Duration::ZERO)) {
                Ok(Some(Event::Doorbell { vector })) => {
                    if vector < MAX_CLIENTS {
                        shared.pending.fetch_or(1 << vector, Ordering::SeqCst);
                    }
                    changed = true;
                }
                Ok(Some(_)) => changed = true,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "guest_shm: region connection failed");
                    break;
                }
            }
        }
        drop(guard);
        if changed {
            let _ = ring_eventfd(interrupt.as_fd());
        }
    }
}

impl RegionConnection for ServerConnection {
    fn idx(&self) -> u32 {
        self.idx
    }

    fn read_status(&mut self) -> u32 {
        let attached = match self.shared.peer.lock().as_deref() {
            Ok(Some(p)) => p
                .peer_ids()
                .into_iter()
                .chain([p.id()])
                .filter(|&id| usize::from(id) < MAX_CLIENTS)
                .fold(0u32, |m, id| m | (1 << id)),
            _ => 0,
        };
        let pending = self.shared.pending.swap(0, Ordering::SeqCst) & 0xffff;
        (attached << 16) | pending
    }

    fn notify(&mut self, mask: u32) {
        let Ok(guard) = self.shared.peer.lock() else {
            return;
        };
        let Some(peer) = guard.as_ref() else {
            return;
        };
        let targets: Vec<u16> = if mask == u32::MAX {
            peer.peer_ids()
        } else {
            (0..MAX_CLIENTS as u16)
                .filter(|&i| mask & (1 << i) != 0)
                .collect()
        };
        let vector = self.idx as usize;
        for target in targets {
            let target_vectors = if target == peer.id() {
                Some(peer.vectors())
            } else {
                peer.peer_vectors(target)
            };
            match target_vectors {
                // Not attached: QNX ignores bits of absent clients too.
                None => tracing::debug!(target, "guest_shm: notify of an absent client skipped"),
                Some(n) if n <= vector => tracing::warn!(
                    target,
                    vectors = n,
                    "guest_shm: client {target} has {n} vectors, so it cannot be told that \
                     client {vector} notified it; configure the region with vectors = 16 \
                     (one per possible sender)"
                ),
                Some(_) => {
                    if let Err(e) = peer.notify(target, vector) {
                        tracing::warn!(target, error = %e, "guest_shm: notify failed");
                    }
                }
            }
        }
    }

    fn detach(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = ring_eventfd(self.stop.as_fd());
            let _ = thread.join();
        }
        // Dropping the peer closes its socket: the server tells the others.
        if let Ok(mut p) = self.shared.peer.lock() {
            p.take();
        }
    }
}

impl Drop for ServerConnection {
    fn drop(&mut self) {
        self.detach();
    }
}
