// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Admission of control connections: accepting, the peer check, the
//! connection limit and the HELLO gate.
//!
//! - Connections are counted when accepted: at most
//!   [`MAX_CONNECTIONS`](super::MAX_CONNECTIONS), however many arrive at
//!   once.
//! - A peer whose uid is neither the daemon's nor root is refused.
//! - HELLO must arrive within one deadline from accept
//!   ([`HELLO_TIMEOUT`](super::HELLO_TIMEOUT)), however the bytes trickle
//!   in, and nothing larger than a HELLO is buffered before it.
//! - At most [`MAX_CLIENTS`](super::MAX_CLIENTS) connections past HELLO
//!   that do not say `INSPECT`; the remaining slot is for `ctl`.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use log::debug;
use nix::{
    sys::socket::{getsockopt, sockopt::PeerCredentials},
    unistd::geteuid,
};
use viommu_protocol::{
    messages::{Hello, Welcome},
    FrameBuffer, Message, HELLO_F_CACHE, HELLO_F_INSPECT, HELLO_F_KNOWN, HELLO_F_SUBSCRIBE,
    HELLO_F_SYNC, PROTOCOL_VERSION,
};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{Conn, Server, Stage, HELLO_TIMEOUT, MAX_CLIENTS, MAX_CLIENT_FRAME, MAX_CONNECTIONS};
use crate::{hub::Client, replay::Replay};

/// Largest frame before HELLO: a HELLO (type byte + 16 bytes).
const MAX_HELLO_FRAME: usize = 17;

/// How long accepting pauses when the process is out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

impl Server {
    /// Accepts every pending connection.
    pub(super) fn accept_all(&mut self) {
        if self.accept_paused.is_some() {
            return;
        }
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or memory: the listener stays
                    // readable, so pause instead of spinning on it.
                    self.peer_errors
                        .warn(format_args!("control socket: accept failed ({e}); pausing"));
                    self.accept_paused = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            };
            let token = self.next_token;
            self.next_token += 1;
            if let Err(e) = stream.set_nonblocking(true) {
                self.peer_errors.warn(format_args!("control socket: {e}"));
                continue;
            }
            let uid = getsockopt(&stream, PeerCredentials).map(|c| c.uid());
            let own = geteuid().as_raw();
            let refusal = match uid {
                Ok(uid) if uid == own || uid == 0 => None,
                Ok(uid) => Some(format!(
                    "uid {uid} is not allowed to use this control socket (only uid {own} and root)"
                )),
                Err(e) => Some(format!("cannot check the peer's credentials ({e})")),
            }
            .or_else(|| {
                (self.conns.len() >= MAX_CONNECTIONS)
                    .then(|| format!("too many connections ({MAX_CONNECTIONS})"))
            });
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                self.peer_errors
                    .warn(format_args!("control socket: epoll_ctl: {e}"));
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    input: FrameBuffer::with_limit(MAX_HELLO_FRAME),
                    stage: Stage::Hello {
                        deadline: Instant::now() + HELLO_TIMEOUT,
                    },
                    wants_out: false,
                },
            );
            if let Some(why) = refusal {
                self.refuse(token, &why);
            }
        }
    }

    /// The first message of a connection: checks HELLO, takes a slot,
    /// registers the client (with its replay) and queues WELCOME.
    pub(super) fn hello(&mut self, token: u64, msg: Message) -> Result<(), String> {
        let Message::Hello(Hello { version, flags, .. }) = msg else {
            return Err(format!(
                "first message must be HELLO (got type {:#x})",
                msg.type_code()
            ));
        };
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {version} unsupported; this daemon speaks {PROTOCOL_VERSION}"
            ));
        }
        // Unknown flags are not granted; SYNC only means something with
        // SUBSCRIBE.
        let mut granted = flags & HELLO_F_KNOWN;
        if granted & HELLO_F_SUBSCRIBE == 0 {
            granted &= !HELLO_F_SYNC;
        }
        if granted & HELLO_F_INSPECT != 0 && granted & (HELLO_F_CACHE | HELLO_F_SUBSCRIBE) != 0 {
            return Err("INSPECT cannot be combined with CACHE or SUBSCRIBE".into());
        }
        if granted & HELLO_F_INSPECT == 0 {
            let clients = self
                .conns
                .values()
                .filter(
                    |c| matches!(&c.stage, Stage::Active(cl) if cl.flags & HELLO_F_INSPECT == 0),
                )
                .count();
            if clients >= MAX_CLIENTS {
                return Err(format!("too many clients ({MAX_CLIENTS})"));
            }
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return Ok(());
        };
        let stream = conn.stream.try_clone().map_err(|e| e.to_string())?;
        let hub = self.iommu.hub();
        let client = Arc::new(Client::new(hub.next_id(), granted, stream));
        let welcome = Message::from(Welcome {
            version: PROTOCOL_VERSION,
            flags: granted,
            client_id: client.id,
        });
        if client.caches() || client.subscribes() {
            // Under the model's read lock: no change is staged between
            // the replay's snapshot and the first live message.
            let model = self.iommu.model();
            let replay = client.subscribes().then(|| Replay::new(model.snapshot()));
            client.queue_front(&welcome, replay);
            hub.register(client.clone());
            drop(model);
        } else {
            client.queue_front(&welcome, None);
        }
        debug!(
            "control client {} connected (flags {granted:#x})",
            client.id
        );
        conn.input.set_limit(MAX_CLIENT_FRAME);
        conn.stage = Stage::Active(client);
        hub.stats.connected.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
