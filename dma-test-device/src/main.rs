// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `dma-test-device`: serves the DMA test device to QEMU's `vfio-user-pci`
//! on a Unix socket (rust-vmm `vfio_user` server side).

use std::{fs::File, io, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use dma_test_device::{
    device::{Device, IommuLink, Translation, OPERATION_TIMEOUT},
    pci::{ConfigSpace, CONFIG_SIZE},
    regs::BAR0_SIZE,
};
use log::{error, info, warn};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

/// A PCI DMA test device for QEMU's vfio-user-pci whose DMA addresses are
/// translated by vhost-device-iommu (--control-socket) or, without it, by
/// QEMU (the addresses of its DMA_MAP messages).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// vfio-user socket to create; QEMU connects to it
    /// (`-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":PATH}}'`)
    #[arg(short, long, value_name = "PATH")]
    socket_path: PathBuf,

    /// Control socket of the vhost-device-iommu daemon: every DMA address
    /// is an IOVA translated through it. Without it, DMA addresses are
    /// those of QEMU's DMA_MAP messages (guest-physical, or IOVAs when
    /// QEMU's own virtio-iommu translates the device)
    #[arg(long, value_name = "PATH", requires = "endpoint")]
    control_socket: Option<PathBuf>,

    /// The device's endpoint ID in the daemon: its PCI requester ID, as a
    /// number (`0x28`) or a PCI address (`00:05.0`)
    #[arg(long, value_name = "ID", value_parser = parse_endpoint, requires = "control_socket")]
    endpoint: Option<u32>,

    /// Do not cache translations: every DMA chunk asks the daemon, and
    /// the guest's UNMAP no longer waits for DMA in flight (for
    /// measurements, not for guests to rely on)
    #[arg(long)]
    no_cache: bool,

    /// Longest a PASID operation may take, from its CMD write, while it
    /// waits for the guest to answer page requests; past it the operation
    /// stops with a fault (FAULT_INFO reason 4)
    #[arg(long, value_name = "MS", default_value_t = OPERATION_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    operation_timeout_ms: u64,

    /// Serve QEMU again after it disconnects, instead of exiting
    #[arg(long)]
    persistent: bool,
}

/// `0x28`, `40`, `00:05.0` or `0000:00:05.0` -> requester ID.
fn parse_endpoint(s: &str) -> Result<u32, String> {
    let bad = || format!("'{s}': expected a number or a PCI address BUS:DEV.FN");
    if let Some((rest, func)) = s.rsplit_once('.') {
        let parts: Vec<&str> = rest.split(':').collect();
        let (bus, dev) = match parts.as_slice() {
            [bus, dev] | [_, bus, dev] => (*bus, *dev),
            _ => return Err(bad()),
        };
        let n = |t: &str, max: u32| {
            u32::from_str_radix(t, 16)
                .ok()
                .filter(|&v| v <= max)
                .ok_or_else(bad)
        };
        return Ok(n(bus, 0xff)? << 8 | n(dev, 0x1f)? << 3 | n(func, 7)?);
    }
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    v.map_err(|_| bad())
}

/// DMA_UNMAP flags meaning "every region": QEMU sends Linux's
/// `VFIO_DMA_UNMAP_FLAG_ALL` (bit 1, address and size 0), which
/// `vfio_user` 0.1.7 names `GET_DIRTY_PAGE_INFO`; its own `UNMAP_ALL` is
/// bit 2. Dirty-page tracking is not offered, so both mean "all".
const UNMAP_ALL: DmaUnmapFlags = DmaUnmapFlags::GET_DIRTY_PAGE_INFO.union(DmaUnmapFlags::UNMAP_ALL);

struct Backend {
    device: Device,
    config: ConfigSpace,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Checks that `[offset, offset + len)` lies inside a region of `size`.
fn within(region: u32, offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(invalid(format!(
            "access {offset:#x}+{len:#x} outside region {region} ({size:#x} bytes)"
        ))),
    }
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                within(region, offset, data.len(), CONFIG_SIZE)?;
                self.config.read(offset, data);
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                within(region, offset, data.len(), BAR0_SIZE)?;
                self.device.bar_read(offset, data);
            }
            _ => return Err(invalid(format!("read of region {region}, which is empty"))),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                within(region, offset, data.len(), CONFIG_SIZE)?;
                self.config.write(offset, data);
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                within(region, offset, data.len(), BAR0_SIZE)?;
                self.device.bar_write(offset, data);
            }
            _ => return Err(invalid(format!("write of region {region}, which is empty"))),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        let read = flags.contains(DmaMapFlags::READ);
        let write = flags.contains(DmaMapFlags::WRITE);
        self.device
            .ram()
            .map(address, size, fd.map(|f| (f, offset)), read, write)
            .map_err(|e| {
                warn!("DMA_MAP refused: {e}");
                e.into()
            })
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        if flags.intersects(UNMAP_ALL) {
            self.device.ram().clear();
            return Ok(());
        }
        self.device
            .ram()
            .unmap(address, size)
            .map(|_| ())
            .map_err(|e| {
                warn!("DMA_UNMAP refused: {e}");
                e.into()
            })
    }

    fn reset(&mut self) -> io::Result<()> {
        info!("device reset");
        self.device.reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        _start: u32,
        count: u32,
        _fds: Vec<File>,
    ) -> io::Result<()> {
        // The device has no interrupt; QEMU only ever disables them.
        if count > 0 {
            return Err(invalid(format!(
                "IRQ index {index}: the device has no interrupt"
            )));
        }
        Ok(())
    }
}

fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VFIO_PCI_BAR0_REGION_INDEX => BAR0_SIZE,
                VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE,
                _ => 0,
            };
            let flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    index,
                    flags,
                    size,
                    ..Default::default()
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: 0,
            count: 0,
        })
        .collect()
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let translation = match (&args.control_socket, args.endpoint) {
        (Some(socket), Some(endpoint)) => {
            match IommuLink::connect(socket.clone(), endpoint, !args.no_cache) {
                Ok(mut link) => {
                    link.operation_timeout = Duration::from_millis(args.operation_timeout_ms);
                    Translation::Iommu(link)
                }
                Err(e) => {
                    error!("control socket {}: {e}", socket.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => Translation::Direct,
    };
    let mode = match &translation {
        Translation::Iommu(_) => format!(
            "IOVAs of endpoint {:#x} translated by the daemon",
            args.endpoint.unwrap_or_default()
        ),
        Translation::Direct => "DMA_MAP addresses (no daemon)".to_string(),
    };
    let device = match Device::new(translation) {
        Ok(d) => d,
        Err(e) => {
            error!("cannot start the DMA worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::new(&args.socket_path, true, irqs(), regions()) {
        Ok(s) => s,
        Err(e) => {
            error!("vfio-user socket {}: {e}", args.socket_path.display());
            return ExitCode::FAILURE;
        }
    };
    info!(
        "listening on {}; DMA addresses: {mode}",
        args.socket_path.display()
    );
    let mut backend = Backend {
        device,
        config: ConfigSpace::default(),
    };
    loop {
        match server.run(&mut backend) {
            Ok(()) => info!("QEMU disconnected"),
            Err(e) => warn!("vfio-user connection ended: {e}"),
        }
        // Whatever QEMU lent is gone with it.
        backend.device.reset();
        backend.device.ram().clear();
        backend.config.reset();
        let (ignored, bad) = backend.device.counters();
        info!("{ignored} command(s) ignored while busy, {bad} malformed register access(es)");
        if !args.persistent {
            return ExitCode::SUCCESS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_numbers_or_pci_addresses() {
        assert_eq!(parse_endpoint("0x28"), Ok(0x28));
        assert_eq!(parse_endpoint("40"), Ok(40));
        assert_eq!(parse_endpoint("00:05.0"), Ok(0x28));
        assert_eq!(parse_endpoint("0000:01:00.1"), Ok(0x101));
        for bad in ["", "0x", "00:20.0", "00:05.8", "1:2:3:4.0", "zz", "00:05"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
