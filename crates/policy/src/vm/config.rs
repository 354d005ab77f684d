//! The TOML/serde form of a VM's policy (see the [parent module](super) for its semantics).

use serde::Deserialize;

use crate::name::RegionName;
use crate::options::Interrupt;
use crate::rules::Rule;
use crate::subst::Subst;

/// The TOML/serde form of a VM's policy (see the [`vm`](super) module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPolicyConfig {
    /// The restrictions list in order: `"allow PATTERN"` / `"deny PATTERN"` strings, checked
    /// first to last with QNX's implicit final rule.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// A verbatim QNX `vdev shmem` block (its option lines). Excludes every other field.
    #[serde(default)]
    pub qnx: Option<String>,
    /// `subst`, as `"[match],prefix"`; applies to every `create`.
    #[serde(default)]
    pub subst: Option<Subst>,
    /// Regions to pre-create.
    #[serde(default)]
    pub create: Vec<CreateConfig>,
    /// Factory page address (MMIO mode): an integer or a string in the size grammar of
    /// [`ivshm_mem::parse_size`].
    #[serde(default, deserialize_with = "optional_size")]
    pub loc: Option<u64>,
    /// Guest interrupt.
    #[serde(default)]
    pub intr: Option<Interrupt>,
    /// Notification pulse priority.
    #[serde(default)]
    pub sched: Option<u8>,
}

/// One `create` entry of the TOML form.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConfig {
    /// The region name (before `subst`).
    pub name: RegionName,
    /// Size in bytes: an integer or a string in the size grammar of every configuration
    /// field ([`ivshm_mem::parse_size`]: `"0xf0000"`, `"960K"`, `"0d983040"`, `"1MiB"`).
    #[serde(deserialize_with = "size")]
    pub size: u64,
}

fn size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    ivshm_mem::Size::deserialize(deserializer).map(|size| size.0)
}

fn optional_size<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    size(deserializer).map(Some)
}
