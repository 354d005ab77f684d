//! The configuration file as TOML gives it: tables with unknown keys rejected, values that need
//! a check after reading kept with their position ([`Spanned`]) so errors can name their line.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use ivshm_mem::Pow2Policy;
use serde::Deserialize;
use toml::Spanned;

use crate::config::{parse_duration, parse_file_mode};
use crate::ids::{IdPolicy, IdReuse};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) root: Option<PathBuf>,
    pub(super) control: Option<PathBuf>,
    pub(super) control_mode: Option<RawMode>,
    pub(super) control_group: Option<Spanned<String>>,
    pub(super) max_queued_messages: Option<Spanned<usize>>,
    pub(super) mark_channel_departures: Option<bool>,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) region: Vec<Spanned<RawRegion>>,
    #[serde(default)]
    pub(super) vm: BTreeMap<String, Spanned<RawVm>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) vectors: Option<Spanned<usize>>,
    pub(super) peer_limit: Option<Spanned<usize>>,
    pub(super) id_policy: Option<IdPolicy>,
    pub(super) id_reuse: Option<IdReuse>,
    pub(super) backend: Option<Spanned<String>>,
    pub(super) dir: Option<PathBuf>,
    pub(super) keep_shm: Option<bool>,
    pub(super) pow2: Option<RawPow2>,
    pub(super) max_size: Option<RawSize>,
    pub(super) persist: Option<bool>,
    pub(super) max_regions: Option<usize>,
    pub(super) max_regions_per_vm: Option<usize>,
    pub(super) max_bytes_per_vm: Option<RawSize>,
    pub(super) unused_timeout: Option<RawTimeout>,
    pub(super) dir_mode: Option<RawMode>,
    pub(super) socket_mode: Option<RawMode>,
    pub(super) owner: Option<u32>,
    pub(super) group: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    pub(super) name: Spanned<String>,
    pub(super) size: Spanned<RawSize>,
    pub(super) vectors: Option<Spanned<usize>>,
    pub(super) peer_limit: Option<Spanned<usize>>,
    pub(super) id_policy: Option<IdPolicy>,
    pub(super) id_reuse: Option<IdReuse>,
    pub(super) backend: Option<Spanned<String>>,
    pub(super) dir: Option<PathBuf>,
    pub(super) keep_shm: Option<bool>,
    pub(super) pow2: Option<RawPow2>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    pub(super) max_regions: Option<usize>,
    pub(super) max_bytes: Option<RawSize>,
    pub(super) dir_mode: Option<RawMode>,
    pub(super) socket_mode: Option<RawMode>,
    pub(super) owner: Option<u32>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) qnx: Option<Spanned<String>>,
    pub(super) qnx_file: Option<Spanned<PathBuf>>,
    pub(super) rules: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    pub(super) subst: Option<Spanned<toml::Value>>,
    pub(super) create: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    pub(super) loc: Option<Spanned<toml::Value>>,
    pub(super) intr: Option<Spanned<toml::Value>>,
    pub(super) sched: Option<Spanned<toml::Value>>,
    pub(super) log: Option<Spanned<Vec<Spanned<toml::Value>>>>,
}

/// One policy field of a VM's TOML form as written: its key, where its value is, the value,
/// and for a list (`rules`, `create`) where each element is, so that an error about one
/// element names its own line.
#[derive(Debug)]
pub(super) struct PolicyField<'a> {
    pub(super) key: &'static str,
    pub(super) span: Range<usize>,
    pub(super) value: toml::Value,
    pub(super) elements: &'a [Spanned<toml::Value>],
}

impl RawVm {
    /// The policy fields of the TOML form that are given, in the order of [`VmPolicyConfig`]
    /// (`qnx` and `qnx_file` excluded).
    ///
    /// [`VmPolicyConfig`]: ivshm_policy::VmPolicyConfig
    pub(super) fn policy_fields(&self) -> Vec<PolicyField<'_>> {
        fn list<'a>(
            key: &'static str,
            field: &'a Option<Spanned<Vec<Spanned<toml::Value>>>>,
        ) -> Option<PolicyField<'a>> {
            field.as_ref().map(|list| PolicyField {
                key,
                span: list.span(),
                value: toml::Value::Array(
                    list.get_ref().iter().map(|e| e.get_ref().clone()).collect(),
                ),
                elements: list.get_ref(),
            })
        }
        fn one<'a>(
            key: &'static str,
            field: &Option<Spanned<toml::Value>>,
        ) -> Option<PolicyField<'a>> {
            field.as_ref().map(|value| PolicyField {
                key,
                span: value.span(),
                value: value.get_ref().clone(),
                elements: &[],
            })
        }
        [
            list("rules", &self.rules),
            one("subst", &self.subst),
            list("create", &self.create),
            one("loc", &self.loc),
            one("intr", &self.intr),
            one("sched", &self.sched),
            list("log", &self.log),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A file mode: a TOML integer (write `0o750`) or an octal string (`"0750"`, `"750"`, `"0o750"`).
#[derive(Debug, Clone, Copy)]
pub(super) struct RawMode(pub(super) u32);

struct ModeVisitor;

impl serde::de::Visitor<'_> for ModeVisitor {
    type Value = RawMode;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a file mode: an integer such as 0o750 or an octal string such as \"0750\"")
    }

    fn visit_i64<E: serde::de::Error>(self, mode: i64) -> Result<RawMode, E> {
        match u32::try_from(mode) {
            Ok(mode) if mode <= 0o7777 => Ok(RawMode(mode)),
            _ => Err(E::custom(format!(
                "mode {mode:#o} is not a file mode (at most 0o7777)"
            ))),
        }
    }

    fn visit_u64<E: serde::de::Error>(self, mode: u64) -> Result<RawMode, E> {
        self.visit_i64(i64::try_from(mode).unwrap_or(i64::MAX))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawMode, E> {
        parse_file_mode(text).map(RawMode).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for RawMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ModeVisitor)
    }
}

/// A size: integer bytes or a string in the one size grammar ([`ivshm_mem::Size`]).
pub(super) type RawSize = ivshm_mem::Size;

/// A time: a TOML integer of seconds, or a string of a whole number with a unit (`"300ms"`,
/// `"30s"`, `"5m"`, `"1h"`), or `"off"` (`None`).
#[derive(Debug, Clone, Copy)]
pub(super) struct RawTimeout(pub(super) Option<std::time::Duration>);

/// Parses the string form of [`RawTimeout`]: `"off"` or [`parse_duration`]'s grammar.
pub(super) fn parse_timeout(text: &str) -> Result<Option<std::time::Duration>, String> {
    if text.trim() == "off" {
        return Ok(None);
    }
    parse_duration(text)
        .map(Some)
        .map_err(|e| format!("{e}, seconds as an integer, or \"off\""))
}

struct TimeoutVisitor;

impl serde::de::Visitor<'_> for TimeoutVisitor {
    type Value = RawTimeout;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a time: seconds as an integer, or a string such as \"300ms\" or \"5m\"")
    }

    fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<RawTimeout, E> {
        u64::try_from(seconds)
            .map(|s| RawTimeout(Some(std::time::Duration::from_secs(s))))
            .map_err(|_| E::custom(format!("{seconds} seconds is not a time")))
    }

    fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<RawTimeout, E> {
        Ok(RawTimeout(Some(std::time::Duration::from_secs(seconds))))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawTimeout, E> {
        parse_timeout(text).map(RawTimeout).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for RawTimeout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TimeoutVisitor)
    }
}

/// `pow2 = "round-up" | "refuse" | "off"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawPow2(pub(super) Pow2Policy);

impl<'de> Deserialize<'de> for RawPow2 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "round-up" => Ok(RawPow2(Pow2Policy::RoundUp)),
            "refuse" => Ok(RawPow2(Pow2Policy::Refuse)),
            "off" => Ok(RawPow2(Pow2Policy::Off)),
            other => Err(serde::de::Error::custom(format!(
                "pow2 {other:?}: expected \"round-up\", \"refuse\" or \"off\""
            ))),
        }
    }
}
