//! The router: a public model name → its targets, tried with retries (exponential backoff
//! with full jitter; `Retry-After` honoured up to a cap), a circuit breaker per target,
//! and fallback to the next target when retries are spent or the breaker is open — all
//! within the route's total timeout.
//!
//! Only retryable failures are retried (429, 5xx, timeouts, connection errors, invalid
//! responses); a 4xx from upstream is the caller's mistake and is returned at once. Every
//! provider error and every fallback is logged, counted, and told to the caller's
//! [`Observer`] (the gateway records them as `llm.provider.error` /
//! `llm.provider.fallback` events).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use keel_core::config::{ModelRoute, ProviderKind, Strategy};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Prices;
use crate::breaker::{self, Breaker};
use crate::error::{Error, ErrorKind, ProviderError, Result};
use crate::provider::{ChunkStream, Provider};
use crate::providers;
use crate::types::{ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse};

/// Where a failed attempt happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before an answer (or a stream's first chunk) arrived.
    Request,
    /// In a stream, after its first chunk.
    Stream,
}

impl Phase {
    /// `request` or `stream`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Stream => "stream",
        }
    }
}

/// One failed attempt at a target.
#[derive(Debug)]
pub struct AttemptFailed<'a> {
    /// The route.
    pub route: &'a str,
    /// The target's label.
    pub target: &'a str,
    /// Its protocol.
    pub provider: ProviderKind,
    /// Its upstream model.
    pub upstream_model: &'a str,
    /// What went wrong.
    pub error: &'a ProviderError,
    /// Attempts at this target so far, this one included.
    pub attempt: u32,
    /// Before or after the first chunk.
    pub phase: Phase,
}

/// A move from one target to the next.
#[derive(Debug)]
pub struct FellBack<'a> {
    /// The route.
    pub route: &'a str,
    /// The target given up on.
    pub from: &'a str,
    /// The target tried next.
    pub to: &'a str,
    /// Why the previous one was given up on (its last error kind).
    pub reason: &'a str,
}

/// Told about every failed attempt and every fallback of one request, as they happen
/// (the gateway records them as `llm.provider.error` / `llm.provider.fallback` events).
/// Called on the request's task: implementations must not block.
pub trait Observer: Send + Sync {
    /// An attempt failed.
    fn attempt_failed(&self, failure: &AttemptFailed<'_>);
    /// The route moved on to its next target.
    fn fell_back(&self, fallback: &FellBack<'_>);
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn attempt_failed(&self, _: &AttemptFailed<'_>) {}
    fn fell_back(&self, _: &FellBack<'_>) {}
}

/// One target of a route, with its live state.
#[derive(Debug)]
pub struct TargetState {
    /// `provider/model` (and host), for logs, metrics and error listings.
    pub label: String,
    /// Which protocol.
    pub provider_kind: ProviderKind,
    /// The upstream model.
    pub model: String,
    /// Its prices.
    pub prices: Prices,
    provider: Arc<dyn Provider>,
    breaker: Arc<Breaker>,
    permits: Arc<Semaphore>,
    weight: u32,
}

impl TargetState {
    /// The breaker's state.
    pub fn breaker_state(&self) -> breaker::State {
        self.breaker.state()
    }
}

/// A route and its targets.
#[derive(Debug)]
pub struct Route {
    /// The public model name.
    pub name: String,
    /// Its config.
    pub config: ModelRoute,
    /// Its targets, in fallback order.
    pub targets: Vec<TargetState>,
}

impl Route {
    /// The smallest context window among its targets, if any is configured: whichever
    /// target serves a request, it must fit.
    #[must_use]
    pub fn context_window(&self) -> Option<u32> {
        self.config
            .targets
            .iter()
            .filter_map(|t| t.context_window)
            .min()
    }

    /// The highest input and output prices among its targets (USD per million tokens):
    /// the most a request can cost per token, whichever target serves it.
    #[must_use]
    pub fn max_prices(&self) -> (f64, f64) {
        self.targets.iter().fold((0.0, 0.0), |(i, o), t| {
            (i.max(t.prices.max_input()), o.max(t.prices.output))
        })
    }
}

/// Which target served a request, and how.
#[derive(Debug, Clone)]
pub struct Served {
    /// The route.
    pub route: String,
    /// The target's label.
    pub target: String,
    /// Its protocol.
    pub provider: ProviderKind,
    /// Its upstream model.
    pub upstream_model: String,
    /// Its prices.
    pub prices: Prices,
    /// Attempts made, across targets.
    pub attempts: u32,
}

/// The gateway's routing table.
#[derive(Debug)]
pub struct Router {
    routes: BTreeMap<String, Route>,
}

/// Why the routing table could not be built.
#[derive(Debug, thiserror::Error)]
#[error("models.{route}.targets[{index}]: {message}")]
pub struct BuildError {
    route: String,
    index: usize,
    message: String,
}

impl Router {
    /// Builds the table. `env` reads API keys by variable name (the process environment
    /// in production).
    pub fn new(
        routes: &BTreeMap<String, ModelRoute>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, BuildError> {
        let mut table = BTreeMap::new();
        for (name, config) in routes {
            let mut targets = Vec::with_capacity(config.targets.len());
            for (index, target) in config.targets.iter().enumerate() {
                let err = |message: String| BuildError {
                    route: name.clone(),
                    index,
                    message,
                };
                let api_key = match &target.api_key_env {
                    Some(var) => Some(
                        env(var)
                            .ok_or_else(|| err(format!("environment variable {var} is not set")))?,
                    ),
                    None => None,
                };
                let provider: Arc<dyn Provider> = match target.provider {
                    ProviderKind::Openai => Arc::new(
                        providers::openai::OpenAi::new(target, api_key)
                            .map_err(|e| err(e.message))?,
                    ),
                    ProviderKind::Mock => Arc::new(providers::mock::Mock),
                    ProviderKind::Anthropic => Arc::new(
                        providers::anthropic::Anthropic::new(target, api_key)
                            .map_err(|e| err(e.message))?,
                    ),
                };
                let host = target
                    .base_url
                    .as_deref()
                    .and_then(|u| u.split("://").nth(1))
                    .and_then(|rest| rest.split('/').next())
                    .map(|h| format!("@{h}"))
                    .unwrap_or_default();
                let kind = match target.provider {
                    ProviderKind::Openai => "openai",
                    ProviderKind::Anthropic => "anthropic",
                    ProviderKind::Mock => "mock",
                };
                targets.push(TargetState {
                    label: format!(
                        "{kind}/{}{host}",
                        if target.model.is_empty() {
                            "echo"
                        } else {
                            &target.model
                        }
                    ),
                    provider_kind: target.provider,
                    model: target.model.clone(),
                    prices: Prices::of(target),
                    provider,
                    breaker: Arc::new(Breaker::new(config.breaker.clone())),
                    permits: Arc::new(Semaphore::new(
                        usize::try_from(target.max_concurrency).unwrap_or(usize::MAX),
                    )),
                    weight: target.weight,
                });
            }
            table.insert(
                name.clone(),
                Route {
                    name: name.clone(),
                    config: config.clone(),
                    targets,
                },
            );
        }
        Ok(Self { routes: table })
    }

    /// Every route, by name.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    fn route(&self, model: &str) -> Result<&Route> {
        self.routes.get(model).ok_or_else(|| Error::UnknownModel {
            model: model.to_owned(),
            available: self.routes.keys().cloned().collect(),
        })
    }

    /// A whole answer from the route named by `request.model`.
    pub async fn chat(
        &self,
        request: &ChatRequest,
        observer: &dyn Observer,
    ) -> Result<(ChatResponse, Served)> {
        let route = self.route(&request.model)?;
        let (mut response, _permit, served) = run(route, observer, |t| {
            let provider = t.provider.clone();
            async move { provider.chat(request).await }
        })
        .await?;
        response.model.clone_from(&route.name);
        Ok((response, served))
    }

    /// Embeddings from the route named by `request.model`.
    pub async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
        observer: &dyn Observer,
    ) -> Result<(EmbeddingsResponse, Served)> {
        let route = self.route(&request.model)?;
        let (mut response, _permit, served) = run(route, observer, |t| {
            let provider = t.provider.clone();
            async move { provider.embeddings(request).await }
        })
        .await?;
        response.model.clone_from(&route.name);
        Ok((response, served))
    }

    /// A streamed answer. Fails (and may fall back) only before the first chunk; a later
    /// failure is an `Err` item that ends the stream.
    pub async fn chat_stream(
        &self,
        request: &ChatRequest,
        observer: Arc<dyn Observer>,
    ) -> Result<(ChunkStream, Served)> {
        let route = self.route(&request.model)?;
        let (stream, permit, served) = run(route, observer.as_ref(), |t| {
            let provider = t.provider.clone();
            async move { provider.chat_stream(request).await }
        })
        .await?;
        let name = route.name.clone();
        let labels = [("route", name.clone()), ("target", served.target.clone())];
        let breaker = route
            .targets
            .iter()
            .find(|t| t.label == served.target)
            .map(|t| t.breaker.clone());
        let (provider, upstream_model) = (served.provider, served.upstream_model.clone());
        // The permit lives as long as the stream; the model name is the route's; a failure
        // mid-way counts against the target's breaker like any other.
        let stream = stream.map(move |item| {
            let _held = &permit;
            match item {
                Ok(mut chunk) => {
                    chunk.model.clone_from(&name);
                    Ok(chunk)
                }
                Err(e) => {
                    if let Some(breaker) = &breaker
                        && e.kind.is_retryable()
                    {
                        breaker.record_failure();
                    }
                    metrics::counter!("keel_llm_provider_errors_total", &[
                        labels[0].clone(),
                        labels[1].clone(),
                        ("kind", e.kind.as_str().to_owned()),
                    ])
                    .increment(1);
                    tracing::warn!(event_type = "llm.provider.error", route = %labels[0].1, target = %labels[1].1,
                        kind = %e.kind, error = %e.message, "stream failed mid-way");
                    observer.attempt_failed(&AttemptFailed {
                        route: &labels[0].1,
                        target: &labels[1].1,
                        provider,
                        upstream_model: &upstream_model,
                        error: &e,
                        attempt: 1,
                        phase: Phase::Stream,
                    });
                    Err(e)
                }
            }
        });
        Ok((Box::pin(stream), served))
    }
}

/// Full jitter: a uniform delay in [0, min(max, base·2^attempt)].
fn backoff(retry: &keel_core::config::Retry, attempt: u32) -> Duration {
    let exp = retry
        .base_delay
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX));
    let cap = exp.min(retry.max_delay);
    cap.mul_f64(fastrand::f64())
}

/// The order targets are tried in: as configured, or (weighted) the first drawn by
/// weight and the rest in order.
fn order(route: &Route) -> Vec<&TargetState> {
    let mut targets: Vec<&TargetState> = route.targets.iter().collect();
    if route.config.strategy == Strategy::Weighted && targets.len() > 1 {
        let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
        if total > 0 {
            let mut pick = fastrand::u64(..total);
            let first = targets
                .iter()
                .position(|t| {
                    let w = u64::from(t.weight);
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            let chosen = targets.remove(first);
            targets.insert(0, chosen);
        }
    }
    targets
}

async fn run<'r, T, F, Fut>(
    route: &'r Route,
    observer: &dyn Observer,
    mut call: F,
) -> Result<(T, OwnedSemaphorePermit, Served)>
where
    F: FnMut(&'r TargetState) -> Fut,
    Fut: Future<Output = std::result::Result<T, ProviderError>>,
{
    let started = Instant::now();
    let deadline = started + route.config.timeout;
    let retry = &route.config.retry;
    let mut failures: Vec<(String, ProviderError)> = Vec::new();
    let mut attempts = 0u32;
    let targets = order(route);
    for (position, target) in targets.iter().enumerate() {
        let target: &'r TargetState = target;
        if position > 0 {
            let from = &targets[position - 1].label;
            metrics::counter!("keel_llm_fallbacks_total", "route" => route.name.clone(), "from" => from.clone(), "to" => target.label.clone()).increment(1);
            tracing::warn!(event_type = "llm.provider.fallback", route = %route.name, from = %from, to = %target.label, "falling back");
            observer.fell_back(&FellBack {
                route: &route.name,
                from,
                to: &target.label,
                reason: failures
                    .last()
                    .map_or("unavailable", |(_, e)| e.kind.as_str()),
            });
        }
        // The permit first: a half-open breaker's single probe must not be spent on a
        // call that never happens.
        let Ok(permit) = target.permits.clone().try_acquire_owned() else {
            failures.push((
                target.label.clone(),
                ProviderError::new(ErrorKind::Unavailable, "max_concurrency reached"),
            ));
            continue;
        };
        if !target.breaker.allow() {
            failures.push((
                target.label.clone(),
                ProviderError::new(ErrorKind::Unavailable, "circuit breaker open"),
            ));
            continue;
        }
        let mut last: Option<ProviderError> = None;
        for attempt in 0..retry.max_attempts {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            attempts += 1;
            let result = match tokio::time::timeout(remaining, call(target)).await {
                Ok(result) => result,
                Err(_) => Err(ProviderError::new(
                    ErrorKind::Timeout,
                    format!("route timeout of {:?} reached", route.config.timeout),
                )),
            };
            match result {
                Ok(value) => {
                    let state = target.breaker.record_success();
                    breaker_gauge(route, target, state);
                    let served = Served {
                        route: route.name.clone(),
                        target: target.label.clone(),
                        provider: target.provider_kind,
                        upstream_model: target.model.clone(),
                        prices: target.prices,
                        attempts,
                    };
                    return Ok((value, permit, served));
                }
                Err(e) => {
                    // A caller's mistake (upstream 4xx) says nothing about the target's
                    // health: it is not a breaker failure.
                    let state = if e.kind.is_retryable() {
                        target.breaker.record_failure()
                    } else {
                        target.breaker.record_success()
                    };
                    breaker_gauge(route, target, state);
                    metrics::counter!("keel_llm_provider_errors_total", "route" => route.name.clone(), "target" => target.label.clone(), "kind" => e.kind.as_str()).increment(1);
                    tracing::warn!(event_type = "llm.provider.error", route = %route.name, target = %target.label,
                        kind = %e.kind, status = e.status, attempt = attempt + 1, error = %e.message, "provider call failed");
                    observer.attempt_failed(&AttemptFailed {
                        route: &route.name,
                        target: &target.label,
                        provider: target.provider_kind,
                        upstream_model: &target.model,
                        error: &e,
                        attempt: attempt + 1,
                        phase: Phase::Request,
                    });
                    if !e.kind.is_retryable() {
                        return Err(Error::Rejected(e));
                    }
                    let wait = match e.retry_after {
                        Some(after) if after > retry.max_retry_after => None,
                        Some(after) => Some(after),
                        None => Some(backoff(retry, attempt)),
                    };
                    let more = attempt + 1 < retry.max_attempts && state != breaker::State::Open;
                    last = Some(e);
                    match wait {
                        Some(wait) if more && Instant::now() + wait < deadline => {
                            tokio::time::sleep(wait).await
                        }
                        _ => break,
                    }
                }
            }
        }
        if let Some(e) = last {
            failures.push((target.label.clone(), e));
        }
    }
    if !failures.is_empty()
        && failures
            .iter()
            .all(|(_, e)| e.kind == ErrorKind::InvalidResponse)
    {
        let (_, last) = failures.swap_remove(failures.len() - 1);
        return Err(Error::InvalidResponse(last));
    }
    Err(Error::AllTargetsFailed(failures))
}

fn breaker_gauge(route: &Route, target: &TargetState, state: breaker::State) {
    metrics::gauge!("keel_llm_breaker_state", "route" => route.name.clone(), "target" => target.label.clone()).set(state.gauge());
}
