// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the durable PASID store, worded for whoever starts the
//! daemon: which file, what is wrong with it, what to do.

use std::{io, path::PathBuf};

use rusqlite::ErrorCode;
use thiserror::Error;

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
    pub(crate) fn sqlite(path: &std::path::Path, e: rusqlite::Error) -> Self {
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
            _ => StoreError::Sqlite { path, source: e },
        }
    }
}
