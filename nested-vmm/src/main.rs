// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `nested-vmm`: the VMM of a nested guest, for the guest tests that run
//! inside a test guest (ci/guest/nested-test.sh). In one process, as a
//! VMM would have them:
//!
//! - the nested guest's RAM (a shared file, 16 MiB at guest-physical 0);
//! - a vhost-user frontend to the daemon, and the nested guest's
//!   virtio-iommu driver on top of it (ATTACH, MAP, UNMAP, DETACH written
//!   into the request ring);
//! - a real device passed through: the test guest's `edu` bound to
//!   vfio-pci, in a VFIO type1 container or on an iommufd IOAS;
//! - `viommu-client`'s shadow layer following the daemon (SYNC) into that
//!   container or IOAS.
//!
//! `test` programs edu's DMA engine at IOVAs the nested guest mapped and
//! checks the bytes, then checks that the same DMA fails after UNMAP
//! (and goes through at IOVA = GPA once the endpoint is back in bypass);
//! it prints `VDI-RESULT PASS|FAIL <check>-<backend> <detail>` lines.
//! `bench N` times N guest MAP and UNMAP completions through the shadow,
//! then the same host map and unmap calls issued directly.
//!
//! Usage: nested-vmm test|bench N --backend vfio|iommufd|null --device BDF
//!        --endpoint ID --socket PATH --control PATH

#[path = "../../tests/common/driver.rs"]
mod driver;

use std::{
    fs::{self, File},
    io,
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use driver::{Buf, DriverRing, RingLayout, VIRTQ_AVAIL_F_NO_INTERRUPT};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vhost::{
    vhost_user::{
        message::{VhostUserHeaderFlag, VhostUserProtocolFeatures},
        Frontend, VhostUserFrontend,
    },
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use viommu::wire::*;
use viommu_client::{
    mappers::{IommufdMapper, VfioMapper},
    shadow::{follow, DmaMapper, GuestRam, Prot, RamRegion, Shadow},
    Client, Options, Subscription,
};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 16 << 20;
const REQUEST_RING: u64 = 0;
const EVENT_RING: u64 = 0x8000;
const REQ_AREA: u64 = 0x10000;
const REQ_SLOTS: u64 = 64;
const REQ_SLOT: u64 = 0x100;
/// Nested guest RAM the test's DMA uses.
const SRC_GPA: u64 = 0x20_0000;
const DST_GPA: u64 = 0x20_1000;
/// IOVAs the nested guest maps them at: below edu's 28-bit DMA mask.
const SRC_IOVA: u64 = 0x10_0000;
const DST_IOVA: u64 = 0x30_0000;
/// edu's DMA buffer, in its own DMA address space.
const EDU_BUF: u64 = 0x4_0000;
const LEN: u64 = 0x1000;
const DOMAIN: u32 = 1;
/// Where PROBE requests go, and the daemon's default `probe_size`.
const PROBE_AREA: u64 = 0x18000;
const PROBE_SIZE: usize = 512;
const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

struct Args {
    mode: String,
    count: usize,
    backend: String,
    device: String,
    endpoint: u32,
    socket: PathBuf,
    control: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("test or bench N")?;
    let count = if mode == "bench" {
        it.next()
            .and_then(|n| n.parse().ok())
            .ok_or("bench needs a count")?
    } else {
        0
    };
    let mut a = Args {
        mode,
        count,
        backend: "vfio".into(),
        device: "0000:00:04.0".into(),
        endpoint: 0x20,
        socket: "/tmp/nested/vhost.sock".into(),
        control: "/tmp/nested/ctl.sock".into(),
    };
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--backend" => a.backend = v,
            "--device" => a.device = v,
            "--endpoint" => {
                a.endpoint = u32::from_str_radix(v.trim_start_matches("0x"), 16)
                    .map_err(|e| format!("--endpoint: {e}"))?
            }
            "--socket" => a.socket = v.into(),
            "--control" => a.control = v.into(),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

/// The nested guest: its RAM, the frontend, and its driver's rings.
struct Nested {
    mem: GuestMemoryMmap,
    _fe: Frontend,
    rq: DriverRing,
    kick: EventFd,
    _calls: [EventFd; 2],
    next: u64,
}

impl Nested {
    fn boot(socket: &PathBuf) -> Result<Nested, String> {
        let path = std::env::temp_dir().join(format!("nested-ram-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = fs::remove_file(&path);
        file.set_len(MEM_SIZE).map_err(|e| e.to_string())?;
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| e.to_string())?;
        fn e(what: &'static str) -> impl Fn(vhost::Error) -> String {
            move |err| format!("vhost-user {what}: {err}")
        }
        let mut fe = Frontend::connect(socket, 2).map_err(e("connect"))?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_owner().map_err(e("SET_OWNER"))?;
        let features = fe.get_features().map_err(e("GET_FEATURES"))?;
        let proto = fe
            .get_protocol_features()
            .map_err(e("GET_PROTOCOL_FEATURES"))?;
        fe.set_features(features).map_err(e("SET_FEATURES"))?;
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        fe.set_protocol_features(proto & want)
            .map_err(e("SET_PROTOCOL_FEATURES"))?;
        let region = mem.find_region(GuestAddress(0)).ok_or("no region")?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).map_err(e("region"))?;
        fe.set_mem_table(&[info]).map_err(e("SET_MEM_TABLE"))?;
        let eventfd = || EventFd::new(0).map_err(|e| format!("eventfd: {e}"));
        let (k0, k1, c0, c1) = (eventfd()?, eventfd()?, eventfd()?, eventfd()?);
        let hva = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| e.to_string())? as u64;
        let (rq_layout, _) = RingLayout::at(REQUEST_RING, 64);
        let (eq_layout, _) = RingLayout::at(EVENT_RING, 16);
        let rq = DriverRing::new(&mem, rq_layout);
        let _eq = DriverRing::new(&mem, eq_layout);
        rq.set_avail_flags(&mem, VIRTQ_AVAIL_F_NO_INTERRUPT);
        for (q, (layout, (kick, call))) in [rq_layout, eq_layout]
            .into_iter()
            .zip([(&k0, &c0), (&k1, &c1)])
            .enumerate()
        {
            fe.set_vring_num(q, layout.size)
                .map_err(e("SET_VRING_NUM"))?;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: layout.size,
                    queue_size: layout.size,
                    flags: 0,
                    desc_table_addr: hva + layout.desc.0,
                    used_ring_addr: hva + layout.used.0,
                    avail_ring_addr: hva + layout.avail.0,
                    log_addr: None,
                },
            )
            .map_err(e("SET_VRING_ADDR"))?;
            fe.set_vring_base(q, 0).map_err(e("SET_VRING_BASE"))?;
            fe.set_vring_kick(q, kick).map_err(e("SET_VRING_KICK"))?;
            fe.set_vring_call(q, call).map_err(e("SET_VRING_CALL"))?;
            fe.set_vring_enable(q, true)
                .map_err(e("SET_VRING_ENABLE"))?;
        }
        Ok(Nested {
            mem,
            _fe: fe,
            rq,
            kick: k0,
            _calls: [c0, c1],
            next: 0,
        })
    }

    /// Sends one request (its device-readable part) and waits for its
    /// status, as the Linux driver does (spinning).
    fn request<T: ByteValued>(&mut self, req: &T) -> Result<u8, String> {
        let slot = REQ_AREA + (self.next % REQ_SLOTS) * REQ_SLOT;
        self.next += 1;
        let w = self.submit(slot, readable_part(req), REQ_TAIL_SIZE)?;
        Ok(w[0])
    }

    /// PROBE of `endpoint`: its RESV_MEM regions as (start, end).
    fn probe(&mut self, endpoint: u32) -> Result<Vec<(u64, u64)>, String> {
        let req = ProbeReq::new(endpoint);
        let w = self.submit(PROBE_AREA, req.as_slice(), PROBE_SIZE + REQ_TAIL_SIZE)?;
        if w[PROBE_SIZE] != VIRTIO_IOMMU_S_OK {
            return Err(format!("PROBE: status {}", w[PROBE_SIZE]));
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at + 4 <= PROBE_SIZE {
            let t = u16::from_le_bytes([w[at], w[at + 1]]) & 0xfff;
            let len = usize::from(u16::from_le_bytes([w[at + 2], w[at + 3]]));
            if t == 0 || at + 4 + len > PROBE_SIZE {
                break;
            }
            if t == VIRTIO_IOMMU_PROBE_T_RESV_MEM && len >= 20 {
                let word =
                    |o: usize| u64::from_le_bytes(w[o..o + 8].try_into().unwrap_or_default());
                out.push((word(at + 8), word(at + 16)));
            }
            at += 4 + len;
        }
        Ok(out)
    }

    /// One chain: `ro` then `wlen` device-writable bytes at `slot`;
    /// returns the writable bytes once the device used it.
    fn submit(&mut self, slot: u64, ro: &[u8], wlen: usize) -> Result<Vec<u8>, String> {
        let wo = slot + ro.len() as u64;
        let mem = &self.mem;
        mem.write_slice(ro, GuestAddress(slot))
            .map_err(|e| e.to_string())?;
        mem.write_slice(&vec![0xff; wlen], GuestAddress(wo))
            .map_err(|e| e.to_string())?;
        self.rq.add(
            mem,
            &[
                Buf {
                    addr: slot,
                    len: ro.len() as u32,
                    writable: false,
                },
                Buf {
                    addr: wo,
                    len: wlen as u32,
                    writable: true,
                },
            ],
        );
        self.rq.publish(mem);
        self.kick.write(1).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.rq.pop_used(mem).is_none() {
            if Instant::now() > deadline {
                return Err("request not completed within 30 s".into());
            }
            // Yield: the daemon and the shadow need a CPU to complete it
            // (on a small host, spinning alone starves them).
            thread::yield_now();
        }
        // The status is the first byte of the last four.
        let mut w = vec![0u8; wlen];
        mem.read_slice(&mut w, GuestAddress(wo))
            .map_err(|e| e.to_string())?;
        Ok(w)
    }

    fn expect_ok<T: ByteValued>(&mut self, what: &str, req: &T) -> Result<(), String> {
        match self.request(req)? {
            VIRTIO_IOMMU_S_OK => Ok(()),
            s => Err(format!("{what}: status {s}")),
        }
    }

    fn fill(&self, gpa: u64, byte: u8) {
        let _ = self
            .mem
            .write_slice(&vec![byte; LEN as usize], GuestAddress(gpa));
    }

    fn pattern(&self, gpa: u64, seed: u8) -> Vec<u8> {
        let p: Vec<u8> = (0..LEN)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect();
        let _ = self.mem.write_slice(&p, GuestAddress(gpa));
        p
    }

    fn read(&self, gpa: u64) -> Vec<u8> {
        let mut v = vec![0u8; LEN as usize];
        let _ = self.mem.read_slice(&mut v, GuestAddress(gpa));
        v
    }
}

/// edu's DMA engine through its VFIO device.
struct Edu {
    dev: VfioDevice,
}

impl Edu {
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.region_read(0, &mut b, off);
        u32::from_le_bytes(b)
    }

    fn w64(&self, off: u64, v: u64) {
        self.dev.region_write(0, &v.to_le_bytes(), off);
    }

    fn enable(&self) -> Result<(), String> {
        let ident = self.r32(0);
        if ident & 0xff != 0xed {
            return Err(format!("not an edu device (ident {ident:#x})"));
        }
        // Memory space and bus master (config region 7, COMMAND at 4).
        let mut cmd = [0u8; 2];
        self.dev.region_read(7, &mut cmd, 4);
        let v = u16::from_le_bytes(cmd) | 0x6;
        self.dev.region_write(7, &v.to_le_bytes(), 4);
        Ok(())
    }

    /// One DMA of `LEN` bytes: RAM at `iova` into edu's buffer
    /// (`to_device`), or the buffer out to `iova`. edu drops a DMA the
    /// IOMMU refuses without telling: the caller checks the bytes.
    fn dma(&self, iova: u64, to_device: bool) -> Result<(), String> {
        let (src, dst, cmd) = if to_device {
            (iova, EDU_BUF, 1)
        } else {
            (EDU_BUF, iova, 1 | 2)
        };
        self.w64(0x80, src);
        self.w64(0x88, dst);
        self.w64(0x90, LEN);
        self.w64(0x98, cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.r32(0x98) & 1 != 0 {
            if Instant::now() > deadline {
                return Err("edu DMA did not finish".into());
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

/// The passed-through device and its mapper.
/// `null` has no device and maps nothing (`bench` only): what the guest
/// request, the daemon and the shadow cost without a kernel call.
/// The device, its mapper, and what its host IOMMU imposes.
type Opened = (
    Option<Edu>,
    Arc<dyn DmaMapper>,
    Option<viommu::HostConstraints>,
);

fn open_device(args: &Args, ram: &Arc<GuestRam>) -> Result<Opened, String> {
    let sysfs = PathBuf::from("/sys/bus/pci/devices").join(&args.device);
    match args.backend.as_str() {
        "null" => Ok((None, Arc::new(viommu_client::mappers::NullMapper), None)),
        "vfio" => {
            let container =
                Arc::new(VfioContainer::new(None).map_err(|e| format!("VFIO container: {e}"))?);
            let ops: Arc<dyn VfioOps> = container.clone();
            let dev =
                VfioDevice::new(&sysfs, ops, false).map_err(|e| format!("VFIO device: {e}"))?;
            let host = VfioMapper::host_constraints(&container)
                .map_err(|e| format!("VFIO_IOMMU_GET_INFO: {e}"))?;
            Ok((
                Some(Edu { dev }),
                Arc::new(VfioMapper::new(container, ram.clone())),
                Some(host),
            ))
        }
        "iommufd" => {
            let iommufd =
                Arc::new(iommufd_ioctls::IommuFd::new().map_err(|e| format!("/dev/iommu: {e}"))?);
            let ctx = Arc::new(
                VfioIommufd::new(iommufd.clone(), None, None).map_err(|e| format!("IOAS: {e}"))?,
            );
            let ioas = ctx.ioas().id();
            let ops: Arc<dyn VfioOps> = ctx;
            let dev = VfioDevice::new(&sysfs, ops, true).map_err(|e| format!("VFIO cdev: {e}"))?;
            let host = IommufdMapper::host_constraints(&iommufd, ioas)
                .map_err(|e| format!("IOMMU_IOAS_IOVA_RANGES: {e}"))?;
            Ok((
                Some(Edu { dev }),
                Arc::new(IommufdMapper::new(iommufd, ioas, ram.clone())),
                Some(host),
            ))
        }
        other => Err(format!("unknown backend {other}")),
    }
}

fn result(ok: bool, check: &str, backend: &str, detail: &str) -> bool {
    println!(
        "VDI-RESULT {} {check}-{backend} {detail}",
        if ok { "PASS" } else { "FAIL" }
    );
    ok
}

fn run_test(
    g: &mut Nested,
    edu: &Edu,
    ep: u32,
    backend: &str,
    host_holes: &[(u64, u64)],
) -> Result<bool, String> {
    // The host's holes reach the nested guest's PROBE, and the daemon
    // refuses a MAP into one.
    let probed = g.probe(ep)?;
    let missing: Vec<_> = host_holes.iter().filter(|h| !probed.contains(h)).collect();
    g.expect_ok("ATTACH", &AttachReq::new(DOMAIN, ep, 0))?;
    let refused = match host_holes.first() {
        Some(&(start, _)) => {
            let start = start & !(LEN - 1);
            let status = g.request(&MapReq::new(DOMAIN, start, start + LEN - 1, SRC_GPA, RW))?;
            (status == VIRTIO_IOMMU_S_INVAL).then_some(start)
        }
        None => None,
    };
    let mut ok = result(
        !host_holes.is_empty() && missing.is_empty() && refused.is_some(),
        "nested-constraints",
        backend,
        &format!(
            "host holes {host_holes:x?} in the nested PROBE {probed:x?}; MAP at {refused:x?} refused"
        ),
    );
    g.expect_ok(
        "MAP src",
        &MapReq::new(DOMAIN, SRC_IOVA, SRC_IOVA + LEN - 1, SRC_GPA, RW),
    )?;
    g.expect_ok(
        "MAP dst",
        &MapReq::new(DOMAIN, DST_IOVA, DST_IOVA + LEN - 1, DST_GPA, RW),
    )?;
    let want = g.pattern(SRC_GPA, 1);
    g.fill(DST_GPA, 0);
    edu.dma(SRC_IOVA, true)?;
    edu.dma(DST_IOVA, false)?;
    ok &= result(
        g.read(DST_GPA) == want,
        "nested-dma",
        backend,
        &format!("edu copied {LEN:#x} bytes from IOVA {SRC_IOVA:#x} to {DST_IOVA:#x} (GPA {SRC_GPA:#x} -> {DST_GPA:#x})"),
    );
    // UNMAP completes once the host container dropped the mapping: the
    // same DMA must not reach the guest's memory any more.
    g.expect_ok(
        "UNMAP dst",
        &UnmapReq::new(DOMAIN, DST_IOVA, DST_IOVA + LEN - 1),
    )?;
    g.fill(DST_GPA, 0x5a);
    let second = g.pattern(SRC_GPA, 2);
    edu.dma(SRC_IOVA, true)?;
    edu.dma(DST_IOVA, false)?;
    let after = g.read(DST_GPA);
    ok &= result(
        after.iter().all(|&b| b == 0x5a),
        "nested-unmap",
        backend,
        &format!("edu's DMA to IOVA {DST_IOVA:#x} after UNMAP left GPA {DST_GPA:#x} untouched"),
    );
    // DETACH: back in bypass (the daemon's default), RAM is at IOVA = GPA.
    g.expect_ok("DETACH", &DetachReq::new(DOMAIN, ep))?;
    edu.dma(DST_GPA, false)?;
    ok &= result(
        g.read(DST_GPA) == second,
        "nested-bypass",
        backend,
        &format!("after DETACH, edu's DMA to IOVA {DST_GPA:#x} = GPA landed"),
    );
    Ok(ok)
}

fn percentile(v: &mut [Duration], p: usize) -> f64 {
    v.sort();
    let i = (v.len() * p / 100).min(v.len() - 1);
    v[i].as_secs_f64() * 1e6
}

fn run_bench(
    g: &mut Nested,
    mapper: &dyn DmaMapper,
    ep: u32,
    n: usize,
    backend: &str,
) -> Result<(), String> {
    g.expect_ok("ATTACH", &AttachReq::new(DOMAIN, ep, 0))?;
    let (mut maps, mut unmaps) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let iova = 0x100_0000 + (i as u64 % 256) * LEN;
        let t = Instant::now();
        g.expect_ok(
            "MAP",
            &MapReq::new(DOMAIN, iova, iova + LEN - 1, SRC_GPA, RW),
        )?;
        maps.push(t.elapsed());
        let t = Instant::now();
        g.expect_ok("UNMAP", &UnmapReq::new(DOMAIN, iova, iova + LEN - 1))?;
        unmaps.push(t.elapsed());
    }
    g.expect_ok("DETACH", &DetachReq::new(DOMAIN, ep))?;
    // The same host calls, without the guest, the daemon or the shadow.
    let (mut dmaps, mut dunmaps) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let iova = 0x200_0000 + (i as u64 % 256) * LEN;
        let t = Instant::now();
        mapper
            .map(iova, SRC_GPA, LEN, Prot::RW)
            .map_err(|e| format!("direct map: {e}"))?;
        dmaps.push(t.elapsed());
        let t = Instant::now();
        mapper
            .unmap(iova, LEN)
            .map_err(|e| format!("direct unmap: {e}"))?;
        dunmaps.push(t.elapsed());
    }
    println!(
        "nested-vmm: BENCH backend={backend} n={n} shadow_map_us={:.1} shadow_map_p90_us={:.1} shadow_unmap_us={:.1} shadow_unmap_p90_us={:.1} direct_map_us={:.1} direct_unmap_us={:.1}",
        percentile(&mut maps, 50),
        percentile(&mut maps, 90),
        percentile(&mut unmaps, 50),
        percentile(&mut unmaps, 90),
        percentile(&mut dmaps, 50),
        percentile(&mut dunmaps, 50),
    );
    Ok(())
}

fn run(args: &Args) -> Result<bool, String> {
    let mut g = Nested::boot(&args.socket)?;
    let hva = g
        .mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| e.to_string())? as u64;
    let ram = Arc::new(
        GuestRam::new(vec![RamRegion {
            gpa: 0,
            size: MEM_SIZE,
            hva,
        }])
        .map_err(|e| e.to_string())?,
    );
    let (edu, mapper, host) = open_device(args, &ram)?;
    if let Some(edu) = &edu {
        edu.enable()?;
    }
    let shadow = Arc::new(Mutex::new(Shadow::new(ram)));
    shadow
        .lock()
        .map_err(|_| "poisoned")?
        .register(args.endpoint, mapper.clone())
        .map_err(|e| e.to_string())?;
    let client = Client::connect(
        &args.control,
        Options {
            cache: false,
            subscribe: Some(Subscription::Sync),
        },
    )
    .map_err(|e| format!("control socket: {e}"))?;
    // What the host IOMMU (here: the test guest's virtio-iommu) cannot
    // map goes into the nested guest's PROBE of the endpoint.
    let mut added = Vec::new();
    if let Some(c) = &host {
        added = client
            .set_host_constraints(args.endpoint, c.page_size_mask, &c.regions)
            .map_err(|e| format!("SET_HOST_CONSTRAINTS: {e}"))?;
        println!(
            "nested-vmm: host page sizes {:#x}, holes {:x?}; the endpoint's PROBE adds {added:x?}",
            c.page_size_mask,
            c.regions
                .iter()
                .map(|r| (r.start, r.end))
                .collect::<Vec<_>>()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let (shadow, stop) = (shadow.clone(), stop.clone());
        thread::spawn(move || {
            follow(&shadow, &client, &stop, |e| {
                println!("nested-vmm: shadow error: {e}");
            })
        })
    };
    let outcome = match args.mode.as_str() {
        "test" => match &edu {
            Some(edu) => run_test(&mut g, edu, args.endpoint, &args.backend, &added),
            None => Err("test needs a device (backend vfio or iommufd)".into()),
        },
        "bench" => {
            run_bench(&mut g, &*mapper, args.endpoint, args.count, &args.backend).map(|()| true)
        }
        other => Err(format!("unknown mode {other}")),
    };
    stop.store(true, std::sync::atomic::Ordering::Release);
    match follower.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => println!("nested-vmm: the event stream ended: {e}"),
        Err(_) => println!("nested-vmm: the follower panicked"),
    }
    if let Ok(s) = shadow.lock() {
        println!("nested-vmm: shadow {:?}", s.stats());
    }
    outcome
}

fn main() -> ExitCode {
    env_logger::init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nested-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("nested-vmm: ERROR {e}");
            let _ = io::Write::flush(&mut io::stdout());
            ExitCode::FAILURE
        }
    }
}
