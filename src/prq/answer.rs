// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What goes back to sources: a group's one answer, who decided it and
//! why, the PASID reference a group holds until its answer has been sent,
//! and the guest's PAGE_RESP that names a group.

use crate::{error::RequestError, wire::*};

use super::{GroupKey, SourceId};

/// A page-request group's response code (PAGE_RESP `code`; Linux
/// `IOMMU_PAGE_RESP_*`; the PCIe PRG response codes Success, Invalid
/// Request and Response Failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    /// The pages are mapped: the device retries its accesses.
    Success = 0,
    /// The pages cannot be mapped: the device must not retry them.
    Invalid = 1,
    /// Fatal: the device stops issuing page requests until reset. iommufd
    /// cannot pass it on (it knows only SUCCESS and INVALID).
    Failure = 2,
}

impl ResponseCode {
    /// Every code, in wire order.
    pub const ALL: [ResponseCode; 3] = [
        ResponseCode::Success,
        ResponseCode::Invalid,
        ResponseCode::Failure,
    ];

    /// The code of a PAGE_RESP `code` field, if it is one.
    pub fn from_wire(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.wire() == code)
    }

    /// The PAGE_RESP `code` field.
    pub fn wire(self) -> u16 {
        self as u16
    }

    /// Name for logs and the control plane.
    pub fn name(self) -> &'static str {
        match self {
            ResponseCode::Success => "success",
            ResponseCode::Invalid => "invalid",
            ResponseCode::Failure => "failure",
        }
    }
}

/// Why the device answered a group itself. Automatic answers are always
/// [`ResponseCode::Invalid`]: the device does not retry, nothing is fatal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AutoCause {
    /// The event queue had no buffer for the group.
    NoBuffer,
    /// The event queue's buffer was smaller than a 48-byte record.
    BufferTooSmall,
    /// The driver did not negotiate `VIRTIO_IOMMU_F_PAGE_REQUEST`.
    NotNegotiated,
    /// The endpoint was detached (DETACH, or ATTACH to another domain).
    Detached,
    /// DETACH_TABLE removed the (endpoint, PASID) binding.
    Unbound,
    /// PASID_FREE freed the PASID.
    PasidFreed,
    /// Device reset.
    Reset,
    /// The vhost-user frontend went away.
    FrontendLost,
    /// A limit was reached: groups per endpoint or in all, partial groups,
    /// or requests per group.
    Overflow,
    /// The guest did not answer within the response timeout.
    Timeout,
    /// A group with the same key was already in flight.
    Duplicate,
    /// The group's PASID reference could not be taken (no binding, PASID
    /// inactive), or the daemon refused the group for a reason of its own.
    Refused,
}

impl AutoCause {
    /// Every cause, in counter order.
    pub const ALL: [AutoCause; 12] = [
        AutoCause::NoBuffer,
        AutoCause::BufferTooSmall,
        AutoCause::NotNegotiated,
        AutoCause::Detached,
        AutoCause::Unbound,
        AutoCause::PasidFreed,
        AutoCause::Reset,
        AutoCause::FrontendLost,
        AutoCause::Overflow,
        AutoCause::Timeout,
        AutoCause::Duplicate,
        AutoCause::Refused,
    ];

    /// Name for logs and the control plane.
    pub fn name(self) -> &'static str {
        match self {
            AutoCause::NoBuffer => "no-buffer",
            AutoCause::BufferTooSmall => "buffer-too-small",
            AutoCause::NotNegotiated => "not-negotiated",
            AutoCause::Detached => "detached",
            AutoCause::Unbound => "unbound",
            AutoCause::PasidFreed => "pasid-freed",
            AutoCause::Reset => "reset",
            AutoCause::FrontendLost => "frontend-lost",
            AutoCause::Overflow => "overflow",
            AutoCause::Timeout => "timeout",
            AutoCause::Duplicate => "duplicate",
            AutoCause::Refused => "refused",
        }
    }
}

/// Who decided a group's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The guest's PAGE_RESP, with its code.
    Guest(ResponseCode),
    /// The device, for this reason; the code is INVALID.
    Auto(AutoCause),
}

/// The daemon's PASID allocator as page-request groups use it. A group
/// with a PASID holds one reference on it from its LAST request until its
/// answer has been sent, so the PASID is not reused while a request that
/// carries it is in flight.
pub trait PasidRefs {
    /// Takes a reference on `pasid` of `endpoint` for a new group. `None`
    /// refuses the group (no binding, PASID inactive): it is answered
    /// INVALID at once. `Some(handle)`: the reference is taken; the
    /// handle (the host PASID, say) comes back to [`PasidRefs::release`],
    /// which then needs no look-up that may have changed meanwhile.
    fn take(&mut self, endpoint: u32, pasid: u32) -> Option<u64>;

    /// Drops a reference [`PasidRefs::take`] took.
    fn release(&mut self, endpoint: u32, pasid: u32, handle: u64);
}

/// A group's reference on its PASID. It can only be given back, once,
/// through [`PasidRef::release`]; dropping it instead leaks the reference
/// and logs an error.
#[must_use = "release the PASID reference with `PasidRef::release`"]
#[derive(Debug, PartialEq, Eq)]
pub struct PasidRef {
    endpoint: u32,
    pasid: u32,
    handle: u64,
}

impl PasidRef {
    pub(super) fn new(endpoint: u32, pasid: u32, handle: u64) -> Self {
        PasidRef {
            endpoint,
            pasid,
            handle,
        }
    }

    /// Endpoint of the referenced PASID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The referenced PASID.
    pub fn pasid(&self) -> u32 {
        self.pasid
    }

    /// Drops the reference.
    pub fn release(self, refs: &mut impl PasidRefs) {
        refs.release(self.endpoint, self.pasid, self.handle);
        // Released: the leak report of `Drop` does not apply.
        std::mem::forget(self);
    }
}

impl Drop for PasidRef {
    fn drop(&mut self) {
        log::error!(
            "page-request group leaked its reference on PASID {} of endpoint {}",
            self.pasid,
            self.endpoint
        );
    }
}

/// A group's one answer, for the source that raised it. Send it (to the
/// iommufd fault queue as `(token, code)`, or to the client), then call
/// [`Answer::finish`]: the group's PASID reference is dropped only once
/// the answer is on its way, never before.
#[must_use = "send the answer to its source, then call `Answer::finish`"]
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// The source that raised the group.
    pub source: SourceId,
    /// The source's token for the group.
    pub token: u64,
    /// The group.
    pub key: GroupKey,
    /// Who decided the answer, and why.
    pub cause: Cause,
    /// The group's PASID reference, if it holds one (groups answered
    /// before they were stored hold none).
    pub(super) hold: Option<PasidRef>,
}

impl Answer {
    /// The response code for the source.
    pub fn code(&self) -> ResponseCode {
        match self.cause {
            Cause::Guest(code) => code,
            Cause::Auto(_) => ResponseCode::Invalid,
        }
    }

    /// Whether the group holds a PASID reference that `finish` drops.
    pub fn holds_pasid(&self) -> bool {
        self.hold.is_some()
    }

    /// Ends the group once its answer has been sent: drops its PASID
    /// reference, if any.
    pub fn finish(self, refs: &mut impl PasidRefs) {
        if let Some(hold) = self.hold {
            hold.release(refs);
        }
    }
}

/// Reads a PAGE_RESP: the group it names and the code. Flags other than
/// PASID_VALID, non-zero reserved bytes, a PASID without PASID_VALID and
/// unknown codes are refused (`S_INVAL`).
pub fn read_page_resp(req: &PageRespReq) -> Result<(GroupKey, ResponseCode), RequestError> {
    let flags = req.flags.to_native();
    if flags & !VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID != 0 {
        return Err(RequestError::UnknownFlags(
            flags & !VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID,
        ));
    }
    let pasid = req.pasid.to_native();
    let pasid_valid = flags & VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID != 0;
    // Without PASID_VALID the pasid field is reserved.
    if req.reserved != [0; 8] || (!pasid_valid && pasid != 0) {
        return Err(RequestError::ReservedNotZero);
    }
    let code = req.code.to_native();
    let code = ResponseCode::from_wire(code).ok_or(RequestError::UnknownResponseCode(code))?;
    let key = GroupKey {
        endpoint: req.endpoint.to_native(),
        pasid: pasid_valid.then_some(pasid),
        group_id: req.group_id.to_native(),
    };
    Ok((key, code))
}
