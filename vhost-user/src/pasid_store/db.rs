// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The SQLite database of the state directory: schema, validation at
//! open, and every transaction the daemons and the admin command run.
//!
//! Schema (version [`SCHEMA_VERSION`], `application_id` [`APPLICATION_ID`]):
//!
//! - `config(id = 1, granule_size)`: lease granule size, fixed at creation.
//! - `sets(vm_id PK, quota, created_ms, started_ms, pid)`: one row per VM.
//! - `leases(granule PK, first, last, vm_id -> sets)`: host PASIDs
//!   `[first, last]` of granule `granule` are leased to `vm_id`. The
//!   primary key is what makes a host PASID impossible to lease twice.
//! - `pasids(host PK, guest, vm_id -> sets, active)`: every PASID a VM
//!   holds; a trigger refuses a host PASID outside its owner's leases,
//!   another refuses to drop a lease that still holds PASIDs, and a partial
//!   unique index keeps one active mapping per guest PASID of a set.
//!
//! Writers use IMMEDIATE transactions (or single statements) under WAL
//! with `synchronous = NORMAL`: a commit survives the daemon being killed
//! at any point; after a power loss the last commits may be rolled back,
//! which is harmless since every VM and device holding those PASIDs is
//! gone too.

use std::{
    fs::DirBuilder,
    ops::RangeInclusive,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use viommu::pasid::Pasid;

use super::{StoreError, GRANULE};

/// Name of the database file in the state directory.
pub const DB_FILE: &str = "pasids.sqlite3";
/// Schema version this code reads and writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// `PRAGMA application_id` of our databases: "vIOM".
pub const APPLICATION_ID: i32 = 0x7649_4f4d;
/// How long a writer waits for another daemon's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE config (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    granule_size INTEGER NOT NULL CHECK (granule_size > 0)
) STRICT;
CREATE TABLE sets (
    vm_id TEXT PRIMARY KEY NOT NULL,
    quota INTEGER NOT NULL CHECK (quota BETWEEN 0 AND 4294967295),
    created_ms INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    pid INTEGER NOT NULL
) STRICT;
CREATE TABLE leases (
    granule INTEGER PRIMARY KEY NOT NULL CHECK (granule >= 0),
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    vm_id TEXT NOT NULL REFERENCES sets(vm_id),
    CHECK (first >= 1 AND first <= last)
) STRICT;
CREATE INDEX leases_by_vm ON leases(vm_id);
CREATE TABLE pasids (
    host INTEGER PRIMARY KEY NOT NULL CHECK (host >= 1),
    guest INTEGER NOT NULL CHECK (guest >= 1),
    vm_id TEXT NOT NULL REFERENCES sets(vm_id),
    active INTEGER NOT NULL CHECK (active IN (0, 1))
) STRICT;
CREATE UNIQUE INDEX active_guest_pasids ON pasids(vm_id, guest) WHERE active = 1;
CREATE TRIGGER pasid_in_owner_lease BEFORE INSERT ON pasids
WHEN NOT EXISTS (
    SELECT 1 FROM leases
    WHERE granule = NEW.host / (SELECT granule_size FROM config WHERE id = 1)
      AND vm_id = NEW.vm_id AND NEW.host BETWEEN first AND last)
BEGIN SELECT RAISE(ABORT, 'host PASID outside the leases of its set'); END;
CREATE TRIGGER lease_released_empty BEFORE DELETE ON leases
WHEN EXISTS (SELECT 1 FROM pasids WHERE host BETWEEN OLD.first AND OLD.last)
BEGIN SELECT RAISE(ABORT, 'lease dropped while it holds PASIDs'); END;
";

/// One VM's set as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetRecord {
    pub vm_id: String,
    pub quota: u32,
    /// Pid of the daemon that last opened the set.
    pub pid: u32,
    pub started_ms: i64,
    /// Host PASIDs leased to the VM.
    pub leased: u32,
    /// PASIDs recorded for the VM, inactive ones included.
    pub pasids: u32,
    pub active: u32,
}

/// One recorded PASID of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidRecord {
    pub host: Pasid,
    pub guest: Pasid,
    pub active: bool,
}

/// What a daemon finds of its set when it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveredSet {
    /// The set existed (a previous daemon of this VM recorded it).
    pub existed: bool,
    /// Its quota before this start, if it existed.
    pub old_quota: Option<u32>,
    /// Leases still held, sorted.
    pub leases: Vec<RangeInclusive<Pasid>>,
    /// Active PASIDs, by host PASID.
    pub pasids: Vec<PasidRecord>,
    /// Inactive PASIDs dropped: their references died with the previous
    /// daemon (references are never held outside a daemon's lifetime).
    pub dropped_inactive: u32,
}

/// What a reclaim freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    pub vm_id: String,
    pub pasids: u32,
    pub leased: u32,
}

/// A handle on the state database. Several handles (in one or several
/// processes) may use one database at once.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    granule: u32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Creates the state directory (mode 0700) if needed.
pub(crate) fn create_state_dir(dir: &Path) -> Result<(), StoreError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::StateDir {
            path: dir.to_owned(),
            source,
        })
}

impl Store {
    /// Opens (creating the directory and an empty database if needed) the
    /// database of state directory `dir`, and checks it: an SQLite file of
    /// ours, at our schema version, passing `quick_check`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        create_state_dir(dir)?;
        Self::open_file(dir.join(DB_FILE), true)
    }

    /// Opens the database of `dir`, which must exist (admin commands).
    pub fn open_existing(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Missing(dir.to_owned()));
        }
        Self::open_file(path, false)
    }

    /// Opens and checks the database. While another daemon creates it or
    /// switches it to WAL, SQLite may report it busy without waiting
    /// (lock upgrades it cannot queue): such opens are retried.
    fn open_file(path: PathBuf, create: bool) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Self::try_open_file(path.clone(), create) {
                Err(StoreError::Sqlite { source, .. })
                    if matches!(
                        source.sqlite_error_code(),
                        Some(
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        )
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    fn try_open_file(path: PathBuf, create: bool) -> Result<Store, StoreError> {
        let err = |e| StoreError::sqlite(&path, e);
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let mut conn = Connection::open_with_flags(&path, flags).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        // The first read of the header: fails on files that are not SQLite.
        // One read transaction, so that both fields come from the same
        // commit even while another daemon creates the schema.
        let (app_id, version) = conn
            .transaction()
            .and_then(|tx| {
                let h = header(&tx)?;
                tx.commit()?;
                Ok(h)
            })
            .map_err(err)?;
        match (app_id, version) {
            (0, 0) | (APPLICATION_ID, SCHEMA_VERSION) => {}
            (APPLICATION_ID, found) => {
                return Err(StoreError::SchemaVersion {
                    path,
                    found,
                    supported: SCHEMA_VERSION,
                })
            }
            (found, version) => {
                return Err(StoreError::Foreign {
                    path,
                    found,
                    version,
                })
            }
        }
        if app_id == 0 {
            // Small pages: a journal transaction writes two or three of
            // them to the WAL. Only takes effect on an empty file.
            conn.pragma_update(None, "page_size", 1024).map_err(err)?;
        }
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Inconsistent {
                path,
                detail: format!("cannot switch to WAL journaling (got {mode})"),
            });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(err)?;
        if app_id == 0 {
            initialize(&mut conn, &path)?;
        }
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(err)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path,
                detail: check,
            });
        }
        let granule: u32 = conn
            .query_row("SELECT granule_size FROM config WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?
            .ok_or_else(|| StoreError::Corrupt {
                path: path.clone(),
                detail: "configuration row missing".into(),
            })?;
        Ok(Store {
            conn,
            path,
            granule,
        })
    }

    /// The raw connection, for tests that damage or constrain it.
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Host PASIDs per lease granule of this database.
    pub fn granule(&self) -> u32 {
        self.granule
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |e| StoreError::sqlite(&self.path, e)
    }

    /// Records that a daemon (pid `pid`) now serves `vm_id` with `quota`,
    /// creating the set or taking it over, and returns what the VM held.
    /// Inactive PASIDs are dropped: the references that kept them were
    /// held by the previous daemon. The caller must hold the VM's lock.
    pub fn open_set(
        &mut self,
        vm_id: &str,
        quota: u32,
        pid: u32,
    ) -> Result<RecoveredSet, StoreError> {
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let now = now_ms();
        let old_quota: Option<u32> = tx
            .query_row("SELECT quota FROM sets WHERE vm_id = ?1", [vm_id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        let mut rec = RecoveredSet {
            existed: old_quota.is_some(),
            old_quota,
            ..Default::default()
        };
        if rec.existed {
            tx.execute(
                "UPDATE sets SET quota = ?2, started_ms = ?3, pid = ?4 WHERE vm_id = ?1",
                params![vm_id, quota, now, pid],
            )
            .map_err(err)?;
        } else {
            tx.execute(
                "INSERT INTO sets (vm_id, quota, created_ms, started_ms, pid) VALUES (?1, ?2, ?3, ?3, ?4)",
                params![vm_id, quota, now, pid],
            )
            .map_err(err)?;
        }
        let dropped = tx
            .execute(
                "DELETE FROM pasids WHERE vm_id = ?1 AND active = 0",
                [vm_id],
            )
            .map_err(err)?;
        rec.dropped_inactive = u32::try_from(dropped).unwrap_or(u32::MAX);
        {
            let mut st = tx
                .prepare("SELECT first, last FROM leases WHERE vm_id = ?1 ORDER BY granule")
                .map_err(err)?;
            let rows = st
                .query_map([vm_id], |r| Ok(r.get::<_, u32>(0)?..=r.get::<_, u32>(1)?))
                .map_err(err)?;
            for r in rows {
                rec.leases.push(r.map_err(err)?);
            }
            // Only active PASIDs are left after the delete above.
            rec.pasids = read_pasids(&tx, vm_id).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(rec)
    }

    /// Leases granules overlapping `within` to `vm_id`, lowest first, until
    /// about `want` PASIDs (at least one granule) are leased; each granule
    /// is clipped to `[1, space_max]`. Returns the new ranges, one per
    /// granule; empty when every granule overlapping `within` is taken.
    pub fn lease(
        &mut self,
        vm_id: &str,
        want: u32,
        within: RangeInclusive<Pasid>,
        space_max: Pasid,
    ) -> Result<Vec<RangeInclusive<Pasid>>, StoreError> {
        let g = self.granule;
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let (lo, hi) = (*within.start() / g, (*within.end()).min(space_max) / g);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let taken: Vec<u32> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT granule FROM leases WHERE granule BETWEEN ?1 AND ?2 ORDER BY granule",
                )
                .map_err(err)?;
            let rows = st.query_map([lo, hi], |r| r.get(0)).map_err(err)?;
            rows.collect::<Result<_, _>>().map_err(err)?
        };
        let mut out = Vec::new();
        let mut leased = 0u32;
        let mut taken = taken.into_iter().peekable();
        let mut b = lo;
        while b <= hi && leased < want.max(1) {
            while taken.next_if(|t| *t < b).is_some() {}
            if taken.peek() == Some(&b) {
                b += 1;
                continue;
            }
            let first = (u64::from(b) * u64::from(g)).max(1);
            let last = (u64::from(b) * u64::from(g) + u64::from(g) - 1).min(u64::from(space_max));
            // Both fit: b <= space_max / g.
            let (first, last) = (first as u32, last as u32);
            if first <= last {
                tx.prepare_cached(
                    "INSERT INTO leases (granule, first, last, vm_id) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut st| st.execute(params![b, first, last, vm_id]))
                .map_err(err)?;
                leased = leased.saturating_add(last - first + 1);
                out.push(first..=last);
            }
            b += 1;
        }
        tx.commit().map_err(err)?;
        Ok(out)
    }

    /// Gives back leases of `vm_id` exactly as [`Self::lease`] returned
    /// them; all or nothing. Fails if one is not held by `vm_id` or still
    /// holds PASIDs.
    pub fn release(
        &mut self,
        vm_id: &str,
        ranges: &[RangeInclusive<Pasid>],
    ) -> Result<(), StoreError> {
        let g = self.granule;
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for r in ranges {
            let n = tx
                .prepare_cached(
                    "DELETE FROM leases WHERE granule = ?1 AND first = ?2 AND last = ?3 AND vm_id = ?4",
                )
                .and_then(|mut st| st.execute(params![r.start() / g, r.start(), r.end(), vm_id]))
                .map_err(err)?;
            if n != 1 {
                return Err(StoreError::Inconsistent {
                    path: path.clone(),
                    detail: format!("release of {r:?}, which is not leased to `{vm_id}`"),
                });
            }
        }
        tx.commit().map_err(err)
    }

    /// Journals a new active PASID of `vm_id` (one transaction).
    pub fn record_alloc(
        &mut self,
        vm_id: &str,
        host: Pasid,
        guest: Pasid,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO pasids (host, guest, vm_id, active) VALUES (?1, ?2, ?3, 1)",
            )
            .and_then(|mut st| st.execute(params![host, guest, vm_id]))
            .map_err(self.err())?;
        Ok(())
    }

    /// Journals that the owner freed `host` while references remain.
    pub fn record_inactive(&mut self, vm_id: &str, host: Pasid) -> Result<(), StoreError> {
        self.change_one(
            "UPDATE pasids SET active = 0 WHERE host = ?1 AND vm_id = ?2 AND active = 1",
            vm_id,
            host,
        )
    }

    /// Journals that `host` went back to the VM's pool.
    pub fn record_returned(&mut self, vm_id: &str, host: Pasid) -> Result<(), StoreError> {
        self.change_one(
            "DELETE FROM pasids WHERE host = ?1 AND vm_id = ?2",
            vm_id,
            host,
        )
    }

    fn change_one(&mut self, sql: &str, vm_id: &str, host: Pasid) -> Result<(), StoreError> {
        let n = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut st| st.execute(params![host, vm_id]))
            .map_err(self.err())?;
        if n != 1 {
            return Err(StoreError::Inconsistent {
                path: self.path.clone(),
                detail: format!("PASID {host} of `{vm_id}` is not recorded as expected"),
            });
        }
        Ok(())
    }

    /// The VM whose lease holds host PASID `host`, if one does.
    pub fn lease_holder(&mut self, host: Pasid) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT vm_id FROM leases WHERE granule = ?1 AND ?2 BETWEEN first AND last",
                params![host / self.granule, host],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    /// Every set of the host, by VM id.
    pub fn sets(&mut self) -> Result<Vec<SetRecord>, StoreError> {
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        // One read transaction: a consistent snapshot.
        let tx = self.conn.transaction().map_err(err)?;
        let mut sets: Vec<SetRecord> = {
            let mut st = tx
                .prepare(
                    "SELECT s.vm_id, s.quota, s.pid, s.started_ms,
                            (SELECT COALESCE(SUM(last - first + 1), 0) FROM leases l WHERE l.vm_id = s.vm_id)
                     FROM sets s ORDER BY s.vm_id",
                )
                .map_err(err)?;
            let rows = st
                .query_map([], |r| {
                    Ok(SetRecord {
                        vm_id: r.get(0)?,
                        quota: r.get(1)?,
                        pid: r.get(2)?,
                        started_ms: r.get(3)?,
                        leased: r.get(4)?,
                        pasids: 0,
                        active: 0,
                    })
                })
                .map_err(err)?;
            rows.collect::<Result<_, _>>().map_err(err)?
        };
        {
            let mut st = tx
                .prepare("SELECT vm_id, COUNT(*), SUM(active) FROM pasids GROUP BY vm_id")
                .map_err(err)?;
            let mut rows = st.query([]).map_err(err)?;
            while let Some(r) = rows.next().map_err(err)? {
                let vm: String = r.get(0).map_err(err)?;
                if let Ok(i) = sets.binary_search_by(|s| s.vm_id.as_str().cmp(&vm)) {
                    sets[i].pasids = r.get(1).map_err(err)?;
                    sets[i].active = r.get(2).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(sets)
    }

    /// The recorded PASIDs of `vm_id`, by host PASID.
    pub fn pasids(&mut self, vm_id: &str) -> Result<Vec<PasidRecord>, StoreError> {
        read_pasids(&self.conn, vm_id).map_err(|e| StoreError::sqlite(&self.path, e))
    }

    /// Deletes `vm_id`'s set with its PASIDs and leases. The caller must
    /// hold the VM's lock (proof that no daemon serves it).
    pub fn reclaim(&mut self, vm_id: &str) -> Result<Reclaimed, StoreError> {
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let leased: u32 = tx
            .query_row(
                "SELECT COALESCE(SUM(last - first + 1), 0) FROM leases WHERE vm_id = ?1",
                [vm_id],
                |r| r.get(0),
            )
            .map_err(err)?;
        let pasids = tx
            .execute("DELETE FROM pasids WHERE vm_id = ?1", [vm_id])
            .map_err(err)?;
        tx.execute("DELETE FROM leases WHERE vm_id = ?1", [vm_id])
            .map_err(err)?;
        tx.execute("DELETE FROM sets WHERE vm_id = ?1", [vm_id])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Reclaimed {
            vm_id: vm_id.to_owned(),
            pasids: u32::try_from(pasids).unwrap_or(u32::MAX),
            leased,
        })
    }

    /// Every lease of the host as `(first, last, vm_id)`, by PASID
    /// (tests and audits).
    pub fn all_leases(&mut self) -> Result<Vec<(Pasid, Pasid, String)>, StoreError> {
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let mut st = self
            .conn
            .prepare("SELECT first, last, vm_id FROM leases ORDER BY granule")
            .map_err(err)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

/// `(application_id, user_version)` of the database.
fn header(conn: &Connection) -> rusqlite::Result<(i32, i64)> {
    let app: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok((app, version))
}

/// Creates the schema in an empty database. Two daemons may race here:
/// the IMMEDIATE transaction serializes them and the loser finds the
/// schema in place.
fn initialize(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |e| StoreError::sqlite(path, e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    let (app, version) = header(&tx).map_err(err)?;
    if app == APPLICATION_ID && version == SCHEMA_VERSION {
        return Ok(());
    }
    let tables: i64 = tx
        .query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(err)?;
    if app != 0 || version != 0 || tables != 0 {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            found: app,
            version,
        });
    }
    tx.execute_batch(SCHEMA).map_err(err)?;
    tx.execute(
        "INSERT INTO config (id, granule_size) VALUES (1, ?1)",
        [GRANULE],
    )
    .map_err(err)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(err)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(err)?;
    tx.commit().map_err(err)
}

/// The `pasids` rows of `vm_id`, by host PASID (inside a transaction or not).
fn read_pasids(conn: &Connection, vm_id: &str) -> rusqlite::Result<Vec<PasidRecord>> {
    let mut st =
        conn.prepare("SELECT host, guest, active FROM pasids WHERE vm_id = ?1 ORDER BY host")?;
    let rows = st.query_map([vm_id], |r| {
        Ok(PasidRecord {
            host: r.get(0)?,
            guest: r.get(1)?,
            active: r.get(2)?,
        })
    })?;
    rows.collect()
}
