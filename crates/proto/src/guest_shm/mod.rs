//! Constants and register layout from QNX's `guest_shm.h` (`<qvm/guest_shm.h>`).
//!
//! A guest finds the shmem vdev's 4 KiB *factory page* (PCI BAR0, or the `loc` address in MMIO
//! mode), checks [`SIGNATURE`], writes a region name and then the size in pages to create or
//! attach. The region's *control page* is followed by the data pages. The answer to a request is
//! a [`GuestShmStatus`] (`GSS_*`) in the factory page's `status` register.

mod status;

pub use status::GuestShmStatus;

/// `GUEST_SHM_SIGNATURE`: the value of the factory page's `signature` register (ASCII
/// `"QVMG2GSM"` read as a little-endian `u64`).
pub const SIGNATURE: u64 = 0x4d53_4732_474d_5651;

/// `GUEST_SHM_MAX_NAME`: size of the factory page's `name` field in bytes, including the
/// terminating NUL, so names are at most `MAX_NAME - 1` = 31 bytes long.
pub const MAX_NAME: usize = 32;

/// `GUEST_SHM_MAX_CLIENTS`: connections one region can have (one bit each in the 16-bit
/// notification and attach bitsets of the control page).
pub const MAX_CLIENTS: usize = 16;

/// `PCI_VID_BlackBerry_QNX`: the PCI vendor id of the shmem vdev.
pub const PCI_VENDOR_ID: u16 = 0x1C05;

/// `PCI_DID_QNX_GUEST_SHM`: the PCI device id of the shmem vdev.
pub const PCI_DEVICE_ID: u16 = 0x0001;

/// Page size of the factory page, the control page and the unit of the `size` register.
pub const PAGE_SIZE: usize = 4096;

/// Largest region the factory's 32-bit `size` register (in pages) can describe, in bytes.
pub const MAX_REGION_BYTES: u64 = u32::MAX as u64 * PAGE_SIZE as u64;

/// Number of whole pages needed for `bytes` bytes (what the `size` register holds).
pub const fn pages_for(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_SIZE as u64)
}

/// `bytes` rounded up to whole pages: the size of a region a `guest_shm` client can be given
/// (the header counts `size` in 4 KiB pages, and a guest maps `size` whole pages behind the
/// control page). `None` if that does not fit in 64 bits.
pub const fn whole_pages(bytes: u64) -> Option<u64> {
    pages_for(bytes).checked_mul(PAGE_SIZE as u64)
}

/// The `size` register value for a region of `bytes` bytes: its page count, if `bytes` is a
/// whole number of pages (at least one) that the 32-bit register can hold. `None` otherwise: a
/// region of another size cannot be presented to a `guest_shm` client without hiding or
/// inventing memory.
pub const fn exact_pages(bytes: u64) -> Option<u32> {
    let pages = bytes / PAGE_SIZE as u64;
    if bytes % PAGE_SIZE as u64 != 0 || pages == 0 || pages > u32::MAX as u64 {
        return None;
    }
    Some(pages as u32)
}

/// Byte offsets of the registers of `struct guest_shm_factory` in the factory page.
pub mod factory {
    /// `uint64_t signature` (read only): [`super::SIGNATURE`].
    pub const SIGNATURE: usize = 0x00;
    /// `uint64_t shmem` (read only): guest-physical address of the region's control page.
    pub const SHMEM: usize = 0x08;
    /// `uint32_t vector` (read only): interrupt number for this region.
    pub const VECTOR: usize = 0x10;
    /// `uint32_t status` (read only): [`GuestShmStatus`](super::GuestShmStatus) of the last request.
    pub const STATUS: usize = 0x14;
    /// `uint32_t size`: requested size in pages; writing it creates or attaches.
    pub const SIZE: usize = 0x18;
    /// `char name[GUEST_SHM_MAX_NAME]`: region name, NUL-terminated.
    pub const NAME: usize = 0x1c;
    /// `uint32_t find`: find an existing shared memory connection.
    pub const FIND: usize = 0x3c;
    /// `sizeof(struct guest_shm_factory)`.
    pub const STRUCT_SIZE: usize = 0x40;
}

/// Byte offsets of the registers of `struct guest_shm_control` in a region's control page.
pub mod control {
    /// `uint32_t status` (read only): low 16 bits pending notifications, high 16 bits the
    /// attached clients.
    pub const STATUS: usize = 0x0;
    /// `uint32_t idx` (read only): this connection's index (bit position in the bitsets).
    pub const IDX: usize = 0x4;
    /// `uint32_t notify`: write a bitset of clients to notify.
    pub const NOTIFY: usize = 0x8;
    /// `uint32_t detach`: write anything to detach.
    pub const DETACH: usize = 0xc;
    /// `sizeof(struct guest_shm_control)`.
    pub const STRUCT_SIZE: usize = 0x10;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// `struct guest_shm_factory` as the header declares it.
    #[repr(C)]
    struct GuestShmFactory {
        signature: u64,
        shmem: u64,
        vector: u32,
        status: u32,
        size: u32,
        name: [u8; MAX_NAME],
        find: u32,
    }

    /// `struct guest_shm_control` as the header declares it.
    #[repr(C)]
    struct GuestShmControl {
        status: u32,
        idx: u32,
        notify: u32,
        detach: u32,
    }

    #[test]
    fn factory_offsets_match_the_c_layout() {
        assert_eq!(offset_of!(GuestShmFactory, signature), factory::SIGNATURE);
        assert_eq!(offset_of!(GuestShmFactory, shmem), factory::SHMEM);
        assert_eq!(offset_of!(GuestShmFactory, vector), factory::VECTOR);
        assert_eq!(offset_of!(GuestShmFactory, status), factory::STATUS);
        assert_eq!(offset_of!(GuestShmFactory, size), factory::SIZE);
        assert_eq!(offset_of!(GuestShmFactory, name), factory::NAME);
        assert_eq!(offset_of!(GuestShmFactory, find), factory::FIND);
        assert_eq!(size_of::<GuestShmFactory>(), factory::STRUCT_SIZE);
    }

    #[test]
    fn control_offsets_match_the_c_layout() {
        assert_eq!(offset_of!(GuestShmControl, status), control::STATUS);
        assert_eq!(offset_of!(GuestShmControl, idx), control::IDX);
        assert_eq!(offset_of!(GuestShmControl, notify), control::NOTIFY);
        assert_eq!(offset_of!(GuestShmControl, detach), control::DETACH);
        assert_eq!(size_of::<GuestShmControl>(), control::STRUCT_SIZE);
    }

    #[test]
    fn signature_spells_qvmg2gsm() {
        assert_eq!(&SIGNATURE.to_le_bytes(), b"QVMG2GSM");
        assert_eq!(SIGNATURE, 0x4d534732474d5651);
    }

    #[test]
    fn header_constants() {
        assert_eq!(MAX_NAME, 32);
        assert_eq!(MAX_CLIENTS, 16);
        assert_eq!(PCI_VENDOR_ID, 0x1c05);
        assert_eq!(PCI_DEVICE_ID, 0x0001);
        assert_eq!(PAGE_SIZE, 4096);
    }

    #[test]
    fn pages_round_up() {
        assert_eq!(pages_for(0), 0);
        assert_eq!(pages_for(1), 1);
        assert_eq!(pages_for(4096), 1);
        assert_eq!(pages_for(4097), 2);
        assert_eq!(pages_for(0xf0000), 0xf0);
        assert_eq!(pages_for(MAX_REGION_BYTES), u64::from(u32::MAX));
    }

    #[test]
    fn whole_pages_round_up_and_exact_pages_never_floor() {
        assert_eq!(whole_pages(0), Some(0));
        assert_eq!(whole_pages(100), Some(4096));
        assert_eq!(whole_pages(0x1800), Some(0x2000));
        assert_eq!(whole_pages(4096), Some(4096));
        assert_eq!(whole_pages(u64::MAX), None);
        assert_eq!(exact_pages(4096), Some(1));
        assert_eq!(exact_pages(0x2000), Some(2));
        assert_eq!(exact_pages(MAX_REGION_BYTES), Some(u32::MAX));
        for not_whole in [0, 100, 128, 0x1800, 4097, MAX_REGION_BYTES + 4096] {
            assert_eq!(exact_pages(not_whole), None, "{not_whole:#x}");
        }
    }
}
