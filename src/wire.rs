// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Wire formats of virtio-iommu 1.3: constants named as in the spec and the
//! `#[repr(C)]` structures the driver and the device exchange.
//!
//! Every structure is a plain little-endian record with no padding,
//! declared once through `wire_struct!`, which proves that at compile time
//! (the size of the struct must equal the sum of its fields' sizes, and
//! every field must itself be `ByteValued`) before it implements
//! `ByteValued`, the only `unsafe` of this crate.

use vm_memory::{ByteValued, Le16, Le32, Le64};

// Feature bits (virtio-iommu 1.3, §5.13.3).
/// `input_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// `domain_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Legacy bypass bit; never offered (superseded by BYPASS_CONFIG).
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// PROBE requests are available; `probe_size` is valid.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// MAP may carry `VIRTIO_IOMMU_MAP_F_MMIO`.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// The `bypass` config field and bypass domains.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;

/// PROJECT EXTENSION (docs/extension-spec.md): PASID_ALLOC and PASID_FREE
/// requests, for guests that must use host PASIDs directly.
pub const VIRTIO_IOMMU_F_PASID_ALLOC: u32 = 11;

/// PROJECT EXTENSION (reference `virtio-iommu.md` §2.12): the device may
/// emit page requests (the 48-byte [`FaultRecordExt`]) and accepts
/// PAGE_RESP.
pub const VIRTIO_IOMMU_F_PAGE_REQUEST: u32 = 10;

// Request types.
/// ATTACH: put an endpoint in a domain.
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// DETACH: take an endpoint out of its domain.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// MAP: add a mapping to a domain.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// UNMAP: remove the mappings of a range.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// PROBE: an endpoint's properties.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;
/// Answer to a page-request group (RFC-2021-04 number, project layout).
pub const VIRTIO_IOMMU_T_PAGE_RESP: u8 = 8;
/// PROJECT EXTENSION: allocate a host PASID for the guest.
pub const VIRTIO_IOMMU_T_PASID_ALLOC: u8 = 10;
/// PROJECT EXTENSION: free a PASID the guest allocated.
pub const VIRTIO_IOMMU_T_PASID_FREE: u8 = 11;

// Status codes.
/// Success.
pub const VIRTIO_IOMMU_S_OK: u8 = 0;
/// Virtio communication error.
pub const VIRTIO_IOMMU_S_IOERR: u8 = 1;
/// Unsupported request.
pub const VIRTIO_IOMMU_S_UNSUPP: u8 = 2;
/// Internal device error.
pub const VIRTIO_IOMMU_S_DEVERR: u8 = 3;
/// Invalid parameters.
pub const VIRTIO_IOMMU_S_INVAL: u8 = 4;
/// Out-of-range parameters.
pub const VIRTIO_IOMMU_S_RANGE: u8 = 5;
/// Entry not found.
pub const VIRTIO_IOMMU_S_NOENT: u8 = 6;
/// Bad address.
pub const VIRTIO_IOMMU_S_FAULT: u8 = 7;
/// Insufficient resources.
pub const VIRTIO_IOMMU_S_NOMEM: u8 = 8;

/// ATTACH flag: create or join a bypass domain.
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;

/// MAP flag: the endpoint may read.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1 << 0;
/// MAP flag: the endpoint may write.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the range is device memory (MMIO).
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 1 << 2;

/// PROBE property type: end of the list.
pub const VIRTIO_IOMMU_PROBE_T_NONE: u16 = 0;
/// PROBE property type: a reserved memory region.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// Bits of a PROBE property header's `type` that hold the type.
pub const VIRTIO_IOMMU_PROBE_T_MASK: u16 = 0xfff;
/// RESV_MEM subtype: IOVAs the driver must not map.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: the MSI doorbell window.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;
/// PROJECT EXTENSION: the endpoint's page-request capabilities
/// ([`ProbePageRequest`]).
pub const VIRTIO_IOMMU_PROBE_T_PAGE_REQUEST: u16 = 8;
/// `ProbePageRequest::flags`: the endpoint can issue recoverable page
/// requests.
pub const VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_PRI: u32 = 1 << 0;
/// `ProbePageRequest::flags`: a PAGE_RESP for a group that carried a PASID
/// must carry it too (PCIe "PRG Response PASID Required").
pub const VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_RESP_PASID: u32 = 1 << 1;
/// `ProbePageRequest::flags`: the endpoint stalls on faults (SMMU stall
/// model) rather than using PCIe PRI.
pub const VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_STALL: u32 = 1 << 2;

/// Fault reason: internal or unclassifiable.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: access by an endpoint attached to no domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: address not mapped, or the mapping forbids the access.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;
/// Fault flag: a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: an instruction fetch (Linux's extension of the spec).
pub const VIRTIO_IOMMU_FAULT_F_EXEC: u32 = 1 << 2;
/// Fault flag: `address` is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

// Extended fault record flags (Brucker's 2021 proposal, reference §2.8).
/// The access was privileged.
pub const VIRTIO_IOMMU_FAULT_F_PRIVILEGED: u32 = 1 << 3;
/// Last request of its page-request group: the group is answered after it.
pub const VIRTIO_IOMMU_FAULT_F_LAST: u32 = 1 << 4;
/// A recoverable page request, to be answered with PAGE_RESP.
pub const VIRTIO_IOMMU_FAULT_F_PAGE_REQ: u32 = 1 << 5;
/// `FaultRecordExt::pasid` is valid.
pub const VIRTIO_IOMMU_FAULT_F_PASID: u32 = 1 << 9;
/// `FaultRecordExt::group_id` is valid.
pub const VIRTIO_IOMMU_FAULT_F_GROUP_ID: u32 = 1 << 10;
/// `FaultRecordExt::private_data` is valid.
pub const VIRTIO_IOMMU_FAULT_F_PRIV_DATA: u32 = 1 << 11;

// PAGE_RESP flags and codes (PROJECT EXTENSION, reference §2.12).
/// `PageRespReq::pasid` is valid.
pub const VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID: u32 = 1 << 0;
/// The pages are mapped: the device retries its accesses.
pub const VIRTIO_IOMMU_PAGE_RESP_SUCCESS: u16 = 0;
/// The pages cannot be mapped: the device must not retry them.
pub const VIRTIO_IOMMU_PAGE_RESP_INVALID: u16 = 1;
/// Fatal error: the device stops issuing page requests until reset.
pub const VIRTIO_IOMMU_PAGE_RESP_FAILURE: u16 = 2;

/// Declares a wire structure once: the `#[repr(C)]` struct, and its
/// `ByteValued` implementation after proving at compile time that the
/// struct is exactly `size` bytes, that this is the sum of its fields
/// (no padding) and that every field is itself `ByteValued`.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident (size = $size:expr) {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:ty),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty),+
        }
        const _: () = {
            const fn field_is_byte_valued<T: ByteValued>() {}
            $(field_is_byte_valued::<$ty>();)+
            assert!(std::mem::size_of::<$name>() == $size);
            assert!(std::mem::size_of::<$name>() == 0 $(+ std::mem::size_of::<$ty>())+);
        };
        // SAFETY: `$name` is `#[repr(C)]`, every field is `ByteValued` (any
        // bit pattern is valid) and the assertions above prove there is no
        // padding, so any byte sequence of its size is a valid value.
        #[allow(unsafe_code)]
        unsafe impl ByteValued for $name {}
    };
}

wire_struct! {
    /// `struct virtio_iommu_config` (40 bytes).
    pub struct VirtioIommuConfig (size = 40) {
        /// Supported page sizes; the lowest set bit is the granule.
        pub page_size_mask: Le64,
        /// First translatable IOVA.
        pub input_range_start: Le64,
        /// Last translatable IOVA (inclusive).
        pub input_range_end: Le64,
        /// Lowest valid domain ID.
        pub domain_range_start: Le32,
        /// Highest valid domain ID (inclusive).
        pub domain_range_end: Le32,
        /// Size of the PROBE properties area.
        pub probe_size: Le32,
        /// Whether unattached endpoints bypass the IOMMU (0 or 1).
        pub bypass: u8,
        /// Reserved, zero.
        pub reserved: [u8; 3],
    }
}

/// Offset of `bypass` in the config space: the only field a driver may write.
pub const CONFIG_BYPASS_OFFSET: usize = 0x24;

wire_struct! {
    /// `struct virtio_iommu_req_head` (device-readable).
    pub struct ReqHead (size = 4) {
        /// The request type (`VIRTIO_IOMMU_T_*`).
        pub req_type: u8,
        /// Reserved, zero.
        pub reserved: [u8; 3],
    }
}

wire_struct! {
    /// `struct virtio_iommu_req_tail` (device-writable, last 4 bytes).
    pub struct ReqTail (size = 4) {
        /// The status (`VIRTIO_IOMMU_S_*`).
        pub status: u8,
        /// Reserved, zero.
        pub reserved: [u8; 3],
    }
}

wire_struct! {
    /// `struct virtio_iommu_req_attach` (24 bytes, tail included).
    pub struct AttachReq (size = 24) {
        /// Common request head.
        pub head: ReqHead,
        /// The domain ID.
        pub domain: Le32,
        /// The endpoint ID.
        pub endpoint: Le32,
        /// Flags.
        pub flags: Le32,
        /// Reserved, zero.
        pub reserved: [u8; 4],
        /// Status tail, written by the device.
        pub tail: ReqTail,
    }
}

wire_struct! {
    /// `struct virtio_iommu_req_detach` (24 bytes).
    pub struct DetachReq (size = 24) {
        /// Common request head.
        pub head: ReqHead,
        /// The domain ID.
        pub domain: Le32,
        /// The endpoint ID.
        pub endpoint: Le32,
        /// Reserved, zero.
        pub reserved: [u8; 8],
        /// Status tail, written by the device.
        pub tail: ReqTail,
    }
}

wire_struct! {
    /// `struct virtio_iommu_req_map` (40 bytes).
    pub struct MapReq (size = 40) {
        /// Common request head.
        pub head: ReqHead,
        /// The domain ID.
        pub domain: Le32,
        /// First IOVA.
        pub virt_start: Le64,
        /// Last IOVA (inclusive).
        pub virt_end: Le64,
        /// Guest-physical address of `virt_start`.
        pub phys_start: Le64,
        /// Flags.
        pub flags: Le32,
        /// Status tail, written by the device.
        pub tail: ReqTail,
    }
}

wire_struct! {
    /// `struct virtio_iommu_req_unmap` (32 bytes).
    pub struct UnmapReq (size = 32) {
        /// Common request head.
        pub head: ReqHead,
        /// The domain ID.
        pub domain: Le32,
        /// First IOVA.
        pub virt_start: Le64,
        /// Last IOVA (inclusive).
        pub virt_end: Le64,
        /// Reserved, zero.
        pub reserved: [u8; 4],
        /// Status tail, written by the device.
        pub tail: ReqTail,
    }
}

wire_struct! {
    /// `struct virtio_iommu_req_pasid_alloc` (PROJECT EXTENSION, 32 bytes):
    /// 20 device-readable bytes, then the allocated PASID and the tail.
    pub struct PasidAllocReq (size = 32) {
        /// Common request head.
        pub head: ReqHead,
        /// Lowest acceptable PASID (at least 1).
        pub min: Le32,
        /// Highest acceptable PASID.
        pub max: Le32,
        /// No flags are defined; must be 0.
        pub flags: Le32,
        /// Reserved, zero.
        pub reserved: [u8; 4],
        /// Written by the device: the allocated PASID.
        pub pasid: Le32,
        /// Reserved, written as zero.
        pub reserved_out: [u8; 4],
        /// Status tail, written by the device.
        pub tail: ReqTail,
    }
}

/// Device-readable bytes of PASID_ALLOC.
pub const PASID_ALLOC_READABLE: usize = 20;
/// Device-writable bytes of PASID_ALLOC (pasid, reserved, tail).
pub const PASID_ALLOC_WRITABLE: usize = 12;

wire_struct! {
    /// `struct virtio_iommu_req_pasid_free` (PROJECT EXTENSION, 24 bytes).
    pub struct PasidFreeReq (size = 24) {
        /// Common request head.
        pub head: ReqHead,
        /// The PASID.
        pub pasid: Le32,
        /// No flags are defined; must be 0.
        pub flags: Le32,
        /// Reserved, zero.
        pub reserved: [u8; 8],
        /// Status tail, written by the device.
        pub tail: ReqTail,
    }
}

wire_struct! {
    /// Device-readable part of `struct virtio_iommu_req_probe` (72 bytes); the
    /// writable part is `probe_size` bytes of properties followed by the tail.
    pub struct ProbeReq (size = 72) {
        /// Common request head.
        pub head: ReqHead,
        /// The endpoint ID.
        pub endpoint: Le32,
        // The spec's `reserved[64]`, in two halves because vm-memory implements
        // `ByteValued` for arrays of up to 32 elements only.
        /// Reserved, zero.
        pub reserved: [u8; 32],
        /// Second half of the reserved bytes.
        pub reserved_hi: [u8; 32],
    }
}

wire_struct! {
    /// `struct virtio_iommu_probe_property` header.
    pub struct ProbeProperty (size = 4) {
        /// Property type (bits 0-11).
        pub prop_type: Le16,
        /// Length of the value, without this header.
        pub length: Le16,
    }
}

wire_struct! {
    /// `struct virtio_iommu_probe_resv_mem` including its property header.
    pub struct ProbeResvMem (size = 24) {
        /// Common request head.
        pub head: ProbeProperty,
        /// `VIRTIO_IOMMU_RESV_MEM_T_*`.
        pub subtype: u8,
        /// Reserved, zero.
        pub reserved: [u8; 3],
        /// First address of the region.
        pub start: Le64,
        /// Last address of the region (inclusive).
        pub end: Le64,
    }
}

wire_struct! {
    /// `struct virtio_iommu_fault`: the 24-byte event record of the spec.
    pub struct FaultRecord (size = 24) {
        /// `VIRTIO_IOMMU_FAULT_R_*`.
        pub reason: u8,
        /// Reserved, zero.
        pub reserved: [u8; 3],
        /// Flags.
        pub flags: Le32,
        /// The endpoint ID.
        pub endpoint: Le32,
        /// Reserved, zero (a PASID in drafts).
        pub reserved1: Le32,
        /// The faulting address, when `VIRTIO_IOMMU_FAULT_F_ADDRESS` is set.
        pub address: Le64,
    }
}

wire_struct! {
    /// Brucker's extended event record (48 bytes, reference §2.8), used for
    /// every event once `VIRTIO_IOMMU_F_PAGE_REQUEST` is negotiated. Its first
    /// 24 bytes are a [`FaultRecord`] whose `reserved1` carries the PASID, so
    /// a driver that reads only those still finds reason, flags, endpoint and
    /// address where the spec puts them.
    pub struct FaultRecordExt (size = 48) {
        /// `VIRTIO_IOMMU_FAULT_R_*`.
        pub reason: u8,
        /// Zero.
        pub reserved: [u8; 3],
        /// `VIRTIO_IOMMU_FAULT_F_*`.
        pub flags: Le32,
        /// Endpoint that issued the access.
        pub endpoint: Le32,
        /// PASID of the access, valid with `VIRTIO_IOMMU_FAULT_F_PASID`.
        pub pasid: Le32,
        /// Faulting (page) address, valid with `VIRTIO_IOMMU_FAULT_F_ADDRESS`.
        pub address: Le64,
        /// Page-request group index, valid with `VIRTIO_IOMMU_FAULT_F_GROUP_ID`.
        pub group_id: Le16,
        /// Zero.
        pub reserved1: [u8; 6],
        /// `private_data[0]`: VT-d page-request private data, valid with
        /// `VIRTIO_IOMMU_FAULT_F_PRIV_DATA`. (Two fields because vm-memory
        /// makes arrays of primitives only `ByteValued`.)
        pub private_data0: Le64,
        /// `private_data[1]`.
        pub private_data1: Le64,
    }
}

wire_struct! {
    /// `struct virtio_iommu_req_page_resp` (PROJECT EXTENSION, 32 bytes): the
    /// driver's answer to one page-request group, RFC-2021-04 as fixed in its
    /// review (reference §2.12). 28 device-readable bytes, then the tail.
    pub struct PageRespReq (size = 32) {
        /// `type` = `VIRTIO_IOMMU_T_PAGE_RESP`.
        pub head: ReqHead,
        /// Endpoint of the group.
        pub endpoint: Le32,
        /// PASID of the group, valid with `VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID`.
        pub pasid: Le32,
        /// `VIRTIO_IOMMU_PAGE_RESP_F_*`.
        pub flags: Le32,
        /// Group index from the group's events.
        pub group_id: Le16,
        /// `VIRTIO_IOMMU_PAGE_RESP_{SUCCESS,INVALID,FAILURE}`.
        pub code: Le16,
        /// Must be zero.
        pub reserved: [u8; 8],
        /// Written by the device.
        pub tail: ReqTail,
    }
}

wire_struct! {
    /// PROBE property `VIRTIO_IOMMU_PROBE_T_PAGE_REQUEST` (PROJECT EXTENSION,
    /// 16 bytes with its header, keeping properties 8-byte aligned).
    pub struct ProbePageRequest (size = 16) {
        /// `prop_type` = 8, `length` = 12.
        pub head: ProbeProperty,
        /// `VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_*`.
        pub flags: Le32,
        /// Most page-request groups the endpoint may have in flight; further
        /// groups are answered INVALID by the device.
        pub max_outstanding_groups: Le32,
        /// Zero.
        pub reserved: [u8; 4],
    }
}

impl ReqHead {
    /// The head of a request of `req_type`.
    pub fn new(req_type: u8) -> Self {
        ReqHead {
            req_type,
            reserved: [0; 3],
        }
    }
}

// Constructors as a driver fills requests (reserved fields zero).
impl AttachReq {
    /// The request as a driver fills it (reserved fields zero).
    pub fn new(domain: u32, endpoint: u32, flags: u32) -> Self {
        AttachReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_ATTACH),
            domain: domain.into(),
            endpoint: endpoint.into(),
            flags: flags.into(),
            ..Default::default()
        }
    }
}

impl DetachReq {
    /// The request as a driver fills it (reserved fields zero).
    pub fn new(domain: u32, endpoint: u32) -> Self {
        DetachReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_DETACH),
            domain: domain.into(),
            endpoint: endpoint.into(),
            ..Default::default()
        }
    }
}

impl MapReq {
    /// The request as a driver fills it (reserved fields zero).
    pub fn new(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> Self {
        MapReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_MAP),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            phys_start: phys_start.into(),
            flags: flags.into(),
            tail: ReqTail::default(),
        }
    }
}

impl UnmapReq {
    /// The request as a driver fills it (reserved fields zero).
    pub fn new(domain: u32, virt_start: u64, virt_end: u64) -> Self {
        UnmapReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_UNMAP),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            ..Default::default()
        }
    }
}

impl ProbeReq {
    /// The request as a driver fills it (reserved fields zero).
    pub fn new(endpoint: u32) -> Self {
        ProbeReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_PROBE),
            endpoint: endpoint.into(),
            ..Default::default()
        }
    }
}

impl PasidAllocReq {
    /// The request as a driver fills it (reserved fields zero).
    pub fn new(min: u32, max: u32) -> Self {
        PasidAllocReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_PASID_ALLOC),
            min: min.into(),
            max: max.into(),
            ..Default::default()
        }
    }

    /// The device-readable bytes of the request.
    pub fn readable(&self) -> &[u8] {
        &self.as_slice()[..PASID_ALLOC_READABLE]
    }
}

impl PasidFreeReq {
    /// The request as a driver fills it (reserved fields zero).
    pub fn new(pasid: u32) -> Self {
        PasidFreeReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_PASID_FREE),
            pasid: pasid.into(),
            ..Default::default()
        }
    }
}

impl PageRespReq {
    /// A PAGE_RESP for group `group_id` of `endpoint`, with the PASID (and
    /// `VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID`) when the group carried one.
    pub fn new(endpoint: u32, pasid: Option<u32>, group_id: u16, code: u16) -> Self {
        PageRespReq {
            head: ReqHead::new(VIRTIO_IOMMU_T_PAGE_RESP),
            endpoint: endpoint.into(),
            pasid: pasid.unwrap_or(0).into(),
            flags: if pasid.is_some() {
                VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID.into()
            } else {
                0.into()
            },
            group_id: group_id.into(),
            code: code.into(),
            ..Default::default()
        }
    }
}

impl ProbePageRequest {
    /// The property as the device writes it.
    pub fn new(flags: u32, max_outstanding_groups: u32) -> Self {
        ProbePageRequest {
            head: ProbeProperty {
                prop_type: VIRTIO_IOMMU_PROBE_T_PAGE_REQUEST.into(),
                length: 12.into(),
            },
            flags: flags.into(),
            max_outstanding_groups: max_outstanding_groups.into(),
            reserved: [0; 4],
        }
    }
}

/// The device-readable part of a fixed-size request: all but the tail.
pub fn readable_part<T: ByteValued>(req: &T) -> &[u8] {
    let b = req.as_slice();
    &b[..b.len() - REQ_TAIL_SIZE]
}

/// Size of the request head.
pub const REQ_HEAD_SIZE: usize = std::mem::size_of::<ReqHead>();
/// Size of the status tail.
pub const REQ_TAIL_SIZE: usize = std::mem::size_of::<ReqTail>();

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    #[test]
    fn request_sizes_match_the_spec() {
        assert_eq!(size_of::<AttachReq>(), 24);
        assert_eq!(size_of::<DetachReq>(), 24);
        assert_eq!(size_of::<MapReq>(), 40);
        assert_eq!(size_of::<UnmapReq>(), 32);
        assert_eq!(size_of::<ProbeReq>(), 72);
        assert_eq!(size_of::<FaultRecord>(), 24);
        assert_eq!(size_of::<ProbeResvMem>(), 24);
        assert_eq!(size_of::<VirtioIommuConfig>(), 40);
        assert_eq!(size_of::<FaultRecordExt>(), 48);
        assert_eq!(size_of::<PageRespReq>(), 32);
        assert_eq!(size_of::<ProbePageRequest>(), 16);
    }

    #[test]
    fn extended_fault_record_fields_sit_at_brucker_offsets() {
        let f = FaultRecordExt {
            reason: 0x11,
            flags: 0x2222_2222.into(),
            endpoint: 0x3333_3333.into(),
            pasid: 0x4444_4444.into(),
            address: 0x5555_5555_5555_5555.into(),
            group_id: 0x6666.into(),
            private_data0: 0x7777_7777_7777_7777.into(),
            private_data1: 0x8888_8888_8888_8888.into(),
            ..Default::default()
        };
        let b = f.as_slice();
        assert_eq!(b[0], 0x11);
        assert_eq!(b[4], 0x22);
        assert_eq!(b[8], 0x33);
        assert_eq!(b[12], 0x44);
        assert_eq!(b[16], 0x55);
        assert_eq!(&b[24..26], &[0x66, 0x66]);
        assert_eq!(&b[26..32], &[0; 6]);
        assert_eq!(b[32], 0x77);
        assert_eq!(b[40], 0x88);
    }

    #[test]
    fn extended_fault_record_starts_with_the_spec_record() {
        let ext = FaultRecordExt {
            reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
            flags: (VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS).into(),
            endpoint: 7.into(),
            pasid: 9.into(),
            address: 0xdead_b000.into(),
            group_id: 3.into(),
            ..Default::default()
        };
        let base =
            FaultRecord::from_slice(&ext.as_slice()[..size_of::<FaultRecord>()]).expect("24 bytes");
        assert_eq!(base.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(base.flags, ext.flags);
        assert_eq!(base.endpoint.to_native(), 7);
        assert_eq!(base.reserved1.to_native(), 9);
        assert_eq!(base.address.to_native(), 0xdead_b000);
    }

    #[test]
    fn page_resp_fields_sit_at_project_offsets() {
        let r = PageRespReq::new(0x0403_0201, Some(0x0807_0605), 0x0a09, 0x0c0b);
        let b = r.as_slice();
        assert_eq!(b[0], VIRTIO_IOMMU_T_PAGE_RESP);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(&b[8..12], &[5, 6, 7, 8]);
        assert_eq!(&b[12..16], &[1, 0, 0, 0]);
        assert_eq!(&b[16..18], &[9, 10]);
        assert_eq!(&b[18..20], &[11, 12]);
        assert_eq!(&b[20..32], &[0; 12]);
        assert_eq!(readable_part(&r).len(), 28);
    }

    #[test]
    fn page_request_probe_property_is_12_bytes_long() {
        let p = ProbePageRequest::new(VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_PRI, 32);
        let b = p.as_slice();
        assert_eq!(&b[0..4], &[8, 0, 12, 0]);
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        assert_eq!(&b[8..12], &[32, 0, 0, 0]);
    }

    #[test]
    fn map_fields_sit_at_spec_offsets() {
        let req = MapReq {
            head: ReqHead {
                req_type: VIRTIO_IOMMU_T_MAP,
                reserved: [0; 3],
            },
            domain: 0x0403_0201.into(),
            virt_start: 0x1111_1111_1111_1111.into(),
            virt_end: 0x2222_2222_2222_2222.into(),
            phys_start: 0x3333_3333_3333_3333.into(),
            flags: 0x4444_4444.into(),
            tail: ReqTail::default(),
        };
        let b = req.as_slice();
        assert_eq!(b[0], 3);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(b[8], 0x11);
        assert_eq!(b[16], 0x22);
        assert_eq!(b[24], 0x33);
        assert_eq!(b[32], 0x44);
    }

    #[test]
    fn fault_address_is_at_offset_16() {
        let f = FaultRecord {
            address: 0xaa.into(),
            endpoint: 0xbb.into(),
            ..Default::default()
        };
        assert_eq!(f.as_slice()[16], 0xaa);
        assert_eq!(f.as_slice()[8], 0xbb);
    }

    #[test]
    fn config_bypass_is_at_offset_0x24() {
        let cfg = VirtioIommuConfig {
            bypass: 1,
            ..Default::default()
        };
        assert_eq!(cfg.as_slice()[CONFIG_BYPASS_OFFSET], 1);
    }
}
