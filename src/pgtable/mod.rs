// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Software walkers for the guest page tables of SVA (shared virtual
//! addressing): what the daemon runs to translate a (PASID, VA) of a device
//! model once a guest has attached a table with ATTACH_TABLE.
//!
//! This module owns:
//! - the seam through which walkers touch guest memory ([`TableMemory`],
//!   implemented for every vm-memory [`GuestMemoryBackend`](vm_memory::GuestMemoryBackend)),
//! - the x86-64 VT-d first-stage walker for `PGTF_VTD` ([`VtdFirstStage`]),
//! - the Arm SMMUv3 context-descriptor table and AArch64 stage-1 walker for
//!   `PSTF_ARM_SMMU_V3` ([`SmmuCdTable`], [`ContextDescriptor`]),
//! - what a walk returns ([`PageTranslation`]) or why it failed
//!   ([`WalkFault`]), and the configuration errors ([`ConfigError`]).
//!
//! Invariants every walker keeps, whatever the guest wrote:
//! - every table pointer is checked against guest RAM and 8-byte alignment
//!   before it is read; a bad one is a fault, never a panic and never an
//!   access outside guest memory;
//! - a walk reads at most one entry per level of its format (depth is fixed
//!   by the format, so a table that points to itself cannot loop);
//! - accessed / dirty updates are atomic compare-exchanges on the guest's
//!   8-byte entry, as the hardware does, and a walk gives up after
//!   [`MAX_UPDATE_RETRIES`] lost races instead of spinning on a hostile
//!   guest;
//! - no state is kept between walks: callers cache translations and
//!   invalidate them on the guest's INVALIDATE requests.

mod access;
mod fault;
mod memory;
mod smmu;
mod vtd;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod smmu_tests;
#[cfg(test)]
mod testutil;
#[cfg(test)]
mod vtd_tests;

pub use access::{PageAccess, PageTranslation};
pub use fault::{ConfigError, WalkFault};
pub use memory::{TableMemory, TableMemoryError};
pub use smmu::{
    ContextDescriptor, Granule, SmmuCdConfig, SmmuCdTable, S1FMT_4K_L2, S1FMT_64K_L2, S1FMT_LINEAR,
};
pub use vtd::{VtdConfig, VtdFirstStage, VTD_S1_EAFE, VTD_S1_SRE, VTD_S1_WPE};

/// How many lost compare-exchanges on one entry a walk tolerates before it
/// gives up with [`WalkFault::UpdateContention`]. A guest that merely
/// updates its tables concurrently loses at most a race or two; only one
/// that keeps flipping bits on purpose reaches this.
pub const MAX_UPDATE_RETRIES: u32 = 8;
