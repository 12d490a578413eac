// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control protocol's message decoder (protocol/src/messages.rs), on
//! arbitrary frame bodies: what a peer of the control socket may send.
//!
//! Beyond "no panic", for every body `Message::decode` accepts:
//! - it round-trips: the message encodes to a frame whose length prefix
//!   is right, which decodes to the same message and encodes to the same
//!   bytes again (the encoding is canonical: reserved bytes zero, ignored
//!   bits dropped);
//! - the encoding is no longer than the body and keeps its type byte;
//! - bytes appended after the last field are ignored (the protocol lets a
//!   later version add fields), for messages that do not end in text;
//! - the JSON of a QUERY, when the daemon's parser accepts it, serializes
//!   back to a document that parses to the same query.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu_protocol::{query::Query as QueryDoc, Message};

/// Messages whose last field is text that runs to the end of the frame.
fn ends_in_text(m: &Message) -> bool {
    matches!(
        m,
        Message::Query(_) | Message::CallResult(_) | Message::QueryReply(_) | Message::Bye(_)
    )
}

fuzz_target!(|body: &[u8]| {
    let Ok(m) = Message::decode(body) else {
        return;
    };
    let frame = m.encode();
    let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "length prefix of {m:?}");
    let canonical = &frame[4..];
    assert!(canonical.len() <= body.len(), "{m:?} grew when encoded");
    assert_eq!(canonical[0], body[0], "type byte of {m:?}");
    assert_eq!(m.type_code(), body[0]);
    let again = Message::decode(canonical).expect("an encoded message decodes");
    assert_eq!(again, m, "round trip");
    assert_eq!(again.encode(), frame, "encoding is canonical");

    if !ends_in_text(&m) {
        let mut longer = canonical.to_vec();
        longer.extend_from_slice(body);
        assert_eq!(Message::decode(&longer).as_ref(), Ok(&m), "appended bytes");
    }

    if let Message::Query(q) = &m {
        if let Ok(doc) = serde_json::from_str::<QueryDoc>(&q.json) {
            let text = viommu_protocol::query::encode(&doc).expect("a query serializes");
            let back: QueryDoc = serde_json::from_str(&text).expect("its JSON parses");
            assert_eq!(back, doc, "query {text}");
        }
    }
});
