// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device: BAR0 registers, the worker thread that runs operations, the
//! DMA_MAP table and the way DMA addresses are translated.
//!
//! A CMD write validates the command, sets STATUS to BUSY and hands the
//! operation to the worker; the MMIO write returns at once (QEMU's
//! vfio-user region writes are synchronous). The worker runs it through
//! the engine and sets STATUS to DONE or FAULT. Reset cancels a running
//! operation between two chunks and waits for it.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use viommu_client::{Access, Client, Options, Segment};

use crate::{
    engine::{
        self, DirectSpace, DmaSpace, Fault, FaultKind, FaultReporter, IommuSpace, PasidSpace,
    },
    ram::{Ram, RamView},
    regs::{Op, OpKind, Outcome, Registers, Status, WriteEffect, FAULT_REASON_TRANSLATION, STATUS},
};

/// Longest a STATUS read waits for a running operation to end.
pub const STATUS_WAIT: Duration = Duration::from_micros(500);

/// How the device translates its DMA addresses.
pub enum Translation {
    /// Through the daemon's control socket, as endpoint `endpoint`; the
    /// DMA_MAP regions are guest RAM at guest-physical addresses.
    Iommu(IommuLink),
    /// The DMA_MAP addresses are the device's addresses.
    Direct,
}

/// How long a PASID operation may take in all, waiting for page requests
/// included, unless `IommuLink::operation_timeout` says otherwise.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The connection to the daemon, made again when it breaks.
pub struct IommuLink {
    socket: PathBuf,
    endpoint: u32,
    cache: bool,
    client: Mutex<Option<Arc<Client>>>,
    reporter: FaultReporter,
    /// The deadline of a PASID operation, from its CMD write.
    pub operation_timeout: Duration,
}

impl IommuLink {
    /// Connects to the daemon's control socket.
    pub fn connect(
        socket: PathBuf,
        endpoint: u32,
        cache: bool,
    ) -> Result<Self, viommu_client::Error> {
        let client = Client::connect(&socket, options(cache))?;
        info!(
            "control socket {}: client {} (endpoint {endpoint:#x}, cache {})",
            socket.display(),
            client.id(),
            if cache { "on" } else { "off" }
        );
        Ok(IommuLink {
            socket,
            endpoint,
            cache,
            client: Mutex::new(Some(Arc::new(client))),
            reporter: FaultReporter::new().map_err(viommu_client::Error::Io)?,
            operation_timeout: OPERATION_TIMEOUT,
        })
    }

    /// The live client, reconnecting if the daemon closed the connection.
    fn client(&self) -> Option<Arc<Client>> {
        let mut c = lock(&self.client);
        if c.as_ref().is_some_and(|c| !c.is_closed()) {
            return c.clone();
        }
        match Client::connect(&self.socket, options(self.cache)) {
            Ok(new) => {
                info!("reconnected to the daemon: client {}", new.id());
                *c = Some(Arc::new(new));
            }
            Err(e) => {
                if c.take().is_some() {
                    warn!(
                        "lost the daemon ({}): {e}; DMA is refused until it is back",
                        self.socket.display()
                    );
                }
            }
        }
        c.clone()
    }
}

fn options(cache: bool) -> Options {
    Options {
        cache,
        ..Options::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A space in which nothing translates (the daemon is unreachable).
struct Unreachable;

impl DmaSpace for Unreachable {
    fn translate_with<R>(
        &self,
        addr: u64,
        _len: u64,
        access: Access,
        _f: impl FnOnce(&[Segment], &RamView) -> R,
    ) -> Result<R, Fault> {
        Err(Fault {
            address: addr,
            access,
            kind: FaultKind::Unavailable,
        })
    }

    fn report(&self, _fault: &Fault) {}
}

struct Shared {
    regs: Mutex<Registers>,
    /// Signalled when an operation ends.
    finished: Condvar,
    cancel: AtomicBool,
    ram: Ram,
    translation: Translation,
}

/// The DMA test device.
pub struct Device {
    shared: Arc<Shared>,
    work: Option<mpsc::Sender<Op>>,
    worker: Option<thread::JoinHandle<()>>,
}

impl Device {
    pub fn new(translation: Translation) -> std::io::Result<Device> {
        // PASIDs name guest page tables, which only the daemon walks.
        let pasid = matches!(translation, Translation::Iommu(_));
        let shared = Arc::new(Shared {
            regs: Mutex::new(Registers::new(pasid)),
            finished: Condvar::new(),
            cancel: AtomicBool::new(false),
            ram: Ram::default(),
            translation,
        });
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        let worker = thread::Builder::new()
            .name("dma-worker".into())
            .spawn(move || worker(&s, &rx))?;
        Ok(Device {
            shared,
            work: Some(tx),
            worker: Some(worker),
        })
    }

    /// The DMA_MAP table.
    pub fn ram(&self) -> &Ram {
        &self.shared.ram
    }

    /// An MMIO read of BAR0. A read of STATUS while an operation runs
    /// waits up to `STATUS_WAIT` for it to end: the guest polls STATUS, and
    /// each poll is a round trip through QEMU to this process, so a short
    /// wait here spares both host CPUs the spinning (the worker, and the
    /// daemon it may be waiting for, get to run) and the guest most polls.
    /// The wait is bounded because QEMU waits for the reply with its vCPU
    /// (and its big lock) stopped.
    pub fn bar_read(&self, offset: u64, data: &mut [u8]) {
        let mut regs = lock(&self.shared.regs);
        let reads_status = offset <= STATUS && STATUS < offset.saturating_add(data.len() as u64);
        if reads_status && regs.status() == Status::Busy {
            regs = self
                .shared
                .finished
                .wait_timeout_while(regs, STATUS_WAIT, |r| r.status() == Status::Busy)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        regs.read(offset, data);
    }

    /// An MMIO write of BAR0; a CMD write starts an operation.
    pub fn bar_write(&self, offset: u64, data: &[u8]) {
        let mut regs = lock(&self.shared.regs);
        match regs.write(offset, data) {
            WriteEffect::None => {}
            WriteEffect::Start(op) => {
                let sent = self.work.as_ref().is_some_and(|w| w.send(op).is_ok());
                if !sent {
                    error!("the DMA worker is gone; {op:?} not run");
                    regs.finish(&refused(&op));
                }
            }
        }
    }

    /// Current STATUS.
    pub fn status(&self) -> Status {
        lock(&self.shared.regs).status()
    }

    /// Waits until no operation runs; returns STATUS.
    pub fn wait_idle(&self) -> Status {
        let mut regs = lock(&self.shared.regs);
        while regs.status() == Status::Busy {
            regs = self
                .shared
                .finished
                .wait(regs)
                .unwrap_or_else(|e| e.into_inner());
        }
        regs.status()
    }

    /// Device reset: stops a running operation (between two chunks),
    /// waits for it, and clears the registers.
    pub fn reset(&self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
        self.wait_idle();
        let mut regs = lock(&self.shared.regs);
        regs.reset();
        self.shared.cancel.store(false, Ordering::Relaxed);
    }

    /// (CMD writes ignored while busy, malformed register accesses).
    pub fn counters(&self) -> (u64, u64) {
        let r = lock(&self.shared.regs);
        (r.ignored_commands, r.bad_accesses)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
        self.work.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The outcome of an operation that could not run at all.
fn refused(op: &Op) -> Outcome {
    let (address, write) = match op.kind {
        OpKind::Fill => (op.dst, true),
        OpKind::Copy | OpKind::Checksum => (op.src, false),
    };
    Outcome {
        done_bytes: 0,
        result: 0,
        fault: Some(crate::regs::FaultRecord {
            address,
            reason: FAULT_REASON_TRANSLATION,
            write,
        }),
    }
}

fn worker(shared: &Shared, work: &mpsc::Receiver<Op>) {
    while let Ok(op) = work.recv() {
        // The deadline of a PASID operation counts from its CMD write.
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| execute(shared, &op, started)))
            .unwrap_or_else(|_| {
                error!("BUG: the DMA engine panicked on {op:?}; reported as a fault");
                refused(&op)
            });
        let mut regs = lock(&shared.regs);
        regs.finish(&outcome);
        shared.finished.notify_all();
    }
}

fn execute(shared: &Shared, op: &Op, started: Instant) -> Outcome {
    let cancel = &shared.cancel;
    match &shared.translation {
        Translation::Direct => engine::run(&DirectSpace { ram: &shared.ram }, op, cancel),
        Translation::Iommu(link) => match link.client() {
            Some(client) if op.pasid.is_some() => {
                let space = PasidSpace {
                    client: &client,
                    endpoint: link.endpoint,
                    pasid: op.pasid.unwrap_or_default(),
                    ram: &shared.ram,
                    deadline: started + link.operation_timeout,
                    cancel,
                };
                engine::run(&space, op, cancel)
            }
            Some(client) => {
                let space = IommuSpace {
                    client: &client,
                    endpoint: link.endpoint,
                    ram: &shared.ram,
                    reporter: &link.reporter,
                };
                engine::run(&space, op, cancel)
            }
            None => engine::run(&Unreachable, op, cancel),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ram::tests::file, regs::*};

    fn w64(d: &Device, off: u64, v: u64) {
        d.bar_write(off, &v.to_le_bytes());
    }

    fn r64(d: &Device, off: u64) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(off, &mut b);
        u64::from_le_bytes(b)
    }

    fn start(d: &Device, cmd: u32, src: u64, dst: u64, len: u64) {
        w64(d, SRC, src);
        w64(d, DST, dst);
        w64(d, LEN, len);
        d.bar_write(CMD, &cmd.to_le_bytes());
    }

    #[test]
    fn the_worker_runs_commands_and_the_guest_polls_status() {
        let d = Device::new(Translation::Direct).unwrap();
        d.ram()
            .map(0x1000, 0x4000, Some((file(0x4000), 0)), true, true)
            .unwrap();
        w64(&d, PATTERN, 0x6162_6364_6566_6768);
        start(&d, OP_FILL, 0, 0x1000, 0x2000);
        assert_eq!(d.wait_idle(), Status::Done);
        start(&d, OP_COPY, 0x1000, 0x3000, 0x2000);
        assert_eq!(d.wait_idle(), Status::Done);
        start(&d, OP_CHECKSUM, 0x3000, 0, 0x2000);
        assert_eq!(d.wait_idle(), Status::Done);
        let expect = (0..0x2000).fold(engine::FNV_OFFSET, |h, i| {
            engine::fnv1a(h, &[0x68 - (i % 8) as u8])
        });
        assert_eq!(r64(&d, RESULT), expect);
        assert_eq!(r64(&d, DONE_BYTES), 0x2000);
        // Unmapped: FAULT, with the address and a write flag.
        start(&d, OP_FILL, 0, 0x4800, 0x1000);
        assert_eq!(d.wait_idle(), Status::Fault);
        assert_eq!(r64(&d, FAULT_ADDR), 0x5000);
        assert_eq!(r64(&d, FAULT_INFO) & 0xffff_ffff, 0x101);
        assert_eq!(r64(&d, DONE_BYTES), 0x800);
        // A bad command is an ERROR at once.
        start(&d, 0x7, 0, 0, 1);
        assert_eq!(d.status(), Status::Error);
    }

    #[test]
    fn reset_stops_a_long_operation_and_clears_the_registers() {
        let d = Device::new(Translation::Direct).unwrap();
        d.ram()
            .map(0, MAX_LEN, Some((file(MAX_LEN), 0)), true, true)
            .unwrap();
        start(&d, OP_CHECKSUM, 0, 0, MAX_LEN);
        d.bar_write(CMD, &OP_FILL.to_le_bytes()); // ignored while busy
        d.reset();
        assert_eq!(d.status(), Status::Idle);
        assert_eq!(r64(&d, LEN), 0);
        assert!(d.counters().0 <= 1);
        // Still works afterwards; dropping the device with an operation
        // running does not hang.
        start(&d, OP_FILL, 0, 0, 8);
        assert_eq!(d.wait_idle(), Status::Done);
        start(&d, OP_CHECKSUM, 0, 0, MAX_LEN);
    }

    #[test]
    fn random_register_traffic_never_panics_or_wedges_the_device() {
        let d = Device::new(Translation::Direct).unwrap();
        d.ram()
            .map(0x10000, 0x10000, Some((file(0x10000), 0)), true, true)
            .unwrap();
        d.ram().map(0x30000, 0x1000, None, true, true).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seen = [0usize; 5];
        for _ in 0..20_000 {
            let r = next();
            let len = [1, 2, 4, 8][(r & 3) as usize];
            // Mostly register offsets, sometimes anywhere in the BAR.
            let off = if r & 0x30 == 0 {
                r >> 8 & 0xfff
            } else {
                ((r >> 8) % 0x60) & !3
            };
            let off = off.min(BAR0_SIZE - len as u64);
            let value = match next() % 4 {
                0 => next() % 0x40000,     // addresses near the RAM
                1 => next() % 0x20000 + 1, // lengths
                2 => next() % 5,           // opcodes
                _ => next(),
            };
            match r >> 40 & 7 {
                0 => d.bar_write(CMD, &((value % 5) as u32).to_le_bytes()),
                1 | 2 => d.bar_write(off, &value.to_le_bytes()[..len]),
                _ => d.bar_read(off, &mut [0u8; 8][..len]),
            }
            let status = d.wait_idle();
            seen[status as usize] += 1;
            let info = r64(&d, FAULT_INFO) & 0xff;
            if status == Status::Fault {
                assert!(info == 1 || info == 3, "fault reason {info}");
            }
        }
        // The traffic did reach the engine, both ways.
        assert!(seen[Status::Done as usize] > 100, "{seen:?}");
        assert!(seen[Status::Fault as usize] > 100, "{seen:?}");
        assert!(seen[Status::Error as usize] > 100, "{seen:?}");
        d.reset();
        assert_eq!(d.status(), Status::Idle);
    }

    #[test]
    fn without_a_daemon_dma_is_refused_not_done() {
        // A link whose daemon is gone: every operation faults at once.
        let link = IommuLink {
            socket: "/nonexistent/viommu.ctl".into(),
            endpoint: 0x28,
            cache: true,
            client: Mutex::new(None),
            reporter: FaultReporter::new().unwrap(),
            operation_timeout: OPERATION_TIMEOUT,
        };
        let d = Device::new(Translation::Iommu(link)).unwrap();
        d.ram()
            .map(0, 0x1000, Some((file(0x1000), 0)), true, true)
            .unwrap();
        start(&d, OP_FILL, 0, 0x10, 0x10);
        assert_eq!(d.wait_idle(), Status::Fault);
        assert_eq!(r64(&d, FAULT_ADDR), 0x10);
        assert_eq!(r64(&d, DONE_BYTES), 0);
    }
}
