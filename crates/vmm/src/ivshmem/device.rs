//! The ivshmem device state machine: config space, BAR0 registers, MSI-X, doorbells.

use std::os::fd::BorrowedFd;

use crate::ivshmem::link::{drain_eventfd, ring_eventfd, DoorbellLink, LinkError, PeerChange};
use crate::pci::config::{PciIdentity, CONFIG_REGISTERS};
use crate::pci::msix::{MsixCapability, MsixTrigger};
use crate::pci::{
    BarKind, BarRelocation, ConfigSpace, IoEvent, MsixMessage, MsixTable, PciBar, PciCapabilityId,
    PciDevice,
};

use ivshm_proto::ivshmem::{
    self as abi, doorbell_target, MSIX_BAR_SIZE, MSIX_PBA_OFFSET, REGISTERS_BAR_SIZE, REG_DOORBELL,
    REG_INTR_MASK, REG_INTR_STATUS, REG_IV_POSITION,
};

/// Most vectors the table can hold (one 4 KiB BAR: 0x800 / 16 bytes).
const MAX_VECTORS: usize = 128;

/// Errors building or restoring the device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum IvshmemError {
    /// shared memory size {0:#x} is not a power of two >= 4096
    ///
    /// Shared memory size must be a power of two (PCI BAR rule) of at least 4 KiB.
    BadSize(u64),
    /// vector count {0} out of range 1..={MAX_VECTORS:}
    ///
    /// Vector count out of range.
    BadVectors(usize),
    /// master must connect to the server before any peers (own id is {0})
    ///
    /// `master` with a server requires ID 0 (QEMU: "master must connect to the server
    /// before any peers").
    MasterNotFirst(u16),
    /// ivshmem peer devices are not migratable (master is off)
    ///
    /// Only the master migrates (non-masters carry a migration blocker in QEMU).
    NotMaster,
    /// {0}
    ///
    /// Building config space failed.
    Config(crate::pci::config::ConfigError),
    /// {0}
    ///
    /// The doorbell link failed.
    Link(LinkError),
}

impl From<crate::pci::config::ConfigError> for IvshmemError {
    fn from(error: crate::pci::config::ConfigError) -> Self {
        Self::Config(error)
    }
}

impl From<LinkError> for IvshmemError {
    fn from(error: LinkError) -> Self {
        Self::Link(error)
    }
}

/// Where the device's MSI-X interrupts go. KVM VMMs use
/// [`crate::ivshmem::kvm::KvmIrqfdInterrupts`]; others inject messages themselves.
pub trait InterruptBackend: Send {
    /// The message vector `vector` would send changed; `None` means masked or MSI-X
    /// disabled (an irqfd backend stops consuming the vector's eventfd then).
    fn vector_route_changed(&mut self, vector: usize, message: Option<MsixMessage>);
    /// Deliver `message` for `vector` now.
    fn inject(&mut self, vector: usize, message: MsixMessage);
    /// True when the backend holds an undelivered event for `vector` (reflected in the PBA).
    fn is_pending(&self, _vector: usize) -> bool {
        false
    }
}

/// Migration state as QEMU's vmstate has it: PCI config (with MSI-X for the doorbell
/// variant), `intrstatus`, `intrmask`. The shared memory itself is migrated by the
/// master only, as RAM; the doorbell peers' eventfds are not state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IvshmemState {
    /// Config-space registers.
    pub config: [u32; CONFIG_REGISTERS],
    /// MSI-X table, PBA and control (doorbell variant).
    pub msix: Option<MsixTable>,
    /// IntrStatus.
    pub intr_status: u32,
    /// IntrMask.
    pub intr_mask: u32,
}

/// An ivshmem PCI function.
pub struct IvshmemDevice {
    config: ConfigSpace,
    /// Offset of the MSI-X capability (doorbell variant).
    msix_cap: Option<usize>,
    msix: MsixTable,
    last_msix_control: u16,
    intr_mask: u32,
    intr_status: u32,
    shm_size: u64,
    master: bool,
    link: Option<Box<dyn DoorbellLink>>,
    interrupts: Option<Box<dyn InterruptBackend>>,
    trapped_doorbells: u64,
}

impl std::fmt::Debug for IvshmemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvshmemDevice")
            .field("shm_size", &self.shm_size)
            .field("vectors", &self.msix.len())
            .field("iv_position", &self.iv_position())
            .finish_non_exhaustive()
    }
}

fn identity() -> PciIdentity {
    PciIdentity {
        vendor_id: abi::VENDOR_ID,
        device_id: abi::DEVICE_ID,
        revision: abi::REVISION,
        class: abi::CLASS,
        subclass: abi::SUBCLASS,
        prog_if: 0,
        subsystem_vendor_id: abi::SUBSYSTEM_VENDOR_ID,
        subsystem_id: abi::SUBSYSTEM_ID,
        interrupt_pin: 0,
    }
}

/// QEMU's `master=on|off|auto` property: which device owns the region's contents for
/// migration. `bool` converts to `On`/`Off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Master {
    /// Not the master: the device cannot be migrated (QEMU adds a migration blocker).
    #[default]
    Off,
    /// The master: migrates the region; with a server it must be the first peer (id 0).
    On,
    /// The master exactly when its id is 0 (always true for `ivshmem-plain`, whose
    /// IVPosition is 0).
    Auto,
}

impl From<bool> for Master {
    fn from(on: bool) -> Master {
        if on {
            Master::On
        } else {
            Master::Off
        }
    }
}

impl IvshmemDevice {
    fn common(shm_size: u64, master: bool) -> Result<IvshmemDevice, IvshmemError> {
        if !shm_size.is_power_of_two() || shm_size < 4096 {
            return Err(IvshmemError::BadSize(shm_size));
        }
        let mut config = ConfigSpace::new(identity());
        // QEMU resets the command register to I/O + memory decoding.
        config.write_register(1, 0, &[0x03, 0x00]);
        config.add_bar(PciBar {
            index: 0,
            addr: 0,
            size: REGISTERS_BAR_SIZE,
            kind: BarKind::Mem32,
            prefetchable: false,
        })?;
        config.add_bar(PciBar {
            index: 2,
            addr: 0,
            size: shm_size,
            kind: BarKind::Mem64,
            prefetchable: true,
        })?;
        Ok(IvshmemDevice {
            config,
            msix_cap: None,
            msix: MsixTable::new(0),
            last_msix_control: 0,
            intr_mask: 0,
            intr_status: 0,
            shm_size,
            master,
            link: None,
            interrupts: None,
            trapped_doorbells: 0,
        })
    }

    /// `ivshmem-plain`: shared memory of `shm_size` bytes, IVPosition 0, no interrupts.
    pub fn new_plain(
        shm_size: u64,
        master: impl Into<Master>,
    ) -> Result<IvshmemDevice, IvshmemError> {
        IvshmemDevice::common(shm_size, master.into() != Master::Off)
    }

    /// `ivshmem-doorbell` with `vectors` MSI-X vectors, joined to peers through `link`.
    /// Own vectors beyond `vectors` are ignored, like QEMU's "Too many eventfd received".
    pub fn new_doorbell(
        shm_size: u64,
        vectors: usize,
        link: Box<dyn DoorbellLink>,
        master: impl Into<Master>,
    ) -> Result<IvshmemDevice, IvshmemError> {
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(IvshmemError::BadVectors(vectors));
        }
        let master = match master.into() {
            Master::Off => false,
            Master::Auto => link.own_id() == 0,
            Master::On if link.own_id() != 0 => {
                return Err(IvshmemError::MasterNotFirst(link.own_id()))
            }
            Master::On => true,
        };
        let mut dev = IvshmemDevice::common(shm_size, master)?;
        dev.config.add_bar(PciBar {
            index: 1,
            addr: 0,
            size: MSIX_BAR_SIZE,
            kind: BarKind::Mem32,
            prefetchable: false,
        })?;
        let cap = MsixCapability {
            table_size: vectors as u16,
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: MSIX_PBA_OFFSET as u32,
        };
        let (body, writable) = cap.body();
        dev.msix_cap = Some(
            dev.config
                .add_capability(PciCapabilityId::MsiX, &body, &writable)?,
        );
        dev.msix = MsixTable::new(vectors);
        dev.link = Some(link);
        Ok(dev)
    }

    /// Sets where MSI-X messages go (doorbell variant).
    pub fn set_interrupt_backend(&mut self, backend: Box<dyn InterruptBackend>) {
        self.interrupts = Some(backend);
        for v in 0..self.msix.len() {
            self.route_changed(v);
        }
    }

    /// Programs a BAR as firmware does before the guest runs.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        self.config.set_bar_addr(index, addr);
    }

    /// Shared memory size (BAR2 size).
    pub fn shm_size(&self) -> u64 {
        self.shm_size
    }

    /// Number of MSI-X vectors (0 for the plain variant).
    pub fn vectors(&self) -> usize {
        self.msix.len()
    }

    /// What the guest reads from IVPosition: the own peer ID, or 0 without a server.
    pub fn iv_position(&self) -> u32 {
        self.link.as_ref().map_or(0, |l| u32::from(l.own_id()))
    }

    /// Whether this device is the migration master.
    pub fn is_master(&self) -> bool {
        self.master
    }

    /// Doorbell writes that reached the device (the register-callback path). On the KVM
    /// fast path this stays 0 because the writes complete in the kernel.
    pub fn trapped_doorbells(&self) -> u64 {
        self.trapped_doorbells
    }

    /// The doorbell link (doorbell variant).
    pub fn link(&self) -> Option<&dyn DoorbellLink> {
        self.link.as_deref()
    }

    /// Eventfd of own vector `vector` (signalled when a peer rings us).
    pub fn own_vector_fd(&self, vector: usize) -> Option<BorrowedFd<'_>> {
        if vector >= self.msix.len() {
            return None;
        }
        self.link.as_ref()?.own_vector_fd(vector)
    }

    /// Register-callback receive path: the VMM saw own vector `vector`'s eventfd become
    /// readable. Consumes it and raises the vector (or marks it pending when masked).
    pub fn vector_fired(&mut self, vector: usize) {
        if let Some(fd) = self.own_vector_fd(vector) {
            match drain_eventfd(fd) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(vector, error = %e, "ivshmem: reading own vector eventfd failed");
                    return;
                }
            }
        }
        self.raise(vector);
    }

    fn raise(&mut self, vector: usize) {
        match self.msix.trigger(vector) {
            MsixTrigger::Deliver(m) => {
                if let Some(b) = self.interrupts.as_mut() {
                    b.inject(vector, m);
                }
            }
            MsixTrigger::Pending => tracing::trace!(vector, "ivshmem: vector masked, pending"),
            MsixTrigger::Dropped => tracing::debug!(vector, "ivshmem: MSI-X disabled, dropped"),
        }
    }

    /// Applies peer joins/leaves from the link. After a non-empty result a KVM VMM must
    /// re-sync the device's ioevents (see [`crate::ivshmem::kvm::KvmIoeventRegistry`]).
    pub fn process_link_events(&mut self) -> Result<Vec<PeerChange>, IvshmemError> {
        match self.link.as_mut() {
            Some(l) => Ok(l.process_events()?),
            None => Ok(Vec::new()),
        }
    }

    /// Saves migration state. Fails unless this device is the master.
    pub fn save_state(&self) -> Result<IvshmemState, IvshmemError> {
        if !self.master {
            return Err(IvshmemError::NotMaster);
        }
        Ok(IvshmemState {
            config: self.config.registers(),
            msix: self.msix_cap.map(|_| self.msix.clone()),
            intr_status: self.intr_status,
            intr_mask: self.intr_mask,
        })
    }

    /// Restores migration state into a device built with the same options.
    pub fn restore_state(&mut self, state: &IvshmemState) -> Result<(), IvshmemError> {
        if !self.master {
            return Err(IvshmemError::NotMaster);
        }
        self.config.restore_registers(&state.config);
        if let (Some(_), Some(m)) = (self.msix_cap, state.msix.as_ref()) {
            if m.len() == self.msix.len() {
                self.msix = m.clone();
            }
        }
        self.last_msix_control = self.msix_control();
        self.intr_status = state.intr_status;
        self.intr_mask = state.intr_mask;
        for v in 0..self.msix.len() {
            self.route_changed(v);
        }
        Ok(())
    }

    fn msix_control(&self) -> u16 {
        self.msix_cap.map_or(0, |cap| self.config.read_u16(cap + 2))
    }

    fn route_changed(&mut self, vector: usize) {
        let message = self.msix.deliverable_message(vector);
        if let Some(b) = self.interrupts.as_mut() {
            b.vector_route_changed(vector, message);
        }
    }

    fn deliver_flushed(&mut self, flushed: Vec<(usize, MsixMessage)>) {
        if let Some(b) = self.interrupts.as_mut() {
            for (v, m) in flushed {
                b.inject(v, m);
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_INTR_MASK => self.intr_mask,
            REG_INTR_STATUS => std::mem::take(&mut self.intr_status),
            REG_IV_POSITION => self.iv_position(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_INTR_MASK => self.intr_mask = value,
            REG_INTR_STATUS => self.intr_status = value,
            REG_DOORBELL => self.ring_doorbell(value),
            _ => {}
        }
    }

    fn ring_doorbell(&mut self, value: u32) {
        self.trapped_doorbells += 1;
        let (peer, vector) = doorbell_target(value);
        let vector = usize::from(vector);
        let Some(link) = self.link.as_ref() else {
            return;
        };
        // The link gives the own vectors for the own ID (its contract); those beyond the
        // device's MSI-X table are not the guest's to ring.
        let fd = if peer == link.own_id() && vector >= self.msix.len() {
            None
        } else {
            link.peer_vector_fd(peer, vector)
        };
        match fd {
            Some(fd) => {
                if let Err(e) = ring_eventfd(fd) {
                    tracing::warn!(peer, vector, error = %e, "ivshmem: ringing doorbell failed");
                }
            }
            None => tracing::debug!(
                peer,
                vector,
                "ivshmem: doorbell to unknown peer/vector ignored"
            ),
        }
    }

    /// The doorbell ioevents: one per (peer, vector) with a known eventfd, including our
    /// own vectors (a guest may ring itself), at BAR0 + 12 with a 4-byte datamatch of
    /// `peer << 16 | vector`. Empty while BAR0 is unassigned.
    pub fn doorbell_ioevents(&self) -> Vec<IoEvent<'_>> {
        let bar0 = self.config.bar_addr(0);
        let Some(link) = self.link.as_ref() else {
            return Vec::new();
        };
        if bar0 == 0 {
            return Vec::new();
        }
        let own = link.own_id();
        let mut out = Vec::new();
        let mut ids = link.peer_ids();
        ids.push(own);
        for peer in ids {
            for vector in 0..self.msix.len() {
                if let Some(fd) = link.peer_vector_fd(peer, vector) {
                    out.push(IoEvent {
                        addr: bar0 + REG_DOORBELL,
                        len: 4,
                        datamatch: u64::from(abi::doorbell_value(peer, vector as u16)),
                        fd,
                    });
                }
            }
        }
        out
    }
}

fn le_u32(data: &[u8]) -> Option<u32> {
    let b: [u8; 4] = data.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

impl PciDevice for IvshmemDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_register(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarRelocation> {
        let relocation = self.config.write_register(reg_idx, offset, data);
        let control = self.msix_control();
        if control != self.last_msix_control {
            self.last_msix_control = control;
            let flushed = self.msix.set_control(control);
            for v in 0..self.msix.len() {
                self.route_changed(v);
            }
            self.deliver_flushed(flushed);
        }
        relocation
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            0 => {
                let v = if data.len() == 4 && offset % 4 == 0 {
                    self.read_register(offset)
                } else {
                    0
                };
                let bytes = v.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
                data[n..].fill(0);
            }
            1 if self.msix_cap.is_some() => {
                if offset < MSIX_PBA_OFFSET {
                    self.msix.read_table(offset, data);
                } else {
                    let mut table = self.msix.clone();
                    if let Some(b) = self.interrupts.as_ref() {
                        for v in 0..table.len() {
                            if b.is_pending(v) {
                                table.set_pending(v, true);
                            }
                        }
                    }
                    table.read_pba(offset - MSIX_PBA_OFFSET, data);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            0 => {
                if offset % 4 != 0 {
                    return;
                }
                if let Some(v) = le_u32(data) {
                    self.write_register(offset, v);
                }
            }
            1 if self.msix_cap.is_some() && offset < MSIX_PBA_OFFSET => {
                let (changed, flushed) = self.msix.write_table(offset, data);
                if let Some(v) = changed {
                    self.route_changed(v);
                }
                self.deliver_flushed(flushed);
            }
            _ => {}
        }
    }

    fn ioevents(&self) -> Vec<IoEvent<'_>> {
        self.doorbell_ioevents()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ivshmem::link::LocalDoorbellBus;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<(usize, MsixMessage)>>>);
    impl InterruptBackend for Recorder {
        fn vector_route_changed(&mut self, _: usize, _: Option<MsixMessage>) {}
        fn inject(&mut self, v: usize, m: MsixMessage) {
            self.0.lock().unwrap().push((v, m));
        }
    }

    fn read32(d: &mut IvshmemDevice, bar: usize, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read_bar(bar, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn plain_config_space() {
        let mut d = IvshmemDevice::new_plain(1 << 20, false).unwrap();
        assert_eq!(d.read_config_register(0), 0x1110_1af4);
        assert_eq!(d.read_config_register(2), 0x0500_0001);
        assert_eq!(d.read_config_register(15) >> 8 & 0xff, 0, "interrupt pin 0");
        assert_eq!(d.read_config_register(1) & 0x10_0000, 0, "no capabilities");
        // BAR1 absent, BAR2 64-bit prefetchable of the region's size.
        d.write_config_register(5, 0, &[0xff; 4]);
        assert_eq!(d.read_config_register(5), 0);
        d.write_config_register(6, 0, &[0xff; 4]);
        assert_eq!(d.read_config_register(6), 0xfff0_000c);
        assert_eq!(read32(&mut d, 0, REG_IV_POSITION), 0);
    }

    /// The doorbell variant's header as a guest of QEMU's `ivshmem-doorbell,vectors=3`
    /// reads it: identity, command I/O+memory, capability list with MSI-X at 0x40 (table
    /// and PBA in BAR1 at 0 and 0x800), BAR0 32-bit 256 bytes, BAR1 32-bit 4 KiB, BAR2
    /// 64-bit prefetchable, interrupt pin 0.
    #[test]
    fn doorbell_config_space() {
        let bus = LocalDoorbellBus::new();
        let mut d =
            IvshmemDevice::new_doorbell(1 << 20, 3, Box::new(bus.join(3).unwrap()), false).unwrap();
        assert_eq!(d.read_config_register(0), 0x1110_1af4);
        assert_eq!(
            d.read_config_register(1),
            0x0010_0003,
            "status: caps; command: I/O+mem"
        );
        assert_eq!(
            d.read_config_register(2),
            0x0500_0001,
            "class 0x0500, revision 1"
        );
        assert_eq!(d.read_config_register(11), 0x1100_1af4, "subsystem");
        assert_eq!(
            d.read_config_register(13) & 0xff,
            0x40,
            "capability pointer"
        );
        assert_eq!(d.read_config_register(15) >> 8 & 0xff, 0, "interrupt pin 0");
        // MSI-X: ID 0x11, last in the list, 3 entries, disabled; table BIR 1 offset 0, PBA
        // BIR 1 offset 0x800.
        assert_eq!(d.read_config_register(0x40 / 4), 0x0002_0011);
        assert_eq!(d.read_config_register(0x44 / 4), 0x0000_0001);
        assert_eq!(d.read_config_register(0x48 / 4), 0x0000_0801);
        // Size probes: BAR0 256 bytes, BAR1 4 KiB (both 32-bit memory, not prefetchable),
        // BAR2 1 MiB 64-bit prefetchable, BAR4/5 absent.
        for reg in 4..10 {
            d.write_config_register(reg, 0, &[0xff; 4]);
        }
        let probed: Vec<u32> = (4..10).map(|r| d.read_config_register(r)).collect();
        assert_eq!(
            probed,
            vec![0xffff_ff00, 0xffff_f000, 0xfff0_000c, 0xffff_ffff, 0, 0]
        );
        // Only MSI-X enable and function mask are writable in message control.
        d.write_config_register(0x40 / 4, 2, &0xffffu16.to_le_bytes());
        assert_eq!(d.read_config_register(0x40 / 4) >> 16, 0xc002);
        // IVPosition is the link's id; reserved BAR1 space past the PBA reads 0.
        assert_eq!(read32(&mut d, 0, REG_IV_POSITION), 0);
        assert_eq!(read32(&mut d, 1, 0xff0), 0);
    }

    #[test]
    fn registers_semantics() {
        let mut d = IvshmemDevice::new_plain(4096, false).unwrap();
        d.write_bar(0, REG_INTR_MASK, &0xabcdu32.to_le_bytes());
        assert_eq!(read32(&mut d, 0, REG_INTR_MASK), 0xabcd);
        d.write_bar(0, REG_INTR_STATUS, &1u32.to_le_bytes());
        assert_eq!(read32(&mut d, 0, REG_INTR_STATUS), 1);
        assert_eq!(read32(&mut d, 0, REG_INTR_STATUS), 0, "read clears");
        // 2-byte accesses are ignored / read 0.
        d.write_bar(0, REG_INTR_MASK, &[0, 0]);
        let mut b = [0xffu8; 2];
        d.read_bar(0, REG_INTR_MASK, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(read32(&mut d, 0, REG_INTR_MASK), 0xabcd);
        assert_eq!(read32(&mut d, 0, 0x40), 0, "reserved reads 0");
    }

    #[test]
    fn doorbell_rings_peer_and_interrupt_flows() {
        let bus = LocalDoorbellBus::new();
        let mut a =
            IvshmemDevice::new_doorbell(4096, 2, Box::new(bus.join(2).unwrap()), true).unwrap();
        let mut b =
            IvshmemDevice::new_doorbell(4096, 2, Box::new(bus.join(2).unwrap()), false).unwrap();
        a.process_link_events().unwrap();
        assert_eq!(read32(&mut b, 0, REG_IV_POSITION), 1);
        let rec = Recorder::default();
        b.set_interrupt_backend(Box::new(rec.clone()));
        // Guest B: program vector 1, unmask, enable MSI-X.
        b.write_bar(1, 16, &0xfee0_0000u32.to_le_bytes());
        b.write_bar(1, 24, &0x45u32.to_le_bytes());
        b.write_bar(1, 28, &0u32.to_le_bytes());
        let cap = b.msix_cap.unwrap();
        b.write_config_register(cap / 4, 2, &0x8000u16.to_le_bytes());
        // Guest A rings B vector 1.
        a.write_bar(0, REG_DOORBELL, &((1u32 << 16) | 1).to_le_bytes());
        assert_eq!(a.trapped_doorbells(), 1);
        b.vector_fired(1);
        b.vector_fired(0);
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[(
                1,
                MsixMessage {
                    addr: 0xfee0_0000,
                    data: 0x45
                }
            )]
        );
        // Doorbell decode: bits 31..16 peer, 15..0 vector (the spec's 16 bits, not QEMU's
        // trapped-path `val & 0xff`): 0x101 is vector 257, which B does not have, so nothing
        // rings; neither does an unknown peer.
        a.write_bar(0, REG_DOORBELL, &((1u32 << 16) | 0x101).to_le_bytes());
        a.write_bar(0, REG_DOORBELL, &(7u32 << 16).to_le_bytes());
        for v in 0..2 {
            assert_eq!(drain_eventfd(b.own_vector_fd(v).unwrap()).unwrap(), 0);
        }
        assert_eq!(a.trapped_doorbells(), 3);
        // Masked: goes to the PBA, delivered on unmask.
        b.write_bar(1, 28, &1u32.to_le_bytes());
        a.write_bar(0, REG_DOORBELL, &((1u32 << 16) | 1).to_le_bytes());
        b.vector_fired(1);
        assert_eq!(read32(&mut b, 1, MSIX_PBA_OFFSET), 0b10);
        b.write_bar(1, 28, &0u32.to_le_bytes());
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        assert_eq!(read32(&mut b, 1, MSIX_PBA_OFFSET), 0);
    }

    #[test]
    fn ioevents_cover_every_peer_vector() {
        let bus = LocalDoorbellBus::new();
        let _other = bus.join(2).unwrap();
        let mut d =
            IvshmemDevice::new_doorbell(4096, 2, Box::new(bus.join(2).unwrap()), false).unwrap();
        assert!(d.ioevents().is_empty(), "BAR0 unassigned");
        d.set_bar_addr(0, 0xc000_0000);
        let mut got: Vec<(u64, u64)> = d.ioevents().iter().map(|e| (e.addr, e.datamatch)).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (0xc000_000c, 0),
                (0xc000_000c, 1),
                (0xc000_000c, 0x10000),
                (0xc000_000c, 0x10001)
            ]
        );
    }

    #[test]
    fn master_rules_and_state_round_trip() {
        let bus = LocalDoorbellBus::new();
        let _first = bus.join(1).unwrap();
        assert!(matches!(
            IvshmemDevice::new_doorbell(4096, 1, Box::new(bus.join(1).unwrap()), true),
            Err(IvshmemError::MasterNotFirst(1))
        ));
        // master=auto: the master exactly when the server gave it id 0.
        let auto_second =
            IvshmemDevice::new_doorbell(4096, 1, Box::new(bus.join(1).unwrap()), Master::Auto)
                .unwrap();
        assert!(!auto_second.is_master());
        let empty = LocalDoorbellBus::new();
        let auto_first =
            IvshmemDevice::new_doorbell(4096, 1, Box::new(empty.join(1).unwrap()), Master::Auto)
                .unwrap();
        assert!(auto_first.is_master());
        assert!(IvshmemDevice::new_plain(4096, Master::Auto)
            .unwrap()
            .is_master());
        let peer = IvshmemDevice::new_plain(4096, false).unwrap();
        assert!(matches!(peer.save_state(), Err(IvshmemError::NotMaster)));
        let mut m = IvshmemDevice::new_plain(4096, true).unwrap();
        m.set_bar_addr(2, 0x1_0000_0000);
        m.write_bar(0, REG_INTR_MASK, &7u32.to_le_bytes());
        m.write_bar(0, REG_INTR_STATUS, &1u32.to_le_bytes());
        let s = m.save_state().unwrap();
        let mut n = IvshmemDevice::new_plain(4096, true).unwrap();
        n.restore_state(&s).unwrap();
        assert_eq!(n.save_state().unwrap(), s);
        assert_eq!(
            n.bars().iter().find(|b| b.index == 2).unwrap().addr,
            0x1_0000_0000
        );
    }

    /// The doorbell variant migrates its MSI-X table, pending bits and enable state with the
    /// config space; the restored device delivers to the migrated message.
    #[test]
    fn doorbell_state_carries_msix() {
        let bus = LocalDoorbellBus::new();
        let mut m =
            IvshmemDevice::new_doorbell(4096, 2, Box::new(bus.join(2).unwrap()), true).unwrap();
        m.set_bar_addr(1, 0xc000_1000);
        m.write_bar(1, 16, &0xfee0_0000u32.to_le_bytes());
        m.write_bar(1, 24, &0x51u32.to_le_bytes());
        let cap = m.msix_cap.unwrap();
        m.write_config_register(cap / 4, 2, &0x8000u16.to_le_bytes());
        ring_eventfd(m.own_vector_fd(1).unwrap()).unwrap();
        m.vector_fired(1); // masked: pending
        assert_eq!(read32(&mut m, 1, MSIX_PBA_OFFSET), 0b10);
        let state = m.save_state().unwrap();

        let target_bus = LocalDoorbellBus::new();
        let mut n =
            IvshmemDevice::new_doorbell(4096, 2, Box::new(target_bus.join(2).unwrap()), true)
                .unwrap();
        let rec = Recorder::default();
        n.set_interrupt_backend(Box::new(rec.clone()));
        n.restore_state(&state).unwrap();
        assert_eq!(n.save_state().unwrap(), state);
        assert_eq!(read32(&mut n, 1, 24), 0x51);
        assert_eq!(read32(&mut n, 1, MSIX_PBA_OFFSET), 0b10);
        assert_eq!(
            n.bars().iter().find(|b| b.index == 1).unwrap().addr,
            0xc000_1000
        );
        // Unmasking vector 1 on the destination delivers the migrated pending interrupt.
        n.write_bar(1, 28, &0u32.to_le_bytes());
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[(
                1,
                MsixMessage {
                    addr: 0xfee0_0000,
                    data: 0x51
                }
            )]
        );
    }

    proptest::proptest! {
        /// Any guest access sequence (config, BAR0, BAR1; any width and offset) is handled
        /// without panicking, and the read-only identity and IVPosition never change.
        #[test]
        fn arbitrary_guest_accesses(ops in proptest::collection::vec(
            (0u8..3, 0u64..0x1000, proptest::prelude::any::<u64>(), proptest::sample::select(vec![1usize, 2, 4, 8]), proptest::prelude::any::<bool>()),
            0..200,
        )) {
            let bus = LocalDoorbellBus::new();
            let mut d = IvshmemDevice::new_doorbell(4096, 4, Box::new(bus.join(4).unwrap()), false)
                .unwrap();
            d.set_interrupt_backend(Box::new(Recorder::default()));
            for (target, offset, value, len, write) in ops {
                let bytes = value.to_le_bytes();
                match (target, write) {
                    (0, true) => {
                        let reg = (offset as usize / 4) % 64;
                        d.write_config_register(reg, offset % 4, &bytes[..len.min(4)]);
                    }
                    (0, false) => {
                        d.read_config_register((offset as usize / 4) % 64);
                    }
                    (bar, true) => d.write_bar(bar as usize - 1, offset, &bytes[..len]),
                    (bar, false) => {
                        let mut buf = [0u8; 8];
                        d.read_bar(bar as usize - 1, offset, &mut buf[..len]);
                    }
                }
            }
            proptest::prop_assert_eq!(d.read_config_register(0), 0x1110_1af4);
            proptest::prop_assert_eq!(d.read_config_register(2), 0x0500_0001);
            proptest::prop_assert_eq!(read32(&mut d, 0, REG_IV_POSITION), 0);
        }
    }

    #[test]
    fn bad_sizes_rejected() {
        assert!(matches!(
            IvshmemDevice::new_plain(3 << 20, false),
            Err(IvshmemError::BadSize(_))
        ));
    }
}
