//! Extractors that turn axum's rejections into Keel's problem+json: a malformed body gets
//! the same error shape as every other error, with a detail that says what to fix.

use axum::extract::rejection::{BytesRejection, FailedToBufferBody, JsonRejection};
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;

/// A JSON request body. Rejections: wrong content type → 415, body over
/// `server.max_body_bytes` → 413, malformed JSON or a wrong field → 400 naming the
/// position or the field.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config().server.max_body_bytes;
        if !is_json(req.headers()) {
            // axum's own extractor says precisely what is wrong with the content type.
            return match axum::Json::<T>::from_request(req, state).await {
                Ok(axum::Json(value)) => Ok(Self(value)),
                Err(rejection) => Err(rejection_to_error(&rejection, limit)),
            };
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| rejection_to_error(&JsonRejection::from(e), limit))?;
        // The plain parse first; only a body that fails it is parsed again with the path
        // tracking that names the offending field.
        match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(Self(value)),
            Err(_) => match axum::Json::<T>::from_bytes(&bytes) {
                Ok(axum::Json(value)) => Ok(Self(value)),
                Err(rejection) => Err(rejection_to_error(&rejection, limit)),
            },
        }
    }
}

/// Whether the request says its body is JSON: `application/json` or `application/*+json`,
/// with any parameters (as axum's `Json` accepts).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype
                .get(subtype.len().saturating_sub(5)..)
                .is_some_and(|s| s.eq_ignore_ascii_case("+json")))
}

fn rejection_to_error(rejection: &JsonRejection, limit: usize) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::unsupported_media_type(
            "expected a JSON body with `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(BytesRejection::FailedToBufferBody(
            FailedToBufferBody::LengthLimitError(_),
        )) => ApiError::payload_too_large(limit),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::bad_request(format!("malformed JSON: {}", source_text(rejection)))
        }
        JsonRejection::JsonDataError(_) => ApiError::bad_request(format!(
            "JSON body does not match the schema: {}",
            source_text(rejection)
        )),
        other => ApiError::bad_request(format!(
            "cannot read the request body: {}",
            other.body_text()
        )),
    }
}

/// The innermost cause: serde's message with its path and position, without axum's
/// generic prefix.
fn source_text(rejection: &JsonRejection) -> String {
    let mut err: &dyn std::error::Error = rejection;
    while let Some(source) = err.source() {
        err = source;
    }
    err.to_string()
}

/// A JSON body that may be left out: no body at all (no `Content-Type`, no length or a
/// zero one) is `T::default()`; anything else is read as [`AppJson`] is.
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let headers = req.headers();
        let empty = headers.get(axum::http::header::CONTENT_TYPE).is_none()
            && headers
                .get(axum::http::header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0");
        if empty {
            return Ok(Self(T::default()));
        }
        AppJson::<T>::from_request(req, state)
            .await
            .map(|AppJson(v)| Self(v))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    use super::is_json;

    #[test]
    fn json_content_types_are_recognised_as_axum_does() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("Application/JSON"));
        assert!(with("application/problem+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!with("json"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
