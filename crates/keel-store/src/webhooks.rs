//! Webhook subscriptions and their delivery log, as stored.

use keel_core::id::{DeliveryId, EventId, WebhookId, WorkspaceId};
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Result;

/// A subscription to be stored.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    /// Its workspace.
    pub workspace_id: WorkspaceId,
    /// Where events are POSTed (already checked: http(s), not private unless allowed).
    pub url: String,
    /// The type filter, as given (`*` for all).
    pub types: String,
    /// The signing secret, `whsec_<base64>`.
    pub secret: String,
    /// A label.
    pub description: Option<String>,
}

/// A stored subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Its id.
    pub id: WebhookId,
    /// Its workspace.
    pub workspace_id: WorkspaceId,
    /// Where events are POSTed.
    pub url: String,
    /// The type filter.
    pub types: String,
    /// The signing secret.
    pub secret: String,
    /// A label.
    pub description: Option<String>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// Every event up to this seq has been delivered or dead-lettered.
    pub cursor_seq: i64,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered 2xx.
    Delivered,
    /// It failed; another attempt follows.
    Failed,
    /// It failed and was the last attempt: the event is dead-lettered for this webhook.
    DeadLettered,
}

impl Outcome {
    /// The stored and wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::DeadLettered => "dead_lettered",
        }
    }

    /// Parses a stored or wire name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "delivered" => Some(Outcome::Delivered),
            "failed" => Some(Outcome::Failed),
            "dead_lettered" => Some(Outcome::DeadLettered),
            _ => None,
        }
    }
}

/// One delivery attempt, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its id.
    pub id: DeliveryId,
    /// The webhook.
    pub webhook_id: WebhookId,
    /// Its workspace.
    pub workspace_id: WorkspaceId,
    /// The event's seq.
    pub event_seq: i64,
    /// The event's id (the `webhook-id` header).
    pub event_id: EventId,
    /// The event's type.
    pub event_type: String,
    /// 1 for the first attempt.
    pub attempt: i64,
    /// How it ended.
    pub outcome: Outcome,
    /// The endpoint's status, if it answered.
    pub status_code: Option<i64>,
    /// What went wrong.
    pub error: Option<String>,
    /// How long the attempt took.
    pub duration_ms: i64,
    /// When it was made.
    pub created_at: OffsetDateTime,
}

pub(crate) fn webhook_from_row<R: Row>(row: &R) -> Result<Webhook>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Uuid: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> OffsetDateTime: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Webhook {
        id: WebhookId::from_uuid(row.try_get("id")?),
        workspace_id: WorkspaceId::from_uuid(row.try_get("workspace_id")?),
        url: row.try_get("url")?,
        types: row.try_get("types")?,
        secret: row.try_get("secret")?,
        description: row.try_get("description")?,
        created_at: row.try_get("created_at")?,
        cursor_seq: row.try_get("cursor_seq")?,
    })
}

pub(crate) fn delivery_from_row<R: Row>(row: &R) -> Result<Delivery>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Uuid: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> OffsetDateTime: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let outcome: String = row.try_get("outcome")?;
    Ok(Delivery {
        id: DeliveryId::from_uuid(row.try_get("id")?),
        webhook_id: WebhookId::from_uuid(row.try_get("webhook_id")?),
        workspace_id: WorkspaceId::from_uuid(row.try_get("workspace_id")?),
        event_seq: row.try_get("event_seq")?,
        event_id: EventId::from_uuid(row.try_get("event_id")?),
        event_type: row.try_get("event_type")?,
        attempt: row.try_get("attempt")?,
        outcome: Outcome::parse(&outcome).ok_or(crate::Error::Corrupt {
            what: "delivery outcome",
            detail: outcome.clone(),
        })?,
        status_code: row.try_get("status_code")?,
        error: row.try_get("error")?,
        duration_ms: row.try_get("duration_ms")?,
        created_at: row.try_get("created_at")?,
    })
}

/// The `webhooks` columns.
macro_rules! webhook_columns {
    () => {
        "id, workspace_id, url, types, secret, description, created_at, cursor_seq"
    };
}
pub(crate) use webhook_columns;

/// The `webhook_deliveries` columns.
macro_rules! delivery_columns {
    () => {
        "id, webhook_id, workspace_id, event_seq, event_id, event_type, attempt, outcome, status_code, error, duration_ms, created_at"
    };
}
pub(crate) use delivery_columns;
