//! The KVM fast path: doorbells as ioeventfds, own vectors as irqfds routed to their
//! MSI-X messages with `KVM_SET_GSI_ROUTING`.
//!
//! * [`KvmGsiRouter`] owns a VM's GSI routing table (KVM replaces the whole table on every
//!   `KVM_SET_GSI_ROUTING`, so one router per VM is shared by all devices).
//! * [`KvmIrqfdInterrupts`] is an [`InterruptBackend`]: a vector with a deliverable message
//!   has its eventfd registered as an irqfd on its GSI; a masked vector is unregistered, its
//!   eventfd keeps counting, and re-registering on unmask makes KVM deliver the pending event.
//! * [`KvmIoeventRegistry`] keeps the VM's ioeventfds equal to a device's
//!   [`crate::pci::PciDevice::ioevents`]; call [`KvmIoeventRegistry::sync`] after BAR moves
//!   and peer changes.
//! * [`KvmIrqLine`] is a level-triggered input of the in-kernel irqchip (an IOAPIC pin, a
//!   GSI of KVM's default routes) driven with `KVM_IRQ_LINE`: a device's PCI INTx# line
//!   ([`crate::guest_shm::LevelInterrupt`]).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::ivshmem::InterruptBackend;
use crate::pci::{IoEvent, MsixMessage};

/// Errors from the KVM wiring.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum KvmWiringError {
    /// KVM {op}: {error}
    ///
    /// A KVM ioctl failed.
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The error.
        error: kvm_ioctls::Error,
    },
    /// duplicating an eventfd: {0}
    ///
    /// Duplicating a descriptor failed.
    Dup(std::io::Error),
    /// no free GSI: GSIs {FIRST_MSI_GSI:}..{MAX_GSI:} are all in use; drop unused devices'
    /// interrupt backends (they release their GSIs) or use fewer vectors
    ///
    /// Ran out of GSIs.
    NoGsi,
    /// the GSI router's state is poisoned (a thread panicked while updating routes)
    ///
    /// A thread panicked while it held the router's state.
    Poisoned,
    /// building the GSI routing table with {0} entries failed
    ///
    /// The routing table could not be built (more entries than `KVM_SET_GSI_ROUTING` takes).
    RoutingTable(usize),
    /// ioevent length {0} not supported (KVM ioeventfds match 1, 2, 4 or 8 bytes)
    ///
    /// Unsupported ioevent width.
    BadLength(u32),
    /// a KVM memory slot of {size} bytes over a mapping of {mapping} bytes
    ///
    /// A memory slot larger than the mapping behind it.
    SlotTooLarge {
        /// The slot's size.
        size: u64,
        /// The mapping's length.
        mapping: usize,
    },
}

impl From<std::io::Error> for KvmWiringError {
    fn from(error: std::io::Error) -> Self {
        KvmWiringError::Dup(error)
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmWiringError {
    move |error| KvmWiringError::Kvm { op, error }
}

/// Maps the first `size` bytes of `memory` into the guest at `guest_addr` as KVM memory slot
/// `slot` (`KVM_SET_USER_MEMORY_REGION`); `size` 0 removes the slot. Guest RAM, a BAR backed by
/// memory (ivshmem's BAR2) and `guest_shm` region windows are all mapped this way.
///
/// # Safety
///
/// From this call until the slot is removed (or the VM is destroyed) the guest reads and
/// writes `memory`: the caller keeps the mapping alive that long (e.g. holds its `Arc`).
pub unsafe fn set_memory_slot(
    vm: &VmFd,
    slot: u32,
    guest_addr: u64,
    memory: &ivshm_mem::Mapping,
    size: u64,
) -> Result<(), KvmWiringError> {
    if usize::try_from(size).map_or(true, |len| len > memory.len()) {
        return Err(KvmWiringError::SlotTooLarge {
            size,
            mapping: memory.len(),
        });
    }
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: guest_addr,
        memory_size: size,
        userspace_addr: memory.view().as_ptr() as u64,
    };
    // SAFETY: the range is `size` bytes of a live mapping (checked above); the caller keeps it
    // mapped while the slot exists (this function's contract).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// Duplicates an eventfd descriptor into an owned [`EventFd`].
pub fn dup_eventfd(fd: BorrowedFd<'_>) -> Result<EventFd, KvmWiringError> {
    let owned = fd.try_clone_to_owned()?;
    let raw = owned.into_raw_fd();
    // SAFETY: `raw` is a descriptor we own (just duplicated and released from `OwnedFd`);
    // ownership moves into the EventFd, which closes it on drop.
    Ok(unsafe { EventFd::from_raw_fd(raw) })
}

/// A VM's MSI routing table, rebuilt and installed on every change.
#[derive(Debug)]
pub struct KvmGsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

#[derive(Debug)]
struct RouterState {
    /// GSIs handed out and not yet released.
    allocated: BTreeSet<u32>,
    routes: BTreeMap<u32, MsixMessage>,
}

/// First GSI handed out: 0..23 are the IOAPIC pins on x86.
pub const FIRST_MSI_GSI: u32 = 24;
/// GSIs available (KVM_MAX_IRQ_ROUTES is 4096).
const MAX_GSI: u32 = 4096;

impl KvmGsiRouter {
    /// A router for `vm` with no routes.
    pub fn new(vm: Arc<VmFd>) -> KvmGsiRouter {
        KvmGsiRouter {
            vm,
            state: Mutex::new(RouterState {
                allocated: BTreeSet::new(),
                routes: BTreeMap::new(),
            }),
        }
    }

    /// The VM this router programs.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Reserves the lowest free GSI at or above [`FIRST_MSI_GSI`].
    pub fn allocate_gsi(&self) -> Result<u32, KvmWiringError> {
        let mut st = self.state.lock().map_err(|_| KvmWiringError::Poisoned)?;
        let gsi = (FIRST_MSI_GSI..MAX_GSI)
            .find(|g| !st.allocated.contains(g))
            .ok_or(KvmWiringError::NoGsi)?;
        st.allocated.insert(gsi);
        Ok(gsi)
    }

    /// Removes `gsi`'s route and makes it available again.
    pub fn release_gsi(&self, gsi: u32) -> Result<(), KvmWiringError> {
        self.set_route(gsi, None)?;
        let mut st = self.state.lock().map_err(|_| KvmWiringError::Poisoned)?;
        st.allocated.remove(&gsi);
        Ok(())
    }

    /// Routes `gsi` to `message` (or removes its route) and installs the table.
    pub fn set_route(&self, gsi: u32, message: Option<MsixMessage>) -> Result<(), KvmWiringError> {
        let mut st = self.state.lock().map_err(|_| KvmWiringError::Poisoned)?;
        let changed = match message {
            Some(m) => st.routes.insert(gsi, m) != Some(m),
            None => st.routes.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let entries = routing_entries(&st.routes);
        let failed = |_| KvmWiringError::RoutingTable(entries.len());
        let mut table = KvmIrqRouting::new(0).map_err(failed)?;
        for entry in &entries {
            table.push(*entry).map_err(failed)?;
        }
        self.vm
            .set_gsi_routing(&table)
            .map_err(kvm_err("KVM_SET_GSI_ROUTING"))
    }
}

/// The whole table `KVM_SET_GSI_ROUTING` gets: KVM's default x86 routes for the in-kernel
/// irqchip (GSI 0..15 to the PIC and the IOAPIC, 16..23 to the IOAPIC — the table replaces
/// them, and devices on INTx or an `intr` line still need them), then one MSI route per
/// entry of `msi`.
fn routing_entries(msi: &BTreeMap<u32, MsixMessage>) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut out = Vec::with_capacity(40 + msi.len());
    for gsi in 0..FIRST_MSI_GSI {
        out.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            out.push(irqchip(gsi, pic, gsi % 8));
        }
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.addr as u32;
        e.u.msi.address_hi = (m.addr >> 32) as u32;
        e.u.msi.data = m.data;
        out.push(e);
    }
    out
}

struct IrqfdVector {
    gsi: u32,
    eventfd: EventFd,
    registered: bool,
}

/// [`InterruptBackend`] delivering own vectors through KVM irqfds.
pub struct KvmIrqfdInterrupts {
    router: Arc<KvmGsiRouter>,
    vectors: Vec<IrqfdVector>,
}

impl std::fmt::Debug for KvmIrqfdInterrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmIrqfdInterrupts")
            .field("vectors", &self.vectors.len())
            .finish_non_exhaustive()
    }
}

impl KvmIrqfdInterrupts {
    /// One GSI per vector; `fds[v]` is own vector `v`'s eventfd (duplicated here).
    pub fn new(
        router: Arc<KvmGsiRouter>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<KvmIrqfdInterrupts, KvmWiringError> {
        let vectors = fds
            .iter()
            .map(|&fd| {
                Ok(IrqfdVector {
                    gsi: router.allocate_gsi()?,
                    eventfd: dup_eventfd(fd)?,
                    registered: false,
                })
            })
            .collect::<Result<_, KvmWiringError>>()?;
        Ok(KvmIrqfdInterrupts { router, vectors })
    }

    fn update(
        &mut self,
        vector: usize,
        message: Option<MsixMessage>,
    ) -> Result<(), KvmWiringError> {
        let Some(v) = self.vectors.get_mut(vector) else {
            return Ok(());
        };
        let vm = self.router.vm().clone();
        match message {
            Some(m) => {
                self.router.set_route(v.gsi, Some(m))?;
                if !v.registered {
                    vm.register_irqfd(&v.eventfd, v.gsi)
                        .map_err(kvm_err("KVM_IRQFD assign"))?;
                    v.registered = true;
                }
            }
            None => {
                if v.registered {
                    vm.unregister_irqfd(&v.eventfd, v.gsi)
                        .map_err(kvm_err("KVM_IRQFD deassign"))?;
                    v.registered = false;
                }
            }
        }
        Ok(())
    }
}

impl InterruptBackend for KvmIrqfdInterrupts {
    fn vector_route_changed(&mut self, vector: usize, message: Option<MsixMessage>) {
        if let Err(e) = self.update(vector, message) {
            tracing::error!(vector, error = %e, "ivshmem: updating irqfd route failed");
        }
    }

    fn inject(&mut self, vector: usize, message: MsixMessage) {
        signal_msi(self.router.vm(), vector, message);
    }

    fn is_pending(&self, vector: usize) -> bool {
        let Some(v) = self.vectors.get(vector) else {
            return false;
        };
        if v.registered {
            return false;
        }
        let fd = eventfd_as_fd(&v.eventfd);
        let mut pollfd = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        matches!(
            rustix::event::poll(&mut pollfd, Some(&rustix::time::Timespec::default())),
            Ok(n) if n > 0
        )
    }
}

impl Drop for KvmIrqfdInterrupts {
    fn drop(&mut self) {
        for v in &self.vectors {
            if v.registered {
                let _ = self.router.vm().unregister_irqfd(&v.eventfd, v.gsi);
            }
            let _ = self.router.release_gsi(v.gsi);
        }
    }
}

/// What KVM identifies an ioeventfd by. The eventfd itself is compared separately
/// ([`same_open_file`]): a descriptor number can be reused by a different eventfd, e.g. when a
/// peer leaves and a new peer gets the same id and, after the old descriptors closed, the
/// same descriptor numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct IoeventKey {
    addr: u64,
    len: u32,
    datamatch: u64,
}

/// Keeps a VM's ioeventfds in line with a device's wanted set.
pub struct KvmIoeventRegistry {
    vm: Arc<VmFd>,
    registered: BTreeMap<IoeventKey, EventFd>,
}

impl std::fmt::Debug for KvmIoeventRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmIoeventRegistry")
            .field("registered", &self.registered.len())
            .finish_non_exhaustive()
    }
}

fn register(vm: &VmFd, key: &IoeventKey, fd: &EventFd, assign: bool) -> Result<(), KvmWiringError> {
    let addr = IoEventAddress::Mmio(key.addr);
    let r = match (key.len, assign) {
        (1, true) => vm.register_ioevent(fd, &addr, key.datamatch as u8),
        (2, true) => vm.register_ioevent(fd, &addr, key.datamatch as u16),
        (4, true) => vm.register_ioevent(fd, &addr, key.datamatch as u32),
        (8, true) => vm.register_ioevent(fd, &addr, key.datamatch),
        (1, false) => vm.unregister_ioevent(fd, &addr, key.datamatch as u8),
        (2, false) => vm.unregister_ioevent(fd, &addr, key.datamatch as u16),
        (4, false) => vm.unregister_ioevent(fd, &addr, key.datamatch as u32),
        (8, false) => vm.unregister_ioevent(fd, &addr, key.datamatch),
        (len, _) => return Err(KvmWiringError::BadLength(len)),
    };
    r.map_err(kvm_err(if assign {
        "KVM_IOEVENTFD assign"
    } else {
        "KVM_IOEVENTFD deassign"
    }))
}

/// Borrows the descriptor an [`EventFd`] owns (vmm-sys-util's `EventFd` has no `AsFd`).
fn eventfd_as_fd(eventfd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns this descriptor and keeps it open for as long as the borrow
    // (tied to `eventfd`'s lifetime) lives.
    unsafe { BorrowedFd::borrow_raw(eventfd.as_raw_fd()) }
}

/// `kcmp(2)` type: compare two file descriptions.
const KCMP_FILE: libc::c_long = 0;

/// True when `a` and `b` refer to the same open file description (`kcmp(KCMP_FILE)`).
/// Eventfds all share one anonymous inode, so `fstat` cannot tell them apart. When `kcmp` is
/// not available the answer is false, which makes callers re-register: correct, only slower.
pub fn same_open_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let pid = libc::c_long::from(rustix::process::getpid().as_raw_nonzero().get());
    // SAFETY: kcmp takes only integers (pids, a type and two descriptor numbers, both open for
    // the duration of the borrow); it reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a.as_raw_fd()),
            libc::c_long::from(b.as_raw_fd()),
        )
    };
    r == 0
}

impl KvmIoeventRegistry {
    /// An empty registry for `vm`.
    pub fn new(vm: Arc<VmFd>) -> KvmIoeventRegistry {
        KvmIoeventRegistry {
            vm,
            registered: BTreeMap::new(),
        }
    }

    /// Number of ioeventfds currently registered.
    pub fn len(&self) -> usize {
        self.registered.len()
    }

    /// True when none are registered.
    pub fn is_empty(&self) -> bool {
        self.registered.is_empty()
    }

    /// Registers the missing events of `wanted` and unregisters those no longer wanted. An
    /// event whose address and datamatch are registered with a different eventfd (a new peer
    /// with a reused id) is re-registered with the new one.
    pub fn sync(&mut self, wanted: &[IoEvent<'_>]) -> Result<(), KvmWiringError> {
        let wanted_keys: BTreeMap<IoeventKey, BorrowedFd<'_>> = wanted
            .iter()
            .map(|e| {
                (
                    IoeventKey {
                        addr: e.addr,
                        len: e.len,
                        datamatch: e.datamatch,
                    },
                    e.fd,
                )
            })
            .collect();
        let stale: Vec<IoeventKey> = self
            .registered
            .iter()
            .filter(|(k, registered)| {
                wanted_keys
                    .get(k)
                    .is_none_or(|fd| !same_open_file(eventfd_as_fd(registered), *fd))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(fd) = self.registered.remove(&key) {
                register(&self.vm, &key, &fd, false)?;
            }
        }
        for (key, fd) in wanted_keys {
            if self.registered.contains_key(&key) {
                continue;
            }
            let eventfd = dup_eventfd(fd)?;
            register(&self.vm, &key, &eventfd, true)?;
            self.registered.insert(key, eventfd);
        }
        Ok(())
    }

    /// Unregisters everything.
    pub fn clear(&mut self) -> Result<(), KvmWiringError> {
        self.sync(&[])
    }
}

impl Drop for KvmIoeventRegistry {
    fn drop(&mut self) {
        let _ = self.clear();
    }
}

/// Sends `message` (vector `vector`'s MSI-X message) into `vm` with `KVM_SIGNAL_MSI`.
fn signal_msi(vm: &VmFd, vector: usize, message: MsixMessage) {
    let msi = kvm_msi {
        address_lo: message.addr as u32,
        address_hi: (message.addr >> 32) as u32,
        data: message.data,
        ..Default::default()
    };
    if let Err(e) = vm.signal_msi(msi) {
        tracing::error!(vector, error = %e, "ivshmem: KVM_SIGNAL_MSI failed");
    }
}

/// A level-triggered input of the VM's in-kernel irqchip, driven with `KVM_IRQ_LINE`: what a
/// VMM does for an emulated device's PCI INTx# (QEMU's `pci_set_irq` on KVM does the same).
/// The GSI is an IOAPIC pin under KVM's default routes (0..=23 on x86; [`KvmGsiRouter`] keeps
/// them). The guest programs the pin level-triggered; KVM delivers the interrupt again after
/// each EOI while the line stays asserted, and not at all once it is deasserted, even if the
/// guest masked the pin meanwhile.
///
/// Several devices sharing one pin each need their own source (KVM ORs only its irqfd and
/// userspace sources): give shared pins one `KvmIrqLine` that ORs its devices' levels.
#[derive(Debug, Clone)]
pub struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmIrqLine {
    /// The irqchip input `gsi` of `vm`.
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> KvmIrqLine {
        KvmIrqLine { vm, gsi }
    }

    /// The GSI it drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Sets the line's level (`KVM_IRQ_LINE`).
    pub fn set(&self, asserted: bool) -> Result<(), KvmWiringError> {
        self.vm
            .set_irq_line(self.gsi, asserted)
            .map_err(kvm_err("KVM_IRQ_LINE"))
    }
}

impl crate::guest_shm::LevelInterrupt for KvmIrqLine {
    fn set_level(&mut self, asserted: bool) {
        if let Err(e) = self.set(asserted) {
            tracing::error!(gsi = self.gsi, asserted, error = %e, "setting an interrupt line failed");
        }
    }
}

/// [`InterruptBackend`] for the register-callback path on KVM: the VMM consumes own
/// vector eventfds itself and injects each message with `KVM_SIGNAL_MSI`.
#[derive(Debug, Clone)]
pub struct KvmMsiInjector {
    vm: Arc<VmFd>,
}

impl KvmMsiInjector {
    /// Injects into `vm`.
    pub fn new(vm: Arc<VmFd>) -> KvmMsiInjector {
        KvmMsiInjector { vm }
    }
}

impl InterruptBackend for KvmMsiInjector {
    fn vector_route_changed(&mut self, _vector: usize, _message: Option<MsixMessage>) {}

    fn inject(&mut self, vector: usize, message: MsixMessage) {
        signal_msi(&self.vm, vector, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    use rustix::event::{eventfd, EventfdFlags};

    fn new_eventfd() -> OwnedFd {
        eventfd(0, EventfdFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn routing_table_keeps_the_irqchip_routes() {
        let msg = MsixMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        let entries = routing_entries(&BTreeMap::from([(24, msg)]));
        // 16 GSIs with IOAPIC + PIC, 8 with IOAPIC only, then the MSI route.
        assert_eq!(entries.len(), 16 * 2 + 8 + 1);
        let chip = |gsi: u32| -> Vec<(u32, u32)> {
            entries
                .iter()
                .filter(|e| e.gsi == gsi && e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
                // SAFETY: IRQCHIP entries carry the `irqchip` member of the union.
                .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
                .collect()
        };
        assert_eq!(
            chip(5),
            vec![(KVM_IRQCHIP_IOAPIC, 5), (KVM_IRQCHIP_PIC_MASTER, 5)]
        );
        assert_eq!(
            chip(10),
            vec![(KVM_IRQCHIP_IOAPIC, 10), (KVM_IRQCHIP_PIC_SLAVE, 2)]
        );
        assert_eq!(chip(20), vec![(KVM_IRQCHIP_IOAPIC, 20)]);
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the `msi` member of the union.
        let (lo, data) = unsafe { (last.u.msi.address_lo, last.u.msi.data) };
        assert_eq!((lo, data), (0xfee0_0000, 0x41));
    }

    #[test]
    fn same_open_file_tells_eventfds_apart() {
        let a = new_eventfd();
        let b = new_eventfd();
        let a_dup = a.try_clone().unwrap();
        assert!(same_open_file(a.as_fd(), a.as_fd()));
        assert!(same_open_file(a.as_fd(), a_dup.as_fd()), "a duplicate");
        assert!(!same_open_file(a.as_fd(), b.as_fd()), "another eventfd");
        // The registry's own duplicate of an eventfd that has since been closed elsewhere,
        // and a new eventfd (what a new peer with a reused id brings).
        let kept = dup_eventfd(a.as_fd()).unwrap();
        drop(a);
        drop(a_dup);
        let c = new_eventfd();
        assert!(same_open_file(eventfd_as_fd(&kept), eventfd_as_fd(&kept)));
        assert!(!same_open_file(eventfd_as_fd(&kept), c.as_fd()));
    }
}
