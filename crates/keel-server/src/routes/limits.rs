//! Rate limits per workspace: any member reads their own; the operator workspace's
//! admins change anyone's at run time.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use keel_core::auth::Principal;
use keel_core::id::WorkspaceId;
use keel_store::security::WorkspaceLimits;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::{Caller, ResolvedLimits};
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;

/// A workspace's limits: what an operator set, and what applies.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LimitsView {
    /// The workspace.
    workspace_id: String,
    /// The tier in effect.
    tier: String,
    /// Workspace requests per minute (absent: none).
    rpm: Option<u32>,
    /// Workspace LLM tokens per minute.
    tpm: Option<u32>,
    /// Requests per minute per API key or user.
    key_rpm: Option<u32>,
    /// LLM tokens per minute per API key or user.
    key_tpm: Option<u32>,
    /// What an operator set (each falls back to the tier when absent).
    overrides: LimitsBody,
}

/// Limits to set; absent fields fall back to the tier.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsBody {
    /// A tier from `[limits.tiers]`.
    #[serde(default)]
    tier: Option<String>,
    /// Workspace requests per minute.
    #[serde(default)]
    rpm: Option<i64>,
    /// Workspace LLM tokens per minute.
    #[serde(default)]
    tpm: Option<i64>,
}

fn view(state: &AppState, ws: WorkspaceId, stored: WorkspaceLimits) -> LimitsView {
    let r = ResolvedLimits::resolve(&state.config().limits, &stored);
    LimitsView {
        workspace_id: ws.to_string(),
        tier: r.tier,
        rpm: r.rpm,
        tpm: r.tpm,
        key_rpm: r.key_rpm,
        key_tpm: r.key_tpm,
        overrides: LimitsBody {
            tier: stored.tier,
            rpm: stored.rpm,
            tpm: stored.tpm,
        },
    }
}

/// The caller's workspace's limits. Requires role: viewer.
#[utoipa::path(get, path = "/v1/workspaces/current/limits", tag = super::WORKSPACES,
    responses((status = 200, description = "The limits in effect", body = LimitsView)))]
pub(crate) async fn current(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<LimitsView>, ApiError> {
    let stored = state
        .store()
        .workspace_limits(principal.workspace_id)
        .await?;
    Ok(Json(view(&state, principal.workspace_id, stored)))
}

fn workspace_id(id: &str) -> Result<WorkspaceId, ApiError> {
    id.parse()
        .map_err(|e: keel_core::Error| ApiError::bad_request(e.to_string()))
}

/// Any workspace's limits. Operator admins only.
#[utoipa::path(get, path = "/v1/admin/workspaces/{id}/limits", tag = super::WORKSPACES,
    params(("id" = String, Path, description = "The workspace (`ws_…`)")),
    responses(
        (status = 200, description = "The limits in effect", body = LimitsView),
        (status = 404, description = "No such workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<LimitsView>, ApiError> {
    let ws = workspace_id(&id)?;
    state.store().workspace(ws).await?;
    let stored = state.store().workspace_limits(ws).await?;
    Ok(Json(view(&state, ws, stored)))
}

/// Sets a workspace's limits, effective within `server.key_cache_ttl` on every instance.
/// Operator admins only.
#[utoipa::path(put, path = "/v1/admin/workspaces/{id}/limits", tag = super::WORKSPACES,
    request_body = LimitsBody,
    params(("id" = String, Path, description = "The workspace (`ws_…`)")),
    responses(
        (status = 200, description = "The limits now in effect", body = LimitsView),
        (status = 400, description = "Unknown tier or a limit below 1", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn set(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(body): AppJson<LimitsBody>,
) -> Result<Json<LimitsView>, ApiError> {
    let ws = workspace_id(&id)?;
    let tiers = &state.config().limits.tiers;
    if let Some(tier) = &body.tier
        && !tiers.contains_key(tier)
    {
        return Err(ApiError::bad_request(format!(
            "no tier {tier:?}; known: {}",
            tiers.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    for (name, v) in [("rpm", body.rpm), ("tpm", body.tpm)] {
        if v.is_some_and(|v| !(1..=i64::from(u32::MAX)).contains(&v)) {
            return Err(ApiError::bad_request(format!(
                "{name} must be between 1 and {}; leave it out to use the tier's",
                u32::MAX
            )));
        }
    }
    state.store().workspace(ws).await?;
    let limits = WorkspaceLimits {
        tier: body.tier,
        rpm: body.rpm,
        tpm: body.tpm,
    };
    let before = state.store().workspace_limits(ws).await?;
    state.store().set_workspace_limits(ws, &limits).await?;
    state.limits_cache().forget(&ws);
    let data = serde_json::json!({
        "tier": limits.tier, "rpm": limits.rpm, "tpm": limits.tpm,
        "previous": {"tier": before.tier, "rpm": before.rpm, "tpm": before.tpm},
        "by_workspace": principal.workspace_id.to_string(),
    });
    // Recorded in the changed workspace's log (whose limits they are) and the operator's.
    let action = || Action::new("limits.changed", ws).data(data.clone());
    audit::record_as(&state, ws, &principal.actor(), &caller, action()).await;
    if ws != principal.workspace_id {
        audit::record(&state, &principal, &caller, action()).await;
    }
    Ok(Json(view(&state, ws, limits)))
}
