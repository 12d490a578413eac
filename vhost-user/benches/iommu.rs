// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Benchmark binary that prints the figures recorded in docs/benchmarks.md:
//!
//! 1. MAP+UNMAP requests/s through the real queue path (descriptor chains
//!    in guest memory, `handle_event`, used ring), 64 requests per kick,
//!    in one thread.
//! 2. Kick-to-completion latency of single requests against the real
//!    daemon binary over a vhost-user socket, polling on and off.
//! 3. Translation lookup time in a domain holding 1M mappings, and the
//!    memory each mapping costs (RSS growth).
//!
//! Run: `cargo bench -p vhost-device-iommu --bench iommu` (add `-- quick`
//! for a shorter run).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    driver::{Buf, DriverRing, RingLayout},
    guest_memory, Daemon, Guest, GuestOptions,
};
use vhost_device_iommu::{
    backend::IommuBackend,
    iommu::{Iommu, IommuOptions},
    pasid_manager::PasidService,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use viommu::{wire::*, Access, DeviceConfig, Viommu};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// 1. Batched MAP+UNMAP through the queue path, 64 requests per kick.
fn batched_queue_path(rounds: usize) {
    let mem = GuestMemoryAtomic::new(guest_memory());
    let iommu = Iommu::new(
        DeviceConfig::default(),
        PasidService::Disabled,
        IommuOptions {
            poll: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap();
    let backend = IommuBackend::new(Arc::new(iommu));
    backend.update_memory(mem.clone()).unwrap();
    let (layout, _) = RingLayout::at(0, 256);
    let m = mem.memory();
    let mut ring = DriverRing::new(&m, layout);
    let vring = VringRwLock::new(mem.clone(), 256).unwrap();
    vring.set_queue_size(256);
    vring
        .set_queue_info(layout.desc.0, layout.avail.0, layout.used.0)
        .unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let eventq = VringRwLock::new(mem.clone(), 64).unwrap();
    let vrings = [vring, eventq];

    // Attach once, then build 32 MAP and 32 UNMAP chains reused every round.
    let base = 0x10000u64;
    let attach = AttachReq::new(1, 8, 0);
    m.write_slice(readable_part(&attach), GuestAddress(base))
        .unwrap();
    let head = ring.add(
        &m,
        &[
            Buf {
                addr: base,
                len: 20,
                writable: false,
            },
            Buf {
                addr: base + 0x40,
                len: 4,
                writable: true,
            },
        ],
    );
    let _ = head;
    ring.publish(&m);
    backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    assert!(ring.pop_used(&m).is_some());
    let mut heads = Vec::new();
    for i in 0..64u64 {
        let at = base + 0x100 + i * 0x80;
        let iova = 0x100000 + (i % 32) * 0x1000;
        let ro: Vec<u8> = if i < 32 {
            readable_part(&MapReq::new(1, iova, iova + 0xfff, iova, RW)).to_vec()
        } else {
            readable_part(&UnmapReq::new(1, iova, iova + 0xfff)).to_vec()
        };
        m.write_slice(&ro, GuestAddress(at)).unwrap();
        heads.push(ring.add(
            &m,
            &[
                Buf {
                    addr: at,
                    len: ro.len() as u32,
                    writable: false,
                },
                Buf {
                    addr: at + 0x40,
                    len: 4,
                    writable: true,
                },
            ],
        ));
    }
    // The first round publishes the chains just written.
    // The driver side touches guest memory once per batch (avail entries
    // in one write, used index in one read) so the figure is the device's.
    let avail_entries: Vec<u8> = heads.iter().flat_map(|h| h.to_le_bytes()).collect();
    let run_round = |ring: &mut DriverRing, first: bool| {
        if !first {
            ring.add_heads(&m, &avail_entries, heads.len() as u16);
        }
        let used_before = ring.used_idx(&m);
        ring.publish(&m);
        backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(ring.used_idx(&m).wrapping_sub(used_before), 64);
    };
    run_round(&mut ring, true);
    for _ in 0..1000 {
        run_round(&mut ring, false);
    }
    // This VM's throughput varies from run to run: measure several times
    // and report the median and the range.
    const REPEATS: usize = 7;
    let mut rates = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let start = Instant::now();
        for _ in 0..rounds {
            run_round(&mut ring, false);
        }
        rates.push((rounds * 64) as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    let stats = backend.iommu().model().stats().clone();
    let expected = 1 + 64 * (rounds * REPEATS + 1001);
    assert_eq!(
        stats.by_status[usize::from(VIRTIO_IOMMU_S_OK)] as usize,
        expected
    );
    rates.sort_by(f64::total_cmp);
    println!(
        "queue path, 64 requests per kick: median {:.2} M MAP+UNMAP requests/s ({:.0} ns/request; {REPEATS} runs of {} requests, range {:.2}-{:.2} M/s)",
        rates[REPEATS / 2],
        1e3 / rates[REPEATS / 2],
        rounds * 64,
        rates[0],
        rates[REPEATS - 1]
    );
}

/// 2. Kick-to-completion latency of one request per kick, real daemon.
fn single_request_latency(poll_us: &str, samples: usize) {
    let d = Daemon::start(&["--poll-us", poll_us]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
    let map = MapReq::new(1, 0x10000, 0x10fff, 0x10000, RW);
    let unmap = UnmapReq::new(1, 0x10000, 0x10fff);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 1000 {
        let req: &[u8] = if i % 2 == 0 {
            readable_part(&map)
        } else {
            readable_part(&unmap)
        };
        g.queue(&[(req, 4)]);
        let t = Instant::now();
        g.rq.publish(&g.mem);
        g.kicks[0].write(1).unwrap();
        while g.rq.pop_used(&g.mem).is_none() {
            std::hint::spin_loop();
        }
        let ns = t.elapsed().as_nanos() as f64;
        if i >= 1000 {
            lat.push(ns);
        }
        // Like a guest doing work between map and unmap calls.
        let pause = Instant::now();
        while pause.elapsed() < Duration::from_micros(2) {}
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "single request, kick to completion, --poll-us {poll_us}: p50 {:.1} us, p99 {:.1} us ({samples} requests)",
        percentile(&lat, 0.5) / 1e3,
        percentile(&lat, 0.99) / 1e3
    );
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// 3. Lookups in a domain with 1M 4 KiB mappings.
fn lookup_1m(lookups: usize) {
    const N: u64 = 1 << 20;
    // No MSI window: the 1M mappings spread over 8 GiB of IOVA.
    let mut dev = Viommu::new(DeviceConfig {
        reserved_regions: Vec::new(),
        ..Default::default()
    });
    dev.set_acked_features(!0);
    let attach = AttachReq::new(1, 8, 0);
    dev.handle_request(readable_part(&attach), 4);
    let before = rss_bytes();
    // Linux's IOVA allocator hands out addresses top-down; map in that
    // order, each mapping a separate 4 KiB page with a gap between.
    for i in (0..N).rev() {
        let iova = i * 0x2000;
        let req = MapReq::new(1, iova, iova + 0xfff, iova + 0x1_0000_0000, RW);
        let r = dev.handle_request(readable_part(&req), 4);
        assert_eq!(r.status(), Some(VIRTIO_IOMMU_S_OK));
    }
    let grown = rss_bytes() - before;
    println!(
        "1M mappings: {:.1} bytes per mapping (RSS growth {} MiB; leaves {} MiB)",
        grown as f64 / N as f64,
        grown >> 20,
        dev.domains()[&1].mappings.leaf_bytes() >> 20
    );
    // Random addresses (xorshift), timed in batches of 64 to keep the
    // clock out of the figure.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut batch = Vec::with_capacity(lookups / 64);
    for _ in 0..lookups / 64 {
        let t = Instant::now();
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let iova = (x % N) * 0x2000 + (x >> 52);
            black_box(dev.translate(8, black_box(iova), Access::Read).ok());
        }
        batch.push(t.elapsed().as_nanos() as f64 / 64.0);
    }
    batch.sort_by(f64::total_cmp);
    println!(
        "translate in a 1M-mapping domain, random IOVAs: p50 {:.0} ns, p99 {:.0} ns per lookup",
        percentile(&batch, 0.5),
        percentile(&batch, 0.99)
    );
    let mut batch = Vec::with_capacity(lookups / 64);
    let mut iova = 0;
    for _ in 0..lookups / 64 {
        let t = Instant::now();
        for _ in 0..64 {
            iova = (iova + 0x2000) % (N * 0x2000);
            black_box(dev.translate(8, black_box(iova), Access::Read).ok());
        }
        batch.push(t.elapsed().as_nanos() as f64 / 64.0);
    }
    batch.sort_by(f64::total_cmp);
    println!(
        "translate in a 1M-mapping domain, sequential IOVAs: p50 {:.0} ns per lookup",
        percentile(&batch, 0.5)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `quick` shortens the run.
    let quick = std::env::args().any(|a| a == "quick");
    let scale = if quick { 10 } else { 1 };
    // Other arguments pick parts: queue, latency, lookup.
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| ["queue", "latency", "lookup"].contains(&a.as_str()))
        .collect();
    let run = |p: &str| parts.is_empty() || parts.iter().any(|a| a == p);
    println!(
        "vhost-device-iommu benchmarks ({} run)",
        if quick { "quick" } else { "full" }
    );
    if run("queue") {
        batched_queue_path(100_000 / scale);
    }
    if run("latency") {
        single_request_latency("50", 20_000 / scale);
        single_request_latency("0", 20_000 / scale);
    }
    if run("lookup") {
        lookup_1m(4_000_000 / scale);
    }
}
