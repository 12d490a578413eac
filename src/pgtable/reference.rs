// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reference walkers for the property tests: written as plainly as
//! possible, straight from the manuals' descriptions (Intel SDM vol. 3
//! §4.5 / VT-d §3.6 for IA-32e first stage, Arm ARM D8 VMSAv8-64 and the
//! SMMUv3 CD format), sharing no code with the real walkers. Bits are
//! named by number, fields are extracted bit by bit, memory is a plain
//! vector of words, and nothing is fast.

use super::{PageAccess, PageTranslation, WalkFault};

/// Guest RAM `[0, 8 * words.len())` as little-endian 64-bit words.
pub struct RefMem {
    pub words: Vec<u64>,
}

impl RefMem {
    fn read(&self, addr: u64) -> Option<u64> {
        if !addr.is_multiple_of(8) {
            return None;
        }
        self.words.get(usize::try_from(addr / 8).ok()?).copied()
    }

    fn write(&mut self, addr: u64, value: u64) {
        self.words[(addr / 8) as usize] = value;
    }
}

/// Bit `n` of `x`.
fn bit(x: u64, n: u32) -> bool {
    (x >> n) & 1 == 1
}

/// Bits `hi..=lo` of `x`, shifted down.
fn bits(x: u64, hi: u32, lo: u32) -> u64 {
    let mut v = 0;
    for n in (lo..=hi).rev() {
        v = v << 1 | u64::from(bit(x, n));
    }
    v
}

/// `x` with bits below `n` cleared.
fn clear_below(x: u64, n: u32) -> u64 {
    let mut v = x;
    for b in 0..n {
        v &= !(1 << b);
    }
    v
}

/// Parameters of a `PGTF_VTD` attachment.
pub struct X86Params {
    pub root: u64,
    pub levels: u32,
    pub out_bits: u32,
    pub sre: bool,
    pub wpe: bool,
    pub eafe: bool,
}

/// IA-32e first-stage translation of `va`, as VT-d hardware does it.
pub fn x86_translate(
    mem: &mut RefMem,
    p: &X86Params,
    va: u64,
    acc: PageAccess,
) -> Result<PageTranslation, WalkFault> {
    if acc.privileged && !p.sre {
        return Err(WalkFault::SupervisorDisabled);
    }
    // Canonical: bits 63 down to the top input bit are all the same.
    let top_bit = if p.levels == 5 { 56 } else { 47 };
    for b in top_bit..64 {
        if bit(va, b) != bit(va, top_bit) {
            return Err(WalkFault::AddressOutOfRange { va });
        }
    }

    let mut user_everywhere = true;
    let mut rw_everywhere = true;
    let mut xd_somewhere = false;
    let mut table = p.root;
    let mut level = p.levels;
    loop {
        let lo = 12 + 9 * (level - 1);
        let index = bits(va, lo + 8, lo);
        let addr = table + 8 * index;
        let Some(e) = mem.read(addr) else {
            return Err(WalkFault::BadTableAddress {
                level: level as u8,
                entry: addr,
            });
        };
        let level8 = level as u8;
        // Bit 0: present.
        if !bit(e, 0) {
            return Err(WalkFault::NotPresent {
                level: level8,
                entry: addr,
            });
        }
        // Bit 7: page size (reserved in PML5E and PML4E).
        let page_size = bit(e, 7);
        let mut reserved = false;
        for b in p.out_bits..52 {
            reserved |= bit(e, b);
        }
        if level >= 4 && page_size {
            reserved = true;
        }
        if level == 3 && page_size && bits(e, 29, 13) != 0 {
            reserved = true;
        }
        if level == 2 && page_size && bits(e, 20, 13) != 0 {
            reserved = true;
        }
        if reserved {
            return Err(WalkFault::ReservedBits {
                level: level8,
                entry: addr,
                value: e,
            });
        }
        let leaf = level == 1 || page_size;
        // Bit 1: R/W, bit 2: U/S, bit 63: XD.
        let user_denied = !acc.privileged && !bit(e, 2);
        // Supervisor writes ignore R/W unless WPE is set.
        let write_denied = acc.write && !bit(e, 1) && (!acc.privileged || p.wpe);
        let fetch_denied = acc.execute && bit(e, 63);
        // A supervisor fetch from a user page: U/S set at every level.
        let smep_denied = leaf && acc.execute && acc.privileged && user_everywhere && bit(e, 2);
        let denied = user_denied || write_denied || fetch_denied || smep_denied;
        if denied {
            return Err(WalkFault::Permission {
                level: level8,
                entry: addr,
            });
        }
        // Bit 5: accessed; bit 10: extended accessed; bit 6: dirty.
        let mut updated = e | 1 << 5;
        if p.eafe {
            updated |= 1 << 10;
        }
        if leaf && acc.write {
            updated |= 1 << 6;
        }
        if updated != e {
            mem.write(addr, updated);
        }
        user_everywhere = user_everywhere && bit(e, 2);
        rw_everywhere = rw_everywhere && bit(e, 1);
        xd_somewhere = xd_somewhere || bit(e, 63);
        if leaf {
            let writable = rw_everywhere || (acc.privileged && !p.wpe);
            return Ok(PageTranslation {
                va: clear_below(va, lo),
                gpa: bits(updated, p.out_bits - 1, lo) << lo,
                page_shift: lo as u8,
                writable,
                user: user_everywhere,
                executable: if acc.privileged {
                    !xd_somewhere && !user_everywhere
                } else {
                    !xd_somewhere
                },
                dirty: writable && bit(updated, 6),
            });
        }
        table = bits(e, p.out_bits - 1, 12) << 12;
        level -= 1;
    }
}

/// Parameters of a `PSTF_ARM_SMMU_V3` attachment.
pub struct ArmParams {
    pub s1fmt: u8,
    pub s1cdmax: u32,
    pub ptr: u64,
    pub out_bits: u32,
}

/// CD look-up and AArch64 stage-1 translation of `va` for substream
/// `ssid`, as an SMMUv3 with HTTU does it.
pub fn arm_translate(
    mem: &mut RefMem,
    p: &ArmParams,
    ssid: u32,
    va: u64,
    acc: PageAccess,
) -> Result<PageTranslation, WalkFault> {
    // --- The context descriptor.
    let count = 2u64.pow(p.s1cdmax);
    if u64::from(ssid) >= count {
        return Err(WalkFault::SsidOutOfRange { ssid, count });
    }
    let ssid64 = u64::from(ssid);
    let cd = if p.s1cdmax == 0 || p.s1fmt == 0 {
        p.ptr + 64 * ssid64
    } else {
        let split = if p.s1fmt == 1 { 6 } else { 10 };
        let l1 = p.ptr + 8 * (ssid64 / 2u64.pow(split));
        let Some(d) = mem.read(l1) else {
            return Err(WalkFault::CdFetch { ssid, entry: l1 });
        };
        if !bit(d, 0) {
            return Err(WalkFault::CdL1Invalid { ssid, entry: l1 });
        }
        (bits(d, 51, 12) << 12) + 64 * (ssid64 % 2u64.pow(split))
    };
    let Some(w0) = mem.read(cd) else {
        return Err(WalkFault::CdFetch { ssid, entry: cd });
    };
    if !bit(w0, 31) {
        return Err(WalkFault::CdInvalid { ssid, entry: cd });
    }
    let Some(w1) = mem.read(cd + 8) else {
        return Err(WalkFault::CdFetch {
            ssid,
            entry: cd + 8,
        });
    };
    let malformed = WalkFault::CdMalformed {
        ssid,
        entry: cd,
        reason: "",
    };
    if !bit(w0, 41) || bit(w0, 15) {
        return Err(malformed);
    }
    let granule_bits = match bits(w0, 7, 6) {
        0 => 12,
        1 => 16,
        2 => 14,
        _ => return Err(malformed),
    };
    let t0sz = bits(w0, 5, 0) as u32;
    if !(16..=39).contains(&t0sz) {
        return Err(malformed);
    }
    let ips = [32, 36, 40, 42, 44, 48, 48, 48][bits(w0, 34, 32) as usize];
    let oas = ips.min(p.out_bits).min(48);
    let epd0 = bit(w0, 14);
    let tbi0 = bit(w0, 38);
    let ha = bit(w0, 43);
    let hd = bit(w0, 42) && ha;
    let ttb0 = bits(w1, 51, 4) << 4;

    // --- The stage-1 walk.
    if epd0 {
        return Err(WalkFault::WalkDisabled { ssid });
    }
    let va = if tbi0 && !bit(va, 55) {
        bits(va, 55, 0)
    } else {
        va
    };
    let input_bits = 64 - t0sz;
    for b in input_bits..64 {
        if bit(va, b) {
            return Err(WalkFault::AddressOutOfRange { va });
        }
    }
    let stride = granule_bits - 3;
    let lowest_bit = |level: u32| granule_bits + stride * (3 - level);
    let mut start = 3;
    while start > 0 && input_bits > lowest_bit(start) + stride {
        start -= 1;
    }
    let start_table_size_bits = 3 + input_bits - lowest_bit(start);
    let mut table = clear_below(ttb0, start_table_size_bits);
    if bits(table, 63, oas) != 0 {
        return Err(WalkFault::AddressSize {
            level: start as u8,
            entry: ttb0,
        });
    }

    let mut no_el0 = false;
    let mut read_only = false;
    let mut table_pxn = false;
    let mut table_uxn = false;
    for level in start..=3 {
        let level8 = level as u8;
        let lo = lowest_bit(level);
        let hi = if level == start {
            input_bits - 1
        } else {
            lo + stride - 1
        };
        let addr = table + 8 * bits(va, hi, lo);
        let Some(d) = mem.read(addr) else {
            return Err(WalkFault::BadTableAddress {
                level: level8,
                entry: addr,
            });
        };
        let translation_fault = WalkFault::NotPresent {
            level: level8,
            entry: addr,
        };
        if !bit(d, 0) {
            return Err(translation_fault);
        }
        let is_table = level < 3 && bit(d, 1);
        if level == 3 && !bit(d, 1) {
            return Err(translation_fault);
        }
        if level < 3 && !bit(d, 1) {
            let block_ok = match granule_bits {
                12 => level == 1 || level == 2,
                _ => level == 2,
            };
            if !block_ok {
                return Err(translation_fault);
            }
        }
        let addr_lo = if is_table || level == 3 {
            granule_bits
        } else {
            lo
        };
        let out = bits(d, 47, addr_lo) << addr_lo;
        if bits(out, 63, oas) != 0 {
            return Err(WalkFault::AddressSize {
                level: level8,
                entry: addr,
            });
        }
        if is_table {
            table_pxn |= bit(d, 59);
            table_uxn |= bit(d, 60);
            no_el0 |= bit(d, 61);
            read_only |= bit(d, 62);
            table = out;
            continue;
        }

        // Leaf: AF bit 10, AP[1] bit 6, AP[2] bit 7, DBM bit 51,
        // PXN bit 53, UXN bit 54.
        if !bit(d, 10) && !ha {
            return Err(WalkFault::AccessFlag {
                level: level8,
                entry: addr,
            });
        }
        let el0 = bit(d, 6) && !no_el0;
        let write_now = !bit(d, 7) && !read_only;
        let write_after_dirtying = bit(d, 7) && bit(d, 51) && hd && !read_only;
        let writable = write_now || write_after_dirtying;
        let pxn = bit(d, 53) || table_pxn || (el0 && write_now);
        let uxn = bit(d, 54) || table_uxn;
        let permission_fault = WalkFault::Permission {
            level: level8,
            entry: addr,
        };
        if !acc.privileged && !el0 {
            return Err(permission_fault);
        }
        if acc.write && !writable {
            return Err(permission_fault);
        }
        if acc.execute && acc.privileged && pxn {
            return Err(permission_fault);
        }
        if acc.execute && !acc.privileged && uxn {
            return Err(permission_fault);
        }
        let mut updated = d | 1 << 10;
        if acc.write && bit(d, 7) {
            updated &= !(1 << 7);
        }
        if updated != d {
            mem.write(addr, updated);
        }
        return Ok(PageTranslation {
            va: clear_below(va, lo),
            gpa: out,
            page_shift: lo as u8,
            writable,
            user: el0,
            executable: if acc.privileged { !pxn } else { !uxn },
            dirty: writable && !bit(updated, 7),
        });
    }
    // Level 3 always ends the walk above; keep the compiler content.
    Err(WalkFault::NotPresent {
        level: 3,
        entry: table,
    })
}
