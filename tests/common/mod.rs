// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test harness: starts the real daemon binary and plays a VMM plus a
//! Linux-like guest driver against it over a real vhost-user socket, with
//! guest RAM in a shared file mapped on both sides.

#![allow(dead_code)]

pub mod driver;
pub mod tables;

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use driver::{Buf, DriverRing, RingLayout, VIRTQ_AVAIL_F_NO_INTERRUPT};
use vhost::{
    vhost_user::{
        message::{
            VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
            VhostUserHeaderFlag, VhostUserProtocolFeatures,
        },
        Frontend, VhostUserFrontend,
    },
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use viommu::wire::*;
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-iommu");
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// A running daemon process with its own socket and log.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    /// The control socket (always enabled by `start`).
    pub control: PathBuf,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon with `--socket-path` plus `args`, and waits for
    /// its socket to appear.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("viommu.sock");
        let log = dir.path().join("daemon.log");
        let control = dir.path().join("control.sock");
        let mut cmd = Command::new(BIN);
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--control-socket")
            .arg(&control);
        // Tests never touch the host's real PASID state.
        if !args.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(dir.path().join("state"));
        }
        let child = cmd
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child: Some(child),
            socket,
            control,
            log,
            dir,
        };
        d.wait_for(
            || d.socket.exists() && d.control.exists(),
            "sockets to appear",
        );
        d
    }

    pub fn wait_for(&self, mut cond: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Sends `signal` (e.g. "TERM") and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit on SIG{signal}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `ctl <args> --json` and returns its JSON document.
    pub fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--control-socket")
            .arg(&self.control)
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "ctl {args:?}: {e}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Log lines at ERROR level (there should be none in normal operation).
    pub fn errors(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(String::from)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// Guest physical layout used by the harness.
pub const MEM_SIZE: u64 = 16 << 20;
const REQUEST_RING: u64 = 0;
const EVENT_RING: u64 = 0x8000;
const REQ_AREA: u64 = 0x10000;
const REQ_SLOT: u64 = 0x400;
const REQ_SLOTS: u64 = 0x3c0;
const EVENT_AREA: u64 = 0x100000;
/// Free guest RAM for test data (DMA targets).
pub const DATA_AREA: u64 = 0x200000;

/// One completed request: used length and the device-writable bytes.
#[derive(Debug)]
pub struct Completion {
    pub used_len: u32,
    pub writable: Vec<u8>,
}

impl Completion {
    /// Status from the tail (the last four writable bytes).
    pub fn status(&self) -> Option<u8> {
        (self.used_len > 0).then(|| self.writable[self.writable.len() - 4])
    }
}

/// What a guest connection negotiates.
#[derive(Clone, Copy, Debug)]
pub struct GuestOptions {
    pub event_idx: bool,
    pub request_queue_size: u16,
    pub event_queue_size: u16,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            event_idx: true,
            request_queue_size: 256,
            event_queue_size: 64,
        }
    }
}

/// The VMM (vhost-user frontend) and the guest driver, in one.
pub struct Guest {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap,
    pub rq: DriverRing,
    pub eq: DriverRing,
    pub kicks: [EventFd; 2],
    pub calls: [EventFd; 2],
    pub features: u64,
    pub options: GuestOptions,
    next_slot: u64,
    next_event: u64,
}

/// Lays out both rings in guest memory (zeroed) and hands them to the
/// daemon, starting at index 0.
fn setup_rings(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    options: GuestOptions,
    kicks: &[EventFd; 2],
    calls: &[EventFd; 2],
) -> (DriverRing, DriverRing) {
    let (rq_layout, _) = RingLayout::at(REQUEST_RING, options.request_queue_size);
    let (eq_layout, _) = RingLayout::at(EVENT_RING, options.event_queue_size);
    let rq = DriverRing::new(mem, rq_layout);
    let eq = DriverRing::new(mem, eq_layout);
    // Like Linux: the request queue has no callback.
    rq.set_avail_flags(mem, VIRTQ_AVAIL_F_NO_INTERRUPT);
    start_rings(fe, mem, [rq_layout, eq_layout], [0, 0], kicks, calls);
    (rq, eq)
}

/// Hands rings already in guest memory to the daemon, each resuming at
/// its `bases` index.
fn start_rings(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    layouts: [RingLayout; 2],
    bases: [u16; 2],
    kicks: &[EventFd; 2],
    calls: &[EventFd; 2],
) {
    let hva = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    for (q, layout) in layouts.into_iter().enumerate() {
        fe.set_vring_num(q, layout.size).unwrap();
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
        .unwrap();
        fe.set_vring_base(q, bases[q]).unwrap();
        fe.set_vring_kick(q, &kicks[q]).unwrap();
        fe.set_vring_call(q, &calls[q]).unwrap();
        fe.set_vring_enable(q, true).unwrap();
    }
}

/// A frontend connection set up as a VMM does at boot, up to the memory
/// table (no rings yet); returns it with the features acked.
pub fn open_frontend(socket: &Path, mem: &GuestMemoryMmap, event_idx: bool) -> (Frontend, u64) {
    let mut fe = Frontend::connect(socket, 2).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    let mut features = fe.get_features().unwrap();
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    let proto = fe.get_protocol_features().unwrap();
    fe.set_features(features).unwrap();
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::DEVICE_STATE;
    fe.set_protocol_features(proto & want).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    let region = mem.find_region(GuestAddress(0)).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();
    (fe, features)
}

/// Saves the device state as a VMM does (SET_DEVICE_STATE_FD with SAVE
/// and a pipe, read to the end, then CHECK_DEVICE_STATE).
pub fn save_state(fe: &Frontend) -> Result<Vec<u8>, vhost::Error> {
    use std::io::Read;
    let (mut reader, writer) = std::io::pipe().unwrap();
    let returned = fe.set_device_state_fd(
        VhostTransferStateDirection::SAVE,
        VhostTransferStatePhase::STOPPED,
        writer.into(),
    )?;
    assert!(returned.is_none(), "the daemon uses the frontend's pipe");
    let mut blob = Vec::new();
    reader.read_to_end(&mut blob).unwrap();
    fe.check_device_state()?;
    Ok(blob)
}

/// Loads a device state as a VMM does (SET_DEVICE_STATE_FD with LOAD and
/// a pipe, the blob written and the pipe closed, then
/// CHECK_DEVICE_STATE, which says whether the daemon took it).
pub fn load_state(fe: &Frontend, blob: &[u8]) -> Result<(), vhost::Error> {
    use std::io::Write;
    let (reader, mut writer) = std::io::pipe().unwrap();
    let returned = fe.set_device_state_fd(
        VhostTransferStateDirection::LOAD,
        VhostTransferStatePhase::STOPPED,
        reader.into(),
    )?;
    assert!(returned.is_none(), "the daemon uses the frontend's pipe");
    // The daemon may stop reading early (a blob past its size bound).
    let _ = writer.write_all(blob);
    drop(writer);
    fe.check_device_state()
}

pub fn guest_memory() -> GuestMemoryMmap {
    let file = tempfile::tempfile().unwrap();
    file.set_len(MEM_SIZE).unwrap();
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

impl Guest {
    pub fn connect(socket: &Path, options: GuestOptions) -> Guest {
        Self::connect_with_memory(socket, options, guest_memory())
    }

    /// Connects as a VMM does at boot: negotiation, memory table, rings.
    pub fn connect_with_memory(
        socket: &Path,
        options: GuestOptions,
        mem: GuestMemoryMmap,
    ) -> Guest {
        let (mut fe, features) = open_frontend(socket, &mem, options.event_idx);
        let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let calls = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let (rq, eq) = setup_rings(&mut fe, &mem, options, &kicks, &calls);
        Guest {
            fe,
            mem,
            rq,
            eq,
            kicks,
            calls,
            features,
            options,
            next_slot: 0,
            next_event: 0,
        }
    }

    /// Restarts both rings at index 0 on the same connection, as QEMU does
    /// on DRIVER_OK after the guest driver reset the device.
    pub fn restart_rings(&mut self) {
        self.fe.set_features(self.features).unwrap();
        let (rq, eq) = setup_rings(
            &mut self.fe,
            &self.mem,
            self.options,
            &self.kicks,
            &self.calls,
        );
        (self.rq, self.eq, self.next_slot, self.next_event) = (rq, eq, 0, 0);
    }

    /// Stops both rings (GET_VRING_BASE), as a VMM does before it saves
    /// the device state; returns the index each will resume at.
    pub fn stop(&mut self) -> [u16; 2] {
        [0, 1].map(|q| {
            let base = self.fe.get_vring_base(q).unwrap();
            u16::try_from(base).unwrap()
        })
    }

    /// Moves the guest to the daemon at `socket`, as a VMM does on
    /// restore or incoming migration: it connects with the features the
    /// guest negotiated and the same guest memory, loads `blob` (which
    /// must be accepted), then restarts both rings where [`Self::stop`]
    /// left them. The driver carries on with its rings as they are.
    pub fn migrate(self, socket: &Path, blob: &[u8], bases: [u16; 2]) -> Guest {
        let (mut fe, features) = open_frontend(socket, &self.mem, self.options.event_idx);
        assert_eq!(features, self.features, "the destination offers the same");
        load_state(&fe, blob).expect("the destination refused the state");
        let layouts = [self.rq.layout, self.eq.layout];
        start_rings(&mut fe, &self.mem, layouts, bases, &self.kicks, &self.calls);
        Guest { fe, ..self }
    }

    /// A driver write of the `bypass` config field (through the VMM).
    pub fn fe_set_bypass(&mut self, on: bool) {
        self.fe
            .set_config(0x24, VhostUserConfigFlags::WRITABLE, &[u8::from(on)])
            .unwrap();
    }

    pub fn config(&mut self) -> VirtioIommuConfig {
        let (_, data) = self
            .fe
            .get_config(0, 40, VhostUserConfigFlags::WRITABLE, &[0; 40])
            .unwrap();
        let mut cfg = VirtioIommuConfig::default();
        cfg.as_mut_slice().copy_from_slice(&data);
        cfg
    }

    /// Queues requests (device-readable bytes, writable size) without
    /// kicking; returns their heads.
    pub fn queue(&mut self, reqs: &[(&[u8], usize)]) -> Vec<u16> {
        reqs.iter()
            .map(|(ro, wlen)| {
                let slot = REQ_AREA + (self.next_slot % REQ_SLOTS) * REQ_SLOT;
                self.next_slot += 1;
                assert!(ro.len() + wlen <= REQ_SLOT as usize);
                self.mem.write_slice(ro, GuestAddress(slot)).unwrap();
                let wo = slot + ro.len() as u64;
                self.mem
                    .write_slice(&vec![0u8; *wlen], GuestAddress(wo))
                    .unwrap();
                let mut bufs = vec![];
                if !ro.is_empty() {
                    bufs.push(Buf {
                        addr: slot,
                        len: ro.len() as u32,
                        writable: false,
                    });
                }
                if *wlen > 0 {
                    bufs.push(Buf {
                        addr: wo,
                        len: *wlen as u32,
                        writable: true,
                    });
                }
                self.rq.add(&self.mem, &bufs)
            })
            .collect()
    }

    /// Sends raw chains, kicks once, and waits for every completion.
    pub fn submit_chains(&mut self, chains: &[Vec<Buf>]) -> Vec<(u32, u32)> {
        for c in chains {
            self.rq.add(&self.mem, c);
        }
        self.rq.publish(&self.mem);
        self.kicks[0].write(1).unwrap();
        self.wait_used(chains.len())
    }

    fn wait_used(&mut self, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut done = Vec::with_capacity(n);
        while done.len() < n {
            match self.rq.pop_used(&self.mem) {
                Some(u) => done.push(u),
                None => {
                    assert!(Instant::now() < deadline, "requests not completed in time");
                    std::hint::spin_loop();
                }
            }
        }
        done
    }

    /// Sends requests with a single kick (as the Linux driver batches
    /// them) and waits for all of them, in order.
    pub fn submit(&mut self, reqs: &[(&[u8], usize)]) -> Vec<Completion> {
        let first_slot = self.next_slot;
        let heads = self.queue(reqs);
        self.rq.publish(&self.mem);
        self.kicks[0].write(1).unwrap();
        let used = self.wait_used(reqs.len());
        heads
            .iter()
            .enumerate()
            .map(|(i, head)| {
                let (_, len) = used.iter().find(|(id, _)| *id == u32::from(*head)).unwrap();
                let slot = REQ_AREA + ((first_slot + i as u64) % REQ_SLOTS) * REQ_SLOT;
                let (ro, wlen) = reqs[i];
                let mut writable = vec![0u8; wlen];
                self.mem
                    .read_slice(&mut writable, GuestAddress(slot + ro.len() as u64))
                    .unwrap();
                Completion {
                    used_len: *len,
                    writable,
                }
            })
            .collect()
    }

    /// Sends one fixed-size request (tail included in `T`) and returns its
    /// status.
    pub fn request<T: ByteValued>(&mut self, req: &T) -> u8 {
        let c = self.submit(&[(readable_part(req), REQ_TAIL_SIZE)]);
        c[0].status().expect("request completed with used length 0")
    }

    /// Sends one request given by its device-readable bytes (with a
    /// 4-byte writable tail) and returns its status.
    pub fn request_ro(&mut self, readable: &[u8]) -> u8 {
        let c = self.submit(&[(readable, REQ_TAIL_SIZE)]);
        c[0].status().expect("request completed with used length 0")
    }

    /// ATTACH_TABLE of a VT-d first-stage table.
    pub fn attach_table_vtd(
        &mut self,
        domain: u32,
        endpoint: u32,
        pasid: u32,
        pgd: u64,
        addr_width: u32,
    ) -> u8 {
        let req = AttachTableVtdReq::new(domain, endpoint, pasid, pgd, addr_width);
        self.request_ro(req.as_slice())
    }

    /// DETACH_TABLE of (endpoint, pasid) from domain.
    pub fn detach_table(&mut self, domain: u32, endpoint: u32, pasid: u32) -> u8 {
        self.request(&DetachTableReq::new(domain, endpoint, pasid))
    }

    /// INVALIDATE of `nr_pages` 4 KiB pages from `va` of (domain, pasid).
    pub fn invalidate_range(&mut self, domain: u32, pasid: u32, va: u64, nr_pages: u64) -> u8 {
        let req = InvalidateReq::new(
            VIRTIO_IOMMU_INV_G_VA,
            VIRTIO_IOMMU_INV_T_IOTLB | VIRTIO_IOMMU_INV_T_DEV_IOTLB,
            domain,
        )
        .with_pasid(pasid)
        .with_range(va, nr_pages, 12);
        self.request(&req)
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32) -> u8 {
        self.request(&AttachReq::new(domain, endpoint, 0))
    }

    pub fn detach(&mut self, domain: u32, endpoint: u32) -> u8 {
        self.request(&DetachReq::new(domain, endpoint))
    }

    pub fn map(&mut self, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> u8 {
        self.request(&MapReq::new(domain, start, end, phys, flags))
    }

    pub fn unmap(&mut self, domain: u32, start: u64, end: u64) -> u8 {
        self.request(&UnmapReq::new(domain, start, end))
    }

    /// PASID_ALLOC of a PASID in `[min, max]`: status and PASID.
    pub fn pasid_alloc(&mut self, min: u32, max: u32) -> (u8, u32) {
        let req = PasidAllocReq::new(min, max);
        let c = self
            .submit(&[(req.readable(), PASID_ALLOC_WRITABLE)])
            .remove(0);
        let status = c
            .status()
            .expect("PASID_ALLOC completed with used length 0");
        let pasid = u32::from_le_bytes(c.writable[..4].try_into().unwrap());
        (status, pasid)
    }

    /// PASID_FREE: its status.
    pub fn pasid_free(&mut self, pasid: u32) -> u8 {
        self.request(&PasidFreeReq::new(pasid))
    }

    /// PROBE as Linux sends it: 72 readable bytes, `probe_size + 4`
    /// writable bytes.
    pub fn probe(&mut self, endpoint: u32, probe_size: usize) -> Completion {
        let req = ProbeReq::new(endpoint);
        self.submit(&[(req.as_slice(), probe_size + 4)]).remove(0)
    }

    /// Posts event buffers of `size` bytes without a kick, as Linux does.
    pub fn post_event_buffers(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let addr = EVENT_AREA + (self.next_event % 256) * 64;
            self.next_event += 1;
            self.mem
                .write_slice(&vec![0u8; size as usize], GuestAddress(addr))
                .unwrap();
            self.eq.add(
                &self.mem,
                &[Buf {
                    addr,
                    len: size,
                    writable: true,
                }],
            );
        }
        self.eq.publish(&self.mem);
    }

    /// Waits for the device to return an event buffer; returns its used
    /// length and contents.
    pub fn wait_event(&mut self, timeout: Duration) -> Option<(u32, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((id, len)) = self.eq.pop_used(&self.mem) {
                let at = self.eq.layout.desc.0 + 16 * u64::from(id);
                let addr: u64 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let mut buf = vec![0u8; len as usize];
                self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                return Some((len, buf));
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}
