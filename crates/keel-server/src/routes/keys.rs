//! API key endpoints: create (the secret is in this one response only), list, revoke.
//! All are scoped to the caller's workspace; another workspace's key id is a 404.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_core::auth::{ApiKey, KeyName, Principal, Role, Scope, Scopes};
use keel_core::id::ApiKeyId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::{Caller, KeyLimits};
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;

/// A role on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WireRole {
    /// Reads everything, changes nothing.
    Viewer,
    /// Uses the workspace.
    Member,
    /// Manages the workspace.
    Admin,
}

impl From<WireRole> for Role {
    fn from(r: WireRole) -> Self {
        match r {
            WireRole::Viewer => Role::Viewer,
            WireRole::Member => Role::Member,
            WireRole::Admin => Role::Admin,
        }
    }
}

impl From<Role> for WireRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Viewer => WireRole::Viewer,
            Role::Member => WireRole::Member,
            Role::Admin => WireRole::Admin,
        }
    }
}

/// What to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    /// What the key may do.
    role: WireRole,
    /// A label, 1–128 characters.
    #[serde(default)]
    name: Option<String>,
    /// Limit the key to these scopes (`read`, `gateway`, `tasks:write`, `agents:write`,
    /// `admin`); absent: everything its role allows.
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// When the key stops working (RFC 3339, in the future).
    #[serde(default)]
    expires_at: Option<String>,
    /// The only models (public names) the key may call through the gateway.
    #[serde(default)]
    models: Option<Vec<String>>,
    /// The key's own rate-limit tier (its per-key limits), a name from `[limits.tiers]`.
    #[serde(default)]
    tier: Option<String>,
}

/// An API key (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyView {
    /// Its id (`key_…`).
    id: String,
    /// The workspace it acts in.
    workspace_id: String,
    /// Its label.
    name: Option<String>,
    /// What it may do.
    role: WireRole,
    /// The visible start of the secret, for support.
    prefix: String,
    /// When it was created (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
    /// When it was revoked, if it was.
    #[schema(format = DateTime)]
    revoked_at: Option<String>,
    /// When it stops working, if it expires.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    /// Its scopes; absent: everything its role allows.
    scopes: Option<Vec<String>>,
    /// The models it may call; absent: any.
    models: Option<Vec<String>>,
    /// When it last authenticated a request (to the minute).
    #[schema(format = DateTime)]
    last_used_at: Option<String>,
    /// Its own rate-limit tier; absent: the workspace's.
    tier: Option<String>,
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> Self {
        Self {
            id: k.id.to_string(),
            workspace_id: k.workspace_id.to_string(),
            name: k.name.map(|n| n.as_str().to_owned()),
            role: k.role.into(),
            prefix: k.prefix,
            created_at: super::rfc3339(k.created_at),
            revoked_at: k.revoked_at.map(super::rfc3339),
            expires_at: k.expires_at.map(super::rfc3339),
            scopes: (!k.scopes.is_all())
                .then(|| k.scopes.iter().map(|s| s.as_str().to_owned()).collect()),
            models: k.models,
            last_used_at: k.last_used_at.map(super::rfc3339),
            tier: k.tier,
        }
    }
}

/// A key just created, with its secret: shown this once, never again.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedKey {
    /// The secret to send as `Authorization: Bearer <key>`.
    key: String,
    #[serde(flatten)]
    stored: KeyView,
}

/// Creates an API key in the caller's workspace. Requires role: admin.
#[utoipa::path(post, path = "/v1/keys", tag = super::KEYS, request_body = CreateKey,
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Created; `key` is shown only here", body = CreatedKey),
        (status = 400, description = "Malformed body, unknown scope, past expiry", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role too low", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    AppJson(body): AppJson<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let name = body
        .name
        .map(|n| KeyName::parse(&n))
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("name: {e}")))?;
    let mut limits = KeyLimits::default();
    if let Some(scopes) = &body.scopes {
        let parsed = scopes
            .iter()
            .map(|s| s.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::bad_request(format!("scopes: {e}")))?;
        limits.scopes = Scopes::from_list(&parsed)
            .map_err(|e| ApiError::bad_request(format!("scopes: {e}")))?;
    }
    if let Some(at) = &body.expires_at {
        let at = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .map_err(|_| {
                ApiError::bad_request(
                    "expires_at must be an RFC 3339 time, e.g. 2027-01-31T00:00:00Z",
                )
            })?;
        if at <= time::OffsetDateTime::now_utc() {
            return Err(ApiError::bad_request("expires_at must be in the future"));
        }
        limits.expires_at = Some(at);
    }
    if let Some(models) = body.models {
        if models.is_empty() || models.iter().any(|m| m.is_empty() || m.len() > 128) {
            return Err(ApiError::bad_request(
                "models must list 1 or more model names of 1 to 128 characters, or be left out for any",
            ));
        }
        limits.models = Some(models);
    }
    if let Some(tier) = body.tier {
        let tiers = &state.config().limits.tiers;
        if !tiers.contains_key(&tier) {
            return Err(ApiError::bad_request(format!(
                "tier: no tier {tier:?}; known: {}",
                tiers.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        limits.tier = Some(tier);
    }
    let (token, key) = crate::auth::issue_key(
        state.store(),
        principal.workspace_id,
        body.role.into(),
        name,
        limits,
    )
    .await?;
    tracing::info!(key_id = %key.id, role = %key.role, "API key created");
    let data = serde_json::json!({
        "role": key.role.as_str(),
        "scopes": key.scopes.to_stored(),
        "expires_at": key.expires_at.map(super::rfc3339),
        "models": key.models,
        "tier": key.tier,
        "prefix": key.prefix,
    });
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("key.created", key.id).data(data),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key: token.expose().to_owned(),
            stored: key.into(),
        }),
    ))
}

/// Lists the caller's workspace's keys, oldest first. Requires role: admin.
#[utoipa::path(get, path = "/v1/keys", tag = super::KEYS, security(("api_key" = [])),
    responses((status = 200, description = "The workspace's keys", body = super::List<KeyView>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<super::List<KeyView>>, ApiError> {
    let keys = state.store().list_api_keys(principal.workspace_id).await?;
    Ok(Json(super::List {
        data: keys.into_iter().map(KeyView::from).collect(),
    }))
}

/// Revokes a key of the caller's workspace; idempotent. Requires role: admin.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = super::KEYS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The key's id (`key_…`)")),
    responses(
        (status = 200, description = "The revoked key", body = KeyView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let id: ApiKeyId = id
        .parse()
        .map_err(|e: keel_core::Error| ApiError::bad_request(e.to_string()))?;
    let key = state
        .store()
        .revoke_api_key(principal.workspace_id, id)
        .await?;
    state.key_cache().forget(key.id);
    tracing::info!(key_id = %key.id, "API key revoked");
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("key.revoked", key.id),
    )
    .await;
    Ok(Json(key.into()))
}
