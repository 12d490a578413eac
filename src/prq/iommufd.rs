// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page requests from a host iommufd fault queue, in the guest's terms:
//! a record names a host device and a host PASID, the guest knows an
//! endpoint and its own PASID; the group's answer goes back by cookie,
//! with the two codes iommufd knows.

use thiserror::Error;

use super::{PageAccess, PageRequest, ResponseCode, SourceId};
use crate::wire::*;

/// Why a fault-queue record cannot be forwarded to the guest. The
/// record's group (at its LAST record) is answered INVALID at once.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Unroutable {
    /// The queue's owner did not name this device.
    #[error("device {0} is not routed to an endpoint")]
    UnknownDevice(u32),
    /// The host PASID is not one of this VM's.
    #[error("host PASID {0} is not a PASID of this VM")]
    UnknownPasid(u32),
    /// A group index beyond what the guest's PAGE_RESP can name.
    #[error("group index {0} does not fit 16 bits")]
    GroupId(u32),
}

/// The page request `record` makes for the guest, through the queue's
/// device routes and the host-to-guest PASID map.
pub fn page_request(
    record: &HwptPgfault,
    source: SourceId,
    endpoint_of: impl Fn(u32) -> Option<u32>,
    guest_pasid: impl Fn(u32) -> Option<u32>,
) -> Result<PageRequest, Unroutable> {
    let flags = record.flags.to_native();
    let dev_id = record.dev_id.to_native();
    let endpoint = endpoint_of(dev_id).ok_or(Unroutable::UnknownDevice(dev_id))?;
    let pasid = if flags & IOMMU_PGFAULT_FLAGS_PASID_VALID != 0 {
        let host = record.pasid.to_native();
        Some(guest_pasid(host).ok_or(Unroutable::UnknownPasid(host))?)
    } else {
        None
    };
    let grpid = record.grpid.to_native();
    let group_id = u16::try_from(grpid).map_err(|_| Unroutable::GroupId(grpid))?;
    Ok(PageRequest {
        source,
        token: u64::from(record.cookie.to_native()),
        key: super::GroupKey {
            endpoint,
            pasid,
            group_id,
        },
        address: record.addr.to_native(),
        access: PageAccess::from_bits(record.perm.to_native()),
        last: flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0,
        private_data: None,
    })
}

/// Whether `record` ends its group: only then is something owed.
pub fn is_last(record: &HwptPgfault) -> bool {
    record.flags.to_native() & IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0
}

/// The response to write for a group. iommufd knows SUCCESS and INVALID
/// only: a guest's FAILURE becomes INVALID (the device does not retry).
pub fn response(cookie: u32, code: ResponseCode) -> HwptPageResponse {
    let code = match code {
        ResponseCode::Success => IOMMUFD_PAGE_RESP_SUCCESS,
        ResponseCode::Invalid | ResponseCode::Failure => IOMMUFD_PAGE_RESP_INVALID,
    };
    HwptPageResponse {
        cookie: cookie.into(),
        code: code.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(flags: u32, dev_id: u32, pasid: u32, grpid: u32) -> HwptPgfault {
        HwptPgfault {
            flags: flags.into(),
            dev_id: dev_id.into(),
            pasid: pasid.into(),
            grpid: grpid.into(),
            perm: (VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE).into(),
            addr: 0x7f00_0000_1234.into(),
            cookie: 77.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_record_becomes_the_guests_request_with_its_cookie_as_token() {
        let r = record(
            IOMMU_PGFAULT_FLAGS_PASID_VALID | IOMMU_PGFAULT_FLAGS_LAST_PAGE,
            3,
            0x55,
            9,
        );
        let req = page_request(
            &r,
            SourceId(4),
            |d| (d == 3).then_some(0x28),
            |p| (p == 0x55).then_some(0x55),
        )
        .unwrap();
        assert_eq!(req.source, SourceId(4));
        assert_eq!(req.token, 77);
        assert_eq!(
            (req.key.endpoint, req.key.pasid, req.key.group_id),
            (0x28, Some(0x55), 9)
        );
        assert!(req.last && req.access.read && req.access.write && !req.access.exec);
        assert_eq!(req.address, 0x7f00_0000_1234);
        assert!(is_last(&r));
    }

    #[test]
    fn unknown_devices_pasids_and_wide_group_indexes_are_unroutable() {
        let any = |_| Some(1);
        let none = |_| None;
        let r = record(IOMMU_PGFAULT_FLAGS_PASID_VALID, 3, 5, 1);
        assert_eq!(
            page_request(&r, SourceId(0), none, any),
            Err(Unroutable::UnknownDevice(3))
        );
        assert_eq!(
            page_request(&r, SourceId(0), any, none),
            Err(Unroutable::UnknownPasid(5))
        );
        let wide = record(0, 3, 0, 1 << 16);
        assert_eq!(
            page_request(&wide, SourceId(0), any, none),
            Err(Unroutable::GroupId(1 << 16))
        );
        // Without PASID_VALID the PASID field is not looked at.
        let plain = record(0, 3, 5, 1);
        assert_eq!(
            page_request(&plain, SourceId(0), any, none)
                .unwrap()
                .key
                .pasid,
            None
        );
    }

    #[test]
    fn iommufd_knows_two_codes_so_failure_is_invalid() {
        let code = |c| response(1, c).code.to_native();
        assert_eq!(code(ResponseCode::Success), IOMMUFD_PAGE_RESP_SUCCESS);
        assert_eq!(code(ResponseCode::Invalid), IOMMUFD_PAGE_RESP_INVALID);
        assert_eq!(code(ResponseCode::Failure), IOMMUFD_PAGE_RESP_INVALID);
    }
}
