//! The Postgres backend, for several Keel instances sharing one database. The pool
//! reconnects by itself: when the server goes away, queries fail fast with
//! `Error::Unavailable` (bounded by `database.acquire_timeout`) and succeed again once it
//! is back, without a restart.

use std::str::FromStr;

use keel_core::config::Database;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};

use crate::{Backend, Commit, Error, Result};

/// A store on a Postgres database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to the database at `url`.
    pub async fn connect(url: &SecretString, config: &Database) -> Result<Self> {
        let options = PgConnectOptions::from_str(url.expose_secret())
            .map_err(|e| Error::BadUrl(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(true)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    const BACKEND: Backend = Backend::Postgres;
    const MIGRATOR: &'static sqlx::migrate::Migrator = &crate::migrate::POSTGRES;
    const HAS_MIGRATIONS_TABLE: &'static str = "SELECT to_regclass('_sqlx_migrations') IS NOT NULL";
    /// The UTC day of `created_at`.
    const DAY_EXPR: &'static str = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')";
    /// Announces a commit to every instance listening (delivered at commit, not before).
    const NOTIFY_SQL: Option<&'static str> = Some("SELECT pg_notify('keel_events', $1)");

    /// Follows `NOTIFY keel_events` on a dedicated connection. When the connection drops,
    /// the stream yields [`Commit::Resync`] and reconnects (notifications sent meanwhile
    /// are lost, so followers re-read the log).
    async fn commit_stream(&self) -> Result<Option<crate::CommitStream>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(crate::events::NOTIFY_CHANNEL).await?;
        let stream = futures_util::stream::unfold(listener, |mut listener| async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => {
                        if let Some(commit) = crate::events::parse_notification(n.payload()) {
                            return Some((commit, listener));
                        }
                    }
                    // The connection dropped; the next `try_recv` reconnects.
                    Ok(None) => return Some((Commit::Resync, listener)),
                    Err(sqlx::Error::PoolClosed) => return None,
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener cannot reconnect; retrying in 1 s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Some(Box::pin(stream)))
    }
}

crate::sql::sql_store!(PgStore, sqlx::Postgres);
