//! MSI-X: the capability structure in config space and the table + PBA a BAR exposes.
//!
//! Semantics (PCI Local Bus spec 3.0, 6.8.2): table entries reset masked; a vector fires
//! only when MSI-X is enabled, the function is not masked and the entry is not masked;
//! otherwise (enabled but masked) its pending bit is set and the message is sent when the
//! mask clears. With MSI-X disabled, interrupts are dropped (as QEMU's `msix_notify` does).

/// Size of one table entry in bytes.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: per-vector mask bit.
const VECTOR_CONTROL_MASK: u32 = 1;

/// The MSI-X capability body for a config space (after the ID/next header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    /// Number of table entries (1..=2048).
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Capability body bytes (10) and their write mask (only enable and function mask).
    pub fn body(&self) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        let control = self.table_size.saturating_sub(1) & 0x7ff;
        body[0..2].copy_from_slice(&control.to_le_bytes());
        let table = (self.table_offset & !7) | u32::from(self.table_bar & 7);
        body[2..6].copy_from_slice(&table.to_le_bytes());
        let pba = (self.pba_offset & !7) | u32::from(self.pba_bar & 7);
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        let mut writable = [0u8; 10];
        writable[1] = 0xc0;
        (body, writable)
    }
}

/// An MSI message: what the device writes to raise a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsixMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    vector_control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        MsixEntry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            vector_control: VECTOR_CONTROL_MASK,
        }
    }
}

/// What happened when a vector was triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixTrigger {
    /// Deliver this message now.
    Deliver(MsixMessage),
    /// Masked: the pending bit is now set.
    Pending,
    /// MSI-X disabled: dropped.
    Dropped,
}

/// The MSI-X table and pending-bit array of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    /// A table of `vectors` entries, all masked, MSI-X disabled.
    pub fn new(vectors: usize) -> MsixTable {
        MsixTable {
            entries: vec![MsixEntry::default(); vectors],
            pending: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the table has no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// MSI-X enable bit as last written to message control.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Function mask bit as last written to message control.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Applies a new message-control value. Returns the vectors whose pending
    /// message must be delivered now because they became unmasked.
    pub fn set_control(&mut self, control: u16) -> Vec<(usize, MsixMessage)> {
        self.enabled = control & MSIX_CONTROL_ENABLE != 0;
        self.function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        self.flush_pending()
    }

    /// The message vector `v` would send now, or `None` when it is masked/disabled.
    pub fn deliverable_message(&self, v: usize) -> Option<MsixMessage> {
        let e = self.entries.get(v)?;
        if !self.enabled || self.function_masked || e.vector_control & VECTOR_CONTROL_MASK != 0 {
            return None;
        }
        Some(MsixMessage {
            addr: u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
            data: e.data,
        })
    }

    /// Raises vector `v`.
    pub fn trigger(&mut self, v: usize) -> MsixTrigger {
        if v >= self.entries.len() || !self.enabled {
            return MsixTrigger::Dropped;
        }
        match self.deliverable_message(v) {
            Some(m) => MsixTrigger::Deliver(m),
            None => {
                self.set_pending(v, true);
                MsixTrigger::Pending
            }
        }
    }

    /// Pending bit of vector `v`.
    pub fn is_pending(&self, v: usize) -> bool {
        self.pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    /// Sets or clears the pending bit of vector `v` (for VMMs whose interrupt path
    /// tracks pending state outside the table, e.g. an eventfd with a count).
    pub fn set_pending(&mut self, v: usize, pending: bool) {
        if let Some(w) = self.pending.get_mut(v / 64) {
            if pending {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn flush_pending(&mut self) -> Vec<(usize, MsixMessage)> {
        let mut out = Vec::new();
        for v in 0..self.entries.len() {
            if self.is_pending(v) {
                if let Some(m) = self.deliverable_message(v) {
                    self.set_pending(v, false);
                    out.push((v, m));
                }
            }
        }
        out
    }

    /// Reads the table at byte `offset` (4- or 8-byte aligned accesses; others read 0).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let words = match data.len() {
            4 if offset % 4 == 0 => 1,
            8 if offset % 8 == 0 => 2,
            _ => return,
        };
        for i in 0..words {
            let v = self.table_word(offset + 4 * i as u64);
            data[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    fn table_word(&self, offset: u64) -> u32 {
        let Some(e) = self.entries.get((offset / MSIX_ENTRY_SIZE) as usize) else {
            return 0;
        };
        match offset % MSIX_ENTRY_SIZE {
            0 => e.addr_lo,
            4 => e.addr_hi,
            8 => e.data,
            _ => e.vector_control,
        }
    }

    /// Writes the table at byte `offset`. Returns the vector whose entry changed (its
    /// routing must be refreshed) and pending messages to deliver now it is unmasked.
    pub fn write_table(
        &mut self,
        offset: u64,
        data: &[u8],
    ) -> (Option<usize>, Vec<(usize, MsixMessage)>) {
        let words = match data.len() {
            4 if offset % 4 == 0 => 1,
            8 if offset % 8 == 0 => 2,
            _ => return (None, Vec::new()),
        };
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(index) else {
            return (None, Vec::new());
        };
        for i in 0..words {
            let mut b = [0u8; 4];
            b.copy_from_slice(&data[4 * i..4 * i + 4]);
            let v = u32::from_le_bytes(b);
            match (offset + 4 * i as u64) % MSIX_ENTRY_SIZE {
                0 => entry.addr_lo = v & !3,
                4 => entry.addr_hi = v,
                8 => entry.data = v,
                _ => entry.vector_control = v & VECTOR_CONTROL_MASK,
            }
        }
        (Some(index), self.flush_pending())
    }

    /// Reads the PBA at byte `offset` (4- or 8-byte aligned).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let word = self
            .pending
            .get((offset / 8) as usize)
            .copied()
            .unwrap_or(0);
        match data.len() {
            8 if offset % 8 == 0 => data.copy_from_slice(&word.to_le_bytes()),
            4 if offset % 4 == 0 => {
                let half = (word >> ((offset % 8) * 8)) as u32;
                data.copy_from_slice(&half.to_le_bytes());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn program(t: &mut MsixTable, v: usize, addr: u32, data: u32, masked: bool) {
        let base = v as u64 * MSIX_ENTRY_SIZE;
        t.write_table(base, &addr.to_le_bytes());
        t.write_table(base + 4, &0u32.to_le_bytes());
        t.write_table(base + 8, &data.to_le_bytes());
        t.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn capability_body() {
        let cap = MsixCapability {
            table_size: 4,
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: 0x800,
        };
        let (body, mask) = cap.body();
        assert_eq!(&body[..], &[3, 0, 1, 0, 0, 0, 0x01, 0x08, 0, 0]);
        assert_eq!(mask[1], 0xc0);
    }

    #[test]
    fn entries_reset_masked_and_disabled_drops() {
        let mut t = MsixTable::new(2);
        let mut b = [0u8; 4];
        t.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        assert_eq!(t.trigger(0), MsixTrigger::Dropped);
        assert!(!t.is_pending(0));
    }

    #[test]
    fn masked_vector_goes_pending_then_delivers_on_unmask() {
        let mut t = MsixTable::new(2);
        t.set_control(MSIX_CONTROL_ENABLE);
        program(&mut t, 1, 0xfee0_0000, 0x41, true);
        assert_eq!(t.trigger(1), MsixTrigger::Pending);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        let (changed, deliver) = t.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(changed, Some(1));
        assert_eq!(
            deliver,
            vec![(
                1,
                MsixMessage {
                    addr: 0xfee0_0000,
                    data: 0x41
                }
            )]
        );
        assert!(!t.is_pending(1));
        assert_eq!(
            t.trigger(1),
            MsixTrigger::Deliver(MsixMessage {
                addr: 0xfee0_0000,
                data: 0x41
            })
        );
    }

    #[test]
    fn function_mask() {
        let mut t = MsixTable::new(1);
        program(&mut t, 0, 0xfee0_0000, 0x30, false);
        t.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert_eq!(t.trigger(0), MsixTrigger::Pending);
        let out = t.set_control(MSIX_CONTROL_ENABLE);
        assert_eq!(out.len(), 1);
        assert!(!t.is_pending(0));
    }

    proptest! {
        #[test]
        fn arbitrary_writes_keep_invariants(ops in prop::collection::vec((0u64..80, any::<u64>(), prop::bool::ANY), 0..64)) {
            let mut t = MsixTable::new(4);
            t.set_control(MSIX_CONTROL_ENABLE);
            for (off, v, wide) in ops {
                if wide { t.write_table(off & !7, &v.to_le_bytes()); }
                else { t.write_table(off & !3, &(v as u32).to_le_bytes()); }
            }
            for v in 0..4 {
                let mut b = [0u8; 4];
                t.read_table(v as u64 * 16 + 12, &mut b);
                prop_assert!(u32::from_le_bytes(b) <= 1);
                t.read_table(v as u64 * 16, &mut b);
                prop_assert_eq!(u32::from_le_bytes(b) & 3, 0);
                // A deliverable vector never stays pending after a trigger.
                if let MsixTrigger::Deliver(_) = t.trigger(v) { prop_assert!(!t.is_pending(v)); }
            }
        }
    }
}
