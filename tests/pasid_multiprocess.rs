// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host-wide PASID allocator across processes: eight allocator
//! processes (this test binary re-executed as `worker_process`, each
//! serving one VM through the daemon's `PasidManager`) allocate and free
//! concurrently on one state directory while the test SIGKILLs some of
//! them midway and restarts them with the same VM id, and reclaims the
//! sets of finished ones. Every grant, free and recovery is logged with a
//! CLOCK_MONOTONIC timestamp; the test then checks that
//!
//! - no host PASID was ever owned by two sets (or twice by one) at once,
//! - each restarted process recovered exactly what it held when killed
//!   (give or take the one operation in flight),
//! - nothing leaked: after the final reclaim the database is empty and a
//!   new VM can allocate every PASID of the space.
//!
//! Ownership intervals are conservative: a grant is logged after its
//! journal commit, a free before it starts, a kill or reclaim ends the
//! interval at the moment the test acts. So an overlap of logged intervals
//! implies an overlap of real ownership.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::time::{clock_gettime, ClockId};
use vhost_device_iommu::{
    pasid_manager::{reclaim_dead, PasidManager, PasidOptions},
    pasid_store::Store,
};

const WORKERS: usize = 8;
const BITS: u8 = 11;
const MAX: u32 = (1 << BITS) - 1;
const QUOTA: u32 = 200;
const OPS: u32 = 3000;
const KILLS: usize = 12;

fn now_ns() -> u128 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("clock");
    u128::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u128::try_from(t.tv_nsec()).unwrap_or(0)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One log line per event, each written with a single write(2) on an
/// O_APPEND file, so a kill leaves at most one torn line at the end.
fn log(file: &mut File, line: &str) {
    file.write_all(format!("{line}\n").as_bytes())
        .expect("log write");
}

/// The allocator process. Only runs when re-executed by the test.
#[test]
#[ignore = "allocator process of the multi-process test; not a test by itself"]
fn worker_process() {
    let Ok(dir) = std::env::var("PASID_WORKER_STATE") else {
        return;
    };
    let vm = std::env::var("PASID_WORKER_VM").unwrap();
    let log_path = std::env::var("PASID_WORKER_LOG").unwrap();
    let seed: u64 = std::env::var("PASID_WORKER_SEED").unwrap().parse().unwrap();
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    let mut m = PasidManager::open(PasidOptions {
        vm_id: vm,
        bits: BITS,
        quota: QUOTA,
        state_dir: PathBuf::from(dir),
    })
    .expect("open manager");
    let mut live: Vec<u32> = m.pasids().iter().map(|p| p.host).collect();
    let listed: Vec<String> = live.iter().map(u32::to_string).collect();
    log(&mut out, &format!("R {} {}", now_ns(), listed.join(",")));
    let mut rng = Rng(seed | 1);
    for op in 0..OPS {
        let grow = live.is_empty() || (live.len() < QUOTA as usize && rng.below(100) < 55);
        if grow {
            let min = 1 + rng.below(MAX as usize / 2) as u32 * u32::from(rng.below(4) == 0);
            match m.alloc(min, MAX) {
                Ok(h) => {
                    log(&mut out, &format!("G {} {h}", now_ns()));
                    live.push(h);
                }
                Err(e) => assert!(
                    matches!(
                        e,
                        viommu::pasid::PasidError::Exhausted { .. }
                            | viommu::pasid::PasidError::QuotaExceeded { .. }
                    ),
                    "alloc: {e}"
                ),
            }
        } else {
            let h = live.swap_remove(rng.below(live.len()));
            log(&mut out, &format!("F {} {h}", now_ns()));
            m.free(h).expect("free");
        }
        if op % 97 == 0 {
            m.release_idle_leases().expect("release");
        }
        // Paced so that the test can kill processes midway.
        thread::sleep(Duration::from_micros(rng.below(300) as u64));
    }
    log(&mut out, &format!("D {}", now_ns()));
}

/// An event of a worker's log.
#[derive(Debug)]
enum Event {
    Recovered(u128, Vec<u32>),
    Granted(u128, u32),
    Freed(u128, u32),
    Done,
}

fn parse_log(path: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut events = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let t = || f.get(1).and_then(|t| t.parse::<u128>().ok());
        let h = || f.get(2).and_then(|h| h.parse::<u32>().ok());
        let ev = match f[0] {
            "R" => t().map(|t| {
                let list = f.get(2).copied().unwrap_or("");
                Event::Recovered(t, list.split(',').filter_map(|x| x.parse().ok()).collect())
            }),
            "G" => t().zip(h()).map(|(t, h)| Event::Granted(t, h)),
            "F" => t().zip(h()).map(|(t, h)| Event::Freed(t, h)),
            "D" => Some(Event::Done),
            _ => None,
        };
        // A torn last line (killed mid-write) parses as nothing.
        events.extend(ev);
    }
    events
}

struct Worker {
    vm: String,
    log: PathBuf,
    child: Child,
    /// Processes started for this VM so far.
    incarnations: u32,
}

fn spawn(state: &Path, vm: &str, log: &Path, seed: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_process",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("PASID_WORKER_STATE", state)
        .env("PASID_WORKER_VM", vm)
        .env("PASID_WORKER_LOG", log)
        .env("PASID_WORKER_SEED", seed.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the log has `n` recovery lines (the incarnation is up).
fn wait_ready(log: &Path, n: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = parse_log(log)
            .iter()
            .filter(|e| matches!(e, Event::Recovered(..)))
            .count();
        if up >= n {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("worker exited before it was ready: {status}: {err}");
        }
        assert!(Instant::now() < deadline, "worker not ready in time");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn no_host_pasid_is_ever_owned_by_two_sets_across_killed_and_restarted_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|i| {
            let vm = format!("vm-{i}");
            let log = tmp.path().join(format!("{vm}.log"));
            let child = spawn(&state, &vm, &log, 0x9e37_79b9 * (i as u64 + 1));
            Worker {
                vm,
                log,
                child,
                incarnations: 1,
            }
        })
        .collect();
    for w in &mut workers {
        wait_ready(&w.log, 1, &mut w.child);
    }
    // Per VM: (end time of the previous incarnation, its position in the log).
    let mut kills: HashMap<String, Vec<(u128, usize)>> = HashMap::new();
    let mut reclaims: Vec<(u128, Vec<String>)> = Vec::new();
    let mut rng = Rng(0x1234_5678);
    let mut kills_done = 0;
    while kills_done < KILLS {
        thread::sleep(Duration::from_millis(20 + rng.below(60) as u64));
        let i = rng.below(WORKERS);
        let w = &mut workers[i];
        if w.child.try_wait().unwrap().is_some() {
            // Finished: nothing to kill. Reclaim while others run.
            let t = now_ns();
            let (reclaimed, _) = reclaim_dead(&state).unwrap();
            reclaims.push((t, reclaimed.into_iter().map(|r| r.vm_id).collect()));
            if workers
                .iter_mut()
                .all(|w| w.child.try_wait().unwrap().is_some())
            {
                break;
            }
            continue;
        }
        w.child.kill().unwrap();
        w.child.wait().unwrap();
        let t = now_ns();
        let at = parse_log(&w.log).len();
        kills.entry(w.vm.clone()).or_default().push((t, at));
        w.incarnations += 1;
        w.child = spawn(&state, &w.vm, &w.log, rng.next());
        wait_ready(&w.log, w.incarnations as usize, &mut w.child);
        kills_done += 1;
    }
    for w in &mut workers {
        let status = w.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = w.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(status.success(), "{} failed: {err}", w.vm);
    }
    assert!(kills_done >= KILLS / 2, "only {kills_done} kills happened");
    let end = now_ns();
    let (reclaimed, live) = reclaim_dead(&state).unwrap();
    assert!(live.is_empty(), "no daemon runs any more: {live:?}");
    reclaims.push((end, reclaimed.into_iter().map(|r| r.vm_id).collect()));

    // Ownership intervals per host PASID: (start, end, vm).
    let mut intervals: BTreeMap<u32, Vec<(u128, u128, String)>> = BTreeMap::new();
    for w in &workers {
        let events = parse_log(&w.log);
        let vm_kills = kills.get(&w.vm).cloned().unwrap_or_default();
        let mut open: BTreeMap<u32, u128> = BTreeMap::new();
        let mut close = |open: &mut BTreeMap<u32, u128>, h: u32, t: u128| {
            let start = open.remove(&h).expect("closing an open interval");
            intervals
                .entry(h)
                .or_default()
                .push((start, t, w.vm.clone()));
        };
        let mut kill_iter = vm_kills.iter().peekable();
        let mut done = false;
        for (pos, ev) in events.iter().enumerate() {
            // A kill before this event ends every open interval.
            while let Some(&&(t_kill, at)) = kill_iter.peek() {
                if at > pos {
                    break;
                }
                // The next event is the restarted process's recovery.
                let Event::Recovered(_, recovered) = ev else {
                    panic!("{}: no recovery after a kill", w.vm);
                };
                let held: BTreeSet<u32> = open.keys().copied().collect();
                let got: BTreeSet<u32> = recovered.iter().copied().collect();
                let missing: Vec<_> = held.difference(&got).collect();
                let extra: Vec<_> = got.difference(&held).collect();
                assert!(
                    missing.is_empty(),
                    "{}: lost {missing:?} across a kill",
                    w.vm
                );
                assert!(extra.len() <= 1, "{}: recovered unknown {extra:?}", w.vm);
                for h in held {
                    close(&mut open, h, t_kill);
                }
                kill_iter.next();
            }
            match ev {
                Event::Recovered(t, list) => {
                    for &h in list {
                        assert!(open.insert(h, *t).is_none());
                    }
                }
                Event::Granted(t, h) => {
                    assert!(open.insert(*h, *t).is_none(), "{}: {h} granted twice", w.vm);
                }
                Event::Freed(t, h) => close(&mut open, *h, *t),
                Event::Done => done = true,
            }
        }
        assert!(done, "{}: last incarnation did not finish", w.vm);
        // Still held at exit: owned until the reclaim that took them.
        let t_reclaim = reclaims
            .iter()
            .find(|(_, vms)| vms.contains(&w.vm))
            .map(|(t, _)| *t)
            .expect("every set was reclaimed");
        for h in open.keys().copied().collect::<Vec<_>>() {
            close(&mut open, h, t_reclaim);
        }
    }
    let mut grants = 0;
    for (h, mut list) in intervals {
        assert!((1..=MAX).contains(&h), "PASID {h} outside the space");
        grants += list.len();
        list.sort();
        for pair in list.windows(2) {
            let ((_, end_a, vm_a), (start_b, _, vm_b)) = (&pair[0], &pair[1]);
            assert!(
                end_a <= start_b,
                "host PASID {h} owned by {vm_a} and {vm_b} at once"
            );
        }
    }
    assert!(
        grants > WORKERS * OPS as usize / 3,
        "too few grants: {grants}"
    );
    eprintln!("{WORKERS} processes, {kills_done} killed and restarted, {grants} ownership intervals checked");

    // Nothing leaked: the database is empty and a new VM gets everything.
    let mut store = Store::open_existing(&state).unwrap();
    assert!(store.sets().unwrap().is_empty());
    assert!(store.all_leases().unwrap().is_empty());
    drop(store);
    let mut m = PasidManager::open(PasidOptions {
        vm_id: "last".into(),
        bits: BITS,
        quota: MAX,
        state_dir: state,
    })
    .unwrap();
    let all: BTreeSet<u32> = std::iter::from_fn(|| m.alloc(1, MAX).ok()).collect();
    assert_eq!(all.len(), MAX as usize);
}
