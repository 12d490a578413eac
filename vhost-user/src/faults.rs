// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where page requests come from and where their answers go back: device
//! models on control connections (a TRANSLATE that raised a page
//! request) and host iommufd fault queues a VMM attached
//! (ATTACH_FAULT_QUEUE). Each source has a [`SourceId`] and a [`Route`];
//! the device model's queue decides the answers (`viommu::prq`), this
//! module delivers them.
//!
//! A fault queue is the descriptor of an iommufd `IOMMU_FAULT_QUEUE_ALLOC`
//! (or anything speaking its record formats: 40-byte
//! `iommu_hwpt_pgfault` records in, 8-byte `iommu_hwpt_page_response`
//! answers out, by cookie). It belongs to the control connection that
//! attached it and ends with it.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Arc, Weak},
};

use nix::{
    errno::Errno,
    fcntl::{fcntl, FcntlArg, OFlag},
};
use thiserror::Error;
use viommu::{
    prq::{iommufd, ResponseCode, SourceId},
    wire::HwptPgfault,
};
use viommu_protocol::messages::DeviceRoute;
use vm_memory::ByteValued;

use crate::hub::Client;

/// Fault queues attached at once, over all connections.
pub const MAX_FAULT_QUEUES: usize = 16;
/// Devices one fault queue may route.
pub const MAX_QUEUE_DEVICES: usize = 1024;
/// Bytes of one fault-queue record.
pub const RECORD_SIZE: usize = std::mem::size_of::<HwptPgfault>();
/// Records read from a queue per turn of the control loop, so one busy
/// queue cannot starve the other peers.
pub const READ_BATCH: usize = 64;

/// Where the answers of a source's groups go.
#[derive(Clone)]
pub(crate) enum Route {
    /// A control client: PAGE_RESPONSE with the TRANSLATE's tag.
    Client(Weak<Client>),
    /// A host fault queue: a response record with the group's cookie.
    Queue(Arc<FaultQueue>),
}

/// The registry of sources.
#[derive(Default)]
pub(crate) struct Sources {
    next: u32,
    routes: HashMap<SourceId, Route>,
    clients: HashMap<u64, SourceId>,
    queues: usize,
}

impl Sources {
    fn allocate(&mut self) -> SourceId {
        // IDs are not reused while their source lives: skip live ones.
        loop {
            let id = SourceId(self.next);
            self.next = self.next.wrapping_add(1);
            if !self.routes.contains_key(&id) {
                return id;
            }
        }
    }

    /// The source of `client`'s page requests, made on first use.
    pub(crate) fn client(&mut self, client: &Arc<Client>) -> SourceId {
        if let Some(&id) = self.clients.get(&client.id) {
            return id;
        }
        let id = self.allocate();
        self.routes
            .insert(id, Route::Client(Arc::downgrade(client)));
        self.clients.insert(client.id, id);
        id
    }

    /// Registers a fault queue made by `make` with its new source ID.
    pub(crate) fn add_queue(
        &mut self,
        make: impl FnOnce(SourceId) -> Result<FaultQueue, QueueError>,
    ) -> Result<Arc<FaultQueue>, QueueError> {
        if self.queues >= MAX_FAULT_QUEUES {
            return Err(QueueError::TooMany);
        }
        let id = self.allocate();
        let queue = Arc::new(make(id)?);
        self.routes.insert(id, Route::Queue(queue.clone()));
        self.queues += 1;
        Ok(queue)
    }

    /// Where the answers of `source` go, while it lives.
    pub(crate) fn route(&self, source: SourceId) -> Option<Route> {
        self.routes.get(&source).cloned()
    }

    /// Forgets a source; returns whether it was there.
    pub(crate) fn remove(&mut self, source: SourceId) -> bool {
        match self.routes.remove(&source) {
            Some(Route::Queue(_)) => {
                self.queues -= 1;
                true
            }
            Some(Route::Client(_)) => {
                self.clients.retain(|_, s| *s != source);
                true
            }
            None => false,
        }
    }

    /// The source of a client that disconnected, if it raised any page
    /// request, and the fault queues it attached.
    pub(crate) fn client_gone(&mut self, client_id: u64) -> Vec<SourceId> {
        let mut gone: Vec<SourceId> = self
            .routes
            .iter()
            .filter_map(|(&id, r)| match r {
                Route::Queue(q) if q.owner == client_id => Some(id),
                _ => None,
            })
            .collect();
        gone.extend(self.clients.get(&client_id));
        for &id in &gone {
            self.remove(id);
        }
        gone
    }

    /// Fault queues attached.
    pub(crate) fn queues(&self) -> usize {
        self.queues
    }
}

/// Why ATTACH_FAULT_QUEUE was refused.
#[derive(Debug, Error)]
pub enum QueueError {
    /// No descriptor came with the message.
    #[error("no descriptor came with ATTACH_FAULT_QUEUE (send it with SCM_RIGHTS)")]
    NoDescriptor,
    /// Too many devices, or none.
    #[error("a fault queue routes 1 to {MAX_QUEUE_DEVICES} devices, not {0}")]
    DeviceCount(usize),
    /// A device named twice.
    #[error("device {0} is routed twice")]
    DuplicateDevice(u32),
    /// An endpoint the device does not have.
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(u32),
    /// Every slot is taken.
    #[error("{MAX_FAULT_QUEUES} fault queues are attached already")]
    TooMany,
    /// The descriptor cannot be used.
    #[error("the descriptor cannot be made non-blocking")]
    Descriptor(#[source] Errno),
}

/// One attached fault queue.
pub(crate) struct FaultQueue {
    fd: OwnedFd,
    /// iommufd device ID -> guest endpoint.
    devices: HashMap<u32, u32>,
    pub(crate) source: SourceId,
    /// The control client that attached it.
    pub(crate) owner: u64,
}

impl FaultQueue {
    /// Checks the routes and makes `fd` non-blocking (nothing may make
    /// the control loop wait on it).
    pub(crate) fn new(
        fd: OwnedFd,
        routes: &[DeviceRoute],
        endpoint_exists: impl Fn(u32) -> bool,
        owner: u64,
        source: SourceId,
    ) -> Result<Self, QueueError> {
        let devices = check_routes(routes, endpoint_exists)?;
        let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(QueueError::Descriptor)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags)).map_err(QueueError::Descriptor)?;
        Ok(FaultQueue {
            fd,
            devices,
            source,
            owner,
        })
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// The guest endpoint of iommufd device `dev_id`.
    pub(crate) fn endpoint_of(&self, dev_id: u32) -> Option<u32> {
        self.devices.get(&dev_id).copied()
    }

    /// Reads what the queue has into `buf`: `Ok(0)` when nothing is
    /// waiting (a kernel fault queue never ends; a stand-in that hangs
    /// up is seen as EPOLLHUP).
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.fd.as_fd(), buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(0),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes the answers of groups, by cookie: 8-byte records in one
    /// write, never blocking (the kernel's queue always takes them).
    pub(crate) fn respond(&self, responses: &[(u32, ResponseCode)]) -> io::Result<()> {
        let bytes: Vec<u8> = responses
            .iter()
            .flat_map(|&(cookie, code)| iommufd::response(cookie, code).as_slice().to_vec())
            .collect();
        loop {
            match nix::unistd::write(&self.fd, &bytes) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "a partial write ({n} of {} bytes)",
                        bytes.len()
                    )))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The device routes of ATTACH_FAULT_QUEUE, checked.
fn check_routes(
    routes: &[DeviceRoute],
    endpoint_exists: impl Fn(u32) -> bool,
) -> Result<HashMap<u32, u32>, QueueError> {
    if routes.is_empty() || routes.len() > MAX_QUEUE_DEVICES {
        return Err(QueueError::DeviceCount(routes.len()));
    }
    let mut devices = HashMap::with_capacity(routes.len());
    for r in routes {
        if !endpoint_exists(r.endpoint) {
            return Err(QueueError::NoSuchEndpoint(r.endpoint));
        }
        if devices.insert(r.dev_id, r.endpoint).is_some() {
            return Err(QueueError::DuplicateDevice(r.dev_id));
        }
    }
    Ok(devices)
}

/// Splits what was read from a queue into whole records; a trailing
/// partial record stays in `buf` for the next read (a kernel queue never
/// leaves one; a stream stand-in may).
pub(crate) fn take_records(buf: &mut Vec<u8>) -> Vec<HwptPgfault> {
    let whole = buf.len() / RECORD_SIZE * RECORD_SIZE;
    let records = buf[..whole]
        .chunks_exact(RECORD_SIZE)
        .map(|c| {
            let mut r = HwptPgfault::default();
            r.as_mut_slice().copy_from_slice(c);
            r
        })
        .collect();
    buf.drain(..whole);
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_existing_endpoints_once_each() {
        let route = |dev_id, endpoint| DeviceRoute { dev_id, endpoint };
        let exists = |ep| ep < 0x100;
        assert_eq!(
            check_routes(&[route(1, 0x28), route(2, 0x30)], exists).unwrap()[&2],
            0x30
        );
        assert!(matches!(
            check_routes(&[], exists),
            Err(QueueError::DeviceCount(0))
        ));
        assert!(matches!(
            check_routes(&[route(1, 0x28), route(1, 0x30)], exists),
            Err(QueueError::DuplicateDevice(1))
        ));
        assert!(matches!(
            check_routes(&[route(1, 0x1000)], exists),
            Err(QueueError::NoSuchEndpoint(0x1000))
        ));
    }

    #[test]
    fn partial_records_wait_for_the_rest() {
        let mut buf = vec![0u8; RECORD_SIZE * 2 + 7];
        buf[RECORD_SIZE + 36] = 9; // the second record's cookie
        let records = take_records(&mut buf);
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].cookie.to_native(), 9);
        assert_eq!(buf.len(), 7);
    }

    #[test]
    fn a_source_id_is_not_reused_while_its_source_lives() {
        let mut s = Sources {
            next: u32::MAX,
            ..Default::default()
        };
        let a = s.allocate();
        s.routes.insert(a, Route::Client(Weak::new()));
        s.next = a.0;
        assert_ne!(s.allocate(), a);
    }
}
