//! A type-0 PCI configuration space: identity registers, BARs with the size-probe
//! protocol, a command register, and a capability list.

use super::{BarKind, PciBar};

/// Number of 32-bit registers in the (conventional, 256-byte) config space.
pub const CONFIG_REGISTERS: usize = 64;
/// Register index of BAR0.
pub const BAR0_REG: usize = 4;
/// Number of BAR registers in a type-0 header.
pub const BAR_COUNT: usize = 6;
/// Byte offset of the first capability.
pub const FIRST_CAPABILITY_OFFSET: usize = 0x40;
/// Command register bit: I/O space decoding enabled.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register bit: memory space decoding enabled.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register bit: bus master enabled.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register bit: INTx emulation disabled (the function must not assert INTx#).
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register bit (of the register's upper half): the function's INTx# is asserted
/// internally (shown whatever [`COMMAND_INTX_DISABLE`] says).
const STATUS_INTERRUPT: u32 = 1 << 3;
/// Byte offset of the Interrupt Line register.
pub const INTERRUPT_LINE_OFFSET: usize = 0x3c;
/// Status register bit: capability list present.
const STATUS_CAPABILITY_LIST: u32 = 1 << 4;
/// Command bits a guest may change: I/O, memory, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0b0000_0100_0000_0111;

/// PCI capability IDs used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PciCapabilityId {
    /// MSI-X (0x11).
    MsiX = 0x11,
    /// Vendor specific (0x09).
    VendorSpecific = 0x09,
}

/// A BAR moved by a guest config write: the VMM must move its mappings and ioevents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRelocation {
    /// BAR index.
    pub index: usize,
    /// Address before the write.
    pub old_addr: u64,
    /// Address after the write.
    pub new_addr: u64,
    /// BAR size.
    pub size: u64,
}

/// Identity of a PCI function, written once into the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code (base class).
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0 none, 1 INTA#, ...).
    pub interrupt_pin: u8,
}

/// Errors building a config space.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
#[ignore_extra_doc_attributes]
pub enum ConfigError {
    /// BAR {0} is not available
    ///
    /// BAR index out of range or overlapping a 64-bit BAR's upper half.
    BarUnavailable(usize),
    /// BAR size {0:#x} is not a power of two of at least 16 bytes
    ///
    /// BAR size is not a power of two or too small.
    BadBarSize(u64),
    /// capability of {0} bytes does not fit in config space
    ///
    /// Capabilities do not fit in the 256-byte config space.
    CapabilityTooLarge(usize),
}

#[derive(Debug, Clone, Copy)]
struct BarSlot {
    bar: PciBar,
    /// Address the VMM last decoded (reported relocations relative to this).
    decoded_addr: u64,
}

/// A type-0 configuration space with write masks.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    registers: [u32; CONFIG_REGISTERS],
    writable: [u32; CONFIG_REGISTERS],
    bars: [Option<BarSlot>; BAR_COUNT],
    /// Offset where the next capability goes.
    next_capability: usize,
    /// Offset of the "next" byte of the last capability (0x34 for the header pointer).
    last_capability_link: usize,
}

impl ConfigSpace {
    /// A header with the given identity, no BARs and no capabilities.
    pub fn new(identity: PciIdentity) -> ConfigSpace {
        let mut registers = [0u32; CONFIG_REGISTERS];
        let mut writable = [0u32; CONFIG_REGISTERS];
        registers[0] = u32::from(identity.vendor_id) | (u32::from(identity.device_id) << 16);
        writable[1] = COMMAND_WRITABLE;
        registers[2] = u32::from(identity.revision)
            | (u32::from(identity.prog_if) << 8)
            | (u32::from(identity.subclass) << 16)
            | (u32::from(identity.class) << 24);
        // Header type 0, single function; cache line size writable.
        writable[3] = 0xff;
        registers[11] =
            u32::from(identity.subsystem_vendor_id) | (u32::from(identity.subsystem_id) << 16);
        registers[15] = u32::from(identity.interrupt_pin) << 8;
        // Interrupt line is a scratch byte for the guest.
        writable[15] = 0xff;
        ConfigSpace {
            registers,
            writable,
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY_OFFSET,
            last_capability_link: 0x34,
        }
    }

    /// Declares a BAR. A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, bar: PciBar) -> Result<(), ConfigError> {
        let span = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        if bar.index + span > BAR_COUNT
            || (bar.index..bar.index + span).any(|i| self.bar_register_taken(i))
        {
            return Err(ConfigError::BarUnavailable(bar.index));
        }
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        if !bar.size.is_power_of_two() || bar.size < min {
            return Err(ConfigError::BadBarSize(bar.size));
        }
        let reg = BAR0_REG + bar.index;
        let type_bits = bar_type_bits(&bar);
        let low_mask = if bar.kind == BarKind::Io {
            !0x3u32
        } else {
            !0xfu32
        };
        self.writable[reg] = (!(bar.size - 1) as u32) & low_mask;
        self.registers[reg] = type_bits;
        if bar.kind == BarKind::Mem64 {
            self.writable[reg + 1] = (!(bar.size - 1) >> 32) as u32;
        }
        let mut slot = BarSlot {
            bar,
            decoded_addr: 0,
        };
        slot.bar.addr = 0;
        self.bars[bar.index] = Some(slot);
        self.set_bar_addr(bar.index, bar.addr);
        Ok(())
    }

    fn bar_register_taken(&self, reg: usize) -> bool {
        self.bars[reg].is_some()
            || (reg > 0 && matches!(self.bars[reg - 1], Some(s) if s.bar.kind == BarKind::Mem64))
    }

    /// Programs BAR `index` to `addr` as firmware would (no relocation reported).
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        let Some(slot) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let reg = BAR0_REG + index;
        let type_bits = bar_type_bits(&slot.bar);
        self.registers[reg] = ((addr as u32) & self.writable[reg]) | type_bits;
        if slot.bar.kind == BarKind::Mem64 {
            self.registers[reg + 1] = ((addr >> 32) as u32) & self.writable[reg + 1];
        }
        let decoded = self.bar_addr_from_registers(index);
        if let Some(s) = self.bars[index].as_mut() {
            s.decoded_addr = decoded;
        }
    }

    fn bar_addr_from_registers(&self, index: usize) -> u64 {
        let Some(slot) = self.bars.get(index).copied().flatten() else {
            return 0;
        };
        let reg = BAR0_REG + index;
        let mut addr = u64::from(self.registers[reg] & self.writable[reg]);
        if slot.bar.kind == BarKind::Mem64 {
            addr |= u64::from(self.registers[reg + 1]) << 32;
        }
        addr
    }

    /// Current BARs (addresses as last decoded).
    pub fn bars(&self) -> Vec<PciBar> {
        self.bars
            .iter()
            .flatten()
            .map(|s| PciBar {
                addr: s.decoded_addr,
                ..s.bar
            })
            .collect()
    }

    /// Current address of BAR `index` (0 if absent).
    pub fn bar_addr(&self, index: usize) -> u64 {
        self.bars
            .get(index)
            .copied()
            .flatten()
            .map_or(0, |s| s.decoded_addr)
    }

    /// Appends a capability: `body` follows the 2-byte header (ID, next pointer);
    /// `writable` is a per-byte write mask of the same length. Returns its offset.
    pub fn add_capability(
        &mut self,
        id: PciCapabilityId,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let offset = self.next_capability;
        if offset + len > CONFIG_REGISTERS * 4 || writable.len() != body.len() {
            return Err(ConfigError::CapabilityTooLarge(len));
        }
        self.set_byte(offset, id as u8);
        self.set_byte(offset + 1, 0);
        for (i, (&b, &w)) in body.iter().zip(writable).enumerate() {
            self.set_byte(offset + 2 + i, b);
            self.set_writable_byte(offset + 2 + i, w);
        }
        self.set_byte(self.last_capability_link, offset as u8);
        self.last_capability_link = offset + 1;
        self.next_capability = (offset + len + 3) & !3;
        self.registers[1] |= STATUS_CAPABILITY_LIST << 16;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.registers[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.writable[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(mask) << shift);
    }

    /// Reads a byte at a config offset.
    pub fn read_byte(&self, offset: usize) -> u8 {
        self.registers
            .get(offset / 4)
            .map_or(0xff, |r| (r >> ((offset % 4) * 8)) as u8)
    }

    /// Reads a 16-bit value at a config offset (must not cross a register).
    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from(self.read_byte(offset)) | (u16::from(self.read_byte(offset + 1)) << 8)
    }

    /// Reads register `reg_idx`; out of range reads all ones.
    pub fn read_register(&self, reg_idx: usize) -> u32 {
        self.registers.get(reg_idx).copied().unwrap_or(0xffff_ffff)
    }

    /// All registers (for saving device state).
    pub fn registers(&self) -> [u32; CONFIG_REGISTERS] {
        self.registers
    }

    /// Restores registers saved by [`ConfigSpace::registers`] into a space built with the
    /// same layout; BAR addresses are re-decoded (no relocation is reported).
    pub fn restore_registers(&mut self, registers: &[u32; CONFIG_REGISTERS]) {
        for (i, &v) in registers.iter().enumerate() {
            let ro = !self.writable[i];
            self.registers[i] = (self.registers[i] & ro) | (v & self.writable[i]);
        }
        for index in 0..BAR_COUNT {
            let decoded = self.bar_addr_from_registers(index);
            if let Some(s) = self.bars[index].as_mut() {
                s.decoded_addr = decoded;
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.registers[1] as u16
    }

    /// Limits the command register bits a guest can set to `mask` (within the I/O, memory, bus
    /// master and INTx Disable bits a function may implement), e.g. for a function that does
    /// not implement INTx Disable.
    pub fn set_command_writable(&mut self, mask: u16) {
        self.writable[1] = (self.writable[1] & !0xffff) | (u32::from(mask) & COMMAND_WRITABLE);
        self.registers[1] &= !0xffff | self.writable[1];
    }

    /// Whether the guest disabled INTx (command register bit 10).
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// Shows the function's internal INTx state in the status register (bit 3, Interrupt
    /// Status).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let bit = STATUS_INTERRUPT << 16;
        if asserted {
            self.registers[1] |= bit;
        } else {
            self.registers[1] &= !bit;
        }
    }

    /// The Interrupt Line register (0x3C): which interrupt-controller input INTx# is routed to,
    /// as firmware writes it for the guest driver to read (the guest may overwrite it; it has
    /// no effect on the device).
    pub fn interrupt_line(&self) -> u8 {
        self.read_byte(INTERRUPT_LINE_OFFSET)
    }

    /// Writes the Interrupt Line register, as firmware does once it has routed INTx#.
    pub fn set_interrupt_line(&mut self, line: u8) {
        let reg = &mut self.registers[INTERRUPT_LINE_OFFSET / 4];
        *reg = (*reg & !0xff) | u32::from(line);
    }

    /// Applies a guest write of 1, 2 or 4 bytes at `offset` inside register `reg_idx`,
    /// honouring write masks. Returns the BAR relocation the write caused, if any;
    /// size probes (all-ones writes) never report one.
    pub fn write_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarRelocation> {
        let offset = offset as usize;
        if reg_idx >= CONFIG_REGISTERS
            || !matches!(data.len(), 1 | 2 | 4)
            || offset + data.len() > 4
        {
            return None;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, &b) in data.iter().enumerate() {
            value |= u32::from(b) << ((offset + i) * 8);
            mask |= 0xff << ((offset + i) * 8);
        }
        let writable = self.writable[reg_idx] & mask;
        let reg = &mut self.registers[reg_idx];
        *reg = (*reg & !writable) | (value & writable);

        let probe = data.iter().all(|&b| b == 0xff);
        let bar_index = self.bar_index_for_register(reg_idx)?;
        if probe {
            return None;
        }
        let new_addr = self.bar_addr_from_registers(bar_index);
        let slot = self.bars[bar_index].as_mut()?;
        if new_addr == slot.decoded_addr {
            return None;
        }
        let relocation = BarRelocation {
            index: bar_index,
            old_addr: slot.decoded_addr,
            new_addr,
            size: slot.bar.size,
        };
        slot.decoded_addr = new_addr;
        Some(relocation)
    }

    fn bar_index_for_register(&self, reg_idx: usize) -> Option<usize> {
        let i = reg_idx.checked_sub(BAR0_REG)?;
        if i >= BAR_COUNT {
            return None;
        }
        if self.bars[i].is_some() {
            return Some(i);
        }
        match self.bars.get(i.wrapping_sub(1)).copied().flatten() {
            Some(s) if s.bar.kind == BarKind::Mem64 => Some(i - 1),
            _ => None,
        }
    }
}

fn bar_type_bits(bar: &PciBar) -> u32 {
    match bar.kind {
        BarKind::Io => 0x1,
        BarKind::Mem32 => u32::from(bar.prefetchable) << 3,
        BarKind::Mem64 => 0x4 | (u32::from(bar.prefetchable) << 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1110,
            revision: 1,
            class: 5,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            interrupt_pin: 0,
        }
    }

    fn space_with_bars() -> ConfigSpace {
        let mut c = ConfigSpace::new(identity());
        c.add_bar(PciBar {
            index: 0,
            addr: 0xc000_0000,
            size: 0x100,
            kind: BarKind::Mem32,
            prefetchable: false,
        })
        .unwrap();
        c.add_bar(PciBar {
            index: 2,
            addr: 0x1_0000_0000,
            size: 1 << 20,
            kind: BarKind::Mem64,
            prefetchable: true,
        })
        .unwrap();
        c
    }

    #[test]
    fn identity_registers() {
        let c = ConfigSpace::new(identity());
        assert_eq!(c.read_register(0), 0x1110_1af4);
        assert_eq!(c.read_register(2), 0x0500_0001);
        assert_eq!(c.read_register(11), 0x1100_1af4);
    }

    #[test]
    fn size_probe_protocol() {
        let mut c = space_with_bars();
        assert_eq!(c.read_register(4), 0xc000_0000);
        assert_eq!(c.write_register(4, 0, &[0xff; 4]), None);
        assert_eq!(c.read_register(4), 0xffff_ff00);
        // Restoring the old value is not a relocation.
        assert_eq!(c.write_register(4, 0, &0xc000_0000u32.to_le_bytes()), None);
        // 64-bit prefetchable BAR2.
        assert_eq!(c.read_register(6), 0x0000_000c);
        assert_eq!(c.read_register(7), 0x1);
        c.write_register(6, 0, &[0xff; 4]);
        c.write_register(7, 0, &[0xff; 4]);
        assert_eq!(c.read_register(6), 0xfff0_000c);
        assert_eq!(c.read_register(7), 0xffff_ffff);
    }

    #[test]
    fn relocation_reported() {
        let mut c = space_with_bars();
        let r = c.write_register(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            r,
            Some(BarRelocation {
                index: 0,
                old_addr: 0xc000_0000,
                new_addr: 0xd000_0000,
                size: 0x100
            })
        );
        assert_eq!(c.bar_addr(0), 0xd000_0000);
        let r = c.write_register(7, 0, &2u32.to_le_bytes()).unwrap();
        assert_eq!(r.index, 2);
        assert_eq!(r.new_addr, 0x2_0000_0000);
    }

    #[test]
    fn capability_list_links() {
        let mut c = ConfigSpace::new(identity());
        let a = c
            .add_capability(PciCapabilityId::MsiX, &[0; 10], &[0; 10])
            .unwrap();
        let b = c
            .add_capability(PciCapabilityId::VendorSpecific, &[3, 0], &[0, 0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c);
        assert_eq!(c.read_byte(0x34), 0x40);
        assert_eq!(c.read_byte(0x41), 0x4c);
        assert_eq!(c.read_byte(0x4d), 0);
        assert_ne!(c.read_register(1) & (STATUS_CAPABILITY_LIST << 16), 0);
    }

    proptest! {
        #[test]
        fn read_only_registers_never_change(reg in 0usize..64, off in 0u64..4, v: u32, len in prop::sample::select(vec![1usize, 2, 4])) {
            let mut c = space_with_bars();
            let before = c.read_register(0);
            let class = c.read_register(2);
            let bytes = v.to_le_bytes();
            c.write_register(reg, off, &bytes[..len]);
            prop_assert_eq!(c.read_register(0), before);
            prop_assert_eq!(c.read_register(2), class);
            // BAR type bits are read-only.
            prop_assert_eq!(c.read_register(4) & 0xf, 0);
            prop_assert_eq!(c.read_register(6) & 0xf, 0xc);
            // BAR0 stays aligned to its size.
            prop_assert_eq!(c.bar_addr(0) % 0x100, 0);
        }
    }
}
