// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-VM liveness locks: a daemon serving a VM holds an exclusive
//! `flock` on `locks/<hash of vm id>.lock` in the state directory for its
//! whole life; the kernel drops it when the process dies, however it dies.
//! So "the lock can be taken" means "no daemon serves this VM", which is
//! what `pasid-admin reclaim` and the `live` column rely on.
//!
//! Probing a lock takes it for an instant, and a reclaim holds it while it
//! deletes a set, so a starting daemon retries for [`LOCK_WAIT`] before
//! reporting the VM as served by someone else. A lock file is unlinked
//! only by its holder; a taker checks, after locking, that the file it
//! locked is still the one at the path (else it retries), so a removed
//! lock file can never let two holders in.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use super::{db::create_state_dir, validate_vm_id, StoreError};

/// How long a starting daemon waits for a short-lived holder of its lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Path of `vm_id`'s lock file in state directory `dir`. The name is a
/// 64-bit FNV-1a hash of the id (ids are free text); a collision could
/// only make two VMs look like one, refusing a start, never a double use.
pub fn lock_path(dir: &Path, vm_id: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    dir.join("locks").join(format!("{h:016x}.lock"))
}

/// A held VM lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct VmLock {
    file: Flock<File>,
    path: PathBuf,
}

impl VmLock {
    /// Takes `vm_id`'s lock, waiting up to `wait` for a probe or a reclaim
    /// to let go. Fails with [`StoreError::Locked`] if a daemon holds it.
    pub fn acquire(dir: &Path, vm_id: &str, wait: Duration) -> Result<VmLock, StoreError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(lock) = Self::try_acquire(dir, vm_id)? {
                return Ok(lock);
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Locked {
                    vm_id: vm_id.to_owned(),
                    path: lock_path(dir, vm_id),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Takes `vm_id`'s lock if nobody holds it; `None` if someone does.
    pub fn try_acquire(dir: &Path, vm_id: &str) -> Result<Option<VmLock>, StoreError> {
        validate_vm_id(vm_id)?;
        let path = lock_path(dir, vm_id);
        let io_err = |source| StoreError::LockFile {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            create_state_dir(parent)?;
        }
        // A few rounds at most: each retry means a holder removed the file.
        for _ in 0..16 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_err)?;
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, e)) => return Err(io_err(e.into())),
            };
            let locked = file.metadata().map_err(io_err)?;
            match fs::metadata(&path) {
                Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                    // For people looking at the directory; best effort.
                    let _ = file.set_len(0);
                    let _ = writeln!(&*file, "{vm_id}");
                    return Ok(Some(VmLock { file, path }));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Err(io_err(std::io::Error::other(
            "the lock file keeps being replaced",
        )))
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock file, then releases the lock (after a reclaim).
    pub fn remove(self) -> Result<(), StoreError> {
        fs::remove_file(&self.path).map_err(|source| StoreError::LockFile {
            path: self.path.clone(),
            source,
        })?;
        drop(self.file);
        Ok(())
    }
}
