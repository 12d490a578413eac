// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VT-d first-stage walker (`viommu::pgtable::VtdFirstStage`) on
//! guest page tables of arbitrary content: 16 pages of RAM, each filled
//! with one entry value (so that any address walks deep) and then
//! patched at arbitrary indices; entries point into RAM, just past it or
//! anywhere, with arbitrary flag, reserved and ignored bits. A few walks
//! of arbitrary addresses and accesses per input.
//!
//! Beyond "no panic":
//! - `VtdFirstStage::new` accepts exactly the configurations its
//!   documentation allows (4 or 5 levels, known flags, an output width of
//!   32..=52, a 4 KiB-aligned root below it);
//! - every walk agrees with the plain reference walker of
//!   src/pgtable/reference.rs (translation or fault, field for field), and
//!   leaves the same accessed/dirty marks in guest memory;
//! - a walk reads at most one entry per level and exchanges only entries
//!   it read: it terminates and never roams outside the tables it walks;
//! - a successful walk gives a page that holds the address, of 4 KiB,
//!   2 MiB or 1 GiB, aligned, below the output width, and allowing the
//!   access that walked;
//! - with a guest that rewrites entries under the walker (no reference
//!   then), the walk still terminates within its retry bound and any
//!   translation it gives is well formed.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::pgtable::{ConfigError, PageAccess, VtdConfig, VtdFirstStage};
use viommu_fuzz::walk::{
    check_translation,
    reference::{x86_translate, RefMem, X86Params},
    Ram, Recorder,
};

const PAGES: usize = 16;

thread_local! {
    static RAM: Ram = Ram::new(PAGES);
}

#[derive(Arbitrary, Debug)]
struct Input {
    pgd: Pointer,
    five_level: Option<bool>,
    fl_flags: Flags,
    output_bits: Width,
    /// One value for every entry of a page, page by page.
    fill: Vec<Entry>,
    /// Then entries at (page, index).
    patches: Vec<(u8, u16, Entry)>,
    walks: Vec<Walk>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pointer {
    Page(u8),
    Any(u64),
}

impl Pointer {
    fn get(self) -> u64 {
        match self {
            // Pages of RAM and the two just past it.
            Pointer::Page(n) => (u64::from(n) % (PAGES as u64 + 2)) << 12,
            Pointer::Any(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Flags {
    Known(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Width {
    Usual(u8),
    Any(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Entry {
    /// A pointer with the low 12 bits and bits 63:52 as given, and maybe
    /// one address bit set between 32 and 51.
    Pointer {
        to: Pointer,
        low: u16,
        high: u16,
        wide: Option<u8>,
    },
    Any(u64),
}

impl Entry {
    fn get(self) -> u64 {
        match self {
            Entry::Pointer {
                to,
                low,
                high,
                wide,
            } => {
                let mut e = to.get() | u64::from(low & 0xfff) | u64::from(high & 0xfff) << 52;
                if let Some(b) = wide {
                    e |= 1 << (32 + u32::from(b % 20));
                }
                e
            }
            Entry::Any(e) => e,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Walk {
    va: Va,
    write: bool,
    execute: bool,
    privileged: bool,
    /// Guest rewrites of entries under the walker: how many, which bits.
    races: u8,
    flip: u64,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Va {
    /// Canonical for the table's width.
    Canonical(u64),
    Any(u64),
}

fn valid(c: &VtdConfig) -> bool {
    matches!(c.addr_width, 48 | 57)
        && c.fl_flags & !7 == 0
        && (32..=52).contains(&c.output_bits)
        && c.pgd.is_multiple_of(4096)
        && c.pgd >> c.output_bits == 0
}

fuzz_target!(|input: Input| {
    let config = VtdConfig {
        pgd: input.pgd.get(),
        addr_width: match input.five_level {
            Some(true) => 57,
            Some(false) => 48,
            None => input.pgd.get() as u32,
        },
        fl_flags: match input.fl_flags {
            Flags::Known(f) => u64::from(f & 7),
            Flags::Any(f) => f,
        },
        output_bits: match input.output_bits {
            Width::Usual(n) => [32, 36, 39, 40, 46, 48, 52][usize::from(n % 7)],
            Width::Any(n) => n,
        },
    };
    let walker = match VtdFirstStage::new(config) {
        Ok(w) => {
            assert!(valid(&config), "{config:?} accepted");
            w
        }
        Err(
            ConfigError::AddressWidth(_)
            | ConfigError::UnknownFlags(_)
            | ConfigError::OutputWidth(_)
            | ConfigError::RootAddress(_),
        ) => {
            assert!(!valid(&config), "{config:?} refused");
            return;
        }
        Err(e) => panic!("{config:?}: {e:?}"),
    };

    RAM.with(|ram| walks(ram, &input, &walker, &config));
});

fn walks(ram: &Ram, input: &Input, walker: &VtdFirstStage, config: &VtdConfig) {
    let words = ram.lay_out(
        input.fill.iter().map(|e| e.get()),
        input.patches.iter().take(64).map(|&(page, index, entry)| {
            (
                usize::from(page) % PAGES * 512 + usize::from(index % 512),
                entry.get(),
            )
        }),
    );
    let mut refmem = RefMem { words };
    let params = X86Params {
        root: config.pgd,
        levels: u32::from(walker.levels()),
        out_bits: u32::from(config.output_bits),
        sre: config.fl_flags & 1 != 0,
        eafe: config.fl_flags & 2 != 0,
        wpe: config.fl_flags & 4 != 0,
    };
    let top = u32::from(walker.levels()) * 9 + 11;

    for walk in input.walks.iter().take(8) {
        let va = match walk.va {
            Va::Canonical(v) => ((v << (63 - top)) as i64 >> (63 - top)) as u64,
            Va::Any(v) => v,
        };
        let access = PageAccess {
            write: walk.write,
            execute: walk.execute,
            privileged: walk.privileged,
        };
        let mem = Recorder::new(ram, u32::from(walk.races % 12), walk.flip);
        let real = walker.translate(&mem, va, access);
        mem.check_bounded(usize::from(walker.levels()));
        if let Ok(t) = &real {
            check_translation(t, va, access, params.out_bits, &[12, 21, 30]);
        }
        if walk.races % 12 != 0 && walk.flip != 0 {
            // The guest changed the tables: the reference follows them.
            mem.follow_guest(&mut refmem.words);
            continue;
        }
        let expected = x86_translate(&mut refmem, &params, va, access);
        assert_eq!(real, expected, "va {va:#x} {access:?}");
        mem.check_marks(&refmem.words);
    }
}
