// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The messages of the control protocol (docs/control-protocol.md), each
//! declared once, and the records they carry.
//!
//! A frame is `le32 length` (of what follows), `u8 type`, then the
//! payload's fields in order, little-endian.

use viommu::{
    change::{Invalidation, StateChange},
    mapping::Mapping,
    pgtable::{PageTranslation, SmmuCdConfig, SmmuCdTable, VtdConfig, VtdFirstStage},
    table::{TableInvalidation, TableSpec},
    wire::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE},
    Translation as ModelTranslation,
};

use crate::codec::{messages, record, DecodeError, Reader, Wire};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;
/// First bytes of every HELLO.
pub const MAGIC: [u8; 8] = *b"VIOMMUCP";

// HELLO flags: what the client does.
/// The client caches translations: it receives INVALIDATE and must ack.
pub const HELLO_F_CACHE: u32 = 1 << 0;
/// The client receives the event stream (replayed state, then changes).
pub const HELLO_F_SUBSCRIBE: u32 = 1 << 1;
/// Events must be acknowledged before the guest's request completes.
pub const HELLO_F_SYNC: u32 = 1 << 2;
/// The client only inspects (QUERY): it may use the connection slot the
/// daemon keeps free for `ctl` when every other slot is taken.
pub const HELLO_F_INSPECT: u32 = 1 << 3;
/// Every HELLO flag this version knows; WELCOME grants only these.
pub const HELLO_F_KNOWN: u32 = HELLO_F_CACHE | HELLO_F_SUBSCRIBE | HELLO_F_SYNC | HELLO_F_INSPECT;

// TRANSLATE flags.
/// A write access (otherwise a read).
pub const TRANSLATE_F_WRITE: u32 = 1 << 0;
/// On failure, also report the fault on the guest's event queue.
pub const TRANSLATE_F_REPORT_FAULT: u32 = 1 << 1;
/// An instruction fetch (with a PASID).
pub const TRANSLATE_F_EXEC: u32 = 1 << 2;
/// A privileged (supervisor) access (with a PASID).
pub const TRANSLATE_F_PRIV: u32 = 1 << 3;
/// If the access faults and the guest could fix it (`FAULT_F_RECOVERABLE`),
/// raise a page request: the FAULT reply then says `FAULT_F_PAGE_REQUEST`
/// and a PAGE_RESPONSE with the same tag follows, exactly once.
pub const TRANSLATE_F_PAGE_REQUEST: u32 = 1 << 4;

/// Extent flag (beside the MAP flags): identity translation in bypass.
pub const EXTENT_F_BYPASS: u32 = 1 << 8;
/// Extent flag: instruction fetches are allowed (table translations).
pub const EXTENT_F_EXEC: u32 = 1 << 9;
/// `Extent::domain` of a bypassed endpoint attached to no domain.
pub const NO_DOMAIN: u32 = u32::MAX;

/// Fault flag: the access was a read.
pub const FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the access was a write.
pub const FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: the access was an instruction fetch.
pub const FAULT_F_EXEC: u32 = 1 << 2;
/// Fault flag: the access was privileged.
pub const FAULT_F_PRIV: u32 = 1 << 3;
/// Fault flag: `pasid` is valid.
pub const FAULT_F_PASID: u32 = 1 << 4;
/// Fault flag: the guest can fix it by changing its table (a page
/// request may resolve it).
pub const FAULT_F_RECOVERABLE: u32 = 1 << 5;
/// Fault flag: a page request was raised for this fault (TRANSLATE with
/// `TRANSLATE_F_PAGE_REQUEST`); its answer comes as a PAGE_RESPONSE with
/// the request's tag.
pub const FAULT_F_PAGE_REQUEST: u32 = 1 << 6;

/// PAGE_RESPONSE code: the guest mapped the page; translate again.
pub const PAGE_RESP_SUCCESS: u16 = 0;
/// PAGE_RESPONSE code: the page cannot be mapped; do not retry.
pub const PAGE_RESP_INVALID: u16 = 1;
/// PAGE_RESPONSE code: the guest says the device must stop issuing page
/// requests (PCIe Response Failure).
pub const PAGE_RESP_FAILURE: u16 = 2;

// RESULT status codes.
/// Success.
pub const RESULT_OK: u32 = 0;
/// The endpoint does not exist.
pub const RESULT_NO_SUCH_ENDPOINT: u32 = 1;
/// The request is malformed or refused.
pub const RESULT_INVALID: u32 = 2;
/// The daemon does not support the request.
pub const RESULT_UNSUPPORTED: u32 = 3;

/// HELLO's magic, checked when read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Magic;

impl Wire for Magic {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.take(MAGIC.len())? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        Ok(Magic)
    }
}

record! {
    /// A translated IOVA range: `[iova_start, iova_end]` maps linearly to
    /// `gpa_start`. Translations return whole mappings so clients can
    /// cache them.
    pub struct Extent {
        /// First IOVA.
        iova_start: u64,
        /// Last IOVA (inclusive).
        iova_end: u64,
        /// Guest-physical address of `iova_start`.
        gpa_start: u64,
        /// Domain the translation came from, or [`NO_DOMAIN`] in bypass.
        domain: u32,
        /// `VIRTIO_IOMMU_MAP_F_*` permissions, [`EXTENT_F_BYPASS`].
        flags: u32,
    }
}

impl Extent {
    /// The page of a table translation, with the permissions a later
    /// access of the same privilege may use without a new walk: WRITE only
    /// once the page is dirty, so the first write walks and marks it.
    pub fn from_page(page: &PageTranslation, domain: u32) -> Self {
        let mut flags = VIRTIO_IOMMU_MAP_F_READ;
        if page.writable && page.dirty {
            flags |= VIRTIO_IOMMU_MAP_F_WRITE;
        }
        if page.executable {
            flags |= EXTENT_F_EXEC;
        }
        Extent {
            iova_start: page.va,
            iova_end: page.va + (page.page_size() - 1),
            gpa_start: page.gpa,
            domain,
            flags,
        }
    }
}

impl From<ModelTranslation> for Extent {
    fn from(t: ModelTranslation) -> Self {
        Extent {
            iova_start: t.iova_start,
            iova_end: t.iova_end,
            gpa_start: t.gpa_start,
            domain: t.domain.unwrap_or(NO_DOMAIN),
            flags: t.flags | if t.bypass { EXTENT_F_BYPASS } else { 0 },
        }
    }
}

record! {
    /// A fault, as reported by a client or returned by a translation
    /// (24 bytes).
    pub struct FaultInfo {
        /// `VIRTIO_IOMMU_FAULT_R_*`.
        reason: u8 [pad 3],
        /// [`FAULT_F_READ`] / [`FAULT_F_WRITE`].
        flags: u32,
        /// The endpoint.
        endpoint: u32,
        /// The PASID, with `FAULT_F_PASID`.
        pasid: u32,
        /// The faulting address.
        address: u64,
    }
}

record! {
    /// One device of a host fault queue: iommufd's device ID, and the
    /// guest endpoint it is.
    pub struct DeviceRoute {
        /// `dev_id` of the `iommu_hwpt_pgfault` records.
        dev_id: u32,
        /// The endpoint ID the guest knows the device by.
        endpoint: u32,
    }
}

record! {
    /// A reserved IOVA region the host IOMMU imposes on an endpoint
    /// (24 bytes).
    pub struct HostRegion {
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive).
        end: u64,
        /// `VIRTIO_IOMMU_RESV_MEM_T_*`: RESERVED, or MSI.
        subtype: u8 [pad 7],
    }
}

record! {
    /// How an [`Invalidation`] travels (32 bytes; version 1 clients read
    /// the first 24, which are all scopes 1-3 use).
    pub struct InvalidationRecord {
        /// 1 IOVA range of a domain, 2 endpoint, 3 everything, 4 domain,
        /// 5 table range, 6 table PASID, 7 binding.
        scope: u8,
        /// Bit 0: `pasid` is valid (scope 5).
        flags: u8 [pad 2],
        /// The domain (scopes 1, 4, 5, 6) or endpoint (scopes 2, 7).
        id: u32,
        /// First address (scopes 1, 5).
        start: u64,
        /// Last address, inclusive (scopes 1, 5).
        end: u64,
        /// The PASID (scopes 5 with flag bit 0, 6, 7).
        pasid: u32 [pad 4],
    }
}

const SCOPE_DOMAIN_RANGE: u8 = 1;
const SCOPE_ENDPOINT: u8 = 2;
const SCOPE_ALL: u8 = 3;
const SCOPE_DOMAIN: u8 = 4;
const SCOPE_TABLE_RANGE: u8 = 5;
const SCOPE_TABLE_PASID: u8 = 6;
const SCOPE_BINDING: u8 = 7;

impl Wire for Invalidation {
    fn put(&self, out: &mut Vec<u8>) {
        let (scope, id, start, end, pasid) = match *self {
            Invalidation::DomainRange { domain, start, end } => {
                (SCOPE_DOMAIN_RANGE, domain, start, end, None)
            }
            Invalidation::Endpoint(ep) => (SCOPE_ENDPOINT, ep, 0, 0, None),
            Invalidation::All => (SCOPE_ALL, 0, 0, 0, None),
            Invalidation::Domain(d) => (SCOPE_DOMAIN, d, 0, 0, None),
            Invalidation::TableRange {
                domain,
                pasid,
                start,
                end,
            } => (SCOPE_TABLE_RANGE, domain, start, end, pasid),
            Invalidation::TablePasid { domain, pasid } => {
                (SCOPE_TABLE_PASID, domain, 0, 0, Some(pasid))
            }
            Invalidation::Binding { endpoint, pasid } => {
                (SCOPE_BINDING, endpoint, 0, 0, Some(pasid))
            }
        };
        InvalidationRecord {
            scope,
            flags: u8::from(pasid.is_some()),
            id,
            start,
            end,
            pasid: pasid.unwrap_or(0),
        }
        .put(out);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let rec = InvalidationRecord::get(r)?;
        Ok(match rec.scope {
            SCOPE_DOMAIN_RANGE => Invalidation::DomainRange {
                domain: rec.id,
                start: rec.start,
                end: rec.end,
            },
            SCOPE_ENDPOINT => Invalidation::Endpoint(rec.id),
            SCOPE_ALL => Invalidation::All,
            SCOPE_DOMAIN => Invalidation::Domain(rec.id),
            SCOPE_TABLE_RANGE => Invalidation::TableRange {
                domain: rec.id,
                pasid: (rec.flags & 1 != 0).then_some(rec.pasid),
                start: rec.start,
                end: rec.end,
            },
            SCOPE_TABLE_PASID => Invalidation::TablePasid {
                domain: rec.id,
                pasid: rec.pasid,
            },
            SCOPE_BINDING => Invalidation::Binding {
                endpoint: rec.id,
                pasid: rec.pasid,
            },
            v => {
                return Err(DecodeError::BadValue {
                    what: "invalidation scope",
                    value: v.into(),
                })
            }
        })
    }
}

record! {
    /// How a [`StateChange`] travels in an EVENT (40 bytes).
    pub struct EventRecord {
        /// 1 ATTACH, 2 DETACH, 3 MAP, 4 UNMAP, 5 BYPASS, 6 RESET.
        kind: u8,
        /// Bit 0: bypass domain (ATTACH) or the new `bypass` value (BYPASS).
        flags: u8 [pad 2],
        /// The endpoint (ATTACH, DETACH).
        endpoint: u32,
        /// The domain (ATTACH, DETACH, MAP, UNMAP).
        domain: u32,
        /// The MAP flags (MAP).
        map_flags: u32,
        /// First IOVA (MAP, UNMAP).
        virt_start: u64,
        /// Last IOVA, inclusive (MAP, UNMAP).
        virt_end: u64,
        /// Guest-physical address of `virt_start` (MAP).
        phys_start: u64,
    }
}

const E_ATTACH: u8 = 1;
const E_DETACH: u8 = 2;
const E_MAP: u8 = 3;
const E_UNMAP: u8 = 4;
const E_BYPASS: u8 = 5;
const E_RESET: u8 = 6;
const E_TABLE_BOUND: u8 = 7;
const E_TABLE_UNBOUND: u8 = 8;
const E_TABLE_INVALIDATE: u8 = 9;

record! {
    /// What follows the [`EventRecord`] of a table event (kinds 7-9,
    /// 48 bytes): everything a VMM needs to install the same table as a
    /// nested stage 1 in the host IOMMU, or to forward an invalidation.
    pub struct TableRecord {
        /// The PASID (0: DMA without PASID), with `TABLE_F_PASID`.
        pasid: u32,
        /// `VIRTIO_IOMMU_PGTF_VTD` or `VIRTIO_IOMMU_PSTF_ARM_SMMU_V3`
        /// (TABLE_BOUND).
        format: u16,
        /// `TABLE_F_*`.
        flags: u8 [pad 1],
        /// VT-d: the first-stage root (`pgd`); SMMUv3: `s1contextptr`.
        root: u64,
        /// VT-d first-stage flags (SRE, EAFE, WPE).
        fl_flags: u64,
        /// The architecture tag of an invalidation (`TABLE_F_ARCHID`).
        archid: u64,
        /// VT-d input address width (48 or 57).
        addr_width: u8,
        /// SMMUv3 CD table layout.
        s1fmt: u8,
        /// SMMUv3 DMA-without-PASID behaviour.
        s1dss: u8,
        /// log2 of the page size of an invalidated range.
        granule: u8,
        /// SMMUv3 log2 of the number of CDs.
        s1cdmax: u32,
        /// `VIRTIO_IOMMU_INV_T_*` of an invalidation.
        inv_types: u16,
        /// The guest-physical address width the table is walked with.
        output_bits: u8 [pad 5],
    }
}

/// `TableRecord::flags`: `pasid` is valid.
pub const TABLE_F_PASID: u8 = 1 << 0;
/// `TableRecord::flags`: `archid` is valid.
pub const TABLE_F_ARCHID: u8 = 1 << 1;
/// `TableRecord::flags`: only leaf entries changed.
pub const TABLE_F_LEAF: u8 = 1 << 2;
/// `TableRecord::flags`: the invalidation has an address range.
pub const TABLE_F_RANGE: u8 = 1 << 3;

impl TableRecord {
    fn empty() -> Self {
        TableRecord {
            pasid: 0,
            format: 0,
            flags: 0,
            root: 0,
            fl_flags: 0,
            archid: 0,
            addr_width: 0,
            s1fmt: 0,
            s1dss: 0,
            granule: 0,
            s1cdmax: 0,
            inv_types: 0,
            output_bits: 0,
        }
    }

    fn from_table(pasid: u32, table: &TableSpec) -> Self {
        let mut t = TableRecord {
            pasid,
            format: table.format(),
            flags: TABLE_F_PASID,
            ..TableRecord::empty()
        };
        match table {
            TableSpec::Vtd(v) => {
                let c = v.config();
                t.root = c.pgd;
                t.fl_flags = c.fl_flags;
                // 48 or 57.
                t.addr_width = c.addr_width as u8;
                t.output_bits = c.output_bits;
            }
            TableSpec::SmmuCd { table, s1dss } => {
                let c = table.config();
                t.root = c.s1contextptr;
                t.s1fmt = c.s1fmt;
                t.s1dss = *s1dss;
                t.s1cdmax = c.s1cdmax;
                t.output_bits = c.output_bits;
            }
        }
        t
    }

    fn table(&self) -> Result<TableSpec, DecodeError> {
        let bad = |what| DecodeError::BadValue {
            what,
            value: self.root,
        };
        match self.format {
            viommu::wire::VIRTIO_IOMMU_PGTF_VTD => VtdFirstStage::new(VtdConfig {
                pgd: self.root,
                addr_width: u32::from(self.addr_width),
                fl_flags: self.fl_flags,
                output_bits: self.output_bits,
            })
            .map(TableSpec::Vtd)
            .map_err(|_| bad("VT-d table")),
            viommu::wire::VIRTIO_IOMMU_PSTF_ARM_SMMU_V3 => SmmuCdTable::new(SmmuCdConfig {
                s1fmt: self.s1fmt,
                s1cdmax: self.s1cdmax,
                s1contextptr: self.root,
                output_bits: self.output_bits,
            })
            .map(|table| TableSpec::SmmuCd {
                table,
                s1dss: self.s1dss,
            })
            .map_err(|_| bad("CD table")),
            other => Err(DecodeError::BadValue {
                what: "table format",
                value: other.into(),
            }),
        }
    }
}

impl From<StateChange> for EventRecord {
    fn from(c: StateChange) -> Self {
        let mut rec = EventRecord {
            kind: 0,
            flags: 0,
            endpoint: 0,
            domain: 0,
            map_flags: 0,
            virt_start: 0,
            virt_end: 0,
            phys_start: 0,
        };
        match c {
            StateChange::Attach {
                endpoint,
                domain,
                bypass,
            } => {
                rec.kind = E_ATTACH;
                rec.flags = u8::from(bypass);
                (rec.endpoint, rec.domain) = (endpoint, domain);
            }
            StateChange::Detach { endpoint, domain } => {
                rec.kind = E_DETACH;
                (rec.endpoint, rec.domain) = (endpoint, domain);
            }
            StateChange::Map { domain, mapping } => {
                rec.kind = E_MAP;
                rec.domain = domain;
                rec.map_flags = mapping.flags;
                rec.virt_start = mapping.virt_start;
                rec.virt_end = mapping.virt_end;
                rec.phys_start = mapping.phys_start;
            }
            StateChange::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                rec.kind = E_UNMAP;
                rec.domain = domain;
                (rec.virt_start, rec.virt_end) = (virt_start, virt_end);
            }
            StateChange::Bypass(on) => {
                rec.kind = E_BYPASS;
                rec.flags = u8::from(on);
            }
            StateChange::Reset => rec.kind = E_RESET,
            StateChange::TableBound {
                endpoint, domain, ..
            } => {
                rec.kind = E_TABLE_BOUND;
                (rec.endpoint, rec.domain) = (endpoint, domain);
            }
            StateChange::TableUnbound {
                endpoint, domain, ..
            } => {
                rec.kind = E_TABLE_UNBOUND;
                (rec.endpoint, rec.domain) = (endpoint, domain);
            }
            StateChange::TableInvalidate(inv) => {
                rec.kind = E_TABLE_INVALIDATE;
                rec.domain = inv.domain;
                if let Some((start, end)) = inv.range {
                    (rec.virt_start, rec.virt_end) = (start, end);
                }
            }
        }
        rec
    }
}

/// The table part of a table event, if `c` is one.
fn table_record(c: &StateChange) -> Option<TableRecord> {
    Some(match c {
        StateChange::TableBound { pasid, table, .. } => TableRecord::from_table(*pasid, table),
        StateChange::TableUnbound { pasid, .. } => TableRecord {
            pasid: *pasid,
            flags: TABLE_F_PASID,
            ..TableRecord::empty()
        },
        StateChange::TableInvalidate(inv) => {
            let mut flags = 0;
            if inv.pasid.is_some() {
                flags |= TABLE_F_PASID;
            }
            if inv.archid.is_some() {
                flags |= TABLE_F_ARCHID;
            }
            if inv.leaf {
                flags |= TABLE_F_LEAF;
            }
            if inv.range.is_some() {
                flags |= TABLE_F_RANGE;
            }
            TableRecord {
                pasid: inv.pasid.unwrap_or(0),
                flags,
                archid: inv.archid.unwrap_or(0),
                granule: inv.granule,
                inv_types: inv.types,
                ..TableRecord::empty()
            }
        }
        _ => return None,
    })
}

impl TryFrom<EventRecord> for StateChange {
    type Error = DecodeError;

    fn try_from(r: EventRecord) -> Result<Self, DecodeError> {
        Ok(match r.kind {
            E_ATTACH => StateChange::Attach {
                endpoint: r.endpoint,
                domain: r.domain,
                bypass: r.flags & 1 != 0,
            },
            E_DETACH => StateChange::Detach {
                endpoint: r.endpoint,
                domain: r.domain,
            },
            E_MAP => StateChange::Map {
                domain: r.domain,
                mapping: Mapping {
                    virt_start: r.virt_start,
                    virt_end: r.virt_end,
                    phys_start: r.phys_start,
                    flags: r.map_flags,
                },
            },
            E_UNMAP => StateChange::Unmap {
                domain: r.domain,
                virt_start: r.virt_start,
                virt_end: r.virt_end,
            },
            E_BYPASS => StateChange::Bypass(r.flags & 1 != 0),
            E_RESET => StateChange::Reset,
            v => {
                return Err(DecodeError::BadValue {
                    what: "event kind",
                    value: v.into(),
                })
            }
        })
    }
}

/// A change travels as its [`EventRecord`], followed by a [`TableRecord`]
/// for the table kinds (7-9).
impl Wire for StateChange {
    fn put(&self, out: &mut Vec<u8>) {
        EventRecord::from(*self).put(out);
        if let Some(t) = table_record(self) {
            t.put(out);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let rec = EventRecord::get(r)?;
        if !(E_TABLE_BOUND..=E_TABLE_INVALIDATE).contains(&rec.kind) {
            return rec.try_into();
        }
        let t = TableRecord::get(r)?;
        let pasid = (t.flags & TABLE_F_PASID != 0).then_some(t.pasid);
        Ok(match rec.kind {
            E_TABLE_BOUND => StateChange::TableBound {
                endpoint: rec.endpoint,
                domain: rec.domain,
                pasid: t.pasid,
                table: t.table()?,
            },
            E_TABLE_UNBOUND => StateChange::TableUnbound {
                endpoint: rec.endpoint,
                domain: rec.domain,
                pasid: t.pasid,
            },
            _ => StateChange::TableInvalidate(TableInvalidation {
                domain: rec.domain,
                pasid,
                archid: (t.flags & TABLE_F_ARCHID != 0).then_some(t.archid),
                range: (t.flags & TABLE_F_RANGE != 0).then_some((rec.virt_start, rec.virt_end)),
                granule: t.granule,
                types: t.inv_types,
                leaf: t.flags & TABLE_F_LEAF != 0,
            }),
        })
    }
}

messages! {
    // Client to daemon.

    /// HELLO: the client's first message.
    0x01 => Hello {
        /// `"VIOMMUCP"`.
        magic: Magic,
        /// Protocol version the client speaks.
        version: u16 [pad 2],
        /// `HELLO_F_*`.
        flags: u32,
    }
    /// TRANSLATE: `[iova, iova + len)` as an access by `endpoint`, with
    /// `pasid` (0: without PASID).
    0x02 => Translate {
        /// Echoed in the reply.
        tag: u32,
        /// The endpoint making the access.
        endpoint: u32,
        /// `TRANSLATE_F_*`.
        flags: u32,
        /// The PASID (0: DMA without PASID; version 1 clients send 0).
        pasid: u32,
        /// First IOVA.
        iova: u64,
        /// Bytes (0 is taken as 1).
        len: u64,
    }
    /// REPORT_FAULT: deliver an unrecoverable fault to the guest.
    0x03 => ReportFault {
        /// Echoed in the reply.
        tag: u32,
        /// The fault.
        fault: FaultInfo,
    }
    /// ACK: an INVALIDATE or a live EVENT has been applied.
    0x04 => Ack {
        /// Its sequence number.
        seq: u64,
    }
    /// QUERY: an inspection query (JSON, [`crate::query::Query`]).
    0x05 => Query {
        /// Echoed in the reply.
        tag: u32,
        /// The query document.
        json: String,
    }
    /// ATTACH_FAULT_QUEUE: the host iommufd fault queue whose descriptor
    /// comes with this message (`SCM_RIGHTS`) delivers page requests of
    /// these devices; answered with RESULT.
    0x06 => AttachFaultQueue {
        /// Echoed in the reply.
        tag: u32,
        /// The devices the queue reports, with their endpoints.
        devices: Vec<DeviceRoute>,
    }
    /// SET_HOST_CONSTRAINTS: what the host IOMMU imposes on a
    /// passed-through endpoint (reserved regions, replacing any given
    /// before; page sizes, 0 for none), for the guest's PROBE and
    /// `page_size_mask`; answered with RESULT.
    0x07 => SetHostConstraints {
        /// Echoed in the reply.
        tag: u32,
        /// The endpoint.
        endpoint: u32,
        /// Page sizes the host IOMMU supports; 0: no constraint.
        page_size_mask: u64,
        /// Its reserved regions (at most `viommu::host::MAX_HOST_REGIONS`).
        regions: Vec<HostRegion>,
    }

    // Daemon to client.

    /// WELCOME: the handshake succeeded.
    0x81 => Welcome {
        /// Protocol version the daemon speaks.
        version: u16 [pad 2],
        /// The HELLO flags granted.
        flags: u32,
        /// The client's ID.
        client_id: u64,
        /// How long the daemon waits for an acknowledgement before it
        /// disconnects the client and lets the guest's request complete
        /// (`--client-timeout-ms`). A caching client trusts its cache
        /// only while it has read everything the daemon sent within less
        /// than this (docs/control-protocol.md, "Coherence").
        ack_timeout_ms: u32 [pad 4],
    }
    /// TRANSLATION: the mappings that cover a translated range.
    0x82 => Translation {
        /// The request's tag.
        tag: u32,
        /// Whole mappings, in address order.
        extents: Vec<Extent>,
    }
    /// FAULT: the first address of a translated range that does not
    /// translate.
    0x83 => Fault {
        /// The request's tag.
        tag: u32,
        /// The fault.
        fault: FaultInfo,
    }
    /// RESULT: the outcome of a request that has no other answer.
    0x84 => CallResult {
        /// The request's tag.
        tag: u32,
        /// `RESULT_*`.
        status: u32,
        /// Why, when not OK.
        message: String,
    }
    /// QUERY_REPLY: the answer to a QUERY (JSON).
    0x85 => QueryReply {
        /// The request's tag.
        tag: u32,
        /// The reply document.
        json: String,
    }
    /// PAGE_RESPONSE: the one answer to the page request a TRANSLATE
    /// raised (`FAULT_F_PAGE_REQUEST`).
    0x86 => PageResponse {
        /// The TRANSLATE's tag.
        tag: u32,
        /// `PAGE_RESP_*`.
        code: u16,
        /// 0: the guest answered; otherwise the device did, for the reason
        /// numbered as `viommu::prq::AutoCause::ALL` from 1.
        cause: u8 [pad 1],
    }
    /// INVALIDATE: drop these cached translations, then ACK.
    0x90 => Invalidate {
        /// Sequence number to acknowledge.
        seq: u64,
        /// What to drop.
        scope: Invalidation,
    }
    /// EVENT: a change of the IOMMU state (`seq` 0: part of the replay).
    0x91 => Event {
        /// Sequence number (acknowledged by SYNC subscribers).
        seq: u64,
        /// The change.
        change: StateChange,
    }
    /// REPLAY_DONE: the replay is complete; live events follow.
    0x92 => ReplayDone {}
    /// BYE: the daemon closes the connection.
    0x9f => Bye {
        /// Why.
        message: String,
    }
}

impl Message {
    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out);
        out
    }
}

impl Hello {
    /// A HELLO of this version with `flags`.
    pub fn new(flags: u32) -> Self {
        Hello {
            magic: Magic,
            version: PROTOCOL_VERSION,
            flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use viommu::{
        pgtable::{VtdConfig, VtdFirstStage},
        wire::VIRTIO_IOMMU_INV_T_IOTLB,
    };

    use super::*;
    use crate::codec::Record;

    fn roundtrip(m: Message) {
        let bytes = m.encode();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(Message::decode(&bytes[4..]).unwrap(), m);
    }

    fn fault() -> FaultInfo {
        FaultInfo {
            reason: 2,
            flags: FAULT_F_WRITE | FAULT_F_PASID,
            endpoint: 32,
            pasid: 5,
            address: 0xdead_0000,
        }
    }

    #[test]
    fn every_message_survives_encoding() {
        let mapping = Mapping {
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000,
            flags: 3,
        };
        let changes = [
            StateChange::Map { domain: 1, mapping },
            StateChange::Attach {
                endpoint: 32,
                domain: 1,
                bypass: true,
            },
            StateChange::Unmap {
                domain: 1,
                virt_start: 0,
                virt_end: 9,
            },
            StateChange::Detach {
                endpoint: 32,
                domain: 1,
            },
            StateChange::Bypass(false),
            StateChange::Reset,
            StateChange::TableBound {
                endpoint: 32,
                domain: 9,
                pasid: 3,
                table: TableSpec::Vtd(
                    VtdFirstStage::new(VtdConfig {
                        pgd: 0x1000,
                        addr_width: 57,
                        fl_flags: 1,
                        output_bits: 48,
                    })
                    .unwrap(),
                ),
            },
            StateChange::TableBound {
                endpoint: 32,
                domain: 10,
                pasid: 0,
                table: TableSpec::SmmuCd {
                    table: SmmuCdTable::new(SmmuCdConfig {
                        s1fmt: 1,
                        s1cdmax: 8,
                        s1contextptr: 0x40,
                        output_bits: 44,
                    })
                    .unwrap(),
                    s1dss: 2,
                },
            },
            StateChange::TableUnbound {
                endpoint: 32,
                domain: 9,
                pasid: 3,
            },
            StateChange::TableInvalidate(TableInvalidation {
                domain: 9,
                pasid: Some(3),
                archid: None,
                range: Some((0x1000, 0x2fff)),
                granule: 12,
                types: VIRTIO_IOMMU_INV_T_IOTLB,
                leaf: true,
            }),
            StateChange::TableInvalidate(TableInvalidation {
                domain: 9,
                pasid: None,
                archid: Some(77),
                range: None,
                granule: 0,
                types: VIRTIO_IOMMU_INV_T_IOTLB,
                leaf: false,
            }),
        ];
        let mut all: Vec<Message> = vec![
            Hello::new(HELLO_F_CACHE | HELLO_F_SUBSCRIBE).into(),
            Translate {
                tag: 7,
                endpoint: 32,
                flags: TRANSLATE_F_WRITE,
                pasid: 9,
                iova: 1,
                len: 2,
            }
            .into(),
            ReportFault {
                tag: 1,
                fault: fault(),
            }
            .into(),
            Ack { seq: u64::MAX }.into(),
            Query {
                tag: 3,
                json: r#"{"cmd":"status"}"#.into(),
            }
            .into(),
            Welcome {
                version: 1,
                flags: 0,
                client_id: 9,
                ack_timeout_ms: 100,
            }
            .into(),
            Translation {
                tag: 4,
                extents: vec![Extent {
                    iova_start: 0,
                    iova_end: 9,
                    gpa_start: 5,
                    domain: 1,
                    flags: 3,
                }],
            }
            .into(),
            Fault {
                tag: 5,
                fault: fault(),
            }
            .into(),
            CallResult {
                tag: 6,
                status: RESULT_INVALID,
                message: "no".into(),
            }
            .into(),
            QueryReply {
                tag: 8,
                json: "{}".into(),
            }
            .into(),
            ReplayDone {}.into(),
            Bye {
                message: "bye".into(),
            }
            .into(),
            SetHostConstraints {
                tag: 10,
                endpoint: 0x20,
                page_size_mask: !0xfff,
                regions: vec![HostRegion {
                    start: 0x1000,
                    end: 0x1fff,
                    subtype: 0,
                }],
            }
            .into(),
            AttachFaultQueue {
                tag: 9,
                devices: vec![
                    DeviceRoute {
                        dev_id: 1,
                        endpoint: 0x28,
                    },
                    DeviceRoute {
                        dev_id: 7,
                        endpoint: 0x30,
                    },
                ],
            }
            .into(),
            PageResponse {
                tag: 10,
                code: PAGE_RESP_INVALID,
                cause: 3,
            }
            .into(),
        ];
        for scope in [
            Invalidation::DomainRange {
                domain: 1,
                start: 2,
                end: 3,
            },
            Invalidation::Endpoint(32),
            Invalidation::All,
            Invalidation::Domain(4),
            Invalidation::TableRange {
                domain: 4,
                pasid: Some(0),
                start: 5,
                end: 6,
            },
            Invalidation::TableRange {
                domain: 4,
                pasid: None,
                start: 5,
                end: 6,
            },
            Invalidation::TablePasid {
                domain: 4,
                pasid: 7,
            },
            Invalidation::Binding {
                endpoint: 32,
                pasid: 7,
            },
        ] {
            all.push(Invalidate { seq: 3, scope }.into());
        }
        for (seq, change) in changes.into_iter().enumerate() {
            all.push(
                Event {
                    seq: seq as u64,
                    change,
                }
                .into(),
            );
        }
        for m in all {
            roundtrip(m);
        }
    }

    #[test]
    fn layouts_match_the_protocol_document() {
        // HELLO: magic, le16 version, le16 reserved, le32 flags.
        let b = Message::from(Hello::new(0x55)).encode();
        assert_eq!(b.len(), 4 + 1 + 16);
        assert_eq!(&b[5..13], b"VIOMMUCP");
        assert_eq!(&b[17..21], &[0x55, 0, 0, 0]);
        // TRANSLATE: tag, endpoint, flags, reserved, iova, len.
        let t = Message::from(Translate {
            tag: 1,
            endpoint: 2,
            flags: 3,
            pasid: 0,
            iova: 4,
            len: 5,
        })
        .encode();
        assert_eq!(t.len(), 4 + 1 + 32);
        assert_eq!(t[5 + 16], 4);
        assert_eq!(FaultInfo::SIZE, 24);
        assert_eq!(Extent::SIZE, 32);
        assert_eq!(InvalidationRecord::SIZE, 32);
        assert_eq!(TableRecord::SIZE, 48);
        assert_eq!(EventRecord::SIZE, 40);
        let e = Message::from(Event {
            seq: 1,
            change: StateChange::Reset,
        })
        .encode();
        assert_eq!(e.len(), 4 + 1 + 8 + 40);
    }

    #[test]
    fn truncated_and_unknown_frames_are_errors_not_panics() {
        let bytes = Message::from(Translate {
            tag: 1,
            endpoint: 2,
            flags: 0,
            pasid: 0,
            iova: 3,
            len: 4,
        })
        .encode();
        for n in 5..bytes.len() {
            assert!(Message::decode(&bytes[4..n]).is_err(), "{n}");
        }
        assert_eq!(Message::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Message::decode(&[0x7e]),
            Err(DecodeError::UnknownType(0x7e))
        );
        let mut hello = Message::from(Hello::new(0)).encode();
        hello[5] = b'X';
        assert_eq!(Message::decode(&hello[4..]), Err(DecodeError::BadMagic));
        // A translation claiming more extents than its bytes hold.
        let mut t = Message::from(Translation {
            tag: 1,
            extents: vec![],
        })
        .encode();
        t[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Message::decode(&t[4..]).is_err());
        // Unknown event kinds and invalidation scopes.
        let mut e = Message::from(Event {
            seq: 1,
            change: StateChange::Reset,
        })
        .encode();
        e[13] = 99;
        assert!(matches!(
            Message::decode(&e[4..]),
            Err(DecodeError::BadValue { .. })
        ));
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A peer can send anything: decoding fails cleanly or yields a
        /// message that encodes back to a decodable frame.
        #[test]
        fn arbitrary_frames_never_panic_the_decoder(body in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(m) = Message::decode(&body) {
                let again = m.encode();
                prop_assert!(Message::decode(&again[4..]).is_ok());
            }
        }
    }
}
