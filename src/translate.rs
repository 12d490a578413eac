// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Address translation for DMA of an endpoint, and the unrecoverable fault
//! an access produces when it cannot be translated.

use thiserror::Error;
use vm_memory::ByteValued;

use crate::{
    control::{Extent, EXTENT_F_BYPASS, NO_DOMAIN},
    device::Viommu,
    wire::*,
};

/// Kind of DMA access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A successful translation of one IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the IOVA.
    pub gpa: u64,
    /// First IOVA of the mapping that translated it.
    pub first: u64,
    /// Last IOVA (inclusive) that translates linearly from the same mapping,
    /// so `[iova, last]` maps to `[gpa, gpa + (last - iova)]`.
    pub last: u64,
    /// Domain of the mapping (`None` in bypass without a domain).
    pub domain: Option<u32>,
    /// `VIRTIO_IOMMU_MAP_F_*` permissions of the mapping (READ|WRITE when
    /// the endpoint is in bypass).
    pub flags: u32,
    /// Identity translation because the endpoint is in bypass.
    pub bypass: bool,
}

/// An unrecoverable fault: what the device reports on the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    pub endpoint: u32,
    pub address: u64,
}

impl Fault {
    /// A fault of `access` at `address`, with the address marked valid.
    pub fn new(reason: u8, endpoint: u32, address: u64, access: Access) -> Self {
        let rw = match access {
            Access::Read => VIRTIO_IOMMU_FAULT_F_READ,
            Access::Write => VIRTIO_IOMMU_FAULT_F_WRITE,
        };
        Fault {
            reason,
            flags: rw | VIRTIO_IOMMU_FAULT_F_ADDRESS,
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
            gpa: iova,
            first: 0,
            last: u64::MAX,
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
        let needed = match access {
            Access::Read => VIRTIO_IOMMU_MAP_F_READ,
            Access::Write => VIRTIO_IOMMU_MAP_F_WRITE,
        };
        if m.flags & needed == 0 {
            return Err(fault(VIRTIO_IOMMU_FAULT_R_MAPPING));
        }
        Ok(Translation {
            gpa: m.translate(iova),
            first: m.virt_start,
            last: m.virt_end,
            domain: Some(domain_id),
            flags: m.flags,
            bypass: false,
        })
    }

    /// Translates `[iova, iova + len)` (at least one byte), which may span
    /// adjacent mappings. Appends one extent per mapping used, each
    /// covering its whole mapping so callers may cache it; fails at the
    /// first address that does not translate.
    pub fn translate_range(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Extent>,
    ) -> Result<(), TranslateError> {
        let end = iova.saturating_add(len.max(1) - 1);
        let mut addr = iova;
        loop {
            let t = self.translate(endpoint, addr, access)?;
            out.push(Extent {
                iova_start: t.first,
                iova_end: t.last,
                gpa_start: t.gpa.wrapping_sub(addr - t.first),
                domain: t.domain.unwrap_or(NO_DOMAIN),
                flags: t.flags | if t.bypass { EXTENT_F_BYPASS } else { 0 },
            });
            if t.last >= end {
                return Ok(());
            }
            addr = t.last + 1;
        }
    }
}
