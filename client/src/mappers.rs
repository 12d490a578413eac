// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`DmaMapper`]s on the kernel's interfaces: a VFIO type1 container
//! (`VFIO_IOMMU_MAP_DMA` / `VFIO_IOMMU_UNMAP_DMA`, feature `vfio`) and an
//! iommufd IOAS (`IOMMU_IOAS_MAP` / `IOMMU_IOAS_UNMAP` at fixed IOVAs,
//! feature `iommufd`).
//!
//! Each holds what the VMM already opened (the container the device's
//! group is in, or the iommufd and the IOAS the device is attached to)
//! and the VMM's [`GuestRam`] table to find the host address of a
//! guest-physical one. As in cloud-hypervisor, give each passed-through
//! endpoint a container or IOAS of its own: the shadow maps the same
//! IOVA once per endpoint.
//!
//! The host address range must stay mapped in the VMM for as long as the
//! host IOMMU maps it: the VMM unregisters the endpoint (which unmaps
//! everything) before it unmaps guest RAM.

use std::io;

#[cfg(any(feature = "vfio", feature = "iommufd", test))]
use crate::shadow::GuestRam;
use crate::shadow::{DmaMapper, Prot};

/// The host constraints of an IOMMU whose usable IOVA ranges are
/// `usable` (inclusive, any order): the holes between them as reserved
/// regions, and the page sizes `page_size_mask`; what
/// [`crate::Client::set_host_constraints`] takes.
pub fn constraints_from_ranges(
    mut usable: Vec<(u64, u64)>,
    page_size_mask: u64,
) -> io::Result<viommu::HostConstraints> {
    usable.sort_unstable();
    let mut regions = Vec::new();
    let mut next = Some(0u64);
    for (start, end) in usable {
        if start > end {
            return Err(io::Error::other(format!(
                "the host reports an empty IOVA range {start:#x}-{end:#x}"
            )));
        }
        if let Some(n) = next {
            if start > n {
                regions.push(hole(n, start - 1));
            }
        }
        next = match next {
            Some(n) if end < n => Some(n),
            _ => end.checked_add(1),
        };
    }
    if let Some(n) = next {
        regions.push(hole(n, u64::MAX));
    }
    if regions.len() > viommu::host::MAX_HOST_REGIONS {
        return Err(io::Error::other(format!(
            "the host reports {} IOVA holes; at most {} can be given",
            regions.len(),
            viommu::host::MAX_HOST_REGIONS
        )));
    }
    Ok(viommu::HostConstraints {
        page_size_mask,
        regions,
    })
}

fn hole(start: u64, end: u64) -> viommu::ReservedRegion {
    viommu::ReservedRegion {
        start,
        end,
        subtype: viommu::wire::VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
    }
}

#[cfg(any(feature = "vfio", feature = "iommufd", test))]
fn not_ram(gpa: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("guest-physical {gpa:#x} ({size:#x} bytes) is not in one RAM region"),
    )
}

#[cfg(feature = "vfio")]
pub use vfio::VfioMapper;

#[cfg(feature = "vfio")]
mod vfio {
    use std::{io, mem, sync::Arc};

    use vfio_bindings::bindings::vfio::{
        vfio_iommu_type1_dma_map, vfio_iommu_type1_info, VFIO_DMA_MAP_FLAG_READ,
        VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
        VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    };
    use vfio_ioctls::VfioContainer;
    use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_ref};

    use super::{not_ram, DmaMapper, GuestRam, Prot};

    // `_IO(VFIO_TYPE, VFIO_BASE + 13)`: vfio-ioctls maps every range
    // read-write, so the map with the guest's access is issued here.
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, u32::from(b';'), 100 + 13);

    /// The mappings of a VFIO type1 container (the legacy interface every
    /// kernel with VFIO has).
    pub struct VfioMapper {
        container: Arc<VfioContainer>,
        ram: Arc<GuestRam>,
    }

    impl VfioMapper {
        /// A mapper on `container` (which holds the device's group and
        /// has its IOMMU type set, as `VfioDevice::new` leaves it).
        pub fn new(container: Arc<VfioContainer>, ram: Arc<GuestRam>) -> VfioMapper {
            VfioMapper { container, ram }
        }

        /// The argument of `VFIO_IOMMU_MAP_DMA`.
        pub(crate) fn map_arg(
            iova: u64,
            hva: u64,
            size: u64,
            prot: Prot,
        ) -> vfio_iommu_type1_dma_map {
            let mut flags = 0;
            if prot.read {
                flags |= VFIO_DMA_MAP_FLAG_READ;
            }
            if prot.write {
                flags |= VFIO_DMA_MAP_FLAG_WRITE;
            }
            vfio_iommu_type1_dma_map {
                argsz: mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
                flags,
                vaddr: hva,
                iova,
                size,
            }
        }
    }

    // `_IO(VFIO_TYPE, VFIO_BASE + 12)`: vfio-ioctls keeps its own private.
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, u32::from(b';'), 100 + 12);

    impl VfioMapper {
        /// What the host IOMMU of `container` imposes on its devices
        /// (`VFIO_IOMMU_GET_INFO`: the holes between its
        /// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE` ranges, and
        /// `iova_pgsizes`), for [`crate::Client::set_host_constraints`].
        pub fn host_constraints(container: &VfioContainer) -> io::Result<viommu::HostConstraints> {
            let head = mem::size_of::<vfio_iommu_type1_info>();
            let mut argsz = head;
            // u64 words: the kernel's structures are 8-byte aligned.
            let mut buf: Vec<u64>;
            loop {
                buf = vec![0; argsz.div_ceil(8)];
                // `argsz` is the first (little-endian) word; the rest is
                // zero.
                buf[0] = argsz as u64;
                // SAFETY: an ioctl on the container's open descriptor; the
                // kernel writes at most `argsz` bytes, which `buf` holds,
                // and the result is checked.
                let ret = unsafe {
                    ioctl_with_mut_ptr(container, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr())
                };
                if ret < 0 {
                    return Err(io::Error::last_os_error());
                }
                let needed = (buf[0] & 0xffff_ffff) as usize;
                if needed <= argsz || argsz > 64 * 1024 {
                    break;
                }
                argsz = needed;
            }
            let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_le_bytes()).collect();
            let u32_at = |o: usize| {
                bytes
                    .get(o..o + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            };
            let u64_at = |o: usize| {
                bytes
                    .get(o..o + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            };
            let flags = u32_at(4).unwrap_or(0);
            let pgsizes = if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
                u64_at(8).unwrap_or(0)
            } else {
                0
            };
            let mut usable = Vec::new();
            let mut at = if flags & VFIO_IOMMU_INFO_CAPS != 0 {
                u32_at(16).unwrap_or(0) as usize
            } else {
                0
            };
            // A capability chain that loops or leaves the buffer ends.
            let mut hops = 0;
            while at >= head && hops < 64 {
                hops += 1;
                let (Some(id_version), Some(next)) = (u32_at(at), u32_at(at + 4)) else {
                    break;
                };
                if id_version & 0xffff == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                    let n = u32_at(at + 8).unwrap_or(0) as usize;
                    for i in 0..n {
                        let o = at + 16 + 16 * i;
                        match (u64_at(o), u64_at(o + 8)) {
                            (Some(s), Some(e)) => usable.push((s, e)),
                            _ => break,
                        }
                    }
                }
                at = next as usize;
            }
            if usable.is_empty() {
                // No range capability: the whole space is usable.
                usable.push((0, u64::MAX));
            }
            super::constraints_from_ranges(usable, pgsizes)
        }
    }

    impl DmaMapper for VfioMapper {
        fn map(&self, iova: u64, gpa: u64, size: u64, prot: Prot) -> io::Result<()> {
            let hva = self
                .ram
                .host_address(gpa, size)
                .ok_or_else(|| not_ram(gpa, size))?;
            let arg = Self::map_arg(iova, hva, size, prot);
            // SAFETY: an ioctl on the container's open descriptor with a
            // fully initialised argument that outlives the call; the
            // kernel only reads it. The host range is guest RAM that the
            // VMM keeps mapped while it is mapped here (module docs).
            let ret =
                unsafe { ioctl_with_ref(self.container.as_ref(), VFIO_IOMMU_MAP_DMA(), &arg) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            let size =
                usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.container
                .vfio_dma_unmap(iova, size)
                .map_err(io::Error::other)
        }
    }
}

#[cfg(feature = "iommufd")]
pub use self::iommufd::IommufdMapper;

#[cfg(feature = "iommufd")]
mod iommufd {
    use std::{io, mem, sync::Arc};

    use iommufd_bindings::iommufd::{
        iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
    };
    use iommufd_ioctls::IommuFd;
    use vmm_sys_util::ioctl::ioctl_with_mut_ref;

    use super::{not_ram, DmaMapper, GuestRam, Prot};

    /// The mappings of one iommufd IOAS, at fixed IOVAs.
    pub struct IommufdMapper {
        iommufd: Arc<IommuFd>,
        ioas_id: u32,
        ram: Arc<GuestRam>,
    }

    impl IommufdMapper {
        /// A mapper on the IOAS `ioas_id` of `iommufd` (the device is
        /// attached to it, `VFIO_DEVICE_ATTACH_IOMMUFD_PT`).
        pub fn new(iommufd: Arc<IommuFd>, ioas_id: u32, ram: Arc<GuestRam>) -> IommufdMapper {
            IommufdMapper {
                iommufd,
                ioas_id,
                ram,
            }
        }

        /// The argument of `IOMMU_IOAS_MAP`.
        pub(crate) fn map_arg(
            ioas_id: u32,
            iova: u64,
            hva: u64,
            size: u64,
            prot: Prot,
        ) -> iommu_ioas_map {
            let mut flags = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
            if prot.read {
                flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
            }
            if prot.write {
                flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
            }
            iommu_ioas_map {
                size: mem::size_of::<iommu_ioas_map>() as u32,
                flags,
                ioas_id,
                __reserved: 0,
                user_va: hva,
                length: size,
                iova,
            }
        }
    }

    // `_IO(IOMMUFD_TYPE, 0x84)`: not wrapped by iommufd-ioctls.
    vmm_sys_util::ioctl_io_nr!(IOMMU_IOAS_IOVA_RANGES, u32::from(b';'), 0x84);

    impl IommufdMapper {
        /// What the host IOMMU imposes on the devices attached to the IOAS
        /// `ioas_id` (`IOMMU_IOAS_IOVA_RANGES`: the holes between its
        /// allowed ranges, and its IOVA alignment as the smallest page),
        /// for [`crate::Client::set_host_constraints`].
        pub fn host_constraints(
            iommufd: &IommuFd,
            ioas_id: u32,
        ) -> io::Result<viommu::HostConstraints> {
            let mut ranges: Vec<iommu_iova_range> = Vec::new();
            let mut arg;
            loop {
                arg = iommu_ioas_iova_ranges {
                    size: mem::size_of::<iommu_ioas_iova_ranges>() as u32,
                    ioas_id,
                    num_iovas: ranges.len() as u32,
                    __reserved: 0,
                    allowed_iovas: ranges.as_mut_ptr() as u64,
                    out_iova_alignment: 0,
                };
                // SAFETY: an ioctl on the open iommufd; the kernel writes
                // at most `num_iovas` entries at `allowed_iovas`, which
                // `ranges` holds, and the result is checked.
                let ret =
                    unsafe { ioctl_with_mut_ref(iommufd, IOMMU_IOAS_IOVA_RANGES(), &mut arg) };
                if ret == 0 {
                    break;
                }
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc_emsgsize()) || arg.num_iovas > 4096 {
                    return Err(err);
                }
                ranges = vec![iommu_iova_range::default(); arg.num_iovas as usize];
            }
            ranges.truncate(arg.num_iovas as usize);
            let align = arg.out_iova_alignment.max(1);
            let mask = if align.is_power_of_two() {
                !(align - 1)
            } else {
                0
            };
            super::constraints_from_ranges(ranges.iter().map(|r| (r.start, r.last)).collect(), mask)
        }
    }

    fn libc_emsgsize() -> i32 {
        90
    }

    impl DmaMapper for IommufdMapper {
        fn map(&self, iova: u64, gpa: u64, size: u64, prot: Prot) -> io::Result<()> {
            let hva = self
                .ram
                .host_address(gpa, size)
                .ok_or_else(|| not_ram(gpa, size))?;
            self.iommufd
                .map_iommu_ioas(&Self::map_arg(self.ioas_id, iova, hva, size, prot))
                .map_err(io::Error::other)
        }

        fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            let mut arg = iommu_ioas_unmap {
                size: mem::size_of::<iommu_ioas_unmap>() as u32,
                ioas_id: self.ioas_id,
                iova,
                length: size,
            };
            self.iommufd
                .unmap_iommu_ioas(&mut arg)
                .map_err(io::Error::other)?;
            // The kernel says how much it unmapped: all of it, or the
            // device may still reach the rest.
            if arg.length != size {
                return Err(io::Error::other(format!(
                    "IOMMU_IOAS_UNMAP at {iova:#x} removed {:#x} of {size:#x} bytes",
                    arg.length
                )));
            }
            Ok(())
        }
    }
}

/// A mapper that records nothing and maps nothing: for endpoints whose
/// DMA the VMM checks itself, and for tests.
#[derive(Clone, Debug, Default)]
pub struct NullMapper;

impl DmaMapper for NullMapper {
    fn map(&self, _: u64, _: u64, _: u64, _: Prot) -> io::Result<()> {
        Ok(())
    }
    fn unmap(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[cfg(feature = "vfio")]
    #[test]
    fn vfio_maps_carry_the_guest_access() {
        use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
        let ro = VfioMapper::map_arg(
            0x1000,
            0x7f00_0000,
            0x2000,
            Prot {
                read: true,
                write: false,
            },
        );
        assert_eq!(ro.flags, VFIO_DMA_MAP_FLAG_READ);
        assert_eq!(
            (ro.iova, ro.vaddr, ro.size, ro.argsz),
            (0x1000, 0x7f00_0000, 0x2000, 32)
        );
        let rw = VfioMapper::map_arg(0, 0, 0x1000, Prot::RW);
        assert_eq!(rw.flags, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
        // The ioctl number of linux/vfio.h: _IO(';', 113).
        assert_eq!(vfio::VFIO_IOMMU_MAP_DMA(), 0x3b71);
    }

    #[cfg(feature = "iommufd")]
    #[test]
    fn iommufd_maps_are_at_fixed_iovas_with_the_guest_access() {
        use iommufd_bindings::iommufd::*;
        let wo = IommufdMapper::map_arg(
            3,
            0x1000,
            0x7f00_0000,
            0x2000,
            Prot {
                read: false,
                write: true,
            },
        );
        assert_eq!(
            wo.flags,
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE
        );
        assert_eq!(
            (wo.ioas_id, wo.iova, wo.user_va, wo.length, wo.size),
            (3, 0x1000, 0x7f00_0000, 0x2000, 40)
        );
    }

    /// The RAM check both mappers make before their ioctl.
    struct NullMapperCheck(Arc<GuestRam>);
    impl DmaMapper for NullMapperCheck {
        fn map(&self, _: u64, gpa: u64, size: u64, _: Prot) -> io::Result<()> {
            self.0
                .host_address(gpa, size)
                .map(|_| ())
                .ok_or_else(|| not_ram(gpa, size))
        }
        fn unmap(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn host_holes_are_the_complement_of_the_usable_ranges() {
        // A 39-bit IOMMU with the x86 MSI window cut out.
        let c = constraints_from_ranges(
            vec![(0xfef0_0000, (1 << 39) - 1), (0, 0xfedf_ffff)],
            0x4020_1000,
        )
        .unwrap();
        let got: Vec<(u64, u64)> = c.regions.iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(got, [(0xfee0_0000, 0xfeef_ffff), (1 << 39, u64::MAX)]);
        assert_eq!(c.page_size_mask, 0x4020_1000);
        // Everything usable: no hole; nested and touching ranges.
        assert!(constraints_from_ranges(vec![(0, u64::MAX)], 0)
            .unwrap()
            .regions
            .is_empty());
        let c = constraints_from_ranges(
            vec![(0x1000, 0x8fff), (0x2000, 0x2fff), (0x9000, u64::MAX)],
            0,
        )
        .unwrap();
        assert_eq!(c.regions.len(), 1);
        assert_eq!((c.regions[0].start, c.regions[0].end), (0, 0xfff));
        assert!(constraints_from_ranges(vec![(5, 1)], 0).is_err());
    }

    #[test]
    fn mappers_refuse_what_is_not_in_one_ram_region() {
        let ram = Arc::new(
            GuestRam::new(vec![crate::shadow::RamRegion {
                gpa: 0,
                size: 0x10000,
                hva: 0x7f00_0000,
            }])
            .unwrap(),
        );
        let err = NullMapperCheck(ram).map(0x8000, 0x8000, 0x10000, Prot::RW);
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
