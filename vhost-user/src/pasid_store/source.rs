// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The durable [`HostPasidSource`]: leases granules of host PASIDs to one
//! VM through the shared [`Store`].

use std::{
    ops::RangeInclusive,
    sync::{Arc, Mutex},
};

use viommu::pasid::{HostPasidSource, Pasid, PasidError};

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
        self.store
            .lock()
            .map_err(|_| PasidError::Source("state store lock poisoned".into()))
    }
}

impl HostPasidSource for StoreSource {
    fn lease(
        &mut self,
        want: u32,
        within: RangeInclusive<Pasid>,
    ) -> viommu::pasid::Result<Vec<RangeInclusive<Pasid>>> {
        let (min, max) = (*within.start(), *within.end());
        if min == 0 || min > max || max > self.space_max {
            return Err(PasidError::InvalidRange {
                min,
                max,
                limit: self.space_max,
            });
        }
        let got = self
            .store()?
            .lease(&self.vm_id, want, within, self.space_max)
            .map_err(|e| PasidError::Source(e.to_string()))?;
        if got.is_empty() {
            return Err(PasidError::Exhausted { min, max });
        }
        Ok(got)
    }

    fn release(&mut self, ranges: &[RangeInclusive<Pasid>]) -> viommu::pasid::Result<()> {
        self.store()?
            .release(&self.vm_id, ranges)
            .map_err(|e| PasidError::Source(e.to_string()))
    }
}
