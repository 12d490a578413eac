// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! dma-test-device's PASID operations end to end: the device model
//! translating (PASID, virtual address) through a real `viommu-client`
//! against the real daemon binary, and the harness playing a guest kernel
//! with SVA: a process's page table bound to the PASID, page requests
//! taken from the event queue and served as the kernel's fault handler
//! does (map the page, answer SUCCESS) or refused (INVALID).

mod common;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use common::{
    tables::{TableArena, X86Table, RW, US},
    Daemon, Guest, GuestOptions, DATA_AREA, MEM_SIZE,
};
use dma_test_device::{
    device::{Device, IommuLink, Translation},
    engine::{fnv1a, FNV_OFFSET},
    regs::*,
};
use viommu::wire::*;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const EP: u32 = 0x28;
const DOMAIN: u32 = 100;
const PAGE: u64 = 0x1000;
/// The process's buffers.
const VA: u64 = 0x7f5a_0000_0000;
/// Guest RAM of the harness's page tables (data pages come from below).
const TABLES: (u64, u64) = (0x80_0000, 0xc0_0000);
const WAIT: Duration = Duration::from_secs(10);

/// What the guest does with a page request for a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Maps it (as the kernel's fault handler) and answers SUCCESS.
    Map,
    /// Answers INVALID: the process has no such page.
    Refuse,
    /// Leaves the request unanswered.
    Ignore,
}

/// A guest process bound to a PASID with SVA, and the DMA device.
struct Process {
    g: Guest,
    arena: TableArena,
    root: u64,
    pasid: u32,
    /// Its pages: VA page -> GPA page.
    pages: BTreeMap<u64, u64>,
    next_page: u64,
    /// Pages the guest answers other than `Answer::Map`.
    answers: BTreeMap<u64, Answer>,
    /// Page requests served: (page, write).
    requests: Vec<(u64, bool)>,
    dev: Device,
}

impl Process {
    fn new(d: &Daemon, operation_timeout: Option<Duration>) -> Process {
        let mut g = Guest::connect(&d.socket, GuestOptions::default());
        let (status, pasid) = g.pasid_alloc(1, 0xfffff);
        assert_eq!(status, VIRTIO_IOMMU_S_OK);
        let arena = TableArena::new(&g.mem, TABLES.0, TABLES.1);
        let root = X86Table::new(&arena, 5).root;
        assert_eq!(
            g.attach_table_vtd(DOMAIN, EP, pasid, root, 57),
            VIRTIO_IOMMU_S_OK
        );
        g.post_event_buffers(64, 64);
        let mut link = IommuLink::connect(d.control.clone(), EP, true).unwrap();
        if let Some(t) = operation_timeout {
            link.operation_timeout = t;
        }
        let dev = Device::new(Translation::Iommu(link)).unwrap();
        let region = g.mem.find_region(GuestAddress(0)).unwrap();
        let file = region.file_offset().unwrap().file().try_clone().unwrap();
        dev.ram()
            .map(0, MEM_SIZE, Some((file, 0)), true, true)
            .unwrap();
        Process {
            g,
            arena,
            root,
            pasid,
            pages: BTreeMap::new(),
            next_page: DATA_AREA,
            answers: BTreeMap::new(),
            requests: Vec::new(),
            dev,
        }
    }

    fn table(&self) -> X86Table<'_> {
        X86Table {
            arena: &self.arena,
            root: self.root,
            levels: 5,
        }
    }

    /// The process touches `n` pages from `va` with `byte`: they are
    /// resident, writable and dirty.
    fn touch(&mut self, va: u64, n: u64, byte: u8) {
        for i in 0..n {
            let gpa = self.fault_in(va + i * PAGE);
            self.g
                .mem
                .write_slice(&[byte; PAGE as usize], GuestAddress(gpa))
                .unwrap();
        }
    }

    /// The kernel's fault handler: a zeroed page mapped at `page`.
    fn fault_in(&mut self, page: u64) -> u64 {
        assert!(self.next_page < TABLES.0, "out of data pages");
        let gpa = self.next_page;
        self.next_page += PAGE;
        self.g
            .mem
            .write_slice(&[0u8; PAGE as usize], GuestAddress(gpa))
            .unwrap();
        self.table().map(page, 1, gpa, RW | US);
        self.pages.insert(page, gpa);
        gpa
    }

    /// The process's munmap: the pages go from the table, INVALIDATE
    /// (what its MMU notifier sends), and page requests for them are
    /// refused from now on.
    fn munmap(&mut self, va: u64, n: u64) {
        for i in 0..n {
            self.table().unmap(va + i * PAGE);
            self.pages.remove(&(va + i * PAGE));
            self.answers.insert(va + i * PAGE, Answer::Refuse);
        }
        assert_eq!(
            self.g.invalidate_range(DOMAIN, self.pasid, va, n),
            VIRTIO_IOMMU_S_OK
        );
    }

    /// The bytes of `[va, va + len)`, 0 where nothing is mapped.
    fn read(&self, va: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let mut at = va;
        while at < va + len {
            let page = at & !(PAGE - 1);
            let n = (page + PAGE).min(va + len) - at;
            if let Some(gpa) = self.pages.get(&page) {
                let o = (at - va) as usize;
                self.g
                    .mem
                    .read_slice(&mut out[o..o + n as usize], GuestAddress(gpa + at - page))
                    .unwrap();
            }
            at += n;
        }
        out
    }

    /// Starts an operation with the process's PASID.
    fn start(&self, op: u32, src: u64, dst: u64, len: u64, pattern: u64) {
        let w64 = |off, v: u64| self.dev.bar_write(off, &v.to_le_bytes());
        w64(SRC, src);
        w64(DST, dst);
        w64(LEN, len);
        w64(PATTERN, pattern);
        self.dev.bar_write(PASID, &self.pasid.to_le_bytes());
        self.dev.bar_write(CMD, &(op | CMD_USE_PASID).to_le_bytes());
    }

    /// Serves the device's page requests (as the guest kernel's worker)
    /// until the operation ends; returns STATUS.
    fn serve(&mut self) -> Status {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((len, bytes)) = self.g.wait_event(Duration::from_millis(2)) {
                assert_eq!(len, 48);
                let mut r = FaultRecordExt::default();
                r.as_mut_slice().copy_from_slice(&bytes[..48]);
                self.page_request(&r);
                self.g.post_event_buffers(1, 64);
            } else if self.dev.status() != Status::Busy {
                return self.dev.status();
            }
            assert!(Instant::now() < deadline, "the operation did not end");
        }
    }

    fn page_request(&mut self, r: &FaultRecordExt) {
        let flags = r.flags.to_native();
        let bits = VIRTIO_IOMMU_FAULT_F_PAGE_REQ
            | VIRTIO_IOMMU_FAULT_F_ADDRESS
            | VIRTIO_IOMMU_FAULT_F_GROUP_ID
            | VIRTIO_IOMMU_FAULT_F_PASID
            | VIRTIO_IOMMU_FAULT_F_LAST;
        assert_eq!(flags & bits, bits, "{flags:#x}");
        assert_eq!(
            (r.endpoint.to_native(), r.pasid.to_native()),
            (EP, self.pasid)
        );
        let page = r.address.to_native();
        let write = flags & VIRTIO_IOMMU_FAULT_F_WRITE != 0;
        self.requests.push((page, write));
        let code = match self.answers.get(&page).copied().unwrap_or(Answer::Map) {
            Answer::Ignore => return,
            Answer::Refuse => VIRTIO_IOMMU_PAGE_RESP_INVALID,
            Answer::Map => {
                if !self.pages.contains_key(&page) {
                    self.fault_in(page);
                }
                VIRTIO_IOMMU_PAGE_RESP_SUCCESS
            }
        };
        let resp = PageRespReq::new(EP, Some(self.pasid), r.group_id.to_native(), code);
        assert_eq!(self.g.request(&resp), VIRTIO_IOMMU_S_OK);
    }

    fn reg(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(off, &mut b);
        u64::from_le_bytes(b)
    }
}

fn all(bytes: &[u8], b: u8) -> bool {
    bytes.iter().all(|&x| x == b)
}

fn pattern_bytes(pattern: u64, len: u64) -> Vec<u8> {
    (0..len as usize)
        .map(|i| pattern.to_le_bytes()[i % 8])
        .collect()
}

#[test]
fn a_fill_of_memory_the_process_never_touched_is_served_page_by_page() {
    let d = Daemon::start(&["--endpoints", "0x28"]);
    let mut p = Process::new(&d, None);
    let len = 96 * PAGE;
    let pattern = 0x0123_4567_89ab_cdef;
    p.start(OP_FILL, 0, VA, len, pattern);
    assert_eq!(p.serve(), Status::Done);
    assert_eq!(p.reg(DONE_BYTES), len);
    assert!(
        p.read(VA, len) == pattern_bytes(pattern, len),
        "filled bytes"
    );
    // Every page came through one page request, as a write.
    assert_eq!(p.requests.len(), 96);
    assert!(p.requests.iter().all(|&(_, w)| w));
    let stats = d.ctl(&["stats"]);
    let pr = &stats["page_requests"];
    assert_eq!(
        (pr["raised"].as_u64(), pr["delivered"].as_u64()),
        (Some(96), Some(96))
    );
    assert_eq!(pr["guest"]["success"], 96);
    assert_eq!(pr["in_flight"], 0);
    // Resident now: the same fill asks nothing.
    p.start(OP_FILL, 0, VA, len, !pattern);
    assert_eq!(p.serve(), Status::Done);
    assert_eq!(p.requests.len(), 96);
    assert!(d.errors().is_empty(), "{:?}", d.errors());
}

#[test]
fn a_copy_with_some_pages_resident_asks_for_the_others_only() {
    let d = Daemon::start(&["--endpoints", "0x28"]);
    let mut p = Process::new(&d, None);
    let (src, dst, pages) = (VA, VA + 0x100_0000, 32);
    for i in (0..pages).step_by(2) {
        p.touch(src + i * PAGE, 1, i as u8 | 1);
    }
    p.touch(dst, pages / 2, 0xee);
    p.start(OP_COPY, src, dst, pages * PAGE, 0);
    assert_eq!(p.serve(), Status::Done);
    for i in 0..pages {
        let want = if i % 2 == 0 { i as u8 | 1 } else { 0 };
        assert!(all(&p.read(dst + i * PAGE, PAGE), want), "page {i}");
    }
    let reads: Vec<u64> = p
        .requests
        .iter()
        .filter(|r| !r.1)
        .map(|r| (r.0 - src) / PAGE)
        .collect();
    let writes: Vec<u64> = p
        .requests
        .iter()
        .filter(|r| r.1)
        .map(|r| (r.0 - dst) / PAGE)
        .collect();
    assert_eq!(reads, (1..pages).step_by(2).collect::<Vec<_>>());
    assert_eq!(writes, (pages / 2..pages).collect::<Vec<_>>());
    // A checksum of what is now resident asks nothing.
    let before = p.requests.len();
    p.start(OP_CHECKSUM, dst, 0, pages * PAGE, 0);
    assert_eq!(p.serve(), Status::Done);
    assert_eq!(p.reg(RESULT), fnv1a(FNV_OFFSET, &p.read(dst, pages * PAGE)));
    assert_eq!(p.requests.len(), before);
}

#[test]
fn a_refused_page_stops_the_operation_there_and_nothing_after_it_is_written() {
    let d = Daemon::start(&["--endpoints", "0x28"]);
    let mut p = Process::new(&d, None);
    // 32 pages filled by the process, then pages 8..16 unmapped.
    p.touch(VA, 32, 0x11);
    p.munmap(VA + 8 * PAGE, 8);
    p.start(OP_FILL, 0, VA + 0x80, 32 * PAGE - 0x80, !0);
    assert_eq!(p.serve(), Status::Fault);
    assert_eq!(p.reg(FAULT_ADDR), VA + 8 * PAGE);
    assert_eq!(
        p.reg(FAULT_INFO) as u32,
        FAULT_REASON_PAGE_REQUEST | FAULT_INFO_WRITE
    );
    assert_eq!(p.reg(DONE_BYTES), 8 * PAGE - 0x80);
    assert!(all(&p.read(VA, 0x80), 0x11));
    assert!(all(&p.read(VA + 0x80, 8 * PAGE - 0x80), 0xff));
    assert!(
        all(&p.read(VA + 16 * PAGE, 16 * PAGE), 0x11),
        "after the hole"
    );
    assert_eq!(p.requests, [(VA + 8 * PAGE, true)]);
    let pr = &d.ctl(&["stats"])["page_requests"];
    assert_eq!(pr["guest"]["invalid"], 1);
    // A write to a page the process may only read: refused the same way.
    let ro = VA + 0x200_0000;
    p.fault_in(ro);
    p.table().map(ro, 1, p.pages[&ro], US);
    p.answers.insert(ro, Answer::Refuse);
    p.start(OP_FILL, 0, ro, 16, 0x5a);
    assert_eq!(p.serve(), Status::Fault);
    assert_eq!((p.reg(FAULT_ADDR), p.reg(DONE_BYTES)), (ro, 0));
    assert!(all(&p.read(ro, PAGE), 0));
}

#[test]
fn an_unanswered_page_request_ends_the_operation_at_its_deadline() {
    let d = Daemon::start(&["--endpoints", "0x28"]);
    let mut p = Process::new(&d, Some(Duration::from_millis(300)));
    p.touch(VA, 2, 0);
    p.answers.insert(VA + 2 * PAGE, Answer::Ignore);
    let t0 = Instant::now();
    p.start(OP_FILL, 0, VA, 4 * PAGE, 0x4242_4242_4242_4242);
    assert_eq!(p.serve(), Status::Fault);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        (p.reg(FAULT_ADDR), p.reg(DONE_BYTES)),
        (VA + 2 * PAGE, 2 * PAGE)
    );
    assert_eq!(
        p.reg(FAULT_INFO) as u32,
        FAULT_REASON_DEADLINE | FAULT_INFO_WRITE
    );
    assert!(all(&p.read(VA, 2 * PAGE), 0x42));
}

#[test]
fn a_reset_stops_an_operation_waiting_for_the_guest() {
    let d = Daemon::start(&["--endpoints", "0x28"]);
    let mut p = Process::new(&d, None);
    p.answers.insert(VA, Answer::Ignore);
    p.start(OP_CHECKSUM, VA, 0, 64 * PAGE, 0);
    // The device waits for the guest's answer to its first page request.
    let (_, ev) = p.g.wait_event(WAIT).expect("no page request");
    assert_eq!(ev[0], VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(p.dev.status(), Status::Busy);
    let t0 = Instant::now();
    p.dev.reset();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(p.dev.status(), Status::Idle);
    assert_eq!(p.reg(DONE_BYTES), 0);
}

#[test]
fn unbinding_in_the_middle_of_an_operation_ends_it_and_answers_everything() {
    let d = Daemon::start(&["--endpoints", "0x28"]);
    let mut p = Process::new(&d, None);
    // The process exits: its table goes while the device waits for a page.
    p.answers.insert(VA + 5 * PAGE, Answer::Ignore);
    p.start(OP_FILL, 0, VA, 16 * PAGE, 7);
    let t0 = Instant::now();
    while p.requests.len() < 6 {
        if let Some((_, bytes)) = p.g.wait_event(Duration::from_millis(2)) {
            let mut r = FaultRecordExt::default();
            r.as_mut_slice().copy_from_slice(&bytes[..48]);
            p.page_request(&r);
            p.g.post_event_buffers(1, 64);
        }
        assert!(t0.elapsed() < WAIT);
    }
    assert_eq!(p.g.detach_table(DOMAIN, EP, p.pasid), VIRTIO_IOMMU_S_OK);
    // The open request was answered INVALID by the device (unbound), and
    // the pages before it, translated but not yet written, may not be
    // written any more: nothing of the chunk was.
    assert_eq!(p.serve(), Status::Fault);
    assert_eq!((p.reg(FAULT_ADDR), p.reg(DONE_BYTES)), (VA, 0));
    assert_eq!(
        p.reg(FAULT_INFO) as u32,
        FAULT_REASON_TRANSLATION | FAULT_INFO_WRITE
    );
    assert!(all(&p.read(VA, 5 * PAGE), 0));
    let pr = &d.ctl(&["stats"])["page_requests"];
    assert_eq!(pr["auto"]["unbound"], 1);
    assert_eq!(pr["in_flight"], 0);
    assert_eq!(d.ctl(&["faults"])["groups"], serde_json::json!([]));
    // Nothing bound any more: a new operation faults at once, without a
    // page request (there is no table to ask about).
    p.start(OP_FILL, 0, VA, PAGE, 7);
    assert_eq!(p.serve(), Status::Fault);
    assert_eq!(
        p.reg(FAULT_INFO) as u32,
        FAULT_REASON_TRANSLATION | FAULT_INFO_WRITE
    );
    assert_eq!(p.requests.len(), 6);
    assert_eq!(p.g.pasid_free(p.pasid), VIRTIO_IOMMU_S_OK);
    assert!(d.ctl(&["pasids"])["pasids"].as_array().unwrap().is_empty());
}
