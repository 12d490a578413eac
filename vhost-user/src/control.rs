// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: VMM-side clients translate addresses, cache them,
//! follow the IOMMU state, report faults and inspect the daemon
//! (protocol in docs/control-protocol.md, encoding in `viommu::control`).
//!
//! The coherence rule: a guest UNMAP or DETACH completes only after every
//! client that may cache the range has acknowledged the invalidation, or
//! has been disconnected for not answering within the client timeout.
//! Ordering is kept per client by queueing a translation reply while the
//! model's read lock is held and invalidations while its write lock is
//! held, into the same outbox: a reply can never overtake the
//! invalidation that makes it stale.

use std::{
    collections::HashSet,
    io::{self, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use nix::{
    sys::socket::{getsockopt, sockopt::PeerCredentials},
    unistd::geteuid,
};
use serde_json::{json, Value};
use viommu::{
    control::*, device::StateChange, error::status_name, wire::*, Access, Fault, TranslateError,
    Viommu,
};

use viommu_client::frame::FrameReader;

use crate::{
    backend::{lock, IommuBackend},
    pasid_manager::PasidService,
};

/// Most clients connected at once.
pub const MAX_CLIENTS: usize = 64;
/// Most mappings one `mappings` query returns; clients page with `from`.
pub const MAX_QUERY_MAPPINGS: usize = 10_000;
/// A client must say HELLO within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// One connected client.
pub struct ClientConn {
    pub id: u64,
    pub flags: u32,
    stream: UnixStream,
    /// Encoded messages waiting to be written, in order.
    outbox: Mutex<Vec<u8>>,
    /// Serialises flushes so the outbox drains in order.
    writer: Mutex<()>,
    /// Sequence numbers sent that still wait for an ACK.
    pending: Mutex<HashSet<u64>>,
    dead: AtomicBool,
}

impl ClientConn {
    fn queue(&self, msg: &Message) {
        lock(&self.outbox).extend_from_slice(&msg.encode());
    }

    /// Writes what is queued. A client that does not read within the
    /// write timeout is disconnected.
    fn flush(&self) {
        let _w = lock(&self.writer);
        let bytes = std::mem::take(&mut *lock(&self.outbox));
        if bytes.is_empty() || self.dead.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = (&self.stream).write_all(&bytes) {
            warn!(
                "control client {}: write failed ({e}); disconnecting",
                self.id
            );
            self.kill();
        }
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn waits_for_acks(&self) -> bool {
        !lock(&self.pending).is_empty() && !self.dead.load(Ordering::Acquire)
    }
}

/// Counters for `ctl stats`.
#[derive(Default)]
pub struct HubStats {
    pub invalidations: AtomicU64,
    pub events: AtomicU64,
    pub ack_timeouts: AtomicU64,
    pub refused: AtomicU64,
}

/// The set of clients and the fan-out of state changes to them.
pub struct Hub {
    clients: Mutex<Vec<Arc<ClientConn>>>,
    next_seq: AtomicU64,
    next_id: AtomicU64,
    /// Clients that cache or subscribe: the model records changes.
    interested: AtomicUsize,
    acked: Mutex<()>,
    ack_cv: Condvar,
    timeout: Duration,
    pub stats: HubStats,
}

impl Hub {
    pub fn new(timeout: Duration) -> Self {
        Hub {
            clients: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            interested: AtomicUsize::new(0),
            acked: Mutex::new(()),
            ack_cv: Condvar::new(),
            timeout,
            stats: HubStats::default(),
        }
    }

    pub fn client_count(&self) -> usize {
        lock(&self.clients).len()
    }

    /// Queues what `changes` mean for each client; called with the model's
    /// write lock held. Returns the clients whose acknowledgement the
    /// guest's requests must wait for.
    pub fn stage(&self, changes: &[StateChange]) -> Vec<Arc<ClientConn>> {
        let clients = lock(&self.clients);
        let mut wait = Vec::new();
        for c in clients.iter().filter(|c| !c.dead.load(Ordering::Acquire)) {
            let mut must_wait = false;
            let mut out = lock(&c.outbox);
            let mut pending = lock(&c.pending);
            for &change in changes {
                let kind = EventKind::from(change);
                if c.flags & HELLO_F_CACHE != 0 {
                    if let Some(scope) = kind.invalidates() {
                        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                        out.extend_from_slice(&Message::Invalidate { seq, scope }.encode());
                        pending.insert(seq);
                        must_wait = true;
                        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if c.flags & HELLO_F_SUBSCRIBE != 0 {
                    let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(&Message::Event { seq, kind }.encode());
                    self.stats.events.fetch_add(1, Ordering::Relaxed);
                    if c.flags & HELLO_F_SYNC != 0 {
                        pending.insert(seq);
                        must_wait = true;
                    }
                }
            }
            drop((out, pending));
            if must_wait || c.flags & HELLO_F_SUBSCRIBE != 0 {
                wait.push(c.clone());
            }
        }
        wait
    }

    /// Sends what `stage` queued and waits, up to the client timeout, for
    /// the acknowledgements; clients that miss it are disconnected.
    pub fn flush_and_wait(&self, clients: &[Arc<ClientConn>], spin: Duration) {
        for c in clients {
            c.flush();
        }
        // Acks of an active client come back within microseconds: spin
        // (bounded like the request queue's polling) before sleeping.
        let spin_until = Instant::now() + spin;
        while clients.iter().any(|c| c.waits_for_acks()) && Instant::now() < spin_until {
            // Yield: the threads that deliver the acks may need this core.
            thread::yield_now();
        }
        let deadline = Instant::now() + self.timeout;
        let mut guard = lock(&self.acked);
        loop {
            if !clients.iter().any(|c| c.waits_for_acks()) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                for c in clients.iter().filter(|c| c.waits_for_acks()) {
                    warn!(
                        "control client {} did not acknowledge within {:?}; disconnecting",
                        c.id, self.timeout
                    );
                    self.stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                    c.kill();
                }
                return;
            }
            guard = self
                .ack_cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn ack(&self, conn: &ClientConn, seq: u64) {
        lock(&conn.pending).remove(&seq);
        let _g = lock(&self.acked);
        self.ack_cv.notify_all();
    }
}

/// Creates the control socket (mode 0600) and serves it in a thread.
pub fn start(backend: Arc<IommuBackend>, path: &Path) -> io::Result<PathBuf> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!("control socket on {}", path.display());
    thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(backend, listener))?;
    Ok(path.to_owned())
}

fn accept_loop(backend: Arc<IommuBackend>, listener: UnixListener) {
    let me = geteuid().as_raw();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!("control socket accept: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let hub = backend.hub();
        let uid = match getsockopt(&stream, PeerCredentials) {
            Ok(cred) => cred.uid(),
            Err(e) => {
                warn!("control client refused: no peer credentials ({e})");
                continue;
            }
        };
        if uid != me && uid != 0 {
            warn!("control client with uid {uid} refused (daemon uid {me})");
            hub.stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = (&stream).write_all(
                &Message::Bye {
                    message: format!("uid {uid} is not allowed"),
                }
                .encode(),
            );
            continue;
        }
        if hub.client_count() >= MAX_CLIENTS {
            warn!("control client refused: {MAX_CLIENTS} clients already connected");
            let _ = (&stream).write_all(
                &Message::Bye {
                    message: "too many clients".into(),
                }
                .encode(),
            );
            continue;
        }
        let b = backend.clone();
        let spawned = thread::Builder::new()
            .name("control-client".into())
            .spawn(move || serve_client(b, stream));
        if let Err(e) = spawned {
            warn!("control client: cannot start a thread: {e}");
        }
    }
}

fn serve_client(backend: Arc<IommuBackend>, stream: UnixStream) {
    let hub = backend.hub();
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = FrameReader::new(read_half);
    let _ = reader.stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let bye = |text: String| {
        debug!("control client: {text}");
        let _ = (&stream).write_all(&Message::Bye { message: text }.encode());
    };
    let flags = match reader.next(Duration::ZERO) {
        Ok(Some(Message::Hello { version, flags })) if version == PROTOCOL_VERSION => flags,
        Ok(Some(Message::Hello { version, .. })) => {
            return bye(format!(
                "protocol version {version} unsupported; this daemon speaks {PROTOCOL_VERSION}"
            ));
        }
        Ok(Some(_)) => return bye("the first message must be HELLO".into()),
        Ok(None) => return,
        Err(e) => return bye(format!("bad HELLO: {e}")),
    };
    let _ = reader.stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(Some(hub.timeout));
    let conn = Arc::new(ClientConn {
        id: hub.next_id.fetch_add(1, Ordering::Relaxed),
        flags,
        stream,
        outbox: Mutex::new(Vec::new()),
        writer: Mutex::new(()),
        pending: Mutex::new(HashSet::new()),
        dead: AtomicBool::new(false),
    });
    register(&backend, &conn);
    conn.flush();
    debug!("control client {} connected (flags {flags:#x})", conn.id);
    loop {
        // Spin briefly for the client's next message, as the request
        // queue does for the guest's (see `--poll-us`).
        let msg = match reader.next(backend.poll_interval()) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                if !conn.dead.load(Ordering::Acquire) {
                    warn!("control client {}: {e}; disconnecting", conn.id);
                    conn.queue(&Message::Bye {
                        message: e.to_string(),
                    });
                    conn.flush();
                }
                break;
            }
        };
        handle(&backend, &conn, msg);
        conn.flush();
    }
    unregister(&backend, &conn);
    conn.kill();
    debug!("control client {} disconnected", conn.id);
}

/// Adds a client; a subscriber first gets the current state replayed.
/// Done under the model's write lock so no change slips between the
/// replay and the live stream.
fn register(backend: &IommuBackend, conn: &Arc<ClientConn>) {
    let hub = backend.hub();
    let mut model = backend.model_mut();
    let mut clients = lock(&hub.clients);
    if conn.flags & (HELLO_F_CACHE | HELLO_F_SUBSCRIBE) != 0
        && hub.interested.fetch_add(1, Ordering::Relaxed) == 0
    {
        model.record_changes(true);
    }
    conn.queue(&Message::Welcome {
        version: PROTOCOL_VERSION,
        flags: conn.flags,
        client_id: conn.id,
    });
    if conn.flags & HELLO_F_SUBSCRIBE != 0 {
        let mut out = lock(&conn.outbox);
        for kind in replay(&model) {
            out.extend_from_slice(&Message::Event { seq: 0, kind }.encode());
        }
        out.extend_from_slice(&Message::ReplayDone.encode());
    }
    clients.push(conn.clone());
}

fn unregister(backend: &IommuBackend, conn: &Arc<ClientConn>) {
    let hub = backend.hub();
    let mut model = backend.model_mut();
    let mut clients = lock(&hub.clients);
    clients.retain(|c| !Arc::ptr_eq(c, conn));
    if conn.flags & (HELLO_F_CACHE | HELLO_F_SUBSCRIBE) != 0
        && hub.interested.fetch_sub(1, Ordering::Relaxed) == 1
    {
        model.record_changes(false);
    }
    drop(clients);
    // Wake a waiter that still counts on this client.
    conn.dead.store(true, Ordering::Release);
    let _g = lock(&hub.acked);
    hub.ack_cv.notify_all();
}

/// The current state as events: bypass, then each domain's endpoints and
/// mappings.
fn replay(model: &Viommu) -> Vec<EventKind> {
    let mut events = vec![EventKind::Bypass(model.bypass())];
    let mut ids: Vec<u32> = model.domains().keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let d = &model.domains()[&id];
        for &endpoint in &d.endpoints {
            events.push(EventKind::Attach {
                endpoint,
                domain: id,
                bypass: d.bypass,
            });
        }
        for mapping in d.mappings.iter() {
            events.push(EventKind::Map {
                domain: id,
                mapping,
            });
        }
    }
    events
}

fn handle(backend: &IommuBackend, conn: &ClientConn, msg: Message) {
    match msg {
        Message::Translate {
            tag,
            endpoint,
            flags,
            iova,
            len,
        } => {
            let access = if flags & TRANSLATE_F_WRITE != 0 {
                Access::Write
            } else {
                Access::Read
            };
            let mut extents = Vec::new();
            let model = backend.model();
            let result = model.translate_range(endpoint, iova, len, access, &mut extents);
            // Queued under the read lock: see the module comment.
            let fault = match result {
                Ok(()) => {
                    conn.queue(&Message::Translation { tag, extents });
                    None
                }
                Err(TranslateError::NoSuchEndpoint(ep)) => {
                    conn.queue(&Message::Result {
                        tag,
                        status: RESULT_NO_SUCH_ENDPOINT,
                        message: format!("endpoint {ep} does not exist"),
                    });
                    None
                }
                Err(TranslateError::Fault(f)) => {
                    let info = FaultInfo {
                        reason: f.reason,
                        flags: access_flags(access),
                        endpoint: f.endpoint,
                        address: f.address,
                    };
                    conn.queue(&Message::Fault { tag, fault: info });
                    Some(f)
                }
            };
            drop(model);
            if let Some(f) = fault.filter(|_| flags & TRANSLATE_F_REPORT_FAULT != 0) {
                backend.post_event(&f.record_bytes());
            }
        }
        Message::ReportFault { tag, fault } => {
            let (status, message) = report_fault(backend, &fault);
            conn.queue(&Message::Result {
                tag,
                status,
                message,
            });
        }
        Message::Ack { seq } => backend.hub().ack(conn, seq),
        Message::Query { tag, json } => {
            let reply = match serde_json::from_str::<Value>(&json) {
                Ok(q) => query(backend, &q),
                Err(e) => json!({ "error": format!("query is not JSON: {e}") }),
            };
            conn.queue(&Message::QueryReply {
                tag,
                json: reply.to_string(),
            });
        }
        Message::Hello { .. } => {
            conn.queue(&Message::Result {
                tag: 0,
                status: RESULT_INVALID,
                message: "HELLO twice".into(),
            });
        }
        other => {
            warn!(
                "control client {} sent a daemon-to-client message; ignored: {other:?}",
                conn.id
            );
        }
    }
}

fn access_flags(access: Access) -> u32 {
    match access {
        Access::Read => FAULT_F_READ,
        Access::Write => FAULT_F_WRITE,
    }
}

fn report_fault(backend: &IommuBackend, f: &FaultInfo) -> (u32, String) {
    if f.reason > VIRTIO_IOMMU_FAULT_R_MAPPING {
        return (RESULT_INVALID, format!("unknown fault reason {}", f.reason));
    }
    if f.flags & !(FAULT_F_READ | FAULT_F_WRITE) != 0 {
        return (
            RESULT_INVALID,
            format!("unknown fault flags {:#x}", f.flags),
        );
    }
    if !backend.model().config().endpoints.contains(f.endpoint) {
        return (
            RESULT_NO_SUCH_ENDPOINT,
            format!("endpoint {} does not exist", f.endpoint),
        );
    }
    let access = if f.flags & FAULT_F_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    };
    let mut fault = Fault::new(f.reason, f.endpoint, f.address, access);
    if f.flags & (FAULT_F_READ | FAULT_F_WRITE) == 0 {
        fault.flags &= !(VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE);
    }
    backend.post_event(&fault.record_bytes());
    (RESULT_OK, String::new())
}

/// Names of request types, for `stats`.
const REQUEST_NAMES: [(u8, &str); 7] = [
    (VIRTIO_IOMMU_T_ATTACH, "attach"),
    (VIRTIO_IOMMU_T_DETACH, "detach"),
    (VIRTIO_IOMMU_T_MAP, "map"),
    (VIRTIO_IOMMU_T_UNMAP, "unmap"),
    (VIRTIO_IOMMU_T_PROBE, "probe"),
    (VIRTIO_IOMMU_T_PASID_ALLOC, "pasid_alloc"),
    (VIRTIO_IOMMU_T_PASID_FREE, "pasid_free"),
];

/// Answers an inspection query (the JSON documents `ctl --json` prints).
pub fn query(backend: &IommuBackend, q: &Value) -> Value {
    let model = backend.model();
    match q.get("cmd").and_then(Value::as_str) {
        Some("status") => json!({
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": PROTOCOL_VERSION,
            "pid": std::process::id(),
            "frontend_connected": backend.frontend_connected(),
            "bypass": model.bypass(),
            "acked_features": model.acked_features(),
            "domains": model.domains().len(),
            "attached_endpoints": model.attached_endpoints().count(),
            "mappings": model.domains().values().map(|d| d.mappings.len()).sum::<usize>(),
            "clients": backend.hub().client_count(),
        }),
        Some("endpoints") => {
            let mut eps: Vec<(u32, u32)> = model.attached_endpoints().collect();
            eps.sort_unstable();
            json!({
                "bypass": model.bypass(),
                "endpoints": eps.iter().map(|&(id, d)| json!({"id": id, "domain": d})).collect::<Vec<_>>(),
            })
        }
        Some("domains") => {
            let mut ids: Vec<u32> = model.domains().keys().copied().collect();
            ids.sort_unstable();
            let domains: Vec<Value> = ids
                .iter()
                .map(|id| {
                    let d = &model.domains()[id];
                    json!({"id": id, "bypass": d.bypass, "endpoints": d.endpoints, "mappings": d.mappings.len()})
                })
                .collect();
            json!({ "domains": domains })
        }
        Some("mappings") => {
            let Some(id) = q
                .get("domain")
                .and_then(Value::as_u64)
                .and_then(|d| u32::try_from(d).ok())
            else {
                return json!({"error": "mappings needs a numeric `domain`"});
            };
            let Some(d) = model.domains().get(&id) else {
                return json!({"error": format!("domain {id} does not exist")});
            };
            let from = q.get("from").and_then(Value::as_u64).unwrap_or(0);
            let limit = q
                .get("limit")
                .and_then(Value::as_u64)
                .map_or(MAX_QUERY_MAPPINGS, |l| (l as usize).min(MAX_QUERY_MAPPINGS));
            let mut it = d.mappings.iter_from(from).filter(|m| m.virt_start >= from);
            let page: Vec<Value> = it
                .by_ref()
                .take(limit)
                .map(|m| {
                    json!({
                        "virt_start": m.virt_start,
                        "virt_end": m.virt_end,
                        "phys_start": m.phys_start,
                        "read": m.flags & VIRTIO_IOMMU_MAP_F_READ != 0,
                        "write": m.flags & VIRTIO_IOMMU_MAP_F_WRITE != 0,
                        "mmio": m.flags & VIRTIO_IOMMU_MAP_F_MMIO != 0,
                    })
                })
                .collect();
            let next = it.next().map(|m| m.virt_start);
            json!({"domain": id, "bypass": d.bypass, "endpoints": d.endpoints, "mappings": page, "next": next})
        }
        Some("stats") => {
            let s = model.stats().clone();
            drop(model);
            let mut requests = serde_json::Map::new();
            for (t, name) in REQUEST_NAMES {
                requests.insert(name.into(), json!(s.by_type[usize::from(t)]));
            }
            requests.insert("other".into(), json!(s.by_type[0]));
            let mut errors = serde_json::Map::new();
            for status in 1..=VIRTIO_IOMMU_S_NOMEM {
                errors.insert(
                    status_name(status).into(),
                    json!(s.by_status[usize::from(status)]),
                );
            }
            let ev = backend.event_stats();
            let (held, pending) = backend.event_queue_depth();
            let hub = backend.hub();
            json!({
                "requests": requests,
                "errors": errors,
                "dropped": s.dropped,
                "faults": {"delivered": ev.delivered, "dropped": ev.dropped, "pending": pending},
                "event_buffers_held": held,
                "clients": hub.client_count(),
                "invalidations_sent": hub.stats.invalidations.load(Ordering::Relaxed),
                "events_sent": hub.stats.events.load(Ordering::Relaxed),
                "ack_timeouts": hub.stats.ack_timeouts.load(Ordering::Relaxed),
                "clients_refused": hub.stats.refused.load(Ordering::Relaxed),
            })
        }
        Some("pasids") => {
            drop(model);
            pasids_query(backend, q)
        }
        Some(other) => json!({"error": format!("unknown query `{other}`")}),
        None => json!({"error": "query needs a `cmd`"}),
    }
}

/// Most PASIDs one `pasids` reply lists (then `next` says where to go on).
pub const MAX_QUERY_PASIDS: usize = 10_000;

/// The `pasids` query: this daemon's set with its PASIDs, and every set of
/// the host from the state database (docs/control-protocol.md).
fn pasids_query(backend: &IommuBackend, q: &Value) -> Value {
    let shared = match backend.pasids() {
        PasidService::Disabled => {
            return json!({"mode": "disabled", "pasids": [], "sets": [], "next": null})
        }
        PasidService::Identity { bits } => {
            return json!({"mode": "identity", "bits": bits, "pasids": [], "sets": [], "next": null})
        }
        PasidService::Global(shared) => shared,
    };
    let from = q
        .get("from")
        .and_then(Value::as_u64)
        .map_or(0, |f| u32::try_from(f).unwrap_or(u32::MAX));
    let limit = q
        .get("limit")
        .and_then(Value::as_u64)
        .map_or(MAX_QUERY_PASIDS, |l| {
            usize::try_from(l).map_or(MAX_QUERY_PASIDS, |l| l.min(MAX_QUERY_PASIDS))
        });
    let m = shared.lock();
    let opts = m.options().clone();
    let (quota, charged, leased) = m.usage();
    let mut it = m.pasids().into_iter().filter(|p| p.host >= from);
    let page: Vec<Value> = it
        .by_ref()
        .take(limit)
        .map(|p| {
            json!({
                "host": p.host,
                "guest": p.guest,
                "state": if p.active { "active" } else { "inactive" },
                "refs": p.refs,
            })
        })
        .collect();
    let next = it.next().map(|p| p.host);
    // Host-wide sets only with the first page.
    let sets = if from == 0 {
        match m.host_sets() {
            Ok(sets) => Value::Array(
                sets.iter()
                    .map(|s| {
                        let mut v = crate::pasid_admin::set_json(s);
                        v["this_daemon"] = json!(s.record.vm_id == opts.vm_id);
                        v
                    })
                    .collect(),
            ),
            Err(e) => return json!({"error": format!("state database: {e}")}),
        }
    } else {
        json!([])
    };
    json!({
        "mode": "global",
        "bits": opts.bits,
        "vm_id": opts.vm_id,
        "state_dir": opts.state_dir,
        "quota": quota,
        "charged": charged,
        "leased": leased,
        "pasids": page,
        "next": next,
        "sets": sets,
    })
}
