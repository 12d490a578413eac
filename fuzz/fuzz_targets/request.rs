// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request path of the device model: sequences of guest requests
//! (well-formed, malformed, truncated, padded, or raw bytes), config
//! writes, feature negotiation, resets, PASID completions and
//! translations, into a `Viommu` built from an arbitrary valid
//! configuration with small caps and ID spaces, so that requests collide.
//!
//! Beyond "no panic", after every step:
//! - a reply is written only when the device-writable part holds the
//!   tail, fills exactly that part, and a successful reply's payload fits
//!   before the tail (PROBE: exactly `probe_size` bytes of RESV_MEM
//!   properties then zeros; PASID_ALLOC: the PASID); a drop is for a
//!   missing tail, a truncated request or an unknown type, nothing else;
//! - the model's invariants (spec_tests.rs `hostile`, extended): every
//!   attached endpoint exists and its domain exists and lists it once;
//!   every domain lists only endpoints attached to it and is never empty;
//!   domain IDs are in range; caps hold; a bypass domain has no mappings;
//!   mappings are granule-aligned, in the input range, outside the
//!   reserved regions, never overlap and carry only known flags;
//! - a refused request changes nothing (requests are all-or-nothing),
//!   and successful ATTACH, DETACH, MAP and UNMAP did what they say;
//! - the recorded `StateChange`s, replayed onto a shadow copy (as a
//!   control-plane subscriber does), give the model's state exactly;
//! - `translate` agrees with a lookup in the shadow copy;
//! - at the end, the request counters add up.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::{
    config::{DeviceConfig, EndpointSet, ReservedRegion, TableFormats},
    device::{DropReason, PasidOp, Response},
    pasid::PasidError,
    wire::*,
    Access, Mapping, StateChange, TranslateError, Translation, Viommu,
};
use vm_memory::ByteValued;

#[derive(Arbitrary, Debug)]
struct Input {
    config: Config,
    features: u64,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct Config {
    /// log2 of the granule (taken modulo 21).
    granule_shift: u8,
    /// Larger page sizes, besides the granule.
    larger_sizes: u64,
    /// Input range width (12..=64) and start, in granules.
    input_bits: u8,
    input_start: u8,
    domain_lo: u8,
    domain_hi: Id,
    probe_size: u16,
    boot_bypass: bool,
    bypass_config: bool,
    mmio: bool,
    pasid_alloc: bool,
    /// Endpoint ranges (`None`: every 16-bit RID).
    endpoints: Option<Vec<(u8, u8)>>,
    /// Reserved regions: first page, pages, subtype.
    reserved: Vec<(Addr, u8, u8)>,
    max_domains: u8,
    max_mappings: u8,
}

/// A domain or endpoint ID: mostly small, so that requests collide.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Id {
    Small(u8),
    Any(u32),
}

impl Id {
    fn get(self) -> u32 {
        match self {
            Id::Small(n) => u32::from(n % 8),
            Id::Any(n) => n,
        }
    }
}

/// An address: mostly a page of the first 256, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Page(u8),
    Any(u64),
}

impl Addr {
    fn get(self, granule: u64) -> u64 {
        match self {
            Addr::Page(n) => u64::from(n).wrapping_mul(granule),
            Addr::Any(a) => a,
        }
    }
}

/// The end of a range: `pages` whole pages after its start, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum End {
    Pages(u8),
    Any(u64),
}

impl End {
    fn get(self, start: u64, granule: u64) -> u64 {
        match self {
            End::Pages(n) => start
                .wrapping_add((u64::from(n % 16) + 1).wrapping_mul(granule))
                .wrapping_sub(1),
            End::Any(a) => a,
        }
    }
}

/// How the device-readable bytes of a request reach the device.
#[derive(Arbitrary, Debug)]
enum Shape {
    Whole,
    Truncated(u8),
    Padded(Vec<u8>),
}

/// The size of the device-writable part.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Writable {
    /// What the request type needs.
    Right,
    Small(u8),
    Any(u16),
}

/// Bytes a field holds: mostly zero (reserved fields) or a few known bits.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Bits {
    Zero,
    Low(u8),
    Any(u32),
}

impl Bits {
    fn get(self) -> u32 {
        match self {
            Bits::Zero => 0,
            Bits::Low(n) => u32::from(n & 0xf),
            Bits::Any(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Request {
    Attach {
        domain: Id,
        endpoint: Id,
        flags: Bits,
        reserved: Bits,
    },
    Detach {
        domain: Id,
        endpoint: Id,
        reserved: Bits,
    },
    Map {
        domain: Id,
        start: Addr,
        end: End,
        phys: Addr,
        flags: Bits,
    },
    Unmap {
        domain: Id,
        start: Addr,
        end: End,
        reserved: Bits,
    },
    Probe {
        endpoint: Id,
        reserved: Bits,
    },
    PasidAlloc {
        min: u32,
        max: u32,
        flags: Bits,
        reserved: Bits,
    },
    PasidFree {
        pasid: u32,
        flags: Bits,
        reserved: Bits,
    },
    Raw(Vec<u8>),
}

/// What the PASID service does with a PASID operation.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum PasidOutcome {
    Ok(u32),
    QuotaExceeded,
    Exhausted,
    OutOfRange,
    Unknown,
    Inactive,
    Backend,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Request {
        request: Request,
        shape: Shape,
        writable: Writable,
        pasid: PasidOutcome,
    },
    WriteBypass(u8),
    SetFeatures(u64),
    Reset,
    Translate {
        endpoint: Id,
        iova: Addr,
        write: bool,
    },
}

fn build_config(c: &Config) -> DeviceConfig {
    let shift = u32::from(c.granule_shift % 21);
    let granule = 1u64 << shift;
    let input_end = match c.input_bits % 53 + 12 {
        64 => u64::MAX,
        bits => (1u64 << bits) - 1,
    };
    let input_start = (u64::from(c.input_start) * granule).min(input_end);
    let domain_lo = u32::from(c.domain_lo % 4);
    let endpoints = match &c.endpoints {
        None => EndpointSet::all_pci_rids(),
        Some(items) => EndpointSet::from_ranges(
            items
                .iter()
                .map(|&(a, b)| u32::from(a.min(b) % 10)..=u32::from(a.max(b) % 10))
                .collect(),
        ),
    };
    DeviceConfig {
        page_size_mask: granule | (c.larger_sizes & !(granule.wrapping_mul(2) - 1)),
        input_range: (input_start, input_end),
        domain_range: (domain_lo, c.domain_hi.get()),
        probe_size: u32::from(c.probe_size % 512),
        boot_bypass: c.boot_bypass,
        bypass_config: c.bypass_config,
        mmio: c.mmio,
        endpoints,
        reserved_regions: c
            .reserved
            .iter()
            .take(4)
            .map(|&(first, pages, subtype)| {
                let start = first.get(granule);
                ReservedRegion {
                    start,
                    end: start.saturating_add(u64::from(pages) * granule + granule - 1),
                    subtype: subtype % 2,
                }
            })
            .collect(),
        max_domains: usize::from(c.max_domains % 6) + 1,
        max_mappings_per_domain: usize::from(c.max_mappings % 24) + 1,
        pasid_alloc: c.pasid_alloc,
        // The table extension has targets of its own (`tables`, the
        // walkers, `prq`): here the base device and PASID allocation.
        table_formats: TableFormats::default(),
        page_requests: None,
        ..DeviceConfig::default()
    }
}

/// Device-readable bytes, and the writable size a driver would give.
fn encode(request: &Request, granule: u64, probe_size: usize) -> (Vec<u8>, usize) {
    match *request {
        Request::Attach {
            domain,
            endpoint,
            flags,
            reserved,
        } => {
            let mut r = AttachReq::new(domain.get(), endpoint.get(), flags.get());
            r.reserved = reserved.get().to_le_bytes();
            (readable_part(&r).to_vec(), REQ_TAIL_SIZE)
        }
        Request::Detach {
            domain,
            endpoint,
            reserved,
        } => {
            let mut r = DetachReq::new(domain.get(), endpoint.get());
            r.reserved[..4].copy_from_slice(&reserved.get().to_le_bytes());
            (readable_part(&r).to_vec(), REQ_TAIL_SIZE)
        }
        Request::Map {
            domain,
            start,
            end,
            phys,
            flags,
        } => {
            let start = start.get(granule);
            let r = MapReq::new(
                domain.get(),
                start,
                end.get(start, granule),
                phys.get(granule),
                flags.get(),
            );
            (readable_part(&r).to_vec(), REQ_TAIL_SIZE)
        }
        Request::Unmap {
            domain,
            start,
            end,
            reserved,
        } => {
            let start = start.get(granule);
            let mut r = UnmapReq::new(domain.get(), start, end.get(start, granule));
            r.reserved = reserved.get().to_le_bytes();
            (readable_part(&r).to_vec(), REQ_TAIL_SIZE)
        }
        Request::Probe { endpoint, reserved } => {
            let mut r = ProbeReq::new(endpoint.get());
            r.reserved_hi[28..].copy_from_slice(&reserved.get().to_le_bytes());
            (r.as_slice().to_vec(), probe_size + REQ_TAIL_SIZE)
        }
        Request::PasidAlloc {
            min,
            max,
            flags,
            reserved,
        } => {
            let mut r = PasidAllocReq::new(min, max);
            r.flags = flags.get().into();
            r.reserved = reserved.get().to_le_bytes();
            (r.readable().to_vec(), PASID_ALLOC_WRITABLE)
        }
        Request::PasidFree {
            pasid,
            flags,
            reserved,
        } => {
            let mut r = PasidFreeReq::new(pasid);
            r.flags = flags.get().into();
            r.reserved[4..].copy_from_slice(&reserved.get().to_le_bytes());
            (readable_part(&r).to_vec(), REQ_TAIL_SIZE)
        }
        Request::Raw(ref bytes) => (bytes.clone(), REQ_TAIL_SIZE),
    }
}

fn pasid_result(outcome: PasidOutcome) -> Result<u32, PasidError> {
    match outcome {
        PasidOutcome::Ok(p) => Ok(p),
        PasidOutcome::QuotaExceeded => Err(PasidError::QuotaExceeded { quota: 1 }),
        PasidOutcome::Exhausted => Err(PasidError::Exhausted { min: 1, max: 2 }),
        PasidOutcome::OutOfRange => Err(PasidError::OutOfRange { pasid: 0, max: 1 }),
        PasidOutcome::Unknown => Err(PasidError::UnknownPasid(3)),
        PasidOutcome::Inactive => Err(PasidError::Inactive(3)),
        PasidOutcome::Backend => Err(PasidError::Poisoned),
    }
}

/// A domain as a control-plane subscriber rebuilds it from the changes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ShadowDomain {
    bypass: bool,
    endpoints: Vec<u32>,
    mappings: Vec<Mapping>,
}

/// The state rebuilt from the `StateChange` stream.
#[derive(Debug, Default)]
struct Shadow {
    bypass: bool,
    endpoints: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, ShadowDomain>,
}

impl Shadow {
    fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::Attach {
                endpoint,
                domain,
                bypass,
            } => {
                assert!(
                    !self.endpoints.contains_key(&endpoint),
                    "ATTACH of endpoint {endpoint} without a DETACH from its old domain first"
                );
                self.endpoints.insert(endpoint, domain);
                let d = self.domains.entry(domain).or_insert(ShadowDomain {
                    bypass,
                    endpoints: Vec::new(),
                    mappings: Vec::new(),
                });
                assert_eq!(d.bypass, bypass, "domain {domain} changed kind");
                d.endpoints.push(endpoint);
            }
            StateChange::Detach { endpoint, domain } => {
                assert_eq!(self.endpoints.remove(&endpoint), Some(domain));
                let d = self.domains.get_mut(&domain).expect("DETACH from a domain");
                d.endpoints.retain(|&e| e != endpoint);
                if d.endpoints.is_empty() {
                    self.domains.remove(&domain);
                }
            }
            StateChange::Map { domain, mapping } => {
                let d = self.domains.get_mut(&domain).expect("MAP into a domain");
                d.mappings.push(mapping);
                d.mappings.sort_by_key(|m| m.virt_start);
            }
            StateChange::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                let d = self.domains.get_mut(&domain).expect("UNMAP in a domain");
                d.mappings
                    .retain(|m| m.virt_start < virt_start || m.virt_start > virt_end);
            }
            StateChange::Bypass(on) => self.bypass = on,
            StateChange::Reset => {
                self.endpoints.clear();
                self.domains.clear();
            }
            StateChange::TableBound { .. }
            | StateChange::TableUnbound { .. }
            | StateChange::TableInvalidate(_) => {
                panic!("a table change on a device that offers no table format: {change:?}")
            }
        }
    }

    fn translate(
        &self,
        config: &DeviceConfig,
        endpoint: u32,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        if !config.endpoints.contains(endpoint) {
            return Err(TranslateError::NoSuchEndpoint(endpoint));
        }
        let identity = |domain| Translation {
            iova_start: 0,
            iova_end: u64::MAX,
            gpa_start: 0,
            domain,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
            bypass: true,
        };
        let fault =
            |reason| TranslateError::Fault(viommu::Fault::new(reason, endpoint, iova, access));
        let Some(&id) = self.endpoints.get(&endpoint) else {
            return if config.bypass_config && self.bypass {
                Ok(identity(None))
            } else {
                Err(fault(VIRTIO_IOMMU_FAULT_R_DOMAIN))
            };
        };
        let d = &self.domains[&id];
        if d.bypass {
            return Ok(identity(Some(id)));
        }
        match d
            .mappings
            .iter()
            .find(|m| m.virt_start <= iova && iova <= m.virt_end)
        {
            Some(m) if m.flags & access.map_flag() != 0 => Ok(Translation {
                iova_start: m.virt_start,
                iova_end: m.virt_end,
                gpa_start: m.phys_start,
                domain: Some(id),
                flags: m.flags,
                bypass: false,
            }),
            _ => Err(fault(VIRTIO_IOMMU_FAULT_R_MAPPING)),
        }
    }
}

/// The model's invariants, and its state equal to the shadow's.
fn check_state(dev: &Viommu, shadow: &Shadow) {
    let cfg = dev.config();
    let granule = cfg.granule();
    let mut known_flags = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    if cfg.mmio {
        known_flags |= VIRTIO_IOMMU_MAP_F_MMIO;
    }
    assert_eq!(dev.bypass(), shadow.bypass, "bypass");
    let attached: BTreeMap<u32, u32> = dev.attached_endpoints().collect();
    assert_eq!(attached, shadow.endpoints, "attached endpoints");
    for (&ep, &d) in &attached {
        assert!(cfg.endpoints.contains(ep), "endpoint {ep} does not exist");
        let domain = dev.domains().get(&d).expect("an endpoint's domain exists");
        assert_eq!(domain.endpoints.iter().filter(|&&e| e == ep).count(), 1);
    }
    assert!(dev.domains().len() <= cfg.max_domains, "too many domains");
    assert_eq!(dev.domains().len(), shadow.domains.len(), "domains");
    for (&id, d) in dev.domains() {
        assert!(
            cfg.domain_range.0 <= id && id <= cfg.domain_range.1,
            "domain {id} out of range"
        );
        assert!(!d.endpoints.is_empty(), "empty domain {id}");
        for ep in &d.endpoints {
            assert_eq!(attached.get(ep), Some(&id), "domain {id} lists {ep}");
        }
        assert!(d.mappings.len() <= cfg.max_mappings_per_domain);
        assert!(
            !d.bypass || d.mappings.is_empty(),
            "bypass domain with mappings"
        );
        let mappings: Vec<Mapping> = d.mappings.iter().collect();
        assert_eq!(mappings.len(), d.mappings.len());
        for w in mappings.windows(2) {
            assert!(w[0].virt_end < w[1].virt_start, "overlap {w:?}");
        }
        for m in &mappings {
            assert!(m.virt_start <= m.virt_end);
            assert!(m.virt_start.is_multiple_of(granule) && m.phys_start.is_multiple_of(granule));
            assert!(m.virt_end.wrapping_add(1).is_multiple_of(granule));
            assert!(cfg.input_range.0 <= m.virt_start && m.virt_end <= cfg.input_range.1);
            assert!(m
                .phys_start
                .checked_add(m.virt_end - m.virt_start)
                .is_some());
            assert!(cfg
                .reserved_regions
                .iter()
                .all(|r| r.end < m.virt_start || m.virt_end < r.start));
            assert_eq!(m.flags & !known_flags, 0, "flags {m:?}");
        }
        let s = &shadow.domains[&id];
        assert_eq!(
            (d.bypass, &d.endpoints, &mappings),
            (s.bypass, &s.endpoints, &s.mappings),
            "domain {id} differs from the replayed changes"
        );
    }
}

/// Checks a reply's bytes and what it says about the request.
fn check_reply(cfg: &DeviceConfig, request: &Request, payload: &[u8], writable: usize) {
    assert!(
        payload.len() + REQ_TAIL_SIZE <= writable,
        "a payload of {} bytes does not fit before the tail in {writable}",
        payload.len()
    );
    if let Request::Probe { .. } = request {
        assert_eq!(payload.len(), cfg.probe_size as usize);
        let mut at = 0;
        for r in &cfg.reserved_regions {
            let mut prop = ProbeResvMem::default();
            prop.as_mut_slice()
                .copy_from_slice(&payload[at..at + std::mem::size_of::<ProbeResvMem>()]);
            assert_eq!(
                prop.head.prop_type.to_native(),
                VIRTIO_IOMMU_PROBE_T_RESV_MEM
            );
            assert_eq!(usize::from(prop.head.length.to_native()), 20);
            assert_eq!(
                (prop.subtype, prop.start.to_native(), prop.end.to_native()),
                (r.subtype, r.start, r.end)
            );
            at += std::mem::size_of::<ProbeResvMem>();
        }
        assert!(payload[at..].iter().all(|&b| b == 0), "PROBE padding");
    }
}

fn writable_size(w: Writable, right: usize) -> usize {
    match w {
        Writable::Right => right,
        Writable::Small(n) => usize::from(n % 16),
        Writable::Any(n) => usize::from(n),
    }
}

fuzz_target!(|input: Input| {
    let config = build_config(&input.config);
    if config.validate().is_err() {
        return;
    }
    let granule = config.granule();
    let probe_size = config.probe_size as usize;
    let mut dev = Viommu::new(config.clone());
    dev.record_changes(true);
    dev.set_acked_features(input.features);
    let mut shadow = Shadow {
        bypass: dev.bypass(),
        ..Default::default()
    };
    let (mut replies, mut drops) = (0u64, 0u64);

    for op in input.ops {
        match op {
            Op::Request {
                request,
                shape,
                writable,
                pasid,
            } => {
                let (mut bytes, right) = encode(&request, granule, probe_size);
                match shape {
                    Shape::Whole => {}
                    Shape::Truncated(n) => bytes.truncate(usize::from(n) % (bytes.len() + 1)),
                    Shape::Padded(extra) => bytes.extend_from_slice(&extra),
                }
                let writable = writable_size(writable, right);
                let response = match dev.handle_request(&bytes, writable) {
                    Response::Pasid(op) => {
                        assert!(dev.config().pasid_alloc, "PASID op without the feature");
                        match (&request, op) {
                            (
                                Request::PasidAlloc { min, max, .. },
                                PasidOp::Alloc { min: a, max: b },
                            ) => {
                                assert_eq!((*min, *max), (a, b))
                            }
                            (Request::PasidFree { pasid, .. }, PasidOp::Free { pasid: p }) => {
                                assert_eq!(*pasid, p)
                            }
                            (Request::Raw(_), _) => {}
                            (r, op) => panic!("{r:?} became {op:?}"),
                        }
                        if let PasidOp::Alloc { .. } = op {
                            assert!(writable >= PASID_ALLOC_WRITABLE);
                        }
                        let result = pasid_result(pasid);
                        let allocated = result.as_ref().ok().copied();
                        let response = dev.complete_pasid(op, result);
                        if let (PasidOp::Alloc { .. }, Some(p), Response::Reply { payload, .. }) =
                            (op, allocated, &response)
                        {
                            let mut want = p.to_le_bytes().to_vec();
                            want.extend_from_slice(&[0; 4]);
                            assert_eq!(*payload, &want[..]);
                        }
                        response
                    }
                    other => other,
                };
                let mut buf = vec![0u8; writable];
                let used = response.write_into(&mut buf) as usize;
                let status = response.status();
                match &response {
                    Response::Drop(reason) => {
                        drops += 1;
                        assert_eq!(used, 0);
                        match *reason {
                            DropReason::NoTail { writable: w } => {
                                assert!(w == writable && writable < REQ_TAIL_SIZE)
                            }
                            DropReason::Truncated { got, need, .. } => {
                                assert!(writable >= REQ_TAIL_SIZE);
                                assert!(got == bytes.len() && got < need);
                            }
                            DropReason::UnknownType(t) => {
                                assert!(writable >= REQ_TAIL_SIZE && Some(&t) == bytes.first())
                            }
                        }
                    }
                    Response::Reply {
                        req_type,
                        result,
                        payload,
                    } => {
                        replies += 1;
                        assert_eq!(Some(req_type), bytes.first());
                        assert!(writable >= REQ_TAIL_SIZE);
                        assert_eq!(used, writable, "a reply fills the writable part");
                        assert_eq!(buf[writable - REQ_TAIL_SIZE], status.unwrap());
                        assert_eq!(&buf[writable - 3..], &[0, 0, 0]);
                        if result.is_ok() {
                            check_reply(&config, &request, payload, writable);
                        }
                    }
                    Response::Pasid(_) => unreachable!("completed above"),
                }

                let changes = dev.take_changes();
                if status != Some(VIRTIO_IOMMU_S_OK) {
                    // check_state compares the model with the unchanged shadow.
                    assert!(changes.is_empty(), "refused, yet changed: {changes:?}");
                } else {
                    check_success(&dev, &request, granule);
                }
                for c in changes {
                    shadow.apply(c);
                }
            }
            Op::WriteBypass(v) => {
                let _ = dev.write_bypass(v);
                for c in dev.take_changes() {
                    shadow.apply(c);
                }
            }
            Op::SetFeatures(f) => {
                dev.set_acked_features(f);
                assert_eq!(dev.acked_features() & !dev.device_features(), 0);
            }
            Op::Reset => {
                dev.reset(&mut viommu::table::UncountedPasids);
                for c in dev.take_changes() {
                    shadow.apply(c);
                }
                assert_eq!(dev.acked_features(), 0);
            }
            Op::Translate {
                endpoint,
                iova,
                write,
            } => {
                let (endpoint, iova) = (endpoint.get(), iova.get(granule));
                let access = if write { Access::Write } else { Access::Read };
                assert_eq!(
                    dev.translate(endpoint, iova, access),
                    shadow.translate(dev.config(), endpoint, iova, access),
                    "translate endpoint {endpoint} iova {iova:#x}"
                );
            }
        }
        check_state(&dev, &shadow);
    }

    let stats = dev.stats();
    assert_eq!(stats.by_type.iter().sum::<u64>(), replies);
    assert_eq!(stats.by_status.iter().sum::<u64>(), replies);
    assert_eq!(stats.dropped, drops);
});

/// What a successful request must have done.
fn check_success(dev: &Viommu, request: &Request, granule: u64) {
    match *request {
        Request::Attach {
            domain, endpoint, ..
        } => assert_eq!(dev.endpoint_domain(endpoint.get()), Some(domain.get())),
        Request::Detach { endpoint, .. } => assert_eq!(dev.endpoint_domain(endpoint.get()), None),
        Request::Map {
            domain,
            start,
            end,
            phys,
            flags,
        } => {
            let start = start.get(granule);
            let m = dev.domains()[&domain.get()].mappings.lookup(start);
            assert_eq!(
                m,
                Some(Mapping {
                    virt_start: start,
                    virt_end: end.get(start, granule),
                    phys_start: phys.get(granule),
                    flags: flags.get(),
                })
            );
        }
        Request::Unmap {
            domain, start, end, ..
        } => {
            let start = start.get(granule);
            let end = end.get(start, granule);
            if let Some(d) = dev.domains().get(&domain.get()) {
                assert!(d
                    .mappings
                    .iter()
                    .all(|m| m.virt_end < start || m.virt_start > end));
            }
        }
        _ => {}
    }
}
