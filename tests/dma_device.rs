// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! dma-test-device end to end: the device model (register file, worker,
//! DMA engine) translating through a real `viommu-client` against the
//! real daemon binary, with a Linux-like guest driving the daemon over
//! vhost-user and the guest's RAM file lent to the device as QEMU's
//! DMA_MAP would.

mod common;

use std::time::Duration;

use common::{Daemon, Guest, GuestOptions, DATA_AREA, MEM_SIZE};
use dma_test_device::{
    device::{Device, IommuLink, Translation},
    regs::*,
};
use viommu::wire::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const EP: u32 = 0x28;
const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const PAGE: u64 = 0x1000;

/// The device, with the guest's RAM as its DMA_MAP region at GPA 0.
fn device(d: &Daemon, g: &Guest) -> Device {
    let link = IommuLink::connect(d.control.clone(), EP, true).unwrap();
    let dev = Device::new(Translation::Iommu(link)).unwrap();
    let region = g.mem.find_region(GuestAddress(0)).unwrap();
    let file = region.file_offset().unwrap().file().try_clone().unwrap();
    dev.ram()
        .map(0, MEM_SIZE, Some((file, 0)), true, true)
        .unwrap();
    dev
}

fn w64(dev: &Device, off: u64, v: u64) {
    dev.bar_write(off, &v.to_le_bytes());
}

fn r64(dev: &Device, off: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.bar_read(off, &mut b);
    u64::from_le_bytes(b)
}

/// Programs and runs one operation; returns STATUS.
fn run(dev: &Device, op: u32, src: u64, dst: u64, len: u64, pattern: u64) -> Status {
    w64(dev, SRC, src);
    w64(dev, DST, dst);
    w64(dev, LEN, len);
    w64(dev, PATTERN, pattern);
    dev.bar_write(CMD, &op.to_le_bytes());
    dev.wait_idle()
}

fn read(g: &Guest, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    g.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
    b
}

/// The next fault record on the guest's event queue: (reason, flags, endpoint, address).
fn next_fault(g: &mut Guest) -> (u8, u32, u32, u64) {
    let (len, buf) = g
        .wait_event(Duration::from_secs(5))
        .expect("no fault event");
    assert_eq!(len, 24);
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    (
        buf[0],
        u32_at(4),
        u32_at(8),
        u64::from_le_bytes(buf[16..24].try_into().unwrap()),
    )
}

#[test]
fn device_dma_goes_where_the_guest_mapped_and_faults_where_it_did_not() {
    let d = Daemon::start(&["--boot-bypass", "off", "--endpoints", "0x28"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.post_event_buffers(16, 24);
    let dev = device(&d, &g);
    // Not attached, no bypass: refused, reported with reason "domain".
    assert_eq!(run(&dev, OP_FILL, 0, 0x10_0000, 8, 1), Status::Fault);
    assert_eq!(
        next_fault(&mut g),
        (
            VIRTIO_IOMMU_FAULT_R_DOMAIN,
            VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            EP,
            0x10_0000
        )
    );

    // IOVA 0x100000: two pages at scattered GPAs; 0x200000: read-only.
    let (a0, a1, ro) = (DATA_AREA + 0x7000, DATA_AREA + 0x3000, DATA_AREA + 0xa000);
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x10_0000, 0x10_0fff, a0, RW), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0x10_1000, 0x10_1fff, a1, RW), VIRTIO_IOMMU_S_OK);
    let ro_flags = VIRTIO_IOMMU_MAP_F_READ;
    assert_eq!(
        g.map(1, 0x20_0000, 0x20_0fff, ro, ro_flags),
        VIRTIO_IOMMU_S_OK
    );
    let src: Vec<u8> = (0..0x2000u32).map(|i| (i * 13 % 251) as u8).collect();
    g.mem.write_slice(&src[..0x1000], GuestAddress(a0)).unwrap();
    g.mem.write_slice(&src[0x1000..], GuestAddress(a1)).unwrap();
    g.mem
        .write_slice(&[0x77; 0x1000], GuestAddress(ro))
        .unwrap();

    assert_eq!(
        run(&dev, OP_CHECKSUM, 0x10_0000, 0, 0x2000, 0),
        Status::Done
    );
    let fnv = src.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    assert_eq!(r64(&dev, RESULT), fnv);
    assert_eq!(
        run(&dev, OP_FILL, 0, 0x10_0ffc, 8, 0x0807_0605_0403_0201),
        Status::Done
    );
    assert_eq!(read(&g, a0 + 0xffc, 4), [1, 2, 3, 4]);
    assert_eq!(read(&g, a1, 4), [5, 6, 7, 8]);

    // A write to the read-only page: refused, memory untouched, reported.
    assert_eq!(
        run(&dev, OP_COPY, 0x10_0000, 0x20_0000, 0x10, 0),
        Status::Fault
    );
    assert_eq!(r64(&dev, FAULT_ADDR), 0x20_0000);
    assert_eq!(r64(&dev, FAULT_INFO) & 0xffff_ffff, 0x101);
    assert_eq!(read(&g, ro, 0x1000), vec![0x77; 0x1000]);
    let f = next_fault(&mut g);
    assert_eq!((f.0, f.3), (VIRTIO_IOMMU_FAULT_R_MAPPING, 0x20_0000));
    // ... while reading it is fine.
    assert_eq!(
        run(&dev, OP_COPY, 0x20_0000, 0x10_0000, 0x10, 0),
        Status::Done
    );
    assert_eq!(read(&g, a0, 0x10), vec![0x77; 0x10]);

    // Once the guest's UNMAP has completed, the cached translation is
    // gone: the device faults at the first unmapped byte, after writing
    // exactly the bytes before it.
    assert_eq!(g.unmap(1, 0x10_1000, 0x10_1fff), VIRTIO_IOMMU_S_OK);
    g.mem.write_slice(&[0u8; 0x1000], GuestAddress(a1)).unwrap();
    assert_eq!(run(&dev, OP_FILL, 0, 0x10_0f00, 0x200, !0), Status::Fault);
    assert_eq!(r64(&dev, DONE_BYTES), 0x100);
    assert_eq!(r64(&dev, FAULT_ADDR), 0x10_1000);
    assert_eq!(read(&g, a0 + 0xf00, 0x100), vec![0xff; 0x100]);
    assert_eq!(read(&g, a1, 0x1000), vec![0; 0x1000]);
    let f = next_fault(&mut g);
    assert_eq!(
        (f.1 & VIRTIO_IOMMU_FAULT_F_WRITE, f.3),
        (VIRTIO_IOMMU_FAULT_F_WRITE, 0x10_1000)
    );
    assert!(d.errors().is_empty(), "{:?}", d.errors());
}

#[test]
fn a_caching_device_never_uses_a_stale_translation() {
    let d = Daemon::start(&["--boot-bypass", "off", "--endpoints", "0x28"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    g.post_event_buffers(64, 24);
    let dev = device(&d, &g);
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    let bufs = [DATA_AREA + 0x10_000, DATA_AREA + 0x20_000];
    for i in 0..200u64 {
        let (cur, other) = (bufs[(i % 2) as usize], bufs[(1 - i % 2) as usize]);
        g.mem
            .write_slice(&[0u8; PAGE as usize], GuestAddress(cur))
            .unwrap();
        g.mem
            .write_slice(&[0u8; PAGE as usize], GuestAddress(other))
            .unwrap();
        assert_eq!(g.map(1, 0x50_0000, 0x50_0fff, cur, RW), VIRTIO_IOMMU_S_OK);
        let p = 0x0101_0101_0101_0101 * (i % 200 + 1);
        assert_eq!(
            run(&dev, OP_FILL, 0, 0x50_0000, PAGE, p),
            Status::Done,
            "cycle {i}"
        );
        assert_eq!(g.unmap(1, 0x50_0000, 0x50_0fff), VIRTIO_IOMMU_S_OK);
        assert_eq!(
            run(&dev, OP_FILL, 0, 0x50_0000, PAGE, !p),
            Status::Fault,
            "cycle {i}"
        );
        assert_eq!(
            read(&g, cur, PAGE as usize),
            p.to_le_bytes().repeat(512),
            "cycle {i}"
        );
        assert_eq!(
            read(&g, other, PAGE as usize),
            vec![0; PAGE as usize],
            "cycle {i}"
        );
        if i % 32 == 31 {
            g.post_event_buffers(32, 24);
        }
    }
    let stats = d.ctl(&["stats"]);
    assert_eq!(stats["faults"]["dropped"], 0, "{stats}");
}

#[test]
fn a_guest_that_never_takes_fault_events_cannot_stall_the_device() {
    // No event buffers: the daemon holds each fault report until the
    // guest posts one. The device must go on answering, faulting and
    // resetting regardless.
    let d = Daemon::start(&["--boot-bypass", "off", "--endpoints", "0x28"]);
    let g = Guest::connect(&d.socket, GuestOptions::default());
    let dev = device(&d, &g);
    let t0 = std::time::Instant::now();
    for i in 0..300 {
        assert_eq!(
            run(&dev, OP_FILL, 0, 0x1000 * i, 8, 0),
            Status::Fault,
            "op {i}"
        );
    }
    dev.reset();
    assert_eq!(dev.status(), Status::Idle);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}
