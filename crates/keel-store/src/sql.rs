//! The one implementation of [`Store`](crate::Store), shared by both backends.
//!
//! The SQL here is the dialect SQLite and Postgres have in common (`$n` placeholders,
//! `ON CONFLICT`, `RETURNING`), so each query is written once. A backend provides its
//! pool, its migrator and the few statements that differ, as associated constants; the
//! macro stamps this body onto it. Conformance tests run the result on both.

use keel_core::auth::{ApiKey, KeyName, Role};
use keel_core::id::{ApiKeyId, WorkspaceId};
use keel_core::workspace::{Workspace, WorkspaceName};
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Error, Result};

/// Usage rows per INSERT statement (17 parameters each, far under both databases' limits).
pub(crate) const USAGE_BATCH: usize = 500;

/// Rows of the longest multi-row statement kept prepared: a few statement texts per kind,
/// a few KiB each. A longer one is prepared unnamed, as a cached prepared statement that
/// long holds hundreds of KiB in its connection's cache.
const PREPARED_ROWS: usize = 64;

/// The rows a multi-row statement (usage, events, steps, messages, a batch's tasks) is
/// written for. Up to [`PREPARED_ROWS`], `n` rounded up to a power of four: the rows past
/// `n` are NULL padding that the statement skips, so batches of any length share four
/// statement texts, each prepared (and planned) once per connection instead of parsed and
/// planned per batch. Past it, `n`.
pub(crate) fn padded_rows(n: usize) -> usize {
    if n > PREPARED_ROWS {
        return n;
    }
    let mut rows = 1;
    while rows < n {
        rows *= 4;
    }
    rows
}

/// `items`, then `None` up to `padded_rows(items.len())`.
pub(crate) fn padded<T>(items: &[T]) -> impl Iterator<Item = Option<&T>> {
    (0..padded_rows(items.len())).map(|k| items.get(k))
}

/// Rows per statement of a multi-row write that would otherwise take up to `most`: where
/// writes are gathered, [`PREPARED_ROWS`], so each chunk is a statement kept prepared (a
/// round trip more per chunk costs the SQLite writer's thread less than parsing a longer
/// one); elsewhere `most`.
pub(crate) const fn chunk_rows(gathered: bool, most: usize) -> usize {
    if gathered { PREPARED_ROWS } else { most }
}

/// Whether a statement of `rows` rows is kept prepared: padded or not, the answer is the
/// same (padding never crosses [`PREPARED_ROWS`]).
pub(crate) fn persistent(rows: usize) -> bool {
    rows <= PREPARED_ROWS
}

/// Writes `ids` into `qb` as the binds of an `IN (…)` list, padded with NULLs (which match
/// nothing) to [`padded_rows`], and returns whether the statement is to be kept prepared.
pub(crate) fn push_id_list<DB>(qb: &mut sqlx::QueryBuilder<DB>, ids: &[Uuid]) -> bool
where
    DB: sqlx::Database,
    for<'t> Option<Uuid>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut list = qb.separated(", ");
    for id in padded(ids) {
        list.push_bind(id.copied());
    }
    persistent(ids.len())
}

/// Write statements whose only results are rows to return (`RETURNING`), gathered into
/// one query where the database takes several statements at once: SQLite, where each
/// query is a round trip to the connection's worker thread (two thread wake-ups), so a
/// commit's inserts and updates cost one trip instead of one each. Elsewhere (Postgres
/// takes one statement per prepared query) each statement runs as it is ended.
///
/// A gathered query is kept prepared only while its statements' rows add up to at most
/// [`PREPARED_ROWS`] (see [`persistent`]): past that, its text depends on every
/// statement's length and would be parsed afresh each time. So a statement that would
/// take the query past it first sends what waits ([`needs_room`](Self::needs_room)):
/// under load a commit costs a few more round trips, each of a query kept prepared,
/// instead of one query of hundreds of rows parsed and planned for every batch (which
/// had been a seventh of the SQLite writer's thread at 64 concurrent runs).
pub(crate) struct Gather<DB: sqlx::Database> {
    pub(crate) qb: sqlx::QueryBuilder<DB>,
    together: bool,
    /// Statements written and not yet run.
    pending: usize,
    /// Their rows (as padded).
    rows: usize,
    /// Rows returned by the queries sent early to make room, for the next run's caller.
    pub(crate) early: Vec<DB::Row>,
    /// Postgres: writes that read nothing back wait in `qb` as data-modifying CTEs of the
    /// next statement (see [`open_write`](Self::open_write)).
    chain: bool,
    /// Such writes waiting.
    ctes: usize,
}

impl<DB: sqlx::Database> Gather<DB> {
    pub(crate) fn new(together: bool) -> Self {
        Self {
            qb: sqlx::QueryBuilder::new(""),
            together,
            pending: 0,
            rows: 0,
            early: Vec::new(),
            chain: false,
            ctes: 0,
        }
    }

    /// Where statements are not gathered, lets writes that read nothing back wait as CTEs
    /// of the statement after them (Postgres runs a data-modifying CTE to completion
    /// whether or not anything reads it): one round trip for several writes that do not
    /// read one another's rows. A statement written after such writes begins with
    /// [`with_keyword`](Self::with_keyword) or [`start_statement`](Self::start_statement).
    pub(crate) fn chaining_writes(mut self, chain: bool) -> Self {
        self.chain = chain && !self.together;
        self
    }

    /// Opens a write that reads nothing back; chained, it is written as CTE `w<k>` of
    /// the next statement. The caller writes the statement, then [`end_write`](Self::end_write).
    pub(crate) fn open_write(&mut self) {
        if self.chain {
            self.qb.push(if self.ctes == 0 { "WITH " } else { ", " });
            self.qb.push(format_args!("w{} AS (", self.ctes));
        }
    }

    /// Ends a write opened by [`open_write`](Self::open_write) (`rows` rows, as padded):
    /// true when it is to run now, as [`end`](Self::end).
    pub(crate) fn end_write(&mut self, rows: usize) -> bool {
        if !self.chain {
            return self.end(rows);
        }
        self.qb.push(")");
        self.ctes += 1;
        self.rows += rows;
        false
    }

    /// What a statement beginning with a `WITH` list begins with: after chained writes,
    /// the comma that continues their list.
    pub(crate) fn with_keyword(&self) -> &'static str {
        if self.ctes > 0 { ", " } else { "WITH " }
    }

    /// Separates a statement that does not begin with `WITH` from chained writes before it.
    pub(crate) fn start_statement(&mut self) {
        if self.ctes > 0 {
            self.qb.push(" ");
        }
    }

    /// Chained writes with no statement after them become a statement of their own,
    /// which returns no rows (called before a run).
    pub(crate) fn seal(&mut self) {
        if self.ctes > 0 {
            self.qb.push(" SELECT 1 WHERE false");
            self.ctes = 0;
            self.pending += 1;
        }
    }

    /// Whether what waits must run before a statement of `rows` rows (as padded) is
    /// written, to keep the gathered query short enough to stay prepared. Statements of
    /// no rows (`BEGIN`, `COMMIT`) never wait for room, and never make room alone: a
    /// `BEGIN` rides with the statement after it even when that one is too long to keep.
    pub(crate) fn needs_room(&self, rows: usize) -> bool {
        (self.together || self.ctes > 0)
            && self.rows > 0
            && rows > 0
            && !persistent(self.rows + rows)
    }

    /// Ends the statement just written (`rows` rows, as padded). True when it is to run
    /// now; false when it waits for the others.
    pub(crate) fn end(&mut self, rows: usize) -> bool {
        self.pending += 1;
        self.rows += rows;
        // Chained writes belong to the statement that ends here.
        self.ctes = 0;
        if self.together {
            self.qb.push(";\n");
            false
        } else {
            true
        }
    }

    /// Whether statements are waiting to run.
    pub(crate) fn is_pending(&self) -> bool {
        self.pending > 0
    }

    /// Whether the query about to run is kept prepared (see [`persistent`]), and starts
    /// counting afresh. The caller runs the query, then resets `qb`.
    pub(crate) fn take(&mut self) -> bool {
        let keep = persistent(self.rows);
        self.pending = 0;
        self.rows = 0;
        keep
    }
}

/// A pooled connection that is closed, not pooled again, if it is dropped before
/// [`give_back`](Self::give_back): for a transaction begun by hand (not by sqlx), so a
/// future dropped half-way cannot put a connection with an open transaction back in the
/// pool (closing it rolls the transaction back).
pub(crate) struct CloseUnlessReturned<DB: sqlx::Database> {
    conn: sqlx::pool::PoolConnection<DB>,
    returned: bool,
}

impl<DB: sqlx::Database> CloseUnlessReturned<DB> {
    pub(crate) fn new(conn: sqlx::pool::PoolConnection<DB>) -> Self {
        Self {
            conn,
            returned: false,
        }
    }

    /// Returns the connection to its pool: its transaction, if any, has ended.
    pub(crate) fn give_back(mut self) {
        self.returned = true;
    }
}

impl<DB: sqlx::Database> std::ops::Deref for CloseUnlessReturned<DB> {
    type Target = sqlx::pool::PoolConnection<DB>;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for CloseUnlessReturned<DB> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl<DB: sqlx::Database> Drop for CloseUnlessReturned<DB> {
    fn drop(&mut self) {
        if !self.returned {
            self.conn.close_on_drop();
        }
    }
}

pub(crate) fn workspace_from_row<R: Row>(row: &R) -> Result<Workspace>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Uuid: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> OffsetDateTime: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let name: String = row.try_get("name")?;
    Ok(Workspace {
        id: WorkspaceId::from_uuid(row.try_get("id")?),
        name: WorkspaceName::parse(&name).map_err(|e| corrupt("workspace name", e))?,
        created_at: row.try_get("created_at")?,
    })
}

pub(crate) fn api_key_from_row<R: Row>(row: &R) -> Result<ApiKey>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Uuid: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> OffsetDateTime: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<OffsetDateTime>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let name: Option<String> = row.try_get("name")?;
    let role: String = row.try_get("role")?;
    Ok(ApiKey {
        id: ApiKeyId::from_uuid(row.try_get("id")?),
        workspace_id: WorkspaceId::from_uuid(row.try_get("workspace_id")?),
        name: name
            .map(|n| KeyName::parse(&n))
            .transpose()
            .map_err(|e| corrupt("key name", e))?,
        role: role.parse::<Role>().map_err(|e| corrupt("key role", e))?,
        prefix: row.try_get("prefix")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        expires_at: row.try_get("expires_at")?,
        scopes: stored_scopes(row.try_get("scopes")?)?,
        models: stored_models(row.try_get("models")?)?,
        last_used_at: row.try_get("last_used_at")?,
        tier: row.try_get("tier")?,
    })
}

/// Scopes as stored: NULL for every scope.
pub(crate) fn stored_scopes(scopes: Option<String>) -> Result<keel_core::auth::Scopes> {
    scopes.map_or(Ok(keel_core::auth::Scopes::ALL), |s| {
        keel_core::auth::Scopes::parse(&s).map_err(|e| corrupt("key scopes", e))
    })
}

/// A model allowlist as stored: NULL for any model, else a JSON array.
pub(crate) fn stored_models(models: Option<String>) -> Result<Option<Vec<String>>> {
    models
        .map(|m| serde_json::from_str(&m).map_err(|e| corrupt("key models", e)))
        .transpose()
}

fn corrupt(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        what,
        detail: e.to_string(),
    }
}

/// Maps a unique-constraint violation to `Conflict`, anything else through `From`.
pub(crate) fn conflict_as(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Error::Conflict { what },
        _ => Error::from(e),
    }
}

/// Stamps the shared [`Store`](crate::Store) implementation onto a backend type that has
/// a `pool` field (reads), a `writer` field (every write goes through it) and `BACKEND`, `MIGRATOR`, `HAS_MIGRATIONS_TABLE` and `DAY_EXPR`
/// constants; `$db` is its sqlx database type.
macro_rules! sql_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::Store for $store {
            fn backend(&self) -> $crate::Backend {
                Self::BACKEND
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn schema_state(&self) -> $crate::Result<$crate::SchemaState> {
                let binary = $crate::migrate::latest(Self::MIGRATOR);
                let has_table: bool = sqlx::query_scalar(Self::HAS_MIGRATIONS_TABLE).fetch_one(&self.pool).await?;
                let database: Option<i64> = if has_table {
                    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                        .fetch_one(&self.pool)
                        .await?
                } else {
                    None
                };
                Ok($crate::SchemaState {
                    database: database.unwrap_or(0),
                    binary,
                })
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn migrate(&self) -> $crate::Result<$crate::SchemaState> {
                let before = self.schema_state().await?;
                if before.database > before.binary {
                    return Err($crate::Error::SchemaTooNew {
                        database: before.database,
                        binary: before.binary,
                    });
                }
                // A failed Postgres migration leaves its advisory lock on the pooled
                // connection; callers treat a failure as fatal and exit, which releases it.
                Self::MIGRATOR.run(&self.pool).await?;
                let after = self.schema_state().await?;
                if after.database != before.database {
                    tracing::info!(from = before.database, to = after.database, "migrated database schema");
                }
                Ok(after)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn create_workspace(
                &self,
                name: &keel_core::workspace::WorkspaceName,
            ) -> $crate::Result<keel_core::workspace::Workspace> {
                let workspace = keel_core::workspace::Workspace {
                    id: keel_core::id::WorkspaceId::new(),
                    name: name.clone(),
                    created_at: $crate::now(),
                };
                sqlx::query("INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3)")
                    .bind(workspace.id.as_uuid())
                    .bind(workspace.name.as_str())
                    .bind(workspace.created_at)
                    .execute(&self.writer)
                    .await
                    .map_err($crate::sql::conflict_as("workspace"))?;
                Ok(workspace)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn ensure_workspace(
                &self,
                name: &keel_core::workspace::WorkspaceName,
            ) -> $crate::Result<keel_core::workspace::Workspace> {
                sqlx::query("INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
                    .bind(keel_core::id::WorkspaceId::new().as_uuid())
                    .bind(name.as_str())
                    .bind($crate::now())
                    .execute(&self.writer)
                    .await?;
                self.workspace_by_name(name).await
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn workspace(
                &self,
                id: keel_core::id::WorkspaceId,
            ) -> $crate::Result<keel_core::workspace::Workspace> {
                let row = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE id = $1")
                    .bind(id.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "workspace" })?;
                $crate::sql::workspace_from_row(&row)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn workspace_by_name(
                &self,
                name: &keel_core::workspace::WorkspaceName,
            ) -> $crate::Result<keel_core::workspace::Workspace> {
                let row = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE name = $1")
                    .bind(name.as_str())
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "workspace" })?;
                $crate::sql::workspace_from_row(&row)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn create_api_key(&self, key: $crate::NewApiKey) -> $crate::Result<keel_core::auth::ApiKey> {
                let stored = keel_core::auth::ApiKey {
                    id: keel_core::id::ApiKeyId::new(),
                    workspace_id: key.workspace_id,
                    name: key.name,
                    role: key.role,
                    prefix: key.prefix,
                    created_at: $crate::now(),
                    revoked_at: None,
                    expires_at: key.expires_at,
                    scopes: key.scopes,
                    models: key.models,
                    last_used_at: None,
                    tier: key.tier,
                };
                let models = stored.models.as_ref().map(|m| serde_json::Value::from(m.clone()).to_string());
                sqlx::query(
                    "INSERT INTO api_keys (id, workspace_id, name, role, prefix, key_hash, created_at, expires_at, scopes, models, tier) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(stored.id.as_uuid())
                .bind(stored.workspace_id.as_uuid())
                .bind(stored.name.as_ref().map(|n| n.as_str()))
                .bind(stored.role.as_str())
                .bind(&stored.prefix)
                .bind(key.hash.as_str())
                .bind(stored.created_at)
                .bind(stored.expires_at)
                .bind(stored.scopes.to_stored())
                .bind(models)
                .bind(&stored.tier)
                .execute(&self.writer)
                .await
                .map_err($crate::sql::conflict_as("API key"))?;
                Ok(stored)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn authenticate(
                &self,
                hash: &keel_core::auth::KeyHash,
            ) -> $crate::Result<Option<keel_core::auth::Principal>> {
                let row = sqlx::query(
                    "SELECT id, workspace_id, role, scopes, models, last_used_at, expires_at, tier FROM api_keys \
                     WHERE key_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
                )
                .bind(hash.as_str())
                .bind($crate::now())
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                use sqlx::Row as _;
                let role: String = row.try_get("role")?;
                let key_id = keel_core::id::ApiKeyId::from_uuid(row.try_get("id")?);
                // Last use is kept to the minute: one write per key per minute at most,
                // not one per request.
                let last_used: Option<time::OffsetDateTime> = row.try_get("last_used_at")?;
                let now = $crate::now();
                if last_used.is_none_or(|at| now - at > time::Duration::MINUTE) {
                    // Best effort: a failed note of last use must not fail the request.
                    if let Err(e) = sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
                        .bind(key_id.as_uuid())
                        .bind(now)
                        .execute(&self.writer)
                        .await
                    {
                        tracing::warn!(error = %e, key_id = %key_id, "cannot record the key's last use");
                    }
                }
                Ok(Some(keel_core::auth::Principal {
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    key_id: Some(key_id),
                    user_id: None,
                    role: role.parse().map_err(|e: keel_core::Error| $crate::Error::Corrupt {
                        what: "key role",
                        detail: e.to_string(),
                    })?,
                    scopes: $crate::sql::stored_scopes(row.try_get("scopes")?)?,
                    models: $crate::sql::stored_models(row.try_get("models")?)?.map(Into::into),
                    expires_at: row.try_get("expires_at")?,
                    tier: row.try_get::<Option<String>, _>("tier")?.map(Into::into),
                }))
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn list_api_keys(
                &self,
                workspace: keel_core::id::WorkspaceId,
            ) -> $crate::Result<Vec<keel_core::auth::ApiKey>> {
                sqlx::query(
                    "SELECT id, workspace_id, name, role, prefix, created_at, revoked_at, expires_at, scopes, models, last_used_at, tier \
                     FROM api_keys WHERE workspace_id = $1 ORDER BY id",
                )
                .bind(workspace.as_uuid())
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map($crate::sql::api_key_from_row)
                .collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn revoke_api_key(
                &self,
                workspace: keel_core::id::WorkspaceId,
                id: keel_core::id::ApiKeyId,
            ) -> $crate::Result<keel_core::auth::ApiKey> {
                let row = sqlx::query(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) \
                     WHERE workspace_id = $1 AND id = $2 \
                     RETURNING id, workspace_id, name, role, prefix, created_at, revoked_at, expires_at, scopes, models, last_used_at, tier",
                )
                .bind(workspace.as_uuid())
                .bind(id.as_uuid())
                .bind($crate::now())
                .fetch_optional(&self.writer)
                .await?
                .ok_or($crate::Error::NotFound { what: "API key" })?;
                $crate::sql::api_key_from_row(&row)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND, records = records.len()))]
            async fn insert_usage(&self, records: &[$crate::UsageRecord]) -> $crate::Result<()> {
                if records.is_empty() {
                    return Ok(());
                }
                let mut tx = self.writer.begin().await?;
                let records: Vec<&$crate::UsageRecord> = records.iter().collect();
                let mut g = $crate::sql::Gather::<$db>::new(Self::GATHERS_WRITES);
                Self::insert_usage_in(&mut *tx, &mut g, &records).await?;
                Self::run_gathered(&mut *tx, &mut g).await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn usage_summary(
                &self,
                workspace: keel_core::id::WorkspaceId,
                from: time::OffsetDateTime,
                to: time::OffsetDateTime,
                group_by: $crate::GroupBy,
            ) -> $crate::Result<Vec<$crate::UsageRow>> {
                use sqlx::Row as _;
                use $crate::usage::to_u64;
                let group = match group_by {
                    $crate::GroupBy::Route => "route",
                    $crate::GroupBy::Key => "api_key_id",
                    $crate::GroupBy::Model => "upstream_model",
                    $crate::GroupBy::Day => Self::DAY_EXPR,
                };
                let mut qb = sqlx::QueryBuilder::<$db>::new("SELECT ");
                qb.push(group).push(
                    " AS grp, COUNT(*) AS requests, \
                     CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
                     CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
                     CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached_tokens, \
                     CAST(COALESCE(SUM(cost_nanousd), 0) AS BIGINT) AS cost_nanousd, \
                     CAST(COALESCE(SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END), 0) AS BIGINT) AS cache_hits, \
                     CAST(COALESCE(SUM(CASE WHEN outcome <> 'ok' THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors \
                     FROM usage_records WHERE workspace_id = ",
                );
                qb.push_bind(workspace.as_uuid())
                    .push(" AND created_at >= ")
                    .push_bind(from)
                    .push(" AND created_at < ")
                    .push_bind(to)
                    .push(" GROUP BY grp ORDER BY grp");
                let rows = qb.build().fetch_all(&self.pool).await?;
                rows.iter()
                    .map(|row| {
                        let group = match group_by {
                            $crate::GroupBy::Key => row
                                .try_get::<Option<uuid::Uuid>, _>("grp")?
                                .map_or_else(|| "-".to_owned(), |u| keel_core::id::ApiKeyId::from_uuid(u).to_string()),
                            _ => row.try_get::<String, _>("grp")?,
                        };
                        Ok($crate::UsageRow {
                            group,
                            requests: to_u64(row.try_get("requests")?),
                            input_tokens: to_u64(row.try_get("input_tokens")?),
                            output_tokens: to_u64(row.try_get("output_tokens")?),
                            cached_tokens: to_u64(row.try_get("cached_tokens")?),
                            cost_nanousd: to_u64(row.try_get("cost_nanousd")?),
                            cache_hits: to_u64(row.try_get("cache_hits")?),
                            errors: to_u64(row.try_get("errors")?),
                        })
                    })
                    .collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND, events = events.len()))]
            async fn append_events(
                &self,
                events: &[keel_core::event::NewEvent],
            ) -> $crate::Result<Vec<keel_core::event::Event>> {
                if events.is_empty() {
                    return Ok(Vec::new());
                }
                let mut tx = self.writer.begin().await?;
                let committed = Self::append_events_tx(&mut tx, events).await?;
                tx.commit().await?;
                Ok(committed)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn events_after(
                &self,
                workspace: keel_core::id::WorkspaceId,
                after: i64,
                limit: u32,
            ) -> $crate::Result<Vec<keel_core::event::Event>> {
                sqlx::query(concat!(
                    "SELECT ",
                    $crate::events::event_columns!(),
                    " FROM events WHERE workspace_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ))
                    .bind(workspace.as_uuid())
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map($crate::events::event_from_row)
                    .collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn event_head(
                &self,
                workspace: keel_core::id::WorkspaceId,
            ) -> $crate::Result<$crate::EventHead> {
                use sqlx::Row as _;
                let row = sqlx::query("SELECT last_seq, pruned_through FROM event_heads WHERE workspace_id = $1")
                    .bind(workspace.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(match row {
                    Some(row) => $crate::EventHead {
                        last_seq: row.try_get("last_seq")?,
                        pruned_through: row.try_get("pruned_through")?,
                    },
                    None => $crate::EventHead::default(),
                })
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn prune_events(&self, cutoff: time::OffsetDateTime) -> $crate::Result<u64> {
                use sqlx::Row as _;
                // Seq order is commit order, so "older than the cutoff" is a prefix of each
                // workspace's log: delete through the newest old seq and record it.
                let heads = sqlx::query(
                    "SELECT workspace_id, MAX(seq) AS through FROM events WHERE created_at < $1 GROUP BY workspace_id",
                )
                .bind(cutoff)
                .fetch_all(&self.pool)
                .await?;
                let mut removed = 0u64;
                for head in heads {
                    let workspace: uuid::Uuid = head.try_get("workspace_id")?;
                    let through: i64 = head.try_get("through")?;
                    let mut tx = self.writer.begin().await?;
                    let done = sqlx::query("DELETE FROM events WHERE workspace_id = $1 AND seq <= $2")
                        .bind(workspace)
                        .bind(through)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(
                        "UPDATE event_heads SET pruned_through = $2 WHERE workspace_id = $1 AND pruned_through < $2",
                    )
                    .bind(workspace)
                    .bind(through)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    removed += done.rows_affected();
                }
                Ok(removed)
            }

            async fn listen_commits(&self) -> $crate::Result<Option<$crate::CommitStream>> {
                self.commit_stream().await
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn create_webhook(&self, w: $crate::NewWebhook) -> $crate::Result<$crate::Webhook> {
                let mut tx = self.writer.begin().await?;
                let head: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM event_heads WHERE workspace_id = $1")
                    .bind(w.workspace_id.as_uuid())
                    .fetch_optional(&mut *tx)
                    .await?;
                let stored = $crate::Webhook {
                    id: keel_core::id::WebhookId::new(),
                    workspace_id: w.workspace_id,
                    url: w.url,
                    types: w.types,
                    secret: w.secret,
                    description: w.description,
                    created_at: $crate::now(),
                    cursor_seq: head.unwrap_or(0),
                };
                sqlx::query(concat!("INSERT INTO webhooks (", $crate::webhooks::webhook_columns!(), ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"))
                    .bind(stored.id.as_uuid())
                    .bind(stored.workspace_id.as_uuid())
                    .bind(&stored.url)
                    .bind(&stored.types)
                    .bind(&stored.secret)
                    .bind(stored.description.as_deref())
                    .bind(stored.created_at)
                    .bind(stored.cursor_seq)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(stored)
            }

            async fn list_webhooks(&self, workspace: keel_core::id::WorkspaceId) -> $crate::Result<Vec<$crate::Webhook>> {
                sqlx::query(concat!("SELECT ", $crate::webhooks::webhook_columns!(), " FROM webhooks WHERE workspace_id = $1 ORDER BY id"))
                    .bind(workspace.as_uuid())
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map($crate::webhooks::webhook_from_row)
                    .collect()
            }

            async fn webhook(&self, workspace: keel_core::id::WorkspaceId, id: keel_core::id::WebhookId) -> $crate::Result<$crate::Webhook> {
                let row = sqlx::query(concat!("SELECT ", $crate::webhooks::webhook_columns!(), " FROM webhooks WHERE workspace_id = $1 AND id = $2"))
                    .bind(workspace.as_uuid())
                    .bind(id.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "webhook" })?;
                $crate::webhooks::webhook_from_row(&row)
            }

            async fn delete_webhook(&self, workspace: keel_core::id::WorkspaceId, id: keel_core::id::WebhookId) -> $crate::Result<()> {
                let mut tx = self.writer.begin().await?;
                sqlx::query("DELETE FROM webhook_deliveries WHERE workspace_id = $1 AND webhook_id = $2")
                    .bind(workspace.as_uuid())
                    .bind(id.as_uuid())
                    .execute(&mut *tx)
                    .await?;
                let done = sqlx::query("DELETE FROM webhooks WHERE workspace_id = $1 AND id = $2")
                    .bind(workspace.as_uuid())
                    .bind(id.as_uuid())
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::Error::NotFound { what: "webhook" });
                }
                tx.commit().await?;
                Ok(())
            }

            async fn all_webhooks(&self) -> $crate::Result<Vec<$crate::Webhook>> {
                sqlx::query(concat!("SELECT ", $crate::webhooks::webhook_columns!(), " FROM webhooks ORDER BY id"))
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map($crate::webhooks::webhook_from_row)
                    .collect()
            }

            async fn lease_webhook(
                &self,
                id: keel_core::id::WebhookId,
                owner: uuid::Uuid,
                until: time::OffsetDateTime,
            ) -> $crate::Result<bool> {
                let done = sqlx::query(
                    "UPDATE webhooks SET lease_owner = $2, lease_until = $3 \
                     WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $4)",
                )
                .bind(id.as_uuid())
                .bind(owner)
                .bind(until)
                .bind($crate::now())
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn advance_webhook(&self, id: keel_core::id::WebhookId, owner: uuid::Uuid, seq: i64) -> $crate::Result<bool> {
                let done = sqlx::query(
                    "UPDATE webhooks SET cursor_seq = $3 WHERE id = $1 AND lease_owner = $2 AND cursor_seq < $3",
                )
                .bind(id.as_uuid())
                .bind(owner)
                .bind(seq)
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn record_delivery(
                &self,
                d: &$crate::Delivery,
                events: &[keel_core::event::NewEvent],
            ) -> $crate::Result<Vec<keel_core::event::Event>> {
                let mut tx = self.writer.begin().await?;
                sqlx::query(concat!(
                    "INSERT INTO webhook_deliveries (", $crate::webhooks::delivery_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                ))
                .bind(d.id.as_uuid())
                .bind(d.webhook_id.as_uuid())
                .bind(d.workspace_id.as_uuid())
                .bind(d.event_seq)
                .bind(d.event_id.as_uuid())
                .bind(&d.event_type)
                .bind(d.attempt)
                .bind(d.outcome.as_str())
                .bind(d.status_code)
                .bind(d.error.as_deref())
                .bind(d.duration_ms)
                .bind(d.created_at)
                .execute(&mut *tx)
                .await?;
                let committed = if events.is_empty() {
                    Vec::new()
                } else {
                    Self::append_events_tx(&mut tx, events).await?
                };
                tx.commit().await?;
                Ok(committed)
            }

            async fn list_deliveries(
                &self,
                workspace: keel_core::id::WorkspaceId,
                webhook: keel_core::id::WebhookId,
                outcome: Option<$crate::Outcome>,
                after: Option<keel_core::id::DeliveryId>,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::Delivery>> {
                let mut qb = sqlx::QueryBuilder::<$db>::new(concat!("SELECT ", $crate::webhooks::delivery_columns!(), " FROM webhook_deliveries WHERE workspace_id = "));
                qb.push_bind(workspace.as_uuid()).push(" AND webhook_id = ").push_bind(webhook.as_uuid());
                if let Some(outcome) = outcome {
                    qb.push(" AND outcome = ").push_bind(outcome.as_str());
                }
                if let Some(after) = after {
                    qb.push(" AND id > ").push_bind(after.as_uuid());
                }
                qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
                qb.build()
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map($crate::webhooks::delivery_from_row)
                    .collect()
            }

            async fn delivery(
                &self,
                workspace: keel_core::id::WorkspaceId,
                webhook: keel_core::id::WebhookId,
                id: keel_core::id::DeliveryId,
            ) -> $crate::Result<$crate::Delivery> {
                let row = sqlx::query(concat!("SELECT ", $crate::webhooks::delivery_columns!(), " FROM webhook_deliveries WHERE workspace_id = $1 AND webhook_id = $2 AND id = $3"))
                    .bind(workspace.as_uuid())
                    .bind(webhook.as_uuid())
                    .bind(id.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "delivery" })?;
                $crate::webhooks::delivery_from_row(&row)
            }

            async fn lease_exporter(&self, name: &str, owner: uuid::Uuid, until: time::OffsetDateTime) -> $crate::Result<bool> {
                let done = sqlx::query(
                    "INSERT INTO exporters (name, lease_owner, lease_until) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET lease_owner = $2, lease_until = $3 \
                     WHERE exporters.lease_owner = $2 OR exporters.lease_until < $4",
                )
                .bind(name)
                .bind(owner)
                .bind(until)
                .bind($crate::now())
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn export_backlog(&self, name: &str) -> $crate::Result<Vec<$crate::ExportBacklog>> {
                use sqlx::Row as _;
                let rows = sqlx::query(
                    "SELECT h.workspace_id, COALESCE(c.seq, 0) AS exported, h.last_seq, h.pruned_through \
                     FROM event_heads h LEFT JOIN export_cursors c ON c.workspace_id = h.workspace_id AND c.name = $1 \
                     WHERE h.last_seq > COALESCE(c.seq, 0) ORDER BY h.workspace_id",
                )
                .bind(name)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok($crate::ExportBacklog {
                            workspace_id: keel_core::id::WorkspaceId::from_uuid(r.try_get("workspace_id")?),
                            exported: r.try_get("exported")?,
                            last_seq: r.try_get("last_seq")?,
                            pruned_through: r.try_get("pruned_through")?,
                        })
                    })
                    .collect()
            }

            async fn advance_export(&self, name: &str, workspace: keel_core::id::WorkspaceId, seq: i64) -> $crate::Result<()> {
                sqlx::query(
                    "INSERT INTO export_cursors (name, workspace_id, seq) VALUES ($1, $2, $3) \
                     ON CONFLICT (name, workspace_id) DO UPDATE SET seq = $3 WHERE export_cursors.seq < $3",
                )
                .bind(name)
                .bind(workspace.as_uuid())
                .bind(seq)
                .execute(&self.writer)
                .await?;
                Ok(())
            }

                        async fn close(&self) {
                self.writer.close().await;
                self.pool.close().await;
            }
        }

        impl $store {
            /// Runs what `g` holds (nothing when nothing waits) and returns the rows its
            /// statements returned.
            pub(crate) async fn run_gathered(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
            ) -> $crate::Result<Vec<<$db as sqlx::Database>::Row>> {
                let mut rows = std::mem::take(&mut g.early);
                g.seal();
                if !g.is_pending() {
                    return Ok(rows);
                }
                let persistent = g.take();
                let ran = g.qb.build().persistent(persistent).fetch_all(&mut *conn).await;
                // Reset also after an error: a caller may go on in the same transaction
                // (after rolling back to a savepoint).
                g.qb.reset();
                rows.extend(ran?);
                Ok(rows)
            }

            /// Makes room in `g` for a statement of `rows` rows (as padded) that the
            /// caller is about to write: see [`Gather::needs_room`]. What waits runs now,
            /// and the rows it returns are handed to the next [`run_gathered`]'s caller.
            pub(crate) async fn gather_room(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                rows: usize,
            ) -> $crate::Result<()> {
                if g.needs_room(rows) {
                    g.early = Self::run_gathered(conn, g).await?;
                }
                Ok(())
            }

            /// Appends `events` inside `tx` — the transaction of the state change that
            /// causes them, so the change and its events commit together or not at all.
            pub(crate) async fn append_events_tx(
                tx: &mut sqlx::Transaction<'_, $db>,
                events: &[keel_core::event::NewEvent],
            ) -> $crate::Result<Vec<keel_core::event::Event>> {
                let mut g = $crate::sql::Gather::<$db>::new(Self::GATHERS_WRITES);
                Self::append_events_gathered(&mut **tx, &mut g, events, false).await
            }

            /// Appends `events` after the writes waiting in `g`, runs them all, and returns
            /// the events as stored (in the order given).
            ///
            /// A workspace's `event_heads` row, locked by its bump until the transaction
            /// ends, serialises the workspace's appends (seq order is commit order), so a
            /// caller appends last, just before it commits. With `commit`, the transaction
            /// (begun by hand, not by sqlx) commits in the same round trip as the last
            /// writes.
            pub(crate) async fn append_events_gathered(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                events: &[keel_core::event::NewEvent],
                commit: bool,
            ) -> $crate::Result<Vec<keel_core::event::Event>> {
                use sqlx::Row as _;
                // One workspace at a time, in id order, so concurrent appenders lock
                // `event_heads` rows in the same order and cannot deadlock.
                let mut order: Vec<(usize, &keel_core::event::NewEvent)> = events.iter().enumerate().collect();
                order.sort_by_key(|(_, e)| e.workspace_id);
                let mut made = $crate::events::stamped(events);
                let mut returned = Vec::new();
                for group in order.chunk_by(|a, b| a.1.workspace_id == b.1.workspace_id) {
                    for chunk in group.chunks($crate::sql::chunk_rows(Self::GATHERS_WRITES, $crate::events::EVENT_BATCH)) {
                        let chunk: Vec<&keel_core::event::Event> = chunk.iter().map(|(i, _)| &made[*i]).collect();
                        Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(chunk.len())).await?;
                        Self::push_event_chunk(g, &chunk);
                        if g.end($crate::sql::padded_rows(chunk.len())) {
                            returned.extend(Self::run_gathered(&mut *conn, g).await?);
                        }
                    }
                }
                if commit {
                    g.qb.push("COMMIT");
                    // Gathered, it waits for this run; alone, it is this run.
                    let _ = g.end(0);
                }
                returned.extend(Self::run_gathered(&mut *conn, g).await?);
                let mut seqs: std::collections::HashMap<uuid::Uuid, i64> = std::collections::HashMap::with_capacity(returned.len());
                for row in &returned {
                    seqs.insert(row.try_get("event_id")?, row.try_get("seq")?);
                }
                for e in &mut made {
                    e.seq = seqs
                        .get(&e.event_id.as_uuid())
                        .copied()
                        .ok_or_else(|| $crate::Error::Corrupt { what: "event", detail: "an appended event came back without its seq".to_owned() })?;
                }
                Ok(made)
            }

            /// Writes the append of one workspace's events (at most `EVENT_BATCH`) into `g`:
            /// the bump of its head, the insert numbered from it, and (where other
            /// instances listen) the commit's announcement; it returns each event's id and
            /// seq. On Postgres it is one statement, so the head's lock is held for that
            /// statement and the commit, not for a round trip each; on SQLite two, gathered.
            fn push_event_chunk(g: &mut $crate::sql::Gather<$db>, events: &[&keel_core::event::Event]) {
                let Some(workspace) = events.first().map(|e| e.workspace_id.as_uuid()) else {
                    return;
                };
                let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
                let qb = &mut g.qb;
                if Self::ANNOUNCES_COMMITS {
                    Self::push_announced_append(qb, workspace, n, None);
                    qb.push(" FROM head CROSS JOIN announced CROSS JOIN (");
                } else {
                    qb.push("INSERT INTO event_heads (workspace_id, last_seq) VALUES (")
                        .push_bind(workspace)
                        .push(", ")
                        .push_bind(n)
                        .push(") ON CONFLICT (workspace_id) DO UPDATE SET last_seq = event_heads.last_seq + excluded.last_seq;\n");
                    qb.push("INSERT INTO events (")
                        .push($crate::events::event_columns!())
                        .push(") SELECT v.column1, (SELECT last_seq FROM event_heads WHERE workspace_id = ")
                        .push_bind(workspace)
                        .push(") - ")
                        .push_bind(n)
                        .push(" + v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8, v.column9, v.column10, v.column11 FROM (");
                }
                Self::push_event_values(qb, events);
                qb.push(") AS v WHERE v.column2 IS NOT NULL RETURNING event_id, seq");
            }

            /// Postgres: the start of one workspace's append of `n` events — the bump of
            /// its head (`head`, returning the new `last_seq`), the commit's announcement
            /// (`announced`) and `INSERT INTO events (…) SELECT` up to the list of sources,
            /// which the caller writes. Without `gate` it opens the statement's `WITH`, and
            /// the insert is the statement; with one it continues a `WITH` list, the
            /// insert is CTE `stored` (the caller closes its parenthesis), and the head
            /// moves (and events are stored) only if CTE `gate` yields a row.
            fn push_announced_append(
                qb: &mut sqlx::QueryBuilder<$db>,
                workspace: uuid::Uuid,
                n: i64,
                gate: Option<&str>,
            ) {
                match gate {
                    None => qb
                        .push("WITH head AS (INSERT INTO event_heads (workspace_id, last_seq) VALUES (")
                        .push_bind(workspace)
                        .push(", ")
                        .push_bind(n)
                        .push(")"),
                    Some(gate) => qb
                        .push(", head AS (INSERT INTO event_heads (workspace_id, last_seq) SELECT ")
                        .push_bind(workspace)
                        .push(", ")
                        .push_bind(n)
                        .push(" FROM ")
                        .push(gate),
                };
                qb.push(
                    " ON CONFLICT (workspace_id) DO UPDATE SET last_seq = event_heads.last_seq + EXCLUDED.last_seq \
                     RETURNING last_seq), announced AS (SELECT pg_notify('keel_events', ",
                )
                .push_bind(workspace.simple().to_string())
                .push(if gate.is_some() {
                    " || ':' || last_seq) FROM head), stored AS (INSERT INTO events ("
                } else {
                    " || ':' || last_seq) FROM head) INSERT INTO events ("
                })
                .push($crate::events::event_columns!())
                .push(") SELECT v.column1, head.last_seq - ")
                .push_bind(n)
                .push(" + v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8, v.column9, v.column10, v.column11");
            }

            /// Writes the rows of `events` (padded) as the `VALUES` list the insert of
            /// [`Self::push_announced_append`] or its SQLite twin reads (`v.column1` …),
            /// the `k`-th numbered `k` from 1.
            fn push_event_values(qb: &mut sqlx::QueryBuilder<$db>, events: &[&keel_core::event::Event]) {
                qb.push_values((1i64..).zip($crate::sql::padded(events)), |mut row, (k, e)| {
                    row.push_bind(e.map(|e| e.workspace_id.as_uuid()))
                        .push_bind(e.map(|_| k))
                        .push_bind(e.map(|e| e.event_id.as_uuid()))
                        .push_bind(e.map(|e| e.event_type.clone()))
                        .push_bind(e.map(|e| e.version.clone()))
                        .push_bind(e.map(|e| e.timestamp))
                        .push_bind(e.and_then(|e| e.correlation_id.clone()))
                        .push_bind(e.and_then(|e| e.agent_id.map(|id| id.as_uuid())))
                        .push_bind(e.and_then(|e| e.task_id.map(|id| id.as_uuid())))
                        .push_bind(e.and_then(|e| e.run_id.map(|id| id.as_uuid())))
                        .push_bind(e.map(|e| e.data.to_string()));
                });
            }
        }
    };
}

pub(crate) use sql_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gathered_query_makes_room_before_it_would_outgrow_its_prepared_length() {
        let mut g = Gather::<sqlx::Sqlite>::new(true);
        // A BEGIN waiting alone never makes room, even before a statement too long to keep.
        assert!(!g.end(0));
        assert!(!g.needs_room(padded_rows(100)));
        assert!(!g.end(16));
        assert!(!g.end(16));
        assert!(!g.needs_room(32), "32 + 32 rows still fit");
        assert!(g.needs_room(64), "32 + 64 rows would not");
        assert!(!g.needs_room(0), "a COMMIT rides with what waits");
        assert!(g.take(), "what waits is kept prepared");
        assert!(!g.needs_room(64), "nothing waits after a run");
        let apart = Gather::<sqlx::Sqlite>::new(false);
        assert!(
            !apart.needs_room(1_000),
            "statements run one by one need no room"
        );
    }

    #[test]
    fn multi_row_writes_are_chunked_to_the_prepared_length_only_where_gathered() {
        assert_eq!(chunk_rows(true, 500), PREPARED_ROWS);
        assert_eq!(chunk_rows(false, 500), 500);
        assert!(persistent(padded_rows(chunk_rows(true, 500))));
        assert!(!persistent(padded_rows(chunk_rows(false, 500))));
    }
}
