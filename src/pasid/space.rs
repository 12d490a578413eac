// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Free-space index: a hierarchical bitmap over `[0, len)`.
//!
//! Level 0 has one bit per ID (1 = free). Each higher level has one bit per
//! word of the level below, set while that word is non-zero, up to a level
//! of a single word. Finding the lowest free ID at or after a position
//! climbs until a word has a set bit at or after it, then descends by
//! `trailing_zeros`: at most `2 * levels` word reads (4 levels for 2^20),
//! whatever the occupancy. For 2^20 IDs the leaf level is 128 KiB and the
//! summary levels add 2 KiB + 32 B + 8 B.

use std::ops::RangeInclusive;

const WORD_BITS: usize = 64;

/// Hierarchical bitmap of free IDs. Every ID starts out *not* free.
#[derive(Debug, Clone)]
pub struct FreeSpace {
    /// `levels[0]` is the leaf level; the last level has exactly one word.
    levels: Vec<Vec<u64>>,
    len: u32,
    free: u32,
}

impl FreeSpace {
    /// An index over `[0, len)` in which no ID is free yet.
    pub fn new(len: u32) -> Self {
        let mut levels = Vec::new();
        let mut bits = (len as usize).max(1);
        loop {
            let words = bits.div_ceil(WORD_BITS);
            levels.push(vec![0u64; words]);
            if words == 1 {
                break;
            }
            bits = words;
        }
        Self {
            levels,
            len,
            free: 0,
        }
    }

    /// Number of IDs the index covers.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the index covers no ID at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of free IDs.
    pub fn free_count(&self) -> u32 {
        self.free
    }

    /// Whether `id` is free (false outside the index).
    pub fn is_free(&self, id: u32) -> bool {
        let i = id as usize;
        id < self.len && self.levels[0][i / WORD_BITS] & bit(i) != 0
    }

    /// Marks `id` free. Returns false (and changes nothing) if it already
    /// was free or lies outside the index.
    pub fn release(&mut self, id: u32) -> bool {
        if id >= self.len || self.is_free(id) {
            return false;
        }
        let mut pos = id as usize;
        for level in &mut self.levels {
            let word = &mut level[pos / WORD_BITS];
            let was_empty = *word == 0;
            *word |= bit(pos);
            if !was_empty {
                break;
            }
            pos /= WORD_BITS;
        }
        self.free += 1;
        true
    }

    /// Marks `id` not free. Returns false (and changes nothing) if it
    /// already was not free or lies outside the index.
    pub fn take(&mut self, id: u32) -> bool {
        if !self.is_free(id) {
            return false;
        }
        let mut pos = id as usize;
        for level in &mut self.levels {
            let word = &mut level[pos / WORD_BITS];
            *word &= !bit(pos);
            if *word != 0 {
                break;
            }
            pos /= WORD_BITS;
        }
        self.free -= 1;
        true
    }

    /// Lowest free ID at or after `start`.
    pub fn first_free_from(&self, start: u32) -> Option<u32> {
        if start >= self.len {
            return None;
        }
        let mut pos = start as usize;
        let mut level = 0;
        // Climb until some word has a set bit at or after `pos`.
        loop {
            let words = &self.levels[level];
            let wi = pos / WORD_BITS;
            let word = *words.get(wi)? & (!0u64 << (pos % WORD_BITS));
            if word != 0 {
                pos = wi * WORD_BITS + word.trailing_zeros() as usize;
                break;
            }
            level += 1;
            if level == self.levels.len() {
                return None;
            }
            pos = wi + 1;
        }
        // Descend: each summary bit guarantees a non-zero word below.
        while level > 0 {
            level -= 1;
            let word = self.levels[level][pos];
            pos = pos * WORD_BITS + word.trailing_zeros() as usize;
        }
        // Bits past `len` are never set, so `pos < len` fits in u32.
        u32::try_from(pos).ok()
    }

    /// Lowest free ID in `range`.
    pub fn first_free_in(&self, range: &RangeInclusive<u32>) -> Option<u32> {
        self.first_free_from(*range.start())
            .filter(|id| id <= range.end())
    }

    /// Takes and returns the lowest free ID in `range`.
    pub fn take_first_free_in(&mut self, range: &RangeInclusive<u32>) -> Option<u32> {
        let id = self.first_free_in(range)?;
        self.take(id);
        Some(id)
    }

    /// Number of free IDs in `range` (clipped to the index).
    pub fn free_count_in(&self, range: &RangeInclusive<u32>) -> u32 {
        let (start, end) = (
            *range.start(),
            (*range.end()).min(self.len.saturating_sub(1)),
        );
        if self.len == 0 || start > end {
            return 0;
        }
        let (start, end) = (start as usize, end as usize);
        let leaf = &self.levels[0];
        let (first, last) = (start / WORD_BITS, end / WORD_BITS);
        let mut count = 0;
        for (wi, word) in leaf.iter().enumerate().take(last + 1).skip(first) {
            let mut w = *word;
            if wi == first {
                w &= !0u64 << (start % WORD_BITS);
            }
            if wi == last {
                w &= !0u64 >> (WORD_BITS - 1 - end % WORD_BITS);
            }
            count += w.count_ones();
        }
        count
    }

    /// Heap bytes held by the index (all levels, by capacity).
    pub fn memory_bytes(&self) -> usize {
        self.levels.capacity() * std::mem::size_of::<Vec<u64>>()
            + self
                .levels
                .iter()
                .map(|l| l.capacity() * std::mem::size_of::<u64>())
                .sum::<usize>()
    }
}

fn bit(pos: usize) -> u64 {
    1u64 << (pos % WORD_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_free(len: u32) -> FreeSpace {
        let mut s = FreeSpace::new(len);
        for id in 0..len {
            assert!(s.release(id));
        }
        s
    }

    #[test]
    fn new_index_has_nothing_free() {
        let s = FreeSpace::new(1 << 20);
        assert_eq!(s.free_count(), 0);
        assert_eq!(s.first_free_from(0), None);
    }

    #[test]
    fn lowest_free_id_is_found_across_levels() {
        let mut s = FreeSpace::new(1 << 20);
        for id in [(1 << 20) - 1, 70_000, 4097, 64] {
            s.release(id);
        }
        assert_eq!(s.first_free_from(0), Some(64));
        assert_eq!(s.first_free_from(65), Some(4097));
        assert_eq!(s.first_free_from(4098), Some(70_000));
        assert_eq!(s.first_free_from(70_001), Some((1 << 20) - 1));
        assert_eq!(s.first_free_from(1 << 20), None);
    }

    #[test]
    fn take_and_release_keep_summary_consistent() {
        let mut s = all_free(5000);
        for id in 0..4999 {
            assert!(s.take(id));
        }
        assert_eq!(s.first_free_from(0), Some(4999));
        assert!(!s.take(10), "taking a taken id is refused");
        assert!(s.release(10));
        assert!(!s.release(10), "releasing a free id is refused");
        assert_eq!(s.first_free_from(0), Some(10));
        assert_eq!(s.free_count(), 2);
    }

    #[test]
    fn first_free_in_respects_range_end() {
        let mut s = FreeSpace::new(256);
        s.release(200);
        assert_eq!(s.first_free_in(&(0..=199)), None);
        assert_eq!(s.first_free_in(&(0..=200)), Some(200));
        assert_eq!(s.take_first_free_in(&(100..=255)), Some(200));
        assert_eq!(s.free_count(), 0);
    }

    #[test]
    fn ids_outside_the_index_are_never_free() {
        let mut s = all_free(32);
        assert!(!s.is_free(32));
        assert!(!s.release(32));
        assert!(!s.take(u32::MAX));
        assert_eq!(s.first_free_from(32), None);
        assert_eq!(s.free_count_in(&(0..=u32::MAX)), 32);
    }

    #[test]
    fn free_count_in_counts_partial_words() {
        let s = all_free(300);
        assert_eq!(s.free_count_in(&(3..=130)), 128);
        assert_eq!(s.free_count_in(&(63..=64)), 2);
        let (lo, hi) = (5, 4); // empty on purpose
        assert_eq!(s.free_count_in(&(lo..=hi)), 0);
    }

    #[test]
    fn index_over_2_pow_20_fits_160_kib() {
        let s = FreeSpace::new(1 << 20);
        assert!(s.memory_bytes() <= 160 * 1024, "{}", s.memory_bytes());
    }
}
