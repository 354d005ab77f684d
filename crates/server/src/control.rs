//! Answers control requests, and reloads the configuration.

use ivshm_policy::GuestShmStatus;
use ivshm_policy::RegionName;
use ivshm_proto::control::{
    ControlRequest, ControlResponse, ControlResult, CreateRegion, RegionReport, StatsReport,
    VmRegionReport, VmReport,
};

use crate::config_file;
use crate::named::{NamedRegionConfig, Origin};
use crate::region::Region;
use crate::server::Server;

impl Server {
    /// Answers one control request.
    pub(crate) fn control_request(&mut self, request: ControlRequest) -> ControlResponse {
        match request {
            ControlRequest::Regions => ControlResponse::ok(ControlResult::Regions {
                regions: self.regions.values().map(region_report).collect(),
            }),
            ControlRequest::Vms => ControlResponse::ok(ControlResult::Vms {
                vms: self.vm_reports(),
            }),
            ControlRequest::Stats => ControlResponse::ok(ControlResult::Stats {
                stats: self.stats_report(),
            }),
            ControlRequest::Reload => match self.reload() {
                Ok(changes) => {
                    for change in &changes {
                        tracing::info!("reload: {change}");
                    }
                    ControlResponse::ok(ControlResult::Reloaded { changes })
                }
                Err(e) => {
                    tracing::error!("reload failed, nothing changed: {e}");
                    ControlResponse::error(e)
                }
            },
            ControlRequest::Create(create) => self.control_create(create),
            ControlRequest::Remove { name } => match self.find_region(&name) {
                Some(index) => {
                    let message = self.retire_region(index);
                    tracing::info!("control: {message}");
                    ControlResponse::ok(ControlResult::Removed { message })
                }
                None => ControlResponse::error(format!("no region named {name:?}")),
            },
        }
    }

    fn control_create(&mut self, create: CreateRegion) -> ControlResponse {
        let Some(named) = &self.named else {
            return ControlResponse::error("this server has no named regions");
        };
        let name = match RegionName::new(&create.name) {
            Ok(name) => name,
            Err(e) => return ControlResponse::error(format!("region name: {e}")),
        };
        let mut config =
            NamedRegionConfig::with_defaults(name, create.size, &named.config.defaults);
        if let Some(v) = create.vectors {
            config.vectors = v as usize;
        }
        if let Some(l) = create.peer_limit {
            config.peer_limit = l as usize;
        }
        if let Some(p) = &create.id_policy {
            match p.parse() {
                Ok(p) => config.id_policy = p,
                Err(e) => return ControlResponse::error(e),
            }
        }
        // `--persist` keeps this region; without it the server's default decides.
        config.persist |= create.persist;
        match self.create_named_region(&config, Origin::Control) {
            Ok(index) => {
                for change in self.sync_sockets() {
                    tracing::info!("{change}");
                }
                match self.regions.get(&index) {
                    Some(region) => ControlResponse::ok(ControlResult::Created {
                        region: region_report(region),
                    }),
                    None => ControlResponse::error("the region vanished"),
                }
            }
            Err(e) => ControlResponse::error(format!("region {}: {e}", create.name)),
        }
    }

    fn vm_reports(&self) -> Vec<VmReport> {
        let Some(named) = &self.named else {
            return Vec::new();
        };
        named
            .vms
            .iter()
            .map(|(name, vm)| {
                let mut regions = Vec::new();
                for region in self.regions.values() {
                    for socket in region.sockets() {
                        if let Some((v, guest)) = &socket.vm {
                            if v == name {
                                regions.push(VmRegionReport {
                                    guest_name: guest.clone(),
                                    host_name: region.name().to_string(),
                                    socket: socket.listener.path().display().to_string(),
                                    peers: region.peers_via(socket.key),
                                });
                            }
                        }
                    }
                }
                VmReport {
                    name: name.clone(),
                    directory: vm.dir.display().to_string(),
                    factory: vm.factory.display().to_string(),
                    regions,
                }
            })
            .collect()
    }

    fn stats_report(&self) -> StatsReport {
        let s = self.stats.snapshot();
        StatsReport {
            joins: s.peers_joined,
            leaves: s.peers_left,
            drops: s.peers_dropped,
            peers_connected: s.peers_connected,
            doorbell_fds: s.doorbell_fds,
            messages_sent: s.messages_sent,
            factory_requests: s.factory_requests,
            refusals: GuestShmStatus::ALL
                .iter()
                .filter(|st| !st.is_ok())
                .map(|st| (st.qnx_name().to_string(), s.refusals_with(*st)))
                .collect(),
        }
    }

    /// Re-reads the configuration file and applies it without dropping connected peers.
    /// Returns what changed; on error nothing changed.
    pub(crate) fn reload(&mut self) -> Result<Vec<String>, String> {
        let Some(path) = self.named.as_ref().and_then(|n| n.config.source.clone()) else {
            return Err("the server was not started from a configuration file".into());
        };
        let config = config_file::load(&path).map_err(|e| e.to_string())?;
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let Some(mut new) = config.named else {
            return Err(format!("{}: no named configuration", path.display()));
        };
        new.source = Some(path);
        if let Ok(root) = std::path::absolute(&new.root) {
            new.root = root;
        }
        let mut changes = Vec::new();
        let Some(named) = &mut self.named else {
            return Err("the server has no named regions".into());
        };
        if new.root != named.config.root {
            changes.push(format!(
                "root {} kept: a new socket root applies after a restart",
                named.config.root.display()
            ));
            new.root = named.config.root.clone();
        }
        if new.control != named.config.control {
            changes.push("control socket kept: a change applies after a restart".into());
            new.control = named.config.control.clone();
        }
        let old_vms: Vec<String> = named.vms.keys().cloned().collect();
        named.config = new.clone();
        // VMs that are gone.
        for name in &old_vms {
            if !new.vms.iter().any(|v| v.name.as_str() == name) {
                changes.extend(self.remove_vm(name));
            }
        }
        // New and changed VMs.
        for vm in &new.vms {
            let existing = self
                .named
                .as_mut()
                .and_then(|n| n.vms.get_mut(vm.name.as_str()));
            match existing {
                Some(current) => {
                    if current.config.directory != vm.directory {
                        match crate::vm_dirs::make_vm_dir(&current.dir, &vm.directory) {
                            Ok(()) => changes.push(format!(
                                "VM {}: directory ownership and mode updated (existing sockets \
                                 keep theirs)",
                                vm.name
                            )),
                            Err(e) => changes.push(format!("VM {}: {e}", vm.name)),
                        }
                    }
                    if current.config.policy != vm.policy {
                        changes.push(format!("VM {}: policy updated", vm.name));
                    }
                    current.config = vm.clone();
                    self.log_placement_once(vm);
                }
                None => match self.add_vm(vm.clone()) {
                    Ok(()) => changes.push(format!("VM {} added", vm.name)),
                    Err(e) => changes.push(format!("VM {}: could not be added: {e}", vm.name)),
                },
            }
        }
        // Configured regions that are no longer configured.
        let wanted: Vec<String> = self
            .configured_regions()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        let retired: Vec<usize> = self
            .regions
            .iter()
            .filter(|(_, r)| {
                r.origin == Origin::Config && !r.detached && !wanted.iter().any(|w| w == r.name())
            })
            .map(|(&index, _)| index)
            .collect();
        for index in retired {
            changes.push(self.retire_region(index));
        }
        changes.extend(self.create_configured_regions());
        changes.extend(self.sync_sockets());
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        Ok(changes)
    }

    /// Reloads (on `SIGHUP`) and logs the outcome.
    pub(crate) fn reload_and_log(&mut self) {
        if self
            .named
            .as_ref()
            .and_then(|n| n.config.source.as_ref())
            .is_none()
        {
            return;
        }
        match self.reload() {
            Ok(changes) => {
                for change in changes {
                    tracing::info!("reload: {change}");
                }
            }
            Err(e) => tracing::error!("reload failed, nothing changed: {e}"),
        }
    }
}

fn region_report(region: &Region) -> RegionReport {
    let info = region.info();
    RegionReport {
        name: info.name,
        size: info.size,
        backend: info.memory,
        vectors: u32::try_from(info.vectors).unwrap_or(u32::MAX),
        peer_limit: u32::try_from(info.peer_limit).unwrap_or(u32::MAX),
        id_policy: info.id_policy.to_string(),
        origin: region.origin.as_str().to_string(),
        persist: region.persist,
        detached: region.detached,
        peers: region.peer_ids(),
        sockets: region
            .sockets()
            .iter()
            .map(|s| s.listener.path().display().to_string())
            .collect(),
    }
}
