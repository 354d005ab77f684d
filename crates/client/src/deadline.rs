//! Deadlines of [`Peer::wait`](crate::Peer::wait) on the monotonic clock, read cheaply.
//!
//! Reading `CLOCK_MONOTONIC` costs tens of nanoseconds (80 ns in a VM here), a noticeable share
//! of a doorbell round trip of two microseconds when every wait reads it twice. A long timeout
//! (at least [`COARSE_ENOUGH`]) does not need that precision: its deadline is taken from
//! `CLOCK_MONOTONIC_COARSE` (the time of the last tick, read without touching the hardware
//! clock), plus one tick so that it never comes early; it may come up to two ticks late
//! (a few milliseconds). Short timeouts use the precise clock. Both clocks count from the same
//! origin, so the timer that wakes a wait is armed from a precise reading either way.

use std::sync::OnceLock;
use std::time::Duration;

use rustix::time::{clock_getres, clock_gettime, ClockId, Timespec};

/// Timeouts from this long up get a coarse deadline (late by at most two ticks).
pub(crate) const COARSE_ENOUGH: Duration = Duration::from_millis(100);

/// A point on the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadline {
    at: Duration,
    /// Read against the coarse clock.
    coarse: bool,
}

fn read(clock: ClockId) -> Duration {
    duration(clock_gettime(clock))
}

fn duration(t: Timespec) -> Duration {
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// The coarse clock's resolution (a tick), read once.
fn coarse_tick() -> Duration {
    static TICK: OnceLock<Duration> = OnceLock::new();
    *TICK.get_or_init(|| duration(clock_getres(ClockId::MonotonicCoarse)))
}

impl Deadline {
    /// `timeout` from now (`None` if it is too far to represent: forever).
    pub(crate) fn after(timeout: Duration) -> Option<Deadline> {
        if timeout >= COARSE_ENOUGH {
            let at = read(ClockId::MonotonicCoarse)
                .checked_add(coarse_tick())?
                .checked_add(timeout)?;
            Some(Deadline { at, coarse: true })
        } else {
            let at = read(ClockId::Monotonic).checked_add(timeout)?;
            Some(Deadline { at, coarse: false })
        }
    }

    /// Whether it has passed (by the clock it was read against).
    pub(crate) fn passed(&self) -> bool {
        let clock = if self.coarse {
            ClockId::MonotonicCoarse
        } else {
            ClockId::Monotonic
        };
        read(clock) >= self.at
    }

    /// Whether it comes no later than `other`.
    pub(crate) fn not_after(&self, other: &Deadline) -> bool {
        self.at <= other.at
    }

    /// How long until it, by the precise clock (to arm a timer).
    pub(crate) fn left(&self) -> Duration {
        self.at.saturating_sub(read(ClockId::Monotonic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_never_come_early() {
        for timeout in [Duration::from_millis(5), Duration::from_millis(150)] {
            let start = std::time::Instant::now();
            let deadline = Deadline::after(timeout).unwrap();
            while !deadline.passed() {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(start.elapsed() >= timeout, "{timeout:?}");
        }
        assert!(Deadline::after(Duration::MAX).is_none());
        let later = Deadline::after(Duration::from_secs(10)).unwrap();
        assert!(later.left() > Duration::from_secs(9));
    }
}
