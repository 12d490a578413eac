// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Static configuration of one virtio-iommu device: what the config space
//! advertises, which endpoints exist, reserved regions and resource caps.

use std::{fmt, ops::RangeInclusive, str::FromStr};

use thiserror::Error;
use vm_memory::ByteValued;

use crate::{
    parse::{parse_u32, parse_u32_range, ParseError},
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
        let need = self.reserved_regions.len() * std::mem::size_of::<ProbeResvMem>();
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
        f
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
    fn probe_size_must_hold_the_reserved_regions() {
        let cfg = DeviceConfig {
            probe_size: 16,
            reserved_regions: vec![X86_MSI_WINDOW],
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
