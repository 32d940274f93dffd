//! One file per provider, all behind [`crate::Provider`].

pub mod anthropic;
pub mod mock;
pub mod openai;

use std::time::Duration;

use crate::error::{ErrorKind, ProviderError};

/// Classifies a non-success HTTP status from upstream.
pub(crate) fn status_error(
    status: u16,
    retry_after: Option<Duration>,
    body: &str,
) -> ProviderError {
    let kind = match status {
        429 => ErrorKind::RateLimit,
        401..=404 => ErrorKind::Denied,
        408 => ErrorKind::Timeout,
        500..=599 => ErrorKind::Server,
        _ => ErrorKind::Client,
    };
    let mut snippet: String = body.chars().take(500).collect();
    if snippet.len() < body.len() {
        snippet.push('…');
    }
    ProviderError {
        kind,
        message: format!("upstream answered {status}: {snippet}"),
        status: Some(status),
        retry_after,
    }
}

/// Classifies a transport error.
pub(crate) fn transport_error(e: &reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connect
    };
    ProviderError::new(kind, format!("{e}"))
}

/// `Retry-After` in seconds (the HTTP-date form is rare from LLM APIs and is ignored).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}
