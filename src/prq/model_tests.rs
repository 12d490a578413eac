// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property test of the invariant: random interleavings of requests
//! (partial groups, LAST, stop markers, duplicates, overflow), deliveries,
//! guest responses (right, wrong and repeated), DETACH, DETACH_TABLE,
//! PASID_FREE, reset, frontend and source loss and timeouts, checked after
//! every step against a ledger of raised groups, their answers and the
//! PASID references: each raised group is answered exactly once, and never
//! after its PASID became reusable.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

/// Small limits, so that every limit is hit.
const LIMITS: Limits = Limits {
    groups_per_endpoint: 3,
    groups_total: 5,
    partial_groups: 2,
    requests_per_group: 2,
    partial_timeout: Duration::from_millis(5),
    response_timeout: Some(Duration::from_millis(20)),
};

const ENDPOINTS: u32 = 2;
const PASIDS: u32 = 2;
const SOURCES: u32 = 2;

#[derive(Debug, Clone)]
enum Op {
    /// A source reports a request.
    Request {
        source: u32,
        key: GroupKey,
        last: bool,
        stop: bool,
    },
    /// The daemon refuses a request (driver without the feature).
    Refuse {
        source: u32,
        key: GroupKey,
        last: bool,
    },
    /// A pending delivery reaches the event queue, or does not.
    Deliver {
        index: usize,
        ok: bool,
    },
    /// A PAGE_RESP for any key (often unknown or repeated).
    Respond {
        key: GroupKey,
        code: ResponseCode,
    },
    /// A PAGE_RESP for a group in flight.
    RespondInFlight {
        index: usize,
        code: ResponseCode,
    },
    /// DETACH of an endpoint: its groups and bindings go.
    Detach(u32),
    /// DETACH_TABLE: one binding goes.
    DetachTable(u32, u32),
    /// ATTACH_TABLE: a binding comes (back).
    Bind(u32, u32),
    /// PASID_FREE: every binding of the PASID goes, and it is reused.
    PasidFree(u32),
    Reset,
    FrontendLost,
    /// A source disconnects.
    Disconnect(u32),
    /// Time passes and the timer fires.
    Tick(u64),
}

fn key() -> impl Strategy<Value = GroupKey> {
    (
        0..ENDPOINTS,
        prop::option::weighted(0.8, 1..=PASIDS),
        0u16..2,
    )
        .prop_map(|(endpoint, pasid, group_id)| GroupKey {
            endpoint,
            pasid,
            group_id,
        })
}

fn code() -> impl Strategy<Value = ResponseCode> {
    prop::sample::select(ResponseCode::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    let source = 0..SOURCES;
    prop_oneof![
        16 => (source.clone(), key(), any::<bool>(), prop::bool::weighted(0.05))
            .prop_map(|(source, key, last, stop)| Op::Request { source, key, last, stop }),
        1 => (source.clone(), key(), any::<bool>())
            .prop_map(|(source, key, last)| Op::Refuse { source, key, last }),
        6 => (any::<usize>(), prop::bool::weighted(0.85))
            .prop_map(|(index, ok)| Op::Deliver { index, ok }),
        2 => (key(), code()).prop_map(|(key, code)| Op::Respond { key, code }),
        3 => (any::<usize>(), code()).prop_map(|(index, code)| Op::RespondInFlight { index, code }),
        1 => (0..ENDPOINTS).prop_map(Op::Detach),
        1 => (0..ENDPOINTS, 1..=PASIDS).prop_map(|(e, p)| Op::DetachTable(e, p)),
        8 => (0..ENDPOINTS, 1..=PASIDS).prop_map(|(e, p)| Op::Bind(e, p)),
        1 => (1..=PASIDS).prop_map(Op::PasidFree),
        1 => Just(Op::Reset),
        1 => Just(Op::FrontendLost),
        1 => source.prop_map(Op::Disconnect),
        4 => (0u64..12).prop_map(Op::Tick),
    ]
}

/// The test's PASID allocator: bindings, and references per (endpoint,
/// PASID) with the generation of the PASID each was taken in.
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

/// Everything the test knows, and the checks.
struct Ledger {
    q: PageRequests,
    alloc: Allocator,
    now: Duration,
    next_token: u64,
    /// Token each source's current partial group will carry.
    planned: HashMap<(SourceId, GroupKey), u64>,
    /// Raised groups awaiting their answer, by token.
    open: HashMap<u64, Open>,
    /// Tokens answered or dropped.
    closed: HashSet<u64>,
    /// Deliveries the "daemon" has not reported yet, with their tokens.
    pending: Vec<(u64, Delivery)>,
}

impl Ledger {
    /// Every PASID starts bound to every endpoint.
    fn new() -> Self {
        let mut alloc = Allocator::default();
        for endpoint in 0..ENDPOINTS {
            for pasid in 1..=PASIDS {
                alloc.bound.insert((endpoint, pasid));
            }
        }
        Ledger {
            q: PageRequests::new(LIMITS),
            alloc,
            now: Duration::ZERO,
            next_token: 0,
            planned: HashMap::new(),
            open: HashMap::new(),
            closed: HashSet::new(),
            pending: Vec::new(),
        }
    }

    fn request(&mut self, source: u32, key: GroupKey, last: bool, stop: bool) -> PageRequest {
        let source = SourceId(source);
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
            address: 0x1000,
            access: PageAccess {
                read: !stop,
                ..Default::default()
            },
            last: last || stop,
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
                let records: Vec<_> = d.records().collect();
                assert!(records.len() <= LIMITS.requests_per_group as usize);
                let last = records.last().expect("LAST at least");
                assert_ne!(
                    last.flags.to_native() & crate::wire::VIRTIO_IOMMU_FAULT_F_LAST,
                    0
                );
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

    fn apply(&mut self, op: Op) {
        match op {
            Op::Request {
                source,
                key,
                last,
                stop,
            } => {
                let r = self.request(source, key, last, stop);
                let raised = self.q.raise(r, self.now, &mut self.alloc);
                self.raised(r, raised, None);
            }
            Op::Refuse { source, key, last } => {
                let r = self.request(source, key, last, false);
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
            Op::Respond { key, code } => self.respond(key, code),
            Op::RespondInFlight { index, code } => {
                let mut keys: Vec<GroupKey> = self.open.values().map(|o| o.key).collect();
                if keys.is_empty() {
                    return;
                }
                keys.sort();
                self.respond(keys[index % keys.len()], code);
            }
            Op::Detach(endpoint) => {
                let answers = self.q.cancel_endpoint(endpoint, AutoCause::Detached);
                self.settle(answers, Some(AutoCause::Detached));
                assert!(self.open.values().all(|o| o.key.endpoint != endpoint));
                for pasid in 1..=PASIDS {
                    self.unbind(endpoint, pasid);
                }
            }
            Op::DetachTable(endpoint, pasid) => {
                let answers = self.q.cancel_pasid(endpoint, pasid, AutoCause::Unbound);
                self.settle(answers, Some(AutoCause::Unbound));
                self.unbind(endpoint, pasid);
            }
            Op::Bind(endpoint, pasid) => {
                self.alloc.bound.insert((endpoint, pasid));
            }
            Op::PasidFree(pasid) => {
                let answers = self.q.cancel_pasid_everywhere(pasid, AutoCause::PasidFreed);
                self.settle(answers, Some(AutoCause::PasidFreed));
                for endpoint in 0..ENDPOINTS {
                    self.unbind(endpoint, pasid);
                }
                // Freed and allocated again: a new life of the same number.
                *self.alloc.generation.entry(pasid).or_default() += 1;
            }
            Op::Reset => self.cancel_all(AutoCause::Reset),
            Op::FrontendLost => self.cancel_all(AutoCause::FrontendLost),
            Op::Disconnect(source) => {
                let source = SourceId(source);
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
            Op::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                let answers = self.q.expire(self.now);
                let timeout = LIMITS.response_timeout.unwrap_or(Duration::MAX);
                for a in &answers {
                    let open = self.open.get(&a.token).expect("in flight");
                    assert!(open.raised + timeout <= self.now, "expired early");
                }
                self.settle(answers, Some(AutoCause::Timeout));
                for o in self.open.values() {
                    assert!(o.raised + timeout > self.now, "not expired in time");
                }
                for g in self.q.groups(self.now) {
                    if g.stage == Stage::Partial {
                        assert!(g.age < LIMITS.partial_timeout, "stale partial group");
                    }
                }
            }
        }
    }

    fn respond(&mut self, key: GroupKey, code: ResponseCode) {
        let expected = self.open_with(key);
        match self.q.respond(key, code) {
            Ok(a) => {
                assert_eq!(Some(a.token), expected);
                assert_eq!(a.cause, Cause::Guest(code));
                self.settle(vec![a], None);
            }
            Err(e) => {
                assert_eq!(expected, None, "in-flight group not found");
                assert_eq!(e, crate::error::RequestError::NoSuchPageGroup(key));
            }
        }
    }

    fn cancel_all(&mut self, cause: AutoCause) {
        let answers = self.q.cancel_all(cause);
        self.settle(answers, Some(cause));
        assert!(self.open.is_empty());
        for endpoint in 0..ENDPOINTS {
            for pasid in 1..=PASIDS {
                self.unbind(endpoint, pasid);
            }
        }
    }

    /// After every step: references match the groups in flight, the queue
    /// holds exactly the ledger's groups, and the limits hold.
    fn check(&self) {
        for endpoint in 0..ENDPOINTS {
            for pasid in 1..=PASIDS {
                let holding = self
                    .open
                    .values()
                    .filter(|o| o.key.endpoint == endpoint && o.key.pasid == Some(pasid))
                    .count();
                assert_eq!(self.alloc.refs(endpoint, pasid) as usize, holding);
            }
        }
        let groups: Vec<GroupInfo> = self.q.groups(self.now).collect();
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
        assert!(partial <= LIMITS.partial_groups as usize);
        assert!(groups.len() <= LIMITS.groups_total as usize);
        for endpoint in 0..ENDPOINTS {
            let n = groups.iter().filter(|g| g.key.endpoint == endpoint).count();
            assert!(n <= LIMITS.groups_per_endpoint as usize);
        }
        let keys: HashSet<GroupKey> = groups.iter().map(|g| g.key).collect();
        assert_eq!(keys.len(), groups.len(), "a key in two groups");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Each raised group is answered exactly once, and never after its
    /// PASID became reusable.
    #[test]
    fn every_raised_group_is_answered_exactly_once(ops in prop::collection::vec(op(), 1..120)) {
        let mut ledger = Ledger::new();
        for op in ops {
            ledger.apply(op);
            ledger.check();
        }
        // Whatever is still in flight ends with the device.
        ledger.cancel_all(AutoCause::Reset);
        ledger.check();
        let c = ledger.q.counters();
        let auto: u64 = AutoCause::ALL.iter().map(|&cause| c.auto(cause)).sum();
        let guest: u64 = ResponseCode::ALL.iter().map(|&code| c.guest(code)).sum();
        prop_assert_eq!(auto + guest + c.source_gone, c.raised);
        prop_assert_eq!(c.raised, ledger.closed.len() as u64);
    }
}
