// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Event queue behaviour over a real vhost-user socket, with the daemon's
//! serve loop running in this process so the test can raise faults.

mod common;

use std::{sync::Arc, thread, time::Duration};

use common::{Guest, GuestOptions};
use vhost::VhostBackend;
use vhost_device_iommu::{
    backend::IommuBackend,
    daemon::{serve, SocketSource},
    iommu::{Iommu, IommuOptions},
    pasid_manager::PasidService,
};
use viommu::{wire::*, Access, DeviceConfig, Fault};
use vm_memory::ByteValued;

fn start() -> (Arc<Iommu>, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("viommu.sock");
    let iommu = Iommu::new(
        DeviceConfig::default(),
        PasidService::Disabled,
        IommuOptions::default(),
    )
    .unwrap();
    let iommu = Arc::new(iommu);
    let (b, s) = (Arc::new(IommuBackend::new(iommu.clone())), sock.clone());
    thread::spawn(move || serve(b, SocketSource::Path(s)));
    for _ in 0..1000 {
        if sock.exists() {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    (iommu, dir, sock)
}

fn fault(endpoint: u32, address: u64) -> Fault {
    Fault::new(
        VIRTIO_IOMMU_FAULT_R_MAPPING,
        endpoint,
        address,
        Access::Write,
    )
}

#[test]
fn fault_is_delivered_into_a_buffer_posted_without_a_kick() {
    for event_idx in [true, false] {
        let (backend, _dir, sock) = start();
        let mut g = Guest::connect(
            &sock,
            GuestOptions {
                event_idx,
                ..Default::default()
            },
        );
        // Linux fills the event queue after DRIVER_OK and never kicks it.
        g.post_event_buffers(2, 24);
        backend.post_event(fault(0x20, 0xdead_b000).record().as_slice());
        let (len, buf) = g
            .wait_event(Duration::from_secs(5))
            .expect("no event delivered");
        assert_eq!(len, 24);
        let mut rec = FaultRecord::default();
        rec.as_mut_slice().copy_from_slice(&buf);
        assert_eq!(rec.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(rec.reserved, [0; 3]);
        assert_eq!(rec.endpoint.to_native(), 0x20);
        assert_eq!(rec.address.to_native(), 0xdead_b000);
        assert_eq!(
            rec.flags.to_native(),
            VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
        );
        assert!(
            g.calls[1].read().is_ok(),
            "no interrupt for the event queue"
        );
        // One of the two popped buffers is used, the other still held:
        // GET_VRING_BASE reports 1, not 2.
        assert_eq!(g.fe.get_vring_base(1).unwrap(), 1);
    }
}

#[test]
fn faults_raised_before_any_buffer_wait_for_one() {
    let (backend, _dir, sock) = start();
    let mut g = Guest::connect(&sock, GuestOptions::default());
    backend.post_event(fault(1, 0x1000).record().as_slice());
    backend.post_event(fault(2, 0x2000).record().as_slice());
    assert_eq!(backend.event_queue_depth(), (0, 2));
    g.post_event_buffers(4, 24);
    g.kicks[1].write(1).unwrap();
    for ep in [1u32, 2] {
        let (_, buf) = g
            .wait_event(Duration::from_secs(5))
            .expect("pending fault not delivered");
        assert_eq!(
            u32::from_le_bytes(buf[8..12].try_into().unwrap()),
            ep,
            "out of order"
        );
    }
    assert_eq!(backend.event_stats().delivered, 2);
    assert_eq!(backend.event_queue_depth().1, 0);
}

#[test]
fn event_buffer_too_small_for_a_record_is_not_written() {
    let (backend, _dir, sock) = start();
    let mut g = Guest::connect(&sock, GuestOptions::default());
    g.post_event_buffers(1, 16);
    g.post_event_buffers(1, 24);
    backend.post_event(fault(3, 0x3000).record().as_slice());
    let (len, _) = g.wait_event(Duration::from_secs(5)).unwrap();
    assert_eq!(len, 0, "a record was split into a short buffer");
    let (len, buf) = g.wait_event(Duration::from_secs(5)).unwrap();
    assert_eq!(len, 24);
    assert_eq!(buf[8], 3);
}
