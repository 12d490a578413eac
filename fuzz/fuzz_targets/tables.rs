// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The extension's request path on the whole device: ATTACH_TABLE (VT-d
//! and SMMUv3, with arbitrary fields or raw bytes), INVALIDATE,
//! DETACH_TABLE, PAGE_RESP, interleaved with ATTACH, DETACH, PASID_FREE,
//! reset, page requests from sources (raised, delivered or not), their
//! sources' loss, timer ticks, and translations through the bound tables
//! of a guest memory the input fills with arbitrary entries.
//!
//! Beyond "no panic", after every step:
//! - the PASID references a host allocator (which reuses a PASID only
//!   when nothing references it) holds for each PASID are exactly those
//!   of the bindings and of the page-request groups in flight;
//! - every raised group is answered exactly once (or dropped with its
//!   source), never after its PASID became reusable;
//! - every domain has endpoints or bindings; every binding is in its
//!   domain's list and the domain has a VT-d table; a table domain has no
//!   mappings; a refused request changes nothing;
//! - a translation through a table never reads outside guest memory and
//!   never panics, whatever the table holds.

#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::{
    config::DeviceConfig,
    device::{PasidOp, Response},
    pgtable::PageAccess as WalkAccess,
    prq::{AutoCause, GroupKey, Limits, PageAccess, PageRequest, PasidRefs, SourceId},
    table::TableSpec,
    wire::*,
    Viommu,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: small, so arbitrary table pointers often land in it.
const MEM: u64 = 64 << 10;
const ENDPOINTS: u32 = 3;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Words written into guest memory first: page-table entries.
    words: Vec<(u16, u64)>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Table {
    Vtd {
        pgd: u16,
        addr_width: u8,
        fl_flags: u8,
    },
    Smmu {
        s1fmt: u8,
        s1cdmax: u8,
        ptr: u16,
        s1dss: u8,
    },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Op {
    AttachTable {
        domain: u8,
        endpoint: u8,
        pasid: u8,
        table: Table,
    },
    DetachTable {
        domain: u8,
        endpoint: u8,
        pasid: u8,
        flags: u8,
    },
    Invalidate {
        gran: u8,
        types: u8,
        flags: u8,
        domain: u8,
        pasid: u8,
        va: u64,
        nr_pages: u8,
        granule: u8,
    },
    PageResp {
        endpoint: u8,
        pasid: Option<u8>,
        group_id: u8,
        code: u8,
    },
    Attach {
        domain: u8,
        endpoint: u8,
    },
    Detach {
        domain: u8,
        endpoint: u8,
    },
    PasidFree(u8),
    Reset,
    Raise {
        source: u8,
        endpoint: u8,
        pasid: Option<u8>,
        group_id: u8,
        last: bool,
        write: bool,
    },
    Deliver {
        index: u8,
        ok: bool,
    },
    SourceGone(u8),
    Tick(u8),
    Translate {
        endpoint: u8,
        pasid: u8,
        va: u64,
        write: bool,
        exec: bool,
        privileged: bool,
    },
}

/// A host allocator as the daemon's global mode uses one: PASIDs 1-3 are
/// the VM's; a freed PASID is inactive while referenced and reused (a
/// new generation) when its last reference goes.
#[derive(Default)]
struct Host {
    lives: BTreeMap<u32, (u64, u32, bool)>,
}

impl Host {
    fn new() -> Host {
        let mut h = Host::default();
        for p in 1..=3 {
            h.lives.insert(p, (0, 0, true));
        }
        h
    }

    fn free(&mut self, pasid: u32) {
        if let Some(l) = self.lives.get_mut(&pasid) {
            l.2 = false;
            if l.1 == 0 {
                *l = (l.0 + 1, 0, true);
            }
        }
    }

    fn refs(&self, pasid: u32) -> u32 {
        self.lives.get(&pasid).map_or(0, |l| l.1)
    }

    fn generation(&self, pasid: u32) -> u64 {
        self.lives.get(&pasid).map_or(0, |l| l.0)
    }
}

impl PasidRefs for Host {
    fn take(&mut self, _endpoint: u32, pasid: u32) -> Option<u64> {
        let l = self.lives.get_mut(&pasid).filter(|l| l.2)?;
        l.1 += 1;
        Some(l.0)
    }

    fn release(&mut self, _endpoint: u32, pasid: u32, generation: u64) {
        let l = self
            .lives
            .get_mut(&pasid)
            .expect("a PASID the VM never had");
        assert_eq!(l.0, generation, "a reference given back after reuse");
        l.1 = l.1.checked_sub(1).expect("a reference given back twice");
        if l.1 == 0 && !l.2 {
            *l = (l.0 + 1, 0, true);
        }
    }
}

/// A raised group: its source, key and PASID generation.
struct Open {
    source: SourceId,
    key: GroupKey,
    generation: Option<u64>,
}

struct World {
    dev: Viommu,
    host: Host,
    mem: GuestMemoryMmap,
    now: Duration,
    next_token: u64,
    open: HashMap<u64, Open>,
    pending: Vec<viommu::prq::Delivery>,
}

fn features() -> u64 {
    ((1 << 7) - 1)
        | (1 << VIRTIO_IOMMU_F_ATTACH_TABLE)
        | (1 << VIRTIO_IOMMU_F_PAGE_REQUEST)
        | (1 << VIRTIO_IOMMU_F_PASID_ALLOC)
}

impl World {
    fn new(words: &[(u16, u64)]) -> World {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        for &(at, v) in words.iter().take(512) {
            let at = u64::from(at) * 8 % MEM;
            mem.write_obj(v, GuestAddress(at)).unwrap();
        }
        let config = DeviceConfig {
            max_domains: 4,
            max_bindings_per_endpoint: 2,
            endpoint_pasid_bits: 4,
            output_bits: 32,
            pasid_alloc: true,
            page_requests: Some(Limits {
                groups_per_endpoint: 2,
                groups_total: 4,
                partial_groups: 2,
                requests_per_group: 2,
                partial_timeout: Duration::from_millis(5),
                response_timeout: Some(Duration::from_millis(20)),
            }),
            ..DeviceConfig::default()
        };
        let mut dev = Viommu::new(config);
        dev.set_acked_features(features());
        World {
            dev,
            host: Host::new(),
            mem,
            now: Duration::ZERO,
            next_token: 0,
            open: HashMap::new(),
            pending: Vec::new(),
        }
    }

    /// Sends a request; PASID_FREE runs on the host allocator.
    fn send(&mut self, request: &[u8]) -> Option<u8> {
        let before = snapshot(&self.dev);
        let response = self.dev.handle_request_with(request, 4, &mut self.host);
        let status = match response {
            Response::Pasid(op) => {
                if let PasidOp::Free { pasid } = op {
                    self.host.free(pasid);
                }
                self.dev.complete_pasid(op, Ok(0)).status()
            }
            r => r.status(),
        };
        if status.is_some_and(|s| s != VIRTIO_IOMMU_S_OK) {
            assert_eq!(
                snapshot(&self.dev),
                before,
                "a refused request changed the device"
            );
        }
        status
    }

    /// Answers the device decided: each closes one raised group, in the
    /// generation of its PASID, and gives the reference back.
    fn settle(&mut self) {
        for a in self.dev.take_answers() {
            let open = self
                .open
                .remove(&a.token)
                .unwrap_or_else(|| panic!("an answer to {}, which is not in flight", a.token));
            assert_eq!((open.source, open.key), (a.source, a.key));
            if let (Some(g), Some(p)) = (open.generation, open.key.pasid) {
                assert_eq!(
                    g,
                    self.host.generation(p),
                    "answered after its PASID was reused"
                );
            }
            a.finish(&mut self.host);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::AttachTable {
                domain,
                endpoint,
                pasid,
                table,
            } => {
                let (domain, endpoint, pasid) = (
                    u32::from(domain % 6),
                    u32::from(endpoint) % ENDPOINTS,
                    u32::from(pasid % 5),
                );
                let bytes = match table {
                    Table::Vtd {
                        pgd,
                        addr_width,
                        fl_flags,
                    } => {
                        let width = if addr_width & 1 == 0 { 48 } else { 57 };
                        let mut r = AttachTableVtdReq::new(
                            domain,
                            endpoint,
                            pasid,
                            u64::from(pgd) << 12,
                            if addr_width & 2 == 0 {
                                width
                            } else {
                                u32::from(addr_width)
                            },
                        );
                        r.fl_flags = u64::from(fl_flags & 0x7).into();
                        vm_memory::ByteValued::as_slice(&r).to_vec()
                    }
                    Table::Smmu {
                        s1fmt,
                        s1cdmax,
                        ptr,
                        s1dss,
                    } => {
                        let mut r = AttachTableSmmuReq::new(
                            domain,
                            endpoint,
                            s1fmt % 4,
                            u32::from(s1cdmax % 24),
                            u64::from(ptr) << 6,
                        );
                        r.s1dss = s1dss % 4;
                        vm_memory::ByteValued::as_slice(&r).to_vec()
                    }
                    Table::Raw(mut b) => {
                        if b.len() > 2 {
                            b[0] = VIRTIO_IOMMU_T_ATTACH_TABLE;
                        }
                        b
                    }
                };
                self.send(&bytes);
            }
            Op::DetachTable {
                domain,
                endpoint,
                pasid,
                flags,
            } => {
                let mut r = DetachTableReq::new(
                    u32::from(domain % 6),
                    u32::from(endpoint) % ENDPOINTS,
                    u32::from(pasid % 5),
                );
                r.flags = u32::from(flags & 1).into();
                if self.send(readable_part(&r)) == Some(VIRTIO_IOMMU_S_OK) {
                    self.settle();
                    let (ep, p) = (r.endpoint.to_native(), r.pasid.to_native());
                    assert!(
                        self.open
                            .values()
                            .all(|o| (o.key.endpoint, o.key.pasid) != (ep, Some(p))),
                        "DETACH_TABLE completed with the PASID's groups in flight"
                    );
                }
            }
            Op::Invalidate {
                gran,
                types,
                flags,
                domain,
                pasid,
                va,
                nr_pages,
                granule,
            } => {
                let mut r = InvalidateReq::new(
                    u16::from(gran % 8),
                    u16::from(types % 8),
                    u32::from(domain % 6),
                )
                .with_pasid(u32::from(pasid % 5))
                .with_range(va, u64::from(nr_pages), granule % 40);
                r.flags = u16::from(flags & 7).into();
                self.send(readable_part(&r));
            }
            Op::PageResp {
                endpoint,
                pasid,
                group_id,
                code,
            } => {
                let r = PageRespReq::new(
                    u32::from(endpoint) % ENDPOINTS,
                    pasid.map(|p| u32::from(p % 5)),
                    u16::from(group_id % 4),
                    u16::from(code % 4),
                );
                self.send(readable_part(&r));
            }
            Op::Attach { domain, endpoint } => {
                let r = AttachReq::new(u32::from(domain % 6), u32::from(endpoint) % ENDPOINTS, 0);
                self.send(readable_part(&r));
            }
            Op::Detach { domain, endpoint } => {
                let r = DetachReq::new(u32::from(domain % 6), u32::from(endpoint) % ENDPOINTS);
                self.send(readable_part(&r));
            }
            Op::PasidFree(p) => {
                let r = PasidFreeReq::new(u32::from(p % 5));
                self.send(readable_part(&r));
            }
            Op::Reset => {
                let mut host = std::mem::take(&mut self.host);
                self.dev.reset(&mut host);
                self.host = host;
                self.dev.set_acked_features(features());
                self.pending.clear();
            }
            Op::Raise {
                source,
                endpoint,
                pasid,
                group_id,
                last,
                write,
            } => {
                self.next_token += 1;
                let key = GroupKey {
                    endpoint: u32::from(endpoint) % ENDPOINTS,
                    pasid: pasid.map(|p| u32::from(p % 5)),
                    group_id: u16::from(group_id % 4),
                };
                let request = PageRequest {
                    source: SourceId(u32::from(source % 2)),
                    token: self.next_token,
                    key,
                    address: 0x1000,
                    access: PageAccess {
                        read: true,
                        write,
                        ..Default::default()
                    },
                    last,
                    private_data: None,
                };
                let open = Open {
                    source: request.source,
                    key,
                    generation: key.pasid.map(|p| self.host.generation(p)),
                };
                // Every request is a group of its own here (a new token):
                // non-LAST ones only gather, so only a LAST opens one.
                if last {
                    self.open.insert(self.next_token, open);
                }
                if let Some(d) = self
                    .dev
                    .raise_page_request(request, self.now, &mut self.host)
                {
                    assert!(last, "a delivery for a request before LAST");
                    self.pending.push(d);
                }
            }
            Op::Deliver { index, ok } => {
                if !self.pending.is_empty() {
                    let d = self
                        .pending
                        .swap_remove(usize::from(index) % self.pending.len());
                    let failed = (!ok).then_some(AutoCause::NoBuffer);
                    self.dev.page_request_delivered(d, failed);
                }
            }
            Op::SourceGone(s) => {
                let source = SourceId(u32::from(s % 2));
                let mut host = std::mem::take(&mut self.host);
                self.dev.page_request_source_gone(source, &mut host);
                self.host = host;
                self.open.retain(|_, o| o.source != source);
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(u64::from(ms % 16));
                self.dev.expire_page_requests(self.now);
            }
            Op::Translate {
                endpoint,
                pasid,
                va,
                write,
                exec,
                privileged,
            } => {
                let access = WalkAccess {
                    write,
                    execute: exec,
                    privileged,
                };
                let _ = self.dev.translate_table(
                    &self.mem,
                    u32::from(endpoint) % ENDPOINTS,
                    u32::from(pasid % 5),
                    va,
                    access,
                );
            }
        }
        self.settle();
    }

    fn check(&self) {
        for p in 1..=3 {
            let bindings = self.dev.bindings().filter(|((_, q), _)| *q == p).count();
            let groups = self
                .open
                .values()
                .filter(|o| o.key.pasid == Some(p) && self.in_flight(o.key))
                .count();
            assert_eq!(self.host.refs(p) as usize, bindings + groups, "PASID {p}");
        }
        for (&id, d) in self.dev.domains() {
            assert!(
                !d.endpoints.is_empty() || !d.bound.is_empty(),
                "domain {id} is empty"
            );
            if d.table.is_some() {
                assert!(
                    d.mappings.is_empty() && !d.bypass,
                    "table domain {id} with mappings"
                );
            }
            for &(ep, p) in &d.bound {
                assert!(
                    self.dev
                        .bindings()
                        .any(|(k, b)| k == (ep, p) && b.domain == id),
                    "binding ({ep}, {p}) of domain {id} is not bound there"
                );
                assert!(matches!(d.table, Some(TableSpec::Vtd(_))));
            }
        }
        let bound: usize = self.dev.domains().values().map(|d| d.bound.len()).sum();
        assert_eq!(bound, self.dev.bindings().count());
        assert!(self.dev.domains().len() <= self.dev.config().max_domains);
    }

    /// Whether the device holds a raised group with this key.
    fn in_flight(&self, key: GroupKey) -> bool {
        self.dev
            .page_requests()
            .groups(self.now)
            .any(|g| g.key == key && g.stage != viommu::prq::Stage::Partial)
    }
}

/// What a refused request must leave alone.
fn snapshot(dev: &Viommu) -> String {
    let mut domains: Vec<String> = dev
        .domains()
        .iter()
        .map(|(id, d)| {
            format!(
                "{id}:{:?}:{:?}:{:?}:{}",
                d.endpoints,
                d.bound,
                d.table,
                d.mappings.len()
            )
        })
        .collect();
    domains.sort();
    let bindings: Vec<String> = dev
        .bindings()
        .map(|(k, b)| format!("{k:?}->{}", b.domain))
        .collect();
    format!("{domains:?} {bindings:?}")
}

fuzz_target!(|input: Input| {
    let mut w = World::new(&input.words);
    for op in input.ops.into_iter().take(256) {
        w.apply(op);
        w.check();
    }
    let mut host = std::mem::take(&mut w.host);
    w.dev.reset(&mut host);
    w.host = host;
    w.settle();
    assert!(
        w.open.is_empty(),
        "groups left after reset: {}",
        w.open.len()
    );
    for p in 1..=3 {
        assert_eq!(w.host.refs(p), 0, "PASID {p} still referenced after reset");
    }
});
