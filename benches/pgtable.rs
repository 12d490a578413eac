// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Walk cost of the VT-d first-stage walker, warm and cold, for 4- and
//! 5-level tables, as a ratio to the cost of one dependent DRAM miss
//! measured in the same run.
//!
//! - DRAM miss: a pointer chase over a 256 MiB random cyclic permutation
//!   of cache lines (each load depends on the previous one).
//! - Cold walk: every level is a pool of 16384 fully populated table pages
//!   (64 MiB of entries a level), placed at random page frames of one
//!   guest memory; every entry points to a random page of the next pool.
//!   Each walk starts from a random root (a random PASID) at a random
//!   address, so each level reads a random line of a 64 MiB pool: a miss
//!   in every cache and the TLB, like the chase.
//! - Warm walk: the same address of one table again and again (accessed
//!   flags already set, so no compare-exchange), everything in L1.
//!
//! Walks are made dependent on each other (the next one's inputs depend,
//! through an opaque zero, on the previous result), so the figures are
//! latencies, not overlapped throughput. Each figure is measured in
//! `RUNS` runs; the median and the range are printed.
//!
//! Run: `cargo bench -p viommu --bench pgtable`

use std::hint::black_box;
use std::time::Instant;

use viommu::pgtable::{PageAccess, VtdConfig, VtdFirstStage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RUNS: usize = 5;
const CHASE_BYTES: usize = 256 << 20;
const CHASE_STEPS: usize = 4 << 20;
const POOL_PAGES: u64 = 16384;
const COLD_PAIRS: usize = 1 << 20;
const COLD_WALKS: usize = 1 << 20;
const WARM_WALKS: usize = 4 << 20;

/// P | R/W | U/S | A: present, writable, user, accessed.
const TABLE: u64 = 0x27;
/// A leaf that is also dirty.
const LEAF: u64 = TABLE | 0x40;

/// xorshift64*: cheap, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// One pointer per 64-byte line, in one random cycle (Sattolo).
fn chase_chain(rng: &mut Rng) -> Vec<u64> {
    let lines = CHASE_BYTES / 64;
    let mut order: Vec<u64> = (0..lines as u64).collect();
    for i in (1..lines).rev() {
        order.swap(i, rng.below(i as u64) as usize);
    }
    let mut chain = vec![0u64; CHASE_BYTES / 8];
    for w in 0..lines {
        let from = order[w] as usize;
        let to = order[(w + 1) % lines];
        chain[from * 8] = to * 8;
    }
    chain
}

fn dram_miss_ns(chain: &[u64]) -> f64 {
    let mut i = 0usize;
    let start = Instant::now();
    for _ in 0..CHASE_STEPS {
        i = chain[i] as usize;
    }
    black_box(i);
    start.elapsed().as_nanos() as f64 / CHASE_STEPS as f64
}

/// Pools of `levels` x POOL_PAGES table pages at random frames; returns
/// the guest memory and the root pages.
fn cold_tables(levels: u64, rng: &mut Rng) -> (GuestMemoryMmap<()>, Vec<u64>) {
    let frames_total = levels * POOL_PAGES;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (frames_total << 12) as usize)])
            .expect("guest memory");
    let mut frames: Vec<u64> = (0..frames_total).collect();
    rng.shuffle(&mut frames);
    // pool[l] holds the pages of level l + 1.
    let pool: Vec<&[u64]> = frames.chunks(POOL_PAGES as usize).collect();
    let mut page = [0u8; 4096];
    for level in 1..=levels as usize {
        for &frame in pool[level - 1] {
            for entry in page.chunks_mut(8) {
                let value = if level == 1 {
                    // Any output address: the walker never touches it.
                    (rng.below(1 << 24) << 12) | LEAF
                } else {
                    (pool[level - 2][rng.below(POOL_PAGES) as usize] << 12) | TABLE
                };
                entry.copy_from_slice(&value.to_le_bytes());
            }
            mem.write_slice(&page, GuestAddress(frame << 12))
                .expect("in RAM");
        }
    }
    let roots = pool[levels as usize - 1].iter().map(|f| f << 12).collect();
    (mem, roots)
}

fn walker(pgd: u64, levels: u64) -> VtdFirstStage {
    VtdFirstStage::new(VtdConfig {
        pgd,
        addr_width: if levels == 5 { 57 } else { 48 },
        fl_flags: 0,
        output_bits: 48,
    })
    .expect("valid config")
}

/// A random user-half canonical address of a `levels`-level table.
fn user_va(rng: &mut Rng, levels: u64) -> u64 {
    rng.next() & ((1u64 << (12 + 9 * levels - 1)) - 1)
}

struct Cold {
    mem: GuestMemoryMmap<()>,
    walkers: Vec<VtdFirstStage>,
    pairs: Vec<(u32, u64)>,
}

impl Cold {
    fn new(levels: u64, rng: &mut Rng) -> Self {
        let (mem, roots) = cold_tables(levels, rng);
        let walkers = roots.iter().map(|&r| walker(r, levels)).collect();
        let pairs = (0..COLD_PAIRS)
            .map(|_| (rng.below(POOL_PAGES) as u32, user_va(rng, levels)))
            .collect();
        Cold {
            mem,
            walkers,
            pairs,
        }
    }

    fn walk_ns(&self) -> f64 {
        let zero = black_box(0u64);
        let mut dep = 0u64;
        let start = Instant::now();
        for k in 0..COLD_WALKS {
            let (root, va) = self.pairs[(k + dep as usize) % COLD_PAIRS];
            let t = self.walkers[root as usize]
                .translate(&self.mem, va, PageAccess::READ)
                .expect("cold walk translates");
            dep = t.gpa & zero;
        }
        black_box(dep);
        start.elapsed().as_nanos() as f64 / COLD_WALKS as f64
    }
}

struct Warm {
    mem: GuestMemoryMmap<()>,
    walker: VtdFirstStage,
    va: u64,
}

impl Warm {
    fn new(levels: u64) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])
            .expect("guest memory");
        let va = 0x7f12_3456_7000 & ((1u64 << (12 + 9 * levels - 1)) - 1);
        // Root at 0x1000, then one table a level at 0x2000, 0x3000...
        for level in (1..=levels).rev() {
            let table = (levels - level + 1) << 12;
            let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            let value = if level == 1 {
                0x8_0000 | LEAF
            } else {
                (table + 0x1000) | TABLE
            };
            mem.write_obj(value.to_le(), GuestAddress(table + index * 8))
                .expect("in RAM");
        }
        Warm {
            mem,
            walker: walker(0x1000, levels),
            va,
        }
    }

    fn walk_ns(&self) -> f64 {
        let zero = black_box(0u64);
        let mut dep = 0u64;
        let start = Instant::now();
        for _ in 0..WARM_WALKS {
            let t = self
                .walker
                .translate(&self.mem, self.va | dep, PageAccess::READ)
                .expect("warm walk translates");
            dep = t.gpa & zero;
        }
        black_box(dep);
        start.elapsed().as_nanos() as f64 / WARM_WALKS as f64
    }
}

/// Median, min and max.
fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let chain = chase_chain(&mut rng);
    let cold4 = Cold::new(4, &mut rng);
    let cold5 = Cold::new(5, &mut rng);
    let warm4 = Warm::new(4);
    let warm5 = Warm::new(5);
    // One untimed pass of each to fault pages in and warm the code.
    dram_miss_ns(&chain);
    cold4.walk_ns();
    cold5.walk_ns();

    let names = [
        "dependent DRAM miss (256 MiB chase)",
        "cold walk, 4-level",
        "cold walk, 5-level",
        "warm walk, 4-level",
        "warm walk, 5-level",
    ];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..RUNS {
        let run = [
            dram_miss_ns(&chain),
            cold4.walk_ns(),
            cold5.walk_ns(),
            warm4.walk_ns(),
            warm5.walk_ns(),
        ];
        for (i, &x) in run.iter().enumerate() {
            ns[i].push(x);
            ratio[i].push(x / run[0]);
        }
    }

    println!("command: cargo bench -p viommu --bench pgtable");
    println!("{RUNS} runs, median [min - max]");
    println!(
        "{:<38} {:>24} {:>26}",
        "figure", "ns", "x one dependent DRAM miss"
    );
    for (i, name) in names.iter().enumerate() {
        let (m, lo, hi) = summary(ns[i].clone());
        let (rm, rlo, rhi) = summary(ratio[i].clone());
        println!(
            "{name:<38} {:>24} {:>26}",
            format!("{m:.1} [{lo:.1} - {hi:.1}]"),
            format!("{rm:.2} [{rlo:.2} - {rhi:.2}]")
        );
    }
}
