// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a VMM adds to pass a device through behind vhost-device-iommu,
//! to copy into your VMM (docs/vmm-integration.md explains each step):
//!
//! 1. open the device's VFIO container (your VMM already does);
//! 2. tell the daemon what the host IOMMU imposes on the endpoint, before
//!    the guest boots (`VfioMapper::host_constraints`, then
//!    `set_host_constraints`);
//! 3. build the guest-physical -> host-virtual table of guest RAM;
//! 4. register a mapper for the endpoint with a `Shadow`;
//! 5. follow the daemon's event stream as a SYNC subscriber, forever:
//!    each change is applied to the host IOMMU, then acknowledged, so the
//!    guest's UNMAP completes only once the device cannot reach the memory;
//!    when the daemon restarts, reconnect: its replay resynchronises;
//! 6. for devices your VMM emulates, translate through the same client
//!    (`platform::Remapper`, or `translate_with` around each DMA).
//!
//! This example owns a stand-in for guest RAM (anonymous memory); your
//! VMM uses its own regions.
//!
//! ```text
//! passthrough --control-socket /run/viommu.ctl --device 0000:01:00.0 --endpoint 0x100 \
//!     [--ram-mib 1024] [--host-reserved 0xfed00000-0xfedfffff] [--host-page-sizes 0x40201000]
//! ```

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc, Mutex},
    thread,
    time::Duration,
};

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use viommu::{wire::VIRTIO_IOMMU_RESV_MEM_T_RESERVED, ReservedRegion};
use viommu_client::{
    mappers::VfioMapper,
    platform::Remapper,
    shadow::{follow, GuestRam, RamRegion, Shadow},
    Client, Error, Options, Subscription,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

struct Args {
    control: PathBuf,
    device: String,
    endpoint: u32,
    ram_mib: u64,
    reserved: Vec<ReservedRegion>,
    page_sizes: u64,
}

fn num(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("`{s}`: {e}"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        control: PathBuf::new(),
        device: String::new(),
        endpoint: 0,
        ram_mib: 1024,
        reserved: Vec::new(),
        page_sizes: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--control-socket" => a.control = v.into(),
            "--device" => a.device = v,
            "--endpoint" => a.endpoint = u32::try_from(num(&v)?).map_err(|e| e.to_string())?,
            "--ram-mib" => a.ram_mib = num(&v)?,
            "--host-page-sizes" => a.page_sizes = num(&v)?,
            "--host-reserved" => {
                let (s, e) = v.split_once('-').ok_or("--host-reserved START-END")?;
                a.reserved.push(ReservedRegion {
                    start: num(s)?,
                    end: num(e)?,
                    subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
                });
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.device.is_empty() || a.control.as_os_str().is_empty() {
        return Err("--control-socket and --device are required".into());
    }
    Ok(a)
}

fn run(a: &Args) -> Result<(), String> {
    // 1. The device in a VFIO container of its own (one per endpoint, as
    //    cloud-hypervisor does: the shadow maps each IOVA once per
    //    endpoint).
    let container = Arc::new(VfioContainer::new(None).map_err(|e| e.to_string())?);
    let ops: Arc<dyn VfioOps> = container.clone();
    let sysfs = PathBuf::from("/sys/bus/pci/devices").join(&a.device);
    let _device = VfioDevice::new(&sysfs, ops, false).map_err(|e| e.to_string())?;
    // What its host IOMMU cannot map (IOVA holes, page sizes), plus any
    // given on the command line.
    let mut host = VfioMapper::host_constraints(&container).map_err(|e| e.to_string())?;
    host.regions.extend(a.reserved.iter().copied());
    if a.page_sizes != 0 {
        host.page_size_mask = a.page_sizes;
    }

    // 3. Guest RAM and its table (here one region at guest-physical 0).
    let size = a.ram_mib << 20;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|e| e.to_string())?;
    let hva = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| e.to_string())? as u64;
    let ram =
        Arc::new(GuestRam::new(vec![RamRegion { gpa: 0, size, hva }]).map_err(|e| e.to_string())?);

    // 4. The shadow, with the device's mapper.
    let shadow = Mutex::new(Shadow::new(ram.clone()));
    shadow
        .lock()
        .map_err(|_| "poisoned")?
        .register(a.endpoint, Arc::new(VfioMapper::new(container, ram)))
        .map_err(|e| e.to_string())?;

    let stop = AtomicBool::new(false);
    loop {
        let client = match Client::connect(
            &a.control,
            Options {
                cache: true,
                subscribe: Some(Subscription::Sync),
            },
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                eprintln!("passthrough: {e}; retrying");
                thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        // 2. Host constraints (again after a daemon restart: they are not
        //    part of its saved state).
        let added = client
            .set_host_constraints(a.endpoint, host.page_size_mask, &host.regions)
            .map_err(|e| format!("host constraints refused: {e}"))?;
        println!("passthrough: PROBE of {:#x} adds {added:x?}", a.endpoint);
        // 6. An emulated device would translate like this.
        let _emulated = Remapper::new(client.clone()).endpoint(a.endpoint + 1);

        // 5. Follow until the daemon goes away, then reconnect.
        match follow(&shadow, &client, &stop, |e| eprintln!("passthrough: {e}")) {
            Ok(()) => return Ok(()),
            Err(Error::Disconnected) => {
                eprintln!("passthrough: the daemon went away; reconnecting");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    match parse().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passthrough: {e}");
            ExitCode::FAILURE
        }
    }
}
