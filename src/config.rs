// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Static configuration of one virtio-iommu device: what the config space
//! advertises, which endpoints exist, reserved regions and resource caps.

use std::{fmt, ops::RangeInclusive, str::FromStr};

use thiserror::Error;
use vm_memory::ByteValued;

use crate::{
    parse::{parse_u32, parse_u32_range, ParseError},
    prq::Limits,
    wire::*,
};

/// Invalid device configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No page size at all.
    #[error("page_size_mask must have at least one bit set")]
    EmptyPageSizeMask,
    /// `input_range` start above its end.
    #[error("input range {0:#x}-{1:#x} is empty")]
    EmptyInputRange(u64, u64),
    /// `domain_range` start above its end.
    #[error("domain range {0}-{1} is empty")]
    EmptyDomainRange(u32, u32),
    /// The PROBE area cannot hold the properties the device reports.
    #[error("probe_size {size} cannot hold the {need} bytes of properties")]
    ProbeSizeTooSmall {
        /// The configured size.
        size: u32,
        /// Bytes of properties.
        need: usize,
    },
    /// A PROBE area beyond [`MAX_PROBE_SIZE`].
    #[error("probe_size {0} is above the limit of {MAX_PROBE_SIZE} bytes")]
    ProbeSizeTooLarge(u32),
    /// An IOVA width the device cannot have.
    #[error("input range bits must be between 12 and 64, got {0}")]
    InputRangeBits(u32),
    /// An item of an endpoint list is not an ID or a range.
    #[error("invalid endpoint list `{list}`")]
    EndpointList {
        /// The whole list.
        list: String,
        /// What is wrong with the item.
        #[source]
        source: ParseError,
    },
    /// An endpoint list with an empty item (`1,,2`).
    #[error("invalid endpoint list `{0}`: empty item")]
    EmptyEndpointItem(String),
    /// Not a domain range.
    #[error("invalid domain range")]
    DomainRange(#[source] ParseError),
    /// The smallest page size is larger than the whole IOVA space.
    #[error("the granule ({granule:#x} bytes, lowest bit of page_size_mask) is larger than the input range")]
    GranuleTooLarge {
        /// The granule.
        granule: u64,
    },
    /// An unknown table format name.
    #[error("unknown table format `{0}` (vtd, smmuv3 or none)")]
    TableFormat(String),
    /// A PASID width beyond PCIe's 20 bits.
    #[error("endpoint PASID width {0} is above 20 bits")]
    PasidBits(u8),
    /// A guest-physical width the walkers do not support.
    #[error("output address width {0} is outside 32..=52")]
    OutputBits(u8),
    /// Zero of something the device needs at least one of.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// Largest `probe_size` the device accepts; PROBE buffers are built in memory.
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;

/// The set of endpoint IDs that exist behind this IOMMU, as sorted,
/// disjoint, inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet(Vec<RangeInclusive<u32>>);

impl EndpointSet {
    /// Every 16-bit PCI requester ID.
    pub fn all_pci_rids() -> Self {
        EndpointSet(vec![0..=0xffff])
    }

    /// The set of IDs in `ranges` (in any order, overlapping or not).
    pub fn from_ranges(mut ranges: Vec<RangeInclusive<u32>>) -> Self {
        ranges.sort_by_key(|r| *r.start());
        let mut merged: Vec<RangeInclusive<u32>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if u64::from(*r.start()) <= u64::from(*last.end()) + 1 => {
                    *last = *last.start()..=(*last.end()).max(*r.end());
                }
                _ => merged.push(r),
            }
        }
        EndpointSet(merged)
    }

    /// Whether endpoint `id` exists.
    pub fn contains(&self, id: u32) -> bool {
        let i = self.0.partition_point(|r| *r.end() < id);
        self.0.get(i).is_some_and(|r| r.contains(&id))
    }

    /// The sorted, disjoint ranges of the set.
    pub fn ranges(&self) -> &[RangeInclusive<u32>] {
        &self.0
    }
}

impl FromStr for EndpointSet {
    type Err = ConfigError;

    /// Comma-separated IDs or inclusive ranges, decimal or hex: `0x20-0x27,5`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |source| ConfigError::EndpointList {
            list: s.to_string(),
            source,
        };
        let mut ranges = Vec::new();
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(ConfigError::EmptyEndpointItem(s.to_string()));
            }
            let range = if item.contains('-') {
                parse_u32_range(item).map_err(err)?
            } else {
                let a = parse_u32(item).map_err(err)?;
                a..=a
            };
            ranges.push(range);
        }
        Ok(EndpointSet::from_ranges(ranges))
    }
}

impl fmt::Display for EndpointSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.start() == r.end() {
                write!(f, "{:#x}", r.start())?;
            } else {
                write!(f, "{:#x}-{:#x}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

/// Parses a domain range `A-B` (decimal or hex, inclusive).
pub fn parse_domain_range(s: &str) -> Result<(u32, u32), ConfigError> {
    let r = parse_u32_range(s).map_err(ConfigError::DomainRange)?;
    Ok((*r.start(), *r.end()))
}

/// A RESV_MEM region reported by PROBE for every endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRegion {
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
    /// `VIRTIO_IOMMU_RESV_MEM_T_*`.
    pub subtype: u8,
}

/// The x86 MSI doorbell window, reported like QEMU does on PC machines.
pub const X86_MSI_WINDOW: ReservedRegion = ReservedRegion {
    start: 0xfee0_0000,
    end: 0xfeef_ffff,
    subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
};

/// The table formats ATTACH_TABLE accepts (docs/extension-spec.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableFormats {
    /// `PGTF_VTD`: x86-64 first-stage tables, with or without PASID.
    pub vtd: bool,
    /// `PSTF_ARM_SMMU_V3`: Arm SMMUv3 context-descriptor tables.
    pub smmu: bool,
}

impl TableFormats {
    /// Both formats.
    pub const ALL: TableFormats = TableFormats {
        vtd: true,
        smmu: true,
    };

    /// Whether ATTACH_TABLE is offered at all.
    pub fn any(self) -> bool {
        self.vtd || self.smmu
    }

    /// Whether `format` (`VIRTIO_IOMMU_PGTF_*` / `PSTF_*`) is accepted.
    pub fn offers(self, format: u16) -> bool {
        match format {
            VIRTIO_IOMMU_PGTF_VTD => self.vtd,
            VIRTIO_IOMMU_PSTF_ARM_SMMU_V3 => self.smmu,
            _ => false,
        }
    }
}

impl FromStr for TableFormats {
    type Err = ConfigError;

    /// `vtd`, `smmuv3`, both comma-separated, or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut f = TableFormats::default();
        for item in s.split(',').map(str::trim) {
            match item {
                "vtd" => f.vtd = true,
                "smmuv3" => f.smmu = true,
                "none" => {}
                other => return Err(ConfigError::TableFormat(other.to_string())),
            }
        }
        Ok(f)
    }
}

impl fmt::Display for TableFormats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.vtd, self.smmu) {
            (true, true) => f.write_str("vtd,smmuv3"),
            (true, false) => f.write_str("vtd"),
            (false, true) => f.write_str("smmuv3"),
            (false, false) => f.write_str("none"),
        }
    }
}

/// Static configuration of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Supported page sizes; the lowest set bit is the mapping granule.
    pub page_size_mask: u64,
    /// First and last translatable IOVA (inclusive).
    pub input_range: (u64, u64),
    /// Lowest and highest valid domain ID (inclusive).
    pub domain_range: (u32, u32),
    /// Size of the PROBE properties area; 0 disables PROBE.
    pub probe_size: u32,
    /// Initial value of the `bypass` config field.
    pub boot_bypass: bool,
    /// Offer `VIRTIO_IOMMU_F_BYPASS_CONFIG`.
    pub bypass_config: bool,
    /// Offer `VIRTIO_IOMMU_F_MMIO`.
    pub mmio: bool,
    /// Endpoints that exist; any other ID gets `S_NOENT`.
    pub endpoints: EndpointSet,
    /// RESV_MEM regions of every endpoint.
    pub reserved_regions: Vec<ReservedRegion>,
    /// At most this many domains exist at once.
    pub max_domains: usize,
    /// At most this many mappings per domain.
    pub max_mappings_per_domain: usize,
    /// Offer `VIRTIO_IOMMU_F_PASID_ALLOC` (the daemon has a host-wide
    /// PASID allocator for the guest).
    pub pasid_alloc: bool,
    /// Table formats ATTACH_TABLE accepts; none: the feature is not
    /// offered.
    pub table_formats: TableFormats,
    /// PASID width of every endpoint (PROBE `PASID_SIZE`); 0: no PASID
    /// bindings.
    pub endpoint_pasid_bits: u8,
    /// Guest-physical address width (PROBE `OUTPUT_SIZE`): bound tables
    /// are walked with it, table entries above it are reserved.
    pub output_bits: u8,
    /// At most this many PASID bindings per endpoint.
    pub max_bindings_per_endpoint: usize,
    /// Offer `VIRTIO_IOMMU_F_PAGE_REQUEST` (with ATTACH_TABLE) and bound
    /// the page-request groups with these limits; `None`: not offered.
    pub page_requests: Option<Limits>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            // 4 KiB granule and every larger power of two, as QEMU on x86.
            page_size_mask: !0xfff,
            input_range: (0, (1 << 48) - 1),
            domain_range: (0, u32::MAX),
            probe_size: 512,
            boot_bypass: true,
            bypass_config: true,
            mmio: true,
            endpoints: EndpointSet::all_pci_rids(),
            reserved_regions: if cfg!(target_arch = "x86_64") {
                vec![X86_MSI_WINDOW]
            } else {
                Vec::new()
            },
            max_domains: 65536,
            max_mappings_per_domain: 1 << 20,
            pasid_alloc: false,
            table_formats: TableFormats::ALL,
            endpoint_pasid_bits: 20,
            output_bits: 48,
            max_bindings_per_endpoint: 1024,
            page_requests: Some(Limits::default()),
        }
    }
}

impl DeviceConfig {
    /// Checks that the configuration describes a device a driver can use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.page_size_mask == 0 {
            return Err(ConfigError::EmptyPageSizeMask);
        }
        if self.input_range.0 > self.input_range.1 {
            return Err(ConfigError::EmptyInputRange(
                self.input_range.0,
                self.input_range.1,
            ));
        }
        if self.granule() - 1 > self.input_range.1 - self.input_range.0 {
            return Err(ConfigError::GranuleTooLarge {
                granule: self.granule(),
            });
        }
        if self.domain_range.0 > self.domain_range.1 {
            return Err(ConfigError::EmptyDomainRange(
                self.domain_range.0,
                self.domain_range.1,
            ));
        }
        if self.max_domains == 0 {
            return Err(ConfigError::Zero("max_domains"));
        }
        if self.max_mappings_per_domain == 0 {
            return Err(ConfigError::Zero("max_mappings_per_domain"));
        }
        if self.probe_size > MAX_PROBE_SIZE {
            return Err(ConfigError::ProbeSizeTooLarge(self.probe_size));
        }
        if self.endpoint_pasid_bits > 20 {
            return Err(ConfigError::PasidBits(self.endpoint_pasid_bits));
        }
        if !(32..=52).contains(&self.output_bits) {
            return Err(ConfigError::OutputBits(self.output_bits));
        }
        if self.table_formats.any() && self.max_bindings_per_endpoint == 0 {
            return Err(ConfigError::Zero("max_bindings_per_endpoint"));
        }
        if let Some(l) = &self.page_requests {
            if l.groups_per_endpoint == 0 || l.groups_total == 0 {
                return Err(ConfigError::Zero("page-request groups"));
            }
        }
        let mut props = Vec::new();
        self.probe_properties(&[], true, true, &mut props);
        let need = props.len();
        if self.probe_size != 0 && (self.probe_size as usize) < need {
            return Err(ConfigError::ProbeSizeTooSmall {
                size: self.probe_size,
                need,
            });
        }
        Ok(())
    }

    /// Input range covering `bits` bits of IOVA.
    pub fn input_range_from_bits(bits: u32) -> Result<(u64, u64), ConfigError> {
        match bits {
            64 => Ok((0, u64::MAX)),
            12..=63 => Ok((0, (1u64 << bits) - 1)),
            _ => Err(ConfigError::InputRangeBits(bits)),
        }
    }

    /// Mapping granule: the smallest supported page size.
    pub fn granule(&self) -> u64 {
        1 << self.page_size_mask.trailing_zeros()
    }

    /// Device-specific feature bits this configuration offers.
    pub fn device_features(&self) -> u64 {
        let mut f = 1 << VIRTIO_IOMMU_F_INPUT_RANGE
            | 1 << VIRTIO_IOMMU_F_DOMAIN_RANGE
            | 1 << VIRTIO_IOMMU_F_MAP_UNMAP;
        if self.probe_size > 0 {
            f |= 1 << VIRTIO_IOMMU_F_PROBE;
        }
        if self.mmio {
            f |= 1 << VIRTIO_IOMMU_F_MMIO;
        }
        if self.bypass_config {
            f |= 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG;
        }
        if self.pasid_alloc {
            f |= 1 << VIRTIO_IOMMU_F_PASID_ALLOC;
        }
        if self.table_formats.any() {
            f |= 1 << VIRTIO_IOMMU_F_ATTACH_TABLE;
            // Page requests are about bound tables: never without them.
            if self.page_requests.is_some() {
                f |= 1 << VIRTIO_IOMMU_F_PAGE_REQUEST;
            }
        }
        f
    }

    /// Appends the PROBE properties of every endpoint to `out`: RESV_MEM,
    /// then, when the driver negotiated ATTACH_TABLE (`tables`), the
    /// output and PASID widths and the table formats, and when it also
    /// negotiated PAGE_REQUEST (`page_requests`), PAGE_REQUEST.
    /// `extra` are the endpoint's own reserved regions (host constraints),
    /// reported after the device-wide ones.
    pub fn probe_properties(
        &self,
        extra: &[ReservedRegion],
        tables: bool,
        page_requests: bool,
        out: &mut Vec<u8>,
    ) {
        let header = |prop_type: u16, total: usize| ProbeProperty {
            prop_type: prop_type.into(),
            // Property sizes are small constants.
            length: ((total - std::mem::size_of::<ProbeProperty>()) as u16).into(),
        };
        for r in self.reserved_regions.iter().chain(extra) {
            let prop = ProbeResvMem {
                head: header(
                    VIRTIO_IOMMU_PROBE_T_RESV_MEM,
                    std::mem::size_of::<ProbeResvMem>(),
                ),
                subtype: r.subtype,
                reserved: [0; 3],
                start: r.start.into(),
                end: r.end.into(),
            };
            out.extend_from_slice(prop.as_slice());
        }
        if !tables || !self.table_formats.any() {
            return;
        }
        let bits = |prop_type, bits| ProbeBits {
            head: header(prop_type, std::mem::size_of::<ProbeBits>()),
            bits,
            reserved: [0; 3],
        };
        out.extend_from_slice(bits(VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE, self.output_bits).as_slice());
        if self.endpoint_pasid_bits > 0 {
            let pasid = bits(VIRTIO_IOMMU_PROBE_T_PASID_SIZE, self.endpoint_pasid_bits);
            out.extend_from_slice(pasid.as_slice());
        }
        if self.table_formats.vtd {
            let (cap, ecap) = self.vtd_cap_ecap();
            let prop = ProbePgtVtd {
                head: header(
                    VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT,
                    std::mem::size_of::<ProbePgtVtd>(),
                ),
                format: VIRTIO_IOMMU_PGTF_VTD.into(),
                reserved: [0; 2],
                cap_reg: cap.into(),
                ecap_reg: ecap.into(),
            };
            out.extend_from_slice(prop.as_slice());
        }
        if self.table_formats.smmu {
            let prop = ProbePstfSmmu {
                head: header(
                    VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT,
                    std::mem::size_of::<ProbePstfSmmu>(),
                ),
                format: VIRTIO_IOMMU_PSTF_ARM_SMMU_V3.into(),
                reserved: [0; 2],
                flags: VIRTIO_IOMMU_PST_ARM_SMMU3_F_CD2L.into(),
            };
            out.extend_from_slice(prop.as_slice());
        }
        if let (true, Some(limits)) = (page_requests, &self.page_requests) {
            // A PAGE_RESP names its group with the group's PASID.
            let prop = ProbePageRequest {
                head: header(
                    VIRTIO_IOMMU_PROBE_T_PAGE_REQUEST,
                    std::mem::size_of::<ProbePageRequest>(),
                ),
                flags: (VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_PRI
                    | VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_RESP_PASID)
                    .into(),
                max_outstanding_groups: limits.groups_per_endpoint.into(),
                reserved: [0; 4],
            };
            out.extend_from_slice(prop.as_slice());
        }
    }

    /// VT-d CAP_REG and ECAP_REG images describing what the software
    /// walker does, for the guest of a `PGTF_VTD` table (bit positions as
    /// the VT-d specification and Linux's `iommu.h` give them).
    pub fn vtd_cap_ecap(&self) -> (u64, u64) {
        const CAP_SAGAW_4LEVEL: u64 = 1 << 10;
        const CAP_SAGAW_5LEVEL: u64 = 1 << 11;
        const CAP_FL1GP: u64 = 1 << 56;
        const CAP_FL5LP: u64 = 1 << 60;
        const ECAP_C: u64 = 1 << 0;
        const ECAP_QI: u64 = 1 << 1;
        const ECAP_DT: u64 = 1 << 2;
        const ECAP_ERS: u64 = 1 << 30;
        const ECAP_SRS: u64 = 1 << 31;
        const ECAP_EAFS: u64 = 1 << 34;
        const ECAP_PASID: u64 = 1 << 40;
        const ECAP_SMTS: u64 = 1 << 43;
        const ECAP_FLTS: u64 = 1 << 47;
        let mgaw = u64::from(self.output_bits - 1) << 16;
        let cap = CAP_SAGAW_4LEVEL | CAP_SAGAW_5LEVEL | mgaw | CAP_FL1GP | CAP_FL5LP;
        let mut ecap = ECAP_C | ECAP_QI | ECAP_DT | ECAP_ERS | ECAP_SRS | ECAP_EAFS;
        ecap |= ECAP_SMTS | ECAP_FLTS;
        if self.endpoint_pasid_bits > 0 {
            ecap |= ECAP_PASID | u64::from(self.endpoint_pasid_bits - 1) << 35;
        }
        (cap, ecap)
    }

    /// Config space image with the given `bypass` value.
    pub fn config_space(&self, bypass: bool) -> VirtioIommuConfig {
        VirtioIommuConfig {
            page_size_mask: self.page_size_mask.into(),
            input_range_start: self.input_range.0.into(),
            input_range_end: self.input_range.1.into(),
            domain_range_start: self.domain_range.0.into(),
            domain_range_end: self.domain_range.1.into(),
            probe_size: self.probe_size.into(),
            bypass: u8::from(bypass && self.bypass_config),
            reserved: [0; 3],
        }
    }

    /// Bytes `[offset, offset + size)` of the config space, zero past its end.
    pub fn read_config(&self, bypass: bool, offset: usize, size: usize) -> Vec<u8> {
        let cfg = self.config_space(bypass);
        let bytes = cfg.as_slice();
        (offset..offset.saturating_add(size))
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_list_accepts_hex_ranges_and_decimal_ids() {
        let set: EndpointSet = "0x20-0x27,5".parse().unwrap();
        assert!(set.contains(0x20) && set.contains(0x27) && set.contains(5));
        assert!(!set.contains(0x28) && !set.contains(4) && !set.contains(6));
        assert_eq!(set.to_string(), "0x5,0x20-0x27");
    }

    #[test]
    fn endpoint_list_merges_adjacent_ranges() {
        let set: EndpointSet = "1-3,4,6-7,5".parse().unwrap();
        assert_eq!(set.ranges(), &[1..=7]);
    }

    #[test]
    fn endpoint_list_rejects_garbage() {
        for bad in ["", "1,,2", "x", "5-1", "0x-3", "1-2-3", "4294967296"] {
            assert!(bad.parse::<EndpointSet>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn default_endpoints_are_all_16_bit_requester_ids() {
        let set = EndpointSet::all_pci_rids();
        assert!(set.contains(0) && set.contains(0xffff) && !set.contains(0x10000));
    }

    #[test]
    fn config_read_is_exactly_the_requested_size_and_zero_filled() {
        let cfg = DeviceConfig::default();
        let b = cfg.read_config(true, 0x20, 0x30);
        assert_eq!(b.len(), 0x30);
        assert_eq!(&b[0..4], &512u32.to_le_bytes());
        assert_eq!(b[4], 1);
        assert!(b[8..].iter().all(|&x| x == 0));
    }

    #[test]
    fn bypass_reads_zero_when_bypass_config_is_not_offered() {
        let cfg = DeviceConfig {
            bypass_config: false,
            ..Default::default()
        };
        assert_eq!(cfg.config_space(true).bypass, 0);
    }

    #[test]
    fn probe_size_must_hold_the_extension_properties_too() {
        let cfg = DeviceConfig {
            probe_size: 95,
            reserved_regions: vec![X86_MSI_WINDOW],
            ..Default::default()
        };
        // RESV_MEM 24, OUTPUT_SIZE 8, PASID_SIZE 8, PGT_VTD 24, PSTF 16,
        // PAGE_REQUEST 16.
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::ProbeSizeTooSmall { size: 95, need: 96 })
        );
    }

    #[test]
    fn probe_size_must_hold_the_reserved_regions() {
        let cfg = DeviceConfig {
            probe_size: 16,
            reserved_regions: vec![X86_MSI_WINDOW],
            table_formats: TableFormats::default(),
            ..Default::default()
        };
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::ProbeSizeTooSmall { size: 16, need: 24 })
        );
        assert_eq!(
            DeviceConfig {
                probe_size: 24,
                ..cfg
            }
            .validate(),
            Ok(())
        );
    }
}
