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
/// a `pool` field and `BACKEND`, `MIGRATOR` and `HAS_MIGRATIONS_TABLE` constants.
macro_rules! sql_store {
    ($store:ty) => {
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

            async fn close(&self) {
                self.pool.close().await;
            }
        }
    };
}

pub(crate) use sql_store;
