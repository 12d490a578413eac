// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device rules of virtio-iommu 1.3 §5.13, one test per rule, driven
//! through `Viommu::handle_request` with the bytes a driver would send.

use vm_memory::ByteValued;

use crate::{
    config::{DeviceConfig, EndpointSet, X86_MSI_WINDOW},
    device::{DropReason, Response, Viommu},
    error::RequestError,
    translate::{Access, TranslateError},
    wire::*,
};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const ALL_FEATURES: u64 = !0;

fn device() -> Viommu {
    let mut dev = Viommu::new(DeviceConfig::default());
    dev.set_acked_features(ALL_FEATURES);
    dev
}

fn send<T: ByteValued>(dev: &mut Viommu, req: &T) -> u8 {
    dev.handle_request(readable_part(req), REQ_TAIL_SIZE)
        .status()
        .expect("request was dropped")
}

fn attach(dev: &mut Viommu, domain: u32, ep: u32) -> u8 {
    send(dev, &AttachReq::new(domain, ep, 0))
}

fn map(dev: &mut Viommu, domain: u32, start: u64, end: u64, phys: u64) -> u8 {
    send(dev, &MapReq::new(domain, start, end, phys, RW))
}

fn unmap(dev: &mut Viommu, domain: u32, start: u64, end: u64) -> u8 {
    send(dev, &UnmapReq::new(domain, start, end))
}

fn mappings(dev: &Viommu, domain: u32) -> Vec<(u64, u64)> {
    dev.domains()
        .get(&domain)
        .map(|d| {
            d.mappings
                .iter()
                .map(|m| (m.virt_start, m.virt_end))
                .collect()
        })
        .unwrap_or_default()
}

/// A device with byte granularity, so the spec's UNMAP examples (which
/// use small numbers) can be replayed literally.
fn byte_granular_device() -> Viommu {
    let mut dev = Viommu::new(DeviceConfig {
        page_size_mask: !0,
        reserved_regions: Vec::new(),
        ..Default::default()
    });
    dev.set_acked_features(ALL_FEATURES);
    assert_eq!(attach(&mut dev, 1, 8), VIRTIO_IOMMU_S_OK);
    dev
}

// ---- UNMAP: the seven examples of §5.13.6.6 ----

fn unmap_example(setup: &[(u64, u64)], range: (u64, u64), status: u8, left: &[(u64, u64)]) {
    let mut dev = byte_granular_device();
    for &(s, e) in setup {
        assert_eq!(map(&mut dev, 1, s, e, s + 0x1000), VIRTIO_IOMMU_S_OK);
    }
    assert_eq!(unmap(&mut dev, 1, range.0, range.1), status);
    assert_eq!(mappings(&dev, 1), left);
}

#[test]
fn unmap_example_1_empty_range_succeeds_and_removes_nothing() {
    unmap_example(&[], (0, 4), VIRTIO_IOMMU_S_OK, &[]);
}

#[test]
fn unmap_example_2_exact_range_removes_the_mapping() {
    unmap_example(&[(0, 9)], (0, 9), VIRTIO_IOMMU_S_OK, &[]);
}

#[test]
fn unmap_example_3_range_covering_two_mappings_removes_both() {
    unmap_example(&[(0, 4), (5, 9)], (0, 9), VIRTIO_IOMMU_S_OK, &[]);
}

#[test]
fn unmap_example_4_range_splitting_a_mapping_fails_and_removes_nothing() {
    unmap_example(&[(0, 9)], (0, 4), VIRTIO_IOMMU_S_RANGE, &[(0, 9)]);
}

#[test]
fn unmap_example_5_range_covering_one_of_two_mappings_removes_it() {
    unmap_example(&[(0, 4), (5, 9)], (0, 4), VIRTIO_IOMMU_S_OK, &[(5, 9)]);
}

#[test]
fn unmap_example_6_range_extending_past_a_mapping_removes_it() {
    unmap_example(&[(0, 4)], (0, 9), VIRTIO_IOMMU_S_OK, &[]);
}

#[test]
fn unmap_example_7_range_with_a_hole_removes_both_mappings() {
    unmap_example(&[(0, 4), (10, 14)], (0, 14), VIRTIO_IOMMU_S_OK, &[]);
}

#[test]
fn unmap_that_would_split_the_last_of_several_mappings_removes_none_of_them() {
    // QEMU removes the first mappings before noticing the split; we must not.
    unmap_example(
        &[(0, 4), (5, 9), (10, 19)],
        (0, 14),
        VIRTIO_IOMMU_S_RANGE,
        &[(0, 4), (5, 9), (10, 19)],
    );
}

#[test]
fn unmap_starting_inside_a_mapping_fails() {
    unmap_example(
        &[(0, 9), (10, 19)],
        (5, 19),
        VIRTIO_IOMMU_S_RANGE,
        &[(0, 9), (10, 19)],
    );
}

#[test]
fn unmap_of_a_missing_domain_is_noent() {
    let mut dev = device();
    assert_eq!(unmap(&mut dev, 7, 0, 0xfff), VIRTIO_IOMMU_S_NOENT);
}

#[test]
fn unmap_on_a_bypass_domain_is_inval() {
    let mut dev = device();
    let req = AttachReq::new(3, 8, VIRTIO_IOMMU_ATTACH_F_BYPASS);
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_OK);
    assert_eq!(unmap(&mut dev, 3, 0, 0xfff), VIRTIO_IOMMU_S_INVAL);
}

#[test]
fn unmap_with_reserved_bytes_set_is_inval_and_removes_nothing() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0x1000, 0x1fff, 0x5000);
    let mut req = UnmapReq::new(1, 0, 0xffff);
    req.reserved = [1, 0, 0, 0];
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(mappings(&dev, 1), [(0x1000, 0x1fff)]);
}

#[test]
fn unmap_of_the_whole_address_space_removes_everything() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0, 0xfedf_ffff, 0);
    map(&mut dev, 1, 0xfef0_0000, (1 << 48) - 1, 0xfef0_0000);
    assert_eq!(unmap(&mut dev, 1, 0, u64::MAX), VIRTIO_IOMMU_S_OK);
    assert!(mappings(&dev, 1).is_empty());
}

// ---- ATTACH ----

#[test]
fn attach_with_reserved_bytes_set_is_inval() {
    let mut dev = device();
    let mut req = AttachReq::new(1, 8, 0);
    req.reserved = [0, 0, 1, 0];
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(dev.endpoint_domain(8), None);
}

#[test]
fn attach_with_unknown_flags_is_inval() {
    let mut dev = device();
    assert_eq!(
        send(&mut dev, &AttachReq::new(1, 8, 1 << 5)),
        VIRTIO_IOMMU_S_INVAL
    );
}

#[test]
fn attach_bypass_flag_without_bypass_config_negotiated_is_inval() {
    let mut dev = Viommu::new(DeviceConfig::default());
    dev.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    let req = AttachReq::new(1, 8, VIRTIO_IOMMU_ATTACH_F_BYPASS);
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_INVAL);
}

#[test]
fn attach_of_an_unknown_endpoint_is_noent() {
    let mut dev = Viommu::new(DeviceConfig {
        endpoints: "0x20-0x27".parse::<EndpointSet>().unwrap(),
        ..Default::default()
    });
    assert_eq!(attach(&mut dev, 1, 0x28), VIRTIO_IOMMU_S_NOENT);
    assert_eq!(attach(&mut dev, 1, 0x27), VIRTIO_IOMMU_S_OK);
}

#[test]
fn attach_outside_the_domain_range_is_range() {
    let mut dev = Viommu::new(DeviceConfig {
        domain_range: (1, 10),
        ..Default::default()
    });
    assert_eq!(attach(&mut dev, 0, 8), VIRTIO_IOMMU_S_RANGE);
    assert_eq!(attach(&mut dev, 11, 8), VIRTIO_IOMMU_S_RANGE);
    assert_eq!(attach(&mut dev, 10, 8), VIRTIO_IOMMU_S_OK);
}

#[test]
fn attach_creates_the_domain_and_several_endpoints_may_share_it() {
    let mut dev = device();
    assert_eq!(attach(&mut dev, 1, 8), VIRTIO_IOMMU_S_OK);
    assert_eq!(attach(&mut dev, 1, 9), VIRTIO_IOMMU_S_OK);
    assert_eq!(dev.domains()[&1].endpoints, [8, 9]);
}

#[test]
fn attach_of_an_attached_endpoint_moves_it() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    attach(&mut dev, 1, 9);
    map(&mut dev, 1, 0x1000, 0x1fff, 0x1000);
    assert_eq!(attach(&mut dev, 2, 8), VIRTIO_IOMMU_S_OK);
    assert_eq!(dev.endpoint_domain(8), Some(2));
    assert_eq!(dev.domains()[&1].endpoints, [9]);
    // The old domain keeps its mappings while it still has an endpoint.
    assert_eq!(mappings(&dev, 1), [(0x1000, 0x1fff)]);
}

#[test]
fn moving_the_last_endpoint_destroys_the_old_domain() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0x1000, 0x1fff, 0x1000);
    attach(&mut dev, 2, 8);
    assert!(!dev.domains().contains_key(&1));
}

#[test]
fn attach_to_the_same_domain_again_is_ok_and_changes_nothing() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0x1000, 0x1fff, 0x1000);
    assert_eq!(attach(&mut dev, 1, 8), VIRTIO_IOMMU_S_OK);
    assert_eq!(dev.domains()[&1].endpoints, [8]);
    assert_eq!(mappings(&dev, 1), [(0x1000, 0x1fff)]);
}

#[test]
fn attach_with_a_bypass_flag_that_contradicts_the_domain_is_inval() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    let req = AttachReq::new(1, 9, VIRTIO_IOMMU_ATTACH_F_BYPASS);
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(dev.endpoint_domain(9), None);
}

#[test]
fn attach_beyond_the_domain_cap_is_nomem_and_keeps_the_old_attachment() {
    let mut dev = Viommu::new(DeviceConfig {
        max_domains: 2,
        ..Default::default()
    });
    attach(&mut dev, 1, 8);
    attach(&mut dev, 2, 9);
    assert_eq!(attach(&mut dev, 3, 10), VIRTIO_IOMMU_S_NOMEM);
    // Moving endpoint 8 (the last of domain 1) to a new domain frees a slot.
    assert_eq!(attach(&mut dev, 3, 8), VIRTIO_IOMMU_S_OK);
    // Endpoint 10 joining domain 2 needs no new domain.
    assert_eq!(attach(&mut dev, 2, 10), VIRTIO_IOMMU_S_OK);
    attach(&mut dev, 2, 11);
    assert_eq!(attach(&mut dev, 4, 11), VIRTIO_IOMMU_S_NOMEM);
    assert_eq!(dev.endpoint_domain(11), Some(2));
}

// ---- DETACH ----

#[test]
fn detach_of_the_last_endpoint_destroys_the_domain_and_its_mappings() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0x1000, 0x1fff, 0x1000);
    assert_eq!(send(&mut dev, &DetachReq::new(1, 8)), VIRTIO_IOMMU_S_OK);
    assert!(dev.domains().is_empty());
    // The domain ID is free again: a new domain 1 starts empty.
    attach(&mut dev, 1, 8);
    assert!(mappings(&dev, 1).is_empty());
}

#[test]
fn detach_ignores_the_reserved_bytes() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    let mut req = DetachReq::new(1, 8);
    req.reserved = [0xff; 8];
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_OK);
}

#[test]
fn detach_of_an_unknown_endpoint_is_noent() {
    let mut dev = Viommu::new(DeviceConfig {
        endpoints: "8".parse::<EndpointSet>().unwrap(),
        ..Default::default()
    });
    assert_eq!(send(&mut dev, &DetachReq::new(1, 9)), VIRTIO_IOMMU_S_NOENT);
}

#[test]
fn detach_from_a_domain_the_endpoint_is_not_in_is_inval() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    attach(&mut dev, 2, 9);
    assert_eq!(send(&mut dev, &DetachReq::new(2, 8)), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(send(&mut dev, &DetachReq::new(5, 8)), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(dev.endpoint_domain(8), Some(1));
}

#[test]
fn detached_endpoint_can_no_longer_reach_the_domain_mappings() {
    let mut dev = device();
    dev.write_bypass(0).unwrap();
    attach(&mut dev, 1, 8);
    attach(&mut dev, 1, 9);
    map(&mut dev, 1, 0x1000, 0x1fff, 0x8000);
    assert!(dev.translate(8, 0x1000, Access::Read).is_ok());
    send(&mut dev, &DetachReq::new(1, 8));
    assert!(
        matches!(dev.translate(8, 0x1000, Access::Read), Err(TranslateError::Fault(f))
        if f.reason == VIRTIO_IOMMU_FAULT_R_DOMAIN)
    );
    assert!(dev.translate(9, 0x1000, Access::Read).is_ok());
}

// ---- MAP ----

#[test]
fn map_translates_linearly_from_phys_start() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    assert_eq!(
        map(&mut dev, 1, 0x10000, 0x1ffff, 0x80000),
        VIRTIO_IOMMU_S_OK
    );
    let t = dev.translate(8, 0x12345, Access::Write).unwrap();
    assert_eq!(t.gpa(0x12345), 0x82345);
    assert_eq!(t.iova_end, 0x1ffff);
}

#[test]
fn map_to_a_missing_domain_is_noent() {
    let mut dev = device();
    assert_eq!(map(&mut dev, 1, 0, 0xfff, 0), VIRTIO_IOMMU_S_NOENT);
}

#[test]
fn map_with_unknown_flags_is_inval() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    assert_eq!(
        send(&mut dev, &MapReq::new(1, 0, 0xfff, 0, 1 << 3)),
        VIRTIO_IOMMU_S_INVAL
    );
}

#[test]
fn map_mmio_flag_requires_the_mmio_feature() {
    let mut dev = Viommu::new(DeviceConfig::default());
    dev.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    attach(&mut dev, 1, 8);
    let req = MapReq::new(1, 0, 0xfff, 0, VIRTIO_IOMMU_MAP_F_MMIO | RW);
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_INVAL);
    dev.set_acked_features(ALL_FEATURES);
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_OK);
}

#[test]
fn map_on_a_bypass_domain_is_inval() {
    let mut dev = device();
    send(
        &mut dev,
        &AttachReq::new(1, 8, VIRTIO_IOMMU_ATTACH_F_BYPASS),
    );
    assert_eq!(map(&mut dev, 1, 0, 0xfff, 0), VIRTIO_IOMMU_S_INVAL);
}

#[test]
fn map_misaligned_to_the_granule_is_range() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    assert_eq!(map(&mut dev, 1, 0x800, 0x17ff, 0), VIRTIO_IOMMU_S_RANGE);
    assert_eq!(
        map(&mut dev, 1, 0x1000, 0x1fff, 0x800),
        VIRTIO_IOMMU_S_RANGE
    );
    assert_eq!(
        map(&mut dev, 1, 0x1000, 0x1ffe, 0x1000),
        VIRTIO_IOMMU_S_RANGE
    );
    assert!(mappings(&dev, 1).is_empty());
}

#[test]
fn map_overlapping_an_existing_mapping_is_inval() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0x2000, 0x3fff, 0);
    assert_eq!(map(&mut dev, 1, 0x3000, 0x4fff, 0), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(map(&mut dev, 1, 0x1000, 0x2fff, 0), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(map(&mut dev, 1, 0x0, 0xffff, 0), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(map(&mut dev, 1, 0x4000, 0x4fff, 0), VIRTIO_IOMMU_S_OK);
}

#[test]
fn map_outside_the_input_range_is_range() {
    let mut dev = Viommu::new(DeviceConfig {
        input_range: (0x1000, 0xffff_ffff),
        ..Default::default()
    });
    attach(&mut dev, 1, 8);
    assert_eq!(map(&mut dev, 1, 0, 0xfff, 0), VIRTIO_IOMMU_S_RANGE);
    assert_eq!(
        map(&mut dev, 1, 0xffff_f000, 0x1_0000_0fff, 0),
        VIRTIO_IOMMU_S_RANGE
    );
    assert_eq!(
        map(&mut dev, 1, 0xffff_f000, 0xffff_ffff, 0),
        VIRTIO_IOMMU_S_OK
    );
}

#[test]
fn map_with_virt_end_below_virt_start_is_inval() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    assert_eq!(map(&mut dev, 1, 0x2000, 0xfff, 0), VIRTIO_IOMMU_S_INVAL);
}

#[test]
fn map_whose_physical_range_wraps_is_range() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    assert_eq!(
        map(&mut dev, 1, 0, 0x1fff, u64::MAX - 0xfff),
        VIRTIO_IOMMU_S_RANGE
    );
}

#[test]
fn map_overlapping_the_msi_window_is_inval() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    assert_eq!(
        map(&mut dev, 1, 0xfee0_0000, 0xfee0_0fff, 0),
        VIRTIO_IOMMU_S_INVAL
    );
    assert_eq!(map(&mut dev, 1, 0, 0xfedf_ffff, 0), VIRTIO_IOMMU_S_OK);
}

#[test]
fn map_of_guest_physical_ranges_beyond_ram_is_accepted() {
    // The Linux identity fallback maps the whole aperture; access to non-RAM
    // addresses is decided at translation time, not at MAP time.
    let mut dev = device();
    attach(&mut dev, 1, 8);
    assert_eq!(
        map(&mut dev, 1, 0xfef0_0000, (1 << 48) - 1, 0xfef0_0000),
        VIRTIO_IOMMU_S_OK
    );
}

#[test]
fn map_beyond_the_mapping_cap_is_nomem() {
    let mut dev = Viommu::new(DeviceConfig {
        max_mappings_per_domain: 2,
        ..Default::default()
    });
    attach(&mut dev, 1, 8);
    assert_eq!(map(&mut dev, 1, 0x1000, 0x1fff, 0), VIRTIO_IOMMU_S_OK);
    assert_eq!(map(&mut dev, 1, 0x2000, 0x2fff, 0), VIRTIO_IOMMU_S_OK);
    assert_eq!(map(&mut dev, 1, 0x3000, 0x3fff, 0), VIRTIO_IOMMU_S_NOMEM);
    assert_eq!(unmap(&mut dev, 1, 0x1000, 0x1fff), VIRTIO_IOMMU_S_OK);
    assert_eq!(map(&mut dev, 1, 0x3000, 0x3fff, 0), VIRTIO_IOMMU_S_OK);
}

#[test]
fn write_is_refused_on_a_read_only_mapping() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    send(
        &mut dev,
        &MapReq::new(1, 0x1000, 0x1fff, 0x9000, VIRTIO_IOMMU_MAP_F_READ),
    );
    assert!(dev.translate(8, 0x1000, Access::Read).is_ok());
    let Err(TranslateError::Fault(f)) = dev.translate(8, 0x1000, Access::Write) else {
        panic!("write allowed on a read-only mapping");
    };
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(
        f.flags,
        VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
}

// ---- PROBE ----

fn probe(dev: &mut Viommu, ep: u32, writable: usize) -> (Option<u8>, Vec<u8>) {
    let req = ProbeReq::new(ep);
    let resp = dev.handle_request(req.as_slice(), writable);
    let mut buf = vec![0u8; writable];
    resp.write_into(&mut buf);
    (resp.status(), buf)
}

#[test]
fn probe_reports_the_x86_msi_window_as_resv_mem() {
    let mut dev = device();
    let (status, buf) = probe(&mut dev, 0x20, 512 + 4);
    assert_eq!(status, Some(VIRTIO_IOMMU_S_OK));
    let mut prop = ProbeResvMem::default();
    prop.as_mut_slice().copy_from_slice(&buf[..24]);
    assert_eq!(
        prop.head.prop_type.to_native(),
        VIRTIO_IOMMU_PROBE_T_RESV_MEM
    );
    assert_eq!(prop.head.length.to_native(), 20);
    assert_eq!(prop.subtype, VIRTIO_IOMMU_RESV_MEM_T_MSI);
    assert_eq!(prop.start.to_native(), X86_MSI_WINDOW.start);
    assert_eq!(prop.end.to_native(), X86_MSI_WINDOW.end);
    // The rest of the properties area is zero: the next type is NONE.
    assert!(buf[24..512].iter().all(|&b| b == 0));
    assert_eq!(buf[512], VIRTIO_IOMMU_S_OK);
}

#[test]
fn probe_with_a_short_properties_area_is_inval_and_writes_no_property() {
    let mut dev = device();
    let (status, buf) = probe(&mut dev, 0x20, 100 + 4);
    assert_eq!(status, Some(VIRTIO_IOMMU_S_INVAL));
    assert!(buf[..100].iter().all(|&b| b == 0));
    assert_eq!(buf[100], VIRTIO_IOMMU_S_INVAL);
}

#[test]
fn probe_of_an_unknown_endpoint_is_noent() {
    let mut dev = Viommu::new(DeviceConfig {
        endpoints: "5".parse::<EndpointSet>().unwrap(),
        ..Default::default()
    });
    assert_eq!(probe(&mut dev, 6, 516).0, Some(VIRTIO_IOMMU_S_NOENT));
}

#[test]
fn probe_without_the_probe_feature_is_an_unknown_request() {
    let mut dev = Viommu::new(DeviceConfig {
        probe_size: 0,
        ..Default::default()
    });
    let req = ProbeReq::new(5);
    assert_eq!(
        dev.handle_request(req.as_slice(), 4),
        Response::Drop(DropReason::UnknownType(VIRTIO_IOMMU_T_PROBE))
    );
}

// ---- Framing ----

#[test]
fn unknown_request_type_is_dropped_with_used_length_zero() {
    let mut dev = device();
    let resp = dev.handle_request(&[42, 0, 0, 0, 1, 2, 3, 4], 4);
    assert_eq!(resp, Response::Drop(DropReason::UnknownType(42)));
    let mut buf = [0xaa; 4];
    assert_eq!(resp.write_into(&mut buf), 0);
    assert_eq!(buf, [0xaa; 4]);
}

#[test]
fn request_too_short_to_parse_is_dropped() {
    let mut dev = device();
    let req = MapReq::new(1, 0, 0xfff, 0, RW);
    let bytes = &readable_part(&req)[..20];
    assert!(matches!(
        dev.handle_request(bytes, 4),
        Response::Drop(DropReason::Truncated { .. })
    ));
    assert!(matches!(dev.handle_request(&[], 4), Response::Drop(_)));
}

#[test]
fn request_without_room_for_the_tail_is_dropped() {
    let mut dev = device();
    let req = AttachReq::new(1, 8, 0);
    assert!(matches!(
        dev.handle_request(readable_part(&req), 3),
        Response::Drop(DropReason::NoTail { writable: 3 })
    ));
    assert_eq!(dev.endpoint_domain(8), None);
}

#[test]
fn head_reserved_bytes_are_ignored() {
    let mut dev = device();
    let mut req = AttachReq::new(1, 8, 0);
    req.head.reserved = [1, 2, 3];
    assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_OK);
}

#[test]
fn status_goes_in_the_last_four_bytes_of_the_writable_part() {
    let mut dev = device();
    let req = AttachReq::new(1, 8, 0);
    let resp = dev.handle_request(readable_part(&req), 12);
    let mut buf = [0xaa; 12];
    assert_eq!(resp.write_into(&mut buf), 12);
    assert_eq!(&buf[8..], &[VIRTIO_IOMMU_S_OK, 0, 0, 0]);
}

// ---- Bypass ----

#[test]
fn boot_bypass_lets_unattached_endpoints_through_even_before_negotiation() {
    let dev = Viommu::new(DeviceConfig::default());
    let t = dev.translate(8, 0x1234, Access::Write).unwrap();
    assert!(t.bypass);
    assert_eq!(t.gpa(0x1234), 0x1234);
}

#[test]
fn unattached_endpoint_faults_when_bypass_is_off() {
    let dev = Viommu::new(DeviceConfig {
        boot_bypass: false,
        ..Default::default()
    });
    assert!(
        matches!(dev.translate(8, 0, Access::Read), Err(TranslateError::Fault(f))
        if f.reason == VIRTIO_IOMMU_FAULT_R_DOMAIN)
    );
}

#[test]
fn without_bypass_config_unattached_endpoints_are_blocked() {
    let dev = Viommu::new(DeviceConfig {
        bypass_config: false,
        ..Default::default()
    });
    assert_eq!(dev.config_space().bypass, 0);
    assert!(dev.translate(8, 0, Access::Read).is_err());
}

#[test]
fn bypass_domain_translates_identically() {
    let mut dev = device();
    dev.write_bypass(0).unwrap();
    send(
        &mut dev,
        &AttachReq::new(1, 8, VIRTIO_IOMMU_ATTACH_F_BYPASS),
    );
    let t = dev.translate(8, 0xdead_0000, Access::Write).unwrap();
    assert!(t.bypass && t.gpa(0xdead_0000) == 0xdead_0000);
}

#[test]
fn driver_may_write_only_zero_or_one_to_bypass() {
    let mut dev = device();
    assert!(dev.write_bypass(2).is_err());
    assert!(dev.bypass());
    dev.write_bypass(0).unwrap();
    assert!(!dev.bypass());
    assert_eq!(dev.config_space().bypass, 0);
}

#[test]
fn bypass_write_without_the_feature_negotiated_is_ignored() {
    let mut dev = Viommu::new(DeviceConfig::default());
    assert!(dev.write_bypass(0).is_err());
    assert!(dev.bypass());
}

#[test]
fn device_reset_detaches_everything_but_keeps_bypass() {
    let mut dev = device();
    dev.write_bypass(0).unwrap();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0, 0xfff, 0);
    dev.reset();
    assert!(dev.domains().is_empty());
    assert_eq!(dev.endpoint_domain(8), None);
    assert!(!dev.bypass());
}

// ---- Errors ----

#[test]
fn every_refusal_maps_to_the_status_the_spec_names() {
    use RequestError::*;
    let cases = [
        (ReservedNotZero, VIRTIO_IOMMU_S_INVAL),
        (NoSuchEndpoint(1), VIRTIO_IOMMU_S_NOENT),
        (NoSuchDomain(1), VIRTIO_IOMMU_S_NOENT),
        (WouldSplit { start: 0, end: 1 }, VIRTIO_IOMMU_S_RANGE),
        (Misaligned(1), VIRTIO_IOMMU_S_RANGE),
        (Overlap { start: 0, end: 1 }, VIRTIO_IOMMU_S_INVAL),
        (TooManyDomains(1), VIRTIO_IOMMU_S_NOMEM),
        (
            TooManyMappings {
                domain: 1,
                limit: 1,
            },
            VIRTIO_IOMMU_S_NOMEM,
        ),
    ];
    for (err, status) in cases {
        assert_eq!(err.status(), status, "{err}");
    }
}

#[test]
fn stats_count_requests_by_type_and_status() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0, 0xfff, 0);
    map(&mut dev, 1, 0, 0xfff, 0);
    dev.handle_request(&[99, 0, 0, 0], 4);
    let s = dev.stats();
    assert_eq!(s.by_type[usize::from(VIRTIO_IOMMU_T_MAP)], 2);
    assert_eq!(s.by_status[usize::from(VIRTIO_IOMMU_S_INVAL)], 1);
    assert_eq!(s.dropped, 1);
}

// ---- Translation of ranges (control plane) ----

#[test]
fn range_translation_spans_adjacent_mappings_and_stops_at_a_hole() {
    let mut dev = device();
    attach(&mut dev, 1, 8);
    map(&mut dev, 1, 0x1000, 0x1fff, 0x10_0000);
    map(&mut dev, 1, 0x2000, 0x3fff, 0x50_0000);
    let mut out = Vec::new();
    dev.translate_range(8, 0x1800, 0x2000, Access::Read, &mut out)
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[0].iova_start, out[0].iova_end, out[0].gpa_start),
        (0x1000, 0x1fff, 0x10_0000)
    );
    assert_eq!(
        (out[1].iova_start, out[1].iova_end, out[1].gpa_start),
        (0x2000, 0x3fff, 0x50_0000)
    );
    out.clear();
    let err = dev
        .translate_range(8, 0x3000, 0x2000, Access::Read, &mut out)
        .unwrap_err();
    assert!(matches!(err, TranslateError::Fault(f) if f.address == 0x4000));
}

// ---- PASID_ALLOC / PASID_FREE (project extension, docs/extension-spec.md) ----

mod pasid_requests {
    use super::*;
    use crate::{
        device::PasidOp,
        pasid::{AllocatorConfig, MemorySource, PasidAllocator, SetId},
    };

    /// The device and, standing in for the daemon's PASID service, the
    /// real in-memory allocator.
    struct Dev {
        dev: Viommu,
        alloc: PasidAllocator,
        set: SetId,
    }

    impl Dev {
        /// Handles one request as the daemon does (PASID operations run
        /// on the allocator, then complete in the model) and returns the
        /// device-writable bytes, all zero if nothing was written.
        fn handle(&mut self, request: &[u8], writable: usize) -> Vec<u8> {
            let mut out = vec![0u8; writable];
            let op = match self.dev.handle_request(request, writable) {
                Response::Pasid(op) => op,
                other => {
                    other.write_into(&mut out);
                    return out;
                }
            };
            let result = match op {
                PasidOp::Alloc { min, max } => self.alloc.alloc(self.set, min..=max),
                PasidOp::Free { pasid } => self.alloc.free(self.set, pasid).map(|()| 0),
            };
            self.dev.complete_pasid(op, result).write_into(&mut out);
            out
        }

        /// The status a request completes with.
        fn status(&mut self, request: &[u8], writable: usize) -> u8 {
            self.handle(request, writable)[writable - REQ_TAIL_SIZE]
        }
    }

    fn device_with_pasids(quota: u32) -> Dev {
        let source = MemorySource::new(20, 64).unwrap();
        let mut alloc = PasidAllocator::new(
            AllocatorConfig {
                bits: 20,
                lease_block: 64,
            },
            Box::new(source),
        )
        .unwrap();
        let set = alloc.create_set(quota).unwrap();
        let mut dev = Viommu::new(DeviceConfig {
            pasid_alloc: true,
            ..Default::default()
        });
        dev.set_acked_features(ALL_FEATURES);
        Dev { dev, alloc, set }
    }

    fn send(dev: &mut Dev, req: &impl ByteValued) -> u8 {
        dev.status(readable_part(req), REQ_TAIL_SIZE)
    }

    fn alloc(dev: &mut Dev, min: u32, max: u32) -> (u8, u32) {
        let req = PasidAllocReq::new(min, max);
        let out = dev.handle(req.readable(), PASID_ALLOC_WRITABLE);
        (out[8], u32::from_le_bytes(out[..4].try_into().unwrap()))
    }

    fn free(dev: &mut Dev, pasid: u32) -> u8 {
        send(dev, &PasidFreeReq::new(pasid))
    }

    #[test]
    fn pasid_alloc_is_offered_only_when_configured() {
        let plain = device();
        assert_eq!(
            plain.device_features() & (1 << VIRTIO_IOMMU_F_PASID_ALLOC),
            0
        );
        let mut plain = plain;
        let req = PasidAllocReq::new(1, 100);
        assert_eq!(
            plain.handle_request(req.readable(), 12),
            Response::Drop(DropReason::UnknownType(VIRTIO_IOMMU_T_PASID_ALLOC))
        );
        let dev = device_with_pasids(10);
        assert_ne!(
            dev.dev.device_features() & (1 << VIRTIO_IOMMU_F_PASID_ALLOC),
            0
        );
    }

    #[test]
    fn pasid_alloc_returns_a_pasid_inside_the_requested_range() {
        let mut dev = device_with_pasids(10);
        let (status, p) = alloc(&mut dev, 100, 200);
        assert_eq!(status, VIRTIO_IOMMU_S_OK);
        assert!((100..=200).contains(&p), "{p}");
        let (_, q) = alloc(&mut dev, 100, 200);
        assert_ne!(p, q);
    }

    #[test]
    fn pasid_zero_is_never_allocated() {
        let mut dev = device_with_pasids(10);
        assert_eq!(alloc(&mut dev, 0, 0).0, VIRTIO_IOMMU_S_RANGE);
        let (status, p) = alloc(&mut dev, 0, 5);
        assert_eq!(
            status, VIRTIO_IOMMU_S_RANGE,
            "range with 0 accepted, got {p}"
        );
    }

    #[test]
    fn pasid_alloc_beyond_the_quota_is_nomem() {
        let mut dev = device_with_pasids(2);
        assert_eq!(alloc(&mut dev, 1, 1000).0, VIRTIO_IOMMU_S_OK);
        assert_eq!(alloc(&mut dev, 1, 1000).0, VIRTIO_IOMMU_S_OK);
        assert_eq!(alloc(&mut dev, 1, 1000).0, VIRTIO_IOMMU_S_NOMEM);
    }

    #[test]
    fn quota_zero_disables_pasid_alloc() {
        let mut dev = device_with_pasids(0);
        assert_eq!(alloc(&mut dev, 1, 1000).0, VIRTIO_IOMMU_S_NOMEM);
    }

    #[test]
    fn pasid_alloc_with_an_inverted_or_too_wide_range_is_range() {
        let mut dev = device_with_pasids(10);
        assert_eq!(alloc(&mut dev, 50, 10).0, VIRTIO_IOMMU_S_RANGE);
        assert_eq!(alloc(&mut dev, 1, 1 << 20).0, VIRTIO_IOMMU_S_RANGE);
    }

    #[test]
    fn pasid_free_of_a_pasid_this_vm_does_not_own_is_noent() {
        let mut dev = device_with_pasids(10);
        assert_eq!(free(&mut dev, 77), VIRTIO_IOMMU_S_NOENT);
        let (_, p) = alloc(&mut dev, 1, 1000);
        assert_eq!(free(&mut dev, p), VIRTIO_IOMMU_S_OK);
        assert_ne!(free(&mut dev, p), VIRTIO_IOMMU_S_OK, "freed twice");
    }

    #[test]
    fn pasid_requests_with_flags_or_reserved_bytes_set_are_inval() {
        let mut dev = device_with_pasids(10);
        let mut req = PasidAllocReq::new(1, 10);
        req.flags = 1.into();
        assert_eq!(
            dev.status(req.readable(), PASID_ALLOC_WRITABLE),
            VIRTIO_IOMMU_S_INVAL
        );
        let mut f = PasidFreeReq::new(1);
        f.reserved[3] = 1;
        assert_eq!(send(&mut dev, &f), VIRTIO_IOMMU_S_INVAL);
    }

    #[test]
    fn pasid_alloc_without_room_for_the_pasid_is_inval_and_allocates_nothing() {
        let mut dev = device_with_pasids(1);
        let req = PasidAllocReq::new(1, 10);
        assert_eq!(dev.status(req.readable(), 4), VIRTIO_IOMMU_S_INVAL);
        assert_eq!(
            alloc(&mut dev, 1, 10).0,
            VIRTIO_IOMMU_S_OK,
            "the quota was consumed"
        );
    }
}

// ---- Hostile guests ----

mod hostile {
    use proptest::prelude::*;

    use super::*;

    fn request() -> impl Strategy<Value = (Vec<u8>, usize)> {
        (
            0u8..13,
            prop::collection::vec(any::<u8>(), 0..96),
            0usize..700,
        )
            .prop_map(|(t, mut body, writable)| {
                // Small domain and endpoint numbers so requests collide.
                if body.len() >= 8 {
                    body[0] &= 3;
                    body[1..4].fill(0);
                    body[4] &= 7;
                    body[5..8].fill(0);
                }
                let mut req = vec![t, 0, 0, 0];
                req.extend(body);
                (req, writable)
            })
    }

    proptest! {
        /// Whatever the guest sends, the device answers without panicking,
        /// writes a status only when the writable part holds it, and keeps
        /// its invariants: every attached endpoint's domain exists and
        /// lists it, no domain is empty, mappings never overlap.
        #[test]
        fn arbitrary_requests_never_break_the_device(reqs in prop::collection::vec(request(), 1..200)) {
            let mut dev = Viommu::new(DeviceConfig {
                max_domains: 4,
                max_mappings_per_domain: 16,
                ..Default::default()
            });
            dev.set_acked_features(ALL_FEATURES);
            for (req, writable) in &reqs {
                let resp = dev.handle_request(req, *writable);
                let mut buf = vec![0u8; *writable];
                let used = resp.write_into(&mut buf);
                prop_assert!(used == 0 || used as usize == *writable);
                prop_assert!(used == 0 || *writable >= 4);
            }
            for (ep, d) in dev.attached_endpoints() {
                let domain = dev.domains().get(&d);
                prop_assert!(domain.is_some_and(|dom| dom.endpoints.contains(&ep)));
            }
            prop_assert!(dev.domains().len() <= 4);
            for d in dev.domains().values() {
                prop_assert!(!d.endpoints.is_empty());
                prop_assert!(d.mappings.len() <= 16);
                let m: Vec<_> = d.mappings.iter().collect();
                for w in m.windows(2) {
                    prop_assert!(w[0].virt_end < w[1].virt_start);
                }
            }
        }
    }
}
