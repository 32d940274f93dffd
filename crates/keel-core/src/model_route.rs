//! Model routes: the public model names callers use (`"default"`, `"fast"`), each mapped
//! to an ordered (or weighted) list of provider targets. Config types only; the router
//! that acts on them lives in keel-llm.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[models.<name>]`: one public model name and where its requests go.
#[derive(Debug, Clone, Deserialize, Serialize)]

pub struct ModelRoute {
    /// How targets are chosen: `ordered` tries them in order; `weighted` picks the first
    /// by weight and falls back through the rest in order.
    #[serde(default)]
    pub strategy: Strategy,
    /// The targets, in fallback order.
    pub targets: Vec<Target>,
    /// Retries on one target before falling back.
    #[serde(default)]
    pub retry: Retry,
    /// When a target is taken out of rotation.
    #[serde(default)]
    pub breaker: Breaker,
    /// Longest time one request may take across every attempt and fallback.
    #[serde(default = "default_route_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_route_timeout() -> Duration {
    Duration::from_secs(120)
}

/// How a route picks its first target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// First target first, the rest as fallbacks in order.
    #[default]
    Ordered,
    /// First target drawn by weight; the rest as fallbacks in order.
    Weighted,
}

/// Which wire protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions, and every server compatible with it (Azure OpenAI, vLLM,
    /// Ollama, Groq, Together, `keel mock-llm`).
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// In-process echo, for trying Keel with no model at all.
    Mock,
}

impl ProviderKind {
    /// The provider's name in config, metrics and usage records.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Mock => "mock",
        }
    }
}

/// One upstream a route can send to.
#[derive(Debug, Clone, Deserialize, Serialize)]

pub struct Target {
    /// Wire protocol.
    pub provider: ProviderKind,
    /// The upstream model name.
    #[serde(default)]
    pub model: String,
    /// Base URL, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:9999/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Name of the environment variable that holds the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Azure OpenAI: the `api-version` query parameter; also switches the key header to
    /// `api-key`.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Time allowed to open the connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed until the first token (streaming) or the whole answer (not streaming).
    #[serde(default = "default_first_token_timeout", with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// Time allowed for one attempt, start to end.
    #[serde(default = "default_total_timeout", with = "humantime_serde")]
    pub total_timeout: Duration,
    /// USD per million input tokens.
    #[serde(default)]
    pub input_price_per_mtok: f64,
    /// USD per million output tokens.
    #[serde(default)]
    pub output_price_per_mtok: f64,
    /// USD per million prompt tokens read from the provider's prompt cache (OpenAI's
    /// `cached_tokens`, Anthropic's cache reads). Unset: the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_price_per_mtok: Option<f64>,
    /// USD per million prompt tokens written to the provider's prompt cache (Anthropic's
    /// cache writes). Unset: the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_price_per_mtok: Option<f64>,
    /// Most requests in flight to this target at once; past it, the router falls back.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// Relative weight for the `weighted` strategy.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Ask this target for usage on streams (`stream_options.include_usage`), so
    /// accounting is exact. Turn off for old OpenAI-compatible servers that reject the
    /// field; their streams are then counted with the tokenizer and marked estimated.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    /// The upstream model's context window, in tokens: an agent on this route never sends
    /// more (its `context_tokens` is cut to the smallest window among the route's targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u32>,
}

fn default_true() -> bool {
    true
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_first_token_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_total_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_max_concurrency() -> u32 {
    256
}
fn default_weight() -> u32 {
    1
}

/// `[models.<name>.retry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Retry {
    /// Attempts on one target, the first included.
    pub max_attempts: u32,
    /// First backoff; doubles each retry, with full jitter.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Largest backoff.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Longest `Retry-After` honoured; a longer one falls back instead of waiting.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
        }
    }
}

/// `[models.<name>.breaker]`: opens after `failure_threshold` consecutive failures, or
/// when failures are at least `failure_ratio` of the last `window` calls; after
/// `cooldown`, one probe is let through.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Breaker {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// Failure ratio over the window that opens it (0 disables).
    pub failure_ratio: f64,
    /// Calls in the ratio window.
    pub window: u32,
    /// Time open before a probe.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_ratio: 0.5,
            window: 20,
            cooldown: Duration::from_secs(30),
        }
    }
}

impl ModelRoute {
    /// Checks the rules types do not express; each failure is (key under the route, message).
    pub(crate) fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.targets.is_empty() {
            out.push(("targets".to_owned(), "needs at least one target".to_owned()));
        }
        for (i, t) in self.targets.iter().enumerate() {
            let key = |k: &str| format!("targets[{i}].{k}");
            if t.provider != ProviderKind::Mock && t.model.trim().is_empty() {
                out.push((key("model"), "must name the upstream model".to_owned()));
            }
            if let Some(url) = &t.base_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                out.push((
                    key("base_url"),
                    format!("must be an http:// or https:// URL, got {url:?}"),
                ));
            }
            if t.provider != ProviderKind::Mock
                && t.base_url.is_none()
                && t.provider == ProviderKind::Openai
                && t.api_key_env.is_none()
            {
                out.push((
                    key("base_url"),
                    "set base_url (or api_key_env for api.openai.com)".to_owned(),
                ));
            }
            for (name, d) in [
                ("connect_timeout", t.connect_timeout),
                ("first_token_timeout", t.first_token_timeout),
                ("total_timeout", t.total_timeout),
            ] {
                if d.is_zero() {
                    out.push((key(name), "must be longer than 0s".to_owned()));
                }
            }
            let prices = [
                ("input_price_per_mtok", Some(t.input_price_per_mtok)),
                ("output_price_per_mtok", Some(t.output_price_per_mtok)),
                ("cached_input_price_per_mtok", t.cached_input_price_per_mtok),
                ("cache_write_price_per_mtok", t.cache_write_price_per_mtok),
            ];
            for (name, price) in prices {
                if price.is_some_and(|p| !(p >= 0.0 && p.is_finite())) {
                    out.push((key(name), "must be a price of 0 or more".to_owned()));
                }
            }
            if t.max_concurrency == 0 {
                out.push((key("max_concurrency"), "must be at least 1".to_owned()));
            }
            if t.weight == 0 && self.strategy == Strategy::Weighted {
                out.push((key("weight"), "must be at least 1".to_owned()));
            }
        }
        if self.retry.max_attempts == 0 {
            out.push((
                "retry.max_attempts".to_owned(),
                "must be at least 1".to_owned(),
            ));
        }
        if self.breaker.failure_threshold == 0 {
            out.push((
                "breaker.failure_threshold".to_owned(),
                "must be at least 1".to_owned(),
            ));
        }
        if !(0.0..=1.0).contains(&self.breaker.failure_ratio) {
            out.push((
                "breaker.failure_ratio".to_owned(),
                "must be between 0 and 1".to_owned(),
            ));
        }
        if self.timeout.is_zero() {
            out.push(("timeout".to_owned(), "must be longer than 0s".to_owned()));
        }
        out
    }
}

/// Whether a route name is usable as a public model name: 1–128 characters of letters,
/// digits and `-_.:/`.
pub(crate) fn valid_route_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}
