// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The number and range parser of every command line (`viommu::parse`) and
//! the `--endpoints` list (`EndpointSet::from_str`), on arbitrary text.
//!
//! Beyond "no panic":
//! - `parse_u64`, `parse_u32` and `parse_u32_range` agree with a reference
//!   written from their documentation (decimal or `0x` hex, `_` only
//!   between digits, surrounding white space ignored, nothing else): the
//!   same value, or an error of the same kind;
//! - an accepted endpoint list is the union of its items as the reference
//!   reads them: `contains` agrees at every item's edges and at a few
//!   fixed IDs (lists of up to 64 items), and the set's ranges are sorted,
//!   disjoint and non-adjacent;
//! - an accepted set prints (`Display`) as a list that parses back to the
//!   same set.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu::{
    config::{ConfigError, EndpointSet},
    parse::{parse_u32, parse_u32_range, parse_u64, ParseError},
};

/// What the reference makes of a number: its value, or which error.
#[derive(Debug, PartialEq, Eq)]
enum RefNumber {
    Value(u64),
    NotANumber,
    TooLarge,
}

/// A number as the documentation describes it.
fn ref_u64(s: &str) -> RefNumber {
    let t = s.trim();
    let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => (hex, 16u32),
        None => (t, 10),
    };
    let bytes = digits.as_bytes();
    let valid = !bytes.is_empty()
        && bytes[0] != b'_'
        && bytes[bytes.len() - 1] != b'_'
        && bytes
            .iter()
            .all(|&b| b == b'_' || char::from(b).is_digit(radix));
    if !valid {
        return RefNumber::NotANumber;
    }
    let mut value: u64 = 0;
    for b in bytes.iter().filter(|&&b| b != b'_') {
        let d = u64::from(char::from(*b).to_digit(radix).expect("checked"));
        match value
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(d))
        {
            Some(v) => value = v,
            None => return RefNumber::TooLarge,
        }
    }
    RefNumber::Value(value)
}

fn ref_u32(s: &str) -> RefNumber {
    match ref_u64(s) {
        RefNumber::Value(v) if v > u64::from(u32::MAX) => RefNumber::TooLarge,
        other => other,
    }
}

fn same_number<T: Into<u64>>(got: Result<T, ParseError>, want: &RefNumber, bits: u32) -> bool {
    match (got, want) {
        (Ok(v), RefNumber::Value(w)) => v.into() == *w,
        (Err(ParseError::NotANumber(_)), RefNumber::NotANumber) => true,
        (Err(ParseError::TooLarge { bits: b, .. }), RefNumber::TooLarge) => b == bits,
        _ => false,
    }
}

/// An inclusive range `A-B` as the documentation describes it.
fn ref_range(s: &str) -> Result<(u32, u32), &'static str> {
    let (a, b) = s.split_once('-').ok_or("not a range")?;
    match (ref_u32(a), ref_u32(b)) {
        (RefNumber::Value(a), RefNumber::Value(b)) if a <= b => Ok((a as u32, b as u32)),
        (RefNumber::Value(_), RefNumber::Value(_)) => Err("reversed"),
        _ => Err("not a number"),
    }
}

/// The items of an endpoint list, unmerged, or `None` if one is bad.
fn ref_endpoints(s: &str) -> Option<Vec<(u32, u32)>> {
    s.split(',')
        .map(|item| {
            let item = item.trim();
            if item.is_empty() {
                None
            } else if item.contains('-') {
                ref_range(item).ok()
            } else {
                match ref_u32(item) {
                    RefNumber::Value(v) => Some((v as u32, v as u32)),
                    _ => None,
                }
            }
        })
        .collect()
}

fn check_set(s: &str, set: &EndpointSet, items: &[(u32, u32)]) {
    let ranges = set.ranges();
    for w in ranges.windows(2) {
        assert!(
            u64::from(*w[0].end()) + 1 < u64::from(*w[1].start()),
            "{s:?}: ranges {w:?} overlap or touch"
        );
    }
    for r in ranges {
        assert!(r.start() <= r.end(), "{s:?}: empty range {r:?}");
    }
    // Membership at the edges of every item, for lists of a few dozen
    // items (the reference is quadratic; long lists only slow the fuzzer).
    if items.len() <= 64 {
        let ref_contains = |id: u32| items.iter().any(|&(a, b)| a <= id && id <= b);
        let mut ids = vec![0, 1, 0x20, 0xffff, 0x1_0000, u32::MAX];
        for &(a, b) in items {
            ids.extend([a, b, a.wrapping_sub(1), b.wrapping_add(1)]);
        }
        for id in ids {
            assert_eq!(set.contains(id), ref_contains(id), "{s:?}: endpoint {id}");
        }
    }
    let printed = set.to_string();
    let again: EndpointSet = printed
        .parse()
        .unwrap_or_else(|e| panic!("{s:?} printed as {printed:?}, which is refused: {e}"));
    assert_eq!(&again, set, "{s:?} printed as {printed:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    let want = ref_u64(s);
    assert!(
        same_number(parse_u64(s), &want, 64),
        "parse_u64({s:?}) vs {want:?}"
    );
    let want = ref_u32(s);
    assert!(
        same_number(parse_u32(s), &want, 32),
        "parse_u32({s:?}) vs {want:?}"
    );
    match (parse_u32_range(s), ref_range(s)) {
        (Ok(r), Ok((a, b))) => assert_eq!((*r.start(), *r.end()), (a, b), "{s:?}"),
        (Err(_), Err(_)) => {}
        (got, want) => panic!("parse_u32_range({s:?}) = {got:?}, reference {want:?}"),
    }

    match (s.parse::<EndpointSet>(), ref_endpoints(s)) {
        (Ok(set), Some(items)) => check_set(s, &set, &items),
        (Err(ConfigError::EndpointList { .. } | ConfigError::EmptyEndpointItem(_)), None) => {}
        (got, want) => panic!("EndpointSet::from_str({s:?}) = {got:?}, reference {want:?}"),
    }
});
