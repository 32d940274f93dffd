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
use keel_core::event::{Event, NewEvent};
use keel_core::id::{ApiKeyId, DeliveryId, WebhookId, WorkspaceId};
use keel_core::workspace::{Workspace, WorkspaceName};
use time::OffsetDateTime;

mod admission;
pub mod budgets;
mod creations;
mod error;
pub mod events;
mod migrate;
pub mod postgres;
pub mod runtime;
pub mod security;
mod sql;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
pub mod usage;
pub mod webhooks;

pub use budgets::BudgetStore;
pub use error::{Error, Result};
pub use events::{Commit, EventHead};
pub use migrate::SchemaState;
pub use runtime::RuntimeStore;
pub use security::SecurityStore;
pub use usage::{GroupBy, UsageRecord, UsageRow};
pub use webhooks::{Delivery, NewWebhook, Outcome, Webhook};

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

/// How far behind an exporter is on one workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportBacklog {
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// Exported through this seq.
    pub exported: i64,
    /// The log's newest seq.
    pub last_seq: i64,
    /// Retention has removed everything through this seq.
    pub pruned_through: i64,
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
    /// When it stops working, if it expires.
    pub expires_at: Option<OffsetDateTime>,
    /// The routes it may reach (within its role).
    pub scopes: keel_core::auth::Scopes,
    /// The models it may call; `None` for any.
    pub models: Option<Vec<String>>,
    /// Its own rate-limit tier; `None`: the workspace's.
    pub tier: Option<String>,
}

/// Everything Keel persists. Implemented by [`sqlite::SqliteStore`] and
/// [`postgres::PgStore`]; open one with [`open`].
#[async_trait]
pub trait Store:
    RuntimeStore + SecurityStore + BudgetStore + Send + Sync + fmt::Debug + 'static
{
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

    /// The principal a presented key's hash belongs to, if the key exists and is neither
    /// revoked nor expired. Records the key's last use (to the minute).
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

    /// Appends events to their workspaces' logs in one transaction, numbering each
    /// workspace's events consecutively after its last seq, in the order given. Returns
    /// them as committed, in the order given.
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<Event>>;

    /// Up to `limit` events of a workspace with seq greater than `after`, oldest first.
    async fn events_after(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Event>>;

    /// Where a workspace's log stands (zeros for a workspace with no events).
    async fn event_head(&self, workspace: WorkspaceId) -> Result<EventHead>;

    /// Removes every event committed before `cutoff` and records, per workspace, how far
    /// the log was pruned. Returns how many events were removed.
    async fn prune_events(&self, cutoff: OffsetDateTime) -> Result<u64>;

    /// Commits to any workspace's log by any process sharing this database, as they
    /// happen — `None` where the backend has no such channel (SQLite: one process owns
    /// the file, so the appender announces its own commits).
    async fn listen_commits(&self) -> Result<Option<CommitStream>>;

    /// Stores a webhook subscription; it starts after the workspace's newest event.
    async fn create_webhook(&self, webhook: NewWebhook) -> Result<Webhook>;

    /// A workspace's webhooks, oldest first.
    async fn list_webhooks(&self, workspace: WorkspaceId) -> Result<Vec<Webhook>>;

    /// One webhook of this workspace; `NotFound` for another's.
    async fn webhook(&self, workspace: WorkspaceId, id: WebhookId) -> Result<Webhook>;

    /// Deletes a webhook of this workspace and its delivery log.
    async fn delete_webhook(&self, workspace: WorkspaceId, id: WebhookId) -> Result<()>;

    /// Every webhook of every workspace (for the dispatcher).
    async fn all_webhooks(&self) -> Result<Vec<Webhook>>;

    /// Takes or renews the webhook's delivery lease for `owner` until `until`; false when
    /// another owner holds an unexpired lease.
    async fn lease_webhook(
        &self,
        id: WebhookId,
        owner: uuid::Uuid,
        until: OffsetDateTime,
    ) -> Result<bool>;

    /// Moves the webhook's cursor forward to `seq`, if `owner` still holds its lease.
    async fn advance_webhook(&self, id: WebhookId, owner: uuid::Uuid, seq: i64) -> Result<bool>;

    /// Logs a delivery attempt and appends `events` (a dead letter's
    /// `dead_letter.created`) in the same transaction: the log row and its events commit
    /// together or not at all. Returns the events as committed.
    async fn record_delivery(&self, delivery: &Delivery, events: &[NewEvent])
    -> Result<Vec<Event>>;

    /// A webhook's delivery attempts with id after `after`, oldest first, optionally
    /// only those with one outcome.
    async fn list_deliveries(
        &self,
        workspace: WorkspaceId,
        webhook: WebhookId,
        outcome: Option<Outcome>,
        after: Option<DeliveryId>,
        limit: u32,
    ) -> Result<Vec<Delivery>>;

    /// One delivery attempt of this workspace's webhook.
    async fn delivery(
        &self,
        workspace: WorkspaceId,
        webhook: WebhookId,
        id: DeliveryId,
    ) -> Result<Delivery>;

    /// Takes or renews exporter `name`'s lease for `owner` until `until`; false while
    /// another owner holds it.
    async fn lease_exporter(
        &self,
        name: &str,
        owner: uuid::Uuid,
        until: OffsetDateTime,
    ) -> Result<bool>;

    /// Workspaces whose log has events exporter `name` has not exported:
    /// (workspace, exported through, newest seq, pruned through).
    async fn export_backlog(&self, name: &str) -> Result<Vec<ExportBacklog>>;

    /// Records that exporter `name` has exported `workspace`'s events through `seq`.
    async fn advance_export(&self, name: &str, workspace: WorkspaceId, seq: i64) -> Result<()>;

    /// Closes the pool, waiting for connections in use to be returned.
    async fn close(&self);
}

/// A stream of [`Commit`]s; ends only when the store is closed.
pub type CommitStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Commit> + Send>>;

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
