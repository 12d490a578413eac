// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `PGTF_VTD`: the VT-d first-stage walker, i.e. the IA-32e (x86-64 CPU)
//! page-table format a guest binds to a PASID for SVA.
//!
//! Supported: 4-level (`addr_width` 48) and 5-level (57) tables; 4 KiB,
//! 2 MiB and 1 GiB pages; the `fl_flags` of `iommu_hwpt_vtd_s1`:
//! - SRE: supervisor requests allowed (without it they fault);
//! - WPE: supervisor writes honour R/W (without it they ignore it);
//! - EAFE: the walker sets EA (bit 10) together with A.
//!
//! Rules, per level from the root down (the order of QEMU's first-stage
//! walk, with reserved bits judged before permissions as a CPU does):
//! present, reserved bits, permission of this level, then A (and EA) is set
//! by compare-exchange; on the leaf a write also sets D in the same
//! compare-exchange. Reserved bits are QEMU's first-stage masks: bits
//! [51:output width], PS in a PML5E/PML4E, bits [29:13] of a 1 GiB and
//! [20:13] of a 2 MiB page; bits 62:52 are ignored and bit 63 is XD (the
//! walker behaves as a CPU with EFER.NXE=1, as every 64-bit kernel runs).
//! Access rights as VT-d first-stage: user requests need U/S=1 at every
//! level; writes need R/W=1 at every level, except supervisor writes with
//! WPE=0; execute needs XD=0 at every level, and supervisor instruction
//! fetches from a user page (U/S=1 at every level) fault, as with SMEP.

use super::{ConfigError, PageAccess, PageTranslation, TableMemory, WalkFault, MAX_UPDATE_RETRIES};

/// `fl_flags` SRE: supervisor requests are allowed.
pub const VTD_S1_SRE: u64 = 1 << 0;
/// `fl_flags` EAFE: the extended accessed flag (bit 10) is set with A.
pub const VTD_S1_EAFE: u64 = 1 << 1;
/// `fl_flags` WPE: supervisor writes honour R/W.
pub const VTD_S1_WPE: u64 = 1 << 2;

const KNOWN_FLAGS: u64 = VTD_S1_SRE | VTD_S1_EAFE | VTD_S1_WPE;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const EA: u64 = 1 << 10;
const XD: u64 = 1 << 63;
/// Low address bits of a 1 GiB page that must be zero (bit 12 is PAT).
const RSVD_1G: u64 = 0x3fff_e000;
/// Low address bits of a 2 MiB page that must be zero (bit 12 is PAT).
const RSVD_2M: u64 = 0x001f_e000;

/// A `PGTF_VTD` table as ATTACH_TABLE describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdConfig {
    /// Guest-physical address of the root table (PML4 or PML5), 4 KiB
    /// aligned, like a CR3 without flags.
    pub pgd: u64,
    /// Input address width: 48 (4-level) or 57 (5-level).
    pub addr_width: u32,
    /// `VTD_S1_*` flags; unknown bits are refused.
    pub fl_flags: u64,
    /// Guest-physical address width (e.g. 48): bits of an entry from this
    /// width up to 51 are reserved.
    pub output_bits: u8,
}

/// A validated `PGTF_VTD` table, ready to translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdFirstStage {
    config: VtdConfig,
    levels: u8,
    /// Bits [51:output_bits]: reserved in every entry.
    rsvd_high: u64,
    /// Bits [output_bits-1:12]: the address field of an entry.
    addr_mask: u64,
    /// A, plus EA with EAFE: what every used entry gets set.
    accessed: u64,
}

impl VtdFirstStage {
    /// Validates `config`: the address width, the flags, the output width
    /// and the root pointer.
    pub fn new(config: VtdConfig) -> Result<Self, ConfigError> {
        let levels = match config.addr_width {
            48 => 4,
            57 => 5,
            other => return Err(ConfigError::AddressWidth(other)),
        };
        if config.fl_flags & !KNOWN_FLAGS != 0 {
            return Err(ConfigError::UnknownFlags(config.fl_flags & !KNOWN_FLAGS));
        }
        if !(32..=52).contains(&config.output_bits) {
            return Err(ConfigError::OutputWidth(config.output_bits));
        }
        let below_output = (1u64 << config.output_bits) - 1;
        if config.pgd & 0xfff != 0 || config.pgd & !below_output != 0 {
            return Err(ConfigError::RootAddress(config.pgd));
        }
        let accessed = if config.fl_flags & VTD_S1_EAFE != 0 {
            A | EA
        } else {
            A
        };
        Ok(VtdFirstStage {
            config,
            levels,
            rsvd_high: ((1u64 << 52) - 1) & !below_output,
            addr_mask: below_output & !0xfff,
            accessed,
        })
    }

    /// The configuration this walker was built from.
    pub const fn config(&self) -> VtdConfig {
        self.config
    }

    /// Number of paging levels: 4 or 5.
    pub const fn levels(&self) -> u8 {
        self.levels
    }

    /// Translates `va` for `access`, setting accessed (and on a write,
    /// dirty) flags in the guest's entries as VT-d first-stage hardware
    /// does.
    pub fn translate<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: PageAccess,
    ) -> Result<PageTranslation, WalkFault> {
        let cfg = &self.config;
        if access.privileged && cfg.fl_flags & VTD_S1_SRE == 0 {
            return Err(WalkFault::SupervisorDisabled);
        }
        // Canonical: bits 63..addr_width-1 all equal.
        let unused = 64 - cfg.addr_width;
        if ((va << unused) as i64 >> unused) as u64 != va {
            return Err(WalkFault::AddressOutOfRange { va });
        }

        let mut walk = Walk {
            access,
            wpe: cfg.fl_flags & VTD_S1_WPE != 0,
            user: true,
            writable: true,
            no_exec: false,
            retries: MAX_UPDATE_RETRIES,
        };
        let mut table = cfg.pgd;
        let mut level = self.levels;
        loop {
            let shift = 12 + 9 * u32::from(level - 1);
            let entry = table + ((va >> shift) & 0x1ff) * 8;
            let mut pte = mem
                .read_u64(entry)
                .map_err(|_| WalkFault::BadTableAddress { level, entry })?;
            let leaf = loop {
                let leaf = self.check(&walk, level, entry, pte)?;
                let want = if leaf && access.write {
                    self.accessed | D
                } else {
                    self.accessed
                };
                if pte & want == want {
                    break leaf;
                }
                match mem.compare_exchange_u64(entry, pte, pte | want) {
                    Ok(Ok(_)) => {
                        pte |= want;
                        break leaf;
                    }
                    // The guest changed the entry: judge the new value.
                    Ok(Err(actual)) if walk.retries > 0 => {
                        walk.retries -= 1;
                        pte = actual;
                    }
                    Ok(Err(_)) => return Err(WalkFault::UpdateContention { level, entry }),
                    Err(_) => return Err(WalkFault::BadTableAddress { level, entry }),
                }
            };
            walk.user &= pte & US != 0;
            walk.writable &= pte & RW != 0;
            walk.no_exec |= pte & XD != 0;
            if leaf {
                let page_shift = shift as u8;
                let page_mask = (1u64 << shift) - 1;
                let writable = walk.writable || (access.privileged && !walk.wpe);
                return Ok(PageTranslation {
                    va: va & !page_mask,
                    gpa: pte & self.addr_mask & !page_mask,
                    page_shift,
                    writable,
                    user: walk.user,
                    // Supervisor fetches from user pages fault (SMEP).
                    executable: !(walk.no_exec || access.privileged && walk.user),
                    dirty: writable && pte & D != 0,
                });
            }
            table = pte & self.addr_mask;
            // Level 1 entries are always leaves, so this never goes below 1.
            level -= 1;
        }
    }

    /// Judges one entry for the walk so far; returns whether it is a leaf.
    fn check(&self, walk: &Walk, level: u8, entry: u64, pte: u64) -> Result<bool, WalkFault> {
        if pte & P == 0 {
            return Err(WalkFault::NotPresent { level, entry });
        }
        let large = pte & PS != 0;
        let reserved = self.rsvd_high
            | match (level, large) {
                (4 | 5, _) => PS,
                (3, true) => RSVD_1G,
                (2, true) => RSVD_2M,
                _ => 0,
            };
        // Bits 62:52 are ignored: `reserved` never reaches above bit 51.
        if pte & reserved != 0 {
            return Err(WalkFault::ReservedBits {
                level,
                entry,
                value: pte,
            });
        }
        let leaf = level == 1 || large;
        let access = walk.access;
        let denied = (!access.privileged && pte & US == 0)
            || (access.write && pte & RW == 0 && (!access.privileged || walk.wpe))
            || (access.execute && pte & XD != 0)
            // Supervisor fetches from user pages fault (SMEP semantics).
            || (leaf && access.execute && access.privileged && walk.user && pte & US != 0);
        if denied {
            return Err(WalkFault::Permission { level, entry });
        }
        Ok(leaf)
    }
}

/// What a walk has accumulated from the levels above the current one.
struct Walk {
    access: PageAccess,
    wpe: bool,
    /// U/S=1 at every level so far.
    user: bool,
    /// R/W=1 at every level so far.
    writable: bool,
    /// XD=1 at some level so far.
    no_exec: bool,
    /// Lost compare-exchanges this walk may still absorb.
    retries: u32,
}
