// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the page-table walker targets share: the model crate's plain
//! reference walkers (src/pgtable/reference.rs, the ones its property
//! tests use, compiled here as they are), a [`TableMemory`] that records
//! every access a walk makes and can play a guest racing the walker, and
//! the checks every successful walk must pass.

use std::cell::{Cell, RefCell};

pub use viommu::pgtable::{PageAccess, PageTranslation, WalkFault};
use viommu::pgtable::{TableMemory, TableMemoryError, MAX_UPDATE_RETRIES};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The reference walkers: `x86_translate`, `arm_translate` and `RefMem`.
#[allow(dead_code)]
#[path = "../../src/pgtable/reference.rs"]
pub mod reference;

/// Guest RAM of 4 KiB pages at 0, laid out anew for every input. It
/// remembers which pages hold one word everywhere, so that laying out the
/// next input rewrites only the pages that change (copying all of RAM for
/// every input would cost more than the walks).
pub struct Ram {
    pub mem: GuestMemoryMmap,
    /// The word a page holds everywhere, if it is known to.
    uniform: RefCell<Vec<Option<u64>>>,
}

impl Ram {
    pub fn new(pages: usize) -> Self {
        Ram {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), pages << 12)]).expect("RAM"),
            uniform: RefCell::new(vec![None; pages]),
        }
    }

    /// Lays out all pages: each holds one word everywhere (`fill`, then
    /// zero), then the `patches` (word index, value) are written over
    /// them. Returns the same image as words, for the reference.
    pub fn lay_out(
        &self,
        fill: impl Iterator<Item = u64>,
        patches: impl Iterator<Item = (usize, u64)>,
    ) -> Vec<u64> {
        let mut uniform = self.uniform.borrow_mut();
        let pages = uniform.len();
        let mut words = vec![0u64; pages * 512];
        let mut fill = fill.chain(std::iter::repeat(0));
        for (page, known) in uniform.iter_mut().enumerate() {
            let value = fill.next().unwrap_or(0);
            if value != 0 {
                words[page * 512..(page + 1) * 512].fill(value);
            }
            if *known != Some(value) {
                let bytes = value.to_le_bytes().repeat(512);
                self.mem
                    .write_slice(&bytes, GuestAddress((page as u64) << 12))
                    .expect("RAM");
                *known = Some(value);
            }
        }
        for (index, value) in patches {
            let index = index % words.len();
            words[index] = value;
            self.mem
                .write_obj(value.to_le(), GuestAddress(8 * index as u64))
                .expect("RAM");
            uniform[index / 512] = None;
        }
        words
    }

    /// The page of `gpa` may no longer hold one word everywhere.
    fn written(&self, gpa: u64) {
        if let Some(known) = self.uniform.borrow_mut().get_mut((gpa >> 12) as usize) {
            *known = None;
        }
    }
}

/// The word at `gpa`, which must be in RAM.
pub fn read_word(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    u64::from_le(mem.read_obj(GuestAddress(gpa)).expect("RAM"))
}

/// Guest memory as a walk sees it, recording each access; optionally a
/// guest that flips bits of an entry just before each of the walker's
/// compare-exchanges on it, `races` times in all.
pub struct Recorder<'a> {
    pub ram: &'a Ram,
    pub reads: RefCell<Vec<u64>>,
    pub exchanges: RefCell<Vec<u64>>,
    pub races: Cell<u32>,
    pub flip: u64,
}

impl<'a> Recorder<'a> {
    pub fn new(ram: &'a Ram, races: u32, flip: u64) -> Self {
        Recorder {
            ram,
            reads: RefCell::new(Vec::new()),
            exchanges: RefCell::new(Vec::new()),
            races: Cell::new(races),
            flip,
        }
    }

    /// Checks that the walk touched at most one entry per level (plus the
    /// re-judged entries of lost races, each bounded by
    /// `MAX_UPDATE_RETRIES`) and that it only ever asked for aligned
    /// entries: the walk terminated without roaming.
    pub fn check_bounded(&self, levels: usize) {
        let reads = self.reads.borrow();
        let exchanges = self.exchanges.borrow();
        assert!(reads.len() <= levels, "{} reads: {reads:x?}", reads.len());
        let most = levels * (MAX_UPDATE_RETRIES as usize + 1);
        assert!(exchanges.len() <= most, "{} exchanges", exchanges.len());
        for &a in reads.iter().chain(exchanges.iter()) {
            assert!(a.is_multiple_of(8), "entry address {a:#x}");
        }
        for a in exchanges.iter() {
            assert!(reads.contains(a), "exchange on {a:#x}, which was not read");
        }
    }
}

impl Recorder<'_> {
    /// Checks that every entry the walk read or exchanged holds what the
    /// reference's memory holds. When the two walks agree on the result
    /// they took the same path (each entry's address comes from the entry
    /// above it), so this covers every mark either of them made.
    pub fn check_marks(&self, words: &[u64]) {
        let reads = self.reads.borrow();
        let exchanges = self.exchanges.borrow();
        for &a in reads.iter().chain(exchanges.iter()) {
            if let Some(&want) = words.get((a / 8) as usize) {
                assert_eq!(read_word(&self.ram.mem, a), want, "entry {a:#x} marks");
            }
        }
    }

    /// Copies the entries the walk exchanged (the only ones it or the
    /// racing guest wrote) into the reference's memory.
    pub fn follow_guest(&self, words: &mut [u64]) {
        for &a in self.exchanges.borrow().iter() {
            if let Some(w) = words.get_mut((a / 8) as usize) {
                *w = read_word(&self.ram.mem, a);
            }
        }
    }
}

impl TableMemory for Recorder<'_> {
    fn read_u64(&self, gpa: u64) -> Result<u64, TableMemoryError> {
        self.reads.borrow_mut().push(gpa);
        self.ram.mem.read_u64(gpa)
    }

    fn compare_exchange_u64(
        &self,
        gpa: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, TableMemoryError> {
        self.exchanges.borrow_mut().push(gpa);
        self.ram.written(gpa);
        // The guest rewrites the entry between the walker's read and its
        // exchange.
        if self.races.get() > 0 && self.flip != 0 {
            self.races.set(self.races.get() - 1);
            let _ = self
                .ram
                .mem
                .write_obj((current ^ self.flip).to_le(), GuestAddress(gpa));
        }
        self.ram.mem.compare_exchange_u64(gpa, current, new)
    }
}

/// What every successful walk of `va` for `access` must give: a page
/// that holds the (tag-cleared) address, aligned, below the output width,
/// of a size the format has, and that allows the very access that walked.
pub fn check_translation(
    t: &PageTranslation,
    va: u64,
    access: PageAccess,
    output_bits: u32,
    page_shifts: &[u8],
) {
    assert!(page_shifts.contains(&t.page_shift), "{t:?}");
    assert!(t.contains(va), "{t:?} does not hold {va:#x}");
    assert!(t.va.is_multiple_of(t.page_size()), "{t:?}");
    assert!(t.gpa.is_multiple_of(t.page_size()), "{t:?}");
    assert!(output_bits >= 64 || t.gpa >> output_bits == 0, "{t:?}");
    assert!(t.allows(access), "{t:?} refuses {access:?}, which walked");
    assert!(!t.dirty || t.writable, "{t:?}");
}
