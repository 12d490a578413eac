// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the VT-d first-stage walker on real x86-64 tables built in a
//! guest memory, one test per rule.

use super::testutil::{Racy, TestMem};
use super::{
    ConfigError, PageAccess, PageTranslation, VtdConfig, VtdFirstStage, WalkFault,
    MAX_UPDATE_RETRIES, VTD_S1_EAFE, VTD_S1_SRE, VTD_S1_WPE,
};

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const EA: u64 = 1 << 10;
const XD: u64 = 1 << 63;
const TABLE: u64 = P | RW | US;
const LEAF: u64 = P | RW | US;

const K4: u32 = 12;
const M2: u32 = 21;
const G1: u32 = 30;

/// An x86-64 address space in a 32 MiB guest.
struct Space {
    tm: TestMem,
    root: u64,
    levels: u8,
}

impl Space {
    fn new(levels: u8) -> Self {
        let tm = TestMem::new(32 << 20);
        let root = tm.alloc(4096);
        Space { tm, root, levels }
    }

    fn walker(&self, fl_flags: u64) -> VtdFirstStage {
        VtdFirstStage::new(VtdConfig {
            pgd: self.root,
            addr_width: if self.levels == 5 { 57 } else { 48 },
            fl_flags,
            output_bits: 48,
        })
        .expect("valid config")
    }

    /// Maps the page of `shift` holding `va` to `gpa` with `leaf` flags;
    /// returns the entry addresses from the root down to the leaf.
    fn map(&self, va: u64, gpa: u64, shift: u32, leaf: u64) -> Vec<u64> {
        let mut path = Vec::new();
        let mut table = self.root;
        for level in (1..=u32::from(self.levels)).rev() {
            let level_shift = 12 + 9 * (level - 1);
            let entry = table + ((va >> level_shift) & 0x1ff) * 8;
            path.push(entry);
            if level_shift == shift {
                let ps = if shift > K4 { PS } else { 0 };
                self.tm.write(entry, gpa | leaf | ps);
                return path;
            }
            let mut e = self.tm.read(entry);
            if e & P == 0 {
                e = self.tm.alloc(4096) | TABLE;
                self.tm.write(entry, e);
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        path
    }

    fn set(&self, entry: u64, bits: u64) {
        self.tm.write(entry, self.tm.read(entry) | bits);
    }

    fn clear(&self, entry: u64, bits: u64) {
        self.tm.write(entry, self.tm.read(entry) & !bits);
    }
}

const USER_READ: PageAccess = PageAccess::READ;
const USER_WRITE: PageAccess = PageAccess::WRITE;
const SUP_READ: PageAccess = PageAccess::READ.privileged();
const SUP_WRITE: PageAccess = PageAccess::WRITE.privileged();

#[test]
fn four_level_translates_4k_2m_and_1g_pages() {
    let s = Space::new(4);
    s.map(0x7f12_3456_7000, 0x40_0000, K4, LEAF);
    s.map(0x7f12_3460_0000, 0x80_0000, M2, LEAF);
    s.map(0x7f00_4000_0000, 0x4000_0000, G1, LEAF);
    let w = s.walker(0);
    let t = w.translate(&s.tm.mem, 0x7f12_3456_7abc, USER_READ).unwrap();
    assert_eq!(
        (t.va, t.gpa, t.page_shift),
        (0x7f12_3456_7000, 0x40_0000, 12)
    );
    assert_eq!(t.gpa_of(0x7f12_3456_7abc), 0x40_0abc);
    let t = w.translate(&s.tm.mem, 0x7f12_3465_4321, USER_READ).unwrap();
    assert_eq!(
        (t.va, t.gpa, t.page_shift),
        (0x7f12_3460_0000, 0x80_0000, 21)
    );
    let t = w.translate(&s.tm.mem, 0x7f00_7654_3210, USER_READ).unwrap();
    assert_eq!(
        (t.va, t.gpa, t.page_shift),
        (0x7f00_4000_0000, 0x4000_0000, 30)
    );
    assert_eq!(t.gpa_of(0x7f00_7654_3210), 0x7654_3210);
}

#[test]
fn five_level_translates_addresses_above_47_bits() {
    let s = Space::new(5);
    let va = 0x00ab_cdef_1234_5000;
    s.map(va, 0x1234_5000, K4, LEAF);
    s.map(0xffff_8000_0000_0000, 0x20_0000, M2, LEAF);
    let w = s.walker(0);
    assert_eq!(w.levels(), 5);
    let t = w.translate(&s.tm.mem, va | 0x10, USER_READ).unwrap();
    assert_eq!((t.va, t.gpa, t.page_shift), (va, 0x1234_5000, 12));
    let t = w
        .translate(&s.tm.mem, 0xffff_8000_0001_0000, SUP_READ.privileged())
        .unwrap_err();
    assert_eq!(t, WalkFault::SupervisorDisabled);
    let t = w
        .translate(&s.tm.mem, 0xffff_8000_0001_0000, USER_READ)
        .unwrap();
    assert_eq!((t.gpa, t.page_shift), (0x20_0000, 21));
}

#[test]
fn accessed_is_set_at_every_level_and_dirty_on_the_leaf_of_a_write() {
    let s = Space::new(4);
    let va = 0x1234_5000;
    let path = s.map(va, 0x9000, K4, LEAF);
    let w = s.walker(0);
    let t = w.translate(&s.tm.mem, va, USER_READ).unwrap();
    assert!(t.writable && !t.dirty, "a read leaves the page clean");
    for &e in &path {
        assert_eq!(s.tm.read(e) & (A | D | EA), A, "entry {e:#x}");
    }
    let t = w.translate(&s.tm.mem, va, USER_WRITE).unwrap();
    assert!(t.writable && t.dirty);
    let (leaf, upper) = path.split_last().unwrap();
    assert_eq!(s.tm.read(*leaf) & (A | D), A | D);
    for &e in upper {
        assert_eq!(s.tm.read(e) & D, 0, "D is only set in the leaf");
    }
}

#[test]
fn dirty_is_set_on_a_large_page_leaf() {
    let s = Space::new(4);
    let path = s.map(0x4000_0000, 0x4000_0000, G1, LEAF);
    s.walker(0)
        .translate(&s.tm.mem, 0x4000_1000, USER_WRITE)
        .unwrap();
    assert_eq!(s.tm.read(path[1]) & (A | D | PS), A | D | PS);
    assert_eq!(s.tm.read(path[0]) & (A | D), A);
}

#[test]
fn eafe_sets_extended_accessed_with_accessed() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    s.walker(VTD_S1_EAFE)
        .translate(&s.tm.mem, 0x5000, USER_READ)
        .unwrap();
    for &e in &path {
        assert_eq!(s.tm.read(e) & (A | EA), A | EA);
    }
}

#[test]
fn walk_with_accessed_already_set_writes_nothing() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF | A | D);
    for &e in &path {
        s.set(e, A);
    }
    let racy = Racy::new(&s.tm, 0, 0, |v| v);
    s.walker(0).translate(&racy, 0x5000, USER_WRITE).unwrap();
    assert_eq!(racy.cas_seen.get(), 0);
}

#[test]
fn not_present_entry_faults_recoverably_at_its_level() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    let w = s.walker(0);
    let f = w.translate(&s.tm.mem, 0x20_0000, USER_READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::NotPresent {
            level: 2,
            entry: path[2] + 8
        }
    );
    assert!(f.is_recoverable());
    s.clear(path[1], P);
    let f = w.translate(&s.tm.mem, 0x5000, USER_READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::NotPresent {
            level: 3,
            entry: path[1]
        }
    );
}

#[test]
fn user_access_needs_user_at_every_level() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    s.clear(path[1], US);
    let w = s.walker(VTD_S1_SRE);
    let f = w.translate(&s.tm.mem, 0x5000, USER_READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::Permission {
            level: 3,
            entry: path[1]
        }
    );
    assert!(f.is_recoverable());
    let t = w.translate(&s.tm.mem, 0x5000, SUP_READ).unwrap();
    assert!(!t.user);
}

#[test]
fn write_to_read_only_page_faults_with_permission() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, P | US);
    let w = s.walker(0);
    let t = w.translate(&s.tm.mem, 0x5000, USER_READ).unwrap();
    assert!(!t.writable && !t.dirty);
    let f = w.translate(&s.tm.mem, 0x5000, USER_WRITE).unwrap_err();
    assert_eq!(
        f,
        WalkFault::Permission {
            level: 1,
            entry: path[3]
        }
    );
    assert_eq!(
        s.tm.read(path[3]) & D,
        0,
        "a faulting write marks nothing dirty"
    );
}

#[test]
fn write_needs_read_write_at_every_level() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    s.clear(path[0], RW);
    let f = s
        .walker(0)
        .translate(&s.tm.mem, 0x5000, USER_WRITE)
        .unwrap_err();
    assert_eq!(
        f,
        WalkFault::Permission {
            level: 4,
            entry: path[0]
        }
    );
}

#[test]
fn supervisor_write_to_read_only_page_is_allowed_without_wpe() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, P);
    let t = s
        .walker(VTD_S1_SRE)
        .translate(&s.tm.mem, 0x5000, SUP_WRITE)
        .unwrap();
    assert!(t.writable && t.dirty && !t.user);
    assert_eq!(s.tm.read(path[3]) & (A | D), A | D);
}

#[test]
fn supervisor_write_to_read_only_page_faults_with_wpe() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, P);
    let f = s
        .walker(VTD_S1_SRE | VTD_S1_WPE)
        .translate(&s.tm.mem, 0x5000, SUP_WRITE)
        .unwrap_err();
    assert_eq!(
        f,
        WalkFault::Permission {
            level: 1,
            entry: path[3]
        }
    );
}

#[test]
fn supervisor_request_without_sre_faults_unrecoverably() {
    let s = Space::new(4);
    s.map(0x5000, 0x9000, K4, LEAF);
    let f = s
        .walker(0)
        .translate(&s.tm.mem, 0x5000, SUP_READ)
        .unwrap_err();
    assert_eq!(f, WalkFault::SupervisorDisabled);
    assert!(!f.is_recoverable());
}

#[test]
fn execute_with_xd_at_any_level_faults() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    let w = s.walker(0);
    let t = w.translate(&s.tm.mem, 0x5000, PageAccess::EXECUTE).unwrap();
    assert!(t.executable);
    s.set(path[2], XD);
    let f = w
        .translate(&s.tm.mem, 0x5000, PageAccess::EXECUTE)
        .unwrap_err();
    assert_eq!(
        f,
        WalkFault::Permission {
            level: 2,
            entry: path[2]
        }
    );
    let t = w.translate(&s.tm.mem, 0x5000, USER_READ).unwrap();
    assert!(!t.executable, "XD is reported for data reads too");
}

#[test]
fn supervisor_fetch_from_user_page_faults() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    let w = s.walker(VTD_S1_SRE);
    let fetch = PageAccess::EXECUTE.privileged();
    let f = w.translate(&s.tm.mem, 0x5000, fetch).unwrap_err();
    assert_eq!(
        f,
        WalkFault::Permission {
            level: 1,
            entry: path[3]
        }
    );
    s.clear(path[3], US);
    assert!(w.translate(&s.tm.mem, 0x5000, fetch).unwrap().executable);
}

#[test]
fn address_bits_above_the_output_width_are_reserved() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    s.set(path[3], 1 << 48);
    let f = s
        .walker(0)
        .translate(&s.tm.mem, 0x5000, USER_READ)
        .unwrap_err();
    assert!(matches!(f, WalkFault::ReservedBits { level: 1, .. }));
    assert!(!f.is_recoverable());
    assert_eq!(s.tm.read(path[3]) & A, 0, "a reserved entry is not marked");
}

#[test]
fn ignored_high_bits_and_xd_are_not_reserved() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    s.set(path[1], 0x7ff0_0000_0000_0000 | XD);
    let t = s.walker(0).translate(&s.tm.mem, 0x5000, USER_READ).unwrap();
    assert_eq!(t.gpa, 0x9000);
}

#[test]
fn page_size_bit_in_pml4e_and_pml5e_is_reserved() {
    for levels in [4u8, 5] {
        let s = Space::new(levels);
        let path = s.map(0x5000, 0x9000, K4, LEAF);
        s.set(path[0], PS);
        let f = s
            .walker(0)
            .translate(&s.tm.mem, 0x5000, USER_READ)
            .unwrap_err();
        assert_eq!(
            f,
            WalkFault::ReservedBits {
                level: levels,
                entry: path[0],
                value: s.tm.read(path[0])
            }
        );
    }
}

#[test]
fn low_address_bits_of_large_pages_are_reserved() {
    let s = Space::new(4);
    let m2 = s.map(0x20_0000, 0x20_0000, M2, LEAF);
    let g1 = s.map(0x4000_0000, 0x4000_0000, G1, LEAF);
    // Bit 12 is PAT in a large page, not an address bit.
    s.set(m2[2], 1 << 12);
    s.set(g1[1], 1 << 12);
    let w = s.walker(0);
    assert_eq!(
        w.translate(&s.tm.mem, 0x20_0000, USER_READ).unwrap().gpa,
        0x20_0000
    );
    assert_eq!(
        w.translate(&s.tm.mem, 0x4000_0000, USER_READ).unwrap().gpa,
        0x4000_0000
    );
    s.set(m2[2], 1 << 13);
    s.set(g1[1], 1 << 29);
    let f = w.translate(&s.tm.mem, 0x20_0000, USER_READ).unwrap_err();
    assert!(matches!(f, WalkFault::ReservedBits { level: 2, .. }));
    let f = w.translate(&s.tm.mem, 0x4000_0000, USER_READ).unwrap_err();
    assert!(matches!(f, WalkFault::ReservedBits { level: 3, .. }));
}

#[test]
fn non_canonical_address_faults() {
    let s = Space::new(4);
    s.map(0x5000, 0x9000, K4, LEAF);
    let w4 = s.walker(0);
    for va in [0x0000_8000_0000_0000u64, 0xfff0_0000_0000_5000, 1 << 63] {
        let f = w4.translate(&s.tm.mem, va, USER_READ).unwrap_err();
        assert_eq!(f, WalkFault::AddressOutOfRange { va });
        assert!(!f.is_recoverable());
    }
    let s5 = Space::new(5);
    let w5 = s5.walker(0);
    let f = w5
        .translate(&s5.tm.mem, 0x0100_0000_0000_0000, USER_READ)
        .unwrap_err();
    assert!(matches!(f, WalkFault::AddressOutOfRange { .. }));
    // Canonical for 57 bits, so it walks (and finds nothing).
    let f = w5
        .translate(&s5.tm.mem, 0x0000_8000_0000_0000, USER_READ)
        .unwrap_err();
    assert!(matches!(f, WalkFault::NotPresent { level: 5, .. }));
}

#[test]
fn table_pointer_outside_ram_faults() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    // A PDPT entry that points just past the end of the 32 MiB RAM.
    s.tm.write(path[1], (32 << 20) | TABLE);
    let f = s
        .walker(0)
        .translate(&s.tm.mem, 0x5000, USER_READ)
        .unwrap_err();
    assert_eq!(
        f,
        WalkFault::BadTableAddress {
            level: 2,
            entry: 32 << 20
        }
    );
    assert!(!f.is_recoverable());
}

#[test]
fn root_outside_ram_faults() {
    let s = Space::new(4);
    let w = VtdFirstStage::new(VtdConfig {
        pgd: 1 << 40,
        addr_width: 48,
        fl_flags: 0,
        output_bits: 48,
    })
    .unwrap();
    let f = w.translate(&s.tm.mem, 0x5000, USER_READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::BadTableAddress {
            level: 4,
            entry: 1 << 40
        }
    );
}

#[test]
fn table_that_points_to_itself_stops_at_the_format_depth() {
    let s = Space::new(4);
    // Entry 0x1ff of the root points back to the root (a recursive map).
    let slot = s.root + 0x1ff * 8;
    s.tm.write(slot, s.root | TABLE);
    // Every index is 0x1ff: the walk uses the same entry at all 4 levels
    // and ends with the root itself as the 4 KiB page.
    let va = 0xffff_ffff_ffff_f000;
    let t = s.walker(0).translate(&s.tm.mem, va, USER_WRITE).unwrap();
    assert_eq!((t.gpa, t.page_shift), (s.root, 12));
    assert_eq!(s.tm.read(slot) & (A | D), A | D);
}

#[test]
fn lost_compare_exchange_rejudges_the_entry_the_guest_wrote() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    // The guest sets an available bit concurrently: the walk goes on.
    let racy = Racy::new(&s.tm, path[2], 1, |v| v | 1 << 9);
    let t = s.walker(0).translate(&racy, 0x5000, USER_READ).unwrap();
    assert_eq!(t.gpa, 0x9000);
    assert_eq!(s.tm.read(path[2]) & (A | 1 << 9), A | 1 << 9);

    // The guest unmaps the page concurrently: the walk sees it.
    let racy = Racy::new(&s.tm, path[3], 1, |v| v & !P);
    let f = s
        .walker(0)
        .translate(&racy, 0x5000, USER_WRITE)
        .unwrap_err();
    assert_eq!(
        f,
        WalkFault::NotPresent {
            level: 1,
            entry: path[3]
        }
    );
    assert_eq!(s.tm.read(path[3]) & D, 0);
}

#[test]
fn guest_flipping_bits_forever_faults_with_contention() {
    let s = Space::new(4);
    let path = s.map(0x5000, 0x9000, K4, LEAF);
    let racy = Racy::new(&s.tm, path[0], u32::MAX, |v| v ^ 1 << 9);
    let f = s.walker(0).translate(&racy, 0x5000, USER_READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::UpdateContention {
            level: 4,
            entry: path[0]
        }
    );
    assert!(!f.is_recoverable());
    assert_eq!(racy.cas_seen.get(), MAX_UPDATE_RETRIES + 1);
}

#[test]
fn cached_translation_allows_reads_and_needs_a_walk_for_the_first_write() {
    let s = Space::new(4);
    s.map(0x5000, 0x9000, K4, LEAF);
    let w = s.walker(0);
    let read: PageTranslation = w.translate(&s.tm.mem, 0x5000, USER_READ).unwrap();
    assert!(read.allows(USER_READ) && !read.allows(USER_WRITE));
    let write = w.translate(&s.tm.mem, 0x5000, USER_WRITE).unwrap();
    assert!(write.allows(USER_WRITE) && write.contains(0x5fff) && !write.contains(0x6000));
}

#[test]
fn config_with_unsupported_width_flags_or_root_is_refused() {
    let good = VtdConfig {
        pgd: 0x1000,
        addr_width: 48,
        fl_flags: VTD_S1_SRE | VTD_S1_EAFE | VTD_S1_WPE,
        output_bits: 48,
    };
    assert!(VtdFirstStage::new(good).is_ok());
    let bad = |c: VtdConfig| VtdFirstStage::new(c).unwrap_err();
    assert_eq!(
        bad(VtdConfig {
            addr_width: 39,
            ..good
        }),
        ConfigError::AddressWidth(39)
    );
    assert_eq!(
        bad(VtdConfig {
            fl_flags: 1 << 3,
            ..good
        }),
        ConfigError::UnknownFlags(1 << 3)
    );
    assert_eq!(
        bad(VtdConfig {
            pgd: 0x1008,
            ..good
        }),
        ConfigError::RootAddress(0x1008)
    );
    assert_eq!(
        bad(VtdConfig {
            pgd: 1 << 48,
            ..good
        }),
        ConfigError::RootAddress(1 << 48)
    );
    assert_eq!(
        bad(VtdConfig {
            output_bits: 64,
            ..good
        }),
        ConfigError::OutputWidth(64)
    );
}
