//! Answers factory requests: the policy decides, then the region is found or created.
//!
//! Status codes: the policy gives `GSS_ILLEGAL_NAME` or `GSS_NO_PERMISSION`; `find` of a
//! missing region (or `create` with size 0) is `GSS_DOES_NOT_EXIST`; a region at its peer limit
//! is `GSS_CLIENT_MAX` (with the region's facts); a size above the configured `max_size`, one
//! the memory cannot be created with ([`memory_status`]), or a create beyond `max_regions`
//! run-time regions is `GSS_NOMEM`, as is a socket that cannot be bound for lack of file
//! descriptors; anything else (a backend that fails otherwise, a socket that cannot be bound
//! for another reason, said in the message, an unparsable request) is `GSS_UNKNOWN_FAILURE`.
//! A region made for a `create` whose socket cannot be bound is not kept.

use ivshm_mem::BackendError;
use ivshm_policy::guest_shm::whole_pages;
use ivshm_policy::{GuestShmStatus, RegionName};
use ivshm_proto::factory::{
    decode_line, encode_line, FactoryRequest, FactoryResponse, LineError, RegionOffer,
};
use rustix::io::Errno;

use crate::named::{NamedRegionConfig, Origin};
use crate::named_regions::NamedRegions;
use crate::regions::{CreateError, RegionId, Regions};
use crate::stats::Stats;

/// The response line to one request line from `vm`'s factory socket.
pub(crate) fn answer_line(
    named: Option<&NamedRegions>,
    regions: &mut Regions,
    stats: &Stats,
    vm: &str,
    line: Result<Vec<u8>, LineError>,
) -> Vec<u8> {
    let response = match line.and_then(|l| decode_line::<FactoryRequest>(&l)) {
        Ok(request) => answer(named, regions, stats, vm, request),
        Err(error) => {
            let vm_counters = named.and_then(|n| n.vms().get(vm)).map(|v| v.counters());
            for counters in std::iter::once(stats).chain(vm_counters) {
                counters.factory_request();
                counters.refusal(GuestShmStatus::UnknownFailure);
            }
            tracing::info!(
                region = %"-",
                vm = %vm,
                peer = %"-",
                status = %GuestShmStatus::UnknownFailure,
                "factory: refused an unreadable request: {error}"
            );
            refusal(GuestShmStatus::UnknownFailure, error.to_string())
        }
    };
    encode_line(&response)
}

/// Answers one factory request from `vm`'s factory socket.
pub(crate) fn answer(
    named: Option<&NamedRegions>,
    regions: &mut Regions,
    stats: &Stats,
    vm: &str,
    request: FactoryRequest,
) -> FactoryResponse {
    // The server's counters and the VM's own.
    let vm_counters = named.and_then(|n| n.vms().get(vm)).map(|v| v.counters());
    let counters = || std::iter::once(stats).chain(vm_counters);
    counters().for_each(Stats::factory_request);
    let (name, size, create) = match request {
        FactoryRequest::Create { name, size } => (name, size, true),
        FactoryRequest::Find { name } => (name, 0, false),
    };
    let response = match named {
        Some(named) => decide(named, regions, vm, &name, size, create),
        None => refusal(GuestShmStatus::UnknownFailure, format!("VM {vm} is gone")),
    };
    let status = response.status;
    // One line per answer, with the fields of the v0 join and leave lines: the region (host
    // name, `-` when the policy refused the name), the VM and the peer id (`-`: a factory
    // client is not a peer).
    let region = response
        .region
        .as_ref()
        .map_or("-", |offer| offer.host_name.as_str());
    if status.is_ok() {
        tracing::info!(region = %region, vm = %vm, peer = %"-", name = %name, "factory: {}", response.message);
    } else {
        counters().for_each(|c| c.refusal(status));
        tracing::info!(region = %region, vm = %vm, peer = %"-", name = %name, status = %status, "factory: {}", response.message);
    }
    response
}

fn decide(
    named: &NamedRegions,
    regions: &mut Regions,
    vm: &str,
    name: &str,
    size: u64,
    create: bool,
) -> FactoryResponse {
    let Some(policy) = named.vms().get(vm).map(|v| &v.config().policy) else {
        return refusal(GuestShmStatus::UnknownFailure, format!("VM {vm} is gone"));
    };
    // The policy refuses illegal names and the reserved `factory` (its socket would be the
    // VM's factory socket) before its rules, as QNX checks a name's legality before its
    // restrictions list.
    let decision = policy.decide(name);
    let Some(host_name) = decision.host_name.clone().filter(|_| decision.is_allowed()) else {
        return refusal(decision.status, decision.to_string());
    };
    let (id, made) = match regions.find_named(host_name.as_str()) {
        Some(id) => (id, false),
        None if !create || size == 0 => {
            return refusal(
                GuestShmStatus::DoesNotExist,
                format!("no region {host_name} (guest name {name})"),
            );
        }
        None => match create_region(named, regions, vm, &host_name, size) {
            Ok(id) => {
                for change in named.sync_sockets(regions) {
                    tracing::info!("{change}");
                }
                (id, true)
            }
            Err(refused) => return *refused,
        },
    };
    // A socket sync only logs a bind that fails: the answer says it, and a region made for
    // this request is not kept without its socket (every later create or find of the name
    // would find it so, until it was reclaimed).
    let socket = match named.vms().ensure_socket(regions, id, vm) {
        Ok(socket) => socket,
        Err(error) => {
            if made {
                if let Some(retired) = regions.retire(id) {
                    tracing::info!(region = %host_name, "factory: {retired}: it has no socket");
                }
            }
            let status = if error.is_fd_exhaustion() {
                GuestShmStatus::NoMem
            } else {
                GuestShmStatus::UnknownFailure
            };
            return refusal(
                status,
                format!("region {host_name} has no socket in the directory of VM {vm}: {error}"),
            );
        }
    };
    // The client is told of the socket: it has the whole unused_timeout to join.
    regions.offered(id);
    let (Some(region), Some(info)) = (regions.get(id), regions.info(id)) else {
        return refusal(GuestShmStatus::UnknownFailure, "region vanished".into());
    };
    let offer = RegionOffer {
        guest_name: decision.guest_name.clone(),
        host_name: host_name.to_string(),
        size: info.size,
        vectors: u32::try_from(info.vectors).unwrap_or(u32::MAX),
        peer_limit: u32::try_from(info.peer_limit).unwrap_or(u32::MAX),
        id_policy: info.id_policy.to_string(),
        peers: u32::try_from(region.peer_count()).unwrap_or(u32::MAX),
        socket,
    };
    let (status, message) = match region.room() {
        Err(full) => (
            GuestShmStatus::ClientMax,
            format!("{decision}: region {host_name} {full}"),
        ),
        Ok(()) => (GuestShmStatus::Ok, decision.to_string()),
    };
    FactoryResponse::new(status, message, Some(offer))
}

/// Makes region `host_name` for a factory `create` of `size` bytes (its sockets are added by
/// the caller's socket sync). A region of that name that was removed but is kept for its
/// connected peers is made to serve again instead: one name is one region, so peers that
/// asked for it share memory.
fn create_region(
    named: &NamedRegions,
    regions: &mut Regions,
    vm: &str,
    host_name: &RegionName,
    size: u64,
) -> Result<RegionId, Box<FactoryResponse>> {
    if let Some((id, peers)) = regions.revive_kept(host_name.as_str(), Origin::Factory) {
        tracing::info!(
            region = %host_name,
            "factory: region {host_name}, kept for its {} connected peer(s) {peers:?}, serves \
             again",
            peers.len()
        );
        return Ok(id);
    }
    let defaults = named.defaults();
    // What the region would get: whole pages (`Regions::create_named`).
    if whole_pages(size).is_none_or(|bytes| bytes > defaults.max_size) {
        return Err(Box::new(refusal(
            GuestShmStatus::NoMem,
            format!(
                "region {host_name}: {size} bytes is more than the {} bytes allowed",
                defaults.max_size
            ),
        )));
    }
    let config = NamedRegionConfig::with_defaults(host_name.clone(), size, defaults);
    named
        .create_region(regions, &config, Origin::Factory, Some(vm))
        .map_err(|e| {
            Box::new(refusal(
                create_status(&e),
                format!("region {host_name}: {e}"),
            ))
        })
}

/// The status for a region that could not be created: `GSS_NOMEM` beyond `max_regions` or
/// when its memory cannot be had ([`memory_status`]), `GSS_UNKNOWN_FAILURE` otherwise.
fn create_status(error: &CreateError) -> GuestShmStatus {
    match error {
        CreateError::Memory(source) => memory_status(source),
        CreateError::TooMany { .. }
        | CreateError::VmRegions { .. }
        | CreateError::VmBytes { .. } => GuestShmStatus::NoMem,
        CreateError::Exists | CreateError::Kept { .. } | CreateError::Config(_) => {
            GuestShmStatus::UnknownFailure
        }
    }
}

/// The status for memory that could not be created: `GSS_NOMEM` when the size cannot be had
/// (too large for a file, refused by the power-of-two or huge-page rules, or the system is out
/// of memory or space), `GSS_UNKNOWN_FAILURE` for anything else (a missing backend directory,
/// no permission, no file descriptors).
fn memory_status(error: &BackendError) -> GuestShmStatus {
    match error {
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
    FactoryResponse::refusal(status, message)
}
