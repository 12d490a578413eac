// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading protocol frames from a control-socket stream, shared by the
//! daemon and the client.
//!
//! A reader may spin for a short, bounded window before it blocks: a
//! thread woken from `read` costs 10-20 us on a virtualised host, so
//! back-to-back traffic is caught while still spinning, and an idle
//! connection costs nothing after the window.

use std::{
    io::{self, Read},
    os::{fd::AsRawFd, unix::net::UnixStream},
    time::{Duration, Instant},
};

use nix::{errno::Errno, sys::socket::MsgFlags};
use viommu::control::{FrameBuffer, Message};

/// What a non-blocking read found.
pub enum Polled {
    Message(Message),
    /// Nothing complete has arrived yet.
    Empty,
    /// The peer closed the stream.
    Closed,
}

/// Buffered frame reader over a stream.
pub struct FrameReader {
    pub stream: UnixStream,
    buf: FrameBuffer,
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl FrameReader {
    pub fn new(stream: UnixStream) -> Self {
        FrameReader {
            stream,
            buf: FrameBuffer::new(),
        }
    }

    fn buffered(&mut self) -> io::Result<Option<Message>> {
        match self.buf.next_frame() {
            Ok(Some(body)) => Message::decode(body).map(Some).map_err(invalid),
            Ok(None) => Ok(None),
            Err(e) => Err(invalid(e)),
        }
    }

    /// The next message; `Ok(None)` when the peer closed the stream.
    /// Malformed frames are `InvalidData` errors. Waits for data by
    /// spinning up to `spin`, then by blocking.
    pub fn next(&mut self, spin: Duration) -> io::Result<Option<Message>> {
        let deadline = Instant::now() + spin;
        loop {
            match self.try_next()? {
                Polled::Message(m) => return Ok(Some(m)),
                Polled::Closed => return Ok(None),
                // Yield while spinning: on a small host the peer may need
                // this core to produce what we wait for.
                Polled::Empty if Instant::now() < deadline => std::thread::yield_now(),
                Polled::Empty => break,
            }
        }
        loop {
            if let Some(m) = self.buffered()? {
                return Ok(Some(m));
            }
            let spare = self.buf.spare(64 * 1024);
            let n_spare = spare.len();
            let n = self.stream.read(spare)?;
            self.buf.filled(n, n_spare);
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// The next message if one has fully arrived, without blocking.
    pub fn try_next(&mut self) -> io::Result<Polled> {
        loop {
            if let Some(m) = self.buffered()? {
                return Ok(Polled::Message(m));
            }
            let fd = self.stream.as_raw_fd();
            let spare = self.buf.spare(64 * 1024);
            let n_spare = spare.len();
            match nix::sys::socket::recv(fd, spare, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    self.buf.filled(0, n_spare);
                    return Ok(Polled::Closed);
                }
                Ok(n) => self.buf.filled(n, n_spare),
                Err(Errno::EAGAIN) => {
                    self.buf.filled(0, n_spare);
                    return Ok(Polled::Empty);
                }
                Err(Errno::EINTR) => self.buf.filled(0, n_spare),
                Err(e) => {
                    self.buf.filled(0, n_spare);
                    return Err(e.into());
                }
            }
        }
    }
}
