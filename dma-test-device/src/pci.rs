// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PCI configuration space of the function: a type 0 header with one
//! 32-bit non-prefetchable memory BAR of 4 KiB, no capability list and no
//! interrupt pin (the guest polls STATUS).
//!
//! QEMU's vfio-user-pci reads the header through the config region,
//! emulates the BAR registers itself (it sizes BAR0 from the region info)
//! and forwards the guest's other config writes; this model keeps only the
//! bits a real device lets software change.

use crate::regs::BAR0_SIZE;

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0xd3a0;
/// Class 0xff (unassigned), subclass 0, programming interface 0.
pub const CLASS_CODE: u32 = 0xff_0000;
pub const REVISION: u8 = 1;
/// Size of the configuration region.
pub const CONFIG_SIZE: u64 = 256;

const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
const INTERRUPT_LINE: usize = 0x3c;
/// I/O space, memory space, bus master, parity, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0547;

/// The 256-byte configuration space.
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE as usize],
    /// Per byte: the bits software may change.
    writable: [u8; CONFIG_SIZE as usize],
}

impl Default for ConfigSpace {
    fn default() -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE as usize],
            writable: [0; CONFIG_SIZE as usize],
        };
        c.put(0x00, &VENDOR_ID.to_le_bytes());
        c.put(0x02, &DEVICE_ID.to_le_bytes());
        c.put(0x08, &[REVISION]);
        c.put(0x09, &CLASS_CODE.to_le_bytes()[..3]);
        // Header type 0, single function; subsystem IDs as the function's.
        c.put(0x2c, &VENDOR_ID.to_le_bytes());
        c.put(0x2e, &DEVICE_ID.to_le_bytes());
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        // BAR0: memory, 32-bit, not prefetchable (flag bits 0): the address
        // bits above the size are writable, so writing all ones reads back
        // the size mask.
        let mask = !(BAR0_SIZE as u32 - 1);
        c.writable[BAR0..BAR0 + 4].copy_from_slice(&mask.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }
}

impl ConfigSpace {
    fn put(&mut self, at: usize, data: &[u8]) {
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }

    /// Reads `data.len()` bytes at `offset`; bytes outside the space read
    /// as 0xff, as on a bus with nothing there.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| self.bytes.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Writes what is writable of `data` at `offset`; the rest is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .filter(|&at| at < self.bytes.len())
            else {
                return;
            };
            let w = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !w) | (b & w);
        }
    }

    /// The command register (bit 1 memory space, bit 2 bus master).
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    /// Function reset: the writable registers return to 0.
    pub fn reset(&mut self) {
        *self = ConfigSpace::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_identifies_the_function() {
        let c = ConfigSpace::default();
        assert_eq!(rd32(&c, 0), 0xd3a0_1234);
        assert_eq!(rd32(&c, 8), 0xff00_0001);
        assert_eq!(rd32(&c, 0x0c) >> 16 & 0xff, 0, "header type 0");
        assert_eq!(rd32(&c, 0x10), 0, "BAR0: 32-bit memory, not prefetchable");
        assert_eq!(rd32(&c, 0x3c) >> 8 & 0xff, 0, "no interrupt pin");
        assert_eq!(rd32(&c, 0x04) >> 16 & 0x10, 0, "no capability list");
    }

    #[test]
    fn only_writable_bits_change() {
        let mut c = ConfigSpace::default();
        c.write(0, &[0xff; 64]);
        assert_eq!(rd32(&c, 0), 0xd3a0_1234);
        assert_eq!(
            rd32(&c, 0x10),
            0xffff_f000,
            "BAR0 sizing reads the 4 KiB mask"
        );
        assert_eq!(c.command(), COMMAND_WRITABLE);
        c.write(0x10, &0xfebf_1000u32.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xfebf_1000);
        assert_eq!(rd32(&c, 0x14), 0, "BAR1 does not exist");
        c.reset();
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn accesses_outside_the_space_are_harmless() {
        let mut c = ConfigSpace::default();
        let mut b = [0u8; 8];
        c.read(252, &mut b);
        assert_eq!(&b[4..], &[0xff; 4]);
        c.read(u64::MAX, &mut b);
        assert_eq!(b, [0xff; 8]);
        c.write(u64::MAX - 2, &[1; 8]);
        c.write(250, &[0xff; 100]);
        assert_eq!(rd32(&c, 0), 0xd3a0_1234);
    }
}
