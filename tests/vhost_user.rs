// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of the daemon binary over a real vhost-user socket,
//! driven the way QEMU and the Linux virtio-iommu driver drive it.

mod common;

use std::time::Duration;

use common::{driver::Buf, Daemon, Guest, GuestOptions, DATA_AREA, MEM_SIZE};
use vhost::{
    vhost_user::{message::VhostUserConfigFlags, VhostUserFrontend},
    VhostBackend,
};
use viommu::wire::*;
use vm_memory::{ByteValued, Bytes, GuestAddress};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

fn both_ring_modes(test: impl Fn(GuestOptions)) {
    for event_idx in [true, false] {
        test(GuestOptions {
            event_idx,
            ..Default::default()
        });
    }
}

#[test]
fn config_space_reflects_the_command_line() {
    let d = Daemon::start(&[
        "--page-size-mask",
        "0x201000",
        "--input-range-bits",
        "39",
        "--domain-range",
        "1-0x100",
        "--probe-size",
        "256",
        "--boot-bypass",
        "off",
    ]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let cfg = g.config();
    assert_eq!(cfg.page_size_mask.to_native(), 0x201000);
    assert_eq!(cfg.input_range_start.to_native(), 0);
    assert_eq!(cfg.input_range_end.to_native(), (1 << 39) - 1);
    assert_eq!(cfg.domain_range_start.to_native(), 1);
    assert_eq!(cfg.domain_range_end.to_native(), 0x100);
    assert_eq!(cfg.probe_size.to_native(), 256);
    assert_eq!(cfg.bypass, 0);
}

#[test]
fn get_config_returns_exactly_the_requested_bytes_at_any_offset() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    // cloud-hypervisor forwards each guest access as is.
    for (off, len) in [(0x24u32, 1u32), (0x20, 4), (0x8, 8), (0x0, 0x40), (0x26, 2)] {
        let (_, data) =
            g.fe.get_config(
                off,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0; len as usize],
            )
            .unwrap();
        assert_eq!(data.len(), len as usize, "offset {off:#x}");
    }
    let (_, data) =
        g.fe.get_config(0x24, 1, VhostUserConfigFlags::WRITABLE, &[0])
            .unwrap();
    assert_eq!(data, [1], "boot bypass is on by default");
}

#[test]
fn features_offer_the_spec_bits_but_never_legacy_bypass() {
    let d = Daemon::start(&[]);
    let fe = vhost::vhost_user::Frontend::connect(&d.socket, 2).unwrap();
    let f = fe.get_features().unwrap();
    for bit in [
        VIRTIO_IOMMU_F_INPUT_RANGE,
        VIRTIO_IOMMU_F_DOMAIN_RANGE,
        VIRTIO_IOMMU_F_MAP_UNMAP,
        VIRTIO_IOMMU_F_PROBE,
        VIRTIO_IOMMU_F_MMIO,
        VIRTIO_IOMMU_F_BYPASS_CONFIG,
        32,
        29,
    ] {
        assert!(f & (1 << bit) != 0, "feature bit {bit} not offered");
    }
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_BYPASS), 0);
    let d = Daemon::start(&["--bypass-config", "off", "--probe-size", "0"]);
    let fe = vhost::vhost_user::Frontend::connect(&d.socket, 2).unwrap();
    let f = fe.get_features().unwrap();
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG), 0);
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_PROBE), 0);
}

#[test]
fn linux_driver_boot_sequence_probes_attaches_and_maps_in_batches() {
    both_ring_modes(|opts| {
        let d = Daemon::start(&["--endpoints", "0x20-0x27"]);
        let mut g = Guest::connect(&d.socket, opts);
        g.post_event_buffers(64, 24);
        // PROBE with probe_size + 4 writable bytes reports the MSI window.
        let c = g.probe(0x20, 512);
        assert_eq!(c.used_len, 516);
        assert_eq!(c.status(), Some(VIRTIO_IOMMU_S_OK));
        let mut prop = ProbeResvMem::default();
        prop.as_mut_slice().copy_from_slice(&c.writable[..24]);
        assert_eq!(
            prop.head.prop_type.to_native(),
            VIRTIO_IOMMU_PROBE_T_RESV_MEM
        );
        assert_eq!(prop.subtype, VIRTIO_IOMMU_RESV_MEM_T_MSI);
        assert_eq!(
            (prop.start.to_native(), prop.end.to_native()),
            (0xfee0_0000, 0xfeef_ffff)
        );
        assert_eq!(g.attach(1, 0x20), VIRTIO_IOMMU_S_OK);
        // 64 MAPs queued, one kick, as iommu_map_sg + iotlb_sync_map do.
        let maps: Vec<MapReq> = (0..64u64)
            .map(|i| {
                MapReq::new(
                    1,
                    0x10_0000 + i * 0x1000,
                    0x10_0fff + i * 0x1000,
                    i * 0x1000,
                    RW,
                )
            })
            .collect();
        let reqs: Vec<(&[u8], usize)> = maps.iter().map(|m| (readable_part(m), 4)).collect();
        let done = g.submit(&reqs);
        assert!(done
            .iter()
            .all(|c| c.used_len == 4 && c.status() == Some(VIRTIO_IOMMU_S_OK)));
        // One UNMAP may span several mappings (Linux merges adjacent ones).
        assert_eq!(g.unmap(1, 0x10_0000, 0x13_ffff), VIRTIO_IOMMU_S_OK);
        assert_eq!(g.map(1, 0x10_0000, 0x10_0fff, 0, RW), VIRTIO_IOMMU_S_OK);
        // Endpoint outside --endpoints does not exist.
        assert_eq!(g.attach(1, 0x28), VIRTIO_IOMMU_S_NOENT);
        assert_eq!(g.probe(0x28, 512).status(), Some(VIRTIO_IOMMU_S_NOENT));
        assert!(d.errors().is_empty(), "{}", d.log_text());
    });
}

#[test]
fn unmap_that_would_split_a_mapping_is_refused_and_removes_nothing() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, 8);
    assert_eq!(g.map(1, 0x1000, 0x1fff, 0x1000, RW), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x2000, 0x3fff, 0x2000, RW), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.unmap(1, 0x1000, 0x2fff), VIRTIO_IOMMU_S_RANGE);
    // Both mappings are still there: mapping over them overlaps.
    assert_eq!(g.map(1, 0x1000, 0x1fff, 0, RW), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(g.map(1, 0x3000, 0x3fff, 0, RW), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(g.unmap(1, 0x1000, 0x3fff), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x1000, 0x3fff, 0, RW), VIRTIO_IOMMU_S_OK);
}

#[test]
fn malformed_requests_are_returned_unwritten_and_the_connection_survives() {
    both_ring_modes(|opts| {
        let d = Daemon::start(&[]);
        let mut g = Guest::connect(&d.socket, opts);
        let map = MapReq::new(1, 0, 0xfff, 0, RW);
        let done = g.submit(&[
            (&[42, 0, 0, 0, 1, 2, 3, 4][..], 4), // unknown type
            (&readable_part(&map)[..10], 4),     // truncated
            (readable_part(&map), 2),            // no room for the tail
            (&[][..], 4),                        // no readable part
            (&[VIRTIO_IOMMU_T_ATTACH][..], 0),   // nothing writable
        ]);
        for (i, c) in done.iter().enumerate() {
            assert_eq!(c.used_len, 0, "request {i}");
            assert!(
                c.writable.iter().all(|&b| b == 0),
                "request {i} was written"
            );
        }
        // Descriptors pointing outside guest memory.
        let bad = g.submit_chains(&[
            vec![
                Buf {
                    addr: MEM_SIZE + 0x1000,
                    len: 36,
                    writable: false,
                },
                Buf {
                    addr: DATA_AREA,
                    len: 4,
                    writable: true,
                },
            ],
            vec![
                Buf {
                    addr: DATA_AREA,
                    len: 24,
                    writable: false,
                },
                Buf {
                    addr: u64::MAX - 2,
                    len: 4,
                    writable: true,
                },
            ],
            vec![
                Buf {
                    addr: DATA_AREA,
                    len: 4,
                    writable: true,
                },
                Buf {
                    addr: DATA_AREA,
                    len: 24,
                    writable: false,
                },
            ],
        ]);
        assert!(bad.iter().all(|&(_, len)| len == 0), "{bad:?}");
        assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
        assert_eq!(g.map(1, 0, 0xfff, 0, RW), VIRTIO_IOMMU_S_OK);
        assert!(d.errors().is_empty(), "{}", d.log_text());
    });
}

#[test]
fn requests_split_over_several_descriptors_are_understood() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, 8);
    let map = MapReq::new(1, 0x5000, 0x5fff, 0x9000, RW);
    let ro = readable_part(&map);
    let base = DATA_AREA + 0x1000;
    g.mem.write_slice(ro, GuestAddress(base)).unwrap();
    g.mem
        .write_slice(&[0xff; 8], GuestAddress(base + 0x100))
        .unwrap();
    // Readable part in three pieces, tail split over two writable pieces.
    let used = g.submit_chains(&[vec![
        Buf {
            addr: base,
            len: 3,
            writable: false,
        },
        Buf {
            addr: base + 3,
            len: 20,
            writable: false,
        },
        Buf {
            addr: base + 23,
            len: 13,
            writable: false,
        },
        Buf {
            addr: base + 0x100,
            len: 6,
            writable: true,
        },
        Buf {
            addr: base + 0x106,
            len: 2,
            writable: true,
        },
    ]]);
    assert_eq!(used[0].1, 8);
    let mut tail = [0u8; 8];
    g.mem
        .read_slice(&mut tail, GuestAddress(base + 0x100))
        .unwrap();
    assert_eq!(&tail[4..8], &[VIRTIO_IOMMU_S_OK, 0, 0, 0]);
    assert_eq!(
        g.map(1, 0x5000, 0x5fff, 0, RW),
        VIRTIO_IOMMU_S_INVAL,
        "mapping not created"
    );
}

#[test]
fn driver_may_write_bypass_but_no_other_config_field() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let mut cfg = g.config();
    assert_eq!(cfg.bypass, 1);
    // QEMU writes the whole config space on any guest write.
    cfg.bypass = 0;
    cfg.page_size_mask = 0x1234_0000.into();
    g.fe.set_config(0, VhostUserConfigFlags::WRITABLE, cfg.as_slice())
        .unwrap();
    let after = g.config();
    assert_eq!(after.bypass, 0);
    assert_eq!(after.page_size_mask.to_native(), 0xffff_ffff_ffff_f000);
    // Invalid bypass values are ignored; the connection stays up.
    g.fe.set_config(0x24, VhostUserConfigFlags::WRITABLE, &[7])
        .unwrap();
    assert_eq!(g.config().bypass, 0);
    g.fe.set_config(0x24, VhostUserConfigFlags::WRITABLE, &[1])
        .unwrap();
    assert_eq!(g.config().bypass, 1);
    assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
}

#[test]
fn iommu_state_survives_a_frontend_reconnect() {
    let d = Daemon::start(&[]);
    {
        let mut g = Guest::connect(&d.socket, GuestOptions::default());
        assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
        assert_eq!(g.map(1, 0x1000, 0x1fff, 0x7000, RW), VIRTIO_IOMMU_S_OK);
    }
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(
        g.map(1, 0x1000, 0x1fff, 0x7000, RW),
        VIRTIO_IOMMU_S_INVAL,
        "mapping lost"
    );
    assert_eq!(g.detach(1, 8), VIRTIO_IOMMU_S_OK, "attachment lost");
    assert!(d.errors().is_empty(), "{}", d.log_text());
}

#[test]
fn device_reset_clears_domains_and_mappings() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, 8);
    g.map(1, 0x1000, 0x1fff, 0x7000, RW);
    g.fe.reset_device().unwrap();
    drop(g);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.map(1, 0x1000, 0x1fff, 0x7000, RW), VIRTIO_IOMMU_S_NOENT);
    assert_eq!(g.detach(1, 8), VIRTIO_IOMMU_S_INVAL);
}

#[test]
fn ring_restart_at_zero_on_the_same_connection_is_a_driver_reset() {
    // QEMU's generic vhost-user device stops and restarts the rings when
    // the guest driver resets the device, and sends nothing else.
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, 8);
    g.map(1, 0x1000, 0x1fff, 0x7000, RW);
    // A VM pause: rings stop and resume where they were.
    for q in 0..2 {
        let base = g.fe.get_vring_base(q).unwrap();
        g.fe.set_vring_base(q, base as u16).unwrap();
        g.fe.set_vring_kick(q, &g.kicks[q]).unwrap();
        g.fe.set_vring_call(q, &g.calls[q]).unwrap();
        g.fe.set_vring_enable(q, true).unwrap();
    }
    assert_eq!(
        g.map(1, 0x1000, 0x1fff, 0x7000, RW),
        VIRTIO_IOMMU_S_INVAL,
        "pause lost state"
    );
    // A driver reset: rings restart from index 0.
    for q in 0..2 {
        g.fe.get_vring_base(q).unwrap();
    }
    g.restart_rings();
    assert_eq!(
        g.map(1, 0x1000, 0x1fff, 0x7000, RW),
        VIRTIO_IOMMU_S_NOENT,
        "reset kept state"
    );
}

#[test]
fn held_event_buffers_are_not_reported_as_used_when_the_ring_stops() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.post_event_buffers(2, 24);
    // A kick makes the device pop and hold both buffers.
    g.kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.fe.get_vring_base(1).unwrap(), 0);
    assert!(g.wait_event(Duration::from_millis(10)).is_none());
    // They were popped and held, not left in the ring.
    assert!(
        d.log_text()
            .contains("event queue stopped with 2 buffers held"),
        "{}",
        d.log_text()
    );
}

#[test]
fn sigterm_exits_with_status_zero_and_removes_the_socket() {
    let mut d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.attach(1, 8);
    let status = d.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}\n{}", d.log_text());
    assert!(!d.socket.exists());
    let mut d = Daemon::start(&[]);
    assert!(d.signal_and_wait("INT").success());
    assert!(!d.socket.exists());
}

#[test]
fn frontend_disconnect_does_not_end_the_daemon() {
    let mut d = Daemon::start(&[]);
    for _ in 0..3 {
        let mut g = Guest::connect(&d.socket, GuestOptions::default());
        assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
    }
    // A client that hangs up mid-handshake.
    drop(std::os::unix::net::UnixStream::connect(&d.socket).unwrap());
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
    assert!(d.alive());
}

#[test]
fn invalid_command_lines_fail_with_a_clear_message() {
    for (args, needle) in [
        (
            &["--socket-path", "/tmp/x.sock", "--endpoints", "5-1"][..],
            "reversed",
        ),
        (
            &["--socket-path", "/tmp/x.sock", "--input-range-bits", "3"],
            "input range bits",
        ),
        (
            &["--socket-path", "/tmp/x.sock", "--probe-size", "8"],
            "probe_size",
        ),
        (&["--socket-fd", "999"], "not an open socket"),
        (&[], "--socket-path"),
    ] {
        let out = std::process::Command::new(common::BIN)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn socket_activation_serves_a_listener_passed_by_file_descriptor() {
    use std::os::fd::AsRawFd;

    use nix::fcntl::{fcntl, FcntlArg, FdFlag};

    // A service manager binds the socket and hands it over as an fd.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    fcntl(&listener, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let fd = listener.as_raw_fd().to_string();
    let mut child = std::process::Command::new(common::BIN)
        .args(["--socket-fd", &fd])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    let mut g = Guest::connect(&path, GuestOptions::default());
    assert_eq!(g.attach(1, 8), VIRTIO_IOMMU_S_OK);
    drop(g);
    // The socket belongs to the service manager: the daemon leaves it.
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-s", "TERM", &pid])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        path.exists(),
        "the daemon removed a socket it did not create"
    );
}
