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

use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use crate::chain::Request;

type Mem = crate::iommu::Mem;

/// Events kept while the driver has posted no buffer. Beyond this, new
/// events are dropped: the first faults of a burst say the most.
const MAX_PENDING: usize = 256;

/// Largest event record (the extended page-request record is 48 bytes).
pub const MAX_EVENT: usize = 64;

/// Counters for `ctl stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    pub delivered: u64,
    pub dropped: u64,
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
    pending: VecDeque<([u8; MAX_EVENT], usize)>,
    /// Spare gather buffers, so holding buffers does not allocate.
    spare: Vec<Request>,
    stats: EventStats,
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
        let guard = mem.memory();
        while let Some(chain) = crate::chain::pop(&vring, guard.clone()) {
            let head = chain.head_index();
            let mut buf = self.spare.pop().unwrap_or_default();
            match buf.gather(chain, &guard) {
                Ok(()) => self.held.push_back(Held { head, buf }),
                Err(e) => {
                    // Keep the FIFO order: hand the unusable buffer back now.
                    warn!("event buffer {head}: {e}");
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

    /// Queues `record` until the next refill (no guest memory yet).
    pub fn post_later(&mut self, record: &[u8]) {
        if self.pending.len() >= MAX_PENDING {
            self.stats.dropped += 1;
            warn!("event queue full: event dropped (driver posts no buffers)");
            return;
        }
        let mut entry = ([0u8; MAX_EVENT], record.len().min(MAX_EVENT));
        entry.0[..entry.1].copy_from_slice(&record[..entry.1]);
        self.pending.push_back(entry);
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
            let Some((record, len)) = self.pending.pop_front() else {
                break;
            };
            let written = if held.buf.writable_len() < len {
                // Never split a record across buffers (virtio-iommu 1.3).
                warn!(
                    "event buffer of {} bytes is too small for a {len}-byte event",
                    held.buf.writable_len()
                );
                self.pending.push_front((record, len));
                0
            } else {
                match held.buf.write_at(&guard, 0, &record[..len]) {
                    Ok(()) => {
                        self.stats.delivered += 1;
                        len
                    }
                    Err(e) => {
                        warn!("event buffer {}: {e}", held.head);
                        self.pending.push_front((record, len));
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
                warn!("event queue add_used: {e}");
            }
        }
    }

    fn signal(&self) {
        if let Some(vring) = &self.vring {
            match vring.needs_notification() {
                Ok(true) => {
                    if let Err(e) = vring.signal_used_queue() {
                        warn!("event queue signal: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => warn!("event queue notification check: {e}"),
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
    }

    /// Forgets buffers and events (device reset or a new connection).
    pub fn reset(&mut self, keep_pending: bool) {
        self.vring = None;
        self.spare.extend(self.held.drain(..).map(|h| h.buf));
        if !keep_pending {
            self.pending.clear();
        }
    }
}
