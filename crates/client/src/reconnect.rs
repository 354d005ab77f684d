//! Reconnecting after the server went away: the retry schedule and its timer.
//!
//! When the server closes the socket, the peer reports [`Event::ServerGone`](crate::Event::ServerGone).
//! With `ConnectOptions { reconnect: true, .. }` it then retries after `reconnect_delay`,
//! doubling the delay after each failure up to `reconnect_max_delay`, and reports
//! [`Event::Reconnected`](crate::Event::Reconnected) when a new handshake completed. The retries are driven by
//! a timerfd inside the peer's epoll set, so a caller's own poll loop wakes up for them too.
//!
//! A reconnect is a new connection: **the id, the shared memory and the peer table may all
//! change**. Re-read `id()`, map the memory again (an old mapping keeps the old memory), and
//! treat the peer list as new. Until then the old eventfds and memory stay usable, as QEMU's
//! spec says peers may keep talking while the server is away.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};

/// Exponential backoff between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles after each attempt, never exceeds `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt; the one after it doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A one-shot monotonic timer fd (non-blocking).
#[derive(Debug)]
pub struct RetryTimer {
    fd: OwnedFd,
}

impl RetryTimer {
    /// A disarmed timer.
    pub fn new() -> Result<Self, Errno> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        Ok(RetryTimer { fd })
    }

    /// The fd, readable once the timer expired.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Fires once after `delay` (a zero delay fires at once).
    pub fn arm(&self, delay: Duration) -> Result<(), Errno> {
        // A zero it_value would disarm; use 1 ns instead.
        let delay = delay.max(Duration::from_nanos(1));
        let value = Timespec::try_from(delay).map_err(|_| Errno::INVAL)?;
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    /// Stops the timer and consumes a pending expiry.
    pub fn disarm(&self) -> Result<(), Errno> {
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        timerfd_settime(
            &self.fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: zero,
            },
        )?;
        self.consume()
    }

    /// Reads the expiry count so the fd is no longer readable.
    pub fn consume(&self) -> Result<(), Errno> {
        let mut buf = [0u8; 8];
        match rustix::io::read(&self.fd, &mut buf) {
            Ok(_) | Err(Errno::AGAIN) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 350, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn timer_fires_and_disarms() {
        let t = RetryTimer::new().unwrap();
        t.arm(Duration::ZERO).unwrap();
        let mut fds = [rustix::event::PollFd::new(
            &t.fd,
            rustix::event::PollFlags::IN,
        )];
        let ten_s = Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        assert_eq!(rustix::event::poll(&mut fds, Some(&ten_s)).unwrap(), 1);
        t.disarm().unwrap();
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut fds = [rustix::event::PollFd::new(
            &t.fd,
            rustix::event::PollFlags::IN,
        )];
        assert_eq!(rustix::event::poll(&mut fds, Some(&zero)).unwrap(), 0);
    }
}
