// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-PASID storage: a two-level radix table indexed by PASID.
//!
//! Lookups are two array indexations, no hashing. Pages of
//! [`PAGE_SLOTS`] slots are allocated on first use and dropped when their
//! last slot is vacated, so memory follows the live PASIDs rather than the
//! size of the space; the lowest-free allocation policy keeps live PASIDs
//! packed into few pages. One emptied page is kept as a spare so that a
//! workload oscillating at a page boundary does not hit the heap each time.
//! A slot holding `T::default()` is vacant.

/// Slots per page (a power of two).
pub(crate) const PAGE_SLOTS: usize = 1024;
const PAGE_SHIFT: u32 = PAGE_SLOTS.trailing_zeros();

struct Page<T> {
    live: u32,
    slots: Box<[T]>,
}

/// Sparse table of `T` over `[0, len)`, vacant slots holding `T::default()`.
pub(crate) struct PageTable<T> {
    pages: Vec<Option<Page<T>>>,
    spare: Option<Box<[T]>>,
    live: u32,
}

impl<T: Copy + Default + PartialEq> PageTable<T> {
    /// An empty table able to index `[0, len)`.
    pub(crate) fn new(len: u32) -> Self {
        let pages = (len as usize).div_ceil(PAGE_SLOTS).max(1);
        Self {
            pages: (0..pages).map(|_| None).collect(),
            spare: None,
            live: 0,
        }
    }

    fn split(id: u32) -> (usize, usize) {
        ((id >> PAGE_SHIFT) as usize, id as usize & (PAGE_SLOTS - 1))
    }

    /// The value at `id`, if occupied.
    pub(crate) fn get(&self, id: u32) -> Option<&T> {
        let (p, s) = Self::split(id);
        let slot = self.pages.get(p)?.as_ref()?.slots.get(s)?;
        (*slot != T::default()).then_some(slot)
    }

    /// Mutable access to the value at `id`, if occupied. The caller must
    /// not store `T::default()` through it; use [`Self::remove`].
    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        let (p, s) = Self::split(id);
        let slot = self.pages.get_mut(p)?.as_mut()?.slots.get_mut(s)?;
        (*slot != T::default()).then_some(slot)
    }

    /// Stores `value` (not `T::default()`) at `id`, which must lie in the
    /// table. Returns false if `id` is outside the table.
    pub(crate) fn insert(&mut self, id: u32, value: T) -> bool {
        debug_assert!(value != T::default());
        let (p, s) = Self::split(id);
        let Some(entry) = self.pages.get_mut(p) else {
            return false;
        };
        let page = entry.get_or_insert_with(|| Page {
            live: 0,
            slots: self
                .spare
                .take()
                .unwrap_or_else(|| vec![T::default(); PAGE_SLOTS].into_boxed_slice()),
        });
        let slot = &mut page.slots[s];
        if *slot == T::default() {
            page.live += 1;
            self.live += 1;
        }
        *slot = value;
        true
    }

    /// Vacates `id`, returning its previous value.
    pub(crate) fn remove(&mut self, id: u32) -> Option<T> {
        let (p, s) = Self::split(id);
        let entry = self.pages.get_mut(p)?;
        let page = entry.as_mut()?;
        let slot = &mut page.slots[s];
        if *slot == T::default() {
            return None;
        }
        let old = std::mem::take(slot);
        page.live -= 1;
        self.live -= 1;
        if page.live == 0 {
            if let Some(page) = entry.take() {
                self.spare.get_or_insert(page.slots);
            }
        }
        Some(old)
    }

    /// Lowest occupied id in `[from, to]`, skipping absent pages.
    pub(crate) fn next_occupied(&self, from: u32, to: u32) -> Option<u32> {
        let mut id = from;
        while id <= to {
            let (p, s) = Self::split(id);
            match self.pages.get(p)? {
                None => {}
                Some(page) => {
                    let last = if (to >> PAGE_SHIFT) as usize == p {
                        (to as usize & (PAGE_SLOTS - 1)) + 1
                    } else {
                        PAGE_SLOTS
                    };
                    if let Some(off) = page.slots[s..last].iter().position(|v| *v != T::default()) {
                        // off < PAGE_SLOTS, so this stays within the page.
                        return Some(id + off as u32);
                    }
                }
            }
            id = u32::try_from(p + 1).ok()?.checked_shl(PAGE_SHIFT)?;
        }
        None
    }

    /// Number of occupied slots.
    pub(crate) fn live(&self) -> u32 {
        self.live
    }

    /// Heap bytes held: the page directory, the allocated pages, the spare.
    pub(crate) fn memory_bytes(&self) -> usize {
        let page_bytes = PAGE_SLOTS * std::mem::size_of::<T>();
        let pages =
            self.pages.iter().filter(|p| p.is_some()).count() + usize::from(self.spare.is_some());
        self.pages.capacity() * std::mem::size_of::<Option<Page<T>>>() + pages * page_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_allocated_on_demand_and_dropped_when_empty() {
        let mut t = PageTable::<u32>::new(1 << 20);
        let empty = t.memory_bytes();
        assert!(t.insert(5000, 7));
        assert_eq!(t.get(5000), Some(&7));
        assert!(t.memory_bytes() > empty);
        assert_eq!(t.remove(5000), Some(7));
        assert_eq!(t.get(5000), None);
        assert_eq!(t.live(), 0);
        // The emptied page became the spare; a second one is dropped.
        t.insert(1, 1);
        t.insert(3000, 1);
        t.remove(1);
        t.remove(3000);
        assert_eq!(t.memory_bytes(), empty + PAGE_SLOTS * 4);
    }

    #[test]
    fn ids_outside_the_table_are_refused() {
        let mut t = PageTable::<u32>::new(32);
        assert!(t.insert(31, 1));
        assert!(!t.insert(1 << 20, 1));
        assert_eq!(t.get(u32::MAX), None);
        assert_eq!(t.remove(u32::MAX), None);
    }

    #[test]
    fn next_occupied_skips_absent_pages_and_stops_at_end() {
        let mut t = PageTable::<u32>::new(1 << 20);
        t.insert(3, 1);
        t.insert(900_000, 1);
        assert_eq!(t.next_occupied(0, u32::MAX), Some(3));
        assert_eq!(t.next_occupied(4, (1 << 20) - 1), Some(900_000));
        assert_eq!(t.next_occupied(4, 899_999), None);
        assert_eq!(t.next_occupied(900_001, u32::MAX), None);
    }
}
