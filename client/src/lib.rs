// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `viommu-client`: what a VMM links to use an out-of-process
//! vhost-device-iommu (docs/control-protocol.md).
//!
//! - `translate` / `translate_with`: IOVA -> guest-physical segments for
//!   DMA of devices the VMM emulates, through a coherent cache;
//! - `next_event` / `ack`: the IOMMU state as a stream (replay, then
//!   changes) to shadow into VFIO or iommufd;
//! - `report_fault`: an unrecoverable fault delivered to the guest;
//! - `translate_pasid_or_request_with` / `translate_pasid_resolving_with`:
//!   a translation whose page is not present (or lacks the access) raises
//!   a page request; the guest fixes its table and answers, and the
//!   device model translates again;
//! - `attach_fault_queue`: a host iommufd fault queue whose page requests
//!   the daemon forwards to the guest, answering on the queue;
//! - `query`: the inspection documents `ctl` prints;
//! - [`shadow`]: the guest IOMMU shadowed into VFIO or iommufd for
//!   passed-through devices (one `DmaMapper` per endpoint, [`mappers`]);
//! - [`platform`]: translations for emulated devices in the shape of
//!   cloud-hypervisor's `AccessPlatform` / `DmaRemapping`, with the
//!   access direction.
//!
//! Coherence: with the cache on, the daemon does not complete a guest
//! UNMAP or DETACH before this client has dropped the affected
//! translations and acknowledged. `translate_with` holds the cache's read
//! lock while its closure runs, so the acknowledgement also waits for DMA
//! in progress on a translation being invalidated. A client that does not
//! acknowledge in time is disconnected and the guest's request completes;
//! so the cache is used only while the client has read everything the
//! daemon sent less than half that time ago (a lease the reader thread
//! renews), never after the daemon may have given up on it.

#![warn(missing_docs)]

pub mod cache;
pub mod mappers;
pub mod platform;
pub mod shadow;

use std::{
    collections::HashMap,
    io::{self, IoSlice, Write},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock, Weak,
    },
    thread,
    time::{Duration, Instant},
};

use cache::{Cache, Space};
use log::warn;
use nix::{
    errno::Errno,
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::socket::{sendmsg, ControlMessage, MsgFlags},
};
use rustix::time::{clock_getres, clock_gettime, ClockId};
use viommu::wire::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
pub use viommu::{
    pgtable::PageAccess,
    prq::{AutoCause, ResponseCode},
    Access, Invalidation, StateChange,
};
use viommu_protocol::{
    handshake, messages as msg, query, ConnError, FrameReader, Message, Polled, EXTENT_F_EXEC,
    FAULT_F_PAGE_REQUEST, HELLO_F_CACHE, HELLO_F_SUBSCRIBE, HELLO_F_SYNC, RESULT_NO_SUCH_ENDPOINT,
    RESULT_OK, TRANSLATE_F_EXEC, TRANSLATE_F_PAGE_REQUEST, TRANSLATE_F_PRIV,
    TRANSLATE_F_REPORT_FAULT, TRANSLATE_F_WRITE,
};
pub use viommu_protocol::{
    query::Query, Extent, FaultInfo, FAULT_F_EXEC, FAULT_F_PASID, FAULT_F_PRIV, FAULT_F_READ,
    FAULT_F_RECOVERABLE, FAULT_F_WRITE,
};

/// How many times a translation is fetched again when an invalidation
/// keeps removing it before it can be used.
const MAX_REFETCH: usize = 16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the reader thread and a caller spin for a reply before
/// sleeping (a wake-up costs 10-20 us on a virtualised host).
const REPLY_SPIN: Duration = Duration::from_micros(50);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the control socket failed.
    #[error("control socket")]
    Io(#[from] io::Error),
    /// Connecting or the handshake failed.
    #[error("cannot set up the control connection")]
    Connect(#[from] ConnError),
    /// The daemon sent something this client does not expect.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The connection is gone.
    #[error("disconnected from the daemon")]
    Disconnected,
    /// The endpoint is not behind the IOMMU.
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(u32),
    /// The access faults (the IOMMU forbids it).
    #[error("translation fault at {:#x} (endpoint {}, reason {})", .0.address, .0.endpoint, .0.reason)]
    Fault(FaultInfo),
    /// The daemon refused the request.
    #[error("daemon error {status}: {message}")]
    Daemon {
        /// `RESULT_*` status.
        status: u32,
        /// Why.
        message: String,
    },
    /// A query failed.
    #[error(transparent)]
    Query(#[from] query::QueryError),
    /// The translation kept being invalidated before it could be used.
    #[error("translation invalidated {MAX_REFETCH} times in a row")]
    Unstable,
    /// No answer to a page request in time.
    #[error("no answer to the page request at {:#x} within the deadline", .0.address)]
    PageRequestTimeout(FaultInfo),
    /// The guest (or the device for it) could not make the page
    /// available: the access must not be retried.
    #[error("page request at {:#x} answered {:?}", .fault.address, .response)]
    PageRequestFailed {
        /// The fault that raised it.
        fault: FaultInfo,
        /// The answer.
        response: PageResponse,
    },
}

/// The answer to a page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    /// `Success`: translate again; otherwise do not retry the access.
    pub code: ResponseCode,
    /// Why the device answered for the guest; `None` when the guest did.
    pub cause: Option<AutoCause>,
}

impl PageResponse {
    fn from_wire(code: u16, cause: u8) -> Option<Self> {
        Some(PageResponse {
            code: ResponseCode::from_wire(code)?,
            cause: match cause {
                0 => None,
                n => Some(*AutoCause::ALL.get(usize::from(n) - 1)?),
            },
        })
    }
}

/// A page request raised by a translation, waiting for the guest's
/// answer. Dropping it forgets the answer (it still comes).
pub struct PageRequestTicket {
    fault: FaultInfo,
    tag: u32,
    slot: Arc<ReplySlot>,
    shared: Weak<Shared>,
}

impl std::fmt::Debug for PageRequestTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageRequestTicket")
            .field("fault", &self.fault)
            .field("tag", &self.tag)
            .finish()
    }
}

impl PageRequestTicket {
    /// The fault that raised the page request.
    pub fn fault(&self) -> &FaultInfo {
        &self.fault
    }

    /// Waits for the answer, at most `timeout`. The daemon answers every
    /// page request, by the guest or (INVALID) by itself, within its
    /// `--page-request-timeout-ms`.
    pub fn wait(self, timeout: Duration) -> Result<PageResponse, Error> {
        let deadline = Instant::now() + timeout;
        // An answer the guest gives at once is read here, without waking
        // the reader thread and then this one.
        if let Some(shared) = self.shared.upgrade() {
            let spin_until = (Instant::now() + REPLY_SPIN).min(deadline);
            while !self.slot.is_ready() && Instant::now() < spin_until {
                if let Ok(mut reader) = shared.reader.try_lock() {
                    shared.drain(&mut reader);
                }
                thread::yield_now();
            }
        }
        match self.slot.take_until(deadline) {
            Some(Some(Reply::PageResponse(r))) => Ok(r),
            Some(Some(_)) => Err(Error::Protocol("unexpected answer to a page request")),
            Some(None) => Err(Error::Disconnected),
            None => Err(Error::PageRequestTimeout(self.fault)),
        }
    }

    /// Waits for the answer at most `timeout`, keeping the ticket:
    /// `Ok(None)` when none came meanwhile (wait again, or drop the ticket
    /// to stop waiting). A device model that must stop promptly (a device
    /// reset) waits in short slices with this.
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<PageResponse>, Error> {
        match self.slot.take_until(Instant::now() + timeout) {
            Some(Some(Reply::PageResponse(r))) => Ok(Some(r)),
            Some(Some(_)) => Err(Error::Protocol("unexpected answer to a page request")),
            // The answer was taken by an earlier poll, or the connection
            // closed: nothing will come.
            Some(None) => Err(Error::Disconnected),
            None => Ok(None),
        }
    }
}

impl Drop for PageRequestTicket {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.tickets).remove(&self.tag);
        }
    }
}

/// A translation that may have raised a page request.
#[derive(Debug)]
pub enum PasidTranslation<R> {
    /// Translated; the DMA closure ran and returned this.
    Done(R),
    /// The page was not present or lacked the access: the guest was asked
    /// to fix it. Wait for the answer, then translate again.
    PageRequest(PageRequestTicket),
}

/// One guest-physical piece of a translated IOVA range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First IOVA of the piece.
    pub iova: u64,
    /// Its guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

/// How the client follows the IOMMU state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscription {
    /// Events arrive as they happen; the guest does not wait for them.
    Async,
    /// The guest's request completes only after `ack` of each event
    /// (for shadowing into VFIO/iommufd before the guest relies on it).
    Sync,
}

/// Connection options.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Cache translations (and take part in invalidations).
    pub cache: bool,
    /// Follow the IOMMU state.
    pub subscribe: Option<Subscription>,
}

/// One item of the event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Part of the state at subscription time.
    Replayed(StateChange),
    /// The replay is complete; live events follow.
    ReplayDone,
    /// A change; with `Subscription::Sync`, `ack(seq)` it once applied.
    Live {
        /// Sequence number to acknowledge.
        seq: u64,
        /// The change.
        change: StateChange,
    },
}

enum Reply {
    Translation(Vec<Extent>),
    Fault(FaultInfo),
    /// A fault that raised a page request: the request's tag, and where
    /// its answer goes.
    PageRequested(FaultInfo, u32, Arc<ReplySlot>),
    PageResponse(PageResponse),
    Result(u32, String),
    Query(String),
}

/// What one TRANSLATE round trip gave.
enum Fetched {
    Extents(Vec<Extent>),
    PageRequest(PageRequestTicket),
}

struct Call {
    space: Space,
    iova: u64,
    slot: Arc<ReplySlot>,
}

/// Where the reader thread leaves a reply for the caller, who spins a
/// little before sleeping on it.
#[derive(Default)]
struct ReplySlot {
    ready: AtomicBool,
    reply: Mutex<Option<Reply>>,
    cv: Condvar,
}

impl ReplySlot {
    fn put(&self, r: Option<Reply>) {
        *lock(&self.reply) = r;
        self.ready.store(true, Ordering::Release);
        self.cv.notify_one();
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The reply, or `None` when the connection closed first.
    fn take(&self) -> Option<Reply> {
        let mut g = lock(&self.reply);
        while !self.ready.load(Ordering::Acquire) {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.take()
    }

    /// [`Self::take`] until `deadline`: `None` if nothing came by then.
    fn take_until(&self, deadline: Instant) -> Option<Option<Reply>> {
        let mut g = lock(&self.reply);
        while !self.ready.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Some(g.take())
    }
}

/// How long the cache may be trusted after the reader last found the
/// socket empty: less than half the daemon's acknowledgement deadline,
/// minus the clock's granularity twice, so a hit is never served after
/// the daemon could have disconnected this client for a late
/// acknowledgement and let the guest's UNMAP complete.
struct Lease {
    clock: ClockId,
    ttl_ns: u64,
    /// When the reader last found nothing left to read.
    caught_up: std::sync::atomic::AtomicU64,
}

impl Lease {
    fn new(ack_timeout: Duration) -> Lease {
        // The coarse clock is read from the vDSO without a system call
        // (about 2 ns through rustix, against 7.5 ns through nix on the
        // reference machine: every cache hit reads it); its granularity
        // (a scheduler tick) must be small against the timeout.
        let coarse = ClockId::MonotonicCoarse;
        let res = nanos(clock_getres(coarse));
        let half = ack_timeout.as_nanos() as u64 / 2;
        let (clock, ttl_ns) = if res.saturating_mul(8) <= half {
            (coarse, half - 2 * res)
        } else {
            (ClockId::Monotonic, half)
        };
        Lease {
            clock,
            ttl_ns,
            caught_up: std::sync::atomic::AtomicU64::new(0),
        }
    }

    #[inline]
    fn now(&self) -> u64 {
        nanos(clock_gettime(self.clock))
    }

    #[inline]
    fn valid(&self) -> bool {
        let caught_up = self.caught_up.load(Ordering::Acquire);
        caught_up != 0 && self.now().saturating_sub(caught_up) < self.ttl_ns
    }

    /// How often the idle reader renews the lease.
    fn renew_every(&self) -> Duration {
        Duration::from_nanos(self.ttl_ns / 2).max(Duration::from_millis(1))
    }
}

/// A clock reading or resolution in nanoseconds.
#[inline]
fn nanos(t: rustix::time::Timespec) -> u64 {
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}

struct Shared {
    writer: Mutex<UnixStream>,
    /// Whoever holds it reads from the socket: the background thread, or
    /// a caller waiting for its reply.
    reader: Mutex<FrameReader>,
    /// The socket, for the background thread's `poll`.
    poll_fd: OwnedFd,
    calls: Mutex<HashMap<u32, Call>>,
    /// Page requests waiting for their PAGE_RESPONSE, by TRANSLATE tag.
    tickets: Mutex<HashMap<u32, Arc<ReplySlot>>>,
    cache: Option<RwLock<Cache>>,
    /// When the cache may be used (with the cache on).
    lease: Lease,
    events: Mutex<Option<mpsc::Sender<Event>>>,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn send(&self, msg: &Message) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Disconnected);
        }
        lock(&self.writer)
            .write_all(&msg.encode())
            .map_err(Error::Io)
    }

    /// Sends `frame` with `fd` attached to its first byte (`SCM_RIGHTS`).
    fn send_with_fd(&self, frame: &[u8], fd: BorrowedFd<'_>) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Disconnected);
        }
        let mut w = lock(&self.writer);
        let fds = [fd.as_raw_fd()];
        let sent = loop {
            match sendmsg::<()>(
                w.as_raw_fd(),
                &[IoSlice::new(frame)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::Io(e.into())),
            }
        };
        w.write_all(&frame[sent..]).map_err(Error::Io)
    }
}

/// A connection to the daemon's control socket.
pub struct Client {
    shared: Arc<Shared>,
    next_tag: AtomicU32,
    events: Mutex<Option<mpsc::Receiver<Event>>>,
    client_id: u64,
    reader: Option<thread::JoinHandle<()>>,
}

impl Client {
    /// Connects and performs the version handshake.
    pub fn connect(path: impl AsRef<Path>, options: Options) -> Result<Client, Error> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ConnError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let mut flags = 0;
        if options.cache {
            flags |= HELLO_F_CACHE;
        }
        match options.subscribe {
            Some(Subscription::Async) => flags |= HELLO_F_SUBSCRIBE,
            Some(Subscription::Sync) => flags |= HELLO_F_SUBSCRIBE | HELLO_F_SYNC,
            None => {}
        }
        let (welcome, reader) = handshake(&stream, flags, HANDSHAKE_TIMEOUT)?;
        let (tx, rx) = if options.subscribe.is_some() {
            let (tx, rx) = mpsc::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let poll_fd = OwnedFd::from(stream.try_clone()?);
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream),
            reader: Mutex::new(reader),
            poll_fd,
            calls: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
            cache: options.cache.then(|| RwLock::new(Cache::default())),
            lease: Lease::new(Duration::from_millis(u64::from(welcome.ack_timeout_ms))),
            events: Mutex::new(tx),
            closed: AtomicBool::new(false),
        });
        let s = shared.clone();
        let reader = thread::Builder::new()
            .name("viommu-client".into())
            .spawn(move || background(s))?;
        Ok(Client {
            shared,
            next_tag: AtomicU32::new(1),
            events: Mutex::new(rx),
            client_id: welcome.client_id,
            reader: Some(reader),
        })
    }

    /// The ID the daemon gave this client.
    pub fn id(&self) -> u64 {
        self.client_id
    }

    /// Whether the daemon closed the connection.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    fn call(
        &self,
        space: Space,
        iova: u64,
        build: impl FnOnce(u32) -> Message,
    ) -> Result<Reply, Error> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(ReplySlot::default());
        lock(&self.shared.calls).insert(
            tag,
            Call {
                space,
                iova,
                slot: slot.clone(),
            },
        );
        if let Err(e) = self.shared.send(&build(tag)) {
            lock(&self.shared.calls).remove(&tag);
            return Err(e);
        }
        // Read the reply ourselves while it is on its way, unless the
        // background thread is already reading; then sleep on the slot.
        let deadline = Instant::now() + REPLY_SPIN;
        while !slot.is_ready() && Instant::now() < deadline {
            if let Ok(mut reader) = self.shared.reader.try_lock() {
                self.shared.drain(&mut reader);
            }
            // Yield: on a small host the daemon's threads, which produce
            // the reply, may need this core (spinning alone made a device
            // model's round trip about twice as slow on two CPUs).
            thread::yield_now();
        }
        slot.take().ok_or(Error::Disconnected)
    }

    /// One TRANSLATE round trip: the extents that translate from `iova`
    /// on (the daemon may answer a long table range in parts), or the
    /// fault at `iova`.
    fn fetch(&self, req: Request, iova: u64, len: u64, report: bool) -> Result<Fetched, Error> {
        let mut flags = req.flags;
        if report {
            flags |= TRANSLATE_F_REPORT_FAULT;
        }
        let (endpoint, pasid) = (req.space.endpoint, req.space.pasid);
        match self.call(req.space, iova, |tag| {
            msg::Translate {
                tag,
                endpoint,
                flags,
                pasid,
                iova,
                len,
            }
            .into()
        })? {
            Reply::Translation(extents) if !extents.is_empty() => Ok(Fetched::Extents(extents)),
            Reply::Translation(_) => Err(Error::Protocol("empty translation")),
            Reply::Fault(f) => Err(Error::Fault(f)),
            Reply::PageRequested(fault, tag, slot) => Ok(Fetched::PageRequest(PageRequestTicket {
                fault,
                tag,
                slot,
                shared: Arc::downgrade(&self.shared),
            })),
            Reply::Result(RESULT_NO_SUCH_ENDPOINT, _) => Err(Error::NoSuchEndpoint(endpoint)),
            Reply::Result(status, message) => Err(Error::Daemon { status, message }),
            Reply::Query(_) | Reply::PageResponse(_) => {
                Err(Error::Protocol("unexpected reply to a translation"))
            }
        }
    }

    /// One TRANSLATE round trip that raises no page request.
    fn fetch_extents(
        &self,
        req: Request,
        iova: u64,
        len: u64,
        report: bool,
    ) -> Result<Vec<Extent>, Error> {
        match self.fetch(req, iova, len, report)? {
            Fetched::Extents(e) => Ok(e),
            Fetched::PageRequest(_) => Err(Error::Protocol("a page request nobody asked for")),
        }
    }

    /// Translates `[iova, iova + len)` for a DMA `access` of `endpoint`
    /// into guest-physical segments.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<Segment>, Error> {
        self.translate_with(endpoint, iova, len, access, |s| s.to_vec())
    }

    /// Like `translate`, and also reports a failing access on the guest's
    /// event queue.
    pub fn translate_or_report(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<Segment>, Error> {
        let req = Request::iova(endpoint, access);
        let extents = self.fetch_extents(req, iova, len.max(1), true)?;
        Ok(segments(&extents, iova, len))
    }

    /// Translates, then runs `dma` on the segments. With the cache on, an
    /// invalidation of these translations is not acknowledged (so the
    /// guest's UNMAP does not complete) until `dma` has returned. `dma` must
    /// not call back into this client.
    pub fn translate_with<R>(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        dma: impl FnOnce(&[Segment]) -> R,
    ) -> Result<R, Error> {
        self.translate_plain(Request::iova(endpoint, access), iova, len, dma)
    }

    /// Translates `[va, va + len)` of `endpoint` with `pasid` (0: without
    /// PASID) through the guest table bound to it (ATTACH_TABLE).
    pub fn translate_pasid(
        &self,
        endpoint: u32,
        pasid: u32,
        va: u64,
        len: u64,
        access: PageAccess,
    ) -> Result<Vec<Segment>, Error> {
        self.translate_pasid_with(endpoint, pasid, va, len, access, |s| s.to_vec())
    }

    /// [`Self::translate_pasid`], then runs `dma` on the segments, with the
    /// same coherence as [`Self::translate_with`]: an INVALIDATE or
    /// DETACH_TABLE of these pages does not complete before `dma` returned.
    /// A fault flagged `FAULT_F_RECOVERABLE` is one the guest could fix
    /// (a page not present, or without the access).
    pub fn translate_pasid_with<R>(
        &self,
        endpoint: u32,
        pasid: u32,
        va: u64,
        len: u64,
        access: PageAccess,
        dma: impl FnOnce(&[Segment]) -> R,
    ) -> Result<R, Error> {
        self.translate_plain(Request::table(endpoint, pasid, access), va, len, dma)
    }

    /// [`Self::translate_pasid_with`], raising a page request when the
    /// first page that does not translate is one the guest could fix (not
    /// present, or without the access): the call then returns a ticket to
    /// wait on instead of running `dma`. The guest receives the request on
    /// its event queue, fixes its table and answers; translate again after
    /// a `Success`.
    pub fn translate_pasid_or_request_with<R, F: FnOnce(&[Segment]) -> R>(
        &self,
        endpoint: u32,
        pasid: u32,
        va: u64,
        len: u64,
        access: PageAccess,
        dma: F,
    ) -> Result<PasidTranslation<R>, Error> {
        let mut req = Request::table(endpoint, pasid, access);
        req.flags |= TRANSLATE_F_PAGE_REQUEST;
        Ok(match self.translate_req(req, va, len, dma)? {
            Ok(r) => PasidTranslation::Done(r),
            Err((ticket, _)) => PasidTranslation::PageRequest(ticket),
        })
    }

    /// [`Self::translate_pasid_or_request_with`] until the range
    /// translates: each page request is waited for and the translation
    /// retried after a `Success`, all within one total `timeout`. A page
    /// the guest cannot provide is [`Error::PageRequestFailed`].
    #[allow(clippy::too_many_arguments)]
    pub fn translate_pasid_resolving_with<R, F: FnOnce(&[Segment]) -> R>(
        &self,
        endpoint: u32,
        pasid: u32,
        va: u64,
        len: u64,
        access: PageAccess,
        timeout: Duration,
        dma: F,
    ) -> Result<R, Error> {
        let deadline = Instant::now() + timeout;
        let mut req = Request::table(endpoint, pasid, access);
        req.flags |= TRANSLATE_F_PAGE_REQUEST;
        let mut dma = dma;
        loop {
            match self.translate_req(req, va, len, dma)? {
                Ok(r) => return Ok(r),
                Err((ticket, back)) => {
                    dma = back;
                    let fault = ticket.fault;
                    let left = deadline.saturating_duration_since(Instant::now());
                    let response = ticket.wait(left)?;
                    if response.code != ResponseCode::Success {
                        return Err(Error::PageRequestFailed { fault, response });
                    }
                }
            }
        }
    }

    /// A translation that raises no page request.
    fn translate_plain<R>(
        &self,
        req: Request,
        iova: u64,
        len: u64,
        dma: impl FnOnce(&[Segment]) -> R,
    ) -> Result<R, Error> {
        match self.translate_req(req, iova, len, dma)? {
            Ok(r) => Ok(r),
            Err(_) => Err(Error::Protocol("a page request nobody asked for")),
        }
    }

    /// Translates through the cache (or without one), then runs `dma`;
    /// on a page request, hands `dma` back with the ticket.
    #[allow(clippy::type_complexity)]
    fn translate_req<R, F: FnOnce(&[Segment]) -> R>(
        &self,
        req: Request,
        iova: u64,
        len: u64,
        dma: F,
    ) -> Result<Result<R, (PageRequestTicket, F)>, Error> {
        let len = len.max(1);
        let end = iova.saturating_add(len - 1);
        let Some(cache) = &self.shared.cache else {
            // Without a cache: ask until the range is covered (a table
            // range may come in parts).
            let mut extents = Vec::new();
            let mut addr = iova;
            loop {
                let got = match self.fetch(req, addr, end - addr + 1, false)? {
                    Fetched::Extents(e) => e,
                    Fetched::PageRequest(t) => return Ok(Err((t, dma))),
                };
                let last = got.last().map_or(addr, |e| e.iova_end);
                extents.extend(got);
                if last >= end {
                    return Ok(Ok(dma(&segments(&extents, iova, len))));
                }
                addr = last + 1;
            }
        };
        let mut unstable = 0;
        let mut covered_before = None;
        loop {
            let looked = {
                let c = cache.read().unwrap_or_else(|e| e.into_inner());
                // Within the lease only: past it the daemon may have given
                // up on this client and let the guest's UNMAP complete.
                if self.shared.lease.valid() {
                    match cached_segments(&c, req, iova, len) {
                        // The DMA runs under the read lock: no invalidation
                        // of these pages completes meanwhile.
                        Ok(segs) => return Ok(Ok(dma(segs.as_slice()))),
                        Err(from) => Some(from),
                    }
                } else {
                    None
                }
            };
            let from = match looked {
                Some(from) => from,
                None => {
                    // Read what the daemon sent, then look again.
                    self.shared.catch_up();
                    if self.shared.lease.valid() {
                        continue;
                    }
                    iova
                }
            };
            // Progress (a longer cached prefix) is not instability; an
            // invalidation racing the reply is, a bounded number of times.
            if covered_before.is_some_and(|b| from <= b) {
                unstable += 1;
                if unstable >= MAX_REFETCH {
                    return Err(Error::Unstable);
                }
            }
            covered_before = Some(from);
            // Miss: the reader thread caches the reply before handing it
            // over, so the next lookup finds it unless it was invalidated
            // in between, in which case it is fetched again.
            if let Fetched::PageRequest(t) = self.fetch(req, from, end - from + 1, false)? {
                return Ok(Err((t, dma)));
            }
        }
    }

    /// Hands the daemon a host iommufd fault queue (the descriptor of
    /// `IOMMU_FAULT_QUEUE_ALLOC`, or anything speaking its formats) and
    /// the guest endpoint of each iommufd device ID it reports. The
    /// daemon forwards its page requests to the guest and writes each
    /// group's response on it, by cookie, until this connection closes.
    pub fn attach_fault_queue(
        &self,
        queue: BorrowedFd<'_>,
        devices: &[(u32, u32)],
    ) -> Result<(), Error> {
        let devices = devices
            .iter()
            .map(|&(dev_id, endpoint)| msg::DeviceRoute { dev_id, endpoint })
            .collect();
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(ReplySlot::default());
        lock(&self.shared.calls).insert(
            tag,
            Call {
                space: Space::iova(0),
                iova: 0,
                slot: slot.clone(),
            },
        );
        let frame = Message::from(msg::AttachFaultQueue { tag, devices }).encode();
        if let Err(e) = self.shared.send_with_fd(&frame, queue) {
            lock(&self.shared.calls).remove(&tag);
            return Err(e);
        }
        match slot.take() {
            Some(Reply::Result(RESULT_OK, _)) => Ok(()),
            Some(Reply::Result(status, message)) => Err(Error::Daemon { status, message }),
            Some(_) => Err(Error::Protocol("unexpected reply to ATTACH_FAULT_QUEUE")),
            None => Err(Error::Disconnected),
        }
    }

    /// Tells the daemon what the host IOMMU imposes on a passed-through
    /// `endpoint` (what QEMU's `HostIOMMUDevice` gives its virtio-iommu):
    /// its reserved IOVA regions, which replace any given before and go
    /// into the guest's PROBE of it, and the host's page sizes
    /// (`page_size_mask`, 0 for none), which narrow the device's
    /// `page_size_mask` if no guest driver has read it yet and are refused
    /// otherwise when the guest's granule is too small for the host. Give
    /// them before the guest driver probes the endpoint (before boot, or
    /// before a hotplug). Returns the regions the endpoint's PROBE now
    /// adds to the device-wide ones (host regions merged, minus what the
    /// device already reserves).
    pub fn set_host_constraints(
        &self,
        endpoint: u32,
        page_size_mask: u64,
        regions: &[viommu::ReservedRegion],
    ) -> Result<Vec<(u64, u64)>, Error> {
        let regions = regions
            .iter()
            .map(|r| msg::HostRegion {
                start: r.start,
                end: r.end,
                subtype: r.subtype,
            })
            .collect();
        match self.call(Space::iova(endpoint), 0, |tag| {
            msg::SetHostConstraints {
                tag,
                endpoint,
                page_size_mask,
                regions,
            }
            .into()
        })? {
            Reply::Result(RESULT_OK, list) => Ok(list
                .split(',')
                .filter(|s| !s.is_empty())
                .filter_map(|r| {
                    let (a, b) = r.split_once('-')?;
                    let p = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
                    Some((p(a)?, p(b)?))
                })
                .collect()),
            Reply::Result(RESULT_NO_SUCH_ENDPOINT, _) => Err(Error::NoSuchEndpoint(endpoint)),
            Reply::Result(status, message) => Err(Error::Daemon { status, message }),
            _ => Err(Error::Protocol("unexpected reply to SET_HOST_CONSTRAINTS")),
        }
    }

    /// Reports an unrecoverable fault of `endpoint` at `address`; the
    /// daemon delivers it on the guest's event queue. `reason` is a
    /// `VIRTIO_IOMMU_FAULT_R_*` value.
    pub fn report_fault(
        &self,
        endpoint: u32,
        address: u64,
        access: Option<Access>,
        reason: u8,
    ) -> Result<(), Error> {
        let flags = match access {
            Some(Access::Read) => FAULT_F_READ,
            Some(Access::Write) => FAULT_F_WRITE,
            None => 0,
        };
        let fault = FaultInfo {
            reason,
            flags,
            endpoint,
            pasid: 0,
            address,
        };
        match self.call(Space::iova(endpoint), address, |tag| {
            msg::ReportFault { tag, fault }.into()
        })? {
            Reply::Result(RESULT_OK, _) => Ok(()),
            Reply::Result(RESULT_NO_SUCH_ENDPOINT, _) => Err(Error::NoSuchEndpoint(endpoint)),
            Reply::Result(status, message) => Err(Error::Daemon { status, message }),
            _ => Err(Error::Protocol("unexpected reply to a fault report")),
        }
    }

    /// Runs an inspection query and decodes its typed reply
    /// (`viommu_protocol::query` has the reply types).
    pub fn query<R: serde::de::DeserializeOwned>(&self, q: &Query) -> Result<R, Error> {
        let json = query::encode(q)?;
        match self.call(Space::iova(0), 0, |tag| msg::Query { tag, json }.into())? {
            Reply::Query(text) => Ok(query::decode_reply(&text)?),
            Reply::Result(status, message) => Err(Error::Daemon { status, message }),
            _ => Err(Error::Protocol("unexpected reply to a query")),
        }
    }

    /// The next event of the stream (subscribed clients only).
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        lock(&self.events).as_ref()?.recv_timeout(timeout).ok()
    }

    /// Acknowledges a live event (`Subscription::Sync`).
    pub fn ack(&self, seq: u64) -> Result<(), Error> {
        self.shared.send(&msg::Ack { seq }.into())
    }

    /// Number of cached translations.
    pub fn cached(&self) -> usize {
        self.shared
            .cache
            .as_ref()
            .map_or(0, |c| c.read().unwrap_or_else(|e| e.into_inner()).len())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = lock(&self.shared.writer).shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Cuts `[iova, iova + len)` out of the extents of a translation.
fn segments(extents: &[Extent], iova: u64, len: u64) -> Vec<Segment> {
    let end = iova.saturating_add(len.max(1) - 1);
    let mut out = Vec::with_capacity(extents.len());
    let mut addr = iova;
    for e in extents {
        if addr > end || addr < e.iova_start || addr > e.iova_end {
            break;
        }
        let last = e.iova_end.min(end);
        out.push(Segment {
            iova: addr,
            gpa: e.gpa_start.wrapping_add(addr - e.iova_start),
            len: last - addr + 1,
        });
        if last == u64::MAX {
            break;
        }
        addr = last + 1;
    }
    out
}

/// The segments of `[iova, iova + len)` if the cache covers all of it
/// with the access `req` needs; otherwise the first address it misses.
fn cached_segments(c: &Cache, req: Request, iova: u64, len: u64) -> Result<Cached, u64> {
    let end = iova.saturating_add(len - 1);
    // The common case: one extent covers the whole range (no allocation).
    let first = c.lookup(req.space, iova, req.need).ok_or(iova)?;
    if first.iova_end >= end {
        return Ok(Cached::One(Segment {
            iova,
            gpa: first.gpa_start.wrapping_add(iova - first.iova_start),
            len,
        }));
    }
    let mut extents = vec![first];
    let mut addr = first.iova_end + 1;
    loop {
        let e = c.lookup(req.space, addr, req.need).ok_or(addr)?;
        extents.push(e);
        if e.iova_end >= end {
            return Ok(Cached::Many(segments(&extents, iova, len)));
        }
        addr = e.iova_end + 1;
    }
}

/// A range the cache covers: one segment (the common case) or several.
enum Cached {
    One(Segment),
    Many(Vec<Segment>),
}

impl Cached {
    fn as_slice(&self) -> &[Segment] {
        match self {
            Cached::One(s) => std::slice::from_ref(s),
            Cached::Many(v) => v,
        }
    }
}

/// What a translation asks for: the address space, the TRANSLATE flags,
/// and the extent flags a cached translation needs.
#[derive(Clone, Copy, Debug)]
struct Request {
    space: Space,
    flags: u32,
    need: u32,
}

impl Request {
    fn iova(endpoint: u32, access: Access) -> Request {
        Request {
            space: Space::iova(endpoint),
            flags: if access == Access::Write {
                TRANSLATE_F_WRITE
            } else {
                0
            },
            need: access.map_flag(),
        }
    }

    fn table(endpoint: u32, pasid: u32, access: PageAccess) -> Request {
        let mut flags = 0;
        let mut need = VIRTIO_IOMMU_MAP_F_READ;
        if access.write {
            flags |= TRANSLATE_F_WRITE;
            need |= VIRTIO_IOMMU_MAP_F_WRITE;
        }
        if access.execute {
            flags |= TRANSLATE_F_EXEC;
            need |= EXTENT_F_EXEC;
        }
        if access.privileged {
            flags |= TRANSLATE_F_PRIV;
        }
        Request {
            space: Space {
                endpoint,
                pasid,
                privileged: access.privileged,
            },
            flags,
            need,
        }
    }
}

/// The background reader: waits for data without holding the reader, so
/// a caller waiting for its own reply reads it directly (no thread
/// wake-up on the translation path), and dispatches what nobody else read:
/// invalidations, events, replies of callers that stopped spinning.
fn background(shared: Arc<Shared>) {
    // A caching client renews its lease even when nothing arrives.
    let timeout = if shared.cache.is_some() {
        let ms = shared.lease.renew_every().as_millis();
        PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::NONE)
    } else {
        PollTimeout::NONE
    };
    // Frames that came with the handshake are already buffered: drain
    // before waiting for the socket.
    while shared.drain(&mut lock(&shared.reader)) {
        let mut fds = [PollFd::new(shared.poll_fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                warn!("viommu control connection: poll: {e}");
                break;
            }
        }
    }
    shared.close();
}

impl Shared {
    /// Reads and dispatches every message that has arrived, in stream
    /// order (the reader lock is held throughout). False once the
    /// connection is gone.
    fn drain(&self, reader: &mut FrameReader) -> bool {
        loop {
            // Taken before the read: everything sent before this instant
            // is in the socket, so finding it empty renews the lease.
            let before = self.lease.now();
            match reader.try_next() {
                Ok(Polled::Message(m)) => {
                    if !self.dispatch(m) {
                        self.close();
                        return false;
                    }
                }
                Ok(Polled::Empty) => {
                    if reader.buffered() == 0 && !self.closed.load(Ordering::Acquire) {
                        self.lease.caught_up.fetch_max(before, Ordering::AcqRel);
                    }
                    return true;
                }
                Ok(Polled::Closed) => {
                    self.close();
                    return false;
                }
                Err(e) => {
                    if !self.closed.load(Ordering::Acquire) {
                        warn!("viommu control connection: {e}");
                    }
                    self.close();
                    return false;
                }
            }
        }
    }

    /// Reads what the daemon sent (renewing the lease), waiting for the
    /// reader thread if it is reading.
    fn catch_up(&self) {
        let mut reader = lock(&self.reader);
        self.drain(&mut reader);
    }

    /// Acts on one message from the daemon; false on BYE.
    fn dispatch(&self, message: Message) -> bool {
        let reply = |tag: u32, r: Reply| {
            if let Some(call) = lock(&self.calls).remove(&tag) {
                call.slot.put(Some(r));
            }
        };
        match message {
            Message::Translation(m) => {
                if let Some(cache) = &self.cache {
                    if let Some(call) = lock(&self.calls).get(&m.tag) {
                        let mut c = cache.write().unwrap_or_else(|e| e.into_inner());
                        c.insert(call.space, call.iova, &m.extents);
                    }
                }
                reply(m.tag, Reply::Translation(m.extents));
            }
            Message::Fault(m) if m.fault.flags & FAULT_F_PAGE_REQUEST != 0 => {
                // Registered before the fault is handed over: the answer
                // cannot come first (same connection, in order). Nobody
                // waiting: nobody wants the answer either.
                let call = lock(&self.calls).remove(&m.tag);
                if let Some(call) = call {
                    let slot = Arc::new(ReplySlot::default());
                    lock(&self.tickets).insert(m.tag, slot.clone());
                    call.slot
                        .put(Some(Reply::PageRequested(m.fault, m.tag, slot)));
                }
            }
            Message::Fault(m) => reply(m.tag, Reply::Fault(m.fault)),
            Message::PageResponse(m) => {
                let slot = lock(&self.tickets).remove(&m.tag);
                match (slot, PageResponse::from_wire(m.code, m.cause)) {
                    (Some(slot), Some(r)) => slot.put(Some(Reply::PageResponse(r))),
                    (Some(slot), None) => {
                        warn!(
                            "page response with unknown code {} / cause {}",
                            m.code, m.cause
                        );
                        slot.put(None);
                    }
                    // Nobody waits any more (the ticket was dropped).
                    (None, _) => {}
                }
            }
            Message::CallResult(m) => reply(m.tag, Reply::Result(m.status, m.message)),
            Message::QueryReply(m) => reply(m.tag, Reply::Query(m.json)),
            Message::Invalidate(m) => {
                if let Some(cache) = &self.cache {
                    // Waits for `translate_with` closures still using them.
                    cache
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .invalidate(m.scope);
                }
                return self.send(&msg::Ack { seq: m.seq }.into()).is_ok();
            }
            Message::Event(m) => {
                let ev = if m.seq == 0 {
                    Event::Replayed(m.change)
                } else {
                    Event::Live {
                        seq: m.seq,
                        change: m.change,
                    }
                };
                if let Some(tx) = lock(&self.events).as_ref() {
                    let _ = tx.send(ev);
                }
            }
            Message::ReplayDone(_) => {
                if let Some(tx) = lock(&self.events).as_ref() {
                    let _ = tx.send(Event::ReplayDone);
                }
            }
            Message::Bye(m) => {
                warn!("viommu daemon closed the control connection: {}", m.message);
                return false;
            }
            other => warn!(
                "unexpected message type {:#x} from the daemon",
                other.type_code()
            ),
        }
        true
    }

    /// Marks the connection closed: pending calls fail, the event stream
    /// ends, and the cache empties since nothing invalidates it any more.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for (_, call) in lock(&self.calls).drain() {
            call.slot.put(None);
        }
        for (_, slot) in lock(&self.tickets).drain() {
            slot.put(None);
        }
        lock(&self.events).take();
        if let Some(cache) = &self.cache {
            cache.write().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cut_the_requested_range_out_of_whole_mappings() {
        let ext = |s, e, g| Extent {
            iova_start: s,
            iova_end: e,
            gpa_start: g,
            domain: 1,
            flags: 3,
        };
        let segs = segments(
            &[ext(0x1000, 0x1fff, 0x10000), ext(0x2000, 0x3fff, 0x50000)],
            0x1800,
            0x1000,
        );
        assert_eq!(
            segs,
            [
                Segment {
                    iova: 0x1800,
                    gpa: 0x10800,
                    len: 0x800
                },
                Segment {
                    iova: 0x2000,
                    gpa: 0x50000,
                    len: 0x800
                },
            ]
        );
        let identity = segments(&[ext(0, u64::MAX, 0)], u64::MAX - 1, 10);
        assert_eq!(
            identity,
            [Segment {
                iova: u64::MAX - 1,
                gpa: u64::MAX - 1,
                len: 2
            }]
        );
    }
}
