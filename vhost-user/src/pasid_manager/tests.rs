// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of the daemon's PASID service over a real store.

use std::path::Path;

use super::*;

fn options(dir: &Path, vm: &str, bits: u8, quota: u32) -> PasidOptions {
    PasidOptions {
        vm_id: vm.into(),
        bits,
        quota,
        state_dir: dir.to_owned(),
    }
}

fn open(dir: &Path, vm: &str, bits: u8, quota: u32) -> PasidManager {
    PasidManager::open(options(dir, vm, bits, quota)).expect("open manager")
}

#[test]
fn allocations_survive_a_restart_with_the_same_vm_id() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c);
    {
        let mut m = open(dir.path(), "vm", 20, 100);
        a = m.alloc(1, 1000).unwrap();
        b = m.alloc(500, 1000).unwrap();
        c = m.alloc(1, 1000).unwrap();
        assert_eq!((a, b, c), (1, 500, 2));
        m.free(a).unwrap();
        // Dropped with no goodbye: what SIGKILL leaves behind.
    }
    let mut m = open(dir.path(), "vm", 20, 100);
    let listed: Vec<_> = m
        .pasids()
        .iter()
        .map(|p| (p.host, p.guest, p.active, p.refs))
        .collect();
    assert_eq!(
        listed,
        vec![(2, Some(2), true, 1), (500, Some(500), true, 1)]
    );
    assert_eq!(m.to_host(b, 20), Ok(b), "guest->host map recovered");
    assert_eq!(m.usage().1, 2, "recovered PASIDs are charged");
    assert_eq!(m.alloc(1, 1000), Ok(1), "the freed one is reused");
    assert_eq!(m.alloc(500, 1000), Ok(501), "recovered ones are not");
    m.free(b).unwrap();
    assert_eq!(m.free(b), Err(PasidError::NotMapped(b)));
}

#[test]
fn second_daemon_with_the_same_vm_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), "vm", 20, 10);
    let e = PasidManager::open(options(dir.path(), "vm", 20, 10)).unwrap_err();
    assert!(
        matches!(e, ManagerError::Store(StoreError::Locked { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("`vm` is already served"), "{e}");
    // Another VM starts fine.
    open(dir.path(), "other", 20, 10);
}

#[test]
fn freed_pasid_with_references_stays_recorded_inactive_until_the_last_put() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), "vm", 20, 10);
    let p = m.alloc(1, 100).unwrap();
    m.get(p).unwrap();
    m.free(p).unwrap();
    let rec = |m: &PasidManager| m.store.lock().unwrap().pasids("vm").unwrap();
    assert_eq!(rec(&m).len(), 1);
    assert!(!rec(&m)[0].active);
    assert_eq!(m.get(p), Err(PasidError::Inactive(p)));
    assert_ne!(m.alloc(1, 100), Ok(p), "not reused while referenced");
    m.put(p).unwrap();
    assert!(rec(&m).iter().all(|r| r.host != p), "returned to the pool");
    assert_eq!(m.alloc(1, 100), Ok(p));
}

#[test]
fn inactive_pasids_of_a_dead_daemon_return_to_the_pool_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p;
    {
        let mut m = open(dir.path(), "vm", 20, 10);
        p = m.alloc(1, 100).unwrap();
        m.get(p).unwrap();
        m.free(p).unwrap();
    }
    let mut m = open(dir.path(), "vm", 20, 10);
    assert!(m.pasids().is_empty());
    assert_eq!(m.alloc(1, 100), Ok(p));
}

#[test]
fn quota_is_enforced_and_a_restart_may_change_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut m = open(dir.path(), "vm", 20, 2);
        m.alloc(1, 100).unwrap();
        m.alloc(1, 100).unwrap();
        assert_eq!(m.alloc(1, 100), Err(PasidError::QuotaExceeded { quota: 2 }));
    }
    let mut m = open(dir.path(), "vm", 20, 3);
    assert_eq!(m.usage().0, 3);
    m.alloc(1, 100).unwrap();
    assert!(m.alloc(1, 100).is_err());
    let sets = m.host_sets().unwrap();
    assert_eq!((sets[0].record.quota, sets[0].record.active), (3, 3));
}

#[test]
fn two_vms_never_get_the_same_host_pasid() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(dir.path(), "a", 8, 1000);
    let mut b = open(dir.path(), "b", 8, 1000);
    let mut seen = std::collections::HashSet::new();
    loop {
        let (x, y) = (a.alloc(1, 255), b.alloc(1, 255));
        for p in [&x, &y].into_iter().flatten() {
            assert!(seen.insert(*p), "{p} handed out twice");
        }
        if x.is_err() && y.is_err() {
            assert!(matches!(x, Err(PasidError::Exhausted { .. })), "{x:?}");
            break;
        }
    }
    assert_eq!(seen.len(), 255);
}

#[test]
fn failed_journal_write_undoes_the_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), "vm", 20, 10);
    let p = m.alloc(1, 100).unwrap();
    // Someone else drops the set's leases behind the daemon's back (a
    // reclaim that ignored the lock): the next journal write is refused.
    let mut other = Store::open(dir.path()).unwrap();
    other.reclaim("vm").unwrap();
    let e = m.alloc(1, 100).unwrap_err();
    assert!(matches!(e, PasidError::Source(_)), "{e}");
    assert_eq!(m.usage().1, 1, "only the first one is charged");
    assert_eq!(m.pasids().len(), 1);
    assert!(m.free(p).is_err(), "its record is gone too");
}

#[test]
fn guest_chosen_mappings_are_journaled_and_skipped_by_pasid_alloc() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut m = open(dir.path(), "vm", 20, 10);
        // Guest PASID 1 maps to host PASID 1; guest PASID 2 to host 2.
        assert_eq!(m.map(1, 20), Ok(1));
        assert_eq!(m.map(3, 20), Ok(2));
        assert_eq!(m.map(3, 20), Ok(2), "same mapping again");
        // Host 3 is free but guest PASID 3 is taken: PASID_ALLOC skips it.
        assert_eq!(m.alloc(1, 100), Ok(4));
        assert_eq!(m.usage().1, 3, "the skipped one was given back");
    }
    let m = open(dir.path(), "vm", 20, 10);
    assert_eq!(m.to_host(3, 20), Ok(2));
    assert_eq!(m.to_host(4, 20), Ok(4));
}

#[test]
fn recorded_pasid_beyond_a_narrower_pasid_width_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut m = open(dir.path(), "vm", 12, 10);
        m.alloc(3000, 4000).unwrap();
    }
    let e = PasidManager::open(options(dir.path(), "vm", 8, 10)).unwrap_err();
    assert!(matches!(e, ManagerError::Restore { .. }), "{e}");
    assert!(e.to_string().contains("cannot be restored"), "{e}");
}

#[test]
fn reclaim_frees_dead_vms_and_leaves_running_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut alive = open(dir.path(), "alive", 20, 10);
    alive.alloc(1, 100).unwrap();
    {
        let mut dead = open(dir.path(), "dead", 20, 10);
        dead.alloc(1, 1000).unwrap();
    }
    let listed = list_sets(dir.path()).unwrap();
    let live: Vec<_> = listed
        .iter()
        .map(|s| (s.record.vm_id.as_str(), s.live))
        .collect();
    assert_eq!(live, vec![("alive", true), ("dead", false)]);
    let (reclaimed, kept) = reclaim_dead(dir.path()).unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(
        (reclaimed[0].vm_id.as_str(), reclaimed[0].pasids),
        ("dead", 1)
    );
    assert_eq!(kept, vec!["alive".to_string()]);
    let left = list_sets(dir.path()).unwrap();
    assert_eq!(left.len(), 1);
    // The dead VM's PASIDs are free for the others.
    assert!(alive.alloc(1, 100).is_ok());
    // A restarted "dead" VM starts empty.
    let d = open(dir.path(), "dead", 20, 10);
    assert!(d.pasids().is_empty());
}

#[test]
fn free_all_frees_every_active_pasid_durably() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut m = open(dir.path(), "vm", 20, 10);
        let a = m.alloc(1, 100).unwrap();
        let b = m.alloc(1, 100).unwrap();
        m.get(b).unwrap();
        assert_eq!(m.free_all(), Ok(2));
        let left: Vec<_> = m.pasids().iter().map(|p| (p.host, p.active)).collect();
        assert_eq!(left, vec![(b, false)], "referenced one waits for its put");
        assert_eq!(m.alloc(1, 100), Ok(a));
        assert_eq!(m.free_all(), Ok(1));
    }
    assert!(open(dir.path(), "vm", 20, 10).pasids().is_empty());
}

#[test]
fn a_restored_guest_gets_its_pasids_back_as_the_same_host_pasids() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut m = open(dir.path(), "vm", 20, 10);
        let done = m.adopt_guest_pasids(&[1, 70, 500]).unwrap();
        assert_eq!(done.taken, vec![1, 70, 500]);
        assert!(done.kept.is_empty() && done.extra.is_empty());
        assert_eq!(m.to_host(70, 20), Ok(70));
        assert_eq!(m.usage().1, 3);
        // The guest allocates on from there.
        assert_eq!(m.alloc(1, 100), Ok(2));
    }
    // Journaled like PASID_ALLOC's.
    let m = open(dir.path(), "vm", 20, 10);
    let hosts: Vec<_> = m.pasids().iter().map(|p| (p.host, p.guest)).collect();
    assert_eq!(
        hosts,
        vec![(1, Some(1)), (2, Some(2)), (70, Some(70)), (500, Some(500))]
    );
}

#[test]
fn a_pasid_leased_to_another_vm_refuses_the_restore_and_nothing_stays_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = open(dir.path(), "other", 20, 10);
    assert_eq!(other.alloc(130, 130), Ok(130));
    let mut m = open(dir.path(), "vm", 20, 10);
    let e = m.adopt_guest_pasids(&[70, 130]).unwrap_err();
    assert!(
        matches!(&e, PasidRestoreError::Taken { pasid: 130, vm_id } if vm_id == "other"),
        "{e}"
    );
    assert!(m.pasids().is_empty(), "70 was given back");
    let store = m.store.lock().unwrap().pasids("vm").unwrap();
    assert!(store.is_empty(), "and its journal entry too");
    assert_eq!(m.usage().0, 10, "quota as it was");
    // Another PASID of the other VM's block is refused alike: blocks of
    // 64 host PASIDs are leased whole.
    assert!(matches!(
        m.adopt_guest_pasids(&[129]),
        Err(PasidRestoreError::Taken { pasid: 129, .. })
    ));
    // Once the other VM is gone, the restore succeeds.
    other.end_vm().unwrap();
    drop(other);
    assert_eq!(
        m.adopt_guest_pasids(&[70, 130]).unwrap().taken,
        vec![70, 130]
    );
}

#[test]
fn a_restore_over_quota_or_width_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), "vm", 12, 2);
    assert!(matches!(
        m.adopt_guest_pasids(&[1, 2, 3]),
        Err(PasidRestoreError::Quota { count: 3, quota: 2 })
    ));
    assert!(matches!(
        m.adopt_guest_pasids(&[5000]),
        Err(PasidRestoreError::Width {
            pasid: 5000,
            bits: 12
        })
    ));
    assert!(m.pasids().is_empty());
}

#[test]
fn a_restore_keeps_what_the_set_holds_and_names_the_extra_pasids() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), "vm", 20, 2);
    assert_eq!(m.alloc(1, 10), Ok(1));
    assert_eq!(m.alloc(1, 10), Ok(2));
    // Quota 2 is full, yet the restore may take 3 before 1 is freed.
    let done = m.adopt_guest_pasids(&[2, 3]).unwrap();
    assert_eq!(
        done,
        AdoptedPasids {
            taken: vec![3],
            kept: vec![2],
            extra: vec![1],
        }
    );
    m.free(1).unwrap();
    assert_eq!(m.usage(), (2, 2, m.usage().2));
    assert_eq!(
        m.alloc(1, 10).unwrap_err(),
        PasidError::QuotaExceeded { quota: 2 }
    );
    // A PASID freed by the guest while something still holds it cannot
    // be taken for the restore.
    m.get(3).unwrap();
    m.free(3).unwrap();
    assert!(matches!(
        m.adopt_guest_pasids(&[3]),
        Err(PasidRestoreError::InUse { pasid: 3, .. })
    ));
}
