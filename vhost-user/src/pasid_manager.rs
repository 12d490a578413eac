// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's PASID service: [`PasidManager`] owns this VM's set in the
//! in-memory allocator, its guest <-> host translator, the durable store
//! and the VM's liveness lock, and keeps the store in step with memory.
//!
//! At start-up it takes the VM's lock, opens the store and recovers what
//! a previous daemon of the VM left: its leases, its active PASIDs and
//! their guest PASIDs. Every guest-visible allocation and free is
//! journaled by one small transaction before it is answered; memory is
//! rolled back when the journal write fails, so the store never lags
//! behind what a guest was told. References (`get`/`put`) stay in memory:
//! their holders live inside the daemon and die with it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use log::{info, warn};
use thiserror::Error;
use viommu::pasid::{
    AllocatorConfig, Pasid, PasidAllocator, PasidError, SetId, SourceError, TranslationMode,
    Translator, DEFAULT_LEASE_BLOCK,
};
use viommu_protocol::query::SetInfo;

use crate::pasid_store::{
    validate_vm_id, Reclaimed, SetRecord, Store, StoreError, StoreSource, VmLock, GRANULE,
    LOCK_WAIT,
};

/// What a daemon needs to serve its VM's PASID set.
#[derive(Debug, Clone)]
pub struct PasidOptions {
    pub vm_id: String,
    /// Host PASID width: PASIDs live in `[1, 2^bits - 1]`.
    pub bits: u8,
    pub quota: u32,
    pub state_dir: PathBuf,
}

/// Why the PASID service cannot start.
#[derive(Debug, Error)]
pub enum ManagerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("PASID allocator: {0}")]
    Allocator(#[from] PasidError),
    #[error("{path}: recorded state of VM `{vm_id}` cannot be restored: {detail}")]
    Restore {
        path: PathBuf,
        vm_id: String,
        detail: String,
    },
}

/// One PASID of this daemon's set, for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidEntry {
    pub host: Pasid,
    pub guest: Option<Pasid>,
    pub active: bool,
    pub refs: u32,
}

/// A set of the host with its liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStatus {
    /// What the database records of the set.
    pub record: SetRecord,
    /// A daemon holds the VM's lock.
    pub live: bool,
}

impl SetStatus {
    /// The set as `ctl pasids` and `pasid-admin list` show it;
    /// `this_vm` marks the querying daemon's own set.
    pub fn info(&self, this_vm: Option<&str>) -> SetInfo {
        let r = &self.record;
        SetInfo {
            vm_id: r.vm_id.clone(),
            quota: r.quota,
            pasids: r.pasids,
            active: r.active,
            leased: r.leased,
            pid: r.pid,
            started_ms: r.started_ms,
            live: self.live,
            this_daemon: this_vm.map(|vm| vm == r.vm_id),
        }
    }
}

/// This VM's PASID set, durable and host-wide.
pub struct PasidManager {
    options: PasidOptions,
    alloc: PasidAllocator,
    translator: Translator,
    set: SetId,
    store: Arc<Mutex<Store>>,
    /// Held for the daemon's whole life: proof that it serves the VM.
    _lock: VmLock,
}

impl std::fmt::Debug for PasidManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasidManager")
            .field("vm_id", &self.options.vm_id)
            .field("alloc", &self.alloc)
            .finish_non_exhaustive()
    }
}

fn journal_error(e: StoreError) -> PasidError {
    PasidError::Source(SourceError::new(e))
}

impl PasidManager {
    /// Starts serving `options.vm_id`: takes its lock (failing if another
    /// daemon serves it), opens the store and recovers the set.
    pub fn open(options: PasidOptions) -> Result<Self, ManagerError> {
        validate_vm_id(&options.vm_id)?;
        let dir = &options.state_dir;
        let lock = VmLock::acquire(dir, &options.vm_id, LOCK_WAIT)?;
        let mut store = Store::open(dir)?;
        let path = store.path().to_owned();
        let rec = store.open_set(&options.vm_id, options.quota, std::process::id())?;
        let store = Arc::new(Mutex::new(store));
        let space_max = (1u32 << options.bits.clamp(1, 20)) - 1;
        let source = StoreSource::new(store.clone(), &options.vm_id, space_max);
        // Lease about a quota's worth at once, in whole granules.
        let lease_block = options
            .quota
            .clamp(1, DEFAULT_LEASE_BLOCK)
            .div_ceil(GRANULE)
            * GRANULE;
        let config = AllocatorConfig {
            bits: options.bits,
            lease_block,
        };
        let mut alloc = PasidAllocator::new(config, Box::new(source))?;
        let set = alloc.create_set(options.quota)?;
        let mut translator = Translator::new(TranslationMode::Global, &alloc);
        let restore_err = |detail: String| ManagerError::Restore {
            path: path.clone(),
            vm_id: options.vm_id.clone(),
            detail,
        };
        for lease in &rec.leases {
            alloc.adopt_lease(lease.clone()).map_err(|e| {
                restore_err(format!(
                    "lease {lease:?} (--pasid-bits {}?): {e}",
                    options.bits
                ))
            })?;
        }
        for p in &rec.pasids {
            alloc
                .restore(set, p.host)
                .and_then(|()| translator.adopt(&alloc, set, p.guest, p.host))
                .map_err(|e| restore_err(format!("PASID {} (guest {}): {e}", p.host, p.guest)))?;
        }
        if rec.existed {
            info!(
                "PASID set of VM `{}` recovered from {}: {} PASIDs, {} leased{}",
                options.vm_id,
                path.display(),
                rec.pasids.len(),
                alloc.leased(),
                if rec.dropped_inactive > 0 {
                    format!(
                        ", {} freed PASIDs returned to the pool",
                        rec.dropped_inactive
                    )
                } else {
                    String::new()
                }
            );
            if rec.old_quota != Some(options.quota) {
                info!(
                    "PASID quota of VM `{}` changed from {:?} to {}",
                    options.vm_id, rec.old_quota, options.quota
                );
            }
        } else {
            info!(
                "PASID set of VM `{}` created in {} (quota {})",
                options.vm_id,
                path.display(),
                options.quota
            );
        }
        Ok(Self {
            options,
            alloc,
            translator,
            set,
            store,
            _lock: lock,
        })
    }

    /// The options the manager runs with.
    pub fn options(&self) -> &PasidOptions {
        &self.options
    }

    fn store(&self) -> Result<MutexGuard<'_, Store>, PasidError> {
        self.store.lock().map_err(|_| PasidError::Poisoned)
    }

    /// Allocates a host PASID in `[min, max]` that the guest uses as is
    /// (PASID_ALLOC): journaled before it returns.
    pub fn alloc(&mut self, min: Pasid, max: Pasid) -> Result<Pasid, PasidError> {
        // A guest PASID mapped by `map` may equal a free host PASID; such
        // host PASIDs are skipped (held aside, then given back).
        let mut skipped = Vec::new();
        let got = loop {
            match self.alloc.alloc(self.set, min..=max) {
                Ok(h) if self.translator.is_mapped(self.set, h) => skipped.push(h),
                other => break other,
            }
        };
        for h in skipped {
            self.alloc.free(self.set, h)?;
        }
        let host = got?;
        self.journal_new(host, host)
    }

    /// Maps guest PASID `guest` (chosen by the guest, on a device with
    /// `device_bits` of PASID width) to a host PASID, journaling a new
    /// mapping.
    pub fn map(&mut self, guest: Pasid, device_bits: u8) -> Result<Pasid, PasidError> {
        if self.translator.is_mapped(self.set, guest) {
            return self
                .translator
                .map(&mut self.alloc, self.set, guest, device_bits);
        }
        let device_max = viommu::pasid::device_max_pasid(device_bits);
        if guest == 0 || guest > device_max {
            return Err(PasidError::OutOfRange {
                pasid: guest,
                max: device_max,
            });
        }
        let host = self
            .alloc
            .alloc(self.set, 1..=device_max.min(self.alloc.max_pasid()))?;
        self.journal_new(guest, host)
    }

    /// Maps `guest` to the freshly allocated `host` and journals it;
    /// undoes both if the journal write fails.
    fn journal_new(&mut self, guest: Pasid, host: Pasid) -> Result<Pasid, PasidError> {
        if let Err(e) = self.translator.adopt(&self.alloc, self.set, guest, host) {
            self.alloc.free(self.set, host)?;
            return Err(e);
        }
        let vm_id = self.options.vm_id.clone();
        let journaled = self.store()?.record_alloc(&vm_id, host, guest);
        if let Err(e) = journaled {
            warn!("PASID {host} of VM `{vm_id}` not journaled, allocation undone: {e}");
            self.translator.unmap(&mut self.alloc, self.set, guest)?;
            return Err(journal_error(e));
        }
        Ok(host)
    }

    /// Frees guest PASID `guest` of the set (the owner's free): it becomes
    /// inactive, and returns to the pool once its last reference is put.
    pub fn free(&mut self, guest: Pasid) -> Result<(), PasidError> {
        let host = self
            .translator
            .host_of(self.set, guest)
            .ok_or(PasidError::NotMapped(guest))?;
        self.alloc.lookup(self.set, host)?;
        let refs = self.alloc.state(host).map_or(1, |s| s.refs);
        let vm_id = self.options.vm_id.clone();
        {
            let mut store = self.store()?;
            if refs <= 1 {
                store.record_returned(&vm_id, host)
            } else {
                store.record_inactive(&vm_id, host)
            }
            .map_err(journal_error)?;
        }
        self.translator.unmap(&mut self.alloc, self.set, guest)
    }

    /// The VM is gone (the daemon exits cleanly): its set, PASIDs and
    /// leases go back to the host. A daemon that dies without this (SIGKILL)
    /// leaves them for a restart with the same VM id to recover.
    pub fn end_vm(&mut self) -> Result<Reclaimed, StoreError> {
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        // We hold the VM's lock: no other daemon serves it.
        store.reclaim(&self.options.vm_id)
    }

    /// Frees every active PASID of the set, as the owner: the guest driver
    /// was reset and forgot them. Returns how many.
    pub fn free_all(&mut self) -> Result<u32, PasidError> {
        let guests: Vec<Pasid> = self
            .pasids()
            .iter()
            .filter(|p| p.active)
            .filter_map(|p| p.guest)
            .collect();
        let mut freed = 0;
        for guest in guests {
            self.free(guest)?;
            freed += 1;
        }
        Ok(freed)
    }

    /// Takes a reference to active host PASID `host` of the set.
    pub fn get(&mut self, host: Pasid) -> Result<(), PasidError> {
        self.alloc.get(self.set, host)
    }

    /// Drops a reference taken by [`Self::get`]; journals the PASID's
    /// return to the pool when it was the last one of an inactive PASID.
    pub fn put(&mut self, host: Pasid) -> Result<(), PasidError> {
        let last = self
            .alloc
            .state(host)
            .is_some_and(|s| !s.active && s.refs == 1 && s.owner == self.set);
        if last {
            let vm_id = self.options.vm_id.clone();
            self.store()?
                .record_returned(&vm_id, host)
                .map_err(journal_error)?;
        }
        self.alloc.put(self.set, host)
    }

    /// Host PASID of guest PASID `guest` on a device with `device_bits`.
    pub fn to_host(&self, guest: Pasid, device_bits: u8) -> Result<Pasid, PasidError> {
        self.translator
            .to_host(&self.alloc, self.set, guest, device_bits)
    }

    /// Gives leases with no PASID in use back to the host pool.
    pub fn release_idle_leases(&mut self) -> Result<u32, PasidError> {
        self.alloc.release_idle_leases()
    }

    /// Quota, charged PASIDs and leased host PASIDs of the set.
    pub fn usage(&self) -> (u32, u32, u32) {
        let u = self
            .alloc
            .usage(self.set)
            .unwrap_or(viommu::pasid::SetUsage {
                quota: self.options.quota,
                charged: 0,
            });
        (u.quota, u.charged, self.alloc.leased())
    }

    /// The set's PASIDs (inactive ones included) with guest PASID, state
    /// and references.
    pub fn pasids(&self) -> Vec<PasidEntry> {
        self.alloc
            .pasids_of(self.set)
            .unwrap_or_default()
            .into_iter()
            .map(|(host, st)| PasidEntry {
                host,
                guest: if st.active {
                    self.translator.guest_of(host)
                } else {
                    None
                },
                active: st.active,
                refs: st.refs,
            })
            .collect()
    }

    /// Every set of the host, with liveness.
    pub fn host_sets(&self) -> Result<Vec<SetStatus>, StoreError> {
        let records = self
            .store
            .lock()
            .map_err(|_| StoreError::Inconsistent {
                path: self.options.state_dir.clone(),
                detail: "state store lock poisoned".into(),
            })?
            .sets()?;
        with_liveness(&self.options.state_dir, records)
    }
}

/// Adds liveness to set records: a set is live when its VM lock is held.
pub fn with_liveness(dir: &Path, records: Vec<SetRecord>) -> Result<Vec<SetStatus>, StoreError> {
    records
        .into_iter()
        .map(|record| {
            let live = VmLock::try_acquire(dir, &record.vm_id)?.is_none();
            Ok(SetStatus { record, live })
        })
        .collect()
}

/// Every set in state directory `dir`, with liveness.
pub fn list_sets(dir: &Path) -> Result<Vec<SetStatus>, StoreError> {
    let records = Store::open_existing(dir)?.sets()?;
    with_liveness(dir, records)
}

/// Reclaims the sets (PASIDs and leases) of VMs no daemon serves.
/// Returns what was reclaimed and the VMs left alone because they run.
pub fn reclaim_dead(dir: &Path) -> Result<(Vec<Reclaimed>, Vec<String>), StoreError> {
    let mut store = Store::open_existing(dir)?;
    let mut reclaimed = Vec::new();
    let mut live = Vec::new();
    for set in store.sets()? {
        match VmLock::try_acquire(dir, &set.vm_id)? {
            Some(lock) => {
                reclaimed.push(store.reclaim(&set.vm_id)?);
                lock.remove()?;
            }
            None => live.push(set.vm_id),
        }
    }
    Ok((reclaimed, live))
}

/// What the daemon does with PASIDs (for `ctl pasids`).
#[derive(Debug, Clone, Default)]
pub enum PasidService {
    /// `--pasid-quota 0`: no PASIDs.
    #[default]
    Disabled,
    /// `--pasid-mode identity`: guest PASIDs are host PASIDs, checked
    /// against the device's width; nothing is allocated.
    Identity { bits: u8 },
    /// `--pasid-mode global`: this VM's set in the host-wide allocator.
    Global(SharedPasids),
}

/// The manager shared by the request worker (the guest's PASID requests)
/// and the control server (inspection).
#[derive(Debug, Clone)]
pub struct SharedPasids(pub Arc<Mutex<PasidManager>>);

impl SharedPasids {
    /// Locks the manager (it may wait on the disk while held).
    pub fn lock(&self) -> MutexGuard<'_, PasidManager> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
