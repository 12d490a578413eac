// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The SMMUv3 CD table and AArch64 stage-1 walker
//! (`viommu::pgtable::SmmuCdTable`) on guest memory of arbitrary content:
//! 128 KiB of RAM, each 4 KiB page filled with one descriptor (so that
//! any address walks deep), then context descriptors, L1 CD descriptors
//! and arbitrary words written over it; tables point into RAM, just past
//! it or anywhere, with arbitrary attributes. A few walks of arbitrary
//! substreams, addresses and accesses per input.
//!
//! Beyond "no panic":
//! - `SmmuCdTable::new` accepts exactly the configurations its
//!   documentation allows (a known format, `s1cdmax` <= 20, an output
//!   width of 32..=52, a 64-byte aligned table below it);
//! - every walk agrees with the plain reference walker of
//!   src/pgtable/reference.rs (translation or fault, field for field, the
//!   free-text reason of a malformed CD aside), and leaves the same AF and
//!   dirty marks in guest memory;
//! - a walk reads at most three CD-table words and one descriptor per
//!   level, and exchanges only descriptors it read: it terminates and
//!   never roams outside the tables it walks;
//! - a successful walk gives a page that holds the (tag-cleared) address,
//!   of a size the granule has, aligned, below the output width, and
//!   allowing the access that walked;
//! - with a guest that rewrites descriptors under the walker (no
//!   reference then), the walk still terminates within its retry bound
//!   and any translation it gives is well formed.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::pgtable::{ConfigError, PageAccess, SmmuCdConfig, SmmuCdTable, WalkFault};
use viommu_fuzz::walk::{
    check_translation,
    reference::{arm_translate, ArmParams, RefMem},
    Ram, Recorder,
};

const PAGES: usize = 32;
const WORDS: usize = PAGES * 512;

thread_local! {
    static RAM: Ram = Ram::new(PAGES);
}

#[derive(Arbitrary, Debug)]
struct Input {
    s1fmt: u8,
    s1cdmax: u8,
    table: Pointer,
    output_bits: Width,
    /// One descriptor for every word of a page, page by page.
    fill: Vec<Desc>,
    /// Context descriptors at 64-byte slots.
    cds: Vec<(u16, Cd)>,
    /// Then words at word indices.
    patches: Vec<(u16, Word)>,
    walks: Vec<Walk>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pointer {
    /// A 4 KiB page of RAM, or one of the two past it.
    Page(u8),
    /// A 64 KiB slot (the last one is past RAM).
    Slot(u8),
    /// A 64-byte CD slot in the first pages.
    Cd(u8),
    Any(u64),
}

impl Pointer {
    fn get(self) -> u64 {
        match self {
            Pointer::Page(n) => (u64::from(n) % (PAGES as u64 + 2)) << 12,
            Pointer::Slot(n) => u64::from(n % 3) << 16,
            Pointer::Cd(n) => u64::from(n) << 6,
            Pointer::Any(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Width {
    Usual(u8),
    Any(u8),
}

/// A VMSAv8-64 descriptor.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Desc {
    /// Bit 0 (valid) and bit 1 (table / page).
    kind: u8,
    to: Pointer,
    /// AF, AP[1], AP[2], DBM, PXN, UXN, PXNTable, UXNTable, APTable[0],
    /// APTable[1], in that order from bit 0.
    attrs: u16,
    /// One more bit anywhere.
    extra: Option<u8>,
}

impl Desc {
    fn get(self) -> u64 {
        let mut d = (self.to.get() & !0xfff) | u64::from(self.kind & 3);
        for (i, bit) in [10, 6, 7, 51, 53, 54, 59, 60, 61, 62]
            .into_iter()
            .enumerate()
        {
            if self.attrs & (1 << i) != 0 {
                d |= 1 << bit;
            }
        }
        if let Some(b) = self.extra {
            d |= 1 << (b % 64);
        }
        d
    }
}

/// A context descriptor's first two words.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Cd {
    /// T0SZ: 16 + n % 24 (the valid ones), or any 6 bits.
    t0sz: Width,
    tg0: u8,
    ips: u8,
    /// V and AA64 are set unless these say otherwise.
    invalid: bool,
    aarch32: bool,
    /// EPD0, ENDI, TBI0, HD, HA from bit 0.
    flags: u8,
    asid: u16,
    ttb0: Pointer,
    ttb0_low: u16,
}

impl Cd {
    fn words(self) -> [u64; 2] {
        let t0sz = match self.t0sz {
            Width::Usual(n) => 16 + u64::from(n % 24),
            Width::Any(n) => u64::from(n & 0x3f),
        };
        let mut w0 = t0sz
            | u64::from(self.tg0 & 3) << 6
            | u64::from(self.ips & 7) << 32
            | u64::from(self.asid) << 48;
        if !self.invalid {
            w0 |= 1 << 31;
        }
        if !self.aarch32 {
            w0 |= 1 << 41;
        }
        for (i, bit) in [14, 15, 38, 42, 43].into_iter().enumerate() {
            if self.flags & (1 << i) != 0 {
                w0 |= 1 << bit;
            }
        }
        let w1 = self.ttb0.get() | u64::from(self.ttb0_low & 0xff0);
        [w0, w1]
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Word {
    Desc(Desc),
    /// An L1 CD descriptor: an L2 table pointer and V.
    L1 {
        to: Pointer,
        valid: bool,
    },
    Any(u64),
}

impl Word {
    fn get(self) -> u64 {
        match self {
            Word::Desc(d) => d.get(),
            Word::L1 { to, valid } => (to.get() & !0xfff) | u64::from(valid),
            Word::Any(w) => w,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Walk {
    ssid: Ssid,
    va: Va,
    write: bool,
    execute: bool,
    privileged: bool,
    /// Guest rewrites of descriptors under the walker: how many, which bits.
    races: u8,
    flip: u64,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ssid {
    Small(u8),
    Any(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Va {
    /// The low `bits` bits of the value.
    Masked(u64, u8),
    Any(u64),
}

fn valid(c: &SmmuCdConfig) -> bool {
    c.s1fmt <= 2
        && c.s1cdmax <= 20
        && (32..=52).contains(&c.output_bits)
        && c.s1contextptr.is_multiple_of(64)
        && c.s1contextptr >> c.output_bits == 0
}

/// Faults compared without the free-text reason of a malformed CD.
fn normalized<T>(r: Result<T, WalkFault>) -> Result<T, WalkFault> {
    r.map_err(|f| match f {
        WalkFault::CdMalformed { ssid, entry, .. } => WalkFault::CdMalformed {
            ssid,
            entry,
            reason: "",
        },
        other => other,
    })
}

fuzz_target!(|input: Input| {
    let config = SmmuCdConfig {
        s1fmt: input.s1fmt % 4,
        s1cdmax: u32::from(input.s1cdmax % 24),
        s1contextptr: input.table.get(),
        output_bits: match input.output_bits {
            Width::Usual(n) => [32, 36, 40, 44, 48, 52][usize::from(n % 6)],
            Width::Any(n) => n,
        },
    };
    let table = match SmmuCdTable::new(config) {
        Ok(t) => {
            assert!(valid(&config), "{config:?} accepted");
            t
        }
        Err(
            ConfigError::CdTableFormat(_)
            | ConfigError::CdMax(_)
            | ConfigError::OutputWidth(_)
            | ConfigError::RootAddress(_),
        ) => {
            assert!(!valid(&config), "{config:?} refused");
            return;
        }
        Err(e) => panic!("{config:?}: {e:?}"),
    };

    RAM.with(|ram| walks(ram, &input, &table, &config));
});

fn walks(ram: &Ram, input: &Input, table: &SmmuCdTable, config: &SmmuCdConfig) {
    let cds = input.cds.iter().take(16).flat_map(|&(slot, cd)| {
        let at = usize::from(slot) % (WORDS / 8) * 8;
        let [w0, w1] = cd.words();
        [(at, w0), (at + 1, w1)]
    });
    let patches = input
        .patches
        .iter()
        .take(64)
        .map(|&(index, word)| (usize::from(index), word.get()));
    let words = ram.lay_out(input.fill.iter().map(|d| d.get()), cds.chain(patches));
    let mut refmem = RefMem { words };
    let params = ArmParams {
        s1fmt: config.s1fmt,
        s1cdmax: config.s1cdmax,
        ptr: config.s1contextptr,
        out_bits: u32::from(config.output_bits),
    };

    for walk in input.walks.iter().take(8) {
        let ssid = match walk.ssid {
            Ssid::Small(n) => u32::from(n),
            Ssid::Any(n) => n,
        };
        let va = match walk.va {
            Va::Masked(v, bits) => v & (u64::MAX >> (63 - bits % 64)),
            Va::Any(v) => v,
        };
        let access = PageAccess {
            write: walk.write,
            execute: walk.execute,
            privileged: walk.privileged,
        };
        let mem = Recorder::new(ram, u32::from(walk.races % 12), walk.flip);
        let real = normalized(table.translate(&mem, ssid, va, access));
        // Three CD-table words, then at most four levels.
        mem.check_bounded(7);
        if let Ok(t) = &real {
            let untagged = if va & (1 << 55) == 0 {
                va & 0x00ff_ffff_ffff_ffff
            } else {
                va
            };
            let seen = if t.contains(va) { va } else { untagged };
            let shifts = [12, 14, 16, 21, 25, 29, 30];
            check_translation(t, seen, access, params.out_bits, &shifts);
        }
        if walk.races % 12 != 0 && walk.flip != 0 {
            // The guest changed the tables: the reference follows them.
            mem.follow_guest(&mut refmem.words);
            continue;
        }
        let expected = normalized(arm_translate(&mut refmem, &params, ssid, va, access));
        assert_eq!(real, expected, "ssid {ssid} va {va:#x} {access:?}");
        mem.check_marks(&refmem.words);
    }
}
