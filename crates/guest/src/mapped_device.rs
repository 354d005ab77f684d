//! An open ivshmem device ([`MappedDevice`]): opening it in one of the two [`AccessMode`]s,
//! its registers, shared memory, doorbells and the driver binding.

use crate::discovery::{find_device, DeviceKind, DeviceSelector, FoundDevice, SelectError};
use crate::doorbell::{self, doorbell_value, DoorbellError, PollDoorbells, VectorEventfds};
use crate::pci::{PciAddress, SystemPaths};
use crate::sysfs_access::{self, SysfsError};
use crate::vfio::ioctl::{RegionInfo, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX};
use crate::vfio::{self, VfioError};
use crate::vfio::{DriverBinding, VfioDevice};
use ivshm_mem::Mapping;
use ivshm_mem::SharedView;
use rustix::fd::BorrowedFd;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// BAR0's length as a mapping length (0x100 fits every `usize`).
const REGISTERS_LEN: usize = doorbell::REGISTERS_BAR_SIZE as usize;

/// A BAR0 offset as an offset into the mapped registers; one that does not fit `usize` becomes
/// `usize::MAX`, which the view's bounds check refuses.
fn view_offset(offset: u64) -> usize {
    usize::try_from(offset).unwrap_or(usize::MAX)
}

/// How the device's BARs and interrupts are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// Through `vfio-pci`: BARs mapped via VFIO, MSI-X vectors delivered to eventfds.
    Vfio,
    /// Through sysfs `resourceN` files: BARs only, no interrupts (waiting polls shared memory).
    Sysfs,
}

impl AccessMode {
    /// The default for a kind: VFIO for doorbell devices (to receive interrupts), sysfs otherwise.
    pub fn default_for(kind: DeviceKind) -> AccessMode {
        if kind.has_doorbells() {
            AccessMode::Vfio
        } else {
            AccessMode::Sysfs
        }
    }
}

impl FromStr for AccessMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vfio" => Ok(AccessMode::Vfio),
            "sysfs" => Ok(AccessMode::Sysfs),
            other => Err(format!(
                "unknown access mode `{other}` (expected vfio or sysfs)"
            )),
        }
    }
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessMode::Vfio => "vfio",
            AccessMode::Sysfs => "sysfs",
        })
    }
}

/// Options for [`MappedDevice::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Where sysfs and `/dev/vfio` are.
    pub paths: SystemPaths,
    /// Access mode; `None` picks [`AccessMode::default_for`] the device kind.
    pub mode: Option<AccessMode>,
    /// VFIO mode: unbind another driver that owns the device (remembered, so that
    /// [`MappedDevice::close_and_restore_driver`] can rebind it). Without it such a device is refused.
    pub take_over_driver: bool,
}

/// Failure to open a device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum OpenError {
    /// {0}
    ///
    /// Finding or selecting the device failed.
    Select(SelectError),
    /// {0}
    ///
    /// The VFIO path failed.
    Vfio(VfioError),
    /// {0}
    ///
    /// The sysfs path failed.
    Sysfs(SysfsError),
    /// {0}
    ///
    /// Setting up the vectors failed.
    Doorbell(DoorbellError),
    /// {address} has no shared-memory BAR2 (ivshmem-plain needs memdev=, ivshmem-doorbell a server)
    ///
    /// The device has no shared memory BAR.
    NoSharedMemory {
        /// The device.
        address: PciAddress,
    },
}

impl From<SelectError> for OpenError {
    fn from(error: SelectError) -> Self {
        Self::Select(error)
    }
}

impl From<VfioError> for OpenError {
    fn from(error: VfioError) -> Self {
        Self::Vfio(error)
    }
}

impl From<SysfsError> for OpenError {
    fn from(error: SysfsError) -> Self {
        Self::Sysfs(error)
    }
}

impl From<DoorbellError> for OpenError {
    fn from(error: DoorbellError) -> Self {
        Self::Doorbell(error)
    }
}

/// How the register block is reached.
enum Registers {
    /// Mapped (sysfs `resource0`, or a VFIO region that allows mmap).
    Mapped(Mapping),
    /// VFIO region without mmap support: pread/pwrite on the device fd.
    VfioRegion(RegionInfo),
}

/// Where doorbells for this process are counted.
enum Waiter<'a> {
    /// MSI-X vectors connected to eventfds (VFIO mode).
    Eventfds(&'a VectorEventfds),
    /// Counters in shared memory (sysfs mode).
    Poll(&'a PollDoorbells),
}

/// An ivshmem device opened and mapped from the guest's user space (the guest side; the device
/// model a VMM runs is `ivshm_vmm::ivshmem::IvshmemDevice`): shared memory, registers and
/// doorbells.
///
/// It is `Send` and `Sync`: one thread may [`wait`](MappedDevice::wait) while others
/// [`notify`](MappedDevice::notify) and use the memory. Only one process can hold a device
/// through VFIO at a time, so sharing the device between threads is how a program both waits
/// and rings in VFIO mode.
pub struct MappedDevice {
    found: FoundDevice,
    mode: AccessMode,
    // Drop order matters: mappings and eventfds go first, then the VFIO fds.
    shared: Mapping,
    registers: Registers,
    eventfds: Option<VectorEventfds>,
    poll: Option<PollDoorbells>,
    vectors: u16,
    vfio: Option<VfioDevice>,
    binding: Option<DriverBinding>,
}

impl fmt::Debug for MappedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedDevice")
            .field("address", &self.found.function.address)
            .field("kind", &self.found.kind)
            .field("mode", &self.mode)
            .field("shared_len", &self.shared.len())
            .field("vectors", &self.vectors)
            .finish_non_exhaustive()
    }
}

impl MappedDevice {
    /// Finds the device named by `selector` and opens it.
    pub fn open(
        selector: DeviceSelector,
        options: &OpenOptions,
    ) -> Result<MappedDevice, OpenError> {
        let found = find_device(&options.paths, selector)?;
        Self::open_found(found, options)
    }

    /// Opens a device found by [`find_devices`](crate::find_devices).
    pub fn open_found(
        found: FoundDevice,
        options: &OpenOptions,
    ) -> Result<MappedDevice, OpenError> {
        if !found.kind.is_supported() {
            return Err(SelectError::Unsupported {
                address: found.function.address,
                kind: found.kind,
            }
            .into());
        }
        if found.function.bar(2).is_none() {
            return Err(OpenError::NoSharedMemory {
                address: found.function.address,
            });
        }
        match options
            .mode
            .unwrap_or_else(|| AccessMode::default_for(found.kind))
        {
            AccessMode::Vfio => Self::open_vfio(found, options),
            AccessMode::Sysfs => Self::open_sysfs(found, options),
        }
    }

    fn open_sysfs(found: FoundDevice, options: &OpenOptions) -> Result<MappedDevice, OpenError> {
        let paths = &options.paths;
        if let Some(driver) = &found.function.driver {
            tracing::warn!(address = %found.function.address, %driver, "device is bound to a driver; mapping its BARs through sysfs anyway");
        }
        sysfs_access::enable_device(paths, &found.function)?;
        let registers = sysfs_access::map_bar(paths, &found.function, 0, Some(REGISTERS_LEN))?;
        let shared = sysfs_access::map_bar(paths, &found.function, 2, None)?;
        let vectors = found.msix_vectors();
        Ok(MappedDevice {
            found,
            mode: AccessMode::Sysfs,
            shared,
            registers: Registers::Mapped(registers),
            eventfds: None,
            poll: None,
            vectors,
            vfio: None,
            binding: None,
        })
    }

    fn open_vfio(found: FoundDevice, options: &OpenOptions) -> Result<MappedDevice, OpenError> {
        let paths = &options.paths;
        let binding = vfio::bind_to_vfio(paths, &found.function, options.take_over_driver)?;
        match Self::open_vfio_bound(&found, paths) {
            Ok((vfio, shared, registers, eventfds)) => Ok(MappedDevice {
                mode: AccessMode::Vfio,
                shared,
                registers,
                vectors: eventfds.len(),
                eventfds: Some(eventfds),
                poll: None,
                vfio: Some(vfio),
                binding: Some(binding),
                found,
            }),
            Err(e) => {
                // Only undo this call's own binding: when the device was already on vfio-pci
                // (e.g. another process holds it: group busy), unbinding would block until that
                // process exits and then take the device away from it.
                if let Err(undo) = binding.undo_own_change() {
                    tracing::warn!(error = %undo, "could not undo the driver binding after a failed open");
                }
                Err(e)
            }
        }
    }

    fn open_vfio_bound(
        found: &FoundDevice,
        paths: &SystemPaths,
    ) -> Result<(VfioDevice, Mapping, Registers, VectorEventfds), OpenError> {
        let address = found.function.address;
        let group = found
            .function
            .iommu_group
            .ok_or(VfioError::NoIommuGroup { address })?;
        let vfio = VfioDevice::open(paths, address, group)?;
        let bar0 = vfio.region_info(VFIO_PCI_BAR0_REGION_INDEX)?;
        let register_len = doorbell::REGISTERS_BAR_SIZE;
        let registers = if vfio::ioctl::is_mappable(&bar0) && bar0.size >= register_len {
            Registers::Mapped(vfio.map_region(&bar0, register_len)?)
        } else if bar0.size >= register_len {
            tracing::debug!(
                "BAR0 is not mmap-able through VFIO (smaller than a page?); using pread/pwrite"
            );
            Registers::VfioRegion(bar0)
        } else {
            return Err(VfioError::BadRegion {
                index: 0,
                size: bar0.size,
                needed: register_len,
            }
            .into());
        };
        let bar2 = vfio.region_info(VFIO_PCI_BAR2_REGION_INDEX)?;
        if !vfio::ioctl::is_mappable(&bar2) || bar2.size == 0 {
            return Err(OpenError::NoSharedMemory { address });
        }
        let shared = vfio.map_region(&bar2, bar2.size)?;
        let vectors = u16::try_from(vfio.msix_count()).unwrap_or(u16::MAX);
        let eventfds = VectorEventfds::new(vectors)?;
        if vectors > 0 {
            vfio.enable_bus_master()?;
            vfio.connect_msix(&eventfds.fds())?;
        }
        Ok((vfio, shared, registers, eventfds))
    }

    /// What was found in sysfs about this device.
    pub fn info(&self) -> &FoundDevice {
        &self.found
    }

    /// The PCI address.
    pub fn address(&self) -> PciAddress {
        self.found.function.address
    }

    /// The access mode in use.
    pub fn mode(&self) -> AccessMode {
        self.mode
    }

    /// The shared memory (BAR2): bounds-checked volatile/atomic access, never plain references.
    pub fn shared_memory(&self) -> SharedView<'_> {
        self.shared.view()
    }

    /// Reads a 32-bit register at `offset` in BAR0 (one 32-bit load).
    pub fn read_register(&self, offset: u64) -> Result<u32, DoorbellError> {
        match &self.registers {
            Registers::Mapped(m) => Ok(m.view().read_u32(view_offset(offset))?),
            Registers::VfioRegion(region) => {
                let mut bytes = [0u8; 4];
                self.vfio_device()?
                    .read_region(region, offset, &mut bytes)?;
                Ok(u32::from_le_bytes(bytes))
            }
        }
    }

    /// Writes a 32-bit register at `offset` in BAR0 (one 32-bit store).
    pub fn write_register(&self, offset: u64, value: u32) -> Result<(), DoorbellError> {
        match &self.registers {
            Registers::Mapped(m) => Ok(m.view().write_u32(view_offset(offset), value)?),
            Registers::VfioRegion(region) => {
                Ok(self
                    .vfio_device()?
                    .write_region(region, offset, &value.to_le_bytes())?)
            }
        }
    }

    fn vfio_device(&self) -> Result<&VfioDevice, DoorbellError> {
        self.vfio.as_ref().ok_or(DoorbellError::VfioClosed)
    }

    /// Own peer ID (the IVPosition register; 0 on ivshmem-plain).
    pub fn id(&self) -> Result<u16, DoorbellError> {
        let value = self.read_register(doorbell::REG_IV_POSITION)?;
        u16::try_from(value).map_err(|_| DoorbellError::BadIvPosition(value))
    }

    /// Rings `vector` of peer `peer` (one 32-bit store of `(peer << 16) | vector` to BAR0+12).
    /// Works in both modes; QEMU silently drops doorbells to absent peers or vectors.
    pub fn notify(&self, peer: u16, vector: u16) -> Result<(), DoorbellError> {
        if vector > doorbell::MAX_DOORBELL_VECTOR {
            return Err(DoorbellError::VectorTooLarge { vector });
        }
        self.write_register(doorbell::REG_DOORBELL, doorbell_value(peer, vector))
    }

    /// Number of own vectors: connected MSI-X vectors in VFIO mode; in sysfs mode the MSI-X table
    /// size (the number of counters a polling area holds).
    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    /// Sysfs mode: use the polling area at `offset` in shared memory for [`MappedDevice::wait`]
    /// (see [`PollDoorbells`]). At least one counter is set up even on a device without MSI-X.
    pub fn set_poll_area(&mut self, offset: usize) -> Result<(), DoorbellError> {
        self.poll = Some(PollDoorbells::new(
            self.shared.view(),
            offset,
            self.vectors.max(1),
        )?);
        if self.vectors == 0 {
            self.vectors = 1;
        }
        Ok(())
    }

    /// What [`MappedDevice::wait`] waits on: the vectors' eventfds when there are any, else
    /// the polling area; an error saying why neither is there.
    fn waiter(&self) -> Result<Waiter<'_>, DoorbellError> {
        match (&self.eventfds, &self.poll) {
            (Some(fds), _) if !fds.is_empty() => Ok(Waiter::Eventfds(fds)),
            (_, Some(poll)) => Ok(Waiter::Poll(poll)),
            (Some(_), None) => Err(DoorbellError::NoInterrupts {
                reason: "the device has no MSI-X vectors",
            }),
            (None, None) => Err(DoorbellError::NoInterrupts {
                reason: "sysfs mode",
            }),
        }
    }

    /// Whether [`MappedDevice::wait`] can work: `Err(NoInterrupts)` in sysfs mode without a
    /// polling area, or on a device without vectors.
    pub fn check_can_wait(&self) -> Result<(), DoorbellError> {
        self.waiter().map(drop)
    }

    /// Waits until own `vector` is rung; returns the count of doorbells (coalesced). VFIO mode:
    /// sleeps on the vector's eventfd. Sysfs mode: polls the polling area (see
    /// [`MappedDevice::set_poll_area`]), or fails with [`DoorbellError::NoInterrupts`] without one.
    pub fn wait(&self, vector: u16, timeout: Duration) -> Result<u64, DoorbellError> {
        match self.waiter()? {
            Waiter::Eventfds(fds) => fds.wait(vector, timeout),
            Waiter::Poll(poll) => poll.wait(self.shared.view(), vector, timeout),
        }
    }

    /// Waits until any own vector is rung; returns each `(vector, count)` that was pending.
    pub fn wait_any(&self, timeout: Duration) -> Result<Vec<(u16, u64)>, DoorbellError> {
        match self.waiter()? {
            Waiter::Eventfds(fds) => fds.wait_any(timeout),
            Waiter::Poll(poll) => poll.wait_any(self.shared.view(), timeout),
        }
    }

    /// The eventfd of own `vector` for the caller's poll loop (VFIO mode): readable when rung;
    /// read 8 bytes to consume the count.
    pub fn vector_fd(&self, vector: u16) -> Result<BorrowedFd<'_>, DoorbellError> {
        match &self.eventfds {
            Some(fds) => fds.fd(vector),
            None => Err(DoorbellError::NoInterrupts {
                reason: "sysfs mode",
            }),
        }
    }

    /// The VFIO driver binding made by `open`, if any (what was bound before, whether we changed it).
    pub fn driver_binding(&self) -> Option<&DriverBinding> {
        self.binding.as_ref()
    }

    /// Closes the device (mappings, eventfds, VFIO fds) and then restores the driver binding
    /// found at open: unbinds `vfio-pci` and rebinds the original driver, if `open` (or an
    /// earlier process, see [`DriverBinding::restore`]) changed it.
    /// Simply dropping the device leaves it bound to `vfio-pci`.
    pub fn close_and_restore_driver(self) -> Result<(), VfioError> {
        let MappedDevice {
            shared,
            registers,
            eventfds,
            vfio,
            binding,
            ..
        } = self;
        if let Some(device) = &vfio {
            if eventfds.as_ref().is_some_and(|e| !e.is_empty()) {
                if let Err(e) = device.disconnect_msix() {
                    tracing::debug!(error = %e, "disconnecting MSI-X before close failed");
                }
            }
        }
        drop((shared, registers, eventfds, vfio));
        match binding {
            Some(b) => b.restore(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::*;

    /// A fake doorbell device whose BARs are regular files: 256 bytes of registers with
    /// IVPosition = 7, and 64 KiB of shared memory.
    fn fake_device(tmp: &FakeSysfs, iommu_group: Option<u32>) -> SystemPaths {
        tmp.add_with_bar_files(
            &FakeFunction {
                resource: doorbell_resource(64 << 10),
                iommu_group,
                ..FakeFunction::doorbell("0000:00:03.0")
            },
            7,
            64 << 10,
        );
        system_paths(tmp)
    }

    fn sysfs_options(paths: SystemPaths) -> OpenOptions {
        OpenOptions {
            paths,
            mode: Some(AccessMode::Sysfs),
            take_over_driver: false,
        }
    }

    #[test]
    fn sysfs_mode_reads_id_rings_and_shares_memory() {
        let tmp = FakeSysfs::new();
        let paths = fake_device(&tmp, None);
        let mut dev =
            MappedDevice::open(DeviceSelector::Only, &sysfs_options(paths.clone())).unwrap();
        assert_eq!(dev.mode(), AccessMode::Sysfs);
        assert_eq!(dev.info().kind, DeviceKind::IvshmemDoorbell);
        assert_eq!(dev.id().unwrap(), 7);
        assert_eq!(dev.vectors(), 4);
        dev.notify(3, 2).unwrap();
        let registers = std::fs::read(paths.pci_device(dev.address()).join("resource0")).unwrap();
        assert_eq!(&registers[12..16], &0x0003_0002u32.to_le_bytes());
        assert!(matches!(
            dev.notify(3, 256),
            Err(DoorbellError::VectorTooLarge { vector: 256 })
        ));
        // Register errors keep their cause, typed, and say it once: in the message, not
        // again as a source (docs/development.md).
        for offset in [256, 2, u64::MAX] {
            let err = dev.read_register(offset).unwrap_err();
            let DoorbellError::RegisterOutOfBounds(ref cause) = err else {
                panic!("not out of bounds: {err}");
            };
            assert_eq!(cause.size, 256, "{err}");
            assert!(err.to_string().ends_with(&cause.to_string()), "{err}");
            assert!(std::error::Error::source(&err).is_none(), "{err}");
            assert!(dev.write_register(offset, 0).is_err());
        }
        // IVPosition (offset 8) overwritten in place, as a device before setup might read.
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(paths.pci_device(dev.address()).join("resource0"))
                .unwrap(),
            &0x1_0000u32.to_le_bytes(),
            8,
        )
        .unwrap();
        assert!(matches!(
            dev.id(),
            Err(DoorbellError::BadIvPosition(0x1_0000))
        ));

        dev.shared_memory().write(100, b"shared").unwrap();
        let memory = std::fs::read(paths.pci_device(dev.address()).join("resource2")).unwrap();
        assert_eq!(&memory[100..106], b"shared");

        // No interrupts in sysfs mode until a polling area is set.
        assert!(matches!(
            dev.check_can_wait(),
            Err(DoorbellError::NoInterrupts { .. })
        ));
        assert!(matches!(
            dev.vector_fd(0),
            Err(DoorbellError::NoInterrupts { .. })
        ));
        dev.set_poll_area(0x1000).unwrap();
        PollDoorbells::ring(dev.shared_memory(), 0x1000, 2).unwrap();
        assert_eq!(dev.wait(2, Duration::from_secs(5)).unwrap(), 1);
        assert!(matches!(
            dev.wait(4, Duration::ZERO),
            Err(DoorbellError::VectorOutOfRange {
                vector: 4,
                vectors: 4
            })
        ));
        dev.close_and_restore_driver().unwrap();
    }

    #[test]
    fn vfio_mode_without_iommu_group_is_explained() {
        let tmp = FakeSysfs::new();
        let paths = fake_device(&tmp, None);
        let options = OpenOptions {
            paths,
            mode: None,
            take_over_driver: false,
        };
        let err = MappedDevice::open(DeviceSelector::Only, &options).unwrap_err();
        assert!(
            matches!(err, OpenError::Vfio(VfioError::NoIommuGroup { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_device_can_be_shared_between_threads() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<MappedDevice>();
    }

    #[test]
    fn a_thread_waits_while_another_rings_through_the_polling_area() {
        let tmp = FakeSysfs::new();
        let paths = fake_device(&tmp, None);
        let mut dev = MappedDevice::open(DeviceSelector::Only, &sysfs_options(paths)).unwrap();
        dev.set_poll_area(0x2000).unwrap();
        let dev = &dev;
        std::thread::scope(|s| {
            let waiter = s.spawn(move || dev.wait_any(Duration::from_secs(30)));
            PollDoorbells::ring(dev.shared_memory(), 0x2000, 3).unwrap();
            assert_eq!(waiter.join().unwrap().unwrap(), vec![(3, 1)]);
        });
    }

    #[test]
    fn default_mode_follows_the_kind() {
        assert_eq!(
            AccessMode::default_for(DeviceKind::IvshmemDoorbell),
            AccessMode::Vfio
        );
        assert_eq!(
            AccessMode::default_for(DeviceKind::IvshmemPlain),
            AccessMode::Sysfs
        );
        assert_eq!("sysfs".parse::<AccessMode>().unwrap(), AccessMode::Sysfs);
        "uio".parse::<AccessMode>().unwrap_err();
    }
}
