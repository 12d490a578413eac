// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu ctl`: inspect and poke a running daemon through its
//! control socket. Human tables by default, one JSON document with
//! `--json` (schemas in docs/control-protocol.md). External checks rely on
//! the command names and JSON fields: keep them stable.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use viommu::wire::*;
use viommu_client::{Access, Client, Error, Options};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket (its --control-socket).
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,

    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultReason {
    Unknown,
    Domain,
    Mapping,
}

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
        #[arg(long, value_parser = parse_u32)]
        domain: u32,
    },
    /// Translate an IOVA as a DMA of the endpoint would (exit status 3 on
    /// a fault).
    Translate {
        #[arg(long, value_parser = parse_u32)]
        endpoint: u32,
        #[arg(long, value_parser = parse_u64)]
        iova: u64,
        /// Bytes to translate.
        #[arg(long, default_value = "1", value_parser = parse_u64)]
        len: u64,
        /// A write access (default: read).
        #[arg(long)]
        write: bool,
    },
    /// Deliver an unrecoverable fault to the guest's event queue.
    Fault {
        #[arg(long, value_parser = parse_u32)]
        endpoint: u32,
        #[arg(long, value_parser = parse_u64)]
        address: u64,
        /// A faulting write (default: read).
        #[arg(long)]
        write: bool,
        #[arg(long, value_enum, default_value = "mapping")]
        reason: FaultReason,
    },
    /// Request, error, fault and client counters.
    Stats,
    /// PASID sets of the host (VM, quota, live daemon) and this daemon's
    /// PASIDs with state and references.
    Pasids,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    }
    .map_err(|e| format!("`{s}`: {e}"))
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let v = parse_u64(s)?;
    u32::try_from(v).map_err(|_| format!("`{s}` does not fit in 32 bits"))
}

/// Exit status of a translation that faults.
pub const EXIT_FAULT: u8 = 3;

/// Runs a ctl command; returns the process exit status.
pub fn run(args: CtlArgs) -> Result<u8, String> {
    let path = &args.control_socket;
    let client = Client::connect(path, Options::default())
        .map_err(|e| format!("cannot reach the daemon at {}: {e}", path.display()))?;
    let q = |v: Value| client.query(&v).map_err(|e| e.to_string());
    let (doc, status) = match args.command {
        CtlCommand::Status => (q(json!({"cmd": "status"}))?, 0),
        CtlCommand::Endpoints => (q(json!({"cmd": "endpoints"}))?, 0),
        CtlCommand::Domains => (q(json!({"cmd": "domains"}))?, 0),
        CtlCommand::Stats => (q(json!({"cmd": "stats"}))?, 0),
        CtlCommand::Pasids => {
            let mut doc = q(json!({"cmd": "pasids"}))?;
            while let Some(from) = doc.get("next").and_then(Value::as_u64) {
                let page = q(json!({"cmd": "pasids", "from": from}))?;
                let more = page["pasids"].as_array().cloned().unwrap_or_default();
                if let Some(all) = doc["pasids"].as_array_mut() {
                    all.extend(more);
                }
                doc["next"] = page["next"].clone();
            }
            if let Some(o) = doc.as_object_mut() {
                o.remove("next");
            }
            (doc, 0)
        }
        CtlCommand::Mappings { domain } => {
            let mut doc = q(json!({"cmd": "mappings", "domain": domain}))?;
            // Large domains come in pages.
            while let Some(from) = doc.get("next").and_then(Value::as_u64) {
                let page = q(json!({"cmd": "mappings", "domain": domain, "from": from}))?;
                let more = page["mappings"].as_array().cloned().unwrap_or_default();
                if let Some(all) = doc["mappings"].as_array_mut() {
                    all.extend(more);
                }
                doc["next"] = page["next"].clone();
            }
            if let Some(o) = doc.as_object_mut() {
                o.remove("next");
            }
            (doc, 0)
        }
        CtlCommand::Translate {
            endpoint,
            iova,
            len,
            write,
        } => {
            let access = if write { Access::Write } else { Access::Read };
            match client.translate(endpoint, iova, len, access) {
                Ok(segs) => {
                    let segs: Vec<Value> = segs
                        .iter()
                        .map(|s| json!({"iova": s.iova, "gpa": s.gpa, "len": s.len}))
                        .collect();
                    (json!({"ok": true, "segments": segs}), 0)
                }
                Err(Error::Fault(f)) => {
                    let reason = match f.reason {
                        VIRTIO_IOMMU_FAULT_R_DOMAIN => "domain",
                        VIRTIO_IOMMU_FAULT_R_MAPPING => "mapping",
                        _ => "unknown",
                    };
                    let fault = json!({"reason": reason, "endpoint": f.endpoint, "address": f.address, "write": write});
                    (json!({"ok": false, "fault": fault}), EXIT_FAULT)
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        CtlCommand::Fault {
            endpoint,
            address,
            write,
            reason,
        } => {
            let access = if write { Access::Write } else { Access::Read };
            let reason = match reason {
                FaultReason::Unknown => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
                FaultReason::Domain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
                FaultReason::Mapping => VIRTIO_IOMMU_FAULT_R_MAPPING,
            };
            client
                .report_fault(endpoint, address, Some(access), reason)
                .map_err(|e| e.to_string())?;
            (json!({"ok": true}), 0)
        }
    };
    if args.json {
        println!("{doc}");
    } else {
        print_table(&args.command, &doc);
    }
    Ok(status)
}

fn hex(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), |n| format!("{n:#x}"))
}

fn print_table(cmd: &CtlCommand, doc: &Value) {
    let empty = Vec::new();
    let arr = |k: &str| doc[k].as_array().unwrap_or(&empty).clone();
    match cmd {
        CtlCommand::Status => {
            if let Some(o) = doc.as_object() {
                for (k, v) in o {
                    println!("{k:<20} {v}");
                }
            }
        }
        CtlCommand::Endpoints => {
            println!("bypass of unattached endpoints: {}", doc["bypass"]);
            println!("{:<10} {:<10}", "ENDPOINT", "DOMAIN");
            for e in arr("endpoints") {
                println!("{:<10} {:<10}", hex(&e["id"]), e["domain"]);
            }
        }
        CtlCommand::Domains => {
            println!(
                "{:<10} {:<8} {:<10} {:<24}",
                "DOMAIN", "TYPE", "MAPPINGS", "ENDPOINTS"
            );
            for d in arr("domains") {
                let kind = if d["bypass"].as_bool() == Some(true) {
                    "bypass"
                } else {
                    "paging"
                };
                let eps: Vec<String> = d["endpoints"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .map(hex)
                    .collect();
                println!(
                    "{:<10} {:<8} {:<10} {}",
                    d["id"],
                    kind,
                    d["mappings"],
                    eps.join(",")
                );
            }
        }
        CtlCommand::Mappings { .. } => {
            println!(
                "{:<20} {:<20} {:<20} {:<5}",
                "IOVA START", "IOVA END", "GPA", "PERM"
            );
            for m in arr("mappings") {
                let perm: String = [("read", 'r'), ("write", 'w'), ("mmio", 'm')]
                    .iter()
                    .map(|(k, c)| {
                        if m[*k].as_bool() == Some(true) {
                            *c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                println!(
                    "{:<20} {:<20} {:<20} {perm}",
                    hex(&m["virt_start"]),
                    hex(&m["virt_end"]),
                    hex(&m["phys_start"])
                );
            }
        }
        CtlCommand::Translate { .. } => match doc["ok"].as_bool() {
            Some(true) => {
                for s in arr("segments") {
                    println!(
                        "{} -> {} ({} bytes)",
                        hex(&s["iova"]),
                        hex(&s["gpa"]),
                        s["len"]
                    );
                }
            }
            _ => {
                let f = &doc["fault"];
                println!(
                    "fault: {} (endpoint {}, address {})",
                    f["reason"],
                    hex(&f["endpoint"]),
                    hex(&f["address"])
                );
            }
        },
        CtlCommand::Fault { .. } => println!("fault queued on the guest's event queue"),
        CtlCommand::Pasids => {
            let mode = doc["mode"].as_str().unwrap_or("?");
            if mode != "global" {
                println!("PASID mode: {mode} (no host-wide set)");
                return;
            }
            crate::pasid_admin::print_sets(&arr("sets"));
            println!();
            println!(
                "this daemon: VM `{}`, quota {}, {} charged, {} host PASIDs leased",
                doc["vm_id"].as_str().unwrap_or("?"),
                doc["quota"],
                doc["charged"],
                doc["leased"]
            );
            println!(
                "{:<10} {:<10} {:<9} {:>6}",
                "HOST", "GUEST", "STATE", "REFS"
            );
            for p in arr("pasids") {
                let guest = p["guest"].as_u64().map_or("-".into(), |g| g.to_string());
                println!(
                    "{:<10} {:<10} {:<9} {:>6}",
                    p["host"],
                    guest,
                    p["state"].as_str().unwrap_or("?"),
                    p["refs"]
                );
            }
        }
        CtlCommand::Stats => {
            for section in ["requests", "errors", "faults"] {
                if let Some(o) = doc[section].as_object() {
                    let items: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("{section:<20} {}", items.join(" "));
                }
            }
            if let Some(o) = doc.as_object() {
                for (k, v) in o.iter().filter(|(_, v)| !v.is_object()) {
                    println!("{k:<20} {v}");
                }
            }
        }
    }
}
