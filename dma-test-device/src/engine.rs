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
//!   same against QEMU's DMA_UNMAP;
//! - with a PASID (`PasidSpace`), `Client::translate_pasid_or_request_with`
//!   walks the page table the guest bound to the PASID (the process's own
//!   table, with SVA) under the same coherence: the guest's INVALIDATE
//!   waits for the access. A page the process has not touched yet is not
//!   present: the call raises a page request instead, the guest's fault
//!   handler maps the page and answers, and the device translates again.
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
    time::{Duration, Instant},
};

use log::{debug, warn};
use viommu_client::{
    Access, Client, Error as ClientError, PageAccess, PageRequestTicket, PasidTranslation,
    ResponseCode, Segment,
};

use crate::{
    ram::{Ram, RamView},
    regs::{
        FaultRecord, Op, OpKind, Outcome, FAULT_REASON_DEADLINE, FAULT_REASON_MEMORY,
        FAULT_REASON_PAGE_REQUEST, FAULT_REASON_TRANSLATION,
    },
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
    /// PASID: the guest answered the page request for this page INVALID
    /// (or FAILURE): the process has no such page, or not with this access.
    PageRequestRefused,
    /// PASID: the operation's deadline passed before the page request for
    /// this page was answered.
    Deadline,
    /// A device reset stopped the operation while it waited for a page
    /// request. Never reported: the reset clears the registers.
    Cancelled,
}

impl Fault {
    fn record(&self) -> FaultRecord {
        FaultRecord {
            address: self.address,
            reason: match self.kind {
                FaultKind::Translation { .. } | FaultKind::Unavailable | FaultKind::Cancelled => {
                    FAULT_REASON_TRANSLATION
                }
                FaultKind::Memory => FAULT_REASON_MEMORY,
                FaultKind::PageRequestRefused => FAULT_REASON_PAGE_REQUEST,
                FaultKind::Deadline => FAULT_REASON_DEADLINE,
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

/// DMA with a PASID: device addresses are virtual addresses of the address
/// space the guest bound to (`endpoint`, `pasid`) with ATTACH_TABLE (with
/// SVA, a process's page table). Reads are user-mode reads, writes
/// user-mode writes, as the process itself would do them.
///
/// A page the table does not map (or maps without the access) is one the
/// guest can provide: the translation raises a page request, the guest's
/// fault handler maps the page and answers, and the device translates
/// again. The guest answers INVALID for a page the process does not have
/// (or may not access that way): the access stops there.
pub struct PasidSpace<'a> {
    pub client: &'a Client,
    pub endpoint: u32,
    pub pasid: u32,
    pub ram: &'a Ram,
    /// When the operation stops waiting for the guest: one deadline for
    /// all its page requests.
    pub deadline: Instant,
    /// Set by a device reset: stop waiting for an answer.
    pub cancel: &'a AtomicBool,
}

/// How often a wait for a page request looks at `PasidSpace::cancel`.
const CANCEL_POLL: Duration = Duration::from_millis(5);

impl PasidSpace<'_> {
    /// Waits for the guest's answer to a page request (or the device's
    /// own INVALID: the daemon answers for a guest that cannot).
    fn answer(&self, mut ticket: PageRequestTicket) -> Result<(), FaultKind> {
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(FaultKind::Cancelled);
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FaultKind::Deadline);
            }
            match ticket.poll(left.min(CANCEL_POLL)) {
                Ok(None) => {}
                Ok(Some(r)) if r.code == ResponseCode::Success => return Ok(()),
                Ok(Some(r)) => {
                    debug!(
                        "page request at {:#x} (PASID {}) answered {r:?}",
                        ticket.fault().address,
                        self.pasid
                    );
                    return Err(FaultKind::PageRequestRefused);
                }
                Err(e) => {
                    warn!("page request at {:#x}: {e}", ticket.fault().address);
                    return Err(FaultKind::Unavailable);
                }
            }
        }
    }
}

impl DmaSpace for PasidSpace<'_> {
    fn translate_with<R>(
        &self,
        addr: u64,
        len: u64,
        access: Access,
        f: impl FnOnce(&[Segment], &RamView) -> R,
    ) -> Result<R, Fault> {
        let page_access = match access {
            Access::Read => PageAccess::READ,
            Access::Write => PageAccess::WRITE,
        };
        let fault = |address, kind| Fault {
            address,
            access,
            kind,
        };
        // `f` runs once, in the attempt where the whole range translates.
        let mut f = Some(f);
        loop {
            let attempt = self.client.translate_pasid_or_request_with(
                self.endpoint,
                self.pasid,
                addr,
                len,
                page_access,
                |segs| f.take().map(|f| f(segs, &self.ram.view())),
            );
            let ticket = match attempt {
                Ok(PasidTranslation::Done(Some(r))) => return Ok(r),
                Ok(PasidTranslation::Done(None)) => unreachable!("the access ran twice"),
                // The guest is asked for the page at `ticket.fault()`.
                Ok(PasidTranslation::PageRequest(ticket)) => ticket,
                // Not something a page request can fix: nothing bound at
                // the PASID (the process exited or unbound), a broken table.
                Err(ClientError::Fault(info)) => {
                    let kind = FaultKind::Translation {
                        reason: info.reason,
                    };
                    return Err(fault(info.address, kind));
                }
                Err(e) => {
                    warn!(
                        "translation of {addr:#x}+{len:#x} for endpoint {} PASID {}: {e}; access refused",
                        self.endpoint, self.pasid
                    );
                    return Err(fault(addr, FaultKind::Unavailable));
                }
            };
            let at = ticket.fault().address;
            // After a SUCCESS, translate again: the pages before `at` are
            // in the client's cache, the next missing page (if any) raises
            // the next page request.
            self.answer(ticket).map_err(|kind| fault(at, kind))?;
        }
    }

    /// Nothing to report: a refused page request was the guest's own
    /// answer, and a missing binding means the process is gone (the
    /// control protocol's fault reports carry no PASID).
    fn report(&self, _fault: &Fault) {}
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
                let cancelled = fault.kind == FaultKind::Cancelled;
                stopped_by = Some(fault);
                if prefix == 0 || prefix >= n || cancelled {
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
/// chunks, and by `PasidSpace` while it waits for a page request; a
/// cancelled operation reports what it did, without a fault). Translation
/// faults are reported through `space` before returning.
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
    if fault.is_some_and(|f| f.kind == FaultKind::Cancelled) {
        fault = None;
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
    use crate::{
        ram::tests::file,
        regs::{FAULT_INFO_WRITE, FAULT_REASON_DEADLINE, FAULT_REASON_PAGE_REQUEST},
    };

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
            pasid: None,
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

    /// The contract of `PasidSpace` over the fake IOMMU, as a process's
    /// address space: pages the process has touched are mapped; a page
    /// that is not (or is read-only, for a write) is asked for with a page
    /// request, which the guest answers by mapping the page at the next
    /// free guest page (SUCCESS), or refuses (INVALID) for the pages in
    /// `refused`; after a SUCCESS the range is translated again. `answers` bounds how
    /// many page requests are answered before the deadline passes;
    /// `cancel_at` makes the device reset arrive during that page request.
    struct OnDemand {
        iommu: RefCell<FakeIommu>,
        refused: std::collections::BTreeSet<u64>,
        next_gpa: std::cell::Cell<u64>,
        requests: RefCell<Vec<(u64, Access)>>,
        answers: std::cell::Cell<usize>,
        cancel_at: Option<usize>,
    }

    impl OnDemand {
        fn new() -> Self {
            OnDemand {
                iommu: RefCell::new(FakeIommu::new()),
                refused: Default::default(),
                next_gpa: std::cell::Cell::new(RAM_BASE),
                requests: RefCell::new(Vec::new()),
                answers: std::cell::Cell::new(usize::MAX),
                cancel_at: None,
            }
        }

        /// The process touches `pages` pages from `va` (they become
        /// resident) with `byte`.
        fn touch(&self, va: u64, pages: u64, byte: u8) {
            for i in 0..pages {
                let gpa = self.fault_in(va + i * PAGE);
                self.iommu.borrow().poke(gpa, &[byte; PAGE as usize]);
            }
        }

        fn fault_in(&self, page: u64) -> u64 {
            let gpa = self.next_gpa.get();
            self.next_gpa.set(gpa + PAGE);
            self.iommu.borrow_mut().map(page, gpa, 1, true);
            gpa
        }

        /// The bytes of `[va, va + len)`, 0 where nothing is mapped.
        fn peek(&self, va: u64, len: u64) -> Vec<u8> {
            let m = self.iommu.borrow();
            (va..va + len)
                .map(|a| match m.pages.get(&(a & !(PAGE - 1))) {
                    Some(&(gpa, _)) => m.peek(gpa + (a & (PAGE - 1)), 1)[0],
                    None => 0,
                })
                .collect()
        }
    }

    impl DmaSpace for OnDemand {
        fn translate_with<R>(
            &self,
            addr: u64,
            len: u64,
            access: Access,
            f: impl FnOnce(&[Segment], &RamView) -> R,
        ) -> Result<R, Fault> {
            let fault = |address, kind| Fault {
                address,
                access,
                kind,
            };
            loop {
                let missing = match self
                    .iommu
                    .borrow()
                    .translate_with(addr, len, access, |_, _| ())
                {
                    Ok(()) => None,
                    Err(f) => Some(f.address),
                };
                let Some(at) = missing else {
                    return self.iommu.borrow().translate_with(addr, len, access, f);
                };
                // A page request for the page of `at`.
                let n = self.requests.borrow().len();
                self.requests.borrow_mut().push((at & !(PAGE - 1), access));
                if self.cancel_at == Some(n) {
                    return Err(fault(at, FaultKind::Cancelled));
                }
                if n >= self.answers.get() {
                    return Err(fault(at, FaultKind::Deadline));
                }
                if self.refused.contains(&(at & !(PAGE - 1))) {
                    return Err(fault(at, FaultKind::PageRequestRefused));
                }
                self.fault_in(at & !(PAGE - 1));
            }
        }

        fn report(&self, fault: &Fault) {
            self.iommu.borrow().report(fault);
        }
    }

    /// Whether every byte of `bytes` is `b` (without printing megabytes
    /// when it is not).
    fn all(bytes: &[u8], b: u8) -> bool {
        bytes.iter().all(|&x| x == b)
    }

    const VA: u64 = 0x7f12_3400_0000;

    #[test]
    fn a_fill_of_untouched_memory_asks_for_every_page_once_and_writes_every_byte() {
        let m = OnDemand::new();
        let len = 40 * PAGE + 0x10;
        let out = go(
            &m,
            op(OpKind::Fill, 0, VA + 0x7f0, len, 0x1122_3344_5566_7788),
        );
        assert_eq!((out.done_bytes, out.fault), (len, None));
        let want: Vec<u8> = (0..len as usize)
            .map(|i| 0x1122_3344_5566_7788u64.to_le_bytes()[i % 8])
            .collect();
        assert!(m.peek(VA + 0x7f0, len) == want, "bytes of the fill");
        assert!(all(&m.peek(VA, 0x7f0), 0), "nothing before DST");
        // 41 pages touched, each asked for once, as a write.
        let reqs = m.requests.borrow();
        assert_eq!(reqs.len(), 41);
        assert!(reqs.iter().all(|&(_, a)| a == Access::Write));
        let mut pages: Vec<u64> = reqs.iter().map(|r| r.0).collect();
        pages.dedup();
        assert_eq!(pages.len(), 41);
    }

    #[test]
    fn a_copy_asks_for_missing_pages_with_the_access_it_needs() {
        let m = OnDemand::new();
        let (src, dst) = (VA, VA + 0x100_0000);
        // Every other source page, and the first destination page, are
        // resident; a read-only destination page must be asked for again
        // as a write.
        for i in (0..8).step_by(2) {
            m.touch(src + i * PAGE, 1, i as u8 + 1);
        }
        m.touch(dst, 1, 0xee);
        let gpa = m.fault_in(dst + PAGE);
        m.iommu.borrow_mut().map(dst + PAGE, gpa, 1, false);
        let out = go(&m, op(OpKind::Copy, src, dst, 8 * PAGE, 0));
        assert_eq!((out.done_bytes, out.fault), (8 * PAGE, None));
        for i in 0..8u64 {
            let want = if i % 2 == 0 { i as u8 + 1 } else { 0 };
            assert!(all(&m.peek(dst + i * PAGE, PAGE), want), "page {i}");
        }
        let reqs = m.requests.borrow().clone();
        let writes: Vec<u64> = reqs
            .iter()
            .filter(|r| r.1 == Access::Write)
            .map(|r| (r.0 - dst) / PAGE)
            .collect();
        let reads: Vec<u64> = reqs
            .iter()
            .filter(|r| r.1 == Access::Read)
            .map(|r| (r.0 - src) / PAGE)
            .collect();
        // The destination first (the whole chunk), then the source.
        assert_eq!(writes, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(reads, [1, 3, 5, 7]);
        assert_eq!(reqs[..7].iter().filter(|r| r.1 == Access::Write).count(), 7);
    }

    #[test]
    fn a_refused_page_stops_the_operation_there_and_nothing_after_it_is_written() {
        let mut m = OnDemand::new();
        // The process unmapped pages 8..16 of a 32-page buffer it had
        // filled with 0x11; the guest refuses them.
        m.touch(VA, 8, 0x11);
        m.touch(VA + 16 * PAGE, 16, 0x11);
        for i in 8..16 {
            m.refused.insert(VA + i * PAGE);
        }
        let out = go(&m, op(OpKind::Fill, 0, VA + 0x100, 32 * PAGE - 0x100, !0));
        assert_eq!(out.done_bytes, 8 * PAGE - 0x100);
        let f = out.fault.unwrap();
        assert_eq!(
            (f.address, f.reason, f.write),
            (VA + 8 * PAGE, FAULT_REASON_PAGE_REQUEST, true)
        );
        assert!(all(&m.peek(VA, 0x100), 0x11));
        assert!(all(&m.peek(VA + 0x100, 8 * PAGE - 0x100), 0xff));
        assert!(all(&m.peek(VA + 16 * PAGE, 16 * PAGE), 0x11));
        // One page request, for the first page of the hole; the guest
        // answered it: nothing to report.
        assert_eq!(*m.requests.borrow(), [(VA + 8 * PAGE, Access::Write)]);
        assert!(m.iommu.borrow().reported.borrow().is_empty());
    }

    #[test]
    fn a_copy_to_a_refused_page_reads_only_the_source_it_can_write() {
        let mut m = OnDemand::new();
        let (src, dst) = (VA, VA + 0x100_0000);
        m.refused.insert(dst + 3 * PAGE);
        m.touch(src, 2, 0x5a);
        let out = go(&m, op(OpKind::Copy, src, dst, 6 * PAGE, 0));
        assert_eq!(out.done_bytes, 3 * PAGE);
        let f = out.fault.unwrap();
        assert_eq!((f.address, f.write), (dst + 3 * PAGE, true));
        assert!(all(&m.peek(dst, 2 * PAGE), 0x5a));
        assert!(all(&m.peek(dst + 2 * PAGE, 4 * PAGE), 0));
        // Source pages past what the destination accepts were never asked
        // for: the process's memory is not faulted in for nothing.
        let reads: Vec<u64> = m
            .requests
            .borrow()
            .iter()
            .filter(|r| r.1 == Access::Read)
            .map(|r| r.0)
            .collect();
        assert_eq!(reads, [src + 2 * PAGE]);
    }

    #[test]
    fn the_deadline_stops_the_operation_with_its_own_reason() {
        let m = OnDemand::new();
        m.answers.set(5);
        let out = go(&m, op(OpKind::Checksum, VA, 0, 16 * PAGE, 0));
        assert_eq!(out.done_bytes, 5 * PAGE);
        let f = out.fault.unwrap();
        assert_eq!(
            (f.address, f.reason, f.write),
            (VA + 5 * PAGE, FAULT_REASON_DEADLINE, false)
        );
        assert_eq!(out.result, fnv1a(FNV_OFFSET, &[0; 5 * PAGE as usize]));
    }

    #[test]
    fn a_reset_during_a_page_request_stops_without_a_fault_and_writes_nothing_more() {
        let mut m = OnDemand::new();
        m.cancel_at = Some(20);
        // Chunk 1 (16 pages) completes; the reset comes during the 5th
        // page request of chunk 2.
        let out = go(&m, op(OpKind::Fill, 0, VA, 64 * PAGE, !0));
        assert_eq!((out.done_bytes, out.fault), (16 * PAGE, None));
        assert!(all(&m.peek(VA, 16 * PAGE), 0xff));
        assert!(all(&m.peek(VA + 16 * PAGE, 4 * PAGE), 0));
        assert_eq!(m.requests.borrow().len(), 21);
    }
}
