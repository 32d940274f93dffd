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
    })
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
/// a `pool` field and `BACKEND`, `MIGRATOR`, `HAS_MIGRATIONS_TABLE` and `DAY_EXPR`
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
                    .execute(&self.pool)
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
                    .execute(&self.pool)
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
                };
                sqlx::query(
                    "INSERT INTO api_keys (id, workspace_id, name, role, prefix, key_hash, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(stored.id.as_uuid())
                .bind(stored.workspace_id.as_uuid())
                .bind(stored.name.as_ref().map(|n| n.as_str()))
                .bind(stored.role.as_str())
                .bind(&stored.prefix)
                .bind(key.hash.as_str())
                .bind(stored.created_at)
                .execute(&self.pool)
                .await
                .map_err($crate::sql::conflict_as("API key"))?;
                Ok(stored)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn authenticate(
                &self,
                hash: &keel_core::auth::KeyHash,
            ) -> $crate::Result<Option<keel_core::auth::Principal>> {
                let row = sqlx::query("SELECT id, workspace_id, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
                    .bind(hash.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok(None) };
                use sqlx::Row as _;
                let role: String = row.try_get("role")?;
                Ok(Some(keel_core::auth::Principal {
                    key_id: keel_core::id::ApiKeyId::from_uuid(row.try_get("id")?),
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    role: role.parse().map_err(|e: keel_core::Error| $crate::Error::Corrupt {
                        what: "key role",
                        detail: e.to_string(),
                    })?,
                }))
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn list_api_keys(
                &self,
                workspace: keel_core::id::WorkspaceId,
            ) -> $crate::Result<Vec<keel_core::auth::ApiKey>> {
                sqlx::query(
                    "SELECT id, workspace_id, name, role, prefix, created_at, revoked_at \
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
                     RETURNING id, workspace_id, name, role, prefix, created_at, revoked_at",
                )
                .bind(workspace.as_uuid())
                .bind(id.as_uuid())
                .bind($crate::now())
                .fetch_optional(&self.pool)
                .await?
                .ok_or($crate::Error::NotFound { what: "API key" })?;
                $crate::sql::api_key_from_row(&row)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND, records = records.len()))]
            async fn insert_usage(&self, records: &[$crate::UsageRecord]) -> $crate::Result<()> {
                use $crate::usage::to_i64;
                if records.is_empty() {
                    return Ok(());
                }
                let mut tx = self.pool.begin().await?;
                for batch in records.chunks($crate::sql::USAGE_BATCH) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO usage_records (id, workspace_id, api_key_id, route, provider, upstream_model, \
                         target, input_tokens, output_tokens, cached_tokens, cost_nanousd, latency_ms, ttft_ms, \
                         cache_hit, estimated, outcome, created_at) ",
                    );
                    qb.push_values(batch, |mut row, r| {
                        row.push_bind(uuid::Uuid::now_v7())
                            .push_bind(r.workspace_id.as_uuid())
                            .push_bind(r.api_key_id.map(|k| k.as_uuid()))
                            .push_bind(r.route.clone())
                            .push_bind(r.provider.clone())
                            .push_bind(r.upstream_model.clone())
                            .push_bind(r.target.clone())
                            .push_bind(to_i64(r.input_tokens))
                            .push_bind(to_i64(r.output_tokens))
                            .push_bind(to_i64(r.cached_tokens))
                            .push_bind(to_i64(r.cost_nanousd))
                            .push_bind(to_i64(r.latency_ms))
                            .push_bind(r.ttft_ms.map(to_i64))
                            .push_bind(r.cache_hit)
                            .push_bind(r.estimated)
                            .push_bind(r.outcome.clone())
                            .push_bind(r.created_at);
                    });
                    qb.build().execute(&mut *tx).await?;
                }
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
                            cost_nanousd: to_u64(row.try_get("cost_nanousd")?),
                            cache_hits: to_u64(row.try_get("cache_hits")?),
                            errors: to_u64(row.try_get("errors")?),
                        })
                    })
                    .collect()
            }

            async fn close(&self) {
                self.pool.close().await;
            }
        }
    };
}

pub(crate) use sql_store;
