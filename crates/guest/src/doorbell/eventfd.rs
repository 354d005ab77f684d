//! Doorbells as eventfds: one per MSI-X vector under VFIO (or a host peer's own vectors),
//! counted by the kernel, waited on with `poll`.

use super::{check_vector, deadline_after, timespec, DoorbellError, WaitedOn};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use std::time::{Duration, Instant};

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
            vector: WaitedOn(Some(vector)),
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
                    vector: WaitedOn(None),
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

#[cfg(test)]
mod tests {
    use super::*;

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
                vector: WaitedOn(Some(2)),
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
}
