// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The inspection queries (docs/control-protocol.md, "Queries"), built as
//! the typed documents of `viommu_protocol::query`.
//!
//! They run on a thread of their own, so that a query reading the PASID
//! database (which may wait on the disk) or listing a large domain never
//! delays the control server's translations and acknowledgements. Each
//! holds the model's read lock only while it copies what it needs.

use std::{
    io,
    sync::{
        mpsc::{sync_channel, Receiver, SyncSender, TrySendError},
        Arc,
    },
    thread,
};

use log::warn;
use viommu::{error::status_name, wire::*};
use viommu_protocol::{
    messages::{Query as QueryMsg, QueryReply},
    query::*,
    PROTOCOL_VERSION,
};
use vmm_sys_util::eventfd::EventFd;

use crate::{error::report, hub::Client, iommu::Iommu, pasid_manager::PasidService};

/// Queries waiting for the query thread; more are refused at once.
const MAX_QUEUED: usize = 64;

/// The query thread and the way to it.
pub(super) struct QueryThread {
    tx: SyncSender<(Arc<Client>, QueryMsg)>,
    /// Signalled when replies were queued, so the server writes them.
    done: Arc<EventFd>,
}

impl QueryThread {
    pub(super) fn start(iommu: Arc<Iommu>) -> io::Result<Self> {
        let (tx, rx) = sync_channel(MAX_QUEUED);
        let done = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let signal = done.clone();
        thread::Builder::new()
            .name("control-queries".into())
            .spawn(move || serve(&iommu, &rx, &signal))?;
        Ok(QueryThread { tx, done })
    }

    pub(super) fn done_fd(&self) -> &EventFd {
        &self.done
    }

    /// Clears the signal; the server then writes the replies.
    pub(super) fn collect(&self) {
        let _ = self.done.read();
    }

    /// Hands a query to the thread, or refuses it when too many wait.
    pub(super) fn submit(&self, client: Arc<Client>, q: QueryMsg) {
        match self.tx.try_send((client, q)) {
            Ok(()) => {}
            Err(TrySendError::Full((client, q))) => {
                client.queue(
                    &QueryReply {
                        tag: q.tag,
                        json: error_json(&format!(
                            "the daemon is busy: {MAX_QUEUED} queries are waiting"
                        )),
                    }
                    .into(),
                );
            }
            Err(TrySendError::Disconnected(_)) => warn!("control query thread is gone"),
        }
    }
}

fn serve(iommu: &Iommu, rx: &Receiver<(Arc<Client>, QueryMsg)>, done: &EventFd) {
    while let Ok((client, q)) = rx.recv() {
        if client.is_dead() {
            continue;
        }
        let json = match serde_json::from_str::<Query>(&q.json) {
            Ok(query) => answer(iommu, &query),
            Err(e) => error_json(&format!("malformed query: {e}")),
        };
        client.queue(&QueryReply { tag: q.tag, json }.into());
        let _ = done.write(1);
    }
}

fn error_json(message: &str) -> String {
    serde_json::to_string(&ErrorReply {
        error: message.to_string(),
    })
    .unwrap_or_else(|_| r#"{"error":"unencodable error"}"#.into())
}

fn to_json<T: serde::Serialize>(reply: Result<T, String>) -> String {
    match reply.and_then(|r| serde_json::to_string(&r).map_err(|e| e.to_string())) {
        Ok(json) => json,
        Err(e) => error_json(&e),
    }
}

/// Answers a query with its JSON document.
pub(crate) fn answer(iommu: &Iommu, q: &Query) -> String {
    match q {
        Query::Status => to_json(Ok(status(iommu))),
        Query::Endpoints => to_json(Ok(endpoints(iommu))),
        Query::Domains => to_json(Ok(domains(iommu))),
        Query::Mappings {
            domain,
            from,
            limit,
        } => to_json(mappings(iommu, *domain, *from, *limit)),
        Query::Stats => to_json(Ok(stats(iommu))),
        Query::Pasids { from, limit } => to_json(pasids(iommu, *from, *limit)),
    }
}

fn status(iommu: &Iommu) -> StatusReply {
    let model = iommu.model();
    StatusReply {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        frontend_connected: iommu.frontend_connected(),
        bypass: model.bypass(),
        acked_features: model.acked_features(),
        domains: model.domains().len(),
        attached_endpoints: model.attached_endpoints().count(),
        mappings: model.domains().values().map(|d| d.mappings.len()).sum(),
        clients: iommu.hub().connected(),
    }
}

fn endpoints(iommu: &Iommu) -> EndpointsReply {
    let model = iommu.model();
    let mut endpoints: Vec<EndpointInfo> = model
        .attached_endpoints()
        .map(|(id, domain)| EndpointInfo { id, domain })
        .collect();
    endpoints.sort_unstable_by_key(|e| e.id);
    EndpointsReply {
        bypass: model.bypass(),
        endpoints,
    }
}

fn domains(iommu: &Iommu) -> DomainsReply {
    let model = iommu.model();
    let mut domains: Vec<DomainInfo> = model
        .domains()
        .iter()
        .map(|(&id, d)| DomainInfo {
            id,
            bypass: d.bypass,
            endpoints: d.endpoints.clone(),
            mappings: d.mappings.len(),
        })
        .collect();
    domains.sort_unstable_by_key(|d| d.id);
    DomainsReply { domains }
}

fn mappings(
    iommu: &Iommu,
    id: u32,
    from: u64,
    limit: Option<usize>,
) -> Result<MappingsReply, String> {
    let model = iommu.model();
    let d = model
        .domains()
        .get(&id)
        .ok_or_else(|| format!("domain {id} does not exist"))?;
    let limit = limit.map_or(MAX_QUERY_MAPPINGS, |l| l.min(MAX_QUERY_MAPPINGS));
    let mut it = d.mappings.iter_from(from).filter(|m| m.virt_start >= from);
    let page: Vec<MappingInfo> = it
        .by_ref()
        .take(limit)
        .map(|m| MappingInfo {
            virt_start: m.virt_start,
            virt_end: m.virt_end,
            phys_start: m.phys_start,
            read: m.flags & VIRTIO_IOMMU_MAP_F_READ != 0,
            write: m.flags & VIRTIO_IOMMU_MAP_F_WRITE != 0,
            mmio: m.flags & VIRTIO_IOMMU_MAP_F_MMIO != 0,
        })
        .collect();
    Ok(MappingsReply {
        domain: id,
        bypass: d.bypass,
        endpoints: d.endpoints.clone(),
        mappings: page,
        next: it.next().map(|m| m.virt_start),
    })
}

fn stats(iommu: &Iommu) -> StatsReply {
    let s = iommu.model().stats().clone();
    let by = |t: u8| s.by_type[usize::from(t)];
    let requests = RequestCounts {
        attach: by(VIRTIO_IOMMU_T_ATTACH),
        detach: by(VIRTIO_IOMMU_T_DETACH),
        map: by(VIRTIO_IOMMU_T_MAP),
        unmap: by(VIRTIO_IOMMU_T_UNMAP),
        probe: by(VIRTIO_IOMMU_T_PROBE),
        pasid_alloc: by(VIRTIO_IOMMU_T_PASID_ALLOC),
        pasid_free: by(VIRTIO_IOMMU_T_PASID_FREE),
        other: s.by_type[0],
    };
    let errors = (1..=VIRTIO_IOMMU_S_NOMEM)
        .map(|st| (status_name(st).to_string(), s.by_status[usize::from(st)]))
        .collect();
    let ev = iommu.event_stats();
    let (held, pending) = iommu.event_queue_depth();
    let hub = iommu.hub();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    StatsReply {
        requests,
        errors,
        dropped: s.dropped,
        faults: FaultCounts {
            delivered: ev.delivered,
            dropped: ev.dropped,
            pending,
        },
        event_buffers_held: held,
        clients: hub.connected(),
        invalidations_sent: load(&hub.stats.invalidations),
        events_sent: load(&hub.stats.events),
        ack_timeouts: load(&hub.stats.ack_timeouts),
        clients_refused: load(&hub.stats.refused),
        clients_dropped: load(&hub.stats.dropped),
    }
}

fn pasids(iommu: &Iommu, from: u32, limit: Option<usize>) -> Result<PasidsReply, String> {
    let empty = |mode: &str, bits| PasidsReply {
        mode: mode.into(),
        bits,
        vm_id: None,
        state_dir: None,
        quota: None,
        charged: None,
        leased: None,
        pasids: Vec::new(),
        next: None,
        sets: Vec::new(),
    };
    let shared = match iommu.pasids() {
        PasidService::Disabled => return Ok(empty("disabled", None)),
        PasidService::Identity { bits } => return Ok(empty("identity", Some(*bits))),
        PasidService::Global(shared) => shared,
    };
    let limit = limit.map_or(MAX_QUERY_PASIDS, |l| l.min(MAX_QUERY_PASIDS));
    let m = shared.lock();
    let opts = m.options().clone();
    let (quota, charged, leased) = m.usage();
    let mut it = m.pasids().into_iter().filter(|p| p.host >= from);
    let page: Vec<PasidInfo> = it
        .by_ref()
        .take(limit)
        .map(|p| PasidInfo {
            host: p.host,
            guest: p.guest,
            state: if p.active { "active" } else { "inactive" }.into(),
            refs: p.refs,
        })
        .collect();
    let next = it.next().map(|p| p.host);
    // Host-wide sets only with the first page.
    let sets = if from == 0 {
        m.host_sets()
            .map_err(|e| format!("state database: {}", report(&e)))?
            .iter()
            .map(|s| s.info(Some(&opts.vm_id)))
            .collect()
    } else {
        Vec::new()
    };
    Ok(PasidsReply {
        mode: "global".into(),
        bits: Some(opts.bits),
        vm_id: Some(opts.vm_id),
        state_dir: Some(opts.state_dir.display().to_string()),
        quota: Some(quota),
        charged: Some(charged),
        leased: Some(leased),
        pasids: page,
        next,
        sets,
    })
}
