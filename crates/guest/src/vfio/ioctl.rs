//! The VFIO ioctl structures and numbers this crate uses (from `<linux/vfio.h>`), with safe
//! wrappers. Layouts are checked against the kernel's (via `vfio-bindings`) in the tests.

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode};
use std::ffi::{c_void, CStr};

/// `VFIO_API_VERSION`.
pub const VFIO_API_VERSION: i32 = 0;
/// `VFIO_TYPE1_IOMMU`.
pub const VFIO_TYPE1_IOMMU: u32 = 1;
/// `VFIO_TYPE1v2_IOMMU`.
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;
/// `VFIO_GROUP_FLAGS_VIABLE`: every device in the group is bound to a VFIO driver (or none).
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// `VFIO_GROUP_FLAGS_CONTAINER_SET`.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;
/// `VFIO_DEVICE_FLAGS_PCI`.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_READ`.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_IRQ_SET_DATA_NONE`.
pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// `VFIO_PCI_BAR0_REGION_INDEX`.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// `VFIO_PCI_BAR2_REGION_INDEX`.
pub const VFIO_PCI_BAR2_REGION_INDEX: u32 = 2;
/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// `VFIO_PCI_MSIX_IRQ_INDEX`.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

/// `VFIO_TYPE` (the ioctl group, `';'`).
const VFIO_TYPE: u8 = b';';
/// `VFIO_BASE`.
const VFIO_BASE: u8 = 100;

const VFIO_GET_API_VERSION: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE);
const VFIO_CHECK_EXTENSION: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 1);
const VFIO_SET_IOMMU: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 2);
const VFIO_GROUP_GET_STATUS: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 3);
const VFIO_GROUP_SET_CONTAINER: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 4);
const VFIO_GROUP_GET_DEVICE_FD: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 6);
const VFIO_DEVICE_GET_INFO: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 7);
const VFIO_DEVICE_GET_REGION_INFO: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 8);
const VFIO_DEVICE_GET_IRQ_INFO: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 9);
const VFIO_DEVICE_SET_IRQS: Opcode = opcode::none(VFIO_TYPE, VFIO_BASE + 10);

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStatus {
    /// Size of this structure.
    pub argsz: u32,
    /// `VFIO_GROUP_FLAGS_*`.
    pub flags: u32,
}

/// `struct vfio_device_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size of this structure.
    pub argsz: u32,
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions (BARs, ROM, config, ...).
    pub num_regions: u32,
    /// Number of interrupt indexes.
    pub num_irqs: u32,
    /// Offset of the first capability, if any.
    pub cap_offset: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size of this structure.
    pub argsz: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region index (`VFIO_PCI_*_REGION_INDEX`).
    pub index: u32,
    /// Offset of the first capability, if any.
    pub cap_offset: u32,
    /// Region size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region within the device fd (for pread/pwrite/mmap).
    pub offset: u64,
}

impl RegionInfo {
    /// Whether the region may be mmapped through the device fd.
    pub fn is_mappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Size of this structure.
    pub argsz: u32,
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// Interrupt index (`VFIO_PCI_*_IRQ_INDEX`).
    pub index: u32,
    /// Number of interrupts at that index (MSI-X vectors for the MSI-X index).
    pub count: u32,
}

/// The fixed part of `struct vfio_irq_set` (followed by `count` data elements).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqSetHeader {
    /// Size of the header plus data.
    pub argsz: u32,
    /// `VFIO_IRQ_SET_DATA_*` | `VFIO_IRQ_SET_ACTION_*`.
    pub flags: u32,
    /// Interrupt index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
}

const IRQ_SET_HEADER_WORDS: usize = std::mem::size_of::<IrqSetHeader>() / 4;

/// Builds a `vfio_irq_set` that connects vectors `start..start+fds.len()` of `index` to the
/// given eventfds (`DATA_EVENTFD | ACTION_TRIGGER`); `-1` disconnects a vector. An empty `fds`
/// with `DATA_NONE` disables the index. Returned as 32-bit words (the struct's alignment).
pub fn irq_set_eventfds(index: u32, start: u32, fds: &[i32]) -> Vec<u32> {
    let (flags, count) = if fds.is_empty() {
        (VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0)
    } else {
        (
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            fds.len(),
        )
    };
    let argsz = (IRQ_SET_HEADER_WORDS + count) * 4;
    let mut words = Vec::with_capacity(IRQ_SET_HEADER_WORDS + count);
    // Sizes are bounded by the MSI-X table size (2048), so these conversions cannot truncate.
    words.extend_from_slice(&[argsz as u32, flags, index, start, count as u32]);
    words.extend(fds.iter().map(|fd| *fd as u32));
    words
}

/// An ioctl whose argument is a pointer or an integer and whose result is the return value.
struct RawIoctl {
    opcode: Opcode,
    arg: *mut c_void,
}

// SAFETY: `opcode` and `arg` are passed through unchanged; every constructor below pairs an
// opcode with the argument type the kernel expects for it, and the output is the plain return
// value, which needs no pointer access.
unsafe impl Ioctl for RawIoctl {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// `ioctl(fd, opcode, value)` with an integer argument.
fn ioctl_int(fd: BorrowedFd<'_>, opcode: Opcode, value: usize) -> Result<i32, Errno> {
    // SAFETY: the opcodes passed here (GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU) take an
    // integer argument and never dereference it.
    unsafe {
        rustix::ioctl::ioctl(
            fd,
            RawIoctl {
                opcode,
                arg: value as *mut c_void,
            },
        )
    }
}

/// `ioctl(fd, opcode, &mut *arg)` where the kernel reads and writes `*arg` (at most `argsz` bytes,
/// which callers set to `size_of::<T>()`).
fn ioctl_struct<T>(fd: BorrowedFd<'_>, opcode: Opcode, arg: &mut T) -> Result<i32, Errno> {
    // SAFETY: `arg` is a valid, exclusive `T` for the duration of the call; the VFIO ioctls used
    // with this helper access at most `argsz` = `size_of::<T>()` bytes of it.
    unsafe {
        rustix::ioctl::ioctl(
            fd,
            RawIoctl {
                opcode,
                arg: (arg as *mut T).cast(),
            },
        )
    }
}

/// `VFIO_GET_API_VERSION` on a container.
pub fn get_api_version(container: BorrowedFd<'_>) -> Result<i32, Errno> {
    ioctl_int(container, VFIO_GET_API_VERSION, 0)
}

/// `VFIO_CHECK_EXTENSION`: whether the container supports `extension` (e.g. an IOMMU type).
pub fn check_extension(container: BorrowedFd<'_>, extension: u32) -> Result<bool, Errno> {
    Ok(ioctl_int(container, VFIO_CHECK_EXTENSION, extension as usize)? > 0)
}

/// `VFIO_SET_IOMMU`.
pub fn set_iommu(container: BorrowedFd<'_>, iommu_type: u32) -> Result<(), Errno> {
    ioctl_int(container, VFIO_SET_IOMMU, iommu_type as usize).map(drop)
}

/// `VFIO_GROUP_GET_STATUS`.
pub fn group_status(group: BorrowedFd<'_>) -> Result<GroupStatus, Errno> {
    let mut status = GroupStatus {
        argsz: std::mem::size_of::<GroupStatus>() as u32,
        flags: 0,
    };
    ioctl_struct(group, VFIO_GROUP_GET_STATUS, &mut status)?;
    Ok(status)
}

/// `VFIO_GROUP_SET_CONTAINER`.
pub fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut fd: i32 = container.as_raw_fd();
    ioctl_struct(group, VFIO_GROUP_SET_CONTAINER, &mut fd).map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD` for the device named `name` (its PCI address).
pub fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    let fd = get_device_fd_raw(group, name)?;
    // SAFETY: on success the ioctl returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn get_device_fd_raw(group: BorrowedFd<'_>, name: &CStr) -> Result<i32, Errno> {
    // SAFETY: GROUP_GET_DEVICE_FD reads a NUL-terminated string from the pointer, which `name`
    // provides for the duration of the call; the kernel does not write through it.
    unsafe {
        rustix::ioctl::ioctl(
            group,
            RawIoctl {
                opcode: VFIO_GROUP_GET_DEVICE_FD,
                arg: name.as_ptr() as *mut c_void,
            },
        )
    }
}

/// `VFIO_DEVICE_GET_INFO`.
pub fn device_info(device: BorrowedFd<'_>) -> Result<DeviceInfo, Errno> {
    let mut info = DeviceInfo {
        argsz: std::mem::size_of::<DeviceInfo>() as u32,
        ..Default::default()
    };
    ioctl_struct(device, VFIO_DEVICE_GET_INFO, &mut info)?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
pub fn region_info(device: BorrowedFd<'_>, index: u32) -> Result<RegionInfo, Errno> {
    let mut info = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        index,
        ..Default::default()
    };
    ioctl_struct(device, VFIO_DEVICE_GET_REGION_INFO, &mut info)?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_IRQ_INFO` for interrupt index `index`.
pub fn irq_info(device: BorrowedFd<'_>, index: u32) -> Result<IrqInfo, Errno> {
    let mut info = IrqInfo {
        argsz: std::mem::size_of::<IrqInfo>() as u32,
        index,
        ..Default::default()
    };
    ioctl_struct(device, VFIO_DEVICE_GET_IRQ_INFO, &mut info)?;
    Ok(info)
}

/// `VFIO_DEVICE_SET_IRQS` with a buffer from [`irq_set_eventfds`].
pub fn set_irqs(device: impl AsFd, irq_set: &mut [u32]) -> Result<(), Errno> {
    if irq_set.len() < IRQ_SET_HEADER_WORDS || irq_set[0] as usize != irq_set.len() * 4 {
        return Err(Errno::INVAL);
    }
    set_irqs_raw(device.as_fd(), irq_set)
}

fn set_irqs_raw(device: BorrowedFd<'_>, irq_set: &mut [u32]) -> Result<(), Errno> {
    // SAFETY: `irq_set` is a complete `vfio_irq_set` (header plus data) whose `argsz` equals the
    // buffer length, as checked by `set_irqs`; the kernel reads at most `argsz` bytes.
    unsafe {
        rustix::ioctl::ioctl(
            device,
            RawIoctl {
                opcode: VFIO_DEVICE_SET_IRQS,
                arg: irq_set.as_mut_ptr().cast(),
            },
        )
    }
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use vfio_bindings::bindings::vfio as k;

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<GroupStatus>(), size_of::<k::vfio_group_status>());
        assert_eq!(size_of::<GroupStatus>(), 8);
        assert_eq!(size_of::<DeviceInfo>(), size_of::<k::vfio_device_info>());
        assert_eq!(size_of::<DeviceInfo>(), 24);
        assert_eq!(size_of::<RegionInfo>(), size_of::<k::vfio_region_info>());
        assert_eq!(size_of::<RegionInfo>(), 32);
        assert_eq!(size_of::<IrqInfo>(), size_of::<k::vfio_irq_info>());
        assert_eq!(size_of::<IrqInfo>(), 16);
        assert_eq!(size_of::<IrqSetHeader>(), size_of::<k::vfio_irq_set>());
        assert_eq!(size_of::<IrqSetHeader>(), 20);
    }

    #[test]
    fn field_offsets_match_the_kernel() {
        assert_eq!(
            offset_of!(RegionInfo, size),
            offset_of!(k::vfio_region_info, size)
        );
        assert_eq!(
            offset_of!(RegionInfo, offset),
            offset_of!(k::vfio_region_info, offset)
        );
        assert_eq!(
            offset_of!(RegionInfo, cap_offset),
            offset_of!(k::vfio_region_info, cap_offset)
        );
        assert_eq!(
            offset_of!(DeviceInfo, num_irqs),
            offset_of!(k::vfio_device_info, num_irqs)
        );
        assert_eq!(
            offset_of!(DeviceInfo, cap_offset),
            offset_of!(k::vfio_device_info, cap_offset)
        );
        assert_eq!(
            offset_of!(IrqInfo, count),
            offset_of!(k::vfio_irq_info, count)
        );
        assert_eq!(
            offset_of!(IrqSetHeader, count),
            offset_of!(k::vfio_irq_set, count)
        );
        assert_eq!(offset_of!(k::vfio_irq_set, data), 20);
    }

    #[test]
    fn constants_match_the_kernel() {
        assert_eq!(VFIO_API_VERSION as u32, k::VFIO_API_VERSION);
        assert_eq!(VFIO_TYPE1_IOMMU, k::VFIO_TYPE1_IOMMU);
        assert_eq!(VFIO_TYPE1V2_IOMMU, k::VFIO_TYPE1v2_IOMMU);
        assert_eq!(VFIO_GROUP_FLAGS_VIABLE, k::VFIO_GROUP_FLAGS_VIABLE);
        assert_eq!(
            VFIO_GROUP_FLAGS_CONTAINER_SET,
            k::VFIO_GROUP_FLAGS_CONTAINER_SET
        );
        assert_eq!(VFIO_DEVICE_FLAGS_PCI, k::VFIO_DEVICE_FLAGS_PCI);
        assert_eq!(VFIO_REGION_INFO_FLAG_READ, k::VFIO_REGION_INFO_FLAG_READ);
        assert_eq!(VFIO_REGION_INFO_FLAG_WRITE, k::VFIO_REGION_INFO_FLAG_WRITE);
        assert_eq!(VFIO_REGION_INFO_FLAG_MMAP, k::VFIO_REGION_INFO_FLAG_MMAP);
        assert_eq!(VFIO_IRQ_SET_DATA_NONE, k::VFIO_IRQ_SET_DATA_NONE);
        assert_eq!(VFIO_IRQ_SET_DATA_EVENTFD, k::VFIO_IRQ_SET_DATA_EVENTFD);
        assert_eq!(VFIO_IRQ_SET_ACTION_TRIGGER, k::VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!(VFIO_PCI_BAR0_REGION_INDEX, k::VFIO_PCI_BAR0_REGION_INDEX);
        assert_eq!(VFIO_PCI_BAR2_REGION_INDEX, k::VFIO_PCI_BAR2_REGION_INDEX);
        assert_eq!(
            VFIO_PCI_CONFIG_REGION_INDEX,
            k::VFIO_PCI_CONFIG_REGION_INDEX
        );
        assert_eq!(VFIO_PCI_MSIX_IRQ_INDEX, k::VFIO_PCI_MSIX_IRQ_INDEX);
        assert_eq!(VFIO_TYPE, k::VFIO_TYPE);
        assert_eq!(u32::from(VFIO_BASE), k::VFIO_BASE);
    }

    #[test]
    fn opcodes_are_the_kernels_io_numbers() {
        // _IO(';', 100 + n) = (0x3b << 8) | (100 + n) on x86 and arm.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
    }

    #[test]
    fn irq_set_buffer_has_the_kernel_layout() {
        let words = irq_set_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[10, 11, 12, 13]);
        assert_eq!(
            words,
            vec![
                36,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                2,
                0,
                4,
                10,
                11,
                12,
                13
            ]
        );
        let disable = irq_set_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[]);
        assert_eq!(
            disable,
            vec![
                20,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                2,
                0,
                0
            ]
        );
        let mut bad = vec![99, 0, 0, 0, 0];
        let null = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        assert_eq!(set_irqs(&null, &mut bad), Err(Errno::INVAL));
    }
}
