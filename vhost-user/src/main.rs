// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu` command line entry point.

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use log::error;
use vhost_device_iommu::{
    args::{Cli, Command},
    backend::IommuBackend,
    control, ctl,
    daemon::{exit_on_signals, serve, Cleanup, SocketSource},
    viot,
};

fn run(cli: Cli) -> Result<(), String> {
    let args = cli.daemon;
    let config = args.device_config().map_err(|e| e.to_string())?;
    let backend = IommuBackend::new(config, args.backend_options()).map_err(|e| e.to_string())?;
    let cleanup = Cleanup::default();
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
        Some(Command::Viot(args)) => viot::run(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| eprintln!("error: {e}")),
        None => run(cli)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| error!("{e}")),
    };
    result.unwrap_or(ExitCode::FAILURE)
}
