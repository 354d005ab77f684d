//! The TOML/serde form of a VM's policy (see the [parent module](super) for its semantics).

use serde::Deserialize;

use crate::name::RegionName;
use crate::options::{Interrupt, Location, LogOption};
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
    /// Where the vdev appears: an integer or a string in the size grammar of
    /// [`ivshm_mem::parse_size`] (the factory page's address, MMIO mode), or a QNX location
    /// `"mem:ADDRESS"` / `"pci:BUS:DEV[.FUNC]"` ([`Location`]).
    #[serde(default, deserialize_with = "optional_location")]
    pub loc: Option<Location>,
    /// Guest interrupt.
    #[serde(default)]
    pub intr: Option<Interrupt>,
    /// Notification pulse priority.
    #[serde(default)]
    pub sched: Option<u8>,
    /// The common `log` options, each `"FILTER[,FILTER...] DESTINATION"`.
    #[serde(default, deserialize_with = "log_options")]
    pub log: Vec<LogOption>,
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

/// Reads a `loc`: an integer or a size-grammar string (an MMIO address), or `mem:`/`pci:` text.
struct LocationVisitor;

impl serde::de::Visitor<'_> for LocationVisitor {
    type Value = Location;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "a location: an address (an integer or a string such as \"0x1b000000\"), \
             \"mem:ADDRESS\" or \"pci:BUS:DEV[.FUNC]\"",
        )
    }

    fn visit_u64<E: serde::de::Error>(self, address: u64) -> Result<Location, E> {
        Location::mem(address).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, address: i64) -> Result<Location, E> {
        u64::try_from(address)
            .map_err(|_| E::custom(format!("address {address} is negative")))
            .and_then(|address| self.visit_u64(address))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Location, E> {
        if text.contains(':') {
            return Location::parse(text).map_err(E::custom);
        }
        ivshm_mem::parse_size(text)
            .map_err(E::custom)
            .and_then(|address| self.visit_u64(address))
    }
}

fn optional_location<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Location>, D::Error> {
    deserializer.deserialize_any(LocationVisitor).map(Some)
}

fn log_options<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<LogOption>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            let words: Vec<&str> = text.split_whitespace().collect();
            match words.as_slice() {
                [filters, destination] => {
                    LogOption::parse(filters, destination).map_err(serde::de::Error::custom)
                }
                _ => Err(serde::de::Error::custom(format!(
                    "log {text:?}: expected \"FILTER[,FILTER...] DESTINATION\", \
                     e.g. \"error,warning stderr\""
                ))),
            }
        })
        .collect()
}
