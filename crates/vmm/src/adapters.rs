//! Adapters for rust-vmm's `vm-device` buses: register a device model's MMIO ranges with a
//! `vm_device::device_manager::IoManager` (or any `MmioManager`) and let the bus dispatch.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vm_device::bus::{MmioAddress, MmioRange};
//! use vm_device::device_manager::{IoManager, MmioManager};
//! use ivshm_vmm::adapters::PciBarMmio;
//! use ivshm_vmm::ivshmem::{IvshmemDevice, REG_IV_POSITION};
//!
//! let mut dev = IvshmemDevice::new_plain(1 << 20, false).unwrap();
//! dev.set_bar_addr(0, 0xc000_0000);
//! let dev = Arc::new(Mutex::new(dev));
//! let mut io = IoManager::new();
//! let range = MmioRange::new(MmioAddress(0xc000_0000), 0x100).unwrap();
//! io.register_mmio(range, Arc::new(PciBarMmio::new(dev, 0))).unwrap();
//! let mut ivpos = [0xffu8; 4];
//! io.mmio_read(MmioAddress(0xc000_0000 + REG_IV_POSITION), &mut ivpos).unwrap();
//! assert_eq!(ivpos, [0, 0, 0, 0]);
//! ```

use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

use crate::guest_shm::GuestShmDevice;
use crate::pci::PciDevice;

/// One BAR of a [`PciDevice`] as a `vm-device` MMIO device: register it for the BAR's range
/// (and re-register when a config write reports a relocation).
pub struct PciBarMmio<D: ?Sized> {
    device: Arc<Mutex<D>>,
    bar: usize,
}

impl<D: ?Sized> PciBarMmio<D> {
    /// Serves BAR `bar` of `device`.
    pub fn new(device: Arc<Mutex<D>>, bar: usize) -> PciBarMmio<D> {
        PciBarMmio { device, bar }
    }
}

impl<D: ?Sized> std::fmt::Debug for PciBarMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBarMmio")
            .field("bar", &self.bar)
            .finish_non_exhaustive()
    }
}

impl<D: PciDevice + ?Sized> DeviceMmio for PciBarMmio<D> {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match self.device.lock() {
            Ok(mut d) => d.read_bar(self.bar, offset, data),
            Err(_) => data.fill(0xff),
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Ok(mut d) = self.device.lock() {
            d.write_bar(self.bar, offset, data);
        }
    }
}

/// A [`GuestShmDevice`]'s MMIO-mode factory page or control pages as a `vm-device` MMIO
/// device: register it for the factory page and for each control page the device's
/// [`crate::guest_shm::RegionWindowMapper`] hands out.
pub struct GuestShmMmio {
    device: Arc<Mutex<GuestShmDevice>>,
}

impl GuestShmMmio {
    /// Serves `device`'s pages.
    pub fn new(device: Arc<Mutex<GuestShmDevice>>) -> GuestShmMmio {
        GuestShmMmio { device }
    }
}

impl std::fmt::Debug for GuestShmMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestShmMmio").finish_non_exhaustive()
    }
}

impl DeviceMmio for GuestShmMmio {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let handled = self
            .device
            .lock()
            .is_ok_and(|mut d| d.mmio_read(base.0.wrapping_add(offset), data));
        if !handled {
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Ok(mut d) = self.device.lock() {
            d.mmio_write(base.0.wrapping_add(offset), data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ivshmem::{IvshmemDevice, LocalDoorbellBus, REG_INTR_MASK};
    use vm_device::bus::MmioRange;
    use vm_device::device_manager::{IoManager, MmioManager};

    #[test]
    fn ivshmem_bars_through_an_io_manager() {
        let bus = LocalDoorbellBus::new();
        let dev =
            IvshmemDevice::new_doorbell(4096, 2, Box::new(bus.join(2).unwrap()), false).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut io = IoManager::new();
        let r0 = MmioRange::new(MmioAddress(0x1000_0000), 0x100).unwrap();
        let r1 = MmioRange::new(MmioAddress(0x1000_1000), 0x1000).unwrap();
        io.register_mmio(r0, Arc::new(PciBarMmio::new(dev.clone(), 0)))
            .unwrap();
        io.register_mmio(r1, Arc::new(PciBarMmio::new(dev.clone(), 1)))
            .unwrap();
        io.mmio_write(
            MmioAddress(0x1000_0000 + REG_INTR_MASK),
            &5u32.to_le_bytes(),
        )
        .unwrap();
        let mut b = [0u8; 4];
        io.mmio_read(MmioAddress(0x1000_0000 + REG_INTR_MASK), &mut b)
            .unwrap();
        assert_eq!(u32::from_le_bytes(b), 5);
        // MSI-X vector 1's control word resets masked.
        io.mmio_read(MmioAddress(0x1000_1000 + 16 + 12), &mut b)
            .unwrap();
        assert_eq!(u32::from_le_bytes(b), 1);
    }
}
