//! Workspace endpoints.

use axum::extract::State;
use axum::{Extension, Json};
use keel_core::auth::Principal;
use keel_core::workspace::Workspace;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, Problem};

/// A workspace.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WorkspaceView {
    /// Its id (`ws_…`).
    id: String,
    /// Its unique name.
    name: String,
    /// When it was created (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
    /// The role the calling key has in it.
    role: super::keys::WireRole,
}

impl WorkspaceView {
    fn new(ws: Workspace, principal: &Principal) -> Self {
        Self {
            id: ws.id.to_string(),
            name: ws.name.to_string(),
            created_at: super::rfc3339(ws.created_at),
            role: principal.role.into(),
        }
    }
}

/// The workspace the calling key belongs to. Requires role: viewer.
#[utoipa::path(get, path = "/v1/workspaces/current", tag = super::WORKSPACES,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The caller's workspace", body = WorkspaceView),
        (status = 401, description = "Missing, malformed or revoked key", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn current(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<WorkspaceView>, ApiError> {
    let ws = state.store().workspace(principal.workspace_id).await?;
    Ok(Json(WorkspaceView::new(ws, &principal)))
}
