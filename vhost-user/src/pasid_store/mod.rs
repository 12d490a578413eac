// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host-wide, durable PASID store shared by every daemon of a host.
//!
//! This module owns everything that lives in the state directory
//! (`--state-dir`): the SQLite database ([`Store`], schema and
//! transactions), the per-VM liveness locks ([`VmLock`]) and the durable
//! [`HostPasidSource`](viommu::pasid::HostPasidSource) built on them
//! ([`StoreSource`]). It knows nothing of the device or the guest: the
//! daemon's `PasidManager` drives it.
//!
//! Host PASIDs are leased to VMs in granules of [`GRANULE`] PASIDs; the
//! `leases` table's primary key is the granule number, so two daemons can
//! never hold the same granule, and a lease is taken inside an IMMEDIATE
//! transaction. Each guest-visible allocation or free is journaled by one
//! small transaction in the `pasids` table, so a daemon restarted with the
//! same VM id recovers its set.

mod db;
mod error;
mod lock;
mod source;

use std::path::PathBuf;

pub use db::{
    Checkpointer, PasidRecord, Reclaimed, RecoveredSet, SetRecord, Store, DB_FILE, SCHEMA_VERSION,
};
pub use error::StoreError;
pub use lock::{lock_path, VmLock, LOCK_WAIT};
pub use source::StoreSource;

/// Host PASIDs per lease granule (fixed when a database is created).
pub const GRANULE: u32 = 64;

/// Longest VM id, in bytes.
pub const MAX_VM_ID_LEN: usize = 255;

/// The default state directory: `/var/lib/vhost-device-iommu` for root,
/// `$XDG_STATE_HOME/vhost-device-iommu` (or
/// `~/.local/state/vhost-device-iommu`) for other users.
pub fn default_state_dir() -> Result<PathBuf, StoreError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/vhost-device-iommu"));
    }
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").and_then(non_empty) {
        return Ok(state.join("vhost-device-iommu"));
    }
    match std::env::var_os("HOME").and_then(non_empty) {
        Some(home) => Ok(home.join(".local/state/vhost-device-iommu")),
        None => Err(StoreError::NoDefaultDir),
    }
}

/// Checks that `vm_id` can name a set: 1 to [`MAX_VM_ID_LEN`] bytes, no
/// control characters.
pub fn validate_vm_id(vm_id: &str) -> Result<(), StoreError> {
    let reason = if vm_id.is_empty() {
        "empty"
    } else if vm_id.len() > MAX_VM_ID_LEN {
        "longer than 255 bytes"
    } else if vm_id.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidVmId {
        vm_id: vm_id.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests;
