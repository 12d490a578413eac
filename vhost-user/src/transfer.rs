// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A device state blob moving through the file descriptor a frontend
//! hands over with `SET_DEVICE_STATE_FD`, without blocking the vhost-user
//! handler (vhost-user-backend asks that the transfer happen outside the
//! callback): a helper thread writes the blob (SAVE) or reads it up to a
//! size bound (LOAD), and the frontend's `CHECK_DEVICE_STATE` waits for
//! its result. Every wait is bounded by one deadline for the whole
//! transfer: a frontend that neither reads nor writes nor closes its end
//! makes the transfer fail, not the daemon hang.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::fd::AsFd,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{fcntl, FcntlArg, OFlag},
    poll::{poll, PollFd, PollFlags, PollTimeout},
};
use thiserror::Error;

/// How long one transfer may take, from `SET_DEVICE_STATE_FD` to the
/// end of the data.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest blob the daemon writes or reads. About the memory the model
/// takes for the same state: ~30 M mappings.
pub const MAX_STATE_SIZE: usize = 1 << 30;
/// How long `CHECK_DEVICE_STATE` waits past the deadline for the helper
/// thread, which stops by itself at the deadline, to say so.
const GRACE: Duration = Duration::from_secs(1);
/// Bytes read at a time.
const CHUNK: usize = 64 * 1024;

/// Why a transfer failed.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The frontend did not take or give the whole blob in time.
    #[error("the state transfer did not end within {0:?}")]
    Timeout(Duration),
    /// The blob is larger than the daemon handles.
    #[error("the state is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The descriptor failed (the frontend closed its end early, ...).
    #[error("I/O on the state transfer descriptor")]
    Io(#[source] io::Error),
    /// The device state could not be gathered.
    #[error("the device state cannot be saved")]
    Save(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The helper thread died without a result.
    #[error("the state transfer thread ended without a result")]
    Lost,
}

/// What a transfer did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// SAVE: this many bytes written, then the descriptor closed.
    Saved(usize),
    /// LOAD: the blob, read to the end of the data.
    Loaded(Vec<u8>),
}

/// A transfer in progress on its helper thread.
pub struct Transfer {
    deadline: Instant,
    timeout: Duration,
    result: mpsc::Receiver<Result<Outcome, TransferError>>,
}

impl Transfer {
    /// Writes the blob that `produce` returns into `file` and closes it.
    /// `produce` runs on the helper thread too: encoding a large state
    /// takes a while.
    pub fn save<F, E>(file: File, produce: F, max: usize, timeout: Duration) -> io::Result<Self>
    where
        F: FnOnce() -> Result<Vec<u8>, E> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::spawn("state-save", timeout, move |deadline| {
            let blob = produce().map_err(|e| TransferError::Save(Box::new(e)))?;
            if blob.len() > max {
                return Err(TransferError::TooLarge { limit: max });
            }
            write_all(file, &blob, deadline, timeout)?;
            Ok(Outcome::Saved(blob.len()))
        })
    }

    /// Reads a blob of at most `max` bytes from `file`, until the
    /// frontend closes its end.
    pub fn load(file: File, max: usize, timeout: Duration) -> io::Result<Self> {
        Self::spawn("state-load", timeout, move |deadline| {
            read_all(file, max, deadline, timeout).map(Outcome::Loaded)
        })
    }

    fn spawn(
        name: &str,
        timeout: Duration,
        work: impl FnOnce(Instant) -> Result<Outcome, TransferError> + Send + 'static,
    ) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = mpsc::sync_channel(1);
        thread::Builder::new().name(name.into()).spawn(move || {
            // The receiver may be gone (the transfer was abandoned).
            let _ = tx.send(work(deadline));
        })?;
        Ok(Transfer {
            deadline,
            timeout,
            result: rx,
        })
    }

    /// Waits for the transfer's result, at most until its deadline (and
    /// a grace period for the helper thread to report).
    pub fn finish(self) -> Result<Outcome, TransferError> {
        let wait = self.deadline.saturating_duration_since(Instant::now()) + GRACE;
        match self.result.recv_timeout(wait) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(TransferError::Timeout(self.timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TransferError::Lost),
        }
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(file.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(file.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Waits until `file` is ready for `events`, or fails at the deadline.
fn wait_ready(
    file: &File,
    events: PollFlags,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), TransferError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransferError::Timeout(timeout));
        }
        let left = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), events)];
        match poll(&mut fds, left) {
            // Readiness, hang-up or error: the next read or write says.
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(TransferError::Io(e.into())),
        }
    }
}

fn write_all(
    mut file: File,
    blob: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), TransferError> {
    set_nonblocking(&file).map_err(TransferError::Io)?;
    let mut at = 0;
    while at < blob.len() {
        match file.write(&blob[at..]) {
            Ok(0) => return Err(TransferError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_ready(&file, PollFlags::POLLOUT, deadline, timeout)?;
            }
            Err(e) => return Err(TransferError::Io(e)),
        }
    }
    // Dropping `file` closes it: the frontend reads the end of the data.
    Ok(())
}

fn read_all(
    mut file: File,
    max: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, TransferError> {
    set_nonblocking(&file).map_err(TransferError::Io)?;
    let mut blob = Vec::new();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(blob),
            Ok(n) => {
                if blob.len() + n > max {
                    return Err(TransferError::TooLarge { limit: max });
                }
                blob.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_ready(&file, PollFlags::POLLIN, deadline, timeout)?;
            }
            Err(e) => return Err(TransferError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, io::pipe, os::fd::OwnedFd};

    use super::*;

    const SHORT: Duration = Duration::from_millis(200);

    fn file(fd: impl Into<OwnedFd>) -> File {
        File::from(fd.into())
    }

    #[test]
    fn a_saved_blob_arrives_whole_then_the_end_of_the_data() {
        let (mut reader, writer) = pipe().unwrap();
        let blob: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let expected = blob.clone();
        let t = Transfer::save(
            file(writer),
            move || Ok::<_, Infallible>(blob),
            MAX_STATE_SIZE,
            TRANSFER_TIMEOUT,
        )
        .unwrap();
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
        assert_eq!(t.finish().unwrap(), Outcome::Saved(300_000));
    }

    #[test]
    fn a_loaded_blob_is_read_to_the_end_of_the_data() {
        let (reader, mut writer) = pipe().unwrap();
        let t = Transfer::load(file(reader), 1 << 20, TRANSFER_TIMEOUT).unwrap();
        let blob = vec![7u8; 200_000];
        writer.write_all(&blob).unwrap();
        drop(writer);
        assert_eq!(t.finish().unwrap(), Outcome::Loaded(blob));
    }

    #[test]
    fn a_frontend_that_never_reads_or_closes_meets_the_deadline() {
        let (_reader, writer) = pipe().unwrap();
        // Larger than a pipe holds.
        let t = Transfer::save(
            file(writer),
            || Ok::<_, Infallible>(vec![0u8; 1 << 20]),
            MAX_STATE_SIZE,
            SHORT,
        )
        .unwrap();
        let start = Instant::now();
        assert!(matches!(t.finish(), Err(TransferError::Timeout(_))));
        assert!(start.elapsed() < SHORT + GRACE);
        let (reader, _writer) = pipe().unwrap();
        let t = Transfer::load(file(reader), 1 << 20, SHORT).unwrap();
        assert!(matches!(t.finish(), Err(TransferError::Timeout(_))));
    }

    #[test]
    fn blobs_past_the_size_bound_are_refused() {
        let (reader, mut writer) = pipe().unwrap();
        let t = Transfer::load(file(reader), 1000, TRANSFER_TIMEOUT).unwrap();
        // The reader stops at the bound; the rest cannot be written.
        let _ = writer.write_all(&[1u8; 100_000]);
        drop(writer);
        assert!(matches!(
            t.finish(),
            Err(TransferError::TooLarge { limit: 1000 })
        ));
        let (mut reader, writer) = pipe().unwrap();
        let t = Transfer::save(
            file(writer),
            || Ok::<_, Infallible>(vec![0u8; 1001]),
            1000,
            TRANSFER_TIMEOUT,
        )
        .unwrap();
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "nothing written");
        assert!(matches!(t.finish(), Err(TransferError::TooLarge { .. })));
    }

    #[test]
    fn a_reader_that_goes_away_fails_the_save() {
        let (reader, writer) = pipe().unwrap();
        drop(reader);
        let t = Transfer::save(
            file(writer),
            || Ok::<_, Infallible>(vec![0u8; 10]),
            MAX_STATE_SIZE,
            TRANSFER_TIMEOUT,
        )
        .unwrap();
        assert!(matches!(t.finish(), Err(TransferError::Io(_))));
    }
}
