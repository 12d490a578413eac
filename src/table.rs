// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest tables bound with ATTACH_TABLE (docs/extension-spec.md): what a
//! bound table is ([`TableSpec`]), the checks of the ATTACH_TABLE,
//! INVALIDATE and DETACH_TABLE requests, and the translation of a
//! device's (endpoint, PASID, address) through the tables.
//!
//! Two ways to bind, as the profile defines them:
//! - a *table domain*: ATTACH_TABLE with `PGTF_VTD` and PASID 0, or with
//!   `PSTF_ARM_SMMU_V3`, behaves like ATTACH and gives the domain a table
//!   instead of MAP/UNMAP mappings (an SMMUv3 CD table then also serves
//!   the endpoint's PASIDs, one CD per substream);
//! - a *PASID binding*: ATTACH_TABLE with `PGTF_VTD` and a PASID binds
//!   that (endpoint, PASID) to an SVA domain holding the table, and leaves
//!   the endpoint's attachment alone.
//!
//! A PASID binding holds a reference on its PASID, taken and given back
//! through [`PasidRefs`] (the daemon's host-wide allocator in global
//! mode), so a PASID freed while bound is not reused until the binding
//! goes.

use crate::{
    error::RequestError,
    pgtable::{
        ConfigError, PageAccess, PageTranslation, SmmuCdConfig, SmmuCdTable, TableMemory,
        VtdConfig, VtdFirstStage, WalkFault,
    },
    prq::PasidRefs,
    wire::*,
};

/// DMA without PASID through an SMMUv3 CD table: terminate it.
pub const S1DSS_TERMINATE: u8 = 0;
/// DMA without PASID through an SMMUv3 CD table: bypass the table.
pub const S1DSS_BYPASS: u8 = 1;
/// DMA without PASID through an SMMUv3 CD table: translate with CD 0.
pub const S1DSS_SSID0: u8 = 2;

/// A guest table as bound, validated and ready to walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableSpec {
    /// `PGTF_VTD`: an x86-64 first-stage table.
    Vtd(VtdFirstStage),
    /// `PSTF_ARM_SMMU_V3`: a context-descriptor table, and what DMA
    /// without PASID does (`S1DSS_*`).
    SmmuCd {
        /// The CD table.
        table: SmmuCdTable,
        /// `S1DSS_*`.
        s1dss: u8,
    },
}

impl TableSpec {
    /// The table format (`VIRTIO_IOMMU_PGTF_VTD` / `PSTF_ARM_SMMU_V3`).
    pub fn format(&self) -> u16 {
        match self {
            TableSpec::Vtd(_) => VIRTIO_IOMMU_PGTF_VTD,
            TableSpec::SmmuCd { .. } => VIRTIO_IOMMU_PSTF_ARM_SMMU_V3,
        }
    }

    /// The device-readable part of the ATTACH_TABLE that binds this table
    /// to (`domain`, `endpoint`, `pasid`): how a saved state stores a
    /// table, so that loading it goes through [`read_attach_table`] like a
    /// guest's request.
    pub fn attach_request(&self, domain: u32, endpoint: u32, pasid: u32) -> [u8; ATTACH_TABLE_RO] {
        let mut out = [0u8; ATTACH_TABLE_RO];
        match self {
            TableSpec::Vtd(t) => {
                let c = t.config();
                let mut r = AttachTableVtdReq::new(domain, endpoint, pasid, c.pgd, c.addr_width);
                r.fl_flags = c.fl_flags.into();
                out.copy_from_slice(vm_memory::ByteValued::as_slice(&r));
            }
            TableSpec::SmmuCd { table, s1dss } => {
                let c = table.config();
                let mut r =
                    AttachTableSmmuReq::new(domain, endpoint, c.s1fmt, c.s1cdmax, c.s1contextptr);
                r.s1dss = *s1dss;
                out.copy_from_slice(vm_memory::ByteValued::as_slice(&r));
            }
        }
        out
    }

    /// Walks the table for `ssid` (the PASID; 0 for DMA without PASID).
    fn walk<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        ssid: u32,
        va: u64,
        access: PageAccess,
    ) -> Result<PageTranslation, TableFaultReason> {
        match self {
            TableSpec::Vtd(t) => t.translate(mem, va, access).map_err(TableFaultReason::Walk),
            TableSpec::SmmuCd { table, s1dss } => {
                if ssid == 0 {
                    match *s1dss {
                        S1DSS_BYPASS => return Ok(identity_page(va)),
                        S1DSS_SSID0 => {}
                        _ => return Err(TableFaultReason::Terminated),
                    }
                }
                table
                    .translate(mem, ssid, va, access)
                    .map_err(TableFaultReason::Walk)
            }
        }
    }
}

/// The 4 KiB page of `va` translated to itself, every access allowed.
fn identity_page(va: u64) -> PageTranslation {
    PageTranslation {
        va: va & !0xfff,
        gpa: va & !0xfff,
        page_shift: 12,
        writable: true,
        user: true,
        executable: true,
        dirty: true,
    }
}

/// One (endpoint, PASID) binding: its SVA domain and the reference its
/// PASID owner handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The SVA domain holding the table.
    pub domain: u32,
    /// The handle [`PasidRefs::take`] returned.
    pub handle: u64,
}

/// PASID references for devices that do not count them: every PASID in
/// the endpoint's width may be bound (identity mode, tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct UncountedPasids;

impl PasidRefs for UncountedPasids {
    fn take(&mut self, _endpoint: u32, _pasid: u32) -> Option<u64> {
        Some(0)
    }

    fn release(&mut self, _endpoint: u32, _pasid: u32, _handle: u64) {}
}

/// What an INVALIDATE asks to drop, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableInvalidation {
    /// The table domain.
    pub domain: u32,
    /// The PASID (with `VIRTIO_IOMMU_INV_F_PASID`).
    pub pasid: Option<u32>,
    /// The architecture tag, e.g. the Arm ASID (with `F_ARCHID`).
    pub archid: Option<u64>,
    /// `[first, last]` address (`G_VA`); none for the whole PASID or domain.
    pub range: Option<(u64, u64)>,
    /// log2 of the page size of the range (`G_VA`).
    pub granule: u8,
    /// `VIRTIO_IOMMU_INV_T_*`.
    pub types: u16,
    /// Only leaf entries changed.
    pub leaf: bool,
}

/// Reads an INVALIDATE and checks its fields; the domain is checked by the
/// caller.
pub fn read_invalidate(req: &InvalidateReq) -> Result<TableInvalidation, RequestError> {
    let gran = req.inv_gran.to_native();
    let types = req.inv_type.to_native();
    let flags = req.flags.to_native();
    let known_types =
        VIRTIO_IOMMU_INV_T_IOTLB | VIRTIO_IOMMU_INV_T_DEV_IOTLB | VIRTIO_IOMMU_INV_T_PASID;
    let known_flags =
        VIRTIO_IOMMU_INV_F_PASID | VIRTIO_IOMMU_INV_F_ARCHID | VIRTIO_IOMMU_INV_F_LEAF;
    if req.reserved1 != [0; 2] || req.reserved2 != [0; 4] || req.reserved3 != [0; 11] {
        return Err(RequestError::ReservedNotZero);
    }
    if flags & !known_flags != 0 {
        return Err(RequestError::UnknownFlags(u32::from(flags & !known_flags)));
    }
    if types == 0 || types & !known_types != 0 {
        return Err(RequestError::BadInvalidation(
            "unknown or no invalidation type",
        ));
    }
    let pasid = (flags & VIRTIO_IOMMU_INV_F_PASID != 0).then(|| req.pasid.to_native());
    let archid = (flags & VIRTIO_IOMMU_INV_F_ARCHID != 0).then(|| req.archid.to_native());
    let mut inv = TableInvalidation {
        domain: req.domain.to_native(),
        pasid,
        archid,
        range: None,
        granule: 0,
        types,
        leaf: flags & VIRTIO_IOMMU_INV_F_LEAF != 0,
    };
    match gran {
        VIRTIO_IOMMU_INV_G_DOMAIN => {}
        VIRTIO_IOMMU_INV_G_PASID => {
            if pasid.is_none() {
                return Err(RequestError::BadInvalidation("G_PASID without F_PASID"));
            }
        }
        VIRTIO_IOMMU_INV_G_VA => {
            if pasid.is_none() && archid.is_none() {
                return Err(RequestError::BadInvalidation(
                    "G_VA needs F_PASID or F_ARCHID",
                ));
            }
            let (start, pages, granule) = (
                req.virt_start.to_native(),
                req.nr_pages.to_native(),
                req.granule,
            );
            if !(12..=63).contains(&granule) || pages == 0 {
                return Err(RequestError::InvalidationRange);
            }
            let len = pages
                .checked_shl(u32::from(granule))
                .filter(|l| l >> granule == pages)
                .ok_or(RequestError::InvalidationRange)?;
            let last = start
                .checked_add(len - 1)
                .ok_or(RequestError::InvalidationRange)?;
            if start & ((1 << granule) - 1) != 0 {
                return Err(RequestError::Misaligned(start));
            }
            inv.range = Some((start, last));
            inv.granule = granule;
        }
        _ => {
            return Err(RequestError::BadInvalidation(
                "inv_gran must be exactly one granularity",
            ))
        }
    }
    Ok(inv)
}

/// An ATTACH_TABLE, checked against the request's own rules (the device
/// state is checked by the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachTable {
    /// The domain.
    pub domain: u32,
    /// The endpoint.
    pub endpoint: u32,
    /// The PASID (`PGTF_VTD` only; 0: DMA without PASID).
    pub pasid: u32,
    /// The table.
    pub table: TableSpec,
}

fn config_error(e: ConfigError) -> RequestError {
    match e {
        ConfigError::RootAddress(addr) => RequestError::Misaligned(addr),
        other => RequestError::BadTable(other),
    }
}

/// Reads the device-readable part of an ATTACH_TABLE whose format the
/// device offers. `output_bits` is the guest-physical width tables are
/// walked with.
pub fn read_attach_table(
    request: &[u8],
    output_bits: u8,
) -> Result<Option<AttachTable>, RequestError> {
    let format = match request.get(ATTACH_TABLE_FORMAT_OFFSET..ATTACH_TABLE_FORMAT_OFFSET + 2) {
        Some(b) => u16::from_le_bytes([b[0], b[1]]),
        None => return Ok(None),
    };
    // Bytes past the fields of the view must be zero, up to whatever the
    // driver sent (the JPB-pgtables generic view is 4 bytes longer).
    if request
        .get(ATTACH_TABLE_RO..)
        .is_some_and(|t| t.iter().any(|&b| b != 0))
    {
        return Err(RequestError::ReservedNotZero);
    }
    let mut raw = [0u8; ATTACH_TABLE_RO];
    let n = request.len().min(ATTACH_TABLE_RO);
    raw[..n].copy_from_slice(&request[..n]);
    match format {
        VIRTIO_IOMMU_PGTF_VTD => {
            if request.len() < ATTACH_TABLE_VTD_MIN {
                return Ok(None);
            }
            let mut r = AttachTableVtdReq::default();
            vm_memory::ByteValued::as_mut_slice(&mut r).copy_from_slice(&raw);
            if r.reserved0 != [0; 2] || r.reserved != [0; 32] || r.reserved_hi != [0; 4] {
                return Err(RequestError::ReservedNotZero);
            }
            if r.flags.to_native() != 0 {
                return Err(RequestError::UnknownFlags(r.flags.to_native()));
            }
            let table = VtdFirstStage::new(VtdConfig {
                pgd: r.pgd.to_native(),
                addr_width: r.addr_width.to_native(),
                fl_flags: r.fl_flags.to_native(),
                output_bits,
            })
            .map_err(config_error)?;
            Ok(Some(AttachTable {
                domain: r.domain.to_native(),
                endpoint: r.endpoint.to_native(),
                pasid: r.pasid.to_native(),
                table: TableSpec::Vtd(table),
            }))
        }
        VIRTIO_IOMMU_PSTF_ARM_SMMU_V3 => {
            if request.len() < ATTACH_TABLE_SMMU_MIN {
                return Ok(None);
            }
            let mut r = AttachTableSmmuReq::default();
            vm_memory::ByteValued::as_mut_slice(&mut r).copy_from_slice(&raw);
            if r.reserved != [0; 32] || r.reserved_hi != [0; 16] {
                return Err(RequestError::ReservedNotZero);
            }
            if r.flags.to_native() != 0 {
                return Err(RequestError::UnknownFlags(r.flags.to_native()));
            }
            if r.s1dss > S1DSS_SSID0 {
                return Err(RequestError::BadTable(ConfigError::CdTableFormat(r.s1dss)));
            }
            let table = SmmuCdTable::new(SmmuCdConfig {
                s1fmt: r.s1fmt,
                s1cdmax: r.s1cdmax.to_native(),
                s1contextptr: r.s1contextptr.to_native(),
                output_bits,
            })
            .map_err(config_error)?;
            Ok(Some(AttachTable {
                domain: r.domain.to_native(),
                endpoint: r.endpoint.to_native(),
                pasid: 0,
                table: TableSpec::SmmuCd {
                    table,
                    s1dss: r.s1dss,
                },
            }))
        }
        other => Err(RequestError::UnsupportedFormat(other)),
    }
}

/// Why a translation through a table failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableFaultReason {
    /// No table serves the (endpoint, PASID).
    NotBound,
    /// SMMUv3 `S1DSS` terminates DMA without PASID.
    Terminated,
    /// The walk failed.
    Walk(WalkFault),
}

impl TableFaultReason {
    /// Whether the guest can fix it by changing its table (a page request
    /// may be raised for it).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, TableFaultReason::Walk(w) if w.is_recoverable())
    }
}

impl std::fmt::Display for TableFaultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableFaultReason::NotBound => f.write_str("no table is bound"),
            TableFaultReason::Terminated => f.write_str("DMA without PASID is terminated"),
            TableFaultReason::Walk(w) => write!(f, "{w}"),
        }
    }
}

/// A failed translation through a table: what the device reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFault {
    /// The endpoint.
    pub endpoint: u32,
    /// The PASID (0: DMA without PASID).
    pub pasid: u32,
    /// The faulting address.
    pub address: u64,
    /// The access.
    pub access: PageAccess,
    /// Why.
    pub reason: TableFaultReason,
}

/// Why a translation with a PASID failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableTranslateError {
    /// The endpoint is not behind this IOMMU.
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(u32),
    /// The access faults.
    #[error("{} (endpoint {}, PASID {}, address {:#x})", .0.reason, .0.endpoint, .0.pasid, .0.address)]
    Fault(TableFault),
}

/// A successful translation through a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableTranslation {
    /// The domain whose table translated it.
    pub domain: u32,
    /// The page.
    pub page: PageTranslation,
}

impl crate::device::Viommu {
    /// Translates an access of `endpoint` with `pasid` (0: without PASID)
    /// at `va` through the table that serves it: the (endpoint, PASID)
    /// binding, else the table of the endpoint's domain (an SMMUv3 CD
    /// table serves every PASID). Sets accessed and dirty bits in the
    /// guest's table as the hardware would.
    pub fn translate_table<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        endpoint: u32,
        pasid: u32,
        va: u64,
        access: PageAccess,
    ) -> Result<TableTranslation, TableTranslateError> {
        if !self.config().endpoints.contains(endpoint) {
            return Err(TableTranslateError::NoSuchEndpoint(endpoint));
        }
        let fault = |reason| {
            TableTranslateError::Fault(TableFault {
                endpoint,
                pasid,
                address: va,
                access,
                reason,
            })
        };
        let (domain, table) = match self.table_for(endpoint, pasid) {
            Some(found) => found,
            None => return Err(fault(TableFaultReason::NotBound)),
        };
        table
            .walk(mem, pasid, va, access)
            .map(|page| TableTranslation { domain, page })
            .map_err(fault)
    }
}
