//! `keel mock-llm`: a standalone server speaking the OpenAI Chat Completions wire format
//! with scripted replies and injected faults. Keel's tests and benchmarks talk to it over
//! real HTTP; users point agents at it to chaos-test them.
//!
//! The upstream model name chooses the behaviour, so one mock serves every failure mode
//! at once (each route target names its own):
//!
//! | model | behaviour |
//! |---|---|
//! | `fault/429?retry_after=S` | 429 with `Retry-After: S` |
//! | `fault/500`, `fault/503`, `fault/400` | that status, with an OpenAI-shaped error body |
//! | `fault/hang` | accepts and never answers |
//! | `fault/slow?first_token_ms=N` | waits N ms before the first byte, then answers |
//! | `fault/cut?after=N` | streams N chunks, then drops the connection |
//! | `fault/malformed` | 200 with a body that is not JSON (or a malformed chunk) |
//! | `fault/close` | drops the connection without answering |
//! | `flaky/STATUS?fail=N` | the first N calls get STATUS, later ones answer |
//! | anything else | the next scripted reply (`--script`), else an echo of the last user message |
//!
//! `GET /_mock/stats` returns calls per model; `DELETE /_mock/stats` resets them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_llm::types::{ChatRequest, Usage};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A scripted reply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedReply {
    /// Text content.
    #[serde(default)]
    pub content: Option<String>,
    /// Tool calls: `{"name": …, "arguments": {…}}`.
    #[serde(default)]
    pub tool_calls: Vec<ScriptedToolCall>,
    /// Usage to report (else counted from words).
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// A scripted tool call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedToolCall {
    /// The tool.
    pub name: String,
    /// Its arguments (any JSON; sent JSON-encoded as OpenAI does).
    #[serde(default)]
    pub arguments: Value,
}

/// A script file: `{"replies": [...]}`, served in order, cycling.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The replies.
    pub replies: Vec<ScriptedReply>,
}

impl Script {
    /// Reads a script file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not a valid script: {e}", path.display()))
    }
}

/// Options for the mock server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Scripted replies; echo when empty.
    pub script: Script,
    /// Latency added before every answer.
    pub latency: Duration,
}

#[derive(Debug, Default)]
struct Mock {
    options: Options,
    next_reply: AtomicUsize,
    calls: Mutex<HashMap<String, u64>>,
}

impl Mock {
    /// Counts the call and returns how many calls this model had before it.
    fn count(&self, model: &str) -> u64 {
        let mut calls = self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = calls.entry(model.to_owned()).or_insert(0);
        *n += 1;
        *n - 1
    }
}

/// The mock's router.
pub fn app(options: Options) -> axum::Router {
    let state = Arc::new(Mock { options, ..Mock::default() });
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/_mock/stats", get(stats).delete(reset))
        .with_state(state)
}

/// Serves the mock on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, options: Options, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, app(options))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "keel-mock-llm"}]}))
}

async fn stats(State(mock): State<Arc<Mock>>) -> Json<Value> {
    let calls = mock.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    Json(json!({ "calls": calls }))
}

async fn reset(State(mock): State<Arc<Mock>>) -> StatusCode {
    mock.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    StatusCode::NO_CONTENT
}

/// The behaviour a model name asks for, and its parameters.
fn directive(model: &str) -> (&str, HashMap<&str, &str>) {
    let (name, query) = model.split_once('?').unwrap_or((model, ""));
    let params = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
    (name, params)
}

fn param<T: std::str::FromStr>(params: &HashMap<&str, &str>, key: &str, default: T) -> T {
    params.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn error_response(status: u16, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"error": {"message": format!("mock-llm injected {status}"), "type": "mock_fault", "code": status.as_u16()}});
    let mut response = (status, Json(body)).into_response();
    if let Some(secs) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, secs.into());
    }
    response
}

/// A body that yields nothing and then fails: the connection is dropped mid-response.
fn dropped_connection() -> Response {
    let stream = futures_util::stream::once(async { Err::<Bytes, _>(std::io::Error::other("mock-llm dropped the connection")) });
    Response::new(Body::from_stream(stream))
}

async fn chat(State(mock): State<Arc<Mock>>, Json(request): Json<ChatRequest>) -> Response {
    let previous_calls = mock.count(&request.model);
    if !mock.options.latency.is_zero() {
        tokio::time::sleep(mock.options.latency).await;
    }
    let (name, params) = directive(&request.model);
    let stream = request.is_stream();
    match name {
        "fault/429" => return error_response(429, Some(param(&params, "retry_after", 1))),
        "fault/400" => return error_response(400, None),
        "fault/500" => return error_response(500, None),
        "fault/503" => return error_response(503, None),
        "fault/hang" => {
            std::future::pending::<()>().await;
        }
        "fault/slow" => tokio::time::sleep(Duration::from_millis(param(&params, "first_token_ms", 1000))).await,
        "fault/close" => return dropped_connection(),
        "fault/malformed" => {
            let body = if stream { "data: {not json\n\n" } else { "{\"id\": \"chatcmpl-1\", \"choices\": [" };
            let content_type = if stream { "text/event-stream" } else { "application/json" };
            return ([(header::CONTENT_TYPE, content_type)], body).into_response();
        }
        _ => {}
    }
    if let Some(status) = name.strip_prefix("flaky/") {
        let fail: u64 = param(&params, "fail", 1);
        if previous_calls < fail {
            return error_response(status.parse().unwrap_or(500), Some(0).filter(|_| status == "429"));
        }
    }

    let reply = next_reply(&mock, &request);
    let cut_after = (name == "fault/cut").then(|| param(&params, "after", 2usize));
    if stream {
        stream_reply(&request, reply, cut_after)
    } else if cut_after.is_some() {
        dropped_connection()
    } else {
        Json(whole_reply(&request, reply)).into_response()
    }
}

fn next_reply(mock: &Mock, request: &ChatRequest) -> ScriptedReply {
    let replies = &mock.options.script.replies;
    if replies.is_empty() {
        let (text, usage) = keel_llm::providers::mock::echo(request);
        return ScriptedReply { content: Some(text), tool_calls: Vec::new(), usage: Some(usage) };
    }
    let i = mock.next_reply.fetch_add(1, Ordering::Relaxed) % replies.len();
    replies[i].clone()
}

fn usage_of(request: &ChatRequest, reply: &ScriptedReply) -> Usage {
    reply.usage.unwrap_or_else(|| {
        let (_, mut usage) = keel_llm::providers::mock::echo(request);
        usage.completion_tokens = reply.content.as_deref().map_or(1, |c| c.split_whitespace().count().max(1) as u64);
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
        usage
    })
}

fn tool_calls_json(reply: &ScriptedReply) -> Option<Value> {
    (!reply.tool_calls.is_empty()).then(|| {
        reply
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"id": format!("call_{i}"), "type": "function", "function": {"name": c.name, "arguments": c.arguments.to_string()}}))
            .collect()
    })
}

fn whole_reply(request: &ChatRequest, reply: ScriptedReply) -> Value {
    let usage = usage_of(request, &reply);
    let tool_calls = tool_calls_json(&reply);
    let finish = if tool_calls.is_some() { "tool_calls" } else { "stop" };
    let mut message = json!({"role": "assistant", "content": reply.content});
    if let Some(calls) = tool_calls {
        message["tool_calls"] = calls;
    }
    json!({
        "id": format!("chatcmpl-{}", response_id()),
        "object": "chat.completion",
        "created": 0,
        "model": request.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    })
}

fn response_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn stream_reply(request: &ChatRequest, reply: ScriptedReply, cut_after: Option<usize>) -> Response {
    let id = format!("chatcmpl-{}", response_id());
    let model = request.model.clone();
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    if let Some(content) = &reply.content {
        for word in content.split_inclusive(' ') {
            events.push(chunk(json!({"content": word}), None));
        }
    }
    let finish = match tool_calls_json(&reply) {
        Some(Value::Array(calls)) => {
            for (i, call) in calls.into_iter().enumerate() {
                events.push(chunk(json!({"tool_calls": [{"index": i, "id": call["id"], "type": "function", "function": call["function"]}]}), None));
            }
            "tool_calls"
        }
        _ => "stop",
    };
    events.push(chunk(json!({}), Some(finish)));
    if request.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true) {
        events.push(json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                           "choices": [], "usage": usage_of(request, &reply)}));
    }
    let mut frames: Vec<Result<Bytes, std::io::Error>> =
        events.iter().map(|e| Ok(Bytes::from(format!("data: {e}\n\n")))).collect();
    match cut_after {
        Some(n) => {
            frames.truncate(n);
            frames.push(Err(std::io::Error::other("mock-llm cut the stream")));
        }
        None => frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n"))),
    }
    // Pause before a cut so the chunks before it reach the wire first: hyper drops the
    // whole response if the body fails before anything was flushed.
    let body = Body::from_stream(futures_util::stream::iter(frames).then(|frame| async move {
        if frame.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        frame
    }));
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}
