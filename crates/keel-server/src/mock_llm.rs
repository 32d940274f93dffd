//! `keel mock-llm`: a standalone server speaking two wire formats — OpenAI Chat
//! Completions (`POST /v1/chat/completions`) and Anthropic Messages (`POST /v1/messages`)
//! — with scripted replies and injected faults. Keel's tests and benchmarks talk to it
//! over real HTTP; users point agents at it to chaos-test them.
//!
//! The upstream model name chooses the behaviour, so one mock serves every failure mode
//! at once (each route target names its own), on both endpoints alike:
//!
//! | model | behaviour |
//! |---|---|
//! | `fault/429?retry_after=S` | 429 with `Retry-After: S` |
//! | `fault/500`, `fault/503`, `fault/529`, `fault/400` | that status, with an error body in the endpoint's shape |
//! | `fault/hang` | accepts and never answers |
//! | `fault/slow?first_token_ms=N` | waits N ms before the first byte, then answers |
//! | `fault/cut?after=N` | streams N events, then drops the connection |
//! | `fault/malformed` | 200 with a body that is not JSON (or a malformed event) |
//! | `fault/close` | drops the connection without answering |
//! | `flaky/STATUS?fail=N` | the first N calls get STATUS, later ones answer |
//! | `fault/drip?interval_ms=N` | streams a chunk every N ms for a long time; counts streams whose client leaves (`abandoned_streams`) |
//! | `nousage…` | answers without token counts (as some compatible servers do) |
//! | anything else | the next scripted reply (`--script`), else an echo of the last user message |
//!
//! `/v1/messages` checks requests the way Anthropic does, so a translation mistake shows
//! up as the 400 the real API would send: the `anthropic-version` header, `max_tokens`,
//! roles (`user`/`assistant` only; the system prompt is the top-level `system`), non-empty
//! text blocks, and tool pairing (every `tool_use` answered by a `tool_result` at the start
//! of the next user message, every `tool_result` answering a `tool_use` of the message
//! before), top-level fields (none outside the Messages schema; `metadata` holds only
//! `user_id`) and `temperature` (0 to 1). Its echo is the last user message's text, where a
//! `tool_result` counts as text (one per line), so a follow-up turn echoes the tool results
//! it carried.
//!
//! `POST /v1/embeddings` answers deterministic 8-dimension vectors (floats, or base64 when
//! asked), with the same directives.
//!
//! `GET /_mock/stats` returns calls per model, both endpoints together; `DELETE
//! /_mock/stats` resets them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use keel_llm::types::{ChatRequest, Message, Usage};
use serde::Deserialize;
use serde_json::{Map, Value, json};
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

/// A script file: `{"replies": [...]}`, served in order, cycling — or, with
/// `"by_turn": true`, chosen by the conversation itself: a request with N assistant
/// messages after its last user message gets reply N (the last reply once N runs past
/// it), so every user turn of a thread plays the script from its start. Scripting by turn makes an
/// agent's conversation deterministic however many run at once, and after a crash resume.
/// In a reply's `content`, `{{last}}` stands for the text of the request's last message.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The replies.
    pub replies: Vec<ScriptedReply>,
    /// Choose the reply by the number of assistant messages since the last user message.
    #[serde(default)]
    pub by_turn: bool,
}

impl Script {
    /// Reads a script file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a valid script: {e}", path.display()))
    }
}

/// Options for the mock server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Scripted replies; echo when empty.
    pub script: Script,
    /// Latency added before every answer.
    pub latency: Duration,
    /// Each chat request received is appended here as one JSON line (what an agent sent).
    pub record: Option<std::path::PathBuf>,
}

#[derive(Debug, Default)]
struct Mock {
    options: Options,
    /// Cancelled on shutdown: a hanging request gives up then, so shutdown is not held.
    shutdown: CancellationToken,
    next_reply: AtomicUsize,
    calls: Mutex<HashMap<String, u64>>,
    /// Streams whose client went away before the end (`fault/drip`).
    abandoned: std::sync::atomic::AtomicU64,
}

impl Mock {
    /// Counts the call and returns how many calls this model had before it.
    fn count(&self, model: &str) -> u64 {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = calls.entry(model.to_owned()).or_insert(0);
        *n += 1;
        *n - 1
    }
}

/// The mock's router.
pub fn app(options: Options) -> axum::Router {
    app_with_shutdown(options, CancellationToken::new())
}

fn app_with_shutdown(options: Options, shutdown: CancellationToken) -> axum::Router {
    let state = Arc::new(Mock {
        options,
        shutdown,
        ..Mock::default()
    });
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/_mock/stats", get(stats).delete(reset))
        .with_state(state)
}

/// Serves the mock on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: Options,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app_with_shutdown(options, shutdown.clone()))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "keel-mock-llm"}]}),
    )
}

async fn stats(State(mock): State<Arc<Mock>>) -> Json<Value> {
    let calls = mock
        .calls
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let abandoned = mock.abandoned.load(Ordering::Relaxed);
    Json(json!({ "calls": calls, "abandoned_streams": abandoned }))
}

async fn reset(State(mock): State<Arc<Mock>>) -> StatusCode {
    mock.calls
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    StatusCode::NO_CONTENT
}

/// The behaviour a model name asks for, and its parameters.
fn directive(model: &str) -> (&str, HashMap<&str, &str>) {
    let (name, query) = model.split_once('?').unwrap_or((model, ""));
    let params = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    (name, params)
}

fn param<T: std::str::FromStr>(params: &HashMap<&str, &str>, key: &str, default: T) -> T {
    params
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Which wire format an endpoint speaks: it shapes error bodies and malformed answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
}

fn error_response(wire: Wire, status: u16, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = format!("mock-llm injected {status}");
    let body = match wire {
        Wire::OpenAi => {
            json!({"error": {"message": message, "type": "mock_fault", "code": status.as_u16()}})
        }
        Wire::Anthropic => anthropic_error(status, &message),
    };
    let mut response = (status, Json(body)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.into());
    }
    response
}

/// A body that yields nothing and then fails: the connection is dropped mid-response.
fn dropped_connection() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other("mock-llm dropped the connection"))
    });
    Response::new(Body::from_stream(stream))
}

/// What a model name's directive decided for one call.
enum Plan {
    /// Answer with this, and nothing else.
    Answer(Response),
    /// Send the reply (scripted or echo); with `Some(n)`, cut the stream after n events.
    Reply { cut_after: Option<usize> },
}

/// Counts the call, adds the configured latency, and applies the model's directive: the
/// part of every call that does not depend on the wire format.
async fn plan(mock: &Mock, model: &str, stream: bool, wire: Wire) -> Plan {
    let previous_calls = mock.count(model);
    if !mock.options.latency.is_zero() {
        tokio::time::sleep(mock.options.latency).await;
    }
    let (name, params) = directive(model);
    match name {
        "fault/429" => {
            return Plan::Answer(error_response(
                wire,
                429,
                Some(param(&params, "retry_after", 1)),
            ));
        }
        "fault/400" => return Plan::Answer(error_response(wire, 400, None)),
        "fault/500" => return Plan::Answer(error_response(wire, 500, None)),
        "fault/503" => return Plan::Answer(error_response(wire, 503, None)),
        "fault/529" => return Plan::Answer(error_response(wire, 529, None)),
        "fault/hang" => {
            mock.shutdown.cancelled().await;
            return Plan::Answer(error_response(wire, 503, None));
        }
        "fault/slow" => {
            tokio::time::sleep(Duration::from_millis(param(
                &params,
                "first_token_ms",
                1000,
            )))
            .await
        }
        "fault/close" => return Plan::Answer(dropped_connection()),
        "fault/malformed" => return Plan::Answer(malformed(wire, stream)),
        _ => {}
    }
    if let Some(status) = name.strip_prefix("flaky/") {
        let fail: u64 = param(&params, "fail", 1);
        if previous_calls < fail {
            let retry_after = Some(0).filter(|_| status == "429");
            return Plan::Answer(error_response(
                wire,
                status.parse().unwrap_or(500),
                retry_after,
            ));
        }
    }
    let cut_after = (name == "fault/cut").then(|| param(&params, "after", 2usize));
    if cut_after.is_some() && !stream {
        return Plan::Answer(dropped_connection());
    }
    Plan::Reply { cut_after }
}

fn malformed(wire: Wire, stream: bool) -> Response {
    let body = match (wire, stream) {
        (Wire::OpenAi, true) => "data: {not json\n\n",
        (Wire::OpenAi, false) => "{\"id\": \"chatcmpl-1\", \"choices\": [",
        (Wire::Anthropic, true) => "event: message_start\ndata: {not json\n\n",
        (Wire::Anthropic, false) => "{\"id\": \"msg_1\", \"type\": \"message\", \"content\": [",
    };
    let content_type = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn chat(State(mock): State<Arc<Mock>>, Json(request): Json<ChatRequest>) -> Response {
    if let Some(path) = &mock.options.record {
        record(path, &request).await;
    }
    let stream = request.is_stream();
    let cut_after = match plan(&mock, &request.model, stream, Wire::OpenAi).await {
        Plan::Answer(response) => return response,
        Plan::Reply { cut_after } => cut_after,
    };
    let (name, params) = directive(&request.model);
    if stream && name == "fault/drip" {
        return drip(
            &mock,
            &request,
            Duration::from_millis(param(&params, "interval_ms", 20)),
        );
    }
    let reply = next_reply(&mock, &request);
    if stream {
        stream_reply(&request, reply, cut_after)
    } else {
        Json(whole_reply(&request, reply)).into_response()
    }
}

/// OpenAI embeddings: deterministic vectors (floats or base64), with the same fault
/// directives as chat.
async fn embeddings(
    State(mock): State<Arc<Mock>>,
    Json(request): Json<keel_llm::types::EmbeddingsRequest>,
) -> Response {
    if let Plan::Answer(response) = plan(&mock, &request.model, false, Wire::OpenAi).await {
        return response;
    }
    Json(keel_llm::providers::mock::embed(&request, &request.model)).into_response()
}

/// Appends `request` to the record file, one JSON line.
async fn record(path: &Path, request: &ChatRequest) {
    use tokio::io::AsyncWriteExt as _;
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await;
    match file {
        Ok(mut file) => {
            if let Err(e) = file.write_all(&line).await {
                tracing::warn!(error = %e, path = %path.display(), "cannot record a request");
            }
        }
        Err(e) => tracing::warn!(error = %e, path = %path.display(), "cannot open the record file"),
    }
}

fn next_reply(mock: &Mock, request: &ChatRequest) -> ScriptedReply {
    let replies = &mock.options.script.replies;
    if replies.is_empty() {
        let (text, usage) = keel_llm::providers::mock::echo(request);
        return ScriptedReply {
            content: Some(text),
            tool_calls: Vec::new(),
            usage: Some(usage),
        };
    }
    let mut reply = if mock.options.script.by_turn {
        let since_user = request
            .messages
            .iter()
            .rposition(|m| m.role == "user")
            .map_or(0, |i| i + 1);
        let turn = request.messages[since_user..]
            .iter()
            .filter(|m| m.role == "assistant")
            .count();
        replies[turn.min(replies.len() - 1)].clone()
    } else {
        let i = mock.next_reply.fetch_add(1, Ordering::Relaxed) % replies.len();
        replies[i].clone()
    };
    if let Some(content) = &mut reply.content
        && content.contains("{{last}}")
    {
        let last = request
            .messages
            .last()
            .map(Message::text)
            .unwrap_or_default();
        *content = content.replace("{{last}}", &last);
    }
    reply
}

fn usage_of(request: &ChatRequest, reply: &ScriptedReply) -> Usage {
    reply.usage.unwrap_or_else(|| {
        let (_, mut usage) = keel_llm::providers::mock::echo(request);
        usage.completion_tokens = reply
            .content
            .as_deref()
            .map_or(1, |c| c.split_whitespace().count().max(1) as u64);
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
    let finish = if tool_calls.is_some() {
        "tool_calls"
    } else {
        "stop"
    };
    let mut message = json!({"role": "assistant", "content": reply.content});
    if let Some(calls) = tool_calls {
        message["tool_calls"] = calls;
    }
    let mut answer = json!({
        "id": format!("chatcmpl-{}", response_id()),
        "object": "chat.completion",
        "created": 0,
        "model": request.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    });
    if reports_no_usage(request)
        && let Some(obj) = answer.as_object_mut()
    {
        obj.remove("usage");
    }
    answer
}

/// Model names starting with `nousage` get answers without token counts, as some
/// OpenAI-compatible servers send.
fn reports_no_usage(request: &ChatRequest) -> bool {
    request.model.starts_with("nousage")
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
    if request
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        == Some(true)
        && !reports_no_usage(request)
    {
        events.push(
            json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                           "choices": [], "usage": usage_of(request, &reply)}),
        );
    }
    let frames = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    sse_response(frames, Some("data: [DONE]\n\n"), cut_after)
}

/// An SSE response of `frames`, then `end`; with `cut_after`, only the first N frames and
/// then a dropped connection.
/// `fault/drip`: a long stream, one chunk every `interval`, that counts itself in
/// `abandoned_streams` if its client goes away before the end — how tests see that
/// Keel cancels the upstream request when its own client disconnects.
fn drip(mock: &Arc<Mock>, request: &ChatRequest, interval: Duration) -> Response {
    struct Guard {
        mock: Arc<Mock>,
        done: bool,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            if !self.done {
                self.mock.abandoned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    const CHUNKS: u32 = 1_000;
    let model = request.model.clone();
    let guard = Guard {
        mock: mock.clone(),
        done: false,
    };
    let frames = futures_util::stream::unfold((0u32, guard), move |(i, mut guard)| {
        let model = model.clone();
        async move {
            if guard.done {
                return None;
            }
            tokio::time::sleep(interval).await;
            let frame = if i + 1 >= CHUNKS {
                guard.done = true;
                "data: [DONE]\n\n".to_owned()
            } else {
                let chunk = json!({"id": "chatcmpl-drip", "object": "chat.completion.chunk", "created": 0, "model": model,
                                   "choices": [{"index": 0, "delta": {"content": "drip "}, "finish_reason": null}]});
                format!("data: {chunk}\n\n")
            };
            Some((Ok::<_, std::io::Error>(Bytes::from(frame)), (i + 1, guard)))
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

fn sse_response(
    frames: Vec<String>,
    end: Option<&'static str>,
    cut_after: Option<usize>,
) -> Response {
    let mut frames: Vec<Result<Bytes, std::io::Error>> =
        frames.into_iter().map(|f| Ok(Bytes::from(f))).collect();
    match cut_after {
        Some(n) => {
            frames.truncate(n);
            frames.push(Err(std::io::Error::other("mock-llm cut the stream")));
        }
        None => frames.extend(end.map(|end| Ok(Bytes::from_static(end.as_bytes())))),
    }
    // Pause before a cut so the chunks before it reach the wire first: hyper drops the
    // whole response if the body fails before anything was flushed.
    let body = Body::from_stream(futures_util::stream::iter(frames).then(|frame| async move {
        if frame.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        frame
    }));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// POST /v1/messages: Anthropic Messages.
// ---------------------------------------------------------------------------------------

/// An Anthropic error body; its `type` follows the status as Anthropic's does.
fn anthropic_error(status: StatusCode, message: &str) -> Value {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

fn invalid_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(anthropic_error(StatusCode::BAD_REQUEST, message)),
    )
        .into_response()
}

/// A Messages request, as far as the mock reads it.
#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: String,
    max_tokens: u64,
    #[serde(default)]
    system: Option<Content>,
    messages: Vec<AnthropicMessage>,
    #[serde(default)]
    tools: Vec<AnthropicTool>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f64>,
    /// Every other top-level field, checked against [`MESSAGES_FIELDS`].
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// The Messages API's other top-level fields. Anthropic refuses any field not in its
/// schema, so an OpenAI-only field a translation lets through fails here as it would there.
const MESSAGES_FIELDS: &[&str] = &[
    "metadata",
    "stop_sequences",
    "top_p",
    "top_k",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
];

#[derive(Debug, Deserialize)]
struct AnthropicMessage {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
struct AnthropicTool {
    name: String,
    input_schema: Value,
}

/// Message (or system, or tool-result) content: a string or blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {},
    Document {},
    ToolUse {
        id: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<Content>,
    },
}

impl Content {
    fn blocks(&self) -> &[Block] {
        match self {
            Content::Text(_) => &[],
            Content::Blocks(blocks) => blocks,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Content::Text(text) => text.is_empty(),
            Content::Blocks(blocks) => blocks.is_empty(),
        }
    }

    /// The text, with each text block and tool result on a line of its own.
    fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Blocks(blocks) => blocks
                .iter()
                .filter_map(|block| match block {
                    Block::Text { text } => Some(text.clone()),
                    Block::ToolResult {
                        content: Some(content),
                        ..
                    } => Some(content.text()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    fn tool_use_ids(&self) -> Vec<&str> {
        let ids = self.blocks().iter().filter_map(|b| match b {
            Block::ToolUse { id, .. } => Some(id.as_str()),
            _ => None,
        });
        ids.collect()
    }

    fn tool_result_ids(&self) -> Vec<&str> {
        let ids = self.blocks().iter().filter_map(|b| match b {
            Block::ToolResult { tool_use_id, .. } => Some(tool_use_id.as_str()),
            _ => None,
        });
        ids.collect()
    }
}

impl MessagesRequest {
    /// The checks Anthropic makes that a translation could get wrong, with its wording.
    fn check(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("max_tokens: must be at least 1".to_owned());
        }
        if self.messages.is_empty() {
            return Err("messages: at least one message is required".to_owned());
        }
        if let Some(field) = self
            .other
            .keys()
            .find(|k| !MESSAGES_FIELDS.contains(&k.as_str()))
        {
            return Err(format!("{field}: Extra inputs are not permitted"));
        }
        if let Some(t) = self.temperature.filter(|t| !(0.0..=1.0).contains(t)) {
            return Err(format!(
                "temperature: Input should be between 0 and 1, got {t}"
            ));
        }
        if let Some(field) = self
            .other
            .get("metadata")
            .and_then(Value::as_object)
            .and_then(|m| m.keys().find(|k| *k != "user_id"))
        {
            return Err(format!("metadata.{field}: Extra inputs are not permitted"));
        }
        for (i, tool) in self.tools.iter().enumerate() {
            if tool.name.is_empty() {
                return Err(format!("tools.{i}.name: must not be empty"));
            }
            if !tool.input_schema.is_object() {
                return Err(format!("tools.{i}.input_schema: Input should be an object"));
            }
        }
        let last = self.messages.len() - 1;
        for (i, message) in self.messages.iter().enumerate() {
            let user = match message.role.as_str() {
                "user" => true,
                "assistant" => false,
                other => {
                    return Err(format!(
                        "messages.{i}.role: Input should be 'user' or 'assistant', not {other:?}"
                    ));
                }
            };
            if message.content.is_empty() && (user || i != last) {
                return Err(format!(
                    "messages.{i}: all messages must have non-empty content except for the optional final assistant message"
                ));
            }
            let mut other_content = false;
            for (j, block) in message.content.blocks().iter().enumerate() {
                let at = format!("messages.{i}.content.{j}");
                match block {
                    Block::Text { text } if text.is_empty() => {
                        return Err(format!("{at}.text: text content blocks must be non-empty"));
                    }
                    Block::Text { .. } | Block::Image {} | Block::Document {} => {
                        other_content = true
                    }
                    Block::ToolUse { .. } if user => {
                        return Err(format!(
                            "{at}: tool_use blocks are only allowed in assistant messages"
                        ));
                    }
                    Block::ToolUse { input, .. } if !input.is_object() => {
                        return Err(format!("{at}.input: Input should be an object"));
                    }
                    Block::ToolUse { .. } => {}
                    Block::ToolResult { .. } if !user => {
                        return Err(format!(
                            "{at}: tool_result blocks are only allowed in user messages"
                        ));
                    }
                    Block::ToolResult { .. } if other_content => {
                        return Err(format!(
                            "{at}: tool_result blocks must come first in a user message's content"
                        ));
                    }
                    Block::ToolResult { .. } => {}
                }
            }
        }
        for (i, message) in self.messages.iter().enumerate() {
            let asked_before = if i == 0 {
                Vec::new()
            } else {
                self.messages[i - 1].content.tool_use_ids()
            };
            if let Some(id) = message
                .content
                .tool_result_ids()
                .into_iter()
                .find(|id| !asked_before.contains(id))
            {
                return Err(format!(
                    "messages.{i}.content: unexpected tool_use_id found in tool_result blocks: {id}. Each tool_result \
                     block must have a corresponding tool_use block in the previous message."
                ));
            }
            let answered_next = self
                .messages
                .get(i + 1)
                .map(|m| m.content.tool_result_ids())
                .unwrap_or_default();
            let unanswered: Vec<&str> = message
                .content
                .tool_use_ids()
                .into_iter()
                .filter(|id| !answered_next.contains(id))
                .collect();
            if !unanswered.is_empty() {
                return Err(format!(
                    "messages.{}: tool_use ids were found without tool_result blocks immediately after: {}. Each \
                     tool_use block must have a corresponding tool_result block in the next message.",
                    i + 1,
                    unanswered.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The request as Chat Completions text messages: what the shared echo, script and
    /// usage helpers read.
    fn to_chat(&self) -> ChatRequest {
        let message = |role: &str, text: String| Message {
            role: role.to_owned(),
            content: Some(Value::String(text)),
            tool_calls: None,
            tool_call_id: None,
            extra: Map::new(),
        };
        let system = self.system.iter().map(|s| message("system", s.text()));
        let turns = self
            .messages
            .iter()
            .map(|m| message(&m.role, m.content.text()));
        ChatRequest {
            model: self.model.clone(),
            messages: system.chain(turns).collect(),
            stream: Some(self.stream),
            stream_options: None,
            temperature: None,
            tools: None,
            extra: Map::new(),
        }
    }
}

async fn messages(State(mock): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if !headers.contains_key("anthropic-version") {
        return invalid_request("anthropic-version: header is required");
    }
    let request: MessagesRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return invalid_request(&format!("invalid request body: {e}")),
    };
    if let Err(message) = request.check() {
        return invalid_request(&message);
    }
    let chat = request.to_chat();
    let cut_after = match plan(&mock, &request.model, request.stream, Wire::Anthropic).await {
        Plan::Answer(response) => return response,
        Plan::Reply { cut_after } => cut_after,
    };
    let reply = next_reply(&mock, &chat);
    if request.stream {
        anthropic_stream(&chat, &reply, cut_after)
    } else {
        Json(anthropic_message(&chat, &reply)).into_response()
    }
}

fn tool_use_id(i: usize) -> String {
    format!("toolu_{i}")
}

/// A scripted call's arguments as a `tool_use` input, which must be an object.
fn tool_input(arguments: &Value) -> Value {
    if arguments.is_null() {
        json!({})
    } else {
        arguments.clone()
    }
}

fn stop_reason(reply: &ScriptedReply) -> &'static str {
    if reply.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    }
}

/// The reply's text, when it has a text block: when it has text, or nothing else.
fn reply_text(reply: &ScriptedReply) -> Option<&str> {
    let text = reply.content.as_deref().unwrap_or_default();
    (!text.is_empty() || reply.tool_calls.is_empty()).then_some(text)
}

fn anthropic_message(request: &ChatRequest, reply: &ScriptedReply) -> Value {
    let usage = usage_of(request, reply);
    let mut content: Vec<Value> = reply_text(reply)
        .map(|text| json!({"type": "text", "text": text}))
        .into_iter()
        .collect();
    for (i, call) in reply.tool_calls.iter().enumerate() {
        content.push(json!({"type": "tool_use", "id": tool_use_id(i), "name": call.name, "input": tool_input(&call.arguments)}));
    }
    json!({
        "id": format!("msg_{}", response_id()),
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": stop_reason(reply),
        "stop_sequence": null,
        "usage": anthropic_usage(&usage, usage.completion_tokens),
    })
}

/// Usage as Anthropic reports it: prompt-cache reads and writes apart from `input_tokens`.
fn anthropic_usage(usage: &Usage, output_tokens: u64) -> Value {
    let (read, written) = (usage.cached_tokens(), usage.cache_write_tokens());
    json!({
        "input_tokens": usage.prompt_tokens.saturating_sub(read).saturating_sub(written),
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": written,
        "output_tokens": output_tokens,
    })
}

/// The Messages event sequence: `message_start`, `ping`, each content block (start,
/// deltas — text word by word, tool input in fragments — stop), `message_delta`,
/// `message_stop`.
fn anthropic_stream(
    request: &ChatRequest,
    reply: &ScriptedReply,
    cut_after: Option<usize>,
) -> Response {
    let usage = usage_of(request, reply);
    let mut events = vec![
        json!({"type": "message_start", "message": {
            "id": format!("msg_{}", response_id()), "type": "message", "role": "assistant", "model": request.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": anthropic_usage(&usage, 1),
        }}),
        json!({"type": "ping"}),
    ];
    let delta = |index: usize, delta: Value| json!({"type": "content_block_delta", "index": index, "delta": delta});
    let mut index = 0;
    if let Some(text) = reply_text(reply) {
        events.push(json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}));
        for word in text.split_inclusive(' ') {
            events.push(delta(index, json!({"type": "text_delta", "text": word})));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
        index += 1;
    }
    for (i, call) in reply.tool_calls.iter().enumerate() {
        let block =
            json!({"type": "tool_use", "id": tool_use_id(i), "name": call.name, "input": {}});
        events.push(json!({"type": "content_block_start", "index": index, "content_block": block}));
        events.push(delta(
            index,
            json!({"type": "input_json_delta", "partial_json": ""}),
        ));
        let input: Vec<char> = tool_input(&call.arguments).to_string().chars().collect();
        for fragment in input.chunks(8) {
            let fragment: String = fragment.iter().collect();
            events.push(delta(
                index,
                json!({"type": "input_json_delta", "partial_json": fragment}),
            ));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
        index += 1;
    }
    events.push(json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(reply), "stop_sequence": null},
                       "usage": {"output_tokens": usage.completion_tokens}}));
    events.push(json!({"type": "message_stop"}));
    let frames = events
        .iter()
        .map(|e| {
            format!(
                "event: {}\ndata: {e}\n\n",
                e["type"].as_str().unwrap_or_default()
            )
        })
        .collect();
    sse_response(frames, None, cut_after)
}
