// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property test of the invariant: random interleavings of requests
//! (partial groups, LAST, stop markers, duplicates, overflow), deliveries,
//! guest responses (right, wrong and repeated), DETACH, DETACH_TABLE,
//! PASID_FREE, reset, frontend and source loss and timeouts, checked after
//! every step by the ledger (`ledger.rs`): each raised group is answered
//! exactly once, and never after its PASID became reusable.

use std::time::Duration;

use proptest::prelude::*;

use super::ledger::{Ledger, Op};
use super::*;

/// Small limits, so that every limit is hit.
const LIMITS: Limits = Limits {
    groups_per_endpoint: 3,
    groups_total: 5,
    partial_groups: 2,
    requests_per_group: 2,
    partial_timeout: Duration::from_millis(5),
    response_timeout: Some(Duration::from_millis(20)),
};

const ENDPOINTS: u32 = 2;
const PASIDS: u32 = 2;
const SOURCES: u32 = 2;

fn key() -> impl Strategy<Value = GroupKey> {
    (
        0..ENDPOINTS,
        prop::option::weighted(0.8, 1..=PASIDS),
        0u16..2,
    )
        .prop_map(|(endpoint, pasid, group_id)| GroupKey {
            endpoint,
            pasid,
            group_id,
        })
}

fn code() -> impl Strategy<Value = ResponseCode> {
    prop::sample::select(ResponseCode::ALL.to_vec())
}

/// A request; now and then a stop marker (a LAST asking for no access).
fn request(source: u32, key: GroupKey, last: bool, stop: bool) -> Op {
    Op::Request {
        source: SourceId(source),
        key,
        last: last || stop,
        access: PageAccess {
            read: !stop,
            ..Default::default()
        },
        address: 0x1000,
        private_data: None,
    }
}

fn op() -> impl Strategy<Value = Op> {
    let source = 0..SOURCES;
    prop_oneof![
        16 => (source.clone(), key(), any::<bool>(), prop::bool::weighted(0.05))
            .prop_map(|(source, key, last, stop)| request(source, key, last, stop)),
        1 => (source.clone(), key(), any::<bool>())
            .prop_map(|(source, key, last)| Op::Refuse { source: SourceId(source), key, last }),
        6 => (any::<usize>(), prop::bool::weighted(0.85))
            .prop_map(|(index, ok)| Op::Deliver { index, ok }),
        2 => (key(), code()).prop_map(|(key, code)| Op::Respond { key, code }),
        3 => (any::<usize>(), code()).prop_map(|(index, code)| Op::RespondInFlight { index, code }),
        1 => (0..ENDPOINTS).prop_map(Op::Detach),
        1 => (0..ENDPOINTS, 1..=PASIDS).prop_map(|(e, p)| Op::DetachTable(e, p)),
        8 => (0..ENDPOINTS, 1..=PASIDS).prop_map(|(e, p)| Op::Bind(e, p)),
        1 => (1..=PASIDS).prop_map(Op::PasidFree),
        1 => Just(Op::Reset),
        1 => Just(Op::FrontendLost),
        1 => source.prop_map(|s| Op::Disconnect(SourceId(s))),
        4 => (0u64..12).prop_map(|ms| Op::Tick(Duration::from_millis(ms))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Each raised group is answered exactly once, and never after its
    /// PASID became reusable.
    #[test]
    fn every_raised_group_is_answered_exactly_once(ops in prop::collection::vec(op(), 1..120)) {
        let mut ledger = Ledger::new(LIMITS, ENDPOINTS, PASIDS);
        for op in ops {
            ledger.apply(op);
        }
        ledger.finish();
    }
}
