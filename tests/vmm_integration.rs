// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a VMM that passes devices through gets from the daemon: host
//! constraints into the guest's PROBE (control message and
//! `--host-constraints`), and the shadow layer of `viommu-client`
//! following a real guest, acknowledging only once the host follows.

mod common;

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use common::{output_within, Daemon, Guest, GuestOptions, MEM_SIZE};
use viommu::{wire::*, ReservedRegion};
use viommu_client::{
    shadow::{follow, DmaMapper, GuestRam, Prot, RamRegion, Shadow},
    Client, Error, Options, Subscription,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const EP: u32 = 0x20;

fn resv(start: u64, end: u64) -> ReservedRegion {
    ReservedRegion {
        start,
        end,
        subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
    }
}

/// The RESV_MEM properties of a PROBE reply as (start, end).
fn resv_mem(probe: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= probe.len() - 4 {
        let t = u16::from_le_bytes([probe[at], probe[at + 1]]) & 0xfff;
        let len = usize::from(u16::from_le_bytes([probe[at + 2], probe[at + 3]]));
        if t == 0 {
            break;
        }
        if t == VIRTIO_IOMMU_PROBE_T_RESV_MEM {
            let b = &probe[at..at + 24];
            out.push((
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
                u64::from_le_bytes(b[16..24].try_into().unwrap()),
            ));
        }
        at += 4 + len;
    }
    out
}

#[test]
fn host_constraints_from_the_control_socket_reach_probe_and_map() {
    let d = Daemon::start(&["--endpoints", "0x20,0x28"]);
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    // The host's MSI window, reported as reserved, is the device's own:
    // only the rest is added.
    let added = vmm
        .set_host_constraints(
            EP,
            0,
            &[resv(0x10_0000, 0x1f_ffff), resv(0xfee0_0000, 0xfeef_ffff)],
        )
        .unwrap();
    assert_eq!(added, [(0x10_0000, 0x1f_ffff)]);
    // Refusals are answers, not disconnections; nothing changes.
    let refused = |r: Result<Vec<(u64, u64)>, Error>| match r {
        Err(Error::Daemon { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    let many = vec![resv(0, 0xfff); 65];
    assert!(refused(vmm.set_host_constraints(EP, 0, &many)).contains("at most 64"));
    let bad = ReservedRegion {
        subtype: 9,
        ..resv(0, 0xfff)
    };
    assert!(refused(vmm.set_host_constraints(EP, 0, &[bad])).contains("subtype 9"));
    assert!(refused(vmm.set_host_constraints(EP, 0, &[resv(2, 1)])).contains("empty"));
    assert!(matches!(
        vmm.set_host_constraints(0x30, 0, &[]),
        Err(Error::NoSuchEndpoint(0x30))
    ));

    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let p = g.probe(EP, 512);
    assert_eq!(p.status(), Some(VIRTIO_IOMMU_S_OK));
    assert_eq!(
        resv_mem(&p.writable),
        [(0xfee0_0000, 0xfeef_ffff), (0x10_0000, 0x1f_ffff)]
    );
    assert_eq!(resv_mem(&g.probe(0x28, 512).writable).len(), 1);
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x1f_f000, 0x20_0fff, 0, RW), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(g.map(1, 0x20_0000, 0x20_0fff, 0, RW), VIRTIO_IOMMU_S_OK);
    // Too late for page sizes the guest's 4 KiB granule cannot meet.
    assert!(refused(vmm.set_host_constraints(EP, 1 << 21, &[])).contains("granule"));
    assert!(d.errors().is_empty(), "{:?}", d.errors());
}

#[test]
fn host_constraints_on_the_command_line() {
    let d = Daemon::start(&[
        "--endpoints",
        "0x20",
        "--host-constraints",
        "0x20=0x100000-0x1fffff,pgsizes:0xffffffffffff0000",
    ]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.config().page_size_mask.to_native(), !0xffff);
    let p = g.probe(EP, 512);
    assert_eq!(resv_mem(&p.writable)[1], (0x10_0000, 0x1f_ffff));
    drop(g);

    for bad in ["0x20=5-1", "0x20", "0x20=pgsizes:0", "0x99=0-1"] {
        let out = output_within(
            std::process::Command::new(common::bin())
                .args([
                    "--socket-path",
                    "/nonexistent/x.sock",
                    "--endpoints",
                    "0x20",
                ])
                .args(["--host-constraints", bad]),
            Duration::from_secs(10),
        );
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("host-constraints"), "{bad}: {err}");
    }
}

/// Keeps what the host would hold; `unmap` takes `delay` (a slow IOTLB
/// flush).
struct SlowRecorder {
    host: Mutex<Vec<(u64, u64, u64, Prot)>>,
    delay: Duration,
}

impl DmaMapper for SlowRecorder {
    fn map(&self, iova: u64, gpa: u64, size: u64, prot: Prot) -> io::Result<()> {
        self.host.lock().unwrap().push((iova, gpa, size, prot));
        Ok(())
    }
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        thread::sleep(self.delay);
        let mut h = self.host.lock().unwrap();
        let before = h.len();
        h.retain(|m| (m.0, m.2) != (iova, size));
        assert_eq!(h.len() + 1, before, "unmap of {iova:#x} not mapped");
        Ok(())
    }
}

#[test]
fn the_guest_unmap_completes_only_after_the_shadow_unmapped_on_the_host() {
    let d = Daemon::start(&["--endpoints", "0x20,0x28", "--client-timeout-ms", "2000"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    // State from before the VMM connects comes through the replay.
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x1000, 0x1fff, 0x8000, RW), VIRTIO_IOMMU_S_OK);

    let hva = g.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let ram = Arc::new(
        GuestRam::new(vec![RamRegion {
            gpa: 0,
            size: MEM_SIZE,
            hva,
        }])
        .unwrap(),
    );
    let shadow = Arc::new(Mutex::new(Shadow::new(ram)));
    let rec = Arc::new(SlowRecorder {
        host: Mutex::new(Vec::new()),
        delay: Duration::from_millis(100),
    });
    shadow.lock().unwrap().register(EP, rec.clone()).unwrap();
    let client = Client::connect(
        &d.control,
        Options {
            cache: false,
            subscribe: Some(Subscription::Sync),
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let (shadow, stop) = (shadow.clone(), stop.clone());
        thread::spawn(move || follow(&shadow, &client, &stop, |e| panic!("{e}")))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.host.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the replay was not installed");
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        rec.host.lock().unwrap()[0],
        (0x1000, 0x8000, 0x1000, Prot::RW)
    );

    // A live MAP is on the host when the guest's request completes.
    assert_eq!(
        g.map(1, 0x4000, 0x5fff, 0x9000, VIRTIO_IOMMU_MAP_F_READ),
        VIRTIO_IOMMU_S_OK
    );
    assert!(rec.host.lock().unwrap().contains(&(
        0x4000,
        0x9000,
        0x2000,
        Prot {
            read: true,
            write: false
        }
    )));
    // The UNMAP waits for the slow host unmap.
    let t = Instant::now();
    assert_eq!(g.unmap(1, 0x4000, 0x5fff), VIRTIO_IOMMU_S_OK);
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(rec.host.lock().unwrap().len(), 1);
    // DETACH too: nothing of the domain stays on the host; unattached
    // with the bypass field on (the default), the endpoint reaches all of
    // RAM at its own address.
    assert_eq!(g.detach(1, EP), VIRTIO_IOMMU_S_OK);
    assert_eq!(*rec.host.lock().unwrap(), [(0, 0, MEM_SIZE, Prot::RW)]);
    g.fe_set_bypass(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rec.host.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "bypass off kept the identity map"
        );
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Release);
    follower.join().unwrap().unwrap();
    assert!(d.errors().is_empty(), "{:?}", d.errors());
}

#[test]
fn the_access_platform_adapter_translates_with_the_access_direction() {
    use viommu_client::{platform::Remapper, Access};
    let d = Daemon::start(&["--endpoints", "0x20"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    let ro = VIRTIO_IOMMU_MAP_F_READ;
    assert_eq!(g.map(1, 0x1000, 0x1fff, 0x8000, ro), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x2000, 0x2fff, 0x9000, ro), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x3000, 0x3fff, 0x20000, RW), VIRTIO_IOMMU_S_OK);
    let client = Arc::new(
        Client::connect(
            &d.control,
            Options {
                cache: true,
                subscribe: None,
            },
        )
        .unwrap(),
    );
    let dev = Remapper::new(client).endpoint(EP);
    assert_eq!(dev.translate(0x1800, 0x10, Access::Read).unwrap(), 0x8800);
    // Two mappings contiguous in guest memory: one address.
    assert_eq!(dev.translate(0x1800, 0x1000, Access::Read).unwrap(), 0x8800);
    let e = dev.translate(0x1800, 0x10, Access::Write).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    let e = dev.translate(0x2800, 0x1000, Access::Read).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    assert_eq!(
        dev.translate(0x3000, 0x1000, Access::Write).unwrap(),
        0x20000
    );
    // After the guest's UNMAP completes, nothing translates.
    assert_eq!(g.unmap(1, 0x3000, 0x3fff), VIRTIO_IOMMU_S_OK);
    assert!(dev.translate(0x3000, 0x10, Access::Read).is_err());
    assert_eq!(
        dev.translate_gpa(0x8000, 0x10).unwrap_err().kind(),
        io::ErrorKind::Unsupported
    );
}

#[test]
fn a_malformed_set_host_constraints_ends_that_connection_only() {
    use std::io::{Read, Write};
    use viommu_protocol::{messages::Hello, Message};
    let d = Daemon::start(&["--endpoints", "0x20"]);
    let mut s = std::os::unix::net::UnixStream::connect(&d.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bytes = Message::from(Hello::new(0)).encode();
    // SET_HOST_CONSTRAINTS announcing 1000 regions in a 24-byte frame.
    let mut body = vec![0x07];
    body.extend_from_slice(&1u32.to_le_bytes()); // tag
    body.extend_from_slice(&EP.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&1000u32.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&body);
    s.write_all(&bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("truncated") || text.contains("malformed"),
        "{text}"
    );
    // The daemon carries on, and nothing was applied.
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    assert_eq!(vmm.set_host_constraints(EP, 0, &[]).unwrap(), []);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(resv_mem(&g.probe(EP, 512).writable).len(), 1);
}
