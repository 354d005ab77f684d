//! The one place where the model checker is switched in.
//!
//! Normal builds use `std`'s atomics, fences, mutexes and clocks. With `--cfg loom`
//! (`RUSTFLAGS="--cfg loom"`, see `tests/loom.rs`) the same names come from `loom`, which runs
//! the channel code under every interleaving and every weak-memory outcome allowed by the C11
//! model (within its preemption bound). Everything above this module is the code that ships.
//!
//! Time does not exist in the model: a deadline never expires and a spin budget is one
//! iteration, so that loom's exploration stays deterministic.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

use std::time::{Duration, Instant};

/// A timeout this long is as good as forever (and keeps `Instant` arithmetic in range).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A point in time to give up at, or never.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    /// `now + timeout`; `None` or a timeout of 100 years and more never expires (no overflow
    /// panic on `Duration::MAX`).
    pub(crate) fn after(timeout: Option<Duration>) -> Deadline {
        match timeout {
            Some(t) if t < FOREVER => Deadline(Instant::now().checked_add(t)),
            _ => Deadline(None),
        }
    }

    /// Time left (`None`: forever); zero once expired.
    #[cfg(not(loom))]
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.0
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// In the model: always forever.
    #[cfg(loom)]
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let _ = self.0;
        None
    }

    /// True once the deadline passed.
    pub(crate) fn expired(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }
}

/// Spins while `budget` lasts: returns false once it is used up. `started` is set on the first
/// call. In the model, a non-zero budget is exactly one spin.
#[cfg(not(loom))]
pub(crate) fn keep_spinning(
    budget: Option<Duration>,
    started: &mut Option<Instant>,
    turns: &mut u32,
) -> bool {
    match budget {
        Some(b) if b.is_zero() => false,
        None => {
            std::hint::spin_loop();
            true
        }
        Some(b) => {
            *turns = turns.wrapping_add(1);
            // The clock costs ~20 ns (vDSO): look at it every 16 turns only.
            if *turns % 16 == 1 {
                let now = Instant::now();
                let start = *started.get_or_insert(now);
                if now.saturating_duration_since(start) >= b {
                    return false;
                }
            }
            std::hint::spin_loop();
            true
        }
    }
}

/// In the model: one yield for any non-zero budget, none for zero; busy-polling yields forever.
#[cfg(loom)]
pub(crate) fn keep_spinning(
    budget: Option<Duration>,
    _started: &mut Option<Instant>,
    turns: &mut u32,
) -> bool {
    match budget {
        Some(b) if b.is_zero() => false,
        _ if *turns >= 1 && budget.is_some() => false,
        _ => {
            *turns += 1;
            loom::thread::yield_now();
            true
        }
    }
}

/// Locks a mutex, ignoring poisoning (the protected state stays consistent: every update is a
/// single assignment).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(loom))]
    {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    #[cfg(loom)]
    {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Waits on a condition variable for at most `timeout` (forever: `None`).
pub(crate) fn wait_on<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Option<Duration>,
) -> MutexGuard<'a, T> {
    #[cfg(not(loom))]
    {
        match timeout {
            Some(t) => match cv.wait_timeout(guard, t) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            },
            None => cv.wait(guard).unwrap_or_else(|e| e.into_inner()),
        }
    }
    #[cfg(loom)]
    {
        let _ = timeout;
        cv.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
}
