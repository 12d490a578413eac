// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `viommu-client`: what a VMM links to use an out-of-process
//! vhost-device-iommu (docs/control-protocol.md).
//!
//! - `translate` / `translate_with`: IOVA -> guest-physical segments for
//!   DMA of devices the VMM emulates, through a coherent cache;
//! - `next_event` / `ack`: the IOMMU state as a stream (replay, then
//!   changes) to shadow into VFIO or iommufd;
//! - `report_fault`: an unrecoverable fault delivered to the guest;
//! - `query`: the inspection documents `ctl` prints.
//!
//! Coherence: with the cache on, the daemon does not complete a guest
//! UNMAP or DETACH before this client has dropped the affected
//! translations and acknowledged. `translate_with` holds the cache's read
//! lock while its closure runs, so the acknowledgement also waits for DMA
//! in progress on a translation being invalidated.

#![warn(missing_docs)]

pub mod cache;

use std::{
    collections::HashMap,
    io::{self, Write},
    os::fd::{AsFd, OwnedFd},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use cache::Cache;
use log::warn;
use nix::{
    errno::Errno,
    poll::{poll, PollFd, PollFlags, PollTimeout},
};
pub use viommu::{Access, Invalidation, StateChange};
use viommu_protocol::{
    handshake, messages as msg, query, ConnError, FrameReader, Message, Polled, HELLO_F_CACHE,
    HELLO_F_SUBSCRIBE, HELLO_F_SYNC, RESULT_NO_SUCH_ENDPOINT, RESULT_OK, TRANSLATE_F_REPORT_FAULT,
    TRANSLATE_F_WRITE,
};
pub use viommu_protocol::{query::Query, Extent, FaultInfo, FAULT_F_READ, FAULT_F_WRITE};

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
    Result(u32, String),
    Query(String),
}

struct Call {
    endpoint: u32,
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
}

struct Shared {
    writer: Mutex<UnixStream>,
    /// Whoever holds it reads from the socket: the background thread, or
    /// a caller waiting for its reply.
    reader: Mutex<FrameReader>,
    /// The socket, for the background thread's `poll`.
    poll_fd: OwnedFd,
    calls: Mutex<HashMap<u32, Call>>,
    cache: Option<RwLock<Cache>>,
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
            cache: options.cache.then(|| RwLock::new(Cache::default())),
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
        endpoint: u32,
        iova: u64,
        build: impl FnOnce(u32) -> Message,
    ) -> Result<Reply, Error> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(ReplySlot::default());
        lock(&self.shared.calls).insert(
            tag,
            Call {
                endpoint,
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
            std::hint::spin_loop();
        }
        slot.take().ok_or(Error::Disconnected)
    }

    fn fetch(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        report: bool,
    ) -> Result<Vec<Extent>, Error> {
        let mut flags = if access == Access::Write {
            TRANSLATE_F_WRITE
        } else {
            0
        };
        if report {
            flags |= TRANSLATE_F_REPORT_FAULT;
        }
        match self.call(endpoint, iova, |tag| {
            msg::Translate {
                tag,
                endpoint,
                flags,
                iova,
                len,
            }
            .into()
        })? {
            Reply::Translation(extents) => Ok(extents),
            Reply::Fault(f) => Err(Error::Fault(f)),
            Reply::Result(RESULT_NO_SUCH_ENDPOINT, _) => Err(Error::NoSuchEndpoint(endpoint)),
            Reply::Result(status, message) => Err(Error::Daemon { status, message }),
            Reply::Query(_) => Err(Error::Protocol("query reply to a translation")),
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
        let extents = self.fetch(endpoint, iova, len, access, true)?;
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
        let len = len.max(1);
        let Some(cache) = &self.shared.cache else {
            let extents = self.fetch(endpoint, iova, len, access, false)?;
            return Ok(dma(&segments(&extents, iova, len)));
        };
        for _ in 0..MAX_REFETCH {
            {
                let c = cache.read().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = c.lookup(endpoint, iova, access) {
                    // The common case: one extent covers the whole range.
                    if e.iova_end >= iova.saturating_add(len - 1) {
                        let seg = Segment {
                            iova,
                            gpa: e.gpa_start.wrapping_add(iova - e.iova_start),
                            len,
                        };
                        return Ok(dma(&[seg]));
                    }
                    if let Some(segs) = cached_segments(&c, endpoint, iova, len, access) {
                        return Ok(dma(&segs));
                    }
                }
            }
            // Miss: the reader thread caches the reply before handing it
            // over, so the next lookup finds it unless it was invalidated
            // in between, in which case it is fetched again.
            self.fetch(endpoint, iova, len, access, false)?;
        }
        Err(Error::Unstable)
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
            address,
        };
        match self.call(endpoint, address, |tag| {
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
        match self.call(0, 0, |tag| msg::Query { tag, json }.into())? {
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

fn cached_segments(
    c: &Cache,
    endpoint: u32,
    iova: u64,
    len: u64,
    access: Access,
) -> Option<Vec<Segment>> {
    let end = iova.saturating_add(len - 1);
    let mut extents = Vec::new();
    let mut addr = iova;
    loop {
        let e = c.lookup(endpoint, addr, access)?;
        extents.push(e);
        if e.iova_end >= end {
            return Some(segments(&extents, iova, len));
        }
        addr = e.iova_end + 1;
    }
}

/// The background reader: waits for data without holding the reader, so
/// a caller waiting for its own reply reads it directly (no thread
/// wake-up on the translation path), and dispatches what nobody else read:
/// invalidations, events, replies of callers that stopped spinning.
fn background(shared: Arc<Shared>) {
    // Frames that came with the handshake are already buffered: drain
    // before waiting for the socket.
    while shared.drain(&mut lock(&shared.reader)) {
        let mut fds = [PollFd::new(shared.poll_fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
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
            match reader.try_next() {
                Ok(Polled::Message(m)) => {
                    if !self.dispatch(m) {
                        self.close();
                        return false;
                    }
                }
                Ok(Polled::Empty) => return true,
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
                        c.insert(call.endpoint, call.iova, &m.extents);
                    }
                }
                reply(m.tag, Reply::Translation(m.extents));
            }
            Message::Fault(m) => reply(m.tag, Reply::Fault(m.fault)),
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
