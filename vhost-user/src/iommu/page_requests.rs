// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page requests through the [`Iommu`]: raised by sources under the
//! model's write lock and put on the guest's event queue at once (or
//! answered INVALID when they cannot be), answered after the lock is
//! released, each answer sent to its source before the group's PASID
//! reference is given back.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use viommu::{
    pgtable,
    prq::{
        iommufd, Answer, AutoCause, Cause, Delivery, GroupKey, PageAccess, PageRequest,
        ResponseCode, SourceId,
    },
    wire::{FaultRecordExt, HwptPgfault},
    Viommu,
};
use viommu_protocol::messages::PageResponse;

use super::{Iommu, Mem};
use crate::{
    eventq::Undelivered,
    faults::{FaultQueue, Route, Sources},
    hub::{lock, Client},
    pasid_manager::PasidService,
    ratelimit::RateLimited,
};

/// What happened to page requests before the device model saw them, or
/// to their answers after it decided them.
pub(crate) struct PageSourceStats {
    /// Fault-queue records of a device the queue's owner did not route.
    pub(crate) unknown_device: AtomicU64,
    /// Fault-queue records with a host PASID that is not this VM's.
    pub(crate) unknown_pasid: AtomicU64,
    /// Fault-queue records with a group index wider than 16 bits.
    pub(crate) bad_group: AtomicU64,
    /// Answers whose source could not take them (gone, or the write
    /// failed).
    pub(crate) answers_lost: AtomicU64,
    /// Responses written to fault queues.
    pub(crate) queue_responses: AtomicU64,
    /// PAGE_RESPONSEs queued for control clients.
    pub(crate) client_responses: AtomicU64,
    /// Source errors, logged at most once a second.
    errors: RateLimited,
}

impl Default for PageSourceStats {
    fn default() -> Self {
        PageSourceStats {
            unknown_device: AtomicU64::new(0),
            unknown_pasid: AtomicU64::new(0),
            bad_group: AtomicU64::new(0),
            answers_lost: AtomicU64::new(0),
            queue_responses: AtomicU64::new(0),
            client_responses: AtomicU64::new(0),
            errors: RateLimited::new(Duration::from_secs(1)),
        }
    }
}

/// Responses (cookie, code) waiting to be written on one fault queue.
type QueueResponses = (Arc<FaultQueue>, Vec<(u32, ResponseCode)>);

/// The PAGE_RESPONSE `cause` of an answer: 0 for the guest's, else the
/// device's reason numbered from 1 in `AutoCause::ALL` order.
pub(crate) fn cause_code(cause: Cause) -> u8 {
    match cause {
        Cause::Guest(_) => 0,
        Cause::Auto(c) => AutoCause::ALL
            .iter()
            .position(|&a| a == c)
            .map_or(u8::MAX, |i| i as u8 + 1),
    }
}

impl Iommu {
    /// Time on the page-request clock.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Time on the page-request clock (ages in `ctl faults`).
    pub(crate) fn page_request_clock(&self) -> Duration {
        self.now()
    }

    pub(crate) fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        lock(&self.sources)
    }

    /// The source of `client`'s page requests.
    pub(crate) fn client_source(&self, client: &Arc<Client>) -> SourceId {
        self.sources().client(client)
    }

    /// Takes page requests from one source: each complete group goes on
    /// the event queue, in the same hold of the model's lock that raised
    /// it, or is answered INVALID; the answers go out once the lock is
    /// released.
    pub(crate) fn raise(&self, requests: Vec<PageRequest>) {
        if requests.is_empty() {
            return;
        }
        let now = self.now();
        let mem = self.memory();
        let mut refs = self.binding_refs();
        let mut model = self.model_mut();
        for r in requests {
            if let Some(d) = model.raise_page_request(r, now, &mut refs) {
                self.deliver(&mut model, d, mem.as_ref());
            }
        }
        // One interrupt for the whole batch.
        self.events().notify();
        self.publish(model);
        refs.finish();
    }

    /// A translation by a device model faulted where the guest can fix
    /// it: raises a one-page group for `address` whose answer goes to
    /// `source` as a PAGE_RESPONSE with `tag`. Device models do not
    /// number groups, so the device picks a group ID free for the
    /// (endpoint, PASID).
    pub(crate) fn raise_fault(
        &self,
        source: SourceId,
        tag: u32,
        endpoint: u32,
        pasid: u32,
        address: u64,
        access: pgtable::PageAccess,
    ) {
        let now = self.now();
        let mem = self.memory();
        let mut refs = self.binding_refs();
        let mut model = self.model_mut();
        let pasid = (pasid != 0).then_some(pasid);
        // With every ID taken, group 0 is in flight: answered Duplicate.
        let group_id = model.free_group_id(endpoint, pasid).unwrap_or(0);
        let request = PageRequest {
            source,
            token: u64::from(tag),
            key: GroupKey {
                endpoint,
                pasid,
                group_id,
            },
            address,
            access: PageAccess {
                read: !access.write,
                write: access.write,
                exec: access.execute,
                privileged: access.privileged,
            },
            last: true,
            private_data: None,
        };
        if let Some(d) = model.raise_page_request(request, now, &mut refs) {
            self.deliver(&mut model, d, mem.as_ref());
            self.events().notify();
        }
        self.publish(model);
        refs.finish();
    }

    /// Records read from a host fault queue: translated to the guest's
    /// endpoint and PASID, then raised; a record that cannot be routed is
    /// counted, and its group (at its LAST record) answered INVALID on
    /// the queue at once.
    pub(crate) fn fault_records(&self, queue: &FaultQueue, records: &[HwptPgfault]) {
        let mut requests = Vec::with_capacity(records.len());
        for r in records {
            let routed = iommufd::page_request(
                r,
                queue.source,
                |dev| queue.endpoint_of(dev),
                |host| self.guest_pasid(host),
            );
            match routed {
                Ok(req) => requests.push(req),
                Err(why) => {
                    let counter = match why {
                        iommufd::Unroutable::UnknownDevice(_) => &self.source_stats.unknown_device,
                        iommufd::Unroutable::UnknownPasid(_) => &self.source_stats.unknown_pasid,
                        iommufd::Unroutable::GroupId(_) => &self.source_stats.bad_group,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    self.source_stats
                        .errors
                        .warn(format_args!("fault queue record refused: {why}"));
                    if iommufd::is_last(r) {
                        let cookie = r.cookie.to_native();
                        self.respond_on_queue(queue, &[(cookie, ResponseCode::Invalid)]);
                    }
                }
            }
        }
        self.raise(requests);
    }

    /// The guest PASID of a host PASID a host device used.
    fn guest_pasid(&self, host: u32) -> Option<u32> {
        match &self.pasids {
            PasidService::Global(shared) => shared.lock().to_guest(host).ok(),
            PasidService::Identity { bits } => (u64::from(host) >> bits == 0).then_some(host),
            PasidService::Disabled => None,
        }
    }

    /// Puts a raised group on the event queue and tells the model how it
    /// went (the model's lock is held: `model` before `events`).
    fn deliver(&self, model: &mut Viommu, d: Delivery, mem: Option<&Mem>) {
        let records: Vec<FaultRecordExt> = d.records().collect();
        let result = match mem {
            Some(m) => self.events().post_group(&records, m),
            None => Err(Undelivered::NoBuffer),
        };
        model.page_request_delivered(d, result.err().map(AutoCause::from));
    }

    /// Sends each answer to its source, then gives the group's PASID
    /// reference back (without the model's lock: it may journal).
    pub(super) fn send_answers(&self, answers: Vec<Answer>) {
        if answers.is_empty() {
            return;
        }
        let mut refs = self.binding_refs();
        let mut wake = false;
        // Responses for fault queues go out one write per queue (the
        // kernel takes an array of them).
        let mut batches: Vec<QueueResponses> = Vec::new();
        for a in answers {
            let route = self.sources().route(a.source);
            let sent = match route {
                Some(Route::Client(client)) => match client.upgrade() {
                    Some(c) => {
                        let m = PageResponse {
                            // The token is the TRANSLATE's tag.
                            tag: a.token as u32,
                            code: a.code().wire(),
                            cause: cause_code(a.cause),
                        };
                        let queued = c.queue(&m.into());
                        wake |= !c.flush_if_ready();
                        if queued {
                            self.source_stats
                                .client_responses
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        queued
                    }
                    None => false,
                },
                Some(Route::Queue(q)) => {
                    let response = (a.token as u32, a.code());
                    match batches.iter_mut().find(|(b, _)| Arc::ptr_eq(b, &q)) {
                        Some((_, rs)) => rs.push(response),
                        None => batches.push((q, vec![response])),
                    }
                    true
                }
                None => false,
            };
            if !sent {
                self.source_stats
                    .answers_lost
                    .fetch_add(1, Ordering::Relaxed);
            }
            a.finish(&mut refs);
        }
        for (q, responses) in batches {
            self.respond_on_queue(&q, &responses);
        }
        if wake {
            self.hub.wake_server();
        }
        refs.finish();
    }

    /// Writes `responses` (cookie, code) on a fault queue in one write;
    /// a failed write loses them all (counted).
    fn respond_on_queue(&self, queue: &FaultQueue, responses: &[(u32, ResponseCode)]) {
        let n = responses.len() as u64;
        match queue.respond(responses) {
            Ok(()) => {
                self.source_stats
                    .queue_responses
                    .fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.source_stats
                    .answers_lost
                    .fetch_add(n, Ordering::Relaxed);
                self.source_stats
                    .errors
                    .warn(format_args!("fault queue: writing {n} responses: {e}"));
            }
        }
    }

    /// Sources that went away (a client disconnected, a fault queue hung
    /// up): their groups are dropped unanswered, their PASID references
    /// given back.
    pub(crate) fn sources_gone(&self, sources: &[SourceId]) {
        if sources.is_empty() {
            return;
        }
        let mut refs = self.binding_refs();
        let mut model = self.model_mut();
        for &s in sources {
            model.page_request_source_gone(s, &mut refs);
        }
        drop(model);
        refs.finish();
    }

    /// When [`Self::expire_page_requests`] next has something to do.
    pub(crate) fn page_request_deadline(&self) -> Option<Instant> {
        self.model()
            .next_page_request_deadline()
            .map(|d| self.epoch + d)
    }

    /// Answers INVALID the groups whose time is up.
    pub(crate) fn expire_page_requests(&self) {
        let now = self.now();
        let mut model = self.model_mut();
        if model.next_page_request_deadline().is_some_and(|d| d <= now) {
            model.expire_page_requests(now);
        }
        self.publish(model);
    }

    /// The frontend went away: the guest cannot answer what it was sent,
    /// so every group is answered INVALID now, and its PASID bindings go
    /// (`Viommu::frontend_lost`).
    pub(crate) fn frontend_lost(&self) {
        // In order: the model stops translating through the bindings,
        // the clients drop what they cached, then the references go.
        let mut refs = self.binding_refs();
        let mut model = self.model_mut();
        model.frontend_lost(&mut refs);
        self.publish(model);
        refs.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_response_causes_number_the_device_reasons_from_one() {
        use viommu::prq::ResponseCode;
        assert_eq!(cause_code(Cause::Guest(ResponseCode::Success)), 0);
        assert_eq!(cause_code(Cause::Auto(AutoCause::ALL[0])), 1);
        assert_eq!(
            cause_code(Cause::Auto(AutoCause::Refused)),
            AutoCause::ALL.len() as u8
        );
    }
}
