// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The PASID allocator's error type.
//!
//! Variants are kept distinct enough for the device model to map them onto
//! virtio-iommu status codes: resource shortage (`QuotaExceeded`,
//! `Exhausted`, `Disabled`) -> `S_NOMEM`, unknown objects (`UnknownSet`,
//! `UnknownPasid`, `NotMapped`) -> `S_NOENT`, bad numbers (`OutOfRange`,
//! `InvalidRange`) -> `S_RANGE`, and misuse of a known object (`Inactive`,
//! `ForeignPasid`, `NoReference`, ...) -> `S_INVAL`.

use super::Pasid;

/// Everything that can go wrong in the PASID allocator. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasidError {
    /// The allocator was configured with an unsupported parameter.
    #[error("invalid PASID allocator configuration: {0}")]
    InvalidConfig(&'static str),
    /// The set already holds as many PASIDs as its quota allows.
    #[error("PASID quota of {quota} exceeded")]
    QuotaExceeded {
        /// The set's quota.
        quota: u32,
    },
    /// The set has quota 0: PASIDs are disabled for it.
    #[error("PASIDs are disabled for this set (quota 0)")]
    Disabled,
    /// No free PASID is left in the requested range, and the host source
    /// cannot lease any more.
    #[error("no free PASID left in [{min}, {max}]")]
    Exhausted {
        /// Lower bound of the requested range.
        min: Pasid,
        /// Upper bound of the requested range.
        max: Pasid,
    },
    /// The PASID lies outside `[1, max]` of the relevant PASID space.
    #[error("PASID {pasid} outside [1, {max}]")]
    OutOfRange {
        /// The offending PASID.
        pasid: Pasid,
        /// Largest valid PASID of the space it was checked against.
        max: Pasid,
    },
    /// A `[min, max]` range is empty or reaches outside the PASID space.
    #[error("invalid PASID range [{min}, {max}] (space is [1, {limit}])")]
    InvalidRange {
        /// Requested lower bound.
        min: Pasid,
        /// Requested upper bound.
        max: Pasid,
        /// Largest valid PASID of the space.
        limit: Pasid,
    },
    /// The set handle is stale, destroyed, or was never created.
    #[error("unknown or destroyed PASID set")]
    UnknownSet,
    /// The allocator already manages as many sets as it can index.
    #[error("too many PASID sets")]
    TooManySets,
    /// The PASID is not allocated.
    #[error("PASID {0} is not allocated")]
    UnknownPasid(Pasid),
    /// The PASID is allocated, but to another set.
    #[error("PASID {0} belongs to another set")]
    ForeignPasid(Pasid),
    /// The PASID was freed by its owner and only waits for its last
    /// reference to be put; it can no longer be looked up or got.
    #[error("PASID {0} is freed and waits for its last reference")]
    Inactive(Pasid),
    /// `put` without a matching `get` (the owner's reference is dropped by
    /// `free`, not `put`).
    #[error("PASID {0} has no reference to put")]
    NoReference(Pasid),
    /// The reference count would overflow.
    #[error("too many references to PASID {0}")]
    RefcountOverflow(Pasid),
    /// The guest (or, for reverse look-ups, host) PASID is not mapped.
    #[error("PASID {0} is not mapped")]
    NotMapped(Pasid),
    /// The host PASID source failed or broke its contract.
    #[error("host PASID source: {0}")]
    Source(String),
}

/// Result type of the PASID allocator.
pub type Result<T> = std::result::Result<T, PasidError>;
