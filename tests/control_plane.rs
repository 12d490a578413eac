// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control plane end to end: a fake VMM links `viommu-client`,
//! emulates a DMA-capable endpoint and shadows the IOMMU state, against
//! the real daemon binary driven by a guest over vhost-user.

mod common;

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{Daemon, Guest, GuestOptions, DATA_AREA};
use viommu::{wire::*, StateChange};
use viommu_client::{Access, Client, Error, Event, Options, Subscription};
use viommu_protocol::{
    messages::{Ack, Hello, Magic},
    Message, HELLO_F_CACHE,
};
use vm_memory::{Bytes, GuestAddress};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const EP: u32 = 0x20;

fn cached() -> Options {
    Options {
        cache: true,
        subscribe: None,
    }
}

/// The fake VMM's device: writes `data` at `iova` through the IOMMU.
fn device_dma_write(vmm: &Client, guest: &Guest, iova: u64, data: &[u8]) -> Result<(), Error> {
    vmm.translate_with(EP, iova, data.len() as u64, Access::Write, |segs| {
        let mut off = 0;
        for s in segs {
            let n = s.len as usize;
            guest
                .mem
                .write_slice(&data[off..off + n], GuestAddress(s.gpa))
                .unwrap();
            off += n;
        }
    })
}

#[test]
fn device_dma_lands_at_the_guest_physical_addresses_the_guest_mapped() {
    let d = Daemon::start(&["--boot-bypass", "off"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let vmm = Client::connect(&d.control, cached()).unwrap();
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    // IOVA 0x40000..0x41fff is two mappings to non-adjacent guest pages.
    let (gpa_a, gpa_b) = (DATA_AREA + 0x5000, DATA_AREA + 0x9000);
    assert_eq!(g.map(1, 0x40000, 0x40fff, gpa_a, RW), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x41000, 0x41fff, gpa_b, RW), VIRTIO_IOMMU_S_OK);
    let data: Vec<u8> = (0..0x1000u32).map(|i| (i % 251) as u8).collect();
    device_dma_write(&vmm, &g, 0x40800, &data).unwrap();
    let mut a = vec![0u8; 0x800];
    let mut b = vec![0u8; 0x800];
    g.mem
        .read_slice(&mut a, GuestAddress(gpa_a + 0x800))
        .unwrap();
    g.mem.read_slice(&mut b, GuestAddress(gpa_b)).unwrap();
    assert_eq!(a, data[..0x800]);
    assert_eq!(b, data[0x800..]);
    // Cache hit the second time: same answer, no daemon round trip.
    assert_eq!(vmm.cached(), 2);
    let segs = vmm.translate(EP, 0x41000, 0x10, Access::Read).unwrap();
    assert_eq!(segs[0].gpa, gpa_b);
    // Unmapped and read-only addresses fault; an unknown endpoint is an error.
    assert!(
        matches!(vmm.translate(EP, 0x50000, 1, Access::Read), Err(Error::Fault(f))
        if f.reason == VIRTIO_IOMMU_FAULT_R_MAPPING && f.address == 0x50000)
    );
    assert_eq!(
        g.map(1, 0x60000, 0x60fff, gpa_a, VIRTIO_IOMMU_MAP_F_READ),
        VIRTIO_IOMMU_S_OK
    );
    assert!(matches!(
        vmm.translate(EP, 0x60000, 1, Access::Write),
        Err(Error::Fault(_))
    ));
    assert!(vmm.translate(EP, 0x60000, 1, Access::Read).is_ok());
}

#[test]
fn after_the_guest_unmap_completes_the_client_cannot_translate_the_range() {
    let d = Daemon::start(&["--boot-bypass", "off"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let vmm = Client::connect(&d.control, cached()).unwrap();
    g.attach(1, EP);
    g.map(1, 0x40000, 0x40fff, DATA_AREA, RW);
    assert!(vmm.translate(EP, 0x40000, 8, Access::Write).is_ok());
    assert_eq!(vmm.cached(), 1);
    assert_eq!(g.unmap(1, 0x40000, 0x40fff), VIRTIO_IOMMU_S_OK);
    // No wait: the UNMAP completed only after the client's ack.
    assert_eq!(vmm.cached(), 0);
    assert!(matches!(
        vmm.translate(EP, 0x40000, 8, Access::Write),
        Err(Error::Fault(_))
    ));
    // DETACH drops what the endpoint cached, and the endpoint then faults.
    g.map(1, 0x40000, 0x40fff, DATA_AREA, RW);
    assert!(vmm.translate(EP, 0x40000, 8, Access::Write).is_ok());
    assert_eq!(g.detach(1, EP), VIRTIO_IOMMU_S_OK);
    assert!(
        matches!(vmm.translate(EP, 0x40000, 8, Access::Write), Err(Error::Fault(f))
        if f.reason == VIRTIO_IOMMU_FAULT_R_DOMAIN)
    );
    let stats = d.ctl(&["stats"]);
    assert!(
        stats["invalidations_sent"].as_u64().unwrap() >= 2,
        "{stats}"
    );
}

#[test]
fn no_stale_translation_under_concurrent_translate_traffic() {
    // The guest remaps one IOVA to a new page again and again; DMA
    // threads translate it all the time. Epoch k is the time between the
    // completion of UNMAP k-1 and of UNMAP k; MAP k points to page k. A
    // DMA that starts in epoch e and uses page k < e used a translation
    // whose UNMAP the guest had already seen complete: a stale cache.
    // A generous ack deadline: on a loaded host a descheduled client
    // must not be disconnected (a_client_stopped_past_the_ack_deadline_...
    // covers that path).
    let d = Daemon::start(&["--boot-bypass", "off", "--client-timeout-ms", "5000"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, EP);
    let vmm = Arc::new(Client::connect(&d.control, cached()).unwrap());
    let epoch = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let page = |k: u64| DATA_AREA + (k % 64) * 0x1000;
    let mut dma_threads = Vec::new();
    for _ in 0..3 {
        let (vmm, epoch, stop) = (vmm.clone(), epoch.clone(), stop.clone());
        dma_threads.push(thread::spawn(move || {
            let (mut hits, mut faults) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let r = vmm.translate_with(EP, 0x40000, 0x100, Access::Write, |segs| {
                    let e = epoch.load(Ordering::SeqCst);
                    (e, segs[0].gpa)
                });
                match r {
                    Ok((e, gpa)) => {
                        assert_eq!(gpa, page(e), "stale translation: epoch {e} used {gpa:#x}");
                        hits += 1;
                    }
                    // Unmapped, or remapped again and again while the
                    // answer was on its way (three spinning threads and
                    // the guest on a small host: a round trip can take a
                    // scheduler slice, as long as the guest's remap
                    // cycle). Neither used a stale translation.
                    Err(Error::Fault(_) | Error::Unstable) => faults += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            (hits, faults)
        }));
    }
    for k in 0..300 {
        assert_eq!(g.map(1, 0x40000, 0x40fff, page(k), RW), VIRTIO_IOMMU_S_OK);
        thread::sleep(Duration::from_micros(200));
        assert_eq!(g.unmap(1, 0x40000, 0x40fff), VIRTIO_IOMMU_S_OK);
        epoch.store(k + 1, Ordering::SeqCst);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut hits, mut faults) = (0, 0);
    for t in dma_threads {
        let (h, f) = t.join().unwrap();
        hits += h;
        faults += f;
    }
    assert!(
        hits > 100 && faults > 0,
        "hits {hits} faults {faults}: the test did not race"
    );
}

#[test]
fn a_stuck_client_cannot_hang_the_guest_unmap() {
    let d = Daemon::start(&["--client-timeout-ms", "100"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, EP);
    g.map(1, 0x40000, 0x40fff, DATA_AREA, RW);
    // A caching client that never reads nor acknowledges anything.
    let mut stuck = UnixStream::connect(&d.control).unwrap();
    stuck
        .write_all(&Message::from(Hello::new(HELLO_F_CACHE)).encode())
        .unwrap();
    // `ctl` counts itself among the clients.
    d.wait_for(
        || d.ctl(&["status"])["clients"] == 2,
        "the stuck client to register",
    );
    let t = Instant::now();
    assert_eq!(g.unmap(1, 0x40000, 0x40fff), VIRTIO_IOMMU_S_OK);
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(5), "UNMAP took {waited:?}");
    let stats = d.ctl(&["stats"]);
    assert_eq!(stats["ack_timeouts"], 1, "{stats}");
    d.wait_for(
        || d.ctl(&["status"])["clients"] == 1,
        "the stuck client to be dropped",
    );
    // Later requests do not wait for it any more.
    g.map(1, 0x40000, 0x40fff, DATA_AREA, RW);
    let t = Instant::now();
    assert_eq!(g.unmap(1, 0x40000, 0x40fff), VIRTIO_IOMMU_S_OK);
    assert!(
        t.elapsed() < Duration::from_millis(90),
        "still waiting for a dead client"
    );
    let mut rest = Vec::new();
    let _ = stuck.read_to_end(&mut rest);
}

#[test]
fn subscriber_gets_the_state_replayed_then_every_change() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, EP);
    g.map(1, 0x1000, 0x1fff, 0x8000, RW);
    let sub = Client::connect(
        &d.control,
        Options {
            cache: false,
            subscribe: Some(Subscription::Async),
        },
    )
    .unwrap();
    let next = || sub.next_event(Duration::from_secs(5)).expect("event");
    assert_eq!(next(), Event::Replayed(StateChange::Bypass(true)));
    assert_eq!(
        next(),
        Event::Replayed(StateChange::Attach {
            endpoint: EP,
            domain: 1,
            bypass: false
        })
    );
    assert!(
        matches!(next(), Event::Replayed(StateChange::Map { domain: 1, mapping })
        if mapping.virt_start == 0x1000 && mapping.phys_start == 0x8000)
    );
    assert_eq!(next(), Event::ReplayDone);
    g.map(1, 0x2000, 0x3fff, 0x9000, VIRTIO_IOMMU_MAP_F_READ);
    g.unmap(1, 0x1000, 0x3fff);
    g.attach(2, EP);
    g.fe_set_bypass(false);
    let live: Vec<StateChange> = (0..5)
        .map(|_| match next() {
            Event::Live { change, .. } => change,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        matches!(live[0], StateChange::Map { domain: 1, mapping } if mapping.flags == VIRTIO_IOMMU_MAP_F_READ)
    );
    assert_eq!(
        live[1],
        StateChange::Unmap {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x3fff
        }
    );
    assert_eq!(
        live[2],
        StateChange::Detach {
            endpoint: EP,
            domain: 1
        }
    );
    assert_eq!(
        live[3],
        StateChange::Attach {
            endpoint: EP,
            domain: 2,
            bypass: false
        }
    );
    assert_eq!(live[4], StateChange::Bypass(false));
}

#[test]
fn sync_subscriber_is_waited_for_and_dropped_when_it_does_not_ack() {
    let d = Daemon::start(&["--client-timeout-ms", "200"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let sub = Arc::new(
        Client::connect(
            &d.control,
            Options {
                cache: false,
                subscribe: Some(Subscription::Sync),
            },
        )
        .unwrap(),
    );
    while sub.next_event(Duration::from_secs(5)) != Some(Event::ReplayDone) {}
    // A VMM shadowing into VFIO: apply, then ack.
    let s = sub.clone();
    let shadow = thread::spawn(move || {
        let mut applied = Vec::new();
        while let Some(ev) = s.next_event(Duration::from_secs(2)) {
            if let Event::Live { seq, change } = ev {
                thread::sleep(Duration::from_millis(20));
                applied.push(change);
                s.ack(seq).unwrap();
                if applied.len() == 2 {
                    break;
                }
            }
        }
        applied
    });
    let t = Instant::now();
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "ATTACH completed before the shadow applied it"
    );
    g.map(1, 0x1000, 0x1fff, 0x8000, RW);
    assert_eq!(shadow.join().unwrap().len(), 2);
    // The shadow stopped acking: the next request waits for the timeout,
    // the subscriber is dropped, the guest goes on.
    assert_eq!(g.unmap(1, 0x1000, 0x1fff), VIRTIO_IOMMU_S_OK);
    d.wait_for(
        || d.ctl(&["status"])["clients"] == 1,
        "the silent subscriber to be dropped",
    );
    assert!(sub.next_event(Duration::from_secs(2)).is_some() || sub.is_closed());
}

#[test]
fn fault_reported_by_a_client_reaches_the_guest_event_queue() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.post_event_buffers(8, 24);
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    vmm.report_fault(
        EP,
        0xdead_0000,
        Some(Access::Write),
        VIRTIO_IOMMU_FAULT_R_MAPPING,
    )
    .unwrap();
    let (len, buf) = g
        .wait_event(Duration::from_secs(5))
        .expect("fault not delivered");
    assert_eq!(len, 24);
    assert_eq!(buf[0], VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(
        u32::from_le_bytes(buf[4..8].try_into().unwrap()),
        VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    assert_eq!(u32::from_le_bytes(buf[8..12].try_into().unwrap()), EP);
    assert_eq!(
        u64::from_le_bytes(buf[16..24].try_into().unwrap()),
        0xdead_0000
    );
    // A failed translation can be reported by the daemon itself.
    g.attach(1, EP);
    assert!(vmm
        .translate_or_report(EP, 0x7000, 1, Access::Read)
        .is_err());
    let (_, buf) = g
        .wait_event(Duration::from_secs(5))
        .expect("translation fault not reported");
    assert_eq!(u64::from_le_bytes(buf[16..24].try_into().unwrap()), 0x7000);
    // Bad reports are refused with a reason, the connection stays.
    assert!(matches!(
        vmm.report_fault(EP, 0, None, 9),
        Err(Error::Daemon { .. })
    ));
    let d2 = Daemon::start(&["--endpoints", "5"]);
    let vmm2 = Client::connect(&d2.control, Options::default()).unwrap();
    assert!(matches!(
        vmm2.report_fault(6, 0, None, 1),
        Err(Error::NoSuchEndpoint(6))
    ));
    assert_eq!(d.ctl(&["stats"])["faults"]["delivered"], 2);
}

#[test]
fn ctl_shows_the_live_state_as_json() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, EP);
    g.attach(2, EP + 1);
    g.map(1, 0x1000, 0x2fff, 0x8000, RW);
    g.map(1, 0x10000, 0x10fff, 0xa000, VIRTIO_IOMMU_MAP_F_READ);
    let status = d.ctl(&["status"]);
    assert_eq!(status["frontend_connected"], true);
    assert_eq!(status["domains"], 2);
    assert_eq!(status["mappings"], 2);
    assert_eq!(status["protocol"], 1);
    let eps = d.ctl(&["endpoints"]);
    assert_eq!(eps["endpoints"][0]["id"], EP);
    assert_eq!(eps["endpoints"][0]["domain"], 1);
    let doms = d.ctl(&["domains"]);
    assert_eq!(doms["domains"][0]["endpoints"][0], EP);
    assert_eq!(doms["domains"][0]["mappings"], 2);
    let maps = d.ctl(&["mappings", "--domain", "1"]);
    let m = &maps["mappings"];
    assert_eq!(
        (
            m[0]["virt_start"].as_u64(),
            m[0]["virt_end"].as_u64(),
            m[0]["phys_start"].as_u64()
        ),
        (Some(0x1000), Some(0x2fff), Some(0x8000))
    );
    assert_eq!(
        (m[1]["read"].as_bool(), m[1]["write"].as_bool()),
        (Some(true), Some(false))
    );
    let t = d.ctl(&[
        "translate",
        "--endpoint",
        "0x20",
        "--iova",
        "0x1800",
        "--len",
        "0x100",
        "--write",
    ]);
    assert_eq!(t["segments"][0]["gpa"], 0x8800);
    let t = d.ctl(&[
        "translate",
        "--endpoint",
        "0x20",
        "--iova",
        "0x10000",
        "--write",
    ]);
    assert_eq!(t["ok"], false);
    assert_eq!(t["fault"]["reason"], "mapping");
    let stats = d.ctl(&["stats"]);
    assert_eq!(stats["requests"]["attach"], 2);
    assert_eq!(stats["requests"]["map"], 2);
    assert_eq!(
        d.ctl(&["fault", "--endpoint", "0x20", "--address", "0x1000"])["ok"],
        true
    );
    // Errors: a missing domain, an unreachable daemon.
    let out = std::process::Command::new(common::BIN)
        .args(["ctl", "--control-socket"])
        .arg(&d.control)
        .args(["mappings", "--domain", "9"])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("domain 9 does not exist")
    );
    let out = std::process::Command::new(common::BIN)
        .args(["ctl", "--control-socket", "/nonexistent", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    // Human output is a table.
    let out = std::process::Command::new(common::BIN)
        .args(["ctl", "--control-socket"])
        .arg(&d.control)
        .arg("domains")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("DOMAIN"));
}

#[test]
fn misbehaving_control_clients_are_disconnected_and_the_daemon_carries_on() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let reply = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&d.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(reply(
        &Message::from(Hello {
            magic: Magic,
            version: 99,
            flags: 0
        })
        .encode()
    )
    .contains("version 99 unsupported"));
    assert!(reply(&Message::from(Ack { seq: 1 }).encode()).contains("first message must be HELLO"));
    assert!(reply(b"\x05\x00\x00\x00\x01garbage").contains("bad HELLO"));
    let mut hello = Message::from(Hello::new(0)).encode();
    hello.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(reply(&hello).contains("larger than"));
    let mut hello = Message::from(Hello::new(0)).encode();
    hello.extend_from_slice(&[1, 0, 0, 0, 0x7e]);
    assert!(reply(&hello).contains("unknown message type"));
    // A client that hangs up in the middle of a frame.
    let mut s = UnixStream::connect(&d.control).unwrap();
    s.write_all(&[40, 0, 0]).unwrap();
    drop(s);
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    assert_eq!(d.ctl(&["status"])["domains"], 1);
    assert!(d.errors().is_empty(), "{}", d.log_text());
}

#[test]
fn control_socket_is_private_and_foreign_uids_are_refused() {
    let d = Daemon::start(&[]);
    let mode = std::fs::metadata(&d.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let is_root = nix::unistd::geteuid().is_root();
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok();
    if !is_root || !setpriv {
        eprintln!("SKIPPED part of control_socket_is_private_and_foreign_uids_are_refused: needs root and setpriv to run a client as another uid");
        return;
    }
    // Open the path so the connection reaches the daemon's SO_PEERCRED check.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::BIN,
            "ctl",
            "--control-socket",
        ])
        .arg(&d.control)
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a foreign uid was served");
    assert!(err.contains("uid 65534 is not allowed"), "{err}");
    assert_eq!(d.ctl(&["stats"])["clients_refused"], 1);
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    Duration::from(t).as_nanos() as u64
}

/// The other process of
/// `a_client_stopped_past_the_ack_deadline_never_uses_a_stale_translation`:
/// a caching device model doing DMA in a loop, printing when each
/// translation started and what it gave.
#[test]
#[ignore = "run as a child process by the test below"]
fn stale_cache_child() {
    let Ok(control) = std::env::var("VDI_CHILD_CONTROL") else {
        return;
    };
    let vmm = Client::connect(&control, cached()).unwrap();
    loop {
        let started = monotonic_ns();
        match vmm.translate_with(EP, 0x40000, 8, Access::Write, |s| s[0].gpa) {
            Ok(gpa) => println!("DMA {started} {gpa}"),
            Err(Error::Disconnected) => {
                println!("DMA {started} disconnected");
                return;
            }
            Err(e) => println!("DMA {started} error {e}"),
        }
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_client_stopped_past_the_ack_deadline_never_uses_a_stale_translation() {
    use nix::{
        sys::signal::{kill, Signal},
        unistd::Pid,
    };
    use std::io::BufRead;
    let d = Daemon::start(&["--boot-bypass", "off", "--client-timeout-ms", "200"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, EP);
    let (old, new) = (DATA_AREA, DATA_AREA + 0x1000);
    assert_eq!(g.map(1, 0x40000, 0x40fff, old, RW), VIRTIO_IOMMU_S_OK);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["stale_cache_child", "--exact", "--ignored", "--nocapture"])
        .env("VDI_CHILD_CONTROL", &d.control)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let mut w = line.split_whitespace();
            if w.next() == Some("DMA") {
                let started: u64 = w.next().unwrap().parse().unwrap();
                let rest: Vec<&str> = w.collect();
                let _ = tx.send((started, rest.join(" ")));
            }
        }
    });
    // The child caches the translation and uses it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        if r == old.to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "the child never translated");
    }
    // It stops (descheduled, as on a loaded host) past the deadline: the
    // guest's UNMAP completes without its acknowledgement.
    kill(pid, Signal::SIGSTOP).unwrap();
    // A signal takes effect when the process next runs: wait until every
    // thread of it is stopped.
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|t| std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default())
            .all(|stat| {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                state.starts_with('T') || state.starts_with('t')
            })
    };
    d.wait_for(stopped, "the child to stop");
    assert_eq!(g.unmap(1, 0x40000, 0x40fff), VIRTIO_IOMMU_S_OK);
    let unmapped = monotonic_ns();
    assert_eq!(d.ctl(&["stats"])["ack_timeouts"], 1);
    assert_eq!(g.map(1, 0x40000, 0x40fff, new, RW), VIRTIO_IOMMU_S_OK);
    thread::sleep(Duration::from_millis(50));
    kill(pid, Signal::SIGCONT).unwrap();
    // Whatever it does now, no DMA started after the UNMAP completed may
    // use the old page.
    loop {
        let (started, r) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the child neither translated nor noticed the disconnection");
        if started > unmapped {
            assert_ne!(
                r,
                old.to_string(),
                "DMA after the UNMAP used the unmapped page"
            );
        }
        if r == "disconnected" {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
