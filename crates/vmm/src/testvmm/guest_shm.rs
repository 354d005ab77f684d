//! Attaching a QNX [`GuestShmDevice`] to a [`TestVm`].

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use ivshm_mem::Mapping;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::guest_shm::{Factory, GuestShmDevice, GuestShmMode, RegionWindowMapper};
use crate::ivshmem::kvm::{dup_eventfd, KvmGsiRouter};
use crate::pci::MsixMessage;
use crate::testvmm::guest::MSI_ADDRESS;
use crate::testvmm::platform::{SharedMmioHandler, SharedPciDevice};
use crate::testvmm::vm::{TestVm, VmmError};

/// Where the test VMM puts the PCI-mode factory page (BAR0).
pub const GUEST_SHM_BAR0: u64 = 0xc000_0000;
/// Start of the guest-physical window for region control and data pages.
pub const GUEST_SHM_WINDOW: u64 = 0xe000_0000;
/// End of that window.
const GUEST_SHM_WINDOW_END: u64 = 0xf000_0000;
/// First KVM memory slot used for region data.
const FIRST_REGION_SLOT: u32 = 100;

/// Places regions one after another in [`GUEST_SHM_WINDOW`]: control page (unbacked, so
/// it traps) then the data pages as a KVM memory slot. Windows are not reused.
struct TestVmRegionMapper {
    vm: Arc<VmFd>,
    next_addr: u64,
    next_slot: u32,
    windows: Vec<(u64, u32, Arc<Mapping>)>,
}

impl TestVmRegionMapper {
    fn set_slot(&self, slot: u32, addr: u64, memory: &Mapping, size: u64) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr,
            memory_size: size,
            userspace_addr: memory.view().as_ptr() as u64,
        };
        // SAFETY: `memory` is a live shared mapping of at least `size` bytes; the mapper
        // keeps an Arc to it in `windows` for as long as the slot exists.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.to_string())
    }
}

impl RegionWindowMapper for TestVmRegionMapper {
    fn map_region(&mut self, memory: &Arc<Mapping>, pages: u32) -> Result<u64, String> {
        let data_len = u64::from(pages) * 4096;
        if data_len as usize > memory.len() {
            return Err("region mapping shorter than its size".into());
        }
        let control = self.next_addr;
        let end = control + 4096 + data_len;
        if end > GUEST_SHM_WINDOW_END {
            return Err("guest_shm window full".into());
        }
        self.set_slot(self.next_slot, control + 4096, memory, data_len)?;
        self.windows.push((control, self.next_slot, memory.clone()));
        self.next_slot += 1;
        self.next_addr = end;
        Ok(control)
    }

    fn unmap_region(&mut self, control_addr: u64) {
        if let Some(i) = self.windows.iter().position(|w| w.0 == control_addr) {
            let (control, slot, memory) = self.windows.remove(i);
            if let Err(e) = self.set_slot(slot, control + 4096, &memory, 0) {
                tracing::error!(error = %e, "removing a guest_shm data slot failed");
            }
        }
    }
}

/// A `guest_shm` device plugged into a [`TestVm`].
pub struct AttachedGuestShm {
    /// The device.
    pub device: Arc<Mutex<GuestShmDevice>>,
    router: Arc<KvmGsiRouter>,
    gsi: u32,
    irqfd: EventFd,
    /// The MSI route's GSI, released after the irqfd is gone (None for an IOAPIC pin).
    _msi_gsi: Option<GsiLease>,
}

/// A GSI from the VM's router, released (route removed) when dropped.
struct GsiLease {
    router: Arc<KvmGsiRouter>,
    gsi: u32,
}

impl Drop for GsiLease {
    fn drop(&mut self) {
        let _ = self.router.release_gsi(self.gsi);
    }
}

impl std::fmt::Debug for AttachedGuestShm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedGuestShm")
            .field("gsi", &self.gsi)
            .finish_non_exhaustive()
    }
}

impl Drop for AttachedGuestShm {
    fn drop(&mut self) {
        let _ = self.router.vm().unregister_irqfd(&self.irqfd, self.gsi);
    }
}

fn wiring(e: crate::ivshmem::kvm::KvmWiringError) -> VmmError {
    VmmError::GuestFailed(format!("guest_shm interrupt: {e}"))
}

/// Builds a `guest_shm` device on `factory` and plugs it in: PCI mode at device number 1
/// with BAR0 at [`GUEST_SHM_BAR0`], or MMIO mode at `loc`. Its interrupt is an irqfd on a
/// GSI routed as an MSI to IDT vector `vector` (which the factory page's `vector` reports),
/// so status changes reach the guest without passing through the VMM.
pub fn attach_guest_shm(
    vm: &TestVm,
    mode: GuestShmMode,
    vector: u8,
    factory: Box<dyn Factory>,
) -> Result<AttachedGuestShm, VmmError> {
    let router = vm.gsi_router().clone();
    let lease = GsiLease {
        gsi: router.allocate_gsi().map_err(wiring)?,
        router,
    };
    let message = MsixMessage {
        addr: u64::from(MSI_ADDRESS),
        data: u32::from(vector),
    };
    lease
        .router
        .set_route(lease.gsi, Some(message))
        .map_err(wiring)?;
    plug(vm, mode, u32::from(vector), factory, lease.gsi, Some(lease))
}

/// Like [`attach_guest_shm`], with the interrupt on the in-kernel IOAPIC's input `pin` (the
/// QNX `intr` line; GSI = pin), which the factory page's `vector` reports. The guest routes
/// the pin to an IDT vector itself ([`crate::testvmm::guest::GuestOps::route_ioapic_pin`]).
/// Use pins 16..23: 0..15 also reach the (uninitialised) PIC.
pub fn attach_guest_shm_on_ioapic_pin(
    vm: &TestVm,
    mode: GuestShmMode,
    pin: u32,
    factory: Box<dyn Factory>,
) -> Result<AttachedGuestShm, VmmError> {
    plug(vm, mode, pin, factory, pin, None)
}

fn plug(
    vm: &TestVm,
    mode: GuestShmMode,
    factory_vector: u32,
    factory: Box<dyn Factory>,
    gsi: u32,
    msi_gsi: Option<GsiLease>,
) -> Result<AttachedGuestShm, VmmError> {
    let router = vm.gsi_router().clone();
    let mapper = TestVmRegionMapper {
        vm: vm.vm_fd().clone(),
        next_addr: GUEST_SHM_WINDOW,
        next_slot: FIRST_REGION_SLOT,
        windows: Vec::new(),
    };
    let mut device = GuestShmDevice::new(mode, factory_vector, factory, Box::new(mapper))
        .map_err(|e| VmmError::GuestFailed(format!("guest_shm device: {e}")))?;
    if mode == GuestShmMode::Pci {
        device.set_bar_addr(0, GUEST_SHM_BAR0);
    }
    let irqfd = dup_eventfd(device.interrupt_fd().as_fd()).map_err(wiring)?;
    vm.vm_fd()
        .register_irqfd(&irqfd, gsi)
        .map_err(|source| VmmError::Kvm {
            op: "KVM_IRQFD",
            source,
        })?;
    // From here on Drop unregisters the irqfd (then the lease releases an MSI route's GSI).
    let attached = AttachedGuestShm {
        device: Arc::new(Mutex::new(device)),
        router,
        gsi,
        irqfd,
        _msi_gsi: msi_gsi,
    };
    if mode == GuestShmMode::Pci {
        let pci: SharedPciDevice = attached.device.clone();
        vm.add_pci_device(pci, Vec::new(), false)?;
    }
    let handler: SharedMmioHandler = attached.device.clone();
    vm.add_mmio_handler(handler)?;
    Ok(attached)
}
