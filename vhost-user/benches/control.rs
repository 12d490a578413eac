// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Control-plane benchmark printing the figures of docs/benchmarks.md:
//!
//! 1. translations through `viommu-client`: cache hits, and misses that
//!    go to the daemon (a client without cache), p50/p99 and per second;
//! 2. guest UNMAP kick-to-completion latency with 0, 1 and 4 caching
//!    clients, each of which must acknowledge the invalidation;
//! 3. the same two for a guest PASID table (x86-64, 4 levels): cached and
//!    daemon-walked (PASID, VA) translations, and INVALIDATE
//!    kick-to-completion with 0, 1 and 4 caching clients.
//!
//! Run: `cargo bench -p vhost-device-iommu --bench control` (`-- quick`
//! for a shorter run).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{hint::black_box, time::Instant};

use common::tables::{self, TableArena, X86Table};
use common::{Daemon, Guest, GuestOptions, DATA_AREA};
use viommu::{pgtable::PageAccess, wire::*};
use viommu_client::{Access, Client, Options};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const EP: u32 = 0x20;
/// Clients' ack deadline in the invalidation figures: 10x the default, so
/// a busy machine that deschedules a client for 100 ms does not turn the
/// benchmark into a disconnect (the deadline is not reached otherwise, so
/// the figures are those of the default).
const ACK_TIMEOUT_MS: &str = "1000";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut ns: Vec<f64>) {
    ns.sort_by(f64::total_cmp);
    let mean = ns.iter().sum::<f64>() / ns.len() as f64;
    println!(
        "{what}: p50 {:.1} ns, p99 {:.1} ns, {:.2} M/s ({} samples)",
        percentile(&ns, 0.5),
        percentile(&ns, 0.99),
        1e3 / mean,
        ns.len()
    );
}

fn translations(samples: usize) {
    let d = Daemon::start(&["--boot-bypass", "off"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, EP);
    for i in 0..64u64 {
        g.map(
            1,
            0x100000 + i * 0x1000,
            0x100fff + i * 0x1000,
            DATA_AREA + i * 0x1000,
            RW,
        );
    }
    // Cache hits: timed in batches of 100 so the clock is not the figure.
    let cached = Client::connect(
        &d.control,
        Options {
            cache: true,
            subscribe: None,
        },
    )
    .unwrap();
    for i in 0..64u64 {
        cached
            .translate_with(EP, 0x100000 + i * 0x1000, 4096, Access::Write, |s| s[0].gpa)
            .unwrap();
    }
    let mut hits = Vec::with_capacity(samples / 100);
    for round in 0..samples / 100 {
        let t = Instant::now();
        for i in 0..100u64 {
            let iova = 0x100000 + ((round as u64 * 7 + i) % 64) * 0x1000;
            let gpa = cached
                .translate_with(EP, black_box(iova), 4096, Access::Write, |s| s[0].gpa)
                .unwrap();
            black_box(gpa);
        }
        hits.push(t.elapsed().as_nanos() as f64 / 100.0);
    }
    report("translate, cache hit (per lookup, batches of 100)", hits);
    // Misses: every translation is a round trip to the daemon.
    let uncached = Client::connect(&d.control, Options::default()).unwrap();
    let mut misses = Vec::with_capacity(samples / 100);
    for i in 0..samples / 100 {
        let iova = 0x100000 + (i as u64 % 64) * 0x1000;
        let t = Instant::now();
        black_box(uncached.translate(EP, iova, 4096, Access::Write).unwrap());
        misses.push(t.elapsed().as_nanos() as f64);
    }
    report("translate, miss (round trip to the daemon)", misses);
}

fn unmap_completion(clients: usize, samples: usize) {
    let d = Daemon::start(&[
        "--boot-bypass",
        "off",
        "--client-timeout-ms",
        ACK_TIMEOUT_MS,
    ]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, EP);
    let cs: Vec<Client> = (0..clients)
        .map(|_| {
            Client::connect(
                &d.control,
                Options {
                    cache: true,
                    subscribe: None,
                },
            )
            .unwrap()
        })
        .collect();
    let map = MapReq::new(1, 0x100000, 0x100fff, DATA_AREA, RW);
    let unmap = UnmapReq::new(1, 0x100000, 0x100fff);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 200 {
        g.submit(&[(readable_part(&map), 4)]);
        for c in &cs {
            c.translate(EP, 0x100000, 8, Access::Read).unwrap();
        }
        g.queue(&[(readable_part(&unmap), 4)]);
        let t = Instant::now();
        g.rq.publish(&g.mem);
        g.kicks[0].write(1).unwrap();
        while g.rq.pop_used(&g.mem).is_none() {
            std::hint::spin_loop();
        }
        if i >= 200 {
            lat.push(t.elapsed().as_nanos() as f64);
        }
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "guest UNMAP kick to completion with {clients} caching client(s): p50 {:.1} us, p99 {:.1} us ({samples} unmaps)",
        percentile(&lat, 0.5) / 1e3,
        percentile(&lat, 0.99) / 1e3
    );
}

const PASID_EP: u32 = 0x28;
const VA: u64 = 0x7f00_0000_0000;

/// A guest with one PASID bound to a 4-level x86-64 table mapping 64
/// pages at `VA`; returns the guest (its memory holds the table) and the
/// PASID.
fn bound_table(d: &Daemon) -> (Guest, u32) {
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let (status, pasid) = g.pasid_alloc(1, 1000);
    assert_eq!(status, VIRTIO_IOMMU_S_OK);
    let arena = TableArena::new(&g.mem, 0x80_0000, 0xc0_0000);
    let t = X86Table::new(&arena, 4);
    for i in 0..64u64 {
        t.map(
            VA + i * 0x1000,
            1,
            DATA_AREA + i * 0x1000,
            tables::RW | tables::US,
        );
    }
    let st = g.attach_table_vtd(100, PASID_EP, pasid, t.root, t.addr_width());
    assert_eq!(st, VIRTIO_IOMMU_S_OK);
    (g, pasid)
}

fn pasid_translations(samples: usize) {
    let d = Daemon::start(&[]);
    let (_g, pasid) = bound_table(&d);
    let cached = Client::connect(
        &d.control,
        Options {
            cache: true,
            subscribe: None,
        },
    )
    .unwrap();
    let tr = |c: &Client, va| {
        c.translate_pasid_with(PASID_EP, pasid, va, 4096, PageAccess::WRITE, |s| s[0].gpa)
            .unwrap()
    };
    for i in 0..64u64 {
        tr(&cached, VA + i * 0x1000);
    }
    let mut hits = Vec::with_capacity(samples / 100);
    for round in 0..samples / 100 {
        let t = Instant::now();
        for i in 0..100u64 {
            let va = VA + ((round as u64 * 7 + i) % 64) * 0x1000;
            black_box(tr(&cached, black_box(va)));
        }
        hits.push(t.elapsed().as_nanos() as f64 / 100.0);
    }
    report(
        "translate (PASID, VA), cache hit (per lookup, batches of 100)",
        hits,
    );
    let uncached = Client::connect(&d.control, Options::default()).unwrap();
    let mut misses = Vec::with_capacity(samples / 100);
    for i in 0..samples / 100 {
        let va = VA + (i as u64 % 64) * 0x1000;
        let t = Instant::now();
        black_box(tr(&uncached, va));
        misses.push(t.elapsed().as_nanos() as f64);
    }
    report(
        "translate (PASID, VA), miss (round trip, daemon walk cache)",
        misses,
    );
}

fn invalidate_completion(clients: usize, samples: usize) {
    let d = Daemon::start(&["--client-timeout-ms", ACK_TIMEOUT_MS]);
    let (mut g, pasid) = bound_table(&d);
    let cs: Vec<Client> = (0..clients)
        .map(|_| {
            Client::connect(
                &d.control,
                Options {
                    cache: true,
                    subscribe: None,
                },
            )
            .unwrap()
        })
        .collect();
    let inv = InvalidateReq::new(
        VIRTIO_IOMMU_INV_G_VA,
        VIRTIO_IOMMU_INV_T_IOTLB | VIRTIO_IOMMU_INV_T_DEV_IOTLB,
        100,
    )
    .with_pasid(pasid)
    .with_range(VA, 1, 12);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 200 {
        for c in &cs {
            c.translate_pasid(PASID_EP, pasid, VA, 8, PageAccess::READ)
                .unwrap();
        }
        g.queue(&[(readable_part(&inv), 4)]);
        let t = Instant::now();
        g.rq.publish(&g.mem);
        g.kicks[0].write(1).unwrap();
        while g.rq.pop_used(&g.mem).is_none() {
            std::hint::spin_loop();
        }
        if i >= 200 {
            lat.push(t.elapsed().as_nanos() as f64);
        }
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "guest INVALIDATE kick to completion with {clients} caching client(s): p50 {:.1} us, p99 {:.1} us ({samples} invalidations)",
        percentile(&lat, 0.5) / 1e3,
        percentile(&lat, 0.99) / 1e3
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let scale = if quick { 10 } else { 1 };
    println!(
        "control plane benchmarks ({} run)",
        if quick { "quick" } else { "full" }
    );
    translations(1_000_000 / scale);
    for clients in [0, 1, 4] {
        unmap_completion(clients, 5_000 / scale);
    }
    pasid_translations(1_000_000 / scale);
    for clients in [0, 1, 4] {
        invalidate_completion(clients, 5_000 / scale);
    }
}
