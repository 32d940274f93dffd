//! The gateway's wire types, in the OpenAI Chat Completions shape: it is what clients
//! send, what most providers speak, and what other providers are translated to and from.
//!
//! Fields Keel does not interpret are kept in `extra` and passed through untouched, so a
//! client can use a provider feature Keel has not heard of.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// POST /v1/chat/completions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatRequest {
    /// The public model (route) name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// Everything else (top_p, max_tokens, tool_choice, response_format, seed, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// Whether the caller asked for a stream.
    #[must_use]
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or an array of content parts; absent on assistant messages that only call tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// Tool calls an assistant message makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Which call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Anything else (`name`, `refusal`, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    /// The text of the message: its string content, or its text parts joined.
    #[must_use]
    pub fn text(&self) -> String {
        match &self.content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        }
    }
}

/// A tool call made by the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolCall {
    /// Its id, echoed back by the `tool` message that answers it.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function")]
    pub kind: String,
    /// The function and its JSON-encoded arguments.
    pub function: FunctionCall,
}

fn function() -> String {
    "function".to_owned()
}

/// A function call: name and JSON-encoded arguments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionCall {
    /// The tool's name.
    pub name: String,
    /// The arguments, as a JSON string.
    pub arguments: String,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

/// A whole (not streamed) answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatResponse {
    /// The answer's id.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered (the public route name on Keel's side).
    pub model: String,
    /// The answers (usually one).
    pub choices: Vec<Choice>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Choice {
    /// Its index.
    pub index: u32,
    /// The assistant message.
    pub message: Message,
    /// Why generation stopped: `stop`, `length`, `tool_calls`, `content_filter`.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Anything else (`logprobs`, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One chunk of a streamed answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChunk {
    /// The answer's id (the same on every chunk).
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// Deltas.
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Token counts, on the last chunk when `include_usage` was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A delta of one answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkChoice {
    /// Which answer.
    pub index: u32,
    /// What was added.
    pub delta: Value,
    /// Set on the last chunk of this answer.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// POST /v1/embeddings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingsRequest {
    /// The public model (route) name.
    pub model: String,
    /// A string, an array of strings, or token arrays.
    pub input: Value,
    /// `float` (default) or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    /// Everything else (`dimensions`, `user`, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl EmbeddingsRequest {
    /// The input texts (token-array inputs count as empty texts).
    #[must_use]
    pub fn texts(&self) -> Vec<String> {
        match &self.input {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().unwrap_or_default().to_owned())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Token counts of an embeddings request.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EmbeddingsUsage {
    /// Tokens in the input.
    pub prompt_tokens: u64,
    /// The same.
    pub total_tokens: u64,
}

/// The embeddings answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingsResponse {
    /// `list`.
    pub object: String,
    /// One `{object: "embedding", index, embedding}` per input.
    pub data: Vec<Value>,
    /// The model (the route name on Keel's side).
    pub model: String,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<EmbeddingsUsage>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
