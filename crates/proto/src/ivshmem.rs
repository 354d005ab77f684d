//! The ivshmem PCI device ABI as QEMU's guests see it (`ivshmem-plain` and `ivshmem-doorbell`,
//! QEMU's `docs/specs/ivshmem-spec.rst`): PCI identity, BAR layout, the BAR0 registers and the
//! Doorbell encoding. Device models (`ivshm-vmm`), guest drivers (`ivshm-guest`) and the
//! end-to-end tests all read these facts from here.
//!
//! | BAR | contents |
//! |---|---|
//! | 0 | 256-byte registers, 4-byte accesses: IntrMask, IntrStatus, IVPosition, Doorbell |
//! | 1 | MSI-X table (offset 0) and PBA (offset [`MSIX_PBA_OFFSET`]), doorbell variant only |
//! | 2 | the shared memory, 64-bit prefetchable |

/// PCI vendor ID (Red Hat / Qumranet).
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device ID, the same for the plain and the doorbell variant (told apart by MSI-X).
pub const DEVICE_ID: u16 = 0x1110;
/// PCI revision QEMU >= 2.6 reports.
pub const REVISION: u8 = 1;
/// PCI subsystem vendor ID QEMU reports (its default, the vendor ID).
pub const SUBSYSTEM_VENDOR_ID: u16 = VENDOR_ID;
/// PCI subsystem ID QEMU reports (its default 0x1100 with vendor 0x1af4).
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// PCI base class: memory controller (`PCI_CLASS_MEMORY_RAM` is class 0x05, subclass 0x00).
pub const CLASS: u8 = 0x05;
/// PCI subclass: RAM.
pub const SUBCLASS: u8 = 0x00;

/// Index of the register BAR.
pub const REGISTERS_BAR: u8 = 0;
/// Index of the MSI-X BAR (table and PBA; doorbell variant only).
pub const MSIX_BAR: u8 = 1;
/// Index of the shared-memory BAR.
pub const SHARED_MEMORY_BAR: u8 = 2;

/// Size of the register BAR (BAR0) in bytes.
pub const REGISTERS_BAR_SIZE: u64 = 0x100;
/// Size of the MSI-X BAR (BAR1) in bytes.
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// Offset of the MSI-X pending-bit array in BAR1 (the table starts at 0).
pub const MSIX_PBA_OFFSET: u64 = 0x800;

/// BAR0 offset of IntrMask (read/write; used by revision 0's INTx only).
pub const REG_INTR_MASK: u64 = 0;
/// BAR0 offset of IntrStatus (reading clears it; revision 0's INTx only).
pub const REG_INTR_STATUS: u64 = 4;
/// BAR0 offset of IVPosition (read-only): the device's own peer ID (0 on `ivshmem-plain`).
pub const REG_IV_POSITION: u64 = 8;
/// BAR0 offset of Doorbell (write-only): [`doorbell_value`] rings a peer's vector.
pub const REG_DOORBELL: u64 = 12;

/// Largest vector a guest can ring reliably: the spec's Doorbell has a 16-bit vector field, but
/// QEMU's trapped path decodes only its low 8 bits, so a larger value rings a different vector.
pub const MAX_DOORBELL_VECTOR: u16 = 255;

/// The value written to the Doorbell register to ring `vector` of `peer`: `peer << 16 | vector`.
pub const fn doorbell_value(peer: u16, vector: u16) -> u32 {
    ((peer as u32) << 16) | vector as u32
}

/// The `(peer, vector)` a Doorbell value names (the spec's 16-bit vector field), the inverse of
/// [`doorbell_value`].
pub const fn doorbell_target(value: u32) -> (u16, u16) {
    ((value >> 16) as u16, (value & 0xffff) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doorbell_value_encoding() {
        assert_eq!(doorbell_value(0, 0), 0);
        assert_eq!(doorbell_value(1, 2), 0x0001_0002);
        assert_eq!(doorbell_value(0xffff, 0xff), 0xffff_00ff);
        assert_eq!(doorbell_value(3, 0), 3 << 16);
        assert_eq!(doorbell_target(0x0001_0101), (1, 0x101));
    }

    #[test]
    fn registers_fit_the_register_bar() {
        for reg in [
            REG_INTR_MASK,
            REG_INTR_STATUS,
            REG_IV_POSITION,
            REG_DOORBELL,
        ] {
            assert_eq!(reg % 4, 0);
            assert!(reg + 4 <= REGISTERS_BAR_SIZE);
        }
        const { assert!(MSIX_PBA_OFFSET < MSIX_BAR_SIZE) };
    }

    proptest! {
        #[test]
        fn doorbell_values_round_trip(peer in any::<u16>(), vector in any::<u16>()) {
            prop_assert_eq!(doorbell_target(doorbell_value(peer, vector)), (peer, vector));
        }
    }
}
