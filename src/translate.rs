// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Address translation for DMA of an endpoint, and the unrecoverable fault
//! an access produces when it cannot be translated.

use thiserror::Error;
use vm_memory::ByteValued;

use crate::{device::Viommu, wire::*};

/// Kind of DMA access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads memory.
    Read,
    /// The device writes memory.
    Write,
}

impl Access {
    /// The MAP flag that allows this access.
    pub fn map_flag(self) -> u32 {
        match self {
            Access::Read => VIRTIO_IOMMU_MAP_F_READ,
            Access::Write => VIRTIO_IOMMU_MAP_F_WRITE,
        }
    }
}

/// A successful translation: the whole IOVA range that translates
/// linearly from the same mapping (or the whole space in bypass), so a
/// caller may cache it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// First IOVA of the range.
    pub iova_start: u64,
    /// Last IOVA of the range (inclusive).
    pub iova_end: u64,
    /// Guest-physical address of `iova_start`.
    pub gpa_start: u64,
    /// Domain of the mapping (`None` in bypass without a domain).
    pub domain: Option<u32>,
    /// `VIRTIO_IOMMU_MAP_F_*` permissions of the mapping (READ|WRITE when
    /// the endpoint is in bypass).
    pub flags: u32,
    /// Identity translation because the endpoint is in bypass.
    pub bypass: bool,
}

impl Translation {
    /// Guest-physical address of `iova`, which must lie in the range.
    pub fn gpa(&self, iova: u64) -> u64 {
        self.gpa_start.wrapping_add(iova - self.iova_start)
    }

    /// Whether the range allows `access`.
    pub fn allows(&self, access: Access) -> bool {
        self.flags & access.map_flag() != 0
    }
}

/// An unrecoverable fault: what the device reports on the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// The endpoint that made the access.
    pub endpoint: u32,
    /// The faulting address.
    pub address: u64,
}

impl Fault {
    /// A fault of `access` at `address`, with the address marked valid.
    pub fn new(reason: u8, endpoint: u32, address: u64, access: Access) -> Self {
        Fault {
            reason,
            flags: fault_flag(access) | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            endpoint,
            address,
        }
    }

    /// The record as the bytes written into an event buffer.
    pub fn record_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b.copy_from_slice(self.record().as_slice());
        b
    }

    /// The 24-byte record of virtio-iommu 1.3 (reserved fields zero).
    pub fn record(&self) -> FaultRecord {
        FaultRecord {
            reason: self.reason,
            reserved: [0; 3],
            flags: self.flags.into(),
            endpoint: self.endpoint.into(),
            reserved1: 0.into(),
            address: self.address.into(),
        }
    }
}

/// The fault flag of an access.
pub fn fault_flag(access: Access) -> u32 {
    match access {
        Access::Read => VIRTIO_IOMMU_FAULT_F_READ,
        Access::Write => VIRTIO_IOMMU_FAULT_F_WRITE,
    }
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum TranslateError {
    /// The endpoint is not behind this IOMMU: a caller error, not a fault.
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(u32),
    /// The access faults; the fault can be reported to the guest.
    #[error("{}", fault_text(.0))]
    Fault(Fault),
}

fn fault_text(f: &Fault) -> String {
    let what = match f.reason {
        VIRTIO_IOMMU_FAULT_R_DOMAIN => "endpoint is not attached to a domain",
        VIRTIO_IOMMU_FAULT_R_MAPPING => "address is not mapped with the needed permission",
        _ => "unknown fault",
    };
    format!("{what} (endpoint {}, address {:#x})", f.endpoint, f.address)
}

impl Viommu {
    /// Translates a DMA access of `endpoint` at `iova`, honouring bypass,
    /// attachment and the mapping's permissions.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        if !self.config().endpoints.contains(endpoint) {
            return Err(TranslateError::NoSuchEndpoint(endpoint));
        }
        let identity = |domain| Translation {
            iova_start: 0,
            iova_end: u64::MAX,
            gpa_start: 0,
            domain,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
            bypass: true,
        };
        let fault = |reason| TranslateError::Fault(Fault::new(reason, endpoint, iova, access));
        let Some(domain_id) = self.endpoint_domain(endpoint) else {
            return if self.unattached_bypass() {
                Ok(identity(None))
            } else {
                Err(fault(VIRTIO_IOMMU_FAULT_R_DOMAIN))
            };
        };
        let Some(domain) = self.domains().get(&domain_id) else {
            return Err(fault(VIRTIO_IOMMU_FAULT_R_DOMAIN));
        };
        if domain.bypass {
            return Ok(identity(Some(domain_id)));
        }
        let m = domain
            .mappings
            .lookup(iova)
            .ok_or(fault(VIRTIO_IOMMU_FAULT_R_MAPPING))?;
        if m.flags & access.map_flag() == 0 {
            return Err(fault(VIRTIO_IOMMU_FAULT_R_MAPPING));
        }
        Ok(Translation {
            iova_start: m.virt_start,
            iova_end: m.virt_end,
            gpa_start: m.phys_start,
            domain: Some(domain_id),
            flags: m.flags,
            bypass: false,
        })
    }

    /// Translates `[iova, iova + len)` (at least one byte), which may span
    /// adjacent mappings. Appends one translation per mapping used, each
    /// covering its whole mapping so callers may cache it; fails at the
    /// first address that does not translate.
    pub fn translate_range(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Translation>,
    ) -> Result<(), TranslateError> {
        let end = iova.saturating_add(len.max(1) - 1);
        let mut addr = iova;
        loop {
            let t = self.translate(endpoint, addr, access)?;
            out.push(t);
            if t.iova_end >= end {
                return Ok(());
            }
            addr = t.iova_end + 1;
        }
    }
}
