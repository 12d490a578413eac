// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The rules of ATTACH_TABLE, DETACH_TABLE and INVALIDATE
//! (docs/extension-spec.md), one test per rule, driven through
//! `Viommu::handle_request_with` with the bytes a driver sends and real
//! tables in a guest memory.

use std::collections::BTreeMap;

use vm_memory::ByteValued;

use crate::{
    change::{Invalidation, StateChange},
    config::{DeviceConfig, TableFormats},
    device::{DropReason, Response, Viommu},
    pgtable::{testutil::TestMem, PageAccess, WalkFault},
    prq::PasidRefs,
    table::{TableFaultReason, TableTranslateError, S1DSS_BYPASS, S1DSS_TERMINATE},
    wire::*,
};

const EP: u32 = 8;
const EP2: u32 = 9;
const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const TABLE_FEATURES: u64 = ((1 << 7) - 1) | (1 << VIRTIO_IOMMU_F_ATTACH_TABLE);

// x86-64 page-table entry bits.
const P: u64 = 1 << 0;
const RW_BIT: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;

/// PASID references as a global-mode daemon keeps them: only PASIDs it
/// hands out may be bound; counts references per PASID.
#[derive(Default)]
struct Owned {
    owned: Vec<u32>,
    refs: BTreeMap<u32, u32>,
}

impl PasidRefs for Owned {
    fn take(&mut self, _endpoint: u32, pasid: u32) -> Option<u64> {
        if !self.owned.contains(&pasid) {
            return None;
        }
        *self.refs.entry(pasid).or_default() += 1;
        Some(u64::from(pasid))
    }

    fn release(&mut self, _endpoint: u32, pasid: u32, handle: u64) {
        assert_eq!(handle, u64::from(pasid));
        let n = self.refs.get_mut(&pasid).expect("released twice");
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&pasid);
        }
    }
}

struct Dev {
    dev: Viommu,
    refs: Owned,
}

impl Dev {
    fn new(config: DeviceConfig, features: u64) -> Dev {
        let mut dev = Viommu::new(config);
        dev.set_acked_features(features);
        dev.record_changes(true);
        Dev {
            dev,
            refs: Owned {
                owned: vec![1, 2, 3, 0x55],
                ..Default::default()
            },
        }
    }

    fn status(&mut self, request: &[u8]) -> Option<u8> {
        self.dev
            .handle_request_with(request, REQ_TAIL_SIZE, &mut self.refs)
            .status()
    }
}

fn dev() -> Dev {
    Dev::new(DeviceConfig::default(), TABLE_FEATURES)
}

/// One x86-64 address space in a guest memory: a 4-level table with
/// 4 KiB pages mapped on demand.
struct X86Space {
    tm: TestMem,
    pgd: u64,
}

impl X86Space {
    fn new() -> Self {
        let tm = TestMem::new(16 << 20);
        let pgd = tm.alloc(0x1000);
        X86Space { tm, pgd }
    }

    /// Maps the 4 KiB page of `va` to a new frame with `flags` on the
    /// leaf (user + writable directories); returns the frame.
    fn map(&self, va: u64, flags: u64) -> u64 {
        let mut table = self.pgd;
        for level in (2..=4).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            let entry = self.tm.read(table + idx * 8);
            table = if entry & P != 0 {
                entry & 0x000f_ffff_ffff_f000
            } else {
                let next = self.tm.alloc(0x1000);
                self.tm.write(table + idx * 8, next | P | RW_BIT | US);
                next
            };
        }
        let frame = self.tm.alloc(0x1000);
        self.tm
            .write(table + ((va >> 12) & 0x1ff) * 8, frame | flags);
        frame
    }

    /// Address of the leaf entry of `va` (mapped before).
    fn leaf(&self, va: u64) -> u64 {
        let mut table = self.pgd;
        for level in (2..=4).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            table = self.tm.read(table + idx * 8) & 0x000f_ffff_ffff_f000;
        }
        table + ((va >> 12) & 0x1ff) * 8
    }
}

fn bind(pgd: u64, domain: u32, ep: u32, pasid: u32) -> AttachTableVtdReq {
    AttachTableVtdReq::new(domain, ep, pasid, pgd, 48)
}

fn translate(
    d: &Dev,
    s: &X86Space,
    ep: u32,
    pasid: u32,
    va: u64,
    access: PageAccess,
) -> Result<u64, TableTranslateError> {
    d.dev
        .translate_table(&s.tm.mem, ep, pasid, va, access)
        .map(|t| t.page.gpa_of(va))
}

#[test]
fn table_requests_without_the_negotiated_feature_are_unknown() {
    let s = X86Space::new();
    // Offered but not acked: a mainline driver sees a spec device.
    let mut d = Dev::new(DeviceConfig::default(), (1 << 7) - 1);
    assert_ne!(
        d.dev.device_features() & (1 << VIRTIO_IOMMU_F_ATTACH_TABLE),
        0
    );
    let req = bind(s.pgd, 1, EP, 1);
    assert_eq!(
        d.dev.handle_request(req.as_slice(), 4),
        Response::Drop(DropReason::UnknownType(VIRTIO_IOMMU_T_ATTACH_TABLE))
    );
    let inv = InvalidateReq::new(VIRTIO_IOMMU_INV_G_DOMAIN, VIRTIO_IOMMU_INV_T_IOTLB, 1);
    assert!(matches!(
        d.dev.handle_request(readable_part(&inv), 4),
        Response::Drop(DropReason::UnknownType(VIRTIO_IOMMU_T_INVALIDATE))
    ));
    // And with no table format, the feature is not even offered.
    let plain = Viommu::new(DeviceConfig {
        table_formats: TableFormats::default(),
        ..Default::default()
    });
    assert_eq!(
        plain.device_features() & (1 << VIRTIO_IOMMU_F_ATTACH_TABLE),
        0
    );
}

#[test]
fn pasid_alloc_is_answered_only_when_negotiated() {
    let mut dev = Viommu::new(DeviceConfig {
        pasid_alloc: true,
        ..Default::default()
    });
    dev.set_acked_features((1 << 7) - 1);
    let req = PasidAllocReq::new(1, 10);
    assert_eq!(
        dev.handle_request(req.readable(), PASID_ALLOC_WRITABLE),
        Response::Drop(DropReason::UnknownType(VIRTIO_IOMMU_T_PASID_ALLOC))
    );
    dev.set_acked_features(((1 << 7) - 1) | (1 << VIRTIO_IOMMU_F_PASID_ALLOC));
    assert!(matches!(
        dev.handle_request(req.readable(), PASID_ALLOC_WRITABLE),
        Response::Pasid(_)
    ));
}

#[test]
fn pasid_binding_translates_through_the_guest_table_and_sets_accessed_and_dirty() {
    let s = X86Space::new();
    let mut d = dev();
    let va = 0x7f12_3456_7000;
    let frame = s.map(va, P | RW_BIT | US);
    assert_eq!(d.status(bind(s.pgd, 100, EP, 1).as_slice()), Some(0));
    assert_eq!(
        translate(&d, &s, EP, 1, va + 0x10, PageAccess::READ),
        Ok(frame + 0x10)
    );
    assert_eq!(s.tm.read(s.leaf(va)) & (A | D), A);
    assert_eq!(translate(&d, &s, EP, 1, va, PageAccess::WRITE), Ok(frame));
    assert_eq!(s.tm.read(s.leaf(va)) & (A | D), A | D);
    // The binding took one reference on the PASID.
    assert_eq!(d.refs.refs.get(&1), Some(&1));
    let changes = d.dev.take_changes();
    assert!(matches!(
        changes[..],
        [StateChange::TableBound {
            endpoint: EP,
            domain: 100,
            pasid: 1,
            ..
        }]
    ));
}

#[test]
fn a_non_present_page_is_a_recoverable_fault_and_a_missing_binding_is_not() {
    let s = X86Space::new();
    let mut d = dev();
    d.status(bind(s.pgd, 100, EP, 1).as_slice());
    let err = translate(&d, &s, EP, 1, 0x40_0000, PageAccess::READ).unwrap_err();
    let TableTranslateError::Fault(f) = err else {
        panic!("{err:?}")
    };
    assert!(matches!(
        f.reason,
        TableFaultReason::Walk(WalkFault::NotPresent { .. })
    ));
    assert!(f.reason.is_recoverable());
    let err = translate(&d, &s, EP, 2, 0x40_0000, PageAccess::READ).unwrap_err();
    assert!(matches!(err, TableTranslateError::Fault(f)
        if f.reason == TableFaultReason::NotBound && !f.reason.is_recoverable()));
    assert_eq!(
        translate(&d, &s, 0x12345, 1, 0, PageAccess::READ),
        Err(TableTranslateError::NoSuchEndpoint(0x12345))
    );
}

#[test]
fn binding_a_pasid_this_vm_does_not_hold_is_noent_and_takes_nothing() {
    let s = X86Space::new();
    let mut d = dev();
    assert_eq!(
        d.status(bind(s.pgd, 100, EP, 7).as_slice()),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
    assert!(d.refs.refs.is_empty());
    assert_eq!(d.dev.bindings().count(), 0);
    assert!(d.dev.domains().is_empty());
}

#[test]
fn a_pasid_beyond_the_endpoint_width_is_range_and_no_width_is_unsupp() {
    let s = X86Space::new();
    let mut d = Dev::new(
        DeviceConfig {
            endpoint_pasid_bits: 4,
            ..Default::default()
        },
        TABLE_FEATURES,
    );
    d.refs.owned.push(16);
    assert_eq!(
        d.status(bind(s.pgd, 100, EP, 16).as_slice()),
        Some(VIRTIO_IOMMU_S_RANGE)
    );
    let mut d = Dev::new(
        DeviceConfig {
            endpoint_pasid_bits: 0,
            ..Default::default()
        },
        TABLE_FEATURES,
    );
    assert_eq!(
        d.status(bind(s.pgd, 100, EP, 1).as_slice()),
        Some(VIRTIO_IOMMU_S_UNSUPP)
    );
    // Without PASID a table can still be bound.
    assert_eq!(d.status(bind(s.pgd, 100, EP, 0).as_slice()), Some(0));
}

#[test]
fn endpoints_bound_to_the_same_address_space_share_its_domain() {
    let s = X86Space::new();
    let mut d = dev();
    assert_eq!(d.status(bind(s.pgd, 100, EP, 1).as_slice()), Some(0));
    assert_eq!(d.status(bind(s.pgd, 100, EP2, 1).as_slice()), Some(0));
    assert_eq!(d.dev.domains()[&100].bound, vec![(EP, 1), (EP2, 1)]);
    assert_eq!(d.refs.refs.get(&1), Some(&2));
    // Another table cannot join the domain.
    let other = X86Space::new();
    let other_pgd = other.pgd + 0x10_0000;
    assert_eq!(
        d.status(bind(other_pgd, 100, EP, 2).as_slice()),
        Some(VIRTIO_IOMMU_S_INVAL)
    );
    // Binding again to the same domain is a no-op.
    assert_eq!(d.status(bind(s.pgd, 100, EP, 1).as_slice()), Some(0));
    assert_eq!(d.refs.refs.get(&1), Some(&2));
}

#[test]
fn map_and_unmap_on_a_table_domain_are_inval() {
    let s = X86Space::new();
    let mut d = dev();
    d.status(bind(s.pgd, 100, EP, 0).as_slice());
    let map = MapReq::new(100, 0, 0xfff, 0x1000, RW);
    assert_eq!(d.status(readable_part(&map)), Some(VIRTIO_IOMMU_S_INVAL));
    let unmap = UnmapReq::new(100, 0, 0xfff);
    assert_eq!(d.status(readable_part(&unmap)), Some(VIRTIO_IOMMU_S_INVAL));
    // And a paging domain cannot become a table domain.
    let attach = AttachReq::new(5, EP2, 0);
    assert_eq!(d.status(readable_part(&attach)), Some(0));
    assert_eq!(
        d.status(bind(s.pgd, 5, EP, 1).as_slice()),
        Some(VIRTIO_IOMMU_S_INVAL)
    );
}

#[test]
fn a_table_without_pasid_attaches_the_endpoint_and_translates_its_dma() {
    let s = X86Space::new();
    let mut d = dev();
    let va = 0x1234_5000;
    let frame = s.map(va, P | RW_BIT | US);
    assert_eq!(d.status(bind(s.pgd, 100, EP, 0).as_slice()), Some(0));
    assert_eq!(d.dev.endpoint_domain(EP), Some(100));
    assert_eq!(translate(&d, &s, EP, 0, va, PageAccess::READ), Ok(frame));
    let changes = d.dev.take_changes();
    assert!(matches!(
        changes[..],
        [
            StateChange::Attach {
                endpoint: EP,
                domain: 100,
                bypass: false
            },
            StateChange::TableBound { pasid: 0, .. }
        ]
    ));
    // PASIDs are not served by a VT-d table attached without PASID.
    assert!(translate(&d, &s, EP, 1, va, PageAccess::READ).is_err());
}

#[test]
fn detach_table_removes_the_binding_then_gives_its_reference_back() {
    let s = X86Space::new();
    let mut d = dev();
    d.status(bind(s.pgd, 100, EP, 1).as_slice());
    d.dev.take_changes();
    let wrong_domain = DetachTableReq::new(101, EP, 1);
    assert_eq!(
        d.status(readable_part(&wrong_domain)),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
    let req = DetachTableReq::new(100, EP, 1);
    assert_eq!(d.status(readable_part(&req)), Some(0));
    assert!(d.refs.refs.is_empty());
    assert!(d.dev.domains().is_empty(), "the unused SVA domain stays");
    assert_eq!(
        d.dev.take_changes(),
        vec![StateChange::TableUnbound {
            endpoint: EP,
            domain: 100,
            pasid: 1
        }]
    );
    assert_eq!(
        StateChange::TableUnbound {
            endpoint: EP,
            domain: 100,
            pasid: 1
        }
        .invalidates(),
        Some(Invalidation::Binding {
            endpoint: EP,
            pasid: 1
        })
    );
    assert_eq!(d.status(readable_part(&req)), Some(VIRTIO_IOMMU_S_NOENT));
    let mut bad = DetachTableReq::new(100, EP, 1);
    bad.flags = 1.into();
    assert_eq!(d.status(readable_part(&bad)), Some(VIRTIO_IOMMU_S_INVAL));
}

#[test]
fn detaching_the_endpoint_removes_its_pasid_bindings() {
    let s = X86Space::new();
    let mut d = dev();
    assert_eq!(d.status(readable_part(&AttachReq::new(5, EP, 0))), Some(0));
    d.status(bind(s.pgd, 100, EP, 1).as_slice());
    d.status(bind(s.pgd, 100, EP, 2).as_slice());
    d.status(bind(s.pgd, 100, EP2, 3).as_slice());
    assert_eq!(d.status(readable_part(&DetachReq::new(5, EP))), Some(0));
    let left: Vec<_> = d.dev.bindings().map(|(k, _)| k).collect();
    assert_eq!(left, vec![(EP2, 3)]);
    assert_eq!(d.refs.refs.keys().copied().collect::<Vec<_>>(), vec![3]);
}

#[test]
fn moving_the_endpoint_keeps_its_pasid_bindings() {
    let s = X86Space::new();
    let mut d = dev();
    d.status(readable_part(&AttachReq::new(5, EP, 0)));
    d.status(bind(s.pgd, 100, EP, 1).as_slice());
    assert_eq!(d.status(readable_part(&AttachReq::new(6, EP, 0))), Some(0));
    assert_eq!(d.dev.bindings().count(), 1);
}

#[test]
fn reset_gives_every_binding_reference_back() {
    let s = X86Space::new();
    let mut d = dev();
    d.status(bind(s.pgd, 100, EP, 1).as_slice());
    d.status(bind(s.pgd, 100, EP2, 2).as_slice());
    d.dev.reset(&mut d.refs);
    assert!(d.refs.refs.is_empty());
    assert_eq!(d.dev.bindings().count(), 0);
}

#[test]
fn a_lost_frontend_removes_the_bindings_and_keeps_domains_and_mappings() {
    let s = X86Space::new();
    let mut d = dev();
    d.status(bind(s.pgd, 100, EP, 1).as_slice());
    assert_eq!(d.status(AttachReq::new(1, EP2, 0).as_slice()), Some(0));
    let map = MapReq::new(1, 0x1000, 0x1fff, 0x10_0000, RW);
    assert_eq!(d.status(map.as_slice()), Some(0));
    d.dev.take_changes();
    d.dev.frontend_lost(&mut d.refs);
    assert!(d.refs.refs.is_empty());
    assert_eq!(d.dev.bindings().count(), 0);
    assert!(!d.dev.domains().contains_key(&100));
    assert_eq!(d.dev.domains()[&1].mappings.len(), 1);
    assert_eq!(
        d.dev.take_changes(),
        [StateChange::TableUnbound {
            endpoint: EP,
            domain: 100,
            pasid: 1
        }]
    );
}

#[test]
fn the_endpoint_binding_cap_is_nomem() {
    let s = X86Space::new();
    let mut d = Dev::new(
        DeviceConfig {
            max_bindings_per_endpoint: 2,
            ..Default::default()
        },
        TABLE_FEATURES,
    );
    assert_eq!(d.status(bind(s.pgd, 100, EP, 1).as_slice()), Some(0));
    assert_eq!(d.status(bind(s.pgd, 100, EP, 2).as_slice()), Some(0));
    assert_eq!(
        d.status(bind(s.pgd, 100, EP, 3).as_slice()),
        Some(VIRTIO_IOMMU_S_NOMEM)
    );
    assert_eq!(d.refs.refs.get(&3), None);
}

#[test]
fn a_domain_that_keeps_bindings_still_counts_against_the_domain_cap() {
    let s = X86Space::new();
    let mut d = Dev::new(
        DeviceConfig {
            max_domains: 2,
            ..Default::default()
        },
        TABLE_FEATURES,
    );
    // Domain 100 holds EP's PASID 1 and, by ATTACH, its DMA without PASID.
    assert_eq!(d.status(bind(s.pgd, 100, EP, 1).as_slice()), Some(0));
    assert_eq!(d.status(AttachReq::new(100, EP, 0).as_slice()), Some(0));
    assert_eq!(d.status(AttachReq::new(1, EP2, 0).as_slice()), Some(0));
    // Moving EP out does not free domain 100: the binding keeps it.
    assert_eq!(
        d.status(AttachReq::new(2, EP, 0).as_slice()),
        Some(VIRTIO_IOMMU_S_NOMEM)
    );
    assert_eq!(d.dev.domains().len(), 2);
}

#[test]
fn malformed_attach_table_requests_get_the_documented_status() {
    let s = X86Space::new();
    let mut d = dev();
    let mut req = bind(s.pgd, 100, EP, 1);
    req.addr_width = 39.into();
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_INVAL));
    let mut req = bind(s.pgd, 100, EP, 1);
    req.pgd = (s.pgd + 8).into();
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_RANGE));
    let mut req = bind(s.pgd, 100, EP, 1);
    req.fl_flags = (1 << 9).into();
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_INVAL));
    let mut req = bind(s.pgd, 100, EP, 1);
    req.flags = VIRTIO_IOMMU_ATTACH_F_BYPASS.into();
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_INVAL));
    let mut req = bind(s.pgd, 100, EP, 1);
    req.reserved[3] = 1;
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_INVAL));
    let mut req = bind(s.pgd, 100, EP, 1);
    req.format = 3.into();
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_UNSUPP));
    let req = bind(s.pgd, 100, 0x12345, 1);
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_NOENT));
    // The generic 84-byte view: its 4 extra bytes must be zero.
    let mut long = bind(s.pgd, 100, EP, 1).as_slice().to_vec();
    long.extend_from_slice(&[0, 0, 0, 1]);
    assert_eq!(d.status(&long), Some(VIRTIO_IOMMU_S_INVAL));
    long[83] = 0;
    assert_eq!(d.status(&long), Some(0));
    // Shorter than the format needs: dropped.
    let full = bind(s.pgd, 100, EP, 1);
    let short = &full.as_slice()[..ATTACH_TABLE_VTD_MIN - 1];
    assert!(matches!(
        d.dev.handle_request(short, 4),
        Response::Drop(DropReason::Truncated { .. })
    ));
    // A format the device does not offer.
    let mut vtd_only = Dev::new(
        DeviceConfig {
            table_formats: "smmuv3".parse().unwrap(),
            ..Default::default()
        },
        TABLE_FEATURES,
    );
    assert_eq!(
        vtd_only.status(bind(s.pgd, 100, EP, 1).as_slice()),
        Some(VIRTIO_IOMMU_S_UNSUPP)
    );
}

#[test]
fn invalidate_rules() {
    let s = X86Space::new();
    let mut d = dev();
    d.status(bind(s.pgd, 100, EP, 1).as_slice());
    d.status(readable_part(&AttachReq::new(5, EP2, 0)));
    d.dev.take_changes();
    let inv = |g, t| InvalidateReq::new(g, t, 100);
    let iotlb = VIRTIO_IOMMU_INV_T_IOTLB;
    // A range of one PASID.
    let ok = inv(VIRTIO_IOMMU_INV_G_VA, iotlb)
        .with_pasid(1)
        .with_range(0x4000, 2, 12);
    assert_eq!(d.status(readable_part(&ok)), Some(0));
    let changes = d.dev.take_changes();
    assert_eq!(
        changes[0].invalidates(),
        Some(Invalidation::TableRange {
            domain: 100,
            pasid: Some(1),
            start: 0x4000,
            end: 0x5fff
        })
    );
    // A whole PASID; the whole domain.
    let p = inv(VIRTIO_IOMMU_INV_G_PASID, iotlb).with_pasid(1);
    assert_eq!(d.status(readable_part(&p)), Some(0));
    let dom = inv(VIRTIO_IOMMU_INV_G_DOMAIN, iotlb);
    assert_eq!(d.status(readable_part(&dom)), Some(0));
    let got: Vec<_> = d
        .dev
        .take_changes()
        .iter()
        .filter_map(StateChange::invalidates)
        .collect();
    assert_eq!(
        got,
        vec![
            Invalidation::TablePasid {
                domain: 100,
                pasid: 1
            },
            Invalidation::Domain(100)
        ]
    );
    let status = |d: &mut Dev, r: InvalidateReq| d.status(readable_part(&r));
    // Exactly one granularity; a known type; G_PASID needs F_PASID.
    assert_eq!(
        status(
            &mut d,
            inv(VIRTIO_IOMMU_INV_G_VA | VIRTIO_IOMMU_INV_G_PASID, iotlb).with_pasid(1)
        ),
        Some(VIRTIO_IOMMU_S_INVAL)
    );
    assert_eq!(
        status(&mut d, inv(VIRTIO_IOMMU_INV_G_DOMAIN, 0)),
        Some(VIRTIO_IOMMU_S_INVAL)
    );
    assert_eq!(
        status(&mut d, inv(VIRTIO_IOMMU_INV_G_PASID, iotlb)),
        Some(VIRTIO_IOMMU_S_INVAL)
    );
    // A range that wraps around, or of no page.
    assert_eq!(
        status(
            &mut d,
            inv(VIRTIO_IOMMU_INV_G_VA, iotlb)
                .with_pasid(1)
                .with_range(u64::MAX - 0xfff, 2, 12)
        ),
        Some(VIRTIO_IOMMU_S_RANGE)
    );
    assert_eq!(
        status(
            &mut d,
            inv(VIRTIO_IOMMU_INV_G_VA, iotlb)
                .with_pasid(1)
                .with_range(0, 1 << 60, 12)
        ),
        Some(VIRTIO_IOMMU_S_RANGE)
    );
    assert_eq!(
        status(
            &mut d,
            inv(VIRTIO_IOMMU_INV_G_VA, iotlb)
                .with_pasid(1)
                .with_range(0, 0, 12)
        ),
        Some(VIRTIO_IOMMU_S_RANGE)
    );
    // A domain without a table; no domain.
    assert_eq!(
        status(
            &mut d,
            InvalidateReq::new(VIRTIO_IOMMU_INV_G_DOMAIN, iotlb, 5)
        ),
        Some(VIRTIO_IOMMU_S_INVAL)
    );
    assert_eq!(
        status(
            &mut d,
            InvalidateReq::new(VIRTIO_IOMMU_INV_G_DOMAIN, iotlb, 77)
        ),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
    assert!(
        d.dev.take_changes().is_empty(),
        "a refused request changed something"
    );
}

#[test]
fn probe_reports_table_properties_only_when_attach_table_was_negotiated() {
    for (features, extended) in [((1 << 7) - 1, false), (TABLE_FEATURES, true)] {
        let mut dev = Viommu::new(DeviceConfig::default());
        dev.set_acked_features(features);
        let req = ProbeReq::new(EP);
        let mut buf = vec![0u8; 516];
        dev.handle_request(req.as_slice(), 516).write_into(&mut buf);
        let mut types = Vec::new();
        let mut at = 0;
        while at + 4 <= 512 {
            let t = u16::from_le_bytes([buf[at], buf[at + 1]]);
            let len = u16::from_le_bytes([buf[at + 2], buf[at + 3]]) as usize;
            if t == 0 {
                break;
            }
            types.push(t);
            at += 4 + len;
        }
        let base =
            [VIRTIO_IOMMU_PROBE_T_RESV_MEM].repeat(usize::from(cfg!(target_arch = "x86_64")));
        let mut want = base.clone();
        if extended {
            want.extend([
                VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE,
                VIRTIO_IOMMU_PROBE_T_PASID_SIZE,
                VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT,
                VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT,
            ]);
        }
        assert_eq!(types, want, "features {features:#x}");
    }
    let (cap, ecap) = DeviceConfig::default().vtd_cap_ecap();
    assert_eq!((cap >> 16) & 0x3f, 47, "MGAW is the output width - 1");
    assert_ne!(cap & 1 << 60, 0, "5-level first stage");
    assert_ne!(ecap & 1 << 47, 0, "first-stage translation");
    assert_eq!((ecap >> 35) & 0x1f, 19, "PSS is the PASID width - 1");
}

// ---- SMMUv3 CD tables ----

const VALID: u64 = 1 << 0;
const TABLE: u64 = 1 << 1;
const AF: u64 = 1 << 10;
const AP_EL0: u64 = 1 << 6;
const CD_V: u64 = 1 << 31;
const CD_AA64: u64 = 1 << 41;
const IPS_48: u64 = 5 << 32;

/// A linear CD table of 4 CDs; CD `ssid` maps the 4 KiB page of `va`
/// (T0SZ 16, 4 KiB granule) to a fresh frame.
fn smmu_space(ssids: &[u32], va: u64) -> (TestMem, u64, Vec<u64>) {
    let tm = TestMem::new(16 << 20);
    let cd_table = tm.alloc(4 * 64);
    let mut frames = Vec::new();
    for &ssid in ssids {
        let ttb0 = tm.alloc(0x1000);
        let mut table = ttb0;
        for level in 0..3 {
            let idx = (va >> (39 - 9 * level)) & 0x1ff;
            let next = tm.alloc(0x1000);
            tm.write(table + idx * 8, next | VALID | TABLE);
            table = next;
        }
        let frame = tm.alloc(0x1000);
        tm.write(
            table + ((va >> 12) & 0x1ff) * 8,
            frame | VALID | TABLE | AF | AP_EL0,
        );
        let cd = cd_table + u64::from(ssid) * 64;
        tm.write(cd, 16 | CD_V | CD_AA64 | IPS_48);
        tm.write(cd + 8, ttb0);
        frames.push(frame);
    }
    (tm, cd_table, frames)
}

#[test]
fn a_cd_table_serves_every_pasid_of_the_endpoint_through_its_cds() {
    let va = 0x4000_1000;
    let (tm, cd_table, frames) = smmu_space(&[0, 1, 3], va);
    let mut d = dev();
    let mut req = AttachTableSmmuReq::new(200, EP, 0, 2, cd_table);
    req.s1dss = 2;
    assert_eq!(d.status(req.as_slice()), Some(0));
    assert_eq!(d.dev.endpoint_domain(EP), Some(200));
    for (ssid, frame) in [(1, frames[1]), (3, frames[2]), (0, frames[0])] {
        let t = d
            .dev
            .translate_table(&tm.mem, EP, ssid, va, PageAccess::READ)
            .unwrap();
        assert_eq!((t.domain, t.page.gpa), (200, frame), "ssid {ssid}");
    }
    // SSID 2 has no valid CD.
    assert!(d
        .dev
        .translate_table(&tm.mem, EP, 2, va, PageAccess::READ)
        .is_err());
}

#[test]
fn s1dss_decides_what_dma_without_pasid_does() {
    let va = 0x4000_1000;
    let (tm, cd_table, _) = smmu_space(&[1], va);
    for (s1dss, want) in [(S1DSS_TERMINATE, None), (S1DSS_BYPASS, Some(va))] {
        let mut d = dev();
        let mut req = AttachTableSmmuReq::new(200, EP, 0, 2, cd_table);
        req.s1dss = s1dss;
        assert_eq!(d.status(req.as_slice()), Some(0));
        let got = d
            .dev
            .translate_table(&tm.mem, EP, 0, va, PageAccess::WRITE)
            .ok()
            .map(|t| t.page.gpa_of(va));
        assert_eq!(got, want, "s1dss {s1dss}");
    }
    let mut d = dev();
    let mut req = AttachTableSmmuReq::new(200, EP, 0, 2, cd_table);
    req.s1dss = 3;
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_INVAL));
    let req = AttachTableSmmuReq::new(200, EP, 0, 2, cd_table + 8);
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_RANGE));
    let req = AttachTableSmmuReq::new(200, EP, 3, 2, cd_table);
    assert_eq!(d.status(req.as_slice()), Some(VIRTIO_IOMMU_S_INVAL));
}
