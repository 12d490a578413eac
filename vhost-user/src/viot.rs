// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ACPI VIOT (Virtual I/O Translation) table builder and the `viot`
//! subcommand.
//!
//! QEMU builds a VIOT only for its own virtio-iommu, so a guest that gets
//! its virtio-iommu from this daemon needs one passed in with
//! `-acpitable file=viot.bin`. The table has one virtio-iommu-pci node
//! (type 3) for the IOMMU and one PCI range node (type 1) per endpoint
//! range, with `endpoint_start = bdf_start`: the endpoint ID of a PCI
//! device is its requester ID, as the daemon and QEMU expect.

use std::{fmt, fs, io::Write, path::PathBuf, str::FromStr};

use clap::Args;
use thiserror::Error;

/// Size of the ACPI system description table header.
pub const ACPI_HEADER_SIZE: usize = 36;
/// Offset of the first node: ACPI header + node count, node offset, 8
/// reserved bytes.
pub const VIOT_NODE_OFFSET: u16 = 48;
/// VIOT node types (ACPICA `actbl3.h`).
pub const VIOT_NODE_PCI_RANGE: u8 = 1;
pub const VIOT_NODE_VIRTIO_IOMMU_PCI: u8 = 3;
/// Node sizes.
pub const VIOT_PCI_RANGE_SIZE: u16 = 24;
pub const VIOT_VIRTIO_IOMMU_PCI_SIZE: u16 = 16;

/// Invalid `viot` input, or the table could not be written.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ViotError {
    #[error("invalid PCI address `{input}`: {why} (expected [SEGMENT:]BUS:DEVICE.FUNCTION in hex, e.g. 0000:00:04.0)")]
    BadAddress { input: String, why: &'static str },
    #[error("invalid endpoint range `{0}`: the end comes before the start")]
    ReversedRange(String),
    #[error("invalid endpoint range `{0}`: start and end are in different PCI segments")]
    CrossesSegments(String),
    #[error("no endpoint range given")]
    NoEndpoints,
    #[error("endpoint list `{0}` has an empty item")]
    EmptyItem(String),
    #[error("the IOMMU {iommu} is inside the endpoint range {range}: the virtio-iommu cannot translate its own DMA")]
    IommuIsEndpoint { iommu: PciAddress, range: PciRange },
    #[error("endpoint ranges {0} and {1} give some endpoints the same endpoint ID")]
    Overlap(PciRange, PciRange),
    #[error("too many endpoint ranges ({0}); a VIOT holds at most {max}", max = MAX_RANGES)]
    TooManyRanges(usize),
    #[error("cannot write {path}: {why}")]
    Write { path: String, why: String },
}

/// Most endpoint range nodes in one table: the node count is 16-bit and
/// the length 32-bit; 4096 keeps the table far below both.
pub const MAX_RANGES: usize = 4096;

/// A PCI function address: segment (PCI domain), bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciAddress {
    pub segment: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    /// The 16-bit requester ID `bus << 8 | device << 3 | function`.
    pub fn rid(&self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.device) << 3 | u16::from(self.function)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

fn hex_field(s: &str, max_digits: usize) -> Option<u16> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(s, 16).ok()
}

impl FromStr for PciAddress {
    type Err = ViotError;

    /// `[SEGMENT:]BUS:DEVICE.FUNCTION`, hexadecimal, as `lspci -D` prints it.
    fn from_str(s: &str) -> Result<Self, ViotError> {
        let bad = |why| ViotError::BadAddress {
            input: s.to_string(),
            why,
        };
        let (rest, function) = s.rsplit_once('.').ok_or_else(|| bad("no `.FUNCTION`"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (segment, bus, device) = match parts[..] {
            [bus, device] => ("0", bus, device),
            [segment, bus, device] => (segment, bus, device),
            _ => {
                return Err(bad(
                    "expected BUS:DEVICE or SEGMENT:BUS:DEVICE before the `.`",
                ))
            }
        };
        let segment = hex_field(segment, 4).ok_or_else(|| bad("segment is not 1-4 hex digits"))?;
        let bus = hex_field(bus, 2).ok_or_else(|| bad("bus is not 1-2 hex digits"))?;
        let device = hex_field(device, 2).ok_or_else(|| bad("device is not 1-2 hex digits"))?;
        let function = hex_field(function, 1).ok_or_else(|| bad("function is not 1 hex digit"))?;
        if device > 0x1f {
            return Err(bad("device is above 0x1f"));
        }
        if function > 7 {
            return Err(bad("function is above 7"));
        }
        // The checks above bound every field to u8.
        let byte = |v: u16| u8::try_from(v).unwrap_or(u8::MAX);
        Ok(PciAddress {
            segment,
            bus: byte(bus),
            device: byte(device),
            function: byte(function),
        })
    }
}

/// An inclusive range of PCI functions of one segment, in RID order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciRange {
    pub start: PciAddress,
    pub end: PciAddress,
}

impl PciRange {
    pub fn contains(&self, a: &PciAddress) -> bool {
        a.segment == self.start.segment && (self.start.rid()..=self.end.rid()).contains(&a.rid())
    }

    /// Endpoint IDs of the range (`endpoint_start = bdf_start`: ID = RID).
    fn endpoint_ids(&self) -> (u16, u16) {
        (self.start.rid(), self.end.rid())
    }
}

impl fmt::Display for PciRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PciRange {
    type Err = ViotError;

    /// `ADDR` or `ADDR-ADDR`; an end without segment is in the start's segment.
    fn from_str(s: &str) -> Result<Self, ViotError> {
        let Some((a, b)) = s.split_once('-') else {
            let a = s.parse()?;
            return Ok(PciRange { start: a, end: a });
        };
        let start: PciAddress = a.parse()?;
        let mut end: PciAddress = b.parse()?;
        if b.matches(':').count() < 2 {
            end.segment = start.segment;
        }
        if start.segment != end.segment {
            return Err(ViotError::CrossesSegments(s.to_string()));
        }
        if start.rid() > end.rid() {
            return Err(ViotError::ReversedRange(s.to_string()));
        }
        Ok(PciRange { start, end })
    }
}

/// Parses a comma-separated list of endpoint ranges.
pub fn parse_ranges(s: &str) -> Result<Vec<PciRange>, ViotError> {
    if s.trim().is_empty() {
        return Err(ViotError::NoEndpoints);
    }
    s.split(',')
        .map(|item| match item.trim() {
            "" => Err(ViotError::EmptyItem(s.to_string())),
            item => item.parse(),
        })
        .collect()
}

/// The identification fields of the ACPI header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableIds {
    pub oem_id: [u8; 6],
    pub oem_table_id: [u8; 8],
    pub oem_revision: u32,
    pub creator_id: [u8; 4],
    pub creator_revision: u32,
}

impl Default for TableIds {
    /// The values of the worked example in the virtio-iommu reference (§4.4).
    fn default() -> Self {
        TableIds {
            oem_id: *b"RUSTVI",
            oem_table_id: *b"VIOMMU01",
            oem_revision: 1,
            creator_id: *b"RUST",
            creator_revision: 1,
        }
    }
}

/// Builds a VIOT describing the virtio-iommu-pci function `iommu` and the
/// endpoints it translates.
pub fn build_viot(
    iommu: PciAddress,
    endpoints: &[PciRange],
    ids: &TableIds,
) -> Result<Vec<u8>, ViotError> {
    if endpoints.is_empty() {
        return Err(ViotError::NoEndpoints);
    }
    if endpoints.len() > MAX_RANGES {
        return Err(ViotError::TooManyRanges(endpoints.len()));
    }
    for range in endpoints {
        if range.contains(&iommu) {
            return Err(ViotError::IommuIsEndpoint {
                iommu,
                range: *range,
            });
        }
    }
    // Endpoint IDs must be unique behind one IOMMU; IDs are RIDs, so two
    // ranges may not share a RID even in different segments.
    for (i, a) in endpoints.iter().enumerate() {
        for b in &endpoints[i + 1..] {
            let ((a0, a1), (b0, b1)) = (a.endpoint_ids(), b.endpoint_ids());
            if a0 <= b1 && b0 <= a1 {
                return Err(ViotError::Overlap(*a, *b));
            }
        }
    }

    let iommu_offset = VIOT_NODE_OFFSET;
    let len = usize::from(VIOT_NODE_OFFSET)
        + usize::from(VIOT_VIRTIO_IOMMU_PCI_SIZE)
        + endpoints.len() * usize::from(VIOT_PCI_RANGE_SIZE);
    // MAX_RANGES keeps both conversions in range.
    let node_count = u16::try_from(1 + endpoints.len())
        .map_err(|_| ViotError::TooManyRanges(endpoints.len()))?;
    let total = u32::try_from(len).map_err(|_| ViotError::TooManyRanges(endpoints.len()))?;

    let mut t = Vec::with_capacity(len);
    // ACPI header.
    t.extend_from_slice(b"VIOT");
    t.extend_from_slice(&total.to_le_bytes());
    t.push(0); // revision
    t.push(0); // checksum, set below
    t.extend_from_slice(&ids.oem_id);
    t.extend_from_slice(&ids.oem_table_id);
    t.extend_from_slice(&ids.oem_revision.to_le_bytes());
    t.extend_from_slice(&ids.creator_id);
    t.extend_from_slice(&ids.creator_revision.to_le_bytes());
    // VIOT header.
    t.extend_from_slice(&node_count.to_le_bytes());
    t.extend_from_slice(&VIOT_NODE_OFFSET.to_le_bytes());
    t.extend_from_slice(&[0; 8]);
    // virtio-iommu-pci node.
    t.push(VIOT_NODE_VIRTIO_IOMMU_PCI);
    t.push(0);
    t.extend_from_slice(&VIOT_VIRTIO_IOMMU_PCI_SIZE.to_le_bytes());
    t.extend_from_slice(&iommu.segment.to_le_bytes());
    t.extend_from_slice(&iommu.rid().to_le_bytes());
    t.extend_from_slice(&[0; 8]);
    // One PCI range node per endpoint range.
    for r in endpoints {
        t.push(VIOT_NODE_PCI_RANGE);
        t.push(0);
        t.extend_from_slice(&VIOT_PCI_RANGE_SIZE.to_le_bytes());
        t.extend_from_slice(&u32::from(r.start.rid()).to_le_bytes()); // endpoint_start
        t.extend_from_slice(&r.start.segment.to_le_bytes());
        t.extend_from_slice(&r.end.segment.to_le_bytes());
        t.extend_from_slice(&r.start.rid().to_le_bytes());
        t.extend_from_slice(&r.end.rid().to_le_bytes());
        t.extend_from_slice(&iommu_offset.to_le_bytes());
        t.extend_from_slice(&[0; 6]);
    }
    debug_assert_eq!(t.len(), len);
    let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
    Ok(t)
}

/// `vhost-device-iommu viot`: write an ACPI VIOT for QEMU's `-acpitable`.
#[derive(Debug, Args)]
pub struct ViotArgs {
    /// PCI address of the virtio-iommu function (`[SEG:]BUS:DEV.FN`, hex).
    #[arg(long, value_name = "BDF", value_parser = parse_address)]
    pub iommu_bdf: PciAddress,

    /// Endpoints it translates: comma-separated PCI addresses or inclusive
    /// ranges (`00:04.0-00:04.7,00:05.0`). Endpoint ID = requester ID.
    /// Only devices whose DMA goes through the daemon's control socket
    /// (e.g. `dma-test-device` on vfio-user-pci), not QEMU's own
    /// emulated devices, whose DMA the daemon does not see.
    #[arg(long, value_name = "LIST", value_parser = parse_ranges_arg)]
    pub endpoints: EndpointRanges,

    /// Where to write the table (`-` for standard output).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
}

/// The parsed `--endpoints` list (a newtype: clap treats a bare `Vec` as
/// a repeated option).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRanges(pub Vec<PciRange>);

fn parse_address(s: &str) -> Result<PciAddress, ViotError> {
    s.parse()
}

fn parse_ranges_arg(s: &str) -> Result<EndpointRanges, ViotError> {
    parse_ranges(s).map(EndpointRanges)
}

/// Runs the `viot` subcommand.
pub fn run(args: &ViotArgs) -> Result<(), ViotError> {
    let table = build_viot(args.iommu_bdf, &args.endpoints.0, &TableIds::default())?;
    let write_err = |e: std::io::Error| ViotError::Write {
        path: args.output.display().to_string(),
        why: e.to_string(),
    };
    if args.output.as_os_str() == "-" {
        std::io::stdout().write_all(&table).map_err(write_err)
    } else {
        fs::write(&args.output, &table).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().expect("valid address")
    }

    fn ranges(s: &str) -> Vec<PciRange> {
        parse_ranges(s).expect("valid ranges")
    }

    fn le16(t: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([t[off], t[off + 1]])
    }

    fn le32(t: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([t[off], t[off + 1], t[off + 2], t[off + 3]])
    }

    /// The hex dump of the virtio-iommu reference, §4.4.
    const WORKED_EXAMPLE: &str = "
        56 49 4f 54 58 00 00 00 00 de 52 55 53 54 56 49
        56 49 4f 4d 4d 55 30 31 01 00 00 00 52 55 53 54
        01 00 00 00 02 00 30 00 00 00 00 00 00 00 00 00
        03 00 10 00 00 00 18 00 00 00 00 00 00 00 00 00
        01 00 18 00 20 00 00 00 00 00 00 00 20 00 27 00
        30 00 00 00 00 00 00 00";

    #[test]
    fn worked_example_of_the_reference_is_reproduced_byte_for_byte() {
        let expected: Vec<u8> = WORKED_EXAMPLE
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        let t = build_viot(
            addr("00:03.0"),
            &ranges("00:04.0-00:04.7"),
            &TableIds::default(),
        )
        .unwrap();
        assert_eq!(t, expected);
    }

    #[test]
    fn all_bytes_sum_to_zero() {
        for eps in [
            "00:04.0",
            "00:04.0-00:04.7,00:05.0",
            "0001:02:00.0-0001:02:1f.7",
        ] {
            let ids = TableIds {
                oem_revision: 0xdead_beef,
                ..TableIds::default()
            };
            let t = build_viot(addr("00:03.0"), &ranges(eps), &ids).unwrap();
            assert_eq!(t.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0, "{eps}");
        }
    }

    #[test]
    fn header_has_signature_length_revision_0_and_node_offset_48() {
        let t = build_viot(
            addr("00:03.0"),
            &ranges("00:04.0,00:05.0"),
            &TableIds::default(),
        )
        .unwrap();
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(le32(&t, 4) as usize, t.len());
        assert_eq!(t.len(), 48 + 16 + 2 * 24);
        assert_eq!(t[8], 0);
        assert_eq!(le16(&t, 36), 3, "node count");
        assert_eq!(le16(&t, 38), 48, "node offset");
        assert!(t[40..48].iter().all(|&b| b == 0));
    }

    #[test]
    fn iommu_node_comes_first_and_holds_segment_and_rid() {
        let t = build_viot(
            addr("0002:01:1f.3"),
            &ranges("0002:00:04.0"),
            &TableIds::default(),
        )
        .unwrap();
        assert_eq!((t[48], le16(&t, 50)), (3, 16));
        assert_eq!(le16(&t, 52), 2, "segment");
        assert_eq!(le16(&t, 54), 0x01 << 8 | 0x1f << 3 | 3, "bdf");
        assert!(t[56..64].iter().all(|&b| b == 0));
    }

    #[test]
    fn each_range_node_starts_endpoints_at_the_rid_and_points_at_the_iommu() {
        let t = build_viot(
            addr("00:03.0"),
            &ranges("00:04.0-00:04.7,0000:01:00.0"),
            &TableIds::default(),
        )
        .unwrap();
        for (node, (first, last)) in [(64, (0x20, 0x27)), (88, (0x100, 0x100))] {
            assert_eq!((t[node], le16(&t, node + 2)), (1, 24));
            assert_eq!(le32(&t, node + 4), first, "endpoint_start = bdf_start");
            assert_eq!((le16(&t, node + 8), le16(&t, node + 10)), (0, 0));
            assert_eq!(le16(&t, node + 12), first as u16);
            assert_eq!(le16(&t, node + 14), last);
            assert_eq!(le16(&t, node + 16), 48, "output_node");
            assert!(t[node + 18..node + 24].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn segment_prefix_is_optional_and_defaults_to_zero() {
        assert_eq!(addr("00:04.0"), addr("0000:00:04.0"));
        assert_eq!(addr("0:4.0").rid(), 0x20);
        assert_eq!(addr("1:ff:1f.7").segment, 1);
        assert_eq!(addr("1:ff:1f.7").rid(), 0xffff);
    }

    #[test]
    fn bad_address_syntax_is_refused() {
        for bad in [
            "",
            "00:04",
            "04.0",
            "00:04.",
            "00:04.8",
            "00:20.0",
            "100:04.0",
            "00:04.0.1",
            "0:0:0:4.0",
            "zz:04.0",
            "00:04.0x",
            "12345:00:04.0",
            "+0:04.0",
            "00:-4.0",
        ] {
            let e = bad.parse::<PciAddress>();
            assert!(
                matches!(e, Err(ViotError::BadAddress { .. })),
                "`{bad}` gave {e:?}"
            );
        }
    }

    #[test]
    fn reversed_range_is_refused() {
        assert_eq!(
            parse_ranges("00:04.7-00:04.0"),
            Err(ViotError::ReversedRange("00:04.7-00:04.0".into()))
        );
        assert!(matches!(
            parse_ranges("01:00.0-00:1f.7"),
            Err(ViotError::ReversedRange(_))
        ));
    }

    #[test]
    fn range_crossing_buses_is_accepted_in_rid_order() {
        let r = ranges("00:1f.0-01:00.7");
        assert_eq!(r[0].endpoint_ids(), (0xf8, 0x107));
        let t = build_viot(addr("00:03.0"), &r, &TableIds::default()).unwrap();
        assert_eq!((le16(&t, 64 + 12), le16(&t, 64 + 14)), (0xf8, 0x107));
    }

    #[test]
    fn range_crossing_segments_is_refused() {
        assert!(matches!(
            parse_ranges("0000:00:04.0-0001:00:04.7"),
            Err(ViotError::CrossesSegments(_))
        ));
        // An end without segment is in the start's segment.
        let r = ranges("0001:00:04.0-00:04.7");
        assert_eq!(r[0].end.segment, 1);
    }

    #[test]
    fn iommu_inside_an_endpoint_range_is_refused_with_a_message() {
        let e = build_viot(
            addr("00:04.3"),
            &ranges("00:04.0-00:04.7"),
            &TableIds::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ViotError::IommuIsEndpoint { .. }));
        assert!(e.to_string().contains("0000:00:04.3"), "{e}");
        assert!(e.to_string().contains("0000:00:04.0-0000:00:04.7"), "{e}");
        // The same RID in another segment is another device.
        build_viot(
            addr("0001:00:04.3"),
            &ranges("00:04.0-00:04.7"),
            &TableIds::default(),
        )
        .unwrap();
    }

    #[test]
    fn overlapping_endpoint_ids_are_refused() {
        for eps in ["00:04.0-00:04.7,00:04.7", "00:04.0,0001:00:04.0"] {
            let e = build_viot(addr("00:03.0"), &ranges(eps), &TableIds::default());
            assert!(matches!(e, Err(ViotError::Overlap(..))), "{eps}: {e:?}");
        }
    }

    #[test]
    fn empty_endpoint_list_or_item_is_refused() {
        assert_eq!(parse_ranges(""), Err(ViotError::NoEndpoints));
        assert!(matches!(
            parse_ranges("00:04.0,"),
            Err(ViotError::EmptyItem(_))
        ));
        assert_eq!(
            build_viot(addr("00:03.0"), &[], &TableIds::default()),
            Err(ViotError::NoEndpoints)
        );
    }

    #[test]
    fn too_many_ranges_are_refused() {
        let many: Vec<PciRange> = (0..=MAX_RANGES)
            .map(|i| {
                let a = PciAddress {
                    segment: 0,
                    bus: (i >> 8) as u8 + 1,
                    device: ((i >> 3) & 0x1f) as u8,
                    function: (i & 7) as u8,
                };
                PciRange { start: a, end: a }
            })
            .collect();
        assert_eq!(
            build_viot(addr("00:03.0"), &many, &TableIds::default()),
            Err(ViotError::TooManyRanges(MAX_RANGES + 1))
        );
        assert!(build_viot(addr("00:03.0"), &many[..MAX_RANGES], &TableIds::default()).is_ok());
    }

    #[test]
    fn run_writes_the_table_to_the_output_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("viot.bin");
        let args = ViotArgs {
            iommu_bdf: addr("00:03.0"),
            endpoints: EndpointRanges(ranges("00:04.0")),
            output: out.clone(),
        };
        run(&args).unwrap();
        let t = fs::read(&out).unwrap();
        assert_eq!(&t[..4], b"VIOT");
        assert_eq!(t.len(), 88);
        let args = ViotArgs {
            output: dir.path().join("missing/viot.bin"),
            ..args
        };
        assert!(matches!(run(&args), Err(ViotError::Write { .. })));
    }
}
