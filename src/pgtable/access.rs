// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a device asks a walker for ([`PageAccess`]) and what a successful
//! walk hands back ([`PageTranslation`]), shared by both table formats.

/// One access of a device, as a PCIe request with a PASID carries it: read
/// or write, optionally execute-requested, in user or privileged mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PageAccess {
    /// A write (otherwise a read).
    pub write: bool,
    /// Execute-requested: an instruction fetch on behalf of the PASID.
    pub execute: bool,
    /// Privileged-mode-requested: supervisor (x86) / EL1 (Arm) access.
    pub privileged: bool,
}

impl PageAccess {
    /// A user-mode data read.
    pub const READ: PageAccess = PageAccess {
        write: false,
        execute: false,
        privileged: false,
    };
    /// A user-mode data write.
    pub const WRITE: PageAccess = PageAccess {
        write: true,
        execute: false,
        privileged: false,
    };
    /// A user-mode instruction fetch.
    pub const EXECUTE: PageAccess = PageAccess {
        write: false,
        execute: true,
        privileged: false,
    };

    /// The same access in privileged (supervisor) mode.
    pub const fn privileged(self) -> PageAccess {
        PageAccess {
            privileged: true,
            ..self
        }
    }
}

/// A successful walk: the page that holds the address and what it allows.
///
/// Permissions are those of the leaf combined with every level above it,
/// evaluated for the privilege of the access that walked: a cache keyed by
/// (PASID, page, privileged) may serve later accesses from it until the
/// guest invalidates the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageTranslation {
    /// First input address of the page (aligned to `page_size`; for Arm
    /// with TBI0 set the ignored top byte is cleared).
    pub va: u64,
    /// Guest-physical address of the first byte of the page.
    pub gpa: u64,
    /// log2 of the page size: 12, 21, 30 (x86); 12..=42 (Arm granules).
    pub page_shift: u8,
    /// Writes are allowed for this privilege (for Arm this includes a
    /// writable-clean DBM page, whose first write marks it dirty).
    pub writable: bool,
    /// Unprivileged (user / EL0) accesses may use the page.
    pub user: bool,
    /// Instruction fetches are allowed for this privilege.
    pub executable: bool,
    /// The page is dirty-marked now (x86 D=1, Arm `AP[2]`=0), so writes may
    /// use this translation without a walk. When `writable` but not
    /// `dirty`, a cached translation serves reads only: the next write
    /// must walk again so that the dirty mark lands in the guest's table.
    pub dirty: bool,
}

impl PageTranslation {
    /// Size of the page in bytes.
    pub const fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Whether `va` lies in this page.
    pub const fn contains(&self, va: u64) -> bool {
        va >> self.page_shift == self.va >> self.page_shift
    }

    /// Guest-physical address of `va`, an address of this page.
    pub const fn gpa_of(&self, va: u64) -> u64 {
        self.gpa | (va & (self.page_size() - 1))
    }

    /// Whether `access`, of the same privilege as the access that walked,
    /// may use this translation without a new walk.
    pub const fn allows(&self, access: PageAccess) -> bool {
        (access.privileged || self.user)
            && (!access.write || (self.writable && self.dirty))
            && (!access.execute || self.executable)
    }
}
