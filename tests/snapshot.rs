// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Snapshot and restore over vhost-user (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`),
//! end to end: a guest builds state on one daemon, the VMM stops the
//! rings and saves the state with the real protocol messages, a second
//! daemon loads it, and the guest carries on there as if nothing had
//! happened. Blobs that are damaged, of another version or beyond the
//! destination's caps, and PASIDs another VM holds, are refused with the
//! daemon's state untouched and the daemon serving.

mod common;

use std::{io::Write, time::Duration};

use common::{load_state, open_frontend, save_state, Daemon, Guest, GuestOptions, DATA_AREA};
use serde_json::Value;
use vhost::{
    vhost_user::{
        message::{VhostTransferStateDirection, VhostTransferStatePhase},
        VhostUserFrontend,
    },
    VhostBackend,
};
use viommu::{wire::*, StateChange};
use viommu_client::{Access, Client, Event, Options, Subscription};
use vm_memory::ByteValued;

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const RO: u32 = VIRTIO_IOMMU_MAP_F_READ;

/// Where a guest's DMA goes, as `ctl translate` answers (or its fault).
const PROBES: [(u32, u64, bool); 7] = [
    (8, 0x10_0010, true),
    (9, 0x10_fff0, false),
    (9, 0x20_0000, false),
    (9, 0x20_0000, true),
    (0x10, 0x1000, true),
    (0x18, 0x5000, true),
    (0x20, 0x5000, false),
];

/// Everything a VMM can see of the IOMMU state through `ctl`.
fn observe(d: &Daemon) -> Vec<Value> {
    let status = d.ctl(&["status"]);
    let mut seen = vec![
        status["bypass"].clone(),
        status["acked_features"].clone(),
        status["domains"].clone(),
        status["attached_endpoints"].clone(),
        status["mappings"].clone(),
        d.ctl(&["endpoints"]),
    ];
    let domains = d.ctl(&["domains"]);
    for dom in domains["domains"].as_array().unwrap() {
        let id = dom["id"].to_string();
        seen.push(d.ctl(&["mappings", "--domain", &id]));
    }
    seen.push(domains);
    for (ep, iova, write) in PROBES {
        let (ep, iova) = (ep.to_string(), iova.to_string());
        let mut args = vec!["translate", "--endpoint", &ep, "--iova", &iova];
        if write {
            args.push("--write");
        }
        seen.push(d.ctl(&args));
    }
    seen
}

/// The host PASIDs of the daemon's VM, each checked active with guest
/// PASID = host PASID.
fn pasids(d: &Daemon) -> Vec<u64> {
    d.ctl(&["pasids"])["pasids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["state"], "active");
            assert_eq!(p["guest"], p["host"]);
            p["host"].as_u64().unwrap()
        })
        .collect()
}

/// A guest that attached endpoints to paging domains and to a bypass
/// domain, mapped, cleared `bypass`, allocated PASIDs, and has a fault
/// waiting for an event buffer.
fn busy_guest(d: &Daemon) -> Guest {
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    for (domain, ep) in [(1, 8), (1, 9), (2, 0x10)] {
        assert_eq!(g.attach(domain, ep), VIRTIO_IOMMU_S_OK);
    }
    let bypass = AttachReq::new(3, 0x18, VIRTIO_IOMMU_ATTACH_F_BYPASS);
    assert_eq!(g.request(&bypass), VIRTIO_IOMMU_S_OK);
    for (domain, start, end, phys, flags) in [
        (1, 0x10_0000, 0x10_ffff, DATA_AREA, RW),
        (1, 0x20_0000, 0x20_0fff, DATA_AREA + 0x1_0000, RO),
        (2, 0x1000, 0x1fff, DATA_AREA, RW),
    ] {
        assert_eq!(g.map(domain, start, end, phys, flags), VIRTIO_IOMMU_S_OK);
    }
    g.fe_set_bypass(false);
    assert_eq!(g.pasid_alloc(1, 100), (VIRTIO_IOMMU_S_OK, 1));
    assert_eq!(g.pasid_alloc(50, 60), (VIRTIO_IOMMU_S_OK, 50));
    let fault = d.ctl(&[
        "fault",
        "--endpoint",
        "8",
        "--address",
        "0x300000",
        "--write",
    ]);
    assert_eq!(fault["ok"], true);
    assert_eq!(d.ctl(&["stats"])["faults"]["pending"], 1);
    g
}

#[test]
fn a_guest_carries_on_on_a_new_daemon_as_if_nothing_happened() {
    let a = Daemon::start(&[]);
    let mut g = busy_guest(&a);
    // Linux posts its event buffers without a kick; nobody looks yet.
    g.post_event_buffers(2, 64);
    let seen_on_a = observe(&a);
    assert_eq!(pasids(&a), vec![1, 50]);

    let bases = g.stop();
    let blob = save_state(&g.fe).expect("SAVE");
    assert!(a.log_text().contains("device state saved"));
    // Saving changes nothing on the source.
    assert_eq!(observe(&a), seen_on_a);

    // Another daemon: other sockets, other PASID state directory.
    let b = Daemon::start(&[]);
    let mut g = g.migrate(&b.socket, &blob, bases);
    assert_eq!(observe(&b), seen_on_a);
    assert_eq!(pasids(&b), vec![1, 50]);
    assert!(b.errors().is_empty(), "{:?}", b.errors());

    // The fault saved while it waited for a buffer reaches the guest in
    // the buffers it posted before the move.
    let (len, record) = g
        .wait_event(Duration::from_secs(5))
        .expect("pending fault not delivered");
    assert_eq!(len, 24);
    let mut fault = FaultRecord::default();
    fault.as_mut_slice().copy_from_slice(&record);
    assert_eq!(
        (fault.endpoint.to_native(), fault.address.to_native()),
        (8, 0x30_0000)
    );

    // The guest's next requests behave as they would have on A.
    assert_eq!(g.unmap(1, 0x10_0000, 0x10_ffff), VIRTIO_IOMMU_S_OK);
    assert_eq!(
        g.map(1, 0x20_0000, 0x20_1fff, DATA_AREA, RW),
        VIRTIO_IOMMU_S_INVAL,
        "overlaps the mapping made on A"
    );
    assert_eq!(
        g.unmap(2, 0x1800, 0x1fff),
        VIRTIO_IOMMU_S_RANGE,
        "would split"
    );
    assert_eq!(g.map(2, 0x2000, 0x2fff, DATA_AREA, RW), VIRTIO_IOMMU_S_OK);
    let paging = AttachReq::new(3, 0x19, 0);
    assert_eq!(
        g.request(&paging),
        VIRTIO_IOMMU_S_INVAL,
        "3 is a bypass domain"
    );
    assert_eq!(g.detach(1, 9), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.detach(1, 9), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(g.pasid_free(50), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.pasid_alloc(1, 100), (VIRTIO_IOMMU_S_OK, 2));
    assert_eq!(pasids(&b), vec![1, 2]);
    let gone = b.ctl(&["translate", "--endpoint", "8", "--iova", "0x100010"]);
    assert_eq!(gone["ok"], false);
    let kept = b.ctl(&["translate", "--endpoint", "8", "--iova", "0x200010"]);
    assert_eq!(kept["segments"][0]["gpa"], DATA_AREA + 0x1_0010);
    assert_eq!(b.ctl(&["status"])["bypass"], false);
}

#[test]
fn pasids_another_vm_holds_refuse_the_restore_until_it_is_gone() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap();
    let mut a = Daemon::start(&["--state-dir", dir, "--vm-id", "vm-a"]);
    let mut g = busy_guest(&a);
    let bases = g.stop();
    let blob = save_state(&g.fe).expect("SAVE");

    // The same host, while the source daemon still holds the PASIDs.
    let b = Daemon::start(&["--state-dir", dir, "--vm-id", "vm-b"]);
    let (fe, _) = open_frontend(&b.socket, &g.mem, true);
    assert!(load_state(&fe, &blob).is_err());
    b.wait_for(
        || {
            b.log_text().contains(
                "guest PASID 1 must stay host PASID 1, which lies in a block of host PASIDs \
                 leased to VM `vm-a`",
            )
        },
        "the refusal in the log",
    );
    assert_eq!(b.ctl(&["domains"])["domains"], serde_json::json!([]));
    assert!(pasids(&b).is_empty(), "nothing taken, nothing left");
    // The connection survived the refusal.
    assert!(fe.get_features().is_ok());
    drop(fe);

    // The source daemon exits (the source VM is gone): its PASIDs return
    // to the host, and the same blob now loads.
    assert!(a.signal_and_wait("TERM").success());
    let mut g = g.migrate(&b.socket, &blob, bases);
    assert_eq!(pasids(&b), vec![1, 50]);
    assert_eq!(g.pasid_free(1), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.unmap(1, 0x10_0000, 0x10_ffff), VIRTIO_IOMMU_S_OK);
}

/// `blob` with its byte `at` changed.
fn flipped(blob: &[u8], at: usize) -> Vec<u8> {
    let mut b = blob.to_vec();
    b[at] ^= 0x40;
    b
}

#[test]
fn refused_blobs_leave_the_daemon_as_it_was_and_serving() {
    let a = Daemon::start(&[]);
    let mut source = busy_guest(&a);
    source.stop();
    let blob = save_state(&source.fe).expect("SAVE");
    drop(source);

    // A daemon that cannot hold the saved state (2 domains at most; the
    // guest had 3), with a guest of its own.
    let b = Daemon::start(&["--max-domains", "2"]);
    let mut g = Guest::connect(&b.socket, GuestOptions::default());
    assert_eq!(g.attach(7, 0x30), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(7, 0x4000, 0x4fff, DATA_AREA, RW), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.pasid_alloc(5, 5), (VIRTIO_IOMMU_S_OK, 5));
    let before = observe(&b);

    let mut other_version = blob.clone();
    other_version[8] = 2;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "truncated"),
        ("truncated", blob[..blob.len() - 1].to_vec(), "truncated"),
        ("header only", blob[..32].to_vec(), "truncated"),
        (
            "flipped byte",
            flipped(&blob, blob.len() / 2),
            "checksum mismatch",
        ),
        ("flipped magic", flipped(&blob, 0), "bad magic"),
        (
            "other version",
            other_version,
            "format version 2 is not supported",
        ),
        ("caps", blob.clone(), "3 domains, more than the limit of 2"),
        ("garbage", vec![0xa5; 4096], "bad magic"),
    ];
    for (what, bad, reason) in cases {
        assert!(load_state(&g.fe, &bad).is_err(), "{what} accepted");
        b.wait_for(
            || {
                b.log_text()
                    .lines()
                    .any(|l| l.contains("device state refused") && l.contains(reason))
            },
            what,
        );
        assert_eq!(observe(&b), before, "{what} changed the state");
        assert_eq!(pasids(&b), vec![5], "{what} changed the PASIDs");
    }
    // A CHECK without a transfer fails, and the connection goes on.
    assert!(g.fe.check_device_state().is_err());

    // The guest never noticed.
    assert_eq!(g.unmap(7, 0x4000, 0x4fff), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.attach(7, 0x31), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.pasid_alloc(1, 10), (VIRTIO_IOMMU_S_OK, 1));
    assert!(g.fe.get_features().is_ok());
}

#[test]
fn a_device_the_guest_did_not_see_or_one_without_its_pasids_refuses() {
    let a = Daemon::start(&[]);
    let mut source = busy_guest(&a);
    source.stop();
    let blob = save_state(&source.fe).expect("SAVE");
    drop(source);
    for (args, reason) in [
        (
            &["--input-range-bits", "39"][..],
            "saved on a device with input range",
        ),
        // No PASID_ALLOC here: the guest's PASIDs would be lost.
        (
            &["--pasid-quota", "0"][..],
            "saved on a device with offered features",
        ),
        (
            &["--pasid-mode", "identity"][..],
            "saved on a device with offered features",
        ),
    ] {
        let b = Daemon::start(args);
        let mut g = Guest::connect(&b.socket, GuestOptions::default());
        assert!(load_state(&g.fe, &blob).is_err(), "{args:?}");
        b.wait_for(|| b.log_text().contains(reason), reason);
        assert_eq!(b.ctl(&["domains"])["domains"], serde_json::json!([]));
        assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK, "{args:?}");
    }
}

#[test]
fn control_clients_learn_that_the_state_was_replaced() {
    let a = Daemon::start(&[]);
    let mut source = busy_guest(&a);
    source.stop();
    let blob = save_state(&source.fe).expect("SAVE");
    drop(source);

    let b = Daemon::start(&[]);
    let mut g = Guest::connect(&b.socket, GuestOptions::default());
    assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
    let elsewhere = DATA_AREA + 0x5_0000;
    assert_eq!(
        g.map(1, 0x10_0000, 0x10_ffff, elsewhere, RW),
        VIRTIO_IOMMU_S_OK
    );
    let cache = Client::connect(
        &b.control,
        Options {
            cache: true,
            subscribe: None,
        },
    )
    .unwrap();
    let subscribe = Options {
        cache: false,
        subscribe: Some(Subscription::Async),
    };
    let sub = Client::connect(&b.control, subscribe).unwrap();
    while sub.next_event(Duration::from_secs(5)) != Some(Event::ReplayDone) {}
    let gpa = |c: &Client| c.translate(8, 0x10_0010, 1, Access::Write).unwrap()[0].gpa;
    assert_eq!(gpa(&cache), elsewhere + 0x10);
    assert_eq!(cache.cached(), 1);

    load_state(&g.fe, &blob).expect("LOAD");
    // The cache dropped what the restore made stale...
    assert_eq!(gpa(&cache), DATA_AREA + 0x10);
    // ...and the subscriber must reconnect to learn the new state.
    b.wait_for(|| sub.is_closed(), "the subscriber to be disconnected");
    b.wait_for(
        || b.ctl(&["stats"])["clients_dropped"] == 1,
        "the subscriber to be counted as dropped",
    );
    let sub = Client::connect(&b.control, subscribe).unwrap();
    let mut replay = Vec::new();
    loop {
        match sub.next_event(Duration::from_secs(5)).expect("replay") {
            Event::Replayed(change) => replay.push(change),
            Event::ReplayDone => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(replay[0], StateChange::Bypass(false));
    assert!(replay.contains(&StateChange::Attach {
        endpoint: 0x18,
        domain: 3,
        bypass: true
    }));
    let maps = replay
        .iter()
        .filter(|c| matches!(c, StateChange::Map { .. }))
        .count();
    assert_eq!(maps, 3);
}

#[test]
fn a_transfer_does_not_outlive_its_connection() {
    let a = Daemon::start(&[]);
    let mut source = busy_guest(&a);
    source.stop();
    let blob = save_state(&source.fe).expect("SAVE");

    let b = Daemon::start(&[]);
    let (fe, _) = open_frontend(&b.socket, &source.mem, true);
    let (reader, mut writer) = std::io::pipe().unwrap();
    let returned = fe
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            reader.into(),
        )
        .unwrap();
    assert!(returned.is_none());
    writer.write_all(&blob).unwrap();
    drop(writer);
    // The VMM goes away before CHECK_DEVICE_STATE.
    drop(fe);
    b.wait_for(
        || b.log_text().contains("state transfer was never checked"),
        "the transfer to be abandoned",
    );
    let (fe, _) = open_frontend(&b.socket, &source.mem, true);
    assert!(fe.check_device_state().is_err());
    assert_eq!(b.ctl(&["domains"])["domains"], serde_json::json!([]));
    assert!(pasids(&b).is_empty());
}

#[test]
fn bound_tables_move_with_the_guest_and_keep_their_pasids() {
    use common::tables::{TableArena, X86Table, RW as PTE_RW, US};
    use viommu::pgtable::PageAccess;
    const EP: u32 = 0x28;
    let a = Daemon::start(&[]);
    let mut g = Guest::connect(&a.socket, GuestOptions::default());
    let (status, pasid) = g.pasid_alloc(1, 100);
    assert_eq!(status, VIRTIO_IOMMU_S_OK);
    let arena = TableArena::new(&g.mem, 0x80_0000, 0xc0_0000);
    let t = X86Table::new(&arena, 4);
    let va = 0x7f00_0000_1000;
    t.map(va, 1, DATA_AREA + 0x3000, PTE_RW | US);
    let st = g.attach_table_vtd(100, EP, pasid, t.root, t.addr_width());
    assert_eq!(st, VIRTIO_IOMMU_S_OK);
    let tables_on_a = a.ctl(&["pasid-tables"]);

    let bases = g.stop();
    let blob = save_state(&g.fe).expect("SAVE");
    let b = Daemon::start(&[]);
    let mut g = g.migrate(&b.socket, &blob, bases);
    assert_eq!(b.ctl(&["pasid-tables"]), tables_on_a);
    let pasids_on_b = b.ctl(&["pasids"]);
    let p = &pasids_on_b["pasids"][0];
    assert_eq!(
        (p["host"].as_u64(), p["refs"].as_u64()),
        (Some(u64::from(pasid)), Some(2))
    );
    let vmm = Client::connect(&b.control, Options::default()).unwrap();
    let s = vmm
        .translate_pasid(EP, pasid, va + 8, 8, PageAccess::WRITE)
        .unwrap();
    assert_eq!(s[0].gpa, DATA_AREA + 0x3008);
    // The binding still holds the PASID on B: freed, it stays reserved
    // until DETACH_TABLE.
    assert_eq!(g.pasid_free(pasid), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.detach_table(100, EP, pasid), VIRTIO_IOMMU_S_OK);
    assert_eq!(b.ctl(&["pasid-tables"])["tables"], serde_json::json!([]));
    assert!(b.errors().is_empty(), "{:?}", b.errors());
}
