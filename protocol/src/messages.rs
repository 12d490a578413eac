// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The messages of the control protocol (docs/control-protocol.md), each
//! declared once, and the records they carry.
//!
//! A frame is `le32 length` (of what follows), `u8 type`, then the
//! payload's fields in order, little-endian.

use viommu::{
    change::{Invalidation, StateChange},
    mapping::Mapping,
    Translation as ModelTranslation,
};

use crate::codec::{messages, record, DecodeError, Reader, Record, Wire};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;
/// First bytes of every HELLO.
pub const MAGIC: [u8; 8] = *b"VIOMMUCP";

// HELLO flags: what the client does.
/// The client caches translations: it receives INVALIDATE and must ack.
pub const HELLO_F_CACHE: u32 = 1 << 0;
/// The client receives the event stream (replayed state, then changes).
pub const HELLO_F_SUBSCRIBE: u32 = 1 << 1;
/// Events must be acknowledged before the guest's request completes.
pub const HELLO_F_SYNC: u32 = 1 << 2;
/// The client only inspects (QUERY): it may use the connection slot the
/// daemon keeps free for `ctl` when every other slot is taken.
pub const HELLO_F_INSPECT: u32 = 1 << 3;
/// Every HELLO flag this version knows; WELCOME grants only these.
pub const HELLO_F_KNOWN: u32 = HELLO_F_CACHE | HELLO_F_SUBSCRIBE | HELLO_F_SYNC | HELLO_F_INSPECT;

// TRANSLATE flags.
/// A write access (otherwise a read).
pub const TRANSLATE_F_WRITE: u32 = 1 << 0;
/// On failure, also report the fault on the guest's event queue.
pub const TRANSLATE_F_REPORT_FAULT: u32 = 1 << 1;

/// Extent flag (beside the MAP flags): identity translation in bypass.
pub const EXTENT_F_BYPASS: u32 = 1 << 8;
/// `Extent::domain` of a bypassed endpoint attached to no domain.
pub const NO_DOMAIN: u32 = u32::MAX;

/// Fault flag: the access was a read.
pub const FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the access was a write.
pub const FAULT_F_WRITE: u32 = 1 << 1;

// RESULT status codes.
/// Success.
pub const RESULT_OK: u32 = 0;
/// The endpoint does not exist.
pub const RESULT_NO_SUCH_ENDPOINT: u32 = 1;
/// The request is malformed or refused.
pub const RESULT_INVALID: u32 = 2;
/// The daemon does not support the request.
pub const RESULT_UNSUPPORTED: u32 = 3;

/// HELLO's magic, checked when read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Magic;

impl Wire for Magic {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.take(MAGIC.len())? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        Ok(Magic)
    }
}

record! {
    /// A translated IOVA range: `[iova_start, iova_end]` maps linearly to
    /// `gpa_start`. Translations return whole mappings so clients can
    /// cache them.
    pub struct Extent {
        /// First IOVA.
        iova_start: u64,
        /// Last IOVA (inclusive).
        iova_end: u64,
        /// Guest-physical address of `iova_start`.
        gpa_start: u64,
        /// Domain the translation came from, or [`NO_DOMAIN`] in bypass.
        domain: u32,
        /// `VIRTIO_IOMMU_MAP_F_*` permissions, [`EXTENT_F_BYPASS`].
        flags: u32,
    }
}

impl From<ModelTranslation> for Extent {
    fn from(t: ModelTranslation) -> Self {
        Extent {
            iova_start: t.iova_start,
            iova_end: t.iova_end,
            gpa_start: t.gpa_start,
            domain: t.domain.unwrap_or(NO_DOMAIN),
            flags: t.flags | if t.bypass { EXTENT_F_BYPASS } else { 0 },
        }
    }
}

record! {
    /// A fault, as reported by a client or returned by a translation
    /// (24 bytes).
    pub struct FaultInfo {
        /// `VIRTIO_IOMMU_FAULT_R_*`.
        reason: u8 [pad 3],
        /// [`FAULT_F_READ`] / [`FAULT_F_WRITE`].
        flags: u32,
        /// The endpoint.
        endpoint: u32 [pad 4],
        /// The faulting address.
        address: u64,
    }
}

record! {
    /// How an [`Invalidation`] travels (24 bytes).
    pub struct InvalidationRecord {
        /// 1 domain range, 2 endpoint, 3 everything.
        scope: u8 [pad 3],
        /// The domain (scope 1) or endpoint (scope 2).
        id: u32,
        /// First IOVA (scope 1).
        start: u64,
        /// Last IOVA, inclusive (scope 1).
        end: u64,
    }
}

const SCOPE_DOMAIN_RANGE: u8 = 1;
const SCOPE_ENDPOINT: u8 = 2;
const SCOPE_ALL: u8 = 3;

impl Wire for Invalidation {
    fn put(&self, out: &mut Vec<u8>) {
        let (scope, id, start, end) = match *self {
            Invalidation::DomainRange { domain, start, end } => {
                (SCOPE_DOMAIN_RANGE, domain, start, end)
            }
            Invalidation::Endpoint(ep) => (SCOPE_ENDPOINT, ep, 0, 0),
            Invalidation::All => (SCOPE_ALL, 0, 0, 0),
        };
        InvalidationRecord {
            scope,
            id,
            start,
            end,
        }
        .put(out);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let rec = InvalidationRecord::get(r)?;
        Ok(match rec.scope {
            SCOPE_DOMAIN_RANGE => Invalidation::DomainRange {
                domain: rec.id,
                start: rec.start,
                end: rec.end,
            },
            SCOPE_ENDPOINT => Invalidation::Endpoint(rec.id),
            SCOPE_ALL => Invalidation::All,
            v => {
                return Err(DecodeError::BadValue {
                    what: "invalidation scope",
                    value: v.into(),
                })
            }
        })
    }
}

record! {
    /// How a [`StateChange`] travels in an EVENT (40 bytes).
    pub struct EventRecord {
        /// 1 ATTACH, 2 DETACH, 3 MAP, 4 UNMAP, 5 BYPASS, 6 RESET.
        kind: u8,
        /// Bit 0: bypass domain (ATTACH) or the new `bypass` value (BYPASS).
        flags: u8 [pad 2],
        /// The endpoint (ATTACH, DETACH).
        endpoint: u32,
        /// The domain (ATTACH, DETACH, MAP, UNMAP).
        domain: u32,
        /// The MAP flags (MAP).
        map_flags: u32,
        /// First IOVA (MAP, UNMAP).
        virt_start: u64,
        /// Last IOVA, inclusive (MAP, UNMAP).
        virt_end: u64,
        /// Guest-physical address of `virt_start` (MAP).
        phys_start: u64,
    }
}

const E_ATTACH: u8 = 1;
const E_DETACH: u8 = 2;
const E_MAP: u8 = 3;
const E_UNMAP: u8 = 4;
const E_BYPASS: u8 = 5;
const E_RESET: u8 = 6;

impl From<StateChange> for EventRecord {
    fn from(c: StateChange) -> Self {
        let mut rec = EventRecord {
            kind: 0,
            flags: 0,
            endpoint: 0,
            domain: 0,
            map_flags: 0,
            virt_start: 0,
            virt_end: 0,
            phys_start: 0,
        };
        match c {
            StateChange::Attach {
                endpoint,
                domain,
                bypass,
            } => {
                rec.kind = E_ATTACH;
                rec.flags = u8::from(bypass);
                (rec.endpoint, rec.domain) = (endpoint, domain);
            }
            StateChange::Detach { endpoint, domain } => {
                rec.kind = E_DETACH;
                (rec.endpoint, rec.domain) = (endpoint, domain);
            }
            StateChange::Map { domain, mapping } => {
                rec.kind = E_MAP;
                rec.domain = domain;
                rec.map_flags = mapping.flags;
                rec.virt_start = mapping.virt_start;
                rec.virt_end = mapping.virt_end;
                rec.phys_start = mapping.phys_start;
            }
            StateChange::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                rec.kind = E_UNMAP;
                rec.domain = domain;
                (rec.virt_start, rec.virt_end) = (virt_start, virt_end);
            }
            StateChange::Bypass(on) => {
                rec.kind = E_BYPASS;
                rec.flags = u8::from(on);
            }
            StateChange::Reset => rec.kind = E_RESET,
        }
        rec
    }
}

impl TryFrom<EventRecord> for StateChange {
    type Error = DecodeError;

    fn try_from(r: EventRecord) -> Result<Self, DecodeError> {
        Ok(match r.kind {
            E_ATTACH => StateChange::Attach {
                endpoint: r.endpoint,
                domain: r.domain,
                bypass: r.flags & 1 != 0,
            },
            E_DETACH => StateChange::Detach {
                endpoint: r.endpoint,
                domain: r.domain,
            },
            E_MAP => StateChange::Map {
                domain: r.domain,
                mapping: Mapping {
                    virt_start: r.virt_start,
                    virt_end: r.virt_end,
                    phys_start: r.phys_start,
                    flags: r.map_flags,
                },
            },
            E_UNMAP => StateChange::Unmap {
                domain: r.domain,
                virt_start: r.virt_start,
                virt_end: r.virt_end,
            },
            E_BYPASS => StateChange::Bypass(r.flags & 1 != 0),
            E_RESET => StateChange::Reset,
            v => {
                return Err(DecodeError::BadValue {
                    what: "event kind",
                    value: v.into(),
                })
            }
        })
    }
}

impl Wire for StateChange {
    fn put(&self, out: &mut Vec<u8>) {
        EventRecord::from(*self).put(out);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        EventRecord::get(r)?.try_into()
    }
}

impl Record for StateChange {
    const SIZE: usize = EventRecord::SIZE;
}

messages! {
    // Client to daemon.

    /// HELLO: the client's first message.
    0x01 => Hello {
        /// `"VIOMMUCP"`.
        magic: Magic,
        /// Protocol version the client speaks.
        version: u16 [pad 2],
        /// `HELLO_F_*`.
        flags: u32,
    }
    /// TRANSLATE: `[iova, iova + len)` as an access by `endpoint`.
    0x02 => Translate {
        /// Echoed in the reply.
        tag: u32,
        /// The endpoint making the access.
        endpoint: u32,
        /// `TRANSLATE_F_*`.
        flags: u32 [pad 4],
        /// First IOVA.
        iova: u64,
        /// Bytes (0 is taken as 1).
        len: u64,
    }
    /// REPORT_FAULT: deliver an unrecoverable fault to the guest.
    0x03 => ReportFault {
        /// Echoed in the reply.
        tag: u32,
        /// The fault.
        fault: FaultInfo,
    }
    /// ACK: an INVALIDATE or a live EVENT has been applied.
    0x04 => Ack {
        /// Its sequence number.
        seq: u64,
    }
    /// QUERY: an inspection query (JSON, [`crate::query::Query`]).
    0x05 => Query {
        /// Echoed in the reply.
        tag: u32,
        /// The query document.
        json: String,
    }

    // Daemon to client.

    /// WELCOME: the handshake succeeded.
    0x81 => Welcome {
        /// Protocol version the daemon speaks.
        version: u16 [pad 2],
        /// The HELLO flags granted.
        flags: u32,
        /// The client's ID.
        client_id: u64,
    }
    /// TRANSLATION: the mappings that cover a translated range.
    0x82 => Translation {
        /// The request's tag.
        tag: u32,
        /// Whole mappings, in address order.
        extents: Vec<Extent>,
    }
    /// FAULT: the first address of a translated range that does not
    /// translate.
    0x83 => Fault {
        /// The request's tag.
        tag: u32,
        /// The fault.
        fault: FaultInfo,
    }
    /// RESULT: the outcome of a request that has no other answer.
    0x84 => CallResult {
        /// The request's tag.
        tag: u32,
        /// `RESULT_*`.
        status: u32,
        /// Why, when not OK.
        message: String,
    }
    /// QUERY_REPLY: the answer to a QUERY (JSON).
    0x85 => QueryReply {
        /// The request's tag.
        tag: u32,
        /// The reply document.
        json: String,
    }
    /// INVALIDATE: drop these cached translations, then ACK.
    0x90 => Invalidate {
        /// Sequence number to acknowledge.
        seq: u64,
        /// What to drop.
        scope: Invalidation,
    }
    /// EVENT: a change of the IOMMU state (`seq` 0: part of the replay).
    0x91 => Event {
        /// Sequence number (acknowledged by SYNC subscribers).
        seq: u64,
        /// The change.
        change: StateChange,
    }
    /// REPLAY_DONE: the replay is complete; live events follow.
    0x92 => ReplayDone {}
    /// BYE: the daemon closes the connection.
    0x9f => Bye {
        /// Why.
        message: String,
    }
}

impl Message {
    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out);
        out
    }
}

impl Hello {
    /// A HELLO of this version with `flags`.
    pub fn new(flags: u32) -> Self {
        Hello {
            magic: Magic,
            version: PROTOCOL_VERSION,
            flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let bytes = m.encode();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(Message::decode(&bytes[4..]).unwrap(), m);
    }

    fn fault() -> FaultInfo {
        FaultInfo {
            reason: 2,
            flags: FAULT_F_WRITE,
            endpoint: 32,
            address: 0xdead_0000,
        }
    }

    #[test]
    fn every_message_survives_encoding() {
        let mapping = Mapping {
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000,
            flags: 3,
        };
        let changes = [
            StateChange::Map { domain: 1, mapping },
            StateChange::Attach {
                endpoint: 32,
                domain: 1,
                bypass: true,
            },
            StateChange::Unmap {
                domain: 1,
                virt_start: 0,
                virt_end: 9,
            },
            StateChange::Detach {
                endpoint: 32,
                domain: 1,
            },
            StateChange::Bypass(false),
            StateChange::Reset,
        ];
        let mut all: Vec<Message> = vec![
            Hello::new(HELLO_F_CACHE | HELLO_F_SUBSCRIBE).into(),
            Translate {
                tag: 7,
                endpoint: 32,
                flags: TRANSLATE_F_WRITE,
                iova: 1,
                len: 2,
            }
            .into(),
            ReportFault {
                tag: 1,
                fault: fault(),
            }
            .into(),
            Ack { seq: u64::MAX }.into(),
            Query {
                tag: 3,
                json: r#"{"cmd":"status"}"#.into(),
            }
            .into(),
            Welcome {
                version: 1,
                flags: 0,
                client_id: 9,
            }
            .into(),
            Translation {
                tag: 4,
                extents: vec![Extent {
                    iova_start: 0,
                    iova_end: 9,
                    gpa_start: 5,
                    domain: 1,
                    flags: 3,
                }],
            }
            .into(),
            Fault {
                tag: 5,
                fault: fault(),
            }
            .into(),
            CallResult {
                tag: 6,
                status: RESULT_INVALID,
                message: "no".into(),
            }
            .into(),
            QueryReply {
                tag: 8,
                json: "{}".into(),
            }
            .into(),
            ReplayDone {}.into(),
            Bye {
                message: "bye".into(),
            }
            .into(),
        ];
        for scope in [
            Invalidation::DomainRange {
                domain: 1,
                start: 2,
                end: 3,
            },
            Invalidation::Endpoint(32),
            Invalidation::All,
        ] {
            all.push(Invalidate { seq: 3, scope }.into());
        }
        for (seq, change) in changes.into_iter().enumerate() {
            all.push(
                Event {
                    seq: seq as u64,
                    change,
                }
                .into(),
            );
        }
        for m in all {
            roundtrip(m);
        }
    }

    #[test]
    fn layouts_match_the_protocol_document() {
        // HELLO: magic, le16 version, le16 reserved, le32 flags.
        let b = Message::from(Hello::new(0x55)).encode();
        assert_eq!(b.len(), 4 + 1 + 16);
        assert_eq!(&b[5..13], b"VIOMMUCP");
        assert_eq!(&b[17..21], &[0x55, 0, 0, 0]);
        // TRANSLATE: tag, endpoint, flags, reserved, iova, len.
        let t = Message::from(Translate {
            tag: 1,
            endpoint: 2,
            flags: 3,
            iova: 4,
            len: 5,
        })
        .encode();
        assert_eq!(t.len(), 4 + 1 + 32);
        assert_eq!(t[5 + 16], 4);
        assert_eq!(FaultInfo::SIZE, 24);
        assert_eq!(Extent::SIZE, 32);
        assert_eq!(InvalidationRecord::SIZE, 24);
        assert_eq!(EventRecord::SIZE, 40);
        let e = Message::from(Event {
            seq: 1,
            change: StateChange::Reset,
        })
        .encode();
        assert_eq!(e.len(), 4 + 1 + 8 + 40);
    }

    #[test]
    fn truncated_and_unknown_frames_are_errors_not_panics() {
        let bytes = Message::from(Translate {
            tag: 1,
            endpoint: 2,
            flags: 0,
            iova: 3,
            len: 4,
        })
        .encode();
        for n in 5..bytes.len() {
            assert!(Message::decode(&bytes[4..n]).is_err(), "{n}");
        }
        assert_eq!(Message::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Message::decode(&[0x7e]),
            Err(DecodeError::UnknownType(0x7e))
        );
        let mut hello = Message::from(Hello::new(0)).encode();
        hello[5] = b'X';
        assert_eq!(Message::decode(&hello[4..]), Err(DecodeError::BadMagic));
        // A translation claiming more extents than its bytes hold.
        let mut t = Message::from(Translation {
            tag: 1,
            extents: vec![],
        })
        .encode();
        t[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Message::decode(&t[4..]).is_err());
        // Unknown event kinds and invalidation scopes.
        let mut e = Message::from(Event {
            seq: 1,
            change: StateChange::Reset,
        })
        .encode();
        e[13] = 99;
        assert!(matches!(
            Message::decode(&e[4..]),
            Err(DecodeError::BadValue { .. })
        ));
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A peer can send anything: decoding fails cleanly or yields a
        /// message that encodes back to a decodable frame.
        #[test]
        fn arbitrary_frames_never_panic_the_decoder(body in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(m) = Message::decode(&body) {
                let again = m.encode();
                prop_assert!(Message::decode(&again[4..]).is_ok());
            }
        }
    }
}
