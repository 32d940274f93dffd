//! The store's one error type. Callers branch on the kind (not found, conflict, database
//! unavailable) and never on database-specific codes.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thing asked for does not exist (in the workspace asked about).
    #[error("{what} not found")]
    NotFound {
        /// What was looked up.
        what: &'static str,
    },
    /// A uniqueness rule would be broken.
    #[error("{what} already exists")]
    Conflict {
        /// What already exists.
        what: &'static str,
    },
    /// The thing is not in a state that allows the operation (e.g. input to a task that is
    /// not waiting for any).
    #[error("{what} is {state}")]
    State {
        /// What was acted on, e.g. "task".
        what: &'static str,
        /// The state it is in, as a phrase ("completed, not waiting for input").
        state: String,
    },
    /// The database cannot be reached or has no free connection; worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database has migrations this binary does not know: it was upgraded by a newer
    /// Keel. Running an older binary against it could corrupt data.
    #[error(
        "database schema is at version {database}, newer than this binary knows ({binary}); \
         run a Keel release at least as new as the one that migrated it"
    )]
    SchemaTooNew {
        /// Highest version applied to the database.
        database: i64,
        /// Highest version embedded in this binary.
        binary: i64,
    },
    /// A migration failed to apply.
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// A stored value could not be read back into its domain type.
    #[error("stored {what} is invalid: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it did not parse.
        detail: String,
    },
    /// `database.url` is not a usable Postgres URL.
    #[error("database.url is not a valid Postgres URL: {0}")]
    BadUrl(String),
    /// The data directory could not be prepared.
    #[error("cannot prepare data directory {path}: {cause}")]
    DataDir {
        /// The directory.
        path: String,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// Any other database error.
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl Error {
    /// Whether retrying later may succeed (the database is down or saturated).
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Migrate(e)
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // Protocol: a connection cut mid-exchange (e.g. during the TLS handshake) —
            // the database went away, not a bug in the query.
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Error::Unavailable(e),
            e => Error::Database(e),
        }
    }
}

/// The store result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
