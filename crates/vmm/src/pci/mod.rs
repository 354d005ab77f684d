//! PCI building blocks shaped like the ones rust-vmm based VMMs use
//! (cloud-hypervisor's `pci` crate): a [`PciDevice`] trait with config-space access by
//! register, a BAR list, BAR relocation reported from config writes, and ioevents.

pub mod config;
pub mod msix;

use std::os::fd::BorrowedFd;

pub use config::{BarRelocation, ConfigSpace, PciCapabilityId, PciIdentity};
pub use msix::{MsixCapability, MsixMessage, MsixTable, MsixTrigger};

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR (occupies this BAR register and the next one).
    Mem64,
    /// I/O-port BAR.
    Io,
}

/// One BAR as the device declares it and as it is currently programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    /// BAR register index (0..=5).
    pub index: usize,
    /// Current guest address (0 until programmed).
    pub addr: u64,
    /// Size in bytes: a power of two.
    pub size: u64,
    /// Memory or I/O, 32 or 64 bit.
    pub kind: BarKind,
    /// Prefetchable bit (memory BARs only).
    pub prefetchable: bool,
}

/// An ioevent a device wants the VMM to register (KVM `KVM_IOEVENTFD`): a write of
/// `len` bytes equal to `datamatch` at `addr` signals `fd` without exiting to the VMM.
#[derive(Debug, Clone, Copy)]
pub struct IoEvent<'a> {
    /// Absolute guest address (BAR address + register offset).
    pub addr: u64,
    /// Access width the datamatch applies to.
    pub len: u32,
    /// Value the write must carry.
    pub datamatch: u64,
    /// Event fd to signal.
    pub fd: BorrowedFd<'a>,
}

/// A PCI function as a VMM sees it.
///
/// Mirrors cloud-hypervisor's `PciDevice`: config accesses are per 32-bit register with a byte
/// offset inside it; BAR accesses carry the BAR's base so a device can find the offset.
pub trait PciDevice: Send {
    /// Reads 32-bit config register `reg_idx` (byte offset `reg_idx * 4`).
    fn read_config_register(&mut self, reg_idx: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within config register `reg_idx`.
    /// Returns a BAR relocation when the write moved a BAR.
    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarRelocation>;
    /// The device's BARs with their current addresses.
    fn bars(&self) -> Vec<PciBar>;
    /// Reads from BAR `bar` at byte `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes to BAR `bar` at byte `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Ioevents the VMM may register so writes never exit (empty when none).
    fn ioevents(&self) -> Vec<IoEvent<'_>> {
        Vec::new()
    }
}
