// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The client-side IOTLB: translations the daemon returned, kept per
//! endpoint until the daemon invalidates them.
//!
//! A direct-mapped table answers repeated lookups of the same pages with
//! one probe; behind it, each endpoint's extents sit in an interval map.
//! Only the reader thread writes (inserting replies and applying
//! invalidations, in the order the daemon sent them).

use std::collections::{BTreeMap, HashMap};

use viommu::{Access, Invalidation};
use viommu_protocol::Extent;

/// Slots of the direct-mapped table (a power of two).
const TLB_SLOTS: usize = 1024;
/// Extents kept before the cache starts over.
const MAX_EXTENTS: usize = 1 << 16;
const PAGE_SHIFT: u32 = 12;

#[derive(Clone, Copy)]
struct Slot {
    endpoint: u32,
    ext: Extent,
}

/// Cached translations.
pub struct Cache {
    tlb: Vec<Option<Slot>>,
    endpoints: HashMap<u32, BTreeMap<u64, Extent>>,
    extents: usize,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            tlb: vec![None; TLB_SLOTS],
            endpoints: HashMap::new(),
            extents: 0,
        }
    }
}

fn slot_of(endpoint: u32, iova: u64) -> usize {
    let key = (iova >> PAGE_SHIFT) ^ (u64::from(endpoint) << 40);
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize & (TLB_SLOTS - 1)
}

fn allows(ext: &Extent, access: Access) -> bool {
    ext.flags & access.map_flag() != 0
}

fn overlaps(ext: &Extent, start: u64, end: u64) -> bool {
    ext.iova_start <= end && start <= ext.iova_end
}

impl Cache {
    /// The cached extent covering `iova`, if it allows `access`.
    #[inline]
    pub fn lookup(&self, endpoint: u32, iova: u64, access: Access) -> Option<Extent> {
        if let Some(Some(s)) = self.tlb.get(slot_of(endpoint, iova)) {
            if s.endpoint == endpoint && s.ext.iova_start <= iova && iova <= s.ext.iova_end {
                return allows(&s.ext, access).then_some(s.ext);
            }
        }
        let (_, ext) = self.endpoints.get(&endpoint)?.range(..=iova).next_back()?;
        (iova <= ext.iova_end && allows(ext, access)).then_some(*ext)
    }

    /// Records the extents of a translation of `endpoint` at `iova`.
    pub fn insert(&mut self, endpoint: u32, iova: u64, extents: &[Extent]) {
        if self.extents + extents.len() > MAX_EXTENTS {
            self.clear();
        }
        let map = self.endpoints.entry(endpoint).or_default();
        for ext in extents {
            // A stale overlapping extent cannot exist (it would have been
            // invalidated), but an identical one can: replace it.
            if map.insert(ext.iova_start, *ext).is_none() {
                self.extents += 1;
            }
        }
        if let Some(first) = extents.first() {
            self.tlb[slot_of(endpoint, iova)] = Some(Slot {
                endpoint,
                ext: *first,
            });
        }
    }

    /// Drops what `scope` makes stale.
    pub fn invalidate(&mut self, scope: Invalidation) {
        match scope {
            Invalidation::All => self.clear(),
            Invalidation::Endpoint(ep) => {
                if let Some(map) = self.endpoints.remove(&ep) {
                    self.extents -= map.len();
                }
                for s in self.tlb.iter_mut() {
                    if s.is_some_and(|s| s.endpoint == ep) {
                        *s = None;
                    }
                }
            }
            Invalidation::DomainRange { domain, start, end } => {
                for map in self.endpoints.values_mut() {
                    let before = map.len();
                    map.retain(|_, e| !(e.domain == domain && overlaps(e, start, end)));
                    self.extents -= before - map.len();
                }
                for s in self.tlb.iter_mut() {
                    if s.is_some_and(|s| s.ext.domain == domain && overlaps(&s.ext, start, end)) {
                        *s = None;
                    }
                }
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.endpoints.clear();
        self.tlb.iter_mut().for_each(|s| *s = None);
        self.extents = 0;
    }

    /// Number of cached extents.
    pub fn len(&self) -> usize {
        self.extents
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.extents == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, end: u64, gpa: u64, domain: u32) -> Extent {
        Extent {
            iova_start: start,
            iova_end: end,
            gpa_start: gpa,
            domain,
            flags: 3,
        }
    }

    #[test]
    fn unmap_of_a_domain_range_drops_exactly_the_overlapping_extents() {
        let mut c = Cache::default();
        c.insert(8, 0x1000, &[ext(0x1000, 0x1fff, 0x9000, 1)]);
        c.insert(8, 0x5000, &[ext(0x5000, 0x5fff, 0xa000, 1)]);
        c.insert(9, 0x1000, &[ext(0x1000, 0x1fff, 0xb000, 2)]);
        c.invalidate(Invalidation::DomainRange {
            domain: 1,
            start: 0x1800,
            end: 0x2fff,
        });
        assert!(c.lookup(8, 0x1000, Access::Read).is_none());
        assert!(c.lookup(8, 0x5000, Access::Read).is_some());
        assert!(
            c.lookup(9, 0x1000, Access::Read).is_some(),
            "other domain dropped"
        );
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn endpoint_invalidation_drops_its_direct_mapped_slots_too() {
        let mut c = Cache::default();
        c.insert(8, 0x1000, &[ext(0, u64::MAX, 0, u32::MAX)]);
        assert!(c.lookup(8, 0x1000, Access::Write).is_some());
        c.invalidate(Invalidation::Endpoint(8));
        assert!(c.lookup(8, 0x1000, Access::Write).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn lookup_honours_permissions() {
        let mut c = Cache::default();
        let mut e = ext(0x1000, 0x1fff, 0, 1);
        e.flags = viommu::wire::VIRTIO_IOMMU_MAP_F_READ;
        c.insert(8, 0x1000, &[e]);
        assert!(c.lookup(8, 0x1000, Access::Read).is_some());
        assert!(c.lookup(8, 0x1000, Access::Write).is_none());
    }
}
