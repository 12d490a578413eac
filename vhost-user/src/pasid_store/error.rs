// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the durable PASID store, worded for whoever starts the
//! daemon: which file, what is wrong with it, what to do.

use std::{
    io,
    path::{Path, PathBuf},
};

use rusqlite::ErrorCode;
use thiserror::Error;

/// `SQLITE_IOERR_SHMSIZE`: the `-shm` file could not be grown.
const SQLITE_IOERR_SHMSIZE: i32 = 10 | (19 << 8);

fn extended_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code),
        _ => None,
    }
}

/// Whether the filesystem of `path` has (almost) no space left, or the
/// process's file size limit does not let `path` grow.
fn space_exhausted(path: &Path) -> bool {
    const SLACK: u64 = 1 << 20;
    let dir = path.parent().unwrap_or(Path::new("."));
    let no_space = nix::sys::statvfs::statvfs(dir)
        .is_ok_and(|s| s.blocks_available().saturating_mul(s.fragment_size()) < SLACK);
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let limited = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_FSIZE)
        .is_ok_and(|(soft, _)| {
            soft != nix::sys::resource::RLIM_INFINITY && size.saturating_add(SLACK) > soft
        });
    no_space || limited
}

/// Why the state directory or database cannot be used.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("no default state directory: not root and neither XDG_STATE_HOME nor HOME is set; pass --state-dir")]
    NoDefaultDir,
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no PASID state database in {0}")]
    Missing(PathBuf),
    #[error("invalid VM id {vm_id:?}: {reason}")]
    InvalidVmId { vm_id: String, reason: &'static str },
    #[error("VM `{vm_id}` is already served by a running daemon (its lock {path} is held)")]
    Locked { vm_id: String, path: PathBuf },
    #[error("lock file {path}: {source}")]
    LockFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a PASID state database (not SQLite, or its header is damaged); move it away to start with an empty allocator")]
    NotADatabase { path: PathBuf },
    #[error("{path} is an SQLite database of another application (application_id {found:#x}, user_version {version})")]
    Foreign {
        path: PathBuf,
        found: i32,
        version: i64,
    },
    #[error("{path} has schema version {found}; this daemon supports version {supported}")]
    SchemaVersion {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{path} holds no PASID state ({}): the state it held is lost, or it was never written \
             (this daemon creates it whole). If no VM on this host holds host PASIDs, stop every \
             daemon using this state directory and remove it (with its -wal and -shm files) to \
             start with an empty allocator; otherwise PASIDs in use could be handed out twice",
             if *bytes == 0 { "it is empty, 0 bytes".to_string() }
             else { format!("an SQLite file of {bytes} bytes without our schema; was its -wal file removed?") })]
    Empty { path: PathBuf, bytes: u64 },
    #[error("{path} is corrupt: {detail}; move it away to start with an empty allocator")]
    Corrupt { path: PathBuf, detail: String },
    #[error("no space left to write {path} (disk full or file size limit)")]
    Full { path: PathBuf },
    #[error("{path} cannot be written: read-only file or directory")]
    ReadOnly { path: PathBuf },
    #[error("cannot open {path}: {source} (does the directory exist and may this user write it?)")]
    CannotOpen {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {detail}")]
    Inconsistent { path: PathBuf, detail: String },
    #[error("PASID state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

impl StoreError {
    /// Classifies an SQLite failure on the database at `path`.
    pub(crate) fn sqlite(path: &Path, e: rusqlite::Error) -> Self {
        let path = path.to_owned();
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => StoreError::NotADatabase { path },
            Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
                path,
                detail: e.to_string(),
            },
            Some(ErrorCode::DiskFull) => StoreError::Full { path },
            Some(ErrorCode::ReadOnly) => StoreError::ReadOnly { path },
            Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
                StoreError::CannotOpen { path, source: e }
            }
            // An extended I/O error on the shared-memory file, or any
            // I/O error once the space or the file size limit is used
            // up, is a full disk to whoever reads the message.
            Some(ErrorCode::SystemIoFailure)
                if extended_code(&e) == Some(SQLITE_IOERR_SHMSIZE) || space_exhausted(&path) =>
            {
                StoreError::Full { path }
            }
            _ => StoreError::Sqlite { path, source: e },
        }
    }
}
