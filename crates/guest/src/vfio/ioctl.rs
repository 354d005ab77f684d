//! The VFIO ioctls this crate uses (`<linux/vfio.h>`), with safe wrappers. The structures and
//! constants are the kernel's, from `vfio-bindings`; the ioctl numbers are built from its
//! `VFIO_TYPE` and `VFIO_BASE` (`_IO(VFIO_TYPE, VFIO_BASE + n)`, as the header defines them).

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode};
use std::ffi::{c_void, CStr};
use vfio_bindings::bindings::vfio as k;

/// The kernel's VFIO constants this crate uses.
pub use k::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_DEVICE_FLAGS_PCI, VFIO_GROUP_FLAGS_CONTAINER_SET,
    VFIO_GROUP_FLAGS_VIABLE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE1_IOMMU,
};

/// `struct vfio_group_status`.
pub type GroupStatus = k::vfio_group_status;
/// `struct vfio_device_info`.
pub type DeviceInfo = k::vfio_device_info;
/// `struct vfio_region_info`: a region's size, flags and offset within the device fd.
pub type RegionInfo = k::vfio_region_info;
/// `struct vfio_irq_info`.
pub type IrqInfo = k::vfio_irq_info;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`.
const fn vfio_io(n: u8) -> Opcode {
    // VFIO_BASE is 100: the sum fits the 8-bit ioctl number for every n used here (< 20).
    opcode::none(k::VFIO_TYPE, k::VFIO_BASE as u8 + n)
}

const VFIO_GET_API_VERSION: Opcode = vfio_io(0);
const VFIO_CHECK_EXTENSION: Opcode = vfio_io(1);
const VFIO_SET_IOMMU: Opcode = vfio_io(2);
const VFIO_GROUP_GET_STATUS: Opcode = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: Opcode = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: Opcode = vfio_io(6);
const VFIO_DEVICE_GET_INFO: Opcode = vfio_io(7);
const VFIO_DEVICE_GET_REGION_INFO: Opcode = vfio_io(8);
const VFIO_DEVICE_GET_IRQ_INFO: Opcode = vfio_io(9);
const VFIO_DEVICE_SET_IRQS: Opcode = vfio_io(10);

/// Whether the region may be mmapped through the device fd.
pub fn is_mappable(region: &RegionInfo) -> bool {
    region.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
}

/// 32-bit words in the fixed part of `struct vfio_irq_set` (before its `data` array).
const IRQ_SET_HEADER_WORDS: usize = std::mem::size_of::<k::vfio_irq_set>() / 4;

/// Builds a `vfio_irq_set` that connects vectors `start..start+fds.len()` of `index` to the
/// given eventfds (`DATA_EVENTFD | ACTION_TRIGGER`); `-1` disconnects a vector. An empty `fds`
/// with `DATA_NONE` disables the index. Returned as 32-bit words (the struct's alignment):
/// `argsz`, `flags`, `index`, `start`, `count`, then the eventfds.
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
        ..Default::default()
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
    use std::mem::offset_of;

    #[test]
    fn irq_set_header_is_five_words_before_data() {
        assert_eq!(IRQ_SET_HEADER_WORDS, 5);
        assert_eq!(offset_of!(k::vfio_irq_set, argsz), 0);
        assert_eq!(offset_of!(k::vfio_irq_set, flags), 4);
        assert_eq!(offset_of!(k::vfio_irq_set, index), 8);
        assert_eq!(offset_of!(k::vfio_irq_set, start), 12);
        assert_eq!(offset_of!(k::vfio_irq_set, count), 16);
        assert_eq!(offset_of!(k::vfio_irq_set, data), 20);
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

    #[test]
    fn mappable_follows_the_mmap_flag() {
        let mut region = RegionInfo::default();
        assert!(!is_mappable(&region));
        region.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP;
        assert!(is_mappable(&region));
    }
}
