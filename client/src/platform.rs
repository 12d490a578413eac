// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Address translation for devices the VMM emulates, in the shape of
//! cloud-hypervisor's `AccessPlatform` (`translate_gva(base, size)`, one
//! device) and `DmaRemapping` (`translate_gva(id, addr, size)`, any
//! endpoint), with the access direction those traits lack: a read-only
//! guest mapping translates for reads and faults for writes.
//!
//! A translation is the guest-physical address of the whole range; a
//! range over mappings that are not contiguous in guest-physical space is
//! refused (`InvalidInput`: split the access), one that faults is
//! `PermissionDenied`. The answer comes from the client's cache when the
//! connection caches (`Options::cache`), and it is only good until the
//! guest's next UNMAP of it: for DMA that must not outlive the mapping,
//! use [`crate::Client::translate_with`], which holds the cache while the
//! access runs (the guest's UNMAP then waits for it).
//!
//! cloud-hypervisor translates a virtqueue's ring addresses once, when
//! the queue becomes ready, and keeps them; that is only as safe as the
//! guest driver, which does not unmap its rings while they run.
//! `translate_gpa` (guest-physical to IOVA, used by vDPA for ring
//! addresses) has no counterpart in the daemon and is `Unsupported`.

use std::{io, sync::Arc};

use crate::{Access, Client, Error, Segment};

/// The guest-physical address of `segments` if they are one contiguous
/// guest-physical range.
pub fn contiguous(segments: &[Segment]) -> Option<u64> {
    let first = segments.first()?;
    let mut next = first.gpa;
    for s in segments {
        if s.gpa != next {
            return None;
        }
        next = s.gpa.wrapping_add(s.len);
    }
    Some(first.gpa)
}

fn to_io(e: Error) -> io::Error {
    match e {
        Error::Fault(_) | Error::NoSuchEndpoint(_) => {
            io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
        }
        Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Translations for every endpoint of the daemon (`DmaRemapping`).
#[derive(Clone)]
pub struct Remapper {
    client: Arc<Client>,
}

impl Remapper {
    /// Translations through `client`.
    pub fn new(client: Arc<Client>) -> Remapper {
        Remapper { client }
    }

    /// The guest-physical address of `[iova, iova + size)` for an
    /// `access` by `endpoint` (`DmaRemapping::translate_gva`).
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        size: u64,
        access: Access,
    ) -> io::Result<u64> {
        let segs = self
            .client
            .translate(endpoint, iova, size, access)
            .map_err(to_io)?;
        contiguous(&segs).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("IOVA {iova:#x} ({size:#x} bytes) of endpoint {endpoint} is not contiguous in guest memory"),
            )
        })
    }

    /// Guest-physical to IOVA: not offered (see the module docs).
    pub fn translate_gpa(&self, _endpoint: u32, _gpa: u64, _size: u64) -> io::Result<u64> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the daemon translates IOVAs to guest-physical addresses only",
        ))
    }

    /// The adapter of one endpoint (`AccessPlatform`).
    pub fn endpoint(&self, endpoint: u32) -> EndpointPlatform {
        EndpointPlatform {
            remapper: self.clone(),
            endpoint,
        }
    }
}

/// Translations for one device (`AccessPlatform`): what a VMM hands to
/// the virtqueues and the device model of an emulated device behind the
/// IOMMU.
#[derive(Clone)]
pub struct EndpointPlatform {
    remapper: Remapper,
    endpoint: u32,
}

impl EndpointPlatform {
    /// The endpoint it translates for.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The guest-physical address of `[base, base + size)` for `access`
    /// (`AccessPlatform::translate_gva`).
    pub fn translate(&self, base: u64, size: u64, access: Access) -> io::Result<u64> {
        self.remapper.translate(self.endpoint, base, size, access)
    }

    /// Guest-physical to IOVA: not offered (see the module docs).
    pub fn translate_gpa(&self, base: u64, size: u64) -> io::Result<u64> {
        self.remapper.translate_gpa(self.endpoint, base, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(iova: u64, gpa: u64, len: u64) -> Segment {
        Segment { iova, gpa, len }
    }

    #[test]
    fn adjacent_mappings_contiguous_in_guest_memory_translate_as_one() {
        assert_eq!(contiguous(&[seg(0x1000, 0x8000, 0x1000)]), Some(0x8000));
        assert_eq!(
            contiguous(&[seg(0x1000, 0x8000, 0x1000), seg(0x2000, 0x9000, 0x800)]),
            Some(0x8000)
        );
        assert_eq!(
            contiguous(&[seg(0x1000, 0x8000, 0x1000), seg(0x2000, 0x20000, 0x800)]),
            None
        );
        assert_eq!(contiguous(&[]), None);
    }

    #[test]
    fn faults_are_permission_errors() {
        let f = crate::FaultInfo {
            reason: 2,
            flags: crate::FAULT_F_WRITE,
            endpoint: 1,
            pasid: 0,
            address: 0x1000,
        };
        assert_eq!(
            to_io(Error::Fault(f)).kind(),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!(to_io(Error::Disconnected).kind(), io::ErrorKind::Other);
    }
}
