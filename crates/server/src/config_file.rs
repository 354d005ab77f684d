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
//! id_reuse = "safe"                    # "immediate": reuse a departed peer's id at once
//! backend = "memfd"                    # "memfd", "shm" (ivshm-<name>), "dir" (with dir = ...)
//! pow2 = "round-up"                    # "round-up", "refuse", "off"
//! max_size = "1G"                      # factory creates above this get GSS_NOMEM
//! persist = false                      # keep run-time regions after their last peer leaves
//! max_regions = 1024                   # run-time regions at once (factory beyond: GSS_NOMEM)
//! max_regions_per_vm = 64              # what one VM's factory may have made at once ...
//! max_bytes_per_vm = "4G"              # ... and their bytes (default: unbounded)
//! unused_timeout = "5m"                # a factory region nobody joins goes ("off": never)
//! dir_mode = "0750"                    # VM directories
//! socket_mode = "0660"                 # sockets in VM directories
//! group = "kvm"                        # group of VM directories and sockets
//!
//! [[region]]                           # pre-created, lives as long as the server
//! name = "shared"
//! size = "1M"                          # integer bytes or a string: ivshm_mem::parse_size
//!
//! [vm.vm0]                             # directory <root>/vm0/
//! max_regions = 8                      # this VM's factory quota (also max_bytes)
//! rules = ["allow mem*", "deny *"]     # the policy as TOML fields ...
//! subst = ",guest0"
//! create = [{ name = "mem", size = "0xf0000" }]
//!
//! [vm.vm1]
//! qnx = '''                            # ... or a verbatim QNX vdev shmem block
//!     subst ,guest1
//!     create mem,0xf0000
//! '''
//!
//! [vm.vm2]
//! qnx_file = "vm2.vdev"                # ... or one in a file (relative to this file)
//! ```
//!
//! Errors name the file, the line and the option ([`FileConfigError`]); errors inside a `qnx`
//! block are reported at their line in the file, errors in a `qnx_file` at their line in that
//! file. A VM's directory settings (`dir_mode`, `socket_mode`, `owner`, `group`) override the
//! `[defaults]` ones.

mod location;
mod raw;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ivshm_mem::Pow2Policy;
use ivshm_policy::{RegionName, VmPolicy, VmPolicyConfig, VmPolicyError};
use thiserror::Error;
use toml::Spanned;

use crate::config::{check_vm_directory, ConfigError, ServerConfig, DEFAULT_MAX_QUEUED_MESSAGES};
use crate::group::GroupSpec;
use crate::named::{
    ControlConfig, DirectoryConfig, NamedBackend, NamedConfig, NamedRegionConfig, RegionDefaults,
    VmConfig, VmLimits, CONTROL_SOCKET, DEFAULT_ROOT,
};
use ivshm_proto::socket_path::check_socket_path;
use raw::{RawFile, RawRegion, RawVm};

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
        message: format!("cannot read the configuration file: {e}"),
    })?;
    parse(&text, path)
}

/// Parses the text of a configuration file; `path` is used in errors and recorded as the
/// source to reload from. The result is validated.
pub fn parse(text: &str, path: &Path) -> Result<ServerConfig, FileConfigError> {
    let ctx = Ctx { text, path };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let option = e
            .span()
            .and_then(|span| location::option_at(text, span.start));
        let message = e.message().trim();
        ctx.error(e.span(), option, with_escape_hint(message))
    })?;
    let config = ctx.build(raw)?;
    // Every check in `build` names its line; this only guards against one missed there.
    config
        .validate()
        .map_err(|e| ctx.error(None, None, e.to_string()))?;
    Ok(config)
}

/// TOML's error `message`, with what to do when it is about a backslash escape: text with
/// backslashes, typically a QNX block pasted into `qnx = """..."""`, belongs in a literal
/// string.
fn with_escape_hint(message: &str) -> String {
    let escape = ["escaped value", "unicode value digits"];
    if escape.iter().any(|e| message.contains(e)) {
        format!(
            "{message} (between \" or \"\"\" a backslash starts an escape: write text with \
             backslashes, such as a pasted QNX block, as a literal string: qnx = '''...''' \
             keeps every backslash as it is)"
        )
    } else {
        message.to_string()
    }
}

/// The error the policy's own reader gives for `key = value` alone, if any.
fn policy_field_error(key: &str, value: toml::Value) -> Result<(), String> {
    let mut one = toml::Table::new();
    one.insert(key.to_string(), value);
    toml::Value::Table(one)
        .try_into::<VmPolicyConfig>()
        .map(drop)
        .map_err(|e| e.message().trim().to_string())
}

/// The file being read, for errors.
struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Ctx<'_> {
    fn error(
        &self,
        span: Option<Range<usize>>,
        option: Option<String>,
        message: impl Into<String>,
    ) -> FileConfigError {
        FileConfigError {
            path: self.path.to_path_buf(),
            line: span.map(|s| location::line_of(self.text, s.start)),
            option,
            message: message.into(),
        }
    }

    /// An error about the value at `span`, written as option `option`.
    fn at(&self, span: Range<usize>, option: &str, message: impl Into<String>) -> FileConfigError {
        self.error(Some(span), Some(option.to_string()), message)
    }

    fn build(&self, raw: RawFile) -> Result<ServerConfig, FileConfigError> {
        let root = raw.root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        let mut named = NamedConfig::new(&root);
        named.source = Some(self.path.to_path_buf());
        let mut control = ControlConfig::new(
            raw.control
                .clone()
                .unwrap_or_else(|| root.join(CONTROL_SOCKET)),
        );
        if let Some(mode) = raw.control_mode {
            control.mode = mode.0;
        }
        if let Some(group) = &raw.control_group {
            control.group = Some(self.group(group, "control_group")?);
        }
        if let Err(e) = check_socket_path(&control.path) {
            let option = if raw.control.is_some() {
                "control"
            } else {
                "root"
            };
            return Err(self.error(None, Some(option.to_string()), e.to_string()));
        }
        let max_queued_messages = match &raw.max_queued_messages {
            Some(bound) if *bound.get_ref() == 0 => {
                return Err(self.at(
                    bound.span(),
                    "max_queued_messages",
                    ConfigError::ZeroQueueBound.to_string(),
                ))
            }
            Some(bound) => *bound.get_ref(),
            None => DEFAULT_MAX_QUEUED_MESSAGES,
        };

        let d = &raw.defaults;
        let defaults = RegionDefaults {
            vectors: self.vectors(d.vectors.as_ref(), "defaults.vectors")?,
            peer_limit: self.peer_limit(d.peer_limit.as_ref(), "defaults.peer_limit")?,
            id_policy: d.id_policy.unwrap_or(named.defaults.id_policy),
            id_reuse: d.id_reuse.unwrap_or(named.defaults.id_reuse),
            backend: self
                .backend(d.backend.as_ref(), d.dir.as_ref(), d.keep_shm, "defaults")?
                .unwrap_or_default(),
            pow2: d.pow2.map_or(Pow2Policy::RoundUp, |p| p.0),
            max_size: d.max_size.map_or(named.defaults.max_size, |s| s.0),
            persist: d.persist.unwrap_or(named.defaults.persist),
            max_regions: d.max_regions.unwrap_or(named.defaults.max_regions),
            vm_limits: VmLimits {
                max_regions: d
                    .max_regions_per_vm
                    .unwrap_or(named.defaults.vm_limits.max_regions),
                max_bytes: d
                    .max_bytes_per_vm
                    .map(|s| s.0)
                    .or(named.defaults.vm_limits.max_bytes),
            },
            unused_timeout: d
                .unused_timeout
                .map_or(named.defaults.unused_timeout, |t| t.0),
        };
        let directory = DirectoryConfig {
            dir_mode: d.dir_mode.map_or(named.directory.dir_mode, |m| m.0),
            socket_mode: d.socket_mode.map_or(named.directory.socket_mode, |m| m.0),
            owner: d.owner,
            group: d
                .group
                .as_ref()
                .map(|g| self.group(g, "defaults.group"))
                .transpose()?,
        };

        for (i, spanned) in raw.region.iter().enumerate() {
            let raw_region = spanned.get_ref();
            let region = self.region(i, raw_region, &defaults)?;
            if let Some(first) = named.regions.iter().position(|r| r.name == region.name) {
                return Err(self.at(
                    raw_region.name.span(),
                    &format!("region[{i}].name"),
                    format!(
                        "region {:?} is configured twice (first as region[{first}])",
                        region.name.as_str()
                    ),
                ));
            }
            named.regions.push(region);
        }

        for (name, spanned) in &raw.vm {
            named.vms.push(self.vm(
                name,
                spanned,
                &directory,
                &defaults.vm_limits,
                &root,
                &control,
            )?);
        }
        named.control = Some(control);
        named.defaults = defaults;
        named.directory = directory;
        Ok(ServerConfig {
            regions: Vec::new(),
            max_queued_messages,
            named: Some(named),
            mark_channel_departures: raw.mark_channel_departures.unwrap_or(true),
        })
    }

    /// The `i`th `[[region]]` table, with the defaults for what it does not say.
    fn region(
        &self,
        i: usize,
        r: &RawRegion,
        defaults: &RegionDefaults,
    ) -> Result<NamedRegionConfig, FileConfigError> {
        let option = |field: &str| format!("region[{i}].{field}");
        let name = RegionName::new(r.name.get_ref())
            .map_err(|e| self.at(r.name.span(), &option("name"), e.to_string()))?;
        let size = r.size.get_ref().0;
        if size == 0 {
            return Err(self.at(
                r.size.span(),
                &option("size"),
                ConfigError::ZeroSize.to_string(),
            ));
        }
        let mut region = NamedRegionConfig::with_defaults(name, size, defaults);
        if r.vectors.is_some() {
            region.vectors = self.vectors(r.vectors.as_ref(), &option("vectors"))?;
        }
        if r.peer_limit.is_some() {
            region.peer_limit = self.peer_limit(r.peer_limit.as_ref(), &option("peer_limit"))?;
        }
        region.id_policy = r.id_policy.unwrap_or(region.id_policy);
        region.id_reuse = r.id_reuse.unwrap_or(region.id_reuse);
        region.pow2 = r.pow2.map_or(region.pow2, |p| p.0);
        let table = format!("region[{i}]");
        if let Some(backend) =
            self.backend(r.backend.as_ref(), r.dir.as_ref(), r.keep_shm, &table)?
        {
            region.backend = backend;
        }
        Ok(region)
    }

    /// One `[vm.NAME]` table; its directory settings override `directory`.
    fn vm(
        &self,
        name: &str,
        spanned: &Spanned<RawVm>,
        directory: &DirectoryConfig,
        limits: &VmLimits,
        root: &Path,
        control: &ControlConfig,
    ) -> Result<VmConfig, FileConfigError> {
        let vm = spanned.get_ref();
        let option = format!("vm.{name}");
        let vm_name = RegionName::new(name).map_err(|e| {
            self.at(
                spanned.span(),
                &option,
                format!("VM name (a directory name): {e}"),
            )
        })?;
        if let Err(e) = check_vm_directory(&root.join(name)) {
            return Err(self.at(spanned.span(), &option, e.to_string()));
        }
        if root.join(name) == control.path {
            return Err(self.at(
                spanned.span(),
                &option,
                format!(
                    "the VM's directory would be the control socket {}: rename the VM",
                    control.path.display()
                ),
            ));
        }
        let policy = self.vm_policy(name, vm, spanned.span())?;
        let group = match &vm.group {
            Some(g) => Some(self.group(g, &format!("vm.{name}.group"))?),
            None => directory.group.clone(),
        };
        Ok(VmConfig {
            name: vm_name,
            policy,
            directory: DirectoryConfig {
                dir_mode: vm.dir_mode.map_or(directory.dir_mode, |m| m.0),
                socket_mode: vm.socket_mode.map_or(directory.socket_mode, |m| m.0),
                owner: vm.owner.or(directory.owner),
                group,
            },
            limits: VmLimits {
                max_regions: vm.max_regions.unwrap_or(limits.max_regions),
                max_bytes: vm.max_bytes.map(|s| s.0).or(limits.max_bytes),
            },
        })
    }

    /// `vectors` (at most 64), or the QNX default when not given.
    fn vectors(
        &self,
        value: Option<&Spanned<usize>>,
        option: &str,
    ) -> Result<usize, FileConfigError> {
        let Some(value) = value else {
            return Ok(RegionDefaults::default().vectors);
        };
        let vectors = *value.get_ref();
        if vectors > ivshm_proto::v0::MAX_VECTORS {
            return Err(self.at(
                value.span(),
                option,
                ConfigError::Vectors(vectors).to_string(),
            ));
        }
        Ok(vectors)
    }

    /// `peer_limit` (1..=65536), or the QNX default when not given.
    fn peer_limit(
        &self,
        value: Option<&Spanned<usize>>,
        option: &str,
    ) -> Result<usize, FileConfigError> {
        let Some(value) = value else {
            return Ok(RegionDefaults::default().peer_limit);
        };
        let limit = *value.get_ref();
        if limit == 0 || limit > 1 << 16 {
            return Err(self.at(
                value.span(),
                option,
                ConfigError::PeerLimit(limit).to_string(),
            ));
        }
        Ok(limit)
    }

    fn group(&self, text: &Spanned<String>, option: &str) -> Result<GroupSpec, FileConfigError> {
        text.get_ref()
            .parse()
            .map_err(|e: crate::group::GroupError| self.at(text.span(), option, e.to_string()))
    }

    /// The `backend`, `dir` and `keep_shm` keys of `table`; `None` when `backend` is not given.
    fn backend(
        &self,
        backend: Option<&Spanned<String>>,
        dir: Option<&PathBuf>,
        keep_shm: Option<bool>,
        table: &str,
    ) -> Result<Option<NamedBackend>, FileConfigError> {
        let Some(backend) = backend else {
            return Ok(None);
        };
        let err = |message: String| self.at(backend.span(), &format!("{table}.backend"), message);
        Ok(Some(match backend.get_ref().as_str() {
            "memfd" => NamedBackend::Memfd,
            "shm" => NamedBackend::Shm {
                keep: keep_shm.unwrap_or(false),
            },
            "dir" => NamedBackend::Dir(dir.cloned().ok_or_else(|| {
                err("backend \"dir\" needs dir = \"/path\" in the same table".into())
            })?),
            other => {
                return Err(err(format!(
                    "unknown backend {other:?}: expected \"memfd\", \"shm\" or \"dir\""
                )))
            }
        }))
    }

    fn vm_policy(
        &self,
        name: &str,
        vm: &RawVm,
        vm_span: Range<usize>,
    ) -> Result<VmPolicy, FileConfigError> {
        let fields = vm.policy_fields();
        if let Some(file) = &vm.qnx_file {
            let option = format!("vm.{name}.qnx_file");
            if let Some(field) = fields
                .first()
                .map(|f| f.key)
                .or(vm.qnx.as_ref().map(|_| "qnx"))
            {
                return Err(self.at(
                    file.span(),
                    &option,
                    format!("qnx_file excludes the other policy fields ({field} is also given)"),
                ));
            }
            return self.qnx_file_policy(file, &option);
        }
        if let Some(qnx) = &vm.qnx {
            let option = format!("vm.{name}.qnx");
            if let Some(field) = fields.first().map(|f| f.key) {
                return Err(self.at(
                    qnx.span(),
                    &option,
                    format!(
                        "qnx excludes the TOML policy fields ({field} is also given): write it \
                         in the block"
                    ),
                ));
            }
            let first_line = self.block_first_line(qnx.span());
            return VmPolicy::parse_qnx(qnx.get_ref()).map_err(|e| match e {
                VmPolicyError::Parse(p) => FileConfigError {
                    path: self.path.to_path_buf(),
                    line: Some(first_line + p.line - 1),
                    option: Some(format!("{option}: {}", p.option)),
                    message: p.message,
                },
                other => self.at(qnx.span(), &option, other.to_string()),
            });
        }
        let mut table = toml::Table::new();
        for field in &fields {
            let option = format!("vm.{name}.{}", field.key);
            // Each element of a list alone first, so that an error names the element's line
            // (in a multi-line `rules = [...]`, not the line of `rules =`).
            for element in field.elements {
                let alone = toml::Value::Array(vec![element.get_ref().clone()]);
                if let Err(message) = policy_field_error(field.key, alone) {
                    return Err(self.at(element.span(), &option, message));
                }
            }
            if let Err(message) = policy_field_error(field.key, field.value.clone()) {
                return Err(self.at(field.span.clone(), &option, message));
            }
            table.insert(field.key.to_string(), field.value.clone());
        }
        let config: VmPolicyConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    self.at(vm_span.clone(), &format!("vm.{name}"), e.message().trim())
                })?;
        VmPolicy::from_config(config).map_err(|e| {
            // Point at the field the error is about.
            let field = match &e {
                VmPolicyError::IllegalCreateName { .. }
                | VmPolicyError::DuplicateCreate { .. }
                | VmPolicyError::BadCreateSize { .. } => "create",
                VmPolicyError::UnalignedLoc { .. } | VmPolicyError::LocWithoutIntr => "loc",
                VmPolicyError::BadSched => "sched",
                VmPolicyError::Parse(_) | VmPolicyError::QnxWithFields => "qnx",
            };
            let field_span = fields.iter().find(|f| f.key == field).map(|f| {
                // An error about one `create` entry: that entry's line.
                let entry = match &e {
                    VmPolicyError::IllegalCreateName { name, .. }
                    | VmPolicyError::BadCreateSize { name, .. } => f.elements.iter().find(|e| {
                        e.get_ref().get("name").and_then(toml::Value::as_str) == Some(name.as_str())
                    }),
                    _ => None,
                };
                entry.map_or(f.span.clone(), |entry| entry.span())
            });
            self.at(
                field_span.unwrap_or(vm_span),
                &format!("vm.{name}.{field}"),
                e.to_string(),
            )
        })
    }

    /// The policy in a `qnx_file` (relative to the configuration file's directory); its errors
    /// name that file and its line.
    fn qnx_file_policy(
        &self,
        file: &Spanned<PathBuf>,
        option: &str,
    ) -> Result<VmPolicy, FileConfigError> {
        let path = self
            .path
            .parent()
            .map_or_else(|| file.get_ref().clone(), |dir| dir.join(file.get_ref()));
        let block = std::fs::read_to_string(&path)
            .map_err(|e| self.at(file.span(), option, format!("{}: {e}", path.display())))?;
        VmPolicy::parse_qnx(&block).map_err(|e| match e {
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
        })
    }

    /// The file line of the first line of a multi-line string's contents.
    fn block_first_line(&self, span: Range<usize>) -> usize {
        let line = location::line_of(self.text, span.start);
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

#[cfg(test)]
mod tests;
