// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Durable, cross-process PASID allocation throughput: P allocator
//! processes (this binary re-executed) each serve one VM through the
//! daemon's `PasidManager` on one state directory and run rounds of
//! "allocate up to the quota, then free them all"; every allocation and
//! every free is one journal transaction in the shared SQLite database,
//! and leases come from it. Prints allocations/s (frees included in the
//! time) and journal transactions/s for P = 1, 2, 4, 8.
//!
//! Each process checkpoints the database once a second, as the daemon
//! does (`PASID_BENCH_NO_CHECKPOINTS=1` leaves that out, to measure what
//! it costs).
//!
//! Run: `cargo bench -p vhost-device-iommu --bench pasid_store`
//! (`-- quick` for a shorter run).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use vhost_device_iommu::pasid_manager::{PasidManager, PasidOptions};

const QUOTA: u32 = 1000;

fn worker(state: &Path, vm: &str, pairs: u32, go: &Path) {
    let mut m = PasidManager::open(PasidOptions {
        vm_id: vm.into(),
        bits: 20,
        quota: QUOTA,
        state_dir: state.to_owned(),
    })
    .expect("open manager");
    if std::env::var_os("PASID_BENCH_NO_CHECKPOINTS").is_none() {
        m.start_checkpoints().expect("checkpoint thread");
    }
    println!("ready");
    while !go.exists() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut live = Vec::with_capacity(QUOTA as usize);
    let mut done = 0;
    while done < pairs {
        while live.len() < QUOTA as usize && done + (live.len() as u32) < pairs {
            live.push(m.alloc(1, (1 << 20) - 1).expect("alloc"));
        }
        for p in live.drain(..) {
            m.free(p).expect("free");
            done += 1;
        }
    }
}

fn run(processes: usize, pairs: u32) -> f64 {
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("state");
    let go = tmp.path().join("go");
    let exe = std::env::current_exe().expect("exe");
    let mut children: Vec<_> = (0..processes)
        .map(|i| {
            Command::new(&exe)
                .env("PASID_BENCH_STATE", &state)
                .env("PASID_BENCH_VM", format!("vm-{i}"))
                .env("PASID_BENCH_PAIRS", pairs.to_string())
                .env("PASID_BENCH_GO", &go)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for c in &mut children {
        let mut line = [0u8; 6];
        std::io::Read::read_exact(c.stdout.as_mut().expect("stdout"), &mut line)
            .expect("worker ready");
    }
    let start = Instant::now();
    std::fs::write(&go, b"").expect("go");
    for c in &mut children {
        assert!(c.wait().expect("wait").success(), "worker failed");
    }
    let secs = start.elapsed().as_secs_f64();
    let allocs = f64::from(pairs) * processes as f64;
    println!(
        "{processes} process(es): {allocs:.0} allocs + {allocs:.0} frees in {secs:.2} s: {:.1} k durable allocs/s, {:.1} k journal transactions/s",
        allocs / secs / 1e3,
        2.0 * allocs / secs / 1e3
    );
    allocs / secs
}

fn main() {
    if let (Some(state), Some(vm), Some(pairs), Some(go)) = (
        std::env::var_os("PASID_BENCH_STATE"),
        std::env::var("PASID_BENCH_VM").ok(),
        std::env::var("PASID_BENCH_PAIRS").ok(),
        std::env::var_os("PASID_BENCH_GO"),
    ) {
        let pairs = pairs.parse().expect("pairs");
        return worker(&PathBuf::from(state), &vm, pairs, &PathBuf::from(go));
    }
    let quick = std::env::args().any(|a| a == "quick");
    let total: u32 = if quick { 20_000 } else { 200_000 };
    println!("durable PASID allocation, quota {QUOTA} per VM, 2^20 space, WAL synchronous=NORMAL");
    for p in [1usize, 2, 4, 8] {
        run(p, total / p as u32);
    }
}
