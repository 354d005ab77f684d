//! The server's TOML configuration file (`ivshm serve --config FILE`).
//!
//! ```toml
//! root = "/run/ivshm"                  # socket root (default /run/ivshm)
//! control = "/run/ivshm/control.sock"  # default <root>/control.sock
//! control_mode = "0600"                # root only by default
//! # control_group = "ivshm-admin"
//!
//! [defaults]                           # for [[region]]s, VM creates and run-time regions
//! vectors = 16                         # QNX defaults: 16 vectors, 16 peers, lowest-free ids
//! peer_limit = 16
//! id_policy = "lowest-free"            # or "increasing" (QEMU's)
//! backend = "memfd"                    # "memfd", "shm" (ivshm-<name>), "dir" (with dir = ...)
//! pow2 = "round-up"                    # "round-up", "refuse", "off"
//! max_size = "1G"                      # factory creates above this get GSS_NOMEM
//! dir_mode = "0750"                    # VM directories
//! socket_mode = "0660"                 # sockets in VM directories
//! group = "kvm"                        # group of VM directories and sockets
//!
//! [[region]]                           # pre-created, lives as long as the server
//! name = "shared"
//! size = "1M"                          # integer bytes or "0xf0000", "960K", "1M"
//!
//! [vm.vm0]                             # directory <root>/vm0/
//! rules = ["allow mem*", "deny *"]     # the policy as TOML fields ...
//! subst = ",guest0"
//! create = [{ name = "mem", size = "0xf0000" }]
//!
//! [vm.vm1]
//! qnx = """                            # ... or a verbatim QNX vdev shmem block
//!     subst ,guest1
//!     create mem,0xf0000
//! """
//!
//! [vm.vm2]
//! qnx_file = "vm2.vdev"                # ... or one in a file (relative to this file)
//! ```
//!
//! Errors name the file, the line and the option ([`FileConfigError`]); errors inside a `qnx`
//! block are reported at their line in the file, errors in a `qnx_file` at their line in that
//! file. A VM's directory settings (`dir_mode`, `socket_mode`, `owner`, `group`) override the
//! `[defaults]` ones.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ivshm_mem::Pow2Policy;
use ivshm_policy::{RegionName, VmPolicy, VmPolicyConfig, VmPolicyError};
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::config::{ServerConfig, DEFAULT_MAX_QUEUED_MESSAGES};
use crate::group::GroupSpec;
use crate::ids::IdPolicy;
use crate::named::{
    ControlConfig, DirectoryConfig, NamedBackend, NamedConfig, NamedRegionConfig, RegionDefaults,
    VmConfig, CONTROL_SOCKET, DEFAULT_ROOT,
};

/// A configuration file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct FileConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The option (`vm.vm0.rules`, `region[2].size`), when known.
    pub option: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FileConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(option) = &self.option {
            write!(f, ": {option}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<ServerConfig, FileConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileConfigError {
        path: path.to_path_buf(),
        line: None,
        option: None,
        message: e.to_string(),
    })?;
    parse(&text, path)
}

/// Parses the text of a configuration file; `path` is used in errors and recorded as the
/// source to reload from. The result is validated.
pub fn parse(text: &str, path: &Path) -> Result<ServerConfig, FileConfigError> {
    let ctx = Ctx { text, path };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_string();
        ctx.error(e.span(), None, message)
    })?;
    let config = ctx.build(raw)?;
    config
        .validate()
        .map_err(|e| ctx.error(None, None, e.to_string()))?;
    Ok(config)
}

struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error(
        &self,
        span: Option<Range<usize>>,
        option: Option<String>,
        message: impl Into<String>,
    ) -> FileConfigError {
        FileConfigError {
            path: self.path.to_path_buf(),
            line: span.map(|s| self.line_of(s.start)),
            option,
            message: message.into(),
        }
    }

    fn build(&self, raw: RawFile) -> Result<ServerConfig, FileConfigError> {
        let root = raw.root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        let mut named = NamedConfig::new(&root);
        named.source = Some(self.path.to_path_buf());
        let mut control =
            ControlConfig::new(raw.control.unwrap_or_else(|| root.join(CONTROL_SOCKET)));
        if let Some(mode) = raw.control_mode {
            control.mode = mode.0;
        }
        if let Some(group) = raw.control_group {
            control.group = Some(self.group(&group, "control_group")?);
        }
        named.control = Some(control);

        let d = &raw.defaults;
        let defaults = RegionDefaults {
            vectors: d.vectors.unwrap_or(named.defaults.vectors),
            peer_limit: d.peer_limit.unwrap_or(named.defaults.peer_limit),
            id_policy: d.id_policy.unwrap_or(named.defaults.id_policy),
            backend: self
                .backend(
                    &RawBackend {
                        backend: d.backend.as_deref(),
                        dir: d.dir.as_ref(),
                        keep_shm: d.keep_shm,
                    },
                    "defaults",
                )?
                .unwrap_or_default(),
            pow2: d.pow2.map(|p| p.0).unwrap_or(Pow2Policy::RoundUp),
            max_size: d.max_size.map_or(named.defaults.max_size, |s| s.0),
        };
        let directory = DirectoryConfig {
            dir_mode: d.dir_mode.map_or(named.directory.dir_mode, |m| m.0),
            socket_mode: d.socket_mode.map_or(named.directory.socket_mode, |m| m.0),
            owner: d.owner,
            group: d
                .group
                .as_deref()
                .map(|g| self.group(g, "defaults.group"))
                .transpose()?,
        };

        for (i, spanned) in raw.region.iter().enumerate() {
            let span = Some(spanned.span());
            let r = spanned.get_ref();
            let option = |field: &str| Some(format!("region[{i}].{field}"));
            let name = RegionName::new(&r.name)
                .map_err(|e| self.error(span.clone(), option("name"), e.to_string()))?;
            let mut region = NamedRegionConfig::with_defaults(name, r.size.0, &defaults);
            region.vectors = r.vectors.unwrap_or(region.vectors);
            region.peer_limit = r.peer_limit.unwrap_or(region.peer_limit);
            region.id_policy = r.id_policy.unwrap_or(region.id_policy);
            region.pow2 = r.pow2.map_or(region.pow2, |p| p.0);
            let raw_backend = RawBackend {
                backend: r.backend.as_deref(),
                dir: r.dir.as_ref(),
                keep_shm: r.keep_shm,
            };
            if let Some(backend) = self.backend(&raw_backend, &format!("region[{i}]"))? {
                region.backend = backend;
            }
            crate::config::validate_named_region(&region)
                .map_err(|e| self.error(span.clone(), option("name"), e.to_string()))?;
            named.regions.push(region);
        }

        for (name, spanned) in &raw.vm {
            let span = Some(spanned.span());
            let vm = spanned.get_ref();
            let option = |field: &str| Some(format!("vm.{name}{field}"));
            let vm_name = RegionName::new(name).map_err(|e| {
                self.error(
                    span.clone(),
                    option(""),
                    format!("VM name (a directory name): {e}"),
                )
            })?;
            let policy = self.vm_policy(name, vm, span.clone())?;
            let directory = DirectoryConfig {
                dir_mode: vm.dir_mode.map_or(directory.dir_mode, |m| m.0),
                socket_mode: vm.socket_mode.map_or(directory.socket_mode, |m| m.0),
                owner: vm.owner.or(directory.owner),
                group: match &vm.group {
                    Some(g) => Some(self.group(g, &format!("vm.{name}.group"))?),
                    None => directory.group.clone(),
                },
            };
            named.vms.push(VmConfig {
                name: vm_name,
                policy,
                directory,
            });
        }
        named.defaults = defaults;
        named.directory = directory;
        Ok(ServerConfig {
            regions: Vec::new(),
            max_queued_messages: raw
                .max_queued_messages
                .unwrap_or(DEFAULT_MAX_QUEUED_MESSAGES),
            named: Some(named),
        })
    }

    fn group(&self, text: &str, option: &str) -> Result<GroupSpec, FileConfigError> {
        text.parse().map_err(|e: crate::group::GroupError| {
            self.error(None, Some(option.into()), e.to_string())
        })
    }

    fn backend(
        &self,
        raw: &RawBackend<'_>,
        option: &str,
    ) -> Result<Option<NamedBackend>, FileConfigError> {
        let err = |m: String| self.error(None, Some(format!("{option}.backend")), m);
        Ok(match raw.backend {
            None => None,
            Some("memfd") => Some(NamedBackend::Memfd),
            Some("shm") => Some(NamedBackend::Shm {
                keep: raw.keep_shm.unwrap_or(false),
            }),
            Some("dir") => {
                Some(NamedBackend::Dir(raw.dir.cloned().ok_or_else(|| {
                    err("backend \"dir\" needs dir = \"/path\"".into())
                })?))
            }
            Some(other) => {
                return Err(err(format!(
                    "unknown backend {other:?}: expected \"memfd\", \"shm\" or \"dir\""
                )))
            }
        })
    }

    fn vm_policy(
        &self,
        name: &str,
        vm: &RawVm,
        vm_span: Option<Range<usize>>,
    ) -> Result<VmPolicy, FileConfigError> {
        let fields: Vec<(&str, &Spanned<toml::Value>)> = [
            ("rules", &vm.rules),
            ("subst", &vm.subst),
            ("create", &vm.create),
            ("loc", &vm.loc),
            ("intr", &vm.intr),
            ("sched", &vm.sched),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect();
        if let Some(file) = &vm.qnx_file {
            let option = Some(format!("vm.{name}.qnx_file"));
            if let Some(field) = fields
                .first()
                .map(|(f, _)| *f)
                .or(vm.qnx.as_ref().map(|_| "qnx"))
            {
                return Err(self.error(
                    Some(file.span()),
                    option,
                    format!("qnx_file excludes the other policy fields ({field} is also given)"),
                ));
            }
            // Relative to the configuration file's directory.
            let path = self
                .path
                .parent()
                .map(|dir| dir.join(file.get_ref()))
                .unwrap_or_else(|| file.get_ref().clone());
            let block = std::fs::read_to_string(&path).map_err(|e| {
                self.error(
                    Some(file.span()),
                    option.clone(),
                    format!("{}: {e}", path.display()),
                )
            })?;
            return VmPolicy::parse_qnx(&block).map_err(|e| match e {
                VmPolicyError::Parse(p) => FileConfigError {
                    path,
                    line: Some(p.line),
                    option: Some(p.option),
                    message: p.message,
                },
                other => FileConfigError {
                    path,
                    line: None,
                    option: None,
                    message: other.to_string(),
                },
            });
        }
        if let Some(qnx) = &vm.qnx {
            let option = Some(format!("vm.{name}.qnx"));
            if let Some((field, _)) = fields.first() {
                return Err(self.error(
                    Some(qnx.span()),
                    option,
                    format!("qnx excludes the TOML policy fields ({field} is also given): write it in the block"),
                ));
            }
            let first_line = self.block_first_line(qnx.span());
            return VmPolicy::parse_qnx(qnx.get_ref()).map_err(|e| match e {
                VmPolicyError::Parse(p) => FileConfigError {
                    path: self.path.to_path_buf(),
                    line: Some(first_line + p.line - 1),
                    option: Some(format!("vm.{name}.qnx: {}", p.option)),
                    message: p.message,
                },
                other => self.error(Some(qnx.span()), option, other.to_string()),
            });
        }
        let mut table = toml::Table::new();
        for (field, value) in &fields {
            let mut one = toml::Table::new();
            one.insert(field.to_string(), value.get_ref().clone());
            if let Err(e) = toml::Value::Table(one).try_into::<VmPolicyConfig>() {
                return Err(self.error(
                    Some(value.span()),
                    Some(format!("vm.{name}.{field}")),
                    e.message().trim().to_string(),
                ));
            }
            table.insert(field.to_string(), value.get_ref().clone());
        }
        let config: VmPolicyConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    self.error(
                        vm_span.clone(),
                        Some(format!("vm.{name}")),
                        e.message().trim().to_string(),
                    )
                })?;
        VmPolicy::from_config(config)
            .map_err(|e| self.error(vm_span, Some(format!("vm.{name}")), e.to_string()))
    }

    /// The file line of the first line of a multi-line string's contents.
    fn block_first_line(&self, span: Range<usize>) -> usize {
        let line = self.line_of(span.start);
        let rest = self.text.get(span.start..).unwrap_or_default();
        let after_quotes = rest
            .strip_prefix("\"\"\"")
            .or_else(|| rest.strip_prefix("'''"));
        match after_quotes {
            Some(body) if body.starts_with('\n') || body.starts_with("\r\n") => line + 1,
            _ => line,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    root: Option<PathBuf>,
    control: Option<PathBuf>,
    control_mode: Option<RawMode>,
    control_group: Option<String>,
    max_queued_messages: Option<usize>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    region: Vec<Spanned<RawRegion>>,
    #[serde(default)]
    vm: BTreeMap<String, Spanned<RawVm>>,
}

/// The backend fields of `[defaults]` and `[[region]]`.
struct RawBackend<'a> {
    backend: Option<&'a str>,
    dir: Option<&'a PathBuf>,
    keep_shm: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    vectors: Option<usize>,
    peer_limit: Option<usize>,
    id_policy: Option<IdPolicy>,
    backend: Option<String>,
    dir: Option<PathBuf>,
    keep_shm: Option<bool>,
    pow2: Option<RawPow2>,
    max_size: Option<RawSize>,
    dir_mode: Option<RawMode>,
    socket_mode: Option<RawMode>,
    owner: Option<u32>,
    group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: String,
    size: RawSize,
    vectors: Option<usize>,
    peer_limit: Option<usize>,
    id_policy: Option<IdPolicy>,
    backend: Option<String>,
    dir: Option<PathBuf>,
    keep_shm: Option<bool>,
    pow2: Option<RawPow2>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    dir_mode: Option<RawMode>,
    socket_mode: Option<RawMode>,
    owner: Option<u32>,
    group: Option<String>,
    qnx: Option<Spanned<String>>,
    qnx_file: Option<Spanned<PathBuf>>,
    rules: Option<Spanned<toml::Value>>,
    subst: Option<Spanned<toml::Value>>,
    create: Option<Spanned<toml::Value>>,
    loc: Option<Spanned<toml::Value>>,
    intr: Option<Spanned<toml::Value>>,
    sched: Option<Spanned<toml::Value>>,
}

/// A file mode: a TOML integer (write `0o750`) or an octal string (`"0750"`, `"750"`).
#[derive(Debug, Clone, Copy)]
struct RawMode(u32);

impl<'de> Deserialize<'de> for RawMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Int(u32),
            Text(String),
        }
        let mode = match Either::deserialize(d)? {
            Either::Int(m) => m,
            Either::Text(t) => {
                let digits = t.strip_prefix("0o").unwrap_or(&t);
                u32::from_str_radix(digits, 8).map_err(|_| {
                    serde::de::Error::custom(format!("{t:?} is not an octal file mode"))
                })?
            }
        };
        if mode > 0o7777 {
            return Err(serde::de::Error::custom(format!(
                "mode {mode:o} is not a file mode"
            )));
        }
        Ok(RawMode(mode))
    }
}

/// A size: integer bytes or a string with `K`/`M`/`G`/`T` or `0x`.
#[derive(Debug, Clone, Copy)]
struct RawSize(u64);

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Int(u64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Int(n) => Ok(RawSize(n)),
            Either::Text(t) => ivshm_mem::parse_size(&t)
                .map(RawSize)
                .map_err(|e| serde::de::Error::custom(format!("size {t:?}: {e}"))),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct RawPow2(Pow2Policy);

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

#[cfg(test)]
mod tests;
