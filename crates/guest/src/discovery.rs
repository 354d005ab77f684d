//! Which shared-memory devices exist, what kind each is, and picking one.

use crate::pci::{self, DiscoveryError, PciAddress, PciFunction, SystemPaths};
use ivshm_proto::{guest_shm, ivshmem, jailhouse};
use std::fmt;

/// The kinds of shared-memory device this crate recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// QEMU `ivshmem-plain`: shared memory, no interrupts.
    IvshmemPlain,
    /// QEMU `ivshmem-doorbell`: shared memory plus MSI-X doorbells through a server.
    IvshmemDoorbell,
    /// QNX hypervisor `guest_shm` (recognised, not supported yet).
    QnxGuestShm,
    /// Jailhouse ivshmem v2 (recognised, not supported yet).
    JailhouseIvshmemV2,
}

impl DeviceKind {
    /// The kind for a vendor/device pair; `has_msix` tells ivshmem's two variants apart.
    pub fn classify(vendor: u16, device: u16, has_msix: bool) -> Option<DeviceKind> {
        match (vendor, device) {
            (ivshmem::VENDOR_ID, ivshmem::DEVICE_ID) if has_msix => {
                Some(DeviceKind::IvshmemDoorbell)
            }
            (ivshmem::VENDOR_ID, ivshmem::DEVICE_ID) => Some(DeviceKind::IvshmemPlain),
            (guest_shm::PCI_VENDOR_ID, guest_shm::PCI_DEVICE_ID) => Some(DeviceKind::QnxGuestShm),
            (jailhouse::VENDOR_ID, jailhouse::IVSHMEM_V2_DEVICE_ID) => {
                Some(DeviceKind::JailhouseIvshmemV2)
            }
            _ => None,
        }
    }

    /// Whether this crate can open devices of this kind.
    pub fn is_supported(self) -> bool {
        matches!(self, DeviceKind::IvshmemPlain | DeviceKind::IvshmemDoorbell)
    }

    /// Whether the device can deliver doorbell interrupts.
    pub fn has_doorbells(self) -> bool {
        matches!(self, DeviceKind::IvshmemDoorbell)
    }

    /// Short stable name, as printed by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::IvshmemPlain => "ivshmem-plain",
            DeviceKind::IvshmemDoorbell => "ivshmem-doorbell",
            DeviceKind::QnxGuestShm => "qnx-guest-shm",
            DeviceKind::JailhouseIvshmemV2 => "jailhouse-ivshmem-v2",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A recognised device: its PCI information and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundDevice {
    /// What sysfs says about the function.
    pub function: PciFunction,
    /// What kind of device it is.
    pub kind: DeviceKind,
}

impl FoundDevice {
    /// Number of MSI-X vectors (0 for a device without MSI-X or when config space was unreadable).
    pub fn msix_vectors(&self) -> u16 {
        self.function.msix.map_or(0, |m| m.table_size)
    }
}

/// Whether an ivshmem function has MSI-X: from its capability list when readable, otherwise
/// from the presence of BAR1 (the doorbell variant's exclusive MSI-X BAR; the plain one has none).
fn ivshmem_has_msix(function: &PciFunction) -> bool {
    match (&function.msix, &function.capability_error) {
        (Some(_), _) => true,
        (None, None) => false,
        (None, Some(_)) => function.bar(1).is_some(),
    }
}

/// Finds every recognised device (supported or not), sorted by address.
pub fn find_devices(paths: &SystemPaths) -> Result<Vec<FoundDevice>, DiscoveryError> {
    let mut found = Vec::new();
    for address in pci::list_addresses(paths)? {
        let (vendor, device) = pci::read_ids(paths, address)?;
        if DeviceKind::classify(vendor, device, false).is_none() {
            continue;
        }
        let function = pci::read_function(paths, address)?;
        if let Some(kind) = DeviceKind::classify(vendor, device, ivshmem_has_msix(&function)) {
            found.push(FoundDevice { function, kind });
        }
    }
    Ok(found)
}

/// How the user names a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSelector {
    /// The only supported device present.
    Only,
    /// The device at this PCI address.
    Address(PciAddress),
    /// The N-th recognised device (0-based, in address order, as `ivshm guest list` prints them).
    Index(usize),
}

impl std::str::FromStr for DeviceSelector {
    type Err = crate::pci::AddressParseError;

    /// A decimal number is an index; anything else must be a PCI address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(index) = s.parse() {
                return Ok(DeviceSelector::Index(index));
            }
        }
        s.parse().map(DeviceSelector::Address)
    }
}

/// Failure to pick a device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum SelectError {
    /// {0}
    ///
    /// Discovery itself failed.
    Discovery(DiscoveryError),
    /// no ivshmem device found (looked for PCI 1af4:1110 in {sysfs}/bus/pci/devices); is the VM
    /// started with -device ivshmem-plain or ivshmem-doorbell?
    ///
    /// No recognised device at all.
    NoDevice {
        /// The sysfs root searched.
        sysfs: String,
    },
    /// {count} ivshmem devices found ({addresses}); name one by PCI address or index
    ///
    /// Several supported devices and no choice made.
    Ambiguous {
        /// How many.
        count: usize,
        /// Their addresses, comma separated.
        addresses: String,
    },
    /// no recognised shared-memory device at {0}; `ivshm guest list` shows what exists
    ///
    /// Nothing at that address or index.
    NotFound(String),
    /// {address} is a {kind} device, which is recognised but not supported yet
    ///
    /// The device is recognised but this crate cannot drive it.
    Unsupported {
        /// Its address.
        address: PciAddress,
        /// Its kind.
        kind: DeviceKind,
    },
}

impl From<DiscoveryError> for SelectError {
    fn from(error: DiscoveryError) -> Self {
        Self::Discovery(error)
    }
}

/// Picks one supported device from `devices` (as returned by [`find_devices`]).
pub fn select_device(
    paths: &SystemPaths,
    devices: &[FoundDevice],
    selector: DeviceSelector,
) -> Result<FoundDevice, SelectError> {
    let chosen = match selector {
        DeviceSelector::Only => {
            let supported: Vec<&FoundDevice> =
                devices.iter().filter(|d| d.kind.is_supported()).collect();
            match supported.as_slice() {
                [] => match devices.first() {
                    Some(d) => d,
                    None => {
                        return Err(SelectError::NoDevice {
                            sysfs: paths.sysfs.display().to_string(),
                        })
                    }
                },
                [only] => *only,
                many => {
                    return Err(SelectError::Ambiguous {
                        count: many.len(),
                        addresses: many
                            .iter()
                            .map(|d| d.function.address.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
        DeviceSelector::Address(address) => devices
            .iter()
            .find(|d| d.function.address == address)
            .ok_or_else(|| SelectError::NotFound(address.to_string()))?,
        DeviceSelector::Index(index) => devices
            .get(index)
            .ok_or_else(|| SelectError::NotFound(format!("index {index}")))?,
    };
    if !chosen.kind.is_supported() {
        return Err(SelectError::Unsupported {
            address: chosen.function.address,
            kind: chosen.kind,
        });
    }
    Ok(chosen.clone())
}

/// [`find_devices`] then [`select_device`].
pub fn find_device(
    paths: &SystemPaths,
    selector: DeviceSelector,
) -> Result<FoundDevice, SelectError> {
    let devices = find_devices(paths)?;
    select_device(paths, &devices, selector)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::*;

    fn add(tmp: &FakeSysfs, address: &str, vendor: u16, device: u16, vectors: u16) {
        tmp.add(&FakeFunction {
            address,
            vendor,
            device,
            class: 0x050000,
            resource: if vectors > 0 {
                doorbell_resource(4 << 20)
            } else {
                plain_resource(1 << 20)
            },
            config: config_with_msix(vendor, device, vectors),
            driver: None,
            iommu_group: Some(3),
        });
    }

    #[test]
    fn classifies_all_known_kinds() {
        assert_eq!(
            DeviceKind::classify(0x1af4, 0x1110, true),
            Some(DeviceKind::IvshmemDoorbell)
        );
        assert_eq!(
            DeviceKind::classify(0x1af4, 0x1110, false),
            Some(DeviceKind::IvshmemPlain)
        );
        assert_eq!(
            DeviceKind::classify(0x1c05, 0x0001, false),
            Some(DeviceKind::QnxGuestShm)
        );
        assert_eq!(
            DeviceKind::classify(0x110a, 0x4106, true),
            Some(DeviceKind::JailhouseIvshmemV2)
        );
        assert_eq!(DeviceKind::classify(0x1af4, 0x1000, false), None);
        assert!(!DeviceKind::QnxGuestShm.is_supported());
        assert!(!DeviceKind::JailhouseIvshmemV2.is_supported());
    }

    #[test]
    fn finds_and_selects_devices() {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        add(&tmp, "0000:00:01.0", 0x8086, 0x29c0, 0);
        add(&tmp, "0000:00:03.0", 0x1af4, 0x1110, 4);
        add(&tmp, "0000:00:04.0", 0x1af4, 0x1110, 0);
        add(&tmp, "0000:00:05.0", 0x1c05, 0x0001, 0);
        add(&tmp, "0000:00:06.0", 0x110a, 0x4106, 1);
        let devices = find_devices(&paths).unwrap();
        let kinds: Vec<_> = devices
            .iter()
            .map(|d| (d.function.address.to_string(), d.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("0000:00:03.0".to_string(), DeviceKind::IvshmemDoorbell),
                ("0000:00:04.0".to_string(), DeviceKind::IvshmemPlain),
                ("0000:00:05.0".to_string(), DeviceKind::QnxGuestShm),
                ("0000:00:06.0".to_string(), DeviceKind::JailhouseIvshmemV2),
            ]
        );
        assert_eq!(devices[0].msix_vectors(), 4);
        assert!(matches!(
            select_device(&paths, &devices, DeviceSelector::Only),
            Err(SelectError::Ambiguous { count: 2, .. })
        ));
        let by_address = select_device(&paths, &devices, "00:04.0".parse().unwrap()).unwrap();
        assert_eq!(by_address.kind, DeviceKind::IvshmemPlain);
        let by_index = select_device(&paths, &devices, "0".parse().unwrap()).unwrap();
        assert_eq!(by_index.kind, DeviceKind::IvshmemDoorbell);
        assert!(matches!(
            select_device(&paths, &devices, DeviceSelector::Index(2)),
            Err(SelectError::Unsupported {
                kind: DeviceKind::QnxGuestShm,
                ..
            })
        ));
        assert!(matches!(
            select_device(&paths, &devices, DeviceSelector::Index(9)),
            Err(SelectError::NotFound(_))
        ));
    }

    #[test]
    fn only_device_and_no_device() {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        add(&tmp, "0000:00:01.0", 0x8086, 0x29c0, 0);
        assert!(matches!(
            find_device(&paths, DeviceSelector::Only),
            Err(SelectError::NoDevice { .. })
        ));
        add(&tmp, "0000:00:03.0", 0x1af4, 0x1110, 2);
        add(&tmp, "0000:00:05.0", 0x1c05, 0x0001, 0);
        let only = find_device(&paths, DeviceSelector::Only).unwrap();
        assert_eq!(only.function.address.to_string(), "0000:00:03.0");
    }

    #[test]
    fn doorbell_is_detected_from_bar1_when_config_is_truncated() {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        let mut config = config_with_msix(0x1af4, 0x1110, 4);
        config.truncate(64);
        tmp.add(&FakeFunction {
            config,
            ..FakeFunction::doorbell("0000:00:03.0")
        });
        assert_eq!(
            find_device(&paths, DeviceSelector::Only).unwrap().kind,
            DeviceKind::IvshmemDoorbell
        );
    }

    #[test]
    fn selectors_parse_as_index_or_address() {
        assert_eq!(
            "2".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Index(2)
        );
        assert_eq!(
            "00:03.0".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Address("0000:00:03.0".parse().unwrap())
        );
        "99999999999999999999999"
            .parse::<DeviceSelector>()
            .unwrap_err();
        "eth0".parse::<DeviceSelector>().unwrap_err();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_selector_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<DeviceSelector>();
        }
    }
}
