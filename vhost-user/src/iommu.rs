// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`Iommu`]: the state the vhost-user backend and the control server
//! share. It owns the device model, the event queue, the guest memory of
//! the current connection, the PASID service and the [`Hub`] of control
//! clients, and the rules that tie them together: changes reach the
//! clients before the guest's request completes, PASID operations run
//! without the model's lock, a reset clears everything in order.
//!
//! Lock order (docs/architecture.md): `model` before a client's outbox
//! (staging); `model` and `events` are never held together with the PASID
//! manager's lock, which may wait on the disk.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::Duration,
};

use log::{info, warn};
use viommu::{
    config::ConfigError,
    device::PasidOp,
    pasid::{Pasid, PasidError},
    DeviceConfig, Viommu,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::{
    eventq::{EventQueue, EventStats},
    hub::{lock, Hub},
    pasid_manager::PasidService,
};

/// Guest memory of the current frontend connection.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Runtime options that are not part of the device model.
#[derive(Clone, Copy, Debug)]
pub struct IommuOptions {
    /// Keep checking for more work (request queue, control messages,
    /// acknowledgements) this long before sleeping; zero disables
    /// polling.
    pub poll: Duration,
    /// How long a guest request waits, in total, for control clients to
    /// acknowledge the changes it made before the laggards are
    /// disconnected and it completes.
    pub client_timeout: Duration,
}

impl Default for IommuOptions {
    fn default() -> Self {
        IommuOptions {
            poll: Duration::from_micros(50),
            client_timeout: Duration::from_millis(100),
        }
    }
}

/// Why the device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The device configuration is invalid.
    #[error("invalid device configuration")]
    Config(#[from] ConfigError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// The IOMMU of one VM: everything that outlives a frontend connection.
pub struct Iommu {
    model: RwLock<Viommu>,
    events: Mutex<EventQueue>,
    mem: RwLock<Option<Mem>>,
    hub: Hub,
    pasids: PasidService,
    options: IommuOptions,
    frontend: AtomicBool,
}

impl Iommu {
    /// The device in its power-on state; `pasids` says what it does with
    /// PASIDs (global mode offers guest-visible PASID allocation).
    pub fn new(
        mut config: DeviceConfig,
        pasids: PasidService,
        options: IommuOptions,
    ) -> Result<Self, SetupError> {
        config.pasid_alloc = matches!(pasids, PasidService::Global(_));
        config.validate()?;
        let mut model = Viommu::new(config);
        // Changes are cheap to record and clients come and go: always on.
        model.record_changes(true);
        Ok(Iommu {
            model: RwLock::new(model),
            events: Mutex::new(EventQueue::default()),
            mem: RwLock::new(None),
            hub: Hub::new().map_err(SetupError::EventFd)?,
            pasids,
            options,
            frontend: AtomicBool::new(false),
        })
    }

    /// Read access to the device model (translations, inspection).
    pub fn model(&self) -> RwLockReadGuard<'_, Viommu> {
        self.model.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access to the device model. Changes it records reach the
    /// control clients through [`Self::publish`].
    pub fn model_mut(&self) -> RwLockWriteGuard<'_, Viommu> {
        self.model.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn options(&self) -> &IommuOptions {
        &self.options
    }

    pub(crate) fn hub(&self) -> &Hub {
        &self.hub
    }

    pub(crate) fn pasids(&self) -> &PasidService {
        &self.pasids
    }

    /// Guest memory, once the frontend has set it.
    pub(crate) fn memory(&self) -> Option<Mem> {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_memory(&self, mem: Option<Mem>) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
    }

    pub(crate) fn events(&self) -> MutexGuard<'_, EventQueue> {
        lock(&self.events)
    }

    /// Whether a vhost-user frontend is connected.
    pub(crate) fn frontend_connected(&self) -> bool {
        self.frontend.load(Ordering::Relaxed)
    }

    pub(crate) fn set_frontend_connected(&self, connected: bool) {
        self.frontend.store(connected, Ordering::Relaxed);
    }

    /// Reports an event record (24 or 48 bytes) on the event queue: now if
    /// the driver posted a buffer, later otherwise.
    pub fn post_event(&self, record: &[u8]) {
        match self.memory() {
            Some(mem) => self.events().post(record, &mem),
            None => self.events().post_later(record),
        }
    }

    /// Event queue counters.
    pub fn event_stats(&self) -> EventStats {
        self.events().stats()
    }

    /// (held event buffers, events waiting for a buffer)
    pub fn event_queue_depth(&self) -> (usize, usize) {
        let ev = self.events();
        (ev.held(), ev.pending())
    }

    /// Hands the changes recorded in `model` to the control clients and
    /// waits for the acknowledgements the guest's requests depend on,
    /// without holding the model lock, so translations keep flowing.
    pub(crate) fn publish(&self, mut model: RwLockWriteGuard<'_, Viommu>) {
        let changes = model.take_changes();
        if changes.is_empty() {
            return;
        }
        let clients = self.hub.stage(&changes);
        drop(model);
        if !clients.is_empty() {
            self.hub
                .flush_and_wait(&clients, self.options.poll, self.options.client_timeout);
        }
    }

    /// Runs a PASID operation the guest asked for. Called without the
    /// model's lock: the host-wide allocator journals to disk.
    pub(crate) fn run_pasid_op(&self, op: PasidOp) -> Result<Pasid, PasidError> {
        let PasidService::Global(shared) = &self.pasids else {
            // The device offers PASID_ALLOC only in global mode.
            return Err(PasidError::Disabled);
        };
        let mut m = shared.lock();
        match op {
            PasidOp::Alloc { min, max } => m.alloc(min, max),
            PasidOp::Free { pasid } => m.free(pasid).map(|()| 0),
        }
    }

    /// Device reset (by the driver): the guest forgot its PASIDs, its
    /// domains and its mappings. PASIDs are freed first (each stays
    /// reserved until its last reference goes), then the model is reset
    /// and the clients told before the reset completes.
    pub(crate) fn reset(&self, why: &str) {
        info!("{why}: clearing IOMMU state");
        if let PasidService::Global(shared) = &self.pasids {
            match shared.lock().free_all() {
                Ok(0) => {}
                Ok(n) => info!("{why}: freed the guest's {n} PASIDs"),
                Err(e) => warn!("{why}: freeing the guest's PASIDs: {e}"),
            }
        }
        let mut model = self.model_mut();
        model.reset();
        self.publish(model);
    }
}
