//! Why an LLM call failed, classified so the router knows what to do about it and the
//! server knows what to answer.

use std::fmt;
use std::time::Duration;

/// The kind of a provider failure: what the metrics count and the 503 lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 429 from upstream.
    RateLimit,
    /// No answer (or no first token) in time.
    Timeout,
    /// 5xx from upstream.
    Server,
    /// The connection could not be opened or was lost.
    Connect,
    /// Upstream answered something that is not the protocol (malformed JSON, …).
    InvalidResponse,
    /// Upstream rejected the request itself (400, 413, 422, …): the caller's mistake.
    Client,
    /// Upstream refused Keel (401, 402, 403, 404): a bad key, no quota, or a model the
    /// target does not have — the operator's problem, so the route falls back.
    Denied,
    /// The target's breaker is open, or its concurrency limit is reached.
    Unavailable,
}

impl ErrorKind {
    /// The label used in metrics and problem details.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimit => "rate_limit",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Server => "server",
            ErrorKind::Connect => "connect",
            ErrorKind::InvalidResponse => "invalid_response",
            ErrorKind::Client => "client",
            ErrorKind::Denied => "denied",
            ErrorKind::Unavailable => "unavailable",
        }
    }

    /// Whether trying again (here or on another target) may succeed.
    #[must_use]
    pub const fn is_retryable(self) -> bool {
        !matches!(self, ErrorKind::Client)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed call to one provider.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ProviderError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened, for logs and (for `Client`) for the caller.
    pub message: String,
    /// Upstream status, when there was one.
    pub status: Option<u16>,
    /// Upstream's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    /// A failure of this kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }
}

/// Why the gateway could not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No route has this name.
    #[error("unknown model {model:?}; available: {}", available.join(", "))]
    UnknownModel {
        /// What was asked for.
        model: String,
        /// The route names.
        available: Vec<String>,
    },
    /// Upstream rejected the request as malformed: the caller's mistake, not retried.
    #[error("the provider rejected the request: {0}")]
    Rejected(ProviderError),
    /// Upstream answered something that is not the protocol.
    #[error("the provider's answer was invalid: {0}")]
    InvalidResponse(ProviderError),
    /// Every target failed; the last error of each, in order.
    #[error("all targets failed: {}", summary(.0))]
    AllTargetsFailed(Vec<(String, ProviderError)>),
}

fn summary(failures: &[(String, ProviderError)]) -> String {
    failures
        .iter()
        .map(|(target, e)| format!("{target}: {}", e.kind))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The gateway result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
