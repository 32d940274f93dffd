//! Embedded, forward-only migrations and the schema-version check that keeps an older
//! binary off a newer database.

use sqlx::migrate::Migrator;

/// Migrations for the embedded SQLite backend.
pub(crate) static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
/// Migrations for the Postgres backend.
pub(crate) static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// How the database's schema compares with this binary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaState {
    /// Highest migration applied to the database (0 for a fresh one).
    pub database: i64,
    /// Highest migration embedded in this binary.
    pub binary: i64,
}

impl SchemaState {
    /// Whether the database is exactly at this binary's schema.
    #[must_use]
    pub fn is_current(&self) -> bool {
        self.database == self.binary
    }
}

pub(crate) fn latest(migrator: &Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}
