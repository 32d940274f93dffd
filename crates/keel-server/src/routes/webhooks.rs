//! Webhook subscriptions (create, list, get, delete), their delivery log, and
//! redelivery. All scoped to the caller's workspace: another workspace's id is a 404.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_core::auth::Principal;
use keel_core::event::TypeFilter;
use keel_core::id::{DeliveryId, WebhookId};
use keel_store::{Delivery, NewWebhook, Outcome, Webhook};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{List, rfc3339};
use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;

/// What POST /v1/webhooks takes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateWebhook {
    /// Where events are POSTed: http(s), and a public address unless
    /// `webhooks.allow_private` is set.
    url: String,
    /// Event types, comma-separated, wildcards on dotted prefixes (`task.*`). Default: all.
    types: Option<String>,
    /// The signing secret (`whsec_` + base64 of 24-64 bytes). Default: a new random one.
    secret: Option<String>,
    /// A label.
    description: Option<String>,
}

/// A webhook subscription.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WebhookView {
    /// `whk_…`.
    id: String,
    /// Where events go.
    url: String,
    /// The type filter.
    types: String,
    /// A label.
    description: Option<String>,
    /// The signing secret: in the response to POST only.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    /// Every event up to this seq has been delivered or dead-lettered.
    cursor_seq: i64,
    /// RFC 3339.
    created_at: String,
}

impl WebhookView {
    fn new(w: Webhook, with_secret: bool) -> Self {
        Self {
            id: w.id.to_string(),
            url: w.url,
            types: w.types,
            description: w.description,
            secret: with_secret.then_some(w.secret),
            cursor_seq: w.cursor_seq,
            created_at: rfc3339(w.created_at),
        }
    }
}

/// One delivery attempt.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveryView {
    /// `dlv_…`.
    id: String,
    /// The webhook.
    webhook_id: String,
    /// The event's seq.
    event_seq: i64,
    /// The event's id (sent as `webhook-id`).
    event_id: String,
    /// The event's type.
    event_type: String,
    /// 1 for the first attempt.
    attempt: i64,
    /// `delivered`, `failed` (retried) or `dead_lettered` (the last attempt failed).
    outcome: &'static str,
    /// The endpoint's status, when it answered.
    status_code: Option<i64>,
    /// What went wrong.
    error: Option<String>,
    /// How long the attempt took.
    duration_ms: i64,
    /// RFC 3339.
    created_at: String,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.id.to_string(),
            webhook_id: d.webhook_id.to_string(),
            event_seq: d.event_seq,
            event_id: d.event_id.to_string(),
            event_type: d.event_type,
            attempt: d.attempt,
            outcome: d.outcome.as_str(),
            status_code: d.status_code,
            error: d.error,
            duration_ms: d.duration_ms,
            created_at: rfc3339(d.created_at),
        }
    }
}

fn webhook_id(id: &str) -> Result<WebhookId, ApiError> {
    id.parse()
        .map_err(|e: keel_core::Error| ApiError::bad_request(e.to_string()))
}

/// Subscribes a URL to the workspace's events (from the next event on). The response
/// holds the signing secret; it is not shown again. Requires role: admin.
#[utoipa::path(post, path = "/v1/webhooks", tag = super::EVENTS, security(("api_key" = [])),
    request_body = CreateWebhook,
    responses(
        (status = 201, description = "The subscription, with its secret", body = WebhookView),
        (status = 400, description = "A bad URL (not http(s), or internal), filter or secret, named", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    AppJson(body): AppJson<CreateWebhook>,
) -> Result<(StatusCode, Json<WebhookView>), ApiError> {
    let types = body.types.unwrap_or_else(|| "*".to_owned());
    TypeFilter::parse(&types).map_err(|e| ApiError::bad_request(format!("types: {e}")))?;
    let secret = match body.secret {
        Some(secret) => {
            crate::webhooks::check_secret(&secret).map_err(ApiError::bad_request)?;
            secret
        }
        None => crate::webhooks::generate_secret().map_err(|e| ApiError::internal(&e))?,
    };
    if body.description.as_ref().is_some_and(|d| d.len() > 256) {
        return Err(ApiError::bad_request("description: at most 256 bytes"));
    }
    let allow_private = state.config().webhooks.allow_private;
    let url = crate::webhooks::check_url(&body.url, allow_private)
        .await
        .map_err(ApiError::bad_request)?;
    let hook = state
        .store()
        .create_webhook(NewWebhook {
            workspace_id: principal.workspace_id,
            url: url.to_string(),
            types,
            secret,
            description: body.description,
        })
        .await?;
    tracing::info!(webhook_id = %hook.id, "webhook created");
    let action = Action::new("webhook.created", hook.id)
        .data(serde_json::json!({"url": hook.url, "types": hook.types}));
    audit::record(&state, &principal, &caller, action).await;
    Ok((StatusCode::CREATED, Json(WebhookView::new(hook, true))))
}

/// The workspace's webhooks (without secrets). Requires role: viewer.
#[utoipa::path(get, path = "/v1/webhooks", tag = super::EVENTS, security(("api_key" = [])),
    responses((status = 200, description = "The subscriptions", body = List<WebhookView>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<List<WebhookView>>, ApiError> {
    let hooks = state.store().list_webhooks(principal.workspace_id).await?;
    Ok(Json(List {
        data: hooks
            .into_iter()
            .map(|h| WebhookView::new(h, false))
            .collect(),
    }))
}

/// One webhook (without its secret). Requires role: viewer.
#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = super::EVENTS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook's id (`whk_…`)")),
    responses(
        (status = 200, description = "The subscription", body = WebhookView),
        (status = 404, description = "No such webhook in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    let hook = state
        .store()
        .webhook(principal.workspace_id, webhook_id(&id)?)
        .await?;
    Ok(Json(WebhookView::new(hook, false)))
}

/// Deletes a webhook and its delivery log. Requires role: admin.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = super::EVENTS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook's id (`whk_…`)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such webhook in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .store()
        .delete_webhook(principal.workspace_id, webhook_id(&id)?)
        .await?;
    tracing::info!(webhook_id = %id, "webhook deleted");
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("webhook.deleted", id),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Query parameters of the delivery log.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct DeliveriesQuery {
    /// Only `delivered`, `failed` or `dead_lettered` attempts.
    outcome: Option<String>,
    /// Attempts after this delivery id (a cursor: the last id of the previous page).
    after: Option<String>,
    /// 1 to 500, default 100.
    limit: Option<u32>,
}

/// A webhook's delivery attempts, oldest first; `outcome=dead_lettered` lists its dead
/// letters. Requires role: viewer.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = super::EVENTS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook's id (`whk_…`)")),
    responses(
        (status = 200, description = "The attempts", body = List<DeliveryView>),
        (status = 400, description = "A bad filter or cursor, named", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such webhook in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(query): Query<DeliveriesQuery>,
) -> Result<Json<List<DeliveryView>>, ApiError> {
    let id = webhook_id(&id)?;
    let outcome = query
        .outcome
        .as_deref()
        .map(|o| {
            Outcome::parse(o).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "outcome: expected delivered, failed or dead_lettered, got {o:?}"
                ))
            })
        })
        .transpose()?;
    let after: Option<DeliveryId> = query
        .after
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: keel_core::Error| ApiError::bad_request(format!("after: {e}")))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit: expected 1 to 500"));
    }
    // 404 for a webhook that is not this workspace's, rather than an empty list.
    state.store().webhook(principal.workspace_id, id).await?;
    let rows = state
        .store()
        .list_deliveries(principal.workspace_id, id, outcome, after, limit)
        .await?;
    Ok(Json(List {
        data: rows.into_iter().map(DeliveryView::from).collect(),
    }))
}

/// Sends a delivery's event again, now, once (e.g. a dead letter after the endpoint was
/// fixed), and logs the attempt. Requires role: admin.
#[utoipa::path(post, path = "/v1/webhooks/{id}/deliveries/{delivery_id}/redeliver", tag = super::EVENTS,
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The webhook's id (`whk_…`)"),
        ("delivery_id" = String, Path, description = "A delivery attempt's id (`dlv_…`)"),
    ),
    responses(
        (status = 200, description = "The new attempt", body = DeliveryView),
        (status = 404, description = "No such webhook or delivery in this workspace", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The event is older than retention keeps", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<Json<DeliveryView>, ApiError> {
    let id = webhook_id(&id)?;
    let delivery_id: DeliveryId = delivery_id
        .parse()
        .map_err(|e: keel_core::Error| ApiError::bad_request(e.to_string()))?;
    let ws = principal.workspace_id;
    let hook = state.store().webhook(ws, id).await?;
    let previous = state.store().delivery(ws, id, delivery_id).await?;
    let event = state
        .store()
        .events_after(ws, previous.event_seq - 1, 1)
        .await?
        .into_iter()
        .find(|e| e.seq == previous.event_seq);
    let Some(event) = event else {
        let head = state.store().event_head(ws).await?;
        return Err(ApiError::gone(
            format!(
                "event seq {} is no longer held; the oldest held is seq {}",
                previous.event_seq,
                head.oldest_held()
            ),
            head.oldest_held(),
        ));
    };
    let attempt = state
        .events()
        .webhooks()
        .attempt(&hook, &event, previous.attempt + 1, false)
        .await;
    state.store().record_delivery(&attempt, &[]).await?;
    tracing::info!(webhook_id = %hook.id, event_seq = event.seq, outcome = attempt.outcome.as_str(), "webhook redelivered");
    Ok(Json(attempt.into()))
}
