//! The test VMM's PCI "platform": configuration mechanism #1 (ports 0xCF8/0xCFC) on bus 0,
//! devices at device numbers 1, 2, ..., BARs at addresses the VMM assigns, MMIO exits
//! dispatched to BARs, RAM-backed BARs as KVM memory slots, device ioevents registered
//! with KVM, and a per-address count of MMIO exits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ivshm_mem::Mapping;

use kvm_ioctls::VmFd;

use crate::guest::{PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};
use ivshm_vmm::ivshmem::kvm::{set_memory_slot, KvmIoeventRegistry, KvmWiringError};
use ivshm_vmm::pci::{BarKind, BarRelocation, PciBar, PciDevice};

/// A device shared between the vCPU thread and the test.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// MMIO outside PCI BARs (e.g. `guest_shm` control pages, MMIO-mode factory pages).
pub trait MmioHandler: Send {
    /// Handles a read; false if `addr` is not this handler's.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool;
    /// Handles a write; false if `addr` is not this handler's.
    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool;
}

impl MmioHandler for ivshm_vmm::guest_shm::GuestShmDevice {
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        ivshm_vmm::guest_shm::GuestShmDevice::mmio_read(self, addr, data)
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        ivshm_vmm::guest_shm::GuestShmDevice::mmio_write(self, addr, data)
    }
}

/// An MMIO handler shared between the vCPU thread and the test.
pub type SharedMmioHandler = Arc<Mutex<dyn MmioHandler>>;

/// Errors from the platform.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum PlatformError {
    /// {0}
    ///
    /// KVM wiring (a memory slot, ioeventfds) failed.
    Wiring(KvmWiringError),
    /// bus 0 is full
    ///
    /// Too many devices for bus 0.
    BusFull,
    /// device number {0} on bus 0 is taken or not in 1..=31
    ///
    /// The requested device number is taken or not in 1..=31.
    DeviceNumber(u8),
    /// device lock poisoned
    ///
    /// A device lock was poisoned by a panicking thread.
    Poisoned,
    /// RAM BAR {0} is larger than its mapping
    ///
    /// A RAM BAR does not fit its mapping.
    RamBarTooLarge(usize),
}

impl From<KvmWiringError> for PlatformError {
    fn from(error: KvmWiringError) -> Self {
        Self::Wiring(error)
    }
}

struct RamBar {
    index: usize,
    mapping: Arc<Mapping>,
    slot: u32,
    guest_addr: u64,
}

struct PlatformDevice {
    /// Device number on bus 0 (1..=31).
    number: u8,
    device: SharedPciDevice,
    bars: Vec<PciBar>,
    ram_bars: Vec<RamBar>,
    ioevents: Option<KvmIoeventRegistry>,
}

/// Bus 0 with its devices.
pub struct PciPlatform {
    vm: Arc<VmFd>,
    config_address: u32,
    devices: Vec<PlatformDevice>,
    handlers: Vec<SharedMmioHandler>,
    next_slot: u32,
    mmio_exits: HashMap<u64, u64>,
}

impl std::fmt::Debug for PciPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciPlatform")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl PciPlatform {
    /// A platform for `vm`; memory slots from `first_slot` upward are used for RAM BARs.
    pub fn new(vm: Arc<VmFd>, first_slot: u32) -> PciPlatform {
        PciPlatform {
            vm,
            config_address: 0,
            devices: Vec::new(),
            handlers: Vec::new(),
            next_slot: first_slot,
            mmio_exits: HashMap::new(),
        }
    }

    /// Plugs `device` in at the lowest free device number (returned). `ram_bars` lists BARs
    /// backed by memory (mapped as KVM memory slots at the BAR address); with
    /// `ioeventfds` the device's [`PciDevice::ioevents`] are registered with KVM.
    pub fn add_device(
        &mut self,
        device: SharedPciDevice,
        ram_bars: Vec<(usize, Arc<Mapping>)>,
        ioeventfds: bool,
    ) -> Result<u8, PlatformError> {
        let number = (1..=31)
            .find(|&n| self.devices.iter().all(|d| d.number != n))
            .ok_or(PlatformError::BusFull)?;
        self.add_device_at(number, device, ram_bars, ioeventfds)
    }

    /// [`add_device`](Self::add_device) at device number `number` (1..=31, free).
    pub fn add_device_at(
        &mut self,
        number: u8,
        device: SharedPciDevice,
        ram_bars: Vec<(usize, Arc<Mapping>)>,
        ioeventfds: bool,
    ) -> Result<u8, PlatformError> {
        if !(1..=31).contains(&number) || self.devices.iter().any(|d| d.number == number) {
            return Err(PlatformError::DeviceNumber(number));
        }
        let bars = device.lock().map_err(|_| PlatformError::Poisoned)?.bars();
        let mut ram = Vec::new();
        for (index, mapping) in ram_bars {
            let bar = bars.iter().find(|b| b.index == index);
            let size = bar.map_or(0, |b| b.size);
            if size as usize > mapping.len() {
                return Err(PlatformError::RamBarTooLarge(index));
            }
            let slot = self.next_slot;
            self.next_slot += 1;
            let mut rb = RamBar {
                index,
                mapping,
                slot,
                guest_addr: 0,
            };
            if let Some(b) = bar {
                self.map_ram_bar(&mut rb, b.addr, b.size)?;
            }
            ram.push(rb);
        }
        let mut entry = PlatformDevice {
            number,
            device,
            bars,
            ram_bars: ram,
            ioevents: ioeventfds.then(|| KvmIoeventRegistry::new(self.vm.clone())),
        };
        sync_ioevents(&mut entry)?;
        self.devices.push(entry);
        Ok(number)
    }

    fn map_ram_bar(&self, rb: &mut RamBar, addr: u64, size: u64) -> Result<(), PlatformError> {
        let size = if addr == 0 { 0 } else { size };
        // SAFETY: the mapping is kept alive by the Arc in `rb` while the platform exists; the
        // platform is only dropped after the vCPU stopped (TestVm::drop), so no guest access
        // reaches the range after it is unmapped.
        unsafe { set_memory_slot(&self.vm, rb.slot, addr, &rb.mapping, size) }?;
        rb.guest_addr = addr;
        Ok(())
    }

    /// Adds a handler for MMIO that no BAR claims.
    pub fn add_mmio_handler(&mut self, handler: SharedMmioHandler) {
        self.handlers.push(handler);
    }

    /// Re-registers every device's ioevents (after doorbell peers joined or left).
    pub fn refresh_ioevents(&mut self) -> Result<(), PlatformError> {
        for d in &mut self.devices {
            sync_ioevents(d)?;
        }
        Ok(())
    }

    /// MMIO exits the VMM has seen at exactly `addr`.
    pub fn mmio_exits_at(&self, addr: u64) -> u64 {
        self.mmio_exits.get(&addr).copied().unwrap_or(0)
    }

    /// Handles a port read; returns false for ports the platform does not own.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        if port == PCI_CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
            return true;
        }
        if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&port) {
            let offset = usize::from(port - PCI_CONFIG_DATA);
            let value = self.config_read();
            let bytes = value.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset + i).copied().unwrap_or(0xff);
            }
            return true;
        }
        false
    }

    /// Handles a port write; returns false for ports the platform does not own.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> Result<bool, PlatformError> {
        if port == PCI_CONFIG_ADDRESS {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.config_address = u32::from_le_bytes(b);
            }
            return Ok(true);
        }
        if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&port) {
            let offset = u64::from(port - PCI_CONFIG_DATA);
            self.config_write(offset, data)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The device and register selected by the config address latch.
    fn selected(&self) -> Option<(usize, usize)> {
        let a = self.config_address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let device = ((a >> 11) & 0x1f) as u8;
        let function = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        let index = self.devices.iter().position(|d| d.number == device)?;
        Some((index, reg))
    }

    fn config_read(&mut self) -> u32 {
        let Some((dev, reg)) = self.selected() else {
            return 0xffff_ffff;
        };
        match self.devices[dev].device.lock() {
            Ok(mut d) => d.read_config_register(reg),
            Err(_) => 0xffff_ffff,
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), PlatformError> {
        let Some((dev, reg)) = self.selected() else {
            return Ok(());
        };
        let (relocation, bars) = {
            let mut d = self.devices[dev]
                .device
                .lock()
                .map_err(|_| PlatformError::Poisoned)?;
            let r = d.write_config_register(reg, offset, data);
            (r, d.bars())
        };
        self.devices[dev].bars = bars;
        if let Some(r) = relocation {
            self.relocate(dev, r)?;
        }
        Ok(())
    }

    fn relocate(&mut self, dev: usize, r: BarRelocation) -> Result<(), PlatformError> {
        tracing::debug!(
            device = self.devices[dev].number,
            bar = r.index,
            old = r.old_addr,
            new = r.new_addr,
            "BAR moved"
        );
        let mut ram = std::mem::take(&mut self.devices[dev].ram_bars);
        let mut result = Ok(());
        for rb in ram.iter_mut().filter(|rb| rb.index == r.index) {
            if rb.guest_addr != 0 {
                // Delete the old slot before creating the new one.
                let addr = rb.guest_addr;
                result = self.map_ram_bar(rb, 0, 0);
                if result.is_err() {
                    rb.guest_addr = addr;
                    break;
                }
            }
            result = self.map_ram_bar(rb, r.new_addr, r.size);
        }
        self.devices[dev].ram_bars = ram;
        result?;
        sync_ioevents(&mut self.devices[dev])
    }

    /// Dispatches an MMIO read; unclaimed addresses read all ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        *self.mmio_exits.entry(addr).or_default() += 1;
        match self.find_bar(addr) {
            Some((dev, bar, offset)) => {
                if let Ok(mut d) = self.devices[dev].device.lock() {
                    d.read_bar(bar, offset, data);
                }
            }
            None => {
                for h in &self.handlers {
                    if h.lock().is_ok_and(|mut h| h.mmio_read(addr, data)) {
                        return;
                    }
                }
                data.fill(0xff);
            }
        }
    }

    /// Dispatches an MMIO write; unclaimed addresses are ignored.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        *self.mmio_exits.entry(addr).or_default() += 1;
        if let Some((dev, bar, offset)) = self.find_bar(addr) {
            if let Ok(mut d) = self.devices[dev].device.lock() {
                d.write_bar(bar, offset, data);
            }
            return;
        }
        for h in &self.handlers {
            if h.lock().is_ok_and(|mut h| h.mmio_write(addr, data)) {
                return;
            }
        }
    }

    fn find_bar(&self, addr: u64) -> Option<(usize, usize, u64)> {
        self.devices.iter().enumerate().find_map(|(i, d)| {
            d.bars.iter().find_map(|b| {
                let hit = b.kind != BarKind::Io
                    && b.addr != 0
                    && addr >= b.addr
                    && addr - b.addr < b.size;
                hit.then(|| (i, b.index, addr - b.addr))
            })
        })
    }
}

fn sync_ioevents(d: &mut PlatformDevice) -> Result<(), PlatformError> {
    let Some(registry) = d.ioevents.as_mut() else {
        return Ok(());
    };
    let dev = d.device.lock().map_err(|_| PlatformError::Poisoned)?;
    registry.sync(&dev.ioevents())?;
    Ok(())
}
