//! The OpenAI-compatible gateway endpoints: POST /v1/chat/completions (whole or streamed)
//! and GET /v1/models. Existing OpenAI SDK clients work unchanged, with a Keel key as
//! their API key and Keel's /v1 as their base URL.

use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use keel_core::config::ProviderKind;
use keel_llm::types::ChatRequest;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;

impl From<keel_llm::Error> for ApiError {
    fn from(e: keel_llm::Error) -> Self {
        use keel_llm::Error as E;
        match e {
            E::UnknownModel { model, available } => ApiError::not_found(format!(
                "model {model:?} is not a configured route; available: {}",
                available.join(", ")
            )),
            E::Rejected(e) => ApiError::bad_request(format!("the provider rejected the request: {}", e.message)),
            E::InvalidResponse(e) => ApiError::bad_gateway(format!("the provider's answer was invalid: {}", e.message)),
            E::AllTargetsFailed(failures) => {
                let list = failures
                    .iter()
                    .map(|(target, e)| format!("{target}: {}", e.kind))
                    .collect::<Vec<_>>()
                    .join("; ");
                ApiError::unavailable(format!("every target of this model failed ({list})"))
            }
        }
    }
}

/// Creates a chat completion (OpenAI Chat Completions format). With `"stream": true` the
/// answer is server-sent events ending in `data: [DONE]`; a failure after the first chunk
/// ends the stream with a `data: {"error": …}` event instead. Requires role: member.
#[utoipa::path(post, path = "/v1/chat/completions", tag = super::GATEWAY,
    request_body(content = Object, description = "An OpenAI Chat Completions request; `model` is a Keel route name"),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The completion, or an SSE stream of chunks", body = Object),
        (status = 400, description = "Malformed request, or rejected by the provider", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown model; the detail lists the routes", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The provider's answer was invalid", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Every target failed; the detail lists each one's last error", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    AppJson(request): AppJson<ChatRequest>,
) -> Result<Response, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages: must hold at least one message"));
    }
    if let Some(bad) = request.messages.iter().position(|m| m.role.is_empty()) {
        return Err(ApiError::bad_request(format!("messages[{bad}].role: must not be empty")));
    }
    let router = state.router();
    if !request.is_stream() {
        let (response, served) = router.chat(&request).await?;
        tracing::debug!(target_served = %served.target, attempts = served.attempts, "chat completion");
        return Ok(Json(response).into_response());
    }
    let (chunks, _served) = router.chat_stream(&request).await?;
    // Chunks as `data:` frames, then `[DONE]` after a clean end; a failure mid-way ends
    // the stream with an error event instead (and no `[DONE]`).
    let frames = futures_util::stream::unfold((chunks, false), |(mut chunks, finished)| async move {
        if finished {
            return None;
        }
        let (frame, finished) = match chunks.next().await {
            Some(Ok(chunk)) => match serde_json::to_string(&chunk) {
                Ok(json) => (format!("data: {json}\n\n"), false),
                Err(e) => (error_frame("internal", &format!("cannot encode a chunk: {e}")), true),
            },
            Some(Err(e)) => (error_frame(e.kind.as_str(), &format!("the provider failed mid-stream: {}", e.kind)), true),
            None => ("data: [DONE]\n\n".to_owned(), true),
        };
        Some((Ok::<_, Infallible>(Bytes::from(frame)), (chunks, finished)))
    });
    Ok((
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(frames),
    )
        .into_response())
}

fn error_frame(code: &str, message: &str) -> String {
    let error = json!({"error": {"message": message, "type": "upstream_error", "code": code}});
    format!("data: {error}\n\n")
}

/// The models (routes) this gateway serves, in OpenAI's list format. Each entry also says
/// which targets serve it; a route served by the in-process echo mock says so plainly.
/// Requires role: viewer.
#[utoipa::path(get, path = "/v1/models", tag = super::GATEWAY, security(("api_key" = [])),
    responses((status = 200, description = "The routes", body = Object)))]
pub(crate) async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .router()
        .routes()
        .map(|route| {
            let mock = route.targets.iter().all(|t| t.provider_kind == ProviderKind::Mock);
            let targets: Vec<Value> = route
                .targets
                .iter()
                .map(|t| json!({"target": t.label, "breaker": format!("{:?}", t.breaker_state()).to_lowercase()}))
                .collect();
            let mut entry = json!({
                "id": route.name,
                "object": "model",
                "created": 0,
                "owned_by": "keel",
                "keel": {"targets": targets},
            });
            if mock {
                entry["keel"]["note"] = json!(
                    "in-process echo mock, not a language model: configure [models] or set OPENAI_API_KEY"
                );
            }
            entry
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
