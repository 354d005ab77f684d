//! [`KvmRegionWindows`]: the [`RegionWindowMapper`] of a KVM VMM, which maps each region's data
//! pages into the guest as a KVM memory slot behind its (trapping) control page.

use std::ops::Range;
use std::sync::Arc;

use ivshm_mem::Mapping;
use ivshm_proto::guest_shm::PAGE_SIZE;
use kvm_ioctls::VmFd;

use crate::guest_shm::RegionWindowMapper;
use crate::ivshmem::kvm::set_memory_slot;

const PAGE: u64 = PAGE_SIZE as u64;

/// One mapped region window.
struct Window {
    /// Guest-physical address of the control page; the data pages follow it.
    control: u64,
    /// The KVM memory slot of the data pages.
    slot: u32,
    /// The host memory behind the slot, kept alive while the slot exists.
    memory: Arc<Mapping>,
}

/// Places `guest_shm` regions one after another in a guest-physical window: each gets a control
/// page left unbacked (guest accesses exit to the VMM, which hands them to the device, e.g.
/// through [`crate::adapters::GuestShmMmio`]) followed by its data pages as a KVM memory slot.
/// Windows and slots are not reused. Every slot is removed when a region detaches and when
/// the mapper is dropped, so KVM never points at memory the mapper no longer holds.
pub struct KvmRegionWindows {
    vm: Arc<VmFd>,
    next_addr: u64,
    end: u64,
    next_slot: u32,
    windows: Vec<Window>,
}

impl std::fmt::Debug for KvmRegionWindows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmRegionWindows")
            .field("next_addr", &self.next_addr)
            .field("end", &self.end)
            .field("next_slot", &self.next_slot)
            .field("windows", &self.windows.len())
            .finish_non_exhaustive()
    }
}

impl KvmRegionWindows {
    /// Windows go in the guest-physical range `window` (its start page aligned; nothing else of
    /// the VM may be there), data pages in KVM memory slots `first_slot`, `first_slot + 1`, ...
    /// (slots the VMM does not use otherwise).
    pub fn new(vm: Arc<VmFd>, window: Range<u64>, first_slot: u32) -> KvmRegionWindows {
        KvmRegionWindows {
            vm,
            next_addr: window.start,
            end: window.end,
            next_slot: first_slot,
            windows: Vec::new(),
        }
    }

    /// Maps `size` bytes of `memory` at `addr` in `slot` (size 0 removes the slot).
    fn set_slot(&self, slot: u32, addr: u64, memory: &Mapping, size: u64) -> Result<(), String> {
        // SAFETY: the mapper keeps an Arc to `memory` in `windows` for as long as the slot
        // exists, and removes the slot (size 0) before it lets go of the Arc.
        unsafe { set_memory_slot(&self.vm, slot, addr, memory, size) }.map_err(|e| e.to_string())
    }

    fn remove(&self, window: &Window) {
        if let Err(e) = self.set_slot(window.slot, window.control + PAGE, &window.memory, 0) {
            tracing::error!(error = %e, control = window.control, "removing a guest_shm data slot failed");
        }
    }
}

impl RegionWindowMapper for KvmRegionWindows {
    fn map_region(&mut self, memory: &Arc<Mapping>, pages: u32) -> Result<u64, String> {
        let data_len = u64::from(pages) * PAGE;
        let control = self.next_addr;
        let end = control
            .checked_add(PAGE + data_len)
            .filter(|&end| end <= self.end)
            .ok_or("guest_shm window full")?;
        let slot = self.next_slot;
        let next_slot = slot.checked_add(1).ok_or("no KVM memory slot left")?;
        self.set_slot(slot, control + PAGE, memory, data_len)?;
        self.windows.push(Window {
            control,
            slot,
            memory: memory.clone(),
        });
        self.next_slot = next_slot;
        self.next_addr = end;
        Ok(control)
    }

    fn unmap_region(&mut self, control_addr: u64) {
        if let Some(i) = self.windows.iter().position(|w| w.control == control_addr) {
            let window = self.windows.remove(i);
            self.remove(&window);
        }
    }
}

impl Drop for KvmRegionWindows {
    fn drop(&mut self) {
        for window in std::mem::take(&mut self.windows) {
            self.remove(&window);
        }
    }
}
