// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why the daemon cannot start or has to stop, with each cause kept as
//! the error's source (printed as `what: why: root cause`).

use std::{io, path::PathBuf};

use thiserror::Error;

use crate::{
    args::ArgsError, daemon::DaemonError, iommu::SetupError, pasid_manager::ManagerError,
    pasid_store::StoreError,
};

/// A failure of the daemon.
#[derive(Debug, Error)]
pub enum Error {
    /// The command line does not describe a usable daemon.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// The device could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// No state directory for the host-wide PASID allocator.
    #[error("no state directory for the PASID allocator")]
    StateDir(#[source] StoreError),
    /// The VM's PASID set could not be opened.
    #[error("PASID allocator")]
    Pasids(#[from] ManagerError),
    /// The control socket could not be set up.
    #[error("control socket {path}")]
    ControlSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Serving the frontend failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// An error with its causes, `what: why: root cause`.
pub fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// An error shown with its causes (`a: b: c`) where only `Display` is
/// printed, such as clap's messages for a bad option value.
#[derive(Debug)]
pub struct WithCauses<E>(pub E);

impl<E: std::error::Error> std::fmt::Display for WithCauses<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&report(&self.0))
    }
}

impl<E: std::error::Error> std::error::Error for WithCauses<E> {}
