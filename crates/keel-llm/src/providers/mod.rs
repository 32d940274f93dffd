//! One file per provider, all behind [`crate::Provider`].

pub mod anthropic;
pub mod mock;
pub mod openai;

use std::time::Duration;

use futures_util::StreamExt as _;

use crate::error::{ErrorKind, ProviderError};
use crate::provider::ChunkStream;

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

/// Opens an upstream stream and waits up to `timeout` for its first chunk: a failure or
/// silence before the first token is an `Err` (so the router may fall back); after it, the
/// stream is returned with the first chunk put back in front.
pub(crate) async fn first_chunk<F>(timeout: Duration, open: F) -> Result<ChunkStream, ProviderError>
where
    F: Future<Output = Result<ChunkStream, ProviderError>> + Send,
{
    let first = async {
        let mut chunks = open.await?;
        match chunks.next().await {
            Some(Ok(first)) => Ok((first, chunks)),
            Some(Err(e)) => Err(e),
            None => Err(ProviderError::new(
                ErrorKind::InvalidResponse,
                "upstream stream ended before any chunk",
            )),
        }
    };
    match tokio::time::timeout(timeout, first).await {
        Ok(Ok((first, rest))) => Ok(Box::pin(
            futures_util::stream::once(async { Ok(first) }).chain(rest),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProviderError::new(
            ErrorKind::Timeout,
            format!("no first token within {timeout:?}"),
        )),
    }
}
