//! The Postgres backend, for several Keel instances sharing one database. The pool
//! reconnects by itself: when the server goes away, queries fail fast with
//! `Error::Unavailable` (bounded by `database.acquire_timeout`) and succeed again once it
//! is back, without a restart.

use std::str::FromStr;

use keel_core::config::Database;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::{Backend, Error, Result};

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
}

crate::sql::sql_store!(PgStore, sqlx::Postgres);
