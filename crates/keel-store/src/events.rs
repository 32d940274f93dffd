//! The event log's storage types. The log itself is written through
//! [`Store::append_events`](crate::Store::append_events) — or, for a state change and the
//! events it causes, inside the change's own transaction — and read back by seq.

use keel_core::event::Event;
use keel_core::id::{AgentId, EventId, RunId, TaskId, WorkspaceId};
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Result;

/// Events per INSERT statement (11 parameters each).
pub(crate) const EVENT_BATCH: usize = 500;

/// The Postgres NOTIFY channel a commit to the log is announced on, with payload
/// `<workspace uuid, simple form>:<last seq>`.
pub const NOTIFY_CHANNEL: &str = "keel_events";

/// Where a workspace's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventHead {
    /// The seq of the newest event (0 for an empty log).
    pub last_seq: i64,
    /// Every event up to and including this seq has been removed by retention (0 if none).
    pub pruned_through: i64,
}

impl EventHead {
    /// The oldest seq still held (`pruned_through + 1`).
    #[must_use]
    pub const fn oldest_held(&self) -> i64 {
        self.pruned_through + 1
    }
}

/// A commit somebody (this process or another) made to a workspace's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The workspace's log now reaches `last_seq`.
    Appended {
        /// The workspace.
        workspace_id: WorkspaceId,
        /// Its newest seq.
        last_seq: i64,
    },
    /// The listener lost its connection and reconnected: notifications may have been
    /// missed, so every follower should look at the log again.
    Resync,
}

/// Parses a NOTIFY payload.
pub(crate) fn parse_notification(payload: &str) -> Option<Commit> {
    let (ws, seq) = payload.split_once(':')?;
    Some(Commit::Appended {
        workspace_id: WorkspaceId::from_uuid(Uuid::try_parse(ws).ok()?),
        last_seq: seq.parse().ok()?,
    })
}

pub(crate) fn event_from_row<R: Row>(row: &R) -> Result<Event>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Uuid: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<Uuid>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> OffsetDateTime: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let data: String = row.try_get("data")?;
    // Stored older versions are read in the current shape.
    Ok(keel_core::event::upcast(Event {
        event_id: EventId::from_uuid(row.try_get("event_id")?),
        event_type: row.try_get("event_type")?,
        timestamp: row.try_get("created_at")?,
        seq: row.try_get("seq")?,
        correlation_id: row.try_get("correlation_id")?,
        workspace_id: WorkspaceId::from_uuid(row.try_get("workspace_id")?),
        agent_id: row
            .try_get::<Option<Uuid>, _>("agent_id")?
            .map(AgentId::from_uuid),
        task_id: row
            .try_get::<Option<Uuid>, _>("task_id")?
            .map(TaskId::from_uuid),
        run_id: row
            .try_get::<Option<Uuid>, _>("run_id")?
            .map(RunId::from_uuid),
        data: serde_json::from_str(&data).map_err(|e| crate::Error::Corrupt {
            what: "event data",
            detail: e.to_string(),
        })?,
        version: row.try_get("version")?,
    }))
}

/// `events` as they are stored, stamped now, with their ids and no seq yet (0).
pub(crate) fn stamped(events: &[keel_core::event::NewEvent]) -> Vec<Event> {
    let now = crate::now();
    events
        .iter()
        .map(|e| Event {
            event_id: EventId::new(),
            event_type: e.event_type.as_str().to_owned(),
            timestamp: now,
            seq: 0,
            correlation_id: e.correlation_id.clone(),
            workspace_id: e.workspace_id,
            agent_id: e.agent_id,
            task_id: e.task_id,
            run_id: e.run_id,
            data: e.data.clone(),
            version: e.event_type.version().to_owned(),
        })
        .collect()
}

/// The `events` columns, in insert order (a macro so queries stay static strings).
macro_rules! event_columns {
    () => {
        "workspace_id, seq, event_id, event_type, version, created_at, correlation_id, agent_id, task_id, run_id, data"
    };
}
pub(crate) use event_columns;
