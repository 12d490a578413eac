// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu pasid-admin`: inspect the host-wide PASID state
//! directory and reclaim the sets of VMs that no daemon serves any more.
//! Human tables by default, one JSON document with `--json` (schemas in
//! docs/control-protocol.md, "PASID queries").

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::{
    pasid_manager::{list_sets, reclaim_dead, SetStatus},
    pasid_store::default_state_dir,
};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The state directory (the daemons' --state-dir). Default as theirs.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Every VM's set: quota, PASIDs, leased host PASIDs, live daemon.
    List,
    /// Frees the sets and leases of VMs whose daemon is gone.
    Reclaim,
}

/// JSON of one set of the host (shared with `ctl pasids`).
pub fn set_json(s: &SetStatus) -> Value {
    let r = &s.record;
    json!({
        "vm_id": r.vm_id,
        "quota": r.quota,
        "pasids": r.pasids,
        "active": r.active,
        "leased": r.leased,
        "pid": r.pid,
        "started_ms": r.started_ms,
        "live": s.live,
    })
}

/// Prints sets as a table (shared with `ctl pasids`).
pub fn print_sets(sets: &[Value]) {
    println!(
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8}  DAEMON",
        "VM ID", "QUOTA", "PASIDS", "ACTIVE", "LEASED", "PID"
    );
    for s in sets {
        let daemon = if s["this_daemon"].as_bool() == Some(true) {
            "live (this one)"
        } else if s["live"].as_bool() == Some(true) {
            "live"
        } else {
            "gone"
        };
        println!(
            "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8}  {daemon}",
            s["vm_id"].as_str().unwrap_or("?"),
            s["quota"],
            s["pasids"],
            s["active"],
            s["leased"],
            s["pid"]
        );
    }
}

/// Runs an admin command; returns the process exit status.
pub fn run(args: AdminArgs) -> Result<u8, String> {
    let dir = match args.state_dir {
        Some(d) => d,
        None => default_state_dir().map_err(|e| e.to_string())?,
    };
    match args.command {
        AdminCommand::List => {
            let sets: Vec<Value> = list_sets(&dir)
                .map_err(|e| e.to_string())?
                .iter()
                .map(set_json)
                .collect();
            if args.json {
                println!("{}", json!({ "state_dir": dir, "sets": sets }));
            } else {
                print_sets(&sets);
            }
        }
        AdminCommand::Reclaim => {
            let (reclaimed, live) = reclaim_dead(&dir).map_err(|e| e.to_string())?;
            if args.json {
                let r: Vec<Value> = reclaimed
                    .iter()
                    .map(|r| json!({"vm_id": r.vm_id, "pasids": r.pasids, "leased": r.leased}))
                    .collect();
                println!(
                    "{}",
                    json!({ "state_dir": dir, "reclaimed": r, "live": live })
                );
            } else {
                for r in &reclaimed {
                    println!(
                        "reclaimed `{}`: {} PASIDs, {} leased host PASIDs",
                        r.vm_id, r.pasids, r.leased
                    );
                }
                println!(
                    "{} set(s) reclaimed, {} left to running daemons",
                    reclaimed.len(),
                    live.len()
                );
            }
        }
    }
    Ok(0)
}
