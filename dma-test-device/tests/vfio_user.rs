// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The dma-test-device binary driven over its vfio-user socket as QEMU's
//! vfio-user-pci drives it (rust-vmm `vfio_user::Client` plays QEMU):
//! configuration space, BAR0, DMA_MAP of a file, DMA, disconnects. No
//! daemon: the device uses the DMA_MAP addresses.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use vfio_user::Client;

const BIN: &str = env!("CARGO_BIN_EXE_dma-test-device");
const CONFIG: u32 = 7;
const BAR0: u32 = 0;

struct Device {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Device {
    fn start(name: &str, args: &[&str]) -> Device {
        let dir =
            std::env::temp_dir().join(format!("dma-test-device-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("dma.sock");
        let child = Command::new(BIN)
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("device.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no socket; log:\n{}", log(&dir));
            thread::sleep(Duration::from_millis(5));
        }
        Device { child, dir, socket }
    }

    /// Waits for the process to exit by itself; its exit status.
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "still running; log:\n{}",
                log(&self.dir)
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("device.log")).unwrap_or_default()
}

fn rd32(c: &mut Client, region: u32, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr64(c: &mut Client, off: u64, v: u64) {
    c.region_write(BAR0, off, &v.to_le_bytes()).unwrap();
}

/// Programs and runs one operation, polls STATUS; returns it.
fn run(c: &mut Client, cmd: u32, dst: u64, len: u64, pattern: u64) -> u32 {
    wr64(c, 0x18, dst);
    wr64(c, 0x20, len);
    wr64(c, 0x28, pattern);
    c.region_write(BAR0, 0x38, &cmd.to_le_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = rd32(c, BAR0, 0x3c);
        if status != 1 || Instant::now() > deadline {
            return status;
        }
    }
}

/// Guest RAM stand-in: a file of `size` bytes, unlinked.
fn ram(dir: &Path, size: u64) -> File {
    let path = dir.join("ram");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.set_len(size).unwrap();
    f
}

#[test]
fn a_vfio_user_client_finds_the_function_and_its_dma_lands_in_mapped_memory() {
    let d = Device::start("dma", &["--persistent"]);
    let mut c = Client::new(&d.socket).unwrap();
    assert_eq!(rd32(&mut c, CONFIG, 0), 0xd3a0_1234, "vendor/device");
    assert_eq!(rd32(&mut c, CONFIG, 8) >> 8, 0xff_0000, "class");
    let mut id = [0u8; 4];
    c.region_read(BAR0, 0, &mut id).unwrap();
    assert_eq!(&id, b"VDMA");

    // Guest RAM at 0x100000 (from file offset 0x1000); FILL lands in it.
    let mem = ram(&d.dir, 0x10000);
    c.dma_map(0x1000, 0x10_0000, 0x8000, mem.as_raw_fd())
        .unwrap();
    assert_eq!(run(&mut c, 2, 0x10_0010, 0x20, 0x1122_3344_5566_7788), 2);
    let mut b = [0u8; 0x30];
    mem.read_exact_at(&mut b, 0x1008).unwrap();
    assert_eq!(&b[..8], &[0; 8]);
    assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&b[40..], &[0; 8]);
    // Outside the mapping: FAULT at the first unmapped address.
    assert_eq!(run(&mut c, 2, 0x10_7ff0, 0x20, 0), 3);
    assert_eq!(rd32(&mut c, BAR0, 0x48), 0x10_8000);
    // After DMA_UNMAP the memory is out of reach.
    c.dma_unmap(0x10_0000, 0x8000).unwrap();
    assert_eq!(run(&mut c, 2, 0x10_0010, 0x20, 0), 3);

    // QEMU goes away mid-way and comes back: a fresh device, no mapping.
    c.dma_map(0x1000, 0x10_0000, 0x8000, mem.as_raw_fd())
        .unwrap();
    wr64(&mut c, 0x10, 0x10_0000);
    drop(c);
    let mut c = Client::new(&d.socket).unwrap();
    assert_eq!(rd32(&mut c, BAR0, 0x10), 0, "registers reset");
    assert_eq!(run(&mut c, 2, 0x10_0010, 0x20, 0), 3, "mappings dropped");
    assert!(!log(&d.dir).contains(" ERROR "), "{}", log(&d.dir));
}

#[test]
fn bad_requests_are_refused_and_the_device_keeps_serving() {
    let d = Device::start("bad", &[]);
    let mut c = Client::new(&d.socket).unwrap();
    let mem = ram(&d.dir, 0x1000);
    // A region the file does not hold, and one overlapping another.
    c.dma_map(0, 0x10_0000, 0x10_0000, mem.as_raw_fd()).unwrap();
    c.dma_map(0, 0x20_0000, 0x1000, mem.as_raw_fd()).unwrap();
    c.dma_map(0, 0x20_0800, 0x1000, mem.as_raw_fd()).unwrap();
    // Garbage register writes and reads.
    for off in [0u64, 3, 0x3c, 0x7f, 0xffc] {
        c.region_write(BAR0, off, &[0xff; 4]).unwrap();
        let mut b = [0u8; 4];
        c.region_read(BAR0, off, &mut b).unwrap();
    }
    // Too long, and an unknown opcode: ERROR.
    assert_eq!(run(&mut c, 2, 0x20_0000, (1 << 30) + 1, 0), 4);
    assert_eq!(run(&mut c, 0x99, 0x20_0000, 8, 0), 4);
    // The one good region still works; the refused one does not exist.
    assert_eq!(run(&mut c, 2, 0x20_0000, 0x1000, 0x5a), 2);
    assert_eq!(run(&mut c, 2, 0x10_0000, 8, 0), 3);
    drop(c);
    // Without --persistent the device exits once QEMU is gone.
    let mut d = d;
    assert!(d.wait().success(), "{}", log(&d.dir));
    let text = log(&d.dir);
    assert!(text.contains("DMA_MAP refused"), "{text}");
}
