// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The messages of a connection past HELLO: translations, fault reports,
//! acknowledgements and queries. An error ends the connection with a BYE
//! carrying the returned reason.

use std::sync::Arc;

use viommu::{
    translate::{fault_flag, TranslateError},
    wire::*,
    Access, Fault,
};
use viommu_protocol::{
    messages::{CallResult, FaultInfo, ReportFault, Translate, Translation},
    Message, FAULT_F_READ, FAULT_F_WRITE, RESULT_INVALID, RESULT_NO_SUCH_ENDPOINT, RESULT_OK,
    TRANSLATE_F_REPORT_FAULT, TRANSLATE_F_WRITE,
};

use super::queries::QueryThread;
use crate::{hub::Client, iommu::Iommu};

/// Acts on one message of an active client.
pub(super) fn handle(
    iommu: &Iommu,
    queries: &QueryThread,
    client: &Arc<Client>,
    msg: Message,
) -> Result<(), String> {
    match msg {
        Message::Translate(t) => translate(iommu, client, &t),
        Message::ReportFault(ReportFault { tag, fault }) => {
            let (status, message) = report_fault(iommu, &fault);
            client.queue(
                &CallResult {
                    tag,
                    status,
                    message,
                }
                .into(),
            );
        }
        Message::Ack(a) => {
            if client.acked(a.seq) {
                iommu.hub().notify_acked();
            }
        }
        Message::Query(q) => queries.submit(client.clone(), q),
        Message::Hello(_) => return Err("HELLO twice".into()),
        other => {
            return Err(format!(
                "message type {:#x} is not a request",
                other.type_code()
            ))
        }
    }
    Ok(())
}

fn translate(iommu: &Iommu, client: &Client, t: &Translate) {
    let access = if t.flags & TRANSLATE_F_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    };
    let mut ranges = Vec::new();
    let model = iommu.model();
    let result = model.translate_range(t.endpoint, t.iova, t.len, access, &mut ranges);
    // Queued under the read lock: a reply can never be queued after the
    // invalidation of the change that makes it stale.
    let fault = match result {
        Ok(()) => {
            client.queue(
                &Translation {
                    tag: t.tag,
                    extents: ranges.into_iter().map(Into::into).collect(),
                }
                .into(),
            );
            None
        }
        Err(TranslateError::NoSuchEndpoint(ep)) => {
            client.queue(
                &CallResult {
                    tag: t.tag,
                    status: RESULT_NO_SUCH_ENDPOINT,
                    message: format!("endpoint {ep} does not exist"),
                }
                .into(),
            );
            None
        }
        Err(TranslateError::Fault(f)) => {
            let info = FaultInfo {
                reason: f.reason,
                flags: fault_flag(access),
                endpoint: f.endpoint,
                address: f.address,
            };
            client.queue(
                &viommu_protocol::messages::Fault {
                    tag: t.tag,
                    fault: info,
                }
                .into(),
            );
            Some(f)
        }
    };
    drop(model);
    if let Some(f) = fault.filter(|_| t.flags & TRANSLATE_F_REPORT_FAULT != 0) {
        iommu.post_event(&f.record_bytes());
    }
}

fn report_fault(iommu: &Iommu, f: &FaultInfo) -> (u32, String) {
    if f.reason > VIRTIO_IOMMU_FAULT_R_MAPPING {
        return (RESULT_INVALID, format!("unknown fault reason {}", f.reason));
    }
    if f.flags & !(FAULT_F_READ | FAULT_F_WRITE) != 0 {
        return (
            RESULT_INVALID,
            format!("unknown fault flags {:#x}", f.flags),
        );
    }
    if !iommu.model().config().endpoints.contains(f.endpoint) {
        return (
            RESULT_NO_SUCH_ENDPOINT,
            format!("endpoint {} does not exist", f.endpoint),
        );
    }
    let access = if f.flags & FAULT_F_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    };
    let mut fault = Fault::new(f.reason, f.endpoint, f.address, access);
    if f.flags & (FAULT_F_READ | FAULT_F_WRITE) == 0 {
        fault.flags &= !(VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE);
    }
    iommu.post_event(&fault.record_bytes());
    (RESULT_OK, String::new())
}
