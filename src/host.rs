// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host constraints of passed-through endpoints: what the host IOMMU in
//! front of a real device cannot map, so that the guest never maps it.
//!
//! A VMM knows, for each device it passes through, the host's reserved
//! IOVA regions (VFIO's `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE` holes,
//! iommufd's `IOMMU_IOAS_IOVA_RANGES`) and the host IOMMU's page sizes
//! (`iova_pgsizes`). QEMU feeds both into its own virtio-iommu
//! (`HostIOMMUDevice`); this daemon gets them per endpoint from the
//! control socket or `--host-constraints`.
//!
//! - Reserved regions go into that endpoint's PROBE (RESV_MEM, after the
//!   device-wide ones), a MAP overlapping one in a domain the endpoint is
//!   attached to is refused (`S_INVAL`, like a device-wide region), and
//!   ATTACH to a domain that already maps into one is refused
//!   (`S_UNSUPP`: the PROBE properties make them incompatible).
//! - Page sizes: virtio-iommu 1.3 has one `page_size_mask` for the whole
//!   device, in the config space, which the driver reads once before it
//!   starts (Linux at probe; the draft per-endpoint PROBE property
//!   `PAGE_SIZE_MASK` was never merged, and the mainline driver would log
//!   it as unknown). So, like QEMU before machine-init-done, a host mask
//!   narrows the device's mask (intersection) until the frontend first
//!   reads it from the config space or a driver negotiates features
//!   (`Viommu::freeze_page_sizes`); afterwards it is only accepted if the granule
//!   the guest already uses is one the host can map (not smaller than the
//!   host's smallest page).
//!
//! Constraints are facts of this host, not guest state: they are not in
//! the saved device state, and a destination's VMM gives its own before
//! loading one (a narrowed `page_size_mask` is guest-visible, and is
//! checked like the rest of the configuration).

use thiserror::Error;

use crate::{
    config::ReservedRegion,
    wire::{VIRTIO_IOMMU_RESV_MEM_T_MSI, VIRTIO_IOMMU_RESV_MEM_T_RESERVED},
};

/// Most reserved regions one endpoint may be given.
pub const MAX_HOST_REGIONS: usize = 64;
/// Most endpoints that may have constraints at once.
pub const MAX_CONSTRAINED_ENDPOINTS: usize = 4096;

/// What the host imposes on one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConstraints {
    /// Page sizes the host IOMMU supports for it; 0: no constraint.
    pub page_size_mask: u64,
    /// IOVA ranges the host cannot map for it (`subtype` RESERVED, or
    /// MSI when the device reports no MSI window of its own).
    pub regions: Vec<ReservedRegion>,
}

/// Why constraints were refused; nothing changed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HostConstraintError {
    /// The endpoint does not exist.
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(u32),
    /// More regions than [`MAX_HOST_REGIONS`].
    #[error("{0} reserved regions given; at most {MAX_HOST_REGIONS} per endpoint")]
    TooManyRegions(usize),
    /// More constrained endpoints than [`MAX_CONSTRAINED_ENDPOINTS`].
    #[error("at most {MAX_CONSTRAINED_ENDPOINTS} endpoints may have host constraints")]
    TooManyEndpoints,
    /// `start` above `end`.
    #[error("reserved region {start:#x}-{end:#x} is empty")]
    EmptyRegion {
        /// First address.
        start: u64,
        /// Last address.
        end: u64,
    },
    /// A subtype other than RESERVED and MSI.
    #[error("unknown reserved-region subtype {0}")]
    UnknownSubtype(u8),
    /// An MSI region for an endpoint that has one (the device's, or a
    /// second one given).
    #[error("endpoint {0} would have two MSI regions")]
    SecondMsiRegion(u32),
    /// Regions of different subtypes overlap.
    #[error("reserved regions overlap with different subtypes at {0:#x}")]
    MixedOverlap(u64),
    /// The host and the device have no page size in common.
    #[error("no page size in common: device {device:#x}, host {host:#x}")]
    NoCommonPageSize {
        /// The device's `page_size_mask`.
        device: u64,
        /// The host's.
        host: u64,
    },
    /// The narrowed granule would not fit the input range.
    #[error("host granule {0:#x} is larger than the IOVA space")]
    GranuleTooLarge(u64),
    /// The guest driver already read `page_size_mask`, and its granule is
    /// smaller than what the host can map.
    #[error("the guest already uses granule {granule:#x}, smaller than the host's {host:#x}: give page sizes before the guest driver starts")]
    TooLate {
        /// The device's granule.
        granule: u64,
        /// The host's smallest page.
        host: u64,
    },
    /// The endpoint's PROBE would not fit `probe_size`.
    #[error("probe_size {size} cannot hold the {need} bytes of this endpoint's properties")]
    ProbeTooSmall {
        /// `probe_size`.
        size: u32,
        /// Bytes needed.
        need: usize,
    },
    /// The endpoint is attached to a domain that maps into a new region.
    #[error("domain {domain} of endpoint {endpoint} already maps {start:#x}-{end:#x}, in a host reserved region")]
    Mapped {
        /// The endpoint.
        endpoint: u32,
        /// Its domain.
        domain: u32,
        /// The conflicting mapping's first IOVA.
        start: u64,
        /// Its last IOVA.
        end: u64,
    },
}

/// Checks `regions` and makes them the endpoint's PROBE list: sorted,
/// overlapping ones of the same subtype merged, and the parts the
/// device-wide `global` regions already cover removed (a host's own MSI
/// window reported as reserved, for example).
pub fn normalize(
    endpoint: u32,
    regions: &[ReservedRegion],
    global: &[ReservedRegion],
) -> Result<Vec<ReservedRegion>, HostConstraintError> {
    if regions.len() > MAX_HOST_REGIONS {
        return Err(HostConstraintError::TooManyRegions(regions.len()));
    }
    let mut msi = global
        .iter()
        .any(|r| r.subtype == VIRTIO_IOMMU_RESV_MEM_T_MSI);
    for r in regions {
        if r.start > r.end {
            return Err(HostConstraintError::EmptyRegion {
                start: r.start,
                end: r.end,
            });
        }
        match r.subtype {
            VIRTIO_IOMMU_RESV_MEM_T_RESERVED => {}
            VIRTIO_IOMMU_RESV_MEM_T_MSI if !msi => msi = true,
            VIRTIO_IOMMU_RESV_MEM_T_MSI => {
                return Err(HostConstraintError::SecondMsiRegion(endpoint))
            }
            other => return Err(HostConstraintError::UnknownSubtype(other)),
        }
    }
    // Remove what the device-wide regions cover.
    let mut cut: Vec<ReservedRegion> = Vec::new();
    for r in regions {
        let mut parts = vec![*r];
        for g in global {
            parts = parts
                .into_iter()
                .flat_map(|p| subtract(p, g.start, g.end))
                .collect();
        }
        cut.extend(parts);
    }
    cut.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<ReservedRegion> = Vec::with_capacity(cut.len());
    for r in cut {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(1) && r.subtype == last.subtype => {
                last.end = last.end.max(r.end);
            }
            Some(last) if r.start <= last.end => {
                return Err(HostConstraintError::MixedOverlap(r.start))
            }
            _ => out.push(r),
        }
    }
    Ok(out)
}

/// `r` without `[start, end]`: zero, one or two regions.
fn subtract(r: ReservedRegion, start: u64, end: u64) -> Vec<ReservedRegion> {
    if end < r.start || start > r.end {
        return vec![r];
    }
    let mut out = Vec::new();
    if start > r.start {
        out.push(ReservedRegion {
            end: start - 1,
            ..r
        });
    }
    if end < r.end {
        out.push(ReservedRegion {
            start: end + 1,
            ..r
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::X86_MSI_WINDOW;

    fn resv(start: u64, end: u64) -> ReservedRegion {
        ReservedRegion {
            start,
            end,
            subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
        }
    }

    #[test]
    fn host_regions_are_merged_and_lose_what_the_device_reserves() {
        let got = normalize(
            1,
            &[
                resv(0xfed0_0000, 0xfeff_ffff),
                resv(0x1000, 0x1fff),
                resv(0x2000, 0x2fff),
            ],
            &[X86_MSI_WINDOW],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                resv(0x1000, 0x2fff),
                resv(0xfed0_0000, 0xfedf_ffff),
                resv(0xfef0_0000, 0xfeff_ffff)
            ]
        );
        // The host's own MSI window reported as reserved disappears.
        assert!(
            normalize(1, &[resv(0xfee0_0000, 0xfeef_ffff)], &[X86_MSI_WINDOW])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_host_regions_are_refused() {
        let msi = |s, e| ReservedRegion {
            start: s,
            end: e,
            subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
        };
        assert_eq!(
            normalize(1, &[resv(2, 1)], &[]),
            Err(HostConstraintError::EmptyRegion { start: 2, end: 1 })
        );
        assert_eq!(
            normalize(1, &[msi(0, 0xfff)], &[X86_MSI_WINDOW]),
            Err(HostConstraintError::SecondMsiRegion(1))
        );
        assert_eq!(
            normalize(1, &[msi(0x8000_0000, 0x800f_ffff)], &[])
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            normalize(1, &[resv(0, 0xfff), msi(0x800, 0x1fff)], &[]),
            Err(HostConstraintError::MixedOverlap(0x800))
        );
        let r = ReservedRegion {
            subtype: 7,
            ..resv(0, 1)
        };
        assert_eq!(
            normalize(1, &[r], &[]),
            Err(HostConstraintError::UnknownSubtype(7))
        );
        let many = vec![resv(0, 1); MAX_HOST_REGIONS + 1];
        assert_eq!(
            normalize(1, &many, &[]),
            Err(HostConstraintError::TooManyRegions(MAX_HOST_REGIONS + 1))
        );
    }
}
