//! The QNX hypervisor `guest_shm` device (`vdev shmem`), as QNX guests see it, on top of a
//! region registry ([`Factory`]) that a server can provide.
//!
//! Guest view (QNX `guest_shm.h`, constants in [`ivshm_proto::guest_shm`]):
//!
//! * a 4 KiB **factory page**: `signature` (u64, 0x4d534732474d5651), `shmem` (u64,
//!   guest-physical address of the last attached region's control page), `vector` (u32,
//!   the device interrupt), `status` (u32, `GSS_*` of the last request), `size` (u32, pages
//!   of 4 KiB), `name[32]`, `find` (u32). Writing `size` creates the named region or attaches
//!   to it if it exists; writing `find` attaches to an existing region only. On `GSS_OK`,
//!   `size` reads the region's actual page count (the creator chose it) and `shmem` the address
//!   of the new connection's control page, followed by the data pages.
//! * per connection, a **control page**: `status` (RO; bits 0-15 clients that notified me
//!   since my last read, cleared by this read; bits 16-31 attached clients), `idx` (RO; my
//!   connection index), `notify` (WO; bitset of clients to signal, `0xffff_ffff` = everybody
//!   but me), `detach` (WO; any value detaches, others see it).
//! * **one interrupt** for the device, raised whenever the `status` of one of its
//!   connections changes value: a notification from a client whose bit was clear, another
//!   client attaching or detaching. Nothing else interrupts (a second notification from a
//!   client whose bit is still set changes nothing).
//!
//! Modes: PCI (vendor 0x1C05, device 0x0001, factory page in BAR0, interrupt INTA#: a
//! level-triggered line, asserted while a connection's `status` has changed since the guest
//! last read it, see [`LevelInterrupt`]) or MMIO (factory page at the `loc` address, interrupt
//! `intr`), see [`GuestShmDevice`].
//!
//! Factories: [`LocalFactory`] (in-process registry) and [`ServerFactory`] (the server's
//! factory protocol, regions joined as v0 peers; see its module for the mapping). A KVM VMM
//! places regions in guest memory with `KvmRegionWindows` (feature `kvm`).
//!
//! # How QNX semantics map onto regions
//!
//! * A region is named by its *host* name: the [`Factory`] applies the VM's `vdev shmem`
//!   policy ([`ivshm_policy::VmPolicy`]: allow/deny on the guest's name, then `subst`) before
//!   looking it up, so `GSS_NO_PERMISSION` and `GSS_ILLEGAL_NAME` come from the policy.
//! * Up to 16 connections per region ([`ivshm_proto::guest_shm::MAX_CLIENTS`]); a connection
//!   gets the lowest free index, the bit it owns in every bitset. The 17th gets
//!   `GSS_CLIENT_MAX`. Every create/attach is a new connection, even from the same factory.
//! * The first creator chooses the size; later creates and finds attach with that size.
//!   A region is always whole 4 KiB pages, every one backed. A create with `size` 0 of a region
//!   that does not exist creates nothing and fails with `GSS_DOES_NOT_EXIST` (a zero-page
//!   region cannot exist; such a create can only attach, like a `find`).
//! * Notifications coalesce: one pending bit per sender, as QNX's samples describe. Over an
//!   ivshmem-style server this is "one vector per possible sender" — the receiver learns who
//!   rang from which vector fired.
//! * A region lives while it has connections; the last detach frees it (regions of the VMs'
//!   `create` lines live as long as the registry or server).
//!
//! # `find`
//!
//! What QNX's `find` does is not public. The evidence: the header's field comment "find an
//! existing shared memory connection", the inline helper `guest_shm_find(factory, __find_num)`
//! that stores a caller-chosen number to `find` (as `guest_shm_create` stores the page count to
//! `size`), and `GSS_DOES_NOT_EXIST`, "a find request failed". "Connection" is the header's
//! word for one client's attachment (`idx` is the "connection index for this client"), so the
//! number could be a connection index — find the guest's existing connection number *n* to the
//! named region, e.g. to recover its control page after a driver restart without making a new
//! connection — or an enumeration index over existing regions or connections; it is not a size
//! (that is `size`'s job) and no public sample writes anything but a name before it.
//!
//! Here a `find`:
//! 1. returns a connection this device already holds to the region named in `name` — the one
//!    whose `idx` equals the number written, else the lowest — without making a new one, so no
//!    other client sees anything (no attach, no interrupt);
//! 2. otherwise attaches to the existing region by name (a new connection, which the other
//!    clients see as one real attach), and never creates one (`GSS_DOES_NOT_EXIST`).
//!
//! A failed `find` (or create) changes nothing any client can see.
//!
//! Unknown too: whether an explicit own bit in `notify` signals oneself (here: it does; only
//! `~0` excludes the caller).

mod device;
#[cfg(feature = "kvm")]
mod kvm;
mod local;
mod server;

pub use device::{GuestShmDevice, GuestShmError, GuestShmMode, LevelInterrupt, RegionWindowMapper};
#[cfg(feature = "kvm")]
pub use kvm::KvmRegionWindows;
pub use local::{LocalFactory, LocalRegionRegistry};
pub use server::{ServerFactory, NOTIFICATION_THREAD};

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use ivshm_mem::Mapping;
use ivshm_proto::guest_shm::GuestShmStatus;

/// A successful create/attach.
pub struct Attachment {
    /// The connection (control-page semantics).
    pub connection: Box<dyn RegionConnection>,
    /// The region's data pages.
    pub memory: Arc<Mapping>,
    /// Actual size in 4 KiB pages.
    pub pages: u32,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("idx", &self.connection.idx())
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

/// A VM's door to the named regions (in a server: the factory protocol; here also
/// [`LocalFactory`]). It applies the VM's policy.
///
/// Every implementation answers with the same codes (the conformance suite in
/// `tests/factory_conformance.rs` decides them): `GSS_ILLEGAL_NAME` / `GSS_NO_PERMISSION` from
/// the policy; `GSS_DOES_NOT_EXIST` for a `find` of a missing region and for a create of 0
/// pages of one; `GSS_NOMEM` above the size limit; `GSS_CLIENT_MAX` for a 17th connection,
/// also when a region fills between a server's answer and the join.
///
/// The `interrupt` eventfd of a connection is signalled exactly once per change of the value of
/// that connection's control `status` (a pending bit newly set, a client attached or
/// detached), never otherwise.
pub trait Factory: Send {
    /// Creates the region named by the factory page's `name` field with `pages` pages (at least
    /// one), or attaches to it if it exists. `interrupt` is signalled whenever this
    /// connection's control `status` changes.
    fn create_or_attach(
        &mut self,
        name: &[u8],
        pages: u32,
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus>;

    /// Attaches to an existing region only (`GSS_DOES_NOT_EXIST` otherwise).
    fn find(
        &mut self,
        name: &[u8],
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus>;
}

/// One client's connection to a region: the control page's registers.
pub trait RegionConnection: Send {
    /// This connection's index (0..16).
    fn idx(&self) -> u32;
    /// The control `status`: pending notifiers (cleared by this read) and attached clients.
    fn read_status(&mut self) -> u32;
    /// The control `status` as [`read_status`](Self::read_status) would return it, without
    /// clearing anything (for the device's interrupt level).
    fn peek_status(&self) -> u32;
    /// Signals the clients in `mask` (`0xffff_ffff`: everybody attached but me).
    fn notify(&mut self, mask: u32);
    /// Detaches; other clients see it. Further calls do nothing.
    fn detach(&mut self);
}

/// Duplicates a descriptor for keeping.
pub(crate) fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, GuestShmStatus> {
    fd.try_clone_to_owned()
        .map_err(|_| GuestShmStatus::UnknownFailure)
}
