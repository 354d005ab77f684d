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
//! A lone waiter pays two uncontended mutex operations on top of the doorbell's system call.

use std::time::Duration;

use crate::doorbell::{Doorbell, DoorbellError};
use crate::sync::{lock, wait_on, Condvar, Deadline, Mutex};

#[derive(Debug, Default)]
struct HubState {
    generation: u64,
    leader: bool,
    followers: u32,
}

/// The waiters of one doorbell vector in this process.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    state: Mutex<HubState>,
    cv: Condvar,
}

impl Hub {
    /// The generation to pass to [`Hub::wait`]; take it before arming.
    pub(crate) fn generation(&self) -> u64 {
        lock(&self.state).generation
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
        let mut st = lock(&self.state);
        if st.generation != seen {
            return Ok(());
        }
        if !st.leader {
            st.leader = true;
            drop(st);
            let result = doorbell.wait(vector, deadline.remaining());
            let mut st = lock(&self.state);
            st.leader = false;
            st.generation = st.generation.wrapping_add(1);
            if st.followers > 0 {
                self.cv.notify_all();
            }
            return result.map(|_| ());
        }
        st.followers += 1;
        // Woken when the leader returns (generation moves); a timeout just returns.
        let remaining: Option<Duration> = deadline.remaining();
        st = wait_on(&self.cv, st, remaining);
        st.followers -= 1;
        Ok(())
    }
}
