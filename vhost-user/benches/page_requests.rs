// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page-request benchmark printing the figures of docs/benchmarks.md:
//! the round trip of one group (raised by a source -> record in the
//! guest's event buffer -> the guest's PAGE_RESP -> the source has the
//! answer), p50 and p99, from a device model (viommu-client) and from a
//! host fault queue (a socket speaking the iommufd formats), and groups
//! per second through a fault queue in batches of 32; each with the
//! daemon polling (`--poll-us 50`, the default) and not (`--poll-us 0`).
//! The guest driver (this benchmark) spins on its rings and answers at
//! once, so the figures are the daemon's path, not a guest's fault
//! handling.
//!
//! Run: `cargo bench -p vhost-device-iommu --bench page_requests`
//! (`-- quick` for a shorter run).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use common::{
    tables::{TableArena, X86Table},
    Daemon, Guest, GuestOptions,
};
use nix::sys::socket::{recv, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use viommu::{pgtable::PageAccess, wire::*};
use viommu_client::{Client, Options, PasidTranslation};
use vm_memory::{ByteValued, Bytes, GuestAddress};

const EP: u32 = 0x28;
const VA: u64 = 0x7f00_0000_0000;
const BATCH: usize = 32;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut ns: Vec<f64>) {
    ns.sort_by(f64::total_cmp);
    println!(
        "{what}: p50 {:.1} us, p99 {:.1} us ({} groups)",
        percentile(&ns, 0.5) / 1e3,
        percentile(&ns, 0.99) / 1e3,
        ns.len()
    );
}

/// A guest with a PASID bound to an empty table, event buffers posted.
fn guest(d: &Daemon) -> (Guest, u32) {
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let (status, pasid) = g.pasid_alloc(1, 1000);
    assert_eq!(status, VIRTIO_IOMMU_S_OK);
    let arena = TableArena::new(&g.mem, 0x80_0000, 0xc0_0000);
    let root = X86Table::new(&arena, 4).root;
    assert_eq!(
        g.attach_table_vtd(100, EP, pasid, root, 48),
        VIRTIO_IOMMU_S_OK
    );
    g.post_event_buffers(BATCH * 2, 64);
    (g, pasid)
}

/// The next event record, spinning (a guest's interrupt handler would
/// run about now).
fn spin_event(g: &mut Guest) -> FaultRecordExt {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((id, _)) = g.eq.pop_used(&g.mem) {
            let at = g.eq.layout.desc.0 + 16 * u64::from(id);
            let addr: u64 = g.mem.read_obj(GuestAddress(at)).unwrap();
            let r: FaultRecordExt = g.mem.read_obj(GuestAddress(addr)).unwrap();
            return r;
        }
        assert!(Instant::now() < deadline, "no page request arrived");
        // Yield: on two CPUs the daemon's threads need the core too.
        std::thread::yield_now();
    }
}

fn page_resp(r: &FaultRecordExt) -> PageRespReq {
    PageRespReq::new(
        r.endpoint.to_native(),
        Some(r.pasid.to_native()),
        r.group_id.to_native(),
        VIRTIO_IOMMU_PAGE_RESP_SUCCESS,
    )
}

fn device_model_round_trip(poll: &str, samples: usize) {
    let d = Daemon::start(&["--poll-us", poll]);
    let (mut g, pasid) = guest(&d);
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 100 {
        let t = Instant::now();
        let ticket = match vmm
            .translate_pasid_or_request_with(EP, pasid, VA, 8, PageAccess::READ, |_| ())
            .unwrap()
        {
            PasidTranslation::PageRequest(t) => t,
            PasidTranslation::Done(()) => panic!("translated"),
        };
        let r = spin_event(&mut g);
        assert_eq!(g.request(&page_resp(&r)), VIRTIO_IOMMU_S_OK);
        ticket.wait(Duration::from_secs(10)).unwrap();
        if i >= 100 {
            lat.push(t.elapsed().as_nanos() as f64);
        }
        g.post_event_buffers(1, 64);
    }
    report(&format!("device model round trip, --poll-us {poll}"), lat);
}

fn fault_queue() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

fn record(pasid: u32, grpid: u32, cookie: u32) -> HwptPgfault {
    HwptPgfault {
        flags: (IOMMU_PGFAULT_FLAGS_PASID_VALID | IOMMU_PGFAULT_FLAGS_LAST_PAGE).into(),
        dev_id: 7.into(),
        pasid: pasid.into(),
        grpid: grpid.into(),
        perm: VIRTIO_IOMMU_FAULT_F_READ.into(),
        addr: (VA + u64::from(grpid) * 0x1000).into(),
        cookie: cookie.into(),
        ..Default::default()
    }
}

/// Reads `n` responses from the kernel side of a fault queue, spinning.
fn spin_responses(kernel: &OwnedFd, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < n {
        match recv(kernel.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(8) => got += 1,
            Ok(n) => panic!("a {n}-byte response"),
            Err(nix::errno::Errno::EAGAIN) => {
                assert!(Instant::now() < deadline, "responses missing");
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn fault_queue_round_trip(poll: &str, samples: usize) {
    let d = Daemon::start(&["--poll-us", poll]);
    let (mut g, pasid) = guest(&d);
    let (kernel, end) = fault_queue();
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    vmm.attach_fault_queue(end.as_fd(), &[(7, EP)]).unwrap();
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 100 {
        let r = record(pasid, (i % 512) as u32, i as u32);
        let t = Instant::now();
        nix::unistd::write(&kernel, r.as_slice()).unwrap();
        let ev = spin_event(&mut g);
        assert_eq!(g.request(&page_resp(&ev)), VIRTIO_IOMMU_S_OK);
        spin_responses(&kernel, 1);
        if i >= 100 {
            lat.push(t.elapsed().as_nanos() as f64);
        }
        g.post_event_buffers(1, 64);
    }
    report(&format!("fault queue round trip, --poll-us {poll}"), lat);
}

fn fault_queue_throughput(poll: &str, batches: usize) {
    let d = Daemon::start(&["--poll-us", poll]);
    let (mut g, pasid) = guest(&d);
    let (kernel, end) = fault_queue();
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    vmm.attach_fault_queue(end.as_fd(), &[(7, EP)]).unwrap();
    let mut cookie = 0u32;
    let mut rates = Vec::with_capacity(batches);
    for b in 0..batches + 10 {
        let t = Instant::now();
        // The kernel hands out whole groups: one record each here.
        for k in 0..BATCH {
            cookie += 1;
            let r = record(pasid, k as u32, cookie);
            nix::unistd::write(&kernel, r.as_slice()).unwrap();
        }
        let events: Vec<FaultRecordExt> = (0..BATCH).map(|_| spin_event(&mut g)).collect();
        let resps: Vec<PageRespReq> = events.iter().map(page_resp).collect();
        let reqs: Vec<(&[u8], usize)> = resps
            .iter()
            .map(|r| (readable_part(r), REQ_TAIL_SIZE))
            .collect();
        g.submit(&reqs);
        spin_responses(&kernel, BATCH);
        if b >= 10 {
            rates.push(BATCH as f64 / t.elapsed().as_secs_f64());
        }
        g.post_event_buffers(BATCH, 64);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "fault queue, batches of {BATCH}, --poll-us {poll}: median {:.0} groups/s (range {:.0}-{:.0}, {} batches)",
        percentile(&rates, 0.5),
        rates[0],
        rates[rates.len() - 1],
        rates.len()
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let scale = if quick { 10 } else { 1 };
    println!(
        "page-request benchmarks ({} run)",
        if quick { "quick" } else { "full" }
    );
    for poll in ["50", "0"] {
        device_model_round_trip(poll, 5_000 / scale);
        fault_queue_round_trip(poll, 5_000 / scale);
        fault_queue_throughput(poll, 1_000 / scale);
    }
}
