// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The PASID allocator's error type.
//!
//! Variants are kept distinct enough for the device model to map them onto
//! virtio-iommu status codes: resource shortage (`QuotaExceeded`,
//! `Exhausted`, `Disabled`) -> `S_NOMEM`, unknown objects (`UnknownSet`,
//! `UnknownPasid`, `NotMapped`) -> `S_NOENT`, bad numbers (`OutOfRange`,
//! `InvalidRange`) -> `S_RANGE`, and misuse of a known object (`Inactive`,
//! `ForeignPasid`, `NoReference`, ...) -> `S_INVAL`.

use std::{fmt, ops::RangeInclusive, sync::Arc};

use super::Pasid;

/// A failure of the host PASID source (for example its database), kept
/// with its cause. Cloned errors share the cause; two are equal when they
/// are the same failure.
#[derive(Clone)]
pub struct SourceError(Arc<dyn std::error::Error + Send + Sync>);

impl SourceError {
    /// Wraps a source's failure.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SourceError(Arc::new(e))
    }
}

impl fmt::Debug for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for SourceError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SourceError {}

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
    /// The host PASID source failed.
    #[error("host PASID source")]
    Source(#[source] SourceError),
    /// A lease handed back or adopted that the source or allocator does
    /// not hold as such (a broken source or a corrupt record).
    #[error("PASID lease {0:?} is not held as a whole")]
    BadLease(RangeInclusive<Pasid>),
    /// A PASID restored outside the leases or already in use.
    #[error("cannot restore PASID {0}: not free in a held lease")]
    NotRestorable(Pasid),
    /// A guest or host PASID that is already mapped.
    #[error("guest PASID {guest} or host PASID {host} is already mapped")]
    AlreadyMapped {
        /// The guest PASID.
        guest: Pasid,
        /// The host PASID.
        host: Pasid,
    },
    /// A mapping asked of a translator in identity mode.
    #[error("identity mode does not map PASIDs")]
    IdentityMode,
    /// A lock around the allocator was poisoned by a panic.
    #[error("PASID allocator lock poisoned")]
    Poisoned,
}

/// Result type of the PASID allocator.
pub type Result<T> = std::result::Result<T, PasidError>;
