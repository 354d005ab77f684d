//! Attaching a QNX [`GuestShmDevice`] to a [`TestVm`].

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::guest::MSI_ADDRESS;
use crate::platform::{SharedMmioHandler, SharedPciDevice};
use crate::vm::{TestVm, VmmError};
use ivshm_vmm::guest_shm::{Factory, GuestShmDevice, GuestShmMode, KvmRegionWindows};
use ivshm_vmm::ivshmem::kvm::{dup_eventfd, KvmGsiRouter};
use ivshm_vmm::pci::MsixMessage;

/// Where the test VMM puts the PCI-mode factory page (BAR0).
pub const GUEST_SHM_BAR0: u64 = 0xc000_0000;
/// Start of the guest-physical window for region control and data pages.
pub const GUEST_SHM_WINDOW: u64 = 0xe000_0000;
/// End of that window.
const GUEST_SHM_WINDOW_END: u64 = 0xf000_0000;
/// First KVM memory slot used for region data.
const FIRST_REGION_SLOT: u32 = 100;

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
        gsi: router.allocate_gsi().map_err(VmmError::GuestShmInterrupt)?,
        router,
    };
    let message = MsixMessage {
        addr: u64::from(MSI_ADDRESS),
        data: u32::from(vector),
    };
    lease
        .router
        .set_route(lease.gsi, Some(message))
        .map_err(VmmError::GuestShmInterrupt)?;
    plug(vm, mode, u32::from(vector), factory, lease.gsi, Some(lease))
}

/// Like [`attach_guest_shm`], with the interrupt on the in-kernel IOAPIC's input `pin` (the
/// QNX `intr` line; GSI = pin), which the factory page's `vector` reports. The guest routes
/// the pin to an IDT vector itself ([`crate::guest::GuestOps::route_ioapic_pin`]).
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
    let mapper = KvmRegionWindows::new(
        vm.vm_fd().clone(),
        GUEST_SHM_WINDOW..GUEST_SHM_WINDOW_END,
        FIRST_REGION_SLOT,
    );
    let mut device = GuestShmDevice::new(mode, factory_vector, factory, Box::new(mapper))
        .map_err(|e| VmmError::GuestFailed(format!("guest_shm device: {e}")))?;
    if mode == GuestShmMode::Pci {
        device.set_bar_addr(0, GUEST_SHM_BAR0);
    }
    let irqfd = dup_eventfd(device.interrupt_fd().as_fd()).map_err(VmmError::GuestShmInterrupt)?;
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
