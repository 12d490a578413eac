// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The exactly-once oracle of [`PageRequests`], shared by the property
//! test (`model_tests.rs`) and the `prq` fuzz target: a [`Ledger`] applies
//! each [`Op`] to the queue and checks, after every step, what the queue
//! did against its own record of raised groups, their answers and the
//! PASID references:
//!
//! - every raised group gets exactly one answer (or is dropped with its
//!   source), and a LAST always gets a delivery or an answer;
//! - answers name the group, source and token that were raised, and an
//!   automatic answer gives the cause of the call that made it;
//! - a group's PASID reference is taken once, released once, and never
//!   after its PASID was freed and reused; no group holds a PASID once its
//!   binding is gone;
//! - the queue holds exactly the ledger's groups in flight, one group per
//!   key, within every limit; groups expire no earlier and no later than
//!   their deadline, partial groups too;
//! - delivered records carry the group's key, LAST on the last one only,
//!   and page addresses;
//! - at the end the counters add up: every raised group was answered by
//!   the guest, automatically, or dropped with its source.
//!
//! Test code: built for the crate's tests and with the `prq-ledger`
//! feature (the fuzz crate's), never in the daemon. A failed check panics.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{
    Answer, AutoCause, Cause, Delivery, GroupKey, Limits, PageAccess, PageRequest, PageRequests,
    PasidRefs, Raised, ResponseCode, SourceId, Stage,
};
use crate::error::RequestError;
use crate::wire::{
    VIRTIO_IOMMU_FAULT_F_LAST, VIRTIO_IOMMU_FAULT_F_PAGE_REQ, VIRTIO_IOMMU_FAULT_F_PASID,
};

/// One step of a run. Endpoints, PASIDs and indexes may be out of range:
/// the ledger folds them into the run's endpoints, PASIDs and lists.
#[derive(Debug, Clone)]
pub enum Op {
    /// A source reports a request (a LAST that neither reads nor writes
    /// is a PASID stop marker).
    Request {
        /// Who raises it.
        source: SourceId,
        /// Its group.
        key: GroupKey,
        /// The last request of its group.
        last: bool,
        /// The access it asks for.
        access: PageAccess,
        /// Its address (any: the record carries the page).
        address: u64,
        /// PRI private data.
        private_data: Option<[u64; 2]>,
    },
    /// The daemon refuses a request (driver without the feature).
    Refuse {
        /// Who raises it.
        source: SourceId,
        /// Its group.
        key: GroupKey,
        /// The last request of its group.
        last: bool,
    },
    /// A pending delivery (picked by index) reaches the event queue, or
    /// does not.
    Deliver {
        /// Which pending delivery.
        index: usize,
        /// Whether the event queue took it.
        ok: bool,
    },
    /// A PAGE_RESP for any key (often unknown or repeated).
    Respond {
        /// The group named.
        key: GroupKey,
        /// Its code.
        code: ResponseCode,
    },
    /// A PAGE_RESP for a group in flight (picked by index).
    RespondInFlight {
        /// Which group in flight.
        index: usize,
        /// The code.
        code: ResponseCode,
    },
    /// DETACH of an endpoint: its groups and bindings go.
    Detach(u32),
    /// DETACH_TABLE of (endpoint, PASID): one binding goes.
    DetachTable(u32, u32),
    /// ATTACH_TABLE of (endpoint, PASID): a binding comes (back).
    Bind(u32, u32),
    /// PASID_FREE: every binding of the PASID goes, and it is reused.
    PasidFree(u32),
    /// Device reset.
    Reset,
    /// The frontend disconnects.
    FrontendLost,
    /// A source disconnects.
    Disconnect(SourceId),
    /// Time passes and the timer fires.
    Tick(Duration),
}

/// The PASID allocator: bindings, and references per (endpoint, PASID)
/// with the generation of the PASID each was taken in.
#[derive(Default)]
struct Allocator {
    bound: HashSet<(u32, u32)>,
    refs: HashMap<(u32, u32), u32>,
    /// Bumped when a PASID is freed and reused.
    generation: HashMap<u32, u64>,
}

impl Allocator {
    fn refs(&self, endpoint: u32, pasid: u32) -> u32 {
        self.refs.get(&(endpoint, pasid)).copied().unwrap_or(0)
    }

    fn generation(&self, pasid: u32) -> u64 {
        self.generation.get(&pasid).copied().unwrap_or(0)
    }
}

impl PasidRefs for Allocator {
    fn take(&mut self, endpoint: u32, pasid: u32) -> Option<u64> {
        if !self.bound.contains(&(endpoint, pasid)) {
            return None;
        }
        *self.refs.entry((endpoint, pasid)).or_default() += 1;
        Some(self.generation(pasid))
    }

    fn release(&mut self, endpoint: u32, pasid: u32, generation: u64) {
        assert_eq!(generation, self.generation(pasid), "released after reuse");
        let n = self.refs.get_mut(&(endpoint, pasid)).expect("taken");
        *n = n.checked_sub(1).expect("released twice");
    }
}

/// A raised group waiting for its one answer.
#[derive(Debug, Clone, Copy)]
struct Open {
    source: SourceId,
    key: GroupKey,
    raised: Duration,
    /// The generation of its PASID when it was raised.
    generation: u64,
}

/// A [`PageRequests`] and everything the checks know of it.
pub struct Ledger {
    q: PageRequests,
    limits: Limits,
    endpoints: u32,
    /// PASIDs are `0..=max_pasid`.
    max_pasid: u32,
    alloc: Allocator,
    now: Duration,
    next_token: u64,
    /// Token each source's current partial group will carry.
    planned: HashMap<(SourceId, GroupKey), u64>,
    /// Raised groups awaiting their answer, by token.
    open: HashMap<u64, Open>,
    /// Tokens answered or dropped.
    closed: HashSet<u64>,
    /// Deliveries not reported yet, with their tokens.
    pending: Vec<(u64, Delivery)>,
}

impl Ledger {
    /// A queue with `limits`, endpoints `0..endpoints` and PASIDs
    /// `0..=max_pasid`, every PASID bound to every endpoint.
    pub fn new(limits: Limits, endpoints: u32, max_pasid: u32) -> Self {
        let mut alloc = Allocator::default();
        for endpoint in 0..endpoints {
            for pasid in 0..=max_pasid {
                alloc.bound.insert((endpoint, pasid));
            }
        }
        Ledger {
            q: PageRequests::new(limits),
            limits,
            endpoints,
            max_pasid,
            alloc,
            now: Duration::ZERO,
            next_token: 0,
            planned: HashMap::new(),
            open: HashMap::new(),
            closed: HashSet::new(),
            pending: Vec::new(),
        }
    }

    /// `key` with its endpoint and PASID folded into the run's ranges.
    fn fold(&self, key: GroupKey) -> GroupKey {
        GroupKey {
            endpoint: key.endpoint % self.endpoints,
            pasid: key.pasid.map(|p| p % (self.max_pasid + 1)),
            group_id: key.group_id,
        }
    }

    fn request(&mut self, source: SourceId, key: GroupKey, last: bool) -> PageRequest {
        let next = &mut self.next_token;
        let token = *self.planned.entry((source, key)).or_insert_with(|| {
            *next += 1;
            *next
        });
        if last {
            // The next group of this key gets a fresh token.
            self.planned.remove(&(source, key));
        }
        PageRequest {
            source,
            token,
            key,
            address: 0,
            access: PageAccess::from_bits(1),
            last,
            private_data: None,
        }
    }

    fn open_with(&self, key: GroupKey) -> Option<u64> {
        self.open
            .iter()
            .find(|(_, o)| o.key == key)
            .map(|(&token, _)| token)
    }

    fn generation_of(&self, key: GroupKey) -> u64 {
        key.pasid.map_or(0, |p| self.alloc.generation(p))
    }

    /// Checks what `raise` or `refuse` did with `r`.
    fn raised(&mut self, r: PageRequest, raised: Raised, refused: Option<AutoCause>) {
        match raised {
            Raised::StopMarker => assert!(r.is_stop_marker()),
            Raised::Pending => assert!(!r.last, "a LAST gets a delivery or an answer"),
            Raised::Deliver(d) => {
                assert!(r.last && !r.is_stop_marker() && refused.is_none());
                let seen = self.open.contains_key(&r.token) || self.closed.contains(&r.token);
                assert!(!seen, "token {} raised twice", r.token);
                assert_eq!(
                    self.open_with(r.key),
                    None,
                    "two groups in flight for a key"
                );
                assert_eq!(d.key(), r.key);
                let records: Vec<_> = d.records().collect();
                assert_eq!(records.len(), d.buffers_needed());
                assert!(!records.is_empty());
                assert!(records.len() <= self.limits.requests_per_group as usize);
                for (i, rec) in records.iter().enumerate() {
                    let flags = rec.flags.to_native();
                    let last = i + 1 == records.len();
                    assert_eq!(flags & VIRTIO_IOMMU_FAULT_F_LAST != 0, last);
                    assert_eq!(
                        flags & VIRTIO_IOMMU_FAULT_F_PAGE_REQ,
                        VIRTIO_IOMMU_FAULT_F_PAGE_REQ
                    );
                    assert_eq!(
                        flags & VIRTIO_IOMMU_FAULT_F_PASID != 0,
                        r.key.pasid.is_some()
                    );
                    assert_eq!(rec.endpoint.to_native(), r.key.endpoint);
                    assert_eq!(rec.pasid.to_native(), r.key.pasid.unwrap_or(0));
                    assert_eq!(rec.group_id.to_native(), r.key.group_id);
                    assert_eq!(rec.address.to_native() & 0xfff, 0);
                }
                self.open.insert(
                    r.token,
                    Open {
                        source: r.source,
                        key: r.key,
                        raised: self.now,
                        generation: self.generation_of(r.key),
                    },
                );
                self.pending.push((r.token, d));
            }
            Raised::Answer(a) => {
                assert!(r.last && !r.is_stop_marker());
                assert_eq!((a.source, a.token, a.key), (r.source, r.token, r.key));
                assert!(!a.holds_pasid(), "answered before it held anything");
                assert_eq!(a.code(), ResponseCode::Invalid);
                assert!(!self.open.contains_key(&r.token));
                assert!(
                    self.closed.insert(r.token),
                    "token {} answered twice",
                    r.token
                );
                let Cause::Auto(cause) = a.cause else {
                    panic!("the guest did not answer this");
                };
                match refused {
                    Some(expected) => assert_eq!(cause, expected),
                    None if self.open_with(r.key).is_some() => {
                        assert_eq!(cause, AutoCause::Duplicate)
                    }
                    None => assert!(matches!(
                        cause,
                        AutoCause::Duplicate | AutoCause::Overflow | AutoCause::Refused
                    )),
                }
                a.finish(&mut self.alloc);
            }
        }
    }

    /// Sends answers the queue returned: each closes exactly one open
    /// group, of the PASID generation it was raised in.
    fn settle(&mut self, answers: Vec<Answer>, cause: Option<AutoCause>) {
        for a in answers {
            let open = self
                .open
                .remove(&a.token)
                .unwrap_or_else(|| panic!("answer for token {} not in flight", a.token));
            assert!(self.closed.insert(a.token));
            assert_eq!((a.source, a.key), (open.source, open.key));
            assert_eq!(a.holds_pasid(), open.key.pasid.is_some());
            assert_eq!(
                open.generation,
                self.generation_of(open.key),
                "answered after its PASID was reused"
            );
            if let Some(cause) = cause {
                assert_eq!(a.cause, Cause::Auto(cause));
            }
            a.finish(&mut self.alloc);
        }
    }

    /// Asserts that no group holds `pasid` of `endpoint`, and forgets the
    /// binding: the PASID may be freed and reused now.
    fn unbind(&mut self, endpoint: u32, pasid: u32) {
        assert_eq!(self.alloc.refs(endpoint, pasid), 0, "PASID still held");
        self.alloc.bound.remove(&(endpoint, pasid));
    }

    /// Applies `op` to the queue and checks the result, then the whole
    /// state ([`Ledger::check`]).
    pub fn apply(&mut self, op: Op) {
        self.step(op);
        self.check();
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Request {
                source,
                key,
                last,
                access,
                address,
                private_data,
            } => {
                let mut r = self.request(source, self.fold(key), last);
                r.access = access;
                r.address = address;
                r.private_data = private_data;
                let raised = self.q.raise(r, self.now, &mut self.alloc);
                self.raised(r, raised, None);
            }
            Op::Refuse { source, key, last } => {
                let r = self.request(source, self.fold(key), last);
                let raised = self.q.refuse(r, AutoCause::NotNegotiated);
                self.raised(r, raised, Some(AutoCause::NotNegotiated));
            }
            Op::Deliver { index, ok } => {
                if self.pending.is_empty() {
                    return;
                }
                let (token, d) = self.pending.swap_remove(index % self.pending.len());
                let in_flight = self.open.contains_key(&token);
                if ok {
                    assert_eq!(self.q.delivered(d), in_flight);
                } else {
                    let answer = self.q.undeliverable(d, AutoCause::NoBuffer);
                    assert_eq!(answer.is_some(), in_flight);
                    self.settle(answer.into_iter().collect(), Some(AutoCause::NoBuffer));
                }
            }
            Op::Respond { key, code } => self.respond(self.fold(key), code),
            Op::RespondInFlight { index, code } => {
                let mut keys: Vec<GroupKey> = self.open.values().map(|o| o.key).collect();
                if keys.is_empty() {
                    return;
                }
                keys.sort();
                self.respond(keys[index % keys.len()], code);
            }
            Op::Detach(endpoint) => {
                let endpoint = endpoint % self.endpoints;
                let answers = self.q.cancel_endpoint(endpoint, AutoCause::Detached);
                self.settle(answers, Some(AutoCause::Detached));
                assert!(self.open.values().all(|o| o.key.endpoint != endpoint));
                for pasid in 0..=self.max_pasid {
                    self.unbind(endpoint, pasid);
                }
            }
            Op::DetachTable(endpoint, pasid) => {
                let endpoint = endpoint % self.endpoints;
                let pasid = pasid % (self.max_pasid + 1);
                let answers = self.q.cancel_pasid(endpoint, pasid, AutoCause::Unbound);
                self.settle(answers, Some(AutoCause::Unbound));
                self.unbind(endpoint, pasid);
            }
            Op::Bind(endpoint, pasid) => {
                let endpoint = endpoint % self.endpoints;
                let pasid = pasid % (self.max_pasid + 1);
                self.alloc.bound.insert((endpoint, pasid));
            }
            Op::PasidFree(pasid) => {
                let pasid = pasid % (self.max_pasid + 1);
                let answers = self.q.cancel_pasid_everywhere(pasid, AutoCause::PasidFreed);
                self.settle(answers, Some(AutoCause::PasidFreed));
                for endpoint in 0..self.endpoints {
                    self.unbind(endpoint, pasid);
                }
                // Freed and allocated again: a new life of the same number.
                *self.alloc.generation.entry(pasid).or_default() += 1;
            }
            Op::Reset => self.cancel_all(AutoCause::Reset),
            Op::FrontendLost => self.cancel_all(AutoCause::FrontendLost),
            Op::Disconnect(source) => {
                let holds = self.q.source_gone(source);
                let dropped: Vec<u64> = self
                    .open
                    .iter()
                    .filter(|(_, o)| o.source == source)
                    .map(|(&t, _)| t)
                    .collect();
                let holding = dropped
                    .iter()
                    .filter(|t| self.open[t].key.pasid.is_some())
                    .count();
                assert_eq!(holds.len(), holding);
                for token in dropped {
                    self.open.remove(&token);
                    assert!(self.closed.insert(token));
                }
                for hold in holds {
                    hold.release(&mut self.alloc);
                }
                self.planned.retain(|(s, _), _| *s != source);
            }
            Op::Tick(elapsed) => {
                self.now += elapsed;
                let answers = self.q.expire(self.now);
                let timeout = self.limits.response_timeout;
                for a in &answers {
                    let open = self.open.get(&a.token).expect("in flight");
                    let t = timeout.expect("a deadline");
                    assert!(open.raised + t <= self.now, "expired early");
                }
                self.settle(answers, Some(AutoCause::Timeout));
                if let Some(t) = timeout {
                    for o in self.open.values() {
                        assert!(o.raised + t > self.now, "not expired in time");
                    }
                }
                for g in self.q.groups(self.now) {
                    if g.stage == Stage::Partial {
                        assert!(g.age < self.limits.partial_timeout, "stale partial group");
                    }
                }
                if let Some(next) = self.q.next_deadline() {
                    assert!(next > self.now, "a deadline left behind");
                }
            }
        }
    }

    /// A guest PAGE_RESP for `key` as it is (any endpoint and PASID): it
    /// answers the group in flight for that key, or is `S_NOENT` when
    /// there is none. Call [`Ledger::check`] after it.
    pub fn respond(&mut self, key: GroupKey, code: ResponseCode) {
        let expected = self.open_with(key);
        match self.q.respond(key, code) {
            Ok(a) => {
                assert_eq!(Some(a.token), expected);
                assert_eq!(a.cause, Cause::Guest(code));
                assert_eq!(a.code(), code);
                self.settle(vec![a], None);
            }
            Err(e) => {
                assert_eq!(expected, None, "in-flight group not found");
                assert_eq!(e, RequestError::NoSuchPageGroup(key));
            }
        }
    }

    fn cancel_all(&mut self, cause: AutoCause) {
        let answers = self.q.cancel_all(cause);
        self.settle(answers, Some(cause));
        assert!(self.open.is_empty());
        assert!(self.q.groups(self.now).next().is_none(), "groups left");
        for endpoint in 0..self.endpoints {
            for pasid in 0..=self.max_pasid {
                self.unbind(endpoint, pasid);
            }
        }
    }

    /// References match the groups in flight, the queue holds exactly the
    /// ledger's groups, and the limits hold.
    pub fn check(&self) {
        for endpoint in 0..self.endpoints {
            for pasid in 0..=self.max_pasid {
                let holding = self
                    .open
                    .values()
                    .filter(|o| o.key.endpoint == endpoint && o.key.pasid == Some(pasid))
                    .count();
                assert_eq!(self.alloc.refs(endpoint, pasid) as usize, holding);
            }
        }
        let groups: Vec<_> = self.q.groups(self.now).collect();
        let mut in_flight: Vec<(GroupKey, SourceId)> = groups
            .iter()
            .filter(|g| g.stage != Stage::Partial)
            .map(|g| (g.key, g.source))
            .collect();
        let mut open: Vec<(GroupKey, SourceId)> =
            self.open.values().map(|o| (o.key, o.source)).collect();
        in_flight.sort();
        open.sort();
        assert_eq!(in_flight, open);
        let partial = groups.iter().filter(|g| g.stage == Stage::Partial).count();
        assert!(partial <= self.limits.partial_groups as usize);
        assert!(groups.len() <= self.limits.groups_total as usize);
        for endpoint in 0..self.endpoints {
            let n = groups.iter().filter(|g| g.key.endpoint == endpoint).count();
            assert!(n <= self.limits.groups_per_endpoint as usize);
        }
        let keys: HashSet<GroupKey> = groups.iter().map(|g| g.key).collect();
        assert_eq!(keys.len(), groups.len(), "a key in two groups");
    }

    /// Ends the run as the device ends (whatever is in flight is answered
    /// by a reset) and checks that the counters add up: every raised group
    /// was answered by the guest, automatically, or dropped with its
    /// source, once.
    pub fn finish(mut self) {
        self.cancel_all(AutoCause::Reset);
        self.check();
        let c = self.q.counters();
        let auto: u64 = AutoCause::ALL.iter().map(|&cause| c.auto(cause)).sum();
        let guest: u64 = ResponseCode::ALL.iter().map(|&code| c.guest(code)).sum();
        assert_eq!(auto + guest + c.source_gone, c.raised);
        assert_eq!(c.raised, self.closed.len() as u64);
    }
}
