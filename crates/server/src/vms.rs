//! The VMs being served: each one's configuration, directory and factory socket, and keeping
//! each directory in step with the regions its VM may see (one v0 socket per region, named by
//! the VM's name for it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::endpoints::{Endpoints, Service};
use crate::listener::ListenerError;
use crate::listener_table::{SocketKey, VmSocket};
use crate::named::{guest_name_for, region_socket_name, VmConfig, FACTORY_SOCKET};
use crate::regions::{AddSocketError, RegionId, Regions};
use crate::stats::Stats;
use crate::vm_dir::{DirError, SocketRoot, VmDirectory};
use crate::ServerError;

/// Why a region's socket could not be added to a VM directory.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub(crate) enum VmSocketError {
    /// {0}
    ///
    /// The socket could not be bound in the directory.
    Dir(DirError),
    /// {0}
    ///
    /// The region did not take it.
    Region(AddSocketError),
    /// VM {vm} has no name for region {region}
    ///
    /// The VM's policy gives the region no name (so no socket).
    NoName {
        /// The VM.
        vm: String,
        /// The region.
        region: String,
    },
}

impl From<DirError> for VmSocketError {
    fn from(error: DirError) -> Self {
        Self::Dir(error)
    }
}

impl From<AddSocketError> for VmSocketError {
    fn from(error: AddSocketError) -> Self {
        Self::Region(error)
    }
}

impl VmSocketError {
    /// Whether it failed for lack of file descriptors.
    pub(crate) fn is_fd_exhaustion(&self) -> bool {
        matches!(
            self,
            VmSocketError::Dir(DirError::Socket(ListenerError::Sys { errno, .. }))
                if crate::limits::is_fd_exhaustion(*errno)
        )
    }
}

/// A VM being served.
#[derive(Debug)]
pub(crate) struct Vm {
    config: VmConfig,
    dir: VmDirectory,
    factory_key: u64,
    /// Its factory requests and their refusals (kept across reloads; gone with the VM).
    counters: Stats,
}

impl Vm {
    /// Its configuration.
    pub(crate) fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Its directory.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its factory socket.
    pub(crate) fn factory(&self) -> PathBuf {
        self.dir.file(FACTORY_SOCKET)
    }

    /// Its counters: factory requests and refusals (the v0 counters are per region).
    pub(crate) fn counters(&self) -> &Stats {
        &self.counters
    }
}

/// What one VM directory should hold for one region.
struct SocketPlan {
    region: RegionId,
    vm: String,
    /// The VM's name for the region, if it may see it.
    wanted: Option<String>,
    /// The socket it has now: key and guest name.
    existing: Option<(SocketKey, String)>,
}

/// The VMs, by name, with their directories under the socket root.
#[derive(Debug)]
pub(crate) struct Vms {
    root: SocketRoot,
    vms: BTreeMap<String, Vm>,
    /// VMs whose `intr`/`loc`/`sched` were reported as not applying to QEMU guests.
    placement_logged: BTreeSet<String>,
}

impl Vms {
    /// No VMs yet; their directories go in `root`.
    pub(crate) fn new(root: SocketRoot) -> Self {
        Vms {
            root,
            vms: BTreeMap::new(),
            placement_logged: BTreeSet::new(),
        }
    }

    /// The socket root.
    pub(crate) fn root(&self) -> &SocketRoot {
        &self.root
    }

    /// VM `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Vm> {
        self.vms.get(name)
    }

    /// Every VM, by name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Vm)> {
        self.vms.iter()
    }

    /// Whether VM `name` is served.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.vms.contains_key(name)
    }

    /// Makes a VM's directory and factory socket.
    pub(crate) fn add(
        &mut self,
        vm: VmConfig,
        endpoints: &mut Endpoints,
    ) -> Result<(), ServerError> {
        let dir = VmDirectory::create(&self.root, vm.name.as_str(), &vm.directory)?;
        // Left by a server that was killed: nothing would bind a run-time region's name again.
        for path in dir.remove_stale_sockets() {
            tracing::info!(
                vm = %vm.name,
                "removed stale socket {} (nobody listened on it: left by a server that did not \
                 stop cleanly)",
                path.display()
            );
        }
        let listener = dir.bind(FACTORY_SOCKET, &vm.directory)?;
        let factory_key = endpoints
            .add_listener(listener, Service::Factory(vm.name.to_string()))
            .map_err(ServerError::Epoll)?;
        tracing::info!(vm = %vm.name, directory = %dir.path().display(), "VM directory ready");
        self.log_placement_once(&vm);
        self.vms.insert(
            vm.name.to_string(),
            Vm {
                config: vm,
                dir,
                factory_key,
                counters: Stats::default(),
            },
        );
        Ok(())
    }

    /// Applies a changed configuration of a served VM: directory ownership and mode, the
    /// owner, group and mode of the sockets already in it (region sockets in `regions`, the
    /// factory socket in `endpoints`), policy. Returns what changed; a socket that could not
    /// be brought in line is named, with what to do.
    pub(crate) fn update(
        &mut self,
        vm: &VmConfig,
        regions: &Regions,
        endpoints: &Endpoints,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let Some(current) = self.vms.get_mut(vm.name.as_str()) else {
            return changes;
        };
        if current.config.directory != vm.directory {
            match current.dir.ensure(&vm.directory) {
                Ok(()) => {
                    let mut files = regions.vm_socket_files(vm.name.as_str());
                    files.extend(endpoints.listener_file(current.factory_key));
                    let mut failed = Vec::new();
                    for (name, identity) in &files {
                        if let Err(e) = current.dir.restamp(name, *identity, &vm.directory) {
                            failed.push(e.to_string());
                        }
                    }
                    changes.push(format!(
                        "VM {}: directory and its {} socket(s) updated to the new ownership and \
                         mode",
                        vm.name,
                        files.len() - failed.len()
                    ));
                    for failure in failed {
                        changes.push(format!(
                            "VM {}: {failure}; a restart of the server gives it the new \
                             ownership and mode",
                            vm.name
                        ));
                    }
                }
                Err(e) => changes.push(format!("VM {}: {e}", vm.name)),
            }
        }
        if current.config.policy != vm.policy {
            changes.push(format!("VM {}: policy updated", vm.name));
        }
        current.config = vm.clone();
        self.log_placement_once(vm);
        changes
    }

    /// Says once per VM that `intr`, `loc`, `sched` and `log` do not apply to QEMU guests.
    fn log_placement_once(&mut self, vm: &VmConfig) {
        let policy = &vm.policy;
        if policy.intr().is_none()
            && policy.loc().is_none()
            && policy.sched().is_none()
            && policy.log().is_empty()
        {
            return;
        }
        if self.placement_logged.insert(vm.name.to_string()) {
            tracing::warn!(
                vm = %vm.name,
                "intr/loc/sched/log are carried to guest_shm device models; they cannot apply to \
                 QEMU guests, which join through the v0 sockets"
            );
        }
    }

    /// Removes VM `name`: its factory socket and connections, its region sockets (peers stay
    /// connected) and its directory if empty. Returns what happened.
    pub(crate) fn remove(
        &mut self,
        name: &str,
        regions: &mut Regions,
        endpoints: &mut Endpoints,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let Some(vm) = self.vms.remove(name) else {
            return changes;
        };
        endpoints.remove(vm.factory_key);
        endpoints.close_connections_of(&Service::Factory(name.to_string()));
        let keys: Vec<SocketKey> = regions
            .sockets()
            .filter(|(_, s)| s.is_in(name))
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            changes.extend(regions.remove_socket(key).map(|r| r.to_string()));
        }
        vm.dir.remove_if_empty(&self.root);
        changes.push(format!(
            "VM {name} removed: its directory's sockets are gone"
        ));
        changes
    }

    /// Makes every VM directory hold exactly the sockets of the regions its VM may see, named
    /// by the VM's name for them. Returns what changed.
    pub(crate) fn sync_sockets(&self, regions: &mut Regions) -> Vec<String> {
        let mut changes = Vec::new();
        let mut plan: Vec<SocketPlan> = Vec::new();
        for (id, region) in regions.iter() {
            if !region.is_live_named() {
                continue;
            }
            for (vm_name, vm) in &self.vms {
                let wanted = guest_name_for(&vm.config.policy, region.name());
                let existing = regions.sockets_of(id).find_map(|(key, s)| match s.vm() {
                    Some(v) if &v.vm == vm_name => Some((key, v.guest.clone())),
                    _ => None,
                });
                plan.push(SocketPlan {
                    region: id,
                    vm: vm_name.clone(),
                    wanted,
                    existing,
                });
            }
        }
        // Sockets of VMs that are gone.
        let stale: Vec<SocketKey> = regions
            .sockets()
            .filter(|(_, s)| s.vm().is_some_and(|v| !self.vms.contains_key(&v.vm)))
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            changes.extend(regions.remove_socket(key).map(|r| r.to_string()));
        }
        for SocketPlan {
            region,
            vm,
            wanted,
            existing,
        } in plan
        {
            if let Some((key, guest)) = &existing {
                if wanted.as_ref() == Some(guest) {
                    continue;
                }
                changes.extend(regions.remove_socket(*key).map(|r| format!("VM {vm}: {r}")));
            }
            if let Some(guest) = wanted {
                match self.add_region_socket(regions, region, &vm, &guest) {
                    Ok(path) => changes.push(format!("VM {vm}: added socket {path}")),
                    Err(e) => {
                        tracing::error!(vm = %vm, region = guest, "cannot add socket: {e}");
                        changes.push(format!("VM {vm}: could not add socket {guest}: {e}"));
                    }
                }
            }
        }
        changes
    }

    /// Gives region `id` its socket in `vm`'s directory if it has none there (its bind failed
    /// in a socket sync: the error is only logged there). Returns the socket's path, or why
    /// it cannot have one.
    pub(crate) fn ensure_socket(
        &self,
        regions: &mut Regions,
        id: RegionId,
        vm: &str,
    ) -> Result<String, VmSocketError> {
        if let Some(path) = regions.socket_in(id, vm) {
            return Ok(path.display().to_string());
        }
        let region = regions
            .get(id)
            .map(|r| r.name().to_string())
            .unwrap_or_default();
        let guest = self
            .vms
            .get(vm)
            .and_then(|v| guest_name_for(&v.config.policy, &region))
            .ok_or_else(|| VmSocketError::NoName {
                vm: vm.to_string(),
                region: region.clone(),
            })?;
        let path = self.add_region_socket(regions, id, vm, &guest)?;
        // Only after a bind that failed in a socket sync (logged there): say so, as the trace
        // of what happened to it.
        tracing::warn!(
            vm = %vm,
            region = %region,
            "VM {vm}: region {region} had no socket in the directory; added socket {path}"
        );
        Ok(path)
    }

    /// Binds `<guest>.sock` in `vm`'s directory for `region`. Returns its path.
    fn add_region_socket(
        &self,
        regions: &mut Regions,
        region: RegionId,
        vm: &str,
        guest: &str,
    ) -> Result<String, VmSocketError> {
        let Some(entry) = self.vms.get(vm) else {
            return Ok(String::new());
        };
        let listener = entry
            .dir
            .bind(&region_socket_name(guest), &entry.config.directory)?;
        let path = listener.path().display().to_string();
        regions.add_socket(
            region,
            VmSocket {
                vm: vm.to_string(),
                guest: guest.to_string(),
            },
            listener,
        )?;
        Ok(path)
    }

    /// Removes every VM directory that is empty (when the server stops, after its sockets).
    pub(crate) fn remove_dirs(&self) {
        for vm in self.vms.values() {
            vm.dir.remove_if_empty(&self.root);
        }
    }
}
