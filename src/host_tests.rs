// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host constraints of passed-through endpoints (`crate::host`) as the
//! guest sees them: PROBE, MAP, ATTACH and `page_size_mask`.

use vm_memory::ByteValued;

use crate::{
    config::{DeviceConfig, ReservedRegion, X86_MSI_WINDOW},
    device::Viommu,
    host::{HostConstraintError, HostConstraints},
    wire::*,
};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const SPEC_FEATURES: u64 = (1 << 7) - 1;

fn send<T: ByteValued>(dev: &mut Viommu, req: &T) -> u8 {
    dev.handle_request(readable_part(req), REQ_TAIL_SIZE)
        .status()
        .expect("request was dropped")
}

fn resv(start: u64, end: u64) -> ReservedRegion {
    ReservedRegion {
        start,
        end,
        subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
    }
}

fn regions(regions: Vec<ReservedRegion>) -> HostConstraints {
    HostConstraints {
        page_size_mask: 0,
        regions,
    }
}

/// The RESV_MEM properties of `endpoint`'s PROBE as (start, end, subtype).
fn probed(dev: &mut Viommu, endpoint: u32) -> Vec<(u64, u64, u8)> {
    let size = dev.config().probe_size as usize;
    let req = ProbeReq::new(endpoint);
    let resp = dev.handle_request(req.as_slice(), size + REQ_TAIL_SIZE);
    assert_eq!(resp.status(), Some(VIRTIO_IOMMU_S_OK));
    let mut buf = vec![0u8; size + REQ_TAIL_SIZE];
    resp.write_into(&mut buf);
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= size {
        let t = u16::from_le_bytes([buf[at], buf[at + 1]]) & 0xfff;
        let len = usize::from(u16::from_le_bytes([buf[at + 2], buf[at + 3]]));
        if t == 0 {
            break;
        }
        if t == VIRTIO_IOMMU_PROBE_T_RESV_MEM {
            let b = &buf[at..at + 24];
            let start = u64::from_le_bytes(b[8..16].try_into().unwrap());
            let end = u64::from_le_bytes(b[16..24].try_into().unwrap());
            out.push((start, end, b[4]));
        }
        at += 4 + len;
    }
    out
}

#[test]
fn host_reserved_regions_are_probed_for_their_endpoint_only() {
    let mut dev = Viommu::new(DeviceConfig::default());
    dev.set_acked_features(SPEC_FEATURES);
    let set = dev
        .set_host_constraints(0x20, &regions(vec![resv(0x1000_0000, 0x1fff_ffff)]))
        .unwrap()
        .to_vec();
    assert_eq!(set, [resv(0x1000_0000, 0x1fff_ffff)]);
    let msi = (
        X86_MSI_WINDOW.start,
        X86_MSI_WINDOW.end,
        VIRTIO_IOMMU_RESV_MEM_T_MSI,
    );
    assert_eq!(
        probed(&mut dev, 0x20),
        [
            msi,
            (0x1000_0000, 0x1fff_ffff, VIRTIO_IOMMU_RESV_MEM_T_RESERVED)
        ]
    );
    assert_eq!(probed(&mut dev, 0x28), [msi]);
    // Given again: replaced, not added; empty: gone.
    dev.set_host_constraints(0x20, &regions(vec![resv(0x3000_0000, 0x3000_ffff)]))
        .unwrap();
    assert_eq!(probed(&mut dev, 0x20).len(), 2);
    dev.set_host_constraints(0x20, &regions(vec![])).unwrap();
    assert_eq!(probed(&mut dev, 0x20), [msi]);
}

#[test]
fn a_map_into_a_host_reserved_region_of_a_domain_endpoint_is_refused() {
    let mut dev = Viommu::new(DeviceConfig::default());
    dev.set_acked_features(SPEC_FEATURES);
    dev.set_host_constraints(0x28, &regions(vec![resv(0x10_0000, 0x10_ffff)]))
        .unwrap();
    assert_eq!(
        send(&mut dev, &AttachReq::new(1, 0x20, 0)),
        VIRTIO_IOMMU_S_OK
    );
    // Endpoint 0x20 has no host region: the IOVA is fine in its domain.
    assert_eq!(
        send(&mut dev, &MapReq::new(1, 0x10_0000, 0x10_0fff, 0, RW)),
        VIRTIO_IOMMU_S_OK
    );
    // A domain with 0x28 in it cannot map there; 0x28 cannot join a
    // domain that does.
    assert_eq!(
        send(&mut dev, &AttachReq::new(1, 0x28, 0)),
        VIRTIO_IOMMU_S_UNSUPP
    );
    assert_eq!(
        send(&mut dev, &AttachReq::new(2, 0x28, 0)),
        VIRTIO_IOMMU_S_OK
    );
    assert_eq!(
        send(&mut dev, &MapReq::new(2, 0x10_f000, 0x11_0fff, 0, RW)),
        VIRTIO_IOMMU_S_INVAL
    );
    assert_eq!(
        send(&mut dev, &MapReq::new(2, 0x11_0000, 0x11_0fff, 0, RW)),
        VIRTIO_IOMMU_S_OK
    );
    // Constraints that the current mappings break are refused.
    assert!(matches!(
        dev.set_host_constraints(0x28, &regions(vec![resv(0x11_0000, 0x11_0000)])),
        Err(HostConstraintError::Mapped {
            endpoint: 0x28,
            domain: 2,
            start: 0x11_0000,
            ..
        })
    ));
    assert_eq!(dev.host_regions(0x28), [resv(0x10_0000, 0x10_ffff)]);
}

#[test]
fn host_page_sizes_narrow_the_mask_until_a_driver_reads_it() {
    let mut dev = Viommu::new(DeviceConfig::default());
    let host_64k = HostConstraints {
        page_size_mask: !0xffff,
        regions: Vec::new(),
    };
    dev.set_host_constraints(0x20, &host_64k).unwrap();
    assert_eq!(dev.config().page_size_mask, !0xffff);
    assert_eq!(dev.config().granule(), 0x10000);
    // The granule is enforced on MAP.
    dev.set_acked_features(SPEC_FEATURES);
    assert_eq!(
        send(&mut dev, &AttachReq::new(1, 0x20, 0)),
        VIRTIO_IOMMU_S_OK
    );
    assert_eq!(
        send(&mut dev, &MapReq::new(1, 0x1000, 0x1fff, 0, RW)),
        VIRTIO_IOMMU_S_RANGE
    );
    // Once read: a host that can map the guest's granule is fine, one
    // that cannot is refused, and the mask does not change.
    dev.set_host_constraints(
        0x28,
        &HostConstraints {
            page_size_mask: !0xfff,
            regions: Vec::new(),
        },
    )
    .unwrap();
    assert_eq!(
        dev.set_host_constraints(
            0x30,
            &HostConstraints {
                page_size_mask: 1 << 21,
                regions: Vec::new(),
            }
        ),
        Err(HostConstraintError::TooLate {
            granule: 0x10000,
            host: 1 << 21
        })
    );
    assert_eq!(dev.config().page_size_mask, !0xffff);
}

#[test]
fn host_constraints_that_cannot_be_kept_are_refused_whole() {
    let mut dev = Viommu::new(DeviceConfig {
        probe_size: 48,
        table_formats: Default::default(),
        ..Default::default()
    });
    assert_eq!(
        dev.set_host_constraints(0x1_0000, &regions(vec![])),
        Err(HostConstraintError::NoSuchEndpoint(0x1_0000))
    );
    assert_eq!(
        dev.set_host_constraints(
            1,
            &HostConstraints {
                page_size_mask: 0xfff,
                regions: Vec::new(),
            }
        ),
        Err(HostConstraintError::NoCommonPageSize {
            device: !0xfff,
            host: 0xfff
        })
    );
    // MSI window (24 bytes) + one region fit 48 bytes, two do not.
    dev.set_host_constraints(1, &regions(vec![resv(0, 0xfff)]))
        .unwrap();
    assert_eq!(
        dev.set_host_constraints(
            1,
            &HostConstraints {
                page_size_mask: 1 << 21,
                regions: vec![resv(0, 0xfff), resv(0x10000, 0x10fff)],
            }
        ),
        Err(HostConstraintError::ProbeTooSmall { size: 48, need: 72 })
    );
    // Nothing of the refused call was applied.
    assert_eq!(dev.config().page_size_mask, !0xfff);
    assert_eq!(dev.host_regions(1), [resv(0, 0xfff)]);
}

#[test]
fn a_config_read_of_the_mask_freezes_it_too() {
    let mut dev = Viommu::new(DeviceConfig::default());
    assert!(!dev.page_sizes_frozen());
    dev.freeze_page_sizes();
    let host_64k = HostConstraints {
        page_size_mask: !0xffff,
        regions: Vec::new(),
    };
    assert_eq!(
        dev.set_host_constraints(0x20, &host_64k),
        Err(HostConstraintError::TooLate {
            granule: 0x1000,
            host: 0x10000
        })
    );
    assert_eq!(dev.config().page_size_mask, !0xfff);
}
