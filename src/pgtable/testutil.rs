// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test helpers: a small guest memory with a bump allocator for tables,
//! and a [`TableMemory`] wrapper that plays a guest racing the walker.

use std::cell::Cell;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{TableMemory, TableMemoryError};

/// Guest RAM `[0, size)` and a bump allocator of naturally aligned blocks.
pub struct TestMem {
    pub mem: GuestMemoryMmap<()>,
    pub size: u64,
    next: Cell<u64>,
}

impl TestMem {
    /// RAM of `size` bytes; allocations start at 64 KiB so that GPA 0 and
    /// small garbage pointers never hit a table.
    pub fn new(size: u64) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .expect("guest memory");
        TestMem {
            mem,
            size,
            next: Cell::new(0x1_0000),
        }
    }

    /// A zeroed block of `size` bytes aligned to `size`.
    pub fn alloc(&self, size: u64) -> u64 {
        let at = self.next.get().next_multiple_of(size);
        self.next.set(at + size);
        assert!(at + size <= self.size, "test memory exhausted");
        at
    }

    pub fn write(&self, gpa: u64, value: u64) {
        self.mem
            .write_obj(value.to_le(), GuestAddress(gpa))
            .expect("write in RAM");
    }

    pub fn read(&self, gpa: u64) -> u64 {
        u64::from_le(self.mem.read_obj(GuestAddress(gpa)).expect("read in RAM"))
    }
}

/// Plays a guest that rewrites the entry at `target` just before each of
/// the walker's compare-exchanges on it, `times` times, with `rewrite`
/// applied to the value the walker expected.
pub struct Racy<'a> {
    pub inner: &'a GuestMemoryMmap<()>,
    pub target: u64,
    pub times: Cell<u32>,
    pub rewrite: fn(u64) -> u64,
    pub cas_seen: Cell<u32>,
}

impl<'a> Racy<'a> {
    pub fn new(mem: &'a TestMem, target: u64, times: u32, rewrite: fn(u64) -> u64) -> Self {
        Racy {
            inner: &mem.mem,
            target,
            times: Cell::new(times),
            rewrite,
            cas_seen: Cell::new(0),
        }
    }
}

impl TableMemory for Racy<'_> {
    fn read_u64(&self, gpa: u64) -> Result<u64, TableMemoryError> {
        self.inner.read_u64(gpa)
    }

    fn compare_exchange_u64(
        &self,
        gpa: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, TableMemoryError> {
        self.cas_seen.set(self.cas_seen.get() + 1);
        if gpa == self.target && self.times.get() > 0 {
            self.times.set(self.times.get() - 1);
            let changed = (self.rewrite)(current);
            self.inner
                .write_obj(changed.to_le(), GuestAddress(gpa))
                .expect("write in RAM");
        }
        self.inner.compare_exchange_u64(gpa, current, new)
    }
}
