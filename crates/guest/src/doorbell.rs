//! ivshmem doorbells: the BAR0 register block, ringing a peer, and waiting for own vectors
//! (MSI-X delivered to eventfds under VFIO, or polling a counter in shared memory otherwise).

use ivshm_mem::SharedView;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// BAR0 offset of IntrMask (revision 0 only).
pub const REG_INTR_MASK: usize = 0;
/// BAR0 offset of IntrStatus (revision 0 only).
pub const REG_INTR_STATUS: usize = 4;
/// BAR0 offset of IVPosition: own peer ID (0 on ivshmem-plain).
pub const REG_IV_POSITION: usize = 8;
/// BAR0 offset of Doorbell: write `(peer << 16) | vector`.
pub const REG_DOORBELL: usize = 12;
/// Size of the ivshmem register block (BAR0).
pub const REGISTER_BLOCK_SIZE: usize = 256;
/// Largest vector a doorbell can name: QEMU decodes only the low 8 bits of the vector field, so a
/// larger value would ring a different vector.
pub const MAX_DOORBELL_VECTOR: u16 = 255;

/// The value written to the Doorbell register to ring `vector` of `peer`.
pub fn doorbell_value(peer: u16, vector: u16) -> u32 {
    (u32::from(peer) << 16) | u32::from(vector)
}

/// Doorbell failures.
#[derive(Debug, thiserror::Error)]
pub enum DoorbellError {
    /// A vector this device does not have.
    #[error("vector {vector} is out of range: this device has {vectors} vector(s) (0..{vectors})")]
    VectorOutOfRange {
        /// The vector asked for.
        vector: u16,
        /// How many the device has.
        vectors: u16,
    },
    /// A vector the Doorbell register cannot encode.
    #[error("vector {vector} cannot be rung: QEMU's ivshmem decodes only vectors 0..={MAX_DOORBELL_VECTOR}")]
    VectorTooLarge {
        /// The vector asked for.
        vector: u16,
    },
    /// Nothing arrived in time.
    #[error("no doorbell on {} within {timeout:?}", vector.map_or("any vector".to_owned(), |v| format!("vector {v}")))]
    Timeout {
        /// The vector waited on (`None`: any).
        vector: Option<u16>,
        /// The timeout.
        timeout: Duration,
    },
    /// The device was opened without interrupts and no polling area was configured.
    #[error(
        "this device has no interrupts in its access mode ({reason}); waiting needs the VFIO mode, or a \
         polling area in shared memory agreed with the sender (set_poll_area / --poll-offset)"
    )]
    NoInterrupts {
        /// Why (e.g. "sysfs mode").
        reason: &'static str,
    },
    /// The polling area does not fit the shared memory.
    #[error("polling area at offset {offset:#x} for {vectors} vector(s) does not fit in {size} bytes of shared memory (or is not 4-byte aligned)")]
    BadPollArea {
        /// Offset of the area.
        offset: usize,
        /// Vectors it must hold.
        vectors: u32,
        /// Shared memory size.
        size: usize,
    },
    /// An eventfd operation failed.
    #[error("eventfd {op} failed: {error}")]
    Eventfd {
        /// Which operation.
        op: &'static str,
        /// The OS error.
        error: Errno,
    },
    /// Ringing a peer failed (e.g. a host peer's unknown target).
    #[error("ringing failed: {0}")]
    Ring(String),
    /// Register access failed.
    #[error("register access failed: {0}")]
    Register(String),
}

fn check_vector(vector: u16, vectors: u16) -> Result<usize, DoorbellError> {
    if vector < vectors {
        Ok(usize::from(vector))
    } else {
        Err(DoorbellError::VectorOutOfRange { vector, vectors })
    }
}

/// A timeout this long is as good as forever (and keeps `Instant` arithmetic in range).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `now + timeout`, capped at [`FOREVER`]: `Instant + Duration` panics on overflow, and
/// timeouts come from users (`--timeout 1e19`).
pub fn deadline_after(timeout: Duration) -> Instant {
    Instant::now() + timeout.min(FOREVER)
}

fn timespec(timeout: Duration) -> Timespec {
    Timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: timeout.subsec_nanos().into(),
    }
}

/// Consumes an eventfd's count without blocking (`fd` must be non-blocking); 0: not rung.
pub fn take_eventfd(fd: BorrowedFd<'_>) -> Result<u64, DoorbellError> {
    let mut value = [0u8; 8];
    loop {
        return match rustix::io::read(fd, &mut value) {
            Ok(8) => Ok(u64::from_ne_bytes(value)),
            Ok(_) => Err(DoorbellError::Eventfd {
                op: "read",
                error: Errno::IO,
            }),
            Err(Errno::AGAIN) => Ok(0),
            Err(Errno::INTR) => continue,
            Err(error) => Err(DoorbellError::Eventfd { op: "read", error }),
        };
    }
}

/// Waits until the non-blocking eventfd `fd` is rung (or was rung before the call) and
/// consumes its count; `Ok(None)` when `timeout` passed first. Use it on the fd of
/// [`VectorEventfds::fd`] or of a host peer's own vector.
pub fn wait_eventfd(fd: BorrowedFd<'_>, timeout: Duration) -> Result<Option<u64>, DoorbellError> {
    let deadline = deadline_after(timeout);
    loop {
        let count = take_eventfd(fd)?;
        if count > 0 {
            return Ok(Some(count));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(None);
        }
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timespec(remaining))) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(error) => return Err(DoorbellError::Eventfd { op: "poll", error }),
        }
    }
}

/// One eventfd per MSI-X vector; vector N's eventfd counts the interrupts of vector N.
#[derive(Debug)]
pub struct VectorEventfds {
    fds: Vec<OwnedFd>,
}

impl VectorEventfds {
    /// Creates `vectors` non-blocking eventfds.
    pub fn new(vectors: u16) -> Result<VectorEventfds, DoorbellError> {
        let fds = (0..vectors)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| DoorbellError::Eventfd {
                op: "create",
                error,
            })?;
        Ok(VectorEventfds { fds })
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        // Created from a u16 count.
        self.fds.len() as u16
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// All eventfds, vector order.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.fds.iter().map(|f| f.as_fd()).collect()
    }

    /// The eventfd of `vector`, for the caller's own poll loop. Readable when a doorbell arrived;
    /// read 8 bytes to consume the count.
    pub fn fd(&self, vector: u16) -> Result<BorrowedFd<'_>, DoorbellError> {
        Ok(self.fds[check_vector(vector, self.len())?].as_fd())
    }

    /// Consumes and returns the doorbell count of `vector` without blocking (0: none pending).
    pub fn take(&self, vector: u16) -> Result<u64, DoorbellError> {
        take_eventfd(self.fd(vector)?)
    }

    /// Waits until `vector` has been rung at least once and returns how many doorbells were
    /// counted (coalesced by the kernel).
    pub fn wait(&self, vector: u16, timeout: Duration) -> Result<u64, DoorbellError> {
        wait_eventfd(self.fd(vector)?, timeout)?.ok_or(DoorbellError::Timeout {
            vector: Some(vector),
            timeout,
        })
    }

    /// Waits until any vector is rung; returns every `(vector, count)` that was pending.
    pub fn wait_any(&self, timeout: Duration) -> Result<Vec<(u16, u64)>, DoorbellError> {
        let deadline = deadline_after(timeout);
        loop {
            let mut rung = Vec::new();
            for vector in 0..self.len() {
                let count = self.take(vector)?;
                if count > 0 {
                    rung.push((vector, count));
                }
            }
            if !rung.is_empty() {
                return Ok(rung);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(DoorbellError::Timeout {
                    vector: None,
                    timeout,
                });
            }
            let mut fds: Vec<PollFd<'_>> = self
                .fds
                .iter()
                .map(|f| PollFd::new(f, PollFlags::IN))
                .collect();
            match poll(&mut fds, Some(&timespec(remaining))) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(error) => return Err(DoorbellError::Eventfd { op: "poll", error }),
            }
        }
    }
}

/// Doorbells without interrupts: a convention over shared memory, for the sysfs mode.
///
/// The receiver owns an area of `vectors` 32-bit counters at `offset` in shared memory (4-byte
/// aligned). A sender rings vector V by incrementing counter V ([`PollDoorbells::ring`]) — in
/// addition to, or instead of, the Doorbell register. The receiver *polls* counter V until it
/// changes ([`PollDoorbells::wait`]): this burns CPU and adds latency; it exists because the
/// sysfs mode cannot receive MSI-X interrupts.
#[derive(Debug)]
pub struct PollDoorbells {
    offset: usize,
    last_seen: Vec<AtomicU32>,
}

impl PollDoorbells {
    /// Sets up the area at `offset` with `vectors` counters, remembering their current values.
    pub fn new(
        memory: SharedView<'_>,
        offset: usize,
        vectors: u16,
    ) -> Result<PollDoorbells, DoorbellError> {
        let mut last_seen = Vec::with_capacity(usize::from(vectors));
        for v in 0..vectors {
            let counter =
                Self::counter(memory, offset, v).map_err(|_| DoorbellError::BadPollArea {
                    offset,
                    vectors: u32::from(vectors),
                    size: memory.len(),
                })?;
            last_seen.push(AtomicU32::new(counter.load(Ordering::Acquire)));
        }
        Ok(PollDoorbells { offset, last_seen })
    }

    /// Offset of the area.
    pub fn offset(&self) -> usize {
        self.offset
    }

    fn counter<'a>(
        memory: SharedView<'a>,
        offset: usize,
        vector: u16,
    ) -> Result<&'a AtomicU32, DoorbellError> {
        let bad = || DoorbellError::BadPollArea {
            offset,
            vectors: u32::from(vector) + 1,
            size: memory.len(),
        };
        // Offsets come from the user: no arithmetic that can overflow.
        let at = offset
            .checked_add(4 * usize::from(vector))
            .ok_or_else(bad)?;
        memory.atomic_u32(at).map_err(|_| bad())
    }

    /// Rings `vector` of a receiver whose area is at `offset` (increments its counter).
    pub fn ring(memory: SharedView<'_>, offset: usize, vector: u16) -> Result<(), DoorbellError> {
        Self::counter(memory, offset, vector)?.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Consumes the advance of counter `vector` since it was last seen, without waiting
    /// (0: not rung).
    pub fn take(&self, memory: SharedView<'_>, vector: u16) -> Result<u64, DoorbellError> {
        let vectors = self.last_seen.len() as u16;
        let index = check_vector(vector, vectors)?;
        let now_value = Self::counter(memory, self.offset, vector)?.load(Ordering::Acquire);
        let before = self.last_seen[index].swap(now_value, Ordering::Relaxed);
        Ok(u64::from(now_value.wrapping_sub(before)))
    }

    /// Polls until one of `vectors` advanced; returns every `(vector, count)` that did.
    fn poll_until(
        &self,
        memory: SharedView<'_>,
        vectors: std::ops::Range<u16>,
        timeout: Duration,
        timeout_vector: Option<u16>,
    ) -> Result<Vec<(u16, u64)>, DoorbellError> {
        let deadline = deadline_after(timeout);
        let mut spins = 0u32;
        loop {
            let mut rung = Vec::new();
            for vector in vectors.clone() {
                let count = self.take(memory, vector)?;
                if count > 0 {
                    rung.push((vector, count));
                }
            }
            if !rung.is_empty() {
                return Ok(rung);
            }
            if Instant::now() >= deadline {
                return Err(DoorbellError::Timeout {
                    vector: timeout_vector,
                    timeout,
                });
            }
            spins = spins.saturating_add(1);
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Polls counter `vector` until it differs from the last value seen; returns by how much it
    /// advanced (like an eventfd count).
    pub fn wait(
        &self,
        memory: SharedView<'_>,
        vector: u16,
        timeout: Duration,
    ) -> Result<u64, DoorbellError> {
        check_vector(vector, self.last_seen.len() as u16)?;
        let rung = self.poll_until(memory, vector..vector + 1, timeout, Some(vector))?;
        Ok(rung.iter().map(|(_, count)| count).sum())
    }

    /// Polls every counter until one advances; returns each `(vector, count)` that did.
    pub fn wait_any(
        &self,
        memory: SharedView<'_>,
        timeout: Duration,
    ) -> Result<Vec<(u16, u64)>, DoorbellError> {
        self.poll_until(memory, 0..self.last_seen.len() as u16, timeout, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_value_encoding() {
        assert_eq!(doorbell_value(0, 0), 0);
        assert_eq!(doorbell_value(1, 2), 0x0001_0002);
        assert_eq!(doorbell_value(0xffff, 0xff), 0xffff_00ff);
        assert_eq!(doorbell_value(3, 0), 3 << 16);
    }

    #[test]
    fn eventfd_vectors_count_and_time_out() {
        let vectors = VectorEventfds::new(4).unwrap();
        assert_eq!(vectors.len(), 4);
        // Ring vector 2 twice the way the kernel does: add 1 to its eventfd counter.
        for _ in 0..2 {
            rustix::io::write(vectors.fd(2).unwrap(), &1u64.to_ne_bytes()).unwrap();
        }
        assert_eq!(vectors.wait(2, Duration::from_secs(5)).unwrap(), 2);
        assert!(matches!(
            vectors.wait(2, Duration::from_millis(10)),
            Err(DoorbellError::Timeout {
                vector: Some(2),
                ..
            })
        ));
        rustix::io::write(vectors.fd(3).unwrap(), &1u64.to_ne_bytes()).unwrap();
        assert_eq!(
            vectors.wait_any(Duration::from_secs(5)).unwrap(),
            vec![(3, 1)]
        );
        assert!(matches!(
            vectors.fd(4),
            Err(DoorbellError::VectorOutOfRange {
                vector: 4,
                vectors: 4
            })
        ));
        assert!(matches!(
            vectors.wait(9, Duration::ZERO),
            Err(DoorbellError::VectorOutOfRange { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_polling_area_or_vector_is_an_error_never_a_panic(
            offset in proptest::prelude::any::<usize>(),
            vector in proptest::prelude::any::<u16>(),
            vectors in 0u16..=u16::MAX,
        ) {
            let mut backing = vec![0u64; 64];
            // SAFETY: `backing` outlives every use of the view in this test case.
            let memory = unsafe { SharedView::from_raw_parts(backing.as_mut_ptr().cast(), 512) };
            let in_bounds = offset
                .checked_add(4 * usize::from(vector) + 4)
                .is_some_and(|end| end <= 512 && offset % 4 == 0);
            proptest::prop_assert_eq!(PollDoorbells::ring(memory, offset, vector).is_ok(), in_bounds);
            let _ = PollDoorbells::new(memory, offset, vectors % 200);
        }
    }

    #[test]
    fn huge_timeouts_are_capped_not_a_panic() {
        let far = deadline_after(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(365 * 24 * 60 * 60));
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
        rustix::io::write(&fd, &1u64.to_ne_bytes()).unwrap();
        assert_eq!(wait_eventfd(fd.as_fd(), Duration::MAX).unwrap(), Some(1));
    }

    #[test]
    fn wait_eventfd_sees_a_ring_from_another_thread_and_times_out_without_one() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
        assert_eq!(take_eventfd(fd.as_fd()).unwrap(), 0);
        std::thread::scope(|s| {
            s.spawn(|| rustix::io::write(&fd, &3u64.to_ne_bytes()).unwrap());
            assert_eq!(
                wait_eventfd(fd.as_fd(), Duration::from_secs(10)).unwrap(),
                Some(3)
            );
        });
        assert_eq!(
            wait_eventfd(fd.as_fd(), Duration::from_millis(10)).unwrap(),
            None
        );
    }

    #[test]
    fn poll_doorbells_see_rings_across_threads() {
        let mut backing = vec![0u64; 64];
        // SAFETY: `backing` outlives every use of the view in this test.
        let memory = unsafe { SharedView::from_raw_parts(backing.as_mut_ptr().cast(), 512) };
        let offset = 64;
        let receiver = PollDoorbells::new(memory, offset, 4).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                PollDoorbells::ring(memory, offset, 1).unwrap();
            });
            assert_eq!(
                receiver.wait(memory, 1, Duration::from_secs(10)).unwrap(),
                1
            );
        });
        assert!(matches!(
            receiver.wait(memory, 1, Duration::from_millis(5)),
            Err(DoorbellError::Timeout { .. })
        ));
        assert!(matches!(
            receiver.wait(memory, 4, Duration::ZERO),
            Err(DoorbellError::VectorOutOfRange { .. })
        ));
        PollDoorbells::ring(memory, offset, 3).unwrap();
        PollDoorbells::ring(memory, offset, 3).unwrap();
        PollDoorbells::ring(memory, offset, 0).unwrap();
        assert_eq!(
            receiver.wait_any(memory, Duration::from_secs(10)).unwrap(),
            vec![(0, 1), (3, 2)]
        );
        assert_eq!(receiver.take(memory, 3).unwrap(), 0);
        assert!(matches!(
            PollDoorbells::new(memory, 510, 1),
            Err(DoorbellError::BadPollArea { .. })
        ));
        let mut bytes = [0u8; 4];
        memory.read(offset + 4, &mut bytes).unwrap();
        assert_eq!(u32::from_ne_bytes(bytes), 1);
    }
}
