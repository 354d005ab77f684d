//! Answers control requests: list, create and remove regions, list VMs, read the counters,
//! reload the configuration file.

use ivshm_policy::{GuestShmStatus, RegionName};
use ivshm_proto::control::{
    ControlRequest, ControlResponse, ControlResult, CreateRegion, RegionCounters, RegionReport,
    StatsReport, VmRegionReport, VmReport,
};
use ivshm_proto::factory::{decode_line, encode_line, LineError};

use crate::endpoints::Endpoints;
use crate::named::{NamedRegionConfig, Origin};
use crate::named_regions::{NamedRegions, ReloadError};
use crate::peer::RemovalReason;
use crate::regions::{RegionId, Regions};
use crate::stats::Stats;

/// What control requests act on.
pub(crate) struct Subject<'a> {
    pub(crate) named: Option<&'a mut NamedRegions>,
    pub(crate) regions: &'a mut Regions,
    pub(crate) endpoints: &'a mut Endpoints,
    pub(crate) stats: &'a Stats,
}

/// The response line to one request line from the control socket.
pub(crate) fn answer_line(subject: Subject<'_>, line: Result<Vec<u8>, LineError>) -> Vec<u8> {
    let response = match line.and_then(|l| decode_line::<ControlRequest>(&l)) {
        Ok(request) => answer(subject, request),
        Err(error) => ControlResponse::error(error.to_string()),
    };
    encode_line(&response)
}

/// Answers one control request.
pub(crate) fn answer(subject: Subject<'_>, request: ControlRequest) -> ControlResponse {
    let Subject {
        named,
        regions,
        endpoints,
        stats,
    } = subject;
    match request {
        ControlRequest::Regions => ControlResponse::ok(ControlResult::Regions {
            regions: regions
                .iter()
                .filter_map(|(id, _)| region_report(regions, id))
                .collect(),
        }),
        ControlRequest::Vms => ControlResponse::ok(ControlResult::Vms {
            vms: named.map(|n| vm_reports(n, regions)).unwrap_or_default(),
        }),
        ControlRequest::Stats => ControlResponse::ok(ControlResult::Stats {
            stats: stats_report(stats),
        }),
        ControlRequest::Reload => match reload(named, regions, endpoints) {
            Ok(changes) => {
                crate::named_regions::log_reload(&changes);
                ControlResponse::ok(ControlResult::Reloaded { changes })
            }
            Err(e) => {
                tracing::error!("reload failed, nothing changed: {e}");
                ControlResponse::error(e.to_string())
            }
        },
        ControlRequest::Create(create) => match named {
            Some(named) => create_region(named, regions, &create),
            None => ControlResponse::error("this server has no named regions"),
        },
        ControlRequest::Remove { name } => match regions.find_named(&name) {
            Some(id) => {
                let message = regions
                    .retire(id)
                    .map_or_else(|| "no such region".to_string(), |r| r.to_string());
                tracing::info!("control: {message}");
                ControlResponse::ok(ControlResult::Removed { message })
            }
            None => ControlResponse::error(format!("no region named {name:?}")),
        },
    }
}

/// Reloads the configuration file (`SIGHUP` or a `reload` request).
pub(crate) fn reload(
    named: Option<&mut NamedRegions>,
    regions: &mut Regions,
    endpoints: &mut Endpoints,
) -> Result<Vec<String>, ReloadError> {
    match named {
        Some(named) => named.reload(regions, endpoints),
        None => Err(ReloadError::NoFile),
    }
}

fn create_region(
    named: &NamedRegions,
    regions: &mut Regions,
    create: &CreateRegion,
) -> ControlResponse {
    let name = match RegionName::new(&create.name) {
        Ok(name) => name,
        Err(e) => return ControlResponse::error(format!("region name: {e}")),
    };
    let mut config = NamedRegionConfig::with_defaults(name, create.size, named.defaults());
    if let Some(v) = create.vectors {
        // The configuration file takes 0 (QEMU's `-n 0`: memory without doorbells); a region
        // asked for at run time names its vectors to have them, as `ivshm create` checks.
        if v == 0 {
            return ControlResponse::error(format!(
                "region {}: 0 vectors per peer: a region created at run time has 1 to 64",
                create.name
            ));
        }
        config.vectors = v as usize;
    }
    if let Some(l) = create.peer_limit {
        config.peer_limit = l as usize;
    }
    if let Some(p) = &create.id_policy {
        match p.parse() {
            Ok(p) => config.id_policy = p,
            Err(e) => return ControlResponse::error(e.to_string()),
        }
    }
    if let Some(r) = &create.id_reuse {
        match r.parse() {
            Ok(r) => config.id_reuse = r,
            Err(e) => return ControlResponse::error(e.to_string()),
        }
    }
    // `--persist` keeps this region; without it the server's default decides.
    config.persist |= create.persist;
    match named.create_region(regions, &config, Origin::Control, None) {
        Ok(id) => {
            for change in named.sync_sockets(regions) {
                tracing::info!("{change}");
            }
            match region_report(regions, id) {
                Some(region) => ControlResponse::ok(ControlResult::Created {
                    region: Box::new(region),
                }),
                None => ControlResponse::error("the region vanished"),
            }
        }
        Err(e) => ControlResponse::error(format!("region {}: {e}", create.name)),
    }
}

pub(crate) fn vm_reports(named: &NamedRegions, regions: &Regions) -> Vec<VmReport> {
    named
        .vms()
        .iter()
        .map(|(name, vm)| {
            let mut reports = Vec::new();
            for (id, region) in regions.iter() {
                for (key, socket) in regions.sockets_of(id) {
                    if let Some(v) = socket.vm().filter(|v| &v.vm == name) {
                        reports.push(VmRegionReport {
                            guest_name: v.guest.clone(),
                            host_name: region.name().to_string(),
                            socket: socket.path().display().to_string(),
                            peers: region.peers_via(key),
                        });
                    }
                }
            }
            VmReport {
                name: name.clone(),
                directory: vm.dir().display().to_string(),
                factory: vm.factory().display().to_string(),
                regions: reports,
                counters: stats_report(vm.counters()),
            }
        })
        .collect()
}

/// The control protocol's form of counters.
pub(crate) fn stats_report(stats: &Stats) -> StatsReport {
    let s = stats.snapshot();
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
        removals: RemovalReason::LABELS
            .iter()
            .zip(s.removals)
            .map(|(label, n)| (label.to_string(), n))
            .collect(),
    }
}

/// The control protocol's report of region `id`.
pub(crate) fn region_report(regions: &Regions, id: RegionId) -> Option<RegionReport> {
    let region = regions.get(id)?;
    let info = regions.info(id)?;
    let (queued_messages, max_peer_queue) = region.queue_depths();
    Some(RegionReport {
        name: info.name,
        size: info.size,
        backend: info.memory,
        vectors: u32::try_from(info.vectors).unwrap_or(u32::MAX),
        peer_limit: u32::try_from(info.peer_limit).unwrap_or(u32::MAX),
        id_policy: info.id_policy.to_string(),
        id_reuse: info.id_reuse.to_string(),
        held_ids: region.held_ids(),
        origin: region.origin().as_str().to_string(),
        persist: region.persists(),
        detached: region.is_detached(),
        peers: region.peer_ids(),
        sockets: regions
            .sockets_of(id)
            .map(|(_, s)| s.path().display().to_string())
            .collect(),
        counters: RegionCounters {
            stats: stats_report(region.counters()),
            queued_messages,
            max_peer_queue,
        },
    })
}
