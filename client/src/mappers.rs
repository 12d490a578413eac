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
        vfio_iommu_type1_dma_map, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
    };
    use vfio_ioctls::VfioContainer;
    use vmm_sys_util::ioctl::ioctl_with_ref;

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
        iommu_ioas_map, iommu_ioas_unmap, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
    };
    use iommufd_ioctls::IommuFd;

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
