// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The rules of page requests on the device (docs/extension-spec.md,
//! "Page requests"), one test per rule, driven through `Viommu` with the
//! bytes a driver sends: groups raised on bound tables, PAGE_RESP, and the
//! automatic answers DETACH, DETACH_TABLE, PASID_FREE, an ATTACH
//! elsewhere and reset give. Then a property test of the invariant on the
//! whole device: every raised group is answered exactly once, and never
//! after its PASID became reusable.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use vm_memory::ByteValued;

use crate::{
    config::DeviceConfig,
    device::{Response, Viommu},
    prq::{
        Answer, AutoCause, Cause, Delivery, GroupKey, Limits, PageAccess, PageRequest, PasidRefs,
        ResponseCode, SourceId,
    },
    wire::*,
};

const EP: u32 = 8;
const EP2: u32 = 9;
const PR_FEATURES: u64 = ((1 << 7) - 1)
    | (1 << VIRTIO_IOMMU_F_ATTACH_TABLE)
    | (1 << VIRTIO_IOMMU_F_PAGE_REQUEST)
    | (1 << VIRTIO_IOMMU_F_PASID_ALLOC);
const PGD: u64 = 0x10_0000;

/// The host allocator as the daemon's global mode uses it: the VM owns
/// some PASIDs; bindings and groups take references; a PASID freed while
/// referenced stays inactive (no new references) and is reused, in a new
/// generation, only when its last reference goes.
#[derive(Default)]
struct Host {
    owned: BTreeMap<u32, Life>,
}

#[derive(Default, Debug)]
struct Life {
    generation: u64,
    refs: u32,
    active: bool,
}

impl Host {
    fn with(pasids: &[u32]) -> Host {
        let mut h = Host::default();
        for &p in pasids {
            h.owned.insert(
                p,
                Life {
                    active: true,
                    ..Default::default()
                },
            );
        }
        h
    }

    /// PASID_FREE, then the guest's PASID_ALLOC of the same number as soon
    /// as the host may hand it out again.
    fn free(&mut self, pasid: u32) {
        if let Some(l) = self.owned.get_mut(&pasid) {
            l.active = false;
            self.reuse_if_idle(pasid);
        }
    }

    fn reuse_if_idle(&mut self, pasid: u32) {
        let l = self.owned.get_mut(&pasid).expect("owned");
        if !l.active && l.refs == 0 {
            l.generation += 1;
            l.active = true;
        }
    }

    fn generation(&self, pasid: u32) -> u64 {
        self.owned.get(&pasid).map_or(0, |l| l.generation)
    }

    fn refs(&self, pasid: u32) -> u32 {
        self.owned.get(&pasid).map_or(0, |l| l.refs)
    }
}

impl PasidRefs for Host {
    fn take(&mut self, _endpoint: u32, pasid: u32) -> Option<u64> {
        let l = self.owned.get_mut(&pasid).filter(|l| l.active)?;
        l.refs += 1;
        Some(l.generation)
    }

    fn release(&mut self, _endpoint: u32, pasid: u32, generation: u64) {
        let l = self.owned.get_mut(&pasid).expect("owned");
        assert_eq!(l.generation, generation, "released after reuse");
        l.refs = l.refs.checked_sub(1).expect("released twice");
        self.reuse_if_idle(pasid);
    }
}

struct Dev {
    dev: Viommu,
    host: Host,
    now: Duration,
}

impl Dev {
    fn new(limits: Limits, features: u64) -> Dev {
        let mut dev = Viommu::new(DeviceConfig {
            page_requests: Some(limits),
            pasid_alloc: true,
            ..Default::default()
        });
        dev.set_acked_features(features);
        Dev {
            dev,
            host: Host::with(&[1, 2]),
            now: Duration::ZERO,
        }
    }

    /// Sends a request; PASID_FREE runs on the test's host allocator as
    /// the daemon runs it on its own.
    fn send(&mut self, request: &[u8]) -> Option<u8> {
        let response = self.dev.handle_request_with(request, 4, &mut self.host);
        if let Response::Pasid(op) = response {
            if let crate::device::PasidOp::Free { pasid } = op {
                self.host.free(pasid);
            }
            return self.dev.complete_pasid(op, Ok(0)).status();
        }
        response.status()
    }

    fn bind(&mut self, domain: u32, endpoint: u32, pasid: u32) -> Option<u8> {
        let req = AttachTableVtdReq::new(domain, endpoint, pasid, PGD, 48);
        self.send(req.as_slice())
    }

    fn request(&self, source: u32, token: u64, key: GroupKey, last: bool) -> PageRequest {
        PageRequest {
            source: SourceId(source),
            token,
            key,
            address: 0x7f00_0000_1000,
            access: PageAccess {
                read: true,
                write: true,
                ..Default::default()
            },
            last,
            private_data: None,
        }
    }

    fn raise(&mut self, source: u32, token: u64, key: GroupKey, last: bool) -> Option<Delivery> {
        let r = self.request(source, token, key, last);
        self.dev.raise_page_request(r, self.now, &mut self.host)
    }

    /// Raises a one-request group and delivers it.
    fn raise_delivered(&mut self, token: u64, key: GroupKey) {
        let d = self.raise(1, token, key, true).expect("raised");
        self.dev.page_request_delivered(d, None);
    }

    fn page_resp(&mut self, key: GroupKey, code: u16) -> Option<u8> {
        let req = PageRespReq::new(key.endpoint, key.pasid, key.group_id, code);
        self.send(readable_part(&req))
    }

    /// The answers decided so far, finished as the daemon does once sent.
    fn answers(&mut self) -> Vec<(u64, GroupKey, Cause)> {
        let answers = self.dev.take_answers();
        answers
            .into_iter()
            .map(|a: Answer| {
                let out = (a.token, a.key, a.cause);
                a.finish(&mut self.host);
                out
            })
            .collect()
    }
}

fn dev() -> Dev {
    Dev::new(Limits::default(), PR_FEATURES)
}

fn key(endpoint: u32, pasid: Option<u32>, group_id: u16) -> GroupKey {
    GroupKey {
        endpoint,
        pasid,
        group_id,
    }
}

#[test]
fn page_requests_are_offered_only_with_tables_and_only_when_configured() {
    let d = dev();
    assert_ne!(
        d.dev.device_features() & (1 << VIRTIO_IOMMU_F_PAGE_REQUEST),
        0
    );
    let no_tables = Viommu::new(DeviceConfig {
        table_formats: crate::config::TableFormats::default(),
        ..Default::default()
    });
    assert_eq!(
        no_tables.device_features() & (1 << VIRTIO_IOMMU_F_PAGE_REQUEST),
        0
    );
    let off = Viommu::new(DeviceConfig {
        page_requests: None,
        ..Default::default()
    });
    assert_eq!(
        off.device_features() & (1 << VIRTIO_IOMMU_F_PAGE_REQUEST),
        0
    );
}

#[test]
fn page_resp_without_the_negotiated_feature_is_an_unknown_request() {
    let mut d = Dev::new(
        Limits::default(),
        PR_FEATURES & !(1 << VIRTIO_IOMMU_F_PAGE_REQUEST),
    );
    let req = PageRespReq::new(EP, Some(1), 0, 0);
    let r = d
        .dev
        .handle_request_with(readable_part(&req), 4, &mut d.host);
    assert!(matches!(r, Response::Drop(_)), "{r:?}");
}

#[test]
fn a_request_without_the_negotiated_feature_is_answered_invalid_at_once() {
    let mut d = Dev::new(
        Limits::default(),
        PR_FEATURES & !(1 << VIRTIO_IOMMU_F_PAGE_REQUEST),
    );
    assert_eq!(d.bind(100, EP, 1), Some(VIRTIO_IOMMU_S_OK));
    assert!(d.raise(1, 7, key(EP, Some(1), 0), true).is_none());
    assert_eq!(
        d.answers(),
        [(
            7,
            key(EP, Some(1), 0),
            Cause::Auto(AutoCause::NotNegotiated)
        )]
    );
}

#[test]
fn a_group_is_delivered_and_the_guests_page_resp_answers_its_source_once() {
    let mut d = dev();
    assert_eq!(d.bind(100, EP, 1), Some(VIRTIO_IOMMU_S_OK));
    let k = key(EP, Some(1), 5);
    // Two requests, the second LAST: one group, one answer.
    assert!(d.raise(1, 42, k, false).is_none());
    let delivery = d.raise(1, 42, k, true).expect("a complete group");
    let records: Vec<FaultRecordExt> = delivery.records().collect();
    assert_eq!(records.len(), 2);
    let flags = records[1].flags.to_native();
    for bit in [
        VIRTIO_IOMMU_FAULT_F_PAGE_REQ,
        VIRTIO_IOMMU_FAULT_F_LAST,
        VIRTIO_IOMMU_FAULT_F_PASID,
        VIRTIO_IOMMU_FAULT_F_GROUP_ID,
        VIRTIO_IOMMU_FAULT_F_ADDRESS,
    ] {
        assert_ne!(flags & bit, 0, "{bit:#x}");
    }
    assert_eq!(records[0].flags.to_native() & VIRTIO_IOMMU_FAULT_F_LAST, 0);
    assert_eq!(records[1].group_id.to_native(), 5);
    d.dev.page_request_delivered(delivery, None);
    assert_eq!(d.host.refs(1), 2, "the binding's and the group's");
    assert_eq!(
        d.page_resp(k, VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        Some(VIRTIO_IOMMU_S_OK)
    );
    assert_eq!(d.answers(), [(42, k, Cause::Guest(ResponseCode::Success))]);
    assert_eq!(
        d.host.refs(1),
        1,
        "the group's reference went with its answer"
    );
    // Answered: a second PAGE_RESP names nothing.
    assert_eq!(
        d.page_resp(k, VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
    assert!(d.answers().is_empty());
}

#[test]
fn page_resp_must_name_the_group_with_its_pasid() {
    let mut d = dev();
    d.bind(100, EP, 1);
    let k = key(EP, Some(1), 3);
    d.raise_delivered(1, k);
    assert_eq!(
        d.page_resp(key(EP, None, 3), VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
    assert_eq!(
        d.page_resp(key(EP, Some(2), 3), VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
    assert_eq!(
        d.page_resp(k, VIRTIO_IOMMU_PAGE_RESP_INVALID),
        Some(VIRTIO_IOMMU_S_OK)
    );
    assert_eq!(d.answers(), [(1, k, Cause::Guest(ResponseCode::Invalid))]);
}

#[test]
fn malformed_page_resp_is_inval_and_answers_nothing() {
    let mut d = dev();
    d.bind(100, EP, 1);
    let k = key(EP, Some(1), 0);
    d.raise_delivered(1, k);
    let good = PageRespReq::new(EP, Some(1), 0, 0);
    let mut flags = good;
    flags.flags = (VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID | 2).into();
    let mut reserved = good;
    reserved.reserved[3] = 1;
    let mut pasid_without_valid = PageRespReq::new(EP, None, 0, 0);
    pasid_without_valid.pasid = 1.into();
    let code = PageRespReq::new(EP, Some(1), 0, 3);
    for bad in [flags, reserved, pasid_without_valid, code] {
        assert_eq!(
            d.send(readable_part(&bad)),
            Some(VIRTIO_IOMMU_S_INVAL),
            "{bad:?}"
        );
    }
    assert!(d.answers().is_empty());
    assert_eq!(d.send(readable_part(&good)), Some(VIRTIO_IOMMU_S_OK));
}

#[test]
fn a_request_for_a_pasid_without_a_binding_is_answered_invalid_at_once() {
    let mut d = dev();
    assert!(d.raise(1, 9, key(EP, Some(1), 0), true).is_none());
    // PASID-less DMA of an endpoint without a table domain: nothing the
    // guest could fix either.
    assert!(d.raise(1, 10, key(EP, None, 0), true).is_none());
    assert_eq!(
        d.answers(),
        [
            (9, key(EP, Some(1), 0), Cause::Auto(AutoCause::Refused)),
            (10, key(EP, None, 0), Cause::Auto(AutoCause::Refused)),
        ]
    );
    assert_eq!(d.dev.page_requests().counters().auto(AutoCause::Refused), 2);
}

#[test]
fn an_undeliverable_group_is_answered_invalid_with_its_cause() {
    let mut d = dev();
    d.bind(100, EP, 1);
    let k = key(EP, Some(1), 0);
    let delivery = d.raise(1, 3, k, true).unwrap();
    d.dev
        .page_request_delivered(delivery, Some(AutoCause::BufferTooSmall));
    assert_eq!(
        d.answers(),
        [(3, k, Cause::Auto(AutoCause::BufferTooSmall))]
    );
    assert_eq!(d.host.refs(1), 1);
}

#[test]
fn detach_table_answers_the_pasids_groups_before_it_completes() {
    let mut d = dev();
    d.bind(100, EP, 1);
    d.bind(100, EP, 2);
    d.raise_delivered(1, key(EP, Some(1), 0));
    d.raise_delivered(2, key(EP, Some(2), 0));
    let req = DetachTableReq::new(100, EP, 1);
    assert_eq!(d.send(readable_part(&req)), Some(VIRTIO_IOMMU_S_OK));
    assert_eq!(
        d.answers(),
        [(1, key(EP, Some(1), 0), Cause::Auto(AutoCause::Unbound))]
    );
    assert_eq!(d.host.refs(1), 0, "no binding, no group: reusable");
    assert_eq!(
        d.page_resp(key(EP, Some(1), 0), 0),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
    // The other PASID's group is untouched.
    assert_eq!(d.page_resp(key(EP, Some(2), 0), 0), Some(VIRTIO_IOMMU_S_OK));
}

#[test]
fn detach_answers_every_group_of_the_endpoint() {
    let mut d = dev();
    let attach = AttachReq::new(1, EP, 0);
    assert_eq!(d.send(readable_part(&attach)), Some(VIRTIO_IOMMU_S_OK));
    d.bind(100, EP, 1);
    d.bind(100, EP2, 1);
    d.raise_delivered(1, key(EP, Some(1), 0));
    d.raise_delivered(2, key(EP2, Some(1), 0));
    let detach = DetachReq::new(1, EP);
    assert_eq!(d.send(readable_part(&detach)), Some(VIRTIO_IOMMU_S_OK));
    assert_eq!(
        d.answers(),
        [(1, key(EP, Some(1), 0), Cause::Auto(AutoCause::Detached))]
    );
}

#[test]
fn attaching_elsewhere_answers_only_the_groups_without_pasid() {
    let mut d = dev();
    // The endpoint's DMA without PASID goes through table domain 100.
    assert_eq!(d.bind(100, EP, 0), Some(VIRTIO_IOMMU_S_OK));
    d.bind(101, EP, 1);
    d.raise_delivered(1, key(EP, None, 0));
    d.raise_delivered(2, key(EP, Some(1), 0));
    let attach = AttachReq::new(1, EP, 0);
    assert_eq!(d.send(readable_part(&attach)), Some(VIRTIO_IOMMU_S_OK));
    assert_eq!(
        d.answers(),
        [(1, key(EP, None, 0), Cause::Auto(AutoCause::Detached))]
    );
}

#[test]
fn pasid_free_answers_the_pasids_groups_and_the_pasid_is_reused_only_after() {
    let mut d = dev();
    d.bind(100, EP, 1);
    d.bind(100, EP2, 1);
    d.raise_delivered(1, key(EP, Some(1), 0));
    d.raise_delivered(2, key(EP2, Some(1), 0));
    let free = PasidFreeReq::new(1);
    assert_eq!(d.send(readable_part(&free)), Some(VIRTIO_IOMMU_S_OK));
    let answers = d.answers();
    assert_eq!(answers.len(), 2);
    assert!(answers
        .iter()
        .all(|a| a.2 == Cause::Auto(AutoCause::PasidFreed)));
    // The bindings still hold it (inactive): no new group may take it.
    assert_eq!(d.host.generation(1), 0);
    assert!(d.raise(1, 3, key(EP, Some(1), 1), true).is_none());
    assert_eq!(
        d.answers(),
        [(3, key(EP, Some(1), 1), Cause::Auto(AutoCause::Refused))]
    );
    for ep in [EP, EP2] {
        d.send(readable_part(&DetachTableReq::new(100, ep, 1)));
    }
    assert_eq!(d.host.generation(1), 1, "reused once nothing holds it");
}

#[test]
fn reset_answers_every_group() {
    let mut d = dev();
    d.bind(100, EP, 1);
    d.raise_delivered(1, key(EP, Some(1), 0));
    let partial = d.raise(1, 2, key(EP, Some(1), 1), false);
    assert!(partial.is_none());
    let mut host = std::mem::take(&mut d.host);
    d.dev.reset(&mut host);
    d.host = host;
    assert_eq!(
        d.answers(),
        [(1, key(EP, Some(1), 0), Cause::Auto(AutoCause::Reset))]
    );
    assert_eq!(d.host.refs(1), 0);
}

#[test]
fn a_group_the_guest_does_not_answer_in_time_is_answered_invalid() {
    let limits = Limits {
        response_timeout: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let mut d = Dev::new(limits, PR_FEATURES);
    d.bind(100, EP, 1);
    d.raise_delivered(1, key(EP, Some(1), 0));
    assert_eq!(
        d.dev.next_page_request_deadline(),
        Some(Duration::from_millis(100))
    );
    d.dev.expire_page_requests(Duration::from_millis(99));
    assert!(d.answers().is_empty());
    d.dev.expire_page_requests(Duration::from_millis(100));
    assert_eq!(
        d.answers(),
        [(1, key(EP, Some(1), 0), Cause::Auto(AutoCause::Timeout))]
    );
}

#[test]
fn a_lost_source_drops_its_groups_unanswered_and_gives_their_pasids_back() {
    let mut d = dev();
    d.bind(100, EP, 1);
    d.raise_delivered(1, key(EP, Some(1), 0));
    assert_eq!(d.host.refs(1), 2);
    let mut host = std::mem::take(&mut d.host);
    d.dev.page_request_source_gone(SourceId(1), &mut host);
    d.host = host;
    assert!(d.answers().is_empty());
    assert_eq!(d.host.refs(1), 1);
    assert_eq!(
        d.page_resp(key(EP, Some(1), 0), 0),
        Some(VIRTIO_IOMMU_S_NOENT)
    );
}

#[test]
fn the_endpoint_limit_on_outstanding_groups_answers_overflow() {
    let limits = Limits {
        groups_per_endpoint: 2,
        ..Default::default()
    };
    let mut d = Dev::new(limits, PR_FEATURES);
    d.bind(100, EP, 1);
    for g in 0..2 {
        d.raise_delivered(u64::from(g), key(EP, Some(1), g));
    }
    assert!(d.raise(1, 9, key(EP, Some(1), 2), true).is_none());
    assert_eq!(
        d.answers(),
        [(9, key(EP, Some(1), 2), Cause::Auto(AutoCause::Overflow))]
    );
}

#[test]
fn probe_reports_page_request_only_when_negotiated() {
    fn has_page_request(d: &mut Dev) -> bool {
        let req = ProbeReq::new(EP);
        let mut out = vec![0u8; 512 + 4];
        let r = d
            .dev
            .handle_request_with(req.as_slice(), out.len(), &mut d.host);
        assert_eq!(r.status(), Some(VIRTIO_IOMMU_S_OK));
        r.write_into(&mut out);
        let mut at = 0;
        while at + 4 <= 512 {
            let t = u16::from_le_bytes([out[at], out[at + 1]]);
            let len = u16::from_le_bytes([out[at + 2], out[at + 3]]) as usize;
            if t == VIRTIO_IOMMU_PROBE_T_PAGE_REQUEST {
                let flags = u32::from_le_bytes(out[at + 4..at + 8].try_into().unwrap());
                let max = u32::from_le_bytes(out[at + 8..at + 12].try_into().unwrap());
                assert_eq!(
                    flags,
                    VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_PRI
                        | VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_RESP_PASID
                );
                assert_eq!(max, Limits::default().groups_per_endpoint);
                return true;
            }
            if t == 0 {
                return false;
            }
            at += 4 + len;
        }
        false
    }
    assert!(has_page_request(&mut dev()));
    let mut without = Dev::new(
        Limits::default(),
        PR_FEATURES & !(1 << VIRTIO_IOMMU_F_PAGE_REQUEST),
    );
    assert!(!has_page_request(&mut without));
}

// The invariant, on the whole device.

const SMALL: Limits = Limits {
    groups_per_endpoint: 3,
    groups_total: 5,
    partial_groups: 2,
    requests_per_group: 2,
    partial_timeout: Duration::from_millis(5),
    response_timeout: Some(Duration::from_millis(20)),
};

#[derive(Debug, Clone)]
enum Op {
    Bind {
        endpoint: u32,
        pasid: u32,
    },
    Raise {
        source: u32,
        key: GroupKey,
        last: bool,
    },
    Deliver {
        index: usize,
        ok: bool,
    },
    PageResp {
        key: GroupKey,
        code: u16,
    },
    RespondInFlight {
        index: usize,
    },
    DetachTable {
        endpoint: u32,
        pasid: u32,
    },
    Attach {
        endpoint: u32,
        domain: u32,
    },
    Detach {
        endpoint: u32,
    },
    PasidFree(u32),
    Reset,
    FrontendLost,
    SourceGone(u32),
    Tick(u64),
}

fn any_key() -> impl Strategy<Value = GroupKey> {
    (EP..=EP2, prop::option::weighted(0.8, 1u32..=2), 0u16..2).prop_map(
        |(endpoint, pasid, group_id)| GroupKey {
            endpoint,
            pasid,
            group_id,
        },
    )
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (EP..=EP2, 0u32..=2).prop_map(|(endpoint, pasid)| Op::Bind { endpoint, pasid }),
        12 => (0u32..2, any_key(), prop::bool::weighted(0.7))
            .prop_map(|(source, key, last)| Op::Raise { source, key, last }),
        6 => (any::<usize>(), prop::bool::weighted(0.85))
            .prop_map(|(index, ok)| Op::Deliver { index, ok }),
        2 => (any_key(), 0u16..4).prop_map(|(key, code)| Op::PageResp { key, code }),
        4 => any::<usize>().prop_map(|index| Op::RespondInFlight { index }),
        1 => (EP..=EP2, 1u32..=2).prop_map(|(endpoint, pasid)| Op::DetachTable { endpoint, pasid }),
        1 => (EP..=EP2, 1u32..=2).prop_map(|(endpoint, domain)| Op::Attach { endpoint, domain }),
        1 => (EP..=EP2).prop_map(|endpoint| Op::Detach { endpoint }),
        1 => (1u32..=2).prop_map(Op::PasidFree),
        1 => Just(Op::Reset),
        1 => Just(Op::FrontendLost),
        1 => (0u32..2).prop_map(Op::SourceGone),
        3 => (0u64..12).prop_map(Op::Tick),
    ]
}

/// A raised group: who raised it, and the generation of its PASID then.
#[derive(Debug, Clone, Copy)]
struct Open {
    source: u32,
    key: GroupKey,
    generation: Option<u64>,
}

struct World {
    d: Dev,
    next_token: u64,
    /// Token of each (source, key)'s partial group.
    partial: HashMap<(u32, GroupKey), u64>,
    /// Raised groups by token, waiting for their one answer.
    open: HashMap<u64, Open>,
    answered: u64,
    raised: u64,
    /// Deliveries not yet reported, with their tokens.
    pending: Vec<(u64, Delivery)>,
}

impl World {
    fn new() -> World {
        World {
            d: Dev::new(SMALL, PR_FEATURES),
            next_token: 0,
            partial: HashMap::new(),
            open: HashMap::new(),
            answered: 0,
            raised: 0,
            pending: Vec::new(),
        }
    }

    /// Checks the answers the device decided: each closes one open group
    /// (or a group answered at once), in the PASID generation it was
    /// raised in, and is finished (its reference given back).
    fn settle(&mut self, at_once: Option<(u64, Open)>) {
        let answers = self.d.dev.take_answers();
        for a in answers {
            let open = match at_once {
                Some((token, o)) if token == a.token => o,
                _ => self
                    .open
                    .remove(&a.token)
                    .unwrap_or_else(|| panic!("answer to {} which is not in flight", a.token)),
            };
            assert_eq!((SourceId(open.source), open.key), (a.source, a.key));
            if let (Some(g), Some(p)) = (open.generation, open.key.pasid) {
                assert_eq!(g, self.d.host.generation(p), "answered after reuse");
            }
            self.answered += 1;
            a.finish(&mut self.d.host);
        }
    }

    fn apply(&mut self, op: Op) {
        let mut at_once = None;
        match op {
            Op::Bind { endpoint, pasid } => {
                self.d.bind(100 + pasid, endpoint, pasid);
            }
            Op::Raise { source, key, last } => {
                let next = &mut self.next_token;
                let token = *self.partial.entry((source, key)).or_insert_with(|| {
                    *next += 1;
                    *next
                });
                if last {
                    self.partial.remove(&(source, key));
                }
                let generation = key.pasid.map(|p| self.d.host.generation(p));
                let open = Open {
                    source,
                    key,
                    generation,
                };
                let delivery = self.d.raise(source, token, key, last);
                if last {
                    self.raised += 1;
                }
                match delivery {
                    Some(d) => {
                        assert!(last);
                        assert!(self.open.insert(token, open).is_none(), "raised twice");
                        self.pending.push((token, d));
                    }
                    None if last => at_once = Some((token, open)),
                    None => {}
                }
            }
            Op::Deliver { index, ok } => {
                if !self.pending.is_empty() {
                    let (_, d) = self.pending.swap_remove(index % self.pending.len());
                    let failed = (!ok).then_some(AutoCause::NoBuffer);
                    self.d.dev.page_request_delivered(d, failed);
                }
            }
            Op::PageResp { key, code } => {
                let in_flight = self.open.values().any(|o| o.key == key);
                let status = self.d.page_resp(key, code);
                if code <= 2 {
                    let expect = if in_flight {
                        VIRTIO_IOMMU_S_OK
                    } else {
                        VIRTIO_IOMMU_S_NOENT
                    };
                    assert_eq!(status, Some(expect));
                } else {
                    assert_eq!(status, Some(VIRTIO_IOMMU_S_INVAL));
                }
            }
            Op::RespondInFlight { index } => {
                let mut keys: Vec<GroupKey> = self.open.values().map(|o| o.key).collect();
                if !keys.is_empty() {
                    keys.sort();
                    let status = self.d.page_resp(keys[index % keys.len()], 0);
                    assert_eq!(status, Some(VIRTIO_IOMMU_S_OK));
                }
            }
            Op::DetachTable { endpoint, pasid } => {
                let req = DetachTableReq::new(100 + pasid, endpoint, pasid);
                if self.d.send(readable_part(&req)) == Some(VIRTIO_IOMMU_S_OK) {
                    self.settle(None);
                    let left = self
                        .open
                        .values()
                        .any(|o| o.key.endpoint == endpoint && o.key.pasid == Some(pasid));
                    assert!(!left, "DETACH_TABLE completed with groups in flight");
                }
            }
            Op::Attach { endpoint, domain } => {
                self.d
                    .send(readable_part(&AttachReq::new(domain, endpoint, 0)));
            }
            Op::Detach { endpoint } => {
                if let Some(domain) = self.d.dev.endpoint_domain(endpoint) {
                    let req = DetachReq::new(domain, endpoint);
                    assert_eq!(self.d.send(readable_part(&req)), Some(VIRTIO_IOMMU_S_OK));
                    self.settle(None);
                    assert!(self.open.values().all(|o| o.key.endpoint != endpoint));
                }
            }
            Op::PasidFree(pasid) => {
                self.d.send(readable_part(&PasidFreeReq::new(pasid)));
                self.settle(None);
                assert!(self.open.values().all(|o| o.key.pasid != Some(pasid)));
            }
            Op::Reset => {
                let mut host = std::mem::take(&mut self.d.host);
                self.d.dev.reset(&mut host);
                self.d.host = host;
                self.d.dev.set_acked_features(PR_FEATURES);
                self.settle(None);
                assert!(self.open.is_empty());
                self.partial.clear();
            }
            Op::FrontendLost => {
                self.d.dev.cancel_page_requests(AutoCause::FrontendLost);
                self.settle(None);
                assert!(self.open.is_empty());
                self.partial.clear();
            }
            Op::SourceGone(source) => {
                let mut host = std::mem::take(&mut self.d.host);
                self.d
                    .dev
                    .page_request_source_gone(SourceId(source), &mut host);
                self.d.host = host;
                let gone: Vec<u64> = self
                    .open
                    .iter()
                    .filter(|(_, o)| o.source == source)
                    .map(|(&t, _)| t)
                    .collect();
                for t in gone {
                    self.open.remove(&t);
                    self.answered += 1;
                }
                self.partial.retain(|(s, _), _| *s != source);
            }
            Op::Tick(ms) => {
                self.d.now += Duration::from_millis(ms);
                self.d.dev.expire_page_requests(self.d.now);
            }
        }
        self.settle(at_once);
    }

    /// After every step: each PASID's references are its bindings' and
    /// its groups' in flight, and the device holds exactly the groups the
    /// test thinks are in flight.
    fn check(&self) {
        for pasid in 1..=2 {
            let bindings = self
                .d
                .dev
                .bindings()
                .filter(|((_, p), _)| *p == pasid)
                .count();
            let groups = self
                .open
                .values()
                .filter(|o| o.key.pasid == Some(pasid))
                .count();
            assert_eq!(
                self.d.host.refs(pasid) as usize,
                bindings + groups,
                "PASID {pasid}"
            );
        }
        assert_eq!(self.d.dev.page_requests().in_flight(), self.open.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Each raised group is answered exactly once, and never after its
    /// PASID became reusable, whatever the driver and the sources do.
    #[test]
    fn every_raised_group_is_answered_exactly_once_by_the_device(
        ops in prop::collection::vec(any_op(), 1..100)
    ) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
            w.check();
        }
        w.apply(Op::Reset);
        w.check();
        prop_assert_eq!(w.answered, w.raised);
    }
}
