//! [`DeviceDoorbell`]: an ivshmem device as the doorbell of `ivshm-channel` channels, and
//! [`DeviceMemory`]: its BAR2 as a channel region's memory.
//!
//! - Ringing writes the Doorbell register (`peer << 16 | vector` to BAR0 + 12), in both access
//!   modes. The device drops rings to peers or vectors that do not exist, so an unknown peer
//!   is not an error here (a vector above 255, which the register cannot encode, is).
//! - Waiting, VFIO mode: the vector's MSI-X interrupts arrive on an eventfd; a wait is a
//!   `poll(2)` and a `read(2)` of it, the channel's poll fd is that eventfd.
//! - Waiting without interrupts (sysfs mode, or a device without MSI-X vectors): **polling**.
//!   A wait sleeps one polling interval ([`DEFAULT_POLL_INTERVAL`], 200 µs unless set) and
//!   returns as if rung; the channel then looks at its rings again. The cost: a message can
//!   wait up to one interval longer to be seen, and a sleeping receiver or sender wakes
//!   5,000 times a second (each wake-up a timer interrupt and a look at one ring). There is no
//!   poll fd in this mode. Peers that ring such a device lose nothing: their rings are
//!   dropped by the device, and the polling finds the messages.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use ivshm_channel::{Doorbell, DoorbellError as ChannelDoorbellError, RegionMemory};
use ivshm_mem::SharedView;

use crate::doorbell::{take_eventfd, wait_eventfd, DoorbellError, MAX_DOORBELL_VECTOR};
use crate::mapped_device::MappedDevice;

/// How long a wait without interrupts sleeps before the channel looks again.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_micros(200);

/// How a [`DeviceDoorbell`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeups {
    /// MSI-X interrupts on eventfds (VFIO mode).
    Interrupts,
    /// No interrupts: every wait is one polling interval (see the module documentation).
    Polling {
        /// The interval.
        interval: Duration,
    },
}

/// An opened ivshmem device as a channel doorbell (see the module documentation).
#[derive(Debug)]
pub struct DeviceDoorbell {
    device: Arc<MappedDevice>,
    id: u16,
    vectors: u16,
    wakeups: Wakeups,
}

fn other(e: DoorbellError) -> ChannelDoorbellError {
    ChannelDoorbellError::Other(Box::new(e))
}

impl DeviceDoorbell {
    /// The doorbell of `device`: its own id (IVPosition), interrupts if the device has MSI-X
    /// vectors connected (VFIO mode), else polling every [`DEFAULT_POLL_INTERVAL`] on as many
    /// vectors as the device has (at least one).
    pub fn new(device: Arc<MappedDevice>) -> Result<DeviceDoorbell, DoorbellError> {
        let id = device.id()?;
        let interrupts = device.check_can_wait().is_ok() && device.vector_fd(0).is_ok();
        let (vectors, wakeups) = if interrupts {
            (device.vectors(), Wakeups::Interrupts)
        } else {
            (
                device.vectors().max(1),
                Wakeups::Polling {
                    interval: DEFAULT_POLL_INTERVAL,
                },
            )
        };
        Ok(DeviceDoorbell {
            device,
            id,
            vectors,
            wakeups,
        })
    }

    /// Sets the polling interval (no effect with interrupts); at least 1 µs.
    pub fn set_poll_interval(&mut self, interval: Duration) {
        if let Wakeups::Polling { .. } = self.wakeups {
            self.wakeups = Wakeups::Polling {
                interval: interval.max(Duration::from_micros(1)),
            };
        }
    }

    /// How it waits.
    pub fn wakeups(&self) -> Wakeups {
        self.wakeups
    }

    /// The device.
    pub fn device(&self) -> &Arc<MappedDevice> {
        &self.device
    }

    /// The device's shared memory as a channel region's memory.
    pub fn memory(&self) -> DeviceMemory {
        DeviceMemory(self.device.clone())
    }

    fn check_own(&self, vector: u16) -> Result<(), ChannelDoorbellError> {
        if vector < self.vectors {
            Ok(())
        } else {
            Err(ChannelDoorbellError::UnknownVector {
                peer: self.id,
                vector,
                vectors: self.vectors,
            })
        }
    }
}

/// Waits until the eventfd `fd` is rung (or was) and consumes its count: `Ok(true)` when it
/// was rung, `Ok(false)` when `timeout` passed first (`None`: no limit).
pub(crate) fn wait_rung(
    fd: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> Result<bool, ChannelDoorbellError> {
    Ok(wait_eventfd(fd, timeout.unwrap_or(Duration::MAX))
        .map_err(other)?
        .is_some())
}

/// One polling interval, or less if `timeout` ends first: `true` after a whole interval (the
/// caller looks at its rings as if rung), `false` when the timeout passed.
pub(crate) fn poll_tick(interval: Duration, timeout: Option<Duration>) -> bool {
    match timeout {
        Some(t) if t < interval => {
            std::thread::sleep(t);
            false
        }
        _ => {
            std::thread::sleep(interval);
            true
        }
    }
}

impl Doorbell for DeviceDoorbell {
    fn own_id(&self) -> u16 {
        self.id
    }

    fn vectors(&self) -> u16 {
        self.vectors
    }

    fn ring(&self, peer: u16, vector: u16) -> Result<(), ChannelDoorbellError> {
        if vector > MAX_DOORBELL_VECTOR {
            return Err(ChannelDoorbellError::UnknownVector {
                peer,
                vector,
                vectors: MAX_DOORBELL_VECTOR + 1,
            });
        }
        self.device.notify(peer, vector).map_err(other)
    }

    fn wait(&self, vector: u16, timeout: Option<Duration>) -> Result<bool, ChannelDoorbellError> {
        self.check_own(vector)?;
        match self.wakeups {
            Wakeups::Interrupts => {
                let fd = self.device.vector_fd(vector).map_err(other)?;
                wait_rung(fd, timeout)
            }
            Wakeups::Polling { interval } => Ok(poll_tick(interval, timeout)),
        }
    }

    fn take(&self, vector: u16) -> Result<bool, ChannelDoorbellError> {
        self.check_own(vector)?;
        match self.wakeups {
            Wakeups::Interrupts => {
                let fd = self.device.vector_fd(vector).map_err(other)?;
                Ok(take_eventfd(fd).map_err(other)? > 0)
            }
            Wakeups::Polling { .. } => Ok(false),
        }
    }

    fn fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        match self.wakeups {
            Wakeups::Interrupts => self.device.vector_fd(vector).ok(),
            Wakeups::Polling { .. } => None,
        }
    }
}

/// A device's shared memory (BAR2) as the memory of a channel region; keeps the device open.
#[derive(Debug, Clone)]
pub struct DeviceMemory(Arc<MappedDevice>);

// SAFETY: the device's BAR2 mapping is made once when it is opened and stays at the same
// address, valid for reads and writes, until the device is dropped, which this value prevents
// (it holds an `Arc`); mappings are page-aligned; the device hands out only `SharedView`s.
unsafe impl RegionMemory for DeviceMemory {
    fn view(&self) -> SharedView<'_> {
        self.0.shared_memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DeviceSelector;
    use crate::mapped_device::{AccessMode, OpenOptions};
    use crate::pci::fake::*;
    use crate::VectorEventfds;
    use ivshm_channel::conformance::{self, Capabilities};
    use ivshm_channel::{FormatOptions, Region};

    /// Two fake doorbell devices (IVPosition 7 and 8) whose BAR2 files are one file.
    fn two_devices(tmp: &FakeSysfs) -> (Arc<MappedDevice>, Arc<MappedDevice>) {
        let size = 1 << 20;
        let open = |address: &str, id| {
            let dir = tmp.add_with_bar_files(
                &FakeFunction {
                    resource: doorbell_resource(size as u64),
                    ..FakeFunction::doorbell(address)
                },
                id,
                size,
            );
            let options = OpenOptions {
                paths: system_paths(tmp),
                mode: Some(AccessMode::Sysfs),
                take_over_driver: false,
            };
            (dir, options, address.to_string())
        };
        let (dir_a, options, a) = open("0000:00:03.0", 7);
        let (dir_b, _, b) = open("0000:00:04.0", 8);
        std::fs::remove_file(dir_b.join("resource2")).unwrap();
        std::fs::hard_link(dir_a.join("resource2"), dir_b.join("resource2")).unwrap();
        let dev = |address: &str| {
            Arc::new(
                MappedDevice::open(DeviceSelector::Address(address.parse().unwrap()), &options)
                    .unwrap(),
            )
        };
        (dev(&a), dev(&b))
    }

    #[test]
    fn sysfs_devices_poll_and_pass_the_conformance_suite() {
        let tmp = FakeSysfs::new();
        let (a, b) = two_devices(&tmp);
        let da = Arc::new(DeviceDoorbell::new(a.clone()).unwrap());
        let db = Arc::new(DeviceDoorbell::new(b.clone()).unwrap());
        assert_eq!(
            da.wakeups(),
            Wakeups::Polling {
                interval: DEFAULT_POLL_INTERVAL
            }
        );
        assert_eq!((da.own_id(), db.own_id(), da.vectors()), (7, 8, 4));
        assert!(da.fd(0).is_none());
        conformance::run_with(
            &*da,
            &*db,
            Capabilities {
                exact_wakeups: false,
                knows_peers: false,
            },
        );
        // A ring is a Doorbell register write: `8 << 16 | 3` in the fake BAR0 file.
        da.ring(8, 3).unwrap();
        let registers =
            std::fs::read(system_paths(&tmp).pci_device(a.address()).join("resource0")).unwrap();
        assert_eq!(&registers[12..16], &0x0008_0003u32.to_le_bytes());
        // Channels between the two devices over the shared BAR2, waking by polling.
        let ra = Region::open_or_format(da.memory(), da.clone(), FormatOptions::default()).unwrap();
        let rb = Region::open(db.memory(), db.clone()).unwrap();
        conformance::channel_round_trips(&ra, &rb, "fake-devices");
        // No fd without interrupts: a caller's poll loop has nothing to wait on.
        assert!(!conformance::channel_poll_loop(&ra, &rb, "fake-poll-loop"));
    }

    /// Stands in for QEMU's routing in VFIO mode: a ring writes the target's eventfd, which
    /// the doorbell waits on with the same code as [`DeviceDoorbell`] (`wait_rung`,
    /// `take_eventfd`).
    #[derive(Debug)]
    struct FakeVfio {
        id: u16,
        fds: Arc<Vec<VectorEventfds>>,
    }

    impl Doorbell for FakeVfio {
        fn own_id(&self) -> u16 {
            self.id
        }
        fn vectors(&self) -> u16 {
            self.fds[usize::from(self.id)].len()
        }
        fn ring(&self, peer: u16, vector: u16) -> Result<(), ChannelDoorbellError> {
            let fds = self
                .fds
                .get(usize::from(peer))
                .ok_or(ChannelDoorbellError::UnknownPeer { peer })?;
            let fd = fds.fd(vector).map_err(other)?;
            rustix::io::write(fd, &1u64.to_ne_bytes())
                .map_err(|errno| ChannelDoorbellError::Sys { op: "write", errno })?;
            Ok(())
        }
        fn wait(
            &self,
            vector: u16,
            timeout: Option<Duration>,
        ) -> Result<bool, ChannelDoorbellError> {
            wait_rung(
                self.fds[usize::from(self.id)].fd(vector).map_err(other)?,
                timeout,
            )
        }
        fn take(&self, vector: u16) -> Result<bool, ChannelDoorbellError> {
            let fd = self.fds[usize::from(self.id)].fd(vector).map_err(other)?;
            Ok(take_eventfd(fd).map_err(other)? > 0)
        }
        fn fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
            self.fds[usize::from(self.id)].fd(vector).ok()
        }
    }

    #[test]
    fn eventfd_waits_pass_the_conformance_suite() {
        let fds = Arc::new(vec![
            VectorEventfds::new(2).unwrap(),
            VectorEventfds::new(2).unwrap(),
        ]);
        let a = FakeVfio {
            id: 0,
            fds: fds.clone(),
        };
        let b = FakeVfio { id: 1, fds };
        conformance::run_all(&a, &b);
        // Channels over them (the memory a memfd): blocking round trips and a caller's poll
        // loop on the vector's eventfd, as under VFIO.
        let bus = ivshm_channel::local::LocalBus::new(1 << 20, 1, 1).unwrap();
        let ra = Region::open_or_format(bus.map().unwrap(), Arc::new(a), FormatOptions::default())
            .unwrap();
        let rb = Region::open(bus.map().unwrap(), Arc::new(b)).unwrap();
        conformance::channel_round_trips(&ra, &rb, "fake-vfio");
        assert!(conformance::channel_poll_loop(
            &ra,
            &rb,
            "fake-vfio-poll-loop"
        ));
    }

    #[test]
    fn polling_ticks_end_at_the_timeout() {
        assert!(!poll_tick(Duration::from_millis(1), Some(Duration::ZERO)));
        assert!(poll_tick(Duration::from_micros(10), None));
        assert!(poll_tick(Duration::from_micros(10), Some(Duration::MAX)));
    }
}
