// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The BAR0 register file: decoding of the guest's MMIO accesses, command
//! validation, and the state an operation leaves behind. No I/O here: the
//! device (`device.rs`) runs what `write` returns on its worker thread.

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x1000;

pub const ID: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const CAPS: u64 = 0x008;
pub const SRC: u64 = 0x010;
pub const DST: u64 = 0x018;
pub const LEN: u64 = 0x020;
pub const PATTERN: u64 = 0x028;
pub const PASID: u64 = 0x030;
pub const CMD: u64 = 0x038;
pub const STATUS: u64 = 0x03c;
pub const RESULT: u64 = 0x040;
pub const FAULT_ADDR: u64 = 0x048;
pub const FAULT_INFO: u64 = 0x050;
pub const DONE_BYTES: u64 = 0x058;

/// "VDMA" read as a little-endian 32-bit value.
pub const ID_VALUE: u32 = 0x414d_4456;
pub const VERSION_VALUE: u32 = 1;
pub const CAP_COPY: u32 = 1 << 0;
pub const CAP_FILL: u32 = 1 << 1;
pub const CAP_CHECKSUM: u32 = 1 << 2;
pub const CAP_PASID: u32 = 1 << 3;
/// The operations every device has; `CAP_PASID` is added when the device
/// translates through the daemon (`Registers::new`).
pub const CAPS_VALUE: u32 = CAP_COPY | CAP_FILL | CAP_CHECKSUM;

pub const OP_COPY: u32 = 1;
pub const OP_FILL: u32 = 2;
pub const OP_CHECKSUM: u32 = 3;
pub const CMD_OPCODE_MASK: u32 = 0xff;
pub const CMD_USE_PASID: u32 = 1 << 8;
pub const PASID_MASK: u32 = (1 << 20) - 1;

/// Largest LEN an operation accepts.
pub const MAX_LEN: u64 = 1 << 30;

pub const FAULT_REASON_TRANSLATION: u32 = 1;
pub const FAULT_REASON_PAGE_REQUEST: u32 = 2;
pub const FAULT_REASON_MEMORY: u32 = 3;
pub const FAULT_REASON_DEADLINE: u32 = 4;
pub const FAULT_INFO_WRITE: u32 = 1 << 8;

/// STATUS values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Idle = 0,
    Busy = 1,
    Done = 2,
    Fault = 3,
    Error = 4,
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// SRC -> DST.
    Copy,
    /// PATTERN repeated -> DST.
    Fill,
    /// FNV-1a of SRC -> RESULT.
    Checksum,
}

/// An operation accepted by a CMD write, with its arguments as they were
/// at that moment (later register writes do not change it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub pattern: u64,
    /// `CMD.USE_PASID`: SRC and DST are virtual addresses of this PASID.
    pub pasid: Option<u32>,
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes transferred before the operation stopped.
    pub done_bytes: u64,
    /// CHECKSUM: FNV-1a over the `done_bytes` bytes read.
    pub result: u64,
    pub fault: Option<FaultRecord>,
}

/// What FAULT_ADDR and FAULT_INFO report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// First device address (IOVA) that faulted.
    pub address: u64,
    /// `FAULT_REASON_*`.
    pub reason: u32,
    pub write: bool,
}

/// The register file.
#[derive(Clone, Debug)]
pub struct Registers {
    /// CAPS: `CAPS_VALUE`, plus `CAP_PASID` on a device that has PASIDs.
    caps: u32,
    src: u64,
    dst: u64,
    len: u64,
    pattern: u64,
    pasid: u32,
    status: Status,
    result: u64,
    fault_addr: u64,
    fault_info: u32,
    done_bytes: u64,
    /// CMD writes ignored because an operation was running.
    pub ignored_commands: u64,
    /// Accesses of a size or alignment the interface does not define.
    pub bad_accesses: u64,
}

impl Default for Registers {
    /// A device without PASID operations.
    fn default() -> Self {
        Registers {
            caps: CAPS_VALUE,
            src: 0,
            dst: 0,
            len: 0,
            pattern: 0,
            pasid: 0,
            status: Status::Idle,
            result: 0,
            fault_addr: 0,
            fault_info: 0,
            done_bytes: 0,
            ignored_commands: 0,
            bad_accesses: 0,
        }
    }
}

/// What a register write asks the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// STATUS is now BUSY: run this operation, then call `finish`.
    Start(Op),
}

/// Size of a register, or `None` at an offset that has none.
fn reg_size(base: u64) -> Option<u64> {
    match base {
        ID | VERSION | CAPS | PASID | CMD | STATUS | FAULT_INFO => Some(4),
        SRC | DST | LEN | PATTERN | RESULT | FAULT_ADDR | DONE_BYTES => Some(8),
        _ => None,
    }
}

impl Registers {
    /// The registers of a device with (`pasid`) or without PASID
    /// operations.
    pub fn new(pasid: bool) -> Registers {
        Registers {
            caps: CAPS_VALUE | if pasid { CAP_PASID } else { 0 },
            ..Registers::default()
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// Value of the register at `base` (0 where there is none).
    fn value(&self, base: u64) -> u64 {
        match base {
            ID => ID_VALUE.into(),
            VERSION => VERSION_VALUE.into(),
            CAPS => self.caps.into(),
            SRC => self.src,
            DST => self.dst,
            LEN => self.len,
            PATTERN => self.pattern,
            PASID => self.pasid.into(),
            STATUS => self.status as u64,
            RESULT => self.result,
            FAULT_ADDR => self.fault_addr,
            FAULT_INFO => self.fault_info.into(),
            DONE_BYTES => self.done_bytes,
            _ => 0, // CMD is write-only; holes read as zero
        }
    }

    /// The access `(offset, len)` as (register base, byte shift), if it is
    /// a whole register or a 32-bit half of a 64-bit one.
    fn decode(offset: u64, len: usize) -> Option<(u64, u32)> {
        let len = len as u64;
        match (len, offset % 8) {
            (8, 0) => (reg_size(offset) == Some(8)).then_some((offset, 0)),
            (4, 0) => reg_size(offset).map(|_| (offset, 0)),
            (4, 4) => match reg_size(offset - 4) {
                Some(8) => Some((offset - 4, 32)),
                _ => reg_size(offset).map(|_| (offset, 0)),
            },
            _ => None,
        }
    }

    /// An MMIO read of `data.len()` bytes at `offset` of BAR0. Defined
    /// accesses return the register; any other read inside the BAR
    /// returns the little-endian bytes of the register file (holes are 0).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if Self::decode(offset, data.len()).is_none() {
            self.bad_accesses += 1;
        }
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.wrapping_add(i as u64);
            let base = at & !7;
            let lo = self.value(base)
                & if reg_size(base) == Some(4) {
                    0xffff_ffff
                } else {
                    !0
                };
            let hi =
                reg_size(base + 4).map_or(0, |s| if s == 4 { self.value(base + 4) } else { 0 });
            let word = lo | (hi << 32);
            *byte = word.to_le_bytes()[(at & 7) as usize];
        }
    }

    /// An MMIO write. Writes that are not a whole register (or a 32-bit
    /// half of a 64-bit one), and writes to read-only registers, are
    /// ignored and counted.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> WriteEffect {
        let Some((base, shift)) = Self::decode(offset, data.len()) else {
            self.bad_accesses += 1;
            return WriteEffect::None;
        };
        let mut raw = [0u8; 8];
        raw[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(raw);
        let merge = |old: u64| -> u64 {
            if data.len() == 8 {
                value
            } else {
                let mask = 0xffff_ffffu64 << shift;
                (old & !mask) | (value << shift)
            }
        };
        match base {
            SRC => self.src = merge(self.src),
            DST => self.dst = merge(self.dst),
            LEN => self.len = merge(self.len),
            PATTERN => self.pattern = merge(self.pattern),
            PASID => self.pasid = value as u32 & PASID_MASK,
            CMD => return self.command(value as u32),
            _ => self.bad_accesses += 1,
        }
        WriteEffect::None
    }

    /// A CMD write.
    fn command(&mut self, cmd: u32) -> WriteEffect {
        if self.status == Status::Busy {
            self.ignored_commands += 1;
            return WriteEffect::None;
        }
        self.result = 0;
        self.fault_addr = 0;
        self.fault_info = 0;
        self.done_bytes = 0;
        let kind = match cmd & CMD_OPCODE_MASK {
            OP_COPY => Some(OpKind::Copy),
            OP_FILL => Some(OpKind::Fill),
            OP_CHECKSUM => Some(OpKind::Checksum),
            _ => None,
        };
        // USE_PASID needs the capability and a PASID: PASID 0 names DMA
        // without PASID, which is the command without USE_PASID.
        let pasid = (cmd & CMD_USE_PASID != 0).then_some(self.pasid);
        let pasid_ok = match pasid {
            None => true,
            Some(p) => self.caps & CAP_PASID != 0 && p != 0,
        };
        let other_bits = cmd & !(CMD_OPCODE_MASK | CMD_USE_PASID);
        match kind {
            Some(kind) if pasid_ok && other_bits == 0 && (1..=MAX_LEN).contains(&self.len) => {
                self.status = Status::Busy;
                WriteEffect::Start(Op {
                    kind,
                    src: self.src,
                    dst: self.dst,
                    len: self.len,
                    pattern: self.pattern,
                    pasid,
                })
            }
            _ => {
                self.status = Status::Error;
                WriteEffect::None
            }
        }
    }

    /// Records how the running operation ended (STATUS DONE or FAULT).
    pub fn finish(&mut self, outcome: &Outcome) {
        self.done_bytes = outcome.done_bytes;
        self.result = outcome.result;
        match outcome.fault {
            None => self.status = Status::Done,
            Some(f) => {
                self.fault_addr = f.address;
                self.fault_info = f.reason | if f.write { FAULT_INFO_WRITE } else { 0 };
                self.status = Status::Fault;
            }
        }
    }

    /// Device reset: every register back to its initial value (the
    /// counters are kept).
    pub fn reset(&mut self) {
        *self = Registers {
            caps: self.caps,
            ignored_commands: self.ignored_commands,
            bad_accesses: self.bad_accesses,
            ..Registers::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(r: &mut Registers, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        r.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn wr(r: &mut Registers, off: u64, len: usize, v: u64) -> WriteEffect {
        r.write(off, &v.to_le_bytes()[..len])
    }

    #[test]
    fn identification_registers() {
        let mut r = Registers::default();
        assert_eq!(rd(&mut r, ID, 4), 0x414d_4456);
        let mut b = [0u8; 4];
        r.read(ID, &mut b);
        assert_eq!(&b, b"VDMA");
        assert_eq!(rd(&mut r, VERSION, 4), 1);
        assert_eq!(rd(&mut r, CAPS, 4), 0b111);
        assert_eq!(rd(&mut r, STATUS, 4), Status::Idle as u64);
        // Read-only: writes are ignored and counted.
        wr(&mut r, ID, 4, 0);
        wr(&mut r, STATUS, 4, 2);
        assert_eq!(rd(&mut r, ID, 4), 0x414d_4456);
        assert_eq!(rd(&mut r, STATUS, 4), 0);
        assert_eq!(r.bad_accesses, 2);
    }

    #[test]
    fn sixty_four_bit_registers_take_whole_and_half_accesses() {
        let mut r = Registers::default();
        wr(&mut r, SRC, 8, 0x1122_3344_5566_7788);
        assert_eq!(rd(&mut r, SRC, 8), 0x1122_3344_5566_7788);
        assert_eq!(rd(&mut r, SRC, 4), 0x5566_7788);
        assert_eq!(rd(&mut r, SRC + 4, 4), 0x1122_3344);
        wr(&mut r, SRC + 4, 4, 0xaabb_ccdd);
        assert_eq!(rd(&mut r, SRC, 8), 0xaabb_ccdd_5566_7788);
        wr(&mut r, SRC, 4, 0x0102_0304);
        assert_eq!(rd(&mut r, SRC, 8), 0xaabb_ccdd_0102_0304);
        // Sub-word, misaligned or oversized writes change nothing.
        for (off, len) in [(SRC, 2), (SRC + 1, 4), (SRC + 2, 4), (CMD, 8), (SRC, 1)] {
            assert_eq!(wr(&mut r, off, len, !0), WriteEffect::None);
        }
        assert_eq!(rd(&mut r, SRC, 8), 0xaabb_ccdd_0102_0304);
        assert_eq!(r.bad_accesses, 5);
        // PASID keeps bits 19:0.
        wr(&mut r, PASID, 4, 0xffff_ffff);
        assert_eq!(rd(&mut r, PASID, 4), 0xf_ffff);
    }

    #[test]
    fn odd_reads_return_register_bytes_and_never_panic() {
        let mut r = Registers::default();
        wr(&mut r, LEN, 8, 0x0807_0605_0403_0201);
        assert_eq!(rd(&mut r, LEN + 1, 2), 0x0302);
        assert_eq!(rd(&mut r, ID + 3, 1), 0x41);
        // CMD is write-only; STATUS sits in the same 8 bytes.
        assert_eq!(rd(&mut r, CMD, 8), 0);
        let mut big = vec![0u8; BAR0_SIZE as usize];
        r.read(0, &mut big);
        assert_eq!(&big[..4], b"VDMA");
        let mut tail = [0u8; 16];
        r.read(BAR0_SIZE - 16, &mut tail);
        assert_eq!(tail, [0; 16]);
        r.read(u64::MAX - 3, &mut [0u8; 8]);
    }

    fn program(r: &mut Registers, src: u64, dst: u64, len: u64) {
        wr(r, SRC, 8, src);
        wr(r, DST, 8, dst);
        wr(r, LEN, 8, len);
    }

    #[test]
    fn commands_start_operations_with_a_snapshot_of_the_arguments() {
        let mut r = Registers::default();
        program(&mut r, 0x1000, 0x2000, 0x30);
        wr(&mut r, PATTERN, 8, 0xabcd);
        let e = wr(&mut r, CMD, 4, OP_COPY.into());
        let op = Op {
            kind: OpKind::Copy,
            src: 0x1000,
            dst: 0x2000,
            len: 0x30,
            pattern: 0xabcd,
            pasid: None,
        };
        assert_eq!(e, WriteEffect::Start(op));
        assert_eq!(r.status(), Status::Busy);
        // While busy: argument writes land, commands are ignored and counted.
        wr(&mut r, LEN, 8, 5);
        assert_eq!(wr(&mut r, CMD, 4, OP_FILL.into()), WriteEffect::None);
        assert_eq!(r.ignored_commands, 1);
        r.finish(&Outcome {
            done_bytes: 0x30,
            result: 0,
            fault: None,
        });
        assert_eq!(rd(&mut r, STATUS, 4), Status::Done as u64);
        assert_eq!(rd(&mut r, DONE_BYTES, 8), 0x30);
        let e = wr(&mut r, CMD, 4, OP_CHECKSUM.into());
        assert!(matches!(
            e,
            WriteEffect::Start(Op {
                kind: OpKind::Checksum,
                len: 5,
                ..
            })
        ));
    }

    #[test]
    fn bad_commands_and_arguments_are_errors() {
        let mut r = Registers::default();
        for (cmd, len) in [
            (0, 1),                       // no opcode
            (4, 1),                       // unknown opcode
            (0xff, 1),                    // unknown opcode
            (OP_COPY | CMD_USE_PASID, 1), // no PASID capability
            (OP_COPY | 1 << 9, 1),        // reserved bit
            (OP_FILL | 0x8000_0000, 1),   // reserved bit
            (OP_FILL, 0),                 // empty
            (OP_CHECKSUM, MAX_LEN + 1),   // too long
            (OP_CHECKSUM, u64::MAX),      // too long
        ] {
            wr(&mut r, LEN, 8, len);
            assert_eq!(
                wr(&mut r, CMD, 4, cmd.into()),
                WriteEffect::None,
                "{cmd:#x} {len:#x}"
            );
            assert_eq!(r.status(), Status::Error, "{cmd:#x} {len:#x}");
        }
        wr(&mut r, LEN, 8, MAX_LEN);
        assert!(matches!(
            wr(&mut r, CMD, 4, OP_FILL.into()),
            WriteEffect::Start(_)
        ));
    }

    #[test]
    fn use_pasid_needs_the_capability_and_a_pasid() {
        // Without PASIDs (no daemon to translate them): CAPS says so and
        // USE_PASID is an error.
        let mut r = Registers::default();
        assert_eq!(rd(&mut r, CAPS, 4) as u32 & CAP_PASID, 0);
        wr(&mut r, LEN, 8, 8);
        wr(&mut r, PASID, 4, 5);
        assert_eq!(
            wr(&mut r, CMD, 4, (OP_FILL | CMD_USE_PASID).into()),
            WriteEffect::None
        );
        assert_eq!(r.status(), Status::Error);

        let mut r = Registers::new(true);
        assert_eq!(rd(&mut r, CAPS, 4), 0b1111);
        program(&mut r, 0x7f00_0000_1000, 0x7f00_0000_9000, 0x30);
        // PASID 0 is DMA without PASID: not a PASID operation.
        wr(&mut r, PASID, 4, 0);
        assert_eq!(
            wr(&mut r, CMD, 4, (OP_COPY | CMD_USE_PASID).into()),
            WriteEffect::None
        );
        assert_eq!(r.status(), Status::Error);
        wr(&mut r, PASID, 4, 0x1_2345);
        match wr(&mut r, CMD, 4, (OP_COPY | CMD_USE_PASID).into()) {
            WriteEffect::Start(op) => {
                assert_eq!(
                    (op.pasid, op.src, op.len),
                    (Some(0x1_2345), 0x7f00_0000_1000, 0x30)
                )
            }
            other => panic!("{other:?}"),
        }
        r.finish(&Outcome {
            done_bytes: 0x30,
            result: 0,
            fault: None,
        });
        // Without USE_PASID the same registers make a PASID-less operation.
        match wr(&mut r, CMD, 4, OP_FILL.into()) {
            WriteEffect::Start(op) => assert_eq!(op.pasid, None),
            other => panic!("{other:?}"),
        }
        // Reset keeps the capability, clears the PASID.
        r.reset();
        assert_eq!(rd(&mut r, CAPS, 4), 0b1111);
        assert_eq!(rd(&mut r, PASID, 4), 0);
    }

    #[test]
    fn faults_are_reported_with_address_reason_and_direction() {
        let mut r = Registers::default();
        program(&mut r, 0, 0x5000, 0x3000);
        wr(&mut r, CMD, 4, OP_FILL.into());
        r.finish(&Outcome {
            done_bytes: 0x1000,
            result: 0,
            fault: Some(FaultRecord {
                address: 0x6000,
                reason: FAULT_REASON_TRANSLATION,
                write: true,
            }),
        });
        assert_eq!(rd(&mut r, STATUS, 4), Status::Fault as u64);
        assert_eq!(rd(&mut r, FAULT_ADDR, 8), 0x6000);
        assert_eq!(rd(&mut r, FAULT_INFO, 4), 0x101);
        assert_eq!(rd(&mut r, DONE_BYTES, 8), 0x1000);
        // The next command clears the previous outcome.
        wr(&mut r, CMD, 4, OP_FILL.into());
        assert_eq!(rd(&mut r, FAULT_ADDR, 8), 0);
        assert_eq!(rd(&mut r, FAULT_INFO, 4), 0);
        r.reset();
        assert_eq!(rd(&mut r, STATUS, 4), 0);
        assert_eq!(rd(&mut r, LEN, 8), 0);
    }
}
