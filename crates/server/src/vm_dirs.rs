//! VM directories: setting them up (owner, group, modes), their factory sockets, and keeping
//! each VM's directory in step with the regions it may see (one v0 socket per region, named by
//! the VM's name for it). Regions themselves are made and retired in
//! [`crate::region_lifecycle`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rustix::fs::{Gid, Mode, Uid};
use rustix::io::Errno;

use crate::config::ListenerConfig;
use crate::endpoints::Service;
use crate::listener::Listener;
use crate::named::{
    guest_name_for, DirectoryConfig, NamedConfig, Origin, VmConfig, FACTORY_SOCKET,
};
use crate::region::RegionSocket;
use crate::server::Server;
use crate::ServerError;

/// The named part of a running server.
#[derive(Debug)]
pub(crate) struct Named {
    pub(crate) config: NamedConfig,
    pub(crate) vms: BTreeMap<String, Vm>,
    /// The control socket's endpoint key.
    pub(crate) control_key: Option<u64>,
    /// VMs whose `intr`/`loc`/`sched` were reported as not applying to QEMU guests.
    placement_logged: BTreeSet<String>,
}

/// A VM being served.
#[derive(Debug)]
pub(crate) struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) dir: PathBuf,
    pub(crate) factory: PathBuf,
    pub(crate) factory_key: u64,
}

impl Server {
    pub(crate) fn setup_named(&mut self, mut config: NamedConfig) -> Result<(), ServerError> {
        // Factory answers carry absolute socket paths.
        config.root = std::path::absolute(&config.root)
            .map_err(|e| ServerError::Setup(format!("{}: {e}", config.root.display())))?;
        make_root(&config.root)?;
        let mut named = Named {
            config: config.clone(),
            vms: BTreeMap::new(),
            control_key: None,
            placement_logged: BTreeSet::new(),
        };
        if let Some(control) = &config.control {
            let listener = Listener::bind(&ListenerConfig {
                path: control.path.clone(),
                mode: control.mode,
                group: control.group.clone(),
            })?;
            tracing::info!(socket = %control.path.display(), "control socket");
            let key = self
                .add_endpoint_listener(listener, Service::Control)
                .map_err(ServerError::Epoll)?;
            named.control_key = Some(key);
        }
        self.named = Some(named);
        for vm in &config.vms {
            self.add_vm(vm.clone())?;
        }
        for change in self.create_configured_regions() {
            tracing::info!("{change}");
        }
        for change in self.sync_sockets() {
            tracing::info!("{change}");
        }
        Ok(())
    }

    /// Makes a VM's directory and factory socket.
    pub(crate) fn add_vm(&mut self, vm: VmConfig) -> Result<(), ServerError> {
        let Some(named) = &self.named else {
            return Ok(());
        };
        let dir = named.config.root.join(vm.name.as_str());
        make_vm_dir(&dir, &vm.directory)?;
        let factory = dir.join(FACTORY_SOCKET);
        let listener = bind_vm_socket(&factory, &vm.directory)?;
        let key = self
            .add_endpoint_listener(listener, Service::Factory(vm.name.to_string()))
            .map_err(ServerError::Epoll)?;
        tracing::info!(vm = %vm.name, directory = %dir.display(), "VM directory ready");
        self.log_placement_once(&vm);
        if let Some(named) = &mut self.named {
            named.vms.insert(
                vm.name.to_string(),
                Vm {
                    config: vm,
                    dir,
                    factory,
                    factory_key: key,
                },
            );
        }
        Ok(())
    }

    /// Says once per VM that `intr`, `loc` and `sched` do not apply to QEMU guests.
    pub(crate) fn log_placement_once(&mut self, vm: &VmConfig) {
        let policy = &vm.policy;
        if policy.intr().is_none() && policy.loc().is_none() && policy.sched().is_none() {
            return;
        }
        let Some(named) = &mut self.named else {
            return;
        };
        if named.placement_logged.insert(vm.name.to_string()) {
            tracing::warn!(
                vm = %vm.name,
                "intr/loc/sched are carried to guest_shm device models; they cannot apply to \
                 QEMU guests, which join through the v0 sockets"
            );
        }
    }

    /// Removes a VM: its factory socket, its region sockets (peers stay connected) and its
    /// directory if empty. Returns what happened.
    pub(crate) fn remove_vm(&mut self, name: &str) -> Vec<String> {
        let mut changes = Vec::new();
        let Some(vm) = self.named.as_mut().and_then(|n| n.vms.remove(name)) else {
            return changes;
        };
        self.endpoints.remove(vm.factory_key);
        self.endpoints
            .close_connections_of(&Service::Factory(name.to_string()));
        let keys: Vec<(usize, usize)> = self
            .regions
            .iter()
            .flat_map(|(&index, r)| {
                r.sockets()
                    .iter()
                    .filter(|s| s.vm.as_ref().is_some_and(|(v, _)| v == name))
                    .map(move |s| (index, s.key))
            })
            .collect();
        for (index, key) in keys {
            changes.extend(self.remove_region_socket(index, key));
        }
        let _ = std::fs::remove_dir(&vm.dir);
        changes.push(format!(
            "VM {name} removed: its directory's sockets are gone"
        ));
        changes
    }

    pub(crate) fn remove_region_socket(&mut self, index: usize, key: usize) -> Option<String> {
        let region = self.regions.get_mut(&index)?;
        let peers = region.peers_via(key);
        let socket = region.remove_socket(key, &self.poller)?;
        self.listener_owner.remove(&key);
        let path = socket.listener.path().display().to_string();
        Some(if peers.is_empty() {
            format!("removed socket {path}")
        } else {
            format!(
                "removed socket {path}; its {} connected peer(s) {peers:?} stay connected to \
                 region {} until they leave",
                peers.len(),
                region.name()
            )
        })
    }

    /// Makes every VM directory hold exactly the sockets of the regions its VM may see, named
    /// by the VM's name for them. Returns what changed.
    pub(crate) fn sync_sockets(&mut self) -> Vec<String> {
        let mut changes = Vec::new();
        let Some(named) = &self.named else {
            return changes;
        };
        let mut plan: Vec<SocketPlan> = Vec::new();
        for (&index, region) in &self.regions {
            if region.origin == Origin::Standalone || region.detached {
                continue;
            }
            for (vm_name, vm) in &named.vms {
                let wanted = guest_name_for(&vm.config.policy, region.name());
                let existing = region.sockets().iter().find_map(|s| match &s.vm {
                    Some((v, guest)) if v == vm_name => Some((s.key, guest.clone())),
                    _ => None,
                });
                plan.push(SocketPlan {
                    index,
                    vm_name: vm_name.clone(),
                    wanted,
                    existing,
                });
            }
        }
        // Sockets of VMs that are gone.
        let stale: Vec<(usize, usize)> = self
            .regions
            .iter()
            .flat_map(|(&index, r)| {
                r.sockets()
                    .iter()
                    .filter(|s| {
                        s.vm.as_ref()
                            .is_some_and(|(v, _)| !named.vms.contains_key(v))
                    })
                    .map(move |s| (index, s.key))
            })
            .collect();
        for (index, key) in stale {
            changes.extend(self.remove_region_socket(index, key));
        }
        for SocketPlan {
            index,
            vm_name,
            wanted,
            existing,
        } in plan
        {
            if let Some((key, guest)) = &existing {
                if wanted.as_ref() == Some(guest) {
                    continue;
                }
                changes.extend(
                    self.remove_region_socket(index, *key)
                        .map(|c| format!("VM {vm_name}: {c}")),
                );
            }
            if let Some(guest) = wanted {
                match self.add_region_socket(index, &vm_name, &guest) {
                    Ok(path) => changes.push(format!("VM {vm_name}: added socket {path}")),
                    Err(e) => {
                        tracing::error!(vm = %vm_name, region = guest, "cannot add socket: {e}");
                        changes.push(format!("VM {vm_name}: could not add socket {guest}: {e}"));
                    }
                }
            }
        }
        changes
    }

    fn add_region_socket(
        &mut self,
        index: usize,
        vm_name: &str,
        guest: &str,
    ) -> Result<String, ServerError> {
        let Some(vm) = self.named.as_ref().and_then(|n| n.vms.get(vm_name)) else {
            return Ok(String::new());
        };
        let path = vm.dir.join(format!("{guest}.sock"));
        let listener = bind_vm_socket(&path, &vm.config.directory)?;
        let key = self.allocate_listener_key(index);
        if let Some(region) = self.regions.get_mut(&index) {
            region.add_socket(
                RegionSocket {
                    key,
                    vm: Some((vm_name.to_string(), guest.to_string())),
                    listener,
                },
                &self.poller,
            );
        }
        Ok(path.display().to_string())
    }

    /// The socket of region `index` in `vm`'s directory.
    pub(crate) fn socket_in(&self, index: usize, vm: &str) -> Option<PathBuf> {
        self.regions.get(&index)?.sockets().iter().find_map(|s| {
            s.vm.as_ref()
                .filter(|(v, _)| v == vm)
                .map(|_| s.listener.path().to_path_buf())
        })
    }
}

/// What one VM directory should hold for one region.
struct SocketPlan {
    index: usize,
    vm_name: String,
    /// The VM's name for the region, if it may see it.
    wanted: Option<String>,
    /// The socket it has now: key and guest name.
    existing: Option<(usize, String)>,
}

/// Binds a socket in a VM directory with the directory's socket mode and group, owned by the
/// directory's owner (so that a VMM running as that user can connect), if one is configured.
fn bind_vm_socket(path: &Path, directory: &DirectoryConfig) -> Result<Listener, ServerError> {
    let listener = Listener::bind(&ListenerConfig {
        path: path.to_path_buf(),
        mode: directory.socket_mode,
        group: directory.group.clone(),
    })?;
    if let Some(owner) = directory.owner {
        rustix::fs::chown(path, Some(Uid::from_raw(owner)), None)
            .map_err(|e| setup_error("changing owner of", path, e))?;
    }
    Ok(listener)
}

fn setup_error(what: &str, path: &Path, errno: Errno) -> ServerError {
    ServerError::Setup(format!("{what} {}: {errno}", path.display()))
}

/// Makes the socket root (mode 0755) if it does not exist.
fn make_root(root: &Path) -> Result<(), ServerError> {
    if root.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(root)
        .map_err(|e| ServerError::Setup(format!("creating {}: {e}", root.display())))?;
    rustix::fs::chmod(root, Mode::from_raw_mode(0o755))
        .map_err(|e| setup_error("changing mode of", root, e))
}

/// Makes (or reuses) a VM directory and gives it its mode, owner and group.
pub(crate) fn make_vm_dir(dir: &Path, config: &DirectoryConfig) -> Result<(), ServerError> {
    match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(setup_error("creating", dir, e)),
    }
    if !dir.is_dir() {
        return Err(ServerError::Setup(format!(
            "{} exists and is not a directory",
            dir.display()
        )));
    }
    let gid = config
        .group
        .as_ref()
        .map(|g| g.resolve())
        .transpose()
        .map_err(|e| ServerError::Setup(format!("group of {}: {e}", dir.display())))?;
    if config.owner.is_some() || gid.is_some() {
        rustix::fs::chown(dir, config.owner.map(Uid::from_raw), gid.map(Gid::from_raw))
            .map_err(|e| setup_error("changing owner of", dir, e))?;
    }
    rustix::fs::chmod(dir, Mode::from_raw_mode(config.dir_mode))
        .map_err(|e| setup_error("changing mode of", dir, e))
}
