// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The messages of a connection past HELLO: translations, fault reports,
//! acknowledgements and queries. An error ends the connection with a BYE
//! carrying the returned reason.

use std::sync::Arc;

use viommu::{
    pgtable::PageAccess,
    table::{TableFault, TableTranslateError},
    translate::{fault_flag, TranslateError},
    wire::*,
    Access, Fault,
};
use viommu_protocol::{
    messages::{CallResult, Extent, FaultInfo, ReportFault, Translate, Translation},
    Message, FAULT_F_EXEC, FAULT_F_PAGE_REQUEST, FAULT_F_PASID, FAULT_F_PRIV, FAULT_F_READ,
    FAULT_F_RECOVERABLE, FAULT_F_WRITE, RESULT_INVALID, RESULT_NO_SUCH_ENDPOINT, RESULT_OK,
    RESULT_UNSUPPORTED, TRANSLATE_F_EXEC, TRANSLATE_F_PAGE_REQUEST, TRANSLATE_F_PRIV,
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
        // Handled by the server, which owns the descriptors and the loop.
        Message::AttachFaultQueue(_) => unreachable!("ATTACH_FAULT_QUEUE reaches the server"),
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

/// Most pages one table translation returns; a longer range is answered
/// with its first pages and the client asks again for the rest.
const MAX_TABLE_EXTENTS: usize = 512;

fn translate(iommu: &Iommu, client: &Arc<Client>, t: &Translate) {
    let access = if t.flags & TRANSLATE_F_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    };
    let mut ranges = Vec::new();
    let model = iommu.model();
    if t.pasid != 0 || model.table_for(t.endpoint, 0).is_some() {
        let raise = translate_table(iommu, client, t, &model);
        drop(model);
        // The FAULT reply is queued: the page request's answer, whenever
        // it comes, follows it on the connection.
        if let Some((address, access)) = raise {
            let source = iommu.client_source(client);
            iommu.raise_fault(source, t.tag, t.endpoint, t.pasid, address, access);
        }
        return;
    }
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
            no_such_endpoint(client, t.tag, ep);
            None
        }
        Err(TranslateError::Fault(f)) => {
            let info = FaultInfo {
                reason: f.reason,
                flags: fault_flag(access),
                endpoint: f.endpoint,
                pasid: 0,
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

/// A translation through a guest table (with a PASID, or for an endpoint
/// whose domain holds a table): one walk per page, served from and added
/// to the daemon's cache under the model's read lock, so an invalidation
/// (under the write lock) can never interleave with it. Returns the page
/// and access of a page request to raise (`TRANSLATE_F_PAGE_REQUEST`
/// and a fault the guest can fix at the first page asked for).
fn translate_table(
    iommu: &Iommu,
    client: &Client,
    t: &Translate,
    model: &viommu::Viommu,
) -> Option<(u64, PageAccess)> {
    let access = PageAccess {
        write: t.flags & TRANSLATE_F_WRITE != 0,
        execute: t.flags & TRANSLATE_F_EXEC != 0,
        privileged: t.flags & TRANSLATE_F_PRIV != 0,
    };
    let Some(mem) = iommu.memory() else {
        client.queue(
            &CallResult {
                tag: t.tag,
                status: RESULT_UNSUPPORTED,
                message: "no guest memory yet: the frontend has not connected".into(),
            }
            .into(),
        );
        return None;
    };
    let guard = vm_memory::GuestAddressSpace::memory(&mem);
    let end = t.iova.saturating_add(t.len.max(1) - 1);
    let mut extents = Vec::new();
    let mut va = t.iova;
    let mut iotlb = iommu.iotlb();
    let fault = loop {
        let found = match iotlb.lookup(t.endpoint, t.pasid, va, access) {
            Some(hit) => Ok(hit),
            None => model
                .translate_table(&*guard, t.endpoint, t.pasid, va, access)
                .map(|tr| {
                    iotlb.insert(t.endpoint, t.pasid, access.privileged, tr.domain, tr.page);
                    (tr.domain, tr.page)
                }),
        };
        match found {
            Ok((domain, page)) => {
                let e = Extent::from_page(&page, domain);
                let last = e.iova_end;
                extents.push(e);
                if last >= end || extents.len() >= MAX_TABLE_EXTENTS {
                    break None;
                }
                va = last + 1;
            }
            Err(e) => break Some(e),
        }
    };
    drop(iotlb);
    match fault {
        Some(TableTranslateError::NoSuchEndpoint(ep)) if extents.is_empty() => {
            no_such_endpoint(client, t.tag, ep)
        }
        Some(TableTranslateError::Fault(f)) if extents.is_empty() => {
            let mut fault = table_fault_info(&f);
            let raise = t.flags & TRANSLATE_F_PAGE_REQUEST != 0 && f.reason.is_recoverable();
            if raise {
                fault.flags |= FAULT_F_PAGE_REQUEST;
            }
            client.queue(&viommu_protocol::messages::Fault { tag: t.tag, fault }.into());
            return raise.then_some((f.address, f.access));
        }
        // The pages that translate; after a fault past them, the client
        // asks again from the faulting address and gets the fault then.
        _ => {
            client.queue(
                &Translation {
                    tag: t.tag,
                    extents,
                }
                .into(),
            );
        }
    }
    None
}

fn no_such_endpoint(client: &Client, tag: u32, endpoint: u32) {
    client.queue(
        &CallResult {
            tag,
            status: RESULT_NO_SUCH_ENDPOINT,
            message: format!("endpoint {endpoint} does not exist"),
        }
        .into(),
    );
}

/// How a table fault travels: MAPPING, with the access, the PASID, and
/// whether the guest could fix it.
fn table_fault_info(f: &TableFault) -> FaultInfo {
    let mut flags = if f.access.write {
        FAULT_F_WRITE
    } else {
        FAULT_F_READ
    };
    if f.access.execute {
        flags |= FAULT_F_EXEC;
    }
    if f.access.privileged {
        flags |= FAULT_F_PRIV;
    }
    if f.pasid != 0 {
        flags |= FAULT_F_PASID;
    }
    if f.reason.is_recoverable() {
        flags |= FAULT_F_RECOVERABLE;
    }
    FaultInfo {
        reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
        flags,
        endpoint: f.endpoint,
        pasid: f.pasid,
        address: f.address,
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
