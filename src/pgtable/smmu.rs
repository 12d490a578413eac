// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `PSTF_ARM_SMMU_V3`: the guest's SMMUv3 context-descriptor (CD) table
//! and the AArch64 stage-1 walk of the CD it selects.
//!
//! CD table: linear, or two-level with 4 KiB (64 CDs) or 64 KiB (1024
//! CDs) leaf tables, `2^s1cdmax` CDs in all (`s1cdmax` = 0: one CD, the
//! format is ignored, as with substreams disabled). L1 descriptor: V bit
//! 0, L2Ptr bits [51:12]. CD word 0: T0SZ[5:0], TG0[7:6], EPD0 14, ENDI
//! 15, V 31, IPS[34:32], TBI0 38, AA64 41, HD 42, HA 43, ASID[63:48];
//! word 1: TTB0[51:4] (Linux `CTXDESC_CD_*`). Fields SVA does not use
//! (TTB1 and its controls, MAIR, AFFD, WXN, PAN) are not decoded and act
//! as 0.
//!
//! Stage 1 (VMSAv8-64, TTB0 only, 48-bit output at most): 4K, 16K and 64K
//! granules; start level from T0SZ; TTB0 aligned down to its table size
//! (the pseudocode's treatment of misaligned bits); blocks where the
//! granule has them without FEAT_LPA (4K: levels 1-2; 16K, 64K: level 2).
//! Per level: invalid -> Translation fault; address above the output size
//! -> Address Size fault; table descriptors accumulate APTable, UXNTable
//! and PXNTable. At the leaf: AF=0 without HA -> Access flag fault; then
//! permissions (AP[1] EL0, AP[2] read-only, UXN/PXN, EL0-writable implies
//! PXN); then one compare-exchange sets AF (HA) and, for a write to a
//! DBM=1 read-only page with HD, clears AP[2] (marks it dirty), as SMMU
//! HTTU does.

use super::{ConfigError, PageAccess, PageTranslation, TableMemory, WalkFault, MAX_UPDATE_RETRIES};

/// `s1fmt`: a linear CD table.
pub const S1FMT_LINEAR: u8 = 0;
/// `s1fmt`: two levels, 4 KiB leaf tables (`SSID[5:0]` indexes the leaf).
pub const S1FMT_4K_L2: u8 = 1;
/// `s1fmt`: two levels, 64 KiB leaf tables (`SSID[9:0]` indexes the leaf).
pub const S1FMT_64K_L2: u8 = 2;

const CD_SIZE: u64 = 64;
const L1_V: u64 = 1 << 0;
const L1_L2PTR: u64 = 0x000f_ffff_ffff_f000;

const CD0_T0SZ_MASK: u64 = 0x3f;
const CD0_TG0_SHIFT: u32 = 6;
const CD0_EPD0: u64 = 1 << 14;
const CD0_ENDI: u64 = 1 << 15;
const CD0_V: u64 = 1 << 31;
const CD0_IPS_SHIFT: u32 = 32;
const CD0_TBI0: u64 = 1 << 38;
const CD0_AA64: u64 = 1 << 41;
const CD0_HD: u64 = 1 << 42;
const CD0_HA: u64 = 1 << 43;
const CD0_ASID_SHIFT: u32 = 48;
const CD1_TTB0: u64 = 0x000f_ffff_ffff_fff0;

const DESC_VALID: u64 = 1 << 0;
const DESC_TABLE: u64 = 1 << 1;
const AP_EL0: u64 = 1 << 6;
const AP_RO: u64 = 1 << 7;
const AF: u64 = 1 << 10;
const DBM: u64 = 1 << 51;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
const PXN_TABLE: u64 = 1 << 59;
const UXN_TABLE: u64 = 1 << 60;
const AP_TABLE_NO_EL0: u64 = 1 << 61;
const AP_TABLE_RO: u64 = 1 << 62;
/// Output address bits of a descriptor without FEAT_LPA: [47:0].
const OA_BITS: u64 = (1 << 48) - 1;
/// Largest output size this walker implements (no 52-bit descriptors).
const MAX_OAS: u8 = 48;

/// A `PSTF_ARM_SMMU_V3` CD table as ATTACH_TABLE describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuCdConfig {
    /// `S1FMT_*` layout of the table.
    pub s1fmt: u8,
    /// log2 of the number of CDs (0..=20).
    pub s1cdmax: u32,
    /// Guest-physical address of the (L1 or linear) table, 64-byte aligned.
    pub s1contextptr: u64,
    /// Guest-physical address width (e.g. 48): the IPS of every CD is
    /// clamped to it.
    pub output_bits: u8,
}

/// A validated CD table, ready to look up substreams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuCdTable {
    config: SmmuCdConfig,
}

impl SmmuCdTable {
    /// Validates `config`: format, size, pointer and output width.
    pub fn new(config: SmmuCdConfig) -> Result<Self, ConfigError> {
        if config.s1fmt > S1FMT_64K_L2 {
            return Err(ConfigError::CdTableFormat(config.s1fmt));
        }
        if config.s1cdmax > 20 {
            return Err(ConfigError::CdMax(config.s1cdmax));
        }
        if !(32..=52).contains(&config.output_bits) {
            return Err(ConfigError::OutputWidth(config.output_bits));
        }
        if !config.s1contextptr.is_multiple_of(CD_SIZE)
            || config.s1contextptr >> config.output_bits != 0
        {
            return Err(ConfigError::RootAddress(config.s1contextptr));
        }
        Ok(SmmuCdTable { config })
    }

    /// The configuration this table was built from.
    pub const fn config(&self) -> SmmuCdConfig {
        self.config
    }

    /// Finds and decodes the CD of substream `ssid` (a PASID). The daemon
    /// may cache the result until the guest invalidates the CD.
    pub fn context_descriptor<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        ssid: u32,
    ) -> Result<ContextDescriptor, WalkFault> {
        let cfg = &self.config;
        let count = 1u64 << cfg.s1cdmax;
        if u64::from(ssid) >= count {
            return Err(WalkFault::SsidOutOfRange { ssid, count });
        }
        let ssid64 = u64::from(ssid);
        let fetch = |entry| {
            mem.read_u64(entry)
                .map_err(|_| WalkFault::CdFetch { ssid, entry })
        };
        let cd = if cfg.s1cdmax == 0 || cfg.s1fmt == S1FMT_LINEAR {
            cfg.s1contextptr + ssid64 * CD_SIZE
        } else {
            let split = if cfg.s1fmt == S1FMT_4K_L2 { 6 } else { 10 };
            let l1 = cfg.s1contextptr + (ssid64 >> split) * 8;
            let desc = fetch(l1)?;
            if desc & L1_V == 0 {
                return Err(WalkFault::CdL1Invalid { ssid, entry: l1 });
            }
            (desc & L1_L2PTR) + (ssid64 & ((1 << split) - 1)) * CD_SIZE
        };
        let word0 = fetch(cd)?;
        if word0 & CD0_V == 0 {
            return Err(WalkFault::CdInvalid { ssid, entry: cd });
        }
        let word1 = fetch(cd + 8)?;
        ContextDescriptor::decode(ssid, cd, [word0, word1], cfg.output_bits)
    }

    /// Translates `va` of substream `ssid`: the CD look-up, then the
    /// stage-1 walk.
    pub fn translate<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        ssid: u32,
        va: u64,
        access: PageAccess,
    ) -> Result<PageTranslation, WalkFault> {
        self.context_descriptor(mem, ssid)?
            .translate(mem, va, access)
    }
}

/// Translation granule of a stage-1 table (CD.TG0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB pages, 512 entries a table.
    K4,
    /// 16 KiB pages, 2048 entries a table.
    K16,
    /// 64 KiB pages, 8192 entries a table.
    K64,
}

impl Granule {
    /// log2 of the granule size.
    pub const fn shift(self) -> u32 {
        match self {
            Granule::K4 => 12,
            Granule::K16 => 14,
            Granule::K64 => 16,
        }
    }

    /// Whether a block descriptor is allowed at `level` (no FEAT_LPA).
    const fn has_block(self, level: u8) -> bool {
        match self {
            Granule::K4 => level == 1 || level == 2,
            Granule::K16 | Granule::K64 => level == 2,
        }
    }
}

/// A valid, decoded context descriptor: what a stage-1 walk needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextDescriptor {
    ssid: u32,
    entry: u64,
    ttb0: u64,
    t0sz: u8,
    granule: Granule,
    oas: u8,
    asid: u16,
    epd0: bool,
    tbi0: bool,
    ha: bool,
    hd: bool,
}

impl ContextDescriptor {
    /// Decodes the first two words of the valid CD at `entry`.
    fn decode(ssid: u32, entry: u64, words: [u64; 2], output_bits: u8) -> Result<Self, WalkFault> {
        let [w0, w1] = words;
        let malformed = |reason| WalkFault::CdMalformed {
            ssid,
            entry,
            reason,
        };
        if w0 & CD0_AA64 == 0 {
            return Err(malformed("AArch32 tables (AA64=0) are not supported"));
        }
        if w0 & CD0_ENDI != 0 {
            return Err(malformed("big-endian tables (ENDI=1) are not supported"));
        }
        let granule = match (w0 >> CD0_TG0_SHIFT) & 3 {
            0 => Granule::K4,
            1 => Granule::K64,
            2 => Granule::K16,
            _ => return Err(malformed("reserved TG0 granule")),
        };
        let t0sz = (w0 & CD0_T0SZ_MASK) as u8;
        if !(16..=39).contains(&t0sz) {
            return Err(malformed("T0SZ outside 16..=39"));
        }
        // IPS values above what the SMMU implements act as its OAS.
        let ips_bits = match (w0 >> CD0_IPS_SHIFT) & 7 {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            _ => MAX_OAS,
        };
        let ha = w0 & CD0_HA != 0;
        Ok(ContextDescriptor {
            ssid,
            entry,
            ttb0: w1 & CD1_TTB0,
            t0sz,
            granule,
            oas: ips_bits.min(output_bits).min(MAX_OAS),
            asid: (w0 >> CD0_ASID_SHIFT) as u16,
            epd0: w0 & CD0_EPD0 != 0,
            tbi0: w0 & CD0_TBI0 != 0,
            ha,
            // Dirty state management needs access flag management.
            hd: ha && w0 & CD0_HD != 0,
        })
    }

    /// The CD's ASID (the tag of its TLB entries).
    pub const fn asid(&self) -> u16 {
        self.asid
    }

    /// Translation granule of TTB0's table.
    pub const fn granule(&self) -> Granule {
        self.granule
    }

    /// Input address width of TTB0's region (64 - T0SZ).
    pub const fn input_bits(&self) -> u8 {
        64 - self.t0sz
    }

    /// Effective output address width (IPS clamped to the table's output
    /// width and to 48).
    pub const fn output_bits(&self) -> u8 {
        self.oas
    }

    /// Whether the walker sets AF (HA) and marks DBM pages dirty (HD).
    pub const fn hardware_updates(&self) -> (bool, bool) {
        (self.ha, self.hd)
    }

    /// Walks TTB0's table for `va`, updating AF and dirty state as SMMU
    /// HTTU does when the CD enables it.
    pub fn translate<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: PageAccess,
    ) -> Result<PageTranslation, WalkFault> {
        if self.epd0 {
            return Err(WalkFault::WalkDisabled { ssid: self.ssid });
        }
        let input_bits = u32::from(64 - self.t0sz);
        // With TBI0 the top byte is a tag: ignored, and cleared in results.
        let va = if self.tbi0 && va & (1 << 55) == 0 {
            va & 0x00ff_ffff_ffff_ffff
        } else {
            va
        };
        if va >> input_bits != 0 {
            return Err(WalkFault::AddressOutOfRange { va });
        }

        let g = self.granule.shift();
        let stride = g - 3;
        let levels = (input_bits - g).div_ceil(stride);
        let mut level = (4 - levels) as u8;
        let level_shift = |level: u8| g + stride * (3 - u32::from(level));
        // TTB0 bits below the start table's size are treated as zero.
        let start_table_bits = 3 + input_bits - level_shift(level);
        let mut table = self.ttb0 & !((1u64 << start_table_bits) - 1);
        if table >> self.oas != 0 {
            return Err(WalkFault::AddressSize {
                level,
                entry: self.ttb0,
            });
        }

        let mut attrs = TableAttrs::default();
        let mut retries = MAX_UPDATE_RETRIES;
        loop {
            let shift = level_shift(level);
            let entry = table + ((va >> shift) & ((1 << stride) - 1)) * 8;
            let mut desc = mem
                .read_u64(entry)
                .map_err(|_| WalkFault::BadTableAddress { level, entry })?;
            loop {
                if desc & DESC_VALID == 0 {
                    return Err(WalkFault::NotPresent { level, entry });
                }
                let is_table = level < 3 && desc & DESC_TABLE != 0;
                let leaf_shift = if is_table || level == 3 { g } else { shift };
                let invalid_leaf = if level == 3 {
                    desc & DESC_TABLE == 0
                } else {
                    !is_table && !self.granule.has_block(level)
                };
                if invalid_leaf {
                    return Err(WalkFault::NotPresent { level, entry });
                }
                let address = desc & OA_BITS & !((1u64 << leaf_shift) - 1);
                if address >> self.oas != 0 {
                    return Err(WalkFault::AddressSize { level, entry });
                }
                if is_table {
                    attrs.accumulate(desc);
                    table = address;
                    break;
                }

                let leaf = self.judge_leaf(&attrs, level, entry, desc, access)?;
                if leaf.new_desc != desc {
                    match mem.compare_exchange_u64(entry, desc, leaf.new_desc) {
                        Ok(Ok(_)) => {}
                        Ok(Err(actual)) if retries > 0 => {
                            // The guest changed the descriptor: judge the new one.
                            retries -= 1;
                            desc = actual;
                            continue;
                        }
                        Ok(Err(_)) => return Err(WalkFault::UpdateContention { level, entry }),
                        Err(_) => return Err(WalkFault::BadTableAddress { level, entry }),
                    }
                }
                let page_mask = (1u64 << shift) - 1;
                return Ok(PageTranslation {
                    va: va & !page_mask,
                    gpa: address,
                    page_shift: shift as u8,
                    writable: leaf.writable,
                    user: leaf.user,
                    executable: leaf.executable,
                    dirty: leaf.writable && leaf.new_desc & AP_RO == 0,
                });
            }
            // Level 3 descriptors are always leaves, so this stops at 3.
            level += 1;
        }
    }

    /// Access flag and permission checks of a leaf; what it allows and the
    /// descriptor after the hardware updates this access makes.
    fn judge_leaf(
        &self,
        attrs: &TableAttrs,
        level: u8,
        entry: u64,
        desc: u64,
        access: PageAccess,
    ) -> Result<Leaf, WalkFault> {
        if desc & AF == 0 && !self.ha {
            return Err(WalkFault::AccessFlag { level, entry });
        }
        let user = desc & AP_EL0 != 0 && !attrs.no_el0;
        let write_now = desc & AP_RO == 0 && !attrs.read_only;
        let write_dirtying = desc & AP_RO != 0 && desc & DBM != 0 && self.hd && !attrs.read_only;
        let writable = write_now || write_dirtying;
        // Memory writable at EL0 is never executable at EL1.
        let pxn = desc & PXN != 0 || attrs.pxn || (user && write_now);
        let uxn = desc & UXN != 0 || attrs.uxn;
        let executable = if access.privileged { !pxn } else { !uxn };
        let denied = (!access.privileged && !user)
            || (access.write && !writable)
            || (access.execute && !executable);
        if denied {
            return Err(WalkFault::Permission { level, entry });
        }
        let mut new_desc = desc | AF;
        if access.write {
            new_desc &= !AP_RO;
        }
        Ok(Leaf {
            writable,
            user,
            executable,
            new_desc,
        })
    }
}

/// Restrictions accumulated from table descriptors (hierarchical
/// permissions).
#[derive(Default)]
struct TableAttrs {
    no_el0: bool,
    read_only: bool,
    pxn: bool,
    uxn: bool,
}

impl TableAttrs {
    fn accumulate(&mut self, desc: u64) {
        self.no_el0 |= desc & AP_TABLE_NO_EL0 != 0;
        self.read_only |= desc & AP_TABLE_RO != 0;
        self.pxn |= desc & PXN_TABLE != 0;
        self.uxn |= desc & UXN_TABLE != 0;
    }
}

/// A leaf that allows the access.
struct Leaf {
    writable: bool,
    user: bool,
    executable: bool,
    new_desc: u64,
}
