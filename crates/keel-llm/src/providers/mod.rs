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
        // A redirect (never followed) or a refusal of Keel's credentials is the target's
        // configuration, not the caller's request: the route falls back.
        300..=399 | 401..=404 => ErrorKind::Denied,
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

/// Largest whole answer read from upstream.
pub(crate) const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Largest error body read from upstream (only its start is ever shown).
pub(crate) const MAX_ERROR_BYTES: usize = 64 * 1024;

/// Reads a response body, refusing one larger than `limit`: a broken upstream or proxy
/// must not make the gateway hold an unbounded body.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<bytes::Bytes, ProviderError> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::new(
                ErrorKind::InvalidResponse,
                format!("upstream answer larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The start of an error body, as text (at most [`MAX_ERROR_BYTES`] are read).
pub(crate) async fn error_text(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BYTES {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Sends an upstream request: a transport failure or a non-2xx answer becomes a classified
/// [`ProviderError`] (with `Retry-After` and the start of the error body).
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, ProviderError> {
    let response = request.send().await.map_err(|e| transport_error(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after(response.headers());
    let text = error_text(response).await;
    Err(status_error(status.as_u16(), retry_after, &text))
}

/// The HTTP client for one target: its connect timeout, pooled keep-alive connections,
/// no Nagle delay.
pub(crate) fn http_client(
    target: &keel_core::config::Target,
) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(target.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        // A provider API answers where it is asked. Following a redirect would send the
        // request (and its API key) somewhere else; it is an error instead.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            ProviderError::new(ErrorKind::Connect, format!("cannot build HTTP client: {e}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_by_whose_mistake_they_are() {
        for (status, kind) in [
            (429, ErrorKind::RateLimit),
            (301, ErrorKind::Denied),
            (307, ErrorKind::Denied),
            (401, ErrorKind::Denied),
            (404, ErrorKind::Denied),
            (408, ErrorKind::Timeout),
            (400, ErrorKind::Client),
            (422, ErrorKind::Client),
            (500, ErrorKind::Server),
            (503, ErrorKind::Server),
        ] {
            assert_eq!(status_error(status, None, "").kind, kind, "{status}");
        }
    }
}
