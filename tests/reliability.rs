// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the daemon promises under hostile guests, VMMs, local clients and
//! careless operators (README, "Reliability"), one test per promise,
//! against the real daemon binary.
//!
//! Every test is bounded in time: a daemon that wedges, spins or never
//! answers fails the test, it never hangs the suite. `VDI_TEST_BIN` runs
//! the file against another build (tests/common).

mod common;

use std::{
    fs,
    io::{ErrorKind, Read, Write},
    os::{
        fd::{AsFd, AsRawFd},
        unix::{fs::MetadataExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    bin, cpu_time, driver::Buf, output_within, proc_status, wait_within, Daemon, Guest,
    GuestOptions, DATA_AREA,
};
use viommu::wire::*;
use viommu_protocol::{
    messages::{Bye, Hello, Welcome},
    FrameReader, Message, HELLO_F_CACHE, HELLO_F_SUBSCRIBE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const EP: u32 = 0x20;
const PAGE: u64 = 0x1000;

// ---------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------

/// A control connection that said HELLO with `flags` and reads nothing.
fn hello(control: &Path, flags: u32) -> UnixStream {
    let mut s = UnixStream::connect(control).unwrap();
    s.write_all(&Message::from(Hello::new(flags)).encode())
        .unwrap();
    s
}

/// Reads messages of one connection with a deadline per message.
struct Reader(FrameReader);

impl Reader {
    fn new(s: &UnixStream) -> Self {
        let s = s.try_clone().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Reader(FrameReader::new(s))
    }

    /// The next message; `None` when the daemon closed the connection.
    /// Fails the test if nothing comes within 5 s.
    fn next(&mut self) -> Option<Message> {
        match self.0.next(Duration::ZERO) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("no message from the daemon: {e}"),
        }
    }
}

/// Whether the daemon has closed `s` (after whatever it sent last).
fn closed_by_daemon(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// MAP requests of `n` pages from `first_iova`, one page each.
fn maps(domain: u32, first_iova: u64, n: u64) -> Vec<MapReq> {
    (0..n)
        .map(|i| {
            let iova = first_iova + i * PAGE;
            MapReq::new(domain, iova, iova + PAGE - 1, DATA_AREA, RW)
        })
        .collect()
}

/// Submits `reqs` as one batch (one kick); every one must succeed.
fn submit_ok<T: vm_memory::ByteValued>(g: &mut Guest, reqs: &[T]) {
    let parts: Vec<(&[u8], usize)> = reqs
        .iter()
        .map(|r| (readable_part(r), REQ_TAIL_SIZE))
        .collect();
    for (i, c) in g.submit(&parts).iter().enumerate() {
        assert_eq!(
            c.status(),
            Some(VIRTIO_IOMMU_S_OK),
            "request {i} of the batch"
        );
    }
}

/// Maps `n` pages from IOVA 0 of domain 1 in batches of 128 (a request
/// takes two of the ring's 256 descriptors).
fn populate(g: &mut Guest, n: u64) {
    let mut at = 0;
    while at < n {
        let k = (n - at).min(128);
        submit_ok(g, &maps(1, at * PAGE, k));
        at += k;
    }
}

/// Starts the daemon binary with `args`, expecting it to refuse to
/// start: its exit status and stderr. A daemon still running after 10 s
/// is killed and the test fails.
fn start_fails(args: &[&str]) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(args).env("RUST_LOG", "info");
    let out = output_within(&mut cmd, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "daemon {args:?} exited with success: {stderr}"
    );
    stderr
}

/// A daemon command that runs in the background with its own log.
struct Spawned {
    child: std::process::Child,
    log: PathBuf,
}

impl Spawned {
    fn start(args: &[&str], log: PathBuf) -> Spawned {
        let child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Spawned { child, log }
    }

    /// Its exit status, if it exits within `timeout`.
    fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_within(&mut self.child, timeout)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pasid_admin_sets(state: &Path) -> Option<serde_json::Value> {
    let out = output_within(
        Command::new(bin())
            .args(["pasid-admin", "--state-dir"])
            .arg(state)
            .args(["list", "--json"]),
        Duration::from_secs(10),
    );
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn vm_ids(sets: &serde_json::Value) -> Vec<String> {
    sets.as_array()
        .or_else(|| sets["sets"].as_array())
        .map(|a| {
            a.iter()
                .map(|s| s["vm_id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn state_args<'a>(state: &'a Path, vm: &'a str) -> Vec<&'a str> {
    vec!["--state-dir", state.to_str().unwrap(), "--vm-id", vm]
}

fn host_pasids(d: &Daemon) -> Vec<u64> {
    d.ctl(&["pasids"])["pasids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host"].as_u64().unwrap())
        .collect()
}

// ---------------------------------------------------------------------
// 1. A hostile guest
// ---------------------------------------------------------------------

/// A driver that publishes an avail index more than a queue size ahead
/// of the device's broke its ring: that queue stops (one log line), and
/// the daemon stays idle, quiet and responsive to `ctl`, to a new
/// frontend and to SIGTERM.
#[test]
fn a_guest_that_breaks_its_ring_stops_that_queue_not_the_daemon() {
    let mut d = Daemon::start(&["--boot-bypass", "off"]);
    let pid = d.pid();
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    // 5000 requests "available" on a 256-entry ring.
    let ahead = g.rq.avail_idx().wrapping_add(5000);
    g.rq.publish_avail_idx(&g.mem, ahead);
    g.kicks[0].write(1).unwrap();
    thread::sleep(Duration::from_millis(300));
    let log_before = fs::metadata(&d.log).unwrap().len();
    let cpu_before = cpu_time(pid);
    // The guest keeps kicking the broken queue for a second.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        g.kicks[0].write(1).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    let cpu = cpu_time(pid) - cpu_before;
    let wall = t.elapsed();
    assert!(
        cpu < wall / 4,
        "the daemon used {cpu:?} of CPU in {wall:?} on a broken ring"
    );
    let grown = fs::metadata(&d.log).unwrap().len() - log_before;
    assert!(grown < 2048, "the log grew by {grown} bytes in {wall:?}");
    let broken: Vec<String> = d
        .log_text()
        .lines()
        .filter(|l| l.contains("broken"))
        .map(String::from)
        .collect();
    assert_eq!(broken.len(), 1, "{broken:#?}");
    assert!(broken[0].contains("5001"), "{}", broken[0]);
    // Inspection still answers, and the rest of the device state is kept.
    let status = d.ctl(&["status"]);
    assert_eq!(status["frontend_connected"], true, "{status}");
    // The VMM gives up on this connection; the next one is served.
    drop(g);
    let mut g = Guest::connect_within(&d.socket, GuestOptions::default(), Duration::from_secs(5));
    assert_eq!(g.attach(2, EP + 1), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(2, 0, PAGE - 1, DATA_AREA, RW), VIRTIO_IOMMU_S_OK);
    drop(g);
    let status = d.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
}

/// A broken event ring is left alone as well: kicks cost nothing and
/// log nothing more than one line.
#[test]
fn a_guest_that_breaks_its_event_ring_cannot_flood_the_log() {
    let d = Daemon::start(&[]);
    let pid = d.pid();
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let ahead = g.eq.avail_idx().wrapping_add(5000);
    g.eq.publish_avail_idx(&g.mem, ahead);
    let log_before = fs::metadata(&d.log).unwrap().len();
    let cpu_before = cpu_time(pid);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        g.kicks[1].write(1).unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    let cpu = cpu_time(pid) - cpu_before;
    assert!(cpu < t.elapsed() / 4, "{cpu:?} of CPU");
    let grown = fs::metadata(&d.log).unwrap().len() - log_before;
    assert!(
        grown < 2048,
        "the log grew by {grown} bytes:\n{}",
        d.log_text()
    );
    // The request queue still works.
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
}

/// A request the guest can repeat (malformed, refused) is logged at most
/// about once a second however often it comes.
#[test]
fn errors_a_guest_can_repeat_are_rate_limited_in_the_log() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let log_before = fs::metadata(&d.log).unwrap().len();
    // 2000 chains whose readable part follows a writable one, 250 a batch.
    for _ in 0..8 {
        let chains: Vec<Vec<Buf>> = (0..250)
            .map(|_| {
                vec![
                    Buf {
                        addr: DATA_AREA,
                        len: 4,
                        writable: true,
                    },
                    Buf {
                        addr: DATA_AREA + 0x100,
                        len: 16,
                        writable: false,
                    },
                ]
            })
            .collect();
        for (_, len) in g.submit_chains(&chains) {
            assert_eq!(len, 0);
        }
    }
    let grown = fs::metadata(&d.log).unwrap().len() - log_before;
    assert!(grown < 4096, "the log grew by {grown} bytes");
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
}

// ---------------------------------------------------------------------
// 2. Control clients cannot stall the guest
// ---------------------------------------------------------------------

/// 63 subscribers that never read: a guest batch waits at most the
/// client timeout, not the timeout once per client.
#[test]
fn a_guest_batch_waits_at_most_the_client_timeout_however_many_clients_stall() {
    let d = Daemon::start(&["--boot-bypass", "off", "--client-timeout-ms", "100"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    let stuck: Vec<UnixStream> = (0..63)
        .map(|_| hello(&d.control, HELLO_F_SUBSCRIBE))
        .collect();
    // `ctl` counts itself.
    d.wait_for(
        || d.ctl(&["status"])["clients"] == 64,
        "63 subscribers to register",
    );
    // 120 batches of 64 MAPs: their events fill every subscriber's socket
    // after a few dozen.
    let mut slowest = Duration::ZERO;
    for b in 0..120 {
        let t = Instant::now();
        submit_ok(&mut g, &maps(1, b * 64 * PAGE, 64));
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a batch of 64 MAPs took {slowest:?} with 63 stalled subscribers"
    );
    drop(stuck);
}

/// A subscriber reading its replay (100k mappings, ~5 MB) slowly does
/// not delay the guest; once it cannot keep up with the live events it
/// is disconnected with a reason.
#[test]
fn a_slow_subscriber_neither_stalls_the_guest_nor_grows_without_bound() {
    let d = Daemon::start(&["--boot-bypass", "off", "--client-timeout-ms", "100"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    let t = Instant::now();
    populate(&mut g, 100_000);
    eprintln!("100k mappings in {:?}", t.elapsed());
    let sub = hello(&d.control, HELLO_F_SUBSCRIBE);
    let stop = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    let reader = {
        let (mut sub, stop, read) = (sub.try_clone().unwrap(), stop.clone(), read.clone());
        thread::spawn(move || {
            // ~800 KB/s: the replay alone takes about six seconds.
            let mut buf = vec![0u8; 16 << 10];
            sub.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                match sub.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => read.fetch_add(n as u64, Ordering::Relaxed),
                    Err(_) => 0,
                };
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The replay is being written.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read.load(Ordering::Relaxed) < 256 << 10 {
        assert!(Instant::now() < deadline, "no replay");
        thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    eprintln!(
        "replay under way: {} bytes read",
        read.load(Ordering::Relaxed)
    );
    assert_eq!(
        g.map(1, 0x1_0000_0000, 0x1_0000_0fff, DATA_AREA, RW),
        VIRTIO_IOMMU_S_OK
    );
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(1),
        "a MAP took {waited:?} while a subscriber read its replay"
    );
    assert!(
        read.load(Ordering::Relaxed) < 4 << 20,
        "the replay was already read: the test proves nothing"
    );
    // The subscriber stops reading; the guest keeps changing mappings.
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let scratch = 0x2_0000_0000u64;
    let unmaps: Vec<UnmapReq> = (0..128)
        .map(|i| UnmapReq::new(1, scratch + i * PAGE, scratch + i * PAGE + PAGE - 1))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        submit_ok(&mut g, &maps(1, scratch, 128));
        submit_ok(&mut g, &unmaps);
        if i % 32 == 31 && d.ctl(&["stats"])["clients_dropped"].as_u64() == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a subscriber that reads nothing was never counted as dropped: {}",
            d.ctl(&["stats"]),
        );
    }
    eprintln!("dropped after {:?}", t.elapsed());
    assert!(d.log_text().contains("cannot keep up"), "{}", d.log_text());
    let mut sub = sub;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !closed_by_daemon(&mut sub) {
        assert!(Instant::now() < deadline, "connection not closed");
        thread::sleep(Duration::from_millis(10));
    }
}

/// `--poll-us` longer than the client timeout does not lengthen the wait:
/// polling happens within the same deadline.
#[test]
fn polling_does_not_extend_the_wait_past_the_client_timeout() {
    let d = Daemon::start(&[
        "--boot-bypass",
        "off",
        "--client-timeout-ms",
        "100",
        "--poll-us",
        "2000000",
    ]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.map(1, 0, PAGE - 1, DATA_AREA, RW), VIRTIO_IOMMU_S_OK);
    // A caching client that never acknowledges.
    let _stuck = hello(&d.control, HELLO_F_CACHE);
    d.wait_for(
        || d.ctl(&["status"])["clients"] == 2,
        "the stuck client to register",
    );
    let t = Instant::now();
    assert_eq!(g.unmap(1, 0, PAGE - 1), VIRTIO_IOMMU_S_OK);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(1),
        "UNMAP took {waited:?} with --poll-us 2 s and --client-timeout-ms 100"
    );
}

// ---------------------------------------------------------------------
// 3. Control-socket limits before HELLO
// ---------------------------------------------------------------------

/// 300 peers trickling a HELLO one byte a second: none is kept past the
/// 5 s HELLO deadline, and none costs a thread.
#[test]
fn peers_that_trickle_their_hello_are_dropped_at_one_deadline() {
    let d = Daemon::start(&[]);
    let pid = d.pid();
    let threads_before = proc_status(pid, "Threads");
    let frame = Message::from(Hello::new(0)).encode();
    let mut peers: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&d.control).unwrap())
        .collect();
    let start = Instant::now();
    let mut most_threads = 0;
    for byte in frame.iter().take(8) {
        for p in &mut peers {
            let _ = p.write(std::slice::from_ref(byte));
        }
        most_threads = most_threads.max(proc_status(pid, "Threads"));
        thread::sleep(Duration::from_secs(1));
    }
    assert!(
        most_threads <= threads_before + 4,
        "{most_threads} threads for 300 peers (from {threads_before})"
    );
    // Past the deadline (5 s from accept, plus margin): all were closed.
    assert!(start.elapsed() >= Duration::from_secs(7));
    let mut open = 0;
    for p in &mut peers {
        open += usize::from(!closed_by_daemon(p));
    }
    assert_eq!(open, 0, "{open} trickling peers still connected");
    assert_eq!(d.ctl(&["status"])["clients"], 1);
}

/// 100 peers each sending most of a 4 MiB frame before HELLO cannot make
/// the daemon buffer it.
#[test]
fn partial_frames_before_hello_are_not_buffered() {
    let d = Daemon::start(&[]);
    let pid = d.pid();
    let rss_before = proc_status(pid, "VmRSS");
    let body = vec![0x5au8; (4 << 20) - 1];
    let peers: Vec<UnixStream> = (0..100)
        .map(|_| {
            let mut s = UnixStream::connect(&d.control).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.write_all(&(4u32 << 20).to_le_bytes());
            let _ = s.write_all(&body);
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let grown_mb = proc_status(pid, "VmRSS").saturating_sub(rss_before) / 1024;
    assert!(
        grown_mb < 64,
        "the daemon grew by {grown_mb} MB for 100 partial frames"
    );
    drop(peers);
    assert_eq!(d.ctl(&["status"])["clients"], 1);
}

/// A burst of 300 HELLOs admits exactly the 64 clients of the limit, and
/// `ctl` still gets in.
#[test]
fn a_burst_of_hellos_admits_exactly_the_limit_and_ctl_still_gets_in() {
    let d = Daemon::start(&[]);
    let mut peers: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&d.control).unwrap())
        .collect();
    let frame = Message::from(Hello::new(HELLO_F_CACHE)).encode();
    for p in &mut peers {
        let _ = p.write_all(&frame);
    }
    let mut welcomed = 0;
    let mut refused = 0;
    for p in &peers {
        match Reader::new(p).next() {
            Some(Message::Welcome(Welcome { .. })) => welcomed += 1,
            Some(Message::Bye(Bye { .. })) | None => refused += 1,
            Some(m) => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!((welcomed, refused), (64, 236));
    // The 64 clients stay connected; `ctl` uses the slot kept for it.
    let status = d.ctl(&["status"]);
    assert_eq!(status["clients"], 65, "{status}");
    drop(peers);
}

// ---------------------------------------------------------------------
// 4. Files at the socket paths
// ---------------------------------------------------------------------

/// A regular file given as `--socket-path` or `--control-socket` is an
/// error naming the path, and is left as it was.
#[test]
fn a_file_at_a_socket_path_is_an_error_and_is_left_alone() {
    for which in ["--socket-path", "--control-socket"] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious");
        fs::write(&file, b"not a socket").unwrap();
        let (sock, ctl) = if which == "--socket-path" {
            (file.clone(), dir.path().join("control.sock"))
        } else {
            (dir.path().join("viommu.sock"), file.clone())
        };
        let state = dir.path().join("state");
        let err = start_fails(&[
            "--socket-path",
            sock.to_str().unwrap(),
            "--control-socket",
            ctl.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ]);
        assert!(err.contains(file.to_str().unwrap()), "{which}: {err}");
        assert_eq!(fs::read(&file).unwrap(), b"not a socket", "{which}");
        // Nothing else was left behind.
        for p in [&sock, &ctl] {
            assert!(p == &file || !p.exists(), "{which}: {} left", p.display());
        }
    }
}

/// A second daemon given the live vhost-user socket of a first one (with
/// another VM id) fails with an error naming it; the first keeps its
/// socket, and the failed start leaves no PASID set behind.
#[test]
fn a_second_daemon_cannot_take_over_a_live_socket() {
    let state = tempfile::tempdir().unwrap();
    let a = Daemon::start(&state_args(state.path(), "vm-a"));
    let dir = tempfile::tempdir().unwrap();
    let b_ctl = dir.path().join("b.ctl");
    let mut args = vec![
        "--socket-path",
        a.socket.to_str().unwrap(),
        "--control-socket",
        b_ctl.to_str().unwrap(),
    ];
    args.extend(state_args(state.path(), "vm-b"));
    let mut b = Spawned::start(&args, dir.path().join("b.log"));
    let status = b.exit_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a second daemon started on a live socket: {:?}\n{}",
        status,
        b.log()
    );
    assert!(b.log().contains(a.socket.to_str().unwrap()), "{}", b.log());
    assert!(!b_ctl.exists(), "the failed daemon left its control socket");
    // The first daemon still serves its socket.
    let mut g = Guest::connect_within(&a.socket, GuestOptions::default(), Duration::from_secs(5));
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    let sets = pasid_admin_sets(state.path()).expect("pasid-admin list");
    assert_eq!(vm_ids(&sets), vec!["vm-a".to_string()], "{sets}");
}

/// A second daemon given the live control socket of a first one, or
/// failing at start-up for any reason, never removes that socket: `ctl`
/// still reaches the first daemon, and no PASID set is left behind.
#[test]
fn a_failed_start_never_removes_a_live_control_socket() {
    let state = tempfile::tempdir().unwrap();
    let a = Daemon::start(&state_args(state.path(), "vm-a"));
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("own.sock");
    let missing = dir.path().join("no-such-dir").join("s.sock");
    for (socket, vm) in [(&own, "vm-c"), (&missing, "vm-d")] {
        let mut args = vec![
            "--socket-path",
            socket.to_str().unwrap(),
            "--control-socket",
            a.control.to_str().unwrap(),
        ];
        args.extend(state_args(state.path(), vm));
        let mut c = Spawned::start(&args, dir.path().join(format!("{vm}.log")));
        let status = c.exit_within(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| !s.success()),
            "{vm}: started on a live control socket:\n{}",
            c.log()
        );
        drop(c);
        assert!(!socket.exists(), "{vm}: the failed start left its socket");
        assert_eq!(
            a.ctl(&["status"])["frontend_connected"],
            false,
            "{vm}: the first daemon's control socket was taken"
        );
    }
    let sets = pasid_admin_sets(state.path()).expect("pasid-admin list");
    assert_eq!(vm_ids(&sets), vec!["vm-a".to_string()], "{sets}");
}

/// A socket nobody listens on (left by a daemon that was killed) is
/// replaced; at exit the daemon removes only the sockets it created.
#[test]
fn a_stale_socket_is_replaced_and_only_our_own_socket_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["viommu.sock", "control.sock"] {
        drop(std::os::unix::net::UnixListener::bind(dir.path().join(name)).unwrap());
        assert!(dir.path().join(name).exists());
    }
    let mut d = Daemon::start_in(dir, &[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
    drop(g);
    assert_eq!(d.ctl(&["status"])["clients"], 1);
    // Someone else's file now sits at the control socket's path.
    let moved = d.dir.path().join("moved.sock");
    fs::rename(&d.control, &moved).unwrap();
    fs::write(&d.control, b"someone else's").unwrap();
    assert!(d.signal_and_wait("TERM").success());
    assert_eq!(fs::read(&d.control).unwrap(), b"someone else's");
    assert!(!d.socket.exists(), "the daemon's own socket was left");
}

// ---------------------------------------------------------------------
// 5. A VMM's memory table
// ---------------------------------------------------------------------

/// A region that extends past the end of its file is refused at
/// SET_MEM_TABLE with an error, instead of a SIGBUS when it is touched.
#[test]
fn a_memory_region_past_the_end_of_its_file_is_refused() {
    let mut d = Daemon::start(&[]);
    let file = tempfile::tempfile().unwrap();
    file.set_len(common::MEM_SIZE).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        common::MEM_SIZE as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    // The file holds the first 4 MiB only (rings, requests and DATA_AREA
    // live there).
    file.set_len(4 << 20).unwrap();
    match Guest::try_connect_with_memory(&d.socket, GuestOptions::default(), mem) {
        Err(_) => {}
        Ok(mut g) => {
            // The daemon took the table: a reply written past the end of
            // the file kills it. (The test never touches that part.)
            let req = AttachReq::new(1, EP, 0);
            let ro = readable_part(&req);
            g.mem
                .write_slice(ro, GuestAddress(DATA_AREA))
                .expect("request in the file");
            let chain = vec![
                Buf {
                    addr: DATA_AREA,
                    len: ro.len() as u32,
                    writable: false,
                },
                Buf {
                    addr: 8 << 20,
                    len: 4,
                    writable: true,
                },
            ];
            g.rq.add(&g.mem, &chain);
            g.rq.publish(&g.mem);
            g.kicks[0].write(1).unwrap();
            thread::sleep(Duration::from_millis(500));
            assert!(d.alive(), "the daemon died:\n{}", d.log_text());
            panic!("a memory region past the end of its file was accepted");
        }
    }
    assert!(d.alive(), "{}", d.log_text());
    assert!(d.log_text().contains("past the end"), "{}", d.log_text());
    // The next VMM connection is served.
    let mut g = Guest::connect_within(&d.socket, GuestOptions::default(), Duration::from_secs(5));
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK);
}

// ---------------------------------------------------------------------
// 6. Smaller ones
// ---------------------------------------------------------------------

/// `ctl ... | head` and `pasid-admin ... | head`: a closed output ends
/// the command quietly, never with a panic (exit 101).
#[test]
fn ctl_and_pasid_admin_exit_quietly_on_a_closed_pipe() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&state_args(state.path(), "vm-a"));
    let commands: [Vec<&std::ffi::OsStr>; 2] = [
        vec![
            "ctl".as_ref(),
            "--control-socket".as_ref(),
            d.control.as_os_str(),
            "status".as_ref(),
        ],
        vec![
            "pasid-admin".as_ref(),
            "--state-dir".as_ref(),
            state.path().as_os_str(),
            "list".as_ref(),
        ],
    ];
    for args in commands {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        drop(read_end);
        let mut child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_within(&mut child, Duration::from_secs(10)).expect("command hangs");
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_ne!(status.code(), Some(101), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A second HELLO is answered with BYE and the connection is closed.
#[test]
fn a_second_hello_ends_the_connection_with_bye() {
    let d = Daemon::start(&[]);
    let mut s = hello(&d.control, 0);
    let mut r = Reader::new(&s);
    assert!(matches!(r.next(), Some(Message::Welcome(_))));
    s.write_all(&Message::from(Hello::new(0)).encode()).unwrap();
    match r.next() {
        Some(Message::Bye(Bye { message })) => assert!(message.contains("HELLO"), "{message}"),
        other => panic!("second HELLO answered with {other:?}"),
    }
    assert!(r.next().is_none(), "connection kept after a second HELLO");
}

/// Flags the daemon does not know are not granted in WELCOME.
#[test]
fn unknown_hello_flags_are_not_granted() {
    let d = Daemon::start(&[]);
    let s = hello(&d.control, HELLO_F_CACHE | 1 << 31 | 1 << 20);
    match Reader::new(&s).next() {
        Some(Message::Welcome(w)) => assert_eq!(w.flags, HELLO_F_CACHE),
        other => panic!("{other:?}"),
    }
}

/// `--socket-fd` naming something that is not a listening Unix stream
/// socket stops the daemon at start-up with an error naming the fd.
#[test]
fn socket_fd_that_is_not_a_listening_unix_socket_is_refused_at_start() {
    use nix::{
        fcntl::{fcntl, FcntlArg, FdFlag},
        sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr},
    };
    let dir = tempfile::tempdir().unwrap();
    let bound = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        bound.as_raw_fd(),
        &UnixAddr::new(&dir.path().join("bound.sock")).unwrap(),
    )
    .unwrap();
    let dgram = std::os::unix::net::UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for (what, fd) in [
        ("bound, not listening", bound.as_fd()),
        ("datagram", dgram.as_fd()),
        ("TCP listener", tcp.as_fd()),
    ] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        let fd_num = fd.as_raw_fd();
        let fd_arg = fd_num.to_string();
        let state = dir.path().join("state");
        let err = start_fails(&[
            "--socket-fd",
            &fd_arg,
            "--vm-id",
            "vm-fd",
            "--state-dir",
            state.to_str().unwrap(),
        ]);
        assert!(
            err.contains(&format!("--socket-fd {fd_num}")),
            "{what}: {err}"
        );
        assert!(err.lines().count() < 10, "{what}: {err}");
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    }
}

/// Sets the soft RLIMIT_NOFILE of process `pid`; returns the old one.
fn set_fd_limit(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the current limits into `old`, a valid rlimit.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit; the old value is not asked for.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// A daemon out of file descriptors cannot accept its frontend: it
/// retries with a growing pause, logs it rarely, and serves the frontend
/// once descriptors are back.
#[test]
fn an_accept_that_keeps_failing_neither_spins_nor_floods_the_log() {
    let mut d = Daemon::start(&[]);
    let pid = d.pid();
    let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let old = set_fd_limit(pid, open);
    let log_before = fs::metadata(&d.log).unwrap().len();
    let cpu_before = cpu_time(pid);
    // A frontend knocks: accepting it fails for want of descriptors.
    let knock = UnixStream::connect(&d.socket).unwrap();
    thread::sleep(Duration::from_secs(2));
    assert!(d.alive(), "the daemon exited:\n{}", d.log_text());
    let cpu = cpu_time(pid) - cpu_before;
    assert!(cpu < Duration::from_millis(500), "{cpu:?} of CPU in 2 s");
    let grown = fs::metadata(&d.log).unwrap().len() - log_before;
    assert!(
        grown < 1024,
        "the log grew by {grown} bytes in 2 s:\n{}",
        d.log_text()
    );
    set_fd_limit(pid, old);
    drop(knock);
    let mut g = Guest::connect_within(&d.socket, GuestOptions::default(), Duration::from_secs(5));
    assert_eq!(g.attach(1, EP), VIRTIO_IOMMU_S_OK, "{}", d.log_text());
}

/// Limits of zero and a mapping granule larger than the IOVA space are
/// refused at start-up.
#[test]
fn zero_limits_and_an_oversized_granule_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    for (args, needle) in [
        (&["--max-mappings", "0"][..], "mapping"),
        (&["--max-domains", "0"], "domain"),
        (
            &["--page-size-mask", "0x100000", "--input-range-bits", "16"],
            "granule",
        ),
    ] {
        let mut all = vec!["--socket-path", socket.to_str().unwrap()];
        all.extend(args);
        let err = start_fails(&all);
        assert!(err.to_lowercase().contains(needle), "{args:?}: {err}");
        assert!(!socket.exists());
    }
}

/// An empty (0-byte) state file is refused with a message naming it,
/// never adopted as an empty allocator, here after a VM's set existed.
#[test]
fn an_empty_state_file_is_refused_not_adopted() {
    let state = tempfile::tempdir().unwrap();
    let args = state_args(state.path(), "vm-a");
    let mut d = Daemon::start(&args);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.pasid_alloc(1, 1000), (VIRTIO_IOMMU_S_OK, 1));
    drop(g);
    assert!(!d.signal_and_wait("KILL").success());
    let db = state.path().join("pasids.sqlite3");
    fs::write(&db, b"").unwrap();
    for ext in ["-wal", "-shm"] {
        let _ = fs::remove_file(state.path().join(format!("pasids.sqlite3{ext}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mut all = vec!["--socket-path", socket.to_str().unwrap()];
    all.extend(&args);
    let err = start_fails(&all);
    assert!(err.contains(db.to_str().unwrap()), "{err}");
    assert!(err.contains("empty"), "{err}");
    assert_eq!(fs::metadata(&db).unwrap().len(), 0, "the file was touched");
    // A fresh state directory is still created as needed.
    let fresh = tempfile::tempdir().unwrap();
    let d = Daemon::start(&state_args(&fresh.path().join("new"), "vm-b"));
    assert_eq!(d.ctl(&["pasids"])["pasids"], serde_json::json!([]));
}

/// The database is checkpointed while the daemon runs and at a clean
/// exit: losing the `-wal` file after a crash loses nothing committed
/// more than a moment before, and nothing at all after a clean exit.
#[test]
fn pasids_survive_the_loss_of_the_wal_file() {
    let state = tempfile::tempdir().unwrap();
    let args = state_args(state.path(), "vm-a");
    let db = state.path().join("pasids.sqlite3");
    let wal = state.path().join("pasids.sqlite3-wal");
    let mut d = Daemon::start(&args);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let got: Vec<u32> = (0..3).map(|_| g.pasid_alloc(1, 1000).1).collect();
    assert_eq!(got, vec![1, 2, 3]);
    // Within a few seconds the database file alone holds the set.
    let copy = tempfile::tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        fs::copy(&db, copy.path().join("pasids.sqlite3")).unwrap();
        let active = pasid_admin_sets(copy.path()).and_then(|sets| {
            let sets = sets.as_array().or_else(|| sets["sets"].as_array())?.clone();
            sets.iter()
                .find(|s| s["vm_id"] == "vm-a")
                .and_then(|s| s["active"].as_u64())
        });
        if active == Some(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the database file never held the set without its -wal"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(g);
    assert!(!d.signal_and_wait("KILL").success());
    fs::remove_file(&wal).unwrap();
    let _ = fs::remove_file(state.path().join("pasids.sqlite3-shm"));
    let mut d = Daemon::start(&args);
    assert_eq!(host_pasids(&d), vec![1, 2, 3], "{}", d.log_text());
    // A clean exit leaves everything in the database file.
    assert!(d.signal_and_wait("TERM").success());
    let wal_len = fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(wal_len, 0, "-wal not checkpointed at exit");
    assert!(fs::metadata(&db).unwrap().size() > 0);
}
