//! QNX `vdev shmem` policy semantics.

pub mod fnmatch;
pub mod guest_shm;
pub mod name;
mod number;
pub mod options;
pub mod rules;
pub mod status;
pub mod subst;
