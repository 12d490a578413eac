// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu` command line entry point.

use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
};

use clap::Parser;
use log::{error, info};
use vhost_device_iommu::{
    args::{Cli, Command, DaemonArgs, PasidMode},
    backend::IommuBackend,
    control, ctl,
    daemon::{exit_on_signals, serve, Cleanup, SocketSource},
    pasid_admin,
    pasid_manager::{PasidManager, PasidOptions, PasidService, SharedPasids},
    pasid_store::default_state_dir,
    viot,
};

/// Opens this VM's PASID set as the options ask. Any problem with the
/// state directory ends the daemon here, before it serves a guest.
fn pasid_service(args: &DaemonArgs) -> Result<PasidService, String> {
    if args.pasid_quota == 0 {
        return Ok(PasidService::Disabled);
    }
    if args.pasid_mode == PasidMode::Identity {
        return Ok(PasidService::Identity {
            bits: args.pasid_bits,
        });
    }
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir().map_err(|e| e.to_string())?,
    };
    let options = PasidOptions {
        vm_id: args.vm_id()?,
        bits: args.pasid_bits,
        quota: args.pasid_quota,
        state_dir,
    };
    let manager = PasidManager::open(options).map_err(|e| format!("PASID allocator: {e}"))?;
    Ok(PasidService::Global(SharedPasids(Arc::new(Mutex::new(
        manager,
    )))))
}

fn run(cli: Cli) -> Result<(), String> {
    let args = cli.daemon;
    let config = args.device_config().map_err(|e| e.to_string())?;
    let backend = IommuBackend::new(config, args.backend_options()).map_err(|e| e.to_string())?;
    let pasids = pasid_service(&args)?;
    let cleanup = Cleanup::default();
    if let PasidService::Global(shared) = &pasids {
        // A clean exit means the VM is gone: its PASIDs go back to the
        // host. After a crash they wait for a restart to recover them.
        let shared = SharedPasids(shared.0.clone());
        cleanup.on_exit(move || match shared.lock().end_vm() {
            Ok(r) => info!(
                "VM {} ended: {} PASIDs and {} leased returned",
                r.vm_id, r.pasids, r.leased
            ),
            Err(e) => error!("returning the VM's PASIDs: {e}"),
        });
    }
    backend.install_pasids(pasids);
    let source = match (&args.socket_path, args.socket_fd) {
        (Some(path), _) => {
            cleanup.add(path);
            SocketSource::Path(path.clone())
        }
        (None, Some(fd)) => SocketSource::Fd(fd),
        (None, None) => return Err("--socket-path or --socket-fd is required".into()),
    };
    let backend = Arc::new(backend);
    if let Some(path) = &args.control_socket {
        control::start(backend.clone(), path)
            .map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
        cleanup.add(path);
    }
    exit_on_signals(cleanup).map_err(|e| e.to_string())?;
    serve(backend, source).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Ctl(args)) => ctl::run(args).map(ExitCode::from).map_err(|e| {
            eprintln!("error: {e}");
        }),
        Some(Command::PasidAdmin(args)) => {
            pasid_admin::run(args).map(ExitCode::from).map_err(|e| {
                eprintln!("error: {e}");
            })
        }
        Some(Command::Viot(args)) => viot::run(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| eprintln!("error: {e}")),
        None => run(cli)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| error!("{e}")),
    };
    result.unwrap_or(ExitCode::FAILURE)
}
