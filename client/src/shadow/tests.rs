// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shadow layer against a mapper that records every call.

use super::*;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Map(u64, u64, u64, Prot),
    Unmap(u64, u64),
}

/// Records calls and keeps the host state it implies; refuses maps at
/// IOVAs listed in `fail_map` and unmaps at IOVAs in `fail_unmap`.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    host: Mutex<BTreeMap<u64, (u64, u64, Prot)>>,
    fail_map: Mutex<BTreeSet<u64>>,
    fail_unmap: Mutex<BTreeSet<u64>>,
}

impl DmaMapper for Recorder {
    fn map(&self, iova: u64, gpa: u64, size: u64, prot: Prot) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Map(iova, gpa, size, prot));
        if self.fail_map.lock().unwrap().contains(&iova) {
            return Err(io::Error::from_raw_os_error(libc_enomem()));
        }
        let mut host = self.host.lock().unwrap();
        // The host refuses overlapping maps, as VFIO and iommufd do.
        let overlaps = host
            .range(..iova + size)
            .next_back()
            .is_some_and(|(&i, &(_, s, _))| i + s > iova);
        assert!(!overlaps, "map of {iova:#x} overlaps a host mapping");
        host.insert(iova, (gpa, size, prot));
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Unmap(iova, size));
        if self.fail_unmap.lock().unwrap().contains(&iova) {
            return Err(io::Error::from_raw_os_error(libc_enomem()));
        }
        let removed = self.host.lock().unwrap().remove(&iova);
        assert_eq!(removed.map(|r| r.1), Some(size), "unmap of {iova:#x}");
        Ok(())
    }
}

fn libc_enomem() -> i32 {
    12
}

impl Recorder {
    fn host(&self) -> Vec<(u64, u64, u64)> {
        self.host
            .lock()
            .unwrap()
            .iter()
            .map(|(&i, &(g, s, _))| (i, g, s))
            .collect()
    }

    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

const MIB: u64 = 1 << 20;

/// Two RAM regions: [0, 16 MiB) and [4 GiB, 4 GiB + 1 MiB).
fn ram() -> Arc<GuestRam> {
    Arc::new(
        GuestRam::new(vec![
            RamRegion {
                gpa: 4 << 30,
                size: MIB,
                hva: 0x7f00_0000_0000,
            },
            RamRegion {
                gpa: 0,
                size: 16 * MIB,
                hva: 0x7e00_0000_0000,
            },
        ])
        .unwrap(),
    )
}

fn live(seq: u64, change: StateChange) -> Event {
    Event::Live { seq, change }
}

fn attach(endpoint: u32, domain: u32) -> StateChange {
    StateChange::Attach {
        endpoint,
        domain,
        bypass: false,
    }
}

fn map(domain: u32, iova: u64, size: u64, gpa: u64, flags: u32) -> StateChange {
    StateChange::Map {
        domain,
        mapping: Mapping {
            virt_start: iova,
            virt_end: iova + size - 1,
            phys_start: gpa,
            flags,
        },
    }
}

fn unmap(domain: u32, start: u64, end: u64) -> StateChange {
    StateChange::Unmap {
        domain,
        virt_start: start,
        virt_end: end,
    }
}

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

/// A shadow past an empty replay (bypass 0), with endpoints registered.
fn shadow_with(eps: &[u32]) -> (Shadow, Vec<Arc<Recorder>>) {
    let mut s = Shadow::new(ram());
    s.apply(&Event::Replayed(StateChange::Bypass(false)))
        .unwrap();
    s.apply(&Event::ReplayDone).unwrap();
    let recs: Vec<Arc<Recorder>> = eps.iter().map(|_| Arc::new(Recorder::default())).collect();
    for (ep, r) in eps.iter().zip(&recs) {
        s.register(*ep, r.clone()).unwrap();
    }
    (s, recs)
}

#[test]
fn guest_ram_pieces_and_host_addresses() {
    let r = ram();
    assert_eq!(r.host_address(0x1000, 0x1000), Some(0x7e00_0000_1000));
    assert_eq!(r.host_address(16 * MIB - 0x1000, 0x2000), None);
    assert_eq!(r.host_address(4 << 30, MIB), Some(0x7f00_0000_0000));
    // A range over a hole gives the RAM parts only.
    assert_eq!(
        r.pieces(15 * MIB, (4 << 30) + MIB),
        [(0, 15 * MIB, MIB), ((4 << 30) - 15 * MIB, 4 << 30, MIB)]
    );
    assert!(r.pieces(32 * MIB, MIB).is_empty());
    assert_eq!(
        GuestRam::new(vec![
            RamRegion {
                gpa: 0,
                size: 2 * MIB,
                hva: 0
            },
            RamRegion {
                gpa: MIB,
                size: MIB,
                hva: 0
            }
        ]),
        Err(RamError::Overlap(0, MIB))
    );
    assert!(GuestRam::new(vec![RamRegion {
        gpa: u64::MAX,
        size: 2,
        hva: 0
    }])
    .is_err());
}

#[test]
fn a_map_goes_to_every_endpoint_of_the_domain_and_an_unmap_leaves_none() {
    let (mut s, r) = shadow_with(&[0x20, 0x28]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    s.apply(&live(2, attach(0x28, 1))).unwrap();
    s.apply(&live(3, map(1, 0x10_0000, 0x2000, 0x40_0000, RW)))
        .unwrap();
    for rec in &r {
        assert_eq!(rec.host(), [(0x10_0000, 0x40_0000, 0x2000)]);
    }
    s.apply(&live(4, unmap(1, 0, u64::MAX))).unwrap();
    for rec in &r {
        assert!(rec.host().is_empty());
    }
    assert_eq!(s.stats().maps, 2);
    assert_eq!(s.stats().unmaps, 2);
}

#[test]
fn attach_replays_the_domain_to_the_new_endpoint() {
    let (mut s, r) = shadow_with(&[0x20, 0x28]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    s.apply(&live(2, map(1, 0x1000, 0x1000, 0x5000, RW)))
        .unwrap();
    s.apply(&live(
        3,
        map(1, 0x8000, 0x3000, 0x9000, VIRTIO_IOMMU_MAP_F_READ),
    ))
    .unwrap();
    assert!(r[1].host().is_empty());
    s.apply(&live(4, attach(0x28, 1))).unwrap();
    assert_eq!(r[1].host(), r[0].host());
    assert_eq!(
        r[1].take_calls(),
        [
            Call::Map(0x1000, 0x5000, 0x1000, Prot::RW),
            Call::Map(
                0x8000,
                0x9000,
                0x3000,
                Prot {
                    read: true,
                    write: false
                }
            ),
        ]
    );
    // Moving to another domain: the old domain's mappings go first.
    s.apply(&live(5, attach(0x28, 2))).unwrap();
    s.apply(&live(6, map(2, 0x1000, 0x1000, 0x7000, RW)))
        .unwrap();
    assert_eq!(r[1].host(), [(0x1000, 0x7000, 0x1000)]);
    assert_eq!(r[0].host().len(), 2, "the other endpoint keeps domain 1");
    // DETACH of the last endpoint: domain 1 and its mappings go.
    s.apply(&live(
        7,
        StateChange::Detach {
            endpoint: 0x20,
            domain: 1,
        },
    ))
    .unwrap();
    assert!(r[0].host().is_empty());
    s.apply(&live(8, attach(0x20, 1))).unwrap();
    assert!(r[0].host().is_empty(), "a new domain 1 starts empty");
}

#[test]
fn a_failed_map_is_rolled_back_on_every_endpoint() {
    let (mut s, r) = shadow_with(&[0x20, 0x28, 0x30]);
    for (i, ep) in [0x20, 0x28, 0x30].into_iter().enumerate() {
        s.apply(&live(i as u64 + 1, attach(ep, 1))).unwrap();
    }
    r[1].fail_map.lock().unwrap().insert(0x20_0000);
    let err = s
        .apply(&live(9, map(1, 0x20_0000, 0x1000, 0x3000, RW)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            ShadowError::Map {
                endpoint: 0x28,
                iova: 0x20_0000,
                ..
            }
        ),
        "{err}"
    );
    for rec in &r {
        assert!(rec.host().is_empty(), "nothing of the MAP stays");
    }
    assert_eq!(
        r[0].take_calls(),
        [
            Call::Map(0x20_0000, 0x3000, 0x1000, Prot::RW),
            Call::Unmap(0x20_0000, 0x1000)
        ]
    );
    assert!(r[2].take_calls().is_empty(), "never reached");
    assert!(s.installed(0x20).is_empty());
    // The guest's UNMAP of it later finds nothing to remove on the host.
    s.apply(&live(10, unmap(1, 0x20_0000, 0x20_0fff))).unwrap();
    assert!(r[0].take_calls().is_empty());
}

#[test]
fn a_mapping_is_cut_to_what_ram_backs_and_mmio_is_not_installed() {
    let (mut s, r) = shadow_with(&[0x20]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    // 1 MiB in RAM below 16 MiB, the hole, then the high region.
    s.apply(&live(
        2,
        map(1, 0, (4 << 30) - 15 * MIB + MIB, 15 * MIB, RW),
    ))
    .unwrap();
    assert_eq!(
        r[0].host(),
        [(0, 15 * MIB, MIB), ((4 << 30) - 15 * MIB, 4 << 30, MIB)]
    );
    s.apply(&live(
        3,
        map(
            1,
            1 << 40,
            0x1000,
            0xfee0_0000,
            RW | VIRTIO_IOMMU_MAP_F_MMIO,
        ),
    ))
    .unwrap();
    assert_eq!(r[0].host().len(), 2, "MMIO is not installed");
    assert_eq!(s.stats().skipped, 2);
    s.apply(&live(4, unmap(1, 0, u64::MAX))).unwrap();
    assert!(r[0].host().is_empty());
}

#[test]
fn bypass_and_bypass_domains_map_all_of_ram_at_its_own_address() {
    let (mut s, r) = shadow_with(&[0x20]);
    let identity = [(0, 0, 16 * MIB), (4 << 30, 4 << 30, MIB)];
    // Attached nowhere: the bypass field decides.
    s.apply(&live(1, StateChange::Bypass(true))).unwrap();
    assert_eq!(r[0].host(), identity);
    s.apply(&live(2, StateChange::Bypass(false))).unwrap();
    assert!(r[0].host().is_empty());
    // An identity (bypass) domain.
    s.apply(&live(
        3,
        StateChange::Attach {
            endpoint: 0x20,
            domain: 7,
            bypass: true,
        },
    ))
    .unwrap();
    assert_eq!(r[0].host(), identity);
    // The bypass field does not matter to an attached endpoint.
    s.apply(&live(4, StateChange::Bypass(true))).unwrap();
    s.apply(&live(5, StateChange::Bypass(false))).unwrap();
    assert_eq!(r[0].host(), identity);
    // To a translated domain: identity goes, the domain's mappings come.
    s.apply(&live(6, attach(0x20, 1))).unwrap();
    s.apply(&live(7, map(1, 0x1000, 0x1000, 0x2000, RW)))
        .unwrap();
    assert_eq!(r[0].host(), [(0x1000, 0x2000, 0x1000)]);
}

#[test]
fn reset_removes_everything_then_follows_bypass() {
    let (mut s, r) = shadow_with(&[0x20, 0x28]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    s.apply(&live(2, attach(0x28, 2))).unwrap();
    s.apply(&live(3, map(1, 0x1000, 0x1000, 0x2000, RW)))
        .unwrap();
    s.apply(&live(4, map(2, 0x1000, 0x1000, 0x3000, RW)))
        .unwrap();
    s.apply(&live(5, StateChange::Reset)).unwrap();
    assert!(r[0].host().is_empty() && r[1].host().is_empty());
    s.apply(&live(6, StateChange::Bypass(true))).unwrap();
    assert_eq!(r[0].host().len(), 2);
    s.apply(&live(7, StateChange::Reset)).unwrap();
    assert_eq!(r[0].host().len(), 2, "reset keeps the bypass field");
}

#[test]
fn register_installs_what_the_endpoint_reaches_and_unregister_removes_it() {
    let (mut s, _) = shadow_with(&[]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    s.apply(&live(2, map(1, 0x1000, 0x1000, 0x2000, RW)))
        .unwrap();
    let rec = Arc::new(Recorder::default());
    s.register(0x20, rec.clone()).unwrap();
    assert_eq!(rec.host(), [(0x1000, 0x2000, 0x1000)]);
    assert!(matches!(
        s.register(0x20, rec.clone()),
        Err(ShadowError::AlreadyRegistered(0x20))
    ));
    s.unregister(0x20).unwrap();
    assert!(rec.host().is_empty());
    assert!(matches!(
        s.unregister(0x20),
        Err(ShadowError::NotRegistered(0x20))
    ));
}

#[test]
fn a_refused_unmap_stays_installed_and_is_retried() {
    let (mut s, r) = shadow_with(&[0x20]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    s.apply(&live(2, map(1, 0x1000, 0x1000, 0x2000, RW)))
        .unwrap();
    r[0].fail_unmap.lock().unwrap().insert(0x1000);
    let err = s.apply(&live(3, unmap(1, 0x1000, 0x1fff))).unwrap_err();
    assert!(matches!(err, ShadowError::Unmap { .. }), "{err}");
    assert_eq!(s.installed(0x20), [(0x1000, 0x2000, 0x1000)]);
    r[0].fail_unmap.lock().unwrap().clear();
    s.apply(&live(
        4,
        StateChange::Detach {
            endpoint: 0x20,
            domain: 1,
        },
    ))
    .unwrap();
    assert!(r[0].host().is_empty() && s.installed(0x20).is_empty());
}

#[test]
fn a_replay_after_reconnecting_keeps_what_did_not_change() {
    let (mut s, r) = shadow_with(&[0x20]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    s.apply(&live(2, map(1, 0x1000, 0x1000, 0x2000, RW)))
        .unwrap();
    s.apply(&live(3, map(1, 0x4000, 0x1000, 0x5000, RW)))
        .unwrap();
    r[0].take_calls();
    // The daemon restarted with the same state except one mapping gone
    // and one added while the connection was down.
    s.begin_resync();
    for c in [
        StateChange::Bypass(false),
        attach(0x20, 1),
        map(1, 0x1000, 0x1000, 0x2000, RW),
        map(1, 0x9000, 0x1000, 0xa000, RW),
    ] {
        s.apply(&Event::Replayed(c)).unwrap();
        assert!(r[0].take_calls().is_empty(), "the host waits for the end");
    }
    s.apply(&Event::ReplayDone).unwrap();
    assert_eq!(
        r[0].take_calls(),
        [
            Call::Unmap(0x4000, 0x1000),
            Call::Map(0x9000, 0xa000, 0x1000, Prot::RW)
        ]
    );
    assert_eq!(
        r[0].host(),
        [(0x1000, 0x2000, 0x1000), (0x9000, 0xa000, 0x1000)]
    );
}

#[test]
fn mappings_without_access_are_not_installed() {
    let (mut s, r) = shadow_with(&[0x20]);
    s.apply(&live(1, attach(0x20, 1))).unwrap();
    s.apply(&live(2, map(1, 0x1000, 0x1000, 0x2000, 0)))
        .unwrap();
    assert!(r[0].host().is_empty());
    s.apply(&live(
        3,
        map(1, 0x2000, 0x1000, 0x2000, VIRTIO_IOMMU_MAP_F_WRITE),
    ))
    .unwrap();
    assert_eq!(
        r[0].take_calls().last(),
        Some(&Call::Map(
            0x2000,
            0x2000,
            0x1000,
            Prot {
                read: false,
                write: true
            }
        ))
    );
}
