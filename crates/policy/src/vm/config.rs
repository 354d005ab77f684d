//! The TOML/serde form of a VM's policy (see the [parent module](super) for its semantics).

use std::fmt;

use serde::Deserialize;

use crate::name::RegionName;
use crate::number::parse_size;
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
    /// Factory page address (MMIO mode).
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
    /// Size in bytes: an integer or a QNX-notation string (`"0xf0000"`, `"960K"`).
    #[serde(deserialize_with = "size")]
    pub size: u64,
}

/// Reads a size given as a TOML integer or as a string in QNX notation.
struct SizeVisitor;

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a size in bytes: a non-negative integer or a string such as \"0xf0000\" or \"960K\"",
        )
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom(format!("size {value} is negative")))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<u64, E> {
        parse_size(text, u64::MAX).map_err(E::custom)
    }
}

fn size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(SizeVisitor)
}

fn optional_size<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    size(deserializer).map(Some)
}
