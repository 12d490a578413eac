// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control server: VMM-side clients translate addresses, cache them,
//! follow the IOMMU state, report faults and inspect the daemon over a
//! Unix socket (protocol in docs/control-protocol.md, encoding in the
//! `viommu-protocol` crate).
//!
//! One thread runs an epoll loop over the listening socket, every
//! connection and the hub's wake-up eventfd; every socket is non-blocking,
//! so no peer can make the server, another client or the guest wait on
//! it. The parts:
//! - [`listener`]: accepting, the peer check, the connection limit and
//!   the HELLO gate (one deadline, small frames, exact slots);
//! - [`dispatch`]: the messages of a connection past HELLO;
//! - [`queries`]: the inspection queries, answered on a thread of their
//!   own because some read the PASID database;
//! - this module: the loop, reading (with the descriptors a client sends:
//!   host fault queues), writing and closing; the fault queues' records;
//!   the page requests' timer.
//!
//! The coherence rule (a guest UNMAP or DETACH completes only after every
//! caching client dropped what it makes stale) lives in the
//! [`Hub`](crate::hub::Hub); the ordering it needs holds because a
//! translation reply is queued while the model's read lock is held and
//! invalidations while its write lock is held, into the same outbox.

mod dispatch;
mod listener;
mod queries;

use std::{
    collections::{HashMap, VecDeque},
    io::{self, IoSliceMut},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    sync::{atomic::Ordering, Arc},
    thread,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use nix::{
    errno::Errno,
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
};
use viommu_protocol::{
    messages::{AttachFaultQueue, Bye, CallResult},
    FrameBuffer, Message, RESULT_INVALID, RESULT_OK,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::{
    faults::{take_records, FaultQueue, QueueError, READ_BATCH, RECORD_SIZE},
    hub::{Client, Flushed},
    iommu::Iommu,
    ratelimit::RateLimited,
};

/// Most connections that do not say `INSPECT` (caching, subscribing or
/// translating clients).
pub const MAX_CLIENTS: usize = 64;
/// Connections at once, counted from accept: the clients plus one slot
/// kept for an inspecting tool (`ctl`).
pub const MAX_CONNECTIONS: usize = MAX_CLIENTS + 1;
/// A client must have said HELLO within this time of connecting.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame a client may send once past HELLO.
pub const MAX_CLIENT_FRAME: usize = 64 << 10;
/// Descriptors a client may have sent ahead of the messages they come
/// with; more end the connection.
pub const MAX_PENDING_FDS: usize = 4;

const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const QUERIES: u64 = 2;
const FIRST_CONN: u64 = 3;

/// Where a connection stands.
enum Stage {
    /// Accepted; HELLO must arrive by the deadline.
    Hello { deadline: Instant },
    /// Past HELLO.
    Active(Arc<Client>),
}

/// One connection, as the server thread holds it.
struct Conn {
    stream: UnixStream,
    input: FrameBuffer,
    stage: Stage,
    /// EPOLLOUT is armed (the socket was full).
    wants_out: bool,
    /// Descriptors received, for the ATTACH_FAULT_QUEUEs they came with.
    fds: VecDeque<OwnedFd>,
}

/// An attached host fault queue, as the server thread reads it.
struct QueueConn {
    queue: Arc<FaultQueue>,
    /// A partial record (a stream stand-in may split one).
    input: Vec<u8>,
}

/// The control server's state, owned by its thread.
struct Server {
    iommu: Arc<Iommu>,
    epoll: Epoll,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    queues: HashMap<u64, QueueConn>,
    next_token: u64,
    queries: queries::QueryThread,
    /// Accepting is paused until then (the process ran out of fds).
    accept_paused: Option<Instant>,
    /// The nearest page-request deadline, as last read from the model:
    /// only this loop raises page requests (which can bring it nearer),
    /// so it is read again after events, never while spinning.
    page_requests_due: Option<Instant>,
    peer_errors: RateLimited,
}

/// Serves the control socket `listener` (already bound) in a thread of
/// its own.
pub fn start(iommu: Arc<Iommu>, listener: UnixListener) -> io::Result<thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(listener.as_raw_fd(), LISTENER)?;
    add(iommu.hub().wake_fd().as_raw_fd(), WAKE)?;
    let queries = queries::QueryThread::start(iommu.clone())?;
    add(queries.done_fd().as_raw_fd(), QUERIES)?;
    let mut server = Server {
        iommu,
        epoll,
        listener,
        conns: HashMap::new(),
        queues: HashMap::new(),
        next_token: FIRST_CONN,
        queries,
        accept_paused: None,
        page_requests_due: None,
        peer_errors: RateLimited::new(Duration::from_secs(1)),
    };
    thread::Builder::new()
        .name("control".into())
        .spawn(move || server.run())
}

impl Server {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut busy_until: Option<Instant> = None;
        loop {
            // Spin (timeout 0) while recently busy, as the request queue
            // does for the guest (`--poll-us`); then sleep until the
            // nearest deadline.
            let now = Instant::now();
            let timeout_ms = match busy_until {
                Some(t) if now < t => 0,
                _ => self.next_deadline().map_or(-1, |d| {
                    let ms = d.saturating_duration_since(now).as_millis();
                    i32::try_from(ms.saturating_add(1)).unwrap_or(i32::MAX)
                }),
            };
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Only a bug makes epoll_wait fail; do not spin on it.
                    warn!("control server: epoll_wait: {e}");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            for ev in &events[..n] {
                self.event(ev.data(), ev.event_set());
            }
            if n > 0 {
                self.page_requests_due = self.iommu.page_request_deadline();
                thread::yield_now();
                let poll = self.iommu.options().poll;
                if !poll.is_zero() {
                    busy_until = Some(Instant::now() + poll);
                }
            }
            self.expire(Instant::now());
        }
    }

    fn event(&mut self, token: u64, set: EventSet) {
        match token {
            LISTENER => self.accept_all(),
            WAKE => {
                let _ = self.iommu.hub().wake_fd().read();
                self.sweep();
            }
            QUERIES => {
                self.queries.collect();
                self.sweep();
            }
            token if self.queues.contains_key(&token) => self.queue_event(token, set),
            token => {
                if set.intersects(EventSet::OUT) {
                    self.flush(token);
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.readable(token);
                }
            }
        }
    }

    /// The nearest HELLO deadline, end of an accept pause or page-request
    /// deadline.
    fn next_deadline(&self) -> Option<Instant> {
        let hello = self.conns.values().filter_map(|c| match c.stage {
            Stage::Hello { deadline } => Some(deadline),
            Stage::Active(_) => None,
        });
        hello
            .chain(self.accept_paused)
            .chain(self.page_requests_due)
            .min()
    }

    /// Closes connections whose HELLO did not arrive in time; resumes
    /// accepting after a pause.
    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.stage, Stage::Hello { deadline } if deadline <= now))
            .map(|(&t, _)| t)
            .collect();
        for token in late {
            self.refuse(token, &format!("no HELLO within {HELLO_TIMEOUT:?}"));
        }
        if self.accept_paused.is_some_and(|t| t <= now) {
            self.accept_paused = None;
            self.accept_all();
        }
        if self.page_requests_due.is_some_and(|t| t <= now) {
            self.iommu.expire_page_requests();
            self.page_requests_due = self.iommu.page_request_deadline();
        }
    }

    /// Closes dead clients and writes what is queued for the others.
    fn sweep(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            self.flush(token);
        }
    }

    fn readable(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match fill_with_fds(&mut conn.input, &conn.stream, &mut conn.fds) {
            Ok(true) => {}
            Ok(false) => return self.close(token, None),
            Err(e) => return self.close(token, Some(format!("read failed ({e})"))),
        }
        if conn.fds.len() > MAX_PENDING_FDS {
            return self.refuse(
                token,
                &format!("more than {MAX_PENDING_FDS} descriptors sent ahead of their messages"),
            );
        }
        loop {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            let msg = match conn.input.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    let why = match conn.stage {
                        Stage::Hello { .. } => format!("bad HELLO: {e}"),
                        Stage::Active(_) => e.to_string(),
                    };
                    return self.refuse(token, &why);
                }
            };
            let done = match (&conn.stage, msg) {
                (Stage::Hello { .. }, msg) => self.hello(token, msg),
                (Stage::Active(client), Message::AttachFaultQueue(m)) => {
                    let client = client.clone();
                    self.attach_queue(token, &client, m);
                    Ok(())
                }
                (Stage::Active(client), msg) => {
                    let client = client.clone();
                    dispatch::handle(&self.iommu, &self.queries, &client, msg)
                }
            };
            if let Err(why) = done {
                return self.refuse(token, &why);
            }
        }
        self.flush(token);
    }

    /// Writes what is queued for the connection; closes it if its client
    /// died.
    fn flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let Stage::Active(client) = &conn.stage else {
            return;
        };
        let client = client.clone();
        let result = client.flush();
        match result {
            Flushed::Dead => {
                let why = client.death();
                self.close(token, why);
            }
            Flushed::Blocked => self.want_out(token, true),
            Flushed::Done => self.want_out(token, false),
        }
    }

    fn want_out(&mut self, token: u64, on: bool) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.wants_out == on {
            return;
        }
        let set = if on {
            EventSet::IN | EventSet::OUT
        } else {
            EventSet::IN
        };
        match self.epoll.ctl(
            ControlOperation::Modify,
            conn.stream.as_raw_fd(),
            EpollEvent::new(set, token),
        ) {
            Ok(()) => conn.wants_out = on,
            Err(e) => warn!("control server: epoll_ctl: {e}"),
        }
    }

    /// Says BYE with `why` (best effort: the socket is not waited for)
    /// and closes the connection.
    fn refuse(&mut self, token: u64, why: &str) {
        if let Some(conn) = self.conns.get(&token) {
            let bye = Message::from(Bye {
                message: why.to_string(),
            })
            .encode();
            let _ = nix::sys::socket::send(
                conn.stream.as_raw_fd(),
                &bye,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            );
        }
        self.close(token, Some(why.to_string()));
    }

    /// ATTACH_FAULT_QUEUE: the descriptor that came with it becomes a
    /// page-request source of the client's, read by this loop.
    fn attach_queue(&mut self, token: u64, client: &Arc<Client>, m: AttachFaultQueue) {
        let fd = self.conns.get_mut(&token).and_then(|c| c.fds.pop_front());
        let result = match fd {
            None => Err(QueueError::NoDescriptor),
            Some(fd) => {
                let endpoints = self.iommu.model().config().endpoints.clone();
                self.iommu.sources().add_queue(|source| {
                    FaultQueue::new(
                        fd,
                        &m.devices,
                        |ep| endpoints.contains(ep),
                        client.id,
                        source,
                    )
                })
            }
        };
        let (status, message) = match result {
            Ok(queue) => match self.watch_queue(queue) {
                Ok(()) => (RESULT_OK, String::new()),
                Err(e) => (RESULT_INVALID, format!("cannot watch the fault queue: {e}")),
            },
            Err(e) => (RESULT_INVALID, e.to_string()),
        };
        client.queue(
            &CallResult {
                tag: m.tag,
                status,
                message,
            }
            .into(),
        );
    }

    fn watch_queue(&mut self, queue: Arc<FaultQueue>) -> io::Result<()> {
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            queue.raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        ) {
            self.iommu.sources().remove(queue.source);
            return Err(e);
        }
        info!(
            "control client {}: fault queue attached (source {})",
            queue.owner, queue.source.0
        );
        self.queues.insert(
            token,
            QueueConn {
                queue,
                input: Vec::new(),
            },
        );
        Ok(())
    }

    /// Reads up to [`READ_BATCH`] records from a fault queue and raises
    /// them; a queue that hung up or failed is closed.
    fn queue_event(&mut self, token: u64, set: EventSet) {
        let Some(q) = self.queues.get_mut(&token) else {
            return;
        };
        let mut gone = None;
        if set.intersects(EventSet::IN) {
            let have = q.input.len();
            q.input.resize(READ_BATCH * RECORD_SIZE, 0);
            match q.queue.read(&mut q.input[have..]) {
                Ok(n) => q.input.truncate(have + n),
                Err(e) => {
                    q.input.truncate(have);
                    gone = Some(format!("read failed ({e})"));
                }
            }
            let records = take_records(&mut q.input);
            let queue = q.queue.clone();
            if !records.is_empty() {
                self.iommu.fault_records(&queue, &records);
                return;
            }
        }
        if gone.is_none() && set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            gone = Some("hung up".into());
        }
        if let Some(why) = gone {
            self.close_queue(token, &why);
        }
    }

    fn close_queue(&mut self, token: u64, why: &str) {
        let Some(q) = self.queues.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            q.queue.raw_fd(),
            EpollEvent::default(),
        );
        info!(
            "fault queue of control client {}: {why}; detached",
            q.queue.owner
        );
        if self.iommu.sources().remove(q.queue.source) {
            self.iommu.sources_gone(&[q.queue.source]);
        }
    }

    /// Forgets a connection: unregisters its client (waking a guest
    /// request that waits for it) and closes the socket.
    fn close(&mut self, token: u64, why: Option<String>) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let stats = &self.iommu.hub().stats;
        match &conn.stage {
            Stage::Active(client) => {
                // A client the hub killed (full outbox, missed
                // acknowledgements) counts as dropped whichever event
                // noticed it first: the failed write or the hang-up
                // that its shutdown causes. The hub logged its reason.
                if let Some(why) = why.or_else(|| client.death()) {
                    client.kill(why);
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.iommu.hub().unregister(client);
                stats.connected.fetch_sub(1, Ordering::Relaxed);
                debug!("control client {} disconnected", client.id);
                // Its page requests and fault queues end with it.
                let queues: Vec<u64> = self
                    .queues
                    .iter()
                    .filter(|(_, q)| q.queue.owner == client.id)
                    .map(|(&t, _)| t)
                    .collect();
                for t in queues {
                    self.close_queue(t, "its control connection closed");
                }
                let gone = self.iommu.sources().client_gone(client.id);
                self.iommu.sources_gone(&gone);
            }
            Stage::Hello { .. } => {
                if let Some(why) = why {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    self.peer_errors
                        .warn(format_args!("control connection refused: {why}"));
                }
            }
        }
    }
}

/// [`FrameBuffer::fill_from`], also taking the descriptors that come with
/// the bytes (`SCM_RIGHTS`, close-on-exec) into `fds`.
fn fill_with_fds(
    input: &mut FrameBuffer,
    stream: &UnixStream,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<bool> {
    loop {
        let spare = input.spare(64 * 1024);
        let n_spare = spare.len();
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_PENDING_FDS]);
        let mut iov = [IoSliceMut::new(spare)];
        let received = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let (n, truncated) = match received {
            Ok(msg) => {
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in this
                            // process for us; nothing else owns it.
                            fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC))
            }
            Err(Errno::EAGAIN) => {
                input.filled(0, n_spare);
                return Ok(true);
            }
            Err(Errno::EINTR) => {
                input.filled(0, n_spare);
                continue;
            }
            Err(e) => {
                input.filled(0, n_spare);
                return Err(e.into());
            }
        };
        input.filled(n, n_spare);
        if truncated {
            return Err(io::Error::other(
                "more descriptors than a message may carry",
            ));
        }
        return Ok(n > 0);
    }
}
