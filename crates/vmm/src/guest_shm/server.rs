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
//! * a doorbell on own vector *v* < 16 sets pending bit *v*; a thread per connection waits on
//!   the peer's events and signals the device interrupt once per change of `status` (a bit
//!   newly set, a client index joining or leaving; never for a bit already pending, a vector
//!   of 16 or more, or a peer whose id is not a client index). It runs at the VM's `sched`
//!   priority when given ([`ServerFactory::with_notification_priority`]);
//! * the offered region must be whole pages (the server's named regions are); its page count
//!   is the `size` the guest reads, never rounded down;
//! * a join that fails because the region filled after the factory's answer is
//!   `GSS_CLIENT_MAX`, as if the factory had seen it full.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ivshm_client::{ClientError, ConnectOptions, Event, Peer, PeerEvent};
use ivshm_policy::RegionName;
use ivshm_proto::factory::{decode_line, encode_line, FactoryRequest, FactoryResponse};
use ivshm_proto::guest_shm::{exact_pages, GuestShmStatus, MAX_CLIENTS, PAGE_SIZE};
use rustix::event::{eventfd, EventfdFlags};

use crate::guest_shm::{dup, Attachment, Factory, RegionConnection};
use crate::ivshmem::link::{ring_eventfd, wait_readable_or_stop};

/// A VM's factory reached through the server's `factory.sock`.
#[derive(Debug, Clone)]
pub struct ServerFactory {
    socket: PathBuf,
    timeout: Duration,
    sched: Option<u8>,
}

impl ServerFactory {
    /// Talks to the factory at `socket`; every request and region join must finish within
    /// `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> ServerFactory {
        ServerFactory {
            socket: socket.into(),
            timeout,
            sched: None,
        }
    }

    /// Runs each connection's notification thread at the VM's `sched` priority (see
    /// [`crate::sched`]); `None` leaves them at the normal priority.
    pub fn with_notification_priority(mut self, sched: Option<u8>) -> ServerFactory {
        self.sched = sched;
        self
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
        name: String,
        request: &FactoryRequest,
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let response = self.request(request)?;
        if response.status != GuestShmStatus::Ok {
            return Err(response.status);
        }
        let offer = response.region.ok_or(GuestShmStatus::UnknownFailure)?;
        // Whole pages only: a region of another size cannot be shown to a guest_shm client
        // without hiding some of its bytes or mapping pages that have no memory behind them.
        // The server's named regions are always whole pages; anything else is refused here.
        let Some(pages) = exact_pages(offer.size) else {
            tracing::warn!(
                region = %offer.host_name,
                size = offer.size,
                "guest_shm: the region is not a whole number of 4 KiB pages; refused"
            );
            return Err(GuestShmStatus::UnknownFailure);
        };
        let opts = ConnectOptions {
            timeout: self.timeout,
            ..ConnectOptions::default()
        };
        let peer = match Peer::connect(Path::new(&offer.socket), opts) {
            Ok(peer) => peer,
            Err(e) => return Err(self.join_failure(name, &offer.socket, &e)),
        };
        if usize::from(peer.id()) >= MAX_CLIENTS {
            // Dropping the peer leaves again; guest_shm clients never saw it (ids of 16 and
            // more are in no bitmap and ring nothing).
            return Err(GuestShmStatus::ClientMax);
        }
        if peer.shm_size() != offer.size {
            tracing::warn!(
                socket = %offer.socket,
                offered = offer.size,
                got = peer.shm_size(),
                "guest_shm: the region's memory is not the size the factory offered; refused"
            );
            return Err(GuestShmStatus::UnknownFailure);
        }
        let memory = Arc::new(peer.map().map_err(|_| GuestShmStatus::NoMem)?);
        let connection = ServerConnection::start(peer, interrupt, self.sched)?;
        Ok(Attachment {
            connection: Box::new(connection),
            memory,
            pages,
        })
    }

    /// The status for a join that failed after the factory said `GSS_OK`: the region may have
    /// filled in between (the server then closes the new connection at once, which the
    /// handshake reports as a closed connection). A `find` of the same name (stateless: it
    /// joins nothing and creates nothing) tells: `GSS_CLIENT_MAX` if the region is full now,
    /// `GSS_UNKNOWN_FAILURE` otherwise.
    fn join_failure(&self, name: String, socket: &str, error: &ClientError) -> GuestShmStatus {
        match self.request(&FactoryRequest::Find { name }) {
            Ok(again) if again.status == GuestShmStatus::ClientMax => {
                tracing::debug!(socket, "guest_shm: the region filled before the join");
                GuestShmStatus::ClientMax
            }
            _ => {
                tracing::warn!(socket, error = %error, "guest_shm: joining the region failed");
                GuestShmStatus::UnknownFailure
            }
        }
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
        let name = guest_name(name)?;
        let request = FactoryRequest::Create {
            name: name.clone(),
            size: u64::from(pages) * PAGE_SIZE as u64,
        };
        self.attach(name, &request, interrupt)
    }

    fn find(
        &mut self,
        name: &[u8],
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let name = guest_name(name)?;
        let request = FactoryRequest::Find { name: name.clone() };
        self.attach(name, &request, interrupt)
    }
}

struct Shared {
    /// `None` after detach (dropping the peer closes its socket; the server tells others).
    peer: Mutex<Option<Peer>>,
    pending: AtomicU32,
}

impl Shared {
    /// The control `status`; `clear` takes the pending bits (a guest read).
    fn status(&self, clear: bool) -> u32 {
        let attached = match self.peer.lock().as_deref() {
            Ok(Some(p)) => p
                .peer_ids()
                .into_iter()
                .chain([p.id()])
                .fold(0u32, |m, id| m | client_bit(id)),
            _ => 0,
        };
        let pending = if clear {
            self.pending.swap(0, Ordering::SeqCst)
        } else {
            self.pending.load(Ordering::SeqCst)
        };
        (attached << 16) | (pending & 0xffff)
    }
}

/// The bitmap bit of v0 peer `id`, if it is a client index (0..16); none otherwise.
fn client_bit(id: u16) -> u32 {
    if usize::from(id) < MAX_CLIENTS {
        1 << id
    } else {
        0
    }
}

/// A control page over a v0 peer.
struct ServerConnection {
    shared: Arc<Shared>,
    idx: u32,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl ServerConnection {
    fn start(
        peer: Peer,
        interrupt: BorrowedFd<'_>,
        sched: Option<u8>,
    ) -> Result<ServerConnection, GuestShmStatus> {
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
            .name(NOTIFICATION_THREAD.into())
            .spawn(move || {
                crate::sched::apply_notification_priority(sched, NOTIFICATION_THREAD);
                watch(&thread_shared, &stop_thread, &interrupt);
            })
            .map_err(|_| GuestShmStatus::UnknownFailure)?;
        Ok(ServerConnection {
            shared,
            idx,
            stop,
            thread: Some(thread),
        })
    }
}

/// The name of each connection's notification thread.
pub const NOTIFICATION_THREAD: &str = "guest_shm-conn";

/// Whether `event` changes the control `status` (and so is worth exactly one interrupt): a
/// doorbell on vector *s* < 16 whose pending bit *s* was clear (it sets it), a client index
/// (peer id < 16) joining or leaving. Doorbells on other vectors, peers with ids of 16 and
/// more and the server's own news change nothing a guest can see.
fn changes_status(shared: &Shared, event: &Event) -> bool {
    match *event {
        Event::Doorbell { vector } if vector < MAX_CLIENTS => {
            let bit = 1 << vector;
            shared.pending.fetch_or(bit, Ordering::SeqCst) & bit == 0
        }
        Event::Peer(PeerEvent::Joined { id, .. } | PeerEvent::Left { id }) => client_bit(id) != 0,
        Event::Doorbell { .. } | Event::ServerGone | Event::Reconnected { .. } => false,
    }
}

/// Waits for the peer's events and signals the device interrupt once for each one that
/// changes the control `status` ([`changes_status`]).
fn watch(shared: &Shared, stop: &OwnedFd, interrupt: &OwnedFd) {
    let poll_fd = match shared.peer.lock().as_deref() {
        Ok(Some(p)) => match p.poll_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => return,
        },
        _ => return,
    };
    while wait_readable_or_stop(poll_fd.as_fd(), stop.as_fd()) {
        let mut changes = 0u64;
        let Ok(mut guard) = shared.peer.lock() else {
            return;
        };
        let Some(peer) = guard.as_mut() else {
            return;
        };
        loop {
            match peer.wait(Some(Duration::ZERO)) {
                Ok(Some(event)) => changes += u64::from(changes_status(shared, &event)),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "guest_shm: region connection failed");
                    break;
                }
            }
        }
        drop(guard);
        for _ in 0..changes {
            let _ = ring_eventfd(interrupt.as_fd());
        }
    }
}

impl RegionConnection for ServerConnection {
    fn idx(&self) -> u32 {
        self.idx
    }

    fn read_status(&mut self) -> u32 {
        self.shared.status(true)
    }

    fn peek_status(&self) -> u32 {
        self.shared.status(false)
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
