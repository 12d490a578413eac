// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user backend: connects the `viommu` device model to the
//! request and event virtqueues and to the config space.
//!
//! Nothing a guest sends can end the connection: malformed requests are
//! logged and completed with used length 0, refused ones with a status.
//! Callbacks return `Err` only for conditions that really are fatal for
//! the connection (vhost-user-backend closes it on any `Err`).

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use viommu::{device::Response, wire::CONFIG_BYPASS_OFFSET, DeviceConfig, Viommu};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use crate::{
    chain::Request,
    control::Hub,
    eventq::{EventQueue, EventStats},
    pasid_manager::PasidService,
};

pub const REQUEST_QUEUE: u16 = 0;
pub const EVENT_QUEUE: u16 = 1;
pub const NUM_QUEUES: usize = 2;
pub const MAX_QUEUE_SIZE: usize = 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Runtime options of the backend that are not part of the device model.
#[derive(Clone, Copy, Debug)]
pub struct BackendOptions {
    /// Keep checking the request queue for this long after a batch before
    /// sleeping on the kick eventfd; zero disables polling.
    pub poll: Duration,
    /// How long a control client may take to acknowledge an invalidation
    /// before it is disconnected and the guest's request completes.
    pub client_timeout: Duration,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            poll: Duration::from_micros(50),
            client_timeout: Duration::from_millis(100),
        }
    }
}

/// Request-queue bookkeeping used to tell a driver reset from a pause.
#[derive(Default)]
struct RequestQueueState {
    vring: Option<VringRwLock>,
    /// `next_avail` when the ring was last stopped on this connection.
    stopped_at: Option<u16>,
    buf: Request,
    /// Completions of the current batch, published once clients acked.
    used: Vec<(u16, u32)>,
}

/// The virtio-iommu vhost-user backend. The device model survives
/// reconnections; the rings and guest memory belong to one connection.
pub struct IommuBackend {
    model: RwLock<Viommu>,
    mem: RwLock<Option<Mem>>,
    events: Mutex<EventQueue>,
    requestq: Mutex<RequestQueueState>,

    options: BackendOptions,
    exit: Mutex<Option<(EventConsumer, EventNotifier)>>,
    hub: Arc<Hub>,
    connected: AtomicBool,
    pasids: RwLock<PasidService>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the device down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IommuBackend {
    pub fn new(config: DeviceConfig, options: BackendOptions) -> io::Result<Self> {
        config.validate().map_err(io::Error::other)?;
        Ok(IommuBackend {
            model: RwLock::new(Viommu::new(config)),
            mem: RwLock::new(None),
            events: Mutex::new(EventQueue::default()),
            requestq: Mutex::new(RequestQueueState {
                buf: Request::new(),
                ..Default::default()
            }),

            options,
            exit: Mutex::new(None),
            hub: Arc::new(Hub::new(options.client_timeout)),
            connected: AtomicBool::new(false),
            pasids: RwLock::new(PasidService::Disabled),
        })
    }

    /// Sets what the daemon does with PASIDs; in global mode the device
    /// then offers guest-visible PASID allocation.
    pub fn install_pasids(&self, service: PasidService) {
        if let PasidService::Global(shared) = &service {
            self.model_mut()
                .set_pasid_provider(Box::new(shared.clone()));
        }
        *self.pasids.write().unwrap_or_else(|e| e.into_inner()) = service;
    }

    /// A reset guest driver has forgotten the PASIDs it allocated: free
    /// them (each stays reserved until its last reference is dropped).
    fn reset_pasids(&self) {
        if let PasidService::Global(shared) = self.pasids() {
            match shared.lock().free_all() {
                Ok(0) => {}
                Ok(n) => info!("device reset: freed the guest's {n} PASIDs"),
                Err(e) => warn!("device reset: freeing the guest's PASIDs: {e}"),
            }
        }
    }

    /// What the daemon does with PASIDs.
    pub fn pasids(&self) -> PasidService {
        self.pasids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How long to spin for more work before sleeping (`--poll-us`).
    pub fn poll_interval(&self) -> Duration {
        self.options.poll
    }

    /// The control-plane clients.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Whether a vhost-user frontend is connected.
    pub fn frontend_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_frontend_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Read access to the device model (translations, inspection).
    pub fn model(&self) -> RwLockReadGuard<'_, Viommu> {
        self.model.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn model_mut(&self) -> RwLockWriteGuard<'_, Viommu> {
        self.model.write().unwrap_or_else(|e| e.into_inner())
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Prepares for a new frontend connection: fresh exit event, no rings,
    /// no guest memory. The device state is kept.
    pub fn begin_connection(&self) -> io::Result<()> {
        *lock(&self.exit) = Some(new_event_consumer_and_notifier(EventFlag::NONBLOCK)?);
        self.end_connection();
        Ok(())
    }

    /// Drops everything that belonged to the last connection.
    pub fn end_connection(&self) {
        lock(&self.events).reset(true);
        let mut rq = lock(&self.requestq);
        rq.vring = None;
        rq.stopped_at = None;
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Reports an event record (24 or 48 bytes) on the event queue.
    pub fn post_event(&self, record: &[u8]) {
        match self.memory() {
            Some(mem) => lock(&self.events).post(record, &mem),
            None => lock(&self.events).post_later(record),
        }
    }

    pub fn event_stats(&self) -> EventStats {
        lock(&self.events).stats()
    }

    /// (held event buffers, events waiting for a buffer)
    pub fn event_queue_depth(&self) -> (usize, usize) {
        let ev = lock(&self.events);
        (ev.held(), ev.pending())
    }

    fn process_requestq(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            warn!("request queue kicked before guest memory was set");
            return Ok(());
        };
        let mut rq = lock(&self.requestq);
        self.check_driver_reset(&mut rq, vring);
        rq.vring = Some(vring.clone());
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            self.drain(&mut rq, vring, &mem)?;
            if self.poll_for_requests(vring, &mem) {
                continue;
            }
            // Re-arm, then re-check: a request may have slipped in.
            if !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Spins on the avail index for up to the poll interval. Returns true
    /// as soon as a new request is there.
    fn poll_for_requests(&self, vring: &VringRwLock, mem: &Mem) -> bool {
        if self.options.poll.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.options.poll;
        let guard = mem.memory();
        loop {
            {
                let state = vring.get_ref();
                let queue = state.get_queue();
                match queue.avail_idx(&*guard, Ordering::Acquire) {
                    Ok(idx) if idx.0 != queue.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn drain(&self, rq: &mut RequestQueueState, vring: &VringRwLock, mem: &Mem) -> io::Result<()> {
        let guard = mem.memory();
        let mut model = self.model_mut();
        rq.used.clear();
        loop {
            // Not `while let`: the vring guard must be gone before add_used.
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(guard.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let used = match rq.buf.gather(chain, &guard) {
                Ok(()) => {
                    let response = model.handle_request(rq.buf.readable(), rq.buf.writable_len());
                    write_response(&response, &rq.buf, &guard)
                }
                Err(e) => {
                    warn!("request {head}: {e}");
                    0
                }
            };
            rq.used.push((head, used));
        }
        if rq.used.is_empty() {
            return Ok(());
        }
        // Control clients learn about the batch's changes before the guest
        // sees any of its requests complete.
        self.publish(model);
        for &(head, len) in &rq.used {
            vring.add_used(head, len).map_err(io::Error::other)?;
        }
        if vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Hands the changes recorded in `model` to the control clients and
    /// waits for those that must acknowledge them (without holding the
    /// model lock, so their translations keep flowing).
    fn publish(&self, mut model: RwLockWriteGuard<'_, Viommu>) {
        let changes = model.take_changes();
        if changes.is_empty() {
            return;
        }
        let waiting = self.hub.stage(&changes);
        drop(model);
        if !waiting.is_empty() {
            self.hub.flush_and_wait(&waiting, self.options.poll);
        }
    }

    /// QEMU's generic vhost-user device tells the backend nothing when the
    /// driver resets the device: it stops the rings and restarts them on
    /// the same connection. A request queue that restarts at index 0 after
    /// having stopped elsewhere belongs to a reset driver (a paused VM
    /// resumes at the index it stopped at). A ring stopped at exactly a
    /// multiple of 65536 requests cannot be told apart and keeps its state.
    fn check_driver_reset(&self, rq: &mut RequestQueueState, vring: &VringRwLock) {
        let Some(stopped_at) = rq.stopped_at.take() else {
            return;
        };
        let restart_at = vring.get_ref().get_queue().next_avail();
        if stopped_at != 0 && restart_at == 0 {
            info!("request queue restarted at 0 (stopped at {stopped_at}): driver reset, clearing IOMMU state");
            self.reset_pasids();
            let mut model = self.model_mut();
            model.reset();
            self.publish(model);
        }
    }
}

/// Writes a response into the request's writable part; returns the used
/// length.
fn write_response(response: &Response<'_>, req: &Request, mem: &GuestMemoryMmap) -> u32 {
    let (req_type, result, payload) = match response {
        Response::Reply {
            req_type,
            result,
            payload,
        } => (req_type, result, payload),
        Response::Drop(reason) => {
            warn!("request dropped: {reason}");
            return 0;
        }
    };
    if let Err(e) = result {
        debug!("request type {req_type} refused: {e}");
    }
    // The model only replies when the writable part holds the tail.
    let wlen = req.writable_len();
    let tail_at = wlen - viommu::wire::REQ_TAIL_SIZE;
    let mut tail = [0u8; 4];
    response.write_into(&mut tail);
    let write = || -> Result<(), crate::chain::ChainError> {
        let n = payload.len().min(tail_at);
        if n > 0 {
            req.write_at(mem, 0, &payload[..n])?;
        }
        req.write_at(mem, tail_at, &tail)
    };
    match write() {
        Ok(()) => u32::try_from(wlen).unwrap_or(u32::MAX),
        Err(e) => {
            warn!("writing the reply: {e}");
            0
        }
    }
}

impl VhostUserBackend for IommuBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | self.model().device_features()
    }

    fn acked_features(&self, features: u64) {
        self.model_mut().set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        info!("device reset: clearing IOMMU state");
        self.reset_pasids();
        let mut model = self.model_mut();
        model.reset();
        self.publish(model);
        lock(&self.events).reset(false);
        lock(&self.requestq).stopped_at = None;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library already told the vrings, which is all EVENT_IDX
        // changes for this device.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let model = self.model();
        model
            .config()
            .read_config(model.bypass(), offset as usize, size as usize)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `bypass` is writable. Other bytes are compared with the
        // current config so a frontend that writes the whole config space
        // (QEMU does) is not reported for fields it did not change.
        let offset = offset as usize;
        let mut model = self.model_mut();
        let current = model
            .config()
            .read_config(model.bypass(), offset, buf.len());
        for (i, (&new, &old)) in buf.iter().zip(current.iter()).enumerate() {
            if offset + i == CONFIG_BYPASS_OFFSET {
                if new != old {
                    if let Err(e) = model.write_bypass(new) {
                        warn!("config write ignored: {e}");
                    } else {
                        info!("bypass set to {new} by the driver");
                    }
                }
            } else if new != old {
                warn!(
                    "driver wrote read-only config byte {:#x}; ignored",
                    offset + i
                );
            }
        }
        self.publish(model);
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let exit = lock(&self.exit);
        let (consumer, notifier) = exit.as_ref()?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        match queue_index {
            0 => {
                let mut rq = lock(&self.requestq);
                if let Some(vring) = rq.vring.take() {
                    rq.stopped_at = Some(vring.get_ref().get_queue().next_avail());
                }
            }
            1 => lock(&self.events).stop(),
            _ => {}
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} for queue {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("event for unknown queue {device_event}");
            return Ok(());
        };
        match device_event {
            REQUEST_QUEUE => self.process_requestq(vring),
            EVENT_QUEUE => {
                if let Some(mem) = self.memory() {
                    lock(&self.events).refill(vring, &mem);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
