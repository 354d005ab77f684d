//! ivshmem doorbells: the BAR0 register block, ringing a peer, and waiting for own vectors
//! (MSI-X delivered to eventfds under VFIO, [`VectorEventfds`], or polling a counter in shared
//! memory otherwise, [`PollDoorbells`]).

mod eventfd;
mod polling;

pub use eventfd::{take_eventfd, wait_eventfd, VectorEventfds};
pub use polling::PollDoorbells;

use rustix::event::Timespec;
use rustix::io::Errno;
use std::time::{Duration, Instant};

/// The register block and the Doorbell encoding, defined once in `ivshm_proto::ivshmem`.
pub use ivshm_proto::ivshmem::{
    doorbell_value, MAX_DOORBELL_VECTOR, REGISTERS_BAR_SIZE, REG_DOORBELL, REG_INTR_MASK,
    REG_INTR_STATUS, REG_IV_POSITION,
};

/// The vector a wait was for, as a message names it: `vector 3`, or `any vector` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitedOn(pub Option<u16>);

impl std::fmt::Display for WaitedOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(vector) => write!(f, "vector {vector}"),
            None => f.write_str("any vector"),
        }
    }
}

/// Doorbell failures.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum DoorbellError {
    /// vector {vector} is out of range: this device has {vectors} vector(s) (0..{vectors})
    ///
    /// A vector this device does not have.
    VectorOutOfRange {
        /// The vector asked for.
        vector: u16,
        /// How many the device has.
        vectors: u16,
    },
    /// vector {vector} cannot be rung: QEMU's ivshmem decodes only vectors
    /// 0..={MAX_DOORBELL_VECTOR:}
    ///
    /// A vector the Doorbell register cannot encode.
    VectorTooLarge {
        /// The vector asked for.
        vector: u16,
    },
    /// no doorbell on {vector} within {timeout:?}
    ///
    /// Nothing arrived in time.
    Timeout {
        /// The vector waited on.
        vector: WaitedOn,
        /// The timeout.
        timeout: Duration,
    },
    /// this device has no interrupts in its access mode ({reason}); waiting needs the VFIO mode, or
    /// a polling area in shared memory agreed with the sender (set_poll_area / --poll-offset)
    ///
    /// The device was opened without interrupts and no polling area was configured.
    NoInterrupts {
        /// Why (e.g. "sysfs mode").
        reason: &'static str,
    },
    /// polling area at offset {offset:#x} for {vectors} vector(s) does not fit in {size} bytes of
    /// shared memory (or is not 4-byte aligned)
    ///
    /// The polling area does not fit the shared memory.
    BadPollArea {
        /// Offset of the area.
        offset: usize,
        /// Vectors it must hold.
        vectors: u32,
        /// Shared memory size.
        size: usize,
    },
    /// eventfd {op} failed: {error}
    ///
    /// An eventfd operation failed.
    Eventfd {
        /// Which operation.
        op: &'static str,
        /// The OS error.
        error: Errno,
    },
    /// ringing failed: {0}
    ///
    /// Ringing a peer through something other than the Doorbell register failed (e.g. a host
    /// peer's unknown target), with that ringer's error.
    Ring(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// register access failed: {0}
    ///
    /// A register offset outside the mapped register block (or misaligned).
    RegisterOutOfBounds(ivshm_mem::OutOfBounds),
    /// register access failed: {0}
    ///
    /// A register access through the VFIO device failed.
    RegisterVfio(crate::vfio::VfioError),
    /// register access failed: the device's VFIO file is closed
    ///
    /// The registers are reached through VFIO, and the device's VFIO file is closed.
    VfioClosed,
    /// IVPosition reads {0:#x}, not a peer ID (setup incomplete?)
    ///
    /// IVPosition holds no peer ID (a doorbell device before the server's setup completed).
    BadIvPosition(u32),
}

impl From<ivshm_mem::OutOfBounds> for DoorbellError {
    fn from(error: ivshm_mem::OutOfBounds) -> Self {
        DoorbellError::RegisterOutOfBounds(error)
    }
}

impl From<crate::vfio::VfioError> for DoorbellError {
    fn from(error: crate::vfio::VfioError) -> Self {
        DoorbellError::RegisterVfio(error)
    }
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

/// `now + timeout`, with the timeout capped at 100 years: `Instant + Duration` panics on overflow, and
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
