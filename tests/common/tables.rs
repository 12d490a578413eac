// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest page tables built in the test guest's memory, as a guest kernel
//! builds them: x86-64 first-stage (4- and 5-level, 4 KiB / 2 MiB / 1 GiB
//! pages) and Arm SMMUv3 context descriptors with AArch64 stage-1 tables.

#![allow(dead_code)]

use std::cell::Cell;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// x86-64 entry bits.
pub const P: u64 = 1 << 0;
pub const RW: u64 = 1 << 1;
pub const US: u64 = 1 << 2;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const PS: u64 = 1 << 7;
pub const XD: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// A bump allocator of zeroed, naturally aligned blocks of guest RAM
/// (its own handle on the memory, shared with the guest's).
pub struct TableArena {
    pub mem: GuestMemoryMmap,
    next: Cell<u64>,
    end: u64,
}

impl TableArena {
    pub fn new(mem: &GuestMemoryMmap, start: u64, end: u64) -> Self {
        TableArena {
            mem: mem.clone(),
            next: Cell::new(start),
            end,
        }
    }

    pub fn alloc(&self, size: u64) -> u64 {
        let at = self.next.get().next_multiple_of(size);
        assert!(at + size <= self.end, "table arena exhausted");
        self.next.set(at + size);
        self.mem
            .write_slice(&vec![0u8; size as usize], GuestAddress(at))
            .unwrap();
        at
    }

    pub fn read(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    pub fn write(&self, gpa: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(gpa)).unwrap();
    }
}

/// An x86-64 address space: `levels` 4 or 5.
pub struct X86Table<'a> {
    pub arena: &'a TableArena,
    pub root: u64,
    pub levels: u32,
}

impl<'a> X86Table<'a> {
    pub fn new(arena: &'a TableArena, levels: u32) -> Self {
        X86Table {
            root: arena.alloc(0x1000),
            arena,
            levels,
        }
    }

    /// Address width for ATTACH_TABLE.
    pub fn addr_width(&self) -> u32 {
        if self.levels == 5 {
            57
        } else {
            48
        }
    }

    /// The entry for `va` at `level` (1 = 4 KiB leaf), creating the
    /// directories above it (present, writable, user).
    pub fn entry(&self, va: u64, level: u32) -> u64 {
        let mut table = self.root;
        for l in (level + 1..=self.levels).rev() {
            let e = table + ((va >> (12 + 9 * (l - 1))) & 0x1ff) * 8;
            let v = self.arena.read(e);
            table = if v & P != 0 {
                v & ADDR
            } else {
                let next = self.arena.alloc(0x1000);
                self.arena.write(e, next | P | RW | US);
                next
            };
        }
        table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8
    }

    /// Maps the page of `va` at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB)
    /// to `gpa` with `flags` (P added).
    pub fn map(&self, va: u64, level: u32, gpa: u64, flags: u64) {
        let ps = if level > 1 { PS } else { 0 };
        self.arena
            .write(self.entry(va, level), gpa | flags | ps | P);
    }

    /// Removes the 4 KiB mapping of `va` (the guest's munmap).
    pub fn unmap(&self, va: u64) {
        self.arena.write(self.entry(va, 1), 0);
    }
}

/// Arm stage-1 descriptor bits.
pub const VALID: u64 = 1 << 0;
pub const TABLE: u64 = 1 << 1;
pub const AP_EL0: u64 = 1 << 6;
pub const AP_RO: u64 = 1 << 7;
pub const AF: u64 = 1 << 10;
pub const DBM: u64 = 1 << 51;
const CD_V: u64 = 1 << 31;
const CD_AA64: u64 = 1 << 41;
const CD_HD: u64 = 1 << 42;
const CD_HA: u64 = 1 << 43;
const IPS_48: u64 = 5 << 32;

/// A linear CD table of `2^cdmax` CDs; each CD gets its own 4 KiB-granule
/// stage-1 table (T0SZ 16) with hardware access-flag and dirty updates.
pub struct CdTable<'a> {
    pub arena: &'a TableArena,
    pub base: u64,
    pub cdmax: u32,
}

impl<'a> CdTable<'a> {
    pub fn new(arena: &'a TableArena, cdmax: u32) -> Self {
        CdTable {
            base: arena.alloc((64u64 << cdmax).max(64)),
            arena,
            cdmax,
        }
    }

    /// Makes CD `ssid` valid with a fresh table; returns the table root.
    pub fn add_cd(&self, ssid: u32) -> u64 {
        let ttb0 = self.arena.alloc(0x1000);
        let cd = self.base + u64::from(ssid) * 64;
        self.arena
            .write(cd, 16 | CD_V | CD_AA64 | IPS_48 | CD_HA | CD_HD);
        self.arena.write(cd + 8, ttb0);
        ttb0
    }

    /// Maps the 4 KiB page of `va` in the table at `ttb0` to `gpa`.
    pub fn map(&self, ttb0: u64, va: u64, gpa: u64, attrs: u64) {
        let mut table = ttb0;
        for level in 0..3 {
            let e = table + ((va >> (39 - 9 * level)) & 0x1ff) * 8;
            let v = self.arena.read(e);
            table = if v & VALID != 0 {
                v & 0x0000_ffff_ffff_f000
            } else {
                let next = self.arena.alloc(0x1000);
                self.arena.write(e, next | VALID | TABLE);
                next
            };
        }
        let e = table + ((va >> 12) & 0x1ff) * 8;
        self.arena.write(e, gpa | VALID | TABLE | attrs);
    }

    /// The leaf descriptor address of `va` in the table at `ttb0`.
    pub fn leaf(&self, ttb0: u64, va: u64) -> u64 {
        let mut table = ttb0;
        for level in 0..3 {
            let e = table + ((va >> (39 - 9 * level)) & 0x1ff) * 8;
            table = self.arena.read(e) & 0x0000_ffff_ffff_f000;
        }
        table + ((va >> 12) & 0x1ff) * 8
    }
}
