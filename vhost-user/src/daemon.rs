// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's life: listen, serve one frontend connection at a time with
//! a device state that outlives connections, and exit cleanly on SIGTERM
//! or SIGINT.

use std::{
    io,
    os::{fd::FromRawFd, unix::net::UnixListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use log::{error, info, warn};
use signal_hook::{consts::TERM_SIGNALS, iterator::Signals};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::IommuBackend;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot listen on {0}: {1}")]
    Listen(PathBuf, vhost::vhost_user::Error),
    #[error("--socket-fd {0} is not an open socket")]
    BadSocketFd(i32),
    #[error("cannot create the vhost-user daemon: {0}")]
    CreateDaemon(vhost_user_backend::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Where the daemon listens for its frontend.
pub enum SocketSource {
    Path(PathBuf),
    Fd(i32),
}

type ExitHook = Box<dyn FnOnce() + Send>;

/// What the daemon undoes when it exits on a signal: files it created
/// and hooks (such as giving the VM's PASIDs back to the host).
#[derive(Clone, Default)]
pub struct Cleanup {
    files: Arc<Mutex<Vec<PathBuf>>>,
    hooks: Arc<Mutex<Vec<ExitHook>>>,
}

impl Cleanup {
    pub fn add(&self, path: &Path) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_owned());
    }

    pub fn on_exit(&self, hook: impl FnOnce() + Send + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    fn run(&self) {
        for p in self.files.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::fs::remove_file(p);
        }
        for hook in self
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            hook();
        }
    }
}

/// Exits with status 0 on SIGTERM/SIGINT after removing the daemon's files.
pub fn exit_on_signals(cleanup: Cleanup) -> Result<(), DaemonError> {
    let mut signals = Signals::new(TERM_SIGNALS).map_err(DaemonError::Signals)?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: exiting");
                cleanup.run();
                std::process::exit(0);
            }
        })
        .map_err(DaemonError::Signals)?;
    Ok(())
}

fn listener(source: &SocketSource) -> Result<Listener, DaemonError> {
    match source {
        SocketSource::Path(path) => {
            Listener::new(path, true).map_err(|e| DaemonError::Listen(path.clone(), e))
        }
        &SocketSource::Fd(fd) => {
            // SAFETY: fstat only writes the struct we pass it.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on any integer is safe; it fails on a closed fd.
            let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
            if !ok || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
                return Err(DaemonError::BadSocketFd(fd));
            }
            // SAFETY: the fd is an open socket handed to us by the service
            // manager for this purpose; nothing else in the process owns it.
            let l = unsafe { UnixListener::from_raw_fd(fd) };
            Ok(Listener::from(l))
        }
    }
}

/// Serves frontends one after the other, forever. The device state lives
/// in `backend` and survives disconnects.
pub fn serve(backend: Arc<IommuBackend>, source: SocketSource) -> Result<(), DaemonError> {
    let mut listener = listener(&source)?;
    if let SocketSource::Path(p) = &source {
        info!("listening on {}", p.display());
    }
    loop {
        backend.begin_connection()?;
        let mut daemon = VhostUserDaemon::new(
            "vhost-device-iommu".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(DaemonError::CreateDaemon)?;
        if let Err(e) = daemon.start(&mut listener) {
            // accept() failures (e.g. out of file descriptors) are passing.
            error!("accepting a frontend: {e}");
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        info!("frontend connected");
        backend.set_frontend_connected(true);
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            // A VMM that exits (the guest powered off) just hangs up.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(daemon);
        backend.set_frontend_connected(false);
        backend.end_connection();
    }
}
