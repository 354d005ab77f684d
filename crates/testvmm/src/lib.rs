//! `ivshm-testvmm`: a small VMM on KVM for `ivshm-vmm`'s tests, benchmarks and examples (test
//! support, not a product; a dev-dependency only, never published).
//!
//! Each [`TestVm`] is a KVM VM with an in-kernel irqchip, memfd-backed RAM at guest
//! address 0 and one vCPU on its own thread, started directly in flat 32-bit protected
//! mode (no BIOS). Guests are tiny programs built with the [`asm`] helper; they find PCI
//! devices through ports 0xCF8/0xCFC, reach BARs at addresses the VMM assigned, take MSI
//! interrupts through an IDT and the local APIC (see [`guest`] for the memory layout), and
//! report values and an exit code through a port-I/O test device. Several VMs can run at
//! once in one process.

pub mod asm;
pub mod guest;
mod guest_shm;
mod ivshmem;
pub mod platform;
mod vm;

pub use guest_shm::{
    attach_guest_shm, AttachedGuestShm, Delivery, GuestShmPlacement, GUEST_SHM_BAR0,
    GUEST_SHM_WINDOW, SERVICE_THREAD,
};
pub use ivshmem::{
    attach_ivshmem, ivshmem_guest_prologue, AttachedIvshmem, DoorbellPath, IVSHMEM_BAR0,
    IVSHMEM_BAR1, IVSHMEM_BAR2, IVSHMEM_DEVICE_NUMBER, IVSHMEM_VECTOR_BASE,
};
pub use vm::{kvm_available, kvm_or_skip, GuestExit, TestVm, VmmError, REQUIRE_KVM_ENV};
