// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's life: set up the IOMMU and its sockets from the command
//! line, serve one frontend connection at a time with a device state that
//! outlives connections, and exit cleanly on SIGTERM or SIGINT.

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

use crate::{
    args::{DaemonArgs, PasidMode},
    backend::IommuBackend,
    control,
    error::Error,
    iommu::Iommu,
    pasid_manager::{PasidManager, PasidOptions, PasidService, SharedPasids},
    pasid_store::default_state_dir,
};

/// Why serving stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The vhost-user socket could not be created.
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    /// `--socket-fd` is not a socket.
    #[error("--socket-fd {0} is not an open socket")]
    BadSocketFd(i32),
    /// The vhost-user daemon could not be created (its error type is
    /// not a `std::error::Error`, so it is kept as text).
    #[error("cannot create the vhost-user daemon: {0}")]
    CreateDaemon(vhost_user_backend::Error),
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    /// A system call failed.
    #[error("I/O")]
    Io(#[from] io::Error),
}

/// Where the daemon listens for its frontend.
pub enum SocketSource {
    /// A socket it creates at this path.
    Path(PathBuf),
    /// A listening socket passed in by a service manager.
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
    /// Removes `path` at exit.
    pub fn add(&self, path: &Path) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_owned());
    }

    /// Runs `hook` at exit.
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
/// in the backend's [`Iommu`] and survives disconnects.
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
        backend.iommu().set_frontend_connected(true);
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
        backend.iommu().set_frontend_connected(false);
        backend.end_connection();
    }
}

/// Opens this VM's PASID set as the options ask. Any problem with the
/// state directory ends the daemon here, before it serves a guest.
fn pasid_service(args: &DaemonArgs) -> Result<PasidService, Error> {
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
        None => default_state_dir().map_err(Error::StateDir)?,
    };
    let options = PasidOptions {
        vm_id: args.vm_id()?,
        bits: args.pasid_bits,
        quota: args.pasid_quota,
        state_dir,
    };
    let manager = PasidManager::open(options)?;
    Ok(PasidService::Global(SharedPasids(Arc::new(Mutex::new(
        manager,
    )))))
}

/// Runs the daemon as `args` describe, until a signal ends it.
pub fn run(args: DaemonArgs) -> Result<(), Error> {
    let config = args.device_config()?;
    let pasids = pasid_service(&args)?;
    let cleanup = Cleanup::default();
    if let PasidService::Global(shared) = &pasids {
        // A clean exit means the VM is gone: its PASIDs go back to the
        // host. After a crash they wait for a restart to recover them.
        let shared = shared.clone();
        cleanup.on_exit(move || match shared.lock().end_vm() {
            Ok(r) => info!(
                "VM {} ended: {} PASIDs and {} leased returned",
                r.vm_id, r.pasids, r.leased
            ),
            Err(e) => error!("returning the VM's PASIDs: {}", crate::error::report(&e)),
        });
    }
    let iommu = Arc::new(Iommu::new(config, pasids, args.iommu_options())?);
    let source = match (&args.socket_path, args.socket_fd) {
        (Some(path), _) => {
            cleanup.add(path);
            SocketSource::Path(path.clone())
        }
        (None, Some(fd)) => SocketSource::Fd(fd),
        (None, None) => return Err(crate::args::ArgsError::NoSocket.into()),
    };
    if let Some(path) = &args.control_socket {
        let control_err = |source| Error::ControlSocket {
            path: path.clone(),
            source,
        };
        let listener = bind_control(path).map_err(control_err)?;
        cleanup.add(path);
        control::start(iommu.clone(), listener).map_err(control_err)?;
    }
    exit_on_signals(cleanup)?;
    serve(Arc::new(IommuBackend::new(iommu)), source)?;
    Ok(())
}

/// Creates the control socket, mode 0600.
fn bind_control(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
