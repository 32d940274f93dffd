//! Keel's storage: the [`Store`] trait every other crate programs against, and its two
//! real implementations — embedded SQLite (the zero-config default) and Postgres (for
//! several instances sharing one database).
//!
//! Both backends run the same SQL from one implementation body (see `sql_store!`), so
//! they cannot drift apart; only connection set-up and the DDL in `migrations/` differ.
//! One conformance suite (`tests/conformance.rs`) runs against both.
//!
//! Rules this crate keeps:
//! - It stores what it is given: validation and authorisation happen before a call
//!   reaches here, but every read and write of tenant data takes the workspace it is
//!   scoped to, so no query can cross tenants by mistake.
//! - It knows nothing of HTTP.
//! - Migrations are embedded and forward-only; a database newer than the binary is refused.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::auth::{ApiKey, KeyHash, KeyName, Principal, Role};
use keel_core::config::Config;
use keel_core::id::{ApiKeyId, WorkspaceId};
use keel_core::workspace::{Workspace, WorkspaceName};
use time::OffsetDateTime;

mod error;
mod migrate;
pub mod postgres;
mod sql;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
pub mod usage;

pub use error::{Error, Result};
pub use migrate::SchemaState;
pub use usage::{GroupBy, UsageRecord, UsageRow};

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file.
    Sqlite,
    /// A Postgres server.
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

/// A key to be stored (its secret already reduced to a hash).
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// The workspace it acts in.
    pub workspace_id: WorkspaceId,
    /// Its label.
    pub name: Option<KeyName>,
    /// What it may do.
    pub role: Role,
    /// The visible start of the token.
    pub prefix: String,
    /// The token's fingerprint.
    pub hash: KeyHash,
}

/// Everything Keel persists. Implemented by [`sqlite::SqliteStore`] and
/// [`postgres::PgStore`]; open one with [`open`].
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Which database this is.
    fn backend(&self) -> Backend;

    /// Whether the database answers, and how its schema compares with this binary's.
    async fn schema_state(&self) -> Result<SchemaState>;

    /// Applies any migrations this binary has that the database lacks.
    async fn migrate(&self) -> Result<SchemaState>;

    /// Creates a workspace; `Conflict` if the name is taken.
    async fn create_workspace(&self, name: &WorkspaceName) -> Result<Workspace>;

    /// The workspace with this name, created if it does not exist.
    async fn ensure_workspace(&self, name: &WorkspaceName) -> Result<Workspace>;

    /// A workspace by id.
    async fn workspace(&self, id: WorkspaceId) -> Result<Workspace>;

    /// A workspace by name.
    async fn workspace_by_name(&self, name: &WorkspaceName) -> Result<Workspace>;

    /// Stores a new key.
    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey>;

    /// The principal a presented key's hash belongs to, if the key exists and is not
    /// revoked.
    async fn authenticate(&self, hash: &KeyHash) -> Result<Option<Principal>>;

    /// A workspace's keys, oldest first.
    async fn list_api_keys(&self, workspace: WorkspaceId) -> Result<Vec<ApiKey>>;

    /// Revokes a key of this workspace (idempotent); `NotFound` for a key of another.
    async fn revoke_api_key(&self, workspace: WorkspaceId, id: ApiKeyId) -> Result<ApiKey>;

    /// Appends usage records in one transaction (a few hundred per statement).
    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<()>;

    /// Sums a workspace's usage in `[from, to)`, grouped and ordered by the group.
    async fn usage_summary(
        &self,
        workspace: WorkspaceId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        group_by: GroupBy,
    ) -> Result<Vec<UsageRow>>;

    /// Closes the pool, waiting for connections in use to be returned.
    async fn close(&self);
}

/// Opens the store the config names — Postgres when `database.url` is set, else SQLite in
/// `data_dir` — and refuses a database whose schema is newer than this binary.
/// Migrations are not applied: call [`Store::migrate`].
pub async fn open(config: &Config) -> Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match &config.database.url {
        Some(url) => Arc::new(postgres::PgStore::connect(url, &config.database).await?),
        None => Arc::new(sqlite::SqliteStore::open(&config.sqlite_path(), &config.database).await?),
    };
    let state = store.schema_state().await?;
    if state.database > state.binary {
        return Err(Error::SchemaTooNew {
            database: state.database,
            binary: state.binary,
        });
    }
    Ok(store)
}

/// The current time, at the microsecond precision both databases keep, so a value read
/// back equals the value written.
pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

/// The highest schema version this binary embeds for `backend`.
#[must_use]
pub fn binary_schema_version(backend: Backend) -> i64 {
    match backend {
        Backend::Sqlite => migrate::latest(&migrate::SQLITE),
        Backend::Postgres => migrate::latest(&migrate::POSTGRES),
    }
}
