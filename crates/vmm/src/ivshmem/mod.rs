//! The ivshmem PCI device (1af4:1110 rev 1, its ABI in `ivshm_proto::ivshmem`) as QEMU's guests see it, in its two variants:
//! *plain* (a memory backend, no interrupts) and *doorbell* (a v0 peer of an ivshmem
//! server, with MSI-X vectors and a Doorbell register).
//!
//! | BAR | contents |
//! |---|---|
//! | 0 | 256-byte registers, 4-byte accesses only: IntrMask, IntrStatus (read clears), IVPosition, Doorbell |
//! | 1 | MSI-X table (offset 0) and PBA (offset 0x800), doorbell variant only |
//! | 2 | the shared memory, 64-bit prefetchable; the VMM maps it as guest RAM |
//!
//! Doorbell (BAR0 + 12) decodes `peer << 16 | vector` with the spec's 16-bit vector; rings of
//! unknown peers or vectors are ignored. QEMU's trapped path keeps only the low 8 bits of the
//! vector (`0x101` rings vector 1 there, nothing here); in-range vectors behave the same.
//!
//! Two ways to run it:
//! * **register callbacks** (any VMM): a guest write to Doorbell reaches
//!   [`PciDevice::write_bar`](crate::pci::PciDevice::write_bar), which rings the target peer's eventfd; when an own vector's
//!   eventfd becomes readable the VMM calls [`IvshmemDevice::vector_fired`] and the device
//!   asks its [`InterruptBackend`] to inject the vector's MSI-X message.
//! * **KVM fast path** ([`kvm`]): every (peer, vector) doorbell value is a KVM ioeventfd
//!   with datamatch on BAR0+12 (so doorbell writes never exit), and every own vector is an
//!   irqfd routed to its MSI-X message (so interrupts never pass through the VMM).

mod client_link;
mod device;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod link;

pub use device::{InterruptBackend, IvshmemDevice, IvshmemError, IvshmemState, Master};
/// The register layout, defined once in `ivshm_proto::ivshmem` (which also has the PCI IDs).
pub use ivshm_proto::ivshmem::{
    MSIX_BAR_SIZE, MSIX_PBA_OFFSET, REGISTERS_BAR_SIZE, REG_DOORBELL, REG_INTR_MASK,
    REG_INTR_STATUS, REG_IV_POSITION,
};
pub use link::{DoorbellLink, LinkError, LocalDoorbellBus, LocalDoorbellLink, PeerChange};
