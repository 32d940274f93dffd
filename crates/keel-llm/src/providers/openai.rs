//! OpenAI Chat Completions over HTTP, and everything compatible with it: Azure OpenAI
//! (`api_version` set: `api-key` header and `?api-version=`), vLLM, Ollama, Groq, Together,
//! `keel mock-llm`.

use std::time::Duration;

use futures_util::StreamExt as _;
use keel_core::config::Target;

use super::transport_error;
use crate::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, Provider};
use crate::sse;
use crate::types::{ChatChunk, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse};

/// A target that speaks OpenAI Chat Completions.
pub struct OpenAi {
    client: reqwest::Client,
    url: reqwest::Url,
    model: String,
    api_key: Option<String>,
    azure: bool,
    stream_usage: bool,
    first_token_timeout: Duration,
    total_timeout: Duration,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the API key.
        f.debug_struct("OpenAi")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl OpenAi {
    /// A provider for `target`, with its API key already read from the environment.
    pub fn new(target: &Target, api_key: Option<String>) -> Result<Self, ProviderError> {
        let base = target
            .base_url
            .as_deref()
            .unwrap_or("https://api.openai.com/v1")
            .trim_end_matches('/');
        let url = match &target.api_version {
            Some(version) => format!("{base}/chat/completions?api-version={version}"),
            None => format!("{base}/chat/completions"),
        };
        // Parsed once here rather than by every request.
        let url = reqwest::Url::parse(&url).map_err(|e| {
            ProviderError::new(
                ErrorKind::Denied,
                format!("base_url {base:?} does not make a valid URL: {e}"),
            )
        })?;
        let client = super::http_client(target)?;
        Ok(Self {
            client,
            url,
            model: target.model.clone(),
            api_key,
            azure: target.api_version.is_some(),
            stream_usage: target.stream_usage,
            first_token_timeout: target.first_token_timeout,
            total_timeout: target.total_timeout,
        })
    }

    fn request(&self, body: &ChatRequest) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(self.url.clone())
            .timeout(self.total_timeout)
            .json(body);
        if let Some(key) = &self.api_key {
            req = if self.azure {
                req.header("api-key", key)
            } else {
                req.bearer_auth(key)
            };
        }
        req
    }

    fn upstream_body(&self, request: &ChatRequest, stream: bool) -> ChatRequest {
        let mut body = request.clone();
        body.model.clone_from(&self.model);
        body.stream = stream.then_some(true);
        if stream && self.stream_usage {
            // Always ask for usage on streams, so accounting is exact; the gateway passes
            // the usage chunk on only to clients that asked for it.
            body.stream_options
                .get_or_insert_with(Default::default)
                .include_usage = Some(true);
        }
        body
    }

    async fn send(&self, body: &ChatRequest) -> Result<reqwest::Response, ProviderError> {
        super::send(self.request(body)).await
    }
}

#[async_trait::async_trait]
impl Provider for OpenAi {
    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = self.upstream_body(request, false);
        let call = async {
            let response = self.send(&body).await?;
            let bytes = super::read_capped(response, super::MAX_ANSWER_BYTES).await?;
            serde_json::from_slice::<ChatResponse>(&bytes).map_err(|e| {
                ProviderError::new(
                    ErrorKind::InvalidResponse,
                    format!("upstream sent malformed JSON: {e}"),
                )
            })
        };
        // A whole answer takes as long as its generation: bounded by the attempt's total
        // timeout (the first-token timeout is for streams).
        match tokio::time::timeout(self.total_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::new(
                ErrorKind::Timeout,
                format!("no answer within {:?}", self.total_timeout),
            )),
        }
    }

    async fn chat_stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = self.upstream_body(request, true);
        super::first_chunk(self.first_token_timeout, async {
            let response = self.send(&body).await?;
            Ok(chunk_stream(response))
        })
        .await
    }

    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
    ) -> Result<EmbeddingsResponse, ProviderError> {
        let mut body = request.clone();
        body.model.clone_from(&self.model);
        let url = self
            .url
            .as_str()
            .replacen("/chat/completions", "/embeddings", 1);
        let mut req = self
            .client
            .post(url)
            .timeout(self.total_timeout)
            .json(&body);
        if let Some(key) = &self.api_key {
            req = if self.azure {
                req.header("api-key", key)
            } else {
                req.bearer_auth(key)
            };
        }
        let response = super::send(req).await?;
        let bytes = super::read_capped(response, super::MAX_ANSWER_BYTES).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::new(
                ErrorKind::InvalidResponse,
                format!("upstream sent malformed JSON: {e}"),
            )
        })
    }
}

/// Parses an upstream SSE body into chunks. The stream must end with `data: [DONE]`; a
/// connection that closes before it is a failure, not a short answer.
fn chunk_stream(response: reqwest::Response) -> ChunkStream {
    let state = (response.bytes_stream(), sse::Reader::default(), false);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut bytes, mut reader, mut done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(event) = reader.next_event() {
                    if event.data == "[DONE]" {
                        return None;
                    }
                    if let Some(e) = stream_error(&event.data) {
                        return Some((Err(e), (bytes, reader, true)));
                    }
                    let item = serde_json::from_str::<ChatChunk>(&event.data).map_err(|e| {
                        done = true;
                        ProviderError::new(
                            ErrorKind::InvalidResponse,
                            format!("upstream sent a malformed chunk: {e}"),
                        )
                    });
                    return Some((item, (bytes, reader, done)));
                }
                if reader.overflowed() {
                    let e = ProviderError::new(
                        ErrorKind::InvalidResponse,
                        "upstream event larger than 4 MiB",
                    );
                    return Some((Err(e), (bytes, reader, true)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => reader.push(&chunk),
                    Some(Err(e)) => return Some((Err(transport_error(&e)), (bytes, reader, true))),
                    None => {
                        let e = ProviderError::new(
                            ErrorKind::Connect,
                            "upstream closed the stream before [DONE]",
                        );
                        return Some((Err(e), (bytes, reader, true)));
                    }
                }
            }
        },
    ))
}

/// An error the upstream sent inside the stream (`data: {"error": {...}}`), classified.
fn stream_error(data: &str) -> Option<ProviderError> {
    if !data.trim_start().starts_with("{\"error\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(data).ok()?;
    let error = value.get("error")?;
    let label = |k: &str| {
        error
            .get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (kind_text, code, message) = (label("type"), label("code"), label("message"));
    let kind = if kind_text.contains("rate_limit") || code.contains("rate_limit") {
        ErrorKind::RateLimit
    } else if kind_text.contains("invalid_request") {
        ErrorKind::Client
    } else {
        ErrorKind::Server
    };
    Some(ProviderError::new(
        kind,
        format!("upstream stream error: {message}"),
    ))
}
