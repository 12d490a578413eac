// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A cache of table walks ([`Iotlb`]): pages of guest tables, keyed by
//! (endpoint, PASID, privilege), dropped by the same [`Invalidation`]s
//! that reach control clients, so a translation served from it is never
//! staler than the guest allows (the guest invalidates what it changes,
//! and the device completes the INVALIDATE only after dropping it).
//!
//! Only successful walks are cached, and a page that is writable but not
//! yet dirty is cached for reads only ([`PageTranslation::allows`]): the
//! first write walks again and marks it dirty in the guest's table.

use std::collections::{BTreeMap, HashMap};

use crate::{
    change::Invalidation,
    pgtable::{PageAccess, PageTranslation},
};

/// One cached page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    domain: u32,
    page: PageTranslation,
}

/// Key of one cached address space: (endpoint, PASID, privileged).
type SpaceKey = (u32, u32, bool);

/// Cached table walks, at most `capacity` pages.
#[derive(Debug)]
pub struct Iotlb {
    spaces: HashMap<SpaceKey, BTreeMap<u64, Entry>>,
    len: usize,
    capacity: usize,
}

impl Iotlb {
    /// An empty cache of at most `capacity` pages (0: caches nothing).
    pub fn new(capacity: usize) -> Self {
        Iotlb {
            spaces: HashMap::new(),
            len: 0,
            capacity,
        }
    }

    /// Number of cached pages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cached page of `va` for `access` by (`endpoint`, `pasid`), if
    /// it allows the access without a new walk.
    pub fn lookup(
        &self,
        endpoint: u32,
        pasid: u32,
        va: u64,
        access: PageAccess,
    ) -> Option<(u32, PageTranslation)> {
        let space = self.spaces.get(&(endpoint, pasid, access.privileged))?;
        let (_, e) = space.range(..=va).next_back()?;
        (e.page.contains(va) && e.page.allows(access)).then_some((e.domain, e.page))
    }

    /// Caches a walk by (`endpoint`, `pasid`) of the given privilege
    /// through `domain`'s table. A full cache starts over.
    pub fn insert(
        &mut self,
        endpoint: u32,
        pasid: u32,
        privileged: bool,
        domain: u32,
        page: PageTranslation,
    ) {
        if self.capacity == 0 {
            return;
        }
        if self.len >= self.capacity {
            self.clear();
        }
        let space = self
            .spaces
            .entry((endpoint, pasid, privileged))
            .or_default();
        if space.insert(page.va, Entry { domain, page }).is_none() {
            self.len += 1;
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.spaces.clear();
        self.len = 0;
    }

    /// Drops what `inv` makes stale.
    pub fn invalidate(&mut self, inv: &Invalidation) {
        if self.len == 0 {
            return;
        }
        let overlaps = |e: &Entry, start: u64, end: u64| {
            e.page.va <= end && start <= e.page.va + (e.page.page_size() - 1)
        };
        match *inv {
            Invalidation::All => self.clear(),
            Invalidation::Endpoint(ep) => self.retain_spaces(|&(e, _, _)| e != ep),
            Invalidation::Binding { endpoint, pasid } => {
                self.retain_spaces(|&(e, p, _)| (e, p) != (endpoint, pasid))
            }
            Invalidation::Domain(d) => self.retain_entries(|_, e| e.domain != d),
            Invalidation::TablePasid { domain, pasid } => {
                self.retain_entries(|&(_, p, _), e| !(e.domain == domain && p == pasid))
            }
            Invalidation::TableRange {
                domain,
                pasid,
                start,
                end,
            } => self.retain_entries(|&(_, p, _), e| {
                !(e.domain == domain && pasid.is_none_or(|q| q == p) && overlaps(e, start, end))
            }),
            // IOVA ranges: table domains have no MAP/UNMAP mappings.
            Invalidation::DomainRange { domain, start, end } => {
                self.retain_entries(|_, e| !(e.domain == domain && overlaps(e, start, end)))
            }
        }
    }

    fn retain_spaces(&mut self, mut keep: impl FnMut(&SpaceKey) -> bool) {
        let len = &mut self.len;
        self.spaces.retain(|k, space| {
            let k = keep(k);
            if !k {
                *len -= space.len();
            }
            k
        });
    }

    fn retain_entries(&mut self, mut keep: impl FnMut(&SpaceKey, &Entry) -> bool) {
        let len = &mut self.len;
        self.spaces.retain(|k, space| {
            let before = space.len();
            space.retain(|_, e| keep(k, e));
            *len -= before - space.len();
            !space.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(va: u64, dirty: bool) -> PageTranslation {
        PageTranslation {
            va,
            gpa: va + 0x100_0000,
            page_shift: 12,
            writable: true,
            user: true,
            executable: false,
            dirty,
        }
    }

    #[test]
    fn a_clean_writable_page_serves_reads_only() {
        let mut c = Iotlb::new(16);
        c.insert(8, 1, false, 100, page(0x1000, false));
        assert!(c.lookup(8, 1, 0x1008, PageAccess::READ).is_some());
        assert!(c.lookup(8, 1, 0x1008, PageAccess::WRITE).is_none());
        assert!(c.lookup(8, 1, 0x2000, PageAccess::READ).is_none());
        // Another privilege is another address space.
        assert!(c
            .lookup(8, 1, 0x1008, PageAccess::READ.privileged())
            .is_none());
    }

    #[test]
    fn each_scope_drops_exactly_its_pages() {
        let mut c = Iotlb::new(16);
        c.insert(8, 1, false, 100, page(0x1000, true));
        c.insert(8, 1, false, 100, page(0x5000, true));
        c.insert(8, 2, false, 100, page(0x1000, true));
        c.insert(9, 1, false, 101, page(0x1000, true));
        c.invalidate(&Invalidation::TableRange {
            domain: 100,
            pasid: Some(1),
            start: 0x1800,
            end: 0x1fff,
        });
        assert!(c.lookup(8, 1, 0x1000, PageAccess::READ).is_none());
        assert!(c.lookup(8, 1, 0x5000, PageAccess::READ).is_some());
        assert!(c.lookup(8, 2, 0x1000, PageAccess::READ).is_some());
        c.invalidate(&Invalidation::TableRange {
            domain: 100,
            pasid: None,
            start: 0,
            end: u64::MAX,
        });
        assert_eq!(c.len(), 1);
        c.invalidate(&Invalidation::Binding {
            endpoint: 9,
            pasid: 1,
        });
        assert!(c.is_empty());
    }

    #[test]
    fn a_full_cache_starts_over_and_capacity_zero_caches_nothing() {
        let mut c = Iotlb::new(2);
        for i in 0..3 {
            c.insert(8, 1, false, 100, page(i * 0x1000, true));
        }
        assert_eq!(c.len(), 1);
        let mut none = Iotlb::new(0);
        none.insert(8, 1, false, 100, page(0, true));
        assert!(none.is_empty());
    }
}
