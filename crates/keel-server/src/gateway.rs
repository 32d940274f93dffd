//! Builds the gateway's routing table from config. With no `[models]` at all, Keel still
//! serves a model `default`: OpenAI when `OPENAI_API_KEY` is set, else Anthropic when
//! `ANTHROPIC_API_KEY` is, else the in-process echo mock — said plainly at start-up and in
//! /v1/models, so nobody mistakes echo for a model.

use std::collections::BTreeMap;

use keel_core::config::{Config, ModelRoute, ProviderKind, Target};
use keel_llm::Router;

/// What the default route is, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    /// `[models]` is configured; no default was added.
    Configured,
    /// `default` goes to OpenAI (`OPENAI_API_KEY`).
    OpenAi,
    /// `default` goes to Anthropic (`ANTHROPIC_API_KEY`, and no `OPENAI_API_KEY`).
    Anthropic,
    /// `default` is the in-process echo mock.
    EchoMock,
}

/// The routing table for `config`, reading API keys through `env`.
pub fn router(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Router, Default), keel_llm::router::BuildError> {
    if !config.models.is_empty() {
        return Ok((Router::new(&config.models, env)?, Default::Configured));
    }
    let target = |provider, model: &str, key: Option<&str>| Target {
        provider,
        model: model.to_owned(),
        base_url: None,
        api_key_env: key.map(str::to_owned),
        api_version: None,
        connect_timeout: std::time::Duration::from_secs(5),
        first_token_timeout: std::time::Duration::from_secs(60),
        total_timeout: std::time::Duration::from_secs(120),
        input_price_per_mtok: 0.0,
        output_price_per_mtok: 0.0,
        cached_input_price_per_mtok: None,
        cache_write_price_per_mtok: None,
        max_concurrency: 256,
        weight: 1,
        stream_usage: true,
        context_window: None,
    };
    let (chosen, kind) = if env("OPENAI_API_KEY").is_some() {
        (
            target(ProviderKind::Openai, "gpt-4o-mini", Some("OPENAI_API_KEY")),
            Default::OpenAi,
        )
    } else if env("ANTHROPIC_API_KEY").is_some() {
        (
            target(
                ProviderKind::Anthropic,
                "claude-sonnet-4-5",
                Some("ANTHROPIC_API_KEY"),
            ),
            Default::Anthropic,
        )
    } else {
        (target(ProviderKind::Mock, "", None), Default::EchoMock)
    };
    let route = ModelRoute {
        strategy: keel_core::config::Strategy::Ordered,
        targets: vec![chosen],
        retry: keel_core::config::Retry::default(),
        breaker: keel_core::config::Breaker::default(),
        timeout: std::time::Duration::from_secs(120),
    };
    let routes = BTreeMap::from([("default".to_owned(), route)]);
    Ok((Router::new(&routes, env)?, kind))
}

/// The response cache `config` asks for: Redis when `redis.url` is set (falling back to
/// the in-process cache, with a warning, when Redis cannot be reached at start), `None`
/// when `cache.enabled` is false.
pub async fn cache(config: &Config) -> Option<std::sync::Arc<keel_llm::cache::ResponseCache>> {
    use secrecy::ExposeSecret as _;
    let c = &config.cache;
    if !c.enabled {
        return None;
    }
    let memory =
        || keel_llm::cache::ResponseCache::in_memory(c.ttl, c.max_bytes, c.max_entry_bytes);
    let cache = match &config.redis.url {
        Some(url) => match keel_llm::cache::ResponseCache::redis(
            url.expose_secret(),
            config.redis.ca_file.as_deref(),
            c.ttl,
            c.max_entry_bytes,
        )
        .await
        {
            Ok(cache) => cache,
            Err(e) => {
                tracing::warn!(error = %e, "response cache falls back to in-process memory");
                memory()
            }
        },
        None => memory(),
    };
    Some(std::sync::Arc::new(cache))
}

/// Records a request's failed attempts and fallbacks as `llm.provider.error` and
/// `llm.provider.fallback` events in its workspace's log.
#[derive(Debug)]
pub(crate) struct EventObserver {
    log: crate::events::EventLog,
    workspace: keel_core::id::WorkspaceId,
    correlation_id: Option<String>,
}

impl EventObserver {
    pub(crate) fn new(log: crate::events::EventLog, workspace: keel_core::id::WorkspaceId) -> Self {
        Self {
            log,
            workspace,
            correlation_id: crate::telemetry::current_trace_id(),
        }
    }
}

impl keel_llm::router::Observer for EventObserver {
    fn attempt_failed(&self, f: &keel_llm::router::AttemptFailed<'_>) {
        let data = serde_json::json!({
            "route": f.route,
            "target": f.target,
            "provider": f.provider.as_str(),
            "upstream_model": f.upstream_model,
            "kind": f.error.kind.as_str(),
            "status": f.error.status,
            "message": f.error.message,
            "attempt": f.attempt,
            "phase": f.phase.as_str(),
        });
        self.log.emit(
            keel_core::event::NewEvent::new(
                keel_core::event::EventType::LlmProviderError,
                self.workspace,
                data,
            )
            .correlated(self.correlation_id.clone()),
        );
    }

    fn fell_back(&self, f: &keel_llm::router::FellBack<'_>) {
        let data = serde_json::json!({
            "route": f.route,
            "from_target": f.from,
            "to_target": f.to,
            "reason": f.reason,
        });
        self.log.emit(
            keel_core::event::NewEvent::new(
                keel_core::event::EventType::LlmProviderFallback,
                self.workspace,
                data,
            )
            .correlated(self.correlation_id.clone()),
        );
    }
}
