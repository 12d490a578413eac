// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property tests: the real walkers against the reference walkers of
//! `reference.rs`, on random tables (random entries with random flag bits,
//! some pointing to valid tables, some to garbage) and random addresses
//! and accesses. Both must agree on the result or the fault, and leave the
//! same accessed / dirty marks in memory.
//!
//! Tables are generated from a seed with a small deterministic generator,
//! so a failing case is reproduced from the seed proptest prints. Entries
//! are placed at a few indices of each table (0, 1, 2, last) and addresses
//! are made of those indices, so that most walks go deep.

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::reference::{arm_translate, x86_translate, ArmParams, RefMem, X86Params};
use super::{
    PageAccess, PageTranslation, SmmuCdConfig, SmmuCdTable, VtdConfig, VtdFirstStage, WalkFault,
};

/// xorshift64*: deterministic table contents from a seed.
struct Gen(u64);

impl Gen {
    fn new(seed: u64) -> Self {
        Gen(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn access(&mut self) -> PageAccess {
        PageAccess {
            write: self.chance(40),
            execute: self.chance(20),
            privileged: self.chance(30),
        }
    }
}

/// The same RAM image as a guest memory and as the reference's words,
/// and the indices of its non-zero words: the only ones a walk may mark
/// (an all-zero entry is not present).
fn memories(words: &[u64]) -> (GuestMemoryMmap<()>, RefMem, Vec<usize>) {
    let size = words.len() * 8;
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("memory");
    let live: Vec<usize> = (0..words.len()).filter(|&i| words[i] != 0).collect();
    for &i in &live {
        gm.write_obj(words[i].to_le(), GuestAddress(i as u64 * 8))
            .expect("in RAM");
    }
    let refmem = RefMem {
        words: words.to_vec(),
    };
    (gm, refmem, live)
}

/// Whether the guest memory holds the reference's words at `live`.
fn same_marks(gm: &GuestMemoryMmap<()>, refmem: &RefMem, live: &[usize]) -> bool {
    live.iter().all(|&i| {
        let word: u64 = gm.read_obj(GuestAddress(i as u64 * 8)).expect("in RAM");
        u64::from_le(word) == refmem.words[i]
    })
}

/// Faults compared without the free-text reason of a malformed CD.
fn normalized(r: Result<PageTranslation, WalkFault>) -> Result<PageTranslation, WalkFault> {
    r.map_err(|f| match f {
        WalkFault::CdMalformed { ssid, entry, .. } => WalkFault::CdMalformed {
            ssid,
            entry,
            reason: "",
        },
        other => other,
    })
}

// --- x86-64 first stage.

const X86_PAGES: u64 = 16;
const X86_INDICES: [u64; 4] = [0, 1, 2, 511];

/// A random IA-32e entry: mostly pointers to one of the pages (or just
/// beyond RAM) with random flags, sometimes reserved or ignored high
/// bits, large-page low bits, or pure garbage.
fn x86_entry(g: &mut Gen) -> u64 {
    match g.below(20) {
        0 => 0,
        1 => g.next(),
        _ => {
            let page = if g.chance(95) {
                g.below(X86_PAGES)
            } else {
                X86_PAGES + g.below(2)
            };
            let mut e = page << 12 | (g.next() & 0xfff);
            if g.chance(92) {
                e |= 1; // present
            }
            if g.chance(75) {
                e |= 0b110; // R/W and U/S
            }
            if g.chance(80) {
                e &= !(1 << 7); // mostly no PS, so walks go deep
            }
            if g.chance(8) {
                e |= 1 << g.below(64); // any bit: reserved, ignored, XD...
            }
            if g.chance(10) {
                e |= 1 << 63;
            }
            e
        }
    }
}

fn x86_va(g: &mut Gen, levels: u32) -> u64 {
    let mut va = g.below(1 << 12);
    for level in 1..=levels {
        let index = if g.chance(90) {
            g.pick(&X86_INDICES)
        } else {
            g.below(512)
        };
        va |= index << (12 + 9 * (level - 1));
    }
    let top = if levels == 5 { 56 } else { 47 };
    if va >> top & 1 == 1 {
        va |= u64::MAX << top; // sign-extend
    }
    if g.chance(5) {
        va ^= 1 << g.pick(&[48, 57, 60, 63]);
    }
    va
}

fn check_x86(seed: u64) -> Result<(), TestCaseError> {
    let mut g = Gen::new(seed);
    let mut words = vec![0u64; (X86_PAGES * 512) as usize];
    for page in 0..X86_PAGES {
        for &i in &X86_INDICES {
            words[(page * 512 + i) as usize] = x86_entry(&mut g);
        }
    }
    let (gm, mut refmem, live) = memories(&words);
    let levels = g.pick(&[4u32, 5]);
    let out_bits = g.pick(&[36u32, 40, 46, 48, 52]);
    let fl_flags = g.below(8);
    let beyond = u64::from(g.chance(5));
    let root = g.below(X86_PAGES + beyond) << 12;
    let walker = VtdFirstStage::new(VtdConfig {
        pgd: root,
        addr_width: if levels == 5 { 57 } else { 48 },
        fl_flags,
        output_bits: out_bits as u8,
    })
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let params = X86Params {
        root,
        levels,
        out_bits,
        sre: fl_flags & 1 != 0,
        eafe: fl_flags & 2 != 0,
        wpe: fl_flags & 4 != 0,
    };
    for _ in 0..16 {
        let va = x86_va(&mut g, levels);
        let access = g.access();
        let real = walker.translate(&gm, va, access);
        let expected = x86_translate(&mut refmem, &params, va, access);
        prop_assert_eq!(real, expected, "va {:#x} {:?}", va, access);
        prop_assert!(same_marks(&gm, &refmem, &live), "A/D marks differ");
    }
    Ok(())
}

// --- Arm SMMUv3 CD table and stage 1.

/// RAM layout: CD tables in the first 512 KiB, stage-1 tables in 8
/// slots of 64 KiB from 1 MiB (aligned for every granule), 2 MiB in all.
const ARM_RAM: u64 = 2 << 20;
const CD_L2_AREA: u64 = 0x4_0000;
const S1_BASE: u64 = 0x10_0000;
const S1_SLOTS: u64 = 8;

fn arm_table_address(g: &mut Gen) -> u64 {
    if g.chance(95) {
        S1_BASE + (g.below(S1_SLOTS) << 16)
    } else {
        g.pick(&[ARM_RAM, 1 << 36, 1 << 44, 0x3000])
    }
}

/// A random VMSAv8-64 descriptor: invalid, table or block/page with
/// random attributes, sometimes garbage.
fn arm_descriptor(g: &mut Gen) -> u64 {
    match g.below(20) {
        0 => g.next() & !1,
        1 => g.next(),
        _ => {
            let mut d = arm_table_address(g) | 1;
            if g.chance(85) {
                d |= 1 << 1; // table / page
            }
            // AF, AP[2:1] and a few upper attributes at random.
            d |= g.next() & (1 << 10 | 1 << 7 | 1 << 6);
            if g.chance(70) {
                d |= 1 << 10;
            }
            // DBM, PXN, UXN, PXNTable, UXNTable, APTable.
            for (b, percent) in [
                (51, 35),
                (53, 15),
                (54, 15),
                (59, 10),
                (60, 10),
                (61, 10),
                (62, 15),
            ] {
                if g.chance(percent) {
                    d |= 1 << b;
                }
            }
            if g.chance(5) {
                d |= 1 << g.below(64);
            }
            d
        }
    }
}

fn arm_cd_word0(g: &mut Gen) -> u64 {
    let t0sz = if g.chance(95) {
        16 + g.below(24)
    } else {
        g.below(64)
    };
    let tg0 = if g.chance(95) { g.below(3) } else { 3 };
    let mut w0 = t0sz | tg0 << 6 | g.below(8) << 32 | g.below(1 << 16) << 48;
    for (b, percent) in [
        (31, 95),
        (41, 97),
        (15, 2),
        (14, 4),
        (38, 20),
        (42, 50),
        (43, 60),
    ] {
        if g.chance(percent) {
            w0 |= 1 << b;
        }
    }
    w0
}

fn arm_va(g: &mut Gen, granule: u32, input_bits: u32) -> u64 {
    let stride = granule - 3;
    let last = (1u64 << stride) - 1;
    let mut va = g.below(1 << granule);
    for level in 0..4 {
        let lo = granule + stride * (3 - level);
        if lo >= 64 {
            continue;
        }
        let index = if g.chance(90) {
            g.pick(&[0, 1, 2, last])
        } else {
            g.below(last + 1)
        };
        va |= index << lo;
    }
    if input_bits < 64 {
        va &= (1u64 << input_bits) - 1;
    }
    if g.chance(8) {
        va |= 1 << g.pick(&[39, 47, 55, 56, 63]);
    }
    va
}

fn check_arm(seed: u64) -> Result<(), TestCaseError> {
    let mut g = Gen::new(seed);
    let mut words = vec![0u64; (ARM_RAM / 8) as usize];
    let mut put = |addr: u64, value: u64| words[(addr / 8) as usize] = value;

    // The CD table: linear at 0, or L1 at 0 with L2 tables from 256 KiB.
    let s1fmt = g.below(3) as u8;
    let s1cdmax = g.below(13) as u32;
    let linear = s1cdmax == 0 || s1fmt == 0;
    // Mostly substreams whose CD fits the layout below.
    let fit = match (linear, s1fmt) {
        (true, _) => 1u64 << s1cdmax,
        (false, 1) => (1u64 << s1cdmax).min(12 << 6),
        (false, _) => (1u64 << s1cdmax).min(12 << 10),
    };
    let ssids: Vec<u32> = (0..6)
        .map(|_| {
            if g.chance(90) {
                g.below(fit) as u32
            } else {
                g.below((1u64 << s1cdmax) + 2) as u32
            }
        })
        .collect();
    // (ssid, CD word 0) of the CDs written, to aim addresses at them.
    let mut shapes = Vec::new();
    for &ssid in &ssids {
        let ssid = u64::from(ssid);
        let cd = if linear {
            64 * ssid
        } else {
            let split = if s1fmt == 1 { 6 } else { 10 };
            let l1 = 8 * (ssid >> split);
            // Each L1 slot gets its own 64 KiB-aligned L2 table.
            let l2 = CD_L2_AREA + (ssid >> split) * 0x1_0000;
            let garbage = g.next();
            let l1_desc = if g.chance(92) {
                l2 | 1
            } else {
                g.pick(&[l2, ARM_RAM | 1, garbage])
            };
            if l1 < CD_L2_AREA && l2 < S1_BASE {
                put(l1, l1_desc);
            }
            l2 + 64 * (ssid & ((1 << split) - 1))
        };
        if cd + 16 <= S1_BASE {
            let w0 = arm_cd_word0(&mut g);
            shapes.push((ssid as u32, w0));
            put(cd, w0);
            let ttb0 = S1_BASE + (g.below(S1_SLOTS) << 16);
            let ttb0 = if g.chance(95) { ttb0 } else { g.next() };
            put(cd + 8, ttb0 | (g.below(1 << 12) & !0xf));
        }
    }
    // Stage-1 tables: entries at indices 0, 1, 2 and last of every slot,
    // for every granule's notion of "last".
    for slot in 0..S1_SLOTS {
        let base = S1_BASE + (slot << 16);
        for index in [0, 1, 2, 511, 2047, 8191] {
            put(base + 8 * index, arm_descriptor(&mut g));
        }
    }
    let (gm, mut refmem, live) = memories(&words);

    let out_bits = g.pick(&[36u32, 40, 48, 52]);
    let params = ArmParams {
        s1fmt,
        s1cdmax,
        ptr: 0,
        out_bits,
    };
    let table = SmmuCdTable::new(SmmuCdConfig {
        s1fmt,
        s1cdmax,
        s1contextptr: 0,
        output_bits: out_bits as u8,
    })
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for _ in 0..16 {
        let ssid = g.pick(&ssids);
        // Mostly addresses shaped for the CD's own granule and T0SZ.
        let shape = shapes.iter().find(|&&(s, _)| s == ssid).map(|&(_, w0)| w0);
        let (granule, input_bits) = match shape {
            Some(w0) if g.chance(90) => (
                [12, 16, 14, 12][(w0 >> 6 & 3) as usize],
                64 - (w0 & 0x3f) as u32,
            ),
            _ => (
                g.pick(&[12u32, 14, 16]),
                g.pick(&[25u32, 36, 39, 42, 47, 48]),
            ),
        };
        let va = arm_va(&mut g, granule, input_bits);
        let access = g.access();
        let real = normalized(table.translate(&gm, ssid, va, access));
        let expected = normalized(arm_translate(&mut refmem, &params, ssid, va, access));
        prop_assert_eq!(real, expected, "ssid {} va {:#x} {:?}", ssid, va, access);
        prop_assert!(same_marks(&gm, &refmem, &live), "AF/AP marks differ");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn vtd_walker_agrees_with_reference_on_random_tables(seed in any::<u64>()) {
        check_x86(seed)?;
    }

    #[test]
    fn smmu_walker_agrees_with_reference_on_random_tables(seed in any::<u64>()) {
        check_arm(seed)?;
    }
}
