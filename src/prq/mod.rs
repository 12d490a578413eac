// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page-request groups, answered exactly once.
//!
//! This module owns the life of every recoverable I/O page fault group
//! (a PCIe PRI page request group, or a stall) from the source that raised
//! it (a device model linked with the client library, or a host iommufd
//! fault queue) through the guest's event queue to the one answer that goes
//! back to that source. It is a pure state machine like the rest of the
//! crate: no I/O, and time is a monotonic `Duration` the caller passes in.
//!
//! # The invariant
//!
//! **Every raised group is answered exactly once, and never after its
//! PASID reference was dropped.**
//!
//! A group is *raised* by its LAST request. Requests before it only
//! accumulate in a *partial* group: a response may follow LAST only (PCIe
//! PRI, Linux `io-pgfault.c`), so nothing is owed for them, and a partial
//! group that is cancelled, expires or loses its source is forgotten; its
//! LAST, if it comes, raises the group then. A PASID stop marker raises
//! nothing and is never answered.
//!
//! From its LAST on, a group either is answered at once (an [`Answer`] from
//! [`PageRequests::raise`] or [`PageRequests::refuse`]: duplicate, over a
//! limit, PASID not available) or is *in flight*: it holds one reference on
//! its PASID, taken through [`PasidRefs::take`] before it is stored, and
//! stays in the table until exactly one of these removes it:
//!
//! - the guest's PAGE_RESP ([`PageRequests::respond`]);
//! - an automatic INVALID: undeliverable, cancelled (detach, DETACH_TABLE,
//!   PASID_FREE, reset, frontend lost), or timed out;
//! - the loss of its source, which can take no answer any more
//!   ([`PageRequests::source_gone`]).
//!
//! Whatever removes a group returns its one [`Answer`] (or, for a lost
//! source, its [`PasidRef`]) and keeps nothing of it, so nothing can answer
//! it again: a later PAGE_RESP finds no group (`S_NOENT`). The PASID
//! reference travels inside the answer and is dropped by
//! [`Answer::finish`] once the daemon has sent it, so a PASID cannot be
//! freed and reused before every answer for it is on its way: DETACH_TABLE
//! and PASID_FREE cancel the PASID's groups, send and finish the answers,
//! and only then complete.
//!
//! Memory is bounded by [`Limits`] whatever sources and guest do: groups
//! per endpoint and in all, partial groups, requests per group.
//!
//! # How the daemon drives it
//!
//! 1. A source reports a request: [`PageRequests::raise`] (or
//!    [`PageRequests::refuse`] when the daemon will not take it, e.g. the
//!    driver did not negotiate `VIRTIO_IOMMU_F_PAGE_REQUEST`).
//! 2. [`Raised::Deliver`]: put every record on the event queue, then
//!    [`PageRequests::delivered`]; or, without enough buffers (or with
//!    buffers smaller than 48 bytes), [`PageRequests::undeliverable`].
//! 3. PAGE_RESP: [`read_page_resp`], then [`PageRequests::respond`].
//! 4. DETACH / DETACH_TABLE / PASID_FREE / reset / frontend loss: the
//!    `cancel_*` functions, before the state they depend on goes.
//! 5. A timer at [`PageRequests::next_deadline`]: [`PageRequests::expire`].
//!
//! Every [`Answer`] is sent to its source, then [`Answer::finish`]ed.

mod answer;
pub mod iommufd;
#[cfg(any(test, feature = "prq-ledger"))]
pub mod ledger;
mod request;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::time::Duration;

pub use answer::{read_page_resp, Answer, AutoCause, Cause, PasidRef, PasidRefs, ResponseCode};
pub use request::{Delivery, GroupKey, PageAccess, PageRequest, SourceId};

use crate::error::RequestError;
use request::Record;

/// Bounds on what sources and the guest can make the queue hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Groups one endpoint may have in flight or partial at once (the
    /// PROBE PAGE_REQUEST property's `max_outstanding_groups`). A group
    /// over it is answered INVALID ([`AutoCause::Overflow`]).
    pub groups_per_endpoint: u32,
    /// Groups in flight or partial over all endpoints.
    pub groups_total: u32,
    /// Partial groups over all endpoints. Requests that would open another
    /// one are dropped: their group is raised by its LAST alone, and the
    /// device asks again for the pages it still misses.
    pub partial_groups: u32,
    /// Requests in one group, LAST included. A longer group keeps no
    /// records and is answered INVALID at its LAST.
    pub requests_per_group: u32,
    /// How long a partial group waits for its LAST before it is forgotten.
    pub partial_timeout: Duration,
    /// How long the guest has to answer a raised group before it is
    /// answered INVALID ([`AutoCause::Timeout`]); `None` waits forever.
    pub response_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            groups_per_endpoint: 64,
            groups_total: 4096,
            partial_groups: 256,
            requests_per_group: 32,
            partial_timeout: Duration::from_secs(1),
            response_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// What happened to groups and requests, for `ctl stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Groups raised (LAST requests that were not stop markers).
    pub raised: u64,
    /// Groups put on the guest's event queue.
    pub delivered: u64,
    /// Guest answers, indexed by [`ResponseCode`].
    guest: [u64; ResponseCode::ALL.len()],
    /// Automatic answers, indexed by [`AutoCause`].
    auto: [u64; AutoCause::ALL.len()],
    /// PASID stop markers consumed.
    pub stop_markers: u64,
    /// PAGE_RESPs that named no group in flight.
    pub unknown_responses: u64,
    /// Groups in flight dropped unanswered because their source went away.
    pub source_gone: u64,
    /// Partial groups forgotten before their LAST (cancelled, expired,
    /// source gone).
    pub partials_discarded: u64,
    /// Requests before LAST that were not kept (limits, duplicate key).
    pub requests_dropped: u64,
}

impl Counters {
    /// Guest answers with `code`.
    pub fn guest(&self, code: ResponseCode) -> u64 {
        self.guest[code as usize]
    }

    /// Automatic answers for `cause`.
    pub fn auto(&self, cause: AutoCause) -> u64 {
        self.auto[cause as usize]
    }

    fn count(&mut self, cause: Cause) {
        match cause {
            Cause::Guest(code) => self.guest[code as usize] += 1,
            Cause::Auto(cause) => self.auto[cause as usize] += 1,
        }
    }
}

/// Where a group is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Requests arrived, LAST did not yet.
    Partial,
    /// Raised; the daemon has not yet reported its delivery.
    Delivering,
    /// On the guest's event queue, waiting for PAGE_RESP.
    AwaitingGuest,
}

/// One group for `ctl faults`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group.
    pub key: GroupKey,
    /// Who raised it.
    pub source: SourceId,
    /// Where it is.
    pub stage: Stage,
    /// Time since its first request (partial) or since it was raised.
    pub age: Duration,
}

/// What the daemon does after [`PageRequests::raise`].
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Raised {
    /// Nothing now: a request before LAST (kept or dropped); its group is
    /// answered after its LAST.
    Pending,
    /// A PASID stop marker: consumed, never answered.
    StopMarker,
    /// A group is raised: put it on the guest's event queue.
    Deliver(Delivery),
    /// The group is answered at once: send the answer.
    Answer(Answer),
}

/// A group still waiting for its LAST.
#[derive(Debug)]
struct Partial {
    source: SourceId,
    /// Its first request's time.
    since: Duration,
    records: Vec<Record>,
    /// It outgrew `requests_per_group`: its records are gone, and its LAST
    /// is answered INVALID.
    overflowed: bool,
}

/// A raised group waiting for its answer.
#[derive(Debug)]
struct InFlight {
    source: SourceId,
    token: u64,
    /// When it was raised.
    since: Duration,
    serial: u64,
    delivered: bool,
    hold: Option<PasidRef>,
}

/// The page-request groups of one device. See the module documentation
/// for the invariant every function keeps. Empty it with
/// [`PageRequests::cancel_all`] before dropping it: a group dropped in
/// flight leaks its PASID reference (and logs so).
#[derive(Debug)]
pub struct PageRequests {
    limits: Limits,
    /// A key is in at most one of `partial` and `in_flight`.
    partial: BTreeMap<GroupKey, Partial>,
    in_flight: BTreeMap<GroupKey, InFlight>,
    /// Every group's deadline (partial groups always have one).
    deadlines: BTreeSet<(Duration, GroupKey)>,
    next_serial: u64,
    /// Where [`PageRequests::free_group_id`] looks next.
    next_group_id: u16,
    counters: Counters,
}

impl PageRequests {
    /// An empty queue with these limits.
    pub fn new(limits: Limits) -> Self {
        PageRequests {
            limits,
            partial: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_serial: 0,
            next_group_id: 0,
            counters: Counters::default(),
        }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What happened so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Every group, in flight ones first, each in key order.
    pub fn groups(&self, now: Duration) -> impl Iterator<Item = GroupInfo> + '_ {
        let in_flight = self.in_flight.iter().map(move |(&key, g)| GroupInfo {
            key,
            source: g.source,
            stage: if g.delivered {
                Stage::AwaitingGuest
            } else {
                Stage::Delivering
            },
            age: now.saturating_sub(g.since),
        });
        let partial = self.partial.iter().map(move |(&key, p)| GroupInfo {
            key,
            source: p.source,
            stage: Stage::Partial,
            age: now.saturating_sub(p.since),
        });
        in_flight.chain(partial)
    }

    /// When [`PageRequests::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// Takes one request from a source. A request before LAST joins its
    /// partial group; LAST raises the group: it takes the group's PASID
    /// reference through `refs` and returns the records to deliver, or
    /// answers the group at once (duplicate key, over a limit, PASID
    /// reference refused).
    pub fn raise(
        &mut self,
        request: PageRequest,
        now: Duration,
        refs: &mut (impl PasidRefs + ?Sized),
    ) -> Raised {
        if request.is_stop_marker() {
            self.counters.stop_markers += 1;
            return Raised::StopMarker;
        }
        if !request.last {
            self.accumulate(&request, now);
            return Raised::Pending;
        }
        self.counters.raised += 1;
        let key = request.key;
        // Another group with this key is in flight, or another source is
        // gathering one: the newcomer must not disturb it.
        if self.in_flight.contains_key(&key)
            || self
                .partial
                .get(&key)
                .is_some_and(|p| p.source != request.source)
        {
            return self.answer_now(&request, AutoCause::Duplicate);
        }
        let (mut records, overflowed) = match self.remove_partial(&key) {
            // Its partial group was counted against the limits already.
            Some(p) => (p.records, p.overflowed),
            None if self.has_room(key.endpoint) => (Vec::new(), false),
            None => return self.answer_now(&request, AutoCause::Overflow),
        };
        if overflowed || records.len() >= cap(self.limits.requests_per_group) {
            return self.answer_now(&request, AutoCause::Overflow);
        }
        // Last refusal: once the reference is taken, the group is stored
        // and only its one answer (or its source's loss) gives it back.
        let hold = match key.pasid {
            None => None,
            Some(pasid) => match refs.take(key.endpoint, pasid) {
                Some(handle) => Some(PasidRef::new(key.endpoint, pasid, handle)),
                None => return self.answer_now(&request, AutoCause::Refused),
            },
        };
        records.push(Record::from(&request));
        let serial = self.next_serial;
        self.next_serial += 1;
        self.insert_in_flight(
            key,
            InFlight {
                source: request.source,
                token: request.token,
                since: now,
                serial,
                delivered: false,
                hold,
            },
        );
        Raised::Deliver(Delivery {
            key,
            serial,
            records,
        })
    }

    /// Takes one request the daemon will not raise, for `cause` (e.g. the
    /// driver did not negotiate `VIRTIO_IOMMU_F_PAGE_REQUEST`): a LAST is
    /// answered INVALID at once, with the partial group it ends; a stop
    /// marker is consumed; an earlier request is dropped.
    pub fn refuse(&mut self, request: PageRequest, cause: AutoCause) -> Raised {
        if request.is_stop_marker() {
            self.counters.stop_markers += 1;
            return Raised::StopMarker;
        }
        if !request.last {
            self.counters.requests_dropped += 1;
            return Raised::Pending;
        }
        self.counters.raised += 1;
        if self
            .partial
            .get(&request.key)
            .is_some_and(|p| p.source == request.source)
        {
            self.remove_partial(&request.key);
        }
        self.answer_now(&request, cause)
    }

    /// The group of `delivery` is on the guest's event queue. False if it
    /// was answered meanwhile (cancelled, timed out): nothing to do.
    pub fn delivered(&mut self, delivery: Delivery) -> bool {
        match self.in_flight.get_mut(&delivery.key) {
            Some(g) if g.serial == delivery.serial => {
                g.delivered = true;
                self.counters.delivered += 1;
                true
            }
            _ => false,
        }
    }

    /// The group of `delivery` could not be put on the event queue: it is
    /// answered INVALID for `cause` (no buffer, buffer too small, ...).
    /// `None` if it was answered meanwhile.
    #[must_use = "send the answer, then finish it"]
    pub fn undeliverable(&mut self, delivery: Delivery, cause: AutoCause) -> Option<Answer> {
        if self.in_flight.get(&delivery.key)?.serial != delivery.serial {
            return None;
        }
        let group = self.remove_in_flight(&delivery.key)?;
        Some(self.answer(delivery.key, group, Cause::Auto(cause)))
    }

    /// The guest's PAGE_RESP for `key`: the group's answer, or
    /// [`RequestError::NoSuchPageGroup`] (`S_NOENT`) when no group with
    /// that key is in flight.
    pub fn respond(&mut self, key: GroupKey, code: ResponseCode) -> Result<Answer, RequestError> {
        let Some(group) = self.remove_in_flight(&key) else {
            self.counters.unknown_responses += 1;
            return Err(RequestError::NoSuchPageGroup(key));
        };
        Ok(self.answer(key, group, Cause::Guest(code)))
    }

    /// Answers every group of `endpoint` INVALID for `cause` and forgets
    /// its partial groups (DETACH, ATTACH elsewhere, endpoint removed).
    #[must_use = "send every answer, then finish it"]
    pub fn cancel_endpoint(&mut self, endpoint: u32, cause: AutoCause) -> Vec<Answer> {
        let (first, last) = GroupKey::of_endpoint(endpoint);
        self.cancel(first..=last, |_, _| true, cause)
    }

    /// Answers every group of `pasid` on `endpoint` INVALID for `cause`
    /// and forgets its partial groups (DETACH_TABLE). Once the answers are
    /// sent and finished, no group holds the PASID.
    #[must_use = "send every answer, then finish it"]
    pub fn cancel_pasid(&mut self, endpoint: u32, pasid: u32, cause: AutoCause) -> Vec<Answer> {
        let (first, last) = GroupKey::of_pasid(endpoint, pasid);
        self.cancel(first..=last, |_, _| true, cause)
    }

    /// Answers every PASID-less group of `endpoint` INVALID for `cause`
    /// and forgets its partial ones (ATTACH to another domain: DMA without
    /// PASID now goes elsewhere; the endpoint's PASID bindings stay).
    #[must_use = "send every answer, then finish it"]
    pub fn cancel_untagged(&mut self, endpoint: u32, cause: AutoCause) -> Vec<Answer> {
        let key = |group_id| GroupKey {
            endpoint,
            pasid: None,
            group_id,
        };
        self.cancel(key(0)..=key(u16::MAX), |_, _| true, cause)
    }

    /// A group ID no group of (`endpoint`, `pasid`) uses, for a source
    /// that does not number its groups itself (a device model's
    /// translation). IDs go round the 9 bits of a PCIe PRGI, so a late
    /// PAGE_RESP for an old group is unlikely to name a new one. `None`
    /// when every ID is taken.
    pub fn free_group_id(&mut self, endpoint: u32, pasid: Option<u32>) -> Option<u16> {
        const PRGI_IDS: u16 = 512;
        for _ in 0..PRGI_IDS {
            let group_id = self.next_group_id % PRGI_IDS;
            self.next_group_id = self.next_group_id.wrapping_add(1);
            let key = GroupKey {
                endpoint,
                pasid,
                group_id,
            };
            if !self.in_flight.contains_key(&key) && !self.partial.contains_key(&key) {
                return Some(group_id);
            }
        }
        None
    }

    /// Groups in flight (raised, not yet answered).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// [`PageRequests::cancel_pasid`] on every endpoint (PASID_FREE of a
    /// PASID that may be bound to several endpoints).
    #[must_use = "send every answer, then finish it"]
    pub fn cancel_pasid_everywhere(&mut self, pasid: u32, cause: AutoCause) -> Vec<Answer> {
        self.cancel(all_keys(), |key, _| key.pasid == Some(pasid), cause)
    }

    /// Answers every group INVALID for `cause` and forgets every partial
    /// group (reset, frontend lost, feature not negotiated).
    #[must_use = "send every answer, then finish it"]
    pub fn cancel_all(&mut self, cause: AutoCause) -> Vec<Answer> {
        self.cancel(all_keys(), |_, _| true, cause)
    }

    /// `source` went away and can take no answer: its groups are dropped
    /// unanswered. Returns their PASID references, to release. A later
    /// PAGE_RESP for one of them finds no group (`S_NOENT`).
    #[must_use = "release every PASID reference"]
    pub fn source_gone(&mut self, source: SourceId) -> Vec<PasidRef> {
        let gone = self.remove_where(all_keys(), |_, s| s == source);
        self.counters.source_gone += gone.len() as u64;
        gone.into_iter().filter_map(|(_, g)| g.hold).collect()
    }

    /// Answers INVALID ([`AutoCause::Timeout`]) every group the guest did
    /// not answer in time, and forgets partial groups whose LAST did not
    /// come in time.
    #[must_use = "send every answer, then finish it"]
    pub fn expire(&mut self, now: Duration) -> Vec<Answer> {
        let mut answers = Vec::new();
        while let Some(&(deadline, key)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if self.remove_partial(&key).is_some() {
                self.counters.partials_discarded += 1;
            } else if let Some(group) = self.remove_in_flight(&key) {
                answers.push(self.answer(key, group, Cause::Auto(AutoCause::Timeout)));
            } else {
                // Unreachable while the index matches the tables; removing
                // the entry keeps the loop finite regardless.
                self.deadlines.remove(&(deadline, key));
            }
        }
        answers
    }
}

// Private helpers. Only `insert_*` and `remove_*` touch the tables and
// the deadline index; only `answer` and `answer_now` make answers.
impl PageRequests {
    /// Adds a request before LAST to its partial group, or opens one.
    fn accumulate(&mut self, request: &PageRequest, now: Duration) {
        let key = request.key;
        // Room for this record and, later, the LAST.
        let keep = cap(self.limits.requests_per_group).saturating_sub(1);
        if let Some(p) = self.partial.get_mut(&key) {
            if p.source == request.source {
                p.add(Record::from(request), keep, &mut self.counters);
            } else {
                self.counters.requests_dropped += 1;
            }
            return;
        }
        if self.in_flight.contains_key(&key)
            || !self.has_room(key.endpoint)
            || self.partial.len() >= cap(self.limits.partial_groups)
        {
            self.counters.requests_dropped += 1;
            return;
        }
        let mut p = Partial {
            source: request.source,
            since: now,
            records: Vec::new(),
            overflowed: false,
        };
        p.add(Record::from(request), keep, &mut self.counters);
        self.insert_partial(key, p);
    }

    /// Whether `endpoint` may open one more group.
    fn has_room(&self, endpoint: u32) -> bool {
        let (first, last) = GroupKey::of_endpoint(endpoint);
        // Counted rather than kept: at most `groups_per_endpoint` entries.
        let of_endpoint =
            self.partial.range(first..=last).count() + self.in_flight.range(first..=last).count();
        of_endpoint < cap(self.limits.groups_per_endpoint)
            && self.partial.len() + self.in_flight.len() < cap(self.limits.groups_total)
    }

    /// Removes the groups in `keys` that `pick` selects, forgetting the
    /// partial ones and answering the others INVALID for `cause`.
    fn cancel(
        &mut self,
        keys: RangeInclusive<GroupKey>,
        pick: impl Fn(&GroupKey, SourceId) -> bool,
        cause: AutoCause,
    ) -> Vec<Answer> {
        let removed = self.remove_where(keys, pick);
        removed
            .into_iter()
            .map(|(key, group)| self.answer(key, group, Cause::Auto(cause)))
            .collect()
    }

    /// Removes the groups in `keys` that `pick` selects: the partial ones
    /// are forgotten (counted), the in-flight ones returned.
    fn remove_where(
        &mut self,
        keys: RangeInclusive<GroupKey>,
        pick: impl Fn(&GroupKey, SourceId) -> bool,
    ) -> Vec<(GroupKey, InFlight)> {
        let partial: Vec<GroupKey> = self
            .partial
            .range(keys.clone())
            .filter(|(key, p)| pick(key, p.source))
            .map(|(&key, _)| key)
            .collect();
        for key in partial {
            self.remove_partial(&key);
            self.counters.partials_discarded += 1;
        }
        let in_flight: Vec<GroupKey> = self
            .in_flight
            .range(keys)
            .filter(|(key, g)| pick(key, g.source))
            .map(|(&key, _)| key)
            .collect();
        in_flight
            .into_iter()
            .filter_map(|key| Some((key, self.remove_in_flight(&key)?)))
            .collect()
    }

    /// The one answer of a group removed from the table.
    fn answer(&mut self, key: GroupKey, group: InFlight, cause: Cause) -> Answer {
        self.counters.count(cause);
        Answer {
            source: group.source,
            token: group.token,
            key,
            cause,
            hold: group.hold,
        }
    }

    /// The answer of a group that is answered as it is raised, before it
    /// holds anything.
    fn answer_now(&mut self, request: &PageRequest, cause: AutoCause) -> Raised {
        let cause = Cause::Auto(cause);
        self.counters.count(cause);
        Raised::Answer(Answer {
            source: request.source,
            token: request.token,
            key: request.key,
            cause,
            hold: None,
        })
    }

    fn insert_partial(&mut self, key: GroupKey, p: Partial) {
        self.deadlines.insert((p.deadline(&self.limits), key));
        self.partial.insert(key, p);
    }

    fn remove_partial(&mut self, key: &GroupKey) -> Option<Partial> {
        let p = self.partial.remove(key)?;
        self.deadlines.remove(&(p.deadline(&self.limits), *key));
        Some(p)
    }

    fn insert_in_flight(&mut self, key: GroupKey, g: InFlight) {
        if let Some(deadline) = g.deadline(&self.limits) {
            self.deadlines.insert((deadline, key));
        }
        self.in_flight.insert(key, g);
    }

    fn remove_in_flight(&mut self, key: &GroupKey) -> Option<InFlight> {
        let g = self.in_flight.remove(key)?;
        if let Some(deadline) = g.deadline(&self.limits) {
            self.deadlines.remove(&(deadline, *key));
        }
        Some(g)
    }
}

impl Partial {
    /// When it is forgotten if its LAST has not come.
    fn deadline(&self, limits: &Limits) -> Duration {
        self.since.saturating_add(limits.partial_timeout)
    }

    /// Keeps `record` if the group has room for it (`keep` records before
    /// LAST); otherwise the group overflows and lets go of its records.
    fn add(&mut self, record: Record, keep: usize, counters: &mut Counters) {
        if !self.overflowed && self.records.len() < keep {
            self.records.push(record);
            return;
        }
        counters.requests_dropped += 1 + self.records.len() as u64;
        self.overflowed = true;
        self.records = Vec::new();
    }
}

impl InFlight {
    /// When it is answered if the guest has not.
    fn deadline(&self, limits: &Limits) -> Option<Duration> {
        limits
            .response_timeout
            .map(|t| self.since.saturating_add(t))
    }
}

/// Every possible key.
fn all_keys() -> RangeInclusive<GroupKey> {
    GroupKey::of_endpoint(0).0..=GroupKey::of_endpoint(u32::MAX).1
}

/// A `u32` limit as a length.
fn cap(limit: u32) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}
