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
    /// How many prompt tokens the provider's prompt cache served or took in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    /// Counts with no prompt-cache breakdown.
    #[must_use]
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
        }
    }

    /// Prompt tokens read from the provider's prompt cache (billed at the cached price).
    #[must_use]
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }

    /// Prompt tokens written to the provider's prompt cache (billed at the cache-write price).
    #[must_use]
    pub fn cache_write_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .map_or(0, |d| d.cache_write_tokens)
    }
}

/// `usage.prompt_tokens_details`: the part of the prompt a provider-side prompt cache
/// handled. Both counts are included in `prompt_tokens`, as OpenAI counts them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens read from the cache (OpenAI's `cached_tokens`, Anthropic's
    /// `cache_read_input_tokens`).
    #[serde(default, deserialize_with = "null_as_zero")]
    pub cached_tokens: u64,
    /// Prompt tokens written to the cache (Anthropic's `cache_creation_input_tokens`; OpenAI
    /// has no such charge). A Keel extension of the OpenAI shape, left out when 0.
    #[serde(
        default,
        deserialize_with = "null_as_zero",
        skip_serializing_if = "is_zero"
    )]
    pub cache_write_tokens: u64,
}

fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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

/// Builds the whole answer from a stream's chunks (the first choice): content appended,
/// tool calls put together by their `index`, the last finish reason and usage kept.
#[derive(Debug, Default)]
pub struct Assembler {
    id: String,
    created: u64,
    model: String,
    content: String,
    calls: Vec<ToolCall>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl Assembler {
    /// Takes in one chunk.
    pub fn push(&mut self, chunk: &ChatChunk) {
        if self.id.is_empty() {
            self.id.clone_from(&chunk.id);
            self.created = chunk.created;
            self.model.clone_from(&chunk.model);
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            if let Some(text) = choice.delta.get("content").and_then(Value::as_str) {
                self.content.push_str(text);
            }
            for call in choice
                .delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let at = call
                    .get("index")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok())
                    .unwrap_or(self.calls.len().saturating_sub(1));
                // An index far past the calls so far is malformed: appended instead.
                let at = at.min(self.calls.len());
                if at == self.calls.len() {
                    self.calls.push(ToolCall {
                        id: String::new(),
                        kind: function(),
                        function: FunctionCall {
                            name: String::new(),
                            arguments: String::new(),
                        },
                    });
                }
                let slot = &mut self.calls[at];
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    id.clone_into(&mut slot.id);
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    slot.function.name.push_str(name);
                }
                if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    slot.function.arguments.push_str(args);
                }
            }
            if choice.finish_reason.is_some() {
                self.finish_reason.clone_from(&choice.finish_reason);
            }
        }
    }

    /// The whole answer.
    #[must_use]
    pub fn finish(self) -> ChatResponse {
        let message = Message {
            role: "assistant".to_owned(),
            content: (!self.content.is_empty() || self.calls.is_empty())
                .then_some(Value::String(self.content)),
            tool_calls: (!self.calls.is_empty()).then_some(self.calls),
            tool_call_id: None,
            extra: Map::new(),
        };
        ChatResponse {
            id: self.id,
            object: "chat.completion".to_owned(),
            created: self.created,
            model: self.model,
            choices: vec![Choice {
                index: 0,
                message,
                finish_reason: self.finish_reason,
                extra: Map::new(),
            }],
            usage: self.usage,
            extra: Map::new(),
        }
    }
}

#[cfg(test)]
mod assembler_tests {
    use super::*;

    fn chunk(delta: Value, finish: Option<&str>, usage: Option<Usage>) -> ChatChunk {
        serde_json::from_value(serde_json::json!({
            "id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": usage,
        }))
        .unwrap()
    }

    #[test]
    fn chunks_make_the_whole_answer_with_tool_calls_put_together() {
        let mut a = Assembler::default();
        a.push(&chunk(
            serde_json::json!({"role": "assistant", "content": "Hel"}),
            None,
            None,
        ));
        a.push(&chunk(serde_json::json!({"content": "lo"}), None, None));
        a.push(&chunk(
            serde_json::json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"ci"}}]}),
            None,
            None,
        ));
        a.push(&chunk(
            serde_json::json!({"tool_calls": [{"index": 0, "function": {"arguments": "ty\":1}"}}, {"index": 1, "id": "call_2", "function": {"name": "b", "arguments": "{}"}}]}),
            None,
            None,
        ));
        let usage = Usage::new(3, 4);
        a.push(&chunk(
            serde_json::json!({}),
            Some("tool_calls"),
            Some(usage),
        ));
        let r = a.finish();
        let m = &r.choices[0].message;
        assert_eq!(m.text(), "Hello");
        let calls = m.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].id, "call_1");
        assert_eq!(calls[0].function.arguments, "{\"city\":1}");
        assert_eq!(calls[1].function.name, "b");
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(r.usage, Some(usage));
        assert_eq!(r.id, "c1");
    }
}
