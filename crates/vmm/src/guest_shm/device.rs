//! The `guest_shm` device: factory page registers, control pages, one interrupt.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ivshm_mem::Mapping;
use ivshm_proto::guest_shm::{self as gs, factory, GuestShmStatus, MAX_NAME, PAGE_SIZE, SIGNATURE};
use rustix::event::{eventfd, EventfdFlags};

use crate::guest_shm::{Attachment, Factory};
use crate::pci::config::PciIdentity;
use crate::pci::{BarKind, BarRelocation, ConfigSpace, PciBar, PciDevice};

/// Where the factory page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestShmMode {
    /// PCI function 1C05:0001 with the factory page in BAR0.
    Pci,
    /// Factory page at guest-physical `loc` (QNX `loc` option), interrupt `intr`.
    Mmio {
        /// Factory page address.
        loc: u64,
    },
}

impl GuestShmMode {
    /// The mode a VM's `vdev shmem` options ask for: MMIO at `loc` when both `loc` and `intr`
    /// are given (QNX: "if you specify loc and intr, the vdev is an MMIO device"), else PCI.
    /// Returns the mode and, for MMIO, the `intr` line (the factory page's `vector`).
    pub fn from_policy(policy: &ivshm_policy::VmPolicy) -> (GuestShmMode, Option<u32>) {
        match (policy.loc(), policy.intr()) {
            (Some(loc), Some(intr)) if policy.is_mmio() => {
                (GuestShmMode::Mmio { loc }, Some(intr.line))
            }
            _ => (GuestShmMode::Pci, None),
        }
    }
}

/// Errors building the device.
#[derive(Debug, thiserror::Error)]
pub enum GuestShmError {
    /// Creating the interrupt eventfd failed.
    #[error("creating the interrupt eventfd: {0}")]
    Sys(#[from] rustix::io::Errno),
    /// Building config space failed.
    #[error(transparent)]
    Config(#[from] crate::pci::config::ConfigError),
}

/// The VMM side of placing regions in guest-physical memory.
pub trait RegionWindowMapper: Send {
    /// Reserves a window of `pages + 1` pages, leaves its first page unbacked (the control
    /// page: accesses must trap to [`GuestShmDevice::mmio_read`]/`mmio_write`) and maps
    /// `memory` behind it. Returns the control page's guest-physical address.
    fn map_region(&mut self, memory: &Arc<Mapping>, pages: u32) -> Result<u64, String>;
    /// Removes the data mapping of the window whose control page is at `control_addr`.
    fn unmap_region(&mut self, control_addr: u64);
}

struct Attached {
    control_addr: u64,
    attachment: Attachment,
}

/// A QNX `guest_shm` device.
pub struct GuestShmDevice {
    mode: GuestShmMode,
    config: Option<ConfigSpace>,
    vector: u32,
    status: u32,
    shmem: u64,
    size: u32,
    name: [u8; MAX_NAME],
    factory: Box<dyn Factory>,
    mapper: Box<dyn RegionWindowMapper>,
    interrupt: OwnedFd,
    attached: Vec<Attached>,
}

impl std::fmt::Debug for GuestShmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestShmDevice")
            .field("mode", &self.mode)
            .field("vector", &self.vector)
            .field("connections", &self.attached.len())
            .finish_non_exhaustive()
    }
}

/// Size of the factory page.
const FACTORY_PAGE: u64 = PAGE_SIZE as u64;

impl GuestShmDevice {
    /// A device in `mode` whose interrupt the guest knows as `vector` (the factory page's
    /// `vector` register).
    pub fn new(
        mode: GuestShmMode,
        vector: u32,
        factory: Box<dyn Factory>,
        mapper: Box<dyn RegionWindowMapper>,
    ) -> Result<GuestShmDevice, GuestShmError> {
        let config = match mode {
            GuestShmMode::Pci => {
                let mut c = ConfigSpace::new(PciIdentity {
                    vendor_id: gs::PCI_VENDOR_ID,
                    device_id: gs::PCI_DEVICE_ID,
                    revision: 0,
                    // Not public for QNX's device: "other memory controller".
                    class: 0x05,
                    subclass: 0x80,
                    prog_if: 0,
                    subsystem_vendor_id: gs::PCI_VENDOR_ID,
                    subsystem_id: gs::PCI_DEVICE_ID,
                    interrupt_pin: 1,
                });
                c.add_bar(PciBar {
                    index: 0,
                    addr: 0,
                    size: FACTORY_PAGE,
                    kind: BarKind::Mem32,
                    prefetchable: false,
                })?;
                Some(c)
            }
            GuestShmMode::Mmio { .. } => None,
        };
        Ok(GuestShmDevice {
            mode,
            config,
            vector,
            status: GuestShmStatus::Ok.as_u32(),
            shmem: 0,
            size: 0,
            name: [0; MAX_NAME],
            factory,
            mapper,
            interrupt: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            attached: Vec::new(),
        })
    }

    /// Eventfd signalled whenever a connection's control `status` changes: register it as
    /// an irqfd (or poll it and inject the interrupt).
    pub fn interrupt_fd(&self) -> BorrowedFd<'_> {
        self.interrupt.as_fd()
    }

    /// Programs BAR0 (PCI mode) as firmware would.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        if let Some(c) = self.config.as_mut() {
            c.set_bar_addr(index, addr);
        }
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.attached.len()
    }

    fn factory_image(&self) -> [u8; factory::STRUCT_SIZE] {
        let mut img = [0u8; factory::STRUCT_SIZE];
        img[factory::SIGNATURE..factory::SIGNATURE + 8].copy_from_slice(&SIGNATURE.to_le_bytes());
        img[factory::SHMEM..factory::SHMEM + 8].copy_from_slice(&self.shmem.to_le_bytes());
        img[factory::VECTOR..factory::VECTOR + 4].copy_from_slice(&self.vector.to_le_bytes());
        img[factory::STATUS..factory::STATUS + 4].copy_from_slice(&self.status.to_le_bytes());
        img[factory::SIZE..factory::SIZE + 4].copy_from_slice(&self.size.to_le_bytes());
        img[factory::NAME..factory::NAME + MAX_NAME].copy_from_slice(&self.name);
        img
    }

    /// A read of the factory page at `offset`.
    pub fn read_factory(&self, offset: u64, data: &mut [u8]) {
        let img = self.factory_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| img.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A write to the factory page at `offset`.
    pub fn write_factory(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let name = factory::NAME..factory::NAME + MAX_NAME;
        if name.contains(&offset) && offset + data.len() <= name.end {
            let start = offset - factory::NAME;
            self.name[start..start + data.len()].copy_from_slice(data);
            return;
        }
        let Ok(value) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            return;
        };
        match offset {
            factory::SIZE => {
                self.size = value;
                let r = self
                    .factory
                    .create_or_attach(&self.name, value, self.interrupt.as_fd());
                self.complete(r);
            }
            factory::FIND => {
                let r = self.factory.find(&self.name, self.interrupt.as_fd());
                self.complete(r);
            }
            _ => {}
        }
    }

    fn complete(&mut self, result: Result<Attachment, GuestShmStatus>) {
        let status = match result {
            Ok(mut attachment) => {
                match self.mapper.map_region(&attachment.memory, attachment.pages) {
                    Ok(control_addr) => {
                        self.size = attachment.pages;
                        self.shmem = control_addr;
                        self.attached.push(Attached {
                            control_addr,
                            attachment,
                        });
                        GuestShmStatus::Ok
                    }
                    Err(why) => {
                        tracing::warn!(%why, "guest_shm: no room for the region in guest memory");
                        attachment.connection.detach();
                        GuestShmStatus::NoMem
                    }
                }
            }
            Err(status) => status,
        };
        tracing::debug!(status = status.qnx_name(), "guest_shm: factory request");
        self.status = status.as_u32();
    }

    fn control_at(&self, addr: u64) -> Option<(usize, u64)> {
        self.attached.iter().enumerate().find_map(|(i, a)| {
            (addr >= a.control_addr && addr - a.control_addr < PAGE_SIZE as u64)
                .then(|| (i, addr - a.control_addr))
        })
    }

    fn factory_offset(&self, addr: u64) -> Option<u64> {
        match self.mode {
            GuestShmMode::Mmio { loc } if addr >= loc && addr - loc < FACTORY_PAGE => {
                Some(addr - loc)
            }
            _ => None,
        }
    }

    /// True when `addr` is this device's MMIO-mode factory page or one of its control pages.
    pub fn claims(&self, addr: u64) -> bool {
        self.factory_offset(addr).is_some() || self.control_at(addr).is_some()
    }

    /// An MMIO read at guest address `addr` (factory page in MMIO mode, control pages).
    /// Returns false if the address is not the device's.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        if let Some(off) = self.factory_offset(addr) {
            self.read_factory(off, data);
            return true;
        }
        let Some((i, off)) = self.control_at(addr) else {
            return false;
        };
        let conn = &mut self.attached[i].attachment.connection;
        let value = match (off, data.len()) {
            (0, 4) => conn.read_status(),
            (4, 4) => conn.idx(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (j, b) in data.iter_mut().enumerate() {
            *b = bytes.get(j).copied().unwrap_or(0);
        }
        true
    }

    /// An MMIO write at guest address `addr`. Returns false if the address is not the
    /// device's.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        if let Some(off) = self.factory_offset(addr) {
            self.write_factory(off, data);
            return true;
        }
        let Some((i, off)) = self.control_at(addr) else {
            return false;
        };
        let Ok(value) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            return true;
        };
        match off {
            0x8 => self.attached[i].attachment.connection.notify(value),
            0xc => {
                let mut a = self.attached.remove(i);
                a.attachment.connection.detach();
                self.mapper.unmap_region(a.control_addr);
            }
            _ => {}
        }
        true
    }
}

impl PciDevice for GuestShmDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config
            .as_ref()
            .map_or(0xffff_ffff, |c| c.read_register(reg_idx))
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarRelocation> {
        self.config.as_mut()?.write_register(reg_idx, offset, data)
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config
            .as_ref()
            .map(ConfigSpace::bars)
            .unwrap_or_default()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.read_factory(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.write_factory(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_shm::LocalRegionRegistry;
    use crate::ivshmem::link::drain_eventfd;
    use ivshm_policy::VmPolicy;

    /// Places windows one after another from 0xe000_0000.
    struct BumpMapper(u64);
    impl RegionWindowMapper for BumpMapper {
        fn map_region(&mut self, _: &Arc<Mapping>, pages: u32) -> Result<u64, String> {
            let at = self.0;
            self.0 += (u64::from(pages) + 1) * 4096;
            Ok(at)
        }
        fn unmap_region(&mut self, _: u64) {}
    }

    fn device(reg: &LocalRegionRegistry, policy: &str) -> GuestShmDevice {
        GuestShmDevice::new(
            GuestShmMode::Mmio { loc: 0x1b00_0000 },
            0x60,
            Box::new(reg.factory(VmPolicy::parse_qnx(policy).unwrap())),
            Box::new(BumpMapper(0xe000_0000)),
        )
        .unwrap()
    }

    fn r32(d: &mut GuestShmDevice, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(d.mmio_read(addr, &mut b));
        u32::from_le_bytes(b)
    }

    fn w32(d: &mut GuestShmDevice, addr: u64, v: u32) {
        assert!(d.mmio_write(addr, &v.to_le_bytes()));
    }

    fn create(d: &mut GuestShmDevice, name: &str, pages: u32) -> u32 {
        let f = 0x1b00_0000;
        let mut n = [0u8; 32];
        n[..name.len()].copy_from_slice(name.as_bytes());
        for (i, chunk) in n.chunks(4).enumerate() {
            assert!(d.mmio_write(f + 0x1c + 4 * i as u64, chunk));
        }
        w32(d, f + 0x18, pages);
        r32(d, f + 0x14)
    }

    #[test]
    fn mode_from_vdev_options() {
        let mmio = VmPolicy::parse_qnx("vdev shmem loc 0x1b000000 intr gic:39").unwrap();
        assert_eq!(
            GuestShmMode::from_policy(&mmio),
            (GuestShmMode::Mmio { loc: 0x1b00_0000 }, Some(39))
        );
        let pci = VmPolicy::parse_qnx("vdev shmem").unwrap();
        assert_eq!(GuestShmMode::from_policy(&pci), (GuestShmMode::Pci, None));
    }

    /// PCI mode: function 1C05:0001 with the 4 KiB factory page as BAR0 (32-bit memory),
    /// INTA#; the factory page reads through BAR0. MMIO mode has no config space.
    #[test]
    fn pci_mode_config_space_and_bar0_factory_page() {
        let reg = LocalRegionRegistry::new(64);
        let mut d = GuestShmDevice::new(
            GuestShmMode::Pci,
            11,
            Box::new(reg.factory(VmPolicy::parse_qnx("vdev shmem").unwrap())),
            Box::new(BumpMapper(0xe000_0000)),
        )
        .unwrap();
        assert_eq!(d.read_config_register(0), 0x0001_1c05);
        assert_eq!(d.read_config_register(15) >> 8 & 0xff, 1, "INTA#");
        d.write_config_register(4, 0, &[0xff; 4]);
        assert_eq!(d.read_config_register(4), 0xffff_f000);
        assert_eq!(d.read_config_register(5), 0, "only BAR0");
        let mut b = [0u8; 8];
        d.read_bar(0, 0, &mut b);
        assert_eq!(u64::from_le_bytes(b), SIGNATURE);
        d.read_bar(0, 0x10, &mut b[..4]);
        assert_eq!(&b[..4], &11u32.to_le_bytes(), "vector");
        d.write_bar(0, 0x1c, b"pci\0");
        d.write_bar(0, 0x18, &1u32.to_le_bytes());
        d.read_bar(0, 0x14, &mut b[..4]);
        assert_eq!(&b[..4], &[0; 4], "GSS_OK");
        d.read_bar(0, 0x8, &mut b);
        assert_eq!(
            u64::from_le_bytes(b),
            0xe000_0000,
            "shmem: the control page"
        );
        assert!(d.claims(0xe000_0000), "control page traps to the device");

        let mut mmio = device(&reg, "vdev shmem");
        assert_eq!(mmio.read_config_register(0), 0xffff_ffff);
        assert!(mmio.bars().is_empty());
    }

    #[test]
    fn factory_page_registers() {
        let reg = LocalRegionRegistry::new(64);
        let mut d = device(&reg, "vdev shmem\n deny secret*");
        let f = 0x1b00_0000;
        assert_eq!(r32(&mut d, f), 0x474d_5651);
        assert_eq!(r32(&mut d, f + 4), 0x4d53_4732);
        assert_eq!(r32(&mut d, f + 0x10), 0x60);
        assert_eq!(
            create(&mut d, "secret1", 1),
            GuestShmStatus::NoPermission.as_u32()
        );
        assert_eq!(create(&mut d, "mem", 3), 0);
        assert_eq!(r32(&mut d, f + 0x18), 3);
        assert_eq!(r32(&mut d, f + 8), 0xe000_0000);
        // find of a missing name.
        let mut n = [0u8; 8];
        n[..4].copy_from_slice(b"none");
        assert!(d.mmio_write(f + 0x1c, &n));
        w32(&mut d, f + 0x3c, 1);
        assert_eq!(r32(&mut d, f + 0x14), GuestShmStatus::DoesNotExist.as_u32());
    }

    proptest::proptest! {
        /// Arbitrary guest writes and reads on the factory page and the control window never
        /// panic; the signature stays and `status` is always a GSS code.
        #[test]
        fn arbitrary_factory_and_control_accesses(ops in proptest::collection::vec(
            (proptest::prelude::any::<bool>(), 0u64..0x5000, proptest::prelude::any::<u64>(), proptest::sample::select(vec![1usize, 2, 4, 8]), proptest::prelude::any::<bool>()),
            0..100,
        )) {
            let reg = LocalRegionRegistry::new(4);
            let mut d = device(&reg, "vdev shmem");
            for (factory_page, offset, value, len, write) in ops {
                let addr = if factory_page { 0x1b00_0000 + offset % 0x1000 } else { 0xe000_0000 + offset };
                let bytes = value.to_le_bytes();
                if write {
                    d.mmio_write(addr, &bytes[..len]);
                } else {
                    let mut buf = [0u8; 8];
                    d.mmio_read(addr, &mut buf[..len]);
                }
            }
            proptest::prop_assert_eq!(r32(&mut d, 0x1b00_0000), 0x474d_5651);
            let status = r32(&mut d, 0x1b00_0014);
            proptest::prop_assert!(GuestShmStatus::from_u32(status).is_some());
        }
    }

    #[test]
    fn control_pages_between_two_devices() {
        let reg = LocalRegionRegistry::new(64);
        let mut a = device(&reg, "vdev shmem");
        let mut b = device(&reg, "vdev shmem");
        assert_eq!(create(&mut a, "r", 2), 0);
        assert_eq!(create(&mut b, "r", 9), 0);
        assert_eq!(r32(&mut b, 0x1b00_0018), 2, "actual size");
        let ctl = 0xe000_0000;
        assert_eq!(r32(&mut a, ctl + 4), 0);
        assert_eq!(r32(&mut b, ctl + 4), 1);
        assert_eq!(
            drain_eventfd(a.interrupt_fd()).unwrap(),
            1,
            "A interrupted by B attaching"
        );
        w32(&mut a, ctl + 8, u32::MAX);
        assert_eq!(drain_eventfd(b.interrupt_fd()).unwrap(), 1);
        assert_eq!(r32(&mut b, ctl), 0x0003_0001);
        assert_eq!(r32(&mut b, ctl), 0x0003_0000);
        w32(&mut b, ctl + 0xc, 1);
        assert!(!b.claims(ctl), "detached control page is gone");
        assert_eq!(drain_eventfd(a.interrupt_fd()).unwrap(), 1);
        assert_eq!(r32(&mut a, ctl), 0x0001_0000);
    }
}
