//! Workspace members: users and their roles. Admins add users (creating them, with a
//! password, if they do not exist yet), change their roles and remove them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_core::auth::{Email, Principal, Role, check_password};
use keel_core::id::UserId;
use keel_store::security::Membership;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::keys::WireRole;
use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;

/// A member.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MemberView {
    /// The user (`usr_…`).
    user_id: String,
    /// Their email.
    email: String,
    /// Their role here.
    role: WireRole,
    /// When they joined (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
}

impl From<Membership> for MemberView {
    fn from(m: Membership) -> Self {
        Self {
            user_id: m.user_id.to_string(),
            email: m.email.as_str().to_owned(),
            role: m.role.into(),
            created_at: super::rfc3339(m.created_at),
        }
    }
}

/// A user to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddMember {
    /// The user's email.
    email: String,
    /// Their role in this workspace.
    role: WireRole,
    /// The new user's password (12+ characters).
    #[serde(default)]
    password: Option<String>,
}

/// A role change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetRole {
    /// The new role.
    role: WireRole,
}

/// The workspace's members. Requires role: admin.
#[utoipa::path(get, path = "/v1/members", tag = super::MEMBERS,
    responses((status = 200, description = "Members, oldest first", body = super::List<MemberView>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<super::List<MemberView>>, ApiError> {
    let members = state.store().members(principal.workspace_id).await?;
    Ok(Json(super::List {
        data: members.into_iter().map(MemberView::from).collect(),
    }))
}

/// Creates a user with a password and makes them a member. A workspace admin cannot
/// attach an existing user (who may belong to other tenants) without their consent: that
/// is for an operator (`keel admin create-user`). Requires role: admin.
#[utoipa::path(post, path = "/v1/members", tag = super::MEMBERS, request_body = AddMember,
    responses(
        (status = 201, description = "The member", body = MemberView),
        (status = 400, description = "Bad email, or a password missing or breaking the policy", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A user with this email exists", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn add(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    AppJson(body): AppJson<AddMember>,
) -> Result<(StatusCode, Json<MemberView>), ApiError> {
    let email = Email::parse(&body.email).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let password = body
        .password
        .ok_or_else(|| ApiError::bad_request("password: the new user's password is required"))?;
    check_password(&password, &email).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let hash = crate::session::hash_password(password).await?;
    let user = state.store().create_user(&email, &hash).await.map_err(|e| match e {
        keel_store::Error::Conflict { .. } => ApiError::conflict(
            "a user with this email already exists; an operator can add them to this workspace with `keel admin create-user`",
        ),
        e => e.into(),
    })?;
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("user.created", user.id),
    )
    .await;
    let role: Role = body.role.into();
    let m = state
        .store()
        .set_membership(principal.workspace_id, user.id, role)
        .await?;
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("member.role_set", user.id).data(serde_json::json!({"role": role.as_str()})),
    )
    .await;
    Ok((StatusCode::CREATED, Json(m.into())))
}

fn user_id(id: &str) -> Result<UserId, ApiError> {
    id.parse()
        .map_err(|e: keel_core::Error| ApiError::bad_request(e.to_string()))
}

async fn member(
    state: &AppState,
    principal: &Principal,
    user: UserId,
) -> Result<Membership, ApiError> {
    state
        .store()
        .members(principal.workspace_id)
        .await?
        .into_iter()
        .find(|m| m.user_id == user)
        .ok_or_else(|| ApiError::not_found("no such member in this workspace"))
}

/// Changes a member's role. Takes effect at their next token refresh. Requires role:
/// admin.
#[utoipa::path(put, path = "/v1/members/{id}", tag = super::MEMBERS, request_body = SetRole,
    params(("id" = String, Path, description = "The user's id (`usr_…`)")),
    responses(
        (status = 200, description = "The member", body = MemberView),
        (status = 404, description = "No such member here", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn set_role(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(body): AppJson<SetRole>,
) -> Result<Json<MemberView>, ApiError> {
    let user = user_id(&id)?;
    let before = member(&state, &principal, user).await?;
    let role: Role = body.role.into();
    let m = state
        .store()
        .set_membership(principal.workspace_id, user, role)
        .await?;
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("member.role_set", user)
            .data(serde_json::json!({"role": role.as_str(), "previous": before.role.as_str()})),
    )
    .await;
    Ok(Json(m.into()))
}

/// Removes a member; their sessions in this workspace end. Requires role: admin.
#[utoipa::path(delete, path = "/v1/members/{id}", tag = super::MEMBERS,
    params(("id" = String, Path, description = "The user's id (`usr_…`)")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such member here", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user = user_id(&id)?;
    state
        .store()
        .remove_membership(principal.workspace_id, user)
        .await?;
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("member.removed", user),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
