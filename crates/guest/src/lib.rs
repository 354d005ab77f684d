//! `ivshm-guest`: use QEMU ivshmem devices from Linux guest user space, without a kernel module.
//!
//! - [`discovery::find_devices`] lists ivshmem devices (1af4:1110, plain or doorbell, told apart by
//!   the MSI-X capability) and recognises QNX `guest_shm` (1c05:0001) and Jailhouse ivshmem v2
//!   (110a:4106) devices, which are not supported yet.
//! - [`MappedDevice::open`] maps the device in one of two [`AccessMode`]s:
//!   - **VFIO**: binds the function to `vfio-pci`, maps BAR0/BAR2 through the VFIO region offsets
//!     and connects every MSI-X vector to an eventfd, so doorbells arrive as interrupts;
//!   - **sysfs**: maps `resource0`/`resource2` directly. There are no interrupts: waiting polls a
//!     counter in shared memory agreed with the sender ([`doorbell::PollDoorbells`]).
//!
//! - [`DeviceDoorbell`] makes an opened device the doorbell of `ivshm-channel` message channels
//!   over its shared memory ([`DeviceMemory`]): MSI-X interrupts in VFIO mode, polling without.
//!
//! ```no_run
//! use ivshm_guest::{MappedDevice, OpenOptions, DeviceSelector};
//! use std::time::Duration;
//! let dev = MappedDevice::open(DeviceSelector::Only, &OpenOptions::default())?;
//! dev.shared_memory().write(0, b"hello")?;
//! dev.notify(1, 0)?;                                   // ring vector 0 of peer 1
//! let count = dev.wait(0, Duration::from_secs(5))?;    // wait for our vector 0
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod channel_doorbell;
pub mod discovery;
pub mod doorbell;
mod mapped_device;
pub mod pci;
pub mod pingpong;
pub mod sysfs_access;
pub mod vfio;

pub use channel_doorbell::{DeviceDoorbell, DeviceMemory, Wakeups};
pub use discovery::{
    find_device, find_devices, DeviceKind, DeviceSelector, FoundDevice, SelectError,
};
pub use doorbell::{doorbell_value, DoorbellError, PollDoorbells, VectorEventfds};
pub use ivshm_mem::SharedView;
pub use mapped_device::{AccessMode, MappedDevice, OpenError, OpenOptions};
pub use pci::{PciAddress, SystemPaths};
pub use sysfs_access::SysfsError;
pub use vfio::VfioError;
