// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The event queue: buffers the driver posts in advance (without a kick),
//! held by the device until it has an event to report, and events waiting
//! for a buffer.
//!
//! Buffers are used strictly in the order they were popped, so the held
//! ones are always the most recently popped; stopping the ring rewinds
//! `next_avail` by their number and GET_VRING_BASE reports only the buffers
//! really used.

use std::collections::VecDeque;

use log::debug;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use viommu::{prq::AutoCause, wire::FaultRecordExt};
use vm_memory::ByteValued;

use crate::{
    chain::{Request, RingError},
    ratelimit::RateLimited,
};

type Mem = crate::iommu::Mem;

/// Events kept while the driver has posted no buffer. Beyond this, new
/// events are dropped: the first faults of a burst say the most. A saved
/// device state carries as many.
const MAX_PENDING: usize = viommu::state::MAX_PENDING_EVENTS;

/// Largest event record (the extended page-request record is 48 bytes).
pub const MAX_EVENT: usize = 64;

/// Counters for `ctl stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    pub delivered: u64,
    pub dropped: u64,
}

/// An event waiting for a buffer.
struct Pending {
    record: [u8; MAX_EVENT],
    len: usize,
    /// A shorter prefix that still says it all, for a smaller buffer: a
    /// fault in the 48-byte extended record falls back to the spec's 24
    /// bytes (extension profile).
    min_len: usize,
}

/// Why a page-request group did not reach the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// Fewer buffers than records (or no ring yet).
    NoBuffer,
    /// A buffer smaller than the 48-byte record.
    BufferTooSmall,
}

impl From<Undelivered> for AutoCause {
    fn from(u: Undelivered) -> Self {
        match u {
            Undelivered::NoBuffer => AutoCause::NoBuffer,
            Undelivered::BufferTooSmall => AutoCause::BufferTooSmall,
        }
    }
}

struct Held {
    head: u16,
    buf: Request,
}

/// State of the event queue.
#[derive(Default)]
pub struct EventQueue {
    vring: Option<VringRwLock>,
    held: VecDeque<Held>,
    pending: VecDeque<Pending>,
    /// Spare gather buffers, so holding buffers does not allocate.
    spare: Vec<Request>,
    stats: EventStats,
    /// The driver broke the ring (avail index more than a queue size
    /// ahead): it is left alone until it is stopped or reset.
    broken: bool,
    /// Everything the guest can cause here is logged at most once a
    /// second.
    guest_errors: RateLimited,
    /// Buffers were used without notifying the driver yet.
    unsignalled: bool,
}

impl EventQueue {
    pub fn stats(&self) -> EventStats {
        self.stats
    }

    /// Buffers currently held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Events waiting for a buffer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Pops every buffer the driver made available and delivers pending
    /// events into them (the event queue was kicked or enabled).
    pub fn refill(&mut self, vring: &VringRwLock, mem: &Mem) {
        self.vring = Some(vring.clone());
        self.pop_available(mem);
        self.flush(mem);
    }

    /// The Linux driver posts its event buffers without a kick, so the
    /// device looks at the avail ring whenever it has something to report.
    fn pop_available(&mut self, mem: &Mem) {
        let Some(vring) = self.vring.clone() else {
            return;
        };
        if self.broken {
            return;
        }
        let guard = mem.memory();
        match crate::chain::available(&vring, &guard) {
            Ok(_) => {}
            Err(RingError::Unreadable) => return,
            Err(e) => {
                self.broken = true;
                self.guest_errors.error(format_args!(
                    "event queue broken: {e}; it is left alone until the driver resets it"
                ));
                return;
            }
        }
        while let Some(chain) = crate::chain::pop(&vring, guard.clone()) {
            let head = chain.head_index();
            let mut buf = self.spare.pop().unwrap_or_default();
            match buf.gather(chain, &guard) {
                Ok(()) => self.held.push_back(Held { head, buf }),
                Err(e) => {
                    // Keep the FIFO order: hand the unusable buffer back now.
                    self.guest_errors
                        .warn(format_args!("event buffer {head}: {e}"));
                    self.complete(head, 0);
                    self.spare.push(buf);
                }
            }
        }
    }

    /// Reports `record`, now if a buffer is held, later otherwise.
    pub fn post(&mut self, record: &[u8], mem: &Mem) {
        self.post_later(record);
        if self.held.is_empty() {
            self.pop_available(mem);
        }
        self.flush(mem);
    }

    /// The events waiting for a buffer, oldest first (to save them with
    /// the device state).
    pub fn pending_records(&self) -> Vec<Vec<u8>> {
        self.pending
            .iter()
            .map(|p| p.record[..p.len].to_vec())
            .collect()
    }

    /// Replaces the events waiting for a buffer with `records`, oldest
    /// first (a restored device state, which holds at most as many as
    /// the queue keeps). They are delivered like any pending event.
    pub fn replace_pending(&mut self, records: &[Vec<u8>]) {
        self.pending.clear();
        for r in records {
            self.post_later(r);
        }
    }

    /// Delivers pending events into the buffers the driver made
    /// available, if any.
    pub fn deliver(&mut self, mem: &Mem) {
        if !self.pending.is_empty() {
            self.pop_available(mem);
            self.flush(mem);
        }
    }

    /// Queues `record` until the next refill (no guest memory yet).
    pub fn post_later(&mut self, record: &[u8]) {
        if self.pending.len() >= MAX_PENDING {
            self.stats.dropped += 1;
            self.guest_errors.warn(format_args!(
                "event queue full: event dropped (driver posts no buffers)"
            ));
            return;
        }
        let len = record.len().min(MAX_EVENT);
        let mut entry = Pending {
            record: [0u8; MAX_EVENT],
            len,
            min_len: len.min(std::mem::size_of::<viommu::wire::FaultRecord>()),
        };
        entry.record[..len].copy_from_slice(&record[..len]);
        self.pending.push_back(entry);
    }

    /// Puts a page-request group on the queue: each record in a buffer of
    /// its own, all of them or none (a driver that sees part of a group
    /// waits for a LAST that never comes). Faults waiting for a buffer go
    /// first. The driver is notified by [`Self::notify`], once for all the
    /// groups of a batch.
    pub fn post_group(&mut self, records: &[FaultRecordExt], mem: &Mem) -> Result<(), Undelivered> {
        if self.vring.is_none() || self.broken {
            return Err(Undelivered::NoBuffer);
        }
        self.deliver(mem);
        if self.held.len() < records.len() {
            self.pop_available(mem);
        }
        if !self.pending.is_empty() || self.held.len() < records.len() {
            return Err(Undelivered::NoBuffer);
        }
        let size = std::mem::size_of::<FaultRecordExt>();
        if self
            .held
            .iter()
            .take(records.len())
            .any(|h| h.buf.writable_len() < size)
        {
            return Err(Undelivered::BufferTooSmall);
        }
        let guard = mem.memory();
        let held: Vec<Held> = self.held.drain(..records.len()).collect();
        let mut failed = None;
        for (h, r) in held.iter().zip(records) {
            if let Err(e) = h.buf.write_at(&guard, 0, r.as_slice()) {
                failed = Some(format!("event buffer {}: {e}", h.head));
                break;
            }
        }
        // All or nothing: a buffer the device cannot write makes the
        // whole group empty events (the guest ignores those).
        let len = if failed.is_some() { 0 } else { size as u32 };
        for h in held {
            self.complete(h.head, len);
            self.spare.push(h.buf);
        }
        self.unsignalled = true;
        match failed {
            Some(why) => {
                self.guest_errors
                    .warn(format_args!("{why}: page-request group not delivered"));
                Err(Undelivered::NoBuffer)
            }
            None => {
                self.stats.delivered += records.len() as u64;
                Ok(())
            }
        }
    }

    fn flush(&mut self, mem: &Mem) {
        if self.vring.is_none() {
            return;
        }
        let guard = mem.memory();
        let mut used = false;
        while !self.pending.is_empty() {
            let Some(held) = self.held.pop_front() else {
                break;
            };
            let Some(event) = self.pending.pop_front() else {
                break;
            };
            let room = held.buf.writable_len();
            let len = if room >= event.len {
                event.len
            } else {
                event.min_len
            };
            let written = if room < len {
                // Never split a record across buffers (virtio-iommu 1.3).
                self.guest_errors.warn(format_args!(
                    "event buffer of {room} bytes is too small for a {len}-byte event"
                ));
                self.pending.push_front(event);
                0
            } else {
                match held.buf.write_at(&guard, 0, &event.record[..len]) {
                    Ok(()) => {
                        self.stats.delivered += 1;
                        len
                    }
                    Err(e) => {
                        self.guest_errors
                            .warn(format_args!("event buffer {}: {e}", held.head));
                        self.pending.push_front(event);
                        0
                    }
                }
            };
            self.complete(held.head, written as u32);
            self.spare.push(held.buf);
            used = true;
        }
        if used {
            self.signal();
        }
    }

    fn complete(&self, head: u16, len: u32) {
        if let Some(vring) = &self.vring {
            if let Err(e) = vring.add_used(head, len) {
                self.guest_errors
                    .warn(format_args!("event queue add_used: {e}"));
            }
        }
    }

    /// Notifies the driver of the groups [`Self::post_group`] put on the
    /// queue since the last call.
    pub fn notify(&mut self) {
        if std::mem::take(&mut self.unsignalled) {
            self.signal();
        }
    }

    fn signal(&self) {
        if let Some(vring) = &self.vring {
            match vring.needs_notification() {
                Ok(true) => {
                    if let Err(e) = vring.signal_used_queue() {
                        self.guest_errors
                            .warn(format_args!("event queue signal: {e}"));
                    }
                }
                Ok(false) => {}
                Err(e) => self
                    .guest_errors
                    .warn(format_args!("event queue notification check: {e}")),
            }
        }
    }

    /// The ring is stopping (GET_VRING_BASE): give the held buffers back
    /// by rewinding `next_avail`, so the frontend sees them as unused.
    pub fn stop(&mut self) {
        let held = self.held.len();
        if let Some(vring) = self.vring.take() {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let next = queue.next_avail();
            queue.set_next_avail(next.wrapping_sub(held as u16));
            debug!(
                "event queue stopped with {held} buffers held; next_avail {next} -> {}",
                queue.next_avail()
            );
        }
        self.spare.extend(self.held.drain(..).map(|h| h.buf));
        self.broken = false;
    }

    /// Forgets buffers and events (device reset or a new connection).
    pub fn reset(&mut self, keep_pending: bool) {
        self.vring = None;
        self.broken = false;
        self.spare.extend(self.held.drain(..).map(|h| h.buf));
        if !keep_pending {
            self.pending.clear();
        }
    }
}
