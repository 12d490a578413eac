// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why a walk failed ([`WalkFault`]) and why a table configuration was
//! refused ([`ConfigError`]).
//!
//! Levels are numbered as each architecture's manual numbers them: VT-d
//! first-stage 5 (PML5) or 4 (PML4) down to 1 (the PTE); AArch64 from the
//! start level (0..=3) down to 3 (the page). `entry` is always the
//! guest-physical address of the 8-byte entry the walker read.

use thiserror::Error;

/// A walk that did not produce a translation. Every failure is one of
/// these, with the level and entry that caused it.
///
/// [`WalkFault::is_recoverable`] splits them in two: faults the guest can
/// fix by changing an entry (the page-request path), and faults that say
/// the tables or the request are malformed (reported, never retried).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash)]
pub enum WalkFault {
    /// The entry is not present (x86 P=0; Arm invalid descriptor, or a
    /// block where the granule allows none). Recoverable.
    #[error("level {level} entry at {entry:#x} is not present")]
    NotPresent {
        /// Level of the entry.
        level: u8,
        /// Guest-physical address of the entry.
        entry: u64,
    },
    /// The entries deny the access (user, write or execute). Recoverable:
    /// the guest may grant it (e.g. break copy-on-write).
    #[error("level {level} entry at {entry:#x} denies the access")]
    Permission {
        /// Level of the entry that denied the access (for Arm, the leaf:
        /// hierarchical permissions are judged there).
        level: u8,
        /// Guest-physical address of the entry.
        entry: u64,
    },
    /// Arm: the leaf has AF=0 and the CD does not let the walker set it
    /// (HA=0). Recoverable: the guest sets AF.
    #[error("level {level} descriptor at {entry:#x} has the access flag clear")]
    AccessFlag {
        /// Level of the leaf.
        level: u8,
        /// Guest-physical address of the descriptor.
        entry: u64,
    },
    /// x86: a present entry has reserved bits set (above the output address
    /// width, PS in a PML5E/PML4E, low address bits of a large page).
    #[error("level {level} entry {value:#x} at {entry:#x} has reserved bits set")]
    ReservedBits {
        /// Level of the entry.
        level: u8,
        /// Guest-physical address of the entry.
        entry: u64,
        /// The entry as read.
        value: u64,
    },
    /// Arm: a table or output address is beyond the CD's IPS (clamped to
    /// the output address width): an Address Size fault.
    #[error("level {level} entry at {entry:#x} points beyond the output address size")]
    AddressSize {
        /// Level of the entry (for TTB0 itself, the start level).
        level: u8,
        /// Guest-physical address of the entry (for TTB0, TTB0).
        entry: u64,
    },
    /// A table of `level` lies outside guest RAM or is not 8-byte aligned:
    /// the entry that points to it (or the root) is bad.
    #[error("level {level} table entry at {entry:#x} is not in guest RAM")]
    BadTableAddress {
        /// Level of the table that could not be read.
        level: u8,
        /// Guest-physical address the walker would have read.
        entry: u64,
    },
    /// The input address is outside what the table translates: x86
    /// non-canonical, Arm outside TTB0's range (TTB1, the upper half, is
    /// not supported for SVA).
    #[error("address {va:#x} is outside the translated input range")]
    AddressOutOfRange {
        /// The input address.
        va: u64,
    },
    /// x86: a supervisor request while SRE is clear in `fl_flags`.
    #[error("supervisor requests are not enabled for this table")]
    SupervisorDisabled,
    /// Arm: the CD disables TTB0 walks (EPD0=1).
    #[error("TTB0 walks are disabled (EPD0) in the CD of substream {ssid}")]
    WalkDisabled {
        /// The substream (PASID).
        ssid: u32,
    },
    /// Arm: the substream ID is not below `2^s1cdmax`.
    #[error("substream {ssid} is beyond the CD table ({count} entries)")]
    SsidOutOfRange {
        /// The substream (PASID).
        ssid: u32,
        /// Number of CDs the table has.
        count: u64,
    },
    /// Arm: the level-1 CD descriptor of the substream is invalid (V=0).
    #[error("L1 CD descriptor at {entry:#x} for substream {ssid} is invalid")]
    CdL1Invalid {
        /// The substream (PASID).
        ssid: u32,
        /// Guest-physical address of the L1 descriptor.
        entry: u64,
    },
    /// Arm: the CD or L1 descriptor lies outside guest RAM.
    #[error("CD table entry at {entry:#x} for substream {ssid} is not in guest RAM")]
    CdFetch {
        /// The substream (PASID).
        ssid: u32,
        /// Guest-physical address the walker would have read.
        entry: u64,
    },
    /// Arm: the CD of the substream is invalid (V=0).
    #[error("CD at {entry:#x} for substream {ssid} is invalid")]
    CdInvalid {
        /// The substream (PASID).
        ssid: u32,
        /// Guest-physical address of the CD.
        entry: u64,
    },
    /// Arm: the CD is valid but unusable (AArch32, big-endian, reserved
    /// granule, T0SZ out of range).
    #[error("CD at {entry:#x} for substream {ssid} is malformed: {reason}")]
    CdMalformed {
        /// The substream (PASID).
        ssid: u32,
        /// Guest-physical address of the CD.
        entry: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The guest kept changing the entry between the walker's read and its
    /// accessed/dirty compare-exchange, more than
    /// [`MAX_UPDATE_RETRIES`](super::MAX_UPDATE_RETRIES) times in one walk.
    #[error("level {level} entry at {entry:#x} kept changing under the walker")]
    UpdateContention {
        /// Level of the entry.
        level: u8,
        /// Guest-physical address of the entry.
        entry: u64,
    },
}

impl WalkFault {
    /// Whether the guest can resolve the fault by editing its page table
    /// (not present, insufficient permission, Arm access flag clear): such
    /// faults become page requests. All others mean malformed tables or an
    /// impossible request and are never recoverable.
    pub const fn is_recoverable(&self) -> bool {
        matches!(
            self,
            WalkFault::NotPresent { .. }
                | WalkFault::Permission { .. }
                | WalkFault::AccessFlag { .. }
        )
    }

    /// The level the fault was detected at, when it is a page-table level.
    pub const fn level(&self) -> Option<u8> {
        match *self {
            WalkFault::NotPresent { level, .. }
            | WalkFault::Permission { level, .. }
            | WalkFault::AccessFlag { level, .. }
            | WalkFault::ReservedBits { level, .. }
            | WalkFault::AddressSize { level, .. }
            | WalkFault::BadTableAddress { level, .. }
            | WalkFault::UpdateContention { level, .. } => Some(level),
            _ => None,
        }
    }
}

/// A table configuration (from ATTACH_TABLE) the walkers refuse: the
/// daemon answers the request with `S_INVAL` / `S_UNSUPP`.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `addr_width` is not 48 (4-level) or 57 (5-level).
    #[error("unsupported VT-d address width {0} (48 or 57)")]
    AddressWidth(u32),
    /// `fl_flags` has bits this walker does not know.
    #[error("unknown first-stage flags {0:#x}")]
    UnknownFlags(u64),
    /// The output (guest-physical) address width is outside 32..=52.
    #[error("unsupported output address width {0} (32..=52)")]
    OutputWidth(u8),
    /// The root pointer is misaligned or beyond the output address width.
    #[error("table root {0:#x} is misaligned or beyond the output address width")]
    RootAddress(u64),
    /// `s1fmt` is not LINEAR, 4K_L2 or 64K_L2.
    #[error("unknown CD table format {0}")]
    CdTableFormat(u8),
    /// `s1cdmax` is above 20 (PCIe PASIDs have 20 bits).
    #[error("s1cdmax {0} is above 20")]
    CdMax(u32),
}
