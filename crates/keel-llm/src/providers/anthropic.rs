//! Anthropic Messages (`POST /v1/messages`), translated to and from the OpenAI shapes in
//! [`crate::types`], so neither the router nor the caller can tell which protocol served
//! them.
//!
//! `base_url` is the API root, as Anthropic's own SDKs take it (`https://api.anthropic.com`,
//! the default), and `/v1/messages` is appended. A root that already ends in `/v1` (what
//! `keel mock-llm` prints, what an OpenAI-style target holds) is accepted as well.
//!
//! The translation never drops what the caller asked for in silence: what Anthropic cannot
//! do (several choices, log-probabilities, a JSON `response_format`, content parts other
//! than text and images, tool-call arguments that are not a JSON object, audio, predicted
//! outputs, OpenAI's web search, the old `functions`, a `temperature` above Anthropic's
//! maximum of 1) is refused as the caller's mistake (`ErrorKind::Client`) before anything
//! is sent. Only OpenAI tuning knobs with no Anthropic counterpart (`seed`, the penalties,
//! `logit_bias`, prompt-cache keys, …) are left out; the end user (`metadata.user_id`,
//! `safety_identifier` or `user`) becomes `metadata.user_id`; any other field passes
//! through untouched, so Anthropic's own (`top_k`, `thinking`) work. As with every
//! provider, a stream that closes before its terminal event (`message_stop`) is a failure,
//! not a short answer.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use keel_core::config::Target;
use reqwest::header::HeaderValue;
use serde_json::{Map, Value, json};

use super::transport_error;
use crate::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, Provider};
use crate::sse;
use crate::types::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, FunctionCall, Message,
    PromptTokensDetails, ToolCall, Usage,
};

/// The Messages API version Keel speaks, sent as `anthropic-version`.
pub const API_VERSION: &str = "2023-06-01";

/// `max_tokens` when the caller sets none: Anthropic requires it, OpenAI does not.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// OpenAI request fields with no Anthropic counterpart. They tune sampling or storage on
/// OpenAI's side only, so they are left out rather than sent (Anthropic rejects unknown
/// fields).
const DROPPED: &[&str] = &[
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "store",
    "service_tier",
    "top_logprobs",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// OpenAI request fields asking for something Anthropic Messages cannot give (audio,
/// predicted outputs, OpenAI's web search, the pre-tools function calling): refused as the
/// caller's mistake, with what to use instead.
const REFUSED: &[(&str, &str)] = &[
    ("audio", "the anthropic provider answers with text only"),
    (
        "prediction",
        "the anthropic provider has no predicted outputs",
    ),
    (
        "web_search_options",
        "the anthropic provider has no OpenAI web search; offer a search tool instead",
    ),
    (
        "functions",
        "use tools, which the anthropic provider translates",
    ),
    (
        "function_call",
        "use tool_choice, which the anthropic provider translates",
    ),
];

/// A target that speaks Anthropic Messages.
#[derive(Debug)]
pub struct Anthropic {
    client: reqwest::Client,
    url: reqwest::Url,
    model: String,
    /// Marked sensitive, so `Debug` never shows it.
    api_key: Option<HeaderValue>,
    first_token_timeout: Duration,
    total_timeout: Duration,
}

impl Anthropic {
    /// A provider for `target`, with its API key already read from the environment.
    pub fn new(target: &Target, api_key: Option<String>) -> Result<Self, ProviderError> {
        if target.model.is_empty() {
            return Err(client_error(
                "model: the anthropic provider needs the upstream model name",
            ));
        }
        let api_key = api_key
            .map(|key| {
                let mut value = HeaderValue::from_str(&key).map_err(|_| {
                    client_error("the API key holds characters an HTTP header cannot carry")
                })?;
                value.set_sensitive(true);
                Ok::<_, ProviderError>(value)
            })
            .transpose()?;
        let client = super::http_client(target)?;
        Ok(Self {
            client,
            // Parsed once here rather than by every request.
            url: reqwest::Url::parse(&messages_url(target.base_url.as_deref()))
                .map_err(|e| client_error(format!("base_url does not make a valid URL: {e}")))?,
            model: target.model.clone(),
            api_key,
            first_token_timeout: target.first_token_timeout,
            total_timeout: target.total_timeout,
        })
    }

    fn request(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(self.url.clone())
            .timeout(self.total_timeout)
            .header("anthropic-version", API_VERSION)
            .json(body);
        if let Some(key) = &self.api_key {
            req = req.header("x-api-key", key.clone());
        }
        req
    }

    async fn send(&self, body: &Value) -> Result<reqwest::Response, ProviderError> {
        super::send(self.request(body)).await
    }
}

/// `{base}/v1/messages`, whether or not `base` already ends in `/v1`.
fn messages_url(base_url: Option<&str>) -> String {
    let base = base_url.unwrap_or(DEFAULT_BASE_URL).trim_end_matches('/');
    let root = base.strip_suffix("/v1").unwrap_or(base);
    format!("{root}/v1/messages")
}

#[async_trait::async_trait]
impl Provider for Anthropic {
    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = to_messages_request(request, &self.model, false)?;
        let call = async {
            let response = self.send(&body).await?;
            let bytes = super::read_capped(response, super::MAX_ANSWER_BYTES).await?;
            let message = serde_json::from_slice::<wire::Message>(&bytes).map_err(|e| {
                ProviderError::new(
                    ErrorKind::InvalidResponse,
                    format!("upstream sent malformed JSON: {e}"),
                )
            })?;
            Ok(to_chat_response(message, &self.model, now()))
        };
        match tokio::time::timeout(self.total_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::new(
                ErrorKind::Timeout,
                format!("no answer within {:?}", self.total_timeout),
            )),
        }
    }

    async fn chat_stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = to_messages_request(request, &self.model, true)?;
        // Anthropic always reports usage; emit it as a chunk so accounting is exact (the
        // gateway passes it on only to clients that asked for it).
        let translator = StreamTranslator::new(self.model.clone(), now(), true);
        super::first_chunk(self.first_token_timeout, async {
            let response = self.send(&body).await?;
            Ok(chunk_stream(response.bytes_stream(), translator))
        })
        .await
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn client_error(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::Client, message)
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidResponse, message)
}

// ---------------------------------------------------------------------------------------
// Request: OpenAI → Anthropic.
// ---------------------------------------------------------------------------------------

/// The Anthropic request body for `request`, addressed to the upstream `model`.
///
/// System and developer messages become the top-level `system` (joined with a blank
/// line); consecutive `tool` messages become one user message of `tool_result` blocks;
/// an assistant message with neither text nor tool calls is left out (Anthropic rejects
/// empty turns, and it carries nothing).
fn to_messages_request(
    request: &ChatRequest,
    model: &str,
    stream: bool,
) -> Result<Value, ProviderError> {
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut tool_results: Vec<Value> = Vec::new();
    for (i, message) in request.messages.iter().enumerate() {
        if message.role != "tool" && !tool_results.is_empty() {
            messages.push(json!({"role": "user", "content": std::mem::take(&mut tool_results)}));
        }
        match message.role.as_str() {
            "system" | "developer" => {
                let text = message.text();
                if !text.is_empty() {
                    system.push(text);
                }
            }
            "user" => messages.push(json!({"role": "user", "content": user_content(message, i)?})),
            "assistant" => {
                let blocks = assistant_content(message, i)?;
                if !blocks.is_empty() {
                    messages.push(json!({"role": "assistant", "content": blocks}));
                }
            }
            "tool" => tool_results.push(tool_result(message, i)?),
            other => {
                return Err(client_error(format!(
                    "messages[{i}].role: {other:?} is not supported by the anthropic provider"
                )));
            }
        }
    }
    if !tool_results.is_empty() {
        messages.push(json!({"role": "user", "content": tool_results}));
    }
    if messages.is_empty() {
        return Err(client_error(
            "messages: the anthropic provider needs at least one user or assistant message besides the system prompt",
        ));
    }

    let mut body = Map::new();
    body.insert("model".to_owned(), json!(model));
    body.insert("max_tokens".to_owned(), json!(max_tokens(&request.extra)?));
    if !system.is_empty() {
        body.insert("system".to_owned(), json!(system.join("\n\n")));
    }
    body.insert("messages".to_owned(), Value::Array(messages));
    if let Some(temperature) = request.temperature {
        if !(0.0..=1.0).contains(&temperature) {
            return Err(client_error(format!(
                "temperature: the anthropic provider takes 0 to 1 (OpenAI's range is 0 to 2), got {temperature}"
            )));
        }
        body.insert("temperature".to_owned(), json!(temperature));
    }
    if let Some(user_id) = end_user(&request.extra) {
        body.insert("metadata".to_owned(), json!({"user_id": user_id}));
    }
    let has_tools = request.tools.as_ref().is_some_and(|t| !t.is_empty());
    if let Some(tools) = request.tools.as_ref().filter(|t| !t.is_empty()) {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(j, t)| tool_definition(t, j))
            .collect::<Result<Vec<_>, _>>()?;
        body.insert("tools".to_owned(), Value::Array(tools));
    }
    let parallel = request
        .extra
        .get("parallel_tool_calls")
        .and_then(Value::as_bool);
    if let Some(choice) = tool_choice(request.extra.get("tool_choice"), parallel, has_tools)? {
        body.insert("tool_choice".to_owned(), choice);
    }
    for (key, value) in &request.extra {
        if value.is_null() {
            continue;
        }
        if let Some((_, why)) = REFUSED.iter().find(|(field, _)| field == key) {
            return Err(client_error(format!("{key}: {why}")));
        }
        match key.as_str() {
            "max_tokens" | "max_completion_tokens" | "tool_choice" | "parallel_tool_calls" => {}
            "stop" => {
                if let Some(sequences) = stop_sequences(value)? {
                    body.insert("stop_sequences".to_owned(), sequences);
                }
            }
            "n" => {
                if value.as_u64() != Some(1) {
                    return Err(client_error(
                        "n: the anthropic provider answers with one choice only",
                    ));
                }
            }
            "logprobs" => {
                if value.as_bool() == Some(true) {
                    return Err(client_error(
                        "logprobs: the anthropic provider has no log-probabilities",
                    ));
                }
            }
            "response_format" => {
                let kind = value.get("type").and_then(Value::as_str);
                if kind != Some("text") {
                    return Err(client_error(format!(
                        "response_format: {} is not supported by the anthropic provider; describe the format in \
                         the prompt or ask for it through a tool",
                        kind.unwrap_or("this format")
                    )));
                }
            }
            "user" | "safety_identifier" | "metadata" => {}
            "modalities" => {
                let text_only = value
                    .as_array()
                    .is_some_and(|m| m.iter().all(|m| m.as_str() == Some("text")));
                if !text_only {
                    return Err(client_error(
                        "modalities: the anthropic provider answers with text only",
                    ));
                }
            }
            dropped if DROPPED.contains(&dropped) => {}
            _ => {
                body.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
    if stream {
        body.insert("stream".to_owned(), Value::Bool(true));
    }
    Ok(Value::Object(body))
}

/// The end user's id for Anthropic's `metadata.user_id`: the caller's own
/// `metadata.user_id`, else OpenAI's `safety_identifier`, else its older `user`. OpenAI's
/// other `metadata` keys tag stored completions, which mean nothing here (like `store`),
/// and Anthropic refuses them, so they are left out.
fn end_user(extra: &Map<String, Value>) -> Option<&str> {
    extra
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .or_else(|| extra.get("safety_identifier"))
        .or_else(|| extra.get("user"))
        .and_then(Value::as_str)
}

/// `max_completion_tokens` (the current name), else `max_tokens`, else the default.
fn max_tokens(extra: &Map<String, Value>) -> Result<u64, ProviderError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match extra.get(key) {
            None | Some(Value::Null) => {}
            Some(value) => {
                return value
                    .as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| client_error(format!("{key}: must be a positive integer")));
            }
        }
    }
    Ok(DEFAULT_MAX_TOKENS)
}

fn user_content(message: &Message, i: usize) -> Result<Value, ProviderError> {
    match &message.content {
        Some(Value::String(text)) => Ok(json!([{"type": "text", "text": text}])),
        Some(Value::Array(parts)) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                if let Some(block) = content_part(part, &format!("messages[{i}].content[{j}]"))? {
                    blocks.push(block);
                }
            }
            Ok(Value::Array(blocks))
        }
        _ => Err(client_error(format!(
            "messages[{i}].content: a user message needs text or content parts"
        ))),
    }
}

/// One OpenAI content part as an Anthropic block; `None` for an empty text part, which
/// Anthropic would reject and which says nothing.
fn content_part(part: &Value, at: &str) -> Result<Option<Value>, ProviderError> {
    match part.get("type").and_then(Value::as_str) {
        Some(kind @ ("text" | "refusal")) => {
            let text = part
                .get(kind)
                .and_then(Value::as_str)
                .ok_or_else(|| client_error(format!("{at}.{kind}: must be a string")))?;
            Ok((!text.is_empty()).then(|| json!({"type": "text", "text": text})))
        }
        Some("image_url") => {
            let url = part
                .get("image_url")
                .and_then(|image| image.get("url").or(Some(image)))
                .and_then(Value::as_str)
                .ok_or_else(|| client_error(format!("{at}.image_url.url: must be a string")))?;
            image_block(url, at).map(Some)
        }
        other => Err(client_error(format!(
            "{at}: content part type {} is not supported by the anthropic provider (text and image_url are)",
            other.map_or_else(|| "(missing)".to_owned(), |t| format!("{t:?}"))
        ))),
    }
}

/// An image block: a `data:` URL becomes a base64 source, anything else a URL source.
fn image_block(url: &str, at: &str) -> Result<Value, ProviderError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    };
    let (meta, data) = rest.split_once(',').ok_or_else(|| {
        client_error(format!(
            "{at}.image_url.url: a data URL needs a comma before its data"
        ))
    })?;
    let media_type = meta.strip_suffix(";base64").ok_or_else(|| {
        client_error(format!(
            "{at}.image_url.url: only base64 data URLs are supported"
        ))
    })?;
    Ok(
        json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
    )
}

/// An assistant message's blocks: its text, then a `tool_use` block per tool call.
fn assistant_content(message: &Message, i: usize) -> Result<Vec<Value>, ProviderError> {
    let mut blocks = Vec::new();
    match &message.content {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => {
            if !text.is_empty() {
                blocks.push(json!({"type": "text", "text": text}));
            }
        }
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                if let Some(block) = content_part(part, &format!("messages[{i}].content[{j}]"))? {
                    blocks.push(block);
                }
            }
        }
        Some(_) => {
            return Err(client_error(format!(
                "messages[{i}].content: must be a string or content parts"
            )));
        }
    }
    for (j, call) in message.tool_calls.iter().flatten().enumerate() {
        let at = format!("messages[{i}].tool_calls[{j}]");
        blocks.push(json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.function.name,
            "input": tool_input(&call.function.arguments, &at)?,
        }));
    }
    Ok(blocks)
}

/// A tool call's JSON-encoded arguments as the object Anthropic wants. Empty arguments
/// are an empty object; anything else that is not a JSON object is refused, because
/// guessing would send the model a call it never made.
fn tool_input(arguments: &str, at: &str) -> Result<Value, ProviderError> {
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(input @ Value::Object(_)) => Ok(input),
        Ok(_) => Err(client_error(format!(
            "{at}.function.arguments: must encode a JSON object"
        ))),
        Err(e) => Err(client_error(format!(
            "{at}.function.arguments: not valid JSON ({e})"
        ))),
    }
}

fn tool_result(message: &Message, i: usize) -> Result<Value, ProviderError> {
    let id = message
        .tool_call_id
        .as_deref()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            client_error(format!(
                "messages[{i}].tool_call_id: a tool message must name the call it answers"
            ))
        })?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    let text = message.text();
    if !text.is_empty() {
        block["content"] = json!(text);
    }
    Ok(block)
}

/// An OpenAI function tool as an Anthropic tool.
fn tool_definition(tool: &Value, j: usize) -> Result<Value, ProviderError> {
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(client_error(format!(
            "tools[{j}].type: the anthropic provider translates function tools only"
        )));
    }
    let function = tool
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| client_error(format!("tools[{j}].function: must be an object")))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            client_error(format!(
                "tools[{j}].function.name: must be a non-empty string"
            ))
        })?;
    let schema = function
        .get("parameters")
        .filter(|p| !p.is_null())
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    let mut out = json!({"name": name, "input_schema": schema});
    if let Some(description) = function.get("description").and_then(Value::as_str) {
        out["description"] = json!(description);
    }
    Ok(out)
}

/// OpenAI `tool_choice` (and `parallel_tool_calls: false`) as Anthropic `tool_choice`.
fn tool_choice(
    choice: Option<&Value>,
    parallel: Option<bool>,
    has_tools: bool,
) -> Result<Option<Value>, ProviderError> {
    let mut out = match choice {
        None | Some(Value::Null) => {
            if parallel == Some(false) && has_tools {
                json!({"type": "auto"})
            } else {
                return Ok(None);
            }
        }
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => return Ok(Some(json!({"type": "none"}))),
            "required" => json!({"type": "any"}),
            other => {
                return Err(client_error(format!(
                    "tool_choice: {other:?} is not auto, none or required"
                )));
            }
        },
        Some(Value::Object(object)) => {
            let name = object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| object.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    client_error(r#"tool_choice: an object must be {"type": "function", "function": {"name": …}}"#)
                })?;
            json!({"type": "tool", "name": name})
        }
        Some(_) => return Err(client_error("tool_choice: must be a string or an object")),
    };
    if parallel == Some(false) {
        out["disable_parallel_tool_use"] = Value::Bool(true);
    }
    Ok(Some(out))
}

/// OpenAI `stop` (a string or an array of them) as `stop_sequences`; `None` when empty.
fn stop_sequences(stop: &Value) -> Result<Option<Value>, ProviderError> {
    match stop {
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(json!([s]))),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            Ok((!items.is_empty()).then(|| Value::Array(items.clone())))
        }
        _ => Err(client_error(
            "stop: must be a string or an array of strings",
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Response: Anthropic → OpenAI.
// ---------------------------------------------------------------------------------------

/// Anthropic's wire types, as far as Keel reads them. Unknown block, delta and event types
/// are tolerated (`Other`), as Anthropic asks of clients, so new features do not break
/// old gateways.
mod wire {
    use serde::Deserialize;
    use serde_json::Value;

    /// A whole answer.
    #[derive(Debug, Deserialize)]
    pub(super) struct Message {
        pub id: String,
        #[serde(default)]
        pub content: Vec<Block>,
        #[serde(default)]
        pub stop_reason: Option<String>,
        #[serde(default)]
        pub usage: Usage,
    }

    /// A content block.
    #[derive(Debug, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub(super) enum Block {
        Text {
            #[serde(default)]
            text: String,
        },
        ToolUse {
            id: String,
            name: String,
            #[serde(default)]
            input: Value,
        },
        #[serde(other)]
        Other,
    }

    /// Token counts. Cached prompt tokens are counted apart from `input_tokens`.
    #[derive(Debug, Clone, Copy, Default, Deserialize)]
    pub(super) struct Usage {
        #[serde(default)]
        pub input_tokens: Option<u64>,
        #[serde(default)]
        pub output_tokens: Option<u64>,
        #[serde(default)]
        pub cache_creation_input_tokens: Option<u64>,
        #[serde(default)]
        pub cache_read_input_tokens: Option<u64>,
    }

    /// One streamed event (its `data`, tagged by `type`).
    #[derive(Debug, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub(super) enum Event {
        MessageStart {
            message: StartedMessage,
        },
        ContentBlockStart {
            index: u64,
            content_block: Block,
        },
        ContentBlockDelta {
            index: u64,
            delta: Delta,
        },
        ContentBlockStop {
            index: u64,
        },
        MessageDelta {
            #[serde(default)]
            delta: MessageDelta,
            #[serde(default)]
            usage: Option<Usage>,
        },
        MessageStop,
        Ping,
        Error {
            error: ErrorBody,
        },
        #[serde(other)]
        Other,
    }

    /// `message_start`'s message: only its id and usage matter.
    #[derive(Debug, Deserialize)]
    pub(super) struct StartedMessage {
        pub id: String,
        #[serde(default)]
        pub usage: Usage,
    }

    /// A content block's delta.
    #[derive(Debug, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub(super) enum Delta {
        #[serde(rename = "text_delta")]
        Text { text: String },
        #[serde(rename = "input_json_delta")]
        InputJson { partial_json: String },
        #[serde(other)]
        Other,
    }

    /// `message_delta`'s delta.
    #[derive(Debug, Default, Deserialize)]
    pub(super) struct MessageDelta {
        #[serde(default)]
        pub stop_reason: Option<String>,
    }

    /// An `error` event's error.
    #[derive(Debug, Deserialize)]
    pub(super) struct ErrorBody {
        #[serde(rename = "type", default)]
        pub kind: String,
        #[serde(default)]
        pub message: String,
    }
}

impl wire::Usage {
    /// Prompt tokens as OpenAI counts them: cached ones included.
    fn prompt_tokens(&self) -> u64 {
        let parts = [
            self.input_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ];
        parts
            .iter()
            .flatten()
            .fold(0u64, |sum, n| sum.saturating_add(*n))
    }

    /// The OpenAI counts; cache reads and writes, when there are any, are told apart in
    /// `prompt_tokens_details` so they are priced as the target's cache prices say.
    fn to_openai(self) -> Usage {
        let mut usage = Usage::new(self.prompt_tokens(), self.output_tokens.unwrap_or(0));
        let details = PromptTokensDetails {
            cached_tokens: self.cache_read_input_tokens.unwrap_or(0),
            cache_write_tokens: self.cache_creation_input_tokens.unwrap_or(0),
        };
        if details != PromptTokensDetails::default() {
            usage.prompt_tokens_details = Some(details);
        }
        usage
    }

    /// Takes every count `later` carries (`message_delta` counts are cumulative).
    fn update(&mut self, later: Self) {
        let take = |mine: &mut Option<u64>, theirs: Option<u64>| {
            if theirs.is_some() {
                *mine = theirs;
            }
        };
        take(&mut self.input_tokens, later.input_tokens);
        take(&mut self.output_tokens, later.output_tokens);
        take(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        take(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
    }
}

/// Anthropic `stop_reason` as OpenAI `finish_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and none given.
        _ => "stop",
    }
}

/// A tool call's input as OpenAI's JSON-encoded arguments.
fn arguments(input: &Value) -> String {
    if input.is_null() {
        "{}".to_owned()
    } else {
        input.to_string()
    }
}

fn to_chat_response(message: wire::Message, model: &str, created: u64) -> ChatResponse {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in message.content {
        match block {
            wire::Block::Text { text: part } => text.push_str(&part),
            wire::Block::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                kind: "function".to_owned(),
                function: FunctionCall {
                    name,
                    arguments: arguments(&input),
                },
            }),
            wire::Block::Other => {}
        }
    }
    // OpenAI sends `content: null` on a message that only calls tools.
    let content = if text.is_empty() && !tool_calls.is_empty() {
        None
    } else {
        Some(Value::String(text))
    };
    ChatResponse {
        id: message.id,
        object: "chat.completion".to_owned(),
        created,
        model: model.to_owned(),
        choices: vec![Choice {
            index: 0,
            message: Message {
                role: "assistant".to_owned(),
                content,
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                tool_call_id: None,
                extra: Map::new(),
            },
            finish_reason: Some(finish_reason(message.stop_reason.as_deref()).to_owned()),
            extra: Map::new(),
        }],
        usage: Some(message.usage.to_openai()),
        extra: Map::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Streaming: Anthropic events → OpenAI chunks.
// ---------------------------------------------------------------------------------------

/// Turns Anthropic stream events into OpenAI chunks, one event at a time. Kept apart
/// from the I/O so the translation can be tested event by event.
#[derive(Debug)]
struct StreamTranslator {
    model: String,
    created: u64,
    include_usage: bool,
    /// The message id, once `message_start` gave it.
    id: Option<String>,
    usage: wire::Usage,
    /// Content-block index → (tool-call index, whether an argument fragment was sent).
    tools: HashMap<u64, (u32, bool)>,
    finish_sent: bool,
    /// `message_stop` arrived: the answer is complete.
    stopped: bool,
}

impl StreamTranslator {
    fn new(model: String, created: u64, include_usage: bool) -> Self {
        Self {
            model,
            created,
            include_usage,
            id: None,
            usage: wire::Usage::default(),
            tools: HashMap::new(),
            finish_sent: false,
            stopped: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone().unwrap_or_default(),
            object: "chat.completion.chunk".to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_owned),
                extra: Map::new(),
            }],
            usage: None,
            extra: Map::new(),
        }
    }

    fn arguments_chunk(&self, tool: u32, fragment: &str) -> ChatChunk {
        self.chunk(
            json!({"tool_calls": [{"index": tool, "function": {"arguments": fragment}}]}),
            None,
        )
    }

    /// Translates one event's `data`, appending the chunks it makes to `out`.
    fn on_event(&mut self, data: &str, out: &mut VecDeque<ChatChunk>) -> Result<(), ProviderError> {
        use wire::{Block, Delta, Event};
        let event: Event = serde_json::from_str(data)
            .map_err(|e| invalid(format!("upstream sent a malformed event: {e}")))?;
        let started = self.id.is_some();
        match event {
            Event::MessageStart { message } => {
                if started {
                    return Err(invalid("upstream sent message_start twice"));
                }
                self.id = Some(message.id);
                self.usage = message.usage;
                out.push_back(self.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            Event::Ping | Event::Other => {}
            Event::Error { error } => return Err(stream_error(&error)),
            _ if !started => return Err(invalid("upstream sent content before message_start")),
            Event::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                Block::Text { text } => {
                    if !text.is_empty() {
                        out.push_back(self.chunk(json!({"content": text}), None));
                    }
                }
                Block::ToolUse { id, name, .. } => {
                    let tool = u32::try_from(self.tools.len()).unwrap_or(u32::MAX);
                    self.tools.insert(index, (tool, false));
                    out.push_back(self.chunk(
                        json!({"tool_calls": [{"index": tool, "id": id, "type": "function",
                                               "function": {"name": name, "arguments": ""}}]}),
                        None,
                    ));
                }
                Block::Other => {}
            },
            Event::ContentBlockDelta { index, delta } => match delta {
                Delta::Text { text } => {
                    if !text.is_empty() {
                        out.push_back(self.chunk(json!({"content": text}), None));
                    }
                }
                Delta::InputJson { partial_json } => {
                    let Some((tool, sent)) = self.tools.get_mut(&index) else {
                        return Err(invalid(format!(
                            "upstream sent input_json_delta for block {index}, not a tool_use"
                        )));
                    };
                    if !partial_json.is_empty() {
                        *sent = true;
                        let tool = *tool;
                        out.push_back(self.arguments_chunk(tool, &partial_json));
                    }
                }
                Delta::Other => {}
            },
            Event::ContentBlockStop { index } => {
                // A call without arguments streams none; OpenAI clients expect `{}`.
                if let Some((tool, sent)) = self.tools.get_mut(&index).filter(|(_, sent)| !*sent) {
                    *sent = true;
                    let tool = *tool;
                    out.push_back(self.arguments_chunk(tool, "{}"));
                }
            }
            Event::MessageDelta { delta, usage } => {
                if let Some(usage) = usage {
                    self.usage.update(usage);
                }
                if !self.finish_sent {
                    self.finish_sent = true;
                    out.push_back(
                        self.chunk(json!({}), Some(finish_reason(delta.stop_reason.as_deref()))),
                    );
                }
            }
            Event::MessageStop => {
                if !self.finish_sent {
                    self.finish_sent = true;
                    out.push_back(self.chunk(json!({}), Some("stop")));
                }
                if self.include_usage {
                    let mut last = self.chunk(json!({}), None);
                    last.choices.clear();
                    last.usage = Some(self.usage.to_openai());
                    out.push_back(last);
                }
                self.stopped = true;
            }
        }
        Ok(())
    }
}

/// An `error` event, classified: overloaded and internal errors are the server's, a rate
/// limit is a rate limit, anything else is an answer Keel cannot use.
fn stream_error(error: &wire::ErrorBody) -> ProviderError {
    let kind = match error.kind.as_str() {
        "overloaded_error" | "api_error" => ErrorKind::Server,
        "rate_limit_error" => ErrorKind::RateLimit,
        _ => ErrorKind::InvalidResponse,
    };
    let mut message = String::from("upstream sent an error event");
    if !error.kind.is_empty() {
        let _ = write!(message, " ({})", error.kind);
    }
    if !error.message.is_empty() {
        let _ = write!(message, ": {}", error.message);
    }
    ProviderError::new(kind, message)
}

/// Reads an upstream SSE body into chunks. The stream must end with `message_stop`; a
/// connection that closes before it is a failure, not a short answer.
fn chunk_stream<S>(bytes: S, translator: StreamTranslator) -> ChunkStream
where
    S: Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
{
    struct Pump<S> {
        bytes: S,
        reader: sse::Reader,
        translator: StreamTranslator,
        ready: VecDeque<ChatChunk>,
        failed: bool,
    }
    let pump = Pump {
        bytes,
        reader: sse::Reader::default(),
        translator,
        ready: VecDeque::new(),
        failed: false,
    };
    Box::pin(futures_util::stream::unfold(pump, |mut p| async move {
        loop {
            if let Some(chunk) = p.ready.pop_front() {
                return Some((Ok(chunk), p));
            }
            if p.failed || p.translator.stopped {
                return None;
            }
            if let Some(event) = p.reader.next_event() {
                if let Err(e) = p.translator.on_event(&event.data, &mut p.ready) {
                    p.failed = true;
                    return Some((Err(e), p));
                }
                continue;
            }
            if p.reader.overflowed() {
                p.failed = true;
                return Some((Err(invalid("upstream event larger than 4 MiB")), p));
            }
            match p.bytes.next().await {
                Some(Ok(chunk)) => p.reader.push(&chunk),
                Some(Err(e)) => {
                    p.failed = true;
                    return Some((Err(transport_error(&e)), p));
                }
                None => {
                    p.failed = true;
                    let e = ProviderError::new(
                        ErrorKind::Connect,
                        "upstream closed the stream before message_stop",
                    );
                    return Some((Err(e), p));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ChatRequest {
        serde_json::from_value(body).unwrap()
    }

    fn translate(body: Value) -> Result<Value, ProviderError> {
        to_messages_request(&request(body), "claude-test", false)
    }

    fn target(base_url: Option<&str>) -> Target {
        Target {
            provider: keel_core::config::ProviderKind::Anthropic,
            model: "claude-test".to_owned(),
            base_url: base_url.map(str::to_owned),
            api_key_env: None,
            api_version: None,
            connect_timeout: Duration::from_secs(1),
            first_token_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(1),
            input_price_per_mtok: 0.0,
            output_price_per_mtok: 0.0,
            cached_input_price_per_mtok: None,
            cache_write_price_per_mtok: None,
            max_concurrency: 1,
            weight: 1,
            stream_usage: true,
            context_window: None,
        }
    }

    #[test]
    fn the_url_is_the_root_plus_v1_messages_with_or_without_v1() {
        assert_eq!(messages_url(None), "https://api.anthropic.com/v1/messages");
        assert_eq!(messages_url(Some("http://h:1")), "http://h:1/v1/messages");
        assert_eq!(messages_url(Some("http://h:1/")), "http://h:1/v1/messages");
        assert_eq!(
            messages_url(Some("http://h:1/v1")),
            "http://h:1/v1/messages"
        );
        assert_eq!(
            messages_url(Some("http://h:1/proxy/v1/")),
            "http://h:1/proxy/v1/messages"
        );
    }

    #[test]
    fn requests_carry_the_key_and_version_headers_and_debug_hides_the_key() {
        let provider = Anthropic::new(
            &target(Some("http://h:1")),
            Some("sk-ant-secret".to_owned()),
        )
        .unwrap();
        let req = provider.request(&json!({})).build().unwrap();
        assert_eq!(req.url().as_str(), "http://h:1/v1/messages");
        assert_eq!(req.headers()["x-api-key"], "sk-ant-secret");
        assert_eq!(req.headers()["anthropic-version"], API_VERSION);
        assert_eq!(req.headers()["content-type"], "application/json");
        assert!(!format!("{provider:?}").contains("sk-ant-secret"));

        let keyless = Anthropic::new(&target(None), None).unwrap();
        assert!(
            keyless
                .request(&json!({}))
                .build()
                .unwrap()
                .headers()
                .get("x-api-key")
                .is_none()
        );
        let mut no_model = target(None);
        no_model.model.clear();
        assert_eq!(
            Anthropic::new(&no_model, None).unwrap_err().kind,
            ErrorKind::Client
        );
    }

    #[test]
    fn system_and_developer_messages_are_joined_into_system() {
        let body = translate(json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "hi"},
        ]}))
        .unwrap();
        assert_eq!(body["system"], "Be brief.\n\nAnswer in French.");
        assert_eq!(body["model"], "claude-test");
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        );
        assert!(body.get("stream").is_none());
    }

    #[test]
    fn max_tokens_defaults_and_prefers_max_completion_tokens() {
        let hi = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            translate(json!({"model": "m", "messages": hi})).unwrap()["max_tokens"],
            DEFAULT_MAX_TOKENS
        );
        assert_eq!(
            translate(json!({"model": "m", "messages": hi, "max_tokens": 10})).unwrap()["max_tokens"],
            10
        );
        let both =
            json!({"model": "m", "messages": hi, "max_tokens": 10, "max_completion_tokens": 20});
        assert_eq!(translate(both).unwrap()["max_tokens"], 20);
        let bad = translate(json!({"model": "m", "messages": hi, "max_tokens": -1})).unwrap_err();
        assert_eq!(bad.kind, ErrorKind::Client);
        assert!(bad.message.contains("max_tokens"), "{}", bad.message);
    }

    #[test]
    fn sampling_and_stop_sequences_are_translated() {
        let hi = json!([{"role": "user", "content": "hi"}]);
        let body = translate(
            json!({"model": "m", "messages": hi, "temperature": 0.5, "top_p": 0.9, "stop": "END",
                                    "seed": 7, "top_k": 5, "user": "u-1", "n": 1}),
        )
        .unwrap();
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["top_p"], 0.9);
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert_eq!(body["top_k"], 5, "Anthropic's own fields pass through");
        assert_eq!(body["metadata"], json!({"user_id": "u-1"}));
        for dropped in ["seed", "stop", "user", "n"] {
            assert!(body.get(dropped).is_none(), "{dropped} is not sent as is");
        }
        let openai_only = translate(json!({
            "model": "m", "messages": hi, "temperature": 1.0, "modalities": ["text"],
            "metadata": {"project": "p"}, "safety_identifier": "s-1", "user": "u-1",
            "prompt_cache_key": "k", "prompt_cache_retention": "24h", "verbosity": "low",
        }))
        .unwrap();
        assert_eq!(openai_only["temperature"], 1.0, "1 is in both ranges");
        assert_eq!(
            openai_only["metadata"],
            json!({"user_id": "s-1"}),
            "safety_identifier before user; OpenAI's tags are not sent"
        );
        for dropped in [
            "modalities",
            "safety_identifier",
            "prompt_cache_key",
            "prompt_cache_retention",
            "verbosity",
        ] {
            assert!(openai_only.get(dropped).is_none(), "{dropped} is not sent");
        }
        let own = translate(json!({"model": "m", "messages": hi, "user": "u-1",
                                   "metadata": {"user_id": "mine"}}))
        .unwrap();
        assert_eq!(own["metadata"], json!({"user_id": "mine"}));
        let body = translate(json!({"model": "m", "messages": hi, "stop": ["a", "b"]})).unwrap();
        assert_eq!(body["stop_sequences"], json!(["a", "b"]));
        assert!(
            translate(json!({"model": "m", "messages": hi, "stop": []}))
                .unwrap()
                .get("stop_sequences")
                .is_none()
        );
        assert_eq!(
            translate(json!({"model": "m", "messages": hi, "stop": [1]}))
                .unwrap_err()
                .kind,
            ErrorKind::Client
        );
        assert!(
            to_messages_request(&request(json!({"model": "m", "messages": hi})), "x", true)
                .unwrap()["stream"]
                == true
        );
    }

    #[test]
    fn what_anthropic_cannot_do_is_refused_not_dropped() {
        let hi = json!([{"role": "user", "content": "hi"}]);
        for (field, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("response_format", json!({"type": "json_object"})),
            ("temperature", json!(1.5)),
            ("temperature", json!(-0.1)),
            ("audio", json!({"voice": "alloy", "format": "wav"})),
            ("modalities", json!(["text", "audio"])),
            ("prediction", json!({"type": "content", "content": "x"})),
            ("web_search_options", json!({})),
            ("functions", json!([{"name": "f", "parameters": {}}])),
            ("function_call", json!("auto")),
        ] {
            let mut body = json!({"model": "m", "messages": hi});
            body[field] = value;
            let e = translate(body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Client);
            assert!(e.message.starts_with(field), "{}", e.message);
        }
        let audio =
            json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]);
        assert!(
            translate(json!({"model": "m", "messages": audio}))
                .unwrap_err()
                .message
                .contains("input_audio")
        );
        let only_system = json!([{"role": "system", "content": "x"}]);
        assert_eq!(
            translate(json!({"model": "m", "messages": only_system}))
                .unwrap_err()
                .kind,
            ErrorKind::Client
        );
        let function = json!([{"role": "function", "content": "x"}]);
        assert!(
            translate(json!({"model": "m", "messages": function}))
                .unwrap_err()
                .message
                .contains("role")
        );
    }

    #[test]
    fn images_become_base64_or_url_sources() {
        let parts = json!([{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            {"type": "text", "text": ""},
        ]}]);
        let body = translate(json!({"model": "m", "messages": parts})).unwrap();
        assert_eq!(
            body["messages"][0]["content"],
            json!([
                {"type": "text", "text": "what is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ])
        );
    }

    #[test]
    fn tool_calls_and_results_become_tool_use_and_merged_tool_result_blocks() {
        let body = translate(json!({"model": "m", "messages": [
            {"role": "user", "content": "weather in Paris and Tokyo?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "18C"}]},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": null},
        ]}))
        .unwrap();
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "weather in Paris and Tokyo?"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "22C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "18C"},
                ]},
                {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
            ]),
            "the empty assistant turn is left out"
        );
    }

    #[test]
    fn unparseable_tool_arguments_and_orphan_tool_messages_are_the_callers_mistake() {
        let call = |arguments: &str| {
            json!({"model": "m", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            ]})
        };
        for bad in ["{not json", "[1, 2]"] {
            let e = translate(call(bad)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Client);
            assert!(
                e.message
                    .starts_with("messages[1].tool_calls[0].function.arguments"),
                "{}",
                e.message
            );
        }
        let orphan = json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]});
        assert!(
            translate(orphan)
                .unwrap_err()
                .message
                .contains("tool_call_id")
        );
    }

    #[test]
    fn function_tools_and_tool_choice_are_translated() {
        let tools = json!([
            {"type": "function", "function": {"name": "weather", "description": "Current weather",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "now"}},
        ]);
        let hi = json!([{"role": "user", "content": "hi"}]);
        let with = |choice: Value| {
            let mut body = json!({"model": "m", "messages": hi, "tools": tools});
            if !choice.is_null() {
                body["tool_choice"] = choice;
            }
            translate(body)
        };
        let body = with(Value::Null).unwrap();
        assert_eq!(
            body["tools"],
            json!([
                {"name": "weather", "description": "Current weather",
                 "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
            ])
        );
        assert!(body.get("tool_choice").is_none());
        assert_eq!(
            with(json!("auto")).unwrap()["tool_choice"],
            json!({"type": "auto"})
        );
        assert_eq!(
            with(json!("none")).unwrap()["tool_choice"],
            json!({"type": "none"})
        );
        assert_eq!(
            with(json!("required")).unwrap()["tool_choice"],
            json!({"type": "any"})
        );
        assert_eq!(
            with(json!({"type": "function", "function": {"name": "now"}})).unwrap()["tool_choice"],
            json!({"type": "tool", "name": "now"})
        );
        assert_eq!(
            with(json!("sometimes")).unwrap_err().kind,
            ErrorKind::Client
        );
        assert_eq!(
            with(json!({"type": "function"})).unwrap_err().kind,
            ErrorKind::Client
        );

        let serial = translate(
            json!({"model": "m", "messages": hi, "tools": tools, "parallel_tool_calls": false}),
        )
        .unwrap();
        assert_eq!(
            serial["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        assert!(serial.get("parallel_tool_calls").is_none());

        let hosted =
            translate(json!({"model": "m", "messages": hi, "tools": [{"type": "web_search"}]}));
        assert_eq!(hosted.unwrap_err().kind, ErrorKind::Client);
    }

    fn message(body: Value) -> ChatResponse {
        to_chat_response(serde_json::from_value(body).unwrap(), "claude-test", 42)
    }

    #[test]
    fn a_text_answer_becomes_a_chat_completion() {
        let response = message(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": "Hello"}, {"type": "thinking", "thinking": "…"}, {"type": "text", "text": " there"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 5, "cache_creation_input_tokens": null},
        }));
        assert_eq!(
            (
                response.id.as_str(),
                response.object.as_str(),
                response.created
            ),
            ("msg_1", "chat.completion", 42)
        );
        let choice = &response.choices[0];
        assert_eq!(choice.message.role, "assistant");
        assert_eq!(choice.message.content, Some(json!("Hello there")));
        assert_eq!(choice.message.tool_calls, None);
        assert_eq!(choice.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            response.usage,
            Some(Usage {
                prompt_tokens: 15,
                completion_tokens: 3,
                total_tokens: 18,
                prompt_tokens_details: Some(PromptTokensDetails {
                    cached_tokens: 5,
                    cache_write_tokens: 0
                }),
            })
        );
    }

    #[test]
    fn tool_use_blocks_become_tool_calls_with_json_string_arguments() {
        let response = message(json!({
            "id": "msg_2", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
            ],
            "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 2},
        }));
        let choice = &response.choices[0];
        assert_eq!(
            choice.message.content, None,
            "a message that only calls tools has no content"
        );
        let calls = choice.message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (
                calls[0].id.as_str(),
                calls[0].kind.as_str(),
                calls[0].function.name.as_str()
            ),
            ("toolu_1", "function", "weather")
        );
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].function.arguments).unwrap(),
            json!({"city": "Paris"})
        );
        assert_eq!(calls[1].function.arguments, "{}");
        assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop, finish) in [
            (Some("end_turn"), "stop"),
            (Some("stop_sequence"), "stop"),
            (Some("max_tokens"), "length"),
            (Some("tool_use"), "tool_calls"),
            (Some("refusal"), "content_filter"),
            (None, "stop"),
        ] {
            assert_eq!(finish_reason(stop), finish, "{stop:?}");
        }
    }

    /// Feeds `events` (each an event's data) and returns the chunks, or the first error.
    fn stream(
        include_usage: bool,
        events: &[Value],
    ) -> (Vec<ChatChunk>, Option<ProviderError>, bool) {
        let mut translator = StreamTranslator::new("claude-test".to_owned(), 7, include_usage);
        let mut out = VecDeque::new();
        for event in events {
            if let Err(e) = translator.on_event(&event.to_string(), &mut out) {
                return (out.into(), Some(e), translator.stopped);
            }
        }
        (out.into(), None, translator.stopped)
    }

    fn start() -> Value {
        json!({"type": "message_start", "message": {"id": "msg_s", "type": "message", "role": "assistant",
               "content": [], "usage": {"input_tokens": 9, "output_tokens": 1}}})
    }

    #[test]
    fn streamed_text_becomes_role_content_finish_and_usage_chunks() {
        let (chunks, error, stopped) = stream(
            true,
            &[
                start(),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "ping"}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 4}}),
                json!({"type": "some_future_event"}),
                json!({"type": "message_stop"}),
            ],
        );
        assert!(error.is_none() && stopped);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c.choices.first().map(|c| &c.delta))
            .collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hello"}),
                &json!({"content": " there"}),
                &json!({})
            ]
        );
        assert!(
            chunks
                .iter()
                .all(|c| c.id == "msg_s" && c.object == "chat.completion.chunk" && c.created == 7)
        );
        assert_eq!(
            chunks[3].choices[0].finish_reason.as_deref(),
            Some("length")
        );
        let last = chunks.last().unwrap();
        assert!(last.choices.is_empty());
        assert_eq!(last.usage, Some(Usage::new(9, 4)));

        let (without_usage, _, _) = stream(false, &[start(), json!({"type": "message_stop"})]);
        assert_eq!(without_usage.len(), 2, "role and finish, no usage chunk");
        assert_eq!(
            without_usage[1].choices[0].finish_reason.as_deref(),
            Some("stop")
        );
    }

    #[test]
    fn streamed_tool_use_becomes_indexed_tool_call_deltas() {
        let (chunks, error, _) = stream(
            false,
            &[
                start(),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {}}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
                json!({"type": "content_block_stop", "index": 1}),
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "now", "input": {}}}),
                json!({"type": "content_block_stop", "index": 2}),
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}}),
                json!({"type": "message_stop"}),
            ],
        );
        assert!(error.is_none());
        let deltas: Vec<Value> = chunks.iter().map(|c| c.choices[0].delta.clone()).collect();
        assert_eq!(
            deltas[2],
            json!({"tool_calls": [{"index": 0, "id": "toolu_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]})
        );
        assert_eq!(
            deltas[3],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]})
        );
        assert_eq!(
            deltas[4],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]})
        );
        assert_eq!(deltas[5]["tool_calls"][0]["index"], 1);
        assert_eq!(deltas[5]["tool_calls"][0]["id"], "toolu_b");
        assert_eq!(
            deltas[6],
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
            "no arguments streamed: {{}}"
        );
        assert_eq!(
            chunks.last().unwrap().choices[0].finish_reason.as_deref(),
            Some("tool_calls")
        );
        assert_eq!(chunks.len(), 8);
    }

    #[test]
    fn error_events_and_out_of_order_events_are_classified_errors() {
        let error =
            |kind: &str| json!({"type": "error", "error": {"type": kind, "message": "busy"}});
        let (_, e, _) = stream(false, &[start(), error("overloaded_error")]);
        let e = e.unwrap();
        assert_eq!(e.kind, ErrorKind::Server);
        assert!(
            e.message.contains("overloaded_error") && e.message.contains("busy"),
            "{}",
            e.message
        );
        assert_eq!(
            stream(false, &[error("rate_limit_error")]).1.unwrap().kind,
            ErrorKind::RateLimit
        );
        assert_eq!(
            stream(false, &[error("invalid_request_error")])
                .1
                .unwrap()
                .kind,
            ErrorKind::InvalidResponse
        );
        let early = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}});
        assert_eq!(
            stream(false, &[early]).1.unwrap().kind,
            ErrorKind::InvalidResponse
        );
        let stray = json!({"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "{"}});
        assert_eq!(
            stream(false, &[start(), stray]).1.unwrap().kind,
            ErrorKind::InvalidResponse
        );
        let mut translator = StreamTranslator::new(String::new(), 0, false);
        assert_eq!(
            translator
                .on_event("{not json", &mut VecDeque::new())
                .unwrap_err()
                .kind,
            ErrorKind::InvalidResponse
        );
    }

    fn sse(events: &[Value]) -> Vec<reqwest::Result<Bytes>> {
        events
            .iter()
            .map(|e| {
                Ok(Bytes::from(format!(
                    "event: {}\ndata: {e}\n\n",
                    e["type"].as_str().unwrap()
                )))
            })
            .collect()
    }

    #[tokio::test]
    async fn a_wire_stream_ends_at_message_stop_and_a_cut_one_is_a_connect_error() {
        let events = [
            start(),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
            json!({"type": "message_stop"}),
        ];
        let translator = StreamTranslator::new("m".to_owned(), 0, false);
        let items: Vec<_> = chunk_stream(futures_util::stream::iter(sse(&events)), translator)
            .collect()
            .await;
        assert_eq!(items.len(), 3, "role, text, finish");
        assert!(items.iter().all(Result::is_ok));

        let cut = sse(&events[..3]);
        let translator = StreamTranslator::new("m".to_owned(), 0, false);
        let items: Vec<_> = chunk_stream(futures_util::stream::iter(cut), translator)
            .collect()
            .await;
        assert_eq!(items.len(), 3, "role, text, then the error");
        let e = items[2].as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connect);
        assert!(e.message.contains("message_stop"), "{}", e.message);
    }
}
