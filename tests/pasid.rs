// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-visible PASID allocation and the host-wide PASID state, end to
//! end: the real daemon binary, a guest on the real vhost-user queue path,
//! `ctl pasids`, `pasid-admin`, restarts after SIGKILL and bad state files.

mod common;

use std::{
    path::Path,
    process::{Command, Output},
};

use common::{Daemon, Guest, GuestOptions, BIN};
use vhost::vhost_user::VhostUserFrontend;
use viommu::wire::*;

fn state_args(state: &Path, vm: &'static str) -> Vec<String> {
    vec![
        "--state-dir".into(),
        state.to_str().unwrap().into(),
        "--vm-id".into(),
        vm.into(),
    ]
}

fn start(args: &[String]) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&args)
}

/// Runs the daemon in the foreground expecting it to fail at start-up;
/// returns its stderr.
fn failing_start(prefix: &[&str], args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let out = Command::new(prefix.first().copied().unwrap_or(BIN))
        .args(prefix.iter().skip(1))
        .args(if prefix.is_empty() { vec![] } else { vec![BIN] })
        .arg("--socket-path")
        .arg(&socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "daemon started: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!socket.exists(), "socket created before the PASID check");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn admin(state: &Path, args: &[&str]) -> serde_json::Value {
    let out: Output = Command::new(BIN)
        .arg("pasid-admin")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn guest_allocates_and_frees_pasids_through_the_request_queue() {
    let d = Daemon::start(&["--pasid-quota", "3", "--pasid-bits", "12"]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_ne!(g.features & (1 << VIRTIO_IOMMU_F_PASID_ALLOC), 0);
    assert_eq!(g.pasid_alloc(1, 100), (VIRTIO_IOMMU_S_OK, 1));
    assert_eq!(g.pasid_alloc(50, 100), (VIRTIO_IOMMU_S_OK, 50));
    assert_eq!(g.pasid_alloc(1, 100), (VIRTIO_IOMMU_S_OK, 2));
    assert_eq!(g.pasid_alloc(1, 100).0, VIRTIO_IOMMU_S_NOMEM, "quota");
    assert_eq!(g.pasid_free(50), VIRTIO_IOMMU_S_OK);
    assert_eq!(g.pasid_free(50), VIRTIO_IOMMU_S_NOENT, "freed twice");
    assert_eq!(g.pasid_free(77), VIRTIO_IOMMU_S_NOENT, "never allocated");
    assert_eq!(g.pasid_alloc(0, 5).0, VIRTIO_IOMMU_S_RANGE, "PASID 0");
    assert_eq!(
        g.pasid_alloc(1, 4096).0,
        VIRTIO_IOMMU_S_RANGE,
        "beyond 12 bits"
    );
    assert_eq!(g.pasid_alloc(60, 70), (VIRTIO_IOMMU_S_OK, 60));
    let doc = d.ctl(&["pasids"]);
    assert_eq!(doc["mode"], "global");
    assert_eq!(
        (doc["quota"].as_u64(), doc["charged"].as_u64()),
        (Some(3), Some(3))
    );
    let hosts: Vec<u64> = doc["pasids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(
                (p["state"].as_str(), p["refs"].as_u64()),
                (Some("active"), Some(1))
            );
            assert_eq!(
                p["guest"], p["host"],
                "PASID_ALLOC: guest uses the host PASID"
            );
            p["host"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(hosts, vec![1, 2, 60]);
    let sets = doc["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["this_daemon"], true);
    assert_eq!(sets[0]["live"], true);
    assert_eq!(
        sets[0]["vm_id"],
        d.socket.to_str().unwrap(),
        "default VM id"
    );
    let stats = d.ctl(&["stats"]);
    assert_eq!(stats["requests"]["pasid_alloc"], 7);
}

#[test]
fn device_reset_frees_the_guests_pasids() {
    let d = Daemon::start(&[]);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.pasid_alloc(1, 100), (VIRTIO_IOMMU_S_OK, 1));
    assert_eq!(g.pasid_alloc(1, 100), (VIRTIO_IOMMU_S_OK, 2));
    g.fe.reset_device().unwrap();
    drop(g);
    assert_eq!(d.ctl(&["pasids"])["pasids"], serde_json::json!([]));
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.pasid_alloc(1, 100), (VIRTIO_IOMMU_S_OK, 1));
}

#[test]
fn pasid_alloc_is_not_offered_in_identity_mode_or_with_quota_zero() {
    for (args, mode) in [
        (&["--pasid-mode", "identity"][..], "identity"),
        (&["--pasid-quota", "0"], "disabled"),
    ] {
        let d = Daemon::start(args);
        let mut g = Guest::connect(&d.socket, GuestOptions::default());
        assert_eq!(g.features & (1 << VIRTIO_IOMMU_F_PASID_ALLOC), 0, "{mode}");
        let c = g.submit(&[(PasidAllocReq::new(1, 10).readable(), PASID_ALLOC_WRITABLE)]);
        assert_eq!(c[0].used_len, 0, "unknown request in {mode} mode");
        assert_eq!(d.ctl(&["pasids"])["mode"], mode);
        assert!(
            !d.dir.path().join("state").exists(),
            "{mode}: no state opened"
        );
    }
}

#[test]
fn daemon_killed_and_restarted_with_the_same_vm_id_recovers_its_pasids() {
    let state = tempfile::tempdir().unwrap();
    let args = state_args(state.path(), "vm-a");
    let mut d = start(&args);
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    let got: Vec<u32> = (0..3).map(|_| g.pasid_alloc(1, 1000).1).collect();
    assert_eq!(got, vec![1, 2, 3]);
    assert_eq!(g.pasid_free(2), VIRTIO_IOMMU_S_OK);
    drop(g);
    assert!(!d.signal_and_wait("KILL").success());
    let d = start(&args);
    let doc = d.ctl(&["pasids"]);
    let hosts: Vec<u64> = doc["pasids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host"].as_u64().unwrap())
        .collect();
    assert_eq!(hosts, vec![1, 3], "set recovered");
    assert!(d.log_text().contains("recovered"), "{}", d.log_text());
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(
        g.pasid_alloc(1, 1000),
        (VIRTIO_IOMMU_S_OK, 2),
        "2 was freed"
    );
    assert_eq!(
        g.pasid_alloc(1, 1000),
        (VIRTIO_IOMMU_S_OK, 4),
        "1 and 3 are held"
    );
    assert_eq!(g.pasid_free(3), VIRTIO_IOMMU_S_OK, "recovered PASID freed");
}

#[test]
fn second_daemon_with_the_same_vm_id_exits_with_a_clear_error() {
    let state = tempfile::tempdir().unwrap();
    let args = state_args(state.path(), "vm-dup");
    let _first = start(&args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = failing_start(&[], &args);
    assert!(
        err.contains("`vm-dup` is already served by a running daemon"),
        "{err}"
    );
}

#[test]
fn two_daemons_never_hand_out_the_same_host_pasid() {
    let state = tempfile::tempdir().unwrap();
    let mut a_args = state_args(state.path(), "a");
    let mut b_args = state_args(state.path(), "b");
    for args in [&mut a_args, &mut b_args] {
        args.extend(["--pasid-bits", "8", "--pasid-quota", "1000"].map(String::from));
    }
    let (a, b) = (start(&a_args), start(&b_args));
    let mut ga = Guest::connect(&a.socket, GuestOptions::default());
    let mut gb = Guest::connect(&b.socket, GuestOptions::default());
    let mut seen = std::collections::HashSet::new();
    loop {
        let (x, y) = (ga.pasid_alloc(1, 255), gb.pasid_alloc(1, 255));
        for (status, p) in [x, y] {
            if status == VIRTIO_IOMMU_S_OK {
                assert!(seen.insert(p), "host PASID {p} handed to both VMs");
            }
        }
        if x.0 != VIRTIO_IOMMU_S_OK && y.0 != VIRTIO_IOMMU_S_OK {
            assert_eq!((x.0, y.0), (VIRTIO_IOMMU_S_NOMEM, VIRTIO_IOMMU_S_NOMEM));
            break;
        }
    }
    assert_eq!(seen.len(), 255);
}

#[test]
fn pasid_admin_lists_sets_and_reclaims_only_dead_ones() {
    let state = tempfile::tempdir().unwrap();
    let alive = start(&state_args(state.path(), "alive"));
    let mut dead = start(&state_args(state.path(), "dead"));
    for d in [&alive, &dead] {
        let mut g = Guest::connect(&d.socket, GuestOptions::default());
        assert_eq!(g.pasid_alloc(1, 1 << 19).0, VIRTIO_IOMMU_S_OK);
    }
    dead.signal_and_wait("KILL");
    let list = admin(state.path(), &["list"]);
    let brief: Vec<(String, bool, u64)> = list["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["vm_id"].as_str().unwrap().to_owned(),
                s["live"].as_bool().unwrap(),
                s["active"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        vec![("alive".into(), true, 1), ("dead".into(), false, 1)]
    );
    let r = admin(state.path(), &["reclaim"]);
    assert_eq!(r["reclaimed"].as_array().unwrap().len(), 1);
    assert_eq!(r["reclaimed"][0]["vm_id"], "dead");
    assert_eq!(r["reclaimed"][0]["pasids"], 1);
    assert_eq!(r["live"], serde_json::json!(["alive"]));
    let sets = alive.ctl(&["pasids"])["sets"].clone();
    assert_eq!(sets.as_array().unwrap().len(), 1);
    // Human output.
    let out = Command::new(BIN)
        .args(["pasid-admin", "--state-dir"])
        .arg(state.path())
        .arg("list")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("VM ID"));
}

#[test]
fn state_file_that_is_not_a_database_stops_the_daemon_at_startup() {
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("pasids.sqlite3"), vec![0x42u8; 10_000]).unwrap();
    let args = state_args(state.path(), "vm");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = failing_start(&[], &args);
    assert!(err.contains("is not a PASID state database"), "{err}");
    // Left as it was, for the administrator to look at.
    assert_eq!(
        std::fs::read(state.path().join("pasids.sqlite3")).unwrap(),
        vec![0x42u8; 10_000]
    );
}

#[test]
fn full_disk_stops_the_daemon_at_startup() {
    // A 1 KiB file size limit: the database cannot grow, as on a full
    // disk (SIGXFSZ ignored so that writes fail instead).
    let state = tempfile::tempdir().unwrap();
    let args = state_args(state.path(), "vm");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let limit = ["sh", "-c", "trap '' XFSZ; ulimit -f 1; exec \"$0\" \"$@\""];
    let err = failing_start(&limit, &args);
    assert!(err.contains("no space left"), "file size limit: {err}");
    // As root, a really full filesystem too: a 12 KiB tmpfs.
    if nix::unistd::geteuid().is_root() {
        let fs = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=12k", "tmpfs"])
            .arg(fs.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount a tmpfs as root");
        let _unmount = Unmount(fs.path().to_owned());
        let args = state_args(fs.path(), "vm");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = failing_start(&[], &args);
        assert!(err.contains("no space left"), "full tmpfs: {err}");
    }
}

#[test]
fn read_only_state_dir_stops_the_daemon_at_startup() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("ro");
    // A state directory in use, then made read-only.
    let owned = state_args(&dir, "vm");
    start(&owned).signal_and_wait("KILL");
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let root = nix::unistd::geteuid().is_root();
    let _mount = if root {
        // Root ignores permissions: a read-only bind mount it is.
        let ok = Command::new("mount")
            .args(["--bind", "-o", "ro"])
            .arg(&dir)
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot make a read-only bind mount as root");
        Some(Unmount(dir.clone()))
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        None
    };
    let err = failing_start(&[], &args);
    assert!(
        err.contains("Read-only file system")
            || err.contains("Permission denied")
            || err.contains("read-only"),
        "{err}"
    );
}

/// Undoes a bind mount when the test ends, passed or not.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn clean_exit_returns_the_vms_pasids_to_the_host() {
    let state = tempfile::tempdir().unwrap();
    let mut d = start(&state_args(state.path(), "vm-gone"));
    let mut g = Guest::connect(&d.socket, GuestOptions::default());
    assert_eq!(g.pasid_alloc(1, 1000).0, VIRTIO_IOMMU_S_OK);
    drop(g);
    let listed = admin(state.path(), &["list"]).to_string();
    assert!(listed.contains("vm-gone"), "{listed}");
    assert!(d.signal_and_wait("TERM").success());
    assert!(
        d.log_text().contains("VM vm-gone ended"),
        "{}",
        d.log_text()
    );
    let listed = admin(state.path(), &["list"]).to_string();
    assert!(!listed.contains("vm-gone"), "set left behind: {listed}");
}
