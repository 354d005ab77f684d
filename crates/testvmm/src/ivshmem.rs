//! Attaching an [`IvshmemDevice`] to a [`TestVm`], and the guest-side prologue that finds
//! and sets it up.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ivshm_mem::Mapping;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};

use crate::asm::{Asm, Cond, Reg};
use crate::guest::{GuestOps, MSI_ADDRESS, VARS};
use crate::platform::SharedPciDevice;
use crate::vm::{TestVm, VmmError};
use ivshm_vmm::ivshmem::kvm::{KvmIrqfdInterrupts, KvmMsiInjector};
use ivshm_vmm::ivshmem::link::{drain_eventfd, ring_eventfd};
use ivshm_vmm::ivshmem::IvshmemDevice;

/// Where the test VMM puts BAR0 (registers).
pub const IVSHMEM_BAR0: u64 = 0xc000_0000;
/// Where the test VMM puts BAR1 (MSI-X).
pub const IVSHMEM_BAR1: u64 = 0xc000_1000;
/// Where the test VMM puts BAR2 (shared memory; below 4 GiB so a 32-bit guest reaches it).
pub const IVSHMEM_BAR2: u64 = 0xd000_0000;
/// Device number of the first device on bus 0.
pub const IVSHMEM_DEVICE_NUMBER: u8 = 1;
/// The guest programs MSI-X vector `v` to interrupt vector `IVSHMEM_VECTOR_BASE + v`.
pub const IVSHMEM_VECTOR_BASE: u8 = 0x40;

/// Guest variables written by [`ivshmem_guest_prologue`].
const VAR_BAR0: u32 = VARS;
const VAR_BAR1: u32 = VARS + 4;
const VAR_BAR2: u32 = VARS + 8;

/// How doorbells travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellPath {
    /// In-kernel: ioeventfds on BAR0+12 and irqfds routed to MSI-X messages.
    Kvm,
    /// Through the VMM: Doorbell writes exit and the device rings the peer's eventfd; a
    /// VMM thread waits on own vector eventfds and injects with `KVM_SIGNAL_MSI`.
    Trapped,
}

/// An ivshmem device plugged into a [`TestVm`].
pub struct AttachedIvshmem {
    /// The device (lock it to inspect registers or process peer changes).
    pub device: Arc<Mutex<IvshmemDevice>>,
    poller: Option<(OwnedFd, JoinHandle<()>)>,
}

impl std::fmt::Debug for AttachedIvshmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedIvshmem").finish_non_exhaustive()
    }
}

impl Drop for AttachedIvshmem {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.poller.take() {
            let _ = ring_eventfd(stop.as_fd());
            let _ = thread.join();
        }
    }
}

fn sys(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> VmmError {
    move |error| VmmError::Sys { op, error }
}

/// Places the device's BARs at the fixed addresses, wires its interrupts for `path`,
/// maps `shm` at BAR2 and plugs it in as device [`IVSHMEM_DEVICE_NUMBER`] (when it is
/// the VM's first device).
pub fn attach_ivshmem(
    vm: &TestVm,
    mut device: IvshmemDevice,
    shm: Arc<Mapping>,
    path: DoorbellPath,
) -> Result<AttachedIvshmem, VmmError> {
    device.set_bar_addr(0, IVSHMEM_BAR0);
    if device.vectors() > 0 {
        device.set_bar_addr(1, IVSHMEM_BAR1);
    }
    device.set_bar_addr(2, IVSHMEM_BAR2);
    let own_fds: Vec<OwnedFd> = (0..device.vectors())
        .filter_map(|v| device.own_vector_fd(v))
        .map(|fd| fd.try_clone_to_owned())
        .collect::<Result<_, _>>()
        .map_err(|e| VmmError::Sys {
            op: "dup own vector eventfd",
            error: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::BADF),
        })?;
    match path {
        DoorbellPath::Kvm => {
            let borrowed: Vec<BorrowedFd<'_>> = own_fds.iter().map(|f| f.as_fd()).collect();
            let backend = KvmIrqfdInterrupts::new(vm.gsi_router().clone(), &borrowed)
                .map_err(|e| VmmError::GuestFailed(format!("irqfd setup: {e}")))?;
            device.set_interrupt_backend(Box::new(backend));
        }
        DoorbellPath::Trapped => {
            device.set_interrupt_backend(Box::new(KvmMsiInjector::new(vm.vm_fd().clone())));
        }
    }
    let device = Arc::new(Mutex::new(device));
    let shared: SharedPciDevice = device.clone();
    vm.add_pci_device(shared, vec![(2, shm)], path == DoorbellPath::Kvm)?;
    let poller = if path == DoorbellPath::Trapped && !own_fds.is_empty() {
        let stop =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(sys("eventfd"))?;
        let stop_dup = stop.try_clone().map_err(|e| VmmError::Sys {
            op: "dup stop eventfd",
            error: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::BADF),
        })?;
        let dev = device.clone();
        let thread = std::thread::Builder::new()
            .name("ivshm-test-vectors".into())
            .spawn(move || poll_vectors(&dev, &own_fds, &stop_dup))
            .map_err(|e| VmmError::Sys {
                op: "spawning the vector thread",
                error: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::AGAIN),
            })?;
        Some((stop, thread))
    } else {
        None
    };
    Ok(AttachedIvshmem { device, poller })
}

/// The register-callback receive path: wait on own vector eventfds, raise the vector.
fn poll_vectors(device: &Mutex<IvshmemDevice>, fds: &[OwnedFd], stop: &OwnedFd) {
    loop {
        let mut pollfds: Vec<PollFd<'_>> =
            fds.iter().map(|f| PollFd::new(f, PollFlags::IN)).collect();
        pollfds.push(PollFd::new(stop, PollFlags::IN));
        if let Err(e) = poll(&mut pollfds, None) {
            if e == rustix::io::Errno::INTR {
                continue;
            }
            tracing::error!(error = %e, "ivshmem vector poll failed");
            return;
        }
        let ready: Vec<bool> = pollfds.iter().map(|p| !p.revents().is_empty()).collect();
        if ready.last().copied().unwrap_or(true) {
            return;
        }
        for (v, r) in ready.iter().take(fds.len()).enumerate() {
            if !r {
                continue;
            }
            match device.lock() {
                // vector_fired drains the device's own copy of this eventfd.
                Ok(mut d) => d.vector_fired(v),
                Err(_) => {
                    let _ = drain_eventfd(fds[v].as_fd());
                }
            }
        }
    }
}

/// Emits the guest code that finds the ivshmem device on bus 0 and sets it up:
/// enables the local APIC, checks vendor/device 1af4:1110, reads BAR0/BAR1/BAR2 from
/// config space, enables memory decoding and bus mastering, programs MSI-X entry `v` to
/// interrupt vector [`IVSHMEM_VECTOR_BASE`]` + v` (unmasked) for `vectors` vectors, checks
/// the MSI-X capability ID and sets MSI-X enable, then reads IVPosition and reports it.
///
/// Afterwards EBX = BAR0 address and ESI = BAR2 address. Failures exit with
/// `0xBAD0_0001` (wrong ID) or `0xBAD0_0002` (no MSI-X capability at 0x40).
pub fn ivshmem_guest_prologue(a: &mut Asm, vectors: u8) {
    let dev = IVSHMEM_DEVICE_NUMBER;
    a.enable_lapic()
        .pci_read(dev, 0)
        .cmp_imm(Reg::Eax, 0x1110_1af4)
        .jcc(Cond::Ne, "prologue_fail_id")
        .pci_read(dev, 4)
        .and_imm(Reg::Eax, 0xffff_fff0)
        .store(VAR_BAR0, Reg::Eax)
        .pci_read(dev, 5)
        .and_imm(Reg::Eax, 0xffff_fff0)
        .store(VAR_BAR1, Reg::Eax)
        .pci_read(dev, 6)
        .and_imm(Reg::Eax, 0xffff_fff0)
        .store(VAR_BAR2, Reg::Eax)
        // Command: I/O + memory decoding + bus master.
        .mov_imm(Reg::Eax, 0x7)
        .pci_write_eax(dev, 1);
    if vectors > 0 {
        a.load(Reg::Ebx, VAR_BAR1);
        for v in 0..u32::from(vectors) {
            a.store_ind_imm(Reg::Ebx, 16 * v, MSI_ADDRESS)
                .store_ind_imm(Reg::Ebx, 16 * v + 4, 0)
                .store_ind_imm(Reg::Ebx, 16 * v + 8, u32::from(IVSHMEM_VECTOR_BASE) + v)
                .store_ind_imm(Reg::Ebx, 16 * v + 12, 0);
        }
        // The capability list starts at 0x40 (dword 0x10): ID 0x11, then message control.
        a.pci_read(dev, 0x10)
            .mov(Reg::Esi, Reg::Eax)
            .and_imm(Reg::Eax, 0xff)
            .cmp_imm(Reg::Eax, 0x11)
            .jcc(Cond::Ne, "prologue_fail_cap")
            .mov(Reg::Eax, Reg::Esi)
            .or_imm(Reg::Eax, 0x8000_0000)
            .pci_write_eax(dev, 0x10);
    }
    a.load(Reg::Ebx, VAR_BAR0)
        .load(Reg::Esi, VAR_BAR2)
        .load_ind(Reg::Eax, Reg::Ebx, 8)
        .report(Reg::Eax)
        .jmp("prologue_done")
        .label("prologue_fail_id")
        .exit(0xbad0_0001)
        .label("prologue_fail_cap")
        .exit(0xbad0_0002)
        .label("prologue_done");
}
