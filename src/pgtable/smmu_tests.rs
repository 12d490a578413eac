// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the SMMUv3 CD table look-up and the AArch64 stage-1 walker on
//! real CD tables and translation tables built in a guest memory, one test
//! per rule.

use super::testutil::{Racy, TestMem};
use super::{
    ConfigError, ContextDescriptor, Granule, PageAccess, SmmuCdConfig, SmmuCdTable, WalkFault,
    MAX_UPDATE_RETRIES, S1FMT_4K_L2, S1FMT_64K_L2, S1FMT_LINEAR,
};

const VALID: u64 = 1 << 0;
const TABLE: u64 = 1 << 1;
const AP_EL0: u64 = 1 << 6;
const AP_RO: u64 = 1 << 7;
const AF: u64 = 1 << 10;
const DBM: u64 = 1 << 51;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
const PXN_TABLE: u64 = 1 << 59;
const UXN_TABLE: u64 = 1 << 60;
const AP_TABLE_NO_EL0: u64 = 1 << 61;
const AP_TABLE_RO: u64 = 1 << 62;

const CD_V: u64 = 1 << 31;
const CD_AA64: u64 = 1 << 41;
const CD_HD: u64 = 1 << 42;
const CD_HA: u64 = 1 << 43;
const CD_EPD0: u64 = 1 << 14;
const CD_ENDI: u64 = 1 << 15;
const CD_TBI0: u64 = 1 << 38;
const IPS_48: u64 = 5 << 32;
const IPS_32: u64 = 0;

/// User read-write page / block attributes (AF set, EL0 access).
const RW_EL0: u64 = VALID | AF | AP_EL0;

const READ: PageAccess = PageAccess::READ;
const WRITE: PageAccess = PageAccess::WRITE;

/// One stage-1 address space and the CD table that points to it.
struct Space {
    tm: TestMem,
    granule: u32,
    t0sz: u32,
    ttb0: u64,
}

impl Space {
    fn new(granule: u32, t0sz: u32) -> Self {
        let tm = TestMem::new(64 << 20);
        let ttb0 = tm.alloc(1 << granule);
        Space {
            tm,
            granule,
            t0sz,
            ttb0,
        }
    }

    fn start_level(&self) -> u32 {
        let stride = self.granule - 3;
        4 - (64 - self.t0sz - self.granule).div_ceil(stride)
    }

    fn tg0(&self) -> u64 {
        match self.granule {
            12 => 0,
            16 => 1,
            _ => 2,
        }
    }

    /// Word 0 of a valid AArch64 CD for this space, plus `extra` bits.
    fn cd0(&self, extra: u64) -> u64 {
        u64::from(self.t0sz) | self.tg0() << 6 | CD_V | CD_AA64 | 0x42 << 48 | extra
    }

    /// Maps the page or block of `level` holding `va` to `pa` with `leaf`
    /// attributes (the table bit is added at level 3); returns the
    /// descriptor addresses from the start level down to the leaf.
    fn map(&self, va: u64, pa: u64, level: u32, leaf: u64) -> Vec<u64> {
        let stride = self.granule - 3;
        let mut path = Vec::new();
        let mut table = self.ttb0;
        for l in self.start_level()..=3 {
            let shift = self.granule + stride * (3 - l);
            let entry = table + ((va >> shift) & ((1 << stride) - 1)) * 8;
            path.push(entry);
            if l == level {
                let page = if l == 3 { TABLE } else { 0 };
                self.tm.write(entry, pa | leaf | page);
                return path;
            }
            let mut d = self.tm.read(entry);
            if d & VALID == 0 {
                d = self.tm.alloc(1 << self.granule) | VALID | TABLE;
                self.tm.write(entry, d);
            }
            table = d & 0x0000_ffff_ffff_f000 & !((1 << self.granule) - 1);
        }
        path
    }

    /// A linear table of `2^cdmax` CDs with the CD of `ssid` pointing at
    /// this space.
    fn linear(&self, cdmax: u32, ssid: u32, cd0_extra: u64) -> (SmmuCdTable, u64) {
        let table = self.tm.alloc(64 << cdmax);
        let cd = table + u64::from(ssid) * 64;
        self.tm.write(cd, self.cd0(cd0_extra));
        self.tm.write(cd + 8, self.ttb0);
        (cd_table(S1FMT_LINEAR, cdmax, table), cd)
    }

    fn set(&self, entry: u64, bits: u64) {
        self.tm.write(entry, self.tm.read(entry) | bits);
    }

    fn clear(&self, entry: u64, bits: u64) {
        self.tm.write(entry, self.tm.read(entry) & !bits);
    }

    fn cd(&self, cd0_extra: u64) -> ContextDescriptor {
        let (t, _) = self.linear(0, 0, cd0_extra);
        t.context_descriptor(&self.tm.mem, 0).expect("valid CD")
    }
}

fn cd_table(s1fmt: u8, s1cdmax: u32, s1contextptr: u64) -> SmmuCdTable {
    SmmuCdTable::new(SmmuCdConfig {
        s1fmt,
        s1cdmax,
        s1contextptr,
        output_bits: 48,
    })
    .expect("valid CD table config")
}

#[test]
fn linear_cd_table_with_4k_granule_translates_pages_and_blocks() {
    let s = Space::new(12, 16);
    s.map(0x7f_1234_5000, 0x80_0000, 3, RW_EL0);
    s.map(0x7f_1260_0000, 0xa0_0000, 2, RW_EL0);
    s.map(0x40_4000_0000, 0x4000_0000, 1, RW_EL0);
    let (table, _) = s.linear(4, 3, IPS_48);
    let m = &s.tm.mem;
    let t = table.translate(m, 3, 0x7f_1234_5abc, READ).unwrap();
    assert_eq!((t.va, t.gpa, t.page_shift), (0x7f_1234_5000, 0x80_0000, 12));
    assert!(t.user && t.writable && t.dirty);
    let t = table.translate(m, 3, 0x7f_1265_4321, READ).unwrap();
    assert_eq!((t.va, t.gpa, t.page_shift), (0x7f_1260_0000, 0xa0_0000, 21));
    let t = table.translate(m, 3, 0x40_7654_3210, READ).unwrap();
    assert_eq!((t.gpa, t.page_shift), (0x4000_0000, 30));
    assert_eq!(t.gpa_of(0x40_7654_3210), 0x7654_3210);
    let cd = table.context_descriptor(m, 3).unwrap();
    assert_eq!(
        (cd.asid(), cd.granule(), cd.input_bits()),
        (0x42, Granule::K4, 48)
    );
    assert_eq!(cd.output_bits(), 48);
}

#[test]
fn two_level_cd_table_with_4k_leaves_finds_the_substream() {
    let s = Space::new(12, 25);
    s.map(0x5000, 0x9000, 3, RW_EL0);
    // 2^8 CDs: SSID[7:6] picks one of 4 L1 descriptors, SSID[5:0] the CD.
    let l1 = s.tm.alloc(64);
    let l2 = s.tm.alloc(4096);
    let ssid = 70;
    s.tm.write(l1 + 8, l2 | 1);
    s.tm.write(l2 + 6 * 64, s.cd0(IPS_48));
    s.tm.write(l2 + 6 * 64 + 8, s.ttb0);
    let table = cd_table(S1FMT_4K_L2, 8, l1);
    let t = table.translate(&s.tm.mem, ssid, 0x5008, READ).unwrap();
    assert_eq!(t.gpa, 0x9000);
    let f = table.translate(&s.tm.mem, 71, 0x5008, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::CdInvalid {
            ssid: 71,
            entry: l2 + 7 * 64
        }
    );
    assert!(!f.is_recoverable());
}

#[test]
fn two_level_cd_table_with_64k_leaves_finds_the_substream() {
    let s = Space::new(16, 16);
    s.map(0x1_2345_0000, 0x20_0000, 3, RW_EL0);
    // 2^12 CDs: SSID[11:10] picks the L1 descriptor, SSID[9:0] the CD.
    let l1 = s.tm.alloc(64);
    let l2 = s.tm.alloc(64 << 10);
    let ssid = 2049;
    s.tm.write(l1 + 2 * 8, l2 | 1);
    s.tm.write(l2 + 64, s.cd0(IPS_48));
    s.tm.write(l2 + 64 + 8, s.ttb0);
    let table = cd_table(S1FMT_64K_L2, 12, l1);
    let t = table
        .translate(&s.tm.mem, ssid, 0x1_2345_6789, READ)
        .unwrap();
    assert_eq!((t.gpa, t.page_shift), (0x20_0000, 16));
    assert_eq!(t.gpa_of(0x1_2345_6789), 0x20_6789);
}

#[test]
fn invalid_l1_descriptor_faults_unrecoverably() {
    let s = Space::new(12, 25);
    let l1 = s.tm.alloc(64);
    let table = cd_table(S1FMT_64K_L2, 12, l1);
    let f = table.translate(&s.tm.mem, 1024, 0, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::CdL1Invalid {
            ssid: 1024,
            entry: l1 + 8
        }
    );
    assert!(!f.is_recoverable());
}

#[test]
fn substream_beyond_s1cdmax_faults() {
    let s = Space::new(12, 25);
    let (table, _) = s.linear(4, 0, IPS_48);
    let f = table.translate(&s.tm.mem, 16, 0, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::SsidOutOfRange {
            ssid: 16,
            count: 16
        }
    );
    assert!(!f.is_recoverable());
    // s1cdmax = 0: only substream 0, whatever the format says.
    let one = cd_table(S1FMT_64K_L2, 0, table.config().s1contextptr);
    assert!(matches!(
        one.translate(&s.tm.mem, 1, 0, READ),
        Err(WalkFault::SsidOutOfRange { count: 1, .. })
    ));
}

#[test]
fn cd_table_outside_ram_faults() {
    let s = Space::new(12, 25);
    let table = cd_table(S1FMT_LINEAR, 4, 1 << 40);
    assert_eq!(
        table.translate(&s.tm.mem, 2, 0, READ),
        Err(WalkFault::CdFetch {
            ssid: 2,
            entry: (1 << 40) + 128
        })
    );
    // An L1 descriptor pointing outside RAM.
    let l1 = s.tm.alloc(64);
    s.tm.write(l1, (1 << 40) | 1);
    let table = cd_table(S1FMT_4K_L2, 8, l1);
    assert_eq!(
        table.translate(&s.tm.mem, 1, 0, READ),
        Err(WalkFault::CdFetch {
            ssid: 1,
            entry: (1 << 40) + 64
        })
    );
}

#[test]
fn malformed_cd_faults_with_its_reason() {
    let s = Space::new(12, 25);
    let (table, cd) = s.linear(0, 0, IPS_48);
    let base = s.cd0(IPS_48);
    for (word0, why) in [
        (base & !CD_AA64, "AArch32"),
        (base | CD_ENDI, "big-endian"),
        (base | 3 << 6, "TG0"),
        (base & !0x3f | 40, "T0SZ"),
        (base & !0x3f | 15, "T0SZ"),
    ] {
        s.tm.write(cd, word0);
        match table.translate(&s.tm.mem, 0, 0, READ) {
            Err(WalkFault::CdMalformed {
                ssid: 0,
                entry,
                reason,
            }) => {
                assert_eq!(entry, cd);
                assert!(reason.contains(why), "{reason} should mention {why}");
            }
            other => panic!("{word0:#x}: {other:?}"),
        }
    }
}

#[test]
fn epd0_disables_ttb0_walks() {
    let s = Space::new(12, 25);
    s.map(0x5000, 0x9000, 3, RW_EL0);
    let f = s.cd(IPS_48 | CD_EPD0).translate(&s.tm.mem, 0x5000, READ);
    assert_eq!(f, Err(WalkFault::WalkDisabled { ssid: 0 }));
}

#[test]
fn address_beyond_t0sz_range_faults() {
    let s = Space::new(12, 25);
    let cd = s.cd(IPS_48);
    for va in [1u64 << 39, 0xffff_ff80_0000_0000, 0x0100_0000_0000_5000] {
        let f = cd.translate(&s.tm.mem, va, READ).unwrap_err();
        assert_eq!(f, WalkFault::AddressOutOfRange { va });
        assert!(!f.is_recoverable());
    }
}

#[test]
fn tbi0_ignores_the_top_byte() {
    let s = Space::new(12, 25);
    s.map(0x5000, 0x9000, 3, RW_EL0);
    let t = s
        .cd(IPS_48 | CD_TBI0)
        .translate(&s.tm.mem, 0x3a00_0000_0000_5010, READ)
        .unwrap();
    assert_eq!((t.va, t.gpa), (0x5000, 0x9000));
    // Bit 55 still selects TTB1, which is not supported.
    let f = s
        .cd(IPS_48 | CD_TBI0)
        .translate(&s.tm.mem, 0x3a80_0000_0000_5010, READ);
    assert!(matches!(f, Err(WalkFault::AddressOutOfRange { .. })));
}

#[test]
fn granule_64k_translates_pages_and_512m_blocks() {
    let s = Space::new(16, 16);
    assert_eq!(s.start_level(), 1);
    s.map(0xabc_1234_0000, 0x30_0000, 3, RW_EL0);
    s.map(0x7_2000_0000, 0x2000_0000, 2, RW_EL0);
    let cd = s.cd(IPS_48);
    let t = cd.translate(&s.tm.mem, 0xabc_1234_ffff, READ).unwrap();
    assert_eq!(
        (t.va, t.gpa, t.page_shift),
        (0xabc_1234_0000, 0x30_0000, 16)
    );
    let t = cd.translate(&s.tm.mem, 0x7_3000_0000, READ).unwrap();
    assert_eq!(
        (t.va, t.gpa, t.page_shift),
        (0x7_2000_0000, 0x2000_0000, 29)
    );
}

#[test]
fn granule_16k_translates_pages_and_32m_blocks() {
    let s = Space::new(14, 17);
    assert_eq!(s.start_level(), 1);
    s.map(0x12_3456_c000, 0x4_c000, 3, RW_EL0);
    s.map(0x40_0200_0000, 0x200_0000, 2, RW_EL0);
    let cd = s.cd(IPS_48);
    assert_eq!(cd.granule(), Granule::K16);
    let t = cd.translate(&s.tm.mem, 0x12_3456_d234, READ).unwrap();
    assert_eq!((t.gpa, t.page_shift), (0x4_c000, 14));
    let t = cd.translate(&s.tm.mem, 0x40_0300_0000, READ).unwrap();
    assert_eq!((t.gpa, t.page_shift), (0x200_0000, 25));
}

#[test]
fn invalid_descriptor_faults_recoverably_at_its_level() {
    let s = Space::new(12, 16);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0);
    let cd = s.cd(IPS_48);
    let f = cd.translate(&s.tm.mem, 0x6000, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::NotPresent {
            level: 3,
            entry: path[3] + 8
        }
    );
    assert!(f.is_recoverable());
    // A level-3 descriptor with the table bit clear is reserved.
    s.clear(path[3], TABLE);
    let f = cd.translate(&s.tm.mem, 0x5000, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::NotPresent {
            level: 3,
            entry: path[3]
        }
    );
}

#[test]
fn block_where_the_granule_has_none_is_a_translation_fault() {
    // 4K granule: no level-0 block.
    let s = Space::new(12, 16);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0);
    s.tm.write(path[0], RW_EL0);
    let f = s.cd(IPS_48).translate(&s.tm.mem, 0x5000, READ);
    assert_eq!(
        f,
        Err(WalkFault::NotPresent {
            level: 0,
            entry: path[0]
        })
    );
    // 64K granule: no level-1 block.
    let s = Space::new(16, 16);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0);
    s.tm.write(path[0], RW_EL0);
    let f = s.cd(IPS_48).translate(&s.tm.mem, 0x5000, READ);
    assert_eq!(
        f,
        Err(WalkFault::NotPresent {
            level: 1,
            entry: path[0]
        })
    );
}

#[test]
fn access_flag_clear_without_ha_is_an_access_fault() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0 & !AF);
    let leaf = *path.last().unwrap();
    let f = s.cd(IPS_48).translate(&s.tm.mem, 0x5000, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::AccessFlag {
            level: 3,
            entry: leaf
        }
    );
    assert!(f.is_recoverable());
    assert_eq!(s.tm.read(leaf) & AF, 0);
}

#[test]
fn ha_makes_the_walker_set_the_access_flag() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0 & !AF);
    let leaf = *path.last().unwrap();
    s.cd(IPS_48 | CD_HA)
        .translate(&s.tm.mem, 0x5000, READ)
        .unwrap();
    assert_eq!(s.tm.read(leaf) & AF, AF);
    for &table in &path[..path.len() - 1] {
        assert_eq!(s.tm.read(table) & AF, 0, "table descriptors have no AF");
    }
}

#[test]
fn write_to_read_only_page_faults_with_permission() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0 | AP_RO);
    let cd = s.cd(IPS_48 | CD_HA | CD_HD);
    let t = cd.translate(&s.tm.mem, 0x5000, READ).unwrap();
    assert!(!t.writable && !t.dirty);
    let f = cd.translate(&s.tm.mem, 0x5000, WRITE).unwrap_err();
    assert_eq!(
        f,
        WalkFault::Permission {
            level: 3,
            entry: path[2]
        }
    );
    assert!(f.is_recoverable());
}

#[test]
fn el0_access_to_privileged_page_faults_with_permission() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, VALID | AF);
    let cd = s.cd(IPS_48);
    let f = cd.translate(&s.tm.mem, 0x5000, READ).unwrap_err();
    assert!(matches!(f, WalkFault::Permission { level: 3, .. }));
    let t = cd.translate(&s.tm.mem, 0x5000, WRITE.privileged()).unwrap();
    assert!(!t.user && t.writable && t.executable);
    // Privileged access to an EL0 page is allowed (no PAN).
    s.set(path[2], AP_EL0);
    assert!(cd.translate(&s.tm.mem, 0x5000, READ.privileged()).is_ok());
}

#[test]
fn table_descriptors_restrict_every_level_below() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0);
    let cd = s.cd(IPS_48);
    let leaf_fault = Err(WalkFault::Permission {
        level: 3,
        entry: path[2],
    });
    s.set(path[0], AP_TABLE_RO);
    assert_eq!(cd.translate(&s.tm.mem, 0x5000, WRITE), leaf_fault);
    assert!(!cd.translate(&s.tm.mem, 0x5000, READ).unwrap().writable);
    s.clear(path[0], AP_TABLE_RO);
    s.set(path[1], AP_TABLE_NO_EL0);
    assert_eq!(cd.translate(&s.tm.mem, 0x5000, READ), leaf_fault);
    s.clear(path[1], AP_TABLE_NO_EL0);
    s.set(path[1], UXN_TABLE);
    assert_eq!(
        cd.translate(&s.tm.mem, 0x5000, PageAccess::EXECUTE),
        leaf_fault
    );
    s.clear(path[1], UXN_TABLE);
    s.set(path[0], PXN_TABLE);
    assert_eq!(
        cd.translate(&s.tm.mem, 0x5000, PageAccess::EXECUTE.privileged()),
        leaf_fault
    );
}

#[test]
fn execute_never_bits_deny_fetches_of_their_privilege() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0 | AP_RO | PXN);
    let cd = s.cd(IPS_48);
    let fetch = PageAccess::EXECUTE;
    assert!(cd.translate(&s.tm.mem, 0x5000, fetch).is_ok());
    assert!(cd.translate(&s.tm.mem, 0x5000, fetch.privileged()).is_err());
    s.tm.write(path[2], (s.tm.read(path[2]) & !PXN) | UXN);
    assert!(cd.translate(&s.tm.mem, 0x5000, fetch).is_err());
    assert!(cd.translate(&s.tm.mem, 0x5000, fetch.privileged()).is_ok());
}

#[test]
fn el0_writable_page_is_never_privileged_executable() {
    let s = Space::new(12, 25);
    s.map(0x5000, 0x9000, 3, RW_EL0);
    let f = s
        .cd(IPS_48)
        .translate(&s.tm.mem, 0x5000, PageAccess::EXECUTE.privileged());
    assert!(matches!(f, Err(WalkFault::Permission { level: 3, .. })));
}

#[test]
fn write_to_dbm_page_with_hd_marks_it_dirty() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, (RW_EL0 & !AF) | AP_RO | DBM);
    let leaf = path[2];
    let cd = s.cd(IPS_48 | CD_HA | CD_HD);
    let t = cd.translate(&s.tm.mem, 0x5000, READ).unwrap();
    assert!(t.writable && !t.dirty, "writable-clean");
    assert_eq!(s.tm.read(leaf) & (AF | AP_RO), AF | AP_RO);
    let t = cd.translate(&s.tm.mem, 0x5000, WRITE).unwrap();
    assert!(t.writable && t.dirty);
    assert_eq!(s.tm.read(leaf) & (AF | AP_RO | DBM), AF | DBM);
}

#[test]
fn write_to_dbm_page_without_hd_faults() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0 | AP_RO | DBM);
    for cd0 in [IPS_48 | CD_HA, IPS_48 | CD_HD] {
        let f = s.cd(cd0).translate(&s.tm.mem, 0x5000, WRITE);
        assert!(matches!(f, Err(WalkFault::Permission { level: 3, .. })));
    }
    // APTable read-only also forbids the dirtying write.
    s.set(path[0], AP_TABLE_RO);
    let f = s
        .cd(IPS_48 | CD_HA | CD_HD)
        .translate(&s.tm.mem, 0x5000, WRITE);
    assert!(matches!(f, Err(WalkFault::Permission { level: 3, .. })));
    assert_eq!(s.tm.read(path[2]) & AP_RO, AP_RO);
}

#[test]
fn output_address_beyond_ips_is_an_address_size_fault() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 1 << 33, 3, RW_EL0);
    let f = s.cd(IPS_32).translate(&s.tm.mem, 0x5000, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::AddressSize {
            level: 3,
            entry: path[2]
        }
    );
    assert!(!f.is_recoverable());
    assert!(s.cd(IPS_48).translate(&s.tm.mem, 0x5000, READ).is_ok());
    // A table address beyond the IPS faults at the level that holds it.
    s.tm.write(path[0], (1 << 33) | VALID | TABLE);
    let f = s.cd(IPS_32).translate(&s.tm.mem, 0x5000, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::AddressSize {
            level: 1,
            entry: path[0]
        }
    );
}

#[test]
fn ttb0_beyond_ips_is_an_address_size_fault() {
    let s = Space::new(12, 25);
    let (table, cd) = s.linear(0, 0, IPS_32);
    s.tm.write(cd + 8, 1 << 36);
    let f = table.translate(&s.tm.mem, 0, 0x5000, READ);
    assert_eq!(
        f,
        Err(WalkFault::AddressSize {
            level: 1,
            entry: 1 << 36
        })
    );
}

#[test]
fn misaligned_ttb0_bits_are_treated_as_zero() {
    let s = Space::new(12, 25);
    s.map(0x5000, 0x9000, 3, RW_EL0);
    let (table, cd) = s.linear(0, 0, IPS_48);
    s.tm.write(cd + 8, s.ttb0 | 0x7f0);
    assert_eq!(
        table.translate(&s.tm.mem, 0, 0x5000, READ).unwrap().gpa,
        0x9000
    );
}

#[test]
fn table_pointer_outside_ram_faults() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0);
    s.tm.write(path[1], (1 << 40) | VALID | TABLE);
    let f = s.cd(IPS_48).translate(&s.tm.mem, 0x5000, READ).unwrap_err();
    assert_eq!(
        f,
        WalkFault::BadTableAddress {
            level: 3,
            entry: (1 << 40) + 5 * 8
        }
    );
    assert!(!f.is_recoverable());
}

#[test]
fn table_that_points_to_itself_stops_at_the_format_depth() {
    let s = Space::new(12, 16);
    // Entry 0 of TTB0's table points back to it at every level: the walk
    // reads it 4 times and then reads entry 0 as a level-3 page.
    s.tm.write(s.ttb0, s.ttb0 | VALID | TABLE | AF | AP_EL0);
    let t = s.cd(IPS_48).translate(&s.tm.mem, 0x123, READ).unwrap();
    assert_eq!((t.gpa, t.page_shift), (s.ttb0, 12));
}

#[test]
fn lost_compare_exchange_rejudges_the_descriptor_the_guest_wrote() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, (RW_EL0 & !AF) | AP_RO | DBM);
    let cd = s.cd(IPS_48 | CD_HA | CD_HD);
    // The guest invalidates the page while the walker marks it dirty.
    let racy = Racy::new(&s.tm, path[2], 1, |d| d & !VALID);
    let f = cd.translate(&racy, 0x5000, WRITE);
    assert_eq!(
        f,
        Err(WalkFault::NotPresent {
            level: 3,
            entry: path[2]
        })
    );
    // The guest write-protects it for real (DBM cleared): permission fault.
    s.set(path[2], VALID);
    let racy = Racy::new(&s.tm, path[2], 1, |d| d & !DBM);
    let f = cd.translate(&racy, 0x5000, WRITE);
    assert!(matches!(f, Err(WalkFault::Permission { level: 3, .. })));
    assert_eq!(s.tm.read(path[2]) & AP_RO, AP_RO);
}

#[test]
fn guest_flipping_bits_forever_faults_with_contention() {
    let s = Space::new(12, 25);
    let path = s.map(0x5000, 0x9000, 3, RW_EL0 & !AF);
    let racy = Racy::new(&s.tm, path[2], u32::MAX, |d| d ^ 1 << 55);
    let f = s.cd(IPS_48 | CD_HA).translate(&racy, 0x5000, READ);
    assert_eq!(
        f,
        Err(WalkFault::UpdateContention {
            level: 3,
            entry: path[2]
        })
    );
    assert_eq!(racy.cas_seen.get(), MAX_UPDATE_RETRIES + 1);
}

#[test]
fn config_with_unknown_format_size_or_pointer_is_refused() {
    let good = SmmuCdConfig {
        s1fmt: S1FMT_LINEAR,
        s1cdmax: 20,
        s1contextptr: 0x1_0040,
        output_bits: 48,
    };
    assert!(SmmuCdTable::new(good).is_ok());
    let bad = |c: SmmuCdConfig| SmmuCdTable::new(c).unwrap_err();
    assert_eq!(
        bad(SmmuCdConfig { s1fmt: 3, ..good }),
        ConfigError::CdTableFormat(3)
    );
    assert_eq!(
        bad(SmmuCdConfig {
            s1cdmax: 21,
            ..good
        }),
        ConfigError::CdMax(21)
    );
    assert_eq!(
        bad(SmmuCdConfig {
            s1contextptr: 0x1_0008,
            ..good
        }),
        ConfigError::RootAddress(0x1_0008)
    );
    assert_eq!(
        bad(SmmuCdConfig {
            output_bits: 31,
            ..good
        }),
        ConfigError::OutputWidth(31)
    );
}
