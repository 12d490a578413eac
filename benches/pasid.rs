// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Benchmarks of the host PASID allocator over a 2^20 space, plus its
//! memory figures (printed first, computed from the structures' own
//! capacities through `memory_footprint()` / `memory_bytes()`).
//!
//! Occupied states are "scattered": the whole space is allocated, then a
//! random subset is freed down to the target occupancy, so holes are
//! spread over the space rather than packed at its end. Each measured
//! iteration is one pair that keeps the occupancy constant: allocate the
//! lowest free PASID, then free a live one, chosen by one of two patterns:
//! `churn` frees the oldest of the last 1024 allocated (a churning working
//! set over long-lived PASIDs; measures the code path, cache-warm) and
//! `random` a uniformly random live one (every pair misses the caches and
//! TLB on the 8 MiB state table: the memory-latency-bound worst case).
//!
//! Run: `cargo bench --bench pasid -- --quick`

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use viommu::pasid::{
    AllocatorConfig, FreeSpace, MemorySource, Pasid, PasidAllocator, SetId, TranslationMode,
    Translator, DEFAULT_SET_QUOTA,
};

const BITS: u8 = 20;
const MAX: Pasid = (1 << BITS) - 1;
const OCCUPANCIES: [(&str, f64); 2] = [("50%", 0.5), ("99.99%", 0.9999)];

/// xorshift64*: cheap, deterministic victim choice.
struct Rng(u64);

impl Rng {
    /// Uniform-enough index below `n` (multiply-shift, no division).
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32;
        ((r * n as u64) >> 32) as usize
    }
}

fn target(occupancy: f64) -> usize {
    (f64::from(MAX) * occupancy).round() as usize
}

fn allocator() -> PasidAllocator {
    let source = MemorySource::new(BITS, 1024).expect("source");
    PasidAllocator::new(AllocatorConfig::default(), Box::new(source)).expect("allocator")
}

/// Allocator filled to `occupancy` of 2^20 by one unlimited set, holes
/// scattered; returns it with the set and the live PASIDs.
fn scattered_allocator(occupancy: f64, rng: &mut Rng) -> (PasidAllocator, SetId, Vec<Pasid>) {
    let mut a = allocator();
    let set = a.create_set(u32::MAX).expect("set");
    let mut live: Vec<Pasid> = std::iter::from_fn(|| a.alloc(set, 1..=MAX).ok()).collect();
    while live.len() > target(occupancy) {
        let victim = live.swap_remove(rng.below(live.len()));
        a.free(set, victim).expect("free");
    }
    (a, set, live)
}

/// Recently allocated PASIDs that the `churn` pattern frees in FIFO order.
const CHURN_WINDOW: usize = 1024;

/// Which live PASID each pair frees.
#[derive(Clone, Copy)]
enum Victim {
    /// The oldest of the last `CHURN_WINDOW` allocated: a working set of
    /// churning PASIDs over a long-lived population, cache-warm.
    Churn,
    /// A uniformly random live one: every pair touches cold memory.
    Random,
}

const PATTERNS: [(&str, Victim); 2] = [("churn", Victim::Churn), ("random", Victim::Random)];

/// Live PASIDs of a bench, split by the role the victim pattern gives them.
struct Live {
    long_lived: Vec<Pasid>,
    window: VecDeque<Pasid>,
}

impl Live {
    /// Splits `live` for `victim`; for churn the window is refilled by
    /// `alloc` so that it holds the lowest free PASIDs, as in steady state.
    fn new(
        mut live: Vec<Pasid>,
        victim: Victim,
        mut free: impl FnMut(Pasid),
        mut alloc: impl FnMut() -> Pasid,
    ) -> Self {
        let mut window = VecDeque::new();
        if let Victim::Churn = victim {
            for _ in 0..CHURN_WINDOW.min(live.len()) {
                free(live.pop().expect("live"));
            }
            for _ in 0..CHURN_WINDOW.min(live.len()) {
                window.push_back(alloc());
            }
        }
        Self {
            long_lived: live,
            window,
        }
    }

    /// Records `new` as live and returns the victim to free.
    fn swap(&mut self, new: Pasid, victim: Victim, rng: &mut Rng) -> Pasid {
        match victim {
            Victim::Churn => {
                self.window.push_back(new);
                self.window.pop_front().expect("window")
            }
            Victim::Random => {
                let k = rng.below(self.long_lived.len());
                std::mem::replace(&mut self.long_lived[k], new)
            }
        }
    }
}

fn bench_free_space(c: &mut Criterion) {
    let mut g = c.benchmark_group("free_space/alloc_free_pair");
    g.throughput(Throughput::Elements(1));
    for (pattern, victim) in PATTERNS {
        for (name, occupancy) in OCCUPANCIES {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let mut space = FreeSpace::new(MAX + 1);
            for id in 1..=MAX {
                space.release(id);
            }
            let mut live: Vec<Pasid> =
                std::iter::from_fn(|| space.take_first_free_in(&(1..=MAX))).collect();
            while live.len() > target(occupancy) {
                space.release(live.swap_remove(rng.below(live.len())));
            }
            let space = std::cell::RefCell::new(space);
            let mut live = Live::new(
                live,
                victim,
                |p| {
                    space.borrow_mut().release(p);
                },
                || {
                    space
                        .borrow_mut()
                        .take_first_free_in(&(1..=MAX))
                        .expect("id")
                },
            );
            let mut space = space.into_inner();
            g.bench_function(BenchmarkId::new(pattern, name), |b| {
                b.iter(|| {
                    let id = space.take_first_free_in(&(1..=MAX)).expect("free id");
                    let victim = live.swap(id, victim, &mut rng);
                    space.release(black_box(victim));
                })
            });
        }
    }
    g.finish();
}

fn bench_allocator(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocator/alloc_free_pair");
    g.throughput(Throughput::Elements(1));
    for (pattern, victim) in PATTERNS {
        for (name, occupancy) in OCCUPANCIES {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03);
            let (a, set, live) = scattered_allocator(occupancy, &mut rng);
            let a = std::cell::RefCell::new(a);
            let mut live = Live::new(
                live,
                victim,
                |p| a.borrow_mut().free(set, p).expect("free"),
                || a.borrow_mut().alloc(set, 1..=MAX).expect("alloc"),
            );
            let mut a = a.into_inner();
            g.bench_function(BenchmarkId::new(pattern, name), |b| {
                b.iter(|| {
                    let id = a.alloc(set, 1..=MAX).expect("alloc");
                    let victim = live.swap(id, victim, &mut rng);
                    a.free(set, black_box(victim)).expect("free");
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("allocator/get_put_pair");
    g.throughput(Throughput::Elements(1));
    let mut rng = Rng(0x94D0_49BB_1331_11EB);
    let (mut a, set, live) = scattered_allocator(0.5, &mut rng);
    g.bench_function("random/50%", |b| {
        b.iter(|| {
            let p = live[rng.below(live.len())];
            a.get(set, p).expect("get");
            a.put(set, black_box(p)).expect("put");
        })
    });
    g.finish();
}

/// Global-mode translator over one unlimited set: guest PASIDs 1..=MAX
/// mapped, then random ones unmapped down to `occupancy`.
fn scattered_translator(
    occupancy: f64,
    rng: &mut Rng,
) -> (PasidAllocator, Translator, SetId, Vec<Pasid>) {
    let mut a = allocator();
    let mut t = Translator::new(TranslationMode::Global, &a);
    let set = a.create_set(u32::MAX).expect("set");
    let mut live: Vec<Pasid> = (1..=MAX)
        .filter(|g| t.map(&mut a, set, *g, BITS).is_ok())
        .collect();
    while live.len() > target(occupancy) {
        let victim = live.swap_remove(rng.below(live.len()));
        t.unmap(&mut a, set, victim).expect("unmap");
    }
    (a, t, set, live)
}

fn bench_translator(c: &mut Criterion) {
    let mut g = c.benchmark_group("translator/unmap_map_pair");
    g.throughput(Throughput::Elements(1));
    for (name, occupancy) in OCCUPANCIES {
        let mut rng = Rng(0xBF58_476D_1CE4_E5B9);
        let (mut a, mut t, set, live) = scattered_translator(occupancy, &mut rng);
        g.bench_function(BenchmarkId::new("random", name), |b| {
            b.iter(|| {
                let guest = live[rng.below(live.len())];
                t.unmap(&mut a, set, guest).expect("unmap");
                black_box(t.map(&mut a, set, guest, BITS).expect("map"));
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("translator/lookup");
    g.throughput(Throughput::Elements(1));
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (a, t, set, live) = scattered_translator(0.5, &mut rng);
    g.bench_function("to_host/random/50%", |b| {
        b.iter(|| {
            let guest = live[rng.below(live.len())];
            black_box(t.to_host(&a, set, guest, BITS).expect("to_host"))
        })
    });
    let hosts: Vec<Pasid> = live
        .iter()
        .filter_map(|g| t.to_host(&a, set, *g, BITS).ok())
        .collect();
    g.bench_function("to_guest/random/50%", |b| {
        b.iter(|| {
            let host = hosts[rng.below(hosts.len())];
            black_box(t.to_guest(&a, host, BITS).expect("to_guest"))
        })
    });
    g.finish();
}

/// Memory of one state: VMs with the default quota (1000) mapping guest
/// PASIDs 1..=1000 in global mode until the host space is full (or, for
/// `dense`, until the target is reached), then random mappings unmapped
/// down to the target.
fn memory_state(occupancy: f64, dense: bool) {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut a = allocator();
    let mut t = Translator::new(TranslationMode::Global, &a);
    let fill = if dense {
        target(occupancy)
    } else {
        MAX as usize
    };
    let mut live: Vec<(SetId, Pasid)> = Vec::new();
    'fill: loop {
        let set = a.create_set(DEFAULT_SET_QUOTA).expect("set");
        for guest in 1..=DEFAULT_SET_QUOTA {
            if live.len() == fill || t.map(&mut a, set, guest, BITS).is_err() {
                break 'fill;
            }
            live.push((set, guest));
        }
    }
    while live.len() > target(occupancy) {
        let (set, guest) = live.swap_remove(rng.below(live.len()));
        t.unmap(&mut a, set, guest).expect("unmap");
    }
    let fp = a.memory_footprint();
    let translator = t.memory_bytes();
    let n = f64::from(fp.live_pasids);
    let per_live = |bytes: usize| bytes as f64 / n;
    println!(
        "{:>7} {:9} live={:>7}  state {:5.1} B + maps {:5.1} B + sets {:4.1} B = {:5.1} B per live PASID",
        format!("{:.2}%", occupancy * 100.0),
        if dense { "dense" } else { "scattered" },
        fp.live_pasids,
        per_live(fp.pasid_table),
        per_live(translator),
        per_live(fp.sets),
        per_live(fp.pasid_table + translator + fp.sets),
    );
}

fn memory_report() {
    let fp = allocator().memory_footprint();
    println!("== PASID allocator memory (2^{BITS} space) ==");
    println!(
        "free-space index: {} bytes ({:.1} KiB)",
        fp.free_space_index,
        fp.free_space_index as f64 / 1024.0
    );
    println!(
        "empty allocator: PASID table directory {} bytes",
        fp.pasid_table
    );
    println!("per live PASID (global mode, VMs of quota {DEFAULT_SET_QUOTA}):");
    memory_state(0.5, true);
    memory_state(0.5, false);
    memory_state(0.9999, false);
}

fn main() {
    memory_report();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_free_space(&mut c);
    bench_allocator(&mut c);
    bench_translator(&mut c);
    c.final_summary();
}
