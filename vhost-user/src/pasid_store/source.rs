// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The durable [`HostPasidSource`]: leases granules of host PASIDs to one
//! VM through the shared [`Store`].

use std::{
    ops::RangeInclusive,
    sync::{Arc, Mutex},
};

use viommu::pasid::{check_range, HostPasidSource, Pasid, PasidError, SourceError};

use super::Store;

/// Leases host PASIDs to VM `vm_id` in the host-wide database.
#[derive(Debug)]
pub struct StoreSource {
    store: Arc<Mutex<Store>>,
    vm_id: String,
    space_max: Pasid,
}

impl StoreSource {
    /// A source for `vm_id`, whose PASID space is `[1, space_max]`.
    pub fn new(store: Arc<Mutex<Store>>, vm_id: &str, space_max: Pasid) -> Self {
        Self {
            store,
            vm_id: vm_id.to_owned(),
            space_max,
        }
    }

    fn store(&self) -> Result<std::sync::MutexGuard<'_, Store>, PasidError> {
        self.store.lock().map_err(|_| PasidError::Poisoned)
    }
}

impl HostPasidSource for StoreSource {
    fn lease(
        &mut self,
        want: u32,
        within: RangeInclusive<Pasid>,
    ) -> viommu::pasid::Result<Vec<RangeInclusive<Pasid>>> {
        let within = check_range(within, self.space_max)?;
        let (min, max) = (*within.start(), *within.end());
        let got = self
            .store()?
            .lease(&self.vm_id, want, within, self.space_max)
            .map_err(|e| PasidError::Source(SourceError::new(e)))?;
        if got.is_empty() {
            return Err(PasidError::Exhausted { min, max });
        }
        Ok(got)
    }

    fn release(&mut self, ranges: &[RangeInclusive<Pasid>]) -> viommu::pasid::Result<()> {
        self.store()?
            .release(&self.vm_id, ranges)
            .map_err(|e| PasidError::Source(SourceError::new(e)))
    }
}
