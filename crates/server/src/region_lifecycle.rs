//! Named regions' lives: creating the configured ones (first creator decides the size), making
//! run-time ones within `max_regions`, finding them by name, and retiring them (at once, or
//! when their last peer leaves). [`crate::vm_dirs`] gives them their sockets.

use crate::config::validate_named_region;
use crate::named::{NamedRegionConfig, Origin};
use crate::region::{Region, RegionInfo, RegionSpec};
use crate::server::Server;
use crate::ServerError;

/// Why a named region could not be created.
#[derive(Debug)]
pub(crate) enum CreateError {
    /// A region of that name exists.
    Exists,
    /// The server holds its limit of run-time regions.
    TooMany(usize),
    /// Bad numbers.
    Config(crate::ConfigError),
    /// The memory could not be created.
    Memory(ServerError),
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateError::Exists => f.write_str("a region of that name exists"),
            CreateError::TooMany(limit) => write!(
                f,
                "the server holds its limit of {limit} run-time regions (max_regions); remove \
                 one or raise the limit"
            ),
            CreateError::Config(e) => e.fmt(f),
            CreateError::Memory(e) => e.fmt(f),
        }
    }
}

impl Server {
    /// Creates the regions of `[[region]]` and of every VM's `create` lines that do not exist
    /// yet. The first creator decides the size.
    pub(crate) fn create_configured_regions(&mut self) -> Vec<String> {
        let mut changes = Vec::new();
        for wanted in self.configured_regions() {
            let name = wanted.name.to_string();
            if let Some(index) = self.find_region(&name) {
                if let Some(region) = self.regions.get_mut(&index) {
                    region.origin = Origin::Config;
                    let differences = settings_differences(&region.info(), &wanted);
                    if !differences.is_empty() {
                        changes.push(format!(
                            "region {name} exists with {}; the configured {} do not apply until \
                             it is recreated",
                            differences
                                .iter()
                                .map(|d| d.0.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            differences
                                .iter()
                                .map(|d| d.1.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                        ));
                    }
                }
                continue;
            }
            match self.create_named_region(&wanted, Origin::Config) {
                Ok(_) => changes.push(format!("created region {name}")),
                Err(e) => {
                    tracing::error!(region = %name, "cannot create region: {e}");
                    changes.push(format!("could not create region {name}: {e}"));
                }
            }
        }
        changes
    }

    /// The configured regions: `[[region]]` first, then each VM's `create`s (host names) with
    /// the defaults; a name seen twice keeps its first entry.
    pub(crate) fn configured_regions(&self) -> Vec<NamedRegionConfig> {
        let Some(named) = &self.named else {
            return Vec::new();
        };
        let mut out: Vec<NamedRegionConfig> = named.config.regions.clone();
        for vm in named.vms.values() {
            for (host_name, size) in vm.config.policy.pre_created() {
                if out.iter().all(|r| r.name != host_name) {
                    out.push(NamedRegionConfig::with_defaults(
                        host_name,
                        size,
                        &named.config.defaults,
                    ));
                }
            }
        }
        out
    }

    /// The live (not detached) named region called `name`.
    pub(crate) fn find_region(&self, name: &str) -> Option<usize> {
        self.regions
            .iter()
            .find(|(_, r)| r.origin != Origin::Standalone && !r.detached && r.name() == name)
            .map(|(&index, _)| index)
    }

    /// Creates a named region (memory only; [`sync_sockets`](Self::sync_sockets) adds its
    /// sockets).
    pub(crate) fn create_named_region(
        &mut self,
        config: &NamedRegionConfig,
        origin: Origin,
    ) -> Result<usize, CreateError> {
        validate_named_region(config).map_err(CreateError::Config)?;
        if self.find_region(config.name.as_str()).is_some() {
            return Err(CreateError::Exists);
        }
        if origin.is_run_time() {
            let limit = self
                .named
                .as_ref()
                .map_or(0, |n| n.config.defaults.max_regions);
            let held = self
                .regions
                .values()
                .filter(|r| r.origin.is_run_time())
                .count();
            if held >= limit {
                return Err(CreateError::TooMany(limit));
            }
        }
        let spec = RegionSpec {
            name: config.name.to_string(),
            backend: config.backend.kind(config.name.as_str()),
            size: config.size,
            pow2: config.pow2,
            vectors: config.vectors,
            peer_limit: config.peer_limit,
            id_policy: config.id_policy,
            origin,
            persist: config.persist,
        };
        let index = self.allocate_region_index();
        let region = Region::with_memory(index, &spec, self.max_queued_messages)
            .map_err(CreateError::Memory)?;
        self.regions.insert(index, region);
        Ok(index)
    }

    /// Retires region `index`: removed now if it has no peers, else its sockets go and it is
    /// dropped when its last peer leaves. Returns what happened.
    pub(crate) fn retire_region(&mut self, index: usize) -> String {
        let Some(region) = self.regions.get(&index) else {
            return "no such region".to_string();
        };
        let name = region.name().to_string();
        let peers = region.peer_ids();
        if peers.is_empty() {
            self.drop_region(index);
            return format!("removed region {name}");
        }
        let keys: Vec<usize> = region.sockets().iter().map(|s| s.key).collect();
        for key in keys {
            self.remove_region_socket(index, key);
        }
        if let Some(region) = self.regions.get_mut(&index) {
            region.detached = true;
        }
        format!(
            "region {name} removed from every VM directory; it stays until its {} connected \
             peer(s) {peers:?} leave",
            peers.len()
        )
    }
}

/// How an existing region differs from its configuration: `(what it has, what is configured)`
/// per setting, e.g. `("vectors=1", "vectors=16")`. A size differs only when the region is
/// smaller than configured (sizes are rounded up).
fn settings_differences(has: &RegionInfo, wanted: &NamedRegionConfig) -> Vec<(String, String)> {
    let mut differences = Vec::new();
    if has.size < wanted.size {
        differences.push((
            format!("{} bytes", has.size),
            format!("{} bytes", wanted.size),
        ));
    }
    let mut compare = |what: &str, has: String, wanted: String| {
        if has != wanted {
            differences.push((format!("{what}={has}"), format!("{what}={wanted}")));
        }
    };
    compare(
        "vectors",
        has.vectors.to_string(),
        wanted.vectors.to_string(),
    );
    compare(
        "peer_limit",
        has.peer_limit.to_string(),
        wanted.peer_limit.to_string(),
    );
    compare(
        "id_policy",
        has.id_policy.to_string(),
        wanted.id_policy.to_string(),
    );
    differences
}
