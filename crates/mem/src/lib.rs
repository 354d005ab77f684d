//! Shared memory for ivshm: backends that create it, size rules, and mappings.
//!
//! - [`backend`]: creating the memory: memfd (default), POSIX shm, a file in a directory.
//! - [`size`]: parsing and formatting sizes (`4M`, `0x400000`, `2GiB`).
//! - [`mapping`]: an owned `MAP_SHARED` mapping and [`SharedView`], a bounds-checked window on
//!   memory that other processes or VMs may change at any time (every access volatile or atomic).

pub mod backend;
pub mod mapping;
pub mod size;

pub use backend::{BackendError, BackendKind, SharedMemory};
pub use mapping::{MapError, Mapping, OutOfBounds, SharedView};
pub use size::{
    apply_pow2_policy, format_size, parse_size, unit_shift, Pow2Error, Pow2Policy, Size, SizeError,
};
