// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user backend: connects the [`Iommu`] to the request and event
//! virtqueues and to the config space of one frontend connection.
//!
//! Nothing a guest sends can end the connection or wedge the daemon:
//! malformed requests are logged and completed with used length 0,
//! refused ones with a status, and a ring whose indexes make no sense is
//! stopped (see `RingState`). Callbacks return `Err` only for conditions
//! that really are fatal for the connection (vhost-user-backend closes it
//! on any `Err`), with two exceptions that the library answers with a
//! failure code and goes on: `set_device_state_fd` and
//! `check_device_state`, through which a refused device state is
//! reported to the frontend.

use std::{
    fs::File,
    io,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Instant,
};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use viommu::{device::Response, state, wire::CONFIG_BYPASS_OFFSET};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use virtio_queue::QueueT;
use vm_memory::{
    Address, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use crate::{
    chain::{self, Request, RingError},
    error::report,
    hub::lock,
    iommu::{Iommu, Mem},
    ratelimit::RateLimited,
    transfer::{Outcome, Transfer, MAX_STATE_SIZE, TRANSFER_TIMEOUT},
};

/// Index of the request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 1;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 2;
/// Largest queue size the backend accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Whether a ring may be processed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum RingState {
    #[default]
    Running,
    /// The driver published an avail index more than a queue size ahead
    /// of the device's: the ring is broken. It is left alone (state kept
    /// for inspection) until the frontend restarts it or resets the
    /// device, so the daemon never spins on it.
    Broken { avail: u16, next: u16 },
}

/// Request-queue bookkeeping of one connection.
#[derive(Default)]
struct RequestQueueState {
    vring: Option<VringRwLock>,
    /// `next_avail` when the ring was last stopped on this connection.
    stopped_at: Option<u16>,
    state: RingState,
    buf: Request,
    /// Completions of the current batch, published once clients acked.
    used: Vec<(u16, u32)>,
}

/// The virtio-iommu vhost-user backend: serves the [`Iommu`] to frontend
/// connections, one at a time. The rings and guest memory belong to a
/// connection; the IOMMU state outlives it.
pub struct IommuBackend {
    iommu: Arc<Iommu>,
    requestq: Mutex<RequestQueueState>,
    exit: Mutex<Option<(EventConsumer, EventNotifier)>>,
    /// The device state transfer the frontend started and has not yet
    /// checked (SET_DEVICE_STATE_FD, then CHECK_DEVICE_STATE).
    transfer: Mutex<Option<(VhostTransferStateDirection, Transfer)>>,
    /// Errors the guest can repeat are logged at most once a second.
    guest_errors: RateLimited,
    /// Broken rings, likewise (a family of their own, so a flood of bad
    /// requests cannot hide them).
    ring_errors: RateLimited,
}

impl IommuBackend {
    /// A backend serving `iommu`.
    pub fn new(iommu: Arc<Iommu>) -> Self {
        IommuBackend {
            iommu,
            requestq: Mutex::new(RequestQueueState {
                buf: Request::new(),
                ..Default::default()
            }),
            exit: Mutex::new(None),
            transfer: Mutex::new(None),
            guest_errors: RateLimited::default(),
            ring_errors: RateLimited::default(),
        }
    }

    /// The IOMMU this backend serves.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.iommu
    }

    /// Prepares for a new frontend connection: fresh exit event, no rings,
    /// no guest memory. The device state is kept.
    pub fn begin_connection(&self) -> io::Result<()> {
        *lock(&self.exit) = Some(new_event_consumer_and_notifier(EventFlag::NONBLOCK)?);
        self.end_connection();
        Ok(())
    }

    /// Starts a device state transfer (SET_DEVICE_STATE_FD): SAVE
    /// gathers the state now and writes it on a helper thread; LOAD
    /// reads it on a helper thread. Either is finished by
    /// [`Self::finish_transfer`].
    fn start_transfer(
        &self,
        direction: VhostTransferStateDirection,
        file: File,
    ) -> io::Result<Transfer> {
        match direction {
            VhostTransferStateDirection::SAVE => {
                let (config, saved) = self.iommu.save_state().map_err(|e| {
                    error!("device state not saved: {}", report(&e));
                    io::Error::other(e)
                })?;
                let encode =
                    move || Ok::<_, std::convert::Infallible>(state::encode(&config, &saved));
                Transfer::save(file, encode, MAX_STATE_SIZE, TRANSFER_TIMEOUT)
            }
            VhostTransferStateDirection::LOAD => {
                Transfer::load(file, MAX_STATE_SIZE, TRANSFER_TIMEOUT)
            }
        }
    }

    /// Waits for a transfer to end and, for a LOAD, restores the state
    /// it brought: the device changes only if all of it is accepted.
    fn finish_transfer(&self, transfer: Transfer) -> Result<(), String> {
        let outcome = transfer.finish().map_err(|e| report(&e))?;
        let blob = match outcome {
            Outcome::Saved(n) => {
                info!("device state saved: {n} bytes");
                return Ok(());
            }
            Outcome::Loaded(blob) => blob,
        };
        let r = self.iommu.restore_state(&blob).map_err(|e| report(&e))?;
        info!(
            "device state restored from {} bytes: {} domains, {} mappings, {} endpoints \
             attached, {} PASID bindings, PASIDs {:?} ({} kept), {} pending events",
            blob.len(),
            r.domains,
            r.mappings,
            r.endpoints,
            r.bindings,
            r.pasids.taken,
            r.pasids.kept.len(),
            r.events,
        );
        if !r.pasids.extra.is_empty() {
            info!(
                "PASIDs {:?} freed: the restored guest does not have them",
                r.pasids.extra
            );
        }
        if !r.skipped_sections.is_empty() {
            warn!(
                "optional sections {:?} of a later state format skipped",
                r.skipped_sections
            );
        }
        if r.subscribers_disconnected > 0 {
            info!(
                "{} subscribed control clients disconnected, to reconnect for the new state",
                r.subscribers_disconnected
            );
        }
        Ok(())
    }

    /// Drops everything that belonged to the last connection.
    pub fn end_connection(&self) {
        self.iommu.events().reset(true);
        {
            let mut rq = lock(&self.requestq);
            rq.vring = None;
            rq.stopped_at = None;
            rq.state = RingState::Running;
        }
        self.iommu.set_memory(None);
        // A state transfer belongs to the connection that started it; an
        // unchecked LOAD is never applied by another one.
        if let Some((direction, _)) = lock(&self.transfer).take() {
            warn!("a {direction:?} state transfer was never checked; abandoned");
        }
    }

    fn process_requestq(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.iommu.memory() else {
            self.guest_errors.warn(format_args!(
                "request queue kicked before guest memory was set"
            ));
            return Ok(());
        };
        let mut rq = lock(&self.requestq);
        self.check_driver_reset(&mut rq, vring);
        rq.vring = Some(vring.clone());
        if rq.state != RingState::Running {
            return Ok(());
        }
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            if !self.check_ring(&mut rq, vring, &mem) {
                return Ok(());
            }
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

    /// Checks the avail index against the device's; a driver that
    /// publishes more than a queue size of requests at once broke the
    /// ring (virtio 1.2 §2.7.13.3), which stops the queue.
    fn check_ring(&self, rq: &mut RequestQueueState, vring: &VringRwLock, mem: &Mem) -> bool {
        match chain::available(vring, &mem.memory()) {
            Ok(_) => true,
            // Unreadable ring memory: nothing to process now.
            Err(RingError::Unreadable) => false,
            Err(e @ RingError::Broken { avail, next, .. }) => {
                // A driver can break, reset and break its ring again:
                // rate-limited like every error a guest can repeat.
                self.ring_errors.error(format_args!(
                    "request queue broken: {e}; the queue is stopped until the driver resets it"
                ));
                rq.state = RingState::Broken { avail, next };
                false
            }
        }
    }

    /// Spins on the avail index for up to the poll interval. Returns true
    /// as soon as a new request is there.
    fn poll_for_requests(&self, vring: &VringRwLock, mem: &Mem) -> bool {
        let poll = self.iommu.options().poll;
        if poll.is_zero() {
            return false;
        }
        let deadline = Instant::now() + poll;
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
        let mut refs = self.iommu.binding_refs();
        let mut model = self.iommu.model_mut();
        rq.used.clear();
        while let Some(chain) = chain::pop(vring, guard.clone()) {
            let head = chain.head_index();
            if let Err(e) = rq.buf.gather(chain, &guard) {
                self.guest_errors
                    .warn(format_args!("request {head} dropped: {}", report(&e)));
                rq.used.push((head, 0));
                continue;
            }
            let response =
                model.handle_request_with(rq.buf.readable(), rq.buf.writable_len(), &mut refs);
            let used = if let Response::Pasid(op) = response {
                // The PASID service may write to disk: not under the
                // model's lock (other requests' translations go on).
                drop(model);
                let result = self.iommu.run_pasid_op(op);
                model = self.iommu.model_mut();
                self.write_response(&model.complete_pasid(op, result), &rq.buf, &guard)
            } else {
                self.write_response(&response, &rq.buf, &guard)
            };
            rq.used.push((head, used));
        }
        if rq.used.is_empty() {
            return Ok(());
        }
        // Control clients learn about the batch's changes before the guest
        // sees any of its requests complete; only then are the references
        // of removed bindings given back.
        self.iommu.publish(model);
        refs.finish();
        // The whole batch under one lock of the ring, through the memory
        // guard already held (`VringT::add_used` locks and loads the
        // memory map again for every request).
        let notify = {
            let mut ring = vring.get_mut();
            let queue = ring.get_queue_mut();
            for &(head, len) in &rq.used {
                queue
                    .add_used(&*guard, head, len)
                    .map_err(io::Error::other)?;
            }
            queue
                .needs_notification(&*guard)
                .map_err(io::Error::other)?
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Writes a response into the request's writable part; returns the
    /// used length.
    fn write_response(&self, response: &Response<'_>, req: &Request, mem: &GuestMemoryMmap) -> u32 {
        let (req_type, result, payload) = match response {
            Response::Reply {
                req_type,
                result,
                payload,
            } => (req_type, result, payload),
            Response::Drop(reason) => {
                self.guest_errors
                    .warn(format_args!("request dropped: {reason}"));
                return 0;
            }
            // Completed by the caller before it gets here.
            Response::Pasid(_) => return 0,
        };
        if let Err(e) = result {
            debug!("request type {req_type} refused: {e}");
        }
        // The model only replies when the writable part holds the tail.
        let wlen = req.writable_len();
        let tail_at = wlen - viommu::wire::REQ_TAIL_SIZE;
        let mut tail = [0u8; 4];
        response.write_into(&mut tail);
        let write = || -> Result<(), chain::ChainError> {
            let n = payload.len().min(tail_at);
            if n > 0 {
                req.write_at(mem, 0, &payload[..n])?;
            }
            req.write_at(mem, tail_at, &tail)
        };
        match write() {
            Ok(()) => u32::try_from(wlen).unwrap_or(u32::MAX),
            Err(e) => {
                self.guest_errors
                    .warn(format_args!("writing the reply: {}", report(&e)));
                0
            }
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
        // A restarted ring may run again, whatever broke it before.
        rq.state = RingState::Running;
        let restart_at = vring.get_ref().get_queue().next_avail();
        if stopped_at != 0 && restart_at == 0 {
            self.iommu.reset(&format!(
                "request queue restarted at 0 (stopped at {stopped_at}): driver reset"
            ));
        }
    }
}

/// Checks that every file-backed region lies inside its file. Only
/// regular files have a size that says where SIGBUS starts (memfd,
/// tmpfs, hugetlbfs included); other kinds (device DAX) are left to the
/// VMM.
fn check_regions(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let gpa = region.start_addr().raw_value();
        let len = region.len();
        let end = fo.start().checked_add(len);
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the region at guest address {gpa:#x} ({len:#x} bytes from offset {:#x} of \
                     its file) extends past the end of the file ({:#x} bytes)",
                    fo.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
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
            | self.iommu.model().device_features()
    }

    fn acked_features(&self, features: u64) {
        let mut model = self.iommu.model_mut();
        model.set_acked_features(features);
        // Without bit 10 any page request left is answered now.
        self.iommu.publish(model);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn reset_device(&self) {
        self.iommu.reset("device reset");
        self.iommu.events().reset(false);
        let mut rq = lock(&self.requestq);
        rq.stopped_at = None;
        rq.state = RingState::Running;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library already told the vrings, which is all EVENT_IDX
        // changes for this device.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // A read of `page_size_mask` (the first 8 bytes) may be the
        // driver's: from now on host page sizes cannot narrow it.
        if offset < 8 && size > 0 && !self.iommu.model().page_sizes_frozen() {
            self.iommu.model_mut().freeze_page_sizes();
        }
        let model = self.iommu.model();
        model
            .config()
            .read_config(model.bypass(), offset as usize, size as usize)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `bypass` is writable. Other bytes are compared with the
        // current config so a frontend that writes the whole config space
        // (QEMU does) is not reported for fields it did not change.
        let offset = offset as usize;
        let mut model = self.iommu.model_mut();
        let current = model
            .config()
            .read_config(model.bypass(), offset, buf.len());
        for (i, (&new, &old)) in buf.iter().zip(current.iter()).enumerate() {
            if offset + i == CONFIG_BYPASS_OFFSET {
                if new != old {
                    match model.write_bypass(new) {
                        Ok(()) => info!("bypass set to {new} by the driver"),
                        Err(e) => self
                            .guest_errors
                            .warn(format_args!("config write ignored: {e}")),
                    }
                }
            } else if new != old {
                self.guest_errors.warn(format_args!(
                    "driver wrote read-only config byte {:#x}; ignored",
                    offset + i
                ));
            }
        }
        self.iommu.publish(model);
        Ok(())
    }

    /// A new memory table (SET_MEM_TABLE, ADD_MEM_REG). A region that
    /// extends past the end of its file would raise SIGBUS on the first
    /// access there: the table is refused before anything touches it.
    /// Refusing ends the connection (vhost-user-backend closes it on any
    /// `Err`, after a failed REPLY_ACK), which is the honest answer: the
    /// VMM cannot run this guest with us, and a later connection with a
    /// good table is served as usual.
    ///
    /// A file shrunk after the table was accepted would still fault; no
    /// VMM does that (QEMU never truncates guest RAM under a running
    /// guest), and it is documented as VMM misbehaviour. So is a bad
    /// table sent while the rings run: vhost-user-backend installs a new
    /// table in the vrings' shared memory handle before it calls this, so
    /// a request being processed at that instant could touch it.
    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        if let Err(e) = check_regions(&mem.memory()) {
            error!("memory table refused: {e}");
            self.iommu.set_memory(None);
            return Err(e);
        }
        self.iommu.set_memory(Some(mem));
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
            1 => self.iommu.events().stop(),
            _ => {}
        }
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        // STOPPED is the only phase: the frontend stopped the rings.
        debug!("state transfer: {direction:?} in phase {phase:?}");
        let transfer = self.start_transfer(direction, file)?;
        if let Some((old, _)) = lock(&self.transfer).replace((direction, transfer)) {
            warn!("a {old:?} state transfer that was never checked is abandoned");
        }
        // The data goes through the descriptor the frontend gave.
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let Some((direction, transfer)) = lock(&self.transfer).take() else {
            warn!("CHECK_DEVICE_STATE without a state transfer");
            return Err(io::Error::other("no state transfer to check"));
        };
        self.finish_transfer(transfer).map_err(|e| {
            match direction {
                VhostTransferStateDirection::SAVE => error!("device state not saved: {e}"),
                VhostTransferStateDirection::LOAD => {
                    error!("device state refused, the device is unchanged: {e}")
                }
            }
            io::Error::other(e)
        })
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
                if let Some(mem) = self.iommu.memory() {
                    self.iommu.events().refill(vring, &mem);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
