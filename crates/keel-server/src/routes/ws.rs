//! GET /v1/ws: the event log over one WebSocket, with several subscriptions.
//!
//! Client messages (JSON text):
//! - `{"type":"subscribe","id":"s1","types":"task.*","task_id":…,"agent_id":…,"after":12}`
//!   (`after` omitted: start at the newest event);
//! - `{"type":"resume","id":"s1","after":12}` — restart subscription `s1` after seq 12;
//! - `{"type":"unsubscribe","id":"s1"}`.
//!
//! Server messages: `subscribed` `{id, after}`, `event` `{subscription, event}`,
//! `closed` `{subscription, reason, resume_after}` (e.g. `consumer_too_slow`: resume from
//! there), `unsubscribed` `{id}`, and `error` `{id?, status, detail}` for a bad message
//! (the socket stays open).

use std::collections::HashMap;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt as _, StreamExt as _};
use keel_core::auth::Principal;
use keel_core::event::TypeFilter;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::AppState;
use crate::error::{ApiError, Problem};
use crate::events::{Item, Selection, follow};

/// Subscriptions one socket may hold.
const MAX_SUBSCRIPTIONS: usize = 16;
/// Messages queued for one socket before its followers wait.
const SOCKET_BUFFER: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    Subscribe {
        id: String,
        types: Option<String>,
        task_id: Option<String>,
        agent_id: Option<String>,
        after: Option<i64>,
    },
    Resume {
        id: String,
        after: i64,
    },
    Unsubscribe {
        id: String,
    },
}

/// Opens a WebSocket carrying event subscriptions (see the module docs for the
/// messages). Requires role: viewer.
#[utoipa::path(get, path = "/v1/ws", tag = super::EVENTS, security(("api_key" = [])),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many stream clients on this instance", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn ws(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!("GET /v1/ws must be a WebSocket upgrade: {e}"))
    })?;
    let Some(slot) = state.events().client_slot() else {
        return Err(ApiError::unavailable(
            "this instance has as many stream clients as events.max_stream_clients allows; retry shortly or on another instance",
        ));
    };
    Ok(upgrade.on_upgrade(move |socket| async move {
        let _slot = slot;
        let _client = crate::events::ClientGauge::new("websocket");
        serve(state, principal, socket).await;
    }))
}

async fn serve(state: AppState, principal: Principal, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(SOCKET_BUFFER);
    let writer = tokio::spawn(async move {
        // Messages that are ready together go out in one flush.
        'write: while let Some(message) = rx.recv().await {
            if sink.feed(message).await.is_err() {
                break;
            }
            while let Ok(message) = rx.try_recv() {
                if sink.feed(message).await.is_err() {
                    break 'write;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let shutdown = state.stream_stop();
    let mut subscriptions: HashMap<String, (AbortHandle, Selection)> = HashMap::new();
    loop {
        let message = tokio::select! {
            m = incoming.next() => m,
            () = shutdown.cancelled() => break,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        let reply = match serde_json::from_str::<ClientMessage>(&text) {
            Err(e) => Some(error(None, &format!("not a valid message: {e}"))),
            Ok(ClientMessage::Unsubscribe { id }) => match subscriptions.remove(&id) {
                Some((follower, _)) => {
                    follower.abort();
                    Some(json!({ "type": "unsubscribed", "id": id }).to_string())
                }
                None => Some(error(Some(&id), "no such subscription")),
            },
            Ok(ClientMessage::Resume { id, after }) => match subscriptions.remove(&id) {
                None => Some(error(Some(&id), "no such subscription; subscribe first")),
                Some((follower, selection)) => {
                    follower.abort();
                    start(&state, &tx, &mut subscriptions, id, selection, Some(after)).await
                }
            },
            Ok(ClientMessage::Subscribe {
                id,
                types,
                task_id,
                agent_id,
                after,
            }) => {
                if subscriptions.contains_key(&id) {
                    Some(error(
                        Some(&id),
                        "a subscription with this id exists; unsubscribe it first",
                    ))
                } else if subscriptions.len() >= MAX_SUBSCRIPTIONS {
                    Some(error(
                        Some(&id),
                        &format!("at most {MAX_SUBSCRIPTIONS} subscriptions per socket"),
                    ))
                } else {
                    match selection(
                        &principal,
                        types.as_deref(),
                        task_id.as_deref(),
                        agent_id.as_deref(),
                    ) {
                        Err(detail) => Some(error(Some(&id), &detail)),
                        Ok(selection) => {
                            start(&state, &tx, &mut subscriptions, id, selection, after).await
                        }
                    }
                }
            }
        };
        if let Some(reply) = reply
            && tx.send(Message::Text(reply.into())).await.is_err()
        {
            break;
        }
    }
    // The client went away: its followers stop. At shutdown they end by themselves,
    // each sending its `closed` (the event log closes every follow).
    if !shutdown.is_cancelled() {
        for (follower, _) in subscriptions.into_values() {
            follower.abort();
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn error(id: Option<&str>, detail: &str) -> String {
    json!({ "type": "error", "id": id, "status": 400, "detail": detail }).to_string()
}

fn selection(
    principal: &Principal,
    types: Option<&str>,
    task_id: Option<&str>,
    agent_id: Option<&str>,
) -> Result<Selection, String> {
    Ok(Selection {
        workspace: principal.workspace_id,
        types: match types {
            Some(t) => TypeFilter::parse(t).map_err(|e| format!("types: {e}"))?,
            None => TypeFilter::all(),
        },
        task_id: task_id
            .map(str::parse)
            .transpose()
            .map_err(|e: keel_core::Error| format!("task_id: {e}"))?,
        agent_id: agent_id
            .map(str::parse)
            .transpose()
            .map_err(|e: keel_core::Error| format!("agent_id: {e}"))?,
    })
}

/// Starts following for subscription `id`; the reply is `subscribed`, or an error (for a
/// cursor older than retention).
async fn start(
    state: &AppState,
    tx: &mpsc::Sender<Message>,
    subscriptions: &mut HashMap<String, (AbortHandle, Selection)>,
    id: String,
    selection: Selection,
    after: Option<i64>,
) -> Option<String> {
    let head = match state.events().head(selection.workspace).await {
        Ok(head) => head,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the event log head");
            return Some(json!({ "type": "error", "id": id, "status": 503, "detail": "the database is unavailable; retry shortly" }).to_string());
        }
    };
    let after = after.unwrap_or(head.last_seq);
    if after < 0 {
        return Some(error(Some(&id), "after: must be a non-negative seq"));
    }
    if after < head.pruned_through {
        return Some(
            json!({
                "type": "error", "id": id, "status": 410, "oldest_seq": head.oldest_held(),
                "detail": format!("events after seq {after} are no longer held; the oldest held is seq {}", head.oldest_held()),
            })
            .to_string(),
        );
    }
    let log = state.events().clone();
    let tx = tx.clone();
    let subscription = serde_json::Value::String(id.clone()).to_string();
    let follower = tokio::spawn({
        let selection = selection.clone();
        async move {
            follow(&log, &selection, after, |item| {
            let message = match item {
                Item::Event(frame) => Message::Text(
                    format!(
                        r#"{{"type":"event","subscription":{subscription},"event":{}}}"#,
                        String::from_utf8_lossy(&frame.json)
                    )
                    .into(),
                ),
                Item::KeepAlive => Message::Ping(axum::body::Bytes::new()),
                Item::Closed(why, seen) => Message::Text(
                    format!(
                        r#"{{"type":"closed","subscription":{subscription},"reason":"{}","resume_after":{seen}}}"#,
                        why.reason()
                    )
                    .into(),
                ),
            };
            let tx = tx.clone();
            async move { tx.send(message).await.is_ok() }
        })
        .await;
        }
    });
    subscriptions.insert(id.clone(), (follower.abort_handle(), selection));
    Some(json!({ "type": "subscribed", "id": id, "after": after }).to_string())
}
