// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Changes of the IOMMU state that the world outside the device must
//! follow, and what each one makes stale.
//!
//! A [`StateChange`] is what a VMM shadows into VFIO or iommufd; an
//! [`Invalidation`] is what a translation cache (the daemon's, or a
//! device model's) must drop before the guest's request that caused the
//! change may complete.

use crate::mapping::Mapping;

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
    /// Device reset: every endpoint detached, every domain gone.
    Reset,
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
