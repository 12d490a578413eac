// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The rules of page-request groups, one test per rule.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::*;
use crate::wire::*;

const A: SourceId = SourceId(1);
const B: SourceId = SourceId(2);

/// A PASID allocator that knows which (endpoint, PASID) pairs are bound
/// and counts the references groups hold.
#[derive(Default)]
struct Refs {
    unbound: HashSet<(u32, u32)>,
    held: HashMap<(u32, u32), u32>,
}

impl Refs {
    fn held(&self, endpoint: u32, pasid: u32) -> u32 {
        self.held.get(&(endpoint, pasid)).copied().unwrap_or(0)
    }
}

impl PasidRefs for Refs {
    fn take(&mut self, endpoint: u32, pasid: u32) -> Option<u64> {
        if self.unbound.contains(&(endpoint, pasid)) {
            return None;
        }
        *self.held.entry((endpoint, pasid)).or_default() += 1;
        Some(u64::from(pasid) + 1000)
    }

    fn release(&mut self, endpoint: u32, pasid: u32, handle: u64) {
        assert_eq!(handle, u64::from(pasid) + 1000, "handle comes back");
        let n = self.held.get_mut(&(endpoint, pasid)).expect("taken before");
        *n = n.checked_sub(1).expect("released once");
    }
}

fn key(endpoint: u32, pasid: Option<u32>, group_id: u16) -> GroupKey {
    GroupKey {
        endpoint,
        pasid,
        group_id,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn request(source: SourceId, token: u64, key: GroupKey, address: u64, last: bool) -> PageRequest {
    PageRequest {
        source,
        token,
        key,
        address,
        access: PageAccess {
            read: true,
            ..Default::default()
        },
        last,
        private_data: None,
    }
}

fn queue(limits: Limits) -> PageRequests {
    PageRequests::new(limits)
}

/// Raises a group of `n` requests and returns its delivery.
fn raise_group(
    q: &mut PageRequests,
    refs: &mut Refs,
    source: SourceId,
    token: u64,
    key: GroupKey,
    n: u64,
) -> Delivery {
    for i in 1..n {
        let r = request(source, token, key, i << 12, false);
        assert_eq!(q.raise(r, ms(0), refs), Raised::Pending);
    }
    match q.raise(request(source, token, key, n << 12, true), ms(0), refs) {
        Raised::Deliver(d) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Raises and delivers a one-request group.
fn in_flight(q: &mut PageRequests, refs: &mut Refs, source: SourceId, token: u64, k: GroupKey) {
    let d = raise_group(q, refs, source, token, k, 1);
    assert!(q.delivered(d));
}

fn answered_now(raised: Raised) -> Answer {
    match raised {
        Raised::Answer(a) => a,
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// Sends (finishes) answers and returns what each source would get.
fn send(answers: Vec<Answer>, refs: &mut Refs) -> Vec<(SourceId, u64, GroupKey, Cause)> {
    answers
        .into_iter()
        .map(|a| {
            let sent = (a.source, a.token, a.key, a.cause);
            a.finish(refs);
            sent
        })
        .collect()
}

#[test]
fn partial_group_then_last_delivers_all_records_in_order() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(3, Some(5), 7);
    for address in [0x1000, 0x2000] {
        let raised = q.raise(request(A, 1, k, address, false), ms(0), &mut refs);
        assert_eq!(raised, Raised::Pending);
    }
    let Raised::Deliver(d) = q.raise(request(A, 1, k, 0x3abc, true), ms(0), &mut refs) else {
        panic!("LAST raises the group");
    };
    assert_eq!(d.key(), k);
    assert_eq!(d.buffers_needed(), 3);
    let records: Vec<FaultRecordExt> = d.records().collect();
    let addresses: Vec<u64> = records.iter().map(|r| r.address.to_native()).collect();
    // Page addresses: PRI does not carry the offset.
    assert_eq!(addresses, [0x1000, 0x2000, 0x3000]);
    let always = VIRTIO_IOMMU_FAULT_F_PAGE_REQ
        | VIRTIO_IOMMU_FAULT_F_ADDRESS
        | VIRTIO_IOMMU_FAULT_F_GROUP_ID
        | VIRTIO_IOMMU_FAULT_F_PASID
        | VIRTIO_IOMMU_FAULT_F_READ;
    for (i, r) in records.iter().enumerate() {
        let last = if i == 2 { VIRTIO_IOMMU_FAULT_F_LAST } else { 0 };
        assert_eq!(r.flags.to_native(), always | last, "record {i}");
        assert_eq!(r.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(r.endpoint.to_native(), 3);
        assert_eq!(r.pasid.to_native(), 5);
        assert_eq!(r.group_id.to_native(), 7);
    }
    assert!(q.delivered(d));
    assert_eq!(q.counters().raised, 1);
    assert_eq!(q.counters().delivered, 1);
}

#[test]
fn records_carry_access_private_data_and_no_pasid_flag_without_pasid() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let mut r = request(A, 1, key(3, None, 2), 0x5000, true);
    r.access = PageAccess::from_bits(
        VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_EXEC | VIRTIO_IOMMU_FAULT_F_PRIVILEGED,
    );
    r.private_data = Some([0x11, 0x22]);
    let Raised::Deliver(d) = q.raise(r, ms(0), &mut refs) else {
        panic!("raised");
    };
    let record = d.records().next().expect("one record");
    assert_eq!(
        record.flags.to_native(),
        VIRTIO_IOMMU_FAULT_F_PAGE_REQ
            | VIRTIO_IOMMU_FAULT_F_ADDRESS
            | VIRTIO_IOMMU_FAULT_F_GROUP_ID
            | VIRTIO_IOMMU_FAULT_F_LAST
            | VIRTIO_IOMMU_FAULT_F_PRIV_DATA
            | VIRTIO_IOMMU_FAULT_F_WRITE
            | VIRTIO_IOMMU_FAULT_F_EXEC
            | VIRTIO_IOMMU_FAULT_F_PRIVILEGED
    );
    assert_eq!(record.pasid.to_native(), 0);
    assert_eq!(record.private_data0.to_native(), 0x11);
    assert_eq!(record.private_data1.to_native(), 0x22);
}

#[test]
fn response_routes_to_the_raising_source_with_its_token() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let (k1, k2) = (key(1, Some(5), 0), key(2, Some(5), 0));
    in_flight(&mut q, &mut refs, A, 7, k1);
    in_flight(&mut q, &mut refs, B, 9, k2);
    let a = q.respond(k2, ResponseCode::Success).expect("in flight");
    assert_eq!((a.source, a.token, a.key), (B, 9, k2));
    assert_eq!(a.code(), ResponseCode::Success);
    assert_eq!(a.cause, Cause::Guest(ResponseCode::Success));
    a.finish(&mut refs);
    let a = q.respond(k1, ResponseCode::Failure).expect("in flight");
    assert_eq!((a.source, a.token, a.code()), (A, 7, ResponseCode::Failure));
    a.finish(&mut refs);
}

#[test]
fn unknown_group_response_is_no_such_group() {
    let mut q = queue(Limits::default());
    let k = key(1, Some(5), 3);
    let err = q.respond(k, ResponseCode::Success).unwrap_err();
    assert_eq!(err, RequestError::NoSuchPageGroup(k));
    assert_eq!(err.status(), VIRTIO_IOMMU_S_NOENT);
    assert_eq!(q.counters().unknown_responses, 1);
}

#[test]
fn second_response_to_a_group_is_no_such_group() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, Some(5), 3);
    in_flight(&mut q, &mut refs, A, 1, k);
    q.respond(k, ResponseCode::Success)
        .expect("first")
        .finish(&mut refs);
    assert!(q.respond(k, ResponseCode::Success).is_err());
    assert_eq!(q.counters().guest(ResponseCode::Success), 1);
}

#[test]
fn response_names_the_group_with_its_pasid() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    in_flight(&mut q, &mut refs, A, 1, key(1, Some(5), 3));
    assert!(q.respond(key(1, None, 3), ResponseCode::Success).is_err());
    assert!(q
        .respond(key(1, Some(6), 3), ResponseCode::Success)
        .is_err());
    let a = q.respond(key(1, Some(5), 3), ResponseCode::Success);
    a.expect("same PASID").finish(&mut refs);
}

#[test]
fn guest_may_answer_a_group_before_its_delivery_is_reported() {
    // A daemon that serves the request and event queues from different
    // threads may see PAGE_RESP before it reports the delivery.
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, None, 0);
    let d = raise_group(&mut q, &mut refs, A, 1, k, 1);
    q.respond(k, ResponseCode::Success)
        .expect("raised")
        .finish(&mut refs);
    assert!(!q.delivered(d));
}

#[test]
fn stop_marker_is_consumed_without_answer() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, Some(5), 0);
    let mut marker = request(A, 1, k, 0, true);
    marker.access = PageAccess {
        exec: true,
        ..Default::default()
    };
    assert!(marker.is_stop_marker());
    assert_eq!(q.raise(marker, ms(0), &mut refs), Raised::StopMarker);
    assert_eq!(q.refuse(marker, AutoCause::Refused), Raised::StopMarker);
    assert_eq!(q.groups(ms(0)).count(), 0);
    assert_eq!(refs.held(1, 5), 0);
    assert_eq!(q.counters().stop_markers, 2);
    assert_eq!(q.counters().raised, 0);
}

#[test]
fn per_endpoint_limit_answers_invalid_with_cause_overflow() {
    let limits = Limits {
        groups_per_endpoint: 2,
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    in_flight(&mut q, &mut refs, A, 1, key(1, Some(5), 0));
    in_flight(&mut q, &mut refs, A, 2, key(1, Some(5), 1));
    let over = key(1, Some(5), 2);
    let a = answered_now(q.raise(request(A, 3, over, 0, true), ms(0), &mut refs));
    assert_eq!((a.token, a.key), (3, over));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Overflow));
    assert_eq!(a.code(), ResponseCode::Invalid);
    assert!(!a.holds_pasid());
    a.finish(&mut refs);
    assert_eq!(refs.held(1, 5), 2, "no reference for a refused group");
    assert_eq!(q.counters().auto(AutoCause::Overflow), 1);
    // Other endpoints have their own allowance.
    in_flight(&mut q, &mut refs, A, 4, key(2, Some(5), 0));
    // An answer makes room again.
    let k = key(1, Some(5), 0);
    q.respond(k, ResponseCode::Success)
        .expect("k")
        .finish(&mut refs);
    in_flight(&mut q, &mut refs, A, 5, over);
}

#[test]
fn partial_groups_count_against_the_endpoint_limit() {
    let limits = Limits {
        groups_per_endpoint: 1,
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    let partial = request(A, 1, key(1, None, 0), 0, false);
    assert_eq!(q.raise(partial, ms(0), &mut refs), Raised::Pending);
    let a = answered_now(q.raise(request(A, 2, key(1, None, 1), 0, true), ms(0), &mut refs));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Overflow));
    a.finish(&mut refs);
    // The partial group itself still completes.
    let last = request(A, 1, key(1, None, 0), 0x1000, true);
    let Raised::Deliver(d) = q.raise(last, ms(0), &mut refs) else {
        panic!("partial group completes");
    };
    assert_eq!(d.buffers_needed(), 2);
}

#[test]
fn total_limit_answers_invalid_with_cause_overflow() {
    let limits = Limits {
        groups_total: 2,
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    in_flight(&mut q, &mut refs, A, 1, key(1, None, 0));
    in_flight(&mut q, &mut refs, A, 2, key(2, None, 0));
    let a = answered_now(q.raise(request(A, 3, key(3, None, 0), 0, true), ms(0), &mut refs));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Overflow));
    a.finish(&mut refs);
}

#[test]
fn group_longer_than_the_request_limit_is_answered_invalid_at_its_last() {
    let limits = Limits {
        requests_per_group: 3,
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    let k = key(1, Some(5), 0);
    for i in 0..5 {
        let raised = q.raise(request(A, 1, k, i << 12, false), ms(0), &mut refs);
        assert_eq!(raised, Raised::Pending, "no answer before LAST");
    }
    let a = answered_now(q.raise(request(A, 1, k, 0, true), ms(0), &mut refs));
    assert_eq!((a.token, a.cause), (1, Cause::Auto(AutoCause::Overflow)));
    a.finish(&mut refs);
    assert_eq!(q.counters().requests_dropped, 5);
    assert_eq!(refs.held(1, 5), 0);
    // A group of exactly the limit is fine.
    let d = raise_group(&mut q, &mut refs, A, 2, k, 3);
    assert_eq!(d.buffers_needed(), 3);
}

#[test]
fn partial_table_full_drops_requests_and_last_raises_its_group_alone() {
    let limits = Limits {
        partial_groups: 1,
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    let first = request(A, 1, key(1, None, 0), 0, false);
    assert_eq!(q.raise(first, ms(0), &mut refs), Raised::Pending);
    let k = key(1, None, 1);
    assert_eq!(
        q.raise(request(A, 2, k, 0x1000, false), ms(0), &mut refs),
        Raised::Pending
    );
    assert_eq!(q.counters().requests_dropped, 1);
    let Raised::Deliver(d) = q.raise(request(A, 2, k, 0x2000, true), ms(0), &mut refs) else {
        panic!("LAST raises the group");
    };
    assert_eq!(d.buffers_needed(), 1);
}

#[test]
fn unanswered_group_times_out_invalid() {
    let limits = Limits {
        response_timeout: Some(ms(5000)),
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    let k = key(1, Some(5), 0);
    let Raised::Deliver(d) = q.raise(request(A, 1, k, 0, true), ms(1000), &mut refs) else {
        panic!("raised");
    };
    assert!(q.delivered(d));
    assert_eq!(q.next_deadline(), Some(ms(6000)));
    assert!(q.expire(ms(5999)).is_empty());
    let sent = send(q.expire(ms(6000)), &mut refs);
    assert_eq!(sent, [(A, 1, k, Cause::Auto(AutoCause::Timeout))]);
    assert_eq!(refs.held(1, 5), 0);
    assert_eq!(q.next_deadline(), None);
    assert!(q.respond(k, ResponseCode::Success).is_err());
}

#[test]
fn without_response_timeout_groups_wait_for_the_guest() {
    let limits = Limits {
        response_timeout: None,
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    in_flight(&mut q, &mut refs, A, 1, key(1, None, 0));
    assert_eq!(q.next_deadline(), None);
    assert!(q.expire(Duration::MAX).is_empty());
    assert_eq!(q.groups(ms(0)).count(), 1);
}

#[test]
fn partial_group_without_last_expires_unanswered() {
    let limits = Limits {
        partial_timeout: ms(100),
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    let k = key(1, None, 0);
    assert_eq!(
        q.raise(request(A, 1, k, 0x1000, false), ms(0), &mut refs),
        Raised::Pending
    );
    assert_eq!(q.next_deadline(), Some(ms(100)));
    assert!(q.expire(ms(100)).is_empty(), "nothing is owed before LAST");
    assert_eq!(q.counters().partials_discarded, 1);
    assert_eq!(q.groups(ms(100)).count(), 0);
    // A late LAST raises the group on its own: still one answer.
    let Raised::Deliver(d) = q.raise(request(A, 1, k, 0x2000, true), ms(200), &mut refs) else {
        panic!("LAST raises the group");
    };
    assert_eq!(d.buffers_needed(), 1);
}

#[test]
fn cancel_pasid_answers_only_that_pasids_groups() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let mine = [key(1, Some(5), 0), key(1, Some(5), 1)];
    let others = [key(1, Some(6), 0), key(2, Some(5), 0), key(1, None, 0)];
    for (token, &k) in (0..).zip(mine.iter().chain(&others)) {
        in_flight(&mut q, &mut refs, A, token, k);
    }
    let partial = request(A, 9, key(1, Some(5), 2), 0, false);
    assert_eq!(q.raise(partial, ms(0), &mut refs), Raised::Pending);

    let sent = send(q.cancel_pasid(1, 5, AutoCause::Unbound), &mut refs);
    let unbound = Cause::Auto(AutoCause::Unbound);
    assert_eq!(sent, [(A, 0, mine[0], unbound), (A, 1, mine[1], unbound)]);
    assert_eq!(refs.held(1, 5), 0, "the PASID may be freed now");
    assert_eq!(q.counters().partials_discarded, 1);
    let left: Vec<GroupKey> = q.groups(ms(0)).map(|g| g.key).collect();
    let mut expected = others.to_vec();
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!((refs.held(1, 6), refs.held(2, 5)), (1, 1));
}

#[test]
fn cancel_endpoint_answers_only_that_endpoints_groups() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    in_flight(&mut q, &mut refs, A, 1, key(1, None, 0));
    in_flight(&mut q, &mut refs, B, 2, key(1, Some(5), 0));
    in_flight(&mut q, &mut refs, A, 3, key(2, Some(5), 0));
    let sent = send(q.cancel_endpoint(1, AutoCause::Detached), &mut refs);
    let detached = Cause::Auto(AutoCause::Detached);
    assert_eq!(
        sent,
        [
            (A, 1, key(1, None, 0), detached),
            (B, 2, key(1, Some(5), 0), detached)
        ]
    );
    assert_eq!((refs.held(1, 5), refs.held(2, 5)), (0, 1));
}

#[test]
fn cancel_pasid_everywhere_answers_that_pasid_on_every_endpoint() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    in_flight(&mut q, &mut refs, A, 1, key(1, Some(5), 0));
    in_flight(&mut q, &mut refs, A, 2, key(2, Some(5), 0));
    in_flight(&mut q, &mut refs, A, 3, key(2, Some(6), 0));
    let sent = send(
        q.cancel_pasid_everywhere(5, AutoCause::PasidFreed),
        &mut refs,
    );
    let tokens: Vec<u64> = sent.iter().map(|s| s.1).collect();
    assert_eq!(tokens, [1, 2]);
    assert_eq!(
        (refs.held(1, 5), refs.held(2, 5), refs.held(2, 6)),
        (0, 0, 1)
    );
}

#[test]
fn cancel_all_answers_every_group_with_its_cause() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    in_flight(&mut q, &mut refs, A, 1, key(1, Some(5), 0));
    let d = raise_group(&mut q, &mut refs, B, 2, key(2, None, 0), 1);
    let partial = request(A, 3, key(3, None, 0), 0, false);
    assert_eq!(q.raise(partial, ms(0), &mut refs), Raised::Pending);
    let sent = send(q.cancel_all(AutoCause::Reset), &mut refs);
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|s| s.3 == Cause::Auto(AutoCause::Reset)));
    assert_eq!(q.counters().auto(AutoCause::Reset), 2);
    assert_eq!(q.groups(ms(0)).count(), 0);
    assert_eq!(q.next_deadline(), None);
    assert_eq!(refs.held(1, 5), 0);
    // A delivery that raced with the reset is ignored.
    assert!(!q.delivered(d));
}

#[test]
fn duplicate_key_answers_the_newcomer_invalid_and_keeps_the_original() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, Some(5), 0);
    in_flight(&mut q, &mut refs, A, 1, k);
    // Requests before LAST are dropped, the LAST answered at once.
    assert_eq!(
        q.raise(request(B, 2, k, 0, false), ms(0), &mut refs),
        Raised::Pending
    );
    let a = answered_now(q.raise(request(B, 2, k, 0, true), ms(0), &mut refs));
    assert_eq!((a.source, a.token), (B, 2));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Duplicate));
    assert!(!a.holds_pasid());
    a.finish(&mut refs);
    assert_eq!(refs.held(1, 5), 1);
    let a = q.respond(k, ResponseCode::Success).expect("original");
    assert_eq!((a.source, a.token), (A, 1));
    a.finish(&mut refs);
    assert_eq!(q.counters().auto(AutoCause::Duplicate), 1);
}

#[test]
fn requests_of_another_source_do_not_join_a_group() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, None, 0);
    assert_eq!(
        q.raise(request(A, 1, k, 0x1000, false), ms(0), &mut refs),
        Raised::Pending
    );
    assert_eq!(
        q.raise(request(B, 2, k, 0x2000, false), ms(0), &mut refs),
        Raised::Pending
    );
    let a = answered_now(q.raise(request(B, 2, k, 0x3000, true), ms(0), &mut refs));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Duplicate));
    a.finish(&mut refs);
    let Raised::Deliver(d) = q.raise(request(A, 1, k, 0x4000, true), ms(0), &mut refs) else {
        panic!("A's group completes");
    };
    let addresses: Vec<u64> = d.records().map(|r| r.address.to_native()).collect();
    assert_eq!(addresses, [0x1000, 0x4000]);
}

#[test]
fn gone_source_groups_are_dropped_and_later_responses_are_no_such_group() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let (k1, k2, k3) = (key(1, Some(5), 0), key(1, None, 1), key(2, Some(5), 0));
    in_flight(&mut q, &mut refs, A, 1, k1);
    assert_eq!(
        q.raise(request(A, 2, k2, 0, false), ms(0), &mut refs),
        Raised::Pending
    );
    in_flight(&mut q, &mut refs, B, 3, k3);
    let holds = q.source_gone(A);
    assert_eq!(holds.len(), 1);
    assert_eq!((holds[0].endpoint(), holds[0].pasid()), (1, 5));
    for hold in holds {
        hold.release(&mut refs);
    }
    assert_eq!((refs.held(1, 5), refs.held(2, 5)), (0, 1));
    assert_eq!(q.counters().source_gone, 1);
    assert_eq!(q.counters().partials_discarded, 1);
    let err = q.respond(k1, ResponseCode::Success).unwrap_err();
    assert_eq!(err.status(), VIRTIO_IOMMU_S_NOENT);
    q.respond(k3, ResponseCode::Success)
        .expect("B's group")
        .finish(&mut refs);
}

#[test]
fn undeliverable_group_is_answered_invalid_with_the_cause() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, Some(5), 0);
    let d = raise_group(&mut q, &mut refs, A, 1, k, 2);
    let a = q.undeliverable(d, AutoCause::NoBuffer).expect("in flight");
    assert_eq!((a.source, a.token, a.key), (A, 1, k));
    assert_eq!(a.cause, Cause::Auto(AutoCause::NoBuffer));
    assert!(a.holds_pasid());
    a.finish(&mut refs);
    assert_eq!(refs.held(1, 5), 0);
    assert_eq!(q.counters().auto(AutoCause::NoBuffer), 1);
    assert_eq!(q.counters().delivered, 0);
}

#[test]
fn delivery_of_a_group_answered_meanwhile_is_ignored() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, None, 0);
    let stale = raise_group(&mut q, &mut refs, A, 1, k, 1);
    q.respond(k, ResponseCode::Success)
        .expect("raised")
        .finish(&mut refs);
    // The same key raised again is a new group: the old delivery is not it.
    let fresh = raise_group(&mut q, &mut refs, A, 2, k, 1);
    assert!(q.undeliverable(stale, AutoCause::NoBuffer).is_none());
    assert!(q.delivered(fresh));
    assert_eq!(
        q.groups(ms(0)).next().map(|g| g.stage),
        Some(Stage::AwaitingGuest)
    );
}

#[test]
fn refused_pasid_reference_answers_invalid_at_once() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    refs.unbound.insert((1, 5));
    let k = key(1, Some(5), 0);
    assert_eq!(
        q.raise(request(A, 1, k, 0, false), ms(0), &mut refs),
        Raised::Pending
    );
    let a = answered_now(q.raise(request(A, 1, k, 0, true), ms(0), &mut refs));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Refused));
    assert!(!a.holds_pasid());
    a.finish(&mut refs);
    assert_eq!(q.groups(ms(0)).count(), 0, "its partial group ends too");
    assert_eq!(refs.held(1, 5), 0);
}

#[test]
fn group_holds_its_pasid_reference_until_its_answer_is_finished() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, Some(5), 0);
    assert_eq!(
        q.raise(request(A, 1, k, 0, false), ms(0), &mut refs),
        Raised::Pending
    );
    assert_eq!(refs.held(1, 5), 0, "partial groups hold nothing");
    in_flight(&mut q, &mut refs, A, 1, k);
    assert_eq!(refs.held(1, 5), 1);
    let a = q.respond(k, ResponseCode::Success).expect("in flight");
    assert_eq!(refs.held(1, 5), 1, "held while the answer is being sent");
    a.finish(&mut refs);
    assert_eq!(refs.held(1, 5), 0);
}

#[test]
fn refuse_answers_last_and_ends_its_partial_group() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let k = key(1, None, 0);
    assert_eq!(
        q.raise(request(A, 1, k, 0, false), ms(0), &mut refs),
        Raised::Pending
    );
    let later = request(A, 1, k, 0, false);
    assert_eq!(q.refuse(later, AutoCause::NotNegotiated), Raised::Pending);
    assert_eq!(q.counters().requests_dropped, 1);
    let a = answered_now(q.refuse(request(A, 1, k, 0, true), AutoCause::NotNegotiated));
    assert_eq!(
        (a.token, a.cause),
        (1, Cause::Auto(AutoCause::NotNegotiated))
    );
    a.finish(&mut refs);
    assert_eq!(q.groups(ms(0)).count(), 0);
    assert_eq!(q.counters().raised, 1);
    assert_eq!(q.counters().auto(AutoCause::NotNegotiated), 1);
}

#[test]
fn counters_count_guest_answers_by_code_and_auto_answers_by_cause() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    for (g, code) in (0..).zip(ResponseCode::ALL) {
        let k = key(1, None, g);
        in_flight(&mut q, &mut refs, A, 1, k);
        q.respond(k, code).expect("in flight").finish(&mut refs);
    }
    in_flight(&mut q, &mut refs, A, 1, key(1, None, 9));
    send(q.cancel_all(AutoCause::FrontendLost), &mut refs);
    let c = q.counters();
    for code in ResponseCode::ALL {
        assert_eq!(c.guest(code), 1, "{}", code.name());
    }
    for cause in AutoCause::ALL {
        let n = u64::from(cause == AutoCause::FrontendLost);
        assert_eq!(c.auto(cause), n, "{}", cause.name());
    }
    assert_eq!(c.raised, 4);
}

#[test]
fn groups_report_stage_and_age() {
    let (mut q, mut refs) = (queue(Limits::default()), Refs::default());
    let (k1, k2, k3) = (key(1, None, 0), key(1, Some(5), 1), key(2, None, 0));
    assert_eq!(
        q.raise(request(A, 1, k1, 0, false), ms(10), &mut refs),
        Raised::Pending
    );
    let d = raise_group(&mut q, &mut refs, A, 2, k2, 1);
    let Raised::Deliver(waiting) = q.raise(request(B, 3, k3, 0, true), ms(20), &mut refs) else {
        panic!("raised");
    };
    assert!(q.delivered(waiting));
    let seen: Vec<(GroupKey, SourceId, Stage, Duration)> = q
        .groups(ms(50))
        .map(|g| (g.key, g.source, g.stage, g.age))
        .collect();
    assert_eq!(
        seen,
        [
            (k2, A, Stage::Delivering, ms(50)),
            (k3, B, Stage::AwaitingGuest, ms(30)),
            (k1, A, Stage::Partial, ms(40)),
        ]
    );
    let _ = q
        .undeliverable(d, AutoCause::NoBuffer)
        .map(|a| a.finish(&mut refs));
}

#[test]
fn page_resp_is_read_into_a_group_key_and_code() {
    let req = PageRespReq::new(3, Some(5), 7, VIRTIO_IOMMU_PAGE_RESP_INVALID);
    let read = read_page_resp(&req);
    assert_eq!(read, Ok((key(3, Some(5), 7), ResponseCode::Invalid)));
    let req = PageRespReq::new(3, None, 7, VIRTIO_IOMMU_PAGE_RESP_SUCCESS);
    assert_eq!(
        read_page_resp(&req),
        Ok((key(3, None, 7), ResponseCode::Success))
    );
    let req = PageRespReq::new(3, None, 7, VIRTIO_IOMMU_PAGE_RESP_FAILURE);
    assert_eq!(
        read_page_resp(&req),
        Ok((key(3, None, 7), ResponseCode::Failure))
    );
}

#[test]
fn page_resp_with_unknown_flags_reserved_bytes_or_code_is_refused() {
    let good = PageRespReq::new(3, Some(5), 7, VIRTIO_IOMMU_PAGE_RESP_SUCCESS);
    let mut flags = good;
    flags.flags = 0x3.into();
    let mut reserved = good;
    reserved.reserved[7] = 1;
    let mut pasid = PageRespReq::new(3, None, 7, VIRTIO_IOMMU_PAGE_RESP_SUCCESS);
    pasid.pasid = 5.into();
    let mut code = good;
    code.code = 3.into();
    let cases = [
        (flags, RequestError::UnknownFlags(0x2)),
        (reserved, RequestError::ReservedNotZero),
        (pasid, RequestError::ReservedNotZero),
        (code, RequestError::UnknownResponseCode(3)),
    ];
    for (req, err) in cases {
        assert_eq!(read_page_resp(&req), Err(err));
        assert_eq!(err.status(), VIRTIO_IOMMU_S_INVAL);
    }
}

#[test]
fn zero_limits_answer_every_group_invalid() {
    let limits = Limits {
        requests_per_group: 0,
        ..Default::default()
    };
    let (mut q, mut refs) = (queue(limits), Refs::default());
    let a = answered_now(q.raise(request(A, 1, key(1, None, 0), 0, true), ms(0), &mut refs));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Overflow));
    a.finish(&mut refs);
    let limits = Limits {
        groups_per_endpoint: 0,
        ..Default::default()
    };
    let mut q = queue(limits);
    let a = answered_now(q.raise(request(A, 1, key(1, None, 0), 0, true), ms(0), &mut refs));
    assert_eq!(a.cause, Cause::Auto(AutoCause::Overflow));
    a.finish(&mut refs);
}
