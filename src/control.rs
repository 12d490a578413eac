// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control protocol between the daemon and VMM-side clients: message
//! types and their byte encoding (docs/control-protocol.md). Pure: the
//! sockets are the daemon's and the client library's business.
//!
//! A frame is `le32 length` (of what follows), `u8 type`, then the
//! type's payload. Hot-path messages (translations, invalidations, events,
//! acks) have fixed little-endian layouts; inspection queries carry JSON.

use thiserror::Error;

use crate::{device::StateChange, mapping::Mapping};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;
/// First bytes of every HELLO.
pub const MAGIC: [u8; 8] = *b"VIOMMUCP";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 4 << 20;

// HELLO flags: what the client does.
/// The client caches translations: it receives INVALIDATE and must ack.
pub const HELLO_F_CACHE: u32 = 1 << 0;
/// The client receives the event stream (replayed state, then changes).
pub const HELLO_F_SUBSCRIBE: u32 = 1 << 1;
/// Events must be acknowledged before the guest's request completes.
pub const HELLO_F_SYNC: u32 = 1 << 2;

// TRANSLATE flags.
pub const TRANSLATE_F_WRITE: u32 = 1 << 0;
/// On failure, also report the fault on the guest's event queue.
pub const TRANSLATE_F_REPORT_FAULT: u32 = 1 << 1;

// Extent flags (the MAP flags, plus BYPASS).
pub const EXTENT_F_BYPASS: u32 = 1 << 8;
/// `Extent::domain` of a bypassed endpoint.
pub const NO_DOMAIN: u32 = u32::MAX;

// Fault flags.
pub const FAULT_F_READ: u32 = 1 << 0;
pub const FAULT_F_WRITE: u32 = 1 << 1;

// RESULT status codes.
pub const RESULT_OK: u32 = 0;
pub const RESULT_NO_SUCH_ENDPOINT: u32 = 1;
pub const RESULT_INVALID: u32 = 2;
pub const RESULT_UNSUPPORTED: u32 = 3;

// Message types.
const T_HELLO: u8 = 0x01;
const T_TRANSLATE: u8 = 0x02;
const T_REPORT_FAULT: u8 = 0x03;
const T_ACK: u8 = 0x04;
const T_QUERY: u8 = 0x05;
const T_WELCOME: u8 = 0x81;
const T_TRANSLATION: u8 = 0x82;
const T_FAULT: u8 = 0x83;
const T_RESULT: u8 = 0x84;
const T_QUERY_REPLY: u8 = 0x85;
const T_INVALIDATE: u8 = 0x90;
const T_EVENT: u8 = 0x91;
const T_REPLAY_DONE: u8 = 0x92;
const T_BYE: u8 = 0x9f;

/// A translated IOVA range: `[iova_start, iova_end]` maps linearly to
/// `gpa_start`. Translations return whole mappings so clients can cache
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub iova_start: u64,
    /// Inclusive.
    pub iova_end: u64,
    pub gpa_start: u64,
    /// Domain the translation came from, or `NO_DOMAIN` in bypass.
    pub domain: u32,
    /// `VIRTIO_IOMMU_MAP_F_*` permissions, `EXTENT_F_BYPASS`.
    pub flags: u32,
}

/// What an INVALIDATE covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Translations from `domain` in `[start, end]`.
    DomainRange { domain: u32, start: u64, end: u64 },
    /// Every translation of one endpoint (it moved or left its domain).
    Endpoint(u32),
    /// Everything (bypass changed, device reset).
    All,
}

/// One entry of the event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Attach {
        endpoint: u32,
        domain: u32,
        bypass: bool,
    },
    Detach {
        endpoint: u32,
        domain: u32,
    },
    Map {
        domain: u32,
        mapping: Mapping,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    },
    Bypass(bool),
    Reset,
}

impl From<StateChange> for EventKind {
    fn from(c: StateChange) -> Self {
        match c {
            StateChange::Attach {
                endpoint,
                domain,
                bypass,
            } => EventKind::Attach {
                endpoint,
                domain,
                bypass,
            },
            StateChange::Detach { endpoint, domain } => EventKind::Detach { endpoint, domain },
            StateChange::Map(domain, mapping) => EventKind::Map { domain, mapping },
            StateChange::Unmap {
                domain,
                virt_start,
                virt_end,
            } => EventKind::Unmap {
                domain,
                virt_start,
                virt_end,
            },
            StateChange::Bypass(b) => EventKind::Bypass(b),
            StateChange::Reset => EventKind::Reset,
        }
    }
}

impl EventKind {
    /// What cached translations this change makes stale, if any. A MAP
    /// invalidates nothing: clients cache only successful translations.
    pub fn invalidates(&self) -> Option<Scope> {
        match *self {
            EventKind::Attach { endpoint, .. } | EventKind::Detach { endpoint, .. } => {
                Some(Scope::Endpoint(endpoint))
            }
            EventKind::Unmap {
                domain,
                virt_start,
                virt_end,
            } => Some(Scope::DomainRange {
                domain,
                start: virt_start,
                end: virt_end,
            }),
            EventKind::Bypass(_) | EventKind::Reset => Some(Scope::All),
            EventKind::Map { .. } => None,
        }
    }
}

/// A fault, as reported by a client or returned by a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultInfo {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `FAULT_F_READ` / `FAULT_F_WRITE`.
    pub flags: u32,
    pub endpoint: u32,
    pub address: u64,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    // Client to daemon.
    Hello {
        version: u16,
        flags: u32,
    },
    Translate {
        tag: u32,
        endpoint: u32,
        flags: u32,
        iova: u64,
        len: u64,
    },
    ReportFault {
        tag: u32,
        fault: FaultInfo,
    },
    Ack {
        seq: u64,
    },
    Query {
        tag: u32,
        json: String,
    },
    // Daemon to client.
    Welcome {
        version: u16,
        flags: u32,
        client_id: u64,
    },
    Translation {
        tag: u32,
        extents: Vec<Extent>,
    },
    Fault {
        tag: u32,
        fault: FaultInfo,
    },
    Result {
        tag: u32,
        status: u32,
        message: String,
    },
    QueryReply {
        tag: u32,
        json: String,
    },
    Invalidate {
        seq: u64,
        scope: Scope,
    },
    /// `seq` 0: part of the replay on subscribe (no ack expected).
    Event {
        seq: u64,
        kind: EventKind,
    },
    ReplayDone,
    Bye {
        message: String,
    },
}

/// A frame that cannot be decoded.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown message type {0:#x}")]
    UnknownType(u8),
    #[error("message type {0:#x} is truncated")]
    Truncated(u8),
    #[error("bad HELLO magic")]
    BadMagic,
    #[error("unknown {what} value {value}")]
    BadValue { what: &'static str, value: u64 },
    #[error("text is not UTF-8")]
    NotUtf8,
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(t: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0, 0, 0, 0, t]);
        Writer(v)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

struct Reader<'a> {
    t: u8,
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated(self.t));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        let rest = std::mem::take(&mut self.b);
        String::from_utf8(rest.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }
}

fn put_fault(w: &mut Writer, f: &FaultInfo) {
    w.u8(f.reason)
        .bytes(&[0; 3])
        .u32(f.flags)
        .u32(f.endpoint)
        .u32(0)
        .u64(f.address);
}

fn get_fault(r: &mut Reader<'_>) -> Result<FaultInfo, DecodeError> {
    let reason = r.u8()?;
    r.take(3)?;
    let flags = r.u32()?;
    let endpoint = r.u32()?;
    r.u32()?;
    let address = r.u64()?;
    Ok(FaultInfo {
        reason,
        flags,
        endpoint,
        address,
    })
}

// Event kinds on the wire.
const E_ATTACH: u8 = 1;
const E_DETACH: u8 = 2;
const E_MAP: u8 = 3;
const E_UNMAP: u8 = 4;
const E_BYPASS: u8 = 5;
const E_RESET: u8 = 6;

impl Message {
    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Hello { version, flags } => {
                let mut w = Writer::new(T_HELLO);
                w.bytes(&MAGIC).u16(*version).u16(0).u32(*flags);
                w.finish()
            }
            Message::Translate {
                tag,
                endpoint,
                flags,
                iova,
                len,
            } => {
                let mut w = Writer::new(T_TRANSLATE);
                w.u32(*tag)
                    .u32(*endpoint)
                    .u32(*flags)
                    .u32(0)
                    .u64(*iova)
                    .u64(*len);
                w.finish()
            }
            Message::ReportFault { tag, fault } => {
                let mut w = Writer::new(T_REPORT_FAULT);
                w.u32(*tag);
                put_fault(&mut w, fault);
                w.finish()
            }
            Message::Ack { seq } => {
                let mut w = Writer::new(T_ACK);
                w.u64(*seq);
                w.finish()
            }
            Message::Query { tag, json } => {
                let mut w = Writer::new(T_QUERY);
                w.u32(*tag).bytes(json.as_bytes());
                w.finish()
            }
            Message::Welcome {
                version,
                flags,
                client_id,
            } => {
                let mut w = Writer::new(T_WELCOME);
                w.u16(*version).u16(0).u32(*flags).u64(*client_id);
                w.finish()
            }
            Message::Translation { tag, extents } => {
                let mut w = Writer::new(T_TRANSLATION);
                w.u32(*tag).u32(extents.len() as u32);
                for e in extents {
                    w.u64(e.iova_start)
                        .u64(e.iova_end)
                        .u64(e.gpa_start)
                        .u32(e.domain)
                        .u32(e.flags);
                }
                w.finish()
            }
            Message::Fault { tag, fault } => {
                let mut w = Writer::new(T_FAULT);
                w.u32(*tag);
                put_fault(&mut w, fault);
                w.finish()
            }
            Message::Result {
                tag,
                status,
                message,
            } => {
                let mut w = Writer::new(T_RESULT);
                w.u32(*tag).u32(*status).bytes(message.as_bytes());
                w.finish()
            }
            Message::QueryReply { tag, json } => {
                let mut w = Writer::new(T_QUERY_REPLY);
                w.u32(*tag).bytes(json.as_bytes());
                w.finish()
            }
            Message::Invalidate { seq, scope } => {
                let mut w = Writer::new(T_INVALIDATE);
                w.u64(*seq);
                match *scope {
                    Scope::DomainRange { domain, start, end } => {
                        w.u8(1).bytes(&[0; 3]).u32(domain).u64(start).u64(end)
                    }
                    Scope::Endpoint(ep) => w.u8(2).bytes(&[0; 3]).u32(ep).u64(0).u64(0),
                    Scope::All => w.u8(3).bytes(&[0; 3]).u32(0).u64(0).u64(0),
                };
                w.finish()
            }
            Message::Event { seq, kind } => {
                let mut w = Writer::new(T_EVENT);
                w.u64(*seq);
                // kind, flags, pad, endpoint, domain, map_flags, start, end, phys
                let (k, f, ep, dom, mf, s, e, p) = match *kind {
                    EventKind::Attach {
                        endpoint,
                        domain,
                        bypass,
                    } => (E_ATTACH, u8::from(bypass), endpoint, domain, 0, 0, 0, 0),
                    EventKind::Detach { endpoint, domain } => {
                        (E_DETACH, 0, endpoint, domain, 0, 0, 0, 0)
                    }
                    EventKind::Map { domain, mapping: m } => (
                        E_MAP,
                        0,
                        0,
                        domain,
                        m.flags,
                        m.virt_start,
                        m.virt_end,
                        m.phys_start,
                    ),
                    EventKind::Unmap {
                        domain,
                        virt_start,
                        virt_end,
                    } => (E_UNMAP, 0, 0, domain, 0, virt_start, virt_end, 0),
                    EventKind::Bypass(b) => (E_BYPASS, u8::from(b), 0, 0, 0, 0, 0, 0),
                    EventKind::Reset => (E_RESET, 0, 0, 0, 0, 0, 0, 0),
                };
                w.u8(k)
                    .u8(f)
                    .u16(0)
                    .u32(ep)
                    .u32(dom)
                    .u32(mf)
                    .u64(s)
                    .u64(e)
                    .u64(p);
                w.finish()
            }
            Message::ReplayDone => Writer::new(T_REPLAY_DONE).finish(),
            Message::Bye { message } => {
                let mut w = Writer::new(T_BYE);
                w.bytes(message.as_bytes());
                w.finish()
            }
        }
    }

    /// Decodes one frame body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
        let (&t, b) = body.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader { t, b };
        let msg = match t {
            T_HELLO => {
                if r.take(8)? != MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                let version = r.u16()?;
                r.u16()?;
                Message::Hello {
                    version,
                    flags: r.u32()?,
                }
            }
            T_TRANSLATE => {
                let (tag, endpoint, flags) = (r.u32()?, r.u32()?, r.u32()?);
                r.u32()?;
                Message::Translate {
                    tag,
                    endpoint,
                    flags,
                    iova: r.u64()?,
                    len: r.u64()?,
                }
            }
            T_REPORT_FAULT => Message::ReportFault {
                tag: r.u32()?,
                fault: get_fault(&mut r)?,
            },
            T_ACK => Message::Ack { seq: r.u64()? },
            T_QUERY => Message::Query {
                tag: r.u32()?,
                json: r.text()?,
            },
            T_WELCOME => {
                let version = r.u16()?;
                r.u16()?;
                Message::Welcome {
                    version,
                    flags: r.u32()?,
                    client_id: r.u64()?,
                }
            }
            T_TRANSLATION => {
                let tag = r.u32()?;
                let n = r.u32()? as usize;
                if n > r.b.len() / 32 {
                    return Err(DecodeError::Truncated(t));
                }
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    extents.push(Extent {
                        iova_start: r.u64()?,
                        iova_end: r.u64()?,
                        gpa_start: r.u64()?,
                        domain: r.u32()?,
                        flags: r.u32()?,
                    });
                }
                Message::Translation { tag, extents }
            }
            T_FAULT => Message::Fault {
                tag: r.u32()?,
                fault: get_fault(&mut r)?,
            },
            T_RESULT => Message::Result {
                tag: r.u32()?,
                status: r.u32()?,
                message: r.text()?,
            },
            T_QUERY_REPLY => Message::QueryReply {
                tag: r.u32()?,
                json: r.text()?,
            },
            T_INVALIDATE => {
                let seq = r.u64()?;
                let kind = r.u8()?;
                r.take(3)?;
                let (id, start, end) = (r.u32()?, r.u64()?, r.u64()?);
                let scope = match kind {
                    1 => Scope::DomainRange {
                        domain: id,
                        start,
                        end,
                    },
                    2 => Scope::Endpoint(id),
                    3 => Scope::All,
                    v => {
                        return Err(DecodeError::BadValue {
                            what: "scope",
                            value: v.into(),
                        })
                    }
                };
                Message::Invalidate { seq, scope }
            }
            T_EVENT => {
                let seq = r.u64()?;
                let (k, f) = (r.u8()?, r.u8()?);
                r.u16()?;
                let (endpoint, domain, map_flags) = (r.u32()?, r.u32()?, r.u32()?);
                let (s, e, p) = (r.u64()?, r.u64()?, r.u64()?);
                let kind = match k {
                    E_ATTACH => EventKind::Attach {
                        endpoint,
                        domain,
                        bypass: f & 1 != 0,
                    },
                    E_DETACH => EventKind::Detach { endpoint, domain },
                    E_MAP => EventKind::Map {
                        domain,
                        mapping: Mapping {
                            virt_start: s,
                            virt_end: e,
                            phys_start: p,
                            flags: map_flags,
                        },
                    },
                    E_UNMAP => EventKind::Unmap {
                        domain,
                        virt_start: s,
                        virt_end: e,
                    },
                    E_BYPASS => EventKind::Bypass(f & 1 != 0),
                    E_RESET => EventKind::Reset,
                    v => {
                        return Err(DecodeError::BadValue {
                            what: "event kind",
                            value: v.into(),
                        })
                    }
                };
                Message::Event { seq, kind }
            }
            T_REPLAY_DONE => Message::ReplayDone,
            T_BYE => Message::Bye { message: r.text()? },
            other => return Err(DecodeError::UnknownType(other)),
        };
        Ok(msg)
    }
}

/// Splits complete frames off the front of a receive buffer.
#[derive(Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
}

impl FrameBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room to read into: call `filled(n)` after writing `n` bytes to it.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + min, 0);
        &mut self.buf[len..]
    }

    /// Keeps `n` of the bytes handed out by `spare`, drops the rest.
    pub fn filled(&mut self, n: usize, spare_len: usize) {
        let len = self.buf.len();
        self.buf.truncate(len - spare_len + n);
    }

    /// The next complete frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::TooLarge(len));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let body = &self.buf[self.start + 4..self.start + 4 + len];
        self.start += 4 + len;
        Ok(Some(body))
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

    #[test]
    fn every_message_survives_encoding() {
        let fault = FaultInfo {
            reason: 2,
            flags: FAULT_F_WRITE,
            endpoint: 32,
            address: 0xdead_0000,
        };
        let mapping = Mapping {
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000,
            flags: 3,
        };
        for m in [
            Message::Hello {
                version: 1,
                flags: HELLO_F_CACHE | HELLO_F_SUBSCRIBE,
            },
            Message::Translate {
                tag: 7,
                endpoint: 32,
                flags: TRANSLATE_F_WRITE,
                iova: 1,
                len: 2,
            },
            Message::ReportFault { tag: 1, fault },
            Message::Ack { seq: u64::MAX },
            Message::Query {
                tag: 3,
                json: r#"{"cmd":"status"}"#.into(),
            },
            Message::Welcome {
                version: 1,
                flags: 0,
                client_id: 9,
            },
            Message::Translation {
                tag: 4,
                extents: vec![Extent {
                    iova_start: 0,
                    iova_end: 9,
                    gpa_start: 5,
                    domain: 1,
                    flags: 3,
                }],
            },
            Message::Fault { tag: 5, fault },
            Message::Result {
                tag: 6,
                status: RESULT_INVALID,
                message: "no".into(),
            },
            Message::QueryReply {
                tag: 8,
                json: "{}".into(),
            },
            Message::Invalidate {
                seq: 3,
                scope: Scope::DomainRange {
                    domain: 1,
                    start: 2,
                    end: 3,
                },
            },
            Message::Invalidate {
                seq: 4,
                scope: Scope::Endpoint(32),
            },
            Message::Invalidate {
                seq: 5,
                scope: Scope::All,
            },
            Message::Event {
                seq: 6,
                kind: EventKind::Map { domain: 1, mapping },
            },
            Message::Event {
                seq: 0,
                kind: EventKind::Attach {
                    endpoint: 32,
                    domain: 1,
                    bypass: true,
                },
            },
            Message::Event {
                seq: 7,
                kind: EventKind::Unmap {
                    domain: 1,
                    virt_start: 0,
                    virt_end: 9,
                },
            },
            Message::Event {
                seq: 8,
                kind: EventKind::Detach {
                    endpoint: 32,
                    domain: 1,
                },
            },
            Message::Event {
                seq: 9,
                kind: EventKind::Bypass(false),
            },
            Message::Event {
                seq: 10,
                kind: EventKind::Reset,
            },
            Message::ReplayDone,
            Message::Bye {
                message: "bye".into(),
            },
        ] {
            roundtrip(m);
        }
    }

    #[test]
    fn truncated_and_unknown_frames_are_errors_not_panics() {
        let bytes = Message::Translate {
            tag: 1,
            endpoint: 2,
            flags: 0,
            iova: 3,
            len: 4,
        }
        .encode();
        for n in 5..bytes.len() {
            assert!(Message::decode(&bytes[4..n]).is_err(), "{n}");
        }
        assert_eq!(Message::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Message::decode(&[0x7e]),
            Err(DecodeError::UnknownType(0x7e))
        );
        let mut hello = Message::Hello {
            version: 1,
            flags: 0,
        }
        .encode();
        hello[5] = b'X';
        assert_eq!(Message::decode(&hello[4..]), Err(DecodeError::BadMagic));
        // A translation claiming more extents than its bytes hold.
        let mut t = Message::Translation {
            tag: 1,
            extents: vec![],
        }
        .encode();
        t[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Message::decode(&t[4..]).is_err());
    }

    #[test]
    fn frame_buffer_reassembles_frames_split_anywhere() {
        let a = Message::Ack { seq: 1 }.encode();
        let b = Message::Query {
            tag: 2,
            json: "x".repeat(100),
        }
        .encode();
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        for chunk in [1, 3, 7, 64] {
            let mut fb = FrameBuffer::new();
            let mut got = vec![];
            for piece in stream.chunks(chunk) {
                let spare = fb.spare(piece.len());
                let n = spare.len();
                spare[..piece.len()].copy_from_slice(piece);
                fb.filled(piece.len(), n);
                while let Some(f) = fb.next_frame().unwrap() {
                    got.push(Message::decode(f).unwrap());
                }
            }
            assert_eq!(got.len(), 2, "chunk {chunk}");
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_it_is_buffered() {
        let mut fb = FrameBuffer::new();
        let spare = fb.spare(4);
        let n = spare.len();
        spare.copy_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        fb.filled(4, n);
        assert!(matches!(fb.next_frame(), Err(DecodeError::TooLarge(_))));
    }

    #[test]
    fn unmap_invalidates_its_domain_range_and_map_invalidates_nothing() {
        let unmap = EventKind::Unmap {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
        };
        assert_eq!(
            unmap.invalidates(),
            Some(Scope::DomainRange {
                domain: 1,
                start: 0x1000,
                end: 0x1fff
            })
        );
        let m = Mapping {
            virt_start: 0,
            virt_end: 1,
            phys_start: 0,
            flags: 0,
        };
        assert_eq!(
            EventKind::Map {
                domain: 1,
                mapping: m
            }
            .invalidates(),
            None
        );
        assert_eq!(
            EventKind::Detach {
                endpoint: 4,
                domain: 1
            }
            .invalidates(),
            Some(Scope::Endpoint(4))
        );
        assert_eq!(EventKind::Reset.invalidates(), Some(Scope::All));
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

        #[test]
        fn arbitrary_streams_never_panic_the_frame_buffer(stream in prop::collection::vec(any::<u8>(), 0..400), chunk in 1usize..64) {
            let mut fb = FrameBuffer::new();
            for piece in stream.chunks(chunk) {
                let spare = fb.spare(piece.len());
                let n = spare.len();
                spare[..piece.len()].copy_from_slice(piece);
                fb.filled(piece.len(), n);
                while let Ok(Some(f)) = fb.next_frame() {
                    let _ = Message::decode(f);
                }
            }
        }
    }
}
