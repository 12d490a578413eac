// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Changes of the IOMMU state that the world outside the device must
//! follow, and what each one makes stale.
//!
//! A [`StateChange`] is what a VMM shadows into VFIO or iommufd; an
//! [`Invalidation`] is what a translation cache (the daemon's, or a
//! device model's) must drop before the guest's request that caused the
//! change may complete.

use crate::{
    mapping::Mapping,
    table::{TableInvalidation, TableSpec},
    wire::VIRTIO_IOMMU_INV_T_PASID,
};

/// A change of the IOMMU state that a VMM may need to shadow (VFIO,
/// iommufd) or a translation cache may need to drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateChange {
    /// `endpoint` joined `domain` (a bypass domain when `bypass`).
    Attach {
        /// The endpoint.
        endpoint: u32,
        /// The domain it joined.
        domain: u32,
        /// The domain is a bypass domain (identity translation).
        bypass: bool,
    },
    /// `endpoint` left `domain`; a domain that loses its last endpoint
    /// ceases to exist together with its mappings.
    Detach {
        /// The endpoint.
        endpoint: u32,
        /// The domain it left.
        domain: u32,
    },
    /// A MAP request added `mapping` to `domain`.
    Map {
        /// The domain.
        domain: u32,
        /// The new mapping.
        mapping: Mapping,
    },
    /// An UNMAP request removed every mapping of `domain` inside
    /// `[virt_start, virt_end]`.
    Unmap {
        /// The domain.
        domain: u32,
        /// First IOVA of the range.
        virt_start: u64,
        /// Last IOVA of the range (inclusive).
        virt_end: u64,
    },
    /// The `bypass` config field changed to this value.
    Bypass(bool),
    /// Device reset: every endpoint detached, every domain gone, every
    /// table unbound.
    Reset,
    /// ATTACH_TABLE bound `table` to `endpoint`: with `pasid` 0 the
    /// endpoint's DMA without PASID goes through `domain`'s table (an
    /// ATTACH of the endpoint to `domain` precedes this change); with a
    /// PASID, DMA with that PASID does.
    TableBound {
        /// The endpoint.
        endpoint: u32,
        /// The domain holding the table.
        domain: u32,
        /// The PASID; 0 for DMA without PASID.
        pasid: u32,
        /// The table.
        table: TableSpec,
    },
    /// DETACH_TABLE, a DETACH or a rebinding removed a PASID binding.
    TableUnbound {
        /// The endpoint.
        endpoint: u32,
        /// The domain it went through.
        domain: u32,
        /// The PASID.
        pasid: u32,
    },
    /// The guest changed a bound table (INVALIDATE).
    TableInvalidate(TableInvalidation),
}

/// Cached translations that a change makes stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Translations from `domain` within `[start, end]`.
    DomainRange {
        /// The domain.
        domain: u32,
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive).
        end: u64,
    },
    /// Every translation of an endpoint.
    Endpoint(u32),
    /// Everything.
    All,
    /// Every translation through a domain (with and without PASID).
    Domain(u32),
    /// Addresses `[start, end]` of `domain`'s table, for one PASID or
    /// (`None`) every PASID using it.
    TableRange {
        /// The domain.
        domain: u32,
        /// The PASID (0: DMA without PASID), or every PASID.
        pasid: Option<u32>,
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// Every translation of one PASID (0: without PASID) through `domain`.
    TablePasid {
        /// The domain.
        domain: u32,
        /// The PASID.
        pasid: u32,
    },
    /// Every translation of one (endpoint, PASID) binding.
    Binding {
        /// The endpoint.
        endpoint: u32,
        /// The PASID.
        pasid: u32,
    },
}

impl StateChange {
    /// What cached translations this change makes stale, if any. A MAP
    /// invalidates nothing: caches hold only successful translations.
    pub fn invalidates(&self) -> Option<Invalidation> {
        match *self {
            StateChange::Attach { endpoint, .. } | StateChange::Detach { endpoint, .. } => {
                Some(Invalidation::Endpoint(endpoint))
            }
            StateChange::Unmap {
                domain,
                virt_start,
                virt_end,
            } => Some(Invalidation::DomainRange {
                domain,
                start: virt_start,
                end: virt_end,
            }),
            StateChange::Bypass(_) | StateChange::Reset => Some(Invalidation::All),
            StateChange::Map { .. } => None,
            // A PASID-0 table comes with an ATTACH, which invalidates the
            // endpoint; a PASID binding replaces whatever served it.
            StateChange::TableBound {
                endpoint, pasid, ..
            }
            | StateChange::TableUnbound {
                endpoint, pasid, ..
            } => Some(Invalidation::Binding { endpoint, pasid }),
            StateChange::TableInvalidate(inv) => Some(inv.invalidates()),
        }
    }
}

impl TableInvalidation {
    /// The cached translations this invalidation makes stale. A PASID
    /// (context-descriptor) cache invalidation covers the whole PASID,
    /// since caches hold whole walks.
    pub fn invalidates(&self) -> Invalidation {
        match (self.range, self.pasid) {
            (Some((start, end)), pasid) if self.types & VIRTIO_IOMMU_INV_T_PASID == 0 => {
                Invalidation::TableRange {
                    domain: self.domain,
                    pasid,
                    start,
                    end,
                }
            }
            (_, Some(pasid)) => Invalidation::TablePasid {
                domain: self.domain,
                pasid,
            },
            (_, None) => Invalidation::Domain(self.domain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmap_invalidates_its_domain_range_and_map_invalidates_nothing() {
        let unmap = StateChange::Unmap {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
        };
        assert_eq!(
            unmap.invalidates(),
            Some(Invalidation::DomainRange {
                domain: 1,
                start: 0x1000,
                end: 0x1fff
            })
        );
        let mapping = Mapping {
            virt_start: 0,
            virt_end: 1,
            phys_start: 0,
            flags: 0,
        };
        assert_eq!(StateChange::Map { domain: 1, mapping }.invalidates(), None);
    }

    #[test]
    fn attach_and_detach_invalidate_the_endpoint_reset_and_bypass_everything() {
        for c in [
            StateChange::Detach {
                endpoint: 4,
                domain: 1,
            },
            StateChange::Attach {
                endpoint: 4,
                domain: 1,
                bypass: false,
            },
        ] {
            assert_eq!(c.invalidates(), Some(Invalidation::Endpoint(4)));
        }
        assert_eq!(StateChange::Reset.invalidates(), Some(Invalidation::All));
        assert_eq!(
            StateChange::Bypass(true).invalidates(),
            Some(Invalidation::All)
        );
    }
}
