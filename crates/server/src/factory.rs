//! Answers factory requests: the policy decides, then the region is found or created.
//!
//! Status codes: the policy gives `GSS_ILLEGAL_NAME` or `GSS_NO_PERMISSION`; `find` of a
//! missing region (or `create` with size 0) is `GSS_DOES_NOT_EXIST`; a region at its peer limit
//! is `GSS_CLIENT_MAX` (with the region's facts); a size above the configured `max_size`, one
//! the memory cannot be created with ([`memory_status`]), or a create beyond `max_regions`
//! run-time regions is `GSS_NOMEM`; anything else (a
//! backend that fails otherwise, a socket that cannot be bound, an unparsable request) is
//! `GSS_UNKNOWN_FAILURE`.

use ivshm_mem::BackendError;
use ivshm_policy::GuestShmStatus;
use ivshm_proto::factory::{FactoryRequest, FactoryResponse, RegionOffer, VERSION};

use crate::named::{is_reserved_guest_name, NamedRegionConfig, Origin, FACTORY_SOCKET};
use crate::region_lifecycle::CreateError;
use crate::server::Server;
use crate::ServerError;
use rustix::io::Errno;

impl Server {
    /// Answers one factory request from `vm`'s factory socket.
    pub(crate) fn factory_request(&mut self, vm: &str, request: FactoryRequest) -> FactoryResponse {
        self.stats.factory_request();
        let (name, size, create) = match request {
            FactoryRequest::Create { name, size } => (name, size, true),
            FactoryRequest::Find { name } => (name, 0, false),
        };
        let response = self.factory_decide(vm, &name, size, create);
        let status =
            GuestShmStatus::from_u32(response.code).unwrap_or(GuestShmStatus::UnknownFailure);
        if status.is_ok() {
            tracing::info!(vm, name, "factory: {}", response.message);
        } else {
            self.stats.refusal(status);
            tracing::info!(vm, name, status = %status, "factory: {}", response.message);
        }
        response
    }

    fn factory_decide(&mut self, vm: &str, name: &str, size: u64, create: bool) -> FactoryResponse {
        let Some(policy) = self
            .named
            .as_ref()
            .and_then(|n| n.vms.get(vm))
            .map(|v| v.config.policy.clone())
        else {
            return refusal(GuestShmStatus::UnknownFailure, format!("VM {vm} is gone"));
        };
        let decision = policy.decide(name);
        if decision.is_allowed() && is_reserved_guest_name(&decision.guest_name) {
            return refusal(
                GuestShmStatus::IllegalName,
                format!(
                    "{name}: {}: the name is reserved (its socket would be the VM's {FACTORY_SOCKET})",
                    GuestShmStatus::IllegalName
                ),
            );
        }
        let Some(host_name) = decision.host_name.clone().filter(|_| decision.is_allowed()) else {
            return refusal(decision.status, decision.to_string());
        };
        let index = match self.find_region(host_name.as_str()) {
            Some(index) => index,
            None if !create || size == 0 => {
                return refusal(
                    GuestShmStatus::DoesNotExist,
                    format!("no region {host_name} (guest name {name})"),
                );
            }
            None => {
                let defaults = self
                    .named
                    .as_ref()
                    .map(|n| n.config.defaults.clone())
                    .unwrap_or_default();
                if size > defaults.max_size {
                    return refusal(
                        GuestShmStatus::NoMem,
                        format!(
                            "region {host_name}: {size} bytes is more than the {} bytes allowed",
                            defaults.max_size
                        ),
                    );
                }
                let config = NamedRegionConfig::with_defaults(host_name.clone(), size, &defaults);
                match self.create_named_region(&config, Origin::Factory) {
                    Ok(index) => {
                        for change in self.sync_sockets() {
                            tracing::info!("{change}");
                        }
                        index
                    }
                    Err(CreateError::Memory(e)) => {
                        return refusal(memory_status(&e), format!("region {host_name}: {e}"));
                    }
                    Err(e @ CreateError::TooMany(_)) => {
                        return refusal(GuestShmStatus::NoMem, format!("region {host_name}: {e}"));
                    }
                    Err(e) => {
                        return refusal(
                            GuestShmStatus::UnknownFailure,
                            format!("region {host_name}: {e}"),
                        );
                    }
                }
            }
        };
        let Some(socket) = self.socket_in(index, vm) else {
            return refusal(
                GuestShmStatus::UnknownFailure,
                format!("region {host_name} has no socket in the directory of VM {vm}"),
            );
        };
        let Some(region) = self.regions.get(&index) else {
            return refusal(GuestShmStatus::UnknownFailure, "region vanished".into());
        };
        let info = region.info();
        let offer = RegionOffer {
            guest_name: decision.guest_name.clone(),
            host_name: host_name.to_string(),
            size: info.size,
            vectors: u32::try_from(info.vectors).unwrap_or(u32::MAX),
            peer_limit: u32::try_from(info.peer_limit).unwrap_or(u32::MAX),
            id_policy: info.id_policy.to_string(),
            peers: u32::try_from(region.peer_count()).unwrap_or(u32::MAX),
            socket: socket.display().to_string(),
        };
        let (status, message) = if region.is_full() {
            (
                GuestShmStatus::ClientMax,
                format!(
                    "{decision}: region {host_name} has its limit of {} peer(s)",
                    info.peer_limit
                ),
            )
        } else {
            (GuestShmStatus::Ok, decision.to_string())
        };
        FactoryResponse {
            version: VERSION,
            status: status.qnx_name().to_string(),
            code: status.as_u32(),
            message,
            region: Some(offer),
        }
    }
}

/// The status for memory that could not be created: `GSS_NOMEM` when the size cannot be had
/// (too large for a file, refused by the power-of-two or huge-page rules, or the system is out
/// of memory or space), `GSS_UNKNOWN_FAILURE` for anything else (a missing backend directory,
/// no permission, no file descriptors).
fn memory_status(error: &ServerError) -> GuestShmStatus {
    let ServerError::Memory { source, .. } = error else {
        return GuestShmStatus::UnknownFailure;
    };
    match source {
        BackendError::Size(_)
        | BackendError::HugePageRounding { .. }
        | BackendError::TooLarge(_) => GuestShmStatus::NoMem,
        BackendError::Sys { errno, .. } | BackendError::Resize { errno, .. }
            if [Errno::NOMEM, Errno::NOSPC, Errno::FBIG, Errno::INVAL].contains(errno) =>
        {
            GuestShmStatus::NoMem
        }
        _ => GuestShmStatus::UnknownFailure,
    }
}

fn refusal(status: GuestShmStatus, message: String) -> FactoryResponse {
    FactoryResponse {
        version: VERSION,
        status: status.qnx_name().to_string(),
        code: status.as_u32(),
        message,
        region: None,
    }
}
