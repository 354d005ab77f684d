//! VFIO access: bind the function to `vfio-pci`, open container, group and device, map BARs
//! through the region offsets, and connect MSI-X vectors to eventfds.

mod bind;
pub mod ioctl;

pub use bind::{bind_to_vfio, DriverBinding, VFIO_MODULES, VFIO_PCI_DRIVER};

use crate::pci::{PciAddress, SystemPaths};
use ioctl::RegionInfo;
use ivshm_mem::{MapError, Mapping};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Failures of the VFIO path, each saying what to do about it.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum VfioError {
    /// {address} has no IOMMU group, so VFIO cannot use it. The guest needs an IOMMU: boot its
    /// kernel with `intel_iommu=on` (AMD: `amd_iommu=on`) and give the VM one, e.g. QEMU `-machine
    /// q35 -device intel-iommu` (or a real IOMMU on bare metal). Without one, use the sysfs mode
    /// (no interrupts)
    ///
    /// The function has no IOMMU group, so VFIO cannot take it.
    NoIommuGroup {
        /// The function.
        address: PciAddress,
    },
    /// the vfio-pci driver is not loaded; load the modules {VFIO_MODULES:} (e.g. `modprobe
    /// vfio-pci`)
    ///
    /// `vfio-pci` is not registered as a PCI driver.
    ModulesNotLoaded,
    /// {address} is bound to the `{driver}` driver; unbind it (echo {address} > /sys/bus/pci/drivers/{driver}/unbind)
    /// or ask for a take-over (`--take-over`), which unbinds it and can restore it afterwards
    ///
    /// Another driver owns the function.
    BoundElsewhere {
        /// The function.
        address: PciAddress,
        /// The driver bound to it.
        driver: String,
    },
    /// could not bind {address} to vfio-pci (now bound to {driver:?}): {reason}
    ///
    /// Binding to `vfio-pci` did not take effect.
    BindFailed {
        /// The function.
        address: PciAddress,
        /// The driver bound afterwards, if any.
        driver: Option<String>,
        /// What went wrong.
        reason: String,
    },
    /// permission denied on {path} ({detail}): run as root, or give this user access to /dev/vfio/\<group>
    /// and the device's sysfs files
    ///
    /// Not allowed to write a sysfs file or open a VFIO node.
    ///
    /// The message is in `#[displaydoc]` because rustdoc would read its `[`/`<` as markup.
    #[displaydoc("permission denied on {path} ({detail}): run as root, or give this user access to /dev/vfio/<group> and the device's sysfs files")]
    Permission {
        /// The file.
        path: PathBuf,
        /// The OS error text.
        detail: String,
    },
    /// writing {path} failed: {error}
    ///
    /// Writing a sysfs file failed.
    Sysfs {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// cannot open {path}: {error}
    ///
    /// Opening a VFIO node failed.
    Open {
        /// The node.
        path: PathBuf,
        /// The OS error.
        error: Errno,
    },
    /// {path} does not exist: is the device bound to vfio-pci and devtmpfs mounted on /dev?
    ///
    /// The group node does not exist although the function has a group.
    NoGroupNode {
        /// The missing node.
        path: PathBuf,
    },
    /// {path} is busy: another process has this device open through VFIO (only one may, and while
    /// it does the kernel also refuses to map the BARs through sysfs). Ring and access memory from
    /// that process (in the library, share one MappedDevice between threads), or wait for it to
    /// exit
    ///
    /// Another process holds the group open (VFIO allows one user per group).
    GroupBusy {
        /// The group node.
        path: PathBuf,
    },
    /// IOMMU group {group} is not viable: every device in /sys/kernel/iommu_groups/{group}/devices
    /// must be bound to vfio-pci or to no driver
    ///
    /// Some device in the same IOMMU group is bound to a non-VFIO driver.
    GroupNotViable {
        /// The group number.
        group: u32,
    },
    /// unsupported VFIO API version {0} (expected 0)
    ///
    /// An unknown VFIO API version.
    ApiVersion(i32),
    /// the VFIO container supports no type1 IOMMU (is vfio_iommu_type1 loaded?)
    ///
    /// The container supports no type1 IOMMU.
    NoType1Iommu,
    /// {name} failed: {error}
    ///
    /// A VFIO ioctl failed.
    Ioctl {
        /// The ioctl.
        name: &'static str,
        /// The OS error.
        error: Errno,
    },
    /// VFIO region {index} is missing or smaller than {needed} bytes (size {size})
    ///
    /// A BAR region is absent or too small.
    BadRegion {
        /// Region index.
        index: u32,
        /// Its size.
        size: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// mapping VFIO region {index} failed: {error}
    ///
    /// Mapping a region failed.
    Map {
        /// Region index.
        index: u32,
        /// The mapping error.
        error: MapError,
    },
    /// accessing VFIO region {index} at {offset:#x} failed: {error}
    ///
    /// A short or failed pread/pwrite on a region.
    RegionIo {
        /// Region index.
        index: u32,
        /// Offset inside the region.
        offset: u64,
        /// The OS error.
        error: Errno,
    },
}

fn open_node(path: &Path) -> Result<OwnedFd, VfioError> {
    rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|error| open_error(path, error))
}

/// What a failed open of a VFIO node means: a group node is busy while another process has it
/// open, missing when the device is not bound to `vfio-pci`.
fn open_error(path: &Path, error: Errno) -> VfioError {
    let path = path.to_owned();
    match error {
        Errno::ACCESS | Errno::PERM => VfioError::Permission {
            path,
            detail: error.to_string(),
        },
        Errno::NOENT => VfioError::NoGroupNode { path },
        Errno::BUSY => VfioError::GroupBusy { path },
        _ => VfioError::Open { path, error },
    }
}

fn ioctl_err(name: &'static str) -> impl FnOnce(Errno) -> VfioError {
    move |error| VfioError::Ioctl { name, error }
}

/// An open VFIO device: container, group and device file descriptors.
///
/// Dropping it disables MSI-X (the kernel does that when the device fd closes) and releases the
/// group; mappings made from it stay valid until they are dropped.
#[derive(Debug)]
pub struct VfioDevice {
    device: OwnedFd,
    // Kept open for the device's lifetime: closing them detaches the group from the IOMMU.
    _group: OwnedFd,
    _container: OwnedFd,
    msix_count: u32,
}

impl VfioDevice {
    /// Opens the function `address` in IOMMU group `group` (it must already be bound to `vfio-pci`).
    pub fn open(
        paths: &SystemPaths,
        address: PciAddress,
        group: u32,
    ) -> Result<VfioDevice, VfioError> {
        let container_path = paths.dev_vfio.join("vfio");
        let container = open_node(&container_path).map_err(|e| match e {
            VfioError::NoGroupNode { .. } => VfioError::ModulesNotLoaded,
            other => other,
        })?;
        let version =
            ioctl::get_api_version(container.as_fd()).map_err(ioctl_err("VFIO_GET_API_VERSION"))?;
        if u32::try_from(version).ok() != Some(ioctl::VFIO_API_VERSION) {
            return Err(VfioError::ApiVersion(version));
        }
        let iommu_type = [ioctl::VFIO_TYPE1v2_IOMMU, ioctl::VFIO_TYPE1_IOMMU]
            .into_iter()
            .find(|t| ioctl::check_extension(container.as_fd(), *t).unwrap_or(false))
            .ok_or(VfioError::NoType1Iommu)?;

        let group_fd = open_node(&paths.dev_vfio.join(group.to_string()))?;
        let status =
            ioctl::group_status(group_fd.as_fd()).map_err(ioctl_err("VFIO_GROUP_GET_STATUS"))?;
        if status.flags & ioctl::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::GroupNotViable { group });
        }
        ioctl::group_set_container(group_fd.as_fd(), container.as_fd())
            .map_err(ioctl_err("VFIO_GROUP_SET_CONTAINER"))?;
        ioctl::set_iommu(container.as_fd(), iommu_type).map_err(ioctl_err("VFIO_SET_IOMMU"))?;
        let name = CString::new(address.to_string()).map_err(|_| VfioError::Ioctl {
            name: "VFIO_GROUP_GET_DEVICE_FD",
            error: Errno::INVAL,
        })?;
        let device = ioctl::group_get_device_fd(group_fd.as_fd(), &name)
            .map_err(ioctl_err("VFIO_GROUP_GET_DEVICE_FD"))?;
        let info = ioctl::device_info(device.as_fd()).map_err(ioctl_err("VFIO_DEVICE_GET_INFO"))?;
        let msix_count = if info.num_irqs > ioctl::VFIO_PCI_MSIX_IRQ_INDEX {
            ioctl::irq_info(device.as_fd(), ioctl::VFIO_PCI_MSIX_IRQ_INDEX)
                .map_err(ioctl_err("VFIO_DEVICE_GET_IRQ_INFO"))?
                .count
        } else {
            0
        };
        tracing::debug!(%address, group, iommu_type, regions = info.num_regions, msix_count, "opened VFIO device");
        Ok(VfioDevice {
            device,
            _group: group_fd,
            _container: container,
            msix_count,
        })
    }

    /// The device file descriptor.
    pub fn device_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// Number of MSI-X vectors VFIO offers (0 for a device without MSI-X).
    pub fn msix_count(&self) -> u32 {
        self.msix_count
    }

    /// Information on region `index` (e.g. [`ioctl::VFIO_PCI_BAR2_REGION_INDEX`]).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, VfioError> {
        ioctl::region_info(self.device.as_fd(), index)
            .map_err(ioctl_err("VFIO_DEVICE_GET_REGION_INFO"))
    }

    /// Maps the first `len` bytes of region `index` (which must be mappable and large enough).
    pub fn map_region(&self, region: &RegionInfo, len: u64) -> Result<Mapping, VfioError> {
        let index = region.index;
        if region.size < len || len == 0 {
            return Err(VfioError::BadRegion {
                index,
                size: region.size,
                needed: len.max(1),
            });
        }
        let len = usize::try_from(len).map_err(|_| VfioError::BadRegion {
            index,
            size: region.size,
            needed: len,
        })?;
        Mapping::map_fd(self.device.as_fd(), region.offset, len)
            .map_err(|error| VfioError::Map { index, error })
    }

    /// Reads `buf.len()` bytes at `offset` inside a region, with one `pread`.
    pub fn read_region(
        &self,
        region: &RegionInfo,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VfioError> {
        let err = |error| VfioError::RegionIo {
            index: region.index,
            offset,
            error,
        };
        let n = rustix::io::pread(&self.device, &mut *buf, region.offset + offset).map_err(err)?;
        if n != buf.len() {
            return Err(err(Errno::IO));
        }
        Ok(())
    }

    /// Writes `data` at `offset` inside a region, with one `pwrite` (a 4-byte write is one
    /// 32-bit store to the device).
    pub fn write_region(
        &self,
        region: &RegionInfo,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VfioError> {
        let err = |error| VfioError::RegionIo {
            index: region.index,
            offset,
            error,
        };
        let n = rustix::io::pwrite(&self.device, data, region.offset + offset).map_err(err)?;
        if n != data.len() {
            return Err(err(Errno::IO));
        }
        Ok(())
    }

    /// Sets Memory Space and Bus Master Enable in the command register: the device's MSI-X
    /// messages are memory writes, which a function without bus mastering cannot send.
    pub fn enable_bus_master(&self) -> Result<(), VfioError> {
        const COMMAND: u64 = 4;
        const MEMORY_SPACE: u16 = 1 << 1;
        const BUS_MASTER: u16 = 1 << 2;
        let config = self.region_info(ioctl::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut bytes = [0u8; 2];
        self.read_region(&config, COMMAND, &mut bytes)?;
        let command = u16::from_le_bytes(bytes);
        let wanted = command | MEMORY_SPACE | BUS_MASTER;
        if wanted != command {
            self.write_region(&config, COMMAND, &wanted.to_le_bytes())?;
        }
        Ok(())
    }

    /// Connects MSI-X vectors `0..eventfds.len()` to the given eventfds: each MSI-X message the
    /// device sends on vector N increments eventfd N.
    pub fn connect_msix(&self, eventfds: &[BorrowedFd<'_>]) -> Result<(), VfioError> {
        let raw: Vec<i32> = eventfds.iter().map(|fd| fd.as_raw_fd()).collect();
        let mut irq_set = ioctl::irq_set_eventfds(ioctl::VFIO_PCI_MSIX_IRQ_INDEX, 0, &raw);
        ioctl::set_irqs(&self.device, &mut irq_set).map_err(ioctl_err("VFIO_DEVICE_SET_IRQS"))
    }

    /// Disconnects all MSI-X vectors (disables MSI-X).
    pub fn disconnect_msix(&self) -> Result<(), VfioError> {
        let mut irq_set = ioctl::irq_set_eventfds(ioctl::VFIO_PCI_MSIX_IRQ_INDEX, 0, &[]);
        ioctl::set_irqs(&self.device, &mut irq_set).map_err(ioctl_err("VFIO_DEVICE_SET_IRQS"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_failures_say_what_to_do() {
        let group = Path::new("/dev/vfio/3");
        let busy = open_error(group, Errno::BUSY);
        assert!(matches!(busy, VfioError::GroupBusy { .. }));
        assert!(
            busy.to_string()
                .contains("another process has this device open"),
            "{busy}"
        );
        let denied = open_error(group, Errno::ACCESS);
        assert!(matches!(denied, VfioError::Permission { .. }));
        assert!(denied.to_string().contains("run as root"), "{denied}");
        assert!(matches!(
            open_error(group, Errno::PERM),
            VfioError::Permission { .. }
        ));
        let missing = open_error(group, Errno::NOENT);
        assert!(
            missing.to_string().contains("bound to vfio-pci"),
            "{missing}"
        );
        assert!(matches!(
            open_error(group, Errno::NODEV),
            VfioError::Open { .. }
        ));
    }
}
