// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The inspection queries (QUERY / QUERY_REPLY, docs/control-protocol.md
//! "Queries") as typed documents: the daemon builds its replies from these
//! structs and `ctl` prints them, so the JSON has one definition.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

/// Most mappings one `mappings` reply holds; clients page with `from`.
pub const MAX_QUERY_MAPPINGS: usize = 10_000;
/// Most PASIDs one `pasids` reply holds; clients page with `from`.
pub const MAX_QUERY_PASIDS: usize = 10_000;

/// A query (`{"cmd": NAME, ...}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Query {
    /// Daemon and device summary.
    Status,
    /// Attached endpoints and their domains.
    Endpoints,
    /// Domains with their endpoints and number of mappings.
    Domains,
    /// One page of a domain's mappings.
    Mappings {
        /// The domain.
        domain: u32,
        /// Lowest IOVA to list.
        #[serde(default)]
        from: u64,
        /// Most mappings in the reply (at most [`MAX_QUERY_MAPPINGS`]).
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Request, error, fault and client counters.
    Stats,
    /// This daemon's PASIDs and the host's sets.
    Pasids {
        /// Lowest host PASID to list.
        #[serde(default)]
        from: u32,
        /// Most PASIDs in the reply (at most [`MAX_QUERY_PASIDS`]).
        #[serde(default)]
        limit: Option<usize>,
    },
}

/// A query that failed.
#[derive(Debug, Error)]
pub enum QueryError {
    /// The daemon answered `{"error": ...}`.
    #[error("the daemon refused the query: {0}")]
    Refused(String),
    /// The document does not match its schema.
    #[error("malformed query document")]
    Json(#[from] serde_json::Error),
}

/// The JSON text of a query.
pub fn encode(q: &Query) -> Result<String, QueryError> {
    Ok(serde_json::to_string(q)?)
}

/// The error document of a failed query.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Why.
    pub error: String,
}

/// Decodes a reply: the typed document, or the daemon's error.
pub fn decode_reply<R: DeserializeOwned>(json: &str) -> Result<R, QueryError> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(QueryError::Refused(e.to_string()));
    }
    Ok(serde_json::from_value(v)?)
}

/// `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The daemon's version.
    pub version: String,
    /// Control protocol version.
    pub protocol: u16,
    /// The daemon's process ID.
    pub pid: u32,
    /// A vhost-user frontend is connected.
    pub frontend_connected: bool,
    /// The `bypass` config field.
    pub bypass: bool,
    /// Device feature bits the driver accepted.
    pub acked_features: u64,
    /// Domains that exist.
    pub domains: usize,
    /// Endpoints attached to a domain.
    pub attached_endpoints: usize,
    /// Mappings of all domains.
    pub mappings: usize,
    /// Control clients connected.
    pub clients: usize,
}

/// An attached endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Endpoint ID.
    pub id: u32,
    /// Its domain.
    pub domain: u32,
}

/// `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointsReply {
    /// The `bypass` config field.
    pub bypass: bool,
    /// Attached endpoints by ID.
    pub endpoints: Vec<EndpointInfo>,
}

/// A domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Domain ID.
    pub id: u32,
    /// A bypass domain.
    pub bypass: bool,
    /// Its endpoints, in attach order.
    pub endpoints: Vec<u32>,
    /// Number of mappings.
    pub mappings: usize,
}

/// `domains`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainsReply {
    /// Domains by ID.
    pub domains: Vec<DomainInfo>,
}

/// A mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingInfo {
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA (inclusive).
    pub virt_end: u64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: u64,
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// Device memory.
    pub mmio: bool,
}

/// `mappings`: one page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingsReply {
    /// The domain.
    pub domain: u32,
    /// A bypass domain.
    pub bypass: bool,
    /// Its endpoints.
    pub endpoints: Vec<u32>,
    /// The page, in address order.
    pub mappings: Vec<MappingInfo>,
    /// `from` of the next page, or none.
    #[serde(default)]
    pub next: Option<u64>,
}

/// Requests by type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// ATTACH.
    pub attach: u64,
    /// DETACH.
    pub detach: u64,
    /// MAP.
    pub map: u64,
    /// UNMAP.
    pub unmap: u64,
    /// PROBE.
    pub probe: u64,
    /// PASID_ALLOC.
    pub pasid_alloc: u64,
    /// PASID_FREE.
    pub pasid_free: u64,
    /// Any other type.
    pub other: u64,
}

/// Event-queue counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Events written into a guest buffer.
    pub delivered: u64,
    /// Events dropped (no buffer and the backlog full).
    pub dropped: u64,
    /// Events waiting for a buffer.
    pub pending: usize,
}

/// `stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Requests by type.
    pub requests: RequestCounts,
    /// Refused requests by status name (`INVAL`, `NOENT`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Requests completed with used length 0.
    pub dropped: u64,
    /// Event queue.
    pub faults: FaultCounts,
    /// Event buffers the device holds.
    pub event_buffers_held: usize,
    /// Control clients connected.
    pub clients: usize,
    /// INVALIDATE messages sent.
    pub invalidations_sent: u64,
    /// EVENT messages sent.
    pub events_sent: u64,
    /// Clients disconnected for not acknowledging in time.
    pub ack_timeouts: u64,
    /// Connections refused (peer check, limits, malformed HELLO).
    pub clients_refused: u64,
    /// Clients disconnected because they could not keep up.
    #[serde(default)]
    pub clients_dropped: u64,
}

/// One of this daemon's PASIDs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasidInfo {
    /// Host PASID.
    pub host: u32,
    /// Guest PASID it is mapped to (none once freed).
    pub guest: Option<u32>,
    /// `active`, or `inactive` (freed, waiting for its last reference).
    pub state: String,
    /// References, the owner's included while active.
    pub refs: u32,
}

/// A PASID set of the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetInfo {
    /// The VM id.
    pub vm_id: String,
    /// Most PASIDs the VM may hold.
    pub quota: u32,
    /// PASIDs recorded, inactive ones included.
    pub pasids: u32,
    /// Active PASIDs.
    pub active: u32,
    /// Host PASIDs leased to the VM.
    pub leased: u32,
    /// Process ID of the daemon that last opened the set.
    pub pid: u32,
    /// When that daemon opened it (ms since the epoch).
    pub started_ms: i64,
    /// A daemon holds the VM's lock now.
    pub live: bool,
    /// The set is this daemon's (only in `pasids` replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub this_daemon: Option<bool>,
}

/// `pasids`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasidsReply {
    /// `global`, `identity` or `disabled`.
    pub mode: String,
    /// Host PASID width (global and identity modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// This daemon's VM id (global mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// The state directory (global mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// The VM's quota (global mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u32>,
    /// PASIDs counted against the quota (global mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged: Option<u32>,
    /// Host PASIDs leased to this daemon (global mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased: Option<u32>,
    /// This VM's PASIDs by host PASID (one page).
    pub pasids: Vec<PasidInfo>,
    /// `from` of the next page, or none.
    #[serde(default)]
    pub next: Option<u32>,
    /// Every set of the host (first page only).
    pub sets: Vec<SetInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_use_the_documented_json() {
        assert_eq!(encode(&Query::Status).unwrap(), r#"{"cmd":"status"}"#);
        let q: Query = serde_json::from_str(r#"{"cmd":"mappings","domain":3}"#).unwrap();
        assert_eq!(
            q,
            Query::Mappings {
                domain: 3,
                from: 0,
                limit: None
            }
        );
        assert!(serde_json::from_str::<Query>(r#"{"cmd":"nope"}"#).is_err());
        assert!(serde_json::from_str::<Query>(r#"{"cmd":"mappings"}"#).is_err());
        assert!(serde_json::from_str::<Query>(r#"{"domain":1}"#).is_err());
    }

    #[test]
    fn an_error_document_is_a_refusal() {
        let e = decode_reply::<StatusReply>(r#"{"error":"no"}"#).unwrap_err();
        assert!(matches!(e, QueryError::Refused(m) if m == "no"));
    }
}
