// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why a request failed, and the one place where a failure becomes a
//! virtio-iommu status code.

use thiserror::Error;

use crate::{pasid::PasidError, prq::GroupKey, wire::*};

/// A request the device understood but refused.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("reserved field is not zero")]
    ReservedNotZero,
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(u32),
    #[error("domain {0} does not exist")]
    NoSuchDomain(u32),
    #[error("domain {0} is outside the domain range")]
    DomainOutOfRange(u32),
    #[error("bypass flag does not match the type of domain {0}")]
    BypassMismatch(u32),
    #[error("endpoint {endpoint} is not attached to domain {domain}")]
    NotAttached { endpoint: u32, domain: u32 },
    #[error("domain {0} is a bypass domain")]
    BypassDomain(u32),
    #[error("virt_end {end:#x} is below virt_start {start:#x}")]
    InvertedRange { start: u64, end: u64 },
    #[error("address {0:#x} is not aligned to the granule")]
    Misaligned(u64),
    #[error("range {start:#x}-{end:#x} is outside the input range")]
    OutsideInputRange { start: u64, end: u64 },
    #[error("physical range starting at {0:#x} wraps around")]
    PhysOverflow(u64),
    #[error("range {start:#x}-{end:#x} overlaps a reserved region")]
    ReservedRegion { start: u64, end: u64 },
    #[error("range {start:#x}-{end:#x} overlaps an existing mapping")]
    Overlap { start: u64, end: u64 },
    #[error("range {start:#x}-{end:#x} would split a mapping")]
    WouldSplit { start: u64, end: u64 },
    #[error("too many domains (limit {0})")]
    TooManyDomains(usize),
    #[error("too many mappings in domain {domain} (limit {limit})")]
    TooManyMappings { domain: u32, limit: usize },
    #[error("PROBE properties area of {got} bytes is smaller than probe_size {need}")]
    ProbeBufferTooSmall { got: usize, need: usize },
    #[error("device-writable part of {got} bytes is too small, needs {need}")]
    WritableTooSmall { got: usize, need: usize },
    #[error("PASID allocation failed: no PASID left in the range or the quota")]
    PasidNoSpace,
    #[error("PASID or PASID range out of range")]
    PasidRange,
    #[error("PASID is not allocated to this VM")]
    PasidUnknown,
    #[error("PASID is in a state that does not allow this")]
    PasidState,
    #[error("host PASID allocator failure")]
    PasidBackend,
    /// PAGE_RESP with a code other than SUCCESS, INVALID or FAILURE.
    #[error("unknown page response code {0}")]
    UnknownResponseCode(u16),
    /// PAGE_RESP for a group that is not in flight (never raised, already
    /// answered, or its source is gone).
    #[error("no page-request group in flight for {0}")]
    NoSuchPageGroup(GroupKey),
}

impl From<&PasidError> for RequestError {
    /// PASID allocator failures as the guest sees them (docs/extension-spec.md).
    fn from(e: &PasidError) -> Self {
        use PasidError::*;
        match e {
            QuotaExceeded { .. } | Disabled | Exhausted { .. } => RequestError::PasidNoSpace,
            OutOfRange { .. } | InvalidRange { .. } => RequestError::PasidRange,
            // Another VM's PASID is reported like an unallocated one: a
            // guest learns nothing about other sets.
            UnknownPasid(_) | ForeignPasid(_) | NotMapped(_) | UnknownSet => {
                RequestError::PasidUnknown
            }
            Inactive(_) | NoReference(_) | RefcountOverflow(_) => RequestError::PasidState,
            InvalidConfig(_) | TooManySets | Source(_) => RequestError::PasidBackend,
        }
    }
}

impl RequestError {
    /// The status code the spec asks for (virtio-iommu 1.3 §5.13.6).
    pub fn status(self) -> u8 {
        use RequestError::*;
        match self {
            ReservedNotZero
            | UnknownFlags(_)
            | BypassMismatch(_)
            | NotAttached { .. }
            | BypassDomain(_)
            | InvertedRange { .. }
            | ReservedRegion { .. }
            | Overlap { .. }
            | ProbeBufferTooSmall { .. }
            | WritableTooSmall { .. }
            | UnknownResponseCode(_)
            | PasidState => VIRTIO_IOMMU_S_INVAL,
            PasidUnknown => VIRTIO_IOMMU_S_NOENT,
            PasidRange => VIRTIO_IOMMU_S_RANGE,
            PasidNoSpace => VIRTIO_IOMMU_S_NOMEM,
            PasidBackend => VIRTIO_IOMMU_S_DEVERR,
            NoSuchEndpoint(_) | NoSuchDomain(_) | NoSuchPageGroup(_) => VIRTIO_IOMMU_S_NOENT,
            DomainOutOfRange(_)
            | Misaligned(_)
            | OutsideInputRange { .. }
            | PhysOverflow(_)
            | WouldSplit { .. } => VIRTIO_IOMMU_S_RANGE,
            TooManyDomains(_) | TooManyMappings { .. } => VIRTIO_IOMMU_S_NOMEM,
        }
    }
}

/// Status code of a request result.
pub fn status_of(result: Result<(), RequestError>) -> u8 {
    match result {
        Ok(()) => VIRTIO_IOMMU_S_OK,
        Err(e) => e.status(),
    }
}

/// Name of a status code, for logs and the control plane.
pub fn status_name(status: u8) -> &'static str {
    match status {
        VIRTIO_IOMMU_S_OK => "OK",
        VIRTIO_IOMMU_S_IOERR => "IOERR",
        VIRTIO_IOMMU_S_UNSUPP => "UNSUPP",
        VIRTIO_IOMMU_S_DEVERR => "DEVERR",
        VIRTIO_IOMMU_S_INVAL => "INVAL",
        VIRTIO_IOMMU_S_RANGE => "RANGE",
        VIRTIO_IOMMU_S_NOENT => "NOENT",
        VIRTIO_IOMMU_S_FAULT => "FAULT",
        VIRTIO_IOMMU_S_NOMEM => "NOMEM",
        _ => "UNKNOWN",
    }
}
