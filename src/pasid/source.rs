// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where host PASIDs come from: the pluggable [`HostPasidSource`] trait and
//! its in-memory implementation [`MemorySource`].
//!
//! Host PASIDs are a host-wide resource shared by every daemon. A source
//! hands them out in *leases* of whole blocks so that the durable source
//! (a database shared by the daemons of the host) is consulted once per
//! block, not once per PASID; the allocator then allocates inside its
//! leases in memory. Leases belong to the allocator (one per daemon), not
//! to a set: a PASID returned by one set can serve another set of the same
//! daemon without a round-trip to the store, and per-set quotas are
//! enforced in memory.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use super::error::{PasidError, Result};
use super::space::FreeSpace;
use super::{check_range, Pasid, MAX_BITS, MIN_BITS};

/// A provider of host PASID leases.
///
/// Object-safe and `Send` so that a daemon can hold a
/// `Box<dyn HostPasidSource>` chosen at start-up (in-memory, durable,
/// host-provided).
pub trait HostPasidSource: Send {
    /// Leases about `want` more PASIDs, at least one of which lies in
    /// `within`. Returns the newly leased ranges; they never include 0 nor
    /// anything leased before and not released. May return fewer than
    /// `want` PASIDs when the space runs low. Fails with
    /// [`PasidError::Exhausted`] when nothing in `within` can be leased.
    fn lease(
        &mut self,
        want: u32,
        within: RangeInclusive<Pasid>,
    ) -> Result<Vec<RangeInclusive<Pasid>>>;

    /// Gives back ranges exactly as [`Self::lease`] returned them; none of
    /// their PASIDs may be in use any more.
    fn release(&mut self, ranges: &[RangeInclusive<Pasid>]) -> Result<()>;
}

impl<S: HostPasidSource + ?Sized> HostPasidSource for Box<S> {
    fn lease(
        &mut self,
        want: u32,
        within: RangeInclusive<Pasid>,
    ) -> Result<Vec<RangeInclusive<Pasid>>> {
        (**self).lease(want, within)
    }

    fn release(&mut self, ranges: &[RangeInclusive<Pasid>]) -> Result<()> {
        (**self).release(ranges)
    }
}

/// Several allocators of one process (tests, in-process daemons) share one
/// source through a mutex, as daemons of a host share the durable store.
impl<S: HostPasidSource + ?Sized> HostPasidSource for Arc<Mutex<S>> {
    fn lease(
        &mut self,
        want: u32,
        within: RangeInclusive<Pasid>,
    ) -> Result<Vec<RangeInclusive<Pasid>>> {
        self.lock()
            .map_err(|_| PasidError::Poisoned)?
            .lease(want, within)
    }

    fn release(&mut self, ranges: &[RangeInclusive<Pasid>]) -> Result<()> {
        self.lock()
            .map_err(|_| PasidError::Poisoned)?
            .release(ranges)
    }
}

/// In-memory source: leases aligned blocks of `block` PASIDs, lowest
/// first. Block 0 is `[1, block - 1]` since PASID 0 is never handed out.
#[derive(Debug, Clone)]
pub struct MemorySource {
    max: Pasid,
    block: u32,
    /// One bit per block, 1 = not leased.
    blocks: FreeSpace,
}

impl MemorySource {
    /// A source over `[1, 2^bits - 1]` leasing blocks of `block` PASIDs.
    pub fn new(bits: u8, block: u32) -> Result<Self> {
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(PasidError::InvalidConfig("PASID width out of range"));
        }
        if block == 0 {
            return Err(PasidError::InvalidConfig("lease block size is 0"));
        }
        let max = (1u32 << bits) - 1;
        let count = (max / block) + 1;
        let mut blocks = FreeSpace::new(count);
        for b in 0..count {
            blocks.release(b);
        }
        Ok(Self { max, block, blocks })
    }

    /// The PASIDs of block `b`, without 0 and clipped to the space.
    fn block_range(&self, b: u32) -> RangeInclusive<Pasid> {
        let start = (b * self.block).max(1);
        let end = b
            .saturating_mul(self.block)
            .saturating_add(self.block - 1)
            .min(self.max);
        start..=end
    }

    /// Number of PASIDs currently leased out.
    pub fn leased(&self) -> u32 {
        (0..self.blocks.len())
            .filter(|b| !self.blocks.is_free(*b))
            .map(|b| {
                let r = self.block_range(b);
                r.end() - r.start() + 1
            })
            .sum()
    }
}

impl HostPasidSource for MemorySource {
    fn lease(
        &mut self,
        want: u32,
        within: RangeInclusive<Pasid>,
    ) -> Result<Vec<RangeInclusive<Pasid>>> {
        let within = check_range(within, self.max)?;
        let (min, max) = (*within.start(), *within.end());
        let blocks = (min / self.block)..=(max / self.block);
        let mut out = Vec::new();
        let mut leased = 0u32;
        while leased < want.max(1) {
            let Some(b) = self.blocks.take_first_free_in(&blocks) else {
                break;
            };
            let r = self.block_range(b);
            leased = leased.saturating_add(r.end() - r.start() + 1);
            out.push(r);
        }
        if out.is_empty() {
            return Err(PasidError::Exhausted { min, max });
        }
        Ok(out)
    }

    fn release(&mut self, ranges: &[RangeInclusive<Pasid>]) -> Result<()> {
        // Validate everything first so that a bad call changes nothing.
        for r in ranges {
            let b = r.start() / self.block;
            if *r != self.block_range(b) || self.blocks.is_free(b) {
                return Err(PasidError::BadLease(r.clone()));
            }
        }
        for r in ranges {
            self.blocks.release(r.start() / self.block);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_source_never_leases_pasid_zero() {
        let mut s = MemorySource::new(5, 8).unwrap();
        let r = s.lease(8, 1..=31).unwrap();
        assert_eq!(r, vec![1..=7, 8..=15]);
    }

    #[test]
    fn memory_source_leases_blocks_overlapping_the_range() {
        let mut s = MemorySource::new(20, 1024).unwrap();
        assert_eq!(s.lease(1, 5000..=5001).unwrap(), vec![4096..=5119]);
        // The same block is not leased twice.
        assert_eq!(
            s.lease(1, 5000..=5001),
            Err(PasidError::Exhausted {
                min: 5000,
                max: 5001
            })
        );
    }

    #[test]
    fn memory_source_release_returns_blocks_for_reuse() {
        let mut s = MemorySource::new(6, 16).unwrap();
        let all = s.lease(u32::MAX, 1..=63).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(s.leased(), 63);
        assert!(s.lease(1, 1..=63).is_err());
        s.release(&all[1..2]).unwrap();
        assert_eq!(s.lease(1, 1..=63).unwrap(), vec![16..=31]);
    }

    #[test]
    fn memory_source_rejects_release_of_unleased_ranges() {
        let mut s = MemorySource::new(6, 16).unwrap();
        let got = s.lease(1, 1..=63).unwrap();
        assert!(s.release(&[16..=31]).is_err());
        assert!(s.release(&[2..=15]).is_err());
        s.release(&got).unwrap();
        assert!(s.release(&got).is_err(), "double release");
    }

    #[test]
    fn memory_source_rejects_bad_configuration() {
        assert!(MemorySource::new(0, 16).is_err());
        assert!(MemorySource::new(21, 16).is_err());
        assert!(MemorySource::new(20, 0).is_err());
    }

    #[test]
    fn shared_source_hands_each_block_out_once() {
        let shared = Arc::new(Mutex::new(MemorySource::new(6, 16).unwrap()));
        let (mut a, mut b) = (shared.clone(), shared);
        let ra = a.lease(1, 1..=63).unwrap();
        let rb = b.lease(1, 1..=63).unwrap();
        assert_eq!(ra, vec![1..=15]);
        assert_eq!(rb, vec![16..=31]);
    }
}
