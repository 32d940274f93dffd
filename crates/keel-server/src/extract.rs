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
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(rejection_to_error(
                &rejection,
                state.config().server.max_body_bytes,
            )),
        }
    }
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
