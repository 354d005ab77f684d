//! The named part of a running server: its configuration, the VMs ([`Vms`]) and the control
//! socket; creating the configured regions (the first creator decides the size), making
//! run-time ones within `max_regions`, and reloading the configuration file without dropping
//! connected peers. Regions themselves live in [`Regions`].

use std::path::PathBuf;

use thiserror::Error;

use crate::access;
use crate::config::{ConfigError, ListenerConfig};
use crate::config_file::{self, FileConfigError};
use crate::endpoints::{Endpoints, Service};
use crate::listener::Listener;
use crate::named::{NamedConfig, NamedRegionConfig, Origin, RegionDefaults};
use crate::region::RegionInfo;
use crate::regions::{CreateError, Creator, RegionId, Regions};
use crate::vm_dir::{absolute_root, DirError, SocketRoot};
use crate::vms::Vms;
use crate::ServerError;

/// Why a reload changed nothing.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub(crate) enum ReloadError {
    /// the server was not started from a configuration file
    ///
    /// The server was not started from a configuration file.
    NoFile,
    /// {0}
    ///
    /// The file cannot be read or parsed.
    File(FileConfigError),
    /// {path}: {error}
    ///
    /// The file's configuration cannot work.
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: ConfigError,
    },
    /// {path}: no named configuration
    ///
    /// The file configures no named regions.
    NotNamed {
        /// The file.
        path: PathBuf,
    },
    /// {0}
    ///
    /// The socket root is no longer safe to work in.
    Root(DirError),
}

impl From<FileConfigError> for ReloadError {
    fn from(error: FileConfigError) -> Self {
        Self::File(error)
    }
}

impl From<DirError> for ReloadError {
    fn from(error: DirError) -> Self {
        Self::Root(error)
    }
}

/// How a reload's list of changes marks a warning (a VM directory it left unreachable).
const WARNING: &str = "warning: ";

/// Logs what a reload changed, one line each (warnings as warnings).
pub(crate) fn log_reload(changes: &[String]) {
    for change in changes {
        if change.starts_with(WARNING) {
            tracing::warn!("reload: {change}");
        } else {
            tracing::info!("reload: {change}");
        }
    }
}

/// Named regions, VMs and the control socket of a running server.
#[derive(Debug)]
pub(crate) struct NamedRegions {
    config: NamedConfig,
    vms: Vms,
    /// Who cannot reach which VM directory, as last checked ([`check_access`](Self::check_access)).
    access_warnings: Vec<String>,
}

impl NamedRegions {
    /// Makes the socket root, the control socket, every VM's directory and factory, the
    /// configured regions and their sockets.
    pub(crate) fn setup(
        mut config: NamedConfig,
        regions: &mut Regions,
        endpoints: &mut Endpoints,
    ) -> Result<NamedRegions, ServerError> {
        // Factory answers carry absolute socket paths.
        let root = SocketRoot::open(&config.root)?;
        config.root = root.path().to_path_buf();
        if let Some(control) = &config.control {
            let listener = Listener::bind(&ListenerConfig {
                path: control.path.clone(),
                mode: control.mode,
                group: control.group.clone(),
            })?;
            tracing::info!(socket = %control.path.display(), "control socket");
            endpoints
                .add_listener(listener, Service::Control)
                .map_err(ServerError::Epoll)?;
        }
        let mut named = NamedRegions {
            vms: Vms::new(root),
            config,
            access_warnings: Vec::new(),
        };
        for vm in named.config.vms.clone() {
            named.vms.add(vm, endpoints)?;
        }
        for change in named.create_configured_regions(regions) {
            tracing::info!("{change}");
        }
        for change in named.sync_sockets(regions) {
            tracing::info!("{change}");
        }
        for warning in named.check_access() {
            tracing::warn!("{warning}");
        }
        Ok(named)
    }

    /// Who cannot reach which VM directory: the configured group or libvirt's QEMU user (from
    /// `/etc/libvirt/qemu.conf`, when libvirt is installed), see
    /// [`access::host_vm_directory_warnings`]. QEMU's `Permission denied` never reaches the server,
    /// so the server says it at start and after a reload. Returns the warnings that are new
    /// since the last check (all of them at start; what a reload brought after).
    fn check_access(&mut self) -> Vec<String> {
        let warnings = access::host_vm_directory_warnings(&self.config);
        let new = warnings
            .iter()
            .filter(|w| !self.access_warnings.contains(w))
            .cloned()
            .collect();
        self.access_warnings = warnings;
        new
    }

    /// The VMs.
    pub(crate) fn vms(&self) -> &Vms {
        &self.vms
    }

    /// Settings for regions made at run time.
    pub(crate) fn defaults(&self) -> &RegionDefaults {
        &self.config.defaults
    }

    /// Whether the configuration came from a file (and can be reloaded).
    pub(crate) fn has_source(&self) -> bool {
        self.config.source.is_some()
    }

    /// Makes every VM directory hold exactly the sockets of the regions its VM may see.
    pub(crate) fn sync_sockets(&self, regions: &mut Regions) -> Vec<String> {
        self.vms.sync_sockets(regions)
    }

    /// Creates a named region (memory only; [`sync_sockets`](Self::sync_sockets) adds its
    /// sockets). Run-time regions count against `max_regions`.
    /// A factory's `create` passes its VM (`creator`), whose limits it counts against.
    pub(crate) fn create_region(
        &self,
        regions: &mut Regions,
        config: &NamedRegionConfig,
        origin: Origin,
        creator: Option<&str>,
    ) -> Result<RegionId, CreateError> {
        let creator = creator.and_then(|vm| {
            let limits = self.vms.get(vm)?.config().limits;
            Some(Creator { vm, limits })
        });
        regions.create_named(config, origin, self.config.defaults.max_regions, creator)
    }

    /// The configured regions: `[[region]]` first, then each VM's `create`s (host names) with
    /// the defaults; a name seen twice keeps its first entry.
    fn configured_regions(&self) -> Vec<NamedRegionConfig> {
        let mut out: Vec<NamedRegionConfig> = self.config.regions.clone();
        for (_, vm) in self.vms.iter() {
            for (host_name, size) in vm.config().policy.pre_created() {
                if out.iter().all(|r| r.name != host_name) {
                    out.push(NamedRegionConfig::with_defaults(
                        host_name,
                        size,
                        &self.config.defaults,
                    ));
                }
            }
        }
        out
    }

    /// Creates the regions of `[[region]]` and of every VM's `create` lines that do not exist
    /// yet. The first creator decides the size. Returns what happened.
    fn create_configured_regions(&self, regions: &mut Regions) -> Vec<String> {
        let mut changes = Vec::new();
        for wanted in self.configured_regions() {
            let name = wanted.name.to_string();
            if let Some(id) = regions.find_named(&name) {
                let has = regions.info(id);
                regions.adopt_as_configured(id);
                let differences = has
                    .map(|has| settings_differences(&has, &wanted))
                    .unwrap_or_default();
                if !differences.is_empty() {
                    changes.push(format!(
                        "region {name} exists with {}; the configured {} do not apply until it \
                         is recreated",
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
                continue;
            }
            if let Some((_, peers)) = regions.revive_kept(&name, Origin::Config) {
                changes.push(format!(
                    "region {name} configured again: the region kept for its {} connected \
                     peer(s) {peers:?} serves again, with the same memory",
                    peers.len()
                ));
                continue;
            }
            match self.create_region(regions, &wanted, Origin::Config, None) {
                Ok(_) => changes.push(format!("created region {name}")),
                Err(e) => {
                    tracing::error!(region = %name, "cannot create region: {e}");
                    changes.push(format!("could not create region {name}: {e}"));
                }
            }
        }
        changes
    }

    /// Re-reads the configuration file and applies it without dropping connected peers.
    /// Returns what changed; on error nothing changed.
    pub(crate) fn reload(
        &mut self,
        regions: &mut Regions,
        endpoints: &mut Endpoints,
    ) -> Result<Vec<String>, ReloadError> {
        let Some(path) = self.config.source.clone() else {
            return Err(ReloadError::NoFile);
        };
        let config = config_file::load(&path)?;
        if let Err(error) = config.validate() {
            return Err(ReloadError::Invalid { path, error });
        }
        let Some(mut new) = config.named else {
            return Err(ReloadError::NotNamed { path });
        };
        new.source = Some(path);
        new.root = absolute_root(&new.root);
        self.vms.root().recheck()?;
        let mut changes = Vec::new();
        if new.root != self.config.root {
            changes.push(format!(
                "root {} kept: a new socket root applies after a restart",
                self.config.root.display()
            ));
            new.root = self.config.root.clone();
        }
        if new.control != self.config.control {
            changes.push("control socket kept: a change applies after a restart".into());
            new.control = self.config.control.clone();
        }
        let old_vms: Vec<String> = self.vms.iter().map(|(name, _)| name.clone()).collect();
        self.config = new.clone();
        // VMs that are gone.
        for name in &old_vms {
            if !new.vms.iter().any(|v| v.name.as_str() == name) {
                changes.extend(self.vms.remove(name, regions, endpoints));
            }
        }
        // New and changed VMs.
        for vm in &new.vms {
            if self.vms.contains(vm.name.as_str()) {
                changes.extend(self.vms.update(vm, regions, endpoints));
            } else {
                match self.vms.add(vm.clone(), endpoints) {
                    Ok(()) => changes.push(format!("VM {} added", vm.name)),
                    Err(e) => changes.push(format!("VM {}: could not be added: {e}", vm.name)),
                }
            }
        }
        // Configured regions that are no longer configured.
        let wanted: Vec<String> = self
            .configured_regions()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        let retired: Vec<RegionId> = regions
            .iter()
            .filter(|(_, r)| {
                r.origin() == Origin::Config
                    && !r.is_detached()
                    && !wanted.iter().any(|w| w == r.name())
            })
            .map(|(id, _)| id)
            .collect();
        for id in retired {
            changes.extend(regions.retire(id).map(|r| r.to_string()));
        }
        changes.extend(self.create_configured_regions(regions));
        changes.extend(self.sync_sockets(regions));
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        changes.extend(
            self.check_access()
                .into_iter()
                .map(|w| format!("{WARNING}{w}")),
        );
        Ok(changes)
    }

    /// Removes every VM directory that is empty (when the server stops, after its sockets).
    pub(crate) fn remove_dirs(&self) {
        self.vms.remove_dirs();
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
    compare(
        "id_reuse",
        has.id_reuse.to_string(),
        wanted.id_reuse.to_string(),
    );
    differences
}
