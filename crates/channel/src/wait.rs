//! Sharing one doorbell vector between the threads of a process.
//!
//! A doorbell vector is one counter (an eventfd): whoever reads it consumes every pending ring.
//! When two threads of one endpoint block at once on the same vector (the sender of a full ring
//! and the receiver of an empty one, or two channels that chose the same vector), a plain
//! `read(2)` in each would let one thread swallow the ring meant for the other: a lost wake-up.
//!
//! [`Hub`] (one per vector and region handle) lets exactly one thread, the leader, block in the
//! doorbell's `wait` (a direct `read(2)` or `poll` of one fd: no epoll, no timer fd); the others
//! wait on a condition variable. Whenever the leader returns it bumps a generation and wakes the
//! followers, so every waiter looks at its ring again. A thread takes the generation *before*
//! it arms its ring and looks a last time, and [`Hub::wait`] returns at once if the generation
//! moved since: a ring consumed by another thread between the look and the wait is never lost.
//!
//! The state is one atomic word (generation, leader flag, follower count), so a lone waiter —
//! the common case — pays three uncontended atomic operations on top of the doorbell's system
//! call and never touches the mutex; the mutex and condition variable serve followers only. A
//! follower counts itself in with the mutex held and then checks the generation; the leader
//! bumps the generation and reads the count in one atomic operation and, if anyone follows,
//! notifies under the mutex: either the follower sees the new generation or the leader sees the
//! follower (and cannot notify before the follower waits, as the follower holds the mutex until
//! then).

use std::time::Duration;

use crate::doorbell::{Doorbell, DoorbellError};
use crate::sync::{lock, wait_on, AtomicU64, Condvar, Deadline, Mutex, Ordering};

/// A leader blocks in the doorbell.
const LEADER: u64 = 1;
/// One follower (bits 1..16 count them).
const FOLLOWER: u64 = 1 << 1;
const FOLLOWERS: u64 = 0x7fff << 1;
/// One generation (bits 16..64).
const GENERATION: u64 = 1 << 16;

/// The waiters of one doorbell vector in this process.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    state: AtomicU64,
    /// Held by followers while they count themselves in and wait, and by a leader that
    /// notifies them.
    followers: Mutex<()>,
    cv: Condvar,
}

impl Hub {
    /// The generation to pass to [`Hub::wait`]; take it before arming.
    pub(crate) fn generation(&self) -> u64 {
        self.state.load(Ordering::Acquire) / GENERATION
    }

    /// Blocks until the vector is rung, the deadline passes, or (as a follower) the leader
    /// returned; returns at once if the generation moved past `seen`.
    pub(crate) fn wait(
        &self,
        doorbell: &dyn Doorbell,
        vector: u16,
        seen: u64,
        deadline: Deadline,
    ) -> Result<(), DoorbellError> {
        let mut st = self.state.load(Ordering::Acquire);
        loop {
            if st / GENERATION != seen {
                return Ok(());
            }
            if st & LEADER != 0 {
                return self.follow(seen, deadline);
            }
            match self.state.compare_exchange_weak(
                st,
                st | LEADER,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => st = now,
            }
        }
        let result = doorbell.wait(vector, deadline.remaining());
        // Clear the leader flag (set: subtracting it clears it) and bump the generation.
        let before = self
            .state
            .fetch_add(GENERATION.wrapping_sub(LEADER), Ordering::AcqRel);
        if before & FOLLOWERS != 0 {
            let _held = lock(&self.followers);
            self.cv.notify_all();
        }
        result.map(|_| ())
    }

    /// Waits as a follower until the leader returns (or the deadline).
    #[cold]
    fn follow(&self, seen: u64, deadline: Deadline) -> Result<(), DoorbellError> {
        let held = lock(&self.followers);
        let st = self.state.fetch_add(FOLLOWER, Ordering::AcqRel);
        if st / GENERATION == seen && st & LEADER != 0 {
            // Woken when the leader returns (generation moves); a timeout just returns.
            let remaining: Option<Duration> = deadline.remaining();
            drop(wait_on(&self.cv, held, remaining));
        } else {
            drop(held);
        }
        self.state.fetch_sub(FOLLOWER, Ordering::AcqRel);
        Ok(())
    }
}
