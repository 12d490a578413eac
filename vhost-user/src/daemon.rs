// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's life: set up the IOMMU and its sockets from the command
//! line, serve one frontend connection at a time with a device state that
//! outlives connections, and exit cleanly on SIGTERM or SIGINT.

use std::{
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd},
        unix::net::UnixListener,
    },
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
    pasid_manager::{ManagerError, PasidManager, PasidOptions, PasidService, SharedPasids},
    pasid_store::default_state_dir,
    ratelimit::RateLimited,
};

/// Why serving stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A socket path cannot be used.
    #[error(transparent)]
    SocketPath(#[from] SocketPathError),
    /// `--socket-fd` is not a socket.
    #[error("--socket-fd {0} is not an open socket")]
    BadSocketFd(i32),
    /// `--socket-fd` is a socket, but not a listening Unix stream socket.
    #[error("--socket-fd {fd} is not a listening Unix stream socket: {why}")]
    NotListening {
        /// The descriptor.
        fd: i32,
        /// What it is instead.
        why: String,
    },
    /// Accepting a frontend failed in a way that will not pass.
    #[error("accepting a frontend: {0}")]
    Accept(vhost_user_backend::Error),
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

/// Why a socket cannot be created at a path. The daemon replaces only a
/// stale socket (one nobody listens on any more); anything else at the
/// path is someone else's and is left alone.
#[derive(Debug, Error)]
pub enum SocketPathError {
    /// A process listens on the socket at the path.
    #[error("{0} is in use: a running process listens on it (another daemon?)")]
    Live(PathBuf),
    /// The path names something that is not a socket.
    #[error(
        "{0} exists and is not a socket; it was left alone (remove it or choose another path)"
    )]
    NotASocket(PathBuf),
    /// A system call on the path failed.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A socket this daemon created at a path. It is removed at exit only if
/// the path still names it (the same inode), so a file someone else put
/// there since is never deleted.
#[derive(Clone, Debug)]
pub struct OwnedSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnedSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket if the path still names it.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => info!(
                "{} is no longer the socket this daemon created; left alone",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// Whether a process listens on the Unix socket at `path`: a
/// non-blocking connect succeeds (or finds the backlog full) on a live
/// socket and is refused on a stale one. The listener sees a connection
/// closed at once (a vhost-user daemon: a frontend that hung up).
fn listened_on(path: &Path) -> io::Result<bool> {
    use nix::{
        errno::Errno,
        sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr},
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS) => Ok(true),
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Creates a listening Unix socket at `path` (with `mode`, if given).
/// Only a stale socket found there is replaced: a live one, a regular
/// file or anything else is an error naming the path, and is left as it
/// was.
pub fn bind_socket(
    path: &Path,
    mode: Option<u32>,
) -> Result<(UnixListener, OwnedSocket), SocketPathError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let io_err = |source| SocketPathError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
        Ok(m) if m.file_type().is_socket() => {
            if listened_on(path).map_err(io_err)? {
                return Err(SocketPathError::Live(path.to_owned()));
            }
            info!("replacing the stale socket {}", path.display());
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(e)),
                _ => {}
            }
        }
        Ok(_) => return Err(SocketPathError::NotASocket(path.to_owned())),
    }
    // Another process that bound the path since fails this with
    // EADDRINUSE: its socket is not touched.
    let listener = UnixListener::bind(path).map_err(io_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
    let owned = OwnedSocket {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Some(mode) = mode {
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            owned.remove();
            return Err(io_err(e));
        }
    }
    Ok((listener, owned))
}

/// Where the daemon listens for its frontend.
pub enum SocketSource {
    /// A socket it creates at this path.
    Path(PathBuf),
    /// A listening socket passed in by a service manager.
    Fd(i32),
}

type ExitHook = Box<dyn FnOnce() + Send>;

/// What the daemon undoes when it exits on a signal, or when it fails to
/// start: the sockets it created and hooks (such as giving the VM's
/// PASIDs back to the host).
#[derive(Clone, Default)]
pub struct Cleanup {
    sockets: Arc<Mutex<Vec<OwnedSocket>>>,
    hooks: Arc<Mutex<Vec<ExitHook>>>,
}

impl Cleanup {
    /// Removes `socket` at exit (if its path still names it).
    pub fn add(&self, socket: OwnedSocket) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(socket);
    }

    /// Runs `hook` at exit.
    pub fn on_exit(&self, hook: impl FnOnce() + Send + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// Removes the sockets and runs the hooks (once).
    pub fn run(&self) {
        self.remove_sockets();
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

impl Cleanup {
    fn remove_sockets(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            s.remove();
        }
    }

    /// Undoes a start that failed: removes the sockets, drops the exit
    /// hooks without running them (the caller undid what they would).
    pub fn abort(&self) {
        self.remove_sockets();
        self.hooks.lock().unwrap_or_else(|e| e.into_inner()).clear();
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

/// Takes over `--socket-fd`: it must be a listening Unix stream socket
/// (a service manager's socket unit), else accepting on it could only
/// ever fail.
fn listening_fd(fd: i32) -> Result<UnixListener, DaemonError> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
    };
    // SAFETY: fstat only writes the struct we pass it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on any integer is safe; it fails on a closed fd.
    let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
    if !ok || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(DaemonError::BadSocketFd(fd));
    }
    // SAFETY: `fd` is open (fstat succeeded) and stays open while the
    // borrow lives: nothing closes it before it is adopted below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let not = |why: String| DaemonError::NotListening { fd, why };
    let family = getsockname::<SockaddrStorage>(fd)
        .map_err(|e| not(format!("getsockname: {e}")))?
        .family();
    if family != Some(AddressFamily::Unix) {
        return Err(not(format!("its address family is {family:?}")));
    }
    let ty = getsockopt(&borrowed, sockopt::SockType).map_err(|e| not(e.to_string()))?;
    if ty != SockType::Stream {
        return Err(not(format!("it is a {ty:?} socket")));
    }
    if !getsockopt(&borrowed, sockopt::AcceptConn).map_err(|e| not(e.to_string()))? {
        return Err(not(
            "it is not listening (no listen() was called on it)".into()
        ));
    }
    // SAFETY: the fd is a listening socket handed to us by the service
    // manager for this purpose; nothing else in the process owns it.
    let l = unsafe { UnixListener::from_raw_fd(fd) };
    // Accepting blocks: a non-blocking listener would make the accept
    // loop of vhost-user-backend spin.
    l.set_nonblocking(false)?;
    Ok(l)
}

/// The frontend's listening socket: created at a path (only a stale
/// socket is replaced) or taken over from `--socket-fd`. A created one is
/// returned with its ownership, for removal at exit.
pub fn listen(source: &SocketSource) -> Result<(Listener, Option<OwnedSocket>), DaemonError> {
    match source {
        SocketSource::Path(path) => {
            let (l, owned) = bind_socket(path, None)?;
            Ok((Listener::from(l), Some(owned)))
        }
        &SocketSource::Fd(fd) => Ok((Listener::from(listening_fd(fd)?), None)),
    }
}

/// Whether a failure to take the next connection may pass: the process
/// or the system ran out of descriptors, memory or threads. Anything
/// else (the socket was closed or is not listening) fails again on every
/// attempt.
fn may_pass(e: &DaemonError) -> bool {
    let short = |io: &io::Error| {
        matches!(
            io.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
        )
    };
    match e {
        // The connection's eventfds.
        DaemonError::Io(io) => short(io),
        // The handler's eventfds and epoll.
        DaemonError::CreateDaemon(_) => true,
        DaemonError::Accept(vhost_user_backend::Error::CreateBackendListener(
            vhost::vhost_user::Error::SocketError(io),
        )) => short(io),
        // The connection's thread.
        DaemonError::Accept(vhost_user_backend::Error::StartDaemon(_)) => true,
        _ => false,
    }
}

/// Longest pause between two failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves frontends one after the other on `source`, forever.
pub fn serve(backend: Arc<IommuBackend>, source: SocketSource) -> Result<(), DaemonError> {
    let (listener, _owned) = listen(&source)?;
    serve_listener(backend, listener)
}

/// Serves frontends one after the other on `listener`, forever. The
/// device state lives in the backend's [`Iommu`] and survives
/// disconnects. Accept failures that may pass are retried with a growing
/// pause and logged at most every 10 s; others end serving.
pub fn serve_listener(
    backend: Arc<IommuBackend>,
    mut listener: Listener,
) -> Result<(), DaemonError> {
    let accept_errors = RateLimited::new(Duration::from_secs(10));
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = (|| {
            backend.begin_connection()?;
            let mut daemon = VhostUserDaemon::new(
                "vhost-device-iommu".to_string(),
                backend.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .map_err(DaemonError::CreateDaemon)?;
            daemon.start(&mut listener).map_err(DaemonError::Accept)?;
            Ok(daemon)
        })();
        let mut daemon = match accepted {
            Ok(d) => d,
            Err(e) if may_pass(&e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                accept_errors.warn(format_args!(
                    "waiting for a frontend: {}; retrying in {backoff:?}",
                    crate::error::report(&e)
                ));
                thread::sleep(backoff);
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff = Duration::ZERO;
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
        // The guest cannot answer the page requests it was sent any more.
        backend.iommu().frontend_lost();
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
///
/// Start-up binds both sockets first and opens the VM's PASID set last,
/// so a start that fails leaves nothing behind: the sockets it created
/// are removed, a PASID set it created is deleted, and nothing that was
/// there before (a live socket, a file, another VM's set) is touched.
pub fn run(args: DaemonArgs) -> Result<(), Error> {
    let config = args.device_config()?;
    let source = match (&args.socket_path, args.socket_fd) {
        (Some(path), _) => SocketSource::Path(path.clone()),
        (None, Some(fd)) => SocketSource::Fd(fd),
        (None, None) => return Err(crate::args::ArgsError::NoSocket.into()),
    };
    let cleanup = Cleanup::default();
    let started = start(&args, config, &source, &cleanup);
    let (backend, listener) = match started {
        Ok(s) => s,
        Err(e) => {
            cleanup.abort();
            return Err(e);
        }
    };
    if let SocketSource::Path(p) = &source {
        info!("listening on {}", p.display());
    }
    serve_listener(backend, listener)?;
    Ok(())
}

/// Everything that may fail at start-up, in the order that keeps a
/// failure harmless; what must be undone is registered in `cleanup`.
fn start(
    args: &DaemonArgs,
    config: viommu::DeviceConfig,
    source: &SocketSource,
    cleanup: &Cleanup,
) -> Result<(Arc<IommuBackend>, Listener), Error> {
    let (listener, owned) = listen(source)?;
    if let Some(owned) = owned {
        cleanup.add(owned);
    }
    let control = match &args.control_socket {
        Some(path) => {
            let (l, owned) = bind_socket(path, Some(0o600)).map_err(DaemonError::from)?;
            cleanup.add(owned);
            Some((path, l))
        }
        None => None,
    };
    // The PASID set is opened last: until now nothing outside this
    // process has changed.
    let pasids = pasid_service(args)?;
    if let PasidService::Global(shared) = &pasids {
        // A clean exit means the VM is gone: its PASIDs go back to the
        // host. After a crash they wait for a restart to recover them.
        // A failed start gives back only a set it created itself.
        let shared = shared.clone();
        cleanup.on_exit(move || {
            let mut m = shared.lock();
            match m.end_vm() {
                Ok(r) => info!(
                    "VM {} ended: {} PASIDs and {} leased returned",
                    r.vm_id, r.pasids, r.leased
                ),
                Err(e) => error!("returning the VM's PASIDs: {}", crate::error::report(&e)),
            }
            m.checkpoint_at_exit();
        });
    }
    let rest = || -> Result<_, Error> {
        if let PasidService::Global(shared) = &pasids {
            shared
                .lock()
                .start_checkpoints()
                .map_err(ManagerError::from)?;
        }
        let iommu = Arc::new(Iommu::new(config, pasids.clone(), args.iommu_options())?);
        for (endpoint, c) in &args.host_constraints {
            iommu
                .model_mut()
                .set_host_constraints(*endpoint, c)
                .map_err(|source| crate::iommu::SetupError::HostConstraints {
                    endpoint: *endpoint,
                    source,
                })?;
        }
        if let Some((path, listener)) = control {
            control::start(iommu.clone(), listener).map_err(|source| Error::ControlSocket {
                path: path.clone(),
                source,
            })?;
        }
        exit_on_signals(cleanup.clone())?;
        Ok(Arc::new(IommuBackend::new(iommu)))
    };
    match rest() {
        Ok(backend) => Ok((backend, listener)),
        Err(e) => {
            if let PasidService::Global(shared) = &pasids {
                shared.lock().abandon();
            }
            Err(e)
        }
    }
}
