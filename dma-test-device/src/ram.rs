// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The memory QEMU lends the device: the regions of its vfio-user DMA_MAP
//! messages (guest RAM as memfd pieces), mapped into this process.
//!
//! Which address space the regions live in depends on QEMU: guest-physical
//! when QEMU has no vIOMMU for the device (the daemon translates, the
//! device maps IOVA -> GPA through it), IOVA when QEMU's built-in
//! virtio-iommu translates (one DMA_MAP per guest mapping).
//!
//! Coherence: every access holds the table's read lock (`Ram::view`) and
//! DMA_UNMAP takes the write lock, so once QEMU has the reply to its
//! DMA_UNMAP no access to that region is in progress or will start.

use std::{
    fs::File,
    io,
    sync::{RwLock, RwLockReadGuard},
};

use log::debug;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// Most regions at once (QEMU's built-in virtio-iommu sends one per guest
/// mapping; VFIO type1 allows a guest 65535 mappings per container).
pub const MAX_REGIONS: usize = 1 << 20;

/// One DMA_MAP region.
struct Region {
    start: u64,
    /// Inclusive.
    end: u64,
    read: bool,
    write: bool,
    /// `None` for a region QEMU gave without a file (ROM areas): it exists
    /// in the address space but the device cannot reach its bytes.
    map: Option<MmapRegion>,
}

/// The DMA_MAP table.
#[derive(Default)]
pub struct Ram {
    regions: RwLock<Vec<Region>>,
}

/// The table, read-locked for the duration of some accesses.
pub struct RamView<'a> {
    regions: RwLockReadGuard<'a, Vec<Region>>,
}

/// Why a DMA_MAP or DMA_UNMAP was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("empty or wrapping range {address:#x}+{size:#x}")]
    BadRange { address: u64, size: u64 },
    #[error(
        "[{start:#x}, {end:#x}] overlaps the mapped region [{other_start:#x}, {other_end:#x}]"
    )]
    Overlap {
        start: u64,
        end: u64,
        other_start: u64,
        other_end: u64,
    },
    #[error("region too large for this host ({0:#x} bytes)")]
    TooLarge(u64),
    #[error("more than {MAX_REGIONS} regions")]
    TooMany,
    #[error("DMA_MAP file: {0}")]
    File(io::Error),
    #[error("file offset {offset:#x} + size {size:#x} is beyond the file's {file_len:#x} bytes")]
    BeyondFile {
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error("mmap of {size:#x} bytes at file offset {offset:#x}: {source}")]
    Mmap {
        size: u64,
        offset: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error(
        "unmap of [{start:#x}, {end:#x}] would split the region [{other_start:#x}, {other_end:#x}]"
    )]
    Split {
        start: u64,
        end: u64,
        other_start: u64,
        other_end: u64,
    },
}

impl From<MapError> for io::Error {
    fn from(e: MapError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
    }
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

impl Ram {
    /// Adds `[address, address + size)`, backed by `fd` at `offset` if
    /// given; `read`/`write` are the accesses the region allows.
    pub fn map(
        &self,
        address: u64,
        size: u64,
        fd: Option<(File, u64)>,
        read: bool,
        write: bool,
    ) -> Result<(), MapError> {
        let end = size
            .checked_sub(1)
            .and_then(|s| address.checked_add(s))
            .ok_or(MapError::BadRange { address, size })?;
        let map = match fd {
            None => None,
            Some((file, offset)) => {
                let len = usize::try_from(size).map_err(|_| MapError::TooLarge(size))?;
                // Touching a mapping beyond the end of its file raises
                // SIGBUS: refuse a region the file does not hold.
                let file_len = file.metadata().map_err(MapError::File)?.len();
                if offset.checked_add(size).is_none_or(|e| e > file_len) {
                    return Err(MapError::BeyondFile {
                        offset,
                        size,
                        file_len,
                    });
                }
                let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
                let m = MmapRegion::build(
                    Some(FileOffset::new(file, offset)),
                    len,
                    prot,
                    libc::MAP_SHARED,
                )
                .map_err(|source| MapError::Mmap {
                    size,
                    offset,
                    source,
                })?;
                Some(m)
            }
        };
        let mut regions = self.regions.write().unwrap_or_else(lock_err);
        if regions.len() >= MAX_REGIONS {
            return Err(MapError::TooMany);
        }
        // Regions are sorted and disjoint: only the neighbours can overlap.
        let at = regions.partition_point(|r| r.start < address);
        let before = at.checked_sub(1).map(|i| &regions[i]);
        if let Some(o) = [before, regions.get(at)]
            .into_iter()
            .flatten()
            .find(|r| r.start <= end && address <= r.end)
        {
            return Err(MapError::Overlap {
                start: address,
                end,
                other_start: o.start,
                other_end: o.end,
            });
        }
        regions.insert(
            at,
            Region {
                start: address,
                end,
                read,
                write,
                map,
            },
        );
        debug!(
            "DMA_MAP [{address:#x}, {end:#x}] {}{}{}",
            if read { "r" } else { "-" },
            if write { "w" } else { "-" },
            if regions[at].map.is_some() {
                ""
            } else {
                " (no file)"
            }
        );
        Ok(())
    }

    /// Removes the regions inside `[address, address + size)`, waiting for
    /// accesses in progress; returns how many. A region that is only
    /// partly inside is an error and nothing is removed.
    pub fn unmap(&self, address: u64, size: u64) -> Result<usize, MapError> {
        let end = size
            .checked_sub(1)
            .and_then(|s| address.checked_add(s))
            .ok_or(MapError::BadRange { address, size })?;
        let mut regions = self.regions.write().unwrap_or_else(lock_err);
        if let Some(o) = regions
            .iter()
            .find(|r| r.start <= end && address <= r.end && (r.start < address || r.end > end))
        {
            return Err(MapError::Split {
                start: address,
                end,
                other_start: o.start,
                other_end: o.end,
            });
        }
        let before = regions.len();
        regions.retain(|r| r.end < address || r.start > end);
        debug!("DMA_UNMAP [{address:#x}, {end:#x}]");
        Ok(before - regions.len())
    }

    /// Removes every region (DMA_UNMAP_ALL, QEMU gone).
    pub fn clear(&self) {
        self.regions.write().unwrap_or_else(lock_err).clear();
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.read().unwrap_or_else(lock_err).len()
    }

    /// Whether no region is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read-locks the table; DMA_UNMAP waits until the view is dropped.
    pub fn view(&self) -> RamView<'_> {
        RamView {
            regions: self.regions.read().unwrap_or_else(lock_err),
        }
    }
}

impl RamView<'_> {
    fn region(&self, addr: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.end < addr);
        self.regions.get(i).filter(|r| r.start <= addr)
    }

    /// How many bytes from `addr` (at most `len`) lie in regions that allow
    /// `write` (or read) access, whether or not they have a file.
    pub fn permitted(&self, addr: u64, len: u64, write: bool) -> u64 {
        let mut done = 0;
        while done < len {
            let Some(at) = addr.checked_add(done) else {
                break;
            };
            match self.region(at) {
                Some(r) if (if write { r.write } else { r.read }) => {
                    done += (r.end - at).saturating_add(1).min(len - done);
                }
                _ => break,
            }
        }
        done
    }

    /// Copies guest memory at `addr` into `buf`. On failure returns how
    /// many bytes were copied: the byte after them is not readable memory.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), usize> {
        self.access(addr, buf.len(), false, |slice, off| {
            slice.copy_to(&mut buf[off..off + slice.len()]);
        })
    }

    /// Copies `buf` into guest memory at `addr`; like `read` on failure.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), usize> {
        self.access(addr, buf.len(), true, |slice, off| {
            slice.copy_from(&buf[off..off + slice.len()]);
        })
    }

    /// Runs `f(slice, offset)` on the mapped pieces of `[addr, addr + len)`
    /// in order, stopping at the first byte that is not mapped memory
    /// allowing the access.
    fn access(
        &self,
        addr: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(vm_memory::VolatileSlice<'_, ()>, usize),
    ) -> Result<(), usize> {
        let mut done = 0usize;
        while done < len {
            let Some(at) = addr.checked_add(done as u64) else {
                return Err(done);
            };
            let Some(r) = self.region(at) else {
                return Err(done);
            };
            let allowed = if write { r.write } else { r.read };
            let Some(map) = r.map.as_ref().filter(|_| allowed) else {
                return Err(done);
            };
            let off = (at - r.start) as usize;
            let n = (len - done).min(map.size() - off);
            let slice = map.get_slice(off, n).map_err(|_| done)?;
            f(slice, done);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A memfd-like file of `size` bytes.
    pub fn file(size: u64) -> File {
        let f = tempfile_in_tmp();
        f.set_len(size).unwrap();
        f
    }

    fn tempfile_in_tmp() -> File {
        // An anonymous file: created and unlinked at once.
        let path = std::env::temp_dir().join(format!(
            "dma-test-device-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn accesses_cross_adjacent_regions_and_stop_at_holes() {
        let ram = Ram::default();
        let f = file(0x4000);
        ram.map(
            0x10000,
            0x2000,
            Some((f.try_clone().unwrap(), 0)),
            true,
            true,
        )
        .unwrap();
        ram.map(
            0x12000,
            0x1000,
            Some((f.try_clone().unwrap(), 0x3000)),
            true,
            true,
        )
        .unwrap();
        let v = ram.view();
        v.write(0x11ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        v.read(0x11ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        // The second region is the file's last page.
        use std::os::unix::fs::FileExt;
        let mut fb = [0u8; 2];
        f.read_exact_at(&mut fb, 0x3000).unwrap();
        assert_eq!(fb, [3, 4]);
        assert_eq!(v.read(0x12ffe, &mut [0u8; 8]), Err(2));
        assert_eq!(v.write(0xfff0, &[0u8; 0x20]), Err(0));
        assert_eq!(v.permitted(0x10000, 0x5000, true), 0x3000);
        assert_eq!(v.permitted(u64::MAX, 2, false), 0);
    }

    #[test]
    fn permissions_and_fileless_regions() {
        let ram = Ram::default();
        ram.map(0x1000, 0x1000, Some((file(0x1000), 0)), true, false)
            .unwrap();
        ram.map(0x2000, 0x1000, None, true, true).unwrap();
        let v = ram.view();
        assert_eq!(v.write(0x1000, &[1]), Err(0));
        assert!(v.read(0x1000, &mut [0u8; 16]).is_ok());
        assert_eq!(v.permitted(0x1000, 0x2000, false), 0x2000);
        assert_eq!(v.permitted(0x1000, 0x2000, true), 0);
        // Permitted by the table, but no bytes to reach.
        assert_eq!(v.read(0x1ff0, &mut [0u8; 0x20]), Err(0x10));
    }

    #[test]
    fn bad_maps_and_unmaps_are_refused() {
        let ram = Ram::default();
        assert!(matches!(
            ram.map(0, 0, None, true, true),
            Err(MapError::BadRange { .. })
        ));
        assert!(matches!(
            ram.map(u64::MAX, 2, None, true, true),
            Err(MapError::BadRange { .. })
        ));
        ram.map(0x1000, 0x2000, None, true, true).unwrap();
        assert!(matches!(
            ram.map(0x2000, 0x1000, None, true, true),
            Err(MapError::Overlap { .. })
        ));
        assert!(matches!(
            ram.unmap(0x1000, 0x1000),
            Err(MapError::Split { .. })
        ));
        assert_eq!(ram.len(), 1);
        assert_eq!(ram.unmap(0, 0x10000).unwrap(), 1);
        assert!(ram.is_empty());
        // A region the file does not hold would SIGBUS when touched.
        for (offset, size) in [(0, 0x2000), (0x1000, 0x1000), (u64::MAX, 0x1000)] {
            assert!(matches!(
                ram.map(0, size, Some((file(0x1000), offset)), true, true),
                Err(MapError::BeyondFile { .. })
            ));
        }
        assert!(ram.is_empty());
    }
}
