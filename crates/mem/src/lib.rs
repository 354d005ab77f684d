//! Shared memory for ivshm: backends that create it, size rules, and mappings.
//!
//! - [`mapping`]: an owned `MAP_SHARED` mapping and [`SharedView`], a bounds-checked window on
//!   memory that other processes or VMs may change at any time (every access volatile or atomic).

pub mod mapping;

pub use mapping::{MapError, Mapping, OutOfBounds, SharedView};
