// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver side of a split virtqueue, laid out byte-exactly in guest
//! memory (virtio 1.2 §2.7), for tests and benchmarks that play the guest.
//!
//! Not `virtio_queue::mock::MockSplitQueue`: its used ring overlaps the
//! avail ring's `used_event` word, which breaks EVENT_IDX.

#![allow(dead_code)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Guest addresses of one split ring.
#[derive(Clone, Copy, Debug)]
pub struct RingLayout {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl RingLayout {
    /// Places the three rings from `base`; returns the layout and the
    /// first free address after them.
    pub fn at(base: u64, size: u16) -> (Self, u64) {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        // flags, idx, ring[n], used_event
        let avail_end = avail + 4 + 2 * n + 2;
        let used = (avail_end + 3) & !3;
        // flags, idx, ring[n] of {id, len}, avail_event
        let used_end = used + 4 + 8 * n + 2;
        let layout = RingLayout {
            size,
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
        };
        (layout, (used_end + 0xfff) & !0xfff)
    }

    pub fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size))
    }

    pub fn avail_event_addr(&self) -> GuestAddress {
        GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size))
    }
}

/// A buffer of a descriptor chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// Driver state of one split ring.
pub struct DriverRing {
    pub layout: RingLayout,
    /// Next free descriptor (descriptors are used round-robin; chains
    /// complete in order in these tests).
    next_desc: u16,
    /// Driver's shadow of avail.idx (published by `publish`).
    avail_idx: u16,
    last_used: u16,
}

impl DriverRing {
    pub fn new(mem: &GuestMemoryMmap, layout: RingLayout) -> Self {
        let bytes = layout.avail_event_addr().0 + 2 - layout.desc.0;
        mem.write_slice(&vec![0u8; bytes as usize], layout.desc)
            .unwrap();
        DriverRing {
            layout,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Writes a chain into the descriptor table and the avail ring without
    /// publishing it; returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let size = self.layout.size;
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % size;
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let at = self.layout.desc.0 + 16 * u64::from(idx);
            mem.write_obj(b.addr, GuestAddress(at)).unwrap();
            mem.write_obj(b.len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
            self.next_desc = next;
        }
        let slot = self.avail_idx % size;
        let at = self.layout.avail.0 + 4 + 2 * u64::from(slot);
        mem.write_obj(head, GuestAddress(at)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        head
    }

    /// Offers an already written chain again (benchmarks reuse chains so
    /// that the driver side costs next to nothing).
    pub fn add_head(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail_idx % self.layout.size;
        let at = self.layout.avail.0 + 4 + 2 * u64::from(slot);
        mem.write_obj(head, GuestAddress(at)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Offers `count` already written chains whose heads are `entries`
    /// (little-endian u16s) with one guest-memory write (two where the
    /// ring wraps).
    pub fn add_heads(&mut self, mem: &GuestMemoryMmap, entries: &[u8], count: u16) {
        let slot = self.avail_idx % self.layout.size;
        let first = count.min(self.layout.size - slot);
        let ring = self.layout.avail.0 + 4;
        let (a, b) = entries.split_at(2 * usize::from(first));
        mem.write_slice(a, GuestAddress(ring + 2 * u64::from(slot)))
            .unwrap();
        if !b.is_empty() {
            mem.write_slice(b, GuestAddress(ring)).unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(count);
    }

    /// Makes every added chain visible to the device.
    pub fn publish(&mut self, mem: &GuestMemoryMmap) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write_obj(self.avail_idx, GuestAddress(self.layout.avail.0 + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Next used element, if the device returned one.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.layout.used.0 + 2)).unwrap();
        if idx == self.last_used {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let slot = self.last_used % self.layout.size;
        let at = self.layout.used.0 + 4 + 8 * u64::from(slot);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.layout.used.0 + 2)).unwrap()
    }

    /// Whether the device asked not to be kicked (EVENT_IDX off).
    pub fn device_wants_kick(&self, mem: &GuestMemoryMmap, event_idx: bool, old: u16) -> bool {
        if event_idx {
            let avail_event: u16 = mem.read_obj(self.layout.avail_event_addr()).unwrap();
            // vring_need_event(avail_event, new, old)
            self.avail_idx.wrapping_sub(avail_event).wrapping_sub(1)
                < self.avail_idx.wrapping_sub(old)
        } else {
            let flags: u16 = mem.read_obj(self.layout.used).unwrap();
            flags & 1 == 0
        }
    }

    /// Publishes `idx` as avail.idx whatever was added: a broken driver.
    pub fn publish_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        self.publish(mem);
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Sets avail.flags (e.g. `VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap, flags: u16) {
        mem.write_obj(flags, self.layout.avail).unwrap();
    }

    /// Sets the used_event word (EVENT_IDX).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, self.layout.used_event_addr()).unwrap();
    }
}
