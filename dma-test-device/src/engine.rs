// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The DMA engine: runs one operation (COPY, FILL, CHECKSUM) against a
//! device address space, chunk by chunk, and stops at the first fault.
//!
//! This is the part a device-model author copies. Every access goes
//! through `DmaSpace::translate_with`: the address range of the chunk is
//! translated as a whole (one call per chunk, not per byte or page), and
//! the access runs *inside* the call, while the translation is pinned:
//!
//! - through the daemon (`IommuSpace`), `viommu_client::Client::translate_with`
//!   holds the client cache's read lock, so the guest's UNMAP cannot
//!   complete while the access is in flight, and a cached translation is
//!   never used after its invalidation;
//! - without it (`DirectSpace`), the DMA_MAP table's read lock does the
//!   same against QEMU's DMA_UNMAP.
//!
//! Fault rule: a fault stops the operation at the first faulting address.
//! Bytes before it were transferred (`done_bytes`); nothing at or after it
//! is read or written. For COPY the destination range of a chunk is
//! translated first, then only the source bytes that can be written are
//! read, then they are written. A translation fault is reported to the
//! guest through the daemon (`FaultReporter`), without the engine waiting
//! for the guest to take it.
//!
//! The pattern, reduced to one DMA write (`guest_ram_write` stands for
//! access to the memory QEMU lent the device):
//!
//! ```no_run
//! use viommu_client::{Access, Client, Error, Options};
//! # fn guest_ram_write(_gpa: u64, _bytes: &[u8]) {}
//! let options = Options { cache: true, ..Options::default() };
//! let client = Client::connect("/run/viommu.ctl", options)?;
//! let (endpoint, iova, data) = (0x28, 0x10_0000, [0u8; 4096]);
//! let len = data.len() as u64;
//! let done = client.translate_with(endpoint, iova, len, Access::Write, |segments| {
//!     // The guest's UNMAP of these pages waits until this returns.
//!     let mut off = 0;
//!     for s in segments {
//!         guest_ram_write(s.gpa, &data[off..off + s.len as usize]);
//!         off += s.len as usize;
//!     }
//! });
//! match done {
//!     Ok(()) => {}
//!     // Not mapped, not attached, or read-only: no byte was written (the
//!     // engine below then transfers the part before `f.address`). Tell
//!     // the guest (this device does it from another thread, see below).
//!     Err(Error::Fault(f)) => {
//!         client.report_fault(endpoint, f.address, Some(Access::Write), f.reason)?
//!     }
//!     // No answer from the daemon: refuse the access.
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
};

use log::{debug, warn};
use viommu_client::{Access, Client, Error as ClientError, Segment};

use crate::{
    ram::{Ram, RamView},
    regs::{FaultRecord, Op, OpKind, Outcome, FAULT_REASON_MEMORY, FAULT_REASON_TRANSLATION},
};

/// Largest piece of an operation translated and accessed at once: the
/// size of the bounce buffer, and the longest time an access holds a
/// translation (and so delays the guest's UNMAP).
pub const CHUNK: u64 = 64 << 10;

/// `VIRTIO_IOMMU_FAULT_R_MAPPING`: the reason the device reports when it
/// decides a translation fault itself (no daemon).
const VIRTIO_FAULT_R_MAPPING: u8 = 2;

/// A fault seen while translating or accessing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// First device address that could not be accessed.
    pub address: u64,
    pub access: Access,
    pub kind: FaultKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The IOMMU refused the access; `reason` is a `VIRTIO_IOMMU_FAULT_R_*`
    /// value, to report on the guest's event queue.
    Translation { reason: u8 },
    /// No translation could be had (the daemon is unreachable): the access
    /// is refused, there is nowhere to report it.
    Unavailable,
    /// Translated, but the guest-physical address is not memory QEMU gave
    /// the device.
    Memory,
}

impl Fault {
    fn record(&self) -> FaultRecord {
        FaultRecord {
            address: self.address,
            reason: match self.kind {
                FaultKind::Translation { .. } | FaultKind::Unavailable => FAULT_REASON_TRANSLATION,
                FaultKind::Memory => FAULT_REASON_MEMORY,
            },
            write: self.access == Access::Write,
        }
    }
}

/// A device's view of DMA: its address space (IOVAs) and how it reaches
/// guest memory.
pub trait DmaSpace {
    /// Translates `[addr, addr + len)` for `access` and, if the whole range
    /// translates, runs `f` on the guest-physical segments (in address
    /// order) with the translation pinned until `f` returns. Otherwise
    /// returns the fault at the first address that does not translate.
    fn translate_with<R>(
        &self,
        addr: u64,
        len: u64,
        access: Access,
        f: impl FnOnce(&[Segment], &RamView) -> R,
    ) -> Result<R, Fault>;

    /// Tells the guest about a translation fault (`FaultKind::Translation`)
    /// through the IOMMU's event queue, if this space can.
    fn report(&self, fault: &Fault);
}

/// DMA translated by the vhost-device-iommu daemon: device addresses are
/// IOVAs of `endpoint`, `ram` is guest RAM at guest-physical addresses.
pub struct IommuSpace<'a> {
    pub client: &'a Arc<Client>,
    pub endpoint: u32,
    pub ram: &'a Ram,
    pub reporter: &'a FaultReporter,
}

/// Reports translation faults to the daemon from a thread of its own: the
/// daemon answers a report only once the fault is queued for the guest,
/// which waits for the guest's driver to post an event buffer, and a DMA
/// engine (or a device reset) must never wait for the guest. Reports keep
/// their order; past `FaultReporter::QUEUE` waiting ones, new ones are
/// dropped with a warning.
pub struct FaultReporter {
    queue: mpsc::SyncSender<(Arc<Client>, u32, Fault, u8)>,
}

impl FaultReporter {
    pub const QUEUE: usize = 256;

    pub fn new() -> std::io::Result<FaultReporter> {
        let (tx, rx) = mpsc::sync_channel::<(Arc<Client>, u32, Fault, u8)>(Self::QUEUE);
        thread::Builder::new()
            .name("fault-reporter".into())
            .spawn(move || {
                for (client, endpoint, f, reason) in rx {
                    if let Err(e) = client.report_fault(endpoint, f.address, Some(f.access), reason)
                    {
                        warn!(
                            "could not report the fault at {:#x} to the daemon: {e}",
                            f.address
                        );
                    }
                }
            })?;
        Ok(FaultReporter { queue: tx })
    }

    fn report(&self, client: &Arc<Client>, endpoint: u32, fault: Fault, reason: u8) {
        if self
            .queue
            .try_send((client.clone(), endpoint, fault, reason))
            .is_err()
        {
            warn!(
                "fault report queue full: the fault at {:#x} is not reported",
                fault.address
            );
        }
    }
}

impl DmaSpace for IommuSpace<'_> {
    fn translate_with<R>(
        &self,
        addr: u64,
        len: u64,
        access: Access,
        f: impl FnOnce(&[Segment], &RamView) -> R,
    ) -> Result<R, Fault> {
        let r = self
            .client
            .translate_with(self.endpoint, addr, len, access, |segs| {
                f(segs, &self.ram.view())
            });
        r.map_err(|e| match e {
            ClientError::Fault(info) => Fault {
                address: info.address,
                access,
                kind: FaultKind::Translation {
                    reason: info.reason,
                },
            },
            // The daemon does not know this endpoint (check --endpoint
            // against its --endpoints), is gone, or misbehaves: refuse.
            e => {
                warn!(
                    "translation of {addr:#x}+{len:#x} for endpoint {}: {e}; access refused",
                    self.endpoint
                );
                Fault {
                    address: addr,
                    access,
                    kind: FaultKind::Unavailable,
                }
            }
        })
    }

    fn report(&self, fault: &Fault) {
        if let FaultKind::Translation { reason } = fault.kind {
            self.reporter
                .report(self.client, self.endpoint, *fault, reason);
        }
    }
}

/// DMA without the daemon: device addresses are the addresses of QEMU's
/// DMA_MAP messages (IOVAs behind QEMU's own vIOMMU, guest-physical
/// without one). An address outside every region, or in a region that
/// forbids the access, is a translation fault.
pub struct DirectSpace<'a> {
    pub ram: &'a Ram,
}

impl DmaSpace for DirectSpace<'_> {
    fn translate_with<R>(
        &self,
        addr: u64,
        len: u64,
        access: Access,
        f: impl FnOnce(&[Segment], &RamView) -> R,
    ) -> Result<R, Fault> {
        let view = self.ram.view();
        let ok = view.permitted(addr, len, access == Access::Write);
        if ok < len {
            return Err(Fault {
                address: addr.wrapping_add(ok),
                access,
                kind: FaultKind::Translation {
                    reason: VIRTIO_FAULT_R_MAPPING,
                },
            });
        }
        let seg = Segment {
            iova: addr,
            gpa: addr,
            len,
        };
        Ok(f(&[seg], &view))
    }

    fn report(&self, _fault: &Fault) {}
}

/// Runs `op` on the longest accessible prefix of `[addr, addr + len)`.
/// `op(segments, view, len)` accesses the `len` bytes of the segments
/// (a prefix of the range once a fault shortened it) and returns the
/// offset and fault of a memory failure. Returns the bytes done and the fault
/// that stopped them, if any.
fn transfer<S: DmaSpace>(
    space: &S,
    addr: u64,
    len: u64,
    access: Access,
    mut op: impl FnMut(&[Segment], &RamView, usize) -> Result<(), (u64, Fault)>,
) -> (u64, Option<Fault>) {
    let mut n = len;
    let mut stopped_by = None;
    loop {
        match space.translate_with(addr, n, access, |segs, view| op(segs, view, n as usize)) {
            Ok(Ok(())) => return (n, stopped_by),
            Ok(Err((done, fault))) => return (done, Some(fault)),
            Err(fault) => {
                // Translate the part before the fault: it may be accessed.
                let prefix = fault.address.wrapping_sub(addr);
                stopped_by = Some(fault);
                if prefix == 0 || prefix >= n {
                    return (0, stopped_by);
                }
                n = prefix;
            }
        }
    }
}

/// The memory access of one translated chunk of `total` bytes at `addr`:
/// `f(view, gpa, offset, len)` per segment, stopping at the first piece
/// that is not memory. Segments that do not cover exactly the chunk (a
/// broken translator) are refused rather than trusted.
fn per_segment(
    segs: &[Segment],
    view: &RamView,
    addr: u64,
    total: usize,
    access: Access,
    mut f: impl FnMut(&RamView, u64, usize, usize) -> Result<(), usize>,
) -> Result<(), (u64, Fault)> {
    let fault = |at: usize, kind| {
        let at = at as u64;
        Err((
            at,
            Fault {
                address: addr.wrapping_add(at),
                access,
                kind,
            },
        ))
    };
    let mut off = 0usize;
    for s in segs {
        let n = usize::try_from(s.len)
            .unwrap_or(usize::MAX)
            .min(total - off);
        if s.iova != addr.wrapping_add(off as u64) || n == 0 {
            return fault(off, FaultKind::Unavailable);
        }
        if let Err(done) = f(view, s.gpa, off, n) {
            return fault(off + done, FaultKind::Memory);
        }
        off += n;
    }
    if off < total {
        return fault(off, FaultKind::Unavailable);
    }
    Ok(())
}

/// FNV-1a, 64 bits.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Runs `op` to its end, its first fault, or `cancel` (checked between
/// chunks; a cancelled operation reports what it did, without a fault).
/// Translation faults are reported through `space` before returning.
pub fn run<S: DmaSpace>(space: &S, op: &Op, cancel: &AtomicBool) -> Outcome {
    let mut buf = vec![0u8; CHUNK.min(op.len) as usize];
    let pattern = op.pattern.to_le_bytes();
    let mut hash = FNV_OFFSET;
    let mut done = 0u64;
    let mut fault = None;
    while done < op.len && !cancel.load(Ordering::Relaxed) {
        let n = CHUNK.min(op.len - done);
        let (src, dst) = (op.src.wrapping_add(done), op.dst.wrapping_add(done));
        let (moved, f) = match op.kind {
            OpKind::Fill => {
                // The pattern continues from the operation's start: byte i
                // of DST gets byte i % 8 of PATTERN.
                for (i, b) in buf[..n as usize].iter_mut().enumerate() {
                    *b = pattern[(done as usize + i) % 8];
                }
                write(space, dst, &buf[..n as usize])
            }
            OpKind::Checksum => {
                let (got, f) = read(space, src, &mut buf[..n as usize]);
                hash = fnv1a(hash, &buf[..got as usize]);
                (got, f)
            }
            OpKind::Copy => {
                // Only what the destination accepts is read: probe its
                // translation first, without touching memory.
                let (writable, probe_fault) =
                    transfer(space, dst, n, Access::Write, |_, _, _| Ok(()));
                let (got, read_fault) = read(space, src, &mut buf[..writable as usize]);
                let (put, write_fault) = write(space, dst, &buf[..got as usize]);
                let f = if put < got {
                    write_fault
                } else if got < writable {
                    read_fault
                } else {
                    probe_fault
                };
                (put, f)
            }
        };
        done += moved;
        if let Some(f) = f {
            fault = Some(f);
            break;
        }
        debug_assert_eq!(moved, n);
    }
    if let Some(f) = &fault {
        debug!("{:?} stopped after {done:#x} bytes: {f:?}", op.kind);
        if matches!(f.kind, FaultKind::Translation { .. }) {
            space.report(f);
        }
    }
    Outcome {
        done_bytes: done,
        result: if op.kind == OpKind::Checksum { hash } else { 0 },
        fault: fault.map(|f| f.record()),
    }
}

fn read<S: DmaSpace>(space: &S, addr: u64, buf: &mut [u8]) -> (u64, Option<Fault>) {
    if buf.is_empty() {
        return (0, None);
    }
    transfer(
        space,
        addr,
        buf.len() as u64,
        Access::Read,
        |segs, view, n| {
            per_segment(segs, view, addr, n, Access::Read, |v, gpa, off, n| {
                v.read(gpa, &mut buf[off..off + n])
            })
        },
    )
}

fn write<S: DmaSpace>(space: &S, addr: u64, buf: &[u8]) -> (u64, Option<Fault>) {
    if buf.is_empty() {
        return (0, None);
    }
    transfer(
        space,
        addr,
        buf.len() as u64,
        Access::Write,
        |segs, view, n| {
            per_segment(segs, view, addr, n, Access::Write, |v, gpa, off, n| {
                v.write(gpa, &buf[off..off + n])
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;
    use crate::{ram::tests::file, regs::FAULT_INFO_WRITE};

    const PAGE: u64 = 0x1000;
    /// Guest RAM of the tests: 1 MiB at guest-physical 0x100000.
    const RAM_BASE: u64 = 0x10_0000;
    const RAM_SIZE: u64 = 0x10_0000;

    /// A fake IOMMU: a page table IOVA page -> (GPA page, writable), and
    /// a log of what was translated and reported.
    #[derive(Default)]
    struct FakeIommu {
        ram: Ram,
        pages: BTreeMap<u64, (u64, bool)>,
        translated: RefCell<Vec<(u64, u64, Access)>>,
        reported: RefCell<Vec<Fault>>,
    }

    impl FakeIommu {
        fn new() -> Self {
            let f = FakeIommu::default();
            f.ram
                .map(RAM_BASE, RAM_SIZE, Some((file(RAM_SIZE), 0)), true, true)
                .unwrap();
            f
        }

        fn map(&mut self, iova: u64, gpa: u64, pages: u64, write: bool) {
            for i in 0..pages {
                self.pages.insert(iova + i * PAGE, (gpa + i * PAGE, write));
            }
        }

        fn poke(&self, gpa: u64, data: &[u8]) {
            self.ram.view().write(gpa, data).unwrap();
        }

        fn peek(&self, gpa: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0; len];
            self.ram.view().read(gpa, &mut b).unwrap();
            b
        }
    }

    impl DmaSpace for FakeIommu {
        fn translate_with<R>(
            &self,
            addr: u64,
            len: u64,
            access: Access,
            f: impl FnOnce(&[Segment], &RamView) -> R,
        ) -> Result<R, Fault> {
            self.translated.borrow_mut().push((addr, len, access));
            let mut segs: Vec<Segment> = Vec::new();
            let mut at = addr;
            while at < addr + len {
                let page = at & !(PAGE - 1);
                let fault = Fault {
                    address: at,
                    access,
                    kind: FaultKind::Translation { reason: 2 },
                };
                let &(gpa, w) = self.pages.get(&page).ok_or(fault)?;
                if access == Access::Write && !w {
                    return Err(fault);
                }
                let n = (page + PAGE - at).min(addr + len - at);
                let gpa = gpa + (at - page);
                match segs.last_mut() {
                    Some(l) if l.gpa + l.len == gpa => l.len += n,
                    _ => segs.push(Segment {
                        iova: at,
                        gpa,
                        len: n,
                    }),
                }
                at += n;
            }
            Ok(f(&segs, &self.ram.view()))
        }

        fn report(&self, fault: &Fault) {
            self.reported.borrow_mut().push(*fault);
        }
    }

    fn op(kind: OpKind, src: u64, dst: u64, len: u64, pattern: u64) -> Op {
        Op {
            kind,
            src,
            dst,
            len,
            pattern,
        }
    }

    fn go(space: &impl DmaSpace, op: Op) -> Outcome {
        run(space, &op, &AtomicBool::new(false))
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            fnv1a(fnv1a(FNV_OFFSET, b"foo"), b"bar"),
            fnv1a(FNV_OFFSET, b"foobar")
        );
    }

    #[test]
    fn operations_follow_the_page_table_across_scattered_pages_and_chunks() {
        let mut m = FakeIommu::new();
        // 40 source pages and 40 destination pages, each IOVA page at a
        // guest page far from its neighbours (reverse order).
        for i in 0..40 {
            m.map(0x40_0000 + i * PAGE, RAM_BASE + (79 - i) * PAGE, 1, false);
            m.map(0x80_0000 + i * PAGE, RAM_BASE + (80 + i) * PAGE, 1, true);
        }
        let len = 40 * PAGE - 0x123;
        let data = bytes(len as usize, 7);
        for (i, chunk) in data.chunks(PAGE as usize).enumerate() {
            m.poke(RAM_BASE + (79 - i as u64) * PAGE, chunk);
        }
        let out = go(&m, op(OpKind::Checksum, 0x40_0000, 0, len, 0));
        assert_eq!(
            out,
            Outcome {
                done_bytes: len,
                result: fnv1a(FNV_OFFSET, &data),
                fault: None
            }
        );
        // Chunks, not bytes or pages: 40 pages = 3 chunks of 64 KiB at most.
        assert_eq!(m.translated.borrow().len(), 3);

        let out = go(
            &m,
            op(
                OpKind::Copy,
                0x40_0000 + 0x10,
                0x80_0000 + 0x7,
                len - 0x10,
                0,
            ),
        );
        assert_eq!((out.done_bytes, out.fault), (len - 0x10, None));
        let mut got = Vec::new();
        for i in 0..40 {
            got.extend(m.peek(RAM_BASE + (80 + i) * PAGE, PAGE as usize));
        }
        assert_eq!(&got[0x7..0x7 + (len - 0x10) as usize], &data[0x10..]);
        assert_eq!(&got[..7], &[0; 7], "nothing written before DST");

        m.map(0x90_0000, RAM_BASE + 120 * PAGE, 1, true);
        let out = go(
            &m,
            op(OpKind::Fill, 0, 0x90_0000 + 3, 21, 0x0807_0605_0403_0201),
        );
        assert_eq!((out.done_bytes, out.fault), (21, None));
        assert_eq!(
            m.peek(RAM_BASE + 120 * PAGE, 26),
            [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 0, 0]
        );
        assert!(m.reported.borrow().is_empty());
    }

    #[test]
    fn a_fault_stops_at_the_first_unmapped_page_and_is_reported_once() {
        let mut m = FakeIommu::new();
        m.map(0x10_0000, RAM_BASE, 2, true);
        m.map(0x10_3000, RAM_BASE + 0x3000, 1, true); // hole at 0x10_2000
        let out = go(&m, op(OpKind::Fill, 0, 0x10_0800, 0x3000, !0));
        assert_eq!(out.done_bytes, 0x1800);
        let f = out.fault.unwrap();
        assert_eq!(
            (f.address, f.reason, f.write),
            (0x10_2000, FAULT_REASON_TRANSLATION, true)
        );
        assert_eq!(m.peek(RAM_BASE, 0x2000)[0x7ff..0x801], [0, 0xff]);
        assert_eq!(
            m.peek(RAM_BASE + 0x3000, 0x1000),
            vec![0; 0x1000],
            "nothing after the fault"
        );
        assert_eq!(m.reported.borrow().len(), 1);
        assert_eq!(m.reported.borrow()[0].address, 0x10_2000);
        assert_eq!(out.fault.map(|f| f.reason | FAULT_INFO_WRITE), Some(0x101));

        // Faulting on the very first byte: nothing done.
        let out = go(&m, op(OpKind::Checksum, 0x10_2000, 0, 1, 0));
        assert_eq!(out.done_bytes, 0);
        assert_eq!(out.result, FNV_OFFSET);
        assert_eq!(
            out.fault.map(|f| (f.address, f.write)),
            Some((0x10_2000, false))
        );
    }

    #[test]
    fn copy_to_a_read_only_page_writes_only_what_precedes_it() {
        let mut m = FakeIommu::new();
        m.map(0x1000, RAM_BASE, 3, true); // source
        m.map(0x9000, RAM_BASE + 0x8000, 1, true);
        m.map(0xa000, RAM_BASE + 0x9000, 1, false); // read-only destination page
        m.poke(RAM_BASE, &bytes(0x3000, 1));
        let out = go(&m, op(OpKind::Copy, 0x1000, 0x9000, 0x2000, 0));
        assert_eq!(out.done_bytes, 0x1000);
        let f = out.fault.unwrap();
        assert_eq!((f.address, f.write), (0xa000, true));
        assert_eq!(m.peek(RAM_BASE + 0x8000, 0x1000), bytes(0x1000, 1));
        assert_eq!(m.peek(RAM_BASE + 0x9000, 0x1000), vec![0; 0x1000]);
        // The source was read only up to what the destination accepts.
        let reads: Vec<_> = m
            .translated
            .borrow()
            .iter()
            .filter(|t| t.2 == Access::Read)
            .map(|t| (t.0, t.1))
            .collect();
        assert_eq!(reads, [(0x1000, 0x1000)]);
    }

    #[test]
    fn copy_from_an_unmapped_source_writes_only_what_was_read() {
        let mut m = FakeIommu::new();
        m.map(0x1000, RAM_BASE, 1, true);
        m.map(0x9000, RAM_BASE + 0x8000, 4, true);
        m.poke(RAM_BASE, &bytes(0x1000, 3));
        let out = go(&m, op(OpKind::Copy, 0x1800, 0x9000, 0x3000, 0));
        assert_eq!(out.done_bytes, 0x800);
        assert_eq!(
            out.fault.map(|f| (f.address, f.write)),
            Some((0x2000, false))
        );
        assert_eq!(m.peek(RAM_BASE + 0x8000, 0x800), bytes(0x1000, 3)[0x800..]);
        assert_eq!(m.peek(RAM_BASE + 0x8800, 0x2800), vec![0; 0x2800]);
    }

    #[test]
    fn a_translation_outside_guest_ram_is_a_memory_fault_not_reported() {
        let mut m = FakeIommu::new();
        m.map(0x1000, RAM_BASE + RAM_SIZE - PAGE, 1, true);
        m.map(0x2000, RAM_BASE + RAM_SIZE, 1, true); // past the end of RAM
        let out = go(&m, op(OpKind::Fill, 0, 0x1100, 0x1000, 0x11));
        assert_eq!(out.done_bytes, 0xf00);
        let f = out.fault.unwrap();
        assert_eq!(
            (f.address, f.reason, f.write),
            (0x2000, FAULT_REASON_MEMORY, true)
        );
        assert!(m.reported.borrow().is_empty());
    }

    #[test]
    fn direct_space_uses_dma_map_addresses_and_permissions() {
        let ram = Ram::default();
        ram.map(0x8000_0000, 0x2000, Some((file(0x2000), 0)), true, true)
            .unwrap();
        ram.map(0x8000_2000, 0x1000, Some((file(0x1000), 0)), true, false)
            .unwrap();
        let space = DirectSpace { ram: &ram };
        let out = go(&space, op(OpKind::Fill, 0, 0x8000_1000, 0x2000, 0x5a));
        assert_eq!(out.done_bytes, 0x1000);
        assert_eq!(
            out.fault.map(|f| (f.address, f.reason, f.write)),
            Some((0x8000_2000, 1, true))
        );
        let out = go(&space, op(OpKind::Checksum, 0x8000_0ff8, 0, 0x10, 0));
        let mut expect = vec![0u8; 8];
        expect.extend([0x5a, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            (out.done_bytes, out.result),
            (0x10, fnv1a(FNV_OFFSET, &expect))
        );
        // After DMA_UNMAP the address faults.
        ram.unmap(0x8000_0000, 0x2000).unwrap();
        let out = go(&space, op(OpKind::Checksum, 0x8000_0000, 0, 1, 0));
        assert_eq!(out.fault.map(|f| f.address), Some(0x8000_0000));
        // Addresses at the very top of the space never wrap around.
        let out = go(&space, op(OpKind::Fill, 0, u64::MAX - 3, 0x10, 0));
        assert_eq!(out.fault.map(|f| f.address), Some(u64::MAX - 3));
    }

    #[test]
    fn cancel_stops_between_chunks() {
        let mut m = FakeIommu::new();
        m.map(0, RAM_BASE, 256, true);
        let cancel = AtomicBool::new(true);
        let out = run(&m, &op(OpKind::Fill, 0, 0, 0x10_0000, 1), &cancel);
        assert_eq!((out.done_bytes, out.fault), (0, None));
        assert!(m.translated.borrow().is_empty());
    }
}
