//! The request-context middleware: the outermost thing every request passes through.
//!
//! It gives the request its id (keeping a well-formed incoming `x-request-id`), opens
//! its span (continuing an incoming W3C `traceparent`), catches a handler panic and
//! answers 500 instead of dropping the connection, writes every error body as
//! problem+json with `instance` and `request_id`, stamps `x-request-id` and the security
//! headers on the response, and records the request's metrics by matched route (never the
//! raw path, so cardinality stays bounded). It is one layer, not several: each layer costs
//! every request a service clone and a boxed future.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::error::{ApiError, PROBLEM_JSON, Problem};

/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// A request's id, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Keeps an incoming id only if it is short and made of safe characters, so it cannot
/// inject into logs or headers.
fn incoming_request_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(REQUEST_ID)?.to_str().ok()?;
    let ok = (1..=128).contains(&value.len())
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+' | b'/' | b'=')
        });
    ok.then(|| value.to_owned())
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The middleware itself; `app` installs it on every route and the fallback.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let request_id = match incoming_request_id(req.headers()) {
        Some(id) => id,
        None => {
            let mut buf = uuid::Uuid::encode_buffer();
            uuid::Uuid::now_v7()
                .hyphenated()
                .encode_lower(&mut buf)
                .to_owned()
        }
    };
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    // Cheap to clone (shared bytes); its path names the problem's `instance`.
    let uri = req.uri().clone();

    // Continued by the span itself without export (`telemetry::ids`), by OpenTelemetry with it.
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128);
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{method} {}", route.as_ref().map_or("unmatched", MatchedPath::as_str)),
        otel.kind = "server",
        http.request.method = %method,
        http.route = route.as_ref().map(MatchedPath::as_str),
        url.path = uri.path(),
        request_id = request_id.as_str(),
        workspace_id = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        traceparent,
    );
    if traceparent.is_some() && crate::telemetry::exporting() {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }

    let header_id = HeaderValue::from_str(&request_id).ok();
    req.extensions_mut().insert(RequestId(request_id));
    let outcome = AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .instrument(span.clone())
        .await;
    let mut response = match outcome {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("keel_http_panics_total").increment(1);
            span.in_scope(|| ApiError::internal(&"handler panicked").into_response())
        }
    };

    let id = header_id
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    write_problem_body(&mut response, uri.path(), id);
    let headers = response.headers_mut();
    if let Some(value) = header_id {
        headers.insert(REQUEST_ID, value);
    }
    security_headers(headers);

    let status = response.status();
    let elapsed = start.elapsed();
    let (requests, duration) = http_metrics(&method, route.as_ref(), status);
    requests.increment(1);
    duration.record(elapsed.as_secs_f64());

    span.record("http.response.status_code", status.as_u16());
    span.in_scope(|| {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(duration_us = micros, "request failed");
        } else if status.is_server_error() {
            tracing::warn!(duration_us = micros, "request failed");
        } else {
            tracing::info!(duration_us = micros, "request served");
        }
    });
    response
}

/// Headers every response carries: no MIME sniffing, no framing, no referrer, and a
/// content policy that lets a browser run nothing from an API response (unless the
/// handler set its own).
fn security_headers(h: &mut HeaderMap) {
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.entry("content-security-policy")
        .or_insert(HeaderValue::from_static(
            "default-src 'none'; frame-ancestors 'none'",
        ));
}

/// A method as a metric label: the standard ones by name, any other as `other` (a client
/// may send any token as a method; labels must stay bounded).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// One request counter and duration histogram, remembered for their labels.
struct HttpMetrics {
    method: &'static str,
    /// Held, so the pointer compared below cannot be reused by another route.
    route: Option<MatchedPath>,
    status: u16,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

/// Handles remembered per thread (a few dozen label sets are hot), so a request does not
/// build and look up its labels in the registry twice.
const HTTP_METRICS_PER_THREAD: usize = 64;

thread_local! {
    static HTTP_METRICS: std::cell::RefCell<Vec<HttpMetrics>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The request counter and duration histogram for these labels.
fn http_metrics(
    method: &Method,
    route: Option<&MatchedPath>,
    status: StatusCode,
) -> (metrics::Counter, metrics::Histogram) {
    let method = method_label(method);
    let status = status.as_u16();
    let same_route = |held: &Option<MatchedPath>| match (held, route) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a.as_str(), b.as_str()),
        _ => false,
    };
    let found = HTTP_METRICS.try_with(|cache| {
        cache.try_borrow().ok().and_then(|cache| {
            cache
                .iter()
                .find(|m| m.status == status && m.method == method && same_route(&m.route))
                .map(|m| (m.requests.clone(), m.duration.clone()))
        })
    });
    if let Ok(Some(handles)) = found {
        return handles;
    }
    let labels = [
        ("method", method.to_owned()),
        (
            "route",
            route.map_or("unmatched", MatchedPath::as_str).to_owned(),
        ),
        ("status", status.to_string()),
    ];
    let requests = metrics::counter!("keel_http_requests_total", &labels);
    let duration = metrics::histogram!("keel_http_request_duration_seconds", &labels);
    let _ = HTTP_METRICS.try_with(|cache| {
        if let Ok(mut cache) = cache.try_borrow_mut() {
            if cache.len() >= HTTP_METRICS_PER_THREAD {
                cache.remove(0);
            }
            cache.push(HttpMetrics {
                method,
                route: route.cloned(),
                status,
                requests: requests.clone(),
                duration: duration.clone(),
            });
        }
    });
    (requests, duration)
}

/// Writes the problem+json body of an error response: the handler's [`Problem`] if it
/// left one, else a generic one for the status (a response axum made by itself).
fn write_problem_body(response: &mut Response, path: &str, request_id: &str) {
    let problem = match response.extensions_mut().remove::<Problem>() {
        Some(problem) => problem,
        None if response.status().is_client_error() || response.status().is_server_error() => {
            let is_ours = response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
            if is_ours {
                return;
            }
            ApiError::for_status(response.status()).problem()
        }
        None => return,
    };
    let problem = Problem {
        instance: Some(path.to_owned()),
        request_id: Some(request_id.to_owned()),
        error: Some(problem.openai_error()),
        ..problem
    };
    let Ok(body) = serde_json::to_vec(&problem) else {
        return;
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    headers.remove(header::CONTENT_LENGTH);
    *response.body_mut() = Body::from(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_ids_are_kept_only_when_safe() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        assert_eq!(incoming_request_id(&h).as_deref(), Some("abc-123_x.y:z"));
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(incoming_request_id(&h), None);
        h.insert(REQUEST_ID, HeaderValue::from_str(&"a".repeat(129)).unwrap());
        assert_eq!(incoming_request_id(&h), None);
        h.insert(REQUEST_ID, HeaderValue::from_static(""));
        assert_eq!(incoming_request_id(&h), None);
    }
}
