//! Doorbells without interrupts, for the sysfs mode: counters in shared memory, polled.

use super::{check_vector, deadline_after, DoorbellError, WaitedOn};
use ivshm_mem::SharedView;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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
                    vector: WaitedOn(timeout_vector),
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
