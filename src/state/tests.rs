// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state format: round trips, every refusal, and property tests that
//! random states survive encode/decode and that no damage to a blob can
//! panic the decoder or get a state past it that the device could not
//! have reached.

use proptest::prelude::*;
use vm_memory::ByteValued;

use super::*;
use crate::{
    config::{EndpointSet, X86_MSI_WINDOW},
    device::Viommu,
    translate::{Access, Fault},
    StateChange,
};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

/// A small device, so random requests collide and reach the caps.
fn config() -> DeviceConfig {
    DeviceConfig {
        max_domains: 4,
        max_mappings_per_domain: 16,
        endpoints: EndpointSet::from_ranges(vec![0..=7]),
        reserved_regions: vec![X86_MSI_WINDOW],
        pasid_alloc: true,
        ..Default::default()
    }
}

fn device() -> Viommu {
    let mut dev = Viommu::new(config());
    dev.set_acked_features(!0);
    dev
}

fn send<T: vm_memory::ByteValued>(dev: &mut Viommu, req: &T) -> u8 {
    dev.handle_request(readable_part(req), REQ_TAIL_SIZE)
        .status()
        .expect("request dropped")
}

fn fault(endpoint: u32, address: u64) -> Vec<u8> {
    Fault::new(
        VIRTIO_IOMMU_FAULT_R_MAPPING,
        endpoint,
        address,
        Access::Write,
    )
    .record_bytes()
    .to_vec()
}

/// A device with two paging domains (one shared by two endpoints), a
/// bypass domain and `bypass` cleared.
fn busy_device() -> Viommu {
    let mut dev = device();
    for (domain, ep, flags) in [(1, 0, 0), (1, 3, 0), (2, 5, 0), (7, 6, 1)] {
        assert_eq!(
            send(&mut dev, &AttachReq::new(domain, ep, flags)),
            VIRTIO_IOMMU_S_OK
        );
    }
    for (domain, start, end) in [
        (1, 0x1000, 0x1fff),
        (1, 0x10_0000, 0x1f_ffff),
        (2, 0, 0xfff),
    ] {
        let req = MapReq::new(domain, start, end, start + 0x8000_0000, RW);
        assert_eq!(send(&mut dev, &req), VIRTIO_IOMMU_S_OK);
    }
    dev.write_bypass(0).unwrap();
    dev
}

fn busy_state(dev: &Viommu) -> DeviceState {
    DeviceState {
        guest_pasids: vec![9, 1, 300],
        pending_events: vec![fault(3, 0x5000), fault(5, 0x6000)],
        ..dev.device_state()
    }
}

type PlainDomain = (
    u32,
    bool,
    Vec<u32>,
    Vec<Mapping>,
    Option<TableSpec>,
    Vec<(u32, u32)>,
);

fn plain<'a>(domains: impl Iterator<Item = (&'a u32, &'a Domain)>) -> Vec<PlainDomain> {
    let mut v: Vec<PlainDomain> = domains
        .map(|(&id, d)| {
            (
                id,
                d.bypass,
                d.endpoints.clone(),
                d.mappings.iter().collect(),
                d.table,
                d.bound.clone(),
            )
        })
        .collect();
    v.sort_by_key(|d| d.0);
    v
}

/// Recomputes a blob's checksum after a test changed its bytes, so the
/// change reaches the checks behind the checksum.
fn reseal(blob: &mut [u8]) {
    if blob.len() >= HEADER_SIZE {
        let crc = checksum(blob);
        blob[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// [`reseal`], with the header's size made to match a blob that was cut
/// or grown.
fn reseal_size(blob: &mut [u8]) {
    if blob.len() >= HEADER_SIZE {
        let size = blob.len() as u64;
        blob[16..24].copy_from_slice(&size.to_le_bytes());
        reseal(blob);
    }
}

/// `blob` with one more section at its end.
fn with_section(blob: &[u8], kind: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let n = le32_at(blob, 12) as usize;
    let table_end = HEADER_SIZE + n * ENTRY_SIZE;
    let mut out = blob[..table_end].to_vec();
    for i in 0..n {
        let at = HEADER_SIZE + i * ENTRY_SIZE + 8;
        let offset = le64_at(&out, at) + ENTRY_SIZE as u64;
        out[at..at + 8].copy_from_slice(&offset.to_le_bytes());
    }
    put32(&mut out, kind);
    put32(&mut out, flags);
    put64(&mut out, (blob.len() + ENTRY_SIZE) as u64);
    put64(&mut out, body.len() as u64);
    out.extend_from_slice(&blob[table_end..]);
    out.extend_from_slice(body);
    out[12..16].copy_from_slice(&((n + 1) as u32).to_le_bytes());
    let size = out.len() as u64;
    out[16..24].copy_from_slice(&size.to_le_bytes());
    reseal(&mut out);
    out
}

/// The offset of section `kind`'s body in `blob`.
fn section_at(blob: &[u8], kind: u32) -> usize {
    let n = le32_at(blob, 12) as usize;
    (0..n)
        .map(|i| HEADER_SIZE + i * ENTRY_SIZE)
        .find(|&e| le32_at(blob, e) == kind)
        .map(|e| le64_at(blob, e + 8) as usize)
        .expect("no such section")
}

/// Everything `decode` promises of a state, checked on the device it was
/// restored into.
fn check_invariants(dev: &Viommu) -> Result<(), String> {
    let config = dev.config();
    let acked = dev.acked_features();
    if acked & !config.device_features() != 0 {
        return Err(format!("acked {acked:#x} beyond the offer"));
    }
    if dev.bypass() && !config.bypass_config {
        return Err("bypass without BYPASS_CONFIG".into());
    }
    if dev.domains().len() > config.max_domains {
        return Err("too many domains".into());
    }
    let mut attached = 0;
    for (&id, d) in dev.domains() {
        if id < config.domain_range.0 || id > config.domain_range.1 {
            return Err(format!("domain {id} out of range"));
        }
        if d.endpoints.is_empty() && d.bound.is_empty() {
            return Err(format!("domain {id} is empty"));
        }
        if d.table.is_some() && (d.bypass || !d.mappings.is_empty()) {
            return Err(format!("table domain {id} with mappings"));
        }
        for &(ep, pasid) in &d.bound {
            let bound_here = dev
                .bindings()
                .any(|(k, b)| k == (ep, pasid) && b.domain == id);
            if !bound_here || !matches!(d.table, Some(TableSpec::Vtd(_))) {
                return Err(format!("binding ({ep}, {pasid}) of domain {id}"));
            }
            if pasid == 0 || u64::from(pasid) >> config.endpoint_pasid_bits != 0 {
                return Err(format!("binding ({ep}, {pasid}): PASID width"));
            }
        }
        for &ep in &d.endpoints {
            if !config.endpoints.contains(ep) || dev.endpoint_domain(ep) != Some(id) {
                return Err(format!("endpoint {ep} of domain {id}"));
            }
        }
        attached += d.endpoints.len();
        if d.bypass && (!d.mappings.is_empty() || known_attach_flags(acked) == 0) {
            return Err(format!("bypass domain {id}"));
        }
        if d.mappings.len() > config.max_mappings_per_domain {
            return Err(format!("domain {id}: too many mappings"));
        }
        let maps: Vec<Mapping> = d.mappings.iter().collect();
        if maps.len() != d.mappings.len() {
            return Err(format!("domain {id}: mapping count"));
        }
        for (i, m) in maps.iter().enumerate() {
            check_map_range(
                config,
                config.granule() - 1,
                m.virt_start,
                m.virt_end,
                m.phys_start,
            )
            .map_err(|e| format!("domain {id}: {e}"))?;
            if m.flags & !known_map_flags(acked) != 0 {
                return Err(format!("domain {id}: flags {:#x}", m.flags));
            }
            if i > 0 && maps[i - 1].virt_end >= m.virt_start {
                return Err(format!("domain {id}: overlap at {:#x}", m.virt_start));
            }
        }
    }
    if attached != dev.attached_endpoints().count() {
        return Err("endpoint map and domains disagree".into());
    }
    let bound: usize = dev.domains().values().map(|d| d.bound.len()).sum();
    if bound != dev.bindings().count() {
        return Err("bindings and domains disagree".into());
    }
    Ok(())
}

#[test]
fn crc32_is_the_ieee_one() {
    assert_eq!(crc32_update(0, b"123456789"), 0xCBF4_3926);
    assert_eq!(
        crc32_update(crc32_update(0, b"1234"), b"56789"),
        0xCBF4_3926
    );
}

#[test]
fn a_busy_device_round_trips() {
    let dev = busy_device();
    let state = busy_state(&dev);
    let blob = encode(dev.config(), &state);
    assert_eq!(&blob[..8], b"vIOMsnap");
    let loaded = decode(&blob, &config()).unwrap();
    assert_eq!(loaded.guest_pasids, vec![1, 9, 300]);
    assert_eq!(loaded.pending_events, state.pending_events);
    assert!(loaded.skipped_sections.is_empty());
    let mut other = Viommu::new(config());
    other.record_changes(true);
    other
        .restore(loaded.model, &mut crate::table::UncountedPasids)
        .unwrap();
    assert_eq!(other.acked_features(), dev.acked_features());
    assert!(!other.bypass());
    assert_eq!(plain(other.domains().iter()), plain(dev.domains().iter()));
    assert_eq!(other.endpoint_domain(3), Some(1));
    assert_eq!(other.endpoint_domain(6), Some(7));
    assert_eq!(
        other.take_changes(),
        vec![StateChange::Reset, StateChange::Bypass(false)]
    );
    check_invariants(&other).unwrap();
    // The restored device goes on as the saved one would.
    let overlap = MapReq::new(1, 0x1000, 0x2fff, 0, RW);
    assert_eq!(send(&mut other, &overlap), VIRTIO_IOMMU_S_INVAL);
    let unmap = UnmapReq::new(1, 0x10_0000, 0x1f_ffff);
    assert_eq!(send(&mut other, &unmap), VIRTIO_IOMMU_S_OK);
}

#[test]
fn a_fresh_device_round_trips_with_only_the_required_sections() {
    let dev = Viommu::new(config());
    let blob = encode(dev.config(), &dev.device_state());
    assert_eq!(le32_at(&blob, 12), 2, "DEVICE and DOMAINS");
    let loaded = decode(&blob, dev.config()).unwrap();
    assert!(loaded.model.domains().is_empty());
    assert_eq!(loaded.model.bypass(), dev.bypass());
    assert_eq!(loaded.model.acked_features(), 0);
    assert!(loaded.guest_pasids.is_empty() && loaded.pending_events.is_empty());
}

#[test]
fn every_truncation_is_refused() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    for len in 0..blob.len() {
        let err = decode(&blob[..len], &config()).err();
        assert!(
            matches!(err, Some(StateError::Truncated { .. })),
            "cut at {len}: {err:?}"
        );
    }
}

#[test]
fn header_damage_is_refused() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    let mut bad = blob.clone();
    bad[0] = b'V';
    assert_eq!(decode(&bad, &config()).err(), Some(StateError::BadMagic));
    assert_eq!(
        decode(b"not a blob", &config()).err(),
        Some(StateError::BadMagic)
    );
    let mut bad = blob.clone();
    bad[8] = 2;
    reseal(&mut bad);
    assert_eq!(
        decode(&bad, &config()).err(),
        Some(StateError::Version { found: 2 })
    );
    let mut bad = blob.clone();
    bad.push(0);
    assert!(matches!(
        decode(&bad, &config()),
        Err(StateError::TrailingBytes { .. })
    ));
    let mut bad = blob.clone();
    bad[28] = 1;
    reseal(&mut bad);
    assert!(matches!(
        decode(&bad, &config()),
        Err(StateError::Malformed { part: "header", .. })
    ));
}

#[test]
fn any_flipped_bit_fails_the_checksum() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    for at in (0..blob.len()).filter(|&i| !(8..10).contains(&i) && !(16..24).contains(&i)) {
        for bit in [0, 3, 7] {
            let mut bad = blob.clone();
            bad[at] ^= 1 << bit;
            let err = decode(&bad, &config()).err();
            let expected = if at < MAGIC.len() {
                matches!(err, Some(StateError::BadMagic))
            } else {
                matches!(err, Some(StateError::Checksum { .. }))
            };
            assert!(expected, "bit {bit} of byte {at}: {err:?}");
        }
    }
}

#[test]
fn unknown_optional_sections_are_skipped_and_unknown_required_ones_refused() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    let later = with_section(&blob, 99, 0, b"from a later version");
    let loaded = decode(&later, &config()).unwrap();
    assert_eq!(loaded.skipped_sections, vec![99]);
    assert_eq!(loaded.guest_pasids, vec![1, 9, 300]);
    let required = with_section(&blob, 99, SECTION_F_REQUIRED, &[]);
    assert_eq!(
        decode(&required, &config()).err(),
        Some(StateError::UnknownRequiredSection(99))
    );
    // An empty PASID_TABLES section is known, and holds nothing.
    let tables = with_section(&blob, section::PASID_TABLES, SECTION_F_REQUIRED, &[0; 8]);
    assert!(decode(&tables, &config())
        .unwrap()
        .model
        .bindings()
        .is_empty());
    let twice = with_section(&blob, section::PENDING_EVENTS, 0, &[0; 8]);
    assert_eq!(
        decode(&twice, &config()).err(),
        Some(StateError::DuplicateSection(section::PENDING_EVENTS))
    );
    let mut bad_flags = with_section(&blob, 99, 2, &[]);
    assert!(matches!(
        decode(&bad_flags, &config()),
        Err(StateError::Malformed {
            part: "section table",
            ..
        })
    ));
    // A section table whose entries do not tile the blob.
    let last = HEADER_SIZE + 4 * ENTRY_SIZE;
    let offset = le64_at(&bad_flags, last + 8) + 1;
    bad_flags[last + 4] = 0;
    bad_flags[last + 8..last + 16].copy_from_slice(&offset.to_le_bytes());
    reseal(&mut bad_flags);
    assert!(matches!(
        decode(&bad_flags, &config()),
        Err(StateError::Malformed {
            part: "section table",
            ..
        })
    ));
}

#[test]
fn a_blob_without_its_required_sections_is_refused() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    // Turn DOMAINS into an unknown optional section.
    let mut bad = blob.clone();
    let entry = HEADER_SIZE + ENTRY_SIZE;
    assert_eq!(le32_at(&bad, entry), section::DOMAINS);
    bad[entry..entry + 8].copy_from_slice(&[42, 0, 0, 0, 0, 0, 0, 0]);
    reseal(&mut bad);
    assert_eq!(
        decode(&bad, &config()).err(),
        Some(StateError::MissingSection("DOMAINS"))
    );
}

#[test]
fn a_device_the_guest_did_not_see_is_refused() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    let cases: Vec<(DeviceConfig, &str)> = vec![
        (
            DeviceConfig {
                page_size_mask: !0xffff,
                ..config()
            },
            "page_size_mask",
        ),
        (
            DeviceConfig {
                input_range: (0, (1 << 39) - 1),
                ..config()
            },
            "input range",
        ),
        (
            DeviceConfig {
                domain_range: (1, 100),
                ..config()
            },
            "domain range",
        ),
        (
            DeviceConfig {
                probe_size: 1024,
                ..config()
            },
            "probe_size",
        ),
        (
            DeviceConfig {
                mmio: false,
                ..config()
            },
            "offered features",
        ),
        (
            DeviceConfig {
                pasid_alloc: false,
                ..config()
            },
            "offered features",
        ),
        (
            DeviceConfig {
                reserved_regions: Vec::new(),
                ..config()
            },
            "number of reserved regions",
        ),
    ];
    for (here, field) in cases {
        match decode(&blob, &here) {
            Err(StateError::DeviceMismatch { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {:?}", other.err()),
        }
    }
}

#[test]
fn the_destinations_caps_and_endpoints_apply() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    let fewer_domains = DeviceConfig {
        max_domains: 2,
        ..config()
    };
    assert_eq!(
        decode(&blob, &fewer_domains).err(),
        Some(StateError::TooManyDomains { count: 3, limit: 2 })
    );
    let fewer_mappings = DeviceConfig {
        max_mappings_per_domain: 1,
        ..config()
    };
    assert_eq!(
        decode(&blob, &fewer_mappings).err(),
        Some(StateError::Domain {
            domain: 1,
            problem: DomainProblem::TooManyMappings { count: 2, limit: 1 }
        })
    );
    let fewer_endpoints = DeviceConfig {
        endpoints: EndpointSet::from_ranges(vec![0..=4, 6..=7]),
        ..config()
    };
    assert_eq!(
        decode(&blob, &fewer_endpoints).err(),
        Some(StateError::Domain {
            domain: 2,
            problem: RequestError::NoSuchEndpoint(5).into()
        })
    );
    // Caps are not part of what the guest saw: a larger device is fine.
    let larger = DeviceConfig {
        max_domains: 100,
        max_mappings_per_domain: 100,
        endpoints: EndpointSet::all_pci_rids(),
        ..config()
    };
    assert!(decode(&blob, &larger).is_ok());
}

#[test]
fn restore_refuses_a_state_checked_against_another_device_and_changes_nothing() {
    let dev = busy_device();
    let blob = encode(dev.config(), &busy_state(&dev));
    let larger = DeviceConfig {
        max_domains: 100,
        ..config()
    };
    let loaded = decode(&blob, &larger).unwrap();
    let mut other = device();
    send(&mut other, &AttachReq::new(3, 4, 0));
    assert_eq!(
        other
            .restore(loaded.model, &mut crate::table::UncountedPasids)
            .err(),
        Some(StateError::OtherDevice)
    );
    assert_eq!(other.endpoint_domain(4), Some(3));
    assert_eq!(other.domains().len(), 1);
}

/// A blob whose `DOMAINS` section is `domains` (its raw body after the
/// count), sealed.
fn with_domains(base: &[u8], count: u32, domains: &[u8]) -> Vec<u8> {
    let at = section_at(base, section::DOMAINS);
    let old_len = base.len() - at; // DOMAINS is the last section here.
    let mut out = base[..at].to_vec();
    put32(&mut out, count);
    put32(&mut out, 0);
    out.extend_from_slice(domains);
    let entry = HEADER_SIZE + ENTRY_SIZE;
    let new_len = (out.len() - at) as u64;
    out[entry + 16..entry + 24].copy_from_slice(&new_len.to_le_bytes());
    let size = out.len() as u64;
    out[16..24].copy_from_slice(&size.to_le_bytes());
    assert!(old_len >= 8);
    reseal(&mut out);
    out
}

fn domain_bytes(id: u32, flags: u32, endpoints: &[u32], maps: &[(u64, u64, u64, u32)]) -> Vec<u8> {
    let mut b = Vec::new();
    put32(&mut b, id);
    put32(&mut b, flags);
    put32(&mut b, endpoints.len() as u32);
    put32(&mut b, maps.len() as u32);
    for &e in endpoints {
        put32(&mut b, e);
    }
    for &(s, e, p, f) in maps {
        put64(&mut b, s);
        put64(&mut b, e);
        put64(&mut b, p);
        put32(&mut b, f);
        put32(&mut b, 0);
    }
    b
}

#[test]
fn errors_say_what_is_wrong_once() {
    let e = StateError::Domain {
        domain: 2,
        problem: RequestError::NoSuchEndpoint(5).into(),
    };
    assert_eq!(e.to_string(), "domain 2: endpoint 5 does not exist");
    assert!(std::error::Error::source(&e).is_none());
}

#[test]
fn states_the_device_could_not_reach_are_refused() {
    let mut dev = device();
    dev.set_acked_features(dev.device_features() & !(1 << VIRTIO_IOMMU_F_MMIO));
    let base = encode(dev.config(), &dev.device_state());
    let refused = |domains: Vec<Vec<u8>>| {
        let body: Vec<u8> = domains.concat();
        decode(&with_domains(&base, domains.len() as u32, &body), &config()).err()
    };
    let d = |domain, problem| Some(StateError::Domain { domain, problem });
    let page = |i: u64| (i << 12, (i << 12) + 0xfff, i << 12, RW);
    // The test's own forgery is sound.
    assert_eq!(refused(vec![domain_bytes(1, 0, &[1], &[page(1)])]), None);
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[], &[])]),
        d(1, DomainProblem::NoEndpoints)
    );
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[1, 1], &[])]),
        d(1, DomainProblem::EndpointTwice(1))
    );
    assert_eq!(
        refused(vec![
            domain_bytes(1, 0, &[1], &[]),
            domain_bytes(2, 0, &[1], &[])
        ]),
        d(2, DomainProblem::EndpointTwice(1))
    );
    assert_eq!(
        refused(vec![
            domain_bytes(2, 0, &[1], &[]),
            domain_bytes(1, 0, &[2], &[])
        ]),
        d(1, DomainProblem::Order)
    );
    assert_eq!(
        refused(vec![domain_bytes(1, 1, &[1], &[page(1)])]),
        d(1, DomainProblem::BypassWithMappings(1))
    );
    assert_eq!(
        refused(vec![domain_bytes(1, 2, &[1], &[])]),
        d(1, RequestError::UnknownFlags(2).into())
    );
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[8], &[])]),
        d(1, RequestError::NoSuchEndpoint(8).into())
    );
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[1], &[page(2), page(1)])]),
        d(1, DomainProblem::MappingOrder(0x1000))
    );
    assert_eq!(
        refused(vec![domain_bytes(
            1,
            0,
            &[1],
            &[(0x1000, 0x2fff, 0, RW), (0x2000, 0x2fff, 0, RW)]
        )]),
        d(1, DomainProblem::MappingOrder(0x2000))
    );
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[1], &[(0x1000, 0x17ff, 0, RW)])]),
        d(1, RequestError::Misaligned(0x1800).into())
    );
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[1], &[(0x2000, 0x1fff, 0, RW)])]),
        d(
            1,
            RequestError::InvertedRange {
                start: 0x2000,
                end: 0x1fff
            }
            .into()
        )
    );
    let msi = (X86_MSI_WINDOW.start, X86_MSI_WINDOW.start + 0xfff, 0, RW);
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[1], &[msi])]),
        d(
            1,
            RequestError::ReservedRegion {
                start: msi.0,
                end: msi.1
            }
            .into()
        )
    );
    let past = (1 << 48, (1 << 48) + 0xfff, 0, RW);
    assert!(matches!(
        refused(vec![domain_bytes(1, 0, &[1], &[past])]),
        Some(StateError::Domain {
            problem: DomainProblem::Rule(RequestError::OutsideInputRange { .. }),
            ..
        })
    ));
    // MMIO was not negotiated.
    let mmio = (0x1000, 0x1fff, 0, RW | VIRTIO_IOMMU_MAP_F_MMIO);
    assert_eq!(
        refused(vec![domain_bytes(1, 0, &[1], &[mmio])]),
        d(
            1,
            RequestError::UnknownFlags(VIRTIO_IOMMU_MAP_F_MMIO).into()
        )
    );
    // Counts that the section cannot hold are refused before they size
    // anything.
    assert!(matches!(
        decode(&with_domains(&base, u32::MAX, &[]), &config()),
        Err(StateError::Malformed { .. })
    ));
    let mut huge = domain_bytes(1, 0, &[1], &[]);
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        refused(vec![huge]),
        Some(StateError::Domain { .. })
    ));
    let mut huge = domain_bytes(1, 0, &[1], &[]);
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        refused(vec![huge]),
        Some(StateError::Malformed { .. })
    ));
}

#[test]
fn pasids_and_events_are_checked() {
    let dev = busy_device();
    let forged = |pasids: Vec<u32>, events: Vec<Vec<u8>>| {
        let state = DeviceState {
            guest_pasids: Vec::new(),
            pending_events: events,
            ..dev.device_state()
        };
        let mut blob = encode(dev.config(), &state);
        if !pasids.is_empty() {
            // encode sorts: write the list as given.
            let mut body = Vec::new();
            put32(&mut body, pasids.len() as u32);
            put32(&mut body, 0);
            for p in pasids {
                put32(&mut body, p);
            }
            blob = with_section(&blob, section::GUEST_PASIDS, SECTION_F_REQUIRED, &body);
        }
        decode(&blob, &config()).err()
    };
    assert_eq!(forged(vec![1, 2], vec![]), None);
    assert!(matches!(
        forged(vec![2, 1], vec![]),
        Some(StateError::Malformed { .. })
    ));
    assert!(matches!(
        forged(vec![0], vec![]),
        Some(StateError::Malformed { .. })
    ));
    assert!(matches!(
        forged(vec![1 << 20], vec![]),
        Some(StateError::Malformed { .. })
    ));
    let no_pasids = DeviceConfig {
        pasid_alloc: false,
        ..config()
    };
    let mut d = Viommu::new(no_pasids.clone());
    d.set_acked_features(!0);
    let blob = encode(
        &no_pasids,
        &DeviceState {
            guest_pasids: vec![5],
            ..d.device_state()
        },
    );
    assert!(matches!(
        decode(&blob, &no_pasids),
        Err(StateError::Malformed {
            part: "GUEST_PASIDS section",
            ..
        })
    ));
    assert_eq!(forged(vec![], vec![fault(7, 0)]), None);
    assert!(matches!(
        forged(vec![], vec![fault(8, 0)]),
        Some(StateError::Event { index: 0, .. })
    ));
    assert!(matches!(
        forged(vec![], vec![fault(1, 0), vec![0; 30]]),
        Some(StateError::Event { index: 1, .. })
    ));
    let mut page_request = vec![0u8; 48];
    page_request[4..8].copy_from_slice(&VIRTIO_IOMMU_FAULT_F_PAGE_REQ.to_le_bytes());
    assert!(matches!(
        forged(vec![], vec![page_request]),
        Some(StateError::Event { index: 0, .. })
    ));
    assert!(matches!(
        forged(vec![], vec![fault(1, 0); MAX_PENDING_EVENTS + 1]),
        Some(StateError::Malformed { .. })
    ));
}

#[test]
fn acked_features_beyond_the_offer_and_bypass_values_are_refused() {
    let dev = busy_device();
    let mut state = dev.device_state();
    state.acked_features = 1 << 40;
    let blob = encode(dev.config(), &state);
    assert!(matches!(
        decode(&blob, &config()),
        Err(StateError::Malformed {
            part: "DEVICE section",
            ..
        })
    ));
    let mut blob = encode(dev.config(), &dev.device_state());
    let at = section_at(&blob, section::DEVICE) + 56;
    blob[at] = 2;
    reseal(&mut blob);
    assert!(matches!(
        decode(&blob, &config()),
        Err(StateError::Malformed {
            part: "DEVICE section",
            ..
        })
    ));
}

// ---- Property tests ----

#[derive(Clone, Debug)]
enum Op {
    Attach(u32, u32, bool),
    Detach(u32, u32),
    Map(u32, u64, u64, u64, u32),
    Unmap(u32, u64, u64),
    Bypass(u8),
    /// ATTACH_TABLE: a VT-d table at `pgd` page `n` with a PASID, or an
    /// SMMUv3 CD table for the endpoint.
    Table {
        domain: u32,
        endpoint: u32,
        pasid: u32,
        smmu: bool,
        n: u64,
    },
    DetachTable(u32, u32, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u32..6, 0u32..9, any::<bool>()).prop_map(|(d, e, b)| Op::Attach(d, e, b)),
        1 => (0u32..6, 0u32..9).prop_map(|(d, e)| Op::Detach(d, e)),
        4 => (0u32..6, 0u64..64, 1u64..4, 0u64..1 << 20, 0u32..8)
            .prop_map(|(d, s, l, p, f)| Op::Map(d, s, l, p, f)),
        1 => (0u32..6, 0u64..64, 1u64..16).prop_map(|(d, s, l)| Op::Unmap(d, s, l)),
        1 => (0u8..3).prop_map(Op::Bypass),
        2 => (0u32..6, 0u32..9, 0u32..4, prop::bool::weighted(0.2), 0u64..3)
            .prop_map(|(domain, endpoint, pasid, smmu, n)| Op::Table { domain, endpoint, pasid, smmu, n }),
        1 => (0u32..6, 0u32..9, 0u32..4).prop_map(|(d, e, p)| Op::DetachTable(d, e, p)),
    ]
}

/// A device driven by random requests, with random negotiated features.
fn driven(features: u64, ops: &[Op]) -> Viommu {
    let mut dev = Viommu::new(config());
    dev.set_acked_features(features);
    for op in ops {
        let _ = match *op {
            Op::Attach(d, e, b) => send(&mut dev, &AttachReq::new(d, e, u32::from(b))),
            Op::Detach(d, e) => send(&mut dev, &DetachReq::new(d, e)),
            Op::Map(d, s, l, p, f) => {
                let (start, end) = (s << 12, ((s + l) << 12) - 1);
                send(&mut dev, &MapReq::new(d, start, end, p << 12, f))
            }
            Op::Unmap(d, s, l) => send(&mut dev, &UnmapReq::new(d, s << 12, ((s + l) << 12) - 1)),
            Op::Bypass(v) => u8::from(dev.write_bypass(v).is_ok()),
            Op::Table {
                domain,
                endpoint,
                pasid,
                smmu,
                n,
            } => {
                let root = 0x10_0000 + n * 0x1000;
                let request = if smmu {
                    smmu_request(domain, endpoint, root)
                } else {
                    AttachTableVtdReq::new(domain, endpoint, pasid, root, 48)
                        .as_slice()
                        .to_vec()
                };
                dev.handle_request(&request, REQ_TAIL_SIZE)
                    .status()
                    .unwrap_or(0)
            }
            Op::DetachTable(d, e, p) => dev
                .handle_request(readable_part(&DetachTableReq::new(d, e, p)), REQ_TAIL_SIZE)
                .status()
                .unwrap_or(0),
        };
    }
    dev
}

fn event() -> impl Strategy<Value = Vec<u8>> {
    (0u32..8, any::<u64>(), any::<bool>()).prop_map(|(ep, addr, ext)| {
        let mut r = fault(ep, addr);
        if ext {
            r.resize(48, 0);
        }
        r
    })
}

/// The ingredients of a random state: negotiated features, the
/// requests that build it, the guest's PASIDs and pending events.
type Recipe = (u64, Vec<Op>, Vec<u32>, Vec<Vec<u8>>);

fn recipe() -> impl Strategy<Value = Recipe> {
    (
        any::<u64>(),
        prop::collection::vec(op(), 0..120),
        prop::collection::btree_set(1u32..(1 << 20), 0..20).prop_map(|s| s.into_iter().collect()),
        prop::collection::vec(event(), 0..6),
    )
}

fn cook((features, ops, pasids, events): Recipe) -> (Viommu, DeviceState) {
    let dev = driven(features, &ops);
    let state = DeviceState {
        guest_pasids: pasids,
        pending_events: events,
        ..dev.device_state()
    };
    (dev, state)
}

#[derive(Clone, Debug)]
enum Damage {
    Xor(usize, u8),
    Cut(usize),
    Insert(usize, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        10 => (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Damage::Xor(at, x)),
        1 => any::<usize>().prop_map(Damage::Cut),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Damage::Insert(at, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever state random requests build, it comes back as it was,
    /// and encoding what was decoded gives the same bytes.
    #[test]
    fn random_states_round_trip(recipe in recipe()) {
        let (dev, state) = cook(recipe);
        let blob = encode(dev.config(), &state);
        let loaded = decode(&blob, &config()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&loaded.guest_pasids, &state.guest_pasids);
        prop_assert_eq!(&loaded.pending_events, &state.pending_events);
        let mut other = Viommu::new(config());
        other.restore(loaded.model, &mut crate::table::UncountedPasids).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(other.acked_features(), dev.acked_features());
        prop_assert_eq!(other.bypass(), dev.bypass());
        prop_assert_eq!(plain(other.domains().iter()), plain(dev.domains().iter()));
        let mut attached: Vec<_> = other.attached_endpoints().collect();
        let mut before: Vec<_> = dev.attached_endpoints().collect();
        attached.sort_unstable();
        before.sort_unstable();
        prop_assert_eq!(attached, before);
        prop_assert!(check_invariants(&other).is_ok());
        let again = DeviceState {
            guest_pasids: state.guest_pasids.clone(),
            pending_events: state.pending_events.clone(),
            ..other.device_state()
        };
        prop_assert!(encode(other.config(), &again) == blob);
    }

    /// Damaged blobs, with or without a matching checksum and size, never panic
    /// the decoder, and what it accepts is a state the device could have
    /// reached.
    #[test]
    fn damaged_blobs_never_yield_a_broken_state(
        recipe in recipe(),
        damages in prop::collection::vec(damage(), 1..6),
        seal in any::<bool>(),
    ) {
        let (dev, state) = cook(recipe);
        let mut blob = encode(dev.config(), &state);
        for d in damages {
            match d {
                Damage::Xor(at, x) => {
                    let n = blob.len();
                    blob[at % n] ^= x;
                }
                Damage::Cut(at) => blob.truncate(at % (blob.len() + 1)),
                Damage::Insert(at, b) => {
                    let at = at % (blob.len() + 1);
                    blob.insert(at, b);
                }
            }
            if blob.is_empty() {
                break;
            }
        }
        if seal {
            // Past the checksum and the size, to the checks behind them.
            reseal_size(&mut blob);
        }
        if let Ok(loaded) = decode(&blob, &config()) {
            prop_assert!(loaded.pending_events.len() <= MAX_PENDING_EVENTS);
            prop_assert!(loaded.guest_pasids.windows(2).all(|w| w[0] < w[1]));
            let mut other = Viommu::new(config());
            other.restore(loaded.model, &mut crate::table::UncountedPasids).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(check_invariants(&other), Ok(()));
        }
    }
}

// Guest tables and PASID bindings.

fn smmu_request(domain: u32, endpoint: u32, root: u64) -> Vec<u8> {
    AttachTableSmmuReq::new(domain, endpoint, 0, 2, root)
        .as_slice()
        .to_vec()
}

fn send_ro(dev: &mut Viommu, readable: &[u8]) -> u8 {
    dev.handle_request(readable, REQ_TAIL_SIZE)
        .status()
        .expect("request dropped")
}

/// A device with a VT-d table bound at PASID 5 of two endpoints, a VT-d
/// table serving an endpoint's DMA without PASID, and a CD table.
fn table_device() -> Viommu {
    let mut dev = device();
    for (domain, ep, pasid) in [(3, 1, 5), (3, 2, 5), (4, 4, 0)] {
        let req = AttachTableVtdReq::new(
            domain,
            ep,
            pasid,
            0x20_0000 + u64::from(domain) * 0x1000,
            48,
        );
        assert_eq!(send_ro(&mut dev, req.as_slice()), VIRTIO_IOMMU_S_OK);
    }
    assert_eq!(
        send_ro(&mut dev, &smmu_request(5, 6, 0x30_0000)),
        VIRTIO_IOMMU_S_OK
    );
    dev
}

#[test]
fn tables_and_pasid_bindings_round_trip() {
    let dev = table_device();
    let blob = encode(dev.config(), &dev.device_state());
    assert!(section_at(&blob, section::PASID_TABLES) > 0);
    let loaded = decode(&blob, &config()).unwrap();
    let expect: Vec<((u32, u32), u32)> = vec![((1, 5), 3), ((2, 5), 3)];
    assert_eq!(
        loaded
            .model
            .bindings()
            .iter()
            .map(|(&k, &d)| (k, d))
            .collect::<Vec<_>>(),
        expect
    );
    let mut other = Viommu::new(config());
    other
        .restore(loaded.model, &mut UncountedRefs::default())
        .unwrap();
    assert_eq!(plain(other.domains().iter()), plain(dev.domains().iter()));
    check_invariants(&other).unwrap();
    for (ep, pasid) in [(1, 5), (2, 5), (4, 0), (6, 0), (6, 9)] {
        assert_eq!(
            other.table_for(ep, pasid),
            dev.table_for(ep, pasid),
            "({ep}, {pasid})"
        );
    }
    // And the restored device goes on: the binding can be removed.
    assert_eq!(
        send(&mut other, &DetachTableReq::new(3, 1, 5)),
        VIRTIO_IOMMU_S_OK
    );
}

/// References as the daemon counts them, refusing `refuse`.
#[derive(Default)]
struct UncountedRefs {
    taken: Vec<(u32, u32)>,
    refuse: Option<u32>,
}

impl crate::prq::PasidRefs for UncountedRefs {
    fn take(&mut self, endpoint: u32, pasid: u32) -> Option<u64> {
        if self.refuse == Some(pasid) {
            return None;
        }
        self.taken.push((endpoint, pasid));
        Some(0)
    }

    fn release(&mut self, endpoint: u32, pasid: u32, _handle: u64) {
        let at = self
            .taken
            .iter()
            .position(|&t| t == (endpoint, pasid))
            .expect("released what was not taken");
        self.taken.remove(at);
    }
}

#[test]
fn restore_takes_a_reference_per_binding_or_changes_nothing() {
    let dev = table_device();
    let blob = encode(dev.config(), &dev.device_state());
    let mut refs = UncountedRefs::default();
    let mut other = busy_device();
    let before = plain(other.domains().iter());
    let refused = UncountedRefs {
        refuse: Some(5),
        ..Default::default()
    };
    let mut refused = refused;
    let loaded = decode(&blob, &config()).unwrap();
    assert_eq!(
        other.restore(loaded.model, &mut refused).err(),
        Some(StateError::BindingRefused {
            endpoint: 1,
            pasid: 5
        })
    );
    assert!(refused.taken.is_empty(), "what was taken is given back");
    assert_eq!(plain(other.domains().iter()), before);
    let loaded = decode(&blob, &config()).unwrap();
    other.restore(loaded.model, &mut refs).unwrap();
    assert_eq!(refs.taken, vec![(1, 5), (2, 5)]);
    // A second restore gives the first one's references back.
    let loaded = decode(&blob, &config()).unwrap();
    other.restore(loaded.model, &mut refs).unwrap();
    assert_eq!(refs.taken.len(), 2);
}

/// A `PASID_TABLES` body.
fn tables_body(tables: &[(u32, Vec<u8>)], bindings: &[(u32, u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    put32(&mut out, tables.len() as u32);
    put32(&mut out, bindings.len() as u32);
    for (id, req) in tables {
        put32(&mut out, *id);
        put32(&mut out, 0);
        let mut raw = req.clone();
        raw.resize(ATTACH_TABLE_RO, 0);
        out.extend_from_slice(&raw);
    }
    for &(ep, pasid, domain) in bindings {
        put32(&mut out, ep);
        put32(&mut out, pasid);
        put32(&mut out, domain);
        put32(&mut out, 0);
    }
    out
}

#[test]
fn tables_the_device_could_not_have_are_refused() {
    let vtd = |id: u32| -> Vec<u8> {
        AttachTableVtdReq::new(id, 0, 0, 0x20_0000, 48)
            .as_slice()
            .to_vec()
    };
    // busy_device: domain 1 has mappings, 7 is a bypass domain, 2 has
    // mappings too.
    let base = encode(&config(), &busy_device().device_state());
    let refused = |body: Vec<u8>| {
        let blob = with_section(&base, section::PASID_TABLES, SECTION_F_REQUIRED, &body);
        decode(&blob, &config()).err().expect("refused")
    };
    let domain = |domain, problem| StateError::Domain { domain, problem };
    assert_eq!(
        refused(tables_body(&[(1, vtd(1))], &[])),
        domain(1, DomainProblem::TableAndMappings)
    );
    assert_eq!(
        refused(tables_body(&[(3, vtd(3))], &[])),
        domain(3, DomainProblem::Unused)
    );
    assert_eq!(
        refused(tables_body(&[(3, vtd(3))], &[(1, 1 << 20, 3)])),
        domain(
            3,
            RequestError::PasidWidth {
                pasid: 1 << 20,
                bits: 20
            }
            .into()
        )
    );
    assert_eq!(
        refused(tables_body(&[(3, vtd(3))], &[(1, 0, 3)])),
        domain(3, RequestError::PasidWidth { pasid: 0, bits: 20 }.into())
    );
    assert_eq!(
        refused(tables_body(&[(3, vtd(3))], &[(1, 4, 2)])),
        domain(2, RequestError::TableMismatch(2).into())
    );
    assert_eq!(
        refused(tables_body(
            &[(3, smmu_request(3, 0, 0x30_0000))],
            &[(1, 4, 3)]
        )),
        domain(
            3,
            DomainProblem::BindingFormat {
                endpoint: 1,
                pasid: 4
            }
        )
    );
    assert_eq!(
        refused(tables_body(&[(3, vtd(3))], &[(9, 4, 3)])),
        domain(3, RequestError::NoSuchEndpoint(9).into())
    );
    assert!(matches!(
        refused(tables_body(&[(3, vtd(4))], &[(1, 4, 3)])),
        StateError::Malformed { .. }
    ));
    assert!(matches!(
        refused(tables_body(&[(3, vtd(3))], &[(1, 4, 3), (1, 4, 3)])),
        StateError::Malformed { .. }
    ));
    let mut bad_root = vtd(3);
    bad_root[24] = 0x10; // a pgd that is not 4 KiB aligned
    assert!(matches!(
        refused(tables_body(&[(3, bad_root)], &[(1, 4, 3)])),
        StateError::Domain {
            domain: 3,
            problem: DomainProblem::Rule(_)
        }
    ));
    // Tables on a driver that did not negotiate them.
    let mut dev = Viommu::new(config());
    dev.set_acked_features(!(1 << VIRTIO_IOMMU_F_ATTACH_TABLE));
    let plain_base = encode(&config(), &dev.device_state());
    let blob = with_section(
        &plain_base,
        section::PASID_TABLES,
        SECTION_F_REQUIRED,
        &tables_body(&[(3, vtd(3))], &[(1, 4, 3)]),
    );
    assert!(matches!(
        decode(&blob, &config()),
        Err(StateError::Malformed { .. })
    ));
    // The valid one is accepted, so the refusals above are the rules'.
    let blob = with_section(
        &base,
        section::PASID_TABLES,
        SECTION_F_REQUIRED,
        &tables_body(&[(3, vtd(3))], &[(1, 4, 3)]),
    );
    decode(&blob, &config()).unwrap();
}
