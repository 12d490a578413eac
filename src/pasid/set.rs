// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PASID sets, quotas and the PASID lifecycle: [`PasidAllocator`].
//!
//! Every VM owns one set. A PASID is allocated *active* with one reference
//! (the owner's). Other users (a device binding, an in-flight page-request
//! group, a VMM holder) `get` and `put` extra references. `free` by the
//! owner makes the PASID *inactive*, so look-ups and new `get`s fail, and
//! drops the owner's reference; the PASID returns to the pool only when
//! its last reference is put, so it is never reused while a page request
//! carrying it is in flight or a device still holds it.
//!
//! Quota counts every PASID of a set that has not yet returned to the
//! pool, inactive ones with outstanding references included: a guest that
//! frees PASIDs faster than their users let go of them cannot pin more
//! host PASIDs than its quota. A destroyed set whose PASIDs are still
//! referenced lingers as a *zombie* that only accepts `put` until they are
//! all returned; only then may its slot be reused.

use std::ops::RangeInclusive;

use super::error::{PasidError, Result};
use super::source::HostPasidSource;
use super::space::FreeSpace;
use super::table::PageTable;
use super::{check_range, Pasid, DEFAULT_BITS, DEFAULT_LEASE_BLOCK, MAX_BITS, MIN_BITS};

/// Handle of a PASID set (one per VM). Stale handles are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SetId {
    index: u16,
    generation: u32,
}

impl SetId {
    /// Slot index, dense from 0; lets callers keep per-set side tables.
    pub fn index(&self) -> usize {
        usize::from(self.index)
    }
}

/// Allocator parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// Host PASID width in bits: PASIDs live in `[1, 2^bits - 1]`.
    pub bits: u8,
    /// How many PASIDs to ask the source for when a lease runs out.
    pub lease_block: u32,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self {
            bits: DEFAULT_BITS,
            lease_block: DEFAULT_LEASE_BLOCK,
        }
    }
}

/// Snapshot of one PASID's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidState {
    /// The owning set.
    pub owner: SetId,
    /// False once the owner freed it.
    pub active: bool,
    /// References held, the owner's included while active.
    pub refs: u32,
}

/// A set's quota and how much of it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetUsage {
    /// Most PASIDs the set may hold (0 = PASIDs disabled).
    pub quota: u32,
    /// PASIDs of the set not yet returned to the pool, inactive included.
    pub charged: u32,
}

/// Heap bytes held by an allocator, from its structures' capacities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocatorFootprint {
    /// Free-space index (hierarchical bitmap over the whole space).
    pub free_space_index: usize,
    /// Per-PASID state table (owner, state, refcount).
    pub pasid_table: usize,
    /// Set slots and their free list.
    pub sets: usize,
    /// The list of leased ranges.
    pub leases: usize,
    /// PASIDs not returned to the pool (active or inactive).
    pub live_pasids: u32,
}

/// Per-PASID record: 8 bytes. All zero (owner 0) means vacant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    /// Set slot index + 1.
    owner: u16,
    active: bool,
    refs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Vacant,
    Live,
    /// Destroyed, waiting for the last reference to its PASIDs.
    Zombie,
}

#[derive(Debug, Clone, Copy)]
struct SetSlot {
    generation: u32,
    state: SlotState,
    quota: u32,
    charged: u32,
}

/// Highest set slot index: `Entry::owner` stores index + 1 in a u16.
const MAX_SET_INDEX: u16 = u16::MAX - 1;

/// Host PASID allocator of one daemon: sets, quotas, lifecycle, leases.
pub struct PasidAllocator {
    max: Pasid,
    lease_block: u32,
    /// Free = leased by this allocator and not in use.
    space: FreeSpace,
    entries: PageTable<Entry>,
    sets: Vec<SetSlot>,
    vacant_sets: Vec<u16>,
    /// Leased ranges as the source returned them, sorted, disjoint.
    leases: Vec<RangeInclusive<Pasid>>,
    source: Box<dyn HostPasidSource>,
}

impl std::fmt::Debug for PasidAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasidAllocator")
            .field("max", &self.max)
            .field("live", &self.entries.live())
            .field("free", &self.space.free_count())
            .field("leases", &self.leases.len())
            .finish_non_exhaustive()
    }
}

impl PasidAllocator {
    /// An allocator over `[1, 2^bits - 1]` leasing from `source`.
    pub fn new(config: AllocatorConfig, source: Box<dyn HostPasidSource>) -> Result<Self> {
        if !(MIN_BITS..=MAX_BITS).contains(&config.bits) {
            return Err(PasidError::InvalidConfig("PASID width out of range"));
        }
        if config.lease_block == 0 {
            return Err(PasidError::InvalidConfig("lease block size is 0"));
        }
        let len = 1u32 << config.bits;
        Ok(Self {
            max: len - 1,
            lease_block: config.lease_block,
            space: FreeSpace::new(len),
            entries: PageTable::new(len),
            sets: Vec::new(),
            vacant_sets: Vec::new(),
            leases: Vec::new(),
            source,
        })
    }

    /// Largest valid PASID.
    pub fn max_pasid(&self) -> Pasid {
        self.max
    }

    /// Creates a set allowed to hold `quota` PASIDs (0 disables PASIDs).
    pub fn create_set(&mut self, quota: u32) -> Result<SetId> {
        let index = match self.vacant_sets.pop() {
            Some(index) => index,
            None => {
                let index = u16::try_from(self.sets.len())
                    .ok()
                    .filter(|i| *i <= MAX_SET_INDEX)
                    .ok_or(PasidError::TooManySets)?;
                self.sets.push(SetSlot {
                    generation: 0,
                    state: SlotState::Vacant,
                    quota: 0,
                    charged: 0,
                });
                index
            }
        };
        let slot = &mut self.sets[usize::from(index)];
        *slot = SetSlot {
            generation: slot.generation,
            state: SlotState::Live,
            quota,
            charged: 0,
        };
        Ok(SetId {
            index,
            generation: slot.generation,
        })
    }

    /// Changes a set's quota. Lowering it below the current use only
    /// makes further allocations fail.
    pub fn set_quota(&mut self, set: SetId, quota: u32) -> Result<()> {
        self.live_slot(set)?.quota = quota;
        Ok(())
    }

    /// The set's quota and use.
    pub fn usage(&self, set: SetId) -> Result<SetUsage> {
        let slot = self.slot(set, false)?;
        Ok(SetUsage {
            quota: slot.quota,
            charged: slot.charged,
        })
    }

    /// Frees every PASID of the set and destroys it. PASIDs with
    /// outstanding references stay reserved until their last `put`, which
    /// the (now destroyed) handle still accepts.
    pub fn destroy_set(&mut self, set: SetId) -> Result<()> {
        self.free_range(set, 1..=self.max)?;
        let slot = self.live_slot(set)?;
        slot.state = SlotState::Zombie;
        if slot.charged == 0 {
            self.vacate(set.index);
        }
        Ok(())
    }

    /// Allocates the lowest free PASID in `range` for `set`, active with
    /// one reference. Leases more PASIDs from the source when none of the
    /// leased ones is free in `range`, so the result is the lowest free
    /// PASID among the leased ones; the in-memory source leases the lowest
    /// blocks first.
    pub fn alloc(&mut self, set: SetId, range: RangeInclusive<Pasid>) -> Result<Pasid> {
        let range = check_range(range, self.max)?;
        let slot = self.live_slot(set)?;
        if slot.quota == 0 {
            return Err(PasidError::Disabled);
        }
        if slot.charged >= slot.quota {
            return Err(PasidError::QuotaExceeded { quota: slot.quota });
        }
        let id = match self.space.take_first_free_in(&range) {
            Some(id) => id,
            None => {
                self.lease_more(&range)?;
                self.space
                    .take_first_free_in(&range)
                    .ok_or(PasidError::Exhausted {
                        min: *range.start(),
                        max: *range.end(),
                    })?
            }
        };
        self.entries.insert(
            id,
            Entry {
                owner: set.index + 1,
                active: true,
                refs: 1,
            },
        );
        self.sets[usize::from(set.index)].charged += 1;
        Ok(id)
    }

    /// Checks that `pasid` is active and owned by `set`.
    pub fn lookup(&self, set: SetId, pasid: Pasid) -> Result<()> {
        self.slot(set, false)?;
        let e = self.owned_entry(set, pasid)?;
        if !e.active {
            return Err(PasidError::Inactive(pasid));
        }
        Ok(())
    }

    /// State of `pasid`, whoever owns it; `None` if it is in the pool.
    pub fn state(&self, pasid: Pasid) -> Option<PasidState> {
        let e = self.entries.get(pasid)?;
        let index = e.owner - 1;
        Some(PasidState {
            owner: SetId {
                index,
                generation: self.sets.get(usize::from(index))?.generation,
            },
            active: e.active,
            refs: e.refs,
        })
    }

    /// Takes another reference to an active PASID of `set`.
    pub fn get(&mut self, set: SetId, pasid: Pasid) -> Result<()> {
        self.live_slot(set)?;
        let e = self.owned_entry_mut(set, pasid)?;
        if !e.active {
            return Err(PasidError::Inactive(pasid));
        }
        e.refs = e
            .refs
            .checked_add(1)
            .ok_or(PasidError::RefcountOverflow(pasid))?;
        Ok(())
    }

    /// Drops a reference taken by [`Self::get`]. Accepted on a destroyed
    /// set too, since users may outlive it. Returns the PASID to the pool
    /// when it was inactive and this was its last reference.
    pub fn put(&mut self, set: SetId, pasid: Pasid) -> Result<()> {
        self.slot(set, true)?;
        let e = self.owned_entry_mut(set, pasid)?;
        // While active, one reference is the owner's, dropped by `free`.
        if e.active && e.refs <= 1 {
            return Err(PasidError::NoReference(pasid));
        }
        e.refs -= 1;
        if e.refs == 0 {
            self.return_to_pool(pasid);
        }
        Ok(())
    }

    /// Frees an active PASID of `set`: makes it inactive and drops the
    /// owner's reference.
    pub fn free(&mut self, set: SetId, pasid: Pasid) -> Result<()> {
        self.live_slot(set)?;
        let e = self.owned_entry_mut(set, pasid)?;
        if !e.active {
            return Err(PasidError::Inactive(pasid));
        }
        e.active = false;
        e.refs -= 1;
        if e.refs == 0 {
            self.return_to_pool(pasid);
        }
        Ok(())
    }

    /// Frees every active PASID of `set` in `range`; returns how many.
    /// Costs one pass over the allocated pages of the table in `range`.
    pub fn free_range(&mut self, set: SetId, range: RangeInclusive<Pasid>) -> Result<u32> {
        let range = check_range(range, self.max)?;
        self.live_slot(set)?;
        let (mut next, end) = (*range.start(), *range.end());
        let mut freed = 0;
        while let Some(id) = self.entries.next_occupied(next, end) {
            if let Some(e) = self.entries.get(id) {
                if e.owner == set.index + 1 && e.active {
                    self.free(set, id)?;
                    freed += 1;
                }
            }
            match id.checked_add(1) {
                Some(n) => next = n,
                None => break,
            }
        }
        Ok(freed)
    }

    /// Gives back to the source every lease none of whose PASIDs is in
    /// use; returns how many PASIDs were released. Not done implicitly so
    /// that a workload oscillating around a block boundary does not
    /// round-trip to the (possibly durable) source.
    pub fn release_idle_leases(&mut self) -> Result<u32> {
        let (idle, kept): (Vec<_>, Vec<_>) = self
            .leases
            .iter()
            .cloned()
            .partition(|r| self.space.free_count_in(r) == r.end() - r.start() + 1);
        if idle.is_empty() {
            return Ok(0);
        }
        self.source.release(&idle)?;
        let mut released = 0;
        for r in &idle {
            for id in r.clone() {
                self.space.take(id);
            }
            released += r.end() - r.start() + 1;
        }
        self.leases = kept;
        Ok(released)
    }

    /// Takes over a lease granted earlier (by a durable source, to a
    /// previous incarnation of this allocator) without asking the source:
    /// its PASIDs join the pool. Fails, changing nothing, if the range is
    /// empty, holds 0, leaves the space or overlaps a lease already held.
    pub fn adopt_lease(&mut self, range: RangeInclusive<Pasid>) -> Result<()> {
        if range.is_empty()
            || *range.start() == 0
            || *range.end() > self.max
            || self.overlaps_lease(&range)
        {
            return Err(PasidError::BadLease(range));
        }
        for id in range.clone() {
            self.space.release(id);
        }
        let at = self.leases.partition_point(|l| l.start() < range.start());
        self.leases.insert(at, range);
        Ok(())
    }

    /// Re-creates `pasid` as an active PASID of `set` with the owner's
    /// reference only, as it was recorded before a restart. The PASID must
    /// lie in an adopted lease and be free. It is charged to the quota
    /// even beyond it: a quota lowered across a restart only makes
    /// further allocations fail.
    pub fn restore(&mut self, set: SetId, pasid: Pasid) -> Result<()> {
        self.check_pasid(pasid)?;
        self.live_slot(set)?;
        if !self.space.take(pasid) {
            return Err(PasidError::NotRestorable(pasid));
        }
        self.entries.insert(
            pasid,
            Entry {
                owner: set.index + 1,
                active: true,
                refs: 1,
            },
        );
        self.sets[usize::from(set.index)].charged += 1;
        Ok(())
    }

    /// The PASIDs of `set` not yet returned to the pool (inactive ones
    /// included), in increasing order, with their state.
    pub fn pasids_of(&self, set: SetId) -> Result<Vec<(Pasid, PasidState)>> {
        self.slot(set, true)?;
        let mut out = Vec::new();
        let mut next = 1;
        while let Some(id) = self.entries.next_occupied(next, self.max) {
            if let Some(e) = self.entries.get(id).filter(|e| e.owner == set.index + 1) {
                out.push((
                    id,
                    PasidState {
                        owner: set,
                        active: e.active,
                        refs: e.refs,
                    },
                ));
            }
            match id.checked_add(1) {
                Some(n) => next = n,
                None => break,
            }
        }
        Ok(out)
    }

    /// Number of PASIDs currently leased from the source.
    pub fn leased(&self) -> u32 {
        self.leases.iter().map(|r| r.end() - r.start() + 1).sum()
    }

    /// Number of leased PASIDs free for allocation.
    pub fn pooled(&self) -> u32 {
        self.space.free_count()
    }

    /// Number of PASIDs not in the pool (active or inactive).
    pub fn live(&self) -> u32 {
        self.entries.live()
    }

    /// Heap bytes held by the allocator's structures.
    pub fn memory_footprint(&self) -> AllocatorFootprint {
        AllocatorFootprint {
            free_space_index: self.space.memory_bytes(),
            pasid_table: self.entries.memory_bytes(),
            sets: self.sets.capacity() * std::mem::size_of::<SetSlot>()
                + self.vacant_sets.capacity() * std::mem::size_of::<u16>(),
            leases: self.leases.capacity() * std::mem::size_of::<RangeInclusive<Pasid>>(),
            live_pasids: self.entries.live(),
        }
    }

    /// The slot of `set`, if the handle is current; zombies only if
    /// `zombie_ok`.
    fn slot(&self, set: SetId, zombie_ok: bool) -> Result<&SetSlot> {
        match self.sets.get(usize::from(set.index)) {
            Some(s)
                if s.generation == set.generation
                    && (s.state == SlotState::Live
                        || (zombie_ok && s.state == SlotState::Zombie)) =>
            {
                Ok(s)
            }
            _ => Err(PasidError::UnknownSet),
        }
    }

    fn live_slot(&mut self, set: SetId) -> Result<&mut SetSlot> {
        match self.sets.get_mut(usize::from(set.index)) {
            Some(s) if s.generation == set.generation && s.state == SlotState::Live => Ok(s),
            _ => Err(PasidError::UnknownSet),
        }
    }

    fn check_pasid(&self, pasid: Pasid) -> Result<()> {
        if pasid == 0 || pasid > self.max {
            return Err(PasidError::OutOfRange {
                pasid,
                max: self.max,
            });
        }
        Ok(())
    }

    fn owned_entry(&self, set: SetId, pasid: Pasid) -> Result<&Entry> {
        self.check_pasid(pasid)?;
        let e = self
            .entries
            .get(pasid)
            .ok_or(PasidError::UnknownPasid(pasid))?;
        if e.owner != set.index + 1 {
            return Err(PasidError::ForeignPasid(pasid));
        }
        Ok(e)
    }

    fn owned_entry_mut(&mut self, set: SetId, pasid: Pasid) -> Result<&mut Entry> {
        self.check_pasid(pasid)?;
        let e = self
            .entries
            .get_mut(pasid)
            .ok_or(PasidError::UnknownPasid(pasid))?;
        if e.owner != set.index + 1 {
            return Err(PasidError::ForeignPasid(pasid));
        }
        Ok(e)
    }

    /// The last reference is gone: the PASID goes back to the pool and
    /// stops counting against its set's quota.
    fn return_to_pool(&mut self, pasid: Pasid) {
        let Some(e) = self.entries.remove(pasid) else {
            return;
        };
        self.space.release(pasid);
        let index = e.owner - 1;
        if let Some(slot) = self.sets.get_mut(usize::from(index)) {
            slot.charged -= 1;
            if slot.state == SlotState::Zombie && slot.charged == 0 {
                self.vacate(index);
            }
        }
    }

    fn vacate(&mut self, index: u16) {
        if let Some(slot) = self.sets.get_mut(usize::from(index)) {
            slot.state = SlotState::Vacant;
            slot.generation = slot.generation.wrapping_add(1);
            self.vacant_sets.push(index);
        }
    }

    /// Leases more PASIDs overlapping `range` and adds them to the pool,
    /// after checking that the source kept its contract.
    fn lease_more(&mut self, range: &RangeInclusive<Pasid>) -> Result<()> {
        let mut got = self.source.lease(self.lease_block, range.clone())?;
        got.sort_by_key(|r| *r.start());
        let bad = got.iter().enumerate().find(|(i, r)| {
            r.is_empty()
                || *r.start() == 0
                || *r.end() > self.max
                || (*i > 0 && got[i - 1].end() >= r.start())
                || self.overlaps_lease(r)
        });
        if let Some((_, r)) = bad {
            log::warn!("PASID source leased invalid range {r:?}; ignoring the lease");
            return Err(PasidError::BadLease(r.clone()));
        }
        for r in got {
            for id in r.clone() {
                self.space.release(id);
            }
            let at = self.leases.partition_point(|l| l.start() < r.start());
            self.leases.insert(at, r);
        }
        Ok(())
    }

    fn overlaps_lease(&self, r: &RangeInclusive<Pasid>) -> bool {
        let at = self.leases.partition_point(|l| l.start() <= r.start());
        let before = at.checked_sub(1).and_then(|i| self.leases.get(i));
        let after = self.leases.get(at);
        before.is_some_and(|l| l.end() >= r.start()) || after.is_some_and(|l| l.start() <= r.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pasid::source::MemorySource;

    fn allocator(bits: u8) -> PasidAllocator {
        let source = MemorySource::new(bits, 16).unwrap();
        let config = AllocatorConfig {
            bits,
            lease_block: 16,
        };
        PasidAllocator::new(config, Box::new(source)).unwrap()
    }

    fn all(a: &PasidAllocator) -> RangeInclusive<Pasid> {
        1..=a.max_pasid()
    }

    #[test]
    fn pasid_zero_is_never_allocated() {
        let mut a = allocator(5);
        let s = a.create_set(100).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| a.alloc(s, 1..=31).ok()).collect();
        assert_eq!(got, (1..=31).collect::<Vec<_>>());
        assert!(matches!(
            a.alloc(s, 0..=31),
            Err(PasidError::InvalidRange { .. })
        ));
        assert_eq!(
            a.lookup(s, 0),
            Err(PasidError::OutOfRange { pasid: 0, max: 31 })
        );
    }

    #[test]
    fn allocation_picks_lowest_free_pasid_in_range() {
        let mut a = allocator(8);
        let s = a.create_set(100).unwrap();
        assert_eq!(a.alloc(s, 10..=20), Ok(10));
        assert_eq!(a.alloc(s, 10..=20), Ok(11));
        assert_eq!(a.alloc(s, 1..=255), Ok(1));
        a.free(s, 10).unwrap();
        assert_eq!(a.alloc(s, 5..=255), Ok(5));
        assert_eq!(a.alloc(s, 6..=255), Ok(6));
        assert_eq!(a.alloc(s, 10..=255), Ok(10));
    }

    #[test]
    fn exhausted_range_fails_cleanly() {
        let mut a = allocator(6);
        let s = a.create_set(100).unwrap();
        assert_eq!(a.alloc(s, 40..=41), Ok(40));
        assert_eq!(a.alloc(s, 40..=41), Ok(41));
        assert_eq!(
            a.alloc(s, 40..=41),
            Err(PasidError::Exhausted { min: 40, max: 41 })
        );
        assert!(matches!(
            a.alloc(s, 41..=64),
            Err(PasidError::InvalidRange { .. })
        ));
    }

    #[test]
    fn allocation_beyond_quota_fails() {
        let mut a = allocator(8);
        let s = a.create_set(2).unwrap();
        a.alloc(s, all(&a)).unwrap();
        a.alloc(s, all(&a)).unwrap();
        assert_eq!(
            a.alloc(s, all(&a)),
            Err(PasidError::QuotaExceeded { quota: 2 })
        );
        // Another set is not affected.
        let t = a.create_set(2).unwrap();
        assert!(a.alloc(t, all(&a)).is_ok());
    }

    #[test]
    fn quota_zero_disables_pasids() {
        let mut a = allocator(8);
        let s = a.create_set(0).unwrap();
        assert_eq!(a.alloc(s, all(&a)), Err(PasidError::Disabled));
        a.set_quota(s, 1).unwrap();
        assert_eq!(a.alloc(s, all(&a)), Ok(1));
    }

    #[test]
    fn inactive_pasids_with_references_count_against_quota() {
        let mut a = allocator(8);
        let s = a.create_set(1).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        a.get(s, p).unwrap();
        a.free(s, p).unwrap();
        assert_eq!(a.usage(s).unwrap().charged, 1);
        assert_eq!(
            a.alloc(s, all(&a)),
            Err(PasidError::QuotaExceeded { quota: 1 })
        );
        a.put(s, p).unwrap();
        assert_eq!(a.usage(s).unwrap().charged, 0);
        assert!(a.alloc(s, all(&a)).is_ok());
    }

    #[test]
    fn inactive_pasid_cannot_be_got() {
        let mut a = allocator(8);
        let s = a.create_set(10).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        a.get(s, p).unwrap();
        a.free(s, p).unwrap();
        assert_eq!(a.get(s, p), Err(PasidError::Inactive(p)));
        assert_eq!(a.lookup(s, p), Err(PasidError::Inactive(p)));
    }

    #[test]
    fn freed_pasid_not_reused_until_last_put() {
        let mut a = allocator(8);
        let s = a.create_set(10).unwrap();
        let p = a.alloc(s, 1..=1).unwrap();
        a.get(s, p).unwrap();
        a.get(s, p).unwrap();
        a.free(s, p).unwrap();
        assert_eq!(
            a.alloc(s, 1..=1),
            Err(PasidError::Exhausted { min: 1, max: 1 })
        );
        a.put(s, p).unwrap();
        assert!(a.alloc(s, 1..=1).is_err());
        a.put(s, p).unwrap();
        assert_eq!(a.state(p), None);
        assert_eq!(a.alloc(s, 1..=1), Ok(p));
    }

    #[test]
    fn freeing_twice_is_an_error() {
        let mut a = allocator(8);
        let s = a.create_set(10).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        a.get(s, p).unwrap();
        a.free(s, p).unwrap();
        assert_eq!(a.free(s, p), Err(PasidError::Inactive(p)));
        a.put(s, p).unwrap();
        assert_eq!(a.free(s, p), Err(PasidError::UnknownPasid(p)));
    }

    #[test]
    fn putting_more_than_got_is_an_error() {
        let mut a = allocator(8);
        let s = a.create_set(10).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        assert_eq!(a.put(s, p), Err(PasidError::NoReference(p)));
        a.get(s, p).unwrap();
        a.put(s, p).unwrap();
        assert_eq!(a.put(s, p), Err(PasidError::NoReference(p)));
        assert_eq!(a.state(p).map(|st| st.refs), Some(1));
        a.free(s, p).unwrap();
        assert_eq!(a.put(s, p), Err(PasidError::UnknownPasid(p)));
    }

    #[test]
    fn foreign_set_pasid_cannot_be_got_put_or_freed() {
        let mut a = allocator(8);
        let s = a.create_set(10).unwrap();
        let t = a.create_set(10).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        assert_eq!(a.get(t, p), Err(PasidError::ForeignPasid(p)));
        assert_eq!(a.put(t, p), Err(PasidError::ForeignPasid(p)));
        assert_eq!(a.free(t, p), Err(PasidError::ForeignPasid(p)));
        assert_eq!(a.lookup(t, p), Err(PasidError::ForeignPasid(p)));
        assert!(a.lookup(s, p).is_ok());
    }

    #[test]
    fn pasids_outside_the_space_are_out_of_range() {
        let mut a = allocator(5);
        let s = a.create_set(10).unwrap();
        assert_eq!(
            a.get(s, 32),
            Err(PasidError::OutOfRange { pasid: 32, max: 31 })
        );
        assert!(a.put(s, u32::MAX).is_err());
        assert!(a.free(s, u32::MAX).is_err());
        assert!(a.free_range(s, 1..=u32::MAX).is_err());
        let (lo, hi) = (9, 8); // empty on purpose
        assert!(a.free_range(s, lo..=hi).is_err());
    }

    #[test]
    fn refcount_overflow_is_an_error() {
        let mut a = allocator(5);
        let s = a.create_set(10).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        if let Some(e) = a.entries.get_mut(p) {
            e.refs = u32::MAX;
        }
        assert_eq!(a.get(s, p), Err(PasidError::RefcountOverflow(p)));
    }

    #[test]
    fn free_range_frees_only_that_sets_pasids_in_range() {
        let mut a = allocator(8);
        let s = a.create_set(100).unwrap();
        let t = a.create_set(100).unwrap();
        for _ in 0..10 {
            a.alloc(s, all(&a)).unwrap();
            a.alloc(t, all(&a)).unwrap();
        }
        // s owns the odd PASIDs 1..=19, t the even ones 2..=20.
        assert_eq!(a.free_range(s, 5..=14), Ok(5));
        for p in 1..=20 {
            let st = a.state(p);
            let freed = p % 2 == 1 && (5..=14).contains(&p);
            assert_eq!(st.is_none(), freed, "pasid {p}");
        }
        assert_eq!(a.usage(s).unwrap().charged, 5);
        assert_eq!(a.usage(t).unwrap().charged, 10);
    }

    #[test]
    fn teardown_keeps_referenced_pasids_until_last_put() {
        let mut a = allocator(8);
        let s = a.create_set(100).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        let q = a.alloc(s, all(&a)).unwrap();
        a.get(s, q).unwrap();
        a.destroy_set(s).unwrap();
        assert_eq!(a.state(p), None);
        assert_eq!(a.state(q).map(|st| st.active), Some(false));
        assert_eq!(a.alloc(s, all(&a)), Err(PasidError::UnknownSet));
        // The slot is not reused while q is reserved.
        let t = a.create_set(10).unwrap();
        assert_ne!(t.index(), s.index());
        a.put(s, q).unwrap();
        assert_eq!(a.live(), 0);
        assert_eq!(a.put(s, q), Err(PasidError::UnknownSet));
        let u = a.create_set(10).unwrap();
        assert_eq!(u.index(), s.index());
        assert_eq!(a.usage(s), Err(PasidError::UnknownSet), "stale handle");
    }

    #[test]
    fn destroyed_set_handle_is_rejected() {
        let mut a = allocator(8);
        let s = a.create_set(10).unwrap();
        a.destroy_set(s).unwrap();
        assert_eq!(a.destroy_set(s), Err(PasidError::UnknownSet));
        assert_eq!(a.get(s, 1), Err(PasidError::UnknownSet));
        assert_eq!(a.free(s, 1), Err(PasidError::UnknownSet));
    }

    #[test]
    fn idle_leases_are_released_to_the_source() {
        let shared = std::sync::Arc::new(std::sync::Mutex::new(MemorySource::new(8, 16).unwrap()));
        let config = AllocatorConfig {
            bits: 8,
            lease_block: 16,
        };
        let mut a = PasidAllocator::new(config, Box::new(shared.clone())).unwrap();
        let s = a.create_set(100).unwrap();
        for _ in 0..20 {
            a.alloc(s, 1..=255).unwrap();
        }
        assert_eq!(a.leased(), 31);
        a.free_range(s, 16..=255).unwrap();
        assert_eq!(a.release_idle_leases(), Ok(16));
        assert_eq!(shared.lock().unwrap().leased(), 15);
        a.destroy_set(s).unwrap();
        assert_eq!(a.release_idle_leases(), Ok(15));
        assert_eq!(shared.lock().unwrap().leased(), 0);
    }

    #[test]
    fn two_allocators_sharing_a_source_never_hand_out_the_same_pasid() {
        let shared = std::sync::Arc::new(std::sync::Mutex::new(MemorySource::new(8, 16).unwrap()));
        let config = AllocatorConfig {
            bits: 8,
            lease_block: 16,
        };
        let mut a = PasidAllocator::new(config, Box::new(shared.clone())).unwrap();
        let mut b = PasidAllocator::new(config, Box::new(shared)).unwrap();
        let (sa, sb) = (a.create_set(1000).unwrap(), b.create_set(1000).unwrap());
        let mut seen = std::collections::HashSet::new();
        loop {
            let (x, y) = (a.alloc(sa, 1..=255), b.alloc(sb, 1..=255));
            for p in [&x, &y].into_iter().flatten() {
                assert!(seen.insert(*p), "{p} handed out twice");
            }
            if x.is_err() && y.is_err() {
                break;
            }
        }
        assert_eq!(seen.len(), 255);
    }

    /// A source that breaks its contract must not corrupt the allocator.
    struct Liar(Vec<RangeInclusive<Pasid>>);

    impl HostPasidSource for Liar {
        fn lease(
            &mut self,
            _: u32,
            _: RangeInclusive<Pasid>,
        ) -> Result<Vec<RangeInclusive<Pasid>>> {
            Ok(self.0.clone())
        }
        fn release(&mut self, _: &[RangeInclusive<Pasid>]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn invalid_leases_from_the_source_are_rejected() {
        let config = AllocatorConfig {
            bits: 8,
            lease_block: 16,
        };
        for lie in [vec![0..=3], vec![250..=300], vec![1..=8, 8..=9], vec![]] {
            let mut a = PasidAllocator::new(config, Box::new(Liar(lie.clone()))).unwrap();
            let s = a.create_set(10).unwrap();
            assert!(a.alloc(s, 1..=255).is_err(), "{lie:?}");
            assert_eq!(a.leased(), 0);
        }
        // Leasing the same range twice is caught too.
        let mut a = PasidAllocator::new(config, Box::new(Liar(vec![1..=1]))).unwrap();
        let s = a.create_set(10).unwrap();
        assert_eq!(a.alloc(s, 1..=255), Ok(1));
        assert!(matches!(a.alloc(s, 1..=255), Err(PasidError::BadLease(_))));
    }

    #[test]
    fn adopted_lease_joins_the_pool_without_asking_the_source() {
        let config = AllocatorConfig {
            bits: 8,
            lease_block: 16,
        };
        // A source with nothing left: only the adopted lease can serve.
        let mut a = PasidAllocator::new(config, Box::new(Liar(vec![]))).unwrap();
        let s = a.create_set(10).unwrap();
        a.adopt_lease(32..=47).unwrap();
        assert_eq!(a.leased(), 16);
        assert_eq!(a.alloc(s, 1..=255), Ok(32));
        for bad in [40..=50, 0..=3, 250..=256] {
            assert!(a.adopt_lease(bad.clone()).is_err(), "{bad:?}");
        }
        let (lo, hi) = (9, 8); // empty on purpose
        assert!(a.adopt_lease(lo..=hi).is_err());
        assert_eq!(a.leased(), 16);
    }

    #[test]
    fn restored_pasid_is_active_with_only_the_owner_reference_and_charged() {
        let config = AllocatorConfig {
            bits: 8,
            lease_block: 16,
        };
        let mut a = PasidAllocator::new(config, Box::new(Liar(vec![]))).unwrap();
        let s = a.create_set(1).unwrap();
        a.adopt_lease(16..=31).unwrap();
        a.restore(s, 20).unwrap();
        // Beyond the quota: a quota lowered across a restart.
        a.restore(s, 21).unwrap();
        assert_eq!(
            a.state(20),
            Some(PasidState {
                owner: s,
                active: true,
                refs: 1
            })
        );
        assert_eq!(a.usage(s).unwrap().charged, 2);
        assert!(matches!(
            a.alloc(s, 1..=255),
            Err(PasidError::QuotaExceeded { .. })
        ));
        assert!(a.restore(s, 20).is_err(), "restored twice");
        assert!(a.restore(s, 40).is_err(), "outside every lease");
        a.free(s, 20).unwrap();
        assert_eq!(a.state(20), None);
    }

    #[test]
    fn pasids_of_lists_only_that_sets_pasids_with_their_state() {
        let mut a = allocator(8);
        let s = a.create_set(10).unwrap();
        let t = a.create_set(10).unwrap();
        let p = a.alloc(s, all(&a)).unwrap();
        let q = a.alloc(t, all(&a)).unwrap();
        let r = a.alloc(s, all(&a)).unwrap();
        a.get(s, r).unwrap();
        a.free(s, r).unwrap();
        let listed = a.pasids_of(s).unwrap();
        let brief: Vec<_> = listed
            .iter()
            .map(|(id, st)| (*id, st.active, st.refs))
            .collect();
        assert_eq!(brief, vec![(p, true, 1), (r, false, 1)]);
        assert_eq!(a.pasids_of(t).unwrap().len(), 1);
        assert_eq!(a.pasids_of(t).unwrap()[0].0, q);
    }

    #[test]
    fn bad_configuration_is_rejected() {
        for (bits, lease_block) in [(0, 16), (21, 16), (20, 0)] {
            let source = MemorySource::new(20, 16).unwrap();
            let config = AllocatorConfig { bits, lease_block };
            assert!(PasidAllocator::new(config, Box::new(source)).is_err());
        }
    }
}
