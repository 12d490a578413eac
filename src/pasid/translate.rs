// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest <-> host PASID translation: [`Translator`] and its modes.
//!
//! In [`TranslationMode::Global`] (platforms whose PASIDs are host-wide,
//! e.g. VT-d with shared work queues) each guest PASID of a set is mapped
//! to a host PASID allocated from the [`PasidAllocator`], charged to the
//! set's quota; a reverse map turns the host PASID carried by a fault back
//! into `(set, guest PASID)`. In [`TranslationMode::Identity`] (per-device
//! PASID platforms such as SMMUv3) the guest PASID is used as is and only
//! checked against the device's PASID width; nothing is allocated.
//!
//! The translator owns the *mapping* only; the host PASID's lifecycle and
//! references stay with the allocator. A mapping holds the owner's
//! reference: device bindings and in-flight page requests `get`/`put` the
//! host PASID on the allocator, and `unmap` frees it, so the host PASID
//! stays reserved until they are done. Host PASIDs mapped here must be
//! freed through `unmap`, not directly on the allocator.

use std::ops::RangeInclusive;

use super::error::{PasidError, Result};
use super::forward::ForwardIndex;
use super::set::{PasidAllocator, SetId};
use super::table::PageTable;
use super::{Pasid, MAX_BITS};

/// How guest PASIDs become host PASIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranslationMode {
    /// Guest PASIDs map to host PASIDs from the host-wide pool.
    Global,
    /// Guest PASIDs are host PASIDs (per-device PASID spaces).
    Identity,
}

/// The guest side of a host PASID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPasid {
    /// The owning set; `None` in identity mode, where the device that
    /// raised the fault tells the set.
    pub set: Option<SetId>,
    /// The guest PASID.
    pub pasid: Pasid,
}

/// Guest <-> host PASID maps of all sets of one allocator.
pub struct Translator {
    mode: TranslationMode,
    /// Indexed by [`SetId::index`]: the set and its guest -> host index.
    forward: Vec<Option<(SetId, ForwardIndex)>>,
    /// Host -> guest PASID; the set is the host PASID's owner. Also gives
    /// the forward indexes their keys.
    reverse: PageTable<Pasid>,
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator")
            .field("mode", &self.mode)
            .field("mapped", &self.reverse.live())
            .finish_non_exhaustive()
    }
}

/// Largest PASID of a device with `bits` of PASID width (0 = no PASID).
pub fn device_max_pasid(bits: u8) -> Pasid {
    if bits == 0 {
        0
    } else {
        (1u32 << bits.min(MAX_BITS)) - 1
    }
}

fn check_width(pasid: Pasid, device_bits: u8) -> Result<()> {
    let max = device_max_pasid(device_bits);
    if pasid == 0 || pasid > max {
        return Err(PasidError::OutOfRange { pasid, max });
    }
    Ok(())
}

impl Translator {
    /// A translator in `mode` for host PASIDs of `alloc`.
    pub fn new(mode: TranslationMode, alloc: &PasidAllocator) -> Self {
        let len = match mode {
            TranslationMode::Global => alloc.max_pasid().saturating_add(1),
            TranslationMode::Identity => 0,
        };
        Self {
            mode,
            forward: Vec::new(),
            reverse: PageTable::new(len),
        }
    }

    /// The translation mode.
    pub fn mode(&self) -> TranslationMode {
        self.mode
    }

    fn set_map(&self, set: SetId) -> Option<&ForwardIndex> {
        match self.forward.get(set.index())? {
            Some((id, map)) if *id == set => Some(map),
            _ => None,
        }
    }

    /// Host PASID mapped to `guest` in `set`.
    fn lookup(&self, set: SetId, guest: Pasid) -> Option<Pasid> {
        let reverse = &self.reverse;
        self.set_map(set)?
            .get(guest, |h| reverse.get(h).copied().unwrap_or(0))
    }

    /// Maps guest PASID `guest` of `set`, used by a device with
    /// `device_bits` of PASID width, and returns the host PASID. Global
    /// mode allocates a host PASID (that the device can carry) on first
    /// use and returns the same one afterwards; take a reference with
    /// [`PasidAllocator::get`] per binding. Identity mode only checks.
    pub fn map(
        &mut self,
        alloc: &mut PasidAllocator,
        set: SetId,
        guest: Pasid,
        device_bits: u8,
    ) -> Result<Pasid> {
        check_width(guest, device_bits)?;
        if self.mode == TranslationMode::Identity {
            return Ok(guest);
        }
        let device_max = device_max_pasid(device_bits);
        if let Some(host) = self.lookup(set, guest) {
            // Another device of the set may have a narrower PASID width.
            check_width(host, device_bits)?;
            return Ok(host);
        }
        let host = alloc.alloc(set, 1..=device_max.min(alloc.max_pasid()))?;
        self.insert(set, guest, host);
        Ok(host)
    }

    /// Maps guest PASID `guest` of `set` to `host`, an active PASID of
    /// `set` allocated by the caller: a mapping recovered after a restart,
    /// or one where the guest uses the host PASID itself (PASID_ALLOC,
    /// where `guest == host`). The mapping then owns the host PASID as if
    /// [`Self::map`] had allocated it. Fails if either side is mapped.
    pub fn adopt(
        &mut self,
        alloc: &PasidAllocator,
        set: SetId,
        guest: Pasid,
        host: Pasid,
    ) -> Result<()> {
        if guest == 0 {
            return Err(PasidError::OutOfRange {
                pasid: 0,
                max: Pasid::MAX,
            });
        }
        if self.mode == TranslationMode::Identity {
            return Err(PasidError::IdentityMode);
        }
        alloc.lookup(set, host)?;
        if self.lookup(set, guest).is_some() || self.reverse.get(host).is_some() {
            return Err(PasidError::AlreadyMapped { guest, host });
        }
        self.insert(set, guest, host);
        Ok(())
    }

    /// Whether guest PASID `guest` of `set` is mapped (global mode).
    pub fn is_mapped(&self, set: SetId, guest: Pasid) -> bool {
        self.lookup(set, guest).is_some()
    }

    /// Host PASID mapped to guest PASID `guest` of `set`, whatever its
    /// state and width (inspection, freeing).
    pub fn host_of(&self, set: SetId, guest: Pasid) -> Option<Pasid> {
        self.lookup(set, guest)
    }

    /// Guest PASID mapped to host PASID `host`, whatever its state
    /// (inspection).
    pub fn guest_of(&self, host: Pasid) -> Option<Pasid> {
        self.reverse.get(host).copied()
    }

    fn insert(&mut self, set: SetId, guest: Pasid, host: Pasid) {
        let slot = set.index();
        if self.forward.len() <= slot {
            self.forward.resize_with(slot + 1, || None);
        }
        let entry = &mut self.forward[slot];
        // A stale map of a destroyed set in this slot is dropped here.
        if !matches!(entry, Some((id, _)) if *id == set) {
            *entry = Some((set, ForwardIndex::default()));
        }
        // The reverse entry first: the index reads its keys through it.
        self.reverse.insert(host, guest);
        if let Some((_, map)) = entry {
            let reverse = &self.reverse;
            map.insert(host, |h| reverse.get(h).copied().unwrap_or(0));
        }
    }

    /// Unmaps guest PASID `guest` of `set` and frees its host PASID, which
    /// stays reserved until its last reference is put. No-op in identity
    /// mode.
    pub fn unmap(&mut self, alloc: &mut PasidAllocator, set: SetId, guest: Pasid) -> Result<()> {
        if self.mode == TranslationMode::Identity {
            return Ok(());
        }
        let host = self
            .lookup(set, guest)
            .ok_or(PasidError::NotMapped(guest))?;
        alloc.free(set, host)?;
        if let Some(Some((_, map))) = self.forward.get_mut(set.index()) {
            let reverse = &self.reverse;
            map.remove(guest, |h| reverse.get(h).copied().unwrap_or(0));
        }
        self.reverse.remove(host);
        Ok(())
    }

    /// Unmaps every guest PASID of `set` in `range`; returns how many.
    pub fn unmap_range(
        &mut self,
        alloc: &mut PasidAllocator,
        set: SetId,
        range: RangeInclusive<Pasid>,
    ) -> Result<u32> {
        let mut guests: Vec<Pasid> = self
            .set_map(set)
            .map(|m| {
                m.hosts()
                    .filter_map(|h| self.reverse.get(h).copied())
                    .filter(|g| range.contains(g))
                    .collect()
            })
            .unwrap_or_default();
        guests.sort_unstable();
        let mut count = 0;
        for guest in guests {
            self.unmap(alloc, set, guest)?;
            count += 1;
        }
        Ok(count)
    }

    /// Unmaps all of `set`'s PASIDs and destroys the set in `alloc`.
    pub fn destroy_set(&mut self, alloc: &mut PasidAllocator, set: SetId) -> Result<()> {
        self.unmap_range(alloc, set, 1..=Pasid::MAX)?;
        alloc.destroy_set(set)?;
        if let Some(entry) = self.forward.get_mut(set.index()) {
            *entry = None;
        }
        Ok(())
    }

    /// Host PASID for guest PASID `guest` of `set` on a device with
    /// `device_bits` of PASID width.
    pub fn to_host(
        &self,
        alloc: &PasidAllocator,
        set: SetId,
        guest: Pasid,
        device_bits: u8,
    ) -> Result<Pasid> {
        check_width(guest, device_bits)?;
        if self.mode == TranslationMode::Identity {
            return Ok(guest);
        }
        let host = self
            .lookup(set, guest)
            .ok_or(PasidError::NotMapped(guest))?;
        check_width(host, device_bits)?;
        // Catches a host PASID freed behind the translator's back.
        alloc.lookup(set, host)?;
        Ok(host)
    }

    /// Guest side of host PASID `host`, as carried by a fault or page
    /// request from a device with `device_bits` of PASID width. Fails for
    /// inactive host PASIDs: their requests are to be dropped.
    pub fn to_guest(
        &self,
        alloc: &PasidAllocator,
        host: Pasid,
        device_bits: u8,
    ) -> Result<GuestPasid> {
        check_width(host, device_bits)?;
        if self.mode == TranslationMode::Identity {
            return Ok(GuestPasid {
                set: None,
                pasid: host,
            });
        }
        let state = alloc.state(host).ok_or(PasidError::NotMapped(host))?;
        if !state.active {
            return Err(PasidError::Inactive(host));
        }
        let guest = *self.reverse.get(host).ok_or(PasidError::NotMapped(host))?;
        if self.lookup(state.owner, guest) != Some(host) {
            return Err(PasidError::NotMapped(host));
        }
        Ok(GuestPasid {
            set: Some(state.owner),
            pasid: guest,
        })
    }

    /// Number of mapped guest PASIDs (global mode).
    pub fn mapped(&self) -> u32 {
        self.reverse.live()
    }

    /// Heap bytes held by the maps, from their capacities.
    pub fn memory_bytes(&self) -> usize {
        let maps: usize = self
            .forward
            .iter()
            .flatten()
            .map(|(_, m)| m.memory_bytes())
            .sum();
        self.forward.capacity() * std::mem::size_of::<Option<(SetId, ForwardIndex)>>()
            + maps
            + self.reverse.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pasid::set::AllocatorConfig;
    use crate::pasid::source::MemorySource;

    fn setup(mode: TranslationMode) -> (PasidAllocator, Translator, SetId) {
        let source = MemorySource::new(20, 1024).unwrap();
        let mut alloc = PasidAllocator::new(AllocatorConfig::default(), Box::new(source)).unwrap();
        let set = alloc.create_set(100).unwrap();
        let t = Translator::new(mode, &alloc);
        (alloc, t, set)
    }

    #[test]
    fn global_mode_maps_guest_pasid_to_pool_pasid() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        let h = t.map(&mut a, s, 777, 20).unwrap();
        assert_eq!(h, 1, "lowest free host PASID");
        assert_eq!(t.to_host(&a, s, 777, 20), Ok(1));
        assert_eq!(a.usage(s).unwrap().charged, 1);
        assert_eq!(t.map(&mut a, s, 777, 20), Ok(1), "same mapping again");
        assert_eq!(a.usage(s).unwrap().charged, 1);
    }

    #[test]
    fn reverse_map_finds_guest_pasid_for_host_pasid() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        let s2 = a.create_set(100).unwrap();
        let h1 = t.map(&mut a, s, 42, 20).unwrap();
        let h2 = t.map(&mut a, s2, 42, 20).unwrap();
        assert_ne!(h1, h2, "same guest PASID in two sets");
        assert_eq!(
            t.to_guest(&a, h2, 20),
            Ok(GuestPasid {
                set: Some(s2),
                pasid: 42
            })
        );
        assert_eq!(t.to_guest(&a, 999, 20), Err(PasidError::NotMapped(999)));
    }

    #[test]
    fn unmapped_host_pasid_stays_reserved_while_referenced() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        let h = t.map(&mut a, s, 5, 20).unwrap();
        a.get(s, h).unwrap(); // in-flight page request
        t.unmap(&mut a, s, 5).unwrap();
        assert_eq!(t.to_host(&a, s, 5, 20), Err(PasidError::NotMapped(5)));
        assert_eq!(t.to_guest(&a, h, 20), Err(PasidError::Inactive(h)));
        let h2 = t.map(&mut a, s, 5, 20).unwrap();
        assert_ne!(h2, h, "not reused while referenced");
        a.put(s, h).unwrap();
        assert_eq!(a.state(h), None);
    }

    #[test]
    fn global_mode_host_pasid_fits_device_width() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        let s2 = a.create_set(100).unwrap();
        for g in 1..=15 {
            t.map(&mut a, s2, g, 20).unwrap();
        }
        // Host PASIDs 1..=15 are taken; a 4-bit device cannot get one.
        assert_eq!(
            t.map(&mut a, s, 1, 4),
            Err(PasidError::Exhausted { min: 1, max: 15 })
        );
        let wide = t.map(&mut a, s, 1, 20).unwrap();
        assert_eq!(wide, 16);
        assert_eq!(
            t.to_host(&a, s, 1, 4),
            Err(PasidError::OutOfRange { pasid: 16, max: 15 })
        );
    }

    #[test]
    fn global_mapping_is_charged_to_the_quota() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        a.set_quota(s, 1).unwrap();
        t.map(&mut a, s, 1, 20).unwrap();
        assert_eq!(
            t.map(&mut a, s, 2, 20),
            Err(PasidError::QuotaExceeded { quota: 1 })
        );
    }

    #[test]
    fn identity_mode_rejects_pasid_beyond_device_width() {
        let (mut a, mut t, s) = setup(TranslationMode::Identity);
        assert_eq!(t.map(&mut a, s, 255, 8), Ok(255));
        assert_eq!(
            t.map(&mut a, s, 256, 8),
            Err(PasidError::OutOfRange {
                pasid: 256,
                max: 255
            })
        );
        assert!(t.to_host(&a, s, 0, 8).is_err());
        assert!(t.to_guest(&a, 1, 0).is_err(), "device without PASID");
        assert_eq!(a.live(), 0, "identity mode allocates nothing");
    }

    #[test]
    fn identity_mode_uses_guest_pasid_as_host_pasid() {
        let (a, t, s) = setup(TranslationMode::Identity);
        assert_eq!(t.to_host(&a, s, 4000, 16), Ok(4000));
        assert_eq!(
            t.to_guest(&a, 4000, 16),
            Ok(GuestPasid {
                set: None,
                pasid: 4000
            })
        );
    }

    #[test]
    fn unmap_range_and_teardown_release_host_pasids() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        for g in [3, 10, 20, 30] {
            t.map(&mut a, s, g, 20).unwrap();
        }
        assert_eq!(t.unmap_range(&mut a, s, 10..=20), Ok(2));
        assert_eq!(t.mapped(), 2);
        assert_eq!(t.unmap(&mut a, s, 10), Err(PasidError::NotMapped(10)));
        t.destroy_set(&mut a, s).unwrap();
        assert_eq!(t.mapped(), 0);
        assert_eq!(a.live(), 0);
        assert_eq!(t.to_host(&a, s, 3, 20), Err(PasidError::NotMapped(3)));
    }

    #[test]
    fn adopted_mapping_translates_both_ways_and_unmaps_like_a_mapped_one() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        let h = a.alloc(s, 100..=200).unwrap();
        t.adopt(&a, s, h, h).unwrap();
        assert_eq!(t.to_host(&a, s, h, 20), Ok(h));
        assert_eq!(t.host_of(s, h), Some(h));
        assert_eq!(t.guest_of(h), Some(h));
        assert_eq!(t.map(&mut a, s, h, 20), Ok(h), "map finds it");
        assert_eq!(
            t.to_guest(&a, h, 20),
            Ok(GuestPasid {
                set: Some(s),
                pasid: h
            })
        );
        t.unmap(&mut a, s, h).unwrap();
        assert_eq!(a.state(h), None, "unmap freed the host PASID");
        assert!(!t.is_mapped(s, h));
    }

    #[test]
    fn adopt_refuses_mapped_inactive_or_foreign_pasids() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        let s2 = a.create_set(100).unwrap();
        let h = a.alloc(s, 1..=100).unwrap();
        let other = a.alloc(s2, 1..=100).unwrap();
        t.adopt(&a, s, 7, h).unwrap();
        let h2 = a.alloc(s, 1..=100).unwrap();
        assert!(t.adopt(&a, s, 7, h2).is_err(), "guest PASID already mapped");
        assert!(t.adopt(&a, s, 8, h).is_err(), "host PASID already mapped");
        assert_eq!(
            t.adopt(&a, s, 9, other),
            Err(PasidError::ForeignPasid(other))
        );
        a.get(s, h2).unwrap();
        a.free(s, h2).unwrap();
        assert_eq!(t.adopt(&a, s, 9, h2), Err(PasidError::Inactive(h2)));
        assert!(t.adopt(&a, s, 0, h2).is_err());
        let (mut a, mut t, s) = setup(TranslationMode::Identity);
        let h = a.alloc(s, 1..=100).unwrap();
        assert!(t.adopt(&a, s, h, h).is_err(), "identity mode maps nothing");
    }

    #[test]
    fn stale_set_map_is_not_inherited_by_a_new_set() {
        let (mut a, mut t, s) = setup(TranslationMode::Global);
        t.map(&mut a, s, 9, 20).unwrap();
        t.destroy_set(&mut a, s).unwrap();
        let s2 = a.create_set(10).unwrap();
        assert_eq!(s2.index(), s.index());
        assert_eq!(t.to_host(&a, s2, 9, 20), Err(PasidError::NotMapped(9)));
    }
}
