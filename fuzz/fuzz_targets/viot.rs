// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `viot` subcommand's parsers and table builder
//! (vhost-user/src/viot.rs): PCI addresses, endpoint range lists and the
//! ACPI VIOT they become.
//!
//! Beyond "no panic":
//! - `PciAddress::from_str` agrees with a reference written from its
//!   documentation (`[SEGMENT:]BUS:DEVICE.FUNCTION`, 1-4, 1-2, 1-2 and 1
//!   hex digits, device <= 0x1f, function <= 7), and an accepted address
//!   prints as text that parses back to it;
//! - an accepted range list holds ranges of one segment in RID order, and
//!   prints as a list that parses back to the same ranges;
//! - `build_viot` (given up to 64 ranges, parsed or built) accepts
//!   exactly the endpoint sets the reference accepts (not empty, the
//!   IOMMU in no range, no RID in two ranges), refuses the others for one
//!   of the reasons that apply, and every table it builds reads back,
//!   through a plain decoder, as the IOMMU and ranges it was given, with
//!   the right length, node count and offsets, zero reserved bytes and a
//!   zero checksum.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_device_iommu::viot::{
    build_viot, parse_ranges, PciAddress, PciRange, TableIds, ViotError,
};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Text for the address parser.
    address: String,
    /// Text for the range-list parser.
    list: String,
    /// The IOMMU and endpoint ranges for the builder.
    iommu: Address,
    ranges: Vec<(Address, u16)>,
    ids: ([u8; 6], [u8; 8], u32, [u8; 4], u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Address {
    segment: u16,
    rid: u16,
}

impl Address {
    fn pci(self) -> PciAddress {
        pci(self.segment, self.rid)
    }
}

fn pci(segment: u16, rid: u16) -> PciAddress {
    PciAddress {
        segment,
        bus: (rid >> 8) as u8,
        device: ((rid >> 3) & 0x1f) as u8,
        function: (rid & 7) as u8,
    }
}

/// `[SEGMENT:]BUS:DEVICE.FUNCTION` as the documentation describes it.
fn ref_address(s: &str) -> Option<PciAddress> {
    fn hex(s: &str, max_digits: usize) -> Option<u32> {
        if s.is_empty() || s.len() > max_digits || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        Some(
            s.chars()
                .fold(0, |v, c| v * 16 + c.to_digit(16).unwrap_or(0)),
        )
    }
    let (rest, function) = s.rsplit_once('.')?;
    let fields: Vec<&str> = rest.split(':').collect();
    let (segment, bus, device) = match fields.as_slice() {
        [b, d] => (0, hex(b, 2)?, hex(d, 2)?),
        [s, b, d] => (hex(s, 4)?, hex(b, 2)?, hex(d, 2)?),
        _ => return None,
    };
    let function = hex(function, 1)?;
    if device > 0x1f || function > 7 {
        return None;
    }
    Some(PciAddress {
        segment: segment as u16,
        bus: bus as u8,
        device: device as u8,
        function: function as u8,
    })
}

fn le16(t: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([t[at], t[at + 1]])
}

fn le32(t: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(t[at..at + 4].try_into().unwrap())
}

/// Reads a table back and checks it describes `iommu` and `ranges`.
fn check_table(t: &[u8], iommu: PciAddress, ranges: &[PciRange], ids: &TableIds) {
    let n = ranges.len();
    assert_eq!(t.len(), 48 + 16 + 24 * n);
    assert_eq!(&t[0..4], b"VIOT");
    assert_eq!(le32(t, 4) as usize, t.len(), "length field");
    assert_eq!(t[8], 0, "revision");
    assert_eq!(t.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0, "checksum");
    assert_eq!(&t[10..16], &ids.oem_id);
    assert_eq!(&t[16..24], &ids.oem_table_id);
    assert_eq!(le32(t, 24), ids.oem_revision);
    assert_eq!(&t[28..32], &ids.creator_id);
    assert_eq!(le32(t, 32), ids.creator_revision);
    assert_eq!(usize::from(le16(t, 36)), 1 + n, "node count");
    assert_eq!(le16(t, 38), 48, "node offset");
    assert!(t[40..48].iter().all(|&b| b == 0));
    // The virtio-iommu-pci node.
    assert_eq!((t[48], t[49], le16(t, 50)), (3, 0, 16));
    assert_eq!(le16(t, 52), iommu.segment);
    assert_eq!(le16(t, 54), iommu.rid());
    assert!(t[56..64].iter().all(|&b| b == 0));
    // One PCI range node per range, in order, each pointing at the IOMMU.
    for (i, r) in ranges.iter().enumerate() {
        let at = 64 + 24 * i;
        assert_eq!((t[at], t[at + 1], le16(t, at + 2)), (1, 0, 24));
        assert_eq!(le32(t, at + 4), u32::from(r.start.rid()), "endpoint_start");
        assert_eq!(le16(t, at + 8), r.start.segment);
        assert_eq!(le16(t, at + 10), r.end.segment);
        assert_eq!(le16(t, at + 12), r.start.rid());
        assert_eq!(le16(t, at + 14), r.end.rid());
        assert_eq!(le16(t, at + 16), 48, "output node");
        assert!(t[at + 18..at + 24].iter().all(|&b| b == 0));
    }
}

/// Builds a table and checks it against the reference's judgement.
fn check_build(iommu: PciAddress, ranges: &[PciRange], ids: &TableIds) {
    let empty = ranges.is_empty();
    let iommu_inside = ranges.iter().any(|r| {
        r.start.segment == iommu.segment
            && r.start.rid() <= iommu.rid()
            && iommu.rid() <= r.end.rid()
    });
    let overlap = ranges.iter().enumerate().any(|(i, a)| {
        ranges[i + 1..]
            .iter()
            .any(|b| a.start.rid() <= b.end.rid() && b.start.rid() <= a.end.rid())
    });
    match build_viot(iommu, ranges, ids) {
        Ok(t) => {
            assert!(!empty && !iommu_inside && !overlap, "{iommu} {ranges:?}");
            check_table(&t, iommu, ranges, ids);
        }
        Err(ViotError::NoEndpoints) => assert!(empty),
        Err(ViotError::IommuIsEndpoint { .. }) => assert!(iommu_inside),
        Err(ViotError::Overlap(..)) => assert!(overlap),
        Err(e) => panic!("unexpected refusal {e:?} of {iommu} {ranges:?}"),
    }
}

fuzz_target!(|input: Input| {
    let ids = TableIds {
        oem_id: input.ids.0,
        oem_table_id: input.ids.1,
        oem_revision: input.ids.2,
        creator_id: input.ids.3,
        creator_revision: input.ids.4,
    };

    let parsed = input.address.parse::<PciAddress>();
    assert_eq!(
        parsed.as_ref().ok(),
        ref_address(&input.address).as_ref(),
        "{:?}",
        input.address
    );
    if let Ok(a) = parsed {
        assert_eq!(a.to_string().parse::<PciAddress>(), Ok(a));
    }

    if let Ok(ranges) = parse_ranges(&input.list) {
        for r in &ranges {
            assert_eq!(r.start.segment, r.end.segment, "{:?}", input.list);
            assert!(r.start.rid() <= r.end.rid(), "{:?}", input.list);
            assert_eq!(r.to_string().parse::<PciRange>(), Ok(*r));
        }
        let printed: Vec<String> = ranges.iter().map(ToString::to_string).collect();
        assert_eq!(parse_ranges(&printed.join(",")), Ok(ranges.clone()));
        // A few dozen ranges at most (the overlap check is quadratic).
        if let (Ok(iommu), true) = (input.address.parse(), ranges.len() <= 64) {
            check_build(iommu, &ranges, &ids);
        }
    }

    // Ranges as the parser makes them: one segment, in RID order. A few
    // dozen at most (the overlap check is quadratic).
    let ranges: Vec<PciRange> = input
        .ranges
        .iter()
        .take(64)
        .map(|&(start, len)| PciRange {
            start: start.pci(),
            end: pci(start.segment, start.rid.saturating_add(len % 64)),
        })
        .collect();
    check_build(input.iommu.pci(), &ranges, &ids);
});
