//! The in-process mock provider: echoes the last user message. It is what `keel serve`
//! uses for model `default` when no model is configured and no provider key is set — said
//! plainly at start-up and in /v1/models, so nobody mistakes echo for a model.

use futures_util::StreamExt as _;
use serde_json::{Map, json};

use crate::error::ProviderError;
use crate::provider::{ChunkStream, Provider};
use crate::types::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, EmbeddingsRequest,
    EmbeddingsResponse, EmbeddingsUsage, Message, Usage,
};

/// Echoes the last user message back.
#[derive(Debug, Default)]
pub struct Mock;

/// The echo answer and its usage for a request (shared with `keel mock-llm`).
#[must_use]
pub fn echo(request: &ChatRequest) -> (String, Usage) {
    let last = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(Message::text)
        .unwrap_or_default();
    let prompt_tokens: u64 = request
        .messages
        .iter()
        .map(|m| approx_tokens(&m.text()))
        .sum();
    let completion_tokens = approx_tokens(&last);
    (last, Usage::new(prompt_tokens, completion_tokens))
}

fn approx_tokens(text: &str) -> u64 {
    u64::try_from(text.split_whitespace().count())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait::async_trait]
impl Provider for Mock {
    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
    ) -> Result<EmbeddingsResponse, ProviderError> {
        Ok(embed(request, &request.model))
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let (text, usage) = echo(request);
        Ok(ChatResponse {
            id: format!("chatcmpl-mock-{}", fastrand::u64(..)),
            object: "chat.completion".to_owned(),
            created: now(),
            model: request.model.clone(),
            choices: vec![Choice {
                index: 0,
                message: Message {
                    role: "assistant".to_owned(),
                    content: Some(text.into()),
                    tool_calls: None,
                    tool_call_id: None,
                    extra: Map::new(),
                },
                finish_reason: Some("stop".to_owned()),
                extra: Map::new(),
            }],
            usage: Some(usage),
            extra: Map::new(),
        })
    }

    async fn chat_stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let (text, usage) = echo(request);
        let id = format!("chatcmpl-mock-{}", fastrand::u64(..));
        let created = now();
        let model = request.model.clone();
        let include_usage = request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            == Some(true);
        let chunk =
            |delta: serde_json::Value, finish: Option<&str>, usage: Option<Usage>| ChatChunk {
                id: id.clone(),
                object: "chat.completion.chunk".to_owned(),
                created,
                model: model.clone(),
                choices: if usage.is_some() {
                    Vec::new()
                } else {
                    vec![ChunkChoice {
                        index: 0,
                        delta,
                        finish_reason: finish.map(str::to_owned),
                        extra: Map::new(),
                    }]
                },
                usage,
                extra: Map::new(),
            };
        let mut chunks = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            None,
            None,
        )];
        for word in text.split_inclusive(' ') {
            chunks.push(chunk(json!({"content": word}), None, None));
        }
        chunks.push(chunk(json!({}), Some("stop"), None));
        if include_usage {
            chunks.push(chunk(json!({}), None, Some(usage)));
        }
        Ok(Box::pin(futures_util::stream::iter(chunks).map(Ok)))
    }
}

/// Deterministic embeddings for `request` (shared with `keel mock-llm`): 8 dimensions
/// derived from each text's bytes, as floats or base64 of little-endian f32s.
#[must_use]
pub fn embed(request: &EmbeddingsRequest, model: &str) -> EmbeddingsResponse {
    use base64::Engine as _;
    let base64 = request.encoding_format.as_deref() == Some("base64");
    let texts = request.texts();
    let data = texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let mut v = [0f32; 8];
            for (i, b) in text.bytes().enumerate() {
                v[i % 8] += f32::from(b) / 255.0;
            }
            let norm = v
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
                .max(f32::EPSILON);
            let v: Vec<f32> = v.iter().map(|x| x / norm).collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(v)
            };
            serde_json::json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = texts.iter().map(|t| approx_tokens(t)).sum();
    EmbeddingsResponse {
        object: "list".to_owned(),
        data,
        model: model.to_owned(),
        usage: Some(EmbeddingsUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        }),
        extra: Map::new(),
    }
}
