// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page requests end to end: a device model (viommu-client) or a host
//! iommufd fault queue (a socket speaking the kernel's record formats)
//! touches a page the guest has not mapped in its table; the guest driver
//! (the harness) receives the page request on its event queue, maps the
//! page and answers with PAGE_RESP; the answer reaches the source once,
//! and the retry translates. When the guest cannot answer (no buffer,
//! feature not negotiated, binding gone, timeout, frontend gone) the
//! device answers INVALID, once, and says why.

mod common;

use std::{
    os::fd::{AsFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use common::{
    tables::{TableArena, X86Table, RW, US},
    Daemon, Guest, GuestOptions, DATA_AREA,
};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use viommu::{pgtable::PageAccess, wire::*};
use viommu_client::{
    AutoCause, Client, Error, Options, PageResponse, PasidTranslation, ResponseCode,
};
use vm_memory::ByteValued;

const EP: u32 = 0x28;
const VA: u64 = 0x7f00_0000_0000;
const WAIT: Duration = Duration::from_secs(5);

/// A guest with a PASID bound to an empty 4-level table in its memory,
/// and `buffers` 64-byte event buffers posted.
struct Sva {
    g: Guest,
    arena: TableArena,
    root: u64,
    pasid: u32,
}

impl Sva {
    fn new(d: &Daemon, options: GuestOptions, buffers: usize) -> Sva {
        let mut g = Guest::connect(&d.socket, options);
        let (status, pasid) = g.pasid_alloc(1, 1000);
        assert_eq!(status, VIRTIO_IOMMU_S_OK);
        let arena = TableArena::new(&g.mem, 0x80_0000, 0xc0_0000);
        let root = X86Table::new(&arena, 4).root;
        let st = g.attach_table_vtd(100, EP, pasid, root, 48);
        assert_eq!(st, VIRTIO_IOMMU_S_OK);
        g.post_event_buffers(buffers, 64);
        Sva {
            g,
            arena,
            root,
            pasid,
        }
    }

    /// Maps page `k` of the data area at `va` (what the guest kernel's
    /// fault handler does).
    fn map(&self, va: u64, k: u64) {
        let t = X86Table {
            arena: &self.arena,
            root: self.root,
            levels: 4,
        };
        t.map(va, 1, DATA_AREA + k * 0x1000, RW | US);
    }

    /// The next event record.
    fn event(&mut self) -> (u32, FaultRecordExt) {
        let (len, bytes) = self.g.wait_event(WAIT).expect("no event");
        let mut r = FaultRecordExt::default();
        let n = bytes.len().min(48);
        r.as_mut_slice()[..n].copy_from_slice(&bytes[..n]);
        (len, r)
    }

    /// PAGE_RESP for the group of `r`.
    fn answer(&mut self, r: &FaultRecordExt, code: u16) -> u8 {
        let pasid =
            (r.flags.to_native() & VIRTIO_IOMMU_FAULT_F_PASID != 0).then(|| r.pasid.to_native());
        let req = PageRespReq::new(r.endpoint.to_native(), pasid, r.group_id.to_native(), code);
        self.g.request(&req)
    }
}

fn page_request_bits() -> u32 {
    VIRTIO_IOMMU_FAULT_F_PAGE_REQ | VIRTIO_IOMMU_FAULT_F_ADDRESS | VIRTIO_IOMMU_FAULT_F_GROUP_ID
}

#[test]
fn a_device_models_first_touch_becomes_a_page_request_and_the_retry_translates() {
    let d = Daemon::start(&[]);
    let mut s = Sva::new(&d, GuestOptions::default(), 8);
    let vmm = Client::connect(
        &d.control,
        Options {
            cache: true,
            subscribe: None,
        },
    )
    .unwrap();
    let va = VA + 0x1234;
    let ticket = match vmm
        .translate_pasid_or_request_with(EP, s.pasid, va, 8, PageAccess::WRITE, |seg| seg[0].gpa)
        .unwrap()
    {
        PasidTranslation::PageRequest(t) => t,
        PasidTranslation::Done(gpa) => panic!("translated to {gpa:#x} through an empty table"),
    };
    assert_eq!(ticket.fault().address, va);
    // The guest's event queue has the request.
    let (len, r) = s.event();
    assert_eq!(len, 48);
    let flags = r.flags.to_native();
    assert_eq!(flags & page_request_bits(), page_request_bits());
    assert_ne!(flags & VIRTIO_IOMMU_FAULT_F_LAST, 0);
    assert_ne!(flags & VIRTIO_IOMMU_FAULT_F_WRITE, 0);
    assert_ne!(flags & VIRTIO_IOMMU_FAULT_F_PASID, 0);
    assert_eq!(
        (
            r.endpoint.to_native(),
            r.pasid.to_native(),
            r.address.to_native()
        ),
        (EP, s.pasid, VA + 0x1000)
    );
    // The guest maps the page and answers.
    s.map(VA + 0x1000, 3);
    assert_eq!(
        s.answer(&r, VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        VIRTIO_IOMMU_S_OK
    );
    assert_eq!(
        ticket.wait(WAIT).unwrap(),
        PageResponse {
            code: ResponseCode::Success,
            cause: None
        }
    );
    // Answered once: a second PAGE_RESP names no group.
    assert_eq!(
        s.answer(&r, VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        VIRTIO_IOMMU_S_NOENT
    );
    let gpa = vmm
        .translate_pasid_with(EP, s.pasid, va, 8, PageAccess::WRITE, |seg| seg[0].gpa)
        .unwrap();
    assert_eq!(gpa, DATA_AREA + 3 * 0x1000 + 0x234);
    let stats = d.ctl(&["stats"]);
    assert_eq!(stats["page_requests"]["raised"], 1);
    assert_eq!(stats["page_requests"]["guest"]["success"], 1);
    assert_eq!(stats["page_requests"]["unknown_responses"], 1);
}

#[test]
fn the_blocking_variant_waits_for_each_page_the_guest_maps() {
    let d = Daemon::start(&[]);
    let mut s = Sva::new(&d, GuestOptions::default(), 8);
    let control = d.control.clone();
    let pasid = s.pasid;
    // A device model reading three pages: each missing page is one page
    // request, served by the "guest" below.
    let dma = thread::spawn(move || {
        let vmm = Client::connect(&control, Options::default()).unwrap();
        vmm.translate_pasid_resolving_with(
            EP,
            pasid,
            VA,
            3 * 0x1000,
            PageAccess::READ,
            WAIT,
            |seg| seg.iter().map(|s| s.gpa).collect::<Vec<_>>(),
        )
    });
    for _ in 0..3 {
        let (_, r) = s.event();
        let page = (r.address.to_native() - VA) / 0x1000;
        s.map(r.address.to_native(), 10 + page);
        assert_eq!(
            s.answer(&r, VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
            VIRTIO_IOMMU_S_OK
        );
    }
    let gpas = dma.join().unwrap().unwrap();
    assert_eq!(
        gpas,
        (0..3)
            .map(|k| DATA_AREA + (10 + k) * 0x1000)
            .collect::<Vec<_>>()
    );
    // A page the guest refuses ends the transfer, without a retry.
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    let control = d.control.clone();
    let refused = thread::spawn(move || {
        let vmm = Client::connect(&control, Options::default()).unwrap();
        vmm.translate_pasid_resolving_with(
            EP,
            pasid,
            VA + 0x10_0000,
            8,
            PageAccess::READ,
            WAIT,
            |_| (),
        )
    });
    let (_, r) = s.event();
    assert_eq!(
        s.answer(&r, VIRTIO_IOMMU_PAGE_RESP_INVALID),
        VIRTIO_IOMMU_S_OK
    );
    match refused.join().unwrap() {
        Err(Error::PageRequestFailed { response, .. }) => {
            assert_eq!(response.code, ResponseCode::Invalid)
        }
        other => panic!("{other:?}"),
    }
    drop(vmm);
}

/// A socket pair standing in for an iommufd fault queue: the daemon
/// gets one end, the test plays the kernel on the other.
fn fault_queue() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

fn pgfault(
    dev_id: u32,
    pasid: Option<u32>,
    grpid: u32,
    addr: u64,
    last: bool,
    cookie: u32,
) -> HwptPgfault {
    let mut flags = 0;
    if pasid.is_some() {
        flags |= IOMMU_PGFAULT_FLAGS_PASID_VALID;
    }
    if last {
        flags |= IOMMU_PGFAULT_FLAGS_LAST_PAGE;
    }
    HwptPgfault {
        flags: flags.into(),
        dev_id: dev_id.into(),
        pasid: pasid.unwrap_or(0).into(),
        grpid: grpid.into(),
        perm: (VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE).into(),
        addr: addr.into(),
        cookie: cookie.into(),
        ..Default::default()
    }
}

/// The kernel side: writes records (one group per write, as the kernel
/// hands out whole groups).
fn send_group(kernel: &OwnedFd, records: &[HwptPgfault]) {
    let bytes: Vec<u8> = records.iter().flat_map(|r| r.as_slice().to_vec()).collect();
    nix::unistd::write(kernel, &bytes).unwrap();
}

/// The next response the daemon wrote, waiting at most `WAIT`.
fn response(kernel: &OwnedFd) -> (u32, u32) {
    let deadline = Instant::now() + WAIT;
    // The daemon writes the responses of a batch in one write: here,
    // one group answered at a time, so one response a write.
    let mut buf = [0u8; 512];
    loop {
        match nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(kernel),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(8) => break,
            Ok(n) => panic!("{n} bytes of responses, one 8-byte response expected"),
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("no response: {e}"),
        }
    }
    let mut r = HwptPageResponse::default();
    r.as_mut_slice().copy_from_slice(&buf[..8]);
    (r.cookie.to_native(), r.code.to_native())
}

/// Whether no response is waiting (looked at, not taken).
fn no_response(kernel: &OwnedFd) -> bool {
    let mut buf = [0u8; 8];
    matches!(
        nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(kernel),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_PEEK,
        ),
        Err(nix::errno::Errno::EAGAIN)
    )
}

#[test]
fn a_host_fault_queue_group_reaches_the_guest_and_its_response_goes_back_by_cookie() {
    let d = Daemon::start(&[]);
    let mut s = Sva::new(&d, GuestOptions::default(), 8);
    let (kernel, daemon_end) = fault_queue();
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    vmm.attach_fault_queue(daemon_end.as_fd(), &[(7, EP)])
        .unwrap();
    drop(daemon_end);
    assert_eq!(d.ctl(&["stats"])["page_requests"]["fault_queues"], 1);
    // Two pages in one group (PRGI 5): the host PASID is the guest's
    // (PASID_ALLOC hands out host PASIDs).
    let pasid = Some(s.pasid);
    send_group(
        &kernel,
        &[
            pgfault(7, pasid, 5, VA, false, 0x77),
            pgfault(7, pasid, 5, VA + 0x1000, true, 0x77),
        ],
    );
    let (_, first) = s.event();
    let (_, last) = s.event();
    assert_eq!(first.flags.to_native() & VIRTIO_IOMMU_FAULT_F_LAST, 0);
    assert_ne!(last.flags.to_native() & VIRTIO_IOMMU_FAULT_F_LAST, 0);
    for r in [&first, &last] {
        assert_eq!((r.endpoint.to_native(), r.group_id.to_native()), (EP, 5));
    }
    assert_eq!(last.address.to_native(), VA + 0x1000);
    let faults = d.ctl(&["faults"]);
    assert_eq!(faults["groups"][0]["stage"], "awaiting-guest");
    assert_eq!(faults["groups"][0]["group_id"], 5);
    assert!(no_response(&kernel), "nothing before the guest answers");
    s.map(VA, 1);
    s.map(VA + 0x1000, 2);
    assert_eq!(
        s.answer(&last, VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        VIRTIO_IOMMU_S_OK
    );
    // By the time PAGE_RESP completes, the response is on the queue.
    assert_eq!(response(&kernel), (0x77, IOMMUFD_PAGE_RESP_SUCCESS));
    assert!(no_response(&kernel), "one response per group");
    // The guest's FAILURE becomes INVALID: iommufd knows two codes.
    send_group(&kernel, &[pgfault(7, pasid, 6, VA + 0x5000, true, 0x78)]);
    let (_, r) = s.event();
    s.answer(&r, VIRTIO_IOMMU_PAGE_RESP_FAILURE);
    assert_eq!(response(&kernel), (0x78, IOMMUFD_PAGE_RESP_INVALID));
    // Records the daemon cannot route are answered at once, and counted:
    // an unknown device, a PASID that is not this VM's.
    send_group(&kernel, &[pgfault(8, pasid, 1, VA, true, 0x90)]);
    assert_eq!(response(&kernel), (0x90, IOMMUFD_PAGE_RESP_INVALID));
    send_group(&kernel, &[pgfault(7, Some(999_999), 1, VA, true, 0x91)]);
    assert_eq!(response(&kernel), (0x91, IOMMUFD_PAGE_RESP_INVALID));
    // A PASID of this VM that nothing is bound to: the model refuses it.
    send_group(&kernel, &[pgfault(7, None, 1, VA, true, 0x92)]);
    assert_eq!(response(&kernel), (0x92, IOMMUFD_PAGE_RESP_INVALID));
    let p = &d.ctl(&["stats"])["page_requests"];
    assert_eq!(
        (p["unknown_device"].as_u64(), p["unknown_pasid"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(p["auto"]["refused"], 1);
    // The kernel side hangs up: the queue is detached.
    drop(kernel);
    d.wait_for(
        || d.ctl(&["stats"])["page_requests"]["fault_queues"] == 0,
        "fault queue detached",
    );
    assert!(!vmm.is_closed());
}

#[test]
fn detach_table_answers_the_outstanding_group_before_it_completes() {
    let d = Daemon::start(&[]);
    let mut s = Sva::new(&d, GuestOptions::default(), 8);
    let (kernel, daemon_end) = fault_queue();
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    vmm.attach_fault_queue(daemon_end.as_fd(), &[(7, EP)])
        .unwrap();
    send_group(&kernel, &[pgfault(7, Some(s.pasid), 2, VA, true, 0x55)]);
    let (_, r) = s.event();
    assert_eq!(s.g.detach_table(100, EP, s.pasid), VIRTIO_IOMMU_S_OK);
    // Written before DETACH_TABLE completed: no wait needed.
    assert!(
        !no_response(&kernel),
        "answered before DETACH_TABLE completed"
    );
    assert_eq!(response(&kernel), (0x55, IOMMUFD_PAGE_RESP_INVALID));
    assert_eq!(
        s.answer(&r, VIRTIO_IOMMU_PAGE_RESP_SUCCESS),
        VIRTIO_IOMMU_S_NOENT
    );
    assert_eq!(d.ctl(&["stats"])["page_requests"]["auto"]["unbound"], 1);
    // The PASID is held by nothing any more: freed, it is reusable.
    assert_eq!(s.g.pasid_free(s.pasid), VIRTIO_IOMMU_S_OK);
    let p = &d.ctl(&["pasids"])["pasids"];
    assert!(
        p.as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] != "inactive"),
        "{p}"
    );
}

/// Raises one page request through a device model; returns its answer.
fn raise_and_wait(d: &Daemon, pasid: u32, va: u64) -> PageResponse {
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    match vmm
        .translate_pasid_or_request_with(EP, pasid, va, 8, PageAccess::READ, |_| ())
        .unwrap()
    {
        PasidTranslation::PageRequest(t) => t.wait(WAIT).unwrap(),
        PasidTranslation::Done(()) => panic!("translated"),
    }
}

fn auto(cause: AutoCause) -> PageResponse {
    PageResponse {
        code: ResponseCode::Invalid,
        cause: Some(cause),
    }
}

#[test]
fn groups_the_guest_cannot_receive_are_answered_invalid_with_the_reason() {
    // No event buffer posted.
    let d = Daemon::start(&[]);
    let s = Sva::new(&d, GuestOptions::default(), 0);
    assert_eq!(raise_and_wait(&d, s.pasid, VA), auto(AutoCause::NoBuffer));
    // Buffers too small for the 48-byte record.
    let d = Daemon::start(&[]);
    let mut s = Sva::new(&d, GuestOptions::default(), 0);
    s.g.post_event_buffers(4, 24);
    assert_eq!(
        raise_and_wait(&d, s.pasid, VA),
        auto(AutoCause::BufferTooSmall)
    );
    // A driver that did not negotiate page requests (a mainline guest
    // never sees one).
    let d = Daemon::start(&[]);
    let options = GuestOptions {
        drop_features: 1 << VIRTIO_IOMMU_F_PAGE_REQUEST,
        ..Default::default()
    };
    let mut s = Sva::new(&d, options, 4);
    assert_eq!(
        raise_and_wait(&d, s.pasid, VA),
        auto(AutoCause::NotNegotiated)
    );
    assert!(s.g.wait_event(Duration::from_millis(100)).is_none());
    let stats = d.ctl(&["stats"]);
    assert_eq!(stats["page_requests"]["auto"]["not-negotiated"], 1);
}

#[test]
fn a_group_the_guest_leaves_unanswered_times_out_and_a_lost_frontend_answers_the_rest() {
    let d = Daemon::start(&["--page-request-timeout-ms", "300"]);
    let mut s = Sva::new(&d, GuestOptions::default(), 8);
    let start = Instant::now();
    assert_eq!(raise_and_wait(&d, s.pasid, VA), auto(AutoCause::Timeout));
    assert!(start.elapsed() >= Duration::from_millis(300));
    let (_, r) = s.event();
    assert_eq!(
        s.answer(&r, 0),
        VIRTIO_IOMMU_S_NOENT,
        "answered by the device"
    );

    let d = Daemon::start(&[]);
    let s = Sva::new(&d, GuestOptions::default(), 8);
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    let ticket = match vmm
        .translate_pasid_or_request_with(EP, s.pasid, VA, 8, PageAccess::READ, |_| ())
        .unwrap()
    {
        PasidTranslation::PageRequest(t) => t,
        PasidTranslation::Done(()) => panic!("translated"),
    };
    assert_eq!(d.ctl(&["faults"])["groups"].as_array().unwrap().len(), 1);
    drop(s);
    assert_eq!(ticket.wait(WAIT).unwrap(), auto(AutoCause::FrontendLost));
    assert_eq!(d.ctl(&["faults"])["groups"], serde_json::json!([]));
}

#[test]
fn with_page_requests_negotiated_faults_use_the_48_byte_record() {
    let d = Daemon::start(&[]);
    let mut s = Sva::new(&d, GuestOptions::default(), 2);
    let f = d.ctl(&["fault", "--endpoint", "0x28", "--address", "0x5000"]);
    assert_eq!(f["ok"], true);
    let (len, r) = s.event();
    assert_eq!(len, 48);
    assert_eq!(r.flags.to_native() & VIRTIO_IOMMU_FAULT_F_PAGE_REQ, 0);
    assert_eq!(
        (r.endpoint.to_native(), r.address.to_native()),
        (EP, 0x5000)
    );
    // A mainline driver keeps the spec's 24 bytes.
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(
        &d.socket,
        GuestOptions {
            drop_features: 1 << VIRTIO_IOMMU_F_PAGE_REQUEST,
            ..Default::default()
        },
    );
    g.post_event_buffers(2, 64);
    d.ctl(&["fault", "--endpoint", "0x28", "--address", "0x5000"]);
    assert_eq!(g.wait_event(WAIT).unwrap().0, 24);
}

#[test]
fn a_fault_queue_without_a_descriptor_or_with_bad_routes_is_refused_and_the_daemon_serves_on() {
    use viommu_protocol::{
        messages::{AttachFaultQueue, DeviceRoute},
        Connection, Message, RESULT_INVALID,
    };
    let d = Daemon::start(&["--endpoints", "0x20-0x2f"]);
    let mut c = Connection::connect(&d.control, 0, WAIT).unwrap();
    let reply = c
        .call(|tag| {
            AttachFaultQueue {
                tag,
                devices: vec![DeviceRoute {
                    dev_id: 1,
                    endpoint: EP,
                }],
            }
            .into()
        })
        .unwrap();
    match reply {
        Message::CallResult(r) => {
            assert_eq!(r.status, RESULT_INVALID);
            assert!(r.message.contains("no descriptor"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
    let vmm = Client::connect(&d.control, Options::default()).unwrap();
    let (_kernel, end) = fault_queue();
    for (routes, why) in [
        (vec![(1, 0x40)], "does not exist"),
        (vec![(1, EP), (1, EP)], "twice"),
        (vec![], "routes 1 to"),
    ] {
        match vmm.attach_fault_queue(end.as_fd(), &routes) {
            Err(Error::Daemon { message, .. }) => assert!(message.contains(why), "{message}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(d.ctl(&["stats"])["page_requests"]["fault_queues"], 0);
    // At most 16 queues; each is detached with the connection that
    // attached it.
    let pairs: Vec<_> = (0..16).map(|_| fault_queue()).collect();
    for (_, end) in &pairs {
        vmm.attach_fault_queue(end.as_fd(), &[(1, EP)]).unwrap();
    }
    match vmm.attach_fault_queue(end.as_fd(), &[(1, EP)]) {
        Err(Error::Daemon { message, .. }) => assert!(message.contains("already"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.ctl(&["stats"])["page_requests"]["fault_queues"], 16);
    drop(vmm);
    d.wait_for(
        || d.ctl(&["stats"])["page_requests"]["fault_queues"] == 0,
        "the queues go with their connection",
    );
}
