//! The one mapping from errors to HTTP: every error response Keel sends is an RFC 9457
//! problem+json document built here.
//!
//! A handler returns [`ApiError`]; its response carries the [`Problem`] as an extension,
//! and the request-context middleware writes the body, adding `instance` (the path) and
//! `request_id`, which only it knows. Any other error response (one axum produced itself)
//! is rewritten there into the same shape, so a client never sees two error formats.
//!
//! Internals never reach the client: a 5xx says what failed in general terms; the cause
//! is logged with the request id.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An RFC 9457 problem: what went wrong and what to do about it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, e.g. `urn:keel:problem:unauthorized`.
    #[serde(rename = "type")]
    pub kind: Cow<'static, str>,
    /// A short summary of the kind.
    pub title: Cow<'static, str>,
    /// The HTTP status code.
    pub status: u16,
    /// What happened this time, and what to fix.
    pub detail: String,
    /// The request path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The request's id, as in its `x-request-id` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The same problem in OpenAI's error shape (an RFC 9457 extension member), so OpenAI
    /// SDKs in every language show `detail` as the error message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<OpenAiError>,
    /// For 410 on the event log: the oldest seq still held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<i64>,
}

/// OpenAI's error object: `{"message", "type", "code"}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiError {
    /// The detail.
    pub message: String,
    /// OpenAI's error type for the status (`invalid_request_error`, `authentication_error`, …).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Keel's problem slug.
    pub code: String,
}

impl Problem {
    /// The OpenAI error object for this problem.
    #[must_use]
    pub fn openai_error(&self) -> OpenAiError {
        let kind = match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        OpenAiError {
            message: self.detail.clone(),
            kind,
            code: self.kind.rsplit(':').next().unwrap_or_default().to_owned(),
        }
    }
}

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error a handler returns.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    slug: &'static str,
    detail: String,
    /// The `WWW-Authenticate` challenge, for 401s.
    challenge: bool,
    /// Seconds the client should wait, for 503s.
    retry_after: Option<u32>,
    /// Ask the client not to reuse the connection: the request body was not read to its
    /// end, so the server will close it.
    close: bool,
    /// For 410 on the event log.
    oldest_seq: Option<i64>,
}

impl ApiError {
    fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug,
            detail: detail.into(),
            challenge: false,
            retry_after: None,
            close: false,
            oldest_seq: None,
        }
    }

    /// 400: the request is malformed; `detail` says where.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }
    /// 401: no valid credentials.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self {
            challenge: true,
            ..Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
        }
    }
    /// 403: authenticated, but not allowed.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    /// 404: no such thing (or not in the caller's workspace — never said which).
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    /// 405.
    pub fn method_not_allowed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", detail)
    }
    /// 409: conflicts with the current state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    /// 410: the events asked for are older than retention keeps; `oldest_seq` is the
    /// oldest still held.
    pub fn gone(detail: impl Into<String>, oldest_seq: i64) -> Self {
        Self {
            oldest_seq: Some(oldest_seq),
            ..Self::new(StatusCode::GONE, "gone", detail)
        }
    }
    /// 413.
    pub fn payload_too_large(limit: usize) -> Self {
        let error = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!(
                "request body is larger than the limit of {limit} bytes (server.max_body_bytes)"
            ),
        );
        Self {
            close: true,
            ..error
        }
    }
    /// 429: a rate limit is exhausted; `detail` names it, `retry_after` says when to retry.
    pub fn too_many_requests(detail: impl Into<String>, retry_after: u32) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", detail)
        }
    }

    /// 402: a budget is spent; `detail` names it and when it resets.
    pub fn payment_required(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYMENT_REQUIRED, "budget-exceeded", detail)
    }

    /// 415.
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            detail,
        )
    }
    /// 502: an upstream answered something unusable.
    pub fn bad_gateway(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "bad-gateway", detail)
    }
    /// 503: a dependency is down; worth retrying.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
        }
    }
    /// 500: Keel's own failure. `cause` is logged, never sent.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle this request; it has been logged with the request id",
        )
    }

    /// The status this error answers with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The problem document, without request context.
    #[must_use]
    pub fn problem(&self) -> Problem {
        Problem {
            kind: Cow::Owned(format!("urn:keel:problem:{}", self.slug)),
            title: Cow::Borrowed(self.status.canonical_reason().unwrap_or("Error")),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            instance: None,
            request_id: None,
            error: None,
            oldest_seq: self.oldest_seq,
        }
    }

    /// The generic problem for a status some other layer produced without a body of ours.
    pub(crate) fn for_status(status: StatusCode) -> Self {
        let (slug, detail) = match status {
            StatusCode::NOT_FOUND => ("not-found", "no route matches this path"),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method-not-allowed",
                "this route does not accept this method",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => ("payload-too-large", "request body is too large"),
            StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long"),
            s if s.is_server_error() => ("internal", "the server failed to handle this request"),
            _ => ("bad-request", "the request was not accepted"),
        };
        Self::new(status, slug, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keel\""),
            );
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(self.problem());
        response
    }
}

impl From<keel_store::Error> for ApiError {
    fn from(e: keel_store::Error) -> Self {
        use keel_store::Error as E;
        match e {
            E::NotFound { what } => ApiError::not_found(format!("{what} not found")),
            E::Conflict { what } => ApiError::conflict(format!("{what} already exists")),
            E::State { what, state } => ApiError::conflict(format!("{what} is {state}")),
            E::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                ApiError::unavailable("the database is unavailable; retry shortly")
            }
            e => ApiError::internal(&e),
        }
    }
}

impl From<crate::session::PasswordError> for ApiError {
    fn from(e: crate::session::PasswordError) -> Self {
        match e {
            crate::session::PasswordError::Busy => ApiError::unavailable(e.to_string()),
            e => ApiError::internal(&e),
        }
    }
}

impl From<crate::events::ReadError> for ApiError {
    fn from(e: crate::events::ReadError) -> Self {
        match e.as_ref() {
            crate::events::ReadFailure::Store(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::unavailable("the database is unavailable; retry shortly")
            }
            e => ApiError::internal(e),
        }
    }
}

impl From<crate::events::AppendError> for ApiError {
    fn from(e: crate::events::AppendError) -> Self {
        use crate::events::AppendError as E;
        match e {
            E::Store(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::unavailable("the database is unavailable; retry shortly")
            }
            E::Store(e) => ApiError::internal(&e),
            E::Stopped => {
                ApiError::unavailable("the server is shutting down; retry on another instance")
            }
        }
    }
}
