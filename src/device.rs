// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu device state machine: endpoints, domains, their
//! mappings and the bypass state, changed only by driver requests
//! (ATTACH, DETACH, MAP, UNMAP, PROBE), config writes and resets.
//!
//! `Viommu::handle_request` takes the device-readable bytes of one request
//! and the size of its device-writable part, and says what to write back.
//! It never panics on guest input: malformed requests are dropped (used
//! length 0) and refused ones carry a status code.

use std::collections::HashMap;

use log::{debug, trace};
use thiserror::Error;
use vm_memory::ByteValued;

use crate::{
    change::StateChange,
    config::DeviceConfig,
    error::{status_of, RequestError},
    mapping::{Mapping, MappingTree},
    pasid::{Pasid, PasidError},
    wire::*,
};

/// A domain: an address space shared by the endpoints attached to it.
/// `clone` is cheap: the mappings are shared copy-on-write.
#[derive(Clone)]
pub struct Domain {
    /// Created by ATTACH with `VIRTIO_IOMMU_ATTACH_F_BYPASS`: identity
    /// translation, no mappings.
    pub bypass: bool,
    /// Attached endpoints, in attach order; never empty.
    pub endpoints: Vec<u32>,
    /// The domain's mappings (empty for a bypass domain).
    pub mappings: MappingTree,
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
    /// Payload of the last reply (PROBE properties, the PASID of a
    /// PASID_ALLOC), reused across requests.
    reply_buf: Vec<u8>,
    stats: RequestStats,
    /// Changes since the last `take_changes`, when recording is on.
    changes: Option<Vec<StateChange>>,
}

impl Viommu {
    /// A device in its power-on state. The configuration must have passed
    /// `DeviceConfig::validate`.
    pub fn new(config: DeviceConfig) -> Self {
        Viommu {
            granule_mask: config.granule() - 1,
            bypass: config.boot_bypass && config.bypass_config,
            config,
            acked: 0,
            endpoints: HashMap::new(),
            domains: HashMap::new(),
            reply_buf: Vec::new(),
            stats: RequestStats::default(),
            changes: None,
        }
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

    /// Device reset: no endpoint stays attached and every domain goes.
    /// `bypass` survives (virtio-iommu 1.3: it SHOULD only return to its
    /// initial value on system reset), negotiated features do not.
    pub fn reset(&mut self) {
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

    /// The domain an endpoint is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.endpoints.get(&endpoint).copied()
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

    fn record(&mut self, change: StateChange) {
        if let Some(changes) = self.changes.as_mut() {
            changes.push(change);
        }
    }

    /// Handles one request. `request` is the device-readable part of the
    /// descriptor chain (extra trailing bytes are ignored); `writable` is
    /// the size of its device-writable part.
    pub fn handle_request(&mut self, request: &[u8], writable: usize) -> Response<'_> {
        let response = self.dispatch(request, writable);
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

    fn dispatch(&mut self, request: &[u8], writable: usize) -> Response<'static> {
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
                Ok(req) => self.detach(&req),
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
            VIRTIO_IOMMU_T_PASID_ALLOC if self.offered(VIRTIO_IOMMU_F_PASID_ALLOC) => {
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
            VIRTIO_IOMMU_T_PASID_FREE if self.offered(VIRTIO_IOMMU_F_PASID_ALLOC) => {
                match read_request::<PasidFreeReq>(request, req_type) {
                    Ok(req) => match pasid_free(&req) {
                        Ok(op) => return Response::Pasid(op),
                        Err(e) => Err(e),
                    },
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
        let known = if self.acked(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            VIRTIO_IOMMU_ATTACH_F_BYPASS
        } else {
            0
        };
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
        match self.domains.get(&domain_id) {
            Some(d) if d.bypass != bypass => return Err(RequestError::BypassMismatch(domain_id)),
            Some(_) if old == Some(domain_id) => return Ok(()),
            Some(_) => {}
            None => {
                // Moving the last endpoint out of its old domain frees a slot.
                let frees_one = old
                    .and_then(|o| self.domains.get(&o))
                    .is_some_and(|d| d.endpoints.len() == 1);
                if self.domains.len() - usize::from(frees_one) >= self.config.max_domains {
                    return Err(RequestError::TooManyDomains(self.config.max_domains));
                }
            }
        }
        // Checks are done: from here on nothing fails.
        if let Some(old) = old {
            self.remove_endpoint(endpoint, old);
        }
        let domain = self.domains.entry(domain_id).or_insert_with(|| Domain {
            bypass,
            endpoints: Vec::new(),
            mappings: MappingTree::new(),
        });
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

    /// Detaches `endpoint` from `domain_id`, destroying the domain (and its
    /// mappings) when it was the last endpoint.
    fn remove_endpoint(&mut self, endpoint: u32, domain_id: u32) {
        self.endpoints.remove(&endpoint);
        if let Some(domain) = self.domains.get_mut(&domain_id) {
            domain.endpoints.retain(|&e| e != endpoint);
            if domain.endpoints.is_empty() {
                self.domains.remove(&domain_id);
            }
        }
        self.record(StateChange::Detach {
            endpoint,
            domain: domain_id,
        });
    }

    fn detach(&mut self, req: &DetachReq) -> Result<(), RequestError> {
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
        self.remove_endpoint(endpoint, domain_id);
        debug!("DETACH endpoint {endpoint} from domain {domain_id}");
        Ok(())
    }

    fn map(&mut self, req: &MapReq) -> Result<(), RequestError> {
        let domain_id = req.domain.to_native();
        let (start, end) = (req.virt_start.to_native(), req.virt_end.to_native());
        let phys = req.phys_start.to_native();
        let flags = req.flags.to_native();
        let mut known = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
        if self.acked(VIRTIO_IOMMU_F_MMIO) {
            known |= VIRTIO_IOMMU_MAP_F_MMIO;
        }
        let Some(domain) = self.domains.get(&domain_id) else {
            return Err(RequestError::NoSuchDomain(domain_id));
        };
        if flags & !known != 0 {
            return Err(RequestError::UnknownFlags(flags & !known));
        }
        if domain.bypass {
            return Err(RequestError::BypassDomain(domain_id));
        }
        if end < start {
            return Err(RequestError::InvertedRange { start, end });
        }
        for addr in [start, phys, end.wrapping_add(1)] {
            if addr & self.granule_mask != 0 {
                return Err(RequestError::Misaligned(addr));
            }
        }
        let (lo, hi) = self.config.input_range;
        if start < lo || end > hi {
            return Err(RequestError::OutsideInputRange { start, end });
        }
        if phys.checked_add(end - start).is_none() {
            return Err(RequestError::PhysOverflow(phys));
        }
        if self
            .config
            .reserved_regions
            .iter()
            .any(|r| r.start <= end && start <= r.end)
        {
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
        if let Some(domain) = self.domains.get_mut(&domain_id) {
            domain.mappings.insert(mapping);
        }
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
        self.reply_buf.clear();
        self.reply_buf.resize(size, 0);
        let mut at = 0;
        for r in &self.config.reserved_regions {
            let prop = ProbeResvMem {
                head: ProbeProperty {
                    prop_type: VIRTIO_IOMMU_PROBE_T_RESV_MEM.into(),
                    length: (std::mem::size_of::<ProbeResvMem>() as u16 - 4).into(),
                },
                subtype: r.subtype,
                reserved: [0; 3],
                start: r.start.into(),
                end: r.end.into(),
            };
            let bytes = prop.as_slice();
            // `DeviceConfig::validate` guarantees the properties fit.
            if let Some(dst) = self.reply_buf.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
            at += bytes.len();
        }
        debug!(
            "PROBE endpoint {endpoint}: {} RESV_MEM properties",
            self.config.reserved_regions.len()
        );
        Ok(())
    }
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
