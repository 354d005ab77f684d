//! QNX `vdev shmem` policy semantics.

pub mod fnmatch;
pub mod guest_shm;
pub mod name;
mod number;
pub mod options;
pub mod rules;
pub mod status;
pub mod subst;
pub mod vm;

pub use fnmatch::{fnmatch, Pattern, PatternError};
pub use name::{NameError, RegionName};
pub use number::NumberError;
pub use options::{CreateOption, Interrupt, ParseError, VdevShmem};
pub use rules::{ImplicitRule, Rule, RuleList, RuleMatch};
pub use status::GuestShmStatus;
pub use subst::{Subst, SubstError};
pub use vm::{Decision, IllegalName, VmPolicy, VmPolicyConfig, VmPolicyError};
