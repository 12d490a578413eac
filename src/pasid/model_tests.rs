// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property tests: random operation sequences run against the allocator
//! and a deliberately simple reference model, checking after every step
//! that they agree and that the invariants hold (no PASID owned twice, no
//! reuse while referenced, quotas respected, nothing leaked after
//! teardown).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::{
    AllocatorConfig, MemorySource, Pasid, PasidAllocator, PasidError, PasidState, SetId,
    TranslationMode, Translator,
};

/// Small space so that exhaustion, quotas and block boundaries are hit.
const BITS: u8 = 6;
const MAX: Pasid = (1 << BITS) - 1;

#[derive(Debug, Clone)]
enum Op {
    Create(u32),
    Destroy(usize),
    Alloc(usize, Pasid, Pasid),
    Get(usize, Pasid),
    Put(usize, Pasid),
    Free(usize, Pasid),
    FreeRange(usize, Pasid, Pasid),
    ReleaseIdle,
}

fn op() -> impl Strategy<Value = Op> {
    let set = 0usize..8;
    let id = 0..=MAX + 1;
    prop_oneof![
        1 => (0u32..24).prop_map(Op::Create),
        1 => set.clone().prop_map(Op::Destroy),
        6 => (set.clone(), id.clone(), id.clone()).prop_map(|(s, a, b)| Op::Alloc(s, a, b)),
        3 => (set.clone(), id.clone()).prop_map(|(s, p)| Op::Get(s, p)),
        3 => (set.clone(), id.clone()).prop_map(|(s, p)| Op::Put(s, p)),
        3 => (set.clone(), id.clone()).prop_map(|(s, p)| Op::Free(s, p)),
        1 => (set, id.clone(), id).prop_map(|(s, a, b)| Op::FreeRange(s, a, b)),
        1 => Just(Op::ReleaseIdle),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Live,
    Zombie,
    Dead,
}

#[derive(Debug)]
struct MSet {
    id: SetId,
    quota: u32,
    life: Life,
}

#[derive(Debug, Clone, Copy)]
struct MPasid {
    set: usize,
    active: bool,
    refs: u32,
}

#[derive(Default, Debug)]
struct Model {
    sets: Vec<MSet>,
    pasids: BTreeMap<Pasid, MPasid>,
}

impl Model {
    fn charged(&self, set: usize) -> u32 {
        let n = self.pasids.values().filter(|p| p.set == set).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Drops a reference; returns the PASID to the pool on the last one.
    fn drop_ref(&mut self, p: Pasid) {
        let Some(e) = self.pasids.get_mut(&p) else {
            return;
        };
        e.refs -= 1;
        if e.refs == 0 {
            let set = e.set;
            self.pasids.remove(&p);
            if self.sets[set].life == Life::Zombie && self.charged(set) == 0 {
                self.sets[set].life = Life::Dead;
            }
        }
    }

    /// Common checks of get/put/free, in the allocator's order.
    fn entry(&self, set: usize, p: Pasid, zombie_ok: bool) -> Result<MPasid, PasidError> {
        let life = self.sets[set].life;
        if !(life == Life::Live || (zombie_ok && life == Life::Zombie)) {
            return Err(PasidError::UnknownSet);
        }
        if p == 0 || p > MAX {
            return Err(PasidError::OutOfRange { pasid: p, max: MAX });
        }
        let e = *self.pasids.get(&p).ok_or(PasidError::UnknownPasid(p))?;
        if e.set != set {
            return Err(PasidError::ForeignPasid(p));
        }
        Ok(e)
    }

    fn free_range(&mut self, set: usize, min: Pasid, max: Pasid) -> u32 {
        let ids: Vec<Pasid> = self
            .pasids
            .range(min..=max)
            .filter(|(_, e)| e.set == set && e.active)
            .map(|(p, _)| *p)
            .collect();
        for p in &ids {
            if let Some(e) = self.pasids.get_mut(p) {
                e.active = false;
            }
            self.drop_ref(*p);
        }
        u32::try_from(ids.len()).unwrap_or(u32::MAX)
    }
}

fn range_ok(min: Pasid, max: Pasid) -> Result<(), PasidError> {
    if min == 0 || min > max || max > MAX {
        return Err(PasidError::InvalidRange {
            min,
            max,
            limit: MAX,
        });
    }
    Ok(())
}

fn new_allocator() -> (PasidAllocator, Arc<Mutex<MemorySource>>) {
    let source = Arc::new(Mutex::new(MemorySource::new(BITS, 8).unwrap()));
    let config = AllocatorConfig {
        bits: BITS,
        lease_block: 8,
    };
    let a = PasidAllocator::new(config, Box::new(source.clone())).unwrap();
    (a, source)
}

/// Applies `op` to both; returns an error message if they disagree.
fn step(a: &mut PasidAllocator, m: &mut Model, op: &Op) -> Result<(), String> {
    // Set indices wrap around the sets created so far.
    let pick = |s: usize| (!m.sets.is_empty()).then(|| s % m.sets.len());
    match *op {
        Op::Create(quota) => {
            let id = a.create_set(quota).map_err(|e| e.to_string())?;
            m.sets.push(MSet {
                id,
                quota,
                life: Life::Live,
            });
        }
        Op::Destroy(s) => {
            let Some(s) = pick(s) else { return Ok(()) };
            let got = a.destroy_set(m.sets[s].id);
            let want = if m.sets[s].life == Life::Live {
                m.free_range(s, 1, MAX);
                m.sets[s].life = if m.charged(s) == 0 {
                    Life::Dead
                } else {
                    Life::Zombie
                };
                Ok(())
            } else {
                Err(PasidError::UnknownSet)
            };
            check(&got, &want)?;
        }
        Op::Alloc(s, min, max) => {
            let Some(s) = pick(s) else { return Ok(()) };
            let got = a.alloc(m.sets[s].id, min..=max);
            let set = &m.sets[s];
            let want = range_ok(min, max).and_then(|_| {
                if set.life != Life::Live {
                    Err(PasidError::UnknownSet)
                } else if set.quota == 0 {
                    Err(PasidError::Disabled)
                } else if m.charged(s) >= set.quota {
                    Err(PasidError::QuotaExceeded { quota: set.quota })
                } else if (min..=max).all(|p| m.pasids.contains_key(&p)) {
                    Err(PasidError::Exhausted { min, max })
                } else {
                    Ok(())
                }
            });
            match (got, want) {
                (Ok(p), Ok(())) => {
                    if !(min..=max).contains(&p) {
                        return Err(format!("alloc gave {p} outside [{min}, {max}]"));
                    }
                    if m.pasids.contains_key(&p) {
                        return Err(format!("alloc gave {p}, which is still owned"));
                    }
                    m.pasids.insert(
                        p,
                        MPasid {
                            set: s,
                            active: true,
                            refs: 1,
                        },
                    );
                }
                (got, want) => check(&got.map(|_| ()), &want)?,
            }
        }
        Op::Get(s, p) => {
            let Some(s) = pick(s) else { return Ok(()) };
            let got = a.get(m.sets[s].id, p);
            let want = m.entry(s, p, false).and_then(|e| {
                if e.active {
                    Ok(())
                } else {
                    Err(PasidError::Inactive(p))
                }
            });
            check(&got, &want)?;
            if want.is_ok() {
                if let Some(e) = m.pasids.get_mut(&p) {
                    e.refs += 1;
                }
            }
        }
        Op::Put(s, p) => {
            let Some(s) = pick(s) else { return Ok(()) };
            let got = a.put(m.sets[s].id, p);
            let want = m.entry(s, p, true).and_then(|e| {
                if e.active && e.refs <= 1 {
                    Err(PasidError::NoReference(p))
                } else {
                    Ok(())
                }
            });
            check(&got, &want)?;
            if want.is_ok() {
                m.drop_ref(p);
            }
        }
        Op::Free(s, p) => {
            let Some(s) = pick(s) else { return Ok(()) };
            let got = a.free(m.sets[s].id, p);
            let want = m.entry(s, p, false).and_then(|e| {
                if e.active {
                    Ok(())
                } else {
                    Err(PasidError::Inactive(p))
                }
            });
            check(&got, &want)?;
            if want.is_ok() {
                if let Some(e) = m.pasids.get_mut(&p) {
                    e.active = false;
                }
                m.drop_ref(p);
            }
        }
        Op::FreeRange(s, min, max) => {
            let Some(s) = pick(s) else { return Ok(()) };
            let got = a.free_range(m.sets[s].id, min..=max);
            let want = range_ok(min, max).and_then(|_| {
                if m.sets[s].life == Life::Live {
                    Ok(m.free_range(s, min, max))
                } else {
                    Err(PasidError::UnknownSet)
                }
            });
            check(&got, &want)?;
        }
        Op::ReleaseIdle => {
            a.release_idle_leases().map_err(|e| e.to_string())?;
        }
    }
    invariants(a, m)
}

fn check<T: PartialEq + std::fmt::Debug>(
    got: &Result<T, PasidError>,
    want: &Result<T, PasidError>,
) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("allocator said {got:?}, model says {want:?}"))
    }
}

fn invariants(a: &PasidAllocator, m: &Model) -> Result<(), String> {
    // Every PASID has exactly the owner, state and references the model
    // has: none is owned twice, none returned while referenced.
    for p in 0..=MAX + 1 {
        let want = m.pasids.get(&p).map(|e| PasidState {
            owner: m.sets[e.set].id,
            active: e.active,
            refs: e.refs,
        });
        if a.state(p) != want {
            return Err(format!(
                "pasid {p}: allocator {:?}, model {want:?}",
                a.state(p)
            ));
        }
    }
    if usize::try_from(a.live()).ok() != Some(m.pasids.len()) {
        return Err(format!("live {} vs model {}", a.live(), m.pasids.len()));
    }
    // Quotas hold and are charged for inactive-but-referenced PASIDs too.
    for (i, s) in m.sets.iter().enumerate() {
        if s.life == Life::Live {
            let usage = a.usage(s.id).map_err(|e| e.to_string())?;
            if usage.charged != m.charged(i) || usage.charged > s.quota {
                return Err(format!("set {i}: usage {usage:?}, model {}", m.charged(i)));
            }
        }
    }
    // Leased PASIDs are either live or in the pool.
    if a.leased() != a.live() + a.pooled() {
        return Err(format!(
            "leased {} != live {} + pooled {}",
            a.leased(),
            a.live(),
            a.pooled()
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn allocator_matches_reference_model(ops in proptest::collection::vec(op(), 1..80)) {
        let (mut a, source) = new_allocator();
        let mut m = Model::default();
        for op in &ops {
            if let Err(msg) = step(&mut a, &mut m, op) {
                return Err(TestCaseError::fail(format!("{op:?}: {msg}")));
            }
        }
        // Teardown: destroy every set, then let every user put its
        // references. Nothing may be leaked, in memory or in the source.
        for s in 0..m.sets.len() {
            if let Err(msg) = step(&mut a, &mut m, &Op::Destroy(s)) {
                return Err(TestCaseError::fail(format!("teardown: {msg}")));
            }
        }
        let held: Vec<(Pasid, MPasid)> = m.pasids.iter().map(|(p, e)| (*p, *e)).collect();
        for (p, e) in held {
            for _ in 0..e.refs {
                prop_assert_eq!(a.put(m.sets[e.set].id, p), Ok(()));
            }
        }
        prop_assert_eq!(a.live(), 0);
        a.release_idle_leases().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(a.leased(), 0);
        prop_assert_eq!(source.lock().map(|s| s.leased()).ok(), Some(0));
    }
}

#[derive(Debug, Clone)]
enum TOp {
    Map(usize, Pasid),
    Unmap(usize, Pasid),
    Hold(usize, Pasid),
    Release(usize),
}

fn top() -> impl Strategy<Value = TOp> {
    prop_oneof![
        4 => (0usize..3, 1..=MAX).prop_map(|(s, g)| TOp::Map(s, g)),
        3 => (0usize..3, 1..=MAX).prop_map(|(s, g)| TOp::Unmap(s, g)),
        2 => (0usize..3, 1..=MAX).prop_map(|(s, g)| TOp::Hold(s, g)),
        2 => (0usize..64).prop_map(TOp::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Global mode: forward and reverse maps stay inverse of each other,
    /// host PASIDs are unique, and held host PASIDs are never reused.
    #[test]
    fn translator_maps_stay_consistent(ops in proptest::collection::vec(top(), 1..100)) {
        let (mut a, _source) = new_allocator();
        let mut t = Translator::new(TranslationMode::Global, &a);
        let sets: Vec<SetId> = (0..3).map(|_| a.create_set(20)).collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut maps: HashMap<(usize, Pasid), Pasid> = HashMap::new();
        // References held by "page requests": (set, host PASID).
        let mut held: Vec<(usize, Pasid)> = Vec::new();
        for op in &ops {
            match *op {
                TOp::Map(s, g) => {
                    // Unmapped host PASIDs still held by a page request.
                    let reserved: Vec<Pasid> = held
                        .iter()
                        .map(|(_, h)| *h)
                        .filter(|h| !maps.values().any(|v| v == h))
                        .collect();
                    if let Ok(h) = t.map(&mut a, sets[s], g, BITS) {
                        match maps.insert((s, g), h) {
                            Some(old) => prop_assert_eq!(old, h),
                            None => prop_assert!(!reserved.contains(&h), "reused held {}", h),
                        }
                    }
                }
                TOp::Unmap(s, g) => {
                    let r = t.unmap(&mut a, sets[s], g);
                    prop_assert_eq!(r.is_ok(), maps.remove(&(s, g)).is_some());
                }
                TOp::Hold(s, g) => {
                    if let Some(h) = maps.get(&(s, g)) {
                        prop_assert_eq!(a.get(sets[s], *h), Ok(()));
                        held.push((s, *h));
                    }
                }
                TOp::Release(i) => {
                    if !held.is_empty() {
                        let (s, h) = held.swap_remove(i % held.len());
                        prop_assert_eq!(a.put(sets[s], h), Ok(()));
                    }
                }
            }
            let mut hosts: Vec<Pasid> = maps.values().copied().collect();
            hosts.sort_unstable();
            hosts.dedup();
            prop_assert_eq!(hosts.len(), maps.len(), "host PASID mapped twice");
            for (&(s, g), &h) in &maps {
                prop_assert_eq!(t.to_host(&a, sets[s], g, BITS), Ok(h));
                let back = t.to_guest(&a, h, BITS).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!((back.set, back.pasid), (Some(sets[s]), g));
            }
            // Held host PASIDs stay reserved (live) even once unmapped.
            for (_, h) in &held {
                prop_assert!(a.state(*h).is_some(), "held host PASID {} returned to pool", h);
            }
            prop_assert_eq!(t.mapped() as usize, maps.len());
        }
        for s in &sets {
            prop_assert_eq!(t.destroy_set(&mut a, *s), Ok(()));
        }
        for (s, h) in held {
            prop_assert_eq!(a.put(sets[s], h), Ok(()));
        }
        prop_assert_eq!(a.live(), 0);
        prop_assert_eq!(t.mapped(), 0);
    }
}
