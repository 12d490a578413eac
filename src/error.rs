// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why a request failed, and the one place where a failure becomes a
//! virtio-iommu status code.

use thiserror::Error;

use crate::{pasid::PasidError, pgtable::ConfigError, prq::GroupKey, wire::*};

/// A request the device understood but refused; [`RequestError::status`]
/// says which status code the guest sees.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// A reserved field the device must check is not zero.
    #[error("reserved field is not zero")]
    ReservedNotZero,
    /// Flag bits the device does not know (or the driver did not negotiate).
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u32),
    /// The endpoint ID is not behind this IOMMU.
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(u32),
    /// The domain does not exist.
    #[error("domain {0} does not exist")]
    NoSuchDomain(u32),
    /// The domain ID lies outside `domain_range`.
    #[error("domain {0} is outside the domain range")]
    DomainOutOfRange(u32),
    /// ATTACH's bypass flag contradicts the existing domain's type.
    #[error("bypass flag does not match the type of domain {0}")]
    BypassMismatch(u32),
    /// DETACH of an endpoint that is not in that domain.
    #[error("endpoint {endpoint} is not attached to domain {domain}")]
    NotAttached {
        /// The endpoint.
        endpoint: u32,
        /// The domain.
        domain: u32,
    },
    /// MAP or UNMAP on a bypass domain.
    #[error("domain {0} is a bypass domain")]
    BypassDomain(u32),
    /// A range whose end is below its start.
    #[error("virt_end {end:#x} is below virt_start {start:#x}")]
    InvertedRange {
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// An address not aligned to the granule.
    #[error("address {0:#x} is not aligned to the granule")]
    Misaligned(u64),
    /// MAP outside `input_range`.
    #[error("range {start:#x}-{end:#x} is outside the input range")]
    OutsideInputRange {
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// A physical range that wraps around the address space.
    #[error("physical range starting at {0:#x} wraps around")]
    PhysOverflow(u64),
    /// MAP over a RESV_MEM region.
    #[error("range {start:#x}-{end:#x} overlaps a reserved region")]
    ReservedRegion {
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// ATTACH to a domain that maps into a host reserved region of the
    /// endpoint (its PROBE properties make the two incompatible).
    #[error("domain maps {start:#x}-{end:#x}, reserved by the host for endpoint {endpoint}")]
    HostReserved {
        /// The endpoint.
        endpoint: u32,
        /// First address of the conflicting mapping.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// MAP over an existing mapping.
    #[error("range {start:#x}-{end:#x} overlaps an existing mapping")]
    Overlap {
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// UNMAP that would split a mapping (nothing is removed).
    #[error("range {start:#x}-{end:#x} would split a mapping")]
    WouldSplit {
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// The domain cap is reached.
    #[error("too many domains (limit {0})")]
    TooManyDomains(usize),
    /// The domain's mapping cap is reached.
    #[error("too many mappings in domain {domain} (limit {limit})")]
    TooManyMappings {
        /// The domain.
        domain: u32,
        /// The cap.
        limit: usize,
    },
    /// The PROBE properties area is smaller than `probe_size`.
    #[error("PROBE properties area of {got} bytes is smaller than probe_size {need}")]
    ProbeBufferTooSmall {
        /// Bytes available.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The device-writable part cannot hold the reply.
    #[error("device-writable part of {got} bytes is too small, needs {need}")]
    WritableTooSmall {
        /// Bytes available.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// An ATTACH_TABLE format the device does not offer.
    #[error("table format {0} is not supported")]
    UnsupportedFormat(u16),
    /// A table the walkers refuse (address width, flags, CD layout).
    #[error("invalid table")]
    BadTable(#[source] ConfigError),
    /// MAP or UNMAP on a domain that translates through a guest table.
    #[error("domain {0} translates through a guest table")]
    TableDomain(u32),
    /// A table request on a domain that has no table, or another one.
    #[error("domain {0} does not hold this table")]
    TableMismatch(u32),
    /// The endpoint has no PASID support (PROBE reports no PASID_SIZE).
    #[error("endpoint {0} has no PASID support")]
    NoPasidSupport(u32),
    /// A PASID beyond the endpoint's PASID width.
    #[error("PASID {pasid} is beyond the endpoint's {bits}-bit PASID width")]
    PasidWidth {
        /// The PASID.
        pasid: u32,
        /// The width.
        bits: u8,
    },
    /// A PASID this VM does not hold (global mode: not from PASID_ALLOC,
    /// or freed).
    #[error("PASID {0} is not allocated to this VM")]
    PasidNotOwned(u32),
    /// DETACH_TABLE of a binding that does not exist.
    #[error("endpoint {endpoint} has no table bound for PASID {pasid} in domain {domain}")]
    NoSuchBinding {
        /// The endpoint.
        endpoint: u32,
        /// The PASID.
        pasid: u32,
        /// The domain.
        domain: u32,
    },
    /// The endpoint's binding cap is reached.
    #[error("endpoint {endpoint} already has {limit} table bindings")]
    TooManyBindings {
        /// The endpoint.
        endpoint: u32,
        /// The cap.
        limit: usize,
    },
    /// An INVALIDATE whose fields contradict each other.
    #[error("invalid INVALIDATE: {0}")]
    BadInvalidation(&'static str),
    /// An INVALIDATE range that is empty or wraps around.
    #[error("INVALIDATE range is empty, wraps around or has a bad granule")]
    InvalidationRange,
    /// No PASID left in the range, the quota, or PASIDs are disabled.
    #[error("PASID allocation failed: no PASID left in the range or the quota")]
    PasidNoSpace,
    /// A PASID or PASID range outside the PASID space.
    #[error("PASID or PASID range out of range")]
    PasidRange,
    /// A PASID this VM does not own.
    #[error("PASID is not allocated to this VM")]
    PasidUnknown,
    /// A PASID in a state that does not allow the request.
    #[error("PASID is in a state that does not allow this")]
    PasidState,
    /// The host PASID service failed.
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
            InvalidConfig(_)
            | TooManySets
            | Source(_)
            | BadLease(_)
            | NotRestorable(_)
            | AlreadyMapped { .. }
            | IdentityMode
            | Poisoned => RequestError::PasidBackend,
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
            | BadTable(_)
            | TableDomain(_)
            | TableMismatch(_)
            | BadInvalidation(_)
            | PasidState => VIRTIO_IOMMU_S_INVAL,
            UnsupportedFormat(_) | NoPasidSupport(_) | HostReserved { .. } => VIRTIO_IOMMU_S_UNSUPP,
            PasidWidth { .. } | InvalidationRange => VIRTIO_IOMMU_S_RANGE,
            PasidNotOwned(_) | NoSuchBinding { .. } => VIRTIO_IOMMU_S_NOENT,
            TooManyBindings { .. } => VIRTIO_IOMMU_S_NOMEM,
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
