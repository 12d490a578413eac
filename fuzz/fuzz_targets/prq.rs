// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The page-request state machine (`viommu::prq::PageRequests`): arbitrary
//! interleavings of requests (partial groups, LAST, stop markers,
//! duplicates, other sources' keys), refusals, deliveries that succeed or
//! fail, guest PAGE_RESPs (right, wrong, repeated, and raw PAGE_RESP
//! requests through `read_page_resp`), DETACH, DETACH_TABLE, PASID_FREE,
//! reset, frontend and source loss and timer ticks, under arbitrary small
//! limits.
//!
//! Beyond "no panic", the exactly-once invariant, checked after every
//! step by the ledger the property test uses (`viommu::prq::ledger`, the
//! `prq-ledger` feature; its header lists the checks), and, for raw
//! PAGE_RESP requests, that `read_page_resp` takes exactly the valid ones.

#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::{
    prq::{
        ledger::{self, Ledger},
        read_page_resp, GroupKey, Limits, PageAccess, ResponseCode, SourceId,
    },
    wire::*,
};

const ENDPOINTS: u32 = 3;
const PASIDS: u32 = 3;

#[derive(Arbitrary, Debug)]
struct Input {
    limits: (u8, u8, u8, u8, u8, Option<u8>),
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Key {
    endpoint: u8,
    pasid: Option<u8>,
    group_id: u8,
}

impl Key {
    /// The ledger folds endpoint and PASID into its ranges; few group IDs
    /// make groups of one key meet.
    fn get(self) -> GroupKey {
        GroupKey {
            endpoint: u32::from(self.endpoint),
            pasid: self.pasid.map(u32::from),
            group_id: u16::from(self.group_id % 3),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Code {
    Success,
    Invalid,
    Failure,
}

impl Code {
    fn get(self) -> ResponseCode {
        match self {
            Code::Success => ResponseCode::Success,
            Code::Invalid => ResponseCode::Invalid,
            Code::Failure => ResponseCode::Failure,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    /// A source reports a request (no read and no write on a LAST: a
    /// PASID stop marker).
    Request {
        source: u8,
        key: Key,
        last: bool,
        perm: u8,
        address: u64,
        private_data: Option<[u64; 2]>,
    },
    /// The daemon refuses a request (driver without the feature).
    Refuse {
        source: u8,
        key: Key,
        last: bool,
    },
    /// A pending delivery reaches the event queue, or does not.
    Deliver {
        index: u8,
        ok: bool,
    },
    /// A PAGE_RESP for any key (often unknown or repeated).
    Respond {
        key: Key,
        code: Code,
    },
    /// A PAGE_RESP for a group in flight.
    RespondInFlight {
        index: u8,
        code: Code,
    },
    /// A raw PAGE_RESP request, decoded as the device decodes it.
    RespondRaw {
        endpoint: u8,
        pasid: u32,
        flags: u32,
        group_id: u16,
        code: u16,
        reserved: u8,
    },
    /// DETACH of an endpoint: its groups and bindings go.
    Detach(u8),
    /// DETACH_TABLE: one binding goes.
    DetachTable(u8, u8),
    /// ATTACH_TABLE: a binding comes (back).
    Bind(u8, u8),
    /// PASID_FREE: every binding of the PASID goes, and it is reused.
    PasidFree(u8),
    Reset,
    FrontendLost,
    /// A source disconnects.
    Disconnect(u8),
    /// Time passes and the timer fires.
    Tick(u8),
}

/// Sources `0..3`.
fn source(s: u8) -> SourceId {
    SourceId(u32::from(s % 3))
}

/// Applies `op`; a raw PAGE_RESP is decoded as the device decodes it
/// first.
fn apply(ledger: &mut Ledger, op: Op) {
    let op = match op {
        Op::Request {
            source: s,
            key,
            last,
            perm,
            address,
            private_data,
        } => ledger::Op::Request {
            source: source(s),
            key: key.get(),
            last,
            access: PageAccess::from_bits(u32::from(perm)),
            address,
            private_data,
        },
        Op::Refuse {
            source: s,
            key,
            last,
        } => ledger::Op::Refuse {
            source: source(s),
            key: key.get(),
            last,
        },
        Op::Deliver { index, ok } => ledger::Op::Deliver {
            index: usize::from(index),
            ok,
        },
        Op::Respond { key, code } => ledger::Op::Respond {
            key: key.get(),
            code: code.get(),
        },
        Op::RespondInFlight { index, code } => ledger::Op::RespondInFlight {
            index: usize::from(index),
            code: code.get(),
        },
        Op::RespondRaw {
            endpoint,
            pasid,
            flags,
            group_id,
            code,
            reserved,
        } => {
            let mut req = PageRespReq::new(u32::from(endpoint) % ENDPOINTS, None, group_id, code);
            req.pasid = pasid.into();
            req.flags = flags.into();
            req.reserved[usize::from(reserved % 8)] = reserved >> 3;
            let valid_flags = flags & !VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID == 0;
            let pasid_valid = flags & VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID != 0;
            match read_page_resp(&req) {
                Ok((key, code)) => {
                    assert!(valid_flags && reserved >> 3 == 0);
                    assert!(pasid_valid || pasid == 0);
                    assert_eq!(key.pasid, pasid_valid.then_some(pasid));
                    assert_eq!(key.group_id, group_id);
                    assert_eq!(code.wire(), req.code.to_native());
                    // As decoded: the PASID may be one no group has.
                    ledger.respond(key, code);
                    ledger.check();
                }
                Err(_) => {
                    assert!(
                        !valid_flags
                            || reserved >> 3 != 0
                            || (!pasid_valid && pasid != 0)
                            || ResponseCode::from_wire(code).is_none()
                    );
                }
            }
            return;
        }
        Op::Detach(endpoint) => ledger::Op::Detach(u32::from(endpoint)),
        Op::DetachTable(endpoint, pasid) => {
            ledger::Op::DetachTable(u32::from(endpoint), u32::from(pasid))
        }
        Op::Bind(endpoint, pasid) => ledger::Op::Bind(u32::from(endpoint), u32::from(pasid)),
        Op::PasidFree(pasid) => ledger::Op::PasidFree(u32::from(pasid)),
        Op::Reset => ledger::Op::Reset,
        Op::FrontendLost => ledger::Op::FrontendLost,
        Op::Disconnect(s) => ledger::Op::Disconnect(source(s)),
        Op::Tick(ms) => ledger::Op::Tick(Duration::from_millis(u64::from(ms % 16))),
    };
    ledger.apply(op);
}

fuzz_target!(|input: Input| {
    let (per_endpoint, total, partial, per_group, partial_ms, response_ms) = input.limits;
    let limits = Limits {
        groups_per_endpoint: u32::from(per_endpoint % 5),
        groups_total: u32::from(total % 7),
        partial_groups: u32::from(partial % 4),
        requests_per_group: u32::from(per_group % 4),
        partial_timeout: Duration::from_millis(u64::from(partial_ms % 12)),
        response_timeout: response_ms.map(|ms| Duration::from_millis(u64::from(ms % 40))),
    };
    let mut ledger = Ledger::new(limits, ENDPOINTS, PASIDS);
    for op in input.ops.into_iter().take(256) {
        apply(&mut ledger, op);
    }
    ledger.finish();
});
