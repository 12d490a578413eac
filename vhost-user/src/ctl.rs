// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu ctl`: inspect and poke a running daemon through its
//! control socket. Human tables by default, one JSON document with
//! `--json` (schemas in docs/control-protocol.md; the documents are the
//! typed replies of `viommu_protocol::query`). External checks rely on
//! the command names and JSON fields: keep them stable.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use thiserror::Error;
use viommu::{parse, wire::*};
use viommu_protocol::{
    messages::{CallResult, FaultInfo, ReportFault, Translate},
    query::*,
    ConnError, Connection, Message, FAULT_F_READ, FAULT_F_WRITE, HELLO_F_INSPECT, RESULT_OK,
    TRANSLATE_F_WRITE,
};

use crate::pasid_admin::print_sets;

/// How long the daemon may take to answer, in total, per request.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Exit status of a translation that faults.
pub const EXIT_FAULT: u8 = 3;

/// `ctl` options.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket (its --control-socket).
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,

    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Fault reasons `ctl fault` can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultReason {
    /// `VIRTIO_IOMMU_FAULT_R_UNKNOWN`.
    Unknown,
    /// `VIRTIO_IOMMU_FAULT_R_DOMAIN`.
    Domain,
    /// `VIRTIO_IOMMU_FAULT_R_MAPPING`.
    Mapping,
}

/// The `ctl` commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Daemon and device summary.
    Status,
    /// Attached endpoints and their domains.
    Endpoints,
    /// Domains with their endpoints and number of mappings.
    Domains,
    /// The mappings of one domain.
    Mappings {
        /// The domain.
        #[arg(long, value_parser = parse::parse_u32)]
        domain: u32,
    },
    /// Translate an IOVA as a DMA of the endpoint would (exit status 3 on
    /// a fault).
    Translate {
        /// The endpoint.
        #[arg(long, value_parser = parse::parse_u32)]
        endpoint: u32,
        /// The IOVA.
        #[arg(long, value_parser = parse::parse_u64)]
        iova: u64,
        /// Bytes to translate.
        #[arg(long, default_value = "1", value_parser = parse::parse_u64)]
        len: u64,
        /// A write access (default: read).
        #[arg(long)]
        write: bool,
    },
    /// Deliver an unrecoverable fault to the guest's event queue.
    Fault {
        /// The endpoint.
        #[arg(long, value_parser = parse::parse_u32)]
        endpoint: u32,
        /// The faulting address.
        #[arg(long, value_parser = parse::parse_u64)]
        address: u64,
        /// A faulting write (default: read).
        #[arg(long)]
        write: bool,
        /// The fault reason.
        #[arg(long, value_enum, default_value = "mapping")]
        reason: FaultReason,
    },
    /// Request, error, fault and client counters.
    Stats,
    /// PASID sets of the host (VM, quota, live daemon) and this daemon's
    /// PASIDs with state and references.
    Pasids,
}

/// Why `ctl` failed.
#[derive(Debug, Error)]
pub enum CtlError {
    /// The daemon could not be reached, or did not answer.
    #[error("cannot reach the daemon at {path}")]
    Daemon {
        /// The control socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: ConnError,
    },
    /// The daemon refused the request.
    #[error("the daemon refused: {0}")]
    Refused(String),
    /// The document could not be printed.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// `ctl translate`'s document.
#[derive(Serialize)]
struct TranslateDoc {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    segments: Option<Vec<SegmentDoc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fault: Option<FaultDoc>,
}

#[derive(Serialize)]
struct SegmentDoc {
    iova: u64,
    gpa: u64,
    len: u64,
}

#[derive(Serialize)]
struct FaultDoc {
    reason: &'static str,
    endpoint: u32,
    address: u64,
    write: bool,
}

/// `ctl fault`'s document.
#[derive(Serialize)]
struct OkDoc {
    ok: bool,
}

/// What one command produced, ready to print.
enum Doc {
    Status(StatusReply),
    Endpoints(EndpointsReply),
    Domains(DomainsReply),
    Mappings(MappingsReply),
    Stats(StatsReply),
    Pasids(PasidsReply),
    Translate(TranslateDoc),
    Fault,
}

/// Runs a ctl command; returns the process exit status.
pub fn run(args: CtlArgs) -> Result<ExitCode, CtlError> {
    let path = args.control_socket.clone();
    let daemon = |source| CtlError::Daemon {
        path: path.clone(),
        source,
    };
    let mut c = Connection::connect(&path, HELLO_F_INSPECT, TIMEOUT).map_err(daemon)?;
    let (doc, status) = command(&mut c, &args.command).map_err(|e| match e {
        ConnError::Query(QueryError::Refused(why)) => CtlError::Refused(why),
        e => daemon(e),
    })?;
    let mut out = std::io::stdout().lock();
    // A closed pipe (`ctl ... | head`) ends the output, not the process.
    let written = if args.json {
        writeln!(out, "{}", json(&doc))
    } else {
        print_table(&mut out, &doc)
    };
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(CtlError::Output(e)),
        _ => {}
    }
    Ok(ExitCode::from(status))
}

fn json(doc: &Doc) -> String {
    let s = match doc {
        Doc::Status(d) => serde_json::to_string(d),
        Doc::Endpoints(d) => serde_json::to_string(d),
        Doc::Domains(d) => serde_json::to_string(d),
        Doc::Mappings(d) => serde_json::to_string(d),
        Doc::Stats(d) => serde_json::to_string(d),
        Doc::Pasids(d) => serde_json::to_string(d),
        Doc::Translate(d) => serde_json::to_string(d),
        Doc::Fault => serde_json::to_string(&OkDoc { ok: true }),
    };
    // Plain data structures always serialize.
    s.unwrap_or_default()
}

fn command(c: &mut Connection, cmd: &CtlCommand) -> Result<(Doc, u8), ConnError> {
    Ok(match *cmd {
        CtlCommand::Status => (Doc::Status(c.query(&Query::Status)?), 0),
        CtlCommand::Endpoints => (Doc::Endpoints(c.query(&Query::Endpoints)?), 0),
        CtlCommand::Domains => (Doc::Domains(c.query(&Query::Domains)?), 0),
        CtlCommand::Stats => (Doc::Stats(c.query(&Query::Stats)?), 0),
        CtlCommand::Mappings { domain } => {
            let q = |from| Query::Mappings {
                domain,
                from,
                limit: None,
            };
            let mut doc: MappingsReply = c.query(&q(0))?;
            // Large domains come in pages.
            while let Some(from) = doc.next {
                let page: MappingsReply = c.query(&q(from))?;
                doc.mappings.extend(page.mappings);
                doc.next = page.next;
            }
            (Doc::Mappings(doc), 0)
        }
        CtlCommand::Pasids => {
            let q = |from| Query::Pasids { from, limit: None };
            let mut doc: PasidsReply = c.query(&q(0))?;
            while let Some(from) = doc.next {
                let page: PasidsReply = c.query(&q(from))?;
                doc.pasids.extend(page.pasids);
                doc.next = page.next;
            }
            (Doc::Pasids(doc), 0)
        }
        CtlCommand::Translate {
            endpoint,
            iova,
            len,
            write,
        } => {
            let flags = if write { TRANSLATE_F_WRITE } else { 0 };
            let reply = c.call(|tag| {
                Translate {
                    tag,
                    endpoint,
                    flags,
                    iova,
                    len,
                }
                .into()
            })?;
            translate_doc(reply, iova, len, write)?
        }
        CtlCommand::Fault {
            endpoint,
            address,
            write,
            reason,
        } => {
            let reason = match reason {
                FaultReason::Unknown => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
                FaultReason::Domain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
                FaultReason::Mapping => VIRTIO_IOMMU_FAULT_R_MAPPING,
            };
            let fault = FaultInfo {
                reason,
                flags: if write { FAULT_F_WRITE } else { FAULT_F_READ },
                endpoint,
                address,
            };
            match c.call(|tag| ReportFault { tag, fault }.into())? {
                Message::CallResult(CallResult {
                    status: RESULT_OK, ..
                }) => (Doc::Fault, 0),
                Message::CallResult(r) => {
                    return Err(QueryError::Refused(r.message).into());
                }
                other => {
                    return Err(ConnError::Unexpected {
                        expected: "RESULT",
                        got: other.type_code(),
                    })
                }
            }
        }
    })
}

fn translate_doc(reply: Message, iova: u64, len: u64, write: bool) -> Result<(Doc, u8), ConnError> {
    Ok(match reply {
        Message::Translation(t) => {
            // Cut the requested range out of the whole mappings.
            let end = iova.saturating_add(len.max(1) - 1);
            let mut addr = iova;
            let mut segments = Vec::new();
            for e in &t.extents {
                if addr > end || addr < e.iova_start || addr > e.iova_end {
                    break;
                }
                let last = e.iova_end.min(end);
                segments.push(SegmentDoc {
                    iova: addr,
                    gpa: e.gpa_start.wrapping_add(addr - e.iova_start),
                    len: last - addr + 1,
                });
                match last.checked_add(1) {
                    Some(next) => addr = next,
                    None => break,
                }
            }
            let doc = TranslateDoc {
                ok: true,
                segments: Some(segments),
                fault: None,
            };
            (Doc::Translate(doc), 0)
        }
        Message::Fault(f) => {
            let reason = match f.fault.reason {
                VIRTIO_IOMMU_FAULT_R_DOMAIN => "domain",
                VIRTIO_IOMMU_FAULT_R_MAPPING => "mapping",
                _ => "unknown",
            };
            let fault = FaultDoc {
                reason,
                endpoint: f.fault.endpoint,
                address: f.fault.address,
                write,
            };
            let doc = TranslateDoc {
                ok: false,
                segments: None,
                fault: Some(fault),
            };
            (Doc::Translate(doc), EXIT_FAULT)
        }
        Message::CallResult(r) => return Err(QueryError::Refused(r.message).into()),
        other => {
            return Err(ConnError::Unexpected {
                expected: "TRANSLATION",
                got: other.type_code(),
            })
        }
    })
}

fn print_table(out: &mut impl Write, doc: &Doc) -> std::io::Result<()> {
    match doc {
        Doc::Status(s) => {
            let rows: [(&str, String); 10] = [
                ("version", s.version.clone()),
                ("protocol", s.protocol.to_string()),
                ("pid", s.pid.to_string()),
                ("frontend_connected", s.frontend_connected.to_string()),
                ("bypass", s.bypass.to_string()),
                ("acked_features", format!("{:#x}", s.acked_features)),
                ("domains", s.domains.to_string()),
                ("attached_endpoints", s.attached_endpoints.to_string()),
                ("mappings", s.mappings.to_string()),
                ("clients", s.clients.to_string()),
            ];
            for (k, v) in rows {
                writeln!(out, "{k:<20} {v}")?;
            }
        }
        Doc::Endpoints(e) => {
            writeln!(out, "bypass of unattached endpoints: {}", e.bypass)?;
            writeln!(out, "{:<10} {:<10}", "ENDPOINT", "DOMAIN")?;
            for ep in &e.endpoints {
                writeln!(out, "{:<#10x} {:<10}", ep.id, ep.domain)?;
            }
        }
        Doc::Domains(d) => {
            writeln!(
                out,
                "{:<10} {:<8} {:<10} {:<24}",
                "DOMAIN", "TYPE", "MAPPINGS", "ENDPOINTS"
            )?;
            for dom in &d.domains {
                let kind = if dom.bypass { "bypass" } else { "paging" };
                let eps: Vec<String> = dom.endpoints.iter().map(|e| format!("{e:#x}")).collect();
                writeln!(
                    out,
                    "{:<10} {:<8} {:<10} {}",
                    dom.id,
                    kind,
                    dom.mappings,
                    eps.join(",")
                )?;
            }
        }
        Doc::Mappings(m) => {
            writeln!(
                out,
                "{:<20} {:<20} {:<20} {:<5}",
                "IOVA START", "IOVA END", "GPA", "PERM"
            )?;
            for map in &m.mappings {
                let flag = |on: bool, c: char| if on { c } else { '-' };
                let perm: String = [
                    flag(map.read, 'r'),
                    flag(map.write, 'w'),
                    flag(map.mmio, 'm'),
                ]
                .iter()
                .collect();
                writeln!(
                    out,
                    "{:<#20x} {:<#20x} {:<#20x} {perm}",
                    map.virt_start, map.virt_end, map.phys_start
                )?;
            }
        }
        Doc::Translate(t) => {
            for s in t.segments.iter().flatten() {
                writeln!(out, "{:#x} -> {:#x} ({} bytes)", s.iova, s.gpa, s.len)?;
            }
            if let Some(f) = &t.fault {
                writeln!(
                    out,
                    "fault: {} (endpoint {:#x}, address {:#x})",
                    f.reason, f.endpoint, f.address
                )?;
            }
        }
        Doc::Fault => writeln!(out, "fault queued on the guest's event queue")?,
        Doc::Pasids(p) => {
            if p.mode != "global" {
                return writeln!(out, "PASID mode: {} (no host-wide set)", p.mode);
            }
            print_sets(out, &p.sets)?;
            writeln!(out)?;
            writeln!(
                out,
                "this daemon: VM `{}`, quota {}, {} charged, {} host PASIDs leased",
                p.vm_id.as_deref().unwrap_or("?"),
                p.quota.unwrap_or(0),
                p.charged.unwrap_or(0),
                p.leased.unwrap_or(0)
            )?;
            writeln!(
                out,
                "{:<10} {:<10} {:<9} {:>6}",
                "HOST", "GUEST", "STATE", "REFS"
            )?;
            for pasid in &p.pasids {
                let guest = pasid.guest.map_or("-".into(), |g| g.to_string());
                writeln!(
                    out,
                    "{:<10} {:<10} {:<9} {:>6}",
                    pasid.host, guest, pasid.state, pasid.refs
                )?;
            }
        }
        Doc::Stats(s) => {
            let r = &s.requests;
            writeln!(
                out,
                "{:<20} attach={} detach={} map={} unmap={} probe={} pasid_alloc={} pasid_free={} other={}",
                "requests", r.attach, r.detach, r.map, r.unmap, r.probe, r.pasid_alloc, r.pasid_free, r.other
            )?;
            let errors: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(out, "{:<20} {}", "errors", errors.join(" "))?;
            writeln!(
                out,
                "{:<20} delivered={} dropped={} pending={}",
                "faults", s.faults.delivered, s.faults.dropped, s.faults.pending
            )?;
            let rows = [
                ("dropped", s.dropped),
                ("event_buffers_held", s.event_buffers_held as u64),
                ("clients", s.clients as u64),
                ("invalidations_sent", s.invalidations_sent),
                ("events_sent", s.events_sent),
                ("ack_timeouts", s.ack_timeouts),
                ("clients_refused", s.clients_refused),
                ("clients_dropped", s.clients_dropped),
            ];
            for (k, v) in rows {
                writeln!(out, "{k:<20} {v}")?;
            }
        }
    }
    Ok(())
}
