//! The event log over HTTP: GET /v1/events (a live SSE stream with resume, or pages of
//! history with `format=json`), GET /v1/events/schemas, and POST /v1/events/ping.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt as _;
use keel_core::auth::Principal;
use keel_core::event::{ENVELOPE_VERSION, Event, EventType, NewEvent, TypeFilter, Version};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::{ApiError, Problem};
use crate::events::{Item, Selection, follow};
use crate::generator::{Generator, Yielder};

/// Events per page of history, at most.
const MAX_LIMIT: u32 = 1000;

/// Query parameters of GET /v1/events.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct EventsQuery {
    /// Comma-separated types; a dotted prefix may end in `*` (`task.*`). Default: all.
    types: Option<String>,
    /// Only events of this task.
    task_id: Option<String>,
    /// Only events of this agent.
    agent_id: Option<String>,
    /// Start after this seq (exclusive). The `Last-Event-ID` header wins when both are
    /// given. Default: the stream starts at the newest event; history starts at the
    /// oldest held.
    after: Option<String>,
    /// `sse` (default) or `json` (a page of history).
    format: Option<String>,
    /// Page size for `format=json`: 1 to 1000, default 100.
    limit: Option<String>,
    /// Envelope version wanted (`1` or `1.0`); this server writes 1.0.
    version: Option<String>,
}

/// A page of history.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventPage {
    /// The events, oldest first (envelope v1.0).
    #[schema(value_type = Vec<Object>)]
    data: Vec<Event>,
    /// Pass as `after` for the next page (the last seq looked at, matching or not).
    next_after: i64,
    /// Whether the log held more events after `next_after` when this page was read.
    has_more: bool,
}

struct Parsed {
    selection: Selection,
    after: Option<i64>,
    json: bool,
    limit: u32,
}

fn parse(principal: &Principal, headers: &HeaderMap, q: &EventsQuery) -> Result<Parsed, ApiError> {
    let bad = |e: keel_core::Error| ApiError::bad_request(e.to_string());
    let types = match &q.types {
        Some(t) => {
            TypeFilter::parse(t).map_err(|e| ApiError::bad_request(format!("types: {e}")))?
        }
        None => TypeFilter::all(),
    };
    let task_id = q
        .task_id
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("task_id: {e}")))?;
    let agent_id = q
        .agent_id
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("agent_id: {e}")))?;
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Last-Event-ID: expected the seq of an event as sent in its `id:` field \
                         (a non-negative integer), got {:?}",
                        String::from_utf8_lossy(v.as_bytes())
                    ))
                })?,
        ),
        None => None,
    };
    let after = match &q.after {
        Some(a) => Some(a.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::bad_request(format!(
                "after: expected a seq (a non-negative integer), got {a:?}"
            ))
        })?),
        None => None,
    };
    let json = match q.format.as_deref().unwrap_or("sse") {
        "sse" => false,
        "json" => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "format: expected sse or json, got {other:?}"
            )));
        }
    };
    let limit = match &q.limit {
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit: expected 1 to {MAX_LIMIT}, got {l:?}"))
            })?,
        None => 100,
    };
    if let Some(v) = &q.version {
        let wanted: Version = if v.contains('.') {
            v.parse().map_err(bad)?
        } else {
            format!("{v}.0").parse().map_err(bad)?
        };
        let current: Version = ENVELOPE_VERSION.parse().map_err(bad)?;
        if wanted.major != current.major || wanted.minor > current.minor {
            return Err(ApiError::bad_request(format!(
                "version: this server serves event versions {}.0 to {current}, got {v:?}",
                current.major
            )));
        }
    }
    Ok(Parsed {
        selection: Selection {
            workspace: principal.workspace_id,
            types,
            task_id,
            agent_id,
        },
        after: last_event_id.or(after),
        json,
        limit,
    })
}

/// The workspace's events: a live SSE stream (each event `id: <seq>`, `event: <type>`,
/// `data: <envelope>`; resume with `Last-Event-ID` or `after`, with no gap and no
/// duplicate), or with `format=json` a page of history. Requires role: viewer.
#[utoipa::path(get, path = "/v1/events", tag = super::EVENTS,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "An SSE stream (text/event-stream), or a page with format=json", body = EventPage),
        (status = 400, description = "A bad filter, cursor or version, named", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The cursor is older than retention keeps; `oldest_seq` is the oldest held", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many stream clients on this instance", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let parsed = parse(&principal, &headers, &query)?;
    let log = state.events();
    let head = log.head(principal.workspace_id).await?;
    let after = parsed
        .after
        .unwrap_or(if parsed.json { 0 } else { head.last_seq });
    if after < head.pruned_through {
        return Err(ApiError::gone(
            format!(
                "events after seq {after} are no longer held (retention is {} s); the oldest held is seq {}",
                log.config().retention.as_secs(),
                head.oldest_held()
            ),
            head.oldest_held(),
        ));
    }
    if parsed.json {
        return page(&state, &parsed, after, head.last_seq).await;
    }
    let Some(slot) = log.client_slot() else {
        return Err(ApiError::unavailable(
            "this instance has as many stream clients as events.max_stream_clients allows; retry shortly or on another instance",
        ));
    };
    let log = log.clone();
    let selection = parsed.selection;
    // The follow runs as the body is polled, in the connection's task: when the client
    // goes away hyper drops the body and the follow with it; when the socket is full
    // hyper stops polling, and the follow's bounded ring is what absorbs the lag.
    let frames = Generator::new(move |out: Yielder<Bytes>| async move {
        let _slot = slot;
        let _client = crate::events::ClientGauge::new("sse");
        out.send(Bytes::from_static(b"retry: 1000\n\n")).await;
        follow(&log, &selection, after, |item| {
            let out = out.clone();
            async move {
                out.send(render_sse(item)).await;
                true
            }
        })
        .await;
    });
    let body = Body::from_stream(frames.map(Ok::<_, Infallible>));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response())
}

fn render_sse(item: Item) -> Bytes {
    match item {
        Item::Event(frame) => frame.sse.clone(),
        Item::KeepAlive => Bytes::from_static(b": keep-alive\n\n"),
        Item::Closed(why, seen) => Bytes::from(format!(
            "id: {seen}\nevent: stream.closed\ndata: {}\n\n",
            serde_json::json!({ "reason": why.reason(), "resume_after": seen })
        )),
    }
}

async fn page(
    state: &AppState,
    parsed: &Parsed,
    after: i64,
    last_seq: i64,
) -> Result<Response, ApiError> {
    let mut data = Vec::new();
    let mut seen = after;
    'pages: loop {
        let page = state
            .store()
            .events_after(parsed.selection.workspace, seen, parsed.limit.max(100))
            .await?;
        let full = page.len() >= parsed.limit.max(100) as usize;
        for event in page {
            seen = event.seq;
            if parsed.selection.matches(&event) {
                data.push(event);
                if data.len() >= parsed.limit as usize {
                    break 'pages;
                }
            }
        }
        if !full {
            break;
        }
    }
    Ok(Json(EventPage {
        data,
        next_after: seen,
        has_more: seen < last_seq,
    })
    .into_response())
}

/// What POST /v1/events/ping takes.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PingRequest {
    /// Any text, echoed in the event's `data.message`.
    message: Option<String>,
}

/// Appends a `system.ping` event to the workspace's log and returns it as committed —
/// for checking streams, webhooks and exports end to end. Requires role: admin.
#[utoipa::path(post, path = "/v1/events/ping", tag = super::EVENTS,
    request_body(content = PingRequest, description = "`{}` or `{\"message\": \"…\"}`"),
    security(("api_key" = [])),
    responses(
        (status = 201, description = "The committed event", body = Object),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn ping(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    crate::extract::AppJson(body): crate::extract::AppJson<PingRequest>,
) -> Result<(StatusCode, Json<Event>), ApiError> {
    let message = body.message;
    if message.as_ref().is_some_and(|m| m.len() > 4096) {
        return Err(ApiError::bad_request("message: at most 4096 bytes"));
    }
    let data = match message {
        Some(m) => serde_json::json!({ "message": m }),
        None => serde_json::json!({}),
    };
    let event = NewEvent::new(EventType::SystemPing, principal.workspace_id, data)
        .correlated(crate::telemetry::current_trace_id());
    let mut committed = state.events().append(vec![event]).await?;
    let event = committed
        .pop()
        .ok_or_else(|| ApiError::internal(&"the event log committed nothing"))?;
    Ok((StatusCode::CREATED, Json(event)))
}

/// The catalogue's JSON Schemas (draft 2020-12), one per event type, plus `envelope`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SchemaSet {
    /// The envelope version these describe.
    version: &'static str,
    /// Schema documents by event type.
    #[schema(value_type = Object)]
    schemas: &'static std::collections::BTreeMap<&'static str, serde_json::Value>,
}

/// The JSON Schema of every event type. Requires role: viewer.
#[utoipa::path(get, path = "/v1/events/schemas", tag = super::EVENTS, security(("api_key" = [])),
    responses((status = 200, description = "The schemas", body = SchemaSet)))]
pub(crate) async fn schemas() -> Result<Json<SchemaSet>, ApiError> {
    let schemas = crate::schemas::documents().map_err(|e| ApiError::internal(&e))?;
    Ok(Json(SchemaSet {
        version: ENVELOPE_VERSION,
        schemas,
    }))
}
