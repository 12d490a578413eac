// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest IOMMU shadowed into the host IOMMU, for devices a VMM passes
//! through (VFIO, iommufd, vDPA): the daemon's event stream turned into
//! `map`/`unmap` calls on one [`DmaMapper`] per endpoint, the shape of
//! cloud-hypervisor's `ExternalDmaMapping`.
//!
//! Invariant: for every registered endpoint, `installed` is exactly what
//! its mapper holds, and after each event it equals what the guest's IOMMU
//! state lets that endpoint reach:
//!
//! - attached to a translated domain: every mapping of the domain, cut
//!   into the pieces that guest RAM backs (MMIO mappings and addresses
//!   outside RAM are not installed: the host cannot map them);
//! - attached to a bypass domain, or attached nowhere while the `bypass`
//!   config field is 1: all of guest RAM at IOVA = guest-physical
//!   address (identity);
//! - attached nowhere with `bypass` 0: nothing.
//!
//! A MAP is installed on every endpoint of its domain or on none (the
//! pieces already installed are unmapped again when one fails); an UNMAP
//! or DETACH is removed from every endpoint before [`follow`] acknowledges
//! the event, so the guest's request completes only after the host IOMMU
//! dropped the mapping (the unmap ioctls of VFIO and iommufd return once
//! the IOTLB is flushed). An unmap the host refuses stays in `installed`,
//! is reported, and is retried by the next change of that endpoint.
//!
//! A new connection replays the state: [`Shadow::begin_resync`] forgets
//! the guest state (not what is installed), the replay rebuilds it, and
//! at REPLAY_DONE every endpoint is brought to it with the fewest calls
//! (pieces that did not change stay mapped: DMA in flight is not cut).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt, io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use log::{debug, warn};
use viommu::{
    wire::{VIRTIO_IOMMU_MAP_F_MMIO, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE},
    Mapping, StateChange,
};

use crate::{Client, Error, Event};

/// What a host mapping allows the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl Prot {
    /// Read and write.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };

    /// The access a guest MAP's `VIRTIO_IOMMU_MAP_F_*` flags allow.
    pub fn from_map_flags(flags: u32) -> Prot {
        Prot {
            read: flags & VIRTIO_IOMMU_MAP_F_READ != 0,
            write: flags & VIRTIO_IOMMU_MAP_F_WRITE != 0,
        }
    }
}

/// Host DMA mappings of one passed-through device: cloud-hypervisor's
/// `ExternalDmaMapping` (`map(iova, gpa, size)`, `unmap(iova, size)`),
/// with the access the guest allowed. `gpa` is a guest-physical address;
/// the mapper finds its host address (the [`GuestRam`] it was given).
/// Each call is for a range inside one RAM region, and `unmap` is only
/// ever called with the `(iova, size)` of an earlier successful `map`.
pub trait DmaMapper: Send + Sync {
    /// Maps `[iova, iova + size)` to guest-physical `[gpa, gpa + size)`.
    fn map(&self, iova: u64, gpa: u64, size: u64, prot: Prot) -> io::Result<()>;
    /// Removes the mapping at `[iova, iova + size)`; returns once the
    /// device can no longer reach it.
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

/// One guest RAM region and where the VMM mapped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Host virtual address of `gpa` in the VMM.
    pub hva: u64,
}

/// Why a RAM table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamError {
    /// A region of size 0, or one that wraps around an address space.
    #[error("RAM region at {gpa:#x} of {size:#x} bytes is empty or wraps around")]
    BadRegion {
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// Two regions overlap in guest-physical space.
    #[error("RAM regions at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
}

/// The VMM's guest-physical to host-virtual table: sorted, disjoint
/// regions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
}

impl GuestRam {
    /// The table of `regions` (in any order).
    pub fn new(mut regions: Vec<RamRegion>) -> Result<GuestRam, RamError> {
        for r in &regions {
            if r.size == 0 || r.gpa.checked_add(r.size - 1).is_none() {
                return Err(RamError::BadRegion {
                    gpa: r.gpa,
                    size: r.size,
                });
            }
            if r.hva.checked_add(r.size - 1).is_none() {
                return Err(RamError::BadRegion {
                    gpa: r.gpa,
                    size: r.size,
                });
            }
        }
        regions.sort_by_key(|r| r.gpa);
        for w in regions.windows(2) {
            if w[0].gpa + (w[0].size - 1) >= w[1].gpa {
                return Err(RamError::Overlap(w[0].gpa, w[1].gpa));
            }
        }
        Ok(GuestRam { regions })
    }

    /// The regions, by guest-physical address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The host address of `[gpa, gpa + size)` if one region holds all of
    /// it.
    pub fn host_address(&self, gpa: u64, size: u64) -> Option<u64> {
        let last = gpa.checked_add(size.max(1) - 1)?;
        let i = self.regions.partition_point(|r| r.gpa + (r.size - 1) < gpa);
        let r = self.regions.get(i)?;
        (r.gpa <= gpa && last <= r.gpa + (r.size - 1)).then(|| r.hva + (gpa - r.gpa))
    }

    /// The parts of `[gpa, gpa + size)` that RAM backs, as `(offset from
    /// gpa, gpa, size)`, in order.
    pub fn pieces(&self, gpa: u64, size: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        if size == 0 {
            return out;
        }
        let last = gpa.saturating_add(size - 1);
        let i = self.regions.partition_point(|r| r.gpa + (r.size - 1) < gpa);
        for r in &self.regions[i..] {
            if r.gpa > last {
                break;
            }
            let start = r.gpa.max(gpa);
            let end = (r.gpa + (r.size - 1)).min(last);
            out.push((start - gpa, start, end - start + 1));
        }
        out
    }
}

/// A failure to make the host follow the guest. The event is still
/// acknowledged (the protocol has no refusal for it): the guest's request
/// completes, and the device faults on the host where the shadow is
/// missing.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// A host map failed; nothing of that guest mapping is installed on
    /// any endpoint of the domain.
    #[error("endpoint {endpoint}: host map of IOVA {iova:#x} ({size:#x} bytes) failed")]
    Map {
        /// The endpoint whose mapper failed.
        endpoint: u32,
        /// IOVA of the piece.
        iova: u64,
        /// Its size.
        size: u64,
        /// The mapper's error.
        #[source]
        source: io::Error,
    },
    /// A host unmap failed: the device may still reach that memory.
    #[error("endpoint {endpoint}: host unmap of IOVA {iova:#x} ({size:#x} bytes) failed: the device may still reach it")]
    Unmap {
        /// The endpoint whose mapper failed.
        endpoint: u32,
        /// IOVA of the piece.
        iova: u64,
        /// Its size.
        size: u64,
        /// The mapper's error.
        #[source]
        source: io::Error,
    },
    /// `register` of an endpoint already registered.
    #[error("endpoint {0} is already registered")]
    AlreadyRegistered(u32),
    /// `unregister` of an endpoint never registered.
    #[error("endpoint {0} is not registered")]
    NotRegistered(u32),
}

/// One host mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    gpa: u64,
    size: u64,
    prot: Prot,
}

struct Registered {
    mapper: Arc<dyn DmaMapper>,
    /// What the mapper holds, by IOVA.
    installed: BTreeMap<u64, Piece>,
}

#[derive(Default)]
struct Domain {
    bypass: bool,
    endpoints: BTreeSet<u32>,
    mappings: BTreeMap<u64, Mapping>,
}

/// Counters of what the shadow did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Successful host maps.
    pub maps: u64,
    /// Successful host unmaps.
    pub unmaps: u64,
    /// Failed host maps.
    pub map_failures: u64,
    /// Failed host unmaps.
    pub unmap_failures: u64,
    /// Guest mappings not installed because they are MMIO or outside RAM.
    pub skipped: u64,
}

/// The guest IOMMU state and its shadow in the host, per registered
/// endpoint.
pub struct Shadow {
    ram: Arc<GuestRam>,
    /// The `bypass` config field.
    bypass: bool,
    /// Between `begin_resync` and REPLAY_DONE: the state is rebuilt, the
    /// host is not touched.
    resyncing: bool,
    domains: HashMap<u32, Domain>,
    attached: HashMap<u32, u32>,
    endpoints: BTreeMap<u32, Registered>,
    stats: ShadowStats,
}

impl fmt::Debug for Shadow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shadow")
            .field("bypass", &self.bypass)
            .field("domains", &self.domains.len())
            .field("endpoints", &self.endpoints.keys().collect::<Vec<_>>())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Shadow {
    /// An empty shadow over the guest RAM of `ram`: no domain, `bypass`
    /// 0 (nothing reachable) until the daemon's replay says otherwise.
    pub fn new(ram: Arc<GuestRam>) -> Shadow {
        Shadow {
            ram,
            bypass: false,
            resyncing: false,
            domains: HashMap::new(),
            attached: HashMap::new(),
            endpoints: BTreeMap::new(),
            stats: ShadowStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ShadowStats {
        self.stats
    }

    /// Whether `endpoint` has a mapper.
    pub fn is_registered(&self, endpoint: u32) -> bool {
        self.endpoints.contains_key(&endpoint)
    }

    /// The host mappings of `endpoint` as `(iova, gpa, size)`.
    pub fn installed(&self, endpoint: u32) -> Vec<(u64, u64, u64)> {
        self.endpoints.get(&endpoint).map_or_else(Vec::new, |r| {
            r.installed
                .iter()
                .map(|(&iova, p)| (iova, p.gpa, p.size))
                .collect()
        })
    }

    /// Adds a passed-through endpoint (hotplug, or at boot) and installs
    /// what it may reach now.
    pub fn register(
        &mut self,
        endpoint: u32,
        mapper: Arc<dyn DmaMapper>,
    ) -> Result<(), ShadowError> {
        if self.endpoints.contains_key(&endpoint) {
            return Err(ShadowError::AlreadyRegistered(endpoint));
        }
        self.endpoints.insert(
            endpoint,
            Registered {
                mapper,
                installed: BTreeMap::new(),
            },
        );
        if self.resyncing {
            return Ok(());
        }
        self.reconcile(endpoint)
    }

    /// Removes an endpoint (hot-unplug): every host mapping of it is
    /// unmapped first. Returns its mapper.
    pub fn unregister(&mut self, endpoint: u32) -> Result<Arc<dyn DmaMapper>, ShadowError> {
        let Some(mut reg) = self.endpoints.remove(&endpoint) else {
            return Err(ShadowError::NotRegistered(endpoint));
        };
        let mut first = None;
        let installed = std::mem::take(&mut reg.installed);
        for (iova, p) in installed {
            if let Err(e) = unmap_piece(&mut self.stats, endpoint, &mut reg, iova, p) {
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(reg.mapper),
            Some(e) => Err(e),
        }
    }

    /// A new connection is about to replay the state: forget the guest
    /// state (not the host's) until REPLAY_DONE.
    pub fn begin_resync(&mut self) {
        self.resyncing = true;
        self.bypass = false;
        self.domains.clear();
        self.attached.clear();
    }

    /// Applies one item of the event stream to the host. The first error
    /// is returned after the whole event was applied.
    pub fn apply(&mut self, event: &Event) -> Result<(), ShadowError> {
        match *event {
            Event::Replayed(change) => {
                // A replay without `begin_resync` (the caller's own loop):
                // the replay starts from nothing.
                if !self.resyncing {
                    self.begin_resync();
                }
                self.change(change);
                Ok(())
            }
            Event::ReplayDone => {
                self.resyncing = false;
                self.reconcile_all(|_| true)
            }
            Event::Live { change, .. } => self.live(change),
        }
    }

    /// Updates the guest state only.
    fn change(&mut self, change: StateChange) {
        match change {
            StateChange::Attach {
                endpoint,
                domain,
                bypass,
            } => {
                self.leave(endpoint);
                let d = self.domains.entry(domain).or_default();
                d.bypass = bypass;
                d.endpoints.insert(endpoint);
                self.attached.insert(endpoint, domain);
            }
            StateChange::Detach { endpoint, .. } => self.leave(endpoint),
            StateChange::Map { domain, mapping } => {
                if let Some(d) = self.domains.get_mut(&domain) {
                    d.mappings.insert(mapping.virt_start, mapping);
                } else {
                    warn!("MAP in domain {domain}, which has no endpoint: ignored");
                }
            }
            StateChange::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                if let Some(d) = self.domains.get_mut(&domain) {
                    let gone: Vec<u64> = d
                        .mappings
                        .range(virt_start..=virt_end)
                        .filter(|(_, m)| m.virt_end <= virt_end)
                        .map(|(&k, _)| k)
                        .collect();
                    for k in gone {
                        d.mappings.remove(&k);
                    }
                }
            }
            StateChange::Bypass(on) => self.bypass = on,
            StateChange::Reset => {
                self.domains.clear();
                self.attached.clear();
            }
            // Guest tables are installed as nested stage 1 by an iommufd
            // VMM (docs/control-protocol.md), not shadowed.
            StateChange::TableBound { .. }
            | StateChange::TableUnbound { .. }
            | StateChange::TableInvalidate(_) => {
                debug!("table event not shadowed: {change:?}");
            }
        }
    }

    fn leave(&mut self, endpoint: u32) {
        if let Some(old) = self.attached.remove(&endpoint) {
            if let Some(d) = self.domains.get_mut(&old) {
                d.endpoints.remove(&endpoint);
                if d.endpoints.is_empty() {
                    self.domains.remove(&old);
                }
            }
        }
    }

    fn live(&mut self, change: StateChange) -> Result<(), ShadowError> {
        match change {
            StateChange::Map { domain, mapping } => {
                self.change(change);
                self.map_everywhere(domain, &mapping)
            }
            StateChange::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                let members = self.registered_members(domain);
                self.change(change);
                let mut first = None;
                for ep in members {
                    if let Err(e) = self.unmap_range(ep, virt_start, virt_end) {
                        first.get_or_insert(e);
                    }
                }
                first.map_or(Ok(()), Err)
            }
            StateChange::Attach { endpoint, .. } | StateChange::Detach { endpoint, .. } => {
                self.change(change);
                if self.endpoints.contains_key(&endpoint) {
                    self.reconcile(endpoint)
                } else {
                    Ok(())
                }
            }
            StateChange::Bypass(_) => {
                self.change(change);
                let attached = self.attached.clone();
                self.reconcile_all(|ep| !attached.contains_key(&ep))
            }
            StateChange::Reset => {
                self.change(change);
                self.reconcile_all(|_| true)
            }
            _ => {
                self.change(change);
                Ok(())
            }
        }
    }

    /// Registered endpoints of a translated `domain`.
    fn registered_members(&self, domain: u32) -> Vec<u32> {
        match self.domains.get(&domain) {
            Some(d) if !d.bypass => d
                .endpoints
                .iter()
                .copied()
                .filter(|ep| self.endpoints.contains_key(ep))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The host pieces of one guest mapping.
    fn pieces_of(&self, m: &Mapping) -> Vec<(u64, Piece)> {
        let prot = Prot::from_map_flags(m.flags);
        if m.flags & VIRTIO_IOMMU_MAP_F_MMIO != 0 || !(prot.read || prot.write) {
            return Vec::new();
        }
        let len = (m.virt_end - m.virt_start).saturating_add(1);
        self.ram
            .pieces(m.phys_start, len)
            .into_iter()
            .map(|(off, gpa, size)| (m.virt_start + off, Piece { gpa, size, prot }))
            .collect()
    }

    /// Installs a new mapping on every registered endpoint of its domain,
    /// or on none.
    fn map_everywhere(&mut self, domain: u32, m: &Mapping) -> Result<(), ShadowError> {
        let members = self.registered_members(domain);
        let pieces = self.pieces_of(m);
        let covered: u64 = pieces.iter().map(|(_, p)| p.size).sum();
        if covered < (m.virt_end - m.virt_start).saturating_add(1) {
            self.stats.skipped += 1;
            debug!(
                "domain {domain}: MAP {:#x}-{:#x} -> {:#x} (flags {:#x}) is installed only where RAM backs it",
                m.virt_start, m.virt_end, m.phys_start, m.flags
            );
        }
        let mut done: Vec<(u32, u64, Piece)> = Vec::new();
        for &ep in &members {
            for &(iova, p) in &pieces {
                let Some(reg) = self.endpoints.get_mut(&ep) else {
                    continue;
                };
                match reg.mapper.map(iova, p.gpa, p.size, p.prot) {
                    Ok(()) => {
                        self.stats.maps += 1;
                        reg.installed.insert(iova, p);
                        done.push((ep, iova, p));
                    }
                    Err(source) => {
                        self.stats.map_failures += 1;
                        // All or nothing across the domain's endpoints.
                        for (ep2, iova2, p2) in done.into_iter().rev() {
                            if let Some(reg2) = self.endpoints.get_mut(&ep2) {
                                reg2.installed.remove(&iova2);
                                if let Err(e) = unmap_piece(&mut self.stats, ep2, reg2, iova2, p2) {
                                    warn!("rollback: {e}");
                                }
                            }
                        }
                        return Err(ShadowError::Map {
                            endpoint: ep,
                            iova,
                            size: p.size,
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every host piece of `endpoint` inside `[start, end]`.
    fn unmap_range(&mut self, endpoint: u32, start: u64, end: u64) -> Result<(), ShadowError> {
        let Some(reg) = self.endpoints.get_mut(&endpoint) else {
            return Ok(());
        };
        let gone: Vec<(u64, Piece)> = reg
            .installed
            .range(start..=end)
            .map(|(&i, &p)| (i, p))
            .collect();
        let mut first = None;
        for (iova, p) in gone {
            reg.installed.remove(&iova);
            if let Err(e) = unmap_piece(&mut self.stats, endpoint, reg, iova, p) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// What `endpoint` may reach now, by IOVA.
    fn desired(&self, endpoint: u32) -> BTreeMap<u64, Piece> {
        let identity = || {
            self.ram
                .regions()
                .iter()
                .map(|r| {
                    (
                        r.gpa,
                        Piece {
                            gpa: r.gpa,
                            size: r.size,
                            prot: Prot::RW,
                        },
                    )
                })
                .collect()
        };
        match self
            .attached
            .get(&endpoint)
            .and_then(|d| self.domains.get(d))
        {
            Some(d) if d.bypass => identity(),
            Some(d) => d
                .mappings
                .values()
                .flat_map(|m| self.pieces_of(m))
                .collect(),
            None if self.bypass => identity(),
            None => BTreeMap::new(),
        }
    }

    fn reconcile_all(&mut self, which: impl Fn(u32) -> bool) -> Result<(), ShadowError> {
        let eps: Vec<u32> = self
            .endpoints
            .keys()
            .copied()
            .filter(|&e| which(e))
            .collect();
        let mut first = None;
        for ep in eps {
            if let Err(e) = self.reconcile(ep) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Brings `endpoint`'s host mappings to what it may reach: removes
    /// what it may no longer reach first, then adds; pieces that stay are
    /// not touched.
    fn reconcile(&mut self, endpoint: u32) -> Result<(), ShadowError> {
        let want = self.desired(endpoint);
        let Some(reg) = self.endpoints.get_mut(&endpoint) else {
            return Ok(());
        };
        let mut first = None;
        let stale: Vec<(u64, Piece)> = reg
            .installed
            .iter()
            .filter(|(iova, p)| want.get(iova) != Some(p))
            .map(|(&i, &p)| (i, p))
            .collect();
        for (iova, p) in stale {
            reg.installed.remove(&iova);
            if let Err(e) = unmap_piece(&mut self.stats, endpoint, reg, iova, p) {
                first.get_or_insert(e);
            }
        }
        for (iova, p) in want {
            if reg.installed.contains_key(&iova) {
                continue;
            }
            match reg.mapper.map(iova, p.gpa, p.size, p.prot) {
                Ok(()) => {
                    self.stats.maps += 1;
                    reg.installed.insert(iova, p);
                }
                Err(source) => {
                    self.stats.map_failures += 1;
                    first.get_or_insert(ShadowError::Map {
                        endpoint,
                        iova,
                        size: p.size,
                        source,
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Unmaps one piece already taken out of `installed`; on failure it goes
/// back (it may still be mapped) and is retried by the next reconcile.
fn unmap_piece(
    stats: &mut ShadowStats,
    endpoint: u32,
    reg: &mut Registered,
    iova: u64,
    p: Piece,
) -> Result<(), ShadowError> {
    match reg.mapper.unmap(iova, p.size) {
        Ok(()) => {
            stats.unmaps += 1;
            Ok(())
        }
        Err(source) => {
            stats.unmap_failures += 1;
            reg.installed.insert(iova, p);
            Err(ShadowError::Unmap {
                endpoint,
                iova,
                size: p.size,
                source,
            })
        }
    }
}

/// Follows `client`'s event stream (a `Subscription::Sync` connection)
/// into `shadow` until `stop` is set or the connection closes: each
/// event is applied, then acknowledged, so the guest's request completes
/// only once the host follows. Errors go to `on_error` (the event is
/// acknowledged all the same: see [`ShadowError`]). Returns
/// [`Error::Disconnected`] when the daemon goes away: reconnect and call
/// it again (the replay resynchronises).
pub fn follow(
    shadow: &Mutex<Shadow>,
    client: &Client,
    stop: &AtomicBool,
    mut on_error: impl FnMut(&ShadowError),
) -> Result<(), Error> {
    lock(shadow).begin_resync();
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(event) = next_event(client) else {
            if client.is_closed() {
                return Err(Error::Disconnected);
            }
            continue;
        };
        let result = lock(shadow).apply(&event);
        if let Err(e) = &result {
            on_error(e);
        }
        if let Event::Live { seq, .. } = event {
            client.ack(seq)?;
        }
    }
}

/// How long `follow` keeps looking for the next event before it sleeps:
/// a guest's requests come in bursts, and the guest waits for each
/// acknowledgement (a thread wake-up costs 10-20 us on a virtualised
/// host).
const EVENT_SPIN: Duration = Duration::from_micros(50);

/// The next event: looked for (yielding the CPU) for [`EVENT_SPIN`], then
/// waited for at most 50 ms.
fn next_event(client: &Client) -> Option<Event> {
    let spin_until = std::time::Instant::now() + EVENT_SPIN;
    loop {
        if let Some(e) = client.next_event(Duration::ZERO) {
            return Some(e);
        }
        if std::time::Instant::now() >= spin_until {
            return client.next_event(Duration::from_millis(50));
        }
        std::thread::yield_now();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
