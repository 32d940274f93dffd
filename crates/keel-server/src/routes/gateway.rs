//! The OpenAI-compatible gateway endpoints: POST /v1/chat/completions (whole or streamed)
//! and GET /v1/models. Existing OpenAI SDK clients work unchanged, with a Keel key as
//! their API key and Keel's /v1 as their base URL.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use keel_core::auth::Principal;
use keel_core::config::ProviderKind;
use keel_llm::cache::{Cached, Key};
use keel_llm::router::Served;
use keel_llm::types::{ChatRequest, EmbeddingsRequest, Usage};
use keel_store::UsageRecord;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::AppState;
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;
use crate::gateway::EventObserver;

impl From<keel_llm::Error> for ApiError {
    fn from(e: keel_llm::Error) -> Self {
        use keel_llm::Error as E;
        match e {
            E::UnknownModel { model, available } => ApiError::not_found(format!(
                "model {model:?} is not a configured route; available: {}",
                available.join(", ")
            )),
            E::Rejected(e) => {
                ApiError::bad_request(format!("the provider rejected the request: {}", e.message))
            }
            E::InvalidResponse(e) => {
                ApiError::bad_gateway(format!("the provider's answer was invalid: {}", e.message))
            }
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
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    AppJson(request): AppJson<ChatRequest>,
) -> Result<Response, ApiError> {
    allowed_model(&principal, &request.model)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages: must hold at least one message",
        ));
    }
    if let Some(bad) = request.messages.iter().position(|m| m.role.is_empty()) {
        return Err(ApiError::bad_request(format!(
            "messages[{bad}].role: must not be empty"
        )));
    }
    let started = Instant::now();
    let client_wants_usage = request
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        == Some(true);
    let cache_key = match state.cache() {
        Some(_) if cacheable(&headers, &request) => {
            Some(Key::new(&principal.workspace_id.to_string(), &request))
        }
        _ => None,
    };
    if let (Some(cache), Some(key)) = (state.cache(), &cache_key)
        && let Some(hit) = cache.get(key).await
    {
        return Ok(serve_cached(
            &state,
            &principal,
            &request,
            &hit,
            client_wants_usage,
            started,
        )
        .await);
    }
    let ask = Ask::chat(&request);
    let reservation = TokenReservation::take(&state, &principal, &ask).await?;
    let budget = BudgetReservation::take(&state, &principal, &ask).await?;
    let router = state.router();
    let observer = Arc::new(EventObserver::new(
        state.events().clone(),
        principal.workspace_id,
    ));
    if !request.is_stream() {
        return match router.chat(&request, observer.as_ref()).await {
            Ok((response, served)) => {
                let (usage, estimated) = match response.usage {
                    Some(usage) => (usage, false),
                    None => {
                        // Counting with a tokenizer takes milliseconds on long texts: off
                        // the async threads.
                        let (prompt, text) = (request, response_text(&response));
                        let usage = tokio::task::spawn_blocking(move || estimate(&prompt, &text))
                            .await
                            .unwrap_or_default();
                        (usage, true)
                    }
                };
                let record = Account::new(&state, &principal, &served, started)
                    .reserving(reservation, budget)
                    .record(usage, estimated, None, "ok");
                state.usage().record(record).await;
                if let (Some(cache), Some(key)) = (state.cache(), cache_key) {
                    cache.put(key, Cached::Whole(response.clone())).await;
                }
                Ok(with_cache_header(
                    Json(response).into_response(),
                    cache_key.map(|_| "miss"),
                ))
            }
            Err(e) => {
                release(reservation.as_ref(), budget.as_ref());
                record_failure(&state, &principal, &request.model, &e, started).await;
                Err(e.into())
            }
        };
    }

    let (chunks, served) = match router.chat_stream(&request, observer).await {
        Ok(ok) => ok,
        Err(e) => {
            release(reservation.as_ref(), budget.as_ref());
            record_failure(&state, &principal, &request.model, &e, started).await;
            return Err(e.into());
        }
    };
    let account = StreamAccount {
        account: Some(
            Account::new(&state, &principal, &served, started).reserving(reservation, budget),
        ),
        ttft: started.elapsed(),
        usage: None,
        streamed_text: String::new(),
        prompt: Arc::new(request),
        estimated: false,
        outcome: "canceled",
    };
    // On a cache miss the chunks are kept, within the entry size limit, and stored once
    // the stream has finished cleanly.
    let mut keep = cache_key.map(|key| (key, Vec::new(), 0usize));
    let cache = state.inner_cache();
    // Chunks as `data:` frames, then `[DONE]` after a clean end; a failure mid-way ends
    // the stream with an error event instead (and no `[DONE]`). The account is recorded
    // when this stream is dropped: at its end, or when the client goes away.
    let frames = futures_util::stream::unfold(
        (chunks, account, false, keep.take(), cache),
        move |(mut chunks, mut account, finished, mut keep, cache)| async move {
            if finished {
                return None;
            }
            loop {
                let (frame, finished) = match chunks.next().await {
                    Some(Ok(chunk)) => {
                        if let Some((_, kept, bytes)) = &mut keep {
                            *bytes += chunk
                                .choices
                                .iter()
                                .map(|c| c.delta.to_string().len())
                                .sum::<usize>()
                                + 64;
                            if *bytes <= MAX_KEPT_STREAM_BYTES {
                                kept.push(chunk.clone());
                            } else {
                                keep = None;
                            }
                        }
                        if let Some(usage) = chunk.usage {
                            account.usage = Some(usage);
                            if !client_wants_usage && chunk.choices.is_empty() {
                                continue;
                            }
                        }
                        for choice in &chunk.choices {
                            if let Some(text) = choice.delta.get("content").and_then(Value::as_str)
                            {
                                account.streamed_text.push_str(text);
                            }
                        }
                        match serde_json::to_string(&chunk) {
                            Ok(json) => (format!("data: {json}\n\n"), false),
                            Err(e) => {
                                account.outcome = "internal";
                                (
                                    error_frame("internal", &format!("cannot encode a chunk: {e}")),
                                    true,
                                )
                            }
                        }
                    }
                    Some(Err(e)) => {
                        account.outcome = e.kind.as_str();
                        (
                            error_frame(
                                e.kind.as_str(),
                                &format!("the provider failed mid-stream: {}", e.kind),
                            ),
                            true,
                        )
                    }
                    None => {
                        account.outcome = "ok";
                        account.estimate_if_unreported().await;
                        if let (Some(cache), Some((key, kept, _))) = (&cache, keep.take()) {
                            cache.put(key, Cached::Stream(kept)).await;
                        }
                        ("data: [DONE]\n\n".to_owned(), true)
                    }
                };
                return Some((
                    Ok::<_, Infallible>(Bytes::from(frame)),
                    (chunks, account, finished, keep, cache),
                ));
            }
        },
    );
    Ok(with_cache_header(
        sse(Body::from_stream(frames)),
        cache_key.map(|_| "miss"),
    ))
}

/// Creates embeddings (OpenAI format). Requires role: member.
#[utoipa::path(post, path = "/v1/embeddings", tag = super::GATEWAY,
    request_body(content = Object, description = "An OpenAI embeddings request; `model` is a Keel route name"),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The embeddings", body = Object),
        (status = 400, description = "Malformed request, or the route's provider has no embeddings", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown model", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Every target failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    AppJson(request): AppJson<EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    allowed_model(&principal, &request.model)?;
    let texts = request.texts();
    let valid = match &request.input {
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty() && items.len() <= 2048,
        _ => false,
    };
    if !valid {
        return Err(ApiError::bad_request(
            "input: must be a non-empty string or an array of 1 to 2048 inputs",
        ));
    }
    let ask = Ask::embeddings(&request, &texts);
    let reservation = TokenReservation::take(&state, &principal, &ask).await?;
    let budget = BudgetReservation::take(&state, &principal, &ask).await?;
    let started = Instant::now();
    let observer = EventObserver::new(state.events().clone(), principal.workspace_id);
    match state.router().embeddings(&request, &observer).await {
        Ok((response, served)) => {
            let (prompt_tokens, estimated) = match response.usage {
                Some(u) => (u.prompt_tokens, false),
                None => {
                    let texts = texts.clone();
                    let n = tokio::task::spawn_blocking(move || {
                        texts.iter().map(|t| approx_tokens(t)).sum()
                    })
                    .await
                    .unwrap_or_default();
                    (n, true)
                }
            };
            let usage = Usage::new(prompt_tokens, 0);
            let record = Account::new(&state, &principal, &served, started)
                .reserving(reservation, budget)
                .record(usage, estimated, None, "ok");
            state.usage().record(record).await;
            Ok(Json(response).into_response())
        }
        Err(e) => {
            release(reservation.as_ref(), budget.as_ref());
            record_failure(&state, &principal, &request.model, &e, started).await;
            Err(e.into())
        }
    }
}

/// Streams kept for the cache are abandoned past this many bytes.
const MAX_KEPT_STREAM_BYTES: usize = 1024 * 1024;

fn sse(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn with_cache_header(mut response: Response, state: Option<&'static str>) -> Response {
    if let Some(state) = state {
        response
            .headers_mut()
            .insert("x-keel-cache", HeaderValue::from_static(state));
    }
    response
}

/// Whether the cache may answer: a deterministic request (or `x-keel-cache: on`), and no
/// `Cache-Control: no-cache` or `no-store`.
fn cacheable(headers: &HeaderMap, request: &ChatRequest) -> bool {
    let refused = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            matches!(
                d.trim().to_ascii_lowercase().as_str(),
                "no-cache" | "no-store"
            )
        });
    let opted_in = headers
        .get("x-keel-cache")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"on"));
    !refused && (opted_in || keel_llm::cache::is_deterministic(request))
}

/// Answers from the cache: the whole answer, or the stream replayed; accounted as a
/// cache hit at no cost.
async fn serve_cached(
    state: &AppState,
    principal: &Principal,
    request: &ChatRequest,
    hit: &Cached,
    client_wants_usage: bool,
    started: Instant,
) -> Response {
    let usage = match hit {
        Cached::Whole(r) => r.usage,
        Cached::Stream(chunks) => chunks.iter().find_map(|c| c.usage),
    }
    .unwrap_or_default();
    let latency = started.elapsed();
    metrics::counter!("keel_llm_cache_hits_total", "route" => request.model.clone()).increment(1);
    state
        .usage()
        .record(UsageRecord {
            workspace_id: principal.workspace_id,
            api_key_id: principal.key_id,
            route: request.model.clone(),
            provider: "cache".to_owned(),
            upstream_model: "-".to_owned(),
            target: "cache".to_owned(),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            cached_tokens: usage.prompt_tokens,
            cost_nanousd: 0,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            ttft_ms: request
                .is_stream()
                .then(|| u64::try_from(latency.as_millis()).unwrap_or(u64::MAX)),
            cache_hit: true,
            estimated: false,
            outcome: "ok".to_owned(),
            created_at: OffsetDateTime::now_utc(),
        })
        .await;
    let response = match hit {
        Cached::Whole(response) => Json(response).into_response(),
        Cached::Stream(chunks) => {
            let mut frames: Vec<Result<Bytes, Infallible>> = chunks
                .iter()
                .filter(|c| client_wants_usage || !(c.usage.is_some() && c.choices.is_empty()))
                .filter_map(|c| serde_json::to_string(c).ok())
                .map(|json| Ok(Bytes::from(format!("data: {json}\n\n"))))
                .collect();
            frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
            sse(Body::from_stream(futures_util::stream::iter(frames)))
        }
    };
    with_cache_header(response, Some("hit"))
}

/// Tokens taken from the caller's tokens-per-minute limits before a request goes
/// upstream: an estimate (the prompt's length / 4 plus `max_tokens`, or 256), settled to
/// the real count when the request is accounted — or given back whole if it fails.
struct TokenReservation {
    state: AppState,
    buckets: Vec<(crate::ratelimit::LimitKey, crate::ratelimit::Rate)>,
    reserved: i64,
    actual: std::sync::atomic::AtomicI64,
}

/// What a request asks of a model, for reservations made before it goes upstream.
struct Ask<'a> {
    /// The public model name.
    model: &'a str,
    /// Bytes of prompt text: an upper bound of its tokens.
    prompt_bytes: u64,
    /// The output tokens it may produce (`max_tokens`), if it says; 0 for embeddings.
    max_out: Option<u64>,
}

impl<'a> Ask<'a> {
    fn chat(request: &'a ChatRequest) -> Self {
        Self {
            model: &request.model,
            // A few bytes per message for its framing tokens.
            prompt_bytes: request
                .messages
                .iter()
                .map(|m| m.text().len() as u64 + 8)
                .sum(),
            max_out: ["max_completion_tokens", "max_tokens"]
                .iter()
                .find_map(|k| request.extra.get(*k).and_then(Value::as_u64)),
        }
    }

    fn embeddings(request: &'a EmbeddingsRequest, texts: &[String]) -> Self {
        Self {
            model: &request.model,
            prompt_bytes: texts.iter().map(|t| t.len() as u64 + 1).sum(),
            max_out: Some(0),
        }
    }
}

impl TokenReservation {
    /// Reserves the estimate (prompt bytes / 4, plus `max_tokens` or 256); `None` when no
    /// token limit applies; 429 past one. An estimate larger than a bucket holds is cut
    /// to the bucket, so a large request waits for a full bucket instead of never fitting.
    async fn take(
        state: &AppState,
        principal: &Principal,
        ask: &Ask<'_>,
    ) -> Result<Option<Self>, ApiError> {
        let limits = state
            .limits_for(principal.workspace_id)
            .await
            .for_credential(&state.config().limits, principal);
        let buckets = limits.token_buckets(principal);
        let Some(smallest) = buckets.iter().map(|(_, rate)| i64::from(rate.limit)).min() else {
            return Ok(None);
        };
        let estimate = (ask.prompt_bytes / 4).saturating_add(ask.max_out.unwrap_or(256));
        let reserved = i64::try_from(estimate)
            .unwrap_or(i64::MAX)
            .clamp(1, smallest);
        let decision = state
            .limiter()
            .check(&buckets, reserved, crate::ratelimit::Mode::Take)
            .await;
        if !decision.allowed {
            metrics::counter!("keel_ratelimit_rejections_total", "limit" => "tokens").increment(1);
            return Err(crate::auth::too_many(&decision, &limits));
        }
        Ok(Some(Self {
            state: state.clone(),
            buckets,
            reserved,
            // Until the request is accounted, it counts as having used its reservation: a
            // request cut off (timeout, client gone) after the provider billed is not
            // given back. A request the provider refused is released.
            actual: std::sync::atomic::AtomicI64::new(reserved),
        }))
    }

    /// The provider did not serve the request: give the whole reservation back.
    fn release(&self) {
        self.actual.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        let delta = self.actual.load(std::sync::atomic::Ordering::Relaxed) - self.reserved;
        if delta == 0 {
            return;
        }
        let state = self.state.clone();
        let buckets = std::mem::take(&mut self.buckets);
        tokio::spawn(async move {
            state
                .limiter()
                .check(&buckets, delta, crate::ratelimit::Mode::Force)
                .await;
        });
    }
}

/// 403 when the caller's key is limited to other models.
fn allowed_model(principal: &Principal, model: &str) -> Result<(), ApiError> {
    if principal.may_use_model(model) {
        return Ok(());
    }
    let allowed = principal
        .models
        .as_deref()
        .map(|m| m.join(", "))
        .unwrap_or_default();
    Err(ApiError::forbidden(format!(
        "this key may not call model {model:?}; it may call: {allowed}"
    )))
}

/// The maximum cost of a request, reserved in the budgets that cover it before it goes
/// upstream (prompt bytes as an upper bound of its tokens, plus `max_tokens` or 4,096, at
/// the route's highest prices) and settled to the real cost after — or released whole if
/// it fails. So spend + reservations never pass a budget, across any number of
/// instances.
struct BudgetReservation {
    state: AppState,
    workspace: keel_core::id::WorkspaceId,
    key: Option<keel_core::id::ApiKeyId>,
    held: Vec<keel_store::budgets::Held>,
    reserved: i64,
    actual: std::sync::atomic::AtomicI64,
}

impl BudgetReservation {
    async fn take(
        state: &AppState,
        principal: &Principal,
        ask: &Ask<'_>,
    ) -> Result<Option<Self>, ApiError> {
        if !state.limits_for(principal.workspace_id).await.has_budgets {
            return Ok(None);
        }
        let Some(route) = state.router().routes().find(|r| r.name == ask.model) else {
            return Ok(None); // the router answers 404 for an unknown model
        };
        let (input_price, output_price) = route.max_prices();
        let max_out = ask.max_out.unwrap_or(4096);
        let cost = keel_llm::cost_nanousd(ask.prompt_bytes, max_out, input_price, output_price);
        let reserved = i64::try_from(cost).unwrap_or(i64::MAX);
        match state
            .store()
            .reserve_budget(principal.workspace_id, principal.key_id, reserved)
            .await?
        {
            keel_store::budgets::Reservation::Reserved(held) => Ok(Some(Self {
                state: state.clone(),
                workspace: principal.workspace_id,
                key: principal.key_id,
                held,
                reserved,
                // As for tokens: spent in full unless accounted or released.
                actual: std::sync::atomic::AtomicI64::new(reserved),
            })),
            keel_store::budgets::Reservation::Exceeded(b) => {
                metrics::counter!("keel_budget_rejections_total").increment(1);
                let usd = |n: i64| n as f64 / 1e9;
                Err(ApiError::payment_required(format!(
                    "budget exceeded: the {} budget of ${:.4} would be passed by this request (up to ${:.4}):                      ${:.4} spent, ${:.4} reserved by requests in flight; it resets at {}",
                    b.name(),
                    usd(b.limit_nanousd),
                    usd(reserved),
                    usd(b.spent_nanousd),
                    usd(b.reserved_nanousd),
                    super::rfc3339(b.resets_at()),
                )))
            }
        }
    }
}

impl BudgetReservation {
    /// The provider did not serve the request: nothing was spent.
    fn release(&self) {
        self.actual.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Gives back whatever the provider did not serve.
fn release(tokens: Option<&TokenReservation>, budget: Option<&BudgetReservation>) {
    if let Some(t) = tokens {
        t.release();
    }
    if let Some(b) = budget {
        b.release();
    }
}

impl Drop for BudgetReservation {
    fn drop(&mut self) {
        let actual = self.actual.load(std::sync::atomic::Ordering::Relaxed);
        let (state, ws, key, reserved) =
            (self.state.clone(), self.workspace, self.key, self.reserved);
        let held = std::mem::take(&mut self.held);
        tokio::spawn(async move {
            match state
                .store()
                .settle_budget(ws, key, &held, reserved, actual)
                .await
            {
                Ok(events) => state.events().publish(&events),
                Err(e) => {
                    metrics::counter!("keel_budget_settle_errors_total").increment(1);
                    tracing::error!(error = %e, workspace_id = %ws, "cannot settle a budget reservation");
                }
            }
        });
    }
}

/// What one routed request is billed to, and by whom it was served.
struct Account {
    recorder: crate::usage::Recorder,
    workspace_id: keel_core::id::WorkspaceId,
    key_id: Option<keel_core::id::ApiKeyId>,
    served: Served,
    started: Instant,
    reservation: Option<TokenReservation>,
    budget: Option<BudgetReservation>,
}

impl Account {
    fn new(state: &AppState, principal: &Principal, served: &Served, started: Instant) -> Self {
        Self {
            recorder: state.usage().clone(),
            workspace_id: principal.workspace_id,
            key_id: principal.key_id,
            served: served.clone(),
            started,
            reservation: None,
            budget: None,
        }
    }

    fn reserving(
        mut self,
        reservation: Option<TokenReservation>,
        budget: Option<BudgetReservation>,
    ) -> Self {
        self.reservation = reservation;
        self.budget = budget;
        self
    }

    /// The usage record, with the request's metrics counted.
    fn record(
        &self,
        usage: Usage,
        estimated: bool,
        ttft: Option<Duration>,
        outcome: &str,
    ) -> UsageRecord {
        if let Some(r) = &self.reservation {
            let used = usage.prompt_tokens.saturating_add(usage.completion_tokens);
            r.actual.store(
                i64::try_from(used).unwrap_or(i64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let s = &self.served;
        let latency = self.started.elapsed();
        let cost = s.prices.cost(&usage);
        if let Some(b) = &self.budget {
            b.actual.store(
                i64::try_from(cost).unwrap_or(i64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let labels = [
            ("route", s.route.clone()),
            ("provider", s.provider.as_str().to_owned()),
            ("model", s.upstream_model.clone()),
        ];
        // The three labels and one more.
        let and = |key: &'static str, value: &str| {
            [
                labels[0].clone(),
                labels[1].clone(),
                labels[2].clone(),
                (key, value.to_owned()),
            ]
        };
        metrics::counter!("keel_llm_requests_total", &and("outcome", outcome)).increment(1);
        metrics::histogram!("keel_llm_request_duration_seconds", &labels)
            .record(latency.as_secs_f64());
        if let Some(ttft) = ttft {
            metrics::histogram!("keel_llm_time_to_first_token_seconds", &labels)
                .record(ttft.as_secs_f64());
        }
        let tokens = [
            ("input", usage.prompt_tokens),
            ("output", usage.completion_tokens),
            ("cached", usage.cached_tokens()),
        ];
        for (kind, n) in tokens {
            // No cached series (and no label allocations for it) where nothing was cached.
            if kind == "cached" && n == 0 {
                continue;
            }
            metrics::counter!("keel_llm_tokens_total", &and("kind", kind)).increment(n);
        }
        metrics::counter!("keel_llm_cost_nanousd_total", &labels).increment(cost);
        UsageRecord {
            workspace_id: self.workspace_id,
            api_key_id: self.key_id,
            route: s.route.clone(),
            provider: s.provider.as_str().to_owned(),
            upstream_model: s.upstream_model.clone(),
            target: s.target.clone(),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens(),
            cost_nanousd: cost,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            ttft_ms: ttft.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            cache_hit: false,
            estimated,
            outcome: outcome.to_owned(),
            created_at: OffsetDateTime::now_utc(),
        }
    }
}

/// A streamed request's account, recorded when the stream is dropped.
struct StreamAccount {
    account: Option<Account>,
    ttft: Duration,
    usage: Option<Usage>,
    streamed_text: String,
    /// The request, for counting its tokens when the provider reports no usage.
    prompt: Arc<ChatRequest>,
    /// `usage` was counted here, not reported by the provider.
    estimated: bool,
    outcome: &'static str,
}

impl StreamAccount {
    /// At the end of a stream the provider reported no usage for: counts the tokens with
    /// the tokenizer on the blocking pool (milliseconds for long texts), before the
    /// account is recorded — so the record is written while the request is still in
    /// flight, and graceful shutdown keeps it.
    async fn estimate_if_unreported(&mut self) {
        if self.usage.is_some() {
            return;
        }
        let (prompt, text) = (self.prompt.clone(), self.streamed_text.clone());
        let usage = tokio::task::spawn_blocking(move || estimate(&prompt, &text))
            .await
            .unwrap_or_default();
        self.usage = Some(usage);
        self.estimated = true;
    }
}

impl Drop for StreamAccount {
    fn drop(&mut self) {
        let Some(account) = self.account.take() else {
            return;
        };
        let (usage, estimated) = match self.usage {
            Some(usage) => (usage, self.estimated),
            // The client left mid-stream before the provider reported usage: counted here
            // (rare), so the record is not lost to a task that could outlive the writer.
            None => (estimate(&self.prompt, &self.streamed_text), true),
        };
        let record = account.record(usage, estimated, Some(self.ttft), self.outcome);
        account.recorder.record_now(record);
    }
}

/// A failed routed request: a usage row with no tokens and the error kind as outcome.
async fn record_failure(
    state: &AppState,
    principal: &Principal,
    route: &str,
    e: &keel_llm::Error,
    started: Instant,
) {
    let (target, outcome) = match e {
        keel_llm::Error::UnknownModel { .. } => return,
        keel_llm::Error::Rejected(p) | keel_llm::Error::InvalidResponse(p) => {
            ("-".to_owned(), p.kind.as_str())
        }
        keel_llm::Error::AllTargetsFailed(failures) => match failures.last() {
            Some((target, p)) => (target.clone(), p.kind.as_str()),
            None => ("-".to_owned(), "unavailable"),
        },
    };
    metrics::counter!("keel_llm_requests_total", "route" => route.to_owned(), "provider" => "-", "model" => "-", "outcome" => outcome).increment(1);
    state
        .usage()
        .record(UsageRecord {
            workspace_id: principal.workspace_id,
            api_key_id: principal.key_id,
            route: route.to_owned(),
            provider: "-".to_owned(),
            upstream_model: "-".to_owned(),
            target,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            cost_nanousd: 0,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ttft_ms: None,
            cache_hit: false,
            estimated: false,
            outcome: outcome.to_owned(),
            created_at: OffsetDateTime::now_utc(),
        })
        .await;
}

fn response_text(response: &keel_llm::types::ChatResponse) -> String {
    response.choices.iter().map(|c| c.message.text()).collect()
}

/// Token counts when the provider reported none (marked `estimated`).
fn estimate(request: &ChatRequest, completion: &str) -> Usage {
    let prompt: u64 = request
        .messages
        .iter()
        .map(|m| approx_tokens(&m.text()))
        .sum();
    let completion = approx_tokens(completion);
    Usage::new(prompt, completion)
}

/// Tokens in `text`, with a real tokenizer (o200k_base), for estimated usage.
fn approx_tokens(text: &str) -> u64 {
    keel_llm::tokens::count(text)
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
