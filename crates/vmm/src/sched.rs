//! QNX's `sched` option on Linux: the priority of the threads that turn another client's
//! notification into this guest's interrupt.
//!
//! On QNX, `sched PRIORITY` is the priority of the pulses that tell the shmem vdev that input is
//! available; the qvm thread receiving such a pulse runs at that priority while it raises the
//! guest's interrupt. Here the equivalent threads are [`ServerFactory`]'s per-connection
//! notification thread (it waits on the region's doorbells and signals the device interrupt)
//! and whatever VMM thread services a level-triggered line
//! ([`GuestShmDevice::service_interrupt`]). Both can run under `SCHED_FIFO` with the
//! priority: QNX's 1..=255 map to Linux's real-time 1..=99 (higher values are capped at the
//! system's maximum), so a notification is handled before ordinary work as on QNX.
//!
//! [`LocalFactory`] has no such thread: a notifying guest's own vCPU thread signals the
//! target's interrupt directly, at the vCPU's priority, so `sched` cannot matter there.
//!
//! Real-time scheduling needs `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` allowing the priority);
//! without it the thread keeps its priority and a warning is logged once per thread.
//!
//! [`ServerFactory`]: crate::guest_shm::ServerFactory
//! [`LocalFactory`]: crate::guest_shm::LocalFactory
//! [`GuestShmDevice::service_interrupt`]: crate::guest_shm::GuestShmDevice::service_interrupt

use rustix::io::Errno;

/// The Linux `SCHED_FIFO` priority for QNX priority `qnx`: the same number, capped at the
/// system's maximum real-time priority (99 on Linux).
pub fn linux_priority(qnx: u8) -> i32 {
    // SAFETY: sched_get_priority_max has no memory effects.
    let max = unsafe { libc::sched_get_priority_max(libc::SCHED_FIFO) };
    i32::from(qnx.max(1)).min(max.max(1))
}

/// Runs the calling thread under `SCHED_FIFO` at [`linux_priority`]`(qnx)`.
pub fn set_current_thread_priority(qnx: u8) -> Result<(), Errno> {
    let param = libc::sched_param {
        sched_priority: linux_priority(qnx),
    };
    // SAFETY: `param` is a valid sched_param for the call's duration and pthread_self() names
    // the calling thread, which is alive.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(rc))
    }
}

/// Applies `sched` (when given) to the calling thread, logging instead of failing: a
/// notification thread that keeps its normal priority still delivers every notification.
pub fn apply_notification_priority(sched: Option<u8>, thread: &str) {
    let Some(priority) = sched else {
        return;
    };
    match set_current_thread_priority(priority) {
        Ok(()) => tracing::debug!(
            thread,
            qnx = priority,
            linux = linux_priority(priority),
            "sched: notification thread runs SCHED_FIFO"
        ),
        Err(errno) => tracing::warn!(
            thread,
            qnx = priority,
            %errno,
            "sched {priority}: the notification thread cannot run SCHED_FIFO (needs \
             CAP_SYS_NICE or RLIMIT_RTPRIO); it keeps its normal priority"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qnx_priorities_map_into_the_real_time_range() {
        assert_eq!(linux_priority(1), 1);
        assert_eq!(linux_priority(21), 21);
        assert_eq!(linux_priority(99), 99);
        assert_eq!(linux_priority(255), 99);
        assert_eq!(linux_priority(0), 1);
    }
}
