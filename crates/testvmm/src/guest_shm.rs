//! Attaching a QNX [`GuestShmDevice`] to a [`TestVm`], its interrupt wired the way a VMM on
//! KVM wires it.
//!
//! * PCI mode: function 1C05:0001 with the factory page in BAR0, and INTA# — a level-triggered
//!   line — routed to an IOAPIC input: the `intr` line when the configuration names one (QNX's
//!   common `intr` option applies to PCI devices too), else the first free of 16..=23 ("for
//!   PCI devices that use an interrupt, if you don't set a number, it is automatically
//!   assigned"). Firmware's part is done too: BAR0 programmed, the Interrupt Line register
//!   (0x3C) holding the input, which the factory page's `vector` reads as well. The device has
//!   no MSI capability and gets no MSI.
//! * MMIO mode: the factory page at `loc`, the interrupt on IOAPIC input `intr`.
//!
//! The line is driven [`Delivery::Level`] by default: `KVM_IRQ_LINE` on the input's GSI
//! ([`KvmIrqLine`]), asserted by a VMM thread that services the device's interrupt eventfd
//! ([`GuestShmDevice::service_interrupt`]) and deasserted by the guest's `status` read — so the
//! interrupt behaves whether the guest programs the input level- or edge-triggered and survives
//! QNX's mask, EOI, read, unmask sequence. That thread runs at the VM's `sched` priority
//! ([`ivshm_vmm::sched`]). [`Delivery::EdgeIrqfd`] registers the eventfd as a KVM irqfd
//! instead (every change one edge, nothing through the VMM).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::{eventfd, EventfdFlags};
use vmm_sys_util::eventfd::EventFd;

use crate::platform::{SharedMmioHandler, SharedPciDevice};
use crate::vm::{TestVm, VmmError};
use ivshm_policy::VmPolicy;
use ivshm_vmm::guest_shm::{Factory, GuestShmDevice, GuestShmMode, KvmRegionWindows};
use ivshm_vmm::ivshmem::kvm::{dup_eventfd, KvmIrqLine};
use ivshm_vmm::ivshmem::link::{ring_eventfd, wait_readable_or_stop};

/// Where the test VMM puts the PCI-mode factory page (BAR0).
pub const GUEST_SHM_BAR0: u64 = 0xc000_0000;
/// Start of the guest-physical window for region control and data pages.
pub const GUEST_SHM_WINDOW: u64 = 0xe000_0000;
/// End of that window.
const GUEST_SHM_WINDOW_END: u64 = 0xf000_0000;
/// First KVM memory slot used for region data.
const FIRST_REGION_SLOT: u32 = 100;

/// How the device's interrupt reaches the IOAPIC input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A level-triggered line (`KVM_IRQ_LINE`) a VMM thread asserts and the guest's `status`
    /// read deasserts: PCI INTx# semantics.
    Level,
    /// The device's interrupt eventfd as a KVM irqfd: one edge per `status` change.
    EdgeIrqfd,
}

/// How to plug a `guest_shm` device in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestShmPlacement {
    /// PCI or MMIO mode.
    pub mode: GuestShmMode,
    /// The IOAPIC input (QNX's `intr` line): required in MMIO mode; in PCI mode `None` assigns
    /// one.
    pub intr: Option<u32>,
    /// PCI mode: the device number on bus 0 (QNX's `loc pci:0:N`); `None` takes the lowest
    /// free one.
    pub pci_device: Option<u8>,
    /// QNX's `sched`: the priority of the thread that delivers the interrupt.
    pub sched: Option<u8>,
    /// How the interrupt is delivered.
    pub delivery: Delivery,
}

impl GuestShmPlacement {
    /// PCI mode, interrupt line and device number assigned by the VMM, level delivery.
    pub fn pci() -> GuestShmPlacement {
        GuestShmPlacement {
            mode: GuestShmMode::Pci,
            intr: None,
            pci_device: None,
            sched: None,
            delivery: Delivery::Level,
        }
    }

    /// MMIO mode: the factory page at `loc`, the interrupt on IOAPIC input `intr`, level
    /// delivery.
    pub fn mmio(loc: u64, intr: u32) -> GuestShmPlacement {
        GuestShmPlacement {
            mode: GuestShmMode::Mmio { loc },
            intr: Some(intr),
            ..GuestShmPlacement::pci()
        }
    }

    /// What a VM's `vdev shmem` options ask for: the mode and `intr`
    /// ([`GuestShmMode::from_policy`]), a `loc pci:0:N` device number, `sched`.
    pub fn from_policy(policy: &VmPolicy) -> GuestShmPlacement {
        let (mode, intr) = GuestShmMode::from_policy(policy);
        let pci_device = policy
            .loc()
            .and_then(ivshm_policy::options::Location::pci_address)
            .map(|address| address.device);
        GuestShmPlacement {
            mode,
            intr,
            pci_device,
            sched: policy.sched(),
            delivery: Delivery::Level,
        }
    }
}

/// A `guest_shm` device plugged into a [`TestVm`].
pub struct AttachedGuestShm {
    /// The device.
    pub device: Arc<Mutex<GuestShmDevice>>,
    /// The IOAPIC input its interrupt drives (the Interrupt Line register, the factory page's
    /// `vector`).
    pub intr: u32,
    /// PCI mode: its device number on bus 0.
    pub pci_device: Option<u8>,
    wiring: Wiring,
}

/// What must be undone when the device goes.
enum Wiring {
    /// The servicing thread and its stop eventfd.
    Level {
        stop: OwnedFd,
        thread: Option<JoinHandle<()>>,
    },
    /// The irqfd registered on the input's GSI.
    Irqfd {
        vm: Arc<kvm_ioctls::VmFd>,
        irqfd: EventFd,
        gsi: u32,
    },
}

impl std::fmt::Debug for AttachedGuestShm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedGuestShm")
            .field("intr", &self.intr)
            .field("pci_device", &self.pci_device)
            .finish_non_exhaustive()
    }
}

impl Drop for AttachedGuestShm {
    fn drop(&mut self) {
        match &mut self.wiring {
            Wiring::Level { stop, thread } => {
                let _ = ring_eventfd(stop.as_fd());
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
            Wiring::Irqfd { vm, irqfd, gsi } => {
                let _ = vm.unregister_irqfd(irqfd, *gsi);
            }
        }
    }
}

fn sys(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> VmmError {
    move |error| VmmError::Sys { op, error }
}

/// Builds a `guest_shm` device on `factory` and plugs it in as `placement` says (see the
/// module documentation).
pub fn attach_guest_shm(
    vm: &TestVm,
    placement: GuestShmPlacement,
    factory: Box<dyn Factory>,
) -> Result<AttachedGuestShm, VmmError> {
    let intr = match (placement.intr, placement.mode) {
        (Some(intr), _) => {
            vm.claim_irq_pin(intr)?;
            intr
        }
        (None, GuestShmMode::Pci) => vm.allocate_irq_pin()?,
        (None, GuestShmMode::Mmio { .. }) => {
            return Err(VmmError::GuestFailed(
                "guest_shm in MMIO mode needs intr (QNX: loc needs intr)".into(),
            ))
        }
    };
    let mapper = KvmRegionWindows::new(
        vm.vm_fd().clone(),
        GUEST_SHM_WINDOW..GUEST_SHM_WINDOW_END,
        FIRST_REGION_SLOT,
    );
    // The factory page's `vector` and (PCI) the Interrupt Line register: the input.
    let mut device = GuestShmDevice::new(placement.mode, intr, factory, Box::new(mapper))
        .map_err(|e| VmmError::GuestFailed(format!("guest_shm device: {e}")))?;
    if placement.mode == GuestShmMode::Pci {
        device.set_bar_addr(0, GUEST_SHM_BAR0);
    }
    let wiring = match placement.delivery {
        Delivery::Level => {
            device.set_level_interrupt(Box::new(KvmIrqLine::new(vm.vm_fd().clone(), intr)));
            Wiring::Level {
                stop: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                    .map_err(sys("eventfd"))?,
                thread: None,
            }
        }
        Delivery::EdgeIrqfd => {
            let irqfd = dup_eventfd(device.interrupt_fd()).map_err(VmmError::GuestShmInterrupt)?;
            vm.vm_fd()
                .register_irqfd(&irqfd, intr)
                .map_err(|error| VmmError::Kvm {
                    op: "KVM_IRQFD",
                    error,
                })?;
            Wiring::Irqfd {
                vm: vm.vm_fd().clone(),
                irqfd,
                gsi: intr,
            }
        }
    };
    // From here on Drop undoes the wiring.
    let mut attached = AttachedGuestShm {
        device: Arc::new(Mutex::new(device)),
        intr,
        pci_device: None,
        wiring,
    };
    if let Wiring::Level { stop, thread } = &mut attached.wiring {
        let interrupt = attached
            .device
            .lock()
            .map_err(|_| VmmError::Poisoned)?
            .interrupt_fd()
            .try_clone_to_owned()
            .map_err(|e| VmmError::GuestFailed(format!("duplicating an eventfd: {e}")))?;
        let stop = stop
            .try_clone()
            .map_err(|e| VmmError::GuestFailed(format!("duplicating an eventfd: {e}")))?;
        let device = attached.device.clone();
        let sched = placement.sched;
        *thread = Some(
            std::thread::Builder::new()
                .name(SERVICE_THREAD.into())
                .spawn(move || {
                    ivshm_vmm::sched::apply_notification_priority(sched, SERVICE_THREAD);
                    service(&device, &interrupt, &stop);
                })
                .map_err(|e| VmmError::GuestFailed(format!("spawning a thread: {e}")))?,
        );
    }
    if placement.mode == GuestShmMode::Pci {
        let pci: SharedPciDevice = attached.device.clone();
        attached.pci_device = Some(match placement.pci_device {
            Some(number) => vm.add_pci_device_at(number, pci, Vec::new(), false)?,
            None => vm.add_pci_device(pci, Vec::new(), false)?,
        });
    }
    let handler: SharedMmioHandler = attached.device.clone();
    vm.add_mmio_handler(handler)?;
    Ok(attached)
}

/// The name of the thread that services a level-triggered device line.
pub const SERVICE_THREAD: &str = "guest_shm-intx";

/// The VMM's event loop for one device: whenever its interrupt eventfd is readable, let the
/// device assert its line.
fn service(device: &Mutex<GuestShmDevice>, interrupt: &OwnedFd, stop: &OwnedFd) {
    while wait_readable_or_stop(interrupt.as_fd(), stop.as_fd()) {
        match device.lock() {
            Ok(mut d) => d.service_interrupt(),
            Err(_) => return,
        }
    }
}
