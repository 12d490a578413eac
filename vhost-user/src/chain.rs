// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading a request out of a descriptor chain and writing the reply back,
//! without allocating per request.
//!
//! The device-readable part is copied into a fixed buffer (requests are at
//! most a few dozen bytes; longer readable parts are truncated, which the
//! model treats as trailing bytes it ignores). The device-writable part is
//! remembered as a list of guest segments so the status can be written in
//! its last four bytes, however the driver split it.
//!
//! Public (the backend is its only user in the daemon) so that the fuzz
//! target `chain` (`fuzz/`) can drive [`Request::gather`] and
//! [`Request::write_at`] with hostile descriptor chains.

use std::ops::Deref;

use thiserror::Error;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{desc::split::Descriptor, DescriptorChain, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

/// Bytes of the device-readable part that are kept.
pub const MAX_READABLE: usize = 256;

/// A descriptor chain that cannot be used.
#[derive(Debug, Error)]
pub enum ChainError {
    /// A readable descriptor follows a writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    Memory(#[source] GuestMemoryError),
}

/// A ring whose avail index cannot be used.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The avail index could not be read (no usable ring memory).
    #[error("the avail index cannot be read")]
    Unreadable,
    /// The driver published an avail index more than a queue size ahead
    /// of the device's (virtio 1.2 §2.7.13.3): the ring is broken.
    #[error(
        "the driver published avail index {avail} with {next} processed on a {size}-entry ring"
    )]
    Broken {
        /// The avail index the driver published.
        avail: u16,
        /// The device's next index.
        next: u16,
        /// The queue size.
        size: u16,
    },
}

/// Chains the driver has made available to the device (at most a queue
/// size), read with acquire ordering. Every ring is checked with this
/// before it is popped: a driver that publishes more than a queue size
/// broke its ring, and popping it would fail again on every attempt.
pub fn available(vring: &VringRwLock, mem: &GuestMemoryMmap) -> Result<u16, RingError> {
    let state = vring.get_ref();
    let queue = state.get_queue();
    let next = queue.next_avail();
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|_| RingError::Unreadable)?
        .0;
    let n = avail.wrapping_sub(next);
    if n > queue.size() {
        return Err(RingError::Broken {
            avail,
            next,
            size: queue.size(),
        });
    }
    Ok(n)
}

/// Pops the next available descriptor chain of `vring`. A function, not
/// an inline `while let` on the vring: the vring's lock is released
/// before the caller uses the chain and calls `add_used`.
pub fn pop<M>(vring: &VringRwLock, mem: M) -> Option<DescriptorChain<M>>
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    vring.get_mut().get_queue_mut().pop_descriptor_chain(mem)
}

/// The parts of one descriptor chain, gathered for the device model.
#[derive(Default)]
pub struct Request {
    readable: Vec<u8>,
    /// Device-writable segments, in order.
    writable: Vec<(GuestAddress, u32)>,
    writable_len: usize,
}

impl Request {
    /// An empty request with room for [`MAX_READABLE`] readable bytes.
    pub fn new() -> Self {
        Request {
            readable: Vec::with_capacity(MAX_READABLE),
            ..Default::default()
        }
    }

    /// Gathers `chain` (clears the previous contents; buffers are reused).
    pub fn gather<I>(&mut self, chain: I, mem: &GuestMemoryMmap) -> Result<(), ChainError>
    where
        I: Iterator<Item = Descriptor>,
    {
        self.readable.clear();
        self.writable.clear();
        self.writable_len = 0;
        for desc in chain {
            if desc.is_write_only() {
                self.writable.push((desc.addr(), desc.len()));
                self.writable_len += desc.len() as usize;
                continue;
            }
            if !self.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            let room = MAX_READABLE - self.readable.len();
            let n = (desc.len() as usize).min(room);
            if n > 0 {
                let at = self.readable.len();
                self.readable.resize(at + n, 0);
                read_guest(mem, &mut self.readable[at..], desc.addr())?;
            }
        }
        Ok(())
    }

    /// The device-readable bytes (at most `MAX_READABLE`).
    pub fn readable(&self) -> &[u8] {
        &self.readable
    }

    /// Total size of the device-writable part.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    /// Writes `data` at `offset` of the device-writable part.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        mut offset: usize,
        mut data: &[u8],
    ) -> Result<(), ChainError> {
        for &(addr, len) in &self.writable {
            let len = len as usize;
            if data.is_empty() {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(data.len());
            let at = addr.checked_add(offset as u64).ok_or(ChainError::Memory(
                GuestMemoryError::InvalidGuestAddress(addr),
            ))?;
            write_guest(mem, &data[..n], at)?;
            data = &data[n..];
            offset = 0;
        }
        Ok(())
    }
}

// Requests and event records are a few bytes inside one RAM region.
// Going to the region directly skips vm-memory's generic multi-region
// iterator, which otherwise dominates the cost of a request; accesses that
// cross a region boundary take the generic path.

fn read_guest(mem: &GuestMemoryMmap, buf: &mut [u8], addr: GuestAddress) -> Result<(), ChainError> {
    if let Some((region, at)) = mem.to_region_addr(addr) {
        if region.read_slice(buf, at).is_ok() {
            return Ok(());
        }
    }
    mem.read_slice(buf, addr).map_err(ChainError::Memory)
}

fn write_guest(mem: &GuestMemoryMmap, buf: &[u8], addr: GuestAddress) -> Result<(), ChainError> {
    if let Some((region, at)) = mem.to_region_addr(addr) {
        if region.write_slice(buf, at).is_ok() {
            return Ok(());
        }
    }
    mem.write_slice(buf, addr).map_err(ChainError::Memory)
}
