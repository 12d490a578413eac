// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu device state machine: endpoints, domains, their
//! mappings and the bypass state, changed only by driver requests
//! (ATTACH, DETACH, MAP, UNMAP, PROBE), config writes and resets.
//!
//! `Viommu::handle_request` takes the device-readable bytes of one request
//! and the size of its device-writable part, and says what to write back.
//! It never panics on guest input: malformed requests are dropped (used
//! length 0) and refused ones carry a status code.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use log::{debug, trace};
use thiserror::Error;
use vm_memory::ByteValued;

use crate::{
    change::StateChange,
    config::{DeviceConfig, ReservedRegion},
    error::{status_of, RequestError},
    host::{normalize, HostConstraintError, HostConstraints, MAX_CONSTRAINED_ENDPOINTS},
    mapping::{Mapping, MappingTree},
    pasid::{Pasid, PasidError},
    prq::{
        read_page_resp, Answer, AutoCause, Delivery, PageRequest, PageRequests, PasidRefs, Raised,
        SourceId,
    },
    state::{DeviceState, ModelState, StateError},
    table::{read_attach_table, read_invalidate, AttachTable, Binding, TableSpec, UncountedPasids},
    wire::*,
};

/// A domain: an address space shared by the endpoints attached to it.
/// `clone` is cheap: the mappings are shared copy-on-write.
#[derive(Clone)]
pub struct Domain {
    /// Created by ATTACH with `VIRTIO_IOMMU_ATTACH_F_BYPASS`: identity
    /// translation, no mappings.
    pub bypass: bool,
    /// Attached endpoints (DMA without PASID), in attach order.
    pub endpoints: Vec<u32>,
    /// The domain's mappings (empty for a bypass or table domain).
    pub mappings: MappingTree,
    /// Set by ATTACH_TABLE: the domain translates through this guest
    /// table, and MAP/UNMAP are refused.
    pub table: Option<TableSpec>,
    /// (endpoint, PASID) bindings through this domain's table, in
    /// (endpoint, PASID) order. A domain exists while it has endpoints or
    /// bindings.
    pub bound: Vec<(u32, u32)>,
}

impl Domain {
    fn new(bypass: bool, table: Option<TableSpec>) -> Self {
        Domain {
            bypass,
            endpoints: Vec::new(),
            mappings: MappingTree::new(),
            table,
            bound: Vec::new(),
        }
    }

    fn is_unused(&self) -> bool {
        self.endpoints.is_empty() && self.bound.is_empty()
    }
}

/// Why a request was dropped without writing anything (used length 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The device-writable part cannot even hold the tail.
    NoTail {
        /// Size of the device-writable part.
        writable: usize,
    },
    /// The device-readable part is shorter than the request type needs.
    Truncated {
        /// The request type.
        req_type: u8,
        /// Device-readable bytes received.
        got: usize,
        /// Device-readable bytes the type needs.
        need: usize,
    },
    /// Unknown request type, or one whose feature is not offered.
    UnknownType(u8),
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropReason::NoTail { writable } => {
                write!(
                    f,
                    "device-writable part of {writable} bytes has no room for the status"
                )
            }
            DropReason::Truncated {
                req_type,
                got,
                need,
            } => write!(
                f,
                "request type {req_type} has {got} device-readable bytes, needs {need}"
            ),
            DropReason::UnknownType(t) => write!(f, "unknown request type {t}"),
        }
    }
}

/// What the transport writes back for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Response<'a> {
    /// Write nothing and return the buffers with used length 0.
    Drop(DropReason),
    /// Write `payload` at the start of the device-writable part, then the
    /// status tail in its last four bytes; the used length is the whole
    /// writable part.
    Reply {
        /// The request type (for statistics and logs).
        req_type: u8,
        /// Success, or why the request was refused (the status code).
        result: Result<(), RequestError>,
        /// Bytes written at the start of the device-writable part.
        payload: &'a [u8],
    },
    /// A valid request that needs the host PASID service. The service
    /// lives outside the model and may write to disk, so the transport
    /// runs it without holding the model and then completes the request
    /// with [`Viommu::complete_pasid`].
    Pasid(PasidOp),
}

/// A PASID operation the guest asked for (PROJECT EXTENSION requests
/// PASID_ALLOC and PASID_FREE, docs/extension-spec.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidOp {
    /// Allocate a host PASID in `[min, max]` for the guest to use as is.
    Alloc {
        /// Lowest acceptable PASID.
        min: Pasid,
        /// Highest acceptable PASID.
        max: Pasid,
    },
    /// Free a PASID the guest allocated.
    Free {
        /// The PASID.
        pasid: Pasid,
    },
}

impl PasidOp {
    /// The request type that carried the operation.
    pub fn req_type(&self) -> u8 {
        match self {
            PasidOp::Alloc { .. } => VIRTIO_IOMMU_T_PASID_ALLOC,
            PasidOp::Free { .. } => VIRTIO_IOMMU_T_PASID_FREE,
        }
    }
}

/// Why a driver's write of the `bypass` config field was ignored.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum BypassWriteError {
    /// The driver did not negotiate `VIRTIO_IOMMU_F_BYPASS_CONFIG`.
    #[error("bypass written without VIRTIO_IOMMU_F_BYPASS_CONFIG")]
    NotNegotiated,
    /// Only 0 and 1 are valid.
    #[error("bypass written with invalid value {0}")]
    InvalidValue(u8),
}

impl Response<'_> {
    /// The status code written in the tail, if any.
    pub fn status(&self) -> Option<u8> {
        match self {
            Response::Drop(_) | Response::Pasid(_) => None,
            Response::Reply { result, .. } => Some(status_of(*result)),
        }
    }

    /// Encodes the response into a device-writable buffer of
    /// `writable.len()` bytes and returns the used length. The buffer must
    /// be zeroed by the caller where the device does not write.
    pub fn write_into(&self, writable: &mut [u8]) -> u32 {
        let Response::Reply {
            result, payload, ..
        } = self
        else {
            return 0;
        };
        let Some(tail_at) = writable.len().checked_sub(REQ_TAIL_SIZE) else {
            return 0;
        };
        let n = payload.len().min(tail_at);
        writable[..n].copy_from_slice(&payload[..n]);
        let tail = ReqTail {
            status: status_of(*result),
            reserved: [0; 3],
        };
        writable[tail_at..].copy_from_slice(tail.as_slice());
        u32::try_from(writable.len()).unwrap_or(u32::MAX)
    }
}

/// Requests by type and results by status, for `ctl stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestStats {
    /// Index = request type (0 and > 15 are counted at 0).
    pub by_type: [u64; 16],
    /// Index = status code.
    pub by_status: [u64; 16],
    /// Requests dropped without a status (used length 0).
    pub dropped: u64,
}

/// The IOMMU state at one instant, detached from the device: later
/// changes do not show in it. Taking one costs a reference per mapping
/// leaf (see [`MappingTree`]), not a copy of the mappings.
#[derive(Clone)]
pub struct Snapshot {
    /// The `bypass` config field.
    pub bypass: bool,
    /// The domains, by increasing ID.
    pub domains: Vec<(u32, Domain)>,
}

/// The device model of one virtio-iommu instance.
pub struct Viommu {
    config: DeviceConfig,
    granule_mask: u64,
    /// Device feature bits the driver accepted.
    acked: u64,
    /// Current value of the `bypass` config field.
    bypass: bool,
    /// Attached endpoints and their domain.
    endpoints: HashMap<u32, u32>,
    domains: HashMap<u32, Domain>,
    /// PASID table bindings by (endpoint, PASID).
    bindings: BTreeMap<(u32, u32), Binding>,
    /// Payload of the last reply (PROBE properties, the PASID of a
    /// PASID_ALLOC), reused across requests.
    reply_buf: Vec<u8>,
    stats: RequestStats,
    /// Changes since the last `take_changes`, when recording is on.
    changes: Option<Vec<StateChange>>,
    /// Page-request groups from the daemon's sources.
    page_requests: PageRequests,
    /// Answers to groups decided since the last `take_answers`.
    answers: Vec<Answer>,
    /// Reserved regions the host imposes on passed-through endpoints
    /// (`crate::host`), normalized; not part of the saved state.
    host_regions: BTreeMap<u32, Vec<ReservedRegion>>,
    /// `page_size_mask` was read from the config space, or a driver
    /// negotiated features (so it read it): host page sizes may no
    /// longer narrow it.
    page_sizes_read: bool,
}

impl Viommu {
    /// A device in its power-on state. The configuration must have passed
    /// `DeviceConfig::validate`.
    pub fn new(config: DeviceConfig) -> Self {
        Viommu {
            granule_mask: config.granule() - 1,
            bypass: config.boot_bypass && config.bypass_config,
            acked: 0,
            endpoints: HashMap::new(),
            domains: HashMap::new(),
            bindings: BTreeMap::new(),
            reply_buf: Vec::new(),
            stats: RequestStats::default(),
            changes: None,
            page_requests: PageRequests::new(config.page_requests.unwrap_or_default()),
            answers: Vec::new(),
            host_regions: BTreeMap::new(),
            page_sizes_read: false,
            config,
        }
    }

    /// Sets what the host imposes on `endpoint` (`crate::host`): its
    /// reserved regions replace any given before; a page-size mask
    /// narrows the device's until a driver has read it. Returns the
    /// regions the endpoint's PROBE now reports after the device-wide
    /// ones. All or nothing.
    pub fn set_host_constraints(
        &mut self,
        endpoint: u32,
        c: &HostConstraints,
    ) -> Result<&[ReservedRegion], HostConstraintError> {
        if !self.config.endpoints.contains(endpoint) {
            return Err(HostConstraintError::NoSuchEndpoint(endpoint));
        }
        if !self.host_regions.contains_key(&endpoint)
            && !c.regions.is_empty()
            && self.host_regions.len() >= MAX_CONSTRAINED_ENDPOINTS
        {
            return Err(HostConstraintError::TooManyEndpoints);
        }
        let regions = normalize(endpoint, &c.regions, &self.config.reserved_regions)?;
        let mut page_size_mask = self.config.page_size_mask;
        if c.page_size_mask != 0 {
            let host_min = 1u64 << c.page_size_mask.trailing_zeros();
            if self.page_sizes_read {
                if self.config.granule() < host_min {
                    return Err(HostConstraintError::TooLate {
                        granule: self.config.granule(),
                        host: host_min,
                    });
                }
            } else {
                page_size_mask &= c.page_size_mask;
                if page_size_mask == 0 {
                    return Err(HostConstraintError::NoCommonPageSize {
                        device: self.config.page_size_mask,
                        host: c.page_size_mask,
                    });
                }
                let granule = 1u64 << page_size_mask.trailing_zeros();
                let (lo, hi) = self.config.input_range;
                if granule - 1 > hi - lo {
                    return Err(HostConstraintError::GranuleTooLarge(granule));
                }
            }
        }
        if self.config.probe_size > 0 {
            let mut props = Vec::new();
            self.config
                .probe_properties(&regions, true, true, &mut props);
            if props.len() > self.config.probe_size as usize {
                return Err(HostConstraintError::ProbeTooSmall {
                    size: self.config.probe_size,
                    need: props.len(),
                });
            }
        }
        let attached = self.endpoints.get(&endpoint).copied();
        if let Some((domain, d)) = attached.and_then(|id| Some((id, self.domains.get(&id)?))) {
            if let Some(m) = first_overlap(&d.mappings, &regions) {
                return Err(HostConstraintError::Mapped {
                    endpoint,
                    domain,
                    start: m.virt_start,
                    end: m.virt_end,
                });
            }
        }
        // Checks are done: from here on nothing fails.
        if page_size_mask != self.config.page_size_mask {
            debug!("page_size_mask narrowed to {page_size_mask:#x} by endpoint {endpoint}'s host");
            self.config.page_size_mask = page_size_mask;
            self.granule_mask = self.config.granule() - 1;
        }
        if regions.is_empty() {
            self.host_regions.remove(&endpoint);
            return Ok(&[]);
        }
        self.host_regions.insert(endpoint, regions);
        Ok(self.host_regions[&endpoint].as_slice())
    }

    /// Notes that `page_size_mask` was read from the config space (by the
    /// frontend, for the driver): host page sizes may no longer narrow it.
    pub fn freeze_page_sizes(&mut self) {
        self.page_sizes_read = true;
    }

    /// Whether `page_size_mask` may have been read by a driver already
    /// (read from the config space, or features negotiated).
    pub fn page_sizes_frozen(&self) -> bool {
        self.page_sizes_read
    }

    /// The reserved regions the host imposes on `endpoint`.
    pub fn host_regions(&self, endpoint: u32) -> &[ReservedRegion] {
        self.host_regions.get(&endpoint).map_or(&[], Vec::as_slice)
    }

    /// The static configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Current config space image.
    pub fn config_space(&self) -> VirtioIommuConfig {
        self.config.config_space(self.bypass)
    }

    /// Device-specific feature bits offered to the driver.
    pub fn device_features(&self) -> u64 {
        self.config.device_features()
    }

    /// Records the device feature bits the driver accepted.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
        if self.acked != 0 {
            self.page_sizes_read = true;
        }
        if !self.acked(VIRTIO_IOMMU_F_PAGE_REQUEST) {
            // Nothing can be in flight before features are set; a driver
            // that renegotiates without the feature takes no more events.
            let answers = self.page_requests.cancel_all(AutoCause::NotNegotiated);
            self.answers.extend(answers);
        }
    }

    /// Device feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    fn offered(&self, bit: u32) -> bool {
        self.device_features() & (1 << bit) != 0
    }

    /// The `bypass` config field.
    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// A driver write of the `bypass` config field. Only 0 and 1 are valid,
    /// and only when BYPASS_CONFIG was negotiated; anything else is ignored
    /// and reported as an error for the log.
    pub fn write_bypass(&mut self, value: u8) -> Result<(), BypassWriteError> {
        if !self.acked(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            return Err(BypassWriteError::NotNegotiated);
        }
        if value > 1 {
            return Err(BypassWriteError::InvalidValue(value));
        }
        let bypass = value == 1;
        if bypass != self.bypass {
            self.bypass = bypass;
            self.record(StateChange::Bypass(bypass));
        }
        Ok(())
    }

    /// Device reset: no endpoint stays attached, every table binding and
    /// every domain goes, and the bindings' PASID references are given
    /// back through `refs`. `bypass` survives (virtio-iommu 1.3: it SHOULD
    /// only return to its initial value on system reset), negotiated
    /// features do not.
    pub fn reset(&mut self, refs: &mut dyn PasidRefs) {
        let answers = self.page_requests.cancel_all(AutoCause::Reset);
        self.answers.extend(answers);
        for ((endpoint, pasid), b) in std::mem::take(&mut self.bindings) {
            refs.release(endpoint, pasid, b.handle);
        }
        self.endpoints.clear();
        self.domains.clear();
        self.acked = 0;
        self.record(StateChange::Reset);
    }

    /// Whether unattached endpoints bypass the IOMMU.
    pub fn unattached_bypass(&self) -> bool {
        // Offering BYPASS_CONFIG is enough; the driver need not accept it.
        self.config.bypass_config && self.bypass
    }

    /// The domains that exist, by ID.
    pub fn domains(&self) -> &HashMap<u32, Domain> {
        &self.domains
    }

    /// The IOMMU state now, as a [`Snapshot`].
    pub fn snapshot(&self) -> Snapshot {
        let mut domains: Vec<(u32, Domain)> = self
            .domains
            .iter()
            .map(|(&id, d)| (id, d.clone()))
            .collect();
        domains.sort_unstable_by_key(|(id, _)| *id);
        Snapshot {
            bypass: self.bypass,
            domains,
        }
    }

    /// What [`crate::state::encode`] saves of the device: the negotiated
    /// features and [`Self::snapshot`]. The transport adds the guest's
    /// PASIDs and the events waiting for a buffer, which it keeps.
    pub fn device_state(&self) -> DeviceState {
        DeviceState {
            acked_features: self.acked,
            iommu: self.snapshot(),
            bindings: self.bindings.iter().map(|(&k, b)| (k, b.domain)).collect(),
            guest_pasids: Vec::new(),
            pending_events: Vec::new(),
        }
    }

    /// Replaces the IOMMU state (negotiated features, `bypass`,
    /// endpoints, domains, mappings, tables and PASID bindings) with
    /// `state`, decoded from a blob against this device's configuration
    /// by [`crate::state::decode`]. Each restored binding takes its PASID
    /// reference through `refs`; the bindings and page requests it
    /// replaces end as a reset ends them. Request counters are kept.
    /// Records [`StateChange::Reset`], and the new `bypass` value if it
    /// changed: what the world outside knew of the device is stale.
    ///
    /// Fails, changing nothing, if `state` was checked against another
    /// configuration or a binding's PASID cannot be referenced.
    pub fn restore(
        &mut self,
        state: ModelState,
        refs: &mut dyn PasidRefs,
    ) -> Result<(), StateError> {
        if state.config != self.config {
            return Err(StateError::OtherDevice);
        }
        let mut bindings = BTreeMap::new();
        for (&(endpoint, pasid), &domain) in &state.bindings {
            let Some(handle) = refs.take(endpoint, pasid) else {
                for ((e, p), b) in bindings {
                    let b: Binding = b;
                    refs.release(e, p, b.handle);
                }
                return Err(StateError::BindingRefused { endpoint, pasid });
            };
            bindings.insert((endpoint, pasid), Binding { domain, handle });
        }
        // Checks are done: from here on nothing fails.
        self.cancel_groups(|p| p.cancel_all(AutoCause::Reset));
        for ((endpoint, pasid), b) in std::mem::replace(&mut self.bindings, bindings) {
            refs.release(endpoint, pasid, b.handle);
        }
        let old_bypass = self.bypass;
        self.acked = state.acked;
        self.bypass = state.bypass;
        self.endpoints = state.endpoints;
        self.domains = state.domains;
        self.record(StateChange::Reset);
        if self.bypass != old_bypass {
            self.record(StateChange::Bypass(self.bypass));
        }
        debug!(
            "state restored: {} domains, {} endpoints attached, {} PASID bindings, bypass {}",
            self.domains.len(),
            self.endpoints.len(),
            self.bindings.len(),
            self.bypass
        );
        Ok(())
    }

    /// The domain an endpoint is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.endpoints.get(&endpoint).copied()
    }

    /// PASID table bindings: ((endpoint, PASID), binding), in order.
    pub fn bindings(&self) -> impl Iterator<Item = ((u32, u32), &Binding)> + '_ {
        self.bindings.iter().map(|(&k, b)| (k, b))
    }

    /// The table that serves DMA of `endpoint` with `pasid` (0: without
    /// PASID), and its domain: the (endpoint, PASID) binding, else the
    /// table of the endpoint's domain.
    pub fn table_for(&self, endpoint: u32, pasid: u32) -> Option<(u32, &TableSpec)> {
        if let Some(b) = self.bindings.get(&(endpoint, pasid)) {
            let table = self.domains.get(&b.domain)?.table.as_ref()?;
            return Some((b.domain, table));
        }
        let domain = *self.endpoints.get(&endpoint)?;
        match self.domains.get(&domain)?.table.as_ref()? {
            // A CD table serves every substream; a VT-d table of a domain
            // serves DMA without PASID only.
            t @ TableSpec::SmmuCd { .. } => Some((domain, t)),
            t @ TableSpec::Vtd(_) if pasid == 0 => Some((domain, t)),
            TableSpec::Vtd(_) => None,
        }
    }

    /// Attached endpoints and their domains.
    pub fn attached_endpoints(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.endpoints.iter().map(|(&e, &d)| (e, d))
    }

    /// Request counters.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// Starts or stops recording `StateChange`s.
    pub fn record_changes(&mut self, on: bool) {
        self.changes = on.then(Vec::new);
    }

    /// Changes recorded since the last call.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The page-request groups (for inspection and statistics).
    pub fn page_requests(&self) -> &PageRequests {
        &self.page_requests
    }

    /// Answers to page-request groups decided since the last call (by the
    /// guest's PAGE_RESP or by the device). Send each to its source, then
    /// [`Answer::finish`] it.
    #[must_use = "send every answer, then finish it"]
    pub fn take_answers(&mut self) -> Vec<Answer> {
        std::mem::take(&mut self.answers)
    }

    /// Takes a page request from a source at time `now`. A group that
    /// completes is returned for the event queue; a request the device
    /// cannot take is answered at once (driver without
    /// `VIRTIO_IOMMU_F_PAGE_REQUEST`, unknown endpoint, nothing bound at
    /// its PASID, a limit). The group takes a reference on its PASID
    /// through `refs`, given back when its answer is finished.
    #[must_use = "put the group on the event queue, then report how it went"]
    pub fn raise_page_request(
        &mut self,
        request: PageRequest,
        now: Duration,
        refs: &mut dyn PasidRefs,
    ) -> Option<Delivery> {
        let key = request.key;
        let raised = if !self.acked(VIRTIO_IOMMU_F_PAGE_REQUEST) {
            self.page_requests.refuse(request, AutoCause::NotNegotiated)
        } else if self
            .table_for(key.endpoint, key.pasid.unwrap_or(0))
            .is_none()
        {
            // Only a bound table can be fixed by the guest.
            self.page_requests.refuse(request, AutoCause::Refused)
        } else {
            self.page_requests.raise(request, now, refs)
        };
        match raised {
            Raised::Deliver(delivery) => return Some(delivery),
            Raised::Answer(answer) => self.answers.push(answer),
            Raised::Pending | Raised::StopMarker => {}
        }
        None
    }

    /// A group ID for a request of (`endpoint`, `pasid`) whose source does
    /// not number its groups (a device model's translation).
    pub fn free_group_id(&mut self, endpoint: u32, pasid: Option<u32>) -> Option<u16> {
        self.page_requests.free_group_id(endpoint, pasid)
    }

    /// Reports how putting a group on the event queue went: delivered, or
    /// answered INVALID for `failed`.
    pub fn page_request_delivered(&mut self, delivery: Delivery, failed: Option<AutoCause>) {
        match failed {
            None => {
                self.page_requests.delivered(delivery);
            }
            Some(cause) => {
                if let Some(answer) = self.page_requests.undeliverable(delivery, cause) {
                    self.answers.push(answer);
                }
            }
        }
    }

    /// Answers INVALID every group the guest did not answer in time.
    pub fn expire_page_requests(&mut self, now: Duration) {
        let answers = self.page_requests.expire(now);
        self.answers.extend(answers);
    }

    /// When [`Self::expire_page_requests`] next has something to do.
    pub fn next_page_request_deadline(&self) -> Option<Duration> {
        self.page_requests.next_deadline()
    }

    /// Answers every group INVALID for `cause` (the frontend went away:
    /// the guest cannot answer what it was sent).
    pub fn cancel_page_requests(&mut self, cause: AutoCause) {
        self.cancel_groups(|p| p.cancel_all(cause));
    }

    /// The frontend went away: the guest's page requests are answered
    /// INVALID and every (endpoint, PASID) binding is removed (its PASID
    /// reference given back through `refs`), so no PASID stays held, and
    /// no table is walked, for a VM that may be gone. Domains, their
    /// mappings and tables bound without PASID stay, for a frontend that
    /// reconnects.
    pub fn frontend_lost(&mut self, refs: &mut dyn PasidRefs) {
        self.cancel_groups(|p| p.cancel_all(AutoCause::FrontendLost));
        let bound: Vec<(u32, u32)> = self.bindings.keys().copied().collect();
        for (endpoint, pasid) in bound {
            self.unbind(endpoint, pasid, refs);
        }
    }

    /// `source` can take no answer any more: its groups are dropped
    /// unanswered and their PASID references given back through `refs`.
    pub fn page_request_source_gone(&mut self, source: SourceId, refs: &mut dyn PasidRefs) {
        for hold in self.page_requests.source_gone(source) {
            hold.release(refs);
        }
    }

    fn record(&mut self, change: StateChange) {
        if let Some(changes) = self.changes.as_mut() {
            changes.push(change);
        }
    }

    /// Handles one request, as [`Self::handle_request_with`] with PASIDs
    /// that are not counted ([`UncountedPasids`]).
    pub fn handle_request(&mut self, request: &[u8], writable: usize) -> Response<'_> {
        self.handle_request_with(request, writable, &mut UncountedPasids)
    }

    /// Handles one request. `request` is the device-readable part of the
    /// descriptor chain (extra trailing bytes are ignored); `writable` is
    /// the size of its device-writable part. Table bindings take and give
    /// back their PASID references through `refs`.
    pub fn handle_request_with(
        &mut self,
        request: &[u8],
        writable: usize,
        refs: &mut dyn PasidRefs,
    ) -> Response<'_> {
        let response = self.dispatch(request, writable, refs);
        match &response {
            Response::Drop(_) => self.stats.dropped += 1,
            Response::Reply {
                req_type, result, ..
            } => self.count(*req_type, *result),
            // Counted when it completes.
            Response::Pasid(_) => {}
        }
        self.with_payload(response)
    }

    fn count(&mut self, req_type: u8, result: Result<(), RequestError>) {
        let t = usize::from(req_type);
        self.stats.by_type[if t < 16 { t } else { 0 }] += 1;
        self.stats.by_status[usize::from(status_of(result)) & 15] += 1;
    }

    /// Re-borrows a successful reply's payload from the reply buffer;
    /// PROBE and PASID_ALLOC replies carry one.
    fn with_payload(&self, response: Response<'static>) -> Response<'_> {
        match response {
            Response::Reply {
                req_type,
                result: Ok(()),
                ..
            } if matches!(req_type, VIRTIO_IOMMU_T_PROBE | VIRTIO_IOMMU_T_PASID_ALLOC) => {
                Response::Reply {
                    req_type,
                    result: Ok(()),
                    payload: &self.reply_buf,
                }
            }
            other => other,
        }
    }

    /// Completes a request that returned [`Response::Pasid`], with what
    /// the PASID service did: the allocated PASID for `Alloc`.
    pub fn complete_pasid(
        &mut self,
        op: PasidOp,
        result: Result<Pasid, PasidError>,
    ) -> Response<'_> {
        let result = result.map_err(|e| {
            debug!("{op:?}: {e}");
            RequestError::from(&e)
        });
        if let (PasidOp::Alloc { .. }, Ok(pasid)) = (op, &result) {
            self.reply_buf.clear();
            self.reply_buf.extend_from_slice(&pasid.to_le_bytes());
            self.reply_buf.extend_from_slice(&[0; 4]);
        }
        let req_type = op.req_type();
        let result = result.map(drop);
        self.count(req_type, result);
        self.with_payload(Response::Reply {
            req_type,
            result,
            payload: &[],
        })
    }

    fn dispatch(
        &mut self,
        request: &[u8],
        writable: usize,
        refs: &mut dyn PasidRefs,
    ) -> Response<'static> {
        if writable < REQ_TAIL_SIZE {
            return Response::Drop(DropReason::NoTail { writable });
        }
        let Some(&req_type) = request.first() else {
            return Response::Drop(DropReason::Truncated {
                req_type: 0,
                got: 0,
                need: 1,
            });
        };
        let result = match req_type {
            VIRTIO_IOMMU_T_ATTACH => match read_request::<AttachReq>(request, req_type) {
                Ok(req) => self.attach(&req),
                Err(drop) => return Response::Drop(drop),
            },
            VIRTIO_IOMMU_T_DETACH => match read_request::<DetachReq>(request, req_type) {
                Ok(req) => self.detach(&req, refs),
                Err(drop) => return Response::Drop(drop),
            },
            VIRTIO_IOMMU_T_MAP => match read_request::<MapReq>(request, req_type) {
                Ok(req) => self.map(&req),
                Err(drop) => return Response::Drop(drop),
            },
            VIRTIO_IOMMU_T_UNMAP => match read_request::<UnmapReq>(request, req_type) {
                Ok(req) => self.unmap(&req),
                Err(drop) => return Response::Drop(drop),
            },
            VIRTIO_IOMMU_T_PROBE if self.offered(VIRTIO_IOMMU_F_PROBE) => {
                let need = std::mem::size_of::<ProbeReq>();
                let Some(bytes) = request.get(..need) else {
                    return Response::Drop(DropReason::Truncated {
                        req_type,
                        got: request.len(),
                        need,
                    });
                };
                let mut req = ProbeReq::default();
                req.as_mut_slice().copy_from_slice(bytes);
                self.probe(&req, writable - REQ_TAIL_SIZE)
            }
            VIRTIO_IOMMU_T_ATTACH_TABLE if self.acked(VIRTIO_IOMMU_F_ATTACH_TABLE) => {
                match read_attach_table(request, self.config.output_bits) {
                    Ok(Some(at)) => self.attach_table(&at, refs),
                    Ok(None) => {
                        return Response::Drop(DropReason::Truncated {
                            req_type,
                            got: request.len(),
                            need: ATTACH_TABLE_VTD_MIN.min(ATTACH_TABLE_SMMU_MIN),
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            VIRTIO_IOMMU_T_INVALIDATE if self.acked(VIRTIO_IOMMU_F_ATTACH_TABLE) => {
                match read_request::<InvalidateReq>(request, req_type) {
                    Ok(req) => self.invalidate(&req),
                    Err(drop) => return Response::Drop(drop),
                }
            }
            VIRTIO_IOMMU_T_DETACH_TABLE if self.acked(VIRTIO_IOMMU_F_ATTACH_TABLE) => {
                match read_request::<DetachTableReq>(request, req_type) {
                    Ok(req) => self.detach_table(&req, refs),
                    Err(drop) => return Response::Drop(drop),
                }
            }
            VIRTIO_IOMMU_T_PASID_ALLOC if self.acked(VIRTIO_IOMMU_F_PASID_ALLOC) => {
                let Some(bytes) = request.get(..PASID_ALLOC_READABLE) else {
                    return Response::Drop(DropReason::Truncated {
                        req_type,
                        got: request.len(),
                        need: PASID_ALLOC_READABLE,
                    });
                };
                let mut req = PasidAllocReq::default();
                req.as_mut_slice()[..PASID_ALLOC_READABLE].copy_from_slice(bytes);
                match pasid_alloc(&req, writable) {
                    Ok(op) => return Response::Pasid(op),
                    Err(e) => Err(e),
                }
            }
            VIRTIO_IOMMU_T_PASID_FREE if self.acked(VIRTIO_IOMMU_F_PASID_ALLOC) => {
                match read_request::<PasidFreeReq>(request, req_type) {
                    Ok(req) => match pasid_free(&req) {
                        Ok(op) => {
                            // No request that carries the PASID may be in
                            // flight once it is free: answer them now.
                            let pasid = req.pasid.to_native();
                            self.cancel_groups(|p| {
                                p.cancel_pasid_everywhere(pasid, AutoCause::PasidFreed)
                            });
                            return Response::Pasid(op);
                        }
                        Err(e) => Err(e),
                    },
                    Err(drop) => return Response::Drop(drop),
                }
            }
            VIRTIO_IOMMU_T_PAGE_RESP if self.acked(VIRTIO_IOMMU_F_PAGE_REQUEST) => {
                match read_request::<PageRespReq>(request, req_type) {
                    Ok(req) => self.page_resp(&req),
                    Err(drop) => return Response::Drop(drop),
                }
            }
            other => return Response::Drop(DropReason::UnknownType(other)),
        };
        Response::Reply {
            req_type,
            result,
            payload: &[],
        }
    }

    fn attach(&mut self, req: &AttachReq) -> Result<(), RequestError> {
        let (domain_id, endpoint) = (req.domain.to_native(), req.endpoint.to_native());
        let flags = req.flags.to_native();
        if req.reserved != [0; 4] {
            return Err(RequestError::ReservedNotZero);
        }
        let known = known_attach_flags(self.acked);
        if flags & !known != 0 {
            return Err(RequestError::UnknownFlags(flags & !known));
        }
        let bypass = flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        if !self.config.endpoints.contains(endpoint) {
            return Err(RequestError::NoSuchEndpoint(endpoint));
        }
        let (lo, hi) = self.config.domain_range;
        if domain_id < lo || domain_id > hi {
            return Err(RequestError::DomainOutOfRange(domain_id));
        }
        let old = self.endpoints.get(&endpoint).copied();
        if let (Some(d), Some(rs)) = (
            self.domains.get(&domain_id),
            self.host_regions.get(&endpoint),
        ) {
            if let Some(m) = first_overlap(&d.mappings, rs) {
                return Err(RequestError::HostReserved {
                    endpoint,
                    start: m.virt_start,
                    end: m.virt_end,
                });
            }
        }
        match self.domains.get(&domain_id) {
            Some(d) if d.bypass != bypass => return Err(RequestError::BypassMismatch(domain_id)),
            Some(_) if old == Some(domain_id) => return Ok(()),
            Some(_) => {}
            None => {
                let frees_one = self.move_frees_domain(endpoint);
                if self.domains.len() - usize::from(frees_one) >= self.config.max_domains {
                    return Err(RequestError::TooManyDomains(self.config.max_domains));
                }
            }
        }
        // Checks are done: from here on nothing fails.
        if let Some(old) = old {
            self.cancel_groups(|p| p.cancel_untagged(endpoint, AutoCause::Detached));
            self.remove_endpoint(endpoint, old);
        }
        let domain = self
            .domains
            .entry(domain_id)
            .or_insert_with(|| Domain::new(bypass, None));
        domain.endpoints.push(endpoint);
        self.endpoints.insert(endpoint, domain_id);
        debug!(
            "ATTACH endpoint {endpoint} to {} domain {domain_id}",
            if bypass { "bypass" } else { "paging" }
        );
        self.record(StateChange::Attach {
            endpoint,
            domain: domain_id,
            bypass,
        });
        Ok(())
    }

    /// Whether moving `endpoint` to another domain destroys its current
    /// one: it is the last endpoint there and no PASID is bound to it.
    fn move_frees_domain(&self, endpoint: u32) -> bool {
        self.endpoints
            .get(&endpoint)
            .and_then(|o| self.domains.get(o))
            .is_some_and(|d| d.endpoints.len() == 1 && d.bound.is_empty())
    }

    /// Detaches `endpoint` from `domain_id`, destroying the domain (and its
    /// mappings) when it was the last user.
    fn remove_endpoint(&mut self, endpoint: u32, domain_id: u32) {
        self.endpoints.remove(&endpoint);
        if let Some(domain) = self.domains.get_mut(&domain_id) {
            domain.endpoints.retain(|&e| e != endpoint);
            if domain.is_unused() {
                self.domains.remove(&domain_id);
            }
        }
        self.record(StateChange::Detach {
            endpoint,
            domain: domain_id,
        });
    }

    fn detach(&mut self, req: &DetachReq, refs: &mut dyn PasidRefs) -> Result<(), RequestError> {
        // The device MUST ignore DETACH's reserved bytes.
        let (domain_id, endpoint) = (req.domain.to_native(), req.endpoint.to_native());
        if !self.config.endpoints.contains(endpoint) {
            return Err(RequestError::NoSuchEndpoint(endpoint));
        }
        if self.endpoints.get(&endpoint) != Some(&domain_id) {
            return Err(RequestError::NotAttached {
                endpoint,
                domain: domain_id,
            });
        }
        // The endpoint leaves the IOMMU's care: its page requests are
        // answered, its PASID bindings go, so nothing it does is
        // translated through them any more.
        self.cancel_groups(|p| p.cancel_endpoint(endpoint, AutoCause::Detached));
        let pasids: Vec<u32> = self
            .bindings
            .range((endpoint, 0)..=(endpoint, u32::MAX))
            .map(|(&(_, p), _)| p)
            .collect();
        for pasid in pasids {
            self.unbind(endpoint, pasid, refs);
        }
        self.remove_endpoint(endpoint, domain_id);
        debug!("DETACH endpoint {endpoint} from domain {domain_id}");
        Ok(())
    }

    /// Binds a table (ATTACH_TABLE, checked by `read_attach_table`).
    fn attach_table(
        &mut self,
        at: &AttachTable,
        refs: &mut dyn PasidRefs,
    ) -> Result<(), RequestError> {
        let AttachTable {
            domain: domain_id,
            endpoint,
            pasid,
            table,
        } = *at;
        if !self.config.table_formats.offers(table.format()) {
            return Err(RequestError::UnsupportedFormat(table.format()));
        }
        if !self.config.endpoints.contains(endpoint) {
            return Err(RequestError::NoSuchEndpoint(endpoint));
        }
        let (lo, hi) = self.config.domain_range;
        if domain_id < lo || domain_id > hi {
            return Err(RequestError::DomainOutOfRange(domain_id));
        }
        match self.domains.get(&domain_id) {
            Some(d) if d.table != Some(table) => {
                return Err(RequestError::TableMismatch(domain_id))
            }
            Some(_) => {}
            None => {
                let frees_one = pasid == 0 && self.move_frees_domain(endpoint);
                if self.domains.len() - usize::from(frees_one) >= self.config.max_domains {
                    return Err(RequestError::TooManyDomains(self.config.max_domains));
                }
            }
        }
        if pasid == 0 {
            return self.attach_table_domain(endpoint, domain_id, table);
        }
        let bits = self.config.endpoint_pasid_bits;
        if bits == 0 {
            return Err(RequestError::NoPasidSupport(endpoint));
        }
        if u64::from(pasid) >> bits != 0 {
            return Err(RequestError::PasidWidth { pasid, bits });
        }
        let old = self.bindings.get(&(endpoint, pasid)).copied();
        if old.is_some_and(|b| b.domain == domain_id) {
            return Ok(());
        }
        let bound = self
            .bindings
            .range((endpoint, 0)..=(endpoint, u32::MAX))
            .count();
        let limit = self.config.max_bindings_per_endpoint;
        if old.is_none() && bound >= limit {
            return Err(RequestError::TooManyBindings { endpoint, limit });
        }
        let handle = refs
            .take(endpoint, pasid)
            .ok_or(RequestError::PasidNotOwned(pasid))?;
        // Checks are done: from here on nothing fails.
        if old.is_some() {
            self.unbind(endpoint, pasid, refs);
        }
        self.bindings.insert(
            (endpoint, pasid),
            Binding {
                domain: domain_id,
                handle,
            },
        );
        let bound = &mut self
            .domains
            .entry(domain_id)
            .or_insert_with(|| Domain::new(false, Some(table)))
            .bound;
        // Kept in order, so a domain's bindings read the same however
        // they were made (and restored).
        let at = bound.partition_point(|&k| k < (endpoint, pasid));
        bound.insert(at, (endpoint, pasid));
        debug!("ATTACH_TABLE endpoint {endpoint} PASID {pasid} to domain {domain_id}");
        self.record(StateChange::TableBound {
            endpoint,
            domain: domain_id,
            pasid,
            table,
        });
        Ok(())
    }

    /// ATTACH_TABLE without PASID: an ATTACH whose domain has a table.
    fn attach_table_domain(
        &mut self,
        endpoint: u32,
        domain_id: u32,
        table: TableSpec,
    ) -> Result<(), RequestError> {
        let old = self.endpoints.get(&endpoint).copied();
        if old == Some(domain_id) {
            return Ok(());
        }
        if let Some(old) = old {
            self.cancel_groups(|p| p.cancel_untagged(endpoint, AutoCause::Detached));
            self.remove_endpoint(endpoint, old);
        }
        self.domains
            .entry(domain_id)
            .or_insert_with(|| Domain::new(false, Some(table)))
            .endpoints
            .push(endpoint);
        self.endpoints.insert(endpoint, domain_id);
        debug!("ATTACH_TABLE endpoint {endpoint} to table domain {domain_id}");
        self.record(StateChange::Attach {
            endpoint,
            domain: domain_id,
            bypass: false,
        });
        self.record(StateChange::TableBound {
            endpoint,
            domain: domain_id,
            pasid: 0,
            table,
        });
        Ok(())
    }

    /// Removes the (endpoint, PASID) binding, if any: its page requests
    /// are answered, its domain goes when unused, its PASID reference is
    /// given back.
    fn unbind(&mut self, endpoint: u32, pasid: u32, refs: &mut dyn PasidRefs) {
        let Some(b) = self.bindings.remove(&(endpoint, pasid)) else {
            return;
        };
        self.cancel_groups(|p| p.cancel_pasid(endpoint, pasid, AutoCause::Unbound));
        if let Some(d) = self.domains.get_mut(&b.domain) {
            d.bound.retain(|&k| k != (endpoint, pasid));
            if d.is_unused() {
                self.domains.remove(&b.domain);
            }
        }
        self.record(StateChange::TableUnbound {
            endpoint,
            domain: b.domain,
            pasid,
        });
        refs.release(endpoint, pasid, b.handle);
    }

    fn detach_table(
        &mut self,
        req: &DetachTableReq,
        refs: &mut dyn PasidRefs,
    ) -> Result<(), RequestError> {
        let (domain, endpoint, pasid) = (
            req.domain.to_native(),
            req.endpoint.to_native(),
            req.pasid.to_native(),
        );
        if req.flags.to_native() != 0 {
            return Err(RequestError::UnknownFlags(req.flags.to_native()));
        }
        if req.reserved != [0; 8] {
            return Err(RequestError::ReservedNotZero);
        }
        if !self.config.endpoints.contains(endpoint) {
            return Err(RequestError::NoSuchEndpoint(endpoint));
        }
        if self.bindings.get(&(endpoint, pasid)).map(|b| b.domain) != Some(domain) {
            return Err(RequestError::NoSuchBinding {
                endpoint,
                pasid,
                domain,
            });
        }
        self.unbind(endpoint, pasid, refs);
        debug!("DETACH_TABLE endpoint {endpoint} PASID {pasid} from domain {domain}");
        Ok(())
    }

    fn invalidate(&mut self, req: &InvalidateReq) -> Result<(), RequestError> {
        let inv = read_invalidate(req)?;
        let d = self
            .domains
            .get(&inv.domain)
            .ok_or(RequestError::NoSuchDomain(inv.domain))?;
        if d.table.is_none() {
            return Err(RequestError::TableMismatch(inv.domain));
        }
        trace!("INVALIDATE {inv:?}");
        self.record(StateChange::TableInvalidate(inv));
        Ok(())
    }

    /// PAGE_RESP: the guest's answer to a group in flight goes to the
    /// group's source.
    fn page_resp(&mut self, req: &PageRespReq) -> Result<(), RequestError> {
        let (key, code) = read_page_resp(req)?;
        let answer = self.page_requests.respond(key, code)?;
        trace!("PAGE_RESP {key}: {}", code.name());
        self.answers.push(answer);
        Ok(())
    }

    /// Runs a cancellation of page-request groups; their answers join
    /// the ones [`Self::take_answers`] hands out.
    fn cancel_groups(&mut self, cancel: impl FnOnce(&mut PageRequests) -> Vec<Answer>) {
        let answers = cancel(&mut self.page_requests);
        self.answers.extend(answers);
    }

    fn map(&mut self, req: &MapReq) -> Result<(), RequestError> {
        let domain_id = req.domain.to_native();
        let (start, end) = (req.virt_start.to_native(), req.virt_end.to_native());
        let phys = req.phys_start.to_native();
        let flags = req.flags.to_native();
        let known = known_map_flags(self.acked);
        // One lookup for the checks and the insertion.
        let Some(domain) = self.domains.get_mut(&domain_id) else {
            return Err(RequestError::NoSuchDomain(domain_id));
        };
        if flags & !known != 0 {
            return Err(RequestError::UnknownFlags(flags & !known));
        }
        if domain.bypass {
            return Err(RequestError::BypassDomain(domain_id));
        }
        if domain.table.is_some() {
            return Err(RequestError::TableDomain(domain_id));
        }
        check_map_range(&self.config, self.granule_mask, start, end, phys)?;
        let host_reserved = domain.endpoints.iter().any(|ep| {
            self.host_regions
                .get(ep)
                .is_some_and(|rs| rs.iter().any(|r| r.start <= end && start <= r.end))
        });
        if host_reserved {
            return Err(RequestError::ReservedRegion { start, end });
        }
        if domain.mappings.overlaps(start, end) {
            return Err(RequestError::Overlap { start, end });
        }
        if domain.mappings.len() >= self.config.max_mappings_per_domain {
            return Err(RequestError::TooManyMappings {
                domain: domain_id,
                limit: self.config.max_mappings_per_domain,
            });
        }
        let mapping = Mapping {
            virt_start: start,
            virt_end: end,
            phys_start: phys,
            flags,
        };
        domain.mappings.insert(mapping);
        self.record(StateChange::Map {
            domain: domain_id,
            mapping,
        });
        trace!("MAP domain {domain_id} {start:#x}-{end:#x} -> {phys:#x} flags {flags:#x}");
        Ok(())
    }

    fn unmap(&mut self, req: &UnmapReq) -> Result<(), RequestError> {
        let domain_id = req.domain.to_native();
        let (start, end) = (req.virt_start.to_native(), req.virt_end.to_native());
        let Some(domain) = self.domains.get_mut(&domain_id) else {
            return Err(RequestError::NoSuchDomain(domain_id));
        };
        // The device MAY refuse a non-zero reserved field; refusing keeps
        // the request all-or-nothing.
        if req.reserved != [0; 4] {
            return Err(RequestError::ReservedNotZero);
        }
        if domain.bypass {
            return Err(RequestError::BypassDomain(domain_id));
        }
        if domain.table.is_some() {
            return Err(RequestError::TableDomain(domain_id));
        }
        if end < start {
            return Err(RequestError::InvertedRange { start, end });
        }
        // All or nothing: check both ends before removing anything.
        if domain.mappings.would_split(start, end) {
            return Err(RequestError::WouldSplit { start, end });
        }
        let removed = domain.mappings.remove_range(start, end);
        trace!("UNMAP domain {domain_id} {start:#x}-{end:#x}: {removed} mappings");
        if removed > 0 {
            self.record(StateChange::Unmap {
                domain: domain_id,
                virt_start: start,
                virt_end: end,
            });
        }
        Ok(())
    }

    fn probe(&mut self, req: &ProbeReq, area: usize) -> Result<(), RequestError> {
        let endpoint = req.endpoint.to_native();
        if !self.config.endpoints.contains(endpoint) {
            return Err(RequestError::NoSuchEndpoint(endpoint));
        }
        let size = self.config.probe_size as usize;
        if area < size {
            return Err(RequestError::ProbeBufferTooSmall {
                got: area,
                need: size,
            });
        }
        // Extension properties only for a driver that negotiated their
        // feature: the mainline driver logs every unknown property.
        let tables = self.acked(VIRTIO_IOMMU_F_ATTACH_TABLE);
        let page_requests = self.acked(VIRTIO_IOMMU_F_PAGE_REQUEST);
        self.reply_buf.clear();
        let host = self
            .host_regions
            .get(&endpoint)
            .map_or(&[][..], Vec::as_slice);
        self.config
            .probe_properties(host, tables, page_requests, &mut self.reply_buf);
        // `DeviceConfig::validate` guarantees the properties fit.
        self.reply_buf.resize(size, 0);
        debug!(
            "PROBE endpoint {endpoint}: {} bytes of properties",
            self.reply_buf.len()
        );
        Ok(())
    }
}

/// The first mapping of `mappings` inside one of `regions`.
fn first_overlap(mappings: &MappingTree, regions: &[ReservedRegion]) -> Option<Mapping> {
    regions.iter().find_map(|r| {
        mappings
            .iter_from(r.start)
            .next()
            .filter(|m| m.virt_start <= r.end)
    })
}

/// ATTACH flags the driver may use, given the features it accepted.
pub(crate) fn known_attach_flags(acked: u64) -> u32 {
    if acked & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) != 0 {
        VIRTIO_IOMMU_ATTACH_F_BYPASS
    } else {
        0
    }
}

/// MAP flags the driver may use, given the features it accepted.
pub(crate) fn known_map_flags(acked: u64) -> u32 {
    let mut known = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    if acked & (1 << VIRTIO_IOMMU_F_MMIO) != 0 {
        known |= VIRTIO_IOMMU_MAP_F_MMIO;
    }
    known
}

/// The rules the range of every mapping follows, whoever creates it: a
/// MAP request, or a restored state (`state::decode`). `granule_mask` is
/// the configuration's granule minus one.
pub(crate) fn check_map_range(
    config: &DeviceConfig,
    granule_mask: u64,
    start: u64,
    end: u64,
    phys: u64,
) -> Result<(), RequestError> {
    if end < start {
        return Err(RequestError::InvertedRange { start, end });
    }
    for addr in [start, phys, end.wrapping_add(1)] {
        if addr & granule_mask != 0 {
            return Err(RequestError::Misaligned(addr));
        }
    }
    let (lo, hi) = config.input_range;
    if start < lo || end > hi {
        return Err(RequestError::OutsideInputRange { start, end });
    }
    if phys.checked_add(end - start).is_none() {
        return Err(RequestError::PhysOverflow(phys));
    }
    if config
        .reserved_regions
        .iter()
        .any(|r| r.start <= end && start <= r.end)
    {
        return Err(RequestError::ReservedRegion { start, end });
    }
    Ok(())
}

/// Checks a PASID_ALLOC request; the allocation itself is the PASID
/// service's.
fn pasid_alloc(req: &PasidAllocReq, writable: usize) -> Result<PasidOp, RequestError> {
    if req.flags.to_native() != 0 {
        return Err(RequestError::UnknownFlags(req.flags.to_native()));
    }
    if req.reserved != [0; 4] {
        return Err(RequestError::ReservedNotZero);
    }
    if writable < PASID_ALLOC_WRITABLE {
        return Err(RequestError::WritableTooSmall {
            got: writable,
            need: PASID_ALLOC_WRITABLE,
        });
    }
    Ok(PasidOp::Alloc {
        min: req.min.to_native(),
        max: req.max.to_native(),
    })
}

/// Checks a PASID_FREE request.
fn pasid_free(req: &PasidFreeReq) -> Result<PasidOp, RequestError> {
    if req.flags.to_native() != 0 {
        return Err(RequestError::UnknownFlags(req.flags.to_native()));
    }
    if req.reserved != [0; 8] {
        return Err(RequestError::ReservedNotZero);
    }
    Ok(PasidOp::Free {
        pasid: req.pasid.to_native(),
    })
}

/// Reads a fixed-size request whose device-readable part is everything
/// but the 4-byte tail.
fn read_request<T: ByteValued + Default>(request: &[u8], req_type: u8) -> Result<T, DropReason> {
    let need = std::mem::size_of::<T>() - REQ_TAIL_SIZE;
    let bytes = request.get(..need).ok_or(DropReason::Truncated {
        req_type,
        got: request.len(),
        need,
    })?;
    let mut req = T::default();
    req.as_mut_slice()[..need].copy_from_slice(bytes);
    Ok(req)
}
