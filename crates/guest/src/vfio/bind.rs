//! Binding a PCI function to `vfio-pci` through `driver_override` + `drivers_probe`, and
//! restoring the driver it had before.

use super::VfioError;
use crate::pci::{bound_driver, PciAddress, PciFunction, SystemPaths};
use std::io::Write;
use std::path::Path;

/// The kernel driver VFIO user space needs.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";
/// The modules to load, in order, for `vfio-pci` on Debian's kernel.
pub const VFIO_MODULES: &str = "irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci";

/// A function bound to `vfio-pci` by [`bind_to_vfio`], with what is needed to undo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverBinding {
    address: PciAddress,
    paths: SystemPaths,
    /// The driver the function had before (unbound by us), if any.
    original_driver: Option<String>,
    /// Whether we changed anything (false if it was already on `vfio-pci`).
    changed: bool,
    /// Whether an earlier process bound it and recorded the original driver.
    recorded: bool,
}

impl DriverBinding {
    /// The driver the function was bound to before, if any.
    pub fn original_driver(&self) -> Option<&str> {
        self.original_driver.as_deref()
    }

    /// Whether binding changed anything.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Undoes what [`bind_to_vfio`] changed in this call, and nothing else: a function that was
    /// already on `vfio-pci` (bound by an earlier process, which may still be using it) is left
    /// alone, record included. For cleaning up after a failed open; to give the device back to
    /// its original driver on request, use [`DriverBinding::restore`].
    pub fn undo_own_change(self) -> Result<(), VfioError> {
        if self.changed {
            self.restore()
        } else {
            Ok(())
        }
    }

    /// Unbinds from `vfio-pci`, clears `driver_override` and rebinds the original driver (if
    /// there was one). The original driver is the one this binding saw, or, when the function
    /// was already on `vfio-pci`, the one recorded by the process that bound it (in
    /// [`SystemPaths::state_dir`]); without such a record it was on `vfio-pci` before ivshm and
    /// is left there. Call it after every VFIO file descriptor of the device is closed.
    pub fn restore(self) -> Result<(), VfioError> {
        if !self.changed && !self.recorded {
            return Ok(());
        }
        let device_dir = self.paths.pci_device(self.address);
        let address = self.address.to_string();
        write_sysfs(&device_dir.join("driver_override"), "\n")?;
        if bound_driver(&self.paths, self.address).as_deref() == Some(VFIO_PCI_DRIVER) {
            write_sysfs(
                &self.paths.pci_driver(VFIO_PCI_DRIVER).join("unbind"),
                &address,
            )?;
        }
        if let Some(driver) = &self.original_driver {
            write_sysfs(&self.paths.pci_driver(driver).join("bind"), &address)?;
        }
        if let Err(error) = std::fs::remove_file(record_path(&self.paths, self.address)) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%address, %error, "could not remove the driver record");
            }
        }
        tracing::info!(%address, original = ?self.original_driver, "restored driver binding");
        Ok(())
    }
}

fn record_path(paths: &SystemPaths, address: PciAddress) -> std::path::PathBuf {
    paths.state_dir.join(format!("{address}.original-driver"))
}

/// Records the original driver (empty: none) for a later restore; best effort.
fn write_record(paths: &SystemPaths, address: PciAddress, original: Option<&str>) {
    let path = record_path(paths, address);
    let result = std::fs::create_dir_all(&paths.state_dir)
        .and_then(|()| std::fs::write(&path, format!("{}\n", original.unwrap_or(""))));
    if let Err(error) = result {
        tracing::warn!(path = %path.display(), %error, "could not record the original driver; a later process cannot restore it");
    }
}

/// The recorded original driver: `None` without a record, `Some(None)` for "no driver".
fn read_record(paths: &SystemPaths, address: PciAddress) -> Option<Option<String>> {
    let text = std::fs::read_to_string(record_path(paths, address)).ok()?;
    let name = text.trim();
    let valid = !name.contains('/') && name != "." && name != "..";
    Some((!name.is_empty() && valid).then(|| name.to_owned()))
}

/// Writes `text` to an existing sysfs attribute (never creates files).
pub(crate) fn write_sysfs(path: &Path, text: &str) -> Result<(), VfioError> {
    let result = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    result.map_err(|error| {
        if error.kind() == std::io::ErrorKind::PermissionDenied {
            VfioError::Permission {
                path: path.to_owned(),
                detail: error.to_string(),
            }
        } else {
            VfioError::Sysfs {
                path: path.to_owned(),
                error,
            }
        }
    })
}

/// Checks the preconditions of VFIO (IOMMU group, `vfio-pci` loaded) and binds `function` to
/// `vfio-pci`. A function bound to another driver is refused unless `take_over` is set, in
/// which case it is unbound first and remembered for [`DriverBinding::restore`].
pub fn bind_to_vfio(
    paths: &SystemPaths,
    function: &PciFunction,
    take_over: bool,
) -> Result<DriverBinding, VfioError> {
    let address = function.address;
    if function.iommu_group.is_none() {
        return Err(VfioError::NoIommuGroup { address });
    }
    if !paths.pci_driver(VFIO_PCI_DRIVER).is_dir() {
        return Err(VfioError::ModulesNotLoaded);
    }
    let mut binding = DriverBinding {
        address,
        paths: paths.clone(),
        original_driver: None,
        changed: false,
        recorded: false,
    };
    match bound_driver(paths, address) {
        Some(driver) if driver == VFIO_PCI_DRIVER => {
            if let Some(original) = read_record(paths, address) {
                binding.original_driver = original;
                binding.recorded = true;
            }
            return Ok(binding);
        }
        Some(driver) if !take_over => return Err(VfioError::BoundElsewhere { address, driver }),
        Some(driver) => {
            write_sysfs(
                &paths.pci_driver(&driver).join("unbind"),
                &address.to_string(),
            )?;
            tracing::info!(%address, %driver, "unbound from its driver");
            binding.original_driver = Some(driver);
            binding.changed = true;
        }
        None => {}
    }
    write_sysfs(
        &paths.pci_device(address).join("driver_override"),
        VFIO_PCI_DRIVER,
    )?;
    binding.changed = true;
    let probe = write_sysfs(&paths.pci_drivers_probe(), &address.to_string());
    let now = bound_driver(paths, address);
    if now.as_deref() != Some(VFIO_PCI_DRIVER) {
        // Leave the system as we found it before reporting.
        let reason = match probe {
            Err(e) => e.to_string(),
            Ok(()) => "the probe did not bind it".to_owned(),
        };
        let _ = binding.clone().restore();
        return Err(VfioError::BindFailed {
            address,
            driver: now,
            reason,
        });
    }
    write_record(paths, address, binding.original_driver.as_deref());
    tracing::info!(%address, "bound to vfio-pci");
    Ok(binding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::*;
    use crate::pci::read_function;

    fn setup(
        driver: Option<&str>,
        group: Option<u32>,
        load_vfio: bool,
    ) -> (FakeSysfs, SystemPaths, PciFunction) {
        let tmp = FakeSysfs::new();
        let paths = system_paths(&tmp);
        tmp.add(&FakeFunction {
            driver,
            iommu_group: group,
            ..FakeFunction::doorbell("0000:00:03.0")
        });
        std::fs::write(paths.pci_drivers_probe(), "").unwrap();
        if load_vfio {
            let dir = paths.pci_driver(VFIO_PCI_DRIVER);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("unbind"), "").unwrap();
        }
        if let Some(d) = driver {
            std::fs::write(paths.pci_driver(d).join("unbind"), "").unwrap();
            std::fs::write(paths.pci_driver(d).join("bind"), "").unwrap();
        }
        let function = read_function(&paths, "00:03.0".parse().unwrap()).unwrap();
        (tmp, paths, function)
    }

    #[test]
    fn missing_iommu_group_is_explained() {
        let (_tmp, paths, f) = setup(None, None, true);
        let err = bind_to_vfio(&paths, &f, false).unwrap_err();
        assert!(matches!(err, VfioError::NoIommuGroup { .. }));
        let text = err.to_string();
        assert!(
            text.contains("intel_iommu=on") && text.contains("intel-iommu"),
            "{text}"
        );
    }

    #[test]
    fn missing_modules_are_named() {
        let (_tmp, paths, f) = setup(None, Some(3), false);
        let err = bind_to_vfio(&paths, &f, false).unwrap_err();
        assert!(matches!(err, VfioError::ModulesNotLoaded));
        assert!(err.to_string().contains("vfio_iommu_type1"), "{err}");
    }

    #[test]
    fn another_driver_is_refused_without_take_over() {
        let (_tmp, paths, f) = setup(Some("uio_pci_generic"), Some(3), true);
        let err = bind_to_vfio(&paths, &f, false).unwrap_err();
        assert!(
            matches!(&err, VfioError::BoundElsewhere { driver, .. } if driver == "uio_pci_generic")
        );
        assert!(err.to_string().contains("uio_pci_generic"), "{err}");
    }

    #[test]
    fn already_on_vfio_needs_nothing() {
        let (_tmp, paths, f) = setup(Some("vfio-pci"), Some(3), true);
        let binding = bind_to_vfio(&paths, &f, false).unwrap();
        assert!(!binding.changed());
        let override_text =
            std::fs::read_to_string(paths.pci_device(f.address).join("driver_override")).unwrap();
        assert_eq!(override_text, "(null)\n");
        binding.restore().unwrap();
    }

    #[test]
    fn restore_uses_the_record_of_an_earlier_process() {
        let (_tmp, paths, f) = setup(Some("vfio-pci"), Some(3), true);
        std::fs::write(paths.pci_driver("vfio-pci").join("bind"), "").unwrap();
        let uio = paths.pci_driver("uio_pci_generic");
        std::fs::create_dir_all(&uio).unwrap();
        std::fs::write(uio.join("bind"), "").unwrap();
        write_record(&paths, f.address, Some("uio_pci_generic"));
        let binding = bind_to_vfio(&paths, &f, false).unwrap();
        assert!(!binding.changed());
        assert_eq!(binding.original_driver(), Some("uio_pci_generic"));
        binding.restore().unwrap();
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(paths.pci_driver("vfio-pci").join("unbind")),
            "0000:00:03.0"
        );
        assert_eq!(read(uio.join("bind")), "0000:00:03.0");
        assert_eq!(
            read(paths.pci_device(f.address).join("driver_override")),
            "\n"
        );
        assert!(
            read_record(&paths, f.address).is_none(),
            "the record is consumed"
        );
    }

    #[test]
    fn undoing_a_binding_made_by_another_process_touches_nothing() {
        let (_tmp, paths, f) = setup(Some("vfio-pci"), Some(3), true);
        write_record(&paths, f.address, None);
        let binding = bind_to_vfio(&paths, &f, false).unwrap();
        assert!(!binding.changed());
        binding.undo_own_change().unwrap();
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(paths.pci_driver("vfio-pci").join("unbind")), "");
        assert_eq!(
            read(paths.pci_device(f.address).join("driver_override")),
            "(null)\n"
        );
        assert_eq!(
            read_record(&paths, f.address),
            Some(None),
            "the other process's record stays for its restore"
        );
    }

    #[test]
    fn take_over_writes_the_kernel_files_and_undoes_them_when_binding_fails() {
        // The fake tree has no kernel behind it, so the probe cannot bind: the error path must
        // unbind the old driver, try the override, then clear the override and rebind the old driver.
        let (_tmp, paths, f) = setup(Some("uio_pci_generic"), Some(3), true);
        let err = bind_to_vfio(&paths, &f, true).unwrap_err();
        assert!(matches!(err, VfioError::BindFailed { .. }), "{err}");
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(paths.pci_driver("uio_pci_generic").join("unbind")),
            "0000:00:03.0"
        );
        assert_eq!(read(paths.pci_drivers_probe()), "0000:00:03.0");
        assert_eq!(
            read(paths.pci_device(f.address).join("driver_override")),
            "\n"
        );
        assert_eq!(
            read(paths.pci_driver("uio_pci_generic").join("bind")),
            "0000:00:03.0"
        );
    }
}
