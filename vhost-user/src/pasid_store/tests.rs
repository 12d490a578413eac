// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of the durable store: schema, leases, journal, recovery,
//! bad state files, liveness locks.

use std::{collections::BTreeSet, fs, io::Write, ops::RangeInclusive, path::Path};

use rusqlite::Connection;

use super::*;

const MAX12: u32 = (1 << 12) - 1;

fn store(dir: &Path) -> Store {
    Store::open(dir).expect("open store")
}

fn raw(dir: &Path) -> Connection {
    Connection::open(dir.join(DB_FILE)).unwrap()
}

#[test]
fn new_database_gets_our_application_id_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    assert_eq!(s.granule(), GRANULE);
    let c = raw(dir.path());
    let app: i32 = c
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    let version: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(
        (app, version, mode.as_str()),
        (db::APPLICATION_ID, SCHEMA_VERSION, "wal")
    );
    // A second open finds it as it is.
    drop(s);
    store(dir.path());
}

#[test]
fn daemons_creating_the_database_at_once_all_open_it() {
    // The race is narrow: a few rounds on fresh directories.
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let (path, start) = (dir.path().to_owned(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    Store::open(&path).map(|_| ())
                })
            })
            .collect();
        for o in opens {
            let r = o.join().unwrap();
            assert!(r.is_ok(), "{r:?}");
        }
    }
}

#[test]
fn two_store_handles_never_lease_the_same_host_pasid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let mut first = store(&path);
    first.open_set("a", 100, 1).unwrap();
    first.open_set("b", 100, 2).unwrap();
    drop(first);
    // Two handles race from two threads, one granule at a time.
    let start = std::sync::Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|vm| {
            let path = path.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let mut s = store(&path);
                start.wait();
                let mut got = Vec::new();
                loop {
                    let r = s.lease(vm, 1, 1..=MAX12, MAX12).unwrap();
                    if r.is_empty() {
                        return got;
                    }
                    got.extend(r);
                }
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for h in handles {
        let got: Vec<RangeInclusive<u32>> = h.join().unwrap();
        for r in got {
            for p in r {
                assert!(seen.insert(p), "host PASID {p} leased twice");
            }
        }
    }
    assert_eq!(
        seen.len(),
        MAX12 as usize,
        "every PASID leased exactly once"
    );
    assert!(!seen.contains(&0));
}

#[test]
fn leases_are_granules_overlapping_the_range_clipped_to_the_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    s.open_set("a", 10, 1).unwrap();
    assert_eq!(
        s.lease("a", 100, 1..=MAX12, MAX12).unwrap(),
        vec![1..=63, 64..=127]
    );
    assert_eq!(s.lease("a", 1, 200..=201, MAX12).unwrap(), vec![192..=255]);
    // A 5-bit space is smaller than a granule.
    s.open_set("b", 10, 1).unwrap();
    assert!(
        s.lease("b", 1, 1..=31, 31).unwrap().is_empty(),
        "granule 0 is a's"
    );
    s.release("a", &[1..=63]).unwrap();
    assert_eq!(s.lease("b", 1, 1..=31, 31).unwrap(), vec![1..=31]);
}

#[test]
fn release_of_a_lease_not_held_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    s.open_set("a", 10, 1).unwrap();
    s.open_set("b", 10, 1).unwrap();
    let got = s.lease("a", 100, 1..=MAX12, MAX12).unwrap();
    assert!(s.release("b", &got).is_err(), "b does not hold them");
    assert!(s.release("a", &[got[0].clone(), 999..=1000]).is_err());
    assert_eq!(s.all_leases().unwrap().len(), 2, "all or nothing");
    s.release("a", &got).unwrap();
    assert!(s.all_leases().unwrap().is_empty());
}

#[test]
fn store_refuses_a_pasid_outside_its_owners_leases() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    s.open_set("a", 10, 1).unwrap();
    s.open_set("b", 10, 1).unwrap();
    let a = s.lease("a", 1, 1..=MAX12, MAX12).unwrap();
    s.lease("b", 1, 1..=MAX12, MAX12).unwrap();
    assert!(s.record_alloc("b", *a[0].start(), 1).is_err(), "a's lease");
    assert!(s.record_alloc("a", 3000, 1).is_err(), "nobody's lease");
    s.record_alloc("a", 5, 5).unwrap();
    assert!(s.record_alloc("a", 5, 6).is_err(), "host PASID twice");
    assert!(
        s.record_alloc("a", 6, 5).is_err(),
        "active guest PASID twice"
    );
    // A lease that holds PASIDs cannot be dropped.
    assert!(s.release("a", &a).is_err());
}

#[test]
fn set_with_leases_and_pasids_is_recovered_by_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = store(dir.path());
        let rec = s.open_set("vm", 10, 1).unwrap();
        assert!(!rec.existed);
        let l = s.lease("vm", 63, 1..=MAX12, MAX12).unwrap();
        assert_eq!(l, vec![1..=63]);
        for h in [3, 4, 9] {
            s.record_alloc("vm", h, h + 100).unwrap();
        }
        s.record_inactive("vm", 4).unwrap();
        s.record_returned("vm", 9).unwrap();
        // Dropped without any goodbye, as a killed daemon.
    }
    let mut s = store(dir.path());
    let rec = s.open_set("vm", 20, 2).unwrap();
    assert!(rec.existed);
    assert_eq!(rec.old_quota, Some(10));
    assert_eq!(rec.leases, vec![1..=63]);
    assert_eq!(
        rec.pasids,
        vec![PasidRecord {
            host: 3,
            guest: 103,
            active: true
        }]
    );
    assert_eq!(rec.dropped_inactive, 1, "PASID 4 went back to the pool");
    let sets = s.sets().unwrap();
    assert_eq!(sets.len(), 1);
    assert_eq!(
        (sets[0].quota, sets[0].pid, sets[0].leased, sets[0].active),
        (20, 2, 63, 1)
    );
}

#[test]
fn reclaim_deletes_the_set_its_pasids_and_its_leases() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    s.open_set("dead", 10, 1).unwrap();
    s.open_set("alive", 10, 1).unwrap();
    s.lease("dead", 100, 1..=MAX12, MAX12).unwrap();
    s.lease("alive", 1, 1..=MAX12, MAX12).unwrap();
    s.record_alloc("dead", 7, 7).unwrap();
    let r = s.reclaim("dead").unwrap();
    assert_eq!((r.pasids, r.leased), (1, 127));
    let sets = s.sets().unwrap();
    assert_eq!(
        sets.iter().map(|s| s.vm_id.as_str()).collect::<Vec<_>>(),
        ["alive"]
    );
    assert_eq!(s.all_leases().unwrap().len(), 1);
    assert!(s.pasids("dead").unwrap().is_empty());
}

#[test]
fn file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = fs::File::create(dir.path().join(DB_FILE)).unwrap();
    f.write_all(&[0xa5; 8192]).unwrap();
    let e = Store::open(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::NotADatabase { .. }), "{e}");
    assert!(e.to_string().contains("not a PASID state database"));
}

#[test]
fn corrupt_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = store(dir.path());
        s.open_set("vm", 10, 1).unwrap();
        s.lease("vm", 1024, 1..=MAX12, MAX12).unwrap();
    }
    // The last handle checkpointed the WAL: damage a table page.
    let path = dir.path().join(DB_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let page: i64 = raw(dir.path())
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    let page = page as usize;
    assert!(bytes.len() >= 4 * page);
    // Every page but the header page.
    let len = bytes.len();
    bytes[page..len].fill(0x5a);
    fs::write(&path, bytes).unwrap();
    let e = Store::open(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
}

#[test]
fn newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(store(dir.path()));
    raw(dir.path())
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let e = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::SchemaVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn sqlite_database_of_another_application_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path()).unwrap();
    raw(dir.path())
        .execute_batch("CREATE TABLE t (x INTEGER)")
        .unwrap();
    let e = Store::open(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::Foreign { .. }), "{e}");
    // Nothing was added to it.
    let tables: i64 = raw(dir.path())
        .query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 1);
}

#[test]
fn state_dir_that_cannot_be_created_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let e = Store::open(&file.join("state")).unwrap_err();
    assert!(matches!(e, StoreError::StateDir { .. }), "{e}");
    assert!(e.to_string().contains("state directory"), "{e}");
}

#[test]
fn missing_database_is_reported_to_admin_commands() {
    let dir = tempfile::tempdir().unwrap();
    let e = Store::open_existing(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::Missing(_)), "{e}");
    assert!(!dir.path().join(DB_FILE).exists(), "not created");
}

#[test]
fn full_database_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    s.open_set("vm", 1 << 20, 1).unwrap();
    s.lease("vm", 1 << 20, 1..=(1 << 20) - 1, (1 << 20) - 1)
        .unwrap();
    let pages: i64 = s
        .connection()
        .pragma_query_value(None, "page_count", |r| r.get(0))
        .unwrap();
    // The file may not grow any more: like a full disk for SQLite.
    s.connection()
        .pragma_update(None, "max_page_count", pages)
        .unwrap();
    let mut host = 1;
    let e = loop {
        match s.record_alloc("vm", host, host) {
            Ok(()) => host += 1,
            Err(e) => break e,
        }
        assert!(host < 100_000, "never filled up");
    };
    assert!(matches!(e, StoreError::Full { .. }), "{e}");
    assert!(e.to_string().contains("no space left"));
    assert_eq!(s.pasids("vm").unwrap().len() as u32, host - 1);
}

#[test]
fn second_lock_on_a_vm_is_refused_until_the_first_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let first = VmLock::acquire(dir.path(), "vm", LOCK_WAIT).unwrap();
    let e = VmLock::acquire(dir.path(), "vm", std::time::Duration::ZERO).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    assert!(e.to_string().contains("already served by a running daemon"));
    assert!(VmLock::try_acquire(dir.path(), "vm").unwrap().is_none());
    // Another VM is independent.
    assert!(VmLock::try_acquire(dir.path(), "other").unwrap().is_some());
    drop(first);
    assert!(VmLock::try_acquire(dir.path(), "vm").unwrap().is_some());
}

#[test]
fn removed_lock_file_is_recreated_by_the_next_holder() {
    let dir = tempfile::tempdir().unwrap();
    let lock = VmLock::acquire(dir.path(), "vm", LOCK_WAIT).unwrap();
    let path = lock.path().to_owned();
    assert_eq!(fs::read_to_string(&path).unwrap(), "vm\n");
    lock.remove().unwrap();
    assert!(!path.exists());
    let again = VmLock::try_acquire(dir.path(), "vm").unwrap();
    assert!(again.is_some() && path.exists());
}

#[test]
fn vm_ids_must_be_printable_and_bounded() {
    assert!(validate_vm_id("vm-1 /run/x.sock").is_ok());
    for bad in ["", "a\nb", &"x".repeat(256)] {
        assert!(validate_vm_id(bad).is_err(), "{bad:?}");
    }
    assert_ne!(
        lock_path(Path::new("/s"), "a"),
        lock_path(Path::new("/s"), "b")
    );
}

#[test]
fn database_without_its_state_is_refused_and_left_alone() {
    // 0 bytes (truncated, or created by hand), and an SQLite file whose
    // schema was lost with its -wal file: neither is a new allocator.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    fs::write(&path, b"").unwrap();
    let e = Store::open(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::Empty { bytes: 0, .. }), "{e}");
    assert!(e.to_string().contains("is empty"), "{e}");
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    fs::remove_file(&path).unwrap();
    let c = raw(dir.path());
    let _: String = c
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .unwrap();
    drop(c);
    let e = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, StoreError::Empty { bytes, .. } if bytes > 0),
        "{e}"
    );
}

#[test]
fn a_checkpoint_leaves_every_commit_in_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    // The daemon's checkpointer runs on a connection of its own, beside
    // the writer.
    let mut c = Checkpointer::open(&dir.path().join(DB_FILE)).unwrap();
    s.open_set("a", 10, 1).unwrap();
    assert!(c.checkpoint_if_written().unwrap());
    // The database file alone (no -wal) holds the set.
    let copy = tempfile::tempdir().unwrap();
    fs::copy(dir.path().join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
    let sets = Store::open(copy.path()).unwrap().sets().unwrap();
    assert_eq!(sets.len(), 1);
    assert!(s.checkpoint(true).unwrap());
    let wal = dir.path().join(format!("{DB_FILE}-wal"));
    assert_eq!(fs::metadata(wal).map_or(0, |m| m.len()), 0);
}
