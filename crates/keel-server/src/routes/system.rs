//! Operations endpoints: liveness, readiness, metrics and the API description. None needs
//! credentials: probes and scrapers run without them.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, Problem};

/// Liveness or readiness.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Status {
    /// `ok`.
    status: &'static str,
    /// Storage backend (`sqlite` or `postgres`), on /readyz.
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    /// Schema version, on /readyz.
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_version: Option<i64>,
}

/// Liveness: the process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = super::OPS, security(()),
    responses((status = 200, description = "The process is alive", body = Status)))]
pub(crate) async fn healthz() -> Json<Status> {
    Json(Status {
        status: "ok",
        database: None,
        schema_version: None,
    })
}

/// Readiness: the database answers and its schema is the one this binary expects.
/// Recovers by itself when the database returns.
#[utoipa::path(get, path = "/readyz", tag = super::OPS, security(()),
    responses(
        (status = 200, description = "Ready to serve", body = Status),
        (status = 503, description = "Not ready; `detail` names what is down", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::unavailable("shutting down"));
    }
    let store = state.store();
    let backend = store.backend();
    let check = tokio::time::timeout(
        state.config().database.acquire_timeout * 2,
        store.schema_state(),
    )
    .await;
    let schema = match check {
        Ok(Ok(schema)) => schema,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            return Err(ApiError::unavailable(format!(
                "database ({backend}) unreachable"
            )));
        }
        Err(_) => {
            return Err(ApiError::unavailable(format!(
                "database ({backend}) did not answer in time"
            )));
        }
    };
    if !schema.is_current() {
        return Err(ApiError::unavailable(format!(
            "database schema is at version {}, this binary expects {}; run `keel migrate`",
            schema.database, schema.binary
        )));
    }
    Ok(Json(Status {
        status: "ok",
        database: Some(backend.to_string()),
        schema_version: Some(schema.database),
    }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = super::OPS, security(()),
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    crate::telemetry::record_log_drops();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics().render(),
    )
}

/// This API's OpenAPI 3.1 description, generated from the code: it lists every route.
#[utoipa::path(get, path = "/openapi.json", tag = super::OPS, security(()),
    responses((status = 200, description = "OpenAPI document", content_type = "application/json")))]
pub(crate) async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi_json(),
    )
}
