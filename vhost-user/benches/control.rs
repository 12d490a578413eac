// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Control-plane benchmark printing the figures of docs/benchmarks.md:
//!
//! 1. translations through `viommu-client`: cache hits, and misses that
//!    go to the daemon (a client without cache), p50/p99 and per second;
//! 2. guest UNMAP kick-to-completion latency with 0, 1 and 4 caching
//!    clients, each of which must acknowledge the invalidation.
//!
//! Run: `cargo bench -p vhost-device-iommu --bench control` (`-- quick`
//! for a shorter run).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use common::{Daemon, Guest, GuestOptions, DATA_AREA};
use viommu::wire::*;
use viommu_client::{Access, Client, Options};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const EP: u32 = 0x20;

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
    let d = Daemon::start(&["--boot-bypass", "off"]);
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
    let _ = Duration::ZERO;
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
}
