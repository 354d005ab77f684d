//! The `guest_shm` device: factory page registers, control pages, one interrupt.
//!
//! # Access widths
//!
//! QNX does not document how its virtual registers treat accesses of other widths (a public
//! report says a block `memcpy` into the factory page's `name` faulted on qvm). This model
//! accepts what a C compiler emits for the header's `volatile` fields — aligned accesses of
//! the field's width — and, where that is harmless, what a copy of the header's structs
//! emits:
//!
//! * factory page, reads: any width at any offset inside the page reads the registers' bytes
//!   (`signature` and `shmem` as one 8-byte or two 4-byte loads, as 64- and 32-bit guests
//!   emit); beyond the struct, 0. Reads have no side effects.
//! * factory page, writes: `name` takes writes of any width inside its 32 bytes (`strcpy`,
//!   byte loops); `size` and `find` act on an aligned 4-byte write only (`guest_shm_create()`
//!   and `guest_shm_find()` store an `unsigned`). Anything else — other widths, a write
//!   spanning two fields, the read-only registers — is ignored.
//! * control page: aligned 4-byte reads of `status` (clears the pending bits) and `idx`, and
//!   aligned 4-byte writes of `notify` and `detach`. An aligned 8-byte read at offset 0 reads
//!   `status` then `idx`, as the two 4-byte reads it stands for (a struct copy on a 64-bit
//!   guest; QEMU's memory core splits such an access to a 4-byte device the same way); at
//!   offset 8 it reads the write-only registers, 0. An 8-byte write is ignored: it would be two
//!   commands (`notify` and `detach`) in one instruction, which no program means. Other widths
//!   or misaligned accesses read 0 and change nothing (no clearing) or are ignored.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ivshm_mem::Mapping;
use ivshm_proto::guest_shm::{
    self as gs, control, factory, GuestShmStatus, MAX_NAME, PAGE_SIZE, SIGNATURE,
};
use rustix::event::{eventfd, EventfdFlags};

use crate::guest_shm::{Attachment, Factory};
use crate::ivshmem::link::drain_eventfd;
use crate::pci::config::{PciIdentity, COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE};
use crate::pci::{BarKind, BarRelocation, ConfigSpace, PciBar, PciDevice};

/// Where the factory page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestShmMode {
    /// PCI function 1C05:0001 with the factory page in BAR0, interrupt INTA#.
    Pci,
    /// Factory page at guest-physical `loc` (QNX `loc` option), interrupt `intr`.
    Mmio {
        /// Factory page address.
        loc: u64,
    },
}

impl GuestShmMode {
    /// The mode a VM's `vdev shmem` options ask for, and its `intr` line: MMIO at `loc` when a
    /// memory `loc` and `intr` are given (QNX: "if the loc and intr options are specified, the
    /// guest will see it as a memory-mapped I/O (MMIO) device"), else PCI, where `intr` (when
    /// given) is the line INTA# is routed to and `None` leaves the line to the VMM ("for PCI
    /// devices that use an interrupt, if you don't set a number for guest_intr, this number is
    /// automatically assigned").
    pub fn from_policy(policy: &ivshm_policy::VmPolicy) -> (GuestShmMode, Option<u32>) {
        let intr = policy.intr().map(|intr| intr.line);
        match policy.mmio_loc() {
            Some(loc) => (GuestShmMode::Mmio { loc }, intr),
            None => (GuestShmMode::Pci, intr),
        }
    }
}

/// Errors building the device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum GuestShmError {
    /// creating the interrupt eventfd: {0}
    ///
    /// Creating the interrupt eventfd failed.
    Sys(rustix::io::Errno),
    /// {0}
    ///
    /// Building config space failed.
    Config(crate::pci::config::ConfigError),
}

impl From<crate::pci::config::ConfigError> for GuestShmError {
    fn from(error: crate::pci::config::ConfigError) -> Self {
        Self::Config(error)
    }
}

impl From<rustix::io::Errno> for GuestShmError {
    fn from(error: rustix::io::Errno) -> Self {
        GuestShmError::Sys(error)
    }
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

/// A level-triggered input of the VMM's interrupt controller that the device drives: PCI INTx#
/// (INTA#) routed to an IOAPIC pin, or a level-triggered `intr` line. On KVM:
/// [`KvmIrqLine`](crate::ivshmem::kvm::KvmIrqLine) (`KVM_IRQ_LINE` on the pin's GSI).
pub trait LevelInterrupt: Send {
    /// Drives the line: asserted (`true`) or deasserted (`false`). Called on changes only.
    fn set_level(&mut self, asserted: bool);
}

struct Attached {
    control_addr: u64,
    attachment: Attachment,
    /// The guest's `name` field when it attached (for `find` of a held connection).
    name: [u8; MAX_NAME],
    /// The attached-clients half of `status` the guest last read (or saw at attach): the line
    /// is asserted while the current one differs or a pending bit is set.
    seen_attached: u32,
}

impl Attached {
    /// Whether this connection's `status` changed since the guest last read it.
    fn changed(&self) -> bool {
        let status = self.attachment.connection.peek_status();
        status & 0xffff != 0 || status >> 16 != self.seen_attached
    }
}

/// The bytes of a factory `name` field before its first NUL.
fn name_bytes(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A QNX `guest_shm` device.
///
/// # Interrupts
///
/// Whenever the `status` of one of its connections changes, the factory signals
/// [`interrupt_fd`](Self::interrupt_fd) once. Two ways to deliver that to the guest:
///
/// * **edge** (MMIO mode's `intr`, or any edge-triggered input): register `interrupt_fd` as a
///   KVM irqfd on the line's GSI; every change is one interrupt and nothing passes through the
///   VMM.
/// * **level** (PCI mode's INTA#, which PCI defines as level-triggered and shareable, or a
///   level-triggered `intr`): give the device the line with
///   [`set_level_interrupt`](Self::set_level_interrupt), poll `interrupt_fd` in the VMM's
///   event loop and call [`service_interrupt`](Self::service_interrupt) when it is readable.
///   The line is asserted while some connection's `status` differs from what the guest last
///   read (a pending bit, an attach or detach it has not seen) and deasserted by the guest's
///   `status` read that leaves nothing pending — so a guest that acknowledges the interrupt
///   before reading (QNX's `InterruptAttachEvent` masks and EOIs, its thread reads `status`
///   and unmasks) gets exactly one interrupt per change, and one that reads without
///   acknowledging gets it again, as level semantics demand. The status register's Interrupt
///   Status bit shows the line's state. INTx Disable is not implemented (QNX's sample writes
///   0xffff to the command register and relies on INTA# afterwards).
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
    level_line: Option<Box<dyn LevelInterrupt>>,
    level: bool,
    attached: Vec<Attached>,
}

impl std::fmt::Debug for GuestShmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestShmDevice")
            .field("mode", &self.mode)
            .field("vector", &self.vector)
            .field("level", &self.level)
            .field("connections", &self.attached.len())
            .finish_non_exhaustive()
    }
}

/// Size of the factory page.
const FACTORY_PAGE: u64 = PAGE_SIZE as u64;

impl GuestShmDevice {
    /// A device in `mode` whose interrupt the guest knows as `vector`: the factory page's
    /// `vector` register and, in PCI mode, the Interrupt Line register (0x3C) firmware would
    /// write once it routed INTA# (255, "unknown", if `vector` does not fit in a byte).
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
                c.set_interrupt_line(u8::try_from(vector).unwrap_or(0xff));
                // No INTx Disable: QNX's own sample (ghstest) enables the device by writing
                // 0xffff to the command register and still takes its interrupt on INTA#, so
                // QNX's function does not implement the bit; neither does this one.
                c.set_command_writable(
                    COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER,
                );
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
            level_line: None,
            level: false,
            attached: Vec::new(),
        })
    }

    /// Eventfd signalled once per change of a connection's control `status`: register it as
    /// an irqfd (edge), or poll it and call [`service_interrupt`](Self::service_interrupt)
    /// (level; see the type's documentation).
    pub fn interrupt_fd(&self) -> BorrowedFd<'_> {
        self.interrupt.as_fd()
    }

    /// Drives `line` as the device's level-triggered interrupt (PCI mode: INTA# as the VMM
    /// routed it). The line starts deasserted and is set to the device's level at once.
    pub fn set_level_interrupt(&mut self, line: Box<dyn LevelInterrupt>) {
        self.level_line = Some(line);
        self.level = false;
        self.update_level();
    }

    /// Handles [`interrupt_fd`](Self::interrupt_fd) becoming readable (level delivery):
    /// consumes the signals and asserts the line if a connection's `status` changed.
    pub fn service_interrupt(&mut self) {
        let _ = drain_eventfd(self.interrupt.as_fd());
        self.update_level();
    }

    /// Whether the level-triggered line is asserted.
    pub fn interrupt_level(&self) -> bool {
        self.level
    }

    /// Recomputes the line from the connections and drives it on a change.
    fn update_level(&mut self) {
        let pending = self.attached.iter().any(Attached::changed);
        let mut level = pending;
        if let Some(c) = self.config.as_mut() {
            c.set_interrupt_status(pending);
            level &= !c.intx_disabled();
        }
        if level != self.level {
            if let Some(line) = self.level_line.as_mut() {
                line.set_level(level);
            }
            self.level = level;
        }
    }

    /// Programs BAR0 (PCI mode) as firmware would.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        if let Some(c) = self.config.as_mut() {
            c.set_bar_addr(index, addr);
        }
    }

    /// Writes the Interrupt Line register (PCI mode) as firmware does once it routed INTA#.
    pub fn set_interrupt_line(&mut self, line: u8) {
        if let Some(c) = self.config.as_mut() {
            c.set_interrupt_line(line);
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

    /// A read of the factory page at `offset` (any width; no side effects).
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

    /// A write to the factory page at `offset` (see the module documentation for widths).
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
            tracing::debug!(
                offset,
                len = data.len(),
                "guest_shm: factory write ignored (size and find take 4 bytes)"
            );
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
                if let Some(i) = self.held_connection(value) {
                    let held = &self.attached[i];
                    self.shmem = held.control_addr;
                    self.size = held.attachment.pages;
                    self.status = GuestShmStatus::Ok.as_u32();
                    tracing::debug!(
                        idx = held.attachment.connection.idx(),
                        "guest_shm: find returned a connection the guest holds"
                    );
                    return;
                }
                let r = self.factory.find(&self.name, self.interrupt.as_fd());
                self.complete(r);
            }
            _ => {}
        }
    }

    /// A connection this device holds to the region named in the factory's `name` field: the
    /// one with index `number` if there is one, else the one with the lowest index.
    fn held_connection(&self, number: u32) -> Option<usize> {
        let wanted = name_bytes(&self.name);
        let held = || {
            self.attached
                .iter()
                .enumerate()
                .filter(move |(_, a)| name_bytes(&a.name) == wanted)
        };
        held()
            .find(|(_, a)| a.attachment.connection.idx() == number)
            .or_else(|| held().min_by_key(|(_, a)| a.attachment.connection.idx()))
            .map(|(i, _)| i)
    }

    fn complete(&mut self, result: Result<Attachment, GuestShmStatus>) {
        let status = match result {
            Ok(mut attachment) => {
                match self.mapper.map_region(&attachment.memory, attachment.pages) {
                    Ok(control_addr) => {
                        self.size = attachment.pages;
                        self.shmem = control_addr;
                        let seen_attached = attachment.connection.peek_status() >> 16;
                        self.attached.push(Attached {
                            control_addr,
                            attachment,
                            name: self.name,
                            seen_attached,
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
        self.update_level();
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

    /// An aligned 4-byte read of control register `offset` of connection `i`.
    fn control_register(&mut self, i: usize, offset: u64) -> u32 {
        let a = &mut self.attached[i];
        match offset {
            o if o == control::STATUS as u64 => {
                let status = a.attachment.connection.read_status();
                a.seen_attached = status >> 16;
                self.update_level();
                status
            }
            o if o == control::IDX as u64 => a.attachment.connection.idx(),
            _ => 0,
        }
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
        let value = match (off, data.len()) {
            (o, 4) if o % 4 == 0 => u64::from(self.control_register(i, o)),
            (o, 8) if o % 8 == 0 => {
                let low = self.control_register(i, o);
                let high = self.control_register(i, o + 4);
                u64::from(low) | (u64::from(high) << 32)
            }
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
            o if o == control::NOTIFY as u64 => {
                self.attached[i].attachment.connection.notify(value);
            }
            o if o == control::DETACH as u64 => {
                let mut a = self.attached.remove(i);
                a.attachment.connection.detach();
                self.mapper.unmap_region(a.control_addr);
                self.update_level();
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
        let relocation = self.config.as_mut()?.write_register(reg_idx, offset, data);
        // The command register's INTx Disable bit may have changed.
        self.update_level();
        relocation
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
        let mode = |text: &str| GuestShmMode::from_policy(&VmPolicy::parse_qnx(text).unwrap());
        let mmio = (GuestShmMode::Mmio { loc: 0x1b00_0000 }, Some(39));
        assert_eq!(mode("vdev shmem loc 0x1b000000 intr gic:39"), mmio);
        assert_eq!(mode("vdev shmem loc mem:0x1b000000 intr gic:39"), mmio);
        assert_eq!(mode("vdev shmem"), (GuestShmMode::Pci, None));
        assert_eq!(mode("vdev shmem loc"), (GuestShmMode::Pci, None));
        // PCI mode honours `intr`: the line INTA# is routed to.
        assert_eq!(
            mode("vdev shmem intr ioapic:11"),
            (GuestShmMode::Pci, Some(11))
        );
        assert_eq!(
            mode("vdev shmem loc pci:0:4 intr 10"),
            (GuestShmMode::Pci, Some(10))
        );
    }

    /// Records every level the device drives.
    #[derive(Clone, Default)]
    struct Line(Arc<std::sync::Mutex<Vec<bool>>>);
    impl LevelInterrupt for Line {
        fn set_level(&mut self, asserted: bool) {
            self.0.lock().unwrap().push(asserted);
        }
    }
    impl Line {
        fn levels(&self) -> Vec<bool> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn pci_device(reg: &LocalRegionRegistry, vector: u32) -> GuestShmDevice {
        GuestShmDevice::new(
            GuestShmMode::Pci,
            vector,
            Box::new(reg.factory(VmPolicy::parse_qnx("vdev shmem").unwrap())),
            Box::new(BumpMapper(0xe000_0000)),
        )
        .unwrap()
    }

    fn pci_create(d: &mut GuestShmDevice, name: &str, pages: u32) -> u32 {
        let mut n = [0u8; 32];
        n[..name.len()].copy_from_slice(name.as_bytes());
        d.write_bar(0, 0x1c, &n);
        d.write_bar(0, 0x18, &pages.to_le_bytes());
        let mut b = [0u8; 4];
        d.read_bar(0, 0x14, &mut b);
        u32::from_le_bytes(b)
    }

    /// PCI mode's INTA# is level-triggered: asserted when a connection's status changes,
    /// held while the guest has not read it (however many more changes come), deasserted by
    /// the status read that leaves nothing pending; the status register's Interrupt Status bit
    /// shows it; INTx Disable is not implemented (QNX's ghstest writes 0xffff to the command
    /// register and still takes its interrupt).
    #[test]
    fn pci_inta_is_a_level_line() {
        let reg = LocalRegionRegistry::new(64);
        let mut a = pci_device(&reg, 11);
        let mut b = pci_device(&reg, 11);
        let line = Line::default();
        a.set_level_interrupt(Box::new(line.clone()));
        assert_eq!(line.levels(), [] as [bool; 0], "starts low, no call");
        assert_eq!(pci_create(&mut a, "lvl", 1), 0);
        assert!(
            !a.interrupt_level(),
            "attaching changes nothing for the attacher"
        );
        assert_eq!(pci_create(&mut b, "lvl", 1), 0);
        a.service_interrupt();
        assert_eq!(line.levels(), [true], "B attached");
        assert_ne!(a.read_config_register(1) & (1 << 19), 0, "Interrupt Status");
        // More changes while asserted: the line stays up, nothing more is driven.
        let ctl = 0xe000_0000;
        w32(&mut b, ctl + 8, 1);
        a.service_interrupt();
        assert_eq!(line.levels(), [] as [bool; 0]);
        // The guest reads status: nothing left pending, the line goes down.
        assert_eq!(r32(&mut a, ctl), 0x0003_0002);
        assert_eq!(line.levels(), [false]);
        assert_eq!(a.read_config_register(1) & (1 << 19), 0);
        a.service_interrupt();
        assert_eq!(
            line.levels(),
            [] as [bool; 0],
            "a serviced signal with no change"
        );
        // ghstest enables the device with 0xffff: no INTx Disable, the line still works.
        a.write_config_register(1, 0, &[0xff, 0xff]);
        assert_eq!(
            a.read_config_register(1) & 0xffff,
            0x7,
            "I/O, memory, bus master"
        );
        w32(&mut b, ctl + 8, 1);
        a.service_interrupt();
        assert_eq!(line.levels(), [true]);
        // A detach of the connection with the change drops the line too.
        w32(&mut a, ctl + 0xc, 1);
        assert_eq!(line.levels(), [false]);
    }

    /// PCI mode: the Interrupt Line register and the factory page's `vector` read the line
    /// the VMM routed INTA# to.
    #[test]
    fn pci_interrupt_line_register() {
        let reg = LocalRegionRegistry::new(64);
        let mut d = pci_device(&reg, 19);
        assert_eq!(d.read_config_register(15) & 0xff, 19);
        let mut b = [0u8; 4];
        d.read_bar(0, 0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b), 19);
        d.set_interrupt_line(10);
        assert_eq!(
            d.read_config_register(15) & 0xffff,
            0x010a,
            "pin INTA#, line 10"
        );
        let unroutable = pci_device(&reg, 300).read_config_register(15);
        assert_eq!(unroutable & 0xff, 0xff);
    }

    /// Widths: aligned 4-byte control accesses; an aligned 8-byte read at 0 is status then
    /// idx (clearing as a 4-byte read); other reads are 0 without clearing; 8-byte and narrow
    /// writes are ignored; factory `size`/`find` act on 4-byte writes only.
    #[test]
    fn access_widths() {
        let reg = LocalRegionRegistry::new(64);
        let mut a = device(&reg, "vdev shmem");
        let mut b = device(&reg, "vdev shmem");
        assert_eq!(create(&mut a, "w", 1), 0);
        assert_eq!(create(&mut b, "w", 1), 0);
        let ctl = 0xe000_0000;
        w32(&mut b, ctl + 8, 1);
        let read = |d: &mut GuestShmDevice, off: u64, len: usize| {
            let mut buf = [0u8; 8];
            assert!(d.mmio_read(ctl + off, &mut buf[..len]));
            u64::from_le_bytes(buf)
        };
        // Narrow, misaligned: 0, nothing cleared.
        for (off, len) in [(0, 1), (0, 2), (2, 2), (1, 4), (4, 8), (2, 8)] {
            assert_eq!(read(&mut a, off, len), 0, "{off} {len}");
        }
        assert_eq!(read(&mut a, 8, 8), 0, "write-only registers");
        assert_eq!(
            read(&mut a, 0, 8),
            0x0000_0000_0003_0002,
            "status, then idx 0"
        );
        assert_eq!(read(&mut a, 0, 4), 0x0003_0000, "the 8-byte read cleared");
        assert_eq!(
            read(&mut b, 0, 8),
            1 << 32 | 0x0003_0000,
            "idx 1 in the high half"
        );
        // An 8-byte write at notify/detach: ignored (B is not notified, A stays attached).
        assert!(a.mmio_write(ctl + 8, &u64::MAX.to_le_bytes()));
        assert!(a.claims(ctl));
        assert_eq!(read(&mut b, 0, 4), 0x0003_0000);
        // Narrow writes to notify: ignored.
        assert!(a.mmio_write(ctl + 8, &[2]));
        assert!(a.mmio_write(ctl + 8, &[2, 0]));
        assert_eq!(read(&mut b, 0, 4), 0x0003_0000);
        // Factory: size and find need exactly 4 bytes at their offsets.
        let f = 0x1b00_0000;
        let mut n = [0u8; 8];
        n[..2].copy_from_slice(b"w2");
        assert!(a.mmio_write(f + 0x1c, &n));
        assert!(
            a.mmio_write(f + 0x18, &1u64.to_le_bytes()),
            "spans size and name"
        );
        assert!(a.mmio_write(f + 0x18, &[1, 0]));
        assert!(a.mmio_write(f + 0x3c, &[1]));
        assert_eq!(a.connections(), 1, "no request was made");
        // The factory reads any width: signature as one 8-byte load or two 4-byte ones.
        let mut sig = [0u8; 8];
        assert!(a.mmio_read(f, &mut sig));
        assert_eq!(u64::from_le_bytes(sig), SIGNATURE);
        assert_eq!(r32(&mut a, f + 4), (SIGNATURE >> 32) as u32);
        assert_eq!(r32(&mut a, f + 0x40), 0, "beyond the struct");
    }

    /// `find` of a region this device already holds returns that connection (the one whose
    /// idx is the number written, else the lowest) and makes no new one: the other clients
    /// see no attach and get no interrupt. A `find` of a region it does not hold attaches.
    #[test]
    fn find_returns_a_held_connection_without_a_new_attach() {
        let reg = LocalRegionRegistry::new(64);
        let mut a = device(&reg, "vdev shmem");
        let mut b = device(&reg, "vdev shmem");
        assert_eq!(create(&mut b, "f", 1), 0);
        assert_eq!(create(&mut a, "f", 1), 0); // idx 1 at 0xe000_0000
        assert_eq!(create(&mut a, "f", 1), 0); // idx 2 at 0xe000_2000
        assert_eq!(
            drain_eventfd(b.interrupt_fd()).unwrap(),
            2,
            "two real attaches"
        );
        let f = 0x1b00_0000;
        let find = |d: &mut GuestShmDevice, number: u32| {
            w32(d, f + 0x3c, number);
            (r32(d, f + 0x14), r32(d, f + 8), r32(d, f + 0x18))
        };
        assert_eq!(find(&mut a, 2), (0, 0xe000_2000, 1), "idx 2 by number");
        assert_eq!(find(&mut a, 1), (0, 0xe000_0000, 1), "idx 1 by number");
        assert_eq!(find(&mut a, 7), (0, 0xe000_0000, 1), "no idx 7: the lowest");
        assert_eq!(a.connections(), 2);
        assert_eq!(
            drain_eventfd(b.interrupt_fd()).unwrap(),
            0,
            "no attach seen"
        );
        assert_eq!(reg.attached_mask("f"), 0b111);
        // A region A does not hold is attached by name: one real attach.
        let mut c = device(&reg, "vdev shmem");
        assert!(c.mmio_write(f + 0x1c, b"f\0\0\0"));
        assert_eq!(find(&mut c, 0).0, 0);
        assert_eq!(c.connections(), 1);
        assert_eq!(drain_eventfd(b.interrupt_fd()).unwrap(), 1);
        assert_eq!(reg.attached_mask("f"), 0b1111);
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
