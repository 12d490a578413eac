// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The client-side IOTLB: translations the daemon returned, kept per
//! address space (endpoint, PASID, privilege) until the daemon
//! invalidates them.
//!
//! A direct-mapped table answers repeated lookups of the same pages with
//! one probe; behind it, each address space's extents sit in an interval
//! map. Only the reader thread writes (inserting replies and applying
//! invalidations, in the order the daemon sent them).

use std::collections::{BTreeMap, HashMap};

use viommu::Invalidation;
use viommu_protocol::Extent;

/// Slots of the direct-mapped table (a power of two).
const TLB_SLOTS: usize = 1024;
/// Extents kept before the cache starts over.
const MAX_EXTENTS: usize = 1 << 16;
const PAGE_SHIFT: u32 = 12;

/// An address space of a device: DMA of `endpoint` with `pasid` (0:
/// without PASID) in user or privileged mode (table translations only;
/// IOVA translations are always unprivileged).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Space {
    /// The endpoint.
    pub endpoint: u32,
    /// The PASID; 0 for DMA without PASID.
    pub pasid: u32,
    /// Privileged (supervisor) accesses.
    pub privileged: bool,
}

impl Space {
    /// DMA of `endpoint` without PASID.
    pub fn iova(endpoint: u32) -> Space {
        Space {
            endpoint,
            pasid: 0,
            privileged: false,
        }
    }
}

#[derive(Clone, Copy)]
struct Slot {
    space: Space,
    ext: Extent,
}

/// Cached translations.
pub struct Cache {
    tlb: Vec<Option<Slot>>,
    spaces: HashMap<Space, BTreeMap<u64, Extent>>,
    extents: usize,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            tlb: vec![None; TLB_SLOTS],
            spaces: HashMap::new(),
            extents: 0,
        }
    }
}

fn slot_of(space: Space, iova: u64) -> usize {
    let key = (iova >> PAGE_SHIFT)
        ^ (u64::from(space.endpoint) << 40)
        ^ (u64::from(space.pasid) << 20)
        ^ u64::from(space.privileged);
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize & (TLB_SLOTS - 1)
}

fn overlaps(ext: &Extent, start: u64, end: u64) -> bool {
    ext.iova_start <= end && start <= ext.iova_end
}

impl Cache {
    /// The cached extent covering `iova` in `space`, if its flags include
    /// every bit of `need` (`VIRTIO_IOMMU_MAP_F_*`, `EXTENT_F_EXEC`).
    #[inline]
    pub fn lookup(&self, space: Space, iova: u64, need: u32) -> Option<Extent> {
        if let Some(Some(s)) = self.tlb.get(slot_of(space, iova)) {
            if s.space == space && s.ext.iova_start <= iova && iova <= s.ext.iova_end {
                return (s.ext.flags & need == need).then_some(s.ext);
            }
        }
        let (_, ext) = self.spaces.get(&space)?.range(..=iova).next_back()?;
        (iova <= ext.iova_end && ext.flags & need == need).then_some(*ext)
    }

    /// Records the extents of a translation in `space` asked at `iova`.
    pub fn insert(&mut self, space: Space, iova: u64, extents: &[Extent]) {
        if self.extents + extents.len() > MAX_EXTENTS {
            self.clear();
        }
        let map = self.spaces.entry(space).or_default();
        for ext in extents {
            // A stale overlapping extent cannot exist (it would have been
            // invalidated), but an identical one can: replace it.
            if map.insert(ext.iova_start, *ext).is_none() {
                self.extents += 1;
            }
        }
        if let Some(first) = extents.first() {
            self.tlb[slot_of(space, iova)] = Some(Slot { space, ext: *first });
        }
    }

    /// Drops what `scope` makes stale.
    pub fn invalidate(&mut self, scope: Invalidation) {
        match scope {
            Invalidation::All => self.clear(),
            Invalidation::Endpoint(ep) => self.retain(|s, _| s.endpoint != ep),
            Invalidation::Binding { endpoint, pasid } => {
                self.retain(|s, _| (s.endpoint, s.pasid) != (endpoint, pasid))
            }
            Invalidation::DomainRange { domain, start, end } => {
                self.retain(|_, e| !(e.domain == domain && overlaps(e, start, end)))
            }
            Invalidation::Domain(d) => self.retain(|_, e| e.domain != d),
            Invalidation::TablePasid { domain, pasid } => {
                self.retain(|s, e| !(s.pasid == pasid && e.domain == domain))
            }
            Invalidation::TableRange {
                domain,
                pasid,
                start,
                end,
            } => self.retain(|s, e| {
                !(pasid.is_none_or(|p| p == s.pasid)
                    && e.domain == domain
                    && overlaps(e, start, end))
            }),
        }
    }

    /// Keeps the extents for which `keep` holds, in both tables.
    fn retain(&mut self, mut keep: impl FnMut(&Space, &Extent) -> bool) {
        let extents = &mut self.extents;
        self.spaces.retain(|space, map| {
            let before = map.len();
            map.retain(|_, e| keep(space, e));
            *extents -= before - map.len();
            !map.is_empty()
        });
        for slot in self.tlb.iter_mut() {
            if slot.is_some_and(|s| !keep(&s.space, &s.ext)) {
                *slot = None;
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.spaces.clear();
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
    use viommu::wire::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};

    use super::*;

    const R: u32 = VIRTIO_IOMMU_MAP_F_READ;
    const W: u32 = VIRTIO_IOMMU_MAP_F_WRITE;

    fn ext(start: u64, end: u64, gpa: u64, domain: u32) -> Extent {
        Extent {
            iova_start: start,
            iova_end: end,
            gpa_start: gpa,
            domain,
            flags: R | W,
        }
    }

    fn pasid(endpoint: u32, pasid: u32) -> Space {
        Space {
            endpoint,
            pasid,
            privileged: false,
        }
    }

    #[test]
    fn unmap_of_a_domain_range_drops_exactly_the_overlapping_extents() {
        let mut c = Cache::default();
        c.insert(Space::iova(8), 0x1000, &[ext(0x1000, 0x1fff, 0x9000, 1)]);
        c.insert(Space::iova(8), 0x5000, &[ext(0x5000, 0x5fff, 0xa000, 1)]);
        c.insert(Space::iova(9), 0x1000, &[ext(0x1000, 0x1fff, 0xb000, 2)]);
        c.invalidate(Invalidation::DomainRange {
            domain: 1,
            start: 0x1800,
            end: 0x2fff,
        });
        assert!(c.lookup(Space::iova(8), 0x1000, R).is_none());
        assert!(c.lookup(Space::iova(8), 0x5000, R).is_some());
        assert!(
            c.lookup(Space::iova(9), 0x1000, R).is_some(),
            "other domain dropped"
        );
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn endpoint_invalidation_drops_its_direct_mapped_slots_too() {
        let mut c = Cache::default();
        c.insert(Space::iova(8), 0x1000, &[ext(0, u64::MAX, 0, u32::MAX)]);
        assert!(c.lookup(Space::iova(8), 0x1000, W).is_some());
        c.invalidate(Invalidation::Endpoint(8));
        assert!(c.lookup(Space::iova(8), 0x1000, W).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn lookup_honours_permissions() {
        let mut c = Cache::default();
        let mut e = ext(0x1000, 0x1fff, 0, 1);
        e.flags = R;
        c.insert(Space::iova(8), 0x1000, &[e]);
        assert!(c.lookup(Space::iova(8), 0x1000, R).is_some());
        assert!(c.lookup(Space::iova(8), 0x1000, W).is_none());
    }

    #[test]
    fn table_scopes_drop_their_pasid_and_range_only() {
        let mut c = Cache::default();
        c.insert(pasid(8, 1), 0x1000, &[ext(0x1000, 0x1fff, 0x9000, 100)]);
        c.insert(pasid(8, 1), 0x7000, &[ext(0x7000, 0x7fff, 0x9000, 100)]);
        c.insert(pasid(8, 2), 0x1000, &[ext(0x1000, 0x1fff, 0xa000, 100)]);
        c.insert(pasid(9, 1), 0x1000, &[ext(0x1000, 0x1fff, 0xb000, 100)]);
        c.insert(Space::iova(8), 0x1000, &[ext(0x1000, 0x1fff, 0xc000, 5)]);
        c.invalidate(Invalidation::TableRange {
            domain: 100,
            pasid: Some(1),
            start: 0x1000,
            end: 0x1fff,
        });
        assert!(c.lookup(pasid(8, 1), 0x1000, R).is_none());
        assert!(c.lookup(pasid(9, 1), 0x1000, R).is_none());
        assert!(c.lookup(pasid(8, 1), 0x7000, R).is_some());
        assert!(c.lookup(pasid(8, 2), 0x1000, R).is_some());
        c.invalidate(Invalidation::Binding {
            endpoint: 8,
            pasid: 2,
        });
        assert!(c.lookup(pasid(8, 2), 0x1000, R).is_none());
        c.invalidate(Invalidation::TablePasid {
            domain: 100,
            pasid: 1,
        });
        assert!(c.lookup(pasid(8, 1), 0x7000, R).is_none());
        assert!(c.lookup(Space::iova(8), 0x1000, R).is_some());
        c.invalidate(Invalidation::Domain(5));
        assert!(c.is_empty());
    }
}
