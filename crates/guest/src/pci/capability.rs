//! Walking the capability list of a PCI configuration space (a byte array, as read from the
//! sysfs `config` file) and decoding the MSI-X capability.

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capability ID of a vendor-specific capability (used by Jailhouse ivshmem v2).
pub const CAP_ID_VENDOR: u8 = 0x09;

const STATUS_OFFSET: usize = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_POINTER_OFFSET: usize = 0x34;
const HEADER_END: usize = 0x40;
/// Standard configuration space holds at most (256 - 64) / 4 capabilities.
const MAX_CAPABILITIES: usize = 48;

/// One entry of the capability list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID (e.g. [`CAP_ID_MSIX`]).
    pub id: u8,
    /// Offset of the capability in configuration space.
    pub offset: u8,
}

/// The MSI-X capability, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in configuration space.
    pub offset: u8,
    /// Number of MSI-X vectors (table entries), 1..=2048.
    pub table_size: u16,
    /// Whether the function has MSI-X enabled right now.
    pub enabled: bool,
    /// BAR holding the vector table.
    pub table_bar: u8,
    /// Offset of the table inside that BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the pending-bit array inside that BAR.
    pub pba_offset: u32,
}

/// A configuration space whose capability list cannot be walked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum CapabilityError {
    /// configuration space is truncated at {len} bytes but the capability list needs byte
    /// {needed:#x} (reading the full config space needs root)
    ///
    /// Fewer bytes than the list needs; unprivileged reads of sysfs `config` return only the
    /// first 64 bytes.
    Truncated {
        /// Bytes available.
        len: usize,
        /// Offset that was needed.
        needed: usize,
    },
    /// malformed capability list: {reason}
    ///
    /// A capability pointer into the standard header, or a list that loops.
    Malformed {
        /// What was wrong.
        reason: &'static str,
    },
}

fn read_u16(config: &[u8], offset: usize) -> Result<u16, CapabilityError> {
    match config.get(offset..offset + 2) {
        Some(&[lo, hi]) => Ok(u16::from_le_bytes([lo, hi])),
        _ => Err(CapabilityError::Truncated {
            len: config.len(),
            needed: offset + 1,
        }),
    }
}

fn read_u32(config: &[u8], offset: usize) -> Result<u32, CapabilityError> {
    match config.get(offset..offset + 4) {
        Some(&[a, b, c, d]) => Ok(u32::from_le_bytes([a, b, c, d])),
        _ => Err(CapabilityError::Truncated {
            len: config.len(),
            needed: offset + 3,
        }),
    }
}

/// Lists the capabilities of a configuration space in list order.
pub fn capabilities(config: &[u8]) -> Result<Vec<Capability>, CapabilityError> {
    let status = read_u16(config, STATUS_OFFSET)?;
    if status & STATUS_CAP_LIST == 0 {
        return Ok(Vec::new());
    }
    let mut pointer = usize::from(
        *config
            .get(CAP_POINTER_OFFSET)
            .ok_or(CapabilityError::Truncated {
                len: config.len(),
                needed: CAP_POINTER_OFFSET,
            })?
            & 0xfc,
    );
    let mut found = Vec::new();
    while pointer != 0 {
        if pointer < HEADER_END {
            return Err(CapabilityError::Malformed {
                reason: "capability pointer points into the standard header",
            });
        }
        if found.len() == MAX_CAPABILITIES {
            return Err(CapabilityError::Malformed {
                reason: "capability list loops or is too long",
            });
        }
        let header = read_u16(config, pointer)?;
        let [id, next] = header.to_le_bytes();
        // pointer < 256 because it came from a byte.
        found.push(Capability {
            id,
            offset: pointer as u8,
        });
        pointer = usize::from(next & 0xfc);
    }
    Ok(found)
}

/// Finds and decodes the MSI-X capability, if the function has one.
pub fn find_msix(config: &[u8]) -> Result<Option<MsixCapability>, CapabilityError> {
    let Some(cap) = capabilities(config)?
        .into_iter()
        .find(|c| c.id == CAP_ID_MSIX)
    else {
        return Ok(None);
    };
    let base = usize::from(cap.offset);
    let control = read_u16(config, base + 2)?;
    let table = read_u32(config, base + 4)?;
    let pba = read_u32(config, base + 8)?;
    Ok(Some(MsixCapability {
        offset: cap.offset,
        table_size: (control & 0x07ff) + 1,
        enabled: control & 0x8000 != 0,
        table_bar: (table & 0x7) as u8,
        table_offset: table & !0x7,
        pba_bar: (pba & 0x7) as u8,
        pba_offset: pba & !0x7,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 256-byte config space shaped like QEMU's ivshmem-doorbell with 4 vectors:
    /// MSI-X capability at 0x40 (table and PBA in BAR1), then a vendor capability at 0x50.
    fn doorbell_config() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x1110u16.to_le_bytes());
        c[6..8].copy_from_slice(&STATUS_CAP_LIST.to_le_bytes());
        c[CAP_POINTER_OFFSET] = 0x40;
        c[0x40] = CAP_ID_MSIX;
        c[0x41] = 0x50;
        c[0x42..0x44].copy_from_slice(&(3u16 | 0x8000).to_le_bytes());
        c[0x44..0x48].copy_from_slice(&1u32.to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&(0x800u32 | 1).to_le_bytes());
        c[0x50] = CAP_ID_VENDOR;
        c[0x51] = 0;
        c
    }

    #[test]
    fn walks_the_list_and_decodes_msix() {
        let config = doorbell_config();
        let caps = capabilities(&config).unwrap();
        assert_eq!(
            caps,
            vec![
                Capability {
                    id: CAP_ID_MSIX,
                    offset: 0x40
                },
                Capability {
                    id: CAP_ID_VENDOR,
                    offset: 0x50
                }
            ]
        );
        let msix = find_msix(&config).unwrap().unwrap();
        assert_eq!(msix.table_size, 4);
        assert!(msix.enabled);
        assert_eq!((msix.table_bar, msix.table_offset), (1, 0));
        assert_eq!((msix.pba_bar, msix.pba_offset), (1, 0x800));
    }

    #[test]
    fn no_capability_list_means_no_msix() {
        let mut config = doorbell_config();
        config[6] = 0;
        assert_eq!(capabilities(&config).unwrap(), vec![]);
        assert_eq!(find_msix(&config).unwrap(), None);
    }

    #[test]
    fn truncated_config_is_reported() {
        let config = doorbell_config();
        assert!(matches!(
            find_msix(&config[..64]),
            Err(CapabilityError::Truncated { len: 64, .. })
        ));
    }

    #[test]
    fn loops_and_header_pointers_are_malformed() {
        let mut looping = doorbell_config();
        looping[0x51] = 0x40;
        assert!(matches!(
            capabilities(&looping),
            Err(CapabilityError::Malformed { .. })
        ));
        let mut into_header = doorbell_config();
        into_header[0x51] = 0x10;
        assert!(matches!(
            capabilities(&into_header),
            Err(CapabilityError::Malformed { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_config_space_never_panics(config in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = find_msix(&config);
        }
    }
}
