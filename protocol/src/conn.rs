// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The client side of the handshake, and [`Connection`]: a blocking
//! request/reply connection for tools such as `ctl` that need neither a
//! cache nor the event stream. (`viommu-client` builds its concurrent
//! client on the same handshake.)
//!
//! Every wait has one total deadline: the handshake, and each call from
//! sending the request to its reply, however the bytes trickle in.

use std::{
    io::{self, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::{
    frame::FrameReader,
    messages::{Hello, Message, Query, Welcome},
    query::{self, QueryError},
};

/// Why a connection or a call failed.
#[derive(Debug, Error)]
pub enum ConnError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon answered HELLO with BYE.
    #[error("the daemon refused the connection: {0}")]
    Refused(String),
    /// The daemon closed the connection.
    #[error("the daemon closed the connection")]
    Closed,
    /// The daemon sent something that does not belong here.
    #[error("unexpected message type {got:#x} (expected {expected})")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// Type of what came.
        got: u8,
    },
    /// No complete answer within the deadline.
    #[error("no answer from the daemon within {0:?}")]
    Timeout(Duration),
    /// Reading or writing the socket failed, or a frame was malformed.
    #[error("control socket")]
    Io(#[source] io::Error),
    /// A query's reply was an error or did not match its schema.
    #[error(transparent)]
    Query(#[from] QueryError),
}

fn io_error(e: io::Error, timeout: Duration) -> ConnError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnError::Timeout(timeout),
        _ => ConnError::Io(e),
    }
}

/// Reads the next message before `deadline`.
fn next_before(
    reader: &mut FrameReader,
    deadline: Instant,
    timeout: Duration,
) -> Result<Message, ConnError> {
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(ConnError::Timeout(timeout))?;
    reader
        .stream
        .set_read_timeout(Some(left))
        .map_err(ConnError::Io)?;
    reader
        .next(Duration::ZERO)
        .map_err(|e| io_error(e, timeout))?
        .ok_or(ConnError::Closed)
}

/// Says HELLO with `flags` on `stream` and waits, up to `timeout` in
/// total, for WELCOME. Returns it with the reader (which may already hold
/// messages that followed it); the stream is left without a read timeout.
pub fn handshake(
    stream: &UnixStream,
    flags: u32,
    timeout: Duration,
) -> Result<(Welcome, FrameReader), ConnError> {
    let deadline = Instant::now() + timeout;
    // A refused client may find the socket closed when it writes; the
    // daemon's reason is still waiting to be read.
    let sent = (&*stream).write_all(&Message::from(Hello::new(flags)).encode());
    let mut reader = FrameReader::new(stream.try_clone().map_err(ConnError::Io)?);
    let welcome = match (next_before(&mut reader, deadline, timeout), sent) {
        (Ok(Message::Bye(bye)), _) => return Err(ConnError::Refused(bye.message)),
        (_, Err(e)) => return Err(ConnError::Io(e)),
        (Ok(Message::Welcome(w)), Ok(())) => w,
        (Ok(other), Ok(())) => {
            return Err(ConnError::Unexpected {
                expected: "WELCOME",
                got: other.type_code(),
            })
        }
        (Err(e), Ok(())) => return Err(e),
    };
    reader
        .stream
        .set_read_timeout(None)
        .map_err(ConnError::Io)?;
    Ok((welcome, reader))
}

/// A blocking connection: one call at a time, each answered before the
/// next is sent.
pub struct Connection {
    writer: UnixStream,
    reader: FrameReader,
    next_tag: u32,
    timeout: Duration,
    welcome: Welcome,
}

impl Connection {
    /// Connects to `path` and says HELLO with `flags`; each wait (the
    /// handshake, every call) is bounded by `timeout` in total.
    pub fn connect(path: &Path, flags: u32, timeout: Duration) -> Result<Self, ConnError> {
        let writer = UnixStream::connect(path).map_err(|source| ConnError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        writer
            .set_write_timeout(Some(timeout))
            .map_err(ConnError::Io)?;
        let (welcome, reader) = handshake(&writer, flags, timeout)?;
        Ok(Connection {
            writer,
            reader,
            next_tag: 1,
            timeout,
            welcome,
        })
    }

    /// The daemon's WELCOME.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Sends the request `build(tag)` and returns the reply carrying the
    /// same tag, skipping unsolicited messages.
    pub fn call(&mut self, build: impl FnOnce(u32) -> Message) -> Result<Message, ConnError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let deadline = Instant::now() + self.timeout;
        self.writer
            .write_all(&build(tag).encode())
            .map_err(|e| io_error(e, self.timeout))?;
        loop {
            let m = next_before(&mut self.reader, deadline, self.timeout)?;
            let reply_tag = match &m {
                Message::Translation(r) => r.tag,
                Message::Fault(r) => r.tag,
                Message::CallResult(r) => r.tag,
                Message::QueryReply(r) => r.tag,
                Message::Bye(b) => return Err(ConnError::Refused(b.message.clone())),
                // Invalidations and events are not for this connection
                // (it asked for neither), but skip rather than fail.
                _ => continue,
            };
            if reply_tag == tag {
                return Ok(m);
            }
        }
    }

    /// Runs an inspection query and decodes its typed reply.
    pub fn query<R: DeserializeOwned>(&mut self, q: &query::Query) -> Result<R, ConnError> {
        let json = query::encode(q)?;
        match self.call(|tag| Query { tag, json }.into())? {
            Message::QueryReply(r) => Ok(query::decode_reply(&r.json)?),
            other => Err(ConnError::Unexpected {
                expected: "QUERY_REPLY",
                got: other.type_code(),
            }),
        }
    }
}
