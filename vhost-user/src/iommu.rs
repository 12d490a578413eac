// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`Iommu`]: the state the vhost-user backend and the control server
//! share. It owns the device model, the event queue, the guest memory of
//! the current connection, the PASID service and the `Hub` of control
//! clients, and the rules that tie them together: changes reach the
//! clients before the guest's request completes, PASID operations run
//! without the model's lock, a reset clears everything in order.
//!
//! Lock order (docs/architecture.md): `model` before a client's outbox
//! (staging) and before `iotlb`; `model` before the PASID manager's lock
//! only to take a binding's reference (memory only); anything that may
//! wait on the disk under the manager's lock (journal writes, releasing
//! references) runs without the model's lock. Page requests
//! (`page_requests.rs`): raised and delivered under the model's write
//! lock (`model` before `events`), answered after it is released.

mod page_requests;

pub(crate) use page_requests::PageSourceStats;

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use viommu::{
    config::ConfigError,
    device::PasidOp,
    iotlb::Iotlb,
    pasid::{Pasid, PasidError},
    prq::PasidRefs,
    state::{self, DeviceState, StateError},
    DeviceConfig, Viommu,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::{
    eventq::{EventQueue, EventStats},
    faults::Sources,
    hub::{lock, Hub},
    pasid_manager::{AdoptedPasids, PasidRestoreError, PasidService},
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
    /// Most table walks the daemon caches (0: none).
    pub cached_translations: usize,
}

impl Default for IommuOptions {
    fn default() -> Self {
        IommuOptions {
            poll: Duration::from_micros(50),
            client_timeout: Duration::from_millis(100),
            cached_translations: 1 << 16,
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
    /// `--host-constraints` that the device cannot take.
    #[error("--host-constraints of endpoint {endpoint}")]
    HostConstraints {
        /// The endpoint.
        endpoint: u32,
        /// Why.
        #[source]
        source: viommu::HostConstraintError,
    },
}

/// Why the device state cannot be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// A PASID the guest did not allocate with PASID_ALLOC, which the
    /// state format cannot carry yet.
    #[error(
        "guest PASID {guest} is mapped to host PASID {host}; the state format saves only \
         PASIDs the guest allocated with PASID_ALLOC"
    )]
    TranslatedPasid { guest: Pasid, host: Pasid },
}

/// Why a saved device state was refused. The device is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The blob is not a state this device could have.
    #[error("invalid device state")]
    State(#[from] StateError),
    /// The guest's PASIDs cannot be had on this host.
    #[error("the guest's PASIDs cannot be restored")]
    Pasids(#[from] PasidRestoreError),
    /// The saved guest holds PASIDs and this daemon allocates none. (The
    /// offered features differ then, so the decoder refuses it first.)
    #[error("the saved guest holds PASIDs; this daemon runs without --pasid-mode global")]
    NoPasidAllocator,
}

/// What a restore brought back, for the log.
#[derive(Debug)]
pub struct Restored {
    pub domains: usize,
    pub mappings: usize,
    pub endpoints: usize,
    /// PASID bindings of guest tables.
    pub bindings: usize,
    pub pasids: AdoptedPasids,
    pub events: usize,
    /// Optional sections of a later format version, skipped.
    pub skipped_sections: Vec<u32>,
    /// Subscribed control clients disconnected to get a new replay.
    pub subscribers_disconnected: usize,
}

/// The IOMMU of one VM: everything that outlives a frontend connection.
pub struct Iommu {
    model: RwLock<Viommu>,
    /// Table walks served to control clients; invalidated with the model
    /// changes, under the model's write lock.
    iotlb: Mutex<Iotlb>,
    events: Mutex<EventQueue>,
    mem: RwLock<Option<Mem>>,
    hub: Hub,
    pasids: PasidService,
    options: IommuOptions,
    frontend: AtomicBool,
    /// Sources of page requests and the routes of their answers.
    sources: Mutex<Sources>,
    /// Start of the page-request clock (the model takes durations).
    epoch: Instant,
    /// What happened to page requests outside the model.
    pub(crate) source_stats: PageSourceStats,
}

impl Iommu {
    /// The device in its power-on state; `pasids` says what it does with
    /// PASIDs (global mode offers guest-visible PASID allocation; without
    /// PASIDs, tables can be bound without PASID only).
    pub fn new(
        mut config: DeviceConfig,
        pasids: PasidService,
        options: IommuOptions,
    ) -> Result<Self, SetupError> {
        config.pasid_alloc = matches!(pasids, PasidService::Global(_));
        config.endpoint_pasid_bits = match &pasids {
            PasidService::Disabled => 0,
            PasidService::Identity { bits } => *bits,
            PasidService::Global(shared) => shared.lock().options().bits,
        };
        config.validate()?;
        let mut model = Viommu::new(config);
        // Changes are cheap to record and clients come and go: always on.
        model.record_changes(true);
        Ok(Iommu {
            model: RwLock::new(model),
            iotlb: Mutex::new(Iotlb::new(options.cached_translations)),
            events: Mutex::new(EventQueue::default()),
            mem: RwLock::new(None),
            hub: Hub::new().map_err(SetupError::EventFd)?,
            pasids,
            options,
            frontend: AtomicBool::new(false),
            sources: Mutex::new(Sources::default()),
            epoch: Instant::now(),
            source_stats: PageSourceStats::default(),
        })
    }

    /// Read access to the device model (translations, inspection).
    pub fn model(&self) -> RwLockReadGuard<'_, Viommu> {
        self.model.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access to the device model. Changes it records reach the
    /// control clients through `Iommu::publish`.
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

    /// The cache of table walks (lock it only while holding the model's
    /// lock: it must change with the model).
    pub(crate) fn iotlb(&self) -> MutexGuard<'_, Iotlb> {
        lock(&self.iotlb)
    }

    /// PASID references for table bindings: taken under the model's lock,
    /// given back later by [`BindingRefs::finish`], without it.
    pub(crate) fn binding_refs(&self) -> BindingRefs<'_> {
        BindingRefs {
            pasids: &self.pasids,
            released: Vec::new(),
        }
    }

    /// Whether a vhost-user frontend is connected.
    pub(crate) fn frontend_connected(&self) -> bool {
        self.frontend.load(Ordering::Relaxed)
    }

    pub(crate) fn set_frontend_connected(&self, connected: bool) {
        self.frontend.store(connected, Ordering::Relaxed);
    }

    /// Reports a fault record (24 bytes) on the event queue: now if the
    /// driver posted a buffer, later otherwise. A driver that negotiated
    /// page requests gets it in the 48-byte extended record (the first 24
    /// bytes are the same; a smaller buffer still gets those).
    pub fn post_event(&self, record: &[u8]) {
        let extended =
            self.model().acked_features() & (1 << viommu::wire::VIRTIO_IOMMU_F_PAGE_REQUEST) != 0;
        let mut ext = [0u8; 48];
        let record = if extended && record.len() < ext.len() {
            ext[..record.len()].copy_from_slice(record);
            &ext[..]
        } else {
            record
        };
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
        let answers = model.take_answers();
        if changes.is_empty() {
            drop(model);
            self.send_answers(answers);
            return;
        }
        {
            let mut iotlb = self.iotlb();
            for inv in changes.iter().filter_map(|c| c.invalidates()) {
                iotlb.invalidate(&inv);
            }
        }
        let clients = self.hub.stage(&changes);
        drop(model);
        if !clients.is_empty() {
            self.hub
                .flush_and_wait(&clients, self.options.poll, self.options.client_timeout);
        }
        // After the changes: once DETACH_TABLE's invalidation is acked,
        // the groups it ended are answered, then their PASIDs go.
        self.send_answers(answers);
    }

    /// Runs a PASID operation the guest asked for. Called without the
    /// model's lock: the host-wide allocator journals to disk.
    pub(crate) fn run_pasid_op(&self, op: PasidOp) -> Result<Pasid, PasidError> {
        let PasidService::Global(shared) = &self.pasids else {
            // The device offers PASID_ALLOC only in global mode.
            return Err(PasidError::Disabled);
        };
        let mut m = shared.lock();
        // Logged like the model logs ATTACH_TABLE and DETACH_TABLE, so the
        // log tells the life of a guest PASID (refusals are logged with
        // the request's status).
        match op {
            PasidOp::Alloc { min, max } => m.alloc(min, max).inspect(|pasid| {
                debug!("PASID_ALLOC [{min}, {max}]: PASID {pasid}");
            }),
            PasidOp::Free { pasid } => m.free(pasid).map(|()| {
                debug!("PASID_FREE PASID {pasid}");
                0
            }),
        }
    }

    /// The device state to save and the configuration it belongs to:
    /// the model (a copy-on-write snapshot, taken under its read lock),
    /// the guest's PASIDs and the events waiting for a buffer. The
    /// frontend has stopped the device, so the three agree.
    pub(crate) fn save_state(&self) -> Result<(DeviceConfig, DeviceState), SaveError> {
        let (config, mut state) = {
            let model = self.model();
            (model.config().clone(), model.device_state())
        };
        state.pending_events = self.events().pending_records();
        if let PasidService::Global(shared) = &self.pasids {
            for p in shared.lock().pasids().into_iter().filter(|p| p.active) {
                match p.guest {
                    Some(guest) if guest == p.host => state.guest_pasids.push(guest),
                    Some(guest) => {
                        return Err(SaveError::TranslatedPasid {
                            guest,
                            host: p.host,
                        })
                    }
                    None => {}
                }
            }
        }
        Ok((config, state))
    }

    /// Replaces the device state with the one saved in `blob`, all or
    /// nothing: the blob is decoded and checked against this device
    /// first, then the guest's PASIDs are taken back (the PASID
    /// manager's lock is not held with the model's), and only then is
    /// the model swapped, under its write lock. Control clients that
    /// cache translations are told to drop them all; subscribers are
    /// disconnected, to reconnect for a replay of the new state.
    pub(crate) fn restore_state(&self, blob: &[u8]) -> Result<Restored, RestoreError> {
        let config = self.model().config().clone();
        let loaded = state::decode(blob, &config)?;
        let pasids = if loaded.guest_pasids.is_empty() {
            AdoptedPasids::default()
        } else if let PasidService::Global(shared) = &self.pasids {
            shared.lock().adopt_guest_pasids(&loaded.guest_pasids)?
        } else {
            return Err(RestoreError::NoPasidAllocator);
        };
        let mut restored = Restored {
            domains: loaded.model.domains().len(),
            mappings: loaded.model.mappings(),
            endpoints: loaded
                .model
                .domains()
                .values()
                .map(|d| d.endpoints.len())
                .sum(),
            bindings: loaded.model.bindings().len(),
            pasids,
            events: loaded.pending_events.len(),
            skipped_sections: loaded.skipped_sections,
            subscribers_disconnected: 0,
        };
        // Bindings take their PASID references under the model's lock
        // (memory only); the old ones are given back after the publish.
        let mut refs = self.binding_refs();
        let mut model = self.model_mut();
        if let Err(e) = model.restore(loaded.model, &mut refs) {
            drop(model);
            refs.finish();
            if let PasidService::Global(shared) = &self.pasids {
                shared.lock().release_taken(&restored.pasids.taken);
            }
            return Err(e.into());
        }
        restored.subscribers_disconnected = self
            .hub
            .disconnect_subscribers("the device state was restored from a snapshot");
        self.events().replace_pending(&loaded.pending_events);
        self.publish(model);
        refs.finish();
        if let Some(mem) = self.memory() {
            self.events().deliver(&mem);
        }
        if let PasidService::Global(shared) = &self.pasids {
            let mut m = shared.lock();
            for &pasid in &restored.pasids.extra {
                if let Err(e) = m.free(pasid) {
                    warn!("freeing PASID {pasid}, which the restored guest does not have: {e}");
                }
            }
        }
        Ok(restored)
    }

    /// Device reset (by the driver): the guest forgot its tables, its
    /// domains, its mappings and its PASIDs. In order: the model stops
    /// translating (bindings and domains go), the clients drop what they
    /// cached and acknowledge, then the bindings' PASID references are
    /// given back and the guest's PASIDs freed (each stays reserved until
    /// its last reference goes).
    pub(crate) fn reset(&self, why: &str) {
        info!("{why}: clearing IOMMU state");
        let mut refs = self.binding_refs();
        let mut model = self.model_mut();
        model.reset(&mut refs);
        self.publish(model);
        refs.finish();
        if let PasidService::Global(shared) = &self.pasids {
            match shared.lock().free_all() {
                Ok(0) => {}
                Ok(n) => info!("{why}: freed the guest's {n} PASIDs"),
                Err(e) => warn!("{why}: freeing the guest's PASIDs: {e}"),
            }
        }
    }
}

/// The daemon's [`PasidRefs`] for table bindings. In global mode a binding
/// holds a reference on its host PASID (the guest PASID, from
/// PASID_ALLOC) in the host-wide allocator, so a PASID the guest frees
/// while it is bound stays reserved; other modes count nothing. Taking is
/// memory only; giving back may write the journal, so releases are kept
/// and done by [`BindingRefs::finish`] once the model's lock is gone.
pub(crate) struct BindingRefs<'a> {
    pasids: &'a PasidService,
    released: Vec<Pasid>,
}

impl PasidRefs for BindingRefs<'_> {
    fn take(&mut self, _endpoint: u32, pasid: u32) -> Option<u64> {
        let PasidService::Global(shared) = self.pasids else {
            return Some(0);
        };
        let mut m = shared.lock();
        let bits = m.options().bits;
        let host = m.to_host(pasid, bits).ok()?;
        m.get(host).ok()?;
        Some(u64::from(host))
    }

    fn release(&mut self, _endpoint: u32, _pasid: u32, handle: u64) {
        if let (PasidService::Global(_), Ok(host)) = (self.pasids, Pasid::try_from(handle)) {
            self.released.push(host);
        }
    }
}

impl BindingRefs<'_> {
    /// Gives back the references released meanwhile (without the model's
    /// lock: the last reference of a freed PASID is journaled).
    pub(crate) fn finish(mut self) {
        let PasidService::Global(shared) = self.pasids else {
            return;
        };
        if self.released.is_empty() {
            return;
        }
        let mut m = shared.lock();
        for host in self.released.drain(..) {
            if let Err(e) = m.put(host) {
                warn!("giving back the binding reference of PASID {host}: {e}");
            }
        }
    }
}
