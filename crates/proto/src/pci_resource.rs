//! The Linux sysfs `resource` file of a PCI function (`/sys/bus/pci/devices/*/resource`): one
//! line per BAR/ROM/bridge window, three hex numbers each (`start end flags`), written by the
//! kernel's `resource_show()`. Guests (`ivshm-guest`) and the end-to-end tests parse it here.

/// `IORESOURCE_IO`: the region is in I/O port space.
pub const IORESOURCE_IO: u64 = 0x0000_0100;
/// `IORESOURCE_MEM`: the region is in memory space.
pub const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_PREFETCH`: the memory region is prefetchable.
pub const IORESOURCE_PREFETCH: u64 = 0x0000_2000;
/// `IORESOURCE_MEM_64`: the memory BAR is 64 bits wide.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// One line of the `resource` file (line N is BAR N for N < 6, then the ROM and bridge windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resource {
    /// First address of the region (0 with `end` 0 for an unused BAR).
    pub start: u64,
    /// Last address of the region, inclusive.
    pub end: u64,
    /// `IORESOURCE_*` flags.
    pub flags: u64,
}

impl Resource {
    /// Size in bytes; 0 for an unused BAR.
    pub fn size(&self) -> u64 {
        if self.start == 0 && self.end == 0 {
            0
        } else {
            // parse_resource_file guarantees start <= end and that the size fits.
            self.end - self.start + 1
        }
    }

    /// Whether the BAR is present (non-zero size).
    pub fn is_present(&self) -> bool {
        self.size() != 0
    }

    /// Whether the region is memory space (mappable through `resourceN`).
    pub fn is_memory(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0
    }

    /// Whether the region is prefetchable memory.
    pub fn is_prefetchable(&self) -> bool {
        self.flags & IORESOURCE_PREFETCH != 0
    }
}

/// A `resource` file that does not have the kernel's format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum ResourceParseError {
    /// resource line {line}: expected three 0x-prefixed hex numbers (start end flags), got `{text}`
    ///
    /// A line does not hold exactly three `0x`-prefixed hex numbers.
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The offending line (truncated to 80 characters).
        text: String,
    },
    /// resource line {line}: end {end:#x} is below start {start:#x} or the size overflows
    ///
    /// `end` is below `start`, or the region covers the whole 64-bit space.
    BadRange {
        /// 1-based line number.
        line: usize,
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
    },
}

fn parse_hex_field(field: &str) -> Option<u64> {
    let digits = field
        .strip_prefix("0x")
        .or_else(|| field.strip_prefix("0X"))?;
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Parses the contents of a sysfs `resource` file. Blank lines are skipped.
pub fn parse_resource_file(text: &str) -> Result<Vec<Resource>, ResourceParseError> {
    let mut resources = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        let bad_line = || ResourceParseError::BadLine {
            line,
            text: trimmed.chars().take(80).collect(),
        };
        let fields: Vec<&str> = trimmed.split_ascii_whitespace().collect();
        let [start, end, flags] = fields.as_slice() else {
            return Err(bad_line());
        };
        let (Some(start), Some(end), Some(flags)) = (
            parse_hex_field(start),
            parse_hex_field(end),
            parse_hex_field(flags),
        ) else {
            return Err(bad_line());
        };
        let unused = start == 0 && end == 0;
        let size_fits = end
            .checked_sub(start)
            .and_then(|d| d.checked_add(1))
            .is_some();
        if !unused && !size_fits {
            return Err(ResourceParseError::BadRange { line, start, end });
        }
        resources.push(Resource { start, end, flags });
    }
    Ok(resources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// As read from a QEMU ivshmem-doorbell device (q35).
    const DOORBELL_RESOURCE: &str = "\
0x00000000fea00000 0x00000000fea000ff 0x0000000000040200
0x00000000fea01000 0x00000000fea01fff 0x0000000000040200
0x0000000200000000 0x00000002003fffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn parses_a_real_doorbell_resource_file() {
        // As read from a QEMU ivshmem-doorbell device (q35): BAR0 registers, BAR1 MSI-X, BAR2 memory.
        let r = parse_resource_file(DOORBELL_RESOURCE).unwrap();
        assert_eq!(r.len(), 7);
        assert_eq!(r[0].size(), 256);
        assert!(r[0].is_memory());
        assert_eq!(r[1].size(), 4096);
        assert_eq!(r[2].size(), 4 << 20);
        assert!(r[2].is_prefetchable());
        assert_ne!(r[2].flags & IORESOURCE_MEM_64, 0);
        assert!(!r[3].is_present());
        assert_eq!(r[3].size(), 0);
    }

    #[test]
    fn rejects_bad_lines_and_ranges() {
        assert!(matches!(
            parse_resource_file("0x1 0x2"),
            Err(ResourceParseError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            parse_resource_file("\n0x1 0x2 zz"),
            Err(ResourceParseError::BadLine { line: 2, .. })
        ));
        assert!(matches!(
            parse_resource_file("0x10 0x0f 0x200"),
            Err(ResourceParseError::BadRange { .. })
        ));
        assert!(matches!(
            parse_resource_file("0x0 0xffffffffffffffff 0x200"),
            Err(ResourceParseError::BadRange { .. })
        ));
        assert!(matches!(
            parse_resource_file("0x 0x1 0x2"),
            Err(ResourceParseError::BadLine { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            if let Ok(resources) = parse_resource_file(&text) {
                for r in resources {
                    let _ = r.size();
                }
            }
        }

        #[test]
        fn well_formed_lines_round_trip(
            lines in proptest::collection::vec((any::<u64>(), 0u64..1 << 40, any::<u64>()), 0..8)
        ) {
            let mut text = String::new();
            let mut expected = Vec::new();
            for (start, len, flags) in lines {
                let start = start >> 1;
                let end = start.saturating_add(len);
                text.push_str(&format!("0x{start:016x} 0x{end:016x} 0x{flags:016x}\n"));
                expected.push(Resource { start, end, flags });
            }
            let parsed = parse_resource_file(&text).unwrap();
            prop_assert_eq!(parsed, expected);
        }
    }
}
