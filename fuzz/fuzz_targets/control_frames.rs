// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control protocol's frame buffer (protocol/src/frame.rs), driven as
//! the daemon drives it: bytes arrive in chunks of any size through
//! `spare`/`filled`, and after each chunk every complete frame is taken
//! off and decoded; the size limit may change between two frames (the
//! daemon raises it after HELLO).
//!
//! Beyond "no panic":
//! - the frames are exactly those of a plain reference reader of the same
//!   byte stream, and `buffered()` is the reference's unread byte count;
//! - a frame whose length prefix exceeds the limit in force is refused
//!   with `TooLarge`, with that length and limit, as soon as its prefix is
//!   in, and nothing before it is lost;
//! - the frame buffer never buffers more than its limit: once the
//!   complete frames are taken off, what stays is less than one prefix
//!   plus one frame of the limit;
//! - every frame body goes through `Message::decode` (errors are fine).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu_protocol::{DecodeError, FrameBuffer, Message};

#[derive(Arbitrary, Debug)]
struct Input {
    limit: u16,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// A read of `bytes` into a spare area of at least `room` bytes.
    Read { room: u16, bytes: Vec<u8> },
    /// A read of one well-formed frame (type byte and payload).
    Frame { kind: u8, payload: Vec<u8> },
    /// The limit changes before the next frame is taken off.
    SetLimit(u16),
}

/// A plain reader of the same stream: bytes not yet taken as frames.
struct Reference {
    unread: Vec<u8>,
    limit: usize,
}

impl Reference {
    fn next_frame(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        if self.unread.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.unread[..4].try_into().unwrap()) as usize;
        if len > self.limit {
            return Err(DecodeError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        if self.unread.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.unread[4..4 + len].to_vec();
        self.unread.drain(..4 + len);
        Ok(Some(frame))
    }
}

fuzz_target!(|input: Input| {
    let limit = usize::from(input.limit);
    let mut fb = FrameBuffer::with_limit(limit);
    let mut reference = Reference {
        unread: Vec::new(),
        limit,
    };
    for step in input.steps {
        // What arrives, and the room the read is given for it.
        let (bytes, room): (Vec<u8>, usize) = match step {
            Step::Read { room, bytes } => {
                let bytes: Vec<u8> = bytes.into_iter().take(4096).collect();
                let room = bytes.len().max(usize::from(room));
                (bytes, room)
            }
            Step::Frame { kind, payload } => {
                let mut f = Vec::with_capacity(5 + payload.len());
                f.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
                f.push(kind);
                f.extend_from_slice(&payload);
                let room = f.len();
                (f, room)
            }
            Step::SetLimit(limit) => {
                fb.set_limit(usize::from(limit));
                reference.limit = usize::from(limit);
                (Vec::new(), 0)
            }
        };
        let spare = fb.spare(room);
        let spare_len = spare.len();
        assert_eq!(spare_len, room, "spare hands out what was asked for");
        spare[..bytes.len()].copy_from_slice(&bytes);
        fb.filled(bytes.len(), spare_len);
        reference.unread.extend_from_slice(&bytes);
        assert_eq!(fb.buffered(), reference.unread.len());

        loop {
            let want = reference.next_frame();
            let got = fb.next_frame().map(|f| f.map(<[u8]>::to_vec));
            assert_eq!(got, want);
            assert_eq!(fb.buffered(), reference.unread.len());
            match got {
                Ok(Some(frame)) => {
                    let _ = Message::decode(&frame);
                }
                Ok(None) => {
                    assert!(
                        fb.buffered() < 4 + reference.limit,
                        "{} bytes buffered with a limit of {}",
                        fb.buffered(),
                        reference.limit
                    );
                    break;
                }
                // The daemon refuses the connection here.
                Err(_) => return,
            }
        }
    }
});
