// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu` command line entry point.

use std::process::ExitCode;

use clap::Parser;
use log::error;
use vhost_device_iommu::{
    args::{Cli, Command},
    ctl, daemon,
    error::report,
    pasid_admin, viot,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Ctl(args)) => ctl::run(args).map_err(|e| report(&e)),
        Some(Command::PasidAdmin(args)) => pasid_admin::run(args).map_err(|e| report(&e)),
        Some(Command::Viot(args)) => viot::run(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| report(&e)),
        None => {
            return match daemon::run(cli.daemon) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{}", report(&e));
                    ExitCode::FAILURE
                }
            }
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}
