//! Access without VFIO: enable the function and map its BARs through sysfs `resourceN` files.
//!
//! This mode has **no interrupts**: the device's MSI-X messages cannot reach user space this
//! way, so waiting for a doorbell falls back to polling a location in shared memory
//! ([`crate::doorbell::PollDoorbells`]). Ringing other peers works (it is a register write).

use crate::pci::{PciFunction, SystemPaths};
use ivshm_mem::{MapError, Mapping};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::io::Write;
use std::path::PathBuf;

/// Failures of the sysfs mode.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum SysfsError {
    /// permission denied on {path} ({detail}): mapping PCI resources through sysfs needs root
    ///
    /// Not allowed to open or write a sysfs file.
    Permission {
        /// The file.
        path: PathBuf,
        /// The OS error text.
        detail: String,
    },
    /// enabling the device through {path} failed: {error}
    ///
    /// Writing `enable` failed.
    Enable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// {address} is bound to `{driver}` and its memory decoding is off; unbind it first (e.g.
    /// `ivshm guest ... --mode vfio --restore-driver` or echo {address} > /sys/bus/pci/drivers/{driver}/unbind)
    ///
    /// A bound driver keeps the function disabled, and the kernel refuses to enable it.
    DisabledByDriver {
        /// The function.
        address: String,
        /// The bound driver.
        driver: String,
    },
    /// cannot open {path}: {error}
    ///
    /// Opening a `resourceN` file failed.
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: Errno,
    },
    /// BAR{bar} of {address} is absent or not a memory BAR
    ///
    /// The BAR does not exist or is not memory.
    NoMemoryBar {
        /// The BAR.
        bar: usize,
        /// The function.
        address: String,
    },
    /// BAR{bar} is too large to map ({size} bytes)
    ///
    /// The BAR is larger than the address space.
    TooLarge {
        /// The BAR.
        bar: usize,
        /// Its size.
        size: u64,
    },
    /// the kernel refuses to map {path} while the `{driver}` driver has claimed the BAR (e.g.
    /// another process uses the device through VFIO, such as a running `ivshm guest wait`): use the
    /// device from that process, or stop it (the BARs are released when it exits)
    ///
    /// The kernel refuses the mapping because a driver has claimed the BAR (with
    /// `CONFIG_IO_STRICT_DEVMEM`, as in Debian's kernel), e.g. `vfio-pci` while a process uses
    /// the device through VFIO.
    ClaimedByDriver {
        /// The file.
        path: PathBuf,
        /// The bound driver.
        driver: String,
    },
    /// mapping {path} failed: {error}
    ///
    /// mmap failed.
    Map {
        /// The file.
        path: PathBuf,
        /// The mapping error.
        error: MapError,
    },
}

/// Enables the function (memory decoding) by writing `1` to its `enable` file, unless it
/// already reads as enabled. The kernel refuses that write (EBUSY) while a driver is bound; then
/// the function is usable as long as its Memory Space bit is set (e.g. `vfio-pci` leaves it set
/// when its user closes the device), which is checked in config space instead.
pub fn enable_device(paths: &SystemPaths, function: &PciFunction) -> Result<(), SysfsError> {
    let dir = paths.pci_device(function.address);
    let path = dir.join("enable");
    if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() != "0") {
        return Ok(());
    }
    let result = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"1"));
    match (result, &function.driver) {
        (Ok(()), _) => Ok(()),
        (Err(error), _) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(SysfsError::Permission {
                path,
                detail: error.to_string(),
            })
        }
        (Err(error), Some(driver)) if error.raw_os_error() == Some(Errno::BUSY.raw_os_error()) => {
            if memory_space_enabled(&dir) {
                tracing::debug!(%driver, "the bound driver keeps the device enabled");
                Ok(())
            } else {
                Err(SysfsError::DisabledByDriver {
                    address: function.address.to_string(),
                    driver: driver.clone(),
                })
            }
        }
        (Err(error), _) => Err(SysfsError::Enable { path, error }),
    }
}

/// Whether the Memory Space Enable bit of the command register is set.
fn memory_space_enabled(device_dir: &std::path::Path) -> bool {
    const COMMAND: usize = 4;
    const MEMORY_SPACE: u8 = 1 << 1;
    std::fs::read(device_dir.join("config"))
        .ok()
        .and_then(|config| config.get(COMMAND).copied())
        .is_some_and(|low| low & MEMORY_SPACE != 0)
}

/// Maps the first `len` bytes (the whole BAR if `None`) of memory BAR `bar` through `resourceN`.
pub fn map_bar(
    paths: &SystemPaths,
    function: &PciFunction,
    bar: usize,
    len: Option<usize>,
) -> Result<Mapping, SysfsError> {
    let resource =
        function
            .bar(bar)
            .filter(|r| r.is_memory())
            .ok_or_else(|| SysfsError::NoMemoryBar {
                bar,
                address: function.address.to_string(),
            })?;
    let size = resource.size();
    let bar_len = usize::try_from(size).map_err(|_| SysfsError::TooLarge { bar, size })?;
    let len = len.map_or(bar_len, |l| l.min(bar_len));
    let path = paths
        .pci_device(function.address)
        .join(format!("resource{bar}"));
    let fd = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::SYNC,
        Mode::empty(),
    )
    .map_err(|error| match error {
        Errno::ACCESS | Errno::PERM => SysfsError::Permission {
            path: path.clone(),
            detail: error.to_string(),
        },
        _ => SysfsError::Open {
            path: path.clone(),
            error,
        },
    })?;
    Mapping::map_fd(rustix::fd::AsFd::as_fd(&fd), 0, len)
        .map_err(|error| map_error(path, function.driver.as_deref(), error))
}

/// What a failed mmap of a `resourceN` file means: `EINVAL` on a function with a driver is the
/// kernel's refusal to map a claimed BAR (`iomem_is_exclusive`).
fn map_error(path: PathBuf, driver: Option<&str>, error: MapError) -> SysfsError {
    match (driver, &error) {
        (Some(driver), MapError::Mmap { errno, .. }) if *errno == Errno::INVAL => {
            SysfsError::ClaimedByDriver {
                path,
                driver: driver.to_owned(),
            }
        }
        _ => SysfsError::Map { path, error },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::*;
    use crate::pci::read_function;

    #[test]
    fn enables_and_maps_resource_files() {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        let dir = tmp.add(&FakeFunction::plain("0000:00:04.0"));
        // Regular files stand in for the BARs: 256 bytes of registers, 1 MiB of memory.
        std::fs::write(dir.join("resource0"), vec![0u8; 256]).unwrap();
        std::fs::write(dir.join("resource2"), vec![0u8; 1 << 20]).unwrap();
        let function = read_function(&paths, "00:04.0".parse().unwrap()).unwrap();
        enable_device(&paths, &function).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("enable")).unwrap().trim(),
            "1"
        );
        let memory = map_bar(&paths, &function, 2, None).unwrap();
        assert_eq!(memory.len(), 1 << 20);
        memory.view().write(4096, b"hello").unwrap();
        let on_disk = std::fs::read(dir.join("resource2")).unwrap();
        assert_eq!(&on_disk[4096..4101], b"hello");
        assert!(matches!(
            map_bar(&paths, &function, 1, None),
            Err(SysfsError::NoMemoryBar { bar: 1, .. })
        ));
        let regs = map_bar(&paths, &function, 0, Some(4096)).unwrap();
        assert_eq!(regs.len(), 256);
    }

    #[test]
    fn a_bar_claimed_by_a_driver_is_explained() {
        let path = PathBuf::from("/sys/bus/pci/devices/0000:00:01.0/resource0");
        let refused = || MapError::Mmap {
            len: 256,
            offset: 0,
            errno: Errno::INVAL,
        };
        let claimed = map_error(path.clone(), Some("vfio-pci"), refused());
        assert!(
            matches!(&claimed, SysfsError::ClaimedByDriver { driver, .. } if driver == "vfio-pci"),
            "{claimed}"
        );
        assert!(
            claimed.to_string().contains("ivshm guest wait"),
            "{claimed}"
        );
        assert!(matches!(
            map_error(path.clone(), None, refused()),
            SysfsError::Map { .. }
        ));
        let no_memory = MapError::Mmap {
            len: 256,
            offset: 0,
            errno: Errno::NOMEM,
        };
        assert!(matches!(
            map_error(path, Some("vfio-pci"), no_memory),
            SysfsError::Map { .. }
        ));
    }

    #[test]
    fn memory_space_bit_is_read_from_config() {
        let tmp = FakeSysfs::new();
        let dir = tmp.root().join("dev");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!memory_space_enabled(&dir), "no config file");
        let mut config = vec![0u8; 64];
        std::fs::write(dir.join("config"), &config).unwrap();
        assert!(!memory_space_enabled(&dir));
        config[4] = 0b110;
        std::fs::write(dir.join("config"), &config).unwrap();
        assert!(memory_space_enabled(&dir));
    }
}
