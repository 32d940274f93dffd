//! Usage records: what each LLM request cost, as the gateway's accounting writes them and
//! `GET /v1/usage` reads them back, summed.

use keel_core::id::{ApiKeyId, WorkspaceId};
use time::OffsetDateTime;

/// One LLM request's accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// The workspace billed.
    pub workspace_id: WorkspaceId,
    /// The key that made the request.
    pub api_key_id: Option<ApiKeyId>,
    /// The public route (model name).
    pub route: String,
    /// `openai`, `anthropic`, `mock`.
    pub provider: String,
    /// The upstream model.
    pub upstream_model: String,
    /// The target's label.
    pub target: String,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Prompt tokens served from a provider-side cache.
    pub cached_tokens: u64,
    /// Cost in nano-USD.
    pub cost_nanousd: u64,
    /// Time to the whole answer (or the end of the stream).
    pub latency_ms: u64,
    /// Time to the first token, for streams.
    pub ttft_ms: Option<u64>,
    /// Served from Keel's response cache.
    pub cache_hit: bool,
    /// Token counts were estimated with a tokenizer (the provider reported none).
    pub estimated: bool,
    /// `ok`, or the error kind.
    pub outcome: String,
    /// When the request finished.
    pub created_at: OffsetDateTime,
}

/// What to group a usage summary by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// The public route.
    Route,
    /// The API key.
    Key,
    /// The upstream model.
    Model,
    /// The UTC day (`YYYY-MM-DD`).
    Day,
}

/// One group of a usage summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The group's value (route, key id, model or day); `-` for requests without a key.
    pub group: String,
    /// Requests.
    pub requests: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Prompt tokens served from a cache (Keel's response cache or the provider's prompt
    /// cache); part of `input_tokens`.
    pub cached_tokens: u64,
    /// Cost in nano-USD.
    pub cost_nanousd: u64,
    /// Requests served from cache.
    pub cache_hits: u64,
    /// Requests that failed.
    pub errors: u64,
}

pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
