// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam between the walkers and guest memory: 8-byte little-endian
//! loads and compare-exchanges of table entries, checked against guest RAM.

use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use vm_memory::bitmap::{Bitmap, MS};
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory, VolatileSlice};

/// Why a table entry could not be accessed.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum TableMemoryError {
    /// The address is not 8-byte aligned.
    #[error("table entry address {0:#x} is not 8-byte aligned")]
    Misaligned(u64),
    /// The 8 bytes at the address are not all in guest RAM.
    #[error("table entry address {0:#x} is not in guest RAM")]
    NotRam(u64),
}

/// Guest memory as the walkers see it: aligned 8-byte table entries in
/// the guest's (little-endian) byte order.
///
/// Implemented for every vm-memory [`GuestMemoryBackend`], so the daemon
/// passes its `GuestMemoryMmap` (or the guard of a `GuestMemoryAtomic`).
/// Tests wrap it to inject races.
pub trait TableMemory {
    /// Loads the entry at `gpa`.
    fn read_u64(&self, gpa: u64) -> Result<u64, TableMemoryError>;

    /// Atomically replaces the entry at `gpa` by `new` if it still holds
    /// `current`: `Ok(Ok(current))` when it did, `Ok(Err(actual))` with
    /// the value found when the guest changed it meanwhile.
    fn compare_exchange_u64(
        &self,
        gpa: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, TableMemoryError>;
}

impl<M: GuestMemoryBackend + ?Sized> TableMemory for M {
    fn read_u64(&self, gpa: u64) -> Result<u64, TableMemoryError> {
        let slice = entry_slice(self, gpa)?;
        let word = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| TableMemoryError::Misaligned(gpa))?;
        // Acquire pairs with the guest's release when it publishes a table.
        Ok(u64::from_le(word.load(Ordering::Acquire)))
    }

    fn compare_exchange_u64(
        &self,
        gpa: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, TableMemoryError> {
        let slice = entry_slice(self, gpa)?;
        let word = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| TableMemoryError::Misaligned(gpa))?;
        let result = word
            .compare_exchange(
                current.to_le(),
                new.to_le(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map(u64::from_le)
            .map_err(u64::from_le);
        if result.is_ok() {
            // Atomic references bypass vm-memory's dirty log: mark the
            // entry ourselves so that live migration copies the update.
            slice.bitmap().mark_dirty(0, 8);
        }
        Ok(result)
    }
}

/// The 8 bytes of the entry at `gpa`, if aligned and entirely in RAM.
fn entry_slice<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    gpa: u64,
) -> Result<VolatileSlice<'_, MS<'_, M>>, TableMemoryError> {
    if !gpa.is_multiple_of(8) {
        return Err(TableMemoryError::Misaligned(gpa));
    }
    mem.get_slice(GuestAddress(gpa), 8)
        .map_err(|_| TableMemoryError::NotRam(gpa))
}

#[cfg(test)]
mod tests {
    use super::{TableMemory, TableMemoryError};
    use crate::pgtable::testutil::TestMem;

    #[test]
    fn entries_are_little_endian_words_of_guest_memory() {
        let tm = TestMem::new(1 << 20);
        tm.write(0x1000, 0x1122_3344_5566_7788);
        assert_eq!(tm.mem.read_u64(0x1000), Ok(0x1122_3344_5566_7788));
        assert_eq!(
            tm.mem
                .compare_exchange_u64(0x1000, 0x1122_3344_5566_7788, 7),
            Ok(Ok(0x1122_3344_5566_7788))
        );
        assert_eq!(
            tm.mem
                .compare_exchange_u64(0x1000, 0x1122_3344_5566_7788, 9),
            Ok(Err(7))
        );
        assert_eq!(tm.read(0x1000), 7);
    }

    #[test]
    fn unaligned_entry_address_is_refused() {
        let tm = TestMem::new(1 << 20);
        assert_eq!(
            tm.mem.read_u64(0x1004),
            Err(TableMemoryError::Misaligned(0x1004))
        );
        assert_eq!(
            tm.mem.compare_exchange_u64(0x1001, 0, 1),
            Err(TableMemoryError::Misaligned(0x1001))
        );
    }

    #[test]
    fn entry_address_outside_ram_is_refused() {
        let tm = TestMem::new(1 << 20);
        for gpa in [1 << 20, u64::MAX - 7] {
            assert_eq!(tm.mem.read_u64(gpa), Err(TableMemoryError::NotRam(gpa)));
            assert_eq!(
                tm.mem.compare_exchange_u64(gpa, 0, 1),
                Err(TableMemoryError::NotRam(gpa))
            );
        }
        assert!(tm.mem.read_u64((1 << 20) - 8).is_ok());
    }
}
