// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's chain gatherer (vhost-user/src/chain.rs): a descriptor
//! table, an optional indirect table and an avail ring laid out by hand in
//! a small guest memory (two adjacent regions, a gap, a third region), the
//! chain popped by virtio-queue as the backend pops it, then
//! `Request::gather` and the writes of a reply through
//! `Request::write_at`.
//!
//! Beyond "no panic":
//! - `gather` agrees with a plain reference over the descriptors the chain
//!   yields: the readable bytes are the readable descriptors' bytes in
//!   order, cut at `MAX_READABLE`, read through vm-memory's generic path;
//!   the writable length is the sum of the writable descriptors; a
//!   readable descriptor after a writable one and a readable one outside
//!   memory are refused, and nothing else is; guest memory is not written;
//! - `write_at` writes exactly the bytes of the writable part it is asked
//!   to, at the guest addresses the segments give them, and nothing else
//!   (whatever the segments' overlaps, sizes and region boundaries); it
//!   fails exactly when one of those bytes is not in guest memory, and
//!   then it has written nothing outside those bytes either. One of the
//!   writes is the status tail, as the backend writes it.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_device_iommu::chain::{ChainError, Request, MAX_READABLE};
use virtio_queue::{desc::split::Descriptor, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest RAM: two adjacent regions, a gap, and a third region. Small:
/// every step compares all of it.
const REGIONS: [(u64, usize); 3] = [(0, 0x1000), (0x1000, 0x800), (0x4000, 0x200)];
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const INDIRECT_TABLE: u64 = 0x300;
/// Request data lives from here to the end of the second region.
const DATA: u64 = 0x400;

#[derive(Arbitrary, Debug)]
struct Input {
    descs: Vec<Desc>,
    indirect: Vec<Desc>,
    head: u16,
    /// Bytes written at `DATA` before the chain is popped.
    data: Vec<u8>,
    /// Writes into the writable part: offset and bytes.
    writes: Vec<(u16, Vec<u8>)>,
    status: u8,
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: DescAddr,
    len: DescLen,
    /// NEXT, WRITE and INDIRECT, plus any other bit.
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum DescAddr {
    /// In the data area.
    Data(u16),
    /// Just below the boundary of the two adjacent regions.
    Boundary(u8),
    /// Just below the gap.
    BeforeGap(u8),
    /// The third region.
    Far(u16),
    /// The indirect table.
    Indirect,
    Any(u64),
}

impl DescAddr {
    fn get(self) -> u64 {
        match self {
            DescAddr::Data(n) => DATA + u64::from(n % 0x1400),
            DescAddr::Boundary(n) => 0x1000 - 0x80 + u64::from(n),
            DescAddr::BeforeGap(n) => 0x1800 - 0x80 + u64::from(n),
            DescAddr::Far(n) => 0x4000 + u64::from(n % 0x280),
            DescAddr::Indirect => INDIRECT_TABLE,
            DescAddr::Any(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum DescLen {
    Small(u8),
    Any(u32),
}

impl DescLen {
    fn get(self) -> u32 {
        match self {
            DescLen::Small(n) => u32::from(n),
            DescLen::Any(n) => n,
        }
    }
}

thread_local! {
    static MEM: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l)))
            .expect("guest memory");
}

fn write_descs(mem: &GuestMemoryMmap, table: u64, descs: &[Desc]) {
    for (i, d) in descs.iter().take(usize::from(QUEUE_SIZE)).enumerate() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.get().to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.get().to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..].copy_from_slice(&d.next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + 16 * i as u64))
            .expect("queue area");
    }
}

/// Every byte of guest RAM, by region.
fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(a, l)| {
            let mut v = vec![0u8; l];
            mem.read_slice(&mut v, GuestAddress(a)).expect("region");
            v
        })
        .collect()
}

/// Guest addresses whose byte differs between two snapshots (compared a
/// block at a time: byte loops are slow under the fuzzer's
/// instrumentation).
fn changed(a: &[Vec<u8>], b: &[Vec<u8>]) -> Vec<u64> {
    const BLOCK: usize = 256;
    let mut out = Vec::new();
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        for (i, (p, q)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
            if p == q {
                continue;
            }
            for (j, (u, v)) in p.iter().zip(q).enumerate() {
                if u != v {
                    out.push(REGIONS[r].0 + (i * BLOCK + j) as u64);
                }
            }
        }
    }
    out
}

/// What the reference makes of the chain.
#[derive(Debug, PartialEq, Eq)]
enum Gathered {
    Ok {
        readable: Vec<u8>,
        writable_len: usize,
    },
    ReadableAfterWritable,
    Memory,
}

fn reference_gather(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> (Gathered, Vec<(u64, u32)>) {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        if d.is_write_only() {
            writable.push((d.addr().0, d.len()));
            continue;
        }
        if !writable.is_empty() {
            return (Gathered::ReadableAfterWritable, writable);
        }
        let n = (d.len() as usize).min(MAX_READABLE - readable.len());
        let mut buf = vec![0u8; n];
        if n > 0 && mem.read_slice(&mut buf, d.addr()).is_err() {
            return (Gathered::Memory, writable);
        }
        readable.extend_from_slice(&buf);
    }
    let writable_len = writable.iter().map(|&(_, l)| l as usize).sum();
    (
        Gathered::Ok {
            readable,
            writable_len,
        },
        writable,
    )
}

/// The guest address of byte `at` of the writable part, if it has one
/// (`Some(None)`: past the end of `u64`).
fn writable_byte(segments: &[(u64, u32)], mut at: u64) -> Option<Option<u64>> {
    for &(addr, len) in segments {
        if at < u64::from(len) {
            return Some(addr.checked_add(at));
        }
        at -= u64::from(len);
    }
    None
}

fuzz_target!(|input: Input| {
    MEM.with(|mem| {
        for &(a, l) in &REGIONS {
            mem.write_slice(&vec![0u8; l], GuestAddress(a))
                .expect("region");
        }
        write_descs(mem, DESC_TABLE, &input.descs);
        write_descs(mem, INDIRECT_TABLE, &input.indirect);
        let data = &input.data[..input.data.len().min(0x1400)];
        mem.write_slice(data, GuestAddress(DATA))
            .expect("data area");
        // The avail ring: flags 0, idx 1, ring[0] = head.
        mem.write_obj(1u16.to_le(), GuestAddress(AVAIL_RING + 2))
            .expect("avail");
        mem.write_obj(input.head.to_le(), GuestAddress(AVAIL_RING + 4))
            .expect("avail");

        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return;
        };
        let descs: Vec<Descriptor> = chain.clone().collect();
        let (want, segments) = reference_gather(mem, &descs);

        let before = snapshot(mem);
        let mut req = Request::new();
        let got = match req.gather(chain, mem) {
            Ok(()) => Gathered::Ok {
                readable: req.readable().to_vec(),
                writable_len: req.writable_len(),
            },
            Err(ChainError::ReadableAfterWritable) => Gathered::ReadableAfterWritable,
            Err(ChainError::Memory(_)) => Gathered::Memory,
        };
        assert_eq!(got, want, "descriptors {descs:?}");
        let mut current = snapshot(mem);
        assert!(changed(&before, &current).is_empty(), "gather wrote");
        let Gathered::Ok { writable_len, .. } = got else {
            return;
        };

        let mut writes: Vec<(usize, Vec<u8>)> = input
            .writes
            .into_iter()
            .take(4)
            .map(|(at, bytes)| (usize::from(at), bytes))
            .collect();
        if let Some(tail_at) = writable_len.checked_sub(4) {
            writes.push((tail_at, vec![input.status, 0, 0, 0]));
        }
        for (offset, bytes) in writes {
            // Where each byte goes; the last write of an address wins.
            let mut expect: BTreeMap<u64, u8> = BTreeMap::new();
            let mut fails = false;
            for (i, &b) in bytes.iter().enumerate() {
                match writable_byte(&segments, (offset + i) as u64) {
                    None => break,
                    Some(None) => fails = true,
                    Some(Some(addr)) => {
                        fails |= !mem.address_in_range(GuestAddress(addr));
                        expect.insert(addr, b);
                    }
                }
            }
            let result = req.write_at(mem, offset, &bytes);
            let after = snapshot(mem);
            assert_eq!(
                result.is_err(),
                fails,
                "write_at({offset}, {bytes:?}): {result:?}"
            );
            for addr in changed(&current, &after) {
                assert!(expect.contains_key(&addr), "byte {addr:#x} written");
            }
            current = after;
            if result.is_ok() {
                for (&addr, &b) in &expect {
                    let got: u8 = mem.read_obj(GuestAddress(addr)).expect("in RAM");
                    assert_eq!(got, b, "byte {addr:#x}");
                }
            }
        }
    });
});
