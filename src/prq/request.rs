// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What sources raise: page requests, the key that gathers them into
//! groups, and the event records a complete group becomes on the guest's
//! event queue.

use std::fmt;

use crate::wire::*;

/// A source of page requests: one client connection of a device model, or
/// one host iommufd fault queue. The daemon numbers its sources; the queue
/// only compares them, to route answers and to refuse mixing two sources'
/// requests in one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u32);

/// The guest-visible name of a page-request group: what its events carry
/// and what the guest's PAGE_RESP names. At most one group per key is in
/// flight at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    /// Endpoint that issued the requests.
    pub endpoint: u32,
    /// Guest-visible PASID of the requests; `None` for requests without
    /// one. A PAGE_RESP matches only with the same PASID (or with none),
    /// so the device should set `VIRTIO_IOMMU_PROBE_PAGE_REQUEST_F_RESP_PASID`.
    pub pasid: Option<u32>,
    /// Page request group index (PCIe PRGI: 9 bits; SMMU stall tag: 16).
    pub group_id: u16,
}

impl GroupKey {
    /// Smallest and largest keys of `endpoint`, PASID-less groups first.
    pub(super) fn of_endpoint(endpoint: u32) -> (GroupKey, GroupKey) {
        (
            GroupKey {
                endpoint,
                pasid: None,
                group_id: 0,
            },
            GroupKey {
                endpoint,
                pasid: Some(u32::MAX),
                group_id: u16::MAX,
            },
        )
    }

    /// Smallest and largest keys of `pasid` on `endpoint`.
    pub(super) fn of_pasid(endpoint: u32, pasid: u32) -> (GroupKey, GroupKey) {
        let key = |group_id| GroupKey {
            endpoint,
            pasid: Some(pasid),
            group_id,
        };
        (key(0), key(u16::MAX))
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "endpoint {}", self.endpoint)?;
        if let Some(pasid) = self.pasid {
            write!(f, " PASID {pasid}")?;
        }
        write!(f, " group {}", self.group_id)
    }
}

/// The access a page request asks the guest to make possible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageAccess {
    /// Read access.
    pub read: bool,
    /// Write access.
    pub write: bool,
    /// Instruction fetch.
    pub exec: bool,
    /// Privileged (supervisor) access.
    pub privileged: bool,
}

impl PageAccess {
    /// From permission bits laid out like the extended fault record's
    /// flags (READ 1<<0, WRITE 1<<1, EXEC 1<<2, PRIVILEGED 1<<3), a layout
    /// iommufd's `perm` shares. Other bits are ignored.
    pub fn from_bits(bits: u32) -> Self {
        PageAccess {
            read: bits & VIRTIO_IOMMU_FAULT_F_READ != 0,
            write: bits & VIRTIO_IOMMU_FAULT_F_WRITE != 0,
            exec: bits & VIRTIO_IOMMU_FAULT_F_EXEC != 0,
            privileged: bits & VIRTIO_IOMMU_FAULT_F_PRIVILEGED != 0,
        }
    }

    /// As extended fault record flags.
    pub fn bits(self) -> u32 {
        flag(self.read, VIRTIO_IOMMU_FAULT_F_READ)
            | flag(self.write, VIRTIO_IOMMU_FAULT_F_WRITE)
            | flag(self.exec, VIRTIO_IOMMU_FAULT_F_EXEC)
            | flag(self.privileged, VIRTIO_IOMMU_FAULT_F_PRIVILEGED)
    }
}

/// One page request as its source reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Who raised it, and who gets the group's answer.
    pub source: SourceId,
    /// The source's own name for the group (an iommufd cookie, a client
    /// ticket), opaque here and handed back in the group's answer. Sources
    /// give every request of a group the same token; the group keeps its
    /// LAST request's.
    pub token: u64,
    /// The group the request belongs to.
    pub key: GroupKey,
    /// Address of the page (PCIe PRI requests name 4 KiB pages; the event
    /// carries the address with its low 12 bits cleared).
    pub address: u64,
    /// Requested access.
    pub access: PageAccess,
    /// Last request of its group: the group is complete and goes to the
    /// guest.
    pub last: bool,
    /// VT-d page-request private data, passed through to the guest.
    pub private_data: Option<[u64; 2]>,
}

impl PageRequest {
    /// A PASID stop marker (PCIe LRW = 100: LAST without read or write)
    /// only tells that the device sent all requests of a PASID. It raises
    /// no group and must not be answered (Linux `intel/prq.c` drops it
    /// the same way).
    pub fn is_stop_marker(&self) -> bool {
        self.last && !self.access.read && !self.access.write
    }
}

/// Low address bits a PRI page request does not carry.
const PRI_PAGE_OFFSET_MASK: u64 = 0xfff;

/// What a group keeps of each of its requests until it is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Record {
    address: u64,
    access: PageAccess,
    private_data: Option<[u64; 2]>,
}

impl From<&PageRequest> for Record {
    fn from(r: &PageRequest) -> Self {
        Record {
            address: r.address,
            access: r.access,
            private_data: r.private_data,
        }
    }
}

/// A complete group for the guest's event queue. Put all of its records
/// on the queue, one per buffer, or none (a driver that sees part of a
/// group waits for a LAST that never comes); then hand the delivery back
/// with [`PageRequests::delivered`] or [`PageRequests::undeliverable`].
///
/// [`PageRequests::delivered`]: super::PageRequests::delivered
/// [`PageRequests::undeliverable`]: super::PageRequests::undeliverable
#[must_use = "put the records on the event queue, then call `delivered` or `undeliverable`"]
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    pub(super) key: GroupKey,
    /// Tells this group from a later one with the same key.
    pub(super) serial: u64,
    pub(super) records: Vec<Record>,
}

impl Delivery {
    /// The group's key.
    pub fn key(&self) -> GroupKey {
        self.key
    }

    /// Event buffers the group needs: one per request.
    pub fn buffers_needed(&self) -> usize {
        self.records.len()
    }

    /// The group's requests as 48-byte event records, in arrival order;
    /// only the last one has `VIRTIO_IOMMU_FAULT_F_LAST`.
    pub fn records(&self) -> impl ExactSizeIterator<Item = FaultRecordExt> + '_ {
        let last = self.records.len().saturating_sub(1);
        self.records
            .iter()
            .enumerate()
            .map(move |(i, record)| encode(self.key, record, i == last))
    }
}

/// The page-request encoding of the extension profile (reference
/// `virtio-iommu.md` §2.12): reason R_MAPPING, PAGE_REQ | ADDRESS |
/// GROUP_ID always, PASID, LAST and PRIV_DATA when they apply, and the
/// requested access.
fn encode(key: GroupKey, record: &Record, last: bool) -> FaultRecordExt {
    let flags = VIRTIO_IOMMU_FAULT_F_PAGE_REQ
        | VIRTIO_IOMMU_FAULT_F_ADDRESS
        | VIRTIO_IOMMU_FAULT_F_GROUP_ID
        | record.access.bits()
        | flag(last, VIRTIO_IOMMU_FAULT_F_LAST)
        | flag(key.pasid.is_some(), VIRTIO_IOMMU_FAULT_F_PASID)
        | flag(
            record.private_data.is_some(),
            VIRTIO_IOMMU_FAULT_F_PRIV_DATA,
        );
    let [data0, data1] = record.private_data.unwrap_or_default();
    FaultRecordExt {
        reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
        flags: flags.into(),
        endpoint: key.endpoint.into(),
        pasid: key.pasid.unwrap_or(0).into(),
        address: (record.address & !PRI_PAGE_OFFSET_MASK).into(),
        group_id: key.group_id.into(),
        private_data0: data0.into(),
        private_data1: data1.into(),
        ..Default::default()
    }
}

/// `bit` when `on`.
fn flag(on: bool, bit: u32) -> u32 {
    if on {
        bit
    } else {
        0
    }
}
