//! The embedded SQLite backend: one file (`keel.db`) in the data directory, WAL mode,
//! `synchronous` as configured (FULL by default, so a committed write survives power loss).

use std::path::Path;
use std::str::FromStr;

use keel_core::config::{Database, SqliteSynchronous};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous as Sync,
};

use crate::{Backend, Error, Result};

/// A store on an SQLite file.
///
/// SQLite allows one writer at a time, and a writer that finds the file locked sleeps in
/// SQLite's busy handler (milliseconds at a time). So every write goes through `writer`, a
/// pool of exactly one connection: writers queue for it in this process, in order, and
/// never sleep on the lock. Reads use `pool` and run beside the writer (WAL).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: SqlitePool,
    /// The queue's depth for admission (shared by the clones).
    queue: std::sync::Arc<crate::admission::QueueGauge>,
    /// Task creations waiting for the writer, committed together (see `creations.rs`).
    creations: std::sync::Arc<crate::creations::Creations>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path, config: &Database) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|cause| Error::DataDir {
                path: dir.display().to_string(),
                cause,
            })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(Error::Database)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.sqlite_synchronous {
                SqliteSynchronous::Off => Sync::Off,
                SqliteSynchronous::Normal => Sync::Normal,
                SqliteSynchronous::Full => Sync::Full,
                SqliteSynchronous::Extra => Sync::Extra,
            })
            .busy_timeout(config.sqlite_busy_timeout)
            .foreign_keys(true);
        // A connection to a local file does not go stale: no ping before each use (a ping
        // is a round trip to the connection's worker thread, like any statement).
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        // The writer keeps SQLite's default page cache (2 MiB): its hot pages are the
        // tables' and indexes' right edges, and a miss is a read from the OS's page cache.
        // With 8 MiB the gateway's RSS grew by ~4 MB as its usage inserts filled the cache,
        // for no throughput the runtime bench could tell apart (docs/BENCHMARKS.md).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            writer,
            queue: std::sync::Arc::default(),
            creations: std::sync::Arc::default(),
        })
    }

    const BACKEND: Backend = Backend::Sqlite;
    const MIGRATOR: &'static sqlx::migrate::Migrator = &crate::migrate::SQLITE;
    const HAS_MIGRATIONS_TABLE: &'static str = "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')";
    /// The UTC day of `created_at` (stored as RFC 3339 text in UTC).
    const DAY_EXPR: &'static str = "substr(created_at, 1, 10)";
    /// A task's duration, created → finished, in whole milliseconds.
    const DURATION_MS_EXPR: &'static str =
        "CAST(round((julianday(finished_at) - julianday(created_at)) * 86400000.0) AS INTEGER)";
    /// One process owns the file: the appender announces its own commits.
    const ANNOUNCES_COMMITS: bool = false;
    /// Each query is a round trip to the connection's worker thread: a commit's writes
    /// that read nothing back go in one.
    const GATHERS_WRITES: bool = true;
    /// SQLite has no data-modifying CTEs (and gathers its statements into one query
    /// instead): the thread update runs before the messages' insert.
    const CHAINS_WRITES: bool = false;

    /// Leases the next runnable tasks (highest priority, then lowest virtual time).
    const CLAIM_SQL: &'static str = concat!(
        "UPDATE tasks SET lease_owner = $1, lease_until = $2 WHERE id IN (SELECT id FROM tasks \
         WHERE queued AND run_at <= $3 AND (lease_until IS NULL OR lease_until < $3) AND agent_id NOT IN (SELECT a.id FROM agents a WHERE a.max_concurrency IS NOT NULL \
         AND a.max_concurrency <= (SELECT count(*) FROM tasks r WHERE r.agent_id = a.id AND r.lease_owner IS NOT NULL AND r.lease_until >= $3)) \
         ORDER BY priority DESC, vt, id LIMIT $4) RETURNING ",
        crate::runtime::task_columns!()
    );
    /// Gives a new task of workspace `$1` its virtual time: one past the later of its
    /// lane's last and the queue's clock.
    const LANE_SQL: &'static str = "INSERT INTO queue_lanes (workspace_id, last_vt) \
         VALUES ($1, (SELECT vt FROM queue_clock WHERE id = 1) + 1) ON CONFLICT (workspace_id) DO UPDATE \
         SET last_vt = max(queue_lanes.last_vt, (SELECT vt FROM queue_clock WHERE id = 1)) + 1 RETURNING last_vt";
    /// Locks the rows a subquery selects (in its order) for an update to follow.
    /// Locks a refresh token and its session (aliases `r`, `s`) for a rotation.
    const LOCK_ROWS_OF_R: &'static str = "";
    const LOCK_ROWS: &'static str = "";
    /// Moves the queue's clock to the virtual time of the tasks just started.
    const CLOCK_SQL: &'static str = "UPDATE queue_clock SET vt = max(vt, $1) WHERE id = 1";
    /// One writer: a claim is a transaction of a few statements.
    const CLAIMS_AT_ONCE: bool = false;
    /// Unused (`CLAIMS_AT_ONCE` is false).
    const CLAIM_AT_ONCE_SQL: &'static str = "";
    /// One writer, so no lock is contended: a creation is a transaction of a few
    /// statements, gathered.
    const CREATES_AT_ONCE: bool = false;

    async fn commit_stream(&self) -> Result<Option<crate::CommitStream>> {
        Ok(None)
    }
}

crate::sql::sql_store!(SqliteStore, sqlx::Sqlite);
crate::runtime::runtime_store!(SqliteStore, sqlx::Sqlite);
crate::security::security_store!(SqliteStore, sqlx::Sqlite);
crate::budgets::budget_store!(SqliteStore, sqlx::Sqlite);
