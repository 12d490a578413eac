// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device state as a blob that outlives the daemon: what a VMM saves
//! when it snapshots or migrates a VM and loads into another daemon
//! (vhost-user `VHOST_USER_PROTOCOL_F_DEVICE_STATE`).
//!
//! [`encode`] writes a [`DeviceState`]. [`decode`] reads a blob back and
//! checks it against the configuration of the device that is to run it:
//! a state that a driver could have built on that device is accepted;
//! anything else is refused with a [`StateError`]: a truncated or corrupt
//! blob, another format version, a device whose guest-visible
//! configuration differs, or a state that breaks the device's rules or
//! caps. Counts are checked against the bytes that must hold them before
//! anything is allocated. The result, a [`LoadedState`], is swapped into
//! a device whole by [`Viommu::restore`](crate::Viommu::restore), so a
//! refused blob changes nothing.
//!
//! # Layout (format version 1)
//!
//! All integers are little-endian. A blob is a 32-byte header, a table of
//! sections, then the sections' bodies, back to back in table order, the
//! last one ending at the end of the blob:
//!
//! | Off | Size | Header field |
//! |---|---|---|
//! | 0 | 8 | magic `vIOMsnap` |
//! | 8 | le16 | format version (1) |
//! | 10 | le16 | reserved, 0 |
//! | 12 | le32 | number of sections `n` |
//! | 16 | le64 | size of the whole blob in bytes |
//! | 24 | le32 | CRC-32 (IEEE 802.3, as zlib's) of the whole blob with this field read as 0 |
//! | 28 | le32 | reserved, 0 |
//! | 32 | 24 × n | section table: `type` le32, `flags` le32 (bit 0: required), `offset` le64, `size` le64 |
//!
//! Sections of version 1 (each type at most once):
//!
//! | Type | Name | Flags | Body |
//! |---|---|---|---|
//! | 1 | `DEVICE` | required | offered and negotiated device features, the configuration the guest read (page sizes, input range, domain range, probe size, reserved regions), `bypass` |
//! | 2 | `DOMAINS` | required | every domain by increasing ID: flags (bypass), endpoints in attach order, mappings in address order |
//! | 3 | `GUEST_PASIDS` | required | the PASIDs the guest allocated with PASID_ALLOC, increasing (written only when there are some) |
//! | 4 | `PASID_TABLES` | required | the guest's tables (ATTACH_TABLE) and PASID bindings (written only when there are some) |
//! | 5 | `PENDING_EVENTS` | optional | event records that wait for a buffer, oldest first (written only when there are some) |
//!
//! `DEVICE`: offered features le64, negotiated features le64,
//! `page_size_mask` le64, input range start le64 and end le64, domain
//! range start le32 and end le32, `probe_size` le32, number of reserved
//! regions `r` le32, `bypass` u8, 7 reserved bytes, then `r` regions of
//! start le64, end le64, subtype u8 and 7 reserved bytes.
//!
//! `DOMAINS`: number of domains le32, reserved le32; per domain with
//! endpoints: ID le32,
//! flags le32 (bit 0: bypass), number of endpoints `e` le32, number of
//! mappings `m` le32, `e` endpoint IDs le32, then `m` mappings of
//! `virt_start` le64, `virt_end` le64, `phys_start` le64, flags le32 and a
//! reserved le32.
//!
//! `GUEST_PASIDS`: number le32, reserved le32, the PASIDs le32.
//!
//! `PASID_TABLES`: number of table domains `t` le32, number of bindings
//! `b` le32; `t` table domains by increasing ID, each its ID le32, a
//! reserved le32 and the 80-byte device-readable part of the ATTACH_TABLE
//! that binds its table (domain = the ID, endpoint and PASID 0), read back
//! by the device's own ATTACH_TABLE parser; then `b` bindings in
//! (endpoint, PASID) order, each endpoint le32, PASID le32, domain le32
//! and a reserved le32. A table domain with endpoints (ATTACH_TABLE
//! without PASID) is also in `DOMAINS`, without mappings; one with only
//! bindings is only here.
//!
//! `PENDING_EVENTS`: number le32, reserved le32; per event its length
//! le32 (24 or 48) and the record.
//!
//! # Versioning
//!
//! A decoder reads exactly the format versions it knows (this one: 1).
//! The version changes only when the header, the section table or the
//! layout of an existing section changes. New kinds of state come as new
//! section types and leave the version alone: a section a decoder does not
//! know is skipped when it is optional (state the destination may lose,
//! such as undelivered faults) and refuses the blob when it is required
//! (state whose loss the guest would notice, such as PASID bindings).
//! Every reserved field is written as zero and checked.
//!
//! The checksum catches accidental damage (a flipped bit, a blob cut or
//! spliced in transit): CRC-32 finds every error burst of up to 32 bits
//! and misses other damage with probability 2^-32, for a table lookup per
//! byte and no dependency. It is no defence against a forged blob, which
//! no unkeyed checksum or hash could be; the validation of every field
//! against the device's rules is.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use thiserror::Error;

use crate::{
    config::DeviceConfig,
    device::{check_map_range, known_attach_flags, known_map_flags, Domain, Snapshot},
    error::RequestError,
    mapping::{Mapping, MappingTree},
    pasid::{device_max_pasid, Pasid, MAX_BITS},
    table::{read_attach_table, TableSpec},
    wire::*,
};

#[cfg(test)]
mod tests;

/// First bytes of every blob.
pub const MAGIC: [u8; 8] = *b"vIOMsnap";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the header.
pub const HEADER_SIZE: usize = 32;
/// Bytes of one section-table entry.
pub const ENTRY_SIZE: usize = 24;
/// Offset of the checksum in the header.
const CRC_AT: usize = 24;

/// Section flag: a decoder that does not know the section's type must
/// refuse the blob.
pub const SECTION_F_REQUIRED: u32 = 1 << 0;

/// Section types.
pub mod section {
    /// Features and the configuration the guest read; `bypass`.
    pub const DEVICE: u32 = 1;
    /// Domains, their endpoints and mappings.
    pub const DOMAINS: u32 = 2;
    /// PASIDs the guest allocated with PASID_ALLOC.
    pub const GUEST_PASIDS: u32 = 3;
    /// The guest's tables and PASID bindings.
    pub const PASID_TABLES: u32 = 4;
    /// Event records waiting for a buffer (optional).
    pub const PENDING_EVENTS: u32 = 5;
}

/// Most event records a blob may carry (and the daemon keeps waiting for
/// a buffer).
pub const MAX_PENDING_EVENTS: usize = 256;

/// Fixed part of the `DEVICE` body, before the reserved regions.
const DEVICE_FIXED: usize = 64;
const RESV_REGION_SIZE: usize = 24;
/// Fixed part of one domain in `DOMAINS`, before its lists.
const DOMAIN_FIXED: usize = 16;
const MAPPING_SIZE: usize = 32;
/// One table domain in `PASID_TABLES`: ID, reserved, the ATTACH_TABLE.
const TABLE_SIZE: usize = 8 + ATTACH_TABLE_RO;
/// One binding in `PASID_TABLES`.
const BINDING_SIZE: usize = 16;
/// `DOMAINS` domain flag: a bypass domain.
const DOMAIN_F_BYPASS: u32 = 1 << 0;

/// What a blob holds, as the daemon gathers it to save it.
#[derive(Clone)]
pub struct DeviceState {
    /// Device feature bits the driver accepted.
    pub acked_features: u64,
    /// `bypass` and the domains (with their tables).
    pub iommu: Snapshot,
    /// PASID bindings: (endpoint, PASID) and the domain of their table,
    /// in (endpoint, PASID) order.
    pub bindings: Vec<((u32, u32), u32)>,
    /// PASIDs the guest allocated with PASID_ALLOC (guest PASID = host
    /// PASID), in any order.
    pub guest_pasids: Vec<Pasid>,
    /// Event records (24 or 48 bytes) waiting for a buffer, oldest first.
    pub pending_events: Vec<Vec<u8>>,
}

/// A blob decoded and checked against one device configuration.
pub struct LoadedState {
    /// The IOMMU state, for [`Viommu::restore`](crate::Viommu::restore).
    pub model: ModelState,
    /// PASIDs the guest allocated with PASID_ALLOC, increasing.
    pub guest_pasids: Vec<Pasid>,
    /// Event records waiting for a buffer, oldest first.
    pub pending_events: Vec<Vec<u8>>,
    /// Types of the optional sections this version does not know, skipped.
    pub skipped_sections: Vec<u32>,
}

/// The IOMMU part of a [`LoadedState`]: built completely, and checked
/// against the configuration it remembers.
pub struct ModelState {
    pub(crate) config: DeviceConfig,
    pub(crate) acked: u64,
    pub(crate) bypass: bool,
    pub(crate) endpoints: HashMap<u32, u32>,
    pub(crate) domains: HashMap<u32, Domain>,
    /// (endpoint, PASID) -> domain; their PASID references are taken by
    /// [`Viommu::restore`](crate::Viommu::restore).
    pub(crate) bindings: BTreeMap<(u32, u32), u32>,
}

impl ModelState {
    /// Device feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The `bypass` config field.
    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// The domains, by ID.
    pub fn domains(&self) -> &HashMap<u32, Domain> {
        &self.domains
    }

    /// Mappings of all domains together.
    pub fn mappings(&self) -> usize {
        self.domains.values().map(|d| d.mappings.len()).sum()
    }

    /// PASID bindings: (endpoint, PASID) -> domain.
    pub fn bindings(&self) -> &BTreeMap<(u32, u32), u32> {
        &self.bindings
    }
}

/// What is wrong with one domain of a blob.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum DomainProblem {
    /// A rule the device enforces on ATTACH and MAP requests.
    #[error(transparent)]
    Rule(#[from] RequestError),
    /// Domain IDs must increase from one domain to the next.
    #[error("its ID does not follow the previous domain's in increasing order")]
    Order,
    /// A domain exists only while an endpoint is attached to it.
    #[error("it has no endpoint")]
    NoEndpoints,
    /// An endpoint is attached to one domain at most, once.
    #[error("endpoint {0} is attached twice")]
    EndpointTwice(u32),
    /// A bypass domain has no mappings.
    #[error("it is a bypass domain with {0} mappings")]
    BypassWithMappings(u32),
    /// More mappings than the device's cap.
    #[error("{count} mappings, more than the limit of {limit}")]
    TooManyMappings {
        /// Mappings in the blob.
        count: u32,
        /// The device's `max_mappings_per_domain`.
        limit: usize,
    },
    /// Mappings are stored in address order and never overlap.
    #[error("the mapping at {0:#x} does not follow the previous one (sorted, disjoint)")]
    MappingOrder(u64),
    /// A table domain translates through its table only.
    #[error("it has a table and is a bypass domain or has mappings")]
    TableAndMappings,
    /// A domain exists while it has endpoints or bindings.
    #[error("it has a table but no endpoint and no binding")]
    Unused,
    /// PASID bindings go to VT-d tables (a CD table serves every PASID).
    #[error("PASID {pasid} of endpoint {endpoint} is bound to a table that is not PGTF_VTD")]
    BindingFormat {
        /// The endpoint.
        endpoint: u32,
        /// The PASID.
        pasid: u32,
    },
}

/// Why a blob was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StateError {
    /// The blob ends before what its header or tables announce.
    #[error("the blob is truncated: {got} bytes, {need} expected")]
    Truncated {
        /// Bytes expected.
        need: u64,
        /// Bytes received.
        got: usize,
    },
    /// Not a device state blob of this daemon.
    #[error("not a vhost-device-iommu device state (bad magic)")]
    BadMagic,
    /// A format version this code does not read.
    #[error("format version {found} is not supported (this daemon reads version {VERSION})")]
    Version {
        /// The blob's version.
        found: u16,
    },
    /// More bytes than the header announces.
    #[error("the blob has {got} bytes but its header says {size}")]
    TrailingBytes {
        /// Size in the header.
        size: u64,
        /// Bytes received.
        got: usize,
    },
    /// The bytes are damaged.
    #[error(
        "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the blob is corrupt"
    )]
    Checksum {
        /// The header's checksum.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A structure does not follow the layout.
    #[error("malformed {part}: {detail}")]
    Malformed {
        /// Which part of the blob.
        part: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A section type appears twice.
    #[error("section type {0} appears twice")]
    DuplicateSection(u32),
    /// A section that must be understood, which this version does not
    /// know.
    #[error("section type {0} is required and unknown to format version {VERSION}")]
    UnknownRequiredSection(u32),
    /// A section every blob has is missing.
    #[error("the {0} section is missing")]
    MissingSection(&'static str),
    /// The state was saved on a device whose guest-visible configuration
    /// differs from this one's: the guest would not find the device it
    /// knows.
    #[error("saved on a device with {field} {saved}, this device has {here}")]
    DeviceMismatch {
        /// The configuration item.
        field: &'static str,
        /// The saved value.
        saved: String,
        /// This device's value.
        here: String,
    },
    /// More domains than the device's cap.
    #[error("{count} domains, more than the limit of {limit}")]
    TooManyDomains {
        /// Domains in the blob.
        count: u32,
        /// The device's `max_domains`.
        limit: usize,
    },
    /// A domain the device could not have.
    #[error("domain {domain}: {problem}")]
    Domain {
        /// The domain ID.
        domain: u32,
        /// What is wrong with it (in the message, so not a `source`).
        problem: DomainProblem,
    },
    /// An event record the device could not have queued.
    #[error("pending event {index}: {detail}")]
    Event {
        /// Its position, from 0.
        index: usize,
        /// What is wrong with it.
        detail: String,
    },
    /// A binding's PASID cannot be referenced on this host: it is not
    /// this VM's (or the guest freed it while it was bound).
    #[error("PASID {pasid} of endpoint {endpoint} is bound, but is not a PASID of this VM")]
    BindingRefused {
        /// The endpoint.
        endpoint: u32,
        /// The PASID.
        pasid: u32,
    },
    /// [`Viommu::restore`](crate::Viommu::restore) of a state checked
    /// against another configuration.
    #[error("the state was checked against another device configuration")]
    OtherDevice,
}

fn malformed(part: &'static str, detail: impl Into<String>) -> StateError {
    StateError::Malformed {
        part,
        detail: detail.into(),
    }
}

/// CRC-32 of IEEE 802.3 (reflected polynomial 0xEDB88320), byte-wise.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32_update(crc: u32, bytes: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The checksum of a blob: its CRC-32 with the checksum field read as 0.
/// The blob must hold a header.
fn checksum(blob: &[u8]) -> u32 {
    let crc = crc32_update(0, &blob[..CRC_AT]);
    let crc = crc32_update(crc, &[0; 4]);
    crc32_update(crc, &blob[CRC_AT + 4..])
}

// ---- Encoding ----

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A count as the format stores it. Counts of a device's state (domains,
/// endpoints and mappings under the device's caps, PASIDs, events) are
/// far below 2^32.
fn count32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Encodes `state`, taken from a device with configuration `config`. A
/// state taken from a device ([`Viommu::snapshot`](crate::Viommu::snapshot)
/// and its negotiated features, with the guest's PASIDs and 24- or
/// 48-byte event records) decodes against the same configuration.
pub fn encode(config: &DeviceConfig, state: &DeviceState) -> Vec<u8> {
    let mut pasids = state.guest_pasids.clone();
    pasids.sort_unstable();
    pasids.dedup();
    let mut sections = vec![
        (section::DEVICE, SECTION_F_REQUIRED),
        (section::DOMAINS, SECTION_F_REQUIRED),
    ];
    if !pasids.is_empty() {
        sections.push((section::GUEST_PASIDS, SECTION_F_REQUIRED));
    }
    let tables = state
        .iommu
        .domains
        .iter()
        .filter(|(_, d)| d.table.is_some())
        .count();
    if tables > 0 || !state.bindings.is_empty() {
        sections.push((section::PASID_TABLES, SECTION_F_REQUIRED));
    }
    if !state.pending_events.is_empty() {
        sections.push((section::PENDING_EVENTS, 0));
    }
    let table_end = HEADER_SIZE + sections.len() * ENTRY_SIZE;
    let domains_size: usize = state
        .iommu
        .domains
        .iter()
        .map(|(_, d)| DOMAIN_FIXED + 4 * d.endpoints.len() + MAPPING_SIZE * d.mappings.len())
        .sum();
    let mut out = Vec::with_capacity(
        table_end
            + DEVICE_FIXED
            + RESV_REGION_SIZE * config.reserved_regions.len()
            + 8
            + domains_size
            + 8
            + 4 * pasids.len(),
    );
    out.resize(table_end, 0);
    let mut table = Vec::with_capacity(sections.len());
    for &(kind, flags) in &sections {
        let start = out.len();
        match kind {
            section::DEVICE => write_device(&mut out, config, state),
            section::DOMAINS => write_domains(&mut out, &state.iommu),
            section::GUEST_PASIDS => write_pasids(&mut out, &pasids),
            section::PASID_TABLES => write_tables(&mut out, state, tables),
            _ => write_events(&mut out, &state.pending_events),
        }
        table.push((kind, flags, start, out.len() - start));
    }
    let mut head = Vec::with_capacity(table_end);
    head.extend_from_slice(&MAGIC);
    put16(&mut head, VERSION);
    put16(&mut head, 0);
    put32(&mut head, count32(sections.len()));
    put64(&mut head, out.len() as u64);
    put32(&mut head, 0);
    put32(&mut head, 0);
    for (kind, flags, offset, size) in table {
        put32(&mut head, kind);
        put32(&mut head, flags);
        put64(&mut head, offset as u64);
        put64(&mut head, size as u64);
    }
    out[..table_end].copy_from_slice(&head);
    let crc = checksum(&out);
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    out
}

fn write_device(out: &mut Vec<u8>, config: &DeviceConfig, state: &DeviceState) {
    put64(out, config.device_features());
    put64(out, state.acked_features);
    put64(out, config.page_size_mask);
    put64(out, config.input_range.0);
    put64(out, config.input_range.1);
    put32(out, config.domain_range.0);
    put32(out, config.domain_range.1);
    put32(out, config.probe_size);
    put32(out, count32(config.reserved_regions.len()));
    out.push(u8::from(state.iommu.bypass));
    out.extend_from_slice(&[0; 7]);
    for r in &config.reserved_regions {
        put64(out, r.start);
        put64(out, r.end);
        out.push(r.subtype);
        out.extend_from_slice(&[0; 7]);
    }
}

fn write_domains(out: &mut Vec<u8>, iommu: &Snapshot) {
    // Table domains with bindings only are in PASID_TABLES alone.
    let with_endpoints = || {
        iommu
            .domains
            .iter()
            .filter(|(_, d)| !d.endpoints.is_empty())
    };
    put32(out, count32(with_endpoints().count()));
    put32(out, 0);
    for (id, d) in with_endpoints() {
        put32(out, *id);
        put32(out, if d.bypass { DOMAIN_F_BYPASS } else { 0 });
        put32(out, count32(d.endpoints.len()));
        put32(out, count32(d.mappings.len()));
        for &ep in &d.endpoints {
            put32(out, ep);
        }
        for m in d.mappings.iter() {
            put64(out, m.virt_start);
            put64(out, m.virt_end);
            put64(out, m.phys_start);
            put32(out, m.flags);
            put32(out, 0);
        }
    }
}

fn write_tables(out: &mut Vec<u8>, state: &DeviceState, tables: usize) {
    put32(out, count32(tables));
    put32(out, count32(state.bindings.len()));
    for (id, d) in &state.iommu.domains {
        if let Some(table) = &d.table {
            put32(out, *id);
            put32(out, 0);
            out.extend_from_slice(&table.attach_request(*id, 0, 0));
        }
    }
    for &((endpoint, pasid), domain) in &state.bindings {
        put32(out, endpoint);
        put32(out, pasid);
        put32(out, domain);
        put32(out, 0);
    }
}

fn write_pasids(out: &mut Vec<u8>, pasids: &[Pasid]) {
    put32(out, count32(pasids.len()));
    put32(out, 0);
    for &p in pasids {
        put32(out, p);
    }
}

fn write_events(out: &mut Vec<u8>, events: &[Vec<u8>]) {
    put32(out, count32(events.len()));
    put32(out, 0);
    for e in events {
        put32(out, count32(e.len()));
        out.extend_from_slice(e);
    }
}

// ---- Decoding ----

/// Reads one structure of a blob; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    part: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], part: &'static str) -> Self {
        Reader { buf, at: 0, part }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let bytes = self
            .at
            .checked_add(n)
            .and_then(|end| self.buf.get(self.at..end))
            .ok_or_else(|| {
                malformed(
                    self.part,
                    format!(
                        "{n} bytes needed at offset {}, {} left",
                        self.at,
                        self.remaining()
                    ),
                )
            })?;
        self.at += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        self.array().map(u64::from_le_bytes)
    }

    /// Reserved bytes, which must be zero.
    fn reserved(&mut self, n: usize) -> Result<(), StateError> {
        if self.take(n)?.iter().any(|&b| b != 0) {
            return Err(malformed(self.part, "a reserved field is not zero"));
        }
        Ok(())
    }

    /// A le32 count of items of at least `item` bytes each, followed by a
    /// reserved le32; the items must fit in what is left, so a count can
    /// size an allocation.
    fn count(&mut self, item: usize) -> Result<u32, StateError> {
        let n = self.u32()?;
        self.reserved(4)?;
        if (n as usize).saturating_mul(item) > self.remaining() {
            return Err(malformed(
                self.part,
                format!(
                    "{n} items of at least {item} bytes in {} bytes",
                    self.remaining()
                ),
            ));
        }
        Ok(n)
    }

    fn finish(self) -> Result<(), StateError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(malformed(self.part, format!("{n} bytes after its end"))),
        }
    }
}

fn le16_at(blob: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([blob[at], blob[at + 1]])
}

fn le32_at(blob: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&blob[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le64_at(blob: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&blob[at..at + 8]);
    u64::from_le_bytes(b)
}

/// One entry of the section table, with its body.
struct Section<'a> {
    kind: u32,
    required: bool,
    body: &'a [u8],
}

/// Checks the header, the checksum and the section table.
fn sections(blob: &[u8]) -> Result<Vec<Section<'_>>, StateError> {
    if blob.len() < HEADER_SIZE {
        if blob.len() >= MAGIC.len() && blob[..MAGIC.len()] != MAGIC {
            return Err(StateError::BadMagic);
        }
        return Err(StateError::Truncated {
            need: HEADER_SIZE as u64,
            got: blob.len(),
        });
    }
    if blob[..MAGIC.len()] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = le16_at(blob, 8);
    if version != VERSION {
        return Err(StateError::Version { found: version });
    }
    let size = le64_at(blob, 16);
    if size > blob.len() as u64 {
        return Err(StateError::Truncated {
            need: size,
            got: blob.len(),
        });
    }
    if size < blob.len() as u64 {
        return Err(StateError::TrailingBytes {
            size,
            got: blob.len(),
        });
    }
    let (stored, computed) = (le32_at(blob, CRC_AT), checksum(blob));
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    if le16_at(blob, 10) != 0 || le32_at(blob, 28) != 0 {
        return Err(malformed("header", "a reserved field is not zero"));
    }
    let n = le32_at(blob, 12) as usize;
    let table_end = n
        .checked_mul(ENTRY_SIZE)
        .and_then(|t| t.checked_add(HEADER_SIZE))
        .filter(|&end| end <= blob.len())
        .ok_or_else(|| {
            malformed(
                "section table",
                format!("{n} entries do not fit in {} bytes", blob.len()),
            )
        })?;
    let mut table = Reader::new(&blob[HEADER_SIZE..table_end], "section table");
    let mut out = Vec::with_capacity(n);
    let mut seen = BTreeSet::new();
    let mut at = table_end as u64;
    for i in 0..n {
        let (kind, flags) = (table.u32()?, table.u32()?);
        let (offset, len) = (table.u64()?, table.u64()?);
        if flags & !SECTION_F_REQUIRED != 0 {
            return Err(malformed(
                "section table",
                format!("entry {i} has unknown flags {flags:#x}"),
            ));
        }
        if offset != at {
            return Err(malformed(
                "section table",
                format!("section {i} starts at {offset}, not right after the previous one at {at}"),
            ));
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= blob.len() as u64)
            .ok_or_else(|| {
                malformed(
                    "section table",
                    format!("section {i} ({len} bytes at {offset}) ends past the blob"),
                )
            })?;
        if !seen.insert(kind) {
            return Err(StateError::DuplicateSection(kind));
        }
        // Both fit in the blob's length, a usize.
        out.push(Section {
            kind,
            required: flags & SECTION_F_REQUIRED != 0,
            body: &blob[offset as usize..end as usize],
        });
        at = end;
    }
    if at != blob.len() as u64 {
        return Err(malformed(
            "section table",
            format!("{} bytes after the last section", blob.len() as u64 - at),
        ));
    }
    Ok(out)
}

/// Decodes `blob` and checks it against `config`, the configuration of
/// the device that is to run it. Nothing larger than the blob's own
/// counts allow is allocated.
pub fn decode(blob: &[u8], config: &DeviceConfig) -> Result<LoadedState, StateError> {
    let (mut device, mut domains, mut pasids, mut events) = (None, None, None, None);
    let mut tables = None;
    let mut skipped_sections = Vec::new();
    for s in sections(blob)? {
        match s.kind {
            section::DEVICE => device = Some(s.body),
            section::DOMAINS => domains = Some(s.body),
            section::GUEST_PASIDS => pasids = Some(s.body),
            section::PASID_TABLES => tables = Some(s.body),
            section::PENDING_EVENTS => events = Some(s.body),
            kind if s.required => return Err(StateError::UnknownRequiredSection(kind)),
            kind => skipped_sections.push(kind),
        }
    }
    // DOMAINS needs the negotiated features from DEVICE.
    let device = device.ok_or(StateError::MissingSection("DEVICE"))?;
    let domains = domains.ok_or(StateError::MissingSection("DOMAINS"))?;
    let (acked, bypass) = read_device(device, config)?;
    let (endpoints, mut domains) = read_domains(domains, config, acked)?;
    let bindings = match tables {
        Some(body) => read_tables(body, config, acked, &mut domains)?,
        None => BTreeMap::new(),
    };
    let guest_pasids = match pasids {
        Some(body) => read_pasids(body, config)?,
        None => Vec::new(),
    };
    let pending_events = match events {
        Some(body) => read_events(body, config)?,
        None => Vec::new(),
    };
    Ok(LoadedState {
        model: ModelState {
            config: config.clone(),
            acked,
            bypass,
            endpoints,
            domains,
            bindings,
        },
        guest_pasids,
        pending_events,
        skipped_sections,
    })
}

/// Compares a saved configuration item with this device's; `show`
/// prints one for the error.
fn same<T: PartialEq>(
    field: &'static str,
    saved: T,
    here: T,
    show: fn(&T) -> String,
) -> Result<(), StateError> {
    if saved == here {
        return Ok(());
    }
    Err(StateError::DeviceMismatch {
        field,
        saved: show(&saved),
        here: show(&here),
    })
}

fn hex(v: &u64) -> String {
    format!("{v:#x}")
}

/// The `DEVICE` section: the negotiated features and `bypass`, once the
/// device is known to be the one the guest saw.
fn read_device(body: &[u8], config: &DeviceConfig) -> Result<(u64, bool), StateError> {
    let mut r = Reader::new(body, "DEVICE section");
    let offered = r.u64()?;
    let acked = r.u64()?;
    same("offered features", offered, config.device_features(), hex)?;
    same("page_size_mask", r.u64()?, config.page_size_mask, hex)?;
    same(
        "input range",
        (r.u64()?, r.u64()?),
        config.input_range,
        |(a, b)| format!("{a:#x}-{b:#x}"),
    )?;
    same(
        "domain range",
        (r.u32()?, r.u32()?),
        config.domain_range,
        |(a, b)| format!("{a}-{b}"),
    )?;
    same("probe_size", r.u32()?, config.probe_size, u32::to_string)?;
    let regions = r.u32()?;
    let bypass = r.u8()?;
    r.reserved(7)?;
    same(
        "number of reserved regions",
        regions as usize,
        config.reserved_regions.len(),
        usize::to_string,
    )?;
    for here in &config.reserved_regions {
        let saved = (r.u64()?, r.u64()?, r.u8()?);
        r.reserved(7)?;
        same(
            "reserved region",
            saved,
            (here.start, here.end, here.subtype),
            |(a, b, t)| format!("{a:#x}-{b:#x} (subtype {t})"),
        )?;
    }
    r.finish()?;
    if acked & !offered != 0 {
        return Err(malformed(
            "DEVICE section",
            format!("negotiated features {acked:#x} include bits never offered ({offered:#x})"),
        ));
    }
    match bypass {
        0 => Ok((acked, false)),
        1 if config.bypass_config => Ok((acked, true)),
        1 => Err(malformed(
            "DEVICE section",
            "bypass is set on a device without VIRTIO_IOMMU_F_BYPASS_CONFIG",
        )),
        v => Err(malformed("DEVICE section", format!("bypass is {v}"))),
    }
}

/// Endpoints with their domain, and the domains by ID.
type Attachments = (HashMap<u32, u32>, HashMap<u32, Domain>);

/// The `DOMAINS` section, checked against every rule ATTACH and MAP
/// enforce with the negotiated features `acked`, and against the caps.
fn read_domains(body: &[u8], config: &DeviceConfig, acked: u64) -> Result<Attachments, StateError> {
    let mut r = Reader::new(body, "DOMAINS section");
    let count = r.count(DOMAIN_FIXED)?;
    if count as usize > config.max_domains {
        return Err(StateError::TooManyDomains {
            count,
            limit: config.max_domains,
        });
    }
    let attach_flags = known_attach_flags(acked);
    let map_flags = known_map_flags(acked);
    let granule_mask = config.granule() - 1;
    let (lo, hi) = config.domain_range;
    let mut endpoints = HashMap::new();
    let mut domains = HashMap::with_capacity(count as usize);
    let mut previous = None;
    for _ in 0..count {
        let id = r.u32()?;
        let bad = |problem| StateError::Domain {
            domain: id,
            problem,
        };
        let flags = r.u32()?;
        let (n_endpoints, n_mappings) = (r.u32()?, r.u32()?);
        if previous.is_some_and(|p| id <= p) {
            return Err(bad(DomainProblem::Order));
        }
        previous = Some(id);
        if id < lo || id > hi {
            return Err(bad(RequestError::DomainOutOfRange(id).into()));
        }
        if flags & !attach_flags != 0 {
            return Err(bad(RequestError::UnknownFlags(flags & !attach_flags).into()));
        }
        let bypass = flags & DOMAIN_F_BYPASS != 0;
        if n_endpoints == 0 {
            return Err(bad(DomainProblem::NoEndpoints));
        }
        if bypass && n_mappings > 0 {
            return Err(bad(DomainProblem::BypassWithMappings(n_mappings)));
        }
        if n_mappings as usize > config.max_mappings_per_domain {
            return Err(bad(DomainProblem::TooManyMappings {
                count: n_mappings,
                limit: config.max_mappings_per_domain,
            }));
        }
        // Both lists must be in the blob before they size anything.
        let list = r.take((n_endpoints as usize).saturating_mul(4))?;
        let maps = r.take((n_mappings as usize).saturating_mul(MAPPING_SIZE))?;
        let mut domain_endpoints = Vec::with_capacity(list.len() / 4);
        for ep in list.chunks_exact(4) {
            let ep = le32_at(ep, 0);
            if !config.endpoints.contains(ep) {
                return Err(bad(RequestError::NoSuchEndpoint(ep).into()));
            }
            if endpoints.insert(ep, id).is_some() {
                return Err(bad(DomainProblem::EndpointTwice(ep)));
            }
            domain_endpoints.push(ep);
        }
        let mut mappings = MappingTree::new();
        let mut last_end = None;
        for m in maps.chunks_exact(MAPPING_SIZE) {
            let (start, end, phys) = (le64_at(m, 0), le64_at(m, 8), le64_at(m, 16));
            let (mflags, reserved) = (le32_at(m, 24), le32_at(m, 28));
            if reserved != 0 {
                return Err(malformed("DOMAINS section", "a reserved field is not zero"));
            }
            if mflags & !map_flags != 0 {
                return Err(bad(RequestError::UnknownFlags(mflags & !map_flags).into()));
            }
            check_map_range(config, granule_mask, start, end, phys).map_err(|e| bad(e.into()))?;
            if last_end.is_some_and(|e| start <= e) {
                return Err(bad(DomainProblem::MappingOrder(start)));
            }
            last_end = Some(end);
            mappings.insert(Mapping {
                virt_start: start,
                virt_end: end,
                phys_start: phys,
                flags: mflags,
            });
        }
        domains.insert(
            id,
            Domain {
                bypass,
                endpoints: domain_endpoints,
                mappings,
                table: None,
                bound: Vec::new(),
            },
        );
    }
    r.finish()?;
    Ok((endpoints, domains))
}

/// The `PASID_TABLES` section: each table read back by the device's
/// ATTACH_TABLE parser and given to its domain (one of `domains` without
/// mappings, or a new one), then the bindings, checked as ATTACH_TABLE
/// checks them (the PASID references are taken by `Viommu::restore`).
fn read_tables(
    body: &[u8],
    config: &DeviceConfig,
    acked: u64,
    domains: &mut HashMap<u32, Domain>,
) -> Result<BTreeMap<(u32, u32), u32>, StateError> {
    const PART: &str = "PASID_TABLES section";
    let mut r = Reader::new(body, PART);
    if acked & (1 << VIRTIO_IOMMU_F_ATTACH_TABLE) == 0 {
        return Err(malformed(
            PART,
            "tables on a device without VIRTIO_IOMMU_F_ATTACH_TABLE negotiated",
        ));
    }
    let n_tables = r.u32()?;
    let n_bindings = r.u32()?;
    // Both lists must be in the blob before they size anything.
    let tables = r.take((n_tables as usize).saturating_mul(TABLE_SIZE))?;
    let bindings = r.take((n_bindings as usize).saturating_mul(BINDING_SIZE))?;
    r.finish()?;
    let (lo, hi) = config.domain_range;
    let mut previous = None;
    for t in tables.chunks_exact(TABLE_SIZE) {
        let id = le32_at(t, 0);
        let bad = |problem: DomainProblem| StateError::Domain {
            domain: id,
            problem,
        };
        if le32_at(t, 4) != 0 {
            return Err(malformed(PART, "a reserved field is not zero"));
        }
        if previous.is_some_and(|p| id <= p) {
            return Err(bad(DomainProblem::Order));
        }
        previous = Some(id);
        if id < lo || id > hi {
            return Err(bad(RequestError::DomainOutOfRange(id).into()));
        }
        let at = match read_attach_table(&t[8..], config.output_bits) {
            Ok(Some(at)) => at,
            Ok(None) => return Err(malformed(PART, format!("domain {id}: a truncated table"))),
            Err(e) => return Err(bad(e.into())),
        };
        if (at.domain, at.endpoint, at.pasid) != (id, 0, 0) {
            return Err(malformed(
                PART,
                format!("domain {id}: the table's request names another binding"),
            ));
        }
        if !config.table_formats.offers(at.table.format()) {
            return Err(bad(
                RequestError::UnsupportedFormat(at.table.format()).into()
            ));
        }
        let full = domains.len() >= config.max_domains;
        match domains.get_mut(&id) {
            Some(d) if d.bypass || !d.mappings.is_empty() => {
                return Err(bad(DomainProblem::TableAndMappings))
            }
            Some(d) => d.table = Some(at.table),
            None if full => {
                return Err(StateError::TooManyDomains {
                    count: count32(domains.len() + 1),
                    limit: config.max_domains,
                })
            }
            None => {
                domains.insert(
                    id,
                    Domain {
                        bypass: false,
                        endpoints: Vec::new(),
                        mappings: MappingTree::new(),
                        table: Some(at.table),
                        bound: Vec::new(),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut per_endpoint: HashMap<u32, usize> = HashMap::new();
    for b in bindings.chunks_exact(BINDING_SIZE) {
        let (endpoint, pasid, domain) = (le32_at(b, 0), le32_at(b, 4), le32_at(b, 8));
        let bad = |problem: DomainProblem| StateError::Domain { domain, problem };
        if le32_at(b, 12) != 0 {
            return Err(malformed(PART, "a reserved field is not zero"));
        }
        if out
            .last_key_value()
            .is_some_and(|(&k, _)| (endpoint, pasid) <= k)
        {
            return Err(malformed(
                PART,
                format!("binding ({endpoint}, {pasid}) does not follow the previous one in order"),
            ));
        }
        if !config.endpoints.contains(endpoint) {
            return Err(bad(RequestError::NoSuchEndpoint(endpoint).into()));
        }
        let bits = config.endpoint_pasid_bits;
        if bits == 0 {
            return Err(bad(RequestError::NoPasidSupport(endpoint).into()));
        }
        if pasid == 0 || u64::from(pasid) >> bits != 0 {
            return Err(bad(RequestError::PasidWidth { pasid, bits }.into()));
        }
        let n = per_endpoint.entry(endpoint).or_default();
        *n += 1;
        let limit = config.max_bindings_per_endpoint;
        if *n > limit {
            return Err(bad(RequestError::TooManyBindings { endpoint, limit }.into()));
        }
        let Some(d) = domains.get_mut(&domain) else {
            return Err(bad(RequestError::NoSuchDomain(domain).into()));
        };
        match d.table {
            Some(TableSpec::Vtd(_)) => {}
            Some(_) => return Err(bad(DomainProblem::BindingFormat { endpoint, pasid })),
            None => return Err(bad(RequestError::TableMismatch(domain).into())),
        }
        d.bound.push((endpoint, pasid));
        out.insert((endpoint, pasid), domain);
    }
    for (&id, d) in domains.iter() {
        if d.table.is_some() && d.endpoints.is_empty() && d.bound.is_empty() {
            return Err(StateError::Domain {
                domain: id,
                problem: DomainProblem::Unused,
            });
        }
    }
    Ok(out)
}

/// The `GUEST_PASIDS` section.
fn read_pasids(body: &[u8], config: &DeviceConfig) -> Result<Vec<Pasid>, StateError> {
    let mut r = Reader::new(body, "GUEST_PASIDS section");
    let count = r.count(4)?;
    if count > 0 && !config.pasid_alloc {
        return Err(malformed(
            "GUEST_PASIDS section",
            "PASIDs on a device without VIRTIO_IOMMU_F_PASID_ALLOC",
        ));
    }
    let max = device_max_pasid(MAX_BITS);
    let mut pasids = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let p = r.u32()?;
        if p == 0 || p > max {
            return Err(malformed(
                "GUEST_PASIDS section",
                format!("PASID {p} is outside [1, {max}]"),
            ));
        }
        if pasids.last().is_some_and(|&last| p <= last) {
            return Err(malformed(
                "GUEST_PASIDS section",
                format!("PASID {p} does not follow the previous one in increasing order"),
            ));
        }
        pasids.push(p);
    }
    r.finish()?;
    Ok(pasids)
}

/// The `PENDING_EVENTS` section: unrecoverable fault records (24 bytes,
/// or 48 in the extended layout) of endpoints of this device.
fn read_events(body: &[u8], config: &DeviceConfig) -> Result<Vec<Vec<u8>>, StateError> {
    let mut r = Reader::new(body, "PENDING_EVENTS section");
    let count = r.count(4 + std::mem::size_of::<FaultRecord>())?;
    if count as usize > MAX_PENDING_EVENTS {
        return Err(malformed(
            "PENDING_EVENTS section",
            format!("{count} events, more than the limit of {MAX_PENDING_EVENTS}"),
        ));
    }
    let mut events = Vec::with_capacity(count as usize);
    for index in 0..count as usize {
        let bad = |detail: String| StateError::Event { index, detail };
        let len = r.u32()? as usize;
        if len != std::mem::size_of::<FaultRecord>() && len != std::mem::size_of::<FaultRecordExt>()
        {
            return Err(bad(format!("a record of {len} bytes (24 or 48 expected)")));
        }
        let record = r.take(len)?;
        let (reason, flags, endpoint) = (record[0], le32_at(record, 4), le32_at(record, 8));
        if reason > VIRTIO_IOMMU_FAULT_R_MAPPING {
            return Err(bad(format!("unknown fault reason {reason}")));
        }
        if flags & VIRTIO_IOMMU_FAULT_F_PAGE_REQ != 0 {
            return Err(bad("a page request (only faults are saved)".into()));
        }
        if !config.endpoints.contains(endpoint) {
            return Err(bad(format!("endpoint {endpoint} does not exist")));
        }
        events.push(record.to_vec());
    }
    r.finish()?;
    Ok(events)
}
