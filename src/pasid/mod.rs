// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host global-PASID allocator (see issue "Host global-PASID allocator").
//!
//! This module owns the in-memory core of the host-wide PASID allocator:
//! the free-space index ([`space`]), per-PASID storage (`table`), sets with
//! quotas and the reference-counted PASID lifecycle ([`set`]), guest <->
//! host translation ([`translate`], with its per-set index `forward`) and the pluggable source of host PASID
//! leases ([`source`]). Errors are one enum ([`error`]). No I/O, no
//! threads: the durable lease store plugs in behind [`HostPasidSource`].
//!
//! PASIDs live in `[1, 2^bits - 1]`; 0 means "no PASID" and is never
//! allocated.

pub mod error;
mod forward;
pub mod set;
pub mod source;
pub mod space;
mod table;
pub mod translate;

#[cfg(test)]
mod model_tests;

use std::ops::RangeInclusive;

pub use error::{PasidError, Result, SourceError};
pub use set::{AllocatorConfig, AllocatorFootprint, PasidAllocator, PasidState, SetId, SetUsage};
pub use source::{HostPasidSource, MemorySource};
pub use space::FreeSpace;
pub use translate::{device_max_pasid, GuestPasid, TranslationMode, Translator};

/// A PASID (guest or host, as the context says).
pub type Pasid = u32;

/// Checks that `range` is a non-empty range of valid PASIDs in
/// `[1, max]` (0 means "no PASID" and is never allocated).
pub fn check_range(range: RangeInclusive<Pasid>, max: Pasid) -> Result<RangeInclusive<Pasid>> {
    let (min, end) = (*range.start(), *range.end());
    if min == 0 || min > end || end > max {
        return Err(PasidError::InvalidRange {
            min,
            max: end,
            limit: max,
        });
    }
    Ok(range)
}

/// Smallest supported PASID width in bits.
pub const MIN_BITS: u8 = 1;
/// Largest PASID width in bits (PCIe).
pub const MAX_BITS: u8 = 20;
/// Default host PASID width in bits.
pub const DEFAULT_BITS: u8 = 20;
/// Default per-set quota, like VFIO's `pasid_quota`.
pub const DEFAULT_SET_QUOTA: u32 = 1000;
/// Default number of PASIDs leased from the source at a time.
pub const DEFAULT_LEASE_BLOCK: u32 = 1024;
