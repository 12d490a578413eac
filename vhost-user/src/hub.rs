// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fan-out of IOMMU changes to control clients and the wait for their
//! acknowledgements.
//!
//! Every control connection has a [`Client`]: its bounded outbox (what is
//! queued for it, in order) and the sequence numbers it still has to
//! acknowledge. Clients that cache translations or follow the event
//! stream are *registered* here; the request worker stages each batch's
//! changes into their outboxes ([`Hub::stage`]) and waits for the
//! acknowledgements the guest's requests depend on ([`Hub::wait`]).
//!
//! The bounds (docs/control-protocol.md, "Limits"):
//! - a guest request waits for acknowledgements at most the client
//!   timeout in total, however many clients misbehave and however;
//! - a client's outbox holds at most [`MAX_OUTBOX`] bytes of live
//!   messages; a client that lets it fill is disconnected with a reason
//!   and its buffers freed;
//! - nothing here blocks on a socket: writes are non-blocking, and what a
//!   socket does not take stays queued for the control server, which
//!   writes it when the socket drains.

use std::{
    collections::HashSet,
    io,
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use log::warn;
use nix::{errno::Errno, sys::socket::MsgFlags};
use viommu::StateChange;
use viommu_protocol::{
    messages::{Event, Invalidate},
    Message, HELLO_F_CACHE, HELLO_F_SUBSCRIBE, HELLO_F_SYNC,
};
use vmm_sys_util::eventfd::EventFd;

use crate::replay::Replay;

/// Most bytes of live messages queued for one client. A client whose
/// backlog would grow past this cannot keep up and is disconnected.
pub(crate) const MAX_OUTBOX: usize = 4 << 20;
/// Most acknowledgements one client may owe.
const MAX_UNACKED: usize = 1 << 16;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the device down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What is queued for one client, in the order it must be written.
#[derive(Default)]
struct Outbox {
    /// Bytes that must go first: the WELCOME, then the current chunk of
    /// the replay.
    front: Vec<u8>,
    front_at: usize,
    /// The rest of the state replay, produced a chunk at a time.
    replay: Option<Replay>,
    /// Live messages (replies, invalidations, events), after the replay.
    live: Vec<u8>,
    live_at: usize,
    /// Sequence numbers sent that still wait for an ACK.
    unacked: HashSet<u64>,
}

impl Outbox {
    fn live_backlog(&self) -> usize {
        self.live.len() - self.live_at
    }
}

/// Bytes of replay produced at a time.
const REPLAY_CHUNK: usize = 64 * 1024;

/// One control connection, as the hub and the control server share it.
pub(crate) struct Client {
    /// The ID given in WELCOME.
    pub(crate) id: u64,
    /// The HELLO flags granted.
    pub(crate) flags: u32,
    stream: UnixStream,
    out: Mutex<Outbox>,
    /// Why the connection must end, once it must.
    dead: Mutex<Option<String>>,
    is_dead: AtomicBool,
}

/// Result of writing a client's outbox.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything queued is written.
    Done,
    /// The socket is full; the rest waits for it to drain.
    Blocked,
    /// The connection failed or the client is dead.
    Dead,
}

impl Client {
    pub(crate) fn new(id: u64, flags: u32, stream: UnixStream) -> Self {
        Client {
            id,
            flags,
            stream,
            out: Mutex::new(Outbox::default()),
            dead: Mutex::new(None),
            is_dead: AtomicBool::new(false),
        }
    }

    pub(crate) fn caches(&self) -> bool {
        self.flags & HELLO_F_CACHE != 0
    }

    pub(crate) fn subscribes(&self) -> bool {
        self.flags & HELLO_F_SUBSCRIBE != 0
    }

    fn syncs(&self) -> bool {
        self.flags & HELLO_F_SYNC != 0
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.is_dead.load(Ordering::Acquire)
    }

    /// Why the client was disconnected, if it was.
    pub(crate) fn death(&self) -> Option<String> {
        lock(&self.dead).clone()
    }

    /// Marks the client for disconnection (the first reason wins) and
    /// frees its buffers. Returns false if it already was.
    pub(crate) fn kill(&self, reason: String) -> bool {
        let mut out = lock(&self.out);
        self.kill_locked(&mut out, reason)
    }

    /// [`Self::kill`] with the outbox already locked (lock order: the
    /// outbox, then the reason).
    fn kill_locked(&self, out: &mut Outbox, reason: String) -> bool {
        let mut dead = lock(&self.dead);
        if dead.is_some() {
            return false;
        }
        warn!("control client {}: {reason}; disconnecting", self.id);
        *dead = Some(reason);
        self.is_dead.store(true, Ordering::Release);
        *out = Outbox::default();
        // Makes the peer see the end at once; the control server closes
        // the socket when it notices.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        true
    }

    /// Queues a message (a reply, or a change while its staging holds
    /// the model lock). False, and the client is killed, if its backlog
    /// would grow past [`MAX_OUTBOX`].
    pub(crate) fn queue(&self, m: &Message) -> bool {
        let mut out = lock(&self.out);
        self.queue_locked(&mut out, m)
    }

    fn queue_locked(&self, out: &mut MutexGuard<'_, Outbox>, m: &Message) -> bool {
        if self.is_dead() {
            return false;
        }
        if out.live_at == out.live.len() {
            out.live.clear();
            out.live_at = 0;
        }
        m.encode_into(&mut out.live);
        if out.live_backlog() > MAX_OUTBOX {
            let backlog = out.live_backlog();
            self.kill_locked(
                out,
                format!("cannot keep up: {backlog} bytes unread, limit {MAX_OUTBOX}"),
            );
            return false;
        }
        true
    }

    /// Queues what must precede every live message: WELCOME, then the
    /// replay of `replay` (subscribers).
    pub(crate) fn queue_front(&self, welcome: &Message, replay: Option<Replay>) {
        let mut out = lock(&self.out);
        welcome.encode_into(&mut out.front);
        out.replay = replay;
    }

    /// Whether the client must still acknowledge something.
    pub(crate) fn waits_for_acks(&self) -> bool {
        !self.is_dead() && !lock(&self.out).unacked.is_empty()
    }

    /// An ACK arrived. False if the client owed no such acknowledgement.
    pub(crate) fn acked(&self, seq: u64) -> bool {
        lock(&self.out).unacked.remove(&seq)
    }

    /// Writes what the socket takes without blocking.
    pub(crate) fn flush(&self) -> Flushed {
        let mut out = lock(&self.out);
        if self.is_dead() {
            return Flushed::Dead;
        }
        loop {
            let o = &mut *out;
            let (buf, at) = if o.front_at < o.front.len() {
                (&o.front, &mut o.front_at)
            } else if let Some(replay) = o.replay.as_mut() {
                o.front.clear();
                o.front_at = 0;
                if replay.next_chunk(&mut o.front, REPLAY_CHUNK) {
                    o.replay = None;
                }
                continue;
            } else if o.live_at < o.live.len() {
                (&o.live, &mut o.live_at)
            } else {
                o.live.clear();
                o.live_at = 0;
                return Flushed::Done;
            };
            match send(&self.stream, &buf[*at..]) {
                Ok(n) => *at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
                Err(e) => {
                    drop(out);
                    self.kill(format!("write failed ({e})"));
                    return Flushed::Dead;
                }
            }
        }
    }

    /// Whether the replay (and WELCOME) has been written completely, so
    /// a live message may be written from any thread.
    fn replay_done(out: &Outbox) -> bool {
        out.front_at == out.front.len() && out.replay.is_none()
    }
}

/// One non-blocking write; `EINTR` retried, `SIGPIPE` never raised.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        match nix::sys::socket::send(
            stream.as_raw_fd(),
            buf,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Counters for `ctl stats`.
#[derive(Default)]
pub(crate) struct HubStats {
    pub(crate) invalidations: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) ack_timeouts: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Connections past HELLO (registered or not).
    pub(crate) connected: AtomicU64,
}

/// The registered clients and the fan-out of changes to them.
pub(crate) struct Hub {
    clients: Mutex<Vec<Arc<Client>>>,
    next_seq: AtomicU64,
    next_id: AtomicU64,
    acked: Mutex<()>,
    ack_cv: Condvar,
    /// Wakes the control server: there is output to write or a dead
    /// client to close.
    wake: EventFd,
    pub(crate) stats: HubStats,
}

impl Hub {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Hub {
            clients: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            acked: Mutex::new(()),
            ack_cv: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            stats: HubStats::default(),
        })
    }

    /// The eventfd the control server polls.
    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    fn wake_server(&self) {
        // A full counter already means "wake up".
        let _ = self.wake.write(1);
    }

    /// A fresh client ID.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Control connections past HELLO.
    pub(crate) fn connected(&self) -> usize {
        self.stats.connected.load(Ordering::Relaxed) as usize
    }

    /// Adds a client that caches or subscribes. The caller holds the
    /// model's read lock, so no change is staged between its replay
    /// snapshot and its first live message.
    pub(crate) fn register(&self, client: Arc<Client>) {
        lock(&self.clients).push(client);
    }

    /// Removes a client and wakes a request waiting for its acks.
    pub(crate) fn unregister(&self, client: &Arc<Client>) {
        lock(&self.clients).retain(|c| !Arc::ptr_eq(c, client));
        self.notify_acked();
    }

    /// Queues what `changes` mean for each registered client; called with
    /// the model's write lock held, so a translation reply computed
    /// before the change (under the read lock) is queued before it.
    /// Returns the clients written to.
    pub(crate) fn stage(&self, changes: &[StateChange]) -> Vec<Arc<Client>> {
        let clients = lock(&self.clients);
        let mut touched = Vec::new();
        for c in clients.iter().filter(|c| !c.is_dead()) {
            let mut out = lock(&c.out);
            let mut queued = false;
            for &change in changes {
                if c.caches() {
                    if let Some(scope) = change.invalidates() {
                        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                        out.unacked.insert(seq);
                        queued = true;
                        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
                        if !c.queue_locked(&mut out, &Invalidate { seq, scope }.into()) {
                            break;
                        }
                    }
                }
                if c.subscribes() {
                    let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                    if c.syncs() {
                        out.unacked.insert(seq);
                    }
                    queued = true;
                    self.stats.events.fetch_add(1, Ordering::Relaxed);
                    if !c.queue_locked(&mut out, &Event { seq, change }.into()) {
                        break;
                    }
                }
            }
            if out.unacked.len() > MAX_UNACKED {
                c.kill_locked(
                    &mut out,
                    format!("owes more than {MAX_UNACKED} acknowledgements"),
                );
                continue;
            }
            if queued {
                touched.push(c.clone());
            }
        }
        touched
    }

    /// Sends what [`Self::stage`] queued and waits until every one of
    /// `clients` has acknowledged what it owes, for at most `timeout` in
    /// total: clients that miss the deadline are disconnected. Spins for
    /// up to `spin` (within the same deadline) before sleeping, as acks
    /// of an active client come back within microseconds.
    pub(crate) fn flush_and_wait(
        &self,
        clients: &[Arc<Client>],
        spin: Duration,
        timeout: Duration,
    ) {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut server_needed = false;
        for c in clients {
            // The server writes for clients still receiving their replay
            // and for sockets that are full.
            let fast = Client::replay_done(&lock(&c.out));
            if !fast || c.flush() != Flushed::Done {
                server_needed = true;
            }
        }
        if server_needed {
            self.wake_server();
        }
        let waiting = |c: &&Arc<Client>| c.waits_for_acks();
        let spin_until = (start + spin).min(deadline);
        while clients.iter().any(|c| waiting(&c)) && Instant::now() < spin_until {
            // Yield: the threads that deliver the acks may need this core.
            thread::yield_now();
        }
        let mut guard = lock(&self.acked);
        loop {
            if !clients.iter().any(|c| waiting(&c)) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            guard = self
                .ack_cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(guard);
        for c in clients.iter().filter(waiting) {
            if c.kill(format!("did not acknowledge within {timeout:?}")) {
                self.stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.wake_server();
    }

    /// Wakes requests waiting for acknowledgements.
    pub(crate) fn notify_acked(&self) {
        let _g = lock(&self.acked);
        self.ack_cv.notify_all();
    }
}
