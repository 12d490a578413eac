// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu pasid-admin`: inspect the host-wide PASID state
//! directory and reclaim the sets of VMs that no daemon serves any more.
//! Human tables by default, one JSON document with `--json` (schemas in
//! docs/control-protocol.md, "PASID queries").

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};
use serde::Serialize;
use thiserror::Error;
use viommu_protocol::query::SetInfo;

use crate::{
    pasid_manager::{list_sets, reclaim_dead},
    pasid_store::{default_state_dir, StoreError},
};

/// `pasid-admin` options.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The state directory (the daemons' --state-dir). Default as theirs.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The `pasid-admin` commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Every VM's set: quota, PASIDs, leased host PASIDs, live daemon.
    List,
    /// Frees the sets and leases of VMs whose daemon is gone.
    Reclaim,
}

/// Why `pasid-admin` failed.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The state directory or database cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output could not be written.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

#[derive(Serialize)]
struct ListDoc {
    state_dir: PathBuf,
    sets: Vec<SetInfo>,
}

#[derive(Serialize)]
struct ReclaimedDoc {
    vm_id: String,
    pasids: u32,
    leased: u32,
}

#[derive(Serialize)]
struct ReclaimDoc {
    state_dir: PathBuf,
    reclaimed: Vec<ReclaimedDoc>,
    live: Vec<String>,
}

/// Prints sets as a table (shared with `ctl pasids`).
pub fn print_sets(out: &mut impl Write, sets: &[SetInfo]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8}  DAEMON",
        "VM ID", "QUOTA", "PASIDS", "ACTIVE", "LEASED", "PID"
    )?;
    for s in sets {
        let daemon = match (s.this_daemon, s.live) {
            (Some(true), _) => "live (this one)",
            (_, true) => "live",
            _ => "gone",
        };
        writeln!(
            out,
            "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8}  {daemon}",
            s.vm_id, s.quota, s.pasids, s.active, s.leased, s.pid
        )?;
    }
    Ok(())
}

/// Runs an admin command; returns the process exit status.
pub fn run(args: AdminArgs) -> Result<ExitCode, AdminError> {
    let dir = match args.state_dir {
        Some(d) => d,
        None => default_state_dir()?,
    };
    let mut out = std::io::stdout().lock();
    let written = match args.command {
        AdminCommand::List => {
            let sets: Vec<SetInfo> = list_sets(&dir)?.iter().map(|s| s.info(None)).collect();
            if args.json {
                let doc = ListDoc {
                    state_dir: dir,
                    sets,
                };
                writeln!(out, "{}", serde_json::to_string(&doc).unwrap_or_default())
            } else {
                print_sets(&mut out, &sets)
            }
        }
        AdminCommand::Reclaim => {
            let (reclaimed, live) = reclaim_dead(&dir)?;
            if args.json {
                let doc = ReclaimDoc {
                    state_dir: dir,
                    reclaimed: reclaimed
                        .iter()
                        .map(|r| ReclaimedDoc {
                            vm_id: r.vm_id.clone(),
                            pasids: r.pasids,
                            leased: r.leased,
                        })
                        .collect(),
                    live,
                };
                writeln!(out, "{}", serde_json::to_string(&doc).unwrap_or_default())
            } else {
                let mut w = || -> std::io::Result<()> {
                    for r in &reclaimed {
                        writeln!(
                            out,
                            "reclaimed `{}`: {} PASIDs, {} leased host PASIDs",
                            r.vm_id, r.pasids, r.leased
                        )?;
                    }
                    writeln!(
                        out,
                        "{} set(s) reclaimed, {} left to running daemons",
                        reclaimed.len(),
                        live.len()
                    )
                };
                w()
            }
        }
    };
    // A closed pipe (`pasid-admin list | head`) ends the output quietly.
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(AdminError::Output(e)),
        _ => Ok(ExitCode::SUCCESS),
    }
}
