//! Test support for Keel's crates (feature `testing`, never in the binary): a fresh
//! Postgres database per test, so tests run in parallel without seeing each other.
//!
//! The server is `KEEL_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! When it cannot be reached the helpers fail loudly; Postgres tests are skipped only when
//! `KEEL_TEST_POSTGRES=skip` is set explicitly.

use std::str::FromStr;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// The Postgres server tests use.
#[must_use]
pub fn admin_url() -> String {
    std::env::var("KEEL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Whether Postgres tests were explicitly turned off.
#[must_use]
pub fn postgres_skipped() -> bool {
    std::env::var("KEEL_TEST_POSTGRES").is_ok_and(|v| v == "skip")
}

/// Prefix of every database the tests create; `scripts/test` drops leftovers by it.
pub const DB_PREFIX: &str = "keel_test_";

/// Creates an empty database and returns its URL, or `None` when Postgres tests are
/// skipped. An unreachable server is an error that says how to fix or skip.
pub async fn fresh_postgres_db() -> Result<Option<String>, String> {
    if postgres_skipped() {
        return Ok(None);
    }
    let admin = admin_url();
    let options = PgConnectOptions::from_str(&admin)
        .map_err(|e| format!("bad KEEL_TEST_POSTGRES_URL {admin}: {e}"))?;
    let mut conn = PgConnection::connect_with(&options).await.map_err(|e| {
        format!(
            "Postgres for tests is not reachable at {admin}: {e}. Start it (see README), point \
             KEEL_TEST_POSTGRES_URL at one, or set KEEL_TEST_POSTGRES=skip to skip Postgres tests"
        )
    })?;
    let name = format!("{DB_PREFIX}{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} TEMPLATE template0"
    )))
    .execute(&mut conn)
    .await
    .map_err(|e| format!("cannot create test database {name}: {e}"))?;
    let _ = conn.close().await;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => {
            return Err(format!(
                "KEEL_TEST_POSTGRES_URL {admin} has no database path"
            ));
        }
    };
    Ok(Some(url))
}
