// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu` command line entry point.

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use log::error;
use vhost_device_iommu::{
    args::{Cli, Command},
    backend::IommuBackend,
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
    exit_on_signals(cleanup).map_err(|e| e.to_string())?;
    serve(Arc::new(backend), source).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut cli = Cli::parse();
    let result = match cli.command.take() {
        Some(Command::Viot(args)) => viot::run(&args).map_err(|e| e.to_string()),
        None => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
