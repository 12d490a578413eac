// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One set's guest -> host PASID index for global-mode translation.
//!
//! An open-addressing hash table (linear probing, backward-shift deletion)
//! whose slots hold only the host PASID, 4 bytes. The key of a slot, the
//! guest PASID, is read back through the translator's reverse map
//! (host -> guest), passed in as `guest_of`; storing it again would double
//! the table. Keys are chosen by the guest, so they are hashed with std's
//! randomly keyed SipHash. The table doubles past 7/8 load and halves
//! under 1/8, so it holds at most 8 slots per entry plus the minimum.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use super::Pasid;

const MIN_SLOTS: usize = 8;

/// Guest PASID -> host PASID of one set. Host PASID 0 marks a free slot.
#[derive(Debug, Clone, Default)]
pub(crate) struct ForwardIndex {
    slots: Vec<Pasid>,
    len: usize,
    hasher: RandomState,
}

impl ForwardIndex {
    fn home(&self, guest: Pasid) -> usize {
        // Truncating the hash is fine: only its low bits are used.
        (self.hasher.hash_one(guest) as usize) & (self.slots.len() - 1)
    }

    /// Slot holding `guest`'s host PASID, if mapped.
    fn find(&self, guest: Pasid, guest_of: impl Fn(Pasid) -> Pasid) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(guest);
        loop {
            let host = self.slots[i];
            if host == 0 {
                return None;
            }
            if guest_of(host) == guest {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Host PASID mapped to `guest`.
    pub(crate) fn get(&self, guest: Pasid, guest_of: impl Fn(Pasid) -> Pasid) -> Option<Pasid> {
        self.find(guest, guest_of).map(|i| self.slots[i])
    }

    /// Adds `host` (non-zero), whose guest PASID `guest_of` must already
    /// return and which must not be in the index yet.
    pub(crate) fn insert(&mut self, host: Pasid, guest_of: impl Fn(Pasid) -> Pasid) {
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.resize((self.slots.len() * 2).max(MIN_SLOTS), &guest_of);
        }
        self.place(host, &guest_of);
        self.len += 1;
    }

    fn place(&mut self, host: Pasid, guest_of: impl Fn(Pasid) -> Pasid) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(guest_of(host));
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = host;
    }

    /// Removes `guest`'s entry and returns its host PASID. `guest_of` must
    /// still know every host PASID of the index.
    pub(crate) fn remove(
        &mut self,
        guest: Pasid,
        guest_of: impl Fn(Pasid) -> Pasid,
    ) -> Option<Pasid> {
        let mut hole = self.find(guest, &guest_of)?;
        let host = std::mem::take(&mut self.slots[hole]);
        self.len -= 1;
        // Backward shift: pull later entries of the cluster into the hole
        // unless their home lies cyclically in (hole, j].
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let h = self.slots[j];
            if h == 0 {
                break;
            }
            let home = self.home(guest_of(h));
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = h;
                self.slots[j] = 0;
                hole = j;
            }
        }
        if self.len * 8 < self.slots.len() && self.slots.len() > MIN_SLOTS {
            self.resize(self.slots.len() / 2, &guest_of);
        }
        Some(host)
    }

    fn resize(&mut self, slots: usize, guest_of: impl Fn(Pasid) -> Pasid) {
        let old = std::mem::replace(&mut self.slots, vec![0; slots]);
        for host in old.into_iter().filter(|h| *h != 0) {
            self.place(host, &guest_of);
        }
    }

    /// Host PASIDs in the index, in no particular order.
    pub(crate) fn hosts(&self) -> impl Iterator<Item = Pasid> + '_ {
        self.slots.iter().copied().filter(|h| *h != 0)
    }

    /// Number of entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held, by capacity.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Pasid>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Reverse map standing in for the translator's: host = guest + 1000.
    fn guest_of(host: Pasid) -> Pasid {
        host - 1000
    }

    #[test]
    fn inserted_entries_are_found_and_removed() {
        let mut f = ForwardIndex::default();
        assert_eq!(f.get(1, guest_of), None);
        for g in 1..=500 {
            f.insert(g + 1000, guest_of);
        }
        assert_eq!(f.len(), 500);
        for g in 1..=500 {
            assert_eq!(f.get(g, guest_of), Some(g + 1000));
        }
        assert_eq!(f.get(501, guest_of), None);
        for g in (1..=500).step_by(2) {
            assert_eq!(f.remove(g, guest_of), Some(g + 1000));
        }
        assert_eq!(f.remove(1, guest_of), None);
        for g in 1..=500 {
            assert_eq!(f.get(g, guest_of), (g % 2 == 0).then_some(g + 1000));
        }
    }

    #[test]
    fn table_shrinks_when_mostly_empty() {
        let mut f = ForwardIndex::default();
        for g in 1..=1000 {
            f.insert(g + 1000, guest_of);
        }
        assert_eq!(f.memory_bytes(), 2048 * 4);
        for g in 1..=990 {
            f.remove(g, guest_of);
        }
        assert!(f.memory_bytes() <= 128 * 4, "{}", f.memory_bytes());
        let mut hosts: Vec<_> = f.hosts().collect();
        hosts.sort_unstable();
        assert_eq!(hosts, (1991..=2000).collect::<Vec<_>>());
    }

    #[test]
    fn random_operations_match_a_hash_map() {
        let mut f = ForwardIndex::default();
        let mut m = HashMap::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let g = (x % 300) as Pasid + 1;
            if let Some(host) = m.remove(&g) {
                assert_eq!(f.remove(g, guest_of), Some(host));
            } else {
                f.insert(g + 1000, guest_of);
                m.insert(g, g + 1000);
            }
            assert_eq!(f.len(), m.len());
        }
        for g in 1..=301 {
            assert_eq!(f.get(g, guest_of), m.get(&g).copied());
        }
    }
}
