// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest PASID tables end to end: a guest driver (the harness) builds
//! real x86-64 and Arm tables in its memory and binds them with
//! ATTACH_TABLE on the real daemon; a VMM's device model (viommu-client)
//! translates (PASID, VA) through them; `ctl` inspects them.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use common::{
    tables::{CdTable, TableArena, X86Table, A, AF, AP_EL0, AP_RO, D, DBM, RW, US},
    Daemon, Guest, GuestOptions, DATA_AREA,
};
use viommu::{pgtable::PageAccess, wire::*, StateChange};
use viommu_client::{Client, Error, Event, Options, Subscription, FAULT_F_RECOVERABLE};
use vm_memory::ByteValued;

const EP: u32 = 0x28;
const EP2: u32 = 0x29;
const TABLES: u64 = 0x80_0000;
const TABLES_END: u64 = 0xc0_0000;

fn cached() -> Options {
    Options {
        cache: true,
        subscribe: None,
    }
}

/// A guest page `k` of the data area.
fn page(k: u64) -> u64 {
    DATA_AREA + k * 0x1000
}

/// PASID_ALLOC of one PASID.
fn alloc_pasid(g: &mut Guest) -> u32 {
    let (status, pasid) = g.pasid_alloc(1, 1000);
    assert_eq!(status, VIRTIO_IOMMU_S_OK);
    pasid
}

#[test]
fn a_bound_x86_table_translates_pasid_dma_and_gets_accessed_and_dirty_bits() {
    for levels in [4, 5] {
        let d = Daemon::start(&[]);
        let mut g = Guest::connect(&d.socket, GuestOptions::default());
        let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
        let t = X86Table::new(&arena, levels);
        let pasid = alloc_pasid(&mut g);
        // A 4 KiB page, a 2 MiB page and a 1 GiB page.
        let (va4k, va2m, va1g) = (0x7f00_0000_1000, 0x7e00_0020_0000, 0x40_0000_0000);
        t.map(va4k, 1, page(1), RW | US);
        t.map(va2m, 2, 0x40_0000, RW | US);
        t.map(va1g, 3, 0, RW | US);
        let st = g.attach_table_vtd(100, EP, pasid, t.root, t.addr_width());
        assert_eq!(st, VIRTIO_IOMMU_S_OK, "{levels}-level");
        let vmm = Client::connect(&d.control, cached()).unwrap();
        let read = vmm
            .translate_pasid(EP, pasid, va4k + 0x10, 16, PageAccess::READ)
            .unwrap();
        assert_eq!((read[0].gpa, read[0].len), (page(1) + 0x10, 16));
        assert_eq!(arena.read(t.entry(va4k, 1)) & (A | D), A);
        vmm.translate_pasid(EP, pasid, va4k, 8, PageAccess::WRITE)
            .unwrap();
        assert_eq!(arena.read(t.entry(va4k, 1)) & (A | D), A | D);
        let big = vmm
            .translate_pasid(EP, pasid, va2m + 0x1234, 4, PageAccess::READ)
            .unwrap();
        assert_eq!(big[0].gpa, 0x40_1234);
        let huge = vmm
            .translate_pasid(EP, pasid, va1g + 0x9_8765, 4, PageAccess::READ)
            .unwrap();
        assert_eq!(huge[0].gpa, 0x9_8765);
        // A range over two pages of the same table.
        t.map(va4k + 0x1000, 1, page(7), RW | US);
        let two = vmm
            .translate_pasid(EP, pasid, va4k + 0xff8, 16, PageAccess::READ)
            .unwrap();
        assert_eq!(
            two.iter().map(|s| (s.gpa, s.len)).collect::<Vec<_>>(),
            vec![(page(1) + 0xff8, 8), (page(7), 8)]
        );
        // What ctl shows.
        let ct = d.ctl(&[
            "translate",
            "--endpoint",
            "0x28",
            "--pasid",
            &pasid.to_string(),
            "--iova",
            &va4k.to_string(),
        ]);
        assert_eq!(ct["segments"][0]["gpa"], page(1));
        let tables = d.ctl(&["pasid-tables"]);
        let b = &tables["tables"][0];
        assert_eq!(b["endpoint"], EP);
        assert_eq!(b["pasid"], pasid);
        assert_eq!(b["format"], "vtd");
        assert_eq!(b["root"], t.root);
        assert_eq!(b["addr_width"], t.addr_width());
    }
}

#[test]
fn a_missing_page_is_a_recoverable_fault_and_no_binding_is_not() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
    let t = X86Table::new(&arena, 4);
    let pasid = alloc_pasid(&mut g);
    assert_eq!(g.attach_table_vtd(100, EP, pasid, t.root, 48), 0);
    let vmm = Client::connect(&d.control, cached()).unwrap();
    let err = vmm
        .translate_pasid(EP, pasid, 0x1000, 1, PageAccess::READ)
        .unwrap_err();
    assert!(
        matches!(err, Error::Fault(f) if f.flags & FAULT_F_RECOVERABLE != 0 && f.pasid == pasid),
        "{err}"
    );
    // A read-only page written: recoverable too (the guest may upgrade).
    t.map(0x2000, 1, page(2), US);
    let err = vmm
        .translate_pasid(EP, pasid, 0x2000, 1, PageAccess::WRITE)
        .unwrap_err();
    assert!(matches!(err, Error::Fault(f) if f.flags & FAULT_F_RECOVERABLE != 0));
    // No binding for that PASID: a fault the guest cannot fix by paging.
    let err = vmm
        .translate_pasid(EP, pasid + 1, 0x2000, 1, PageAccess::READ)
        .unwrap_err();
    assert!(matches!(err, Error::Fault(f) if f.flags & FAULT_F_RECOVERABLE == 0));
    let ct = d.ctl(&[
        "translate",
        "--endpoint",
        "0x28",
        "--pasid",
        &pasid.to_string(),
        "--iova",
        "0x1000",
    ]);
    assert_eq!(ct["ok"], false);
    assert_eq!(ct["fault"]["recoverable"], true);
}

#[test]
fn an_arm_cd_table_translates_each_substream_and_updates_af_and_dirty_state() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
    let cds = CdTable::new(&arena, 3);
    let va = 0x5555_0000_3000;
    let ttb1 = cds.add_cd(1);
    let ttb5 = cds.add_cd(5);
    // AF clear (hardware sets it), writable-clean with DBM.
    cds.map(ttb1, va, page(3), AP_EL0 | AP_RO | DBM);
    cds.map(ttb5, va, page(4), AP_EL0 | AF);
    let mut req = AttachTableSmmuReq::new(200, EP, 0, 3, cds.base);
    req.s1dss = 0;
    assert_eq!(g.request_ro(req.as_slice()), VIRTIO_IOMMU_S_OK);
    let vmm = Client::connect(&d.control, cached()).unwrap();
    let s1 = vmm
        .translate_pasid(EP, 1, va + 8, 8, PageAccess::WRITE)
        .unwrap();
    assert_eq!(s1[0].gpa, page(3) + 8);
    let leaf = arena.read(cds.leaf(ttb1, va));
    assert_eq!(leaf & (AF | AP_RO), AF, "AF set and AP[2] cleared (dirty)");
    let s5 = vmm.translate_pasid(EP, 5, va, 8, PageAccess::READ).unwrap();
    assert_eq!(s5[0].gpa, page(4));
    // S1DSS terminate: DMA without PASID faults.
    assert!(vmm.translate(EP, va, 8, viommu::Access::Read).is_err());
    assert_eq!(d.ctl(&["pasid-tables"])["tables"][0]["format"], "smmuv3");
}

#[test]
fn a_pasid_freed_while_bound_stays_reserved_until_detach_table() {
    let d = Daemon::start(&["--pasid-quota", "4"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
    let t = X86Table::new(&arena, 4);
    let pasid = alloc_pasid(&mut g);
    assert_eq!(g.attach_table_vtd(100, EP, pasid, t.root, 48), 0);
    assert_eq!(g.attach_table_vtd(100, EP2, pasid, t.root, 48), 0);
    let state = |d: &Daemon| {
        let doc = d.ctl(&["pasids"]);
        doc["pasids"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["host"] == pasid)
            .cloned()
    };
    assert_eq!(state(&d).unwrap()["refs"], 3, "owner + two bindings");
    assert_eq!(g.pasid_free(pasid), VIRTIO_IOMMU_S_OK);
    let p = state(&d).unwrap();
    assert_eq!(
        (p["state"].as_str(), p["refs"].as_u64()),
        (Some("inactive"), Some(2))
    );
    // Never reallocated while bound: the other PASIDs of the quota are.
    let others: Vec<u32> = (0..3).map(|_| alloc_pasid(&mut g)).collect();
    assert!(!others.contains(&pasid), "{others:?} reuses {pasid}");
    assert_eq!(g.pasid_alloc(1, 1000).0, VIRTIO_IOMMU_S_NOMEM, "quota");
    // Translations through it still work: the binding is intact.
    let vmm = Client::connect(&d.control, cached()).unwrap();
    t.map(0x1000, 1, page(1), RW | US);
    assert!(vmm
        .translate_pasid(EP, pasid, 0x1000, 1, PageAccess::READ)
        .is_ok());
    assert_eq!(g.detach_table(100, EP, pasid), VIRTIO_IOMMU_S_OK);
    assert_eq!(state(&d).unwrap()["refs"], 1);
    assert_eq!(g.detach_table(100, EP2, pasid), VIRTIO_IOMMU_S_OK);
    assert!(state(&d).is_none(), "the PASID went back to the pool");
    assert!(d.ctl(&["pasid-tables"])["tables"]
        .as_array()
        .unwrap()
        .is_empty());
    // Binding a PASID the VM does not hold is NOENT.
    assert_eq!(
        g.attach_table_vtd(100, EP, pasid, t.root, 48),
        VIRTIO_IOMMU_S_NOENT
    );
}

#[test]
fn invalidate_completes_only_after_caching_clients_dropped_the_page() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
    let t = X86Table::new(&arena, 4);
    let pasid = alloc_pasid(&mut g);
    assert_eq!(g.attach_table_vtd(100, EP, pasid, t.root, 48), 0);
    let vmm = Client::connect(&d.control, cached()).unwrap();
    t.map(0x1000, 1, page(1), RW | US | A | D);
    let s = vmm.translate_pasid(EP, pasid, 0x1000, 1, PageAccess::WRITE);
    assert_eq!(s.unwrap()[0].gpa, page(1));
    assert_eq!(vmm.cached(), 1);
    // The guest moves the page, then invalidates it.
    t.map(0x1000, 1, page(2), RW | US | A | D);
    assert_eq!(g.invalidate_range(100, pasid, 0x1000, 1), 0);
    // The INVALIDATE completed only after the client dropped the page.
    assert_eq!(vmm.cached(), 0);
    let s = vmm.translate_pasid(EP, pasid, 0x1000, 1, PageAccess::WRITE);
    assert_eq!(s.unwrap()[0].gpa, page(2));
    // DETACH_TABLE drops the binding's translations the same way.
    assert_eq!(vmm.cached(), 1);
    assert_eq!(g.detach_table(100, EP, pasid), 0);
    assert_eq!(vmm.cached(), 0);
    assert!(vmm
        .translate_pasid(EP, pasid, 0x1000, 1, PageAccess::READ)
        .is_err());
}

#[test]
fn no_stale_table_translation_under_concurrent_dma() {
    // The guest moves one page again and again and invalidates it; DMA
    // threads translate it all the time. Epoch k starts when INVALIDATE k
    // completes, after which the entry points to page k (or already to
    // page k+1, which the guest wrote before invalidating it). A DMA that
    // starts in epoch e and uses an older page used a translation whose
    // INVALIDATE the guest had seen complete: a stale cache. It would
    // happen if the daemon completed INVALIDATE before the acks.
    // A generous ack deadline: on a loaded host a descheduled client
    // must not be disconnected (control_plane.rs tests that path).
    let d = Daemon::start(&["--client-timeout-ms", "5000"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
    let t = X86Table::new(&arena, 4);
    let pasid = alloc_pasid(&mut g);
    assert_eq!(g.attach_table_vtd(100, EP, pasid, t.root, 48), 0);
    let va = 0x7000_0000;
    t.map(va, 1, page(0), RW | US);
    let vmm = Arc::new(Client::connect(&d.control, cached()).unwrap());
    let epoch = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let slot = |k: u64| page(k % 64);
    let mut threads = Vec::new();
    for _ in 0..3 {
        let (vmm, epoch, stop) = (vmm.clone(), epoch.clone(), stop.clone());
        threads.push(thread::spawn(move || {
            let mut hits = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = vmm.translate_pasid_with(EP, pasid, va, 0x100, PageAccess::WRITE, |s| {
                    (epoch.load(Ordering::SeqCst), s[0].gpa)
                });
                let (e, gpa) = r.unwrap();
                assert!(
                    gpa == slot(e) || gpa == slot(e + 1),
                    "stale translation: epoch {e} used {gpa:#x}"
                );
                hits += 1;
            }
            hits
        }));
    }
    for k in 1..=200 {
        t.map(va, 1, slot(k), RW | US);
        thread::sleep(Duration::from_micros(200));
        assert_eq!(g.invalidate_range(100, pasid, va, 1), 0);
        epoch.store(k, Ordering::SeqCst);
    }
    stop.store(true, Ordering::Relaxed);
    let hits: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(hits > 100, "hits {hits}: the test did not race");
    let stats = d.ctl(&["stats"]);
    assert!(stats["requests"]["invalidate"].as_u64().unwrap() >= 200);
}

#[test]
fn a_subscriber_receives_table_events_with_what_nesting_needs() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
    let t = X86Table::new(&arena, 5);
    let pasid = alloc_pasid(&mut g);
    let sub = Client::connect(
        &d.control,
        Options {
            cache: false,
            subscribe: Some(Subscription::Async),
        },
    )
    .unwrap();
    while sub.next_event(Duration::from_secs(5)) != Some(Event::ReplayDone) {}
    assert_eq!(g.attach_table_vtd(100, EP, pasid, t.root, 57), 0);
    assert_eq!(g.invalidate_range(100, pasid, 0x4000, 2), 0);
    assert_eq!(g.detach_table(100, EP, pasid), 0);
    let mut live = Vec::new();
    while live.len() < 3 {
        match sub.next_event(Duration::from_secs(5)) {
            Some(Event::Live { change, .. }) => live.push(change),
            other => panic!("{other:?}"),
        }
    }
    match live[0] {
        StateChange::TableBound {
            endpoint: EP,
            domain: 100,
            pasid: p,
            table: viommu::table::TableSpec::Vtd(v),
        } => {
            assert_eq!(p, pasid);
            let c = v.config();
            assert_eq!((c.pgd, c.addr_width, c.fl_flags), (t.root, 57, 0));
        }
        other => panic!("{other:?}"),
    }
    match live[1] {
        StateChange::TableInvalidate(inv) => {
            assert_eq!(inv.pasid, Some(pasid));
            assert_eq!(inv.range, Some((0x4000, 0x5fff)));
            assert_eq!(inv.granule, 12);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        live[2],
        StateChange::TableUnbound {
            endpoint: EP,
            domain: 100,
            pasid
        }
    );
    // Replayed to a late subscriber too.
    assert_eq!(g.attach_table_vtd(100, EP, pasid, t.root, 57), 0);
    let late = Client::connect(
        &d.control,
        Options {
            cache: false,
            subscribe: Some(Subscription::Async),
        },
    )
    .unwrap();
    let mut replay = Vec::new();
    loop {
        match late.next_event(Duration::from_secs(5)) {
            Some(Event::Replayed(c)) => replay.push(c),
            Some(Event::ReplayDone) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        replay
            .iter()
            .any(|c| matches!(c, StateChange::TableBound { pasid: p, .. } if *p == pasid)),
        "{replay:?}"
    );
}

#[test]
fn a_lost_frontend_ends_every_pasid_binding_and_gives_its_pasid_back() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let arena = TableArena::new(&g.mem, TABLES, TABLES_END);
    let t = X86Table::new(&arena, 4);
    let pasid = alloc_pasid(&mut g);
    assert_eq!(
        g.attach_table_vtd(100, EP, pasid, t.root, t.addr_width()),
        VIRTIO_IOMMU_S_OK
    );
    assert_eq!(g.attach(1, EP2), VIRTIO_IOMMU_S_OK);
    let refs = |d: &Daemon| d.ctl(&["pasids"])["pasids"][0]["refs"].clone();
    assert_eq!(refs(&d), 2, "the owner's and the binding's");
    drop(g);
    d.wait_for(
        || d.ctl(&["pasid-tables"])["tables"] == serde_json::json!([]),
        "the binding to go with the frontend",
    );
    assert_eq!(refs(&d), 1, "the binding's reference was given back");
    // Domains and mappings stay for a frontend that reconnects.
    assert_eq!(d.ctl(&["endpoints"])["endpoints"][0]["id"], EP2);
}
