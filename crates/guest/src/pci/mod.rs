//! PCI discovery through sysfs: identity (vendor/device/class/revision/subsystem), resources,
//! capabilities (MSI-X), driver binding and IOMMU group.
//!
//! The sysfs root is a parameter ([`SystemPaths`]) so that tests can run against a fake tree.

mod address;
mod capability;

pub use address::{AddressParseError, PciAddress};
pub use capability::{
    capabilities, find_msix, Capability, CapabilityError, MsixCapability, CAP_ID_MSIX,
    CAP_ID_VENDOR,
};
pub use ivshm_proto::pci_resource::{
    parse_resource_file, Resource, ResourceParseError, IORESOURCE_IO, IORESOURCE_MEM,
    IORESOURCE_MEM_64, IORESOURCE_PREFETCH,
};

use std::path::{Path, PathBuf};

/// Where the kernel's interfaces live: `/sys` and `/dev/vfio` normally, a temporary tree in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemPaths {
    /// The sysfs mount point (`/sys`).
    pub sysfs: PathBuf,
    /// The VFIO device directory (`/dev/vfio`).
    pub dev_vfio: PathBuf,
    /// Where ivshm records the driver a device had before it was bound to `vfio-pci`, so that a
    /// later process can restore it (`/run/ivshm-guest`).
    pub state_dir: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> Self {
        SystemPaths {
            sysfs: PathBuf::from("/sys"),
            dev_vfio: PathBuf::from("/dev/vfio"),
            state_dir: PathBuf::from("/run/ivshm-guest"),
        }
    }
}

impl SystemPaths {
    /// `<sysfs>/bus/pci/devices`.
    pub fn pci_devices(&self) -> PathBuf {
        self.sysfs.join("bus/pci/devices")
    }

    /// `<sysfs>/bus/pci/devices/<address>`.
    pub fn pci_device(&self, address: PciAddress) -> PathBuf {
        self.pci_devices().join(address.to_string())
    }

    /// `<sysfs>/bus/pci/drivers/<driver>`.
    pub fn pci_driver(&self, driver: &str) -> PathBuf {
        self.sysfs.join("bus/pci/drivers").join(driver)
    }

    /// `<sysfs>/bus/pci/drivers_probe`.
    pub fn pci_drivers_probe(&self) -> PathBuf {
        self.sysfs.join("bus/pci/drivers_probe")
    }
}

/// Failure to read PCI information from sysfs.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum DiscoveryError {
    /// cannot read {path}: {error}
    ///
    /// A sysfs file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// unexpected contents in {path}: `{text}`
    ///
    /// A sysfs file does not hold what the kernel writes there.
    BadValue {
        /// The file.
        path: PathBuf,
        /// Its contents (trimmed, truncated).
        text: String,
    },
    /// {path}: {error}
    ///
    /// The `resource` file is malformed.
    Resource {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        error: ResourceParseError,
    },
    /// {path} does not exist: is sysfs mounted (mount -t sysfs sysfs /sys)?
    ///
    /// There is no PCI bus in sysfs (is sysfs mounted?).
    NoPciBus {
        /// The missing directory.
        path: PathBuf,
    },
}

/// Everything discovery learns about one PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub address: PciAddress,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// 24-bit class code (class, subclass, programming interface).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem_device: u16,
    /// Lines of the `resource` file (index = BAR number for 0..6).
    pub resources: Vec<Resource>,
    /// The MSI-X capability, when config space could be read far enough to find it.
    pub msix: Option<MsixCapability>,
    /// Why the capability list could not be read (e.g. truncated config space as non-root).
    pub capability_error: Option<CapabilityError>,
    /// Name of the bound driver, if any.
    pub driver: Option<String>,
    /// IOMMU group number, if the function is behind an IOMMU.
    pub iommu_group: Option<u32>,
}

impl PciFunction {
    /// The resource of BAR `bar`, if present.
    pub fn bar(&self, bar: usize) -> Option<&Resource> {
        self.resources.get(bar).filter(|r| r.is_present())
    }
}

fn read_text(path: &Path) -> Result<String, DiscoveryError> {
    std::fs::read_to_string(path).map_err(|error| DiscoveryError::Read {
        path: path.to_owned(),
        error,
    })
}

fn parse_hex_value(text: &str) -> Option<u32> {
    let t = text.trim();
    let digits = t.strip_prefix("0x").unwrap_or(t);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

fn read_hex(dir: &Path, name: &str, max: u32) -> Result<u32, DiscoveryError> {
    let path = dir.join(name);
    let text = read_text(&path)?;
    parse_hex_value(&text)
        .filter(|v| *v <= max)
        .ok_or_else(|| DiscoveryError::BadValue {
            path,
            text: text.trim().chars().take(40).collect(),
        })
}

/// The last path component of a symlink's target (`driver` → `vfio-pci`), if the link exists.
fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The driver bound to the function right now (`None`: no driver), read from its `driver` link.
pub fn bound_driver(paths: &SystemPaths, address: PciAddress) -> Option<String> {
    link_name(&paths.pci_device(address).join("driver"))
}

/// Reads one function's information from `<sysfs>/bus/pci/devices/<address>`.
pub fn read_function(
    paths: &SystemPaths,
    address: PciAddress,
) -> Result<PciFunction, DiscoveryError> {
    let dir = paths.pci_device(address);
    let vendor = read_hex(&dir, "vendor", 0xffff)? as u16;
    let device = read_hex(&dir, "device", 0xffff)? as u16;
    let class = read_hex(&dir, "class", 0xff_ffff)?;
    // Older kernels have no `revision` file; the revision is byte 8 of config space.
    let config = std::fs::read(dir.join("config")).unwrap_or_default();
    let revision = match read_hex(&dir, "revision", 0xff) {
        Ok(r) => r as u8,
        Err(_) => config.get(8).copied().unwrap_or(0),
    };
    let subsystem_vendor = read_hex(&dir, "subsystem_vendor", 0xffff)? as u16;
    let subsystem_device = read_hex(&dir, "subsystem_device", 0xffff)? as u16;
    let resource_path = dir.join("resource");
    let resources = parse_resource_file(&read_text(&resource_path)?).map_err(|error| {
        DiscoveryError::Resource {
            path: resource_path,
            error,
        }
    })?;
    let (msix, capability_error) = match find_msix(&config) {
        Ok(m) => (m, None),
        Err(e) => (None, Some(e)),
    };
    let driver = link_name(&dir.join("driver"));
    let iommu_group = link_name(&dir.join("iommu_group")).and_then(|n| n.parse().ok());
    Ok(PciFunction {
        address,
        vendor,
        device,
        class,
        revision,
        subsystem_vendor,
        subsystem_device,
        resources,
        msix,
        capability_error,
        driver,
        iommu_group,
    })
}

/// Lists the addresses of all PCI functions in sysfs, sorted.
pub fn list_addresses(paths: &SystemPaths) -> Result<Vec<PciAddress>, DiscoveryError> {
    let dir = paths.pci_devices();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DiscoveryError::NoPciBus { path: dir })
        }
        Err(error) => return Err(DiscoveryError::Read { path: dir, error }),
    };
    let mut addresses = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| DiscoveryError::Read {
            path: dir.clone(),
            error,
        })?;
        if let Some(address) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            addresses.push(address);
        }
    }
    addresses.sort();
    Ok(addresses)
}

/// Reads just the vendor and device IDs of a function (cheap pre-filter for discovery).
pub fn read_ids(paths: &SystemPaths, address: PciAddress) -> Result<(u16, u16), DiscoveryError> {
    let dir = paths.pci_device(address);
    Ok((
        read_hex(&dir, "vendor", 0xffff)? as u16,
        read_hex(&dir, "device", 0xffff)? as u16,
    ))
}

#[cfg(test)]
pub(crate) mod fake {
    //! The shared fake sysfs tree (`ivshm_test_support::sysfs`), seen through [`SystemPaths`].

    pub use ivshm_test_support::sysfs::{
        config_with_msix, doorbell_resource, plain_resource, FakeFunction, FakeSysfs,
    };

    use super::SystemPaths;

    /// This crate's paths into `tree`.
    pub fn system_paths(tree: &FakeSysfs) -> SystemPaths {
        SystemPaths {
            sysfs: tree.sysfs(),
            dev_vfio: tree.dev_vfio(),
            state_dir: tree.state_dir(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    #[test]
    fn reads_a_function_from_a_fake_sysfs_tree() {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        tmp.add(&FakeFunction {
            driver: Some("vfio-pci"),
            iommu_group: Some(7),
            ..FakeFunction::doorbell("0000:00:03.0")
        });
        tmp.add(&FakeFunction {
            address: "0000:00:01.0",
            vendor: 0x8086,
            device: 0x29c0,
            class: 0x060000,
            resource: String::new(),
            config: config_with_msix(0x8086, 0x29c0, 0),
            driver: None,
            iommu_group: None,
        });
        let addresses = list_addresses(&paths).unwrap();
        assert_eq!(
            addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["0000:00:01.0", "0000:00:03.0"]
        );
        let f = read_function(&paths, addresses[1]).unwrap();
        assert_eq!(
            (f.vendor, f.device, f.class, f.revision),
            (0x1af4, 0x1110, 0x050000, 1)
        );
        assert_eq!((f.subsystem_vendor, f.subsystem_device), (0x1af4, 0x1100));
        assert_eq!(f.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(f.iommu_group, Some(7));
        assert_eq!(f.msix.map(|m| m.table_size), Some(4));
        assert_eq!(f.bar(0).map(|r| r.size()), Some(256));
        assert_eq!(f.bar(2).map(|r| r.size()), Some(4 << 20));
        assert!(f.bar(3).is_none());
        let bridge = read_function(&paths, addresses[0]).unwrap();
        assert_eq!(bridge.driver, None);
        assert_eq!(bridge.iommu_group, None);
        assert_eq!(bridge.msix, None);
    }

    #[test]
    fn truncated_config_is_remembered_not_fatal() {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        let mut config = config_with_msix(0x1af4, 0x1110, 2);
        config.truncate(64);
        tmp.add(&FakeFunction {
            config,
            ..FakeFunction::doorbell("0000:00:04.0")
        });
        let f = read_function(&paths, "00:04.0".parse().unwrap()).unwrap();
        assert_eq!(f.msix, None);
        assert!(matches!(
            f.capability_error,
            Some(CapabilityError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_values_and_missing_bus_are_clear_errors() {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        // A sysfs without a PCI bus.
        std::fs::remove_dir_all(paths.pci_devices()).unwrap();
        assert!(matches!(
            list_addresses(&paths),
            Err(DiscoveryError::NoPciBus { .. })
        ));
        let dir = tmp.add(&FakeFunction {
            config: vec![],
            ..FakeFunction::plain("0000:00:05.0")
        });
        std::fs::write(dir.join("vendor"), "banana\n").unwrap();
        let err = read_function(&paths, "00:05.0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, DiscoveryError::BadValue { .. }), "{err}");
        std::fs::write(dir.join("vendor"), "0x1af4\n").unwrap();
        std::fs::write(dir.join("resource"), "0x1 0x2\n").unwrap();
        let err = read_function(&paths, "00:05.0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, DiscoveryError::Resource { .. }), "{err}");
    }
}
