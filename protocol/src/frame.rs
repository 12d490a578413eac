// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Framing: [`FrameBuffer`] splits complete frames off a receive buffer
//! with a per-connection size limit, and [`FrameReader`] reads messages
//! from a blocking stream, spinning for a short, bounded window before it
//! blocks (a thread woken from `read` costs 10-20 us on a virtualised
//! host, so back-to-back traffic is caught while still spinning, and an
//! idle connection costs nothing after the window).

use std::{
    io::{self, Read},
    os::{fd::AsRawFd, unix::net::UnixStream},
    time::{Duration, Instant},
};

use nix::{errno::Errno, sys::socket::MsgFlags};

use crate::{codec::DecodeError, messages::Message};

/// Largest frame a client accepts (query replies may be large).
pub const MAX_FRAME: usize = 4 << 20;

/// Splits complete frames off the front of a receive buffer. Frames whose
/// length prefix exceeds the limit are refused before they are buffered.
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    limit: usize,
}

impl Default for FrameBuffer {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME)
    }
}

impl FrameBuffer {
    /// A buffer accepting frames of at most [`MAX_FRAME`] bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer accepting frames of at most `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        FrameBuffer {
            buf: Vec::new(),
            start: 0,
            limit,
        }
    }

    /// Changes the frame size limit (a daemon raises it after HELLO).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Room to read into: call `filled(n, spare_len)` after writing `n`
    /// bytes to it.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + min, 0);
        &mut self.buf[len..]
    }

    /// Keeps `n` of the `spare_len` bytes handed out by `spare`.
    pub fn filled(&mut self, n: usize, spare_len: usize) {
        let len = self.buf.len();
        self.buf.truncate(len - spare_len + n);
    }

    /// The next complete frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.limit {
            return Err(DecodeError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let body = &self.buf[self.start + 4..self.start + 4 + len];
        self.start += 4 + len;
        Ok(Some(body))
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        match self.next_frame()? {
            Some(body) => Message::decode(body).map(Some),
            None => Ok(None),
        }
    }

    /// Reads what `stream` has without blocking. `Ok(false)` when the
    /// peer closed the stream.
    pub fn fill_from(&mut self, stream: &UnixStream) -> io::Result<bool> {
        loop {
            let spare = self.spare(64 * 1024);
            let n_spare = spare.len();
            match nix::sys::socket::recv(stream.as_raw_fd(), spare, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    self.filled(0, n_spare);
                    return Ok(false);
                }
                Ok(n) => {
                    self.filled(n, n_spare);
                    return Ok(true);
                }
                Err(Errno::EAGAIN) => {
                    self.filled(0, n_spare);
                    return Ok(true);
                }
                Err(Errno::EINTR) => self.filled(0, n_spare),
                Err(e) => {
                    self.filled(0, n_spare);
                    return Err(e.into());
                }
            }
        }
    }
}

/// What a non-blocking read found.
pub enum Polled {
    /// A complete message.
    Message(Message),
    /// Nothing complete has arrived yet.
    Empty,
    /// The peer closed the stream.
    Closed,
}

/// Buffered message reader over a blocking stream.
pub struct FrameReader {
    /// The stream (its read timeout applies to blocking reads).
    pub stream: UnixStream,
    buf: FrameBuffer,
}

fn invalid(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl FrameReader {
    /// A reader over `stream`.
    pub fn new(stream: UnixStream) -> Self {
        FrameReader {
            stream,
            buf: FrameBuffer::new(),
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
            if let Some(m) = self.buf.next_message().map_err(invalid)? {
                return Ok(Some(m));
            }
            let spare = self.buf.spare(64 * 1024);
            let n_spare = spare.len();
            let n = self.stream.read(spare);
            self.buf.filled(*n.as_ref().unwrap_or(&0), n_spare);
            if n? == 0 {
                return Ok(None);
            }
        }
    }

    /// The next message if one has fully arrived, without blocking.
    pub fn try_next(&mut self) -> io::Result<Polled> {
        if let Some(m) = self.buf.next_message().map_err(invalid)? {
            return Ok(Polled::Message(m));
        }
        if !self.buf.fill_from(&self.stream)? {
            return Ok(Polled::Closed);
        }
        Ok(match self.buf.next_message().map_err(invalid)? {
            Some(m) => Polled::Message(m),
            None => Polled::Empty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Ack, Query};

    #[test]
    fn frame_buffer_reassembles_frames_split_anywhere() {
        let a = Message::from(Ack { seq: 1 }).encode();
        let b = Message::from(Query {
            tag: 2,
            json: "x".repeat(100),
        })
        .encode();
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        for chunk in [1, 3, 7, 64] {
            let mut fb = FrameBuffer::new();
            let mut got = vec![];
            for piece in stream.chunks(chunk) {
                let spare = fb.spare(piece.len());
                let n = spare.len();
                spare[..piece.len()].copy_from_slice(piece);
                fb.filled(piece.len(), n);
                while let Some(m) = fb.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 2, "chunk {chunk}");
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_it_is_buffered() {
        let mut fb = FrameBuffer::with_limit(64);
        let spare = fb.spare(4);
        let n = spare.len();
        spare.copy_from_slice(&65u32.to_le_bytes());
        fb.filled(4, n);
        assert_eq!(
            fb.next_frame(),
            Err(DecodeError::TooLarge { len: 65, limit: 64 })
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_streams_never_panic_the_frame_buffer(
            stream in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            chunk in 1usize..64,
        ) {
            let mut fb = FrameBuffer::with_limit(256);
            for piece in stream.chunks(chunk) {
                let spare = fb.spare(piece.len());
                let n = spare.len();
                spare[..piece.len()].copy_from_slice(piece);
                fb.filled(piece.len(), n);
                while let Ok(Some(f)) = fb.next_frame() {
                    let _ = Message::decode(f);
                }
            }
        }
    }
}
