//! A fake Linux sysfs tree in a temporary directory, shaped like the kernel's: PCI functions
//! (identity files, `resource`, `config`, `enable`, `driver_override`, optional `resourceN`
//! BAR files), drivers with `bind`/`unbind`, IOMMU groups, `drivers_probe`. Guest-side code
//! (`ivshm-guest`, `ivshm guest`) is tested against it without a VM.
//!
//! Layout under [`FakeSysfs::root`]: `sys/` is the sysfs mount ([`FakeSysfs::sysfs`]), with
//! `dev/vfio/` and `run/ivshm-guest/` next to it for the VFIO nodes and the guest's state.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ivshm_proto::ivshmem::{REGISTERS_BAR_SIZE, REG_IV_POSITION};

/// PCI capability ID of MSI-X.
const CAP_ID_MSIX: u8 = 0x11;

/// A fake sysfs tree, removed on drop. Every method panics on I/O errors (test code).
#[derive(Debug)]
pub struct FakeSysfs {
    root: PathBuf,
}

impl FakeSysfs {
    /// An empty tree: `sys/bus/pci/devices/` and `sys/bus/pci/drivers_probe`.
    pub fn new() -> FakeSysfs {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "ivshm-fake-sysfs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let tree = FakeSysfs { root };
        std::fs::create_dir_all(tree.sysfs().join("bus/pci/devices")).unwrap();
        std::fs::write(tree.sysfs().join("bus/pci/drivers_probe"), "").unwrap();
        tree
    }

    /// The temporary directory holding everything.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sysfs mount point (`/sys`).
    pub fn sysfs(&self) -> PathBuf {
        self.root.join("sys")
    }

    /// The VFIO device directory (`/dev/vfio`), not created.
    pub fn dev_vfio(&self) -> PathBuf {
        self.root.join("dev/vfio")
    }

    /// A state directory (`/run/ivshm-guest`), not created.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("run/ivshm-guest")
    }

    /// The directory of the function at `address` (`0000:00:03.0`).
    pub fn device_dir(&self, address: &str) -> PathBuf {
        self.sysfs().join("bus/pci/devices").join(address)
    }

    /// The directory of `driver`, as loading its module creates it (with `bind` and `unbind`).
    pub fn load_driver(&self, driver: &str) -> PathBuf {
        let dir = self.sysfs().join("bus/pci/drivers").join(driver);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["bind", "unbind"] {
            if !dir.join(file).exists() {
                std::fs::write(dir.join(file), "").unwrap();
            }
        }
        dir
    }

    /// Adds a function with the files discovery reads (its driver loaded and linked, its IOMMU
    /// group created and linked, when it has them) and returns its directory.
    pub fn add(&self, f: &FakeFunction<'_>) -> PathBuf {
        let dir = self.device_dir(f.address);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("vendor", format!("0x{:04x}\n", f.vendor));
        write("device", format!("0x{:04x}\n", f.device));
        write("class", format!("0x{:06x}\n", f.class));
        write("revision", "0x01\n".into());
        write("subsystem_vendor", "0x1af4\n".into());
        write("subsystem_device", "0x1100\n".into());
        write("resource", f.resource.clone());
        write("enable", "0\n".into());
        write("driver_override", "(null)\n".into());
        std::fs::write(dir.join("config"), &f.config).unwrap();
        if let Some(driver) = f.driver {
            let driver_dir = self.load_driver(driver);
            std::os::unix::fs::symlink(driver_dir, dir.join("driver")).unwrap();
        }
        if let Some(group) = f.iommu_group {
            let group_dir = self
                .sysfs()
                .join("kernel/iommu_groups")
                .join(group.to_string());
            std::fs::create_dir_all(&group_dir).unwrap();
            std::os::unix::fs::symlink(group_dir, dir.join("iommu_group")).unwrap();
        }
        dir
    }

    /// [`add`](Self::add)s an ivshmem function with regular files standing in for its BARs,
    /// which the sysfs access mode maps: `resource0`, 256 bytes of registers with IVPosition
    /// `own_id`, and `resource2`, `shared_size` zero bytes (the function's `resource` file
    /// should give BAR2 that size, e.g. [`doorbell_resource`]`(shared_size)`).
    pub fn add_with_bar_files(
        &self,
        f: &FakeFunction<'_>,
        own_id: u32,
        shared_size: usize,
    ) -> PathBuf {
        let dir = self.add(f);
        let mut registers = vec![0u8; REGISTERS_BAR_SIZE as usize];
        let at = REG_IV_POSITION as usize;
        registers[at..at + 4].copy_from_slice(&own_id.to_le_bytes());
        std::fs::write(dir.join("resource0"), registers).unwrap();
        std::fs::write(dir.join("resource2"), vec![0u8; shared_size]).unwrap();
        dir
    }
}

impl Default for FakeSysfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Description of one fake PCI function.
#[derive(Debug, Clone)]
pub struct FakeFunction<'a> {
    /// PCI address, `0000:00:03.0`.
    pub address: &'a str,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (24 bits).
    pub class: u32,
    /// The `resource` file.
    pub resource: String,
    /// The `config` file (config space).
    pub config: Vec<u8>,
    /// The bound driver, if any.
    pub driver: Option<&'a str>,
    /// The IOMMU group, if any.
    pub iommu_group: Option<u32>,
}

impl<'a> FakeFunction<'a> {
    /// An ivshmem-doorbell with 4 MSI-X vectors and a 4 MiB BAR2, no driver, no IOMMU group.
    pub fn doorbell(address: &'a str) -> FakeFunction<'a> {
        FakeFunction {
            address,
            vendor: 0x1af4,
            device: 0x1110,
            class: 0x050000,
            resource: doorbell_resource(4 << 20),
            config: config_with_msix(0x1af4, 0x1110, 4),
            driver: None,
            iommu_group: None,
        }
    }

    /// An ivshmem-plain (no MSI-X, no BAR1) with a 1 MiB BAR2.
    pub fn plain(address: &'a str) -> FakeFunction<'a> {
        FakeFunction::other(address, 0x1af4, 0x1110)
    }

    /// Any other function: the plain layout (BAR0, BAR2 of 1 MiB) and no MSI-X, with these IDs.
    pub fn other(address: &'a str, vendor: u16, device: u16) -> FakeFunction<'a> {
        FakeFunction {
            vendor,
            device,
            resource: plain_resource(1 << 20),
            config: config_with_msix(vendor, device, 0),
            ..FakeFunction::doorbell(address)
        }
    }
}

/// The `resource` file of an ivshmem-doorbell as QEMU's q35 places it: BAR0 256 B registers,
/// BAR1 4 KiB MSI-X, BAR2 `shared_size` bytes 64-bit prefetchable, BAR3-5 and the ROM unused.
pub fn doorbell_resource(shared_size: u64) -> String {
    format!(
        "0x00000000fea00000 0x00000000fea000ff 0x0000000000040200\n\
         0x00000000fea01000 0x00000000fea01fff 0x0000000000040200\n\
         0x0000000200000000 {:#018x} 0x000000000014220c\n{}",
        0x2_0000_0000 + shared_size - 1,
        UNUSED_LINE.repeat(4)
    )
}

/// The `resource` file of an ivshmem-plain: BAR0 256 B, no BAR1, BAR2 `shared_size` bytes.
pub fn plain_resource(shared_size: u64) -> String {
    format!(
        "0x00000000fea00000 0x00000000fea000ff 0x0000000000040200\n{UNUSED_LINE}\
         0x0000000200000000 {:#018x} 0x000000000014220c\n",
        0x2_0000_0000 + shared_size - 1,
    )
}

const UNUSED_LINE: &str = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";

/// 256 bytes of config space with these IDs, revision 1, and an MSI-X capability of `vectors`
/// entries at 0x40 (table in BAR1 at 0, PBA in BAR1 at 0x800), or no capability for 0.
pub fn config_with_msix(vendor: u16, device: u16, vectors: u16) -> Vec<u8> {
    let mut c = vec![0u8; 256];
    c[0..2].copy_from_slice(&vendor.to_le_bytes());
    c[2..4].copy_from_slice(&device.to_le_bytes());
    c[8] = 1;
    if vectors > 0 {
        c[6] = 0x10;
        c[0x34] = 0x40;
        c[0x40] = CAP_ID_MSIX;
        c[0x42..0x44].copy_from_slice(&(vectors - 1).to_le_bytes());
        c[0x44..0x48].copy_from_slice(&1u32.to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&0x801u32.to_le_bytes());
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_files_have_the_kernels_shape() {
        let doorbell = doorbell_resource(4 << 20);
        assert_eq!(doorbell.lines().count(), 7);
        assert_eq!(
            doorbell.lines().nth(2),
            Some("0x0000000200000000 0x00000002003fffff 0x000000000014220c")
        );
        let plain = plain_resource(1 << 20);
        assert_eq!(
            plain,
            "0x00000000fea00000 0x00000000fea000ff 0x0000000000040200\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000200000000 0x00000002000fffff 0x000000000014220c\n"
        );
    }

    #[test]
    fn a_function_has_the_files_discovery_reads() {
        let tree = FakeSysfs::new();
        let dir = tree.add(&FakeFunction {
            driver: Some("vfio-pci"),
            iommu_group: Some(3),
            ..FakeFunction::doorbell("0000:00:03.0")
        });
        assert_eq!(
            std::fs::read_to_string(dir.join("vendor")).unwrap(),
            "0x1af4\n"
        );
        assert_eq!(
            std::fs::read(dir.join("config")).unwrap()[0x40],
            CAP_ID_MSIX
        );
        assert_eq!(
            std::fs::read_link(dir.join("driver")).unwrap(),
            tree.sysfs().join("bus/pci/drivers/vfio-pci")
        );
        assert!(tree
            .sysfs()
            .join("bus/pci/drivers/vfio-pci/unbind")
            .is_file());
        assert!(dir.join("iommu_group").is_dir());
        let dir = tree.add_with_bar_files(&FakeFunction::plain("0000:00:04.0"), 7, 4096);
        let registers = std::fs::read(dir.join("resource0")).unwrap();
        assert_eq!(registers.len(), 256);
        assert_eq!(registers[8..12], 7u32.to_le_bytes());
        assert_eq!(std::fs::read(dir.join("resource2")).unwrap(), vec![0; 4096]);
        let root = tree.root().to_path_buf();
        drop(tree);
        assert!(!root.exists(), "removed on drop");
    }
}
