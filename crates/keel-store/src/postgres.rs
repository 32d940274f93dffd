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
    /// The same pool: Postgres takes concurrent writers.
    writer: PgPool,
    /// The queue's depth for admission (shared by the clones).
    queue: std::sync::Arc<crate::admission::QueueGauge>,
    /// Unused here: Postgres takes concurrent writers (see `creations.rs`).
    creations: std::sync::Arc<crate::creations::Creations>,
}

/// The claim's `UPDATE … RETURNING ` (the columns follow), shared by `CLAIM_SQL` and
/// `CLAIM_AT_ONCE_SQL`.
macro_rules! claim_update {
    () => {
        "UPDATE tasks SET lease_owner = $1, lease_until = $2 WHERE id IN (SELECT id FROM tasks \
         WHERE queued AND run_at <= $3 AND (lease_until IS NULL OR lease_until < $3) AND agent_id NOT IN (SELECT a.id FROM agents a WHERE a.max_concurrency IS NOT NULL \
         AND a.max_concurrency <= (SELECT count(*) FROM tasks r WHERE r.agent_id = a.id AND r.lease_owner IS NOT NULL AND r.lease_until >= $3)) \
         ORDER BY priority DESC, vt, id LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING "
    };
}

/// How long a pooled connection may sit idle before it is pinged on its next use.
const PING_IF_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

impl PgStore {
    /// Connects to the database at `url`.
    pub async fn connect(url: &SecretString, config: &Database) -> Result<Self> {
        // Every statement Keel sends is prepared once per connection and then executed
        // with new parameters; none of them filters on an optional parameter (`$n IS NULL
        // OR ...`), so one generic plan serves every execution. Left to `auto`, Postgres
        // re-plans the hot statements (the claim, the checkpoint batch's writes) at every
        // execution, because their custom plans look cheaper than the generic one: about a
        // tenth of its CPU in the 64-run benchmark, and on a table not yet analysed the
        // claim's custom plan was a sequential scan where the generic one walks the queue
        // index (docs/BENCHMARKS.md, "Agent runtime").
        //
        // A generic plan does not know a `LIMIT $n` (the planner assumes a tenth of the
        // rows) nor how many queued tasks a `run_at <= $n` keeps, so with the default
        // random_page_cost of 4 the claim's plan was, on some connections, a sequential
        // scan and sort of every queued task (~2–7 ms a claim at a few thousand tasks,
        // growing with the queue) instead of a walk of the queue index that stops after the
        // first few (~0.1 ms). Keel's working set is cached (SSD or RAM), which is what a
        // random_page_cost near 1 says; with it the index walk wins whatever the table's size.
        let options = PgConnectOptions::from_str(url.expose_secret())
            .map_err(|e| Error::BadUrl(e.to_string()))?
            .options([
                ("plan_cache_mode", "force_generic_plan"),
                ("random_page_cost", "1.1"),
            ]);
        // A connection is pinged before use only after it has sat idle for a while (a
        // server restart or a dropped socket shows there): one in steady use has just
        // proven itself, and a ping before every use is one more round trip per statement
        // or transaction.
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self {
            writer: pool.clone(),
            pool,
            queue: std::sync::Arc::default(),
            creations: std::sync::Arc::default(),
        })
    }

    const BACKEND: Backend = Backend::Postgres;
    const MIGRATOR: &'static sqlx::migrate::Migrator = &crate::migrate::POSTGRES;
    const HAS_MIGRATIONS_TABLE: &'static str = "SELECT to_regclass('_sqlx_migrations') IS NOT NULL";
    /// The UTC day of `created_at`.
    const DAY_EXPR: &'static str = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')";
    /// A task's duration, created → finished, in whole milliseconds.
    const DURATION_MS_EXPR: &'static str =
        "CAST(round(EXTRACT(EPOCH FROM (finished_at - created_at)) * 1000) AS BIGINT)";
    /// Each append announces its commit to every instance listening (`pg_notify` on
    /// `keel_events`, delivered at commit, not before), in the append's own statement.
    const ANNOUNCES_COMMITS: bool = true;
    /// One statement per prepared query.
    const GATHERS_WRITES: bool = false;
    /// Data-modifying CTEs: a checkpoint batch's thread update hands its messages their
    /// seqs in the same statement (the update as a CTE whose `RETURNING next_seq` the
    /// insert counts back from), and its step and usage inserts ride as CTEs in that
    /// statement, before the events' append takes the event head (see
    /// `Gather::chaining_writes`).
    const CHAINS_WRITES: bool = true;

    /// Follows `NOTIFY keel_events` on a dedicated connection. When the connection drops,
    /// the stream yields [`Commit::Resync`] and reconnects (notifications sent meanwhile
    /// are lost, so followers re-read the log).
    /// Leases the next runnable tasks (highest priority, then lowest virtual time).
    const CLAIM_SQL: &'static str = concat!(claim_update!(), crate::runtime::task_columns!());
    /// [`Self::CLAIM_SQL`] with the queue's clock moved to the latest virtual time
    /// claimed, in one statement; each row says whether its agent has a concurrency limit
    /// (`agent_limited`) and how many messages its thread holds (`thread_next_seq`: none
    /// spares a new run the read of the thread's earlier turns).
    const CLAIM_AT_ONCE_SQL: &'static str = concat!(
        "WITH claimed AS (",
        claim_update!(),
        crate::runtime::task_columns!(),
        "), clock AS (UPDATE queue_clock SET vt = GREATEST(vt, (SELECT max(vt) FROM claimed)) WHERE id = 1 AND EXISTS (SELECT 1 FROM claimed)) \
         SELECT claimed.*, a.max_concurrency IS NOT NULL AS agent_limited, th.next_seq AS thread_next_seq \
         FROM claimed JOIN agents a ON a.id = claimed.agent_id JOIN threads th ON th.id = claimed.thread_id"
    );
    /// Claims in one statement (see `claim_tasks`).
    const CLAIMS_AT_ONCE: bool = true;
    /// Gives a new task of workspace `$1` its virtual time: one past the later of its
    /// lane's last and the queue's clock.
    const LANE_SQL: &'static str = "INSERT INTO queue_lanes (workspace_id, last_vt) \
         VALUES ($1, (SELECT vt FROM queue_clock WHERE id = 1) + 1) ON CONFLICT (workspace_id) DO UPDATE \
         SET last_vt = GREATEST(queue_lanes.last_vt, (SELECT vt FROM queue_clock WHERE id = 1)) + 1 RETURNING last_vt";
    /// Locks the rows a subquery selects (in its order) for an update to follow.
    /// Locks a refresh token and its session (aliases `r`, `s`) for a rotation.
    const LOCK_ROWS_OF_R: &'static str = " FOR UPDATE OF r, s";
    const LOCK_ROWS: &'static str = " FOR UPDATE";
    /// Moves the queue's clock to the virtual time of the tasks just started.
    const CLOCK_SQL: &'static str = "UPDATE queue_clock SET vt = GREATEST(vt, $1) WHERE id = 1";
    /// A task is created in one statement (see `create_task_at_once`).
    const CREATES_AT_ONCE: bool = true;

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
crate::runtime::runtime_store!(PgStore, sqlx::Postgres);
crate::security::security_store!(PgStore, sqlx::Postgres);
crate::budgets::budget_store!(PgStore, sqlx::Postgres);

#[cfg(test)]
mod tests {
    use super::*;

    /// The hot statements keep one plan per connection; `auto` re-planned them at every
    /// execution (see `PgStore::connect`).
    #[tokio::test]
    async fn connections_keep_one_generic_plan_per_statement() {
        let Some(url) = crate::testing::fresh_postgres_db().await.unwrap() else {
            return;
        };
        let store = PgStore::connect(&SecretString::from(url), &Database::default())
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "force_generic_plan");
    }
}
