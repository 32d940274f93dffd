//! Login sessions: log in with email and password for a short-lived access token and a
//! refresh token; refresh (which rotates the refresh token); log out.
//!
//! Throttled twice: failed logins per account (`auth.login_failures` per
//! `auth.login_window`) and attempts per client address (`auth.login_attempts_per_ip`).
//! A locked account answers 429 before the password is even checked, so guessing gains
//! nothing; an unknown email costs the same time as a wrong password.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_core::auth::{Email, Role};
use keel_core::id::SessionId;
use keel_store::security::{Refreshed, SessionRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;
use crate::ratelimit::{Kind, LimitKey, Mode, Rate};
use crate::session;

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Login {
    /// The user's email.
    email: String,
    /// The password.
    password: String,
    /// The workspace to act in (name or `ws_…` id); needed only when the user belongs
    /// to more than one.
    #[serde(default)]
    workspace: Option<String>,
}

/// A session's tokens.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionTokens {
    /// Send as `Authorization: Bearer <access_token>`.
    access_token: String,
    /// Always `Bearer`.
    token_type: &'static str,
    /// Seconds the access token lives.
    expires_in: u64,
    /// Trade for new tokens at POST /v1/auth/refresh; single use.
    refresh_token: String,
    /// The session (`ses_…`).
    session_id: String,
    /// The user (`usr_…`).
    user_id: String,
    /// The workspace the tokens act in.
    workspace_id: String,
    /// The user's role there.
    role: super::keys::WireRole,
}

/// A refresh token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshBody {
    /// The refresh token from login or the last refresh.
    refresh_token: String,
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn window(state: &AppState, limit: u32) -> Rate {
    Rate {
        limit,
        period: state.config().auth.login_window,
    }
}

fn locked(retry: std::time::Duration, what: &str) -> ApiError {
    let secs = u32::try_from(retry.as_secs().max(1)).unwrap_or(u32::MAX);
    ApiError::too_many_requests(format!("too many {what}; retry in {secs} s"), secs)
}

/// Logs in: checks the password and starts a session.
#[utoipa::path(post, path = "/v1/auth/login", tag = super::AUTH, request_body = Login,
    responses(
        (status = 200, description = "Logged in", body = SessionTokens),
        (status = 400, description = "Malformed body, or a workspace must be chosen", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong email or password", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The user belongs to no such workspace", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many attempts for this account or address", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn login(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<Login>,
) -> Result<Response, ApiError> {
    let email = Email::parse(&body.email).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let auth = &state.config().auth;
    let account = [(
        LimitKey::text(Kind::LoginFailures, email.as_str()),
        window(&state, auth.login_failures),
    )];
    let limiter = state.limiter();
    // Taken before the password is checked, so parallel guesses cannot all pass a check
    // of the count; given back when the password is right.
    let taken = limiter.check(&account, 1, Mode::Take).await;
    if !taken.allowed {
        metrics::counter!("keel_logins_total", "outcome" => "locked").increment(1);
        return Err(locked(taken.retry_after, "failed logins for this account"));
    }
    let ip = crate::auth::address_key(caller.ip.as_deref());
    let by_ip = [(
        LimitKey::text(Kind::LoginIp, &ip),
        window(&state, auth.login_attempts_per_ip),
    )];
    let decision = limiter.check(&by_ip, 1, Mode::Take).await;
    if !decision.allowed {
        limiter.check(&account, -1, Mode::Force).await;
        metrics::counter!("keel_logins_total", "outcome" => "throttled").increment(1);
        return Err(locked(
            decision.retry_after,
            "login attempts from this address",
        ));
    }

    let found = state
        .store()
        .user_credentials(&email)
        .await?
        .filter(|(user, _)| user.disabled_at.is_none());
    let (user, hash) = found.map_or((None, None), |(u, h)| (Some(u), Some(h)));
    let ok = session::verify_password(body.password, hash).await?;
    let user = match user {
        Some(user) if ok => user,
        known => {
            metrics::counter!("keel_logins_total", "outcome" => "failed").increment(1);
            // Recorded in the background: answering a wrong password for a known
            // account must take no longer than for an unknown one.
            if let Some(user) = known {
                let (state, caller) = (state.clone(), caller.clone());
                tokio::spawn(async move {
                    for m in state.store().memberships(user.id).await.unwrap_or_default() {
                        let action = Action::new("auth.login_failed", user.id)
                            .data(serde_json::json!({"email": user.email.as_str()}));
                        audit::record_as(
                            &state,
                            m.workspace_id,
                            user.email.as_str(),
                            &caller,
                            action,
                        )
                        .await;
                    }
                });
            }
            return Err(ApiError::unauthorized("wrong email or password"));
        }
    };
    limiter.check(&account, -1, Mode::Force).await;

    let memberships = state.store().memberships(user.id).await?;
    let membership = match body.workspace.as_deref() {
        Some(wanted) => {
            let mut found = None;
            for m in &memberships {
                let by_name = async {
                    state
                        .store()
                        .workspace(m.workspace_id)
                        .await
                        .is_ok_and(|ws| ws.name.as_str() == wanted)
                };
                if m.workspace_id.to_string() == wanted || by_name.await {
                    found = Some(m.clone());
                    break;
                }
            }
            found.ok_or_else(|| {
                ApiError::forbidden(format!("this user is not a member of workspace {wanted:?}"))
            })?
        }
        None => match memberships.as_slice() {
            [only] => only.clone(),
            [] => {
                return Err(ApiError::forbidden(
                    "this user belongs to no workspace; ask an admin to add them",
                ));
            }
            many => {
                let mut names = Vec::with_capacity(many.len());
                for m in many {
                    if let Ok(ws) = state.store().workspace(m.workspace_id).await {
                        names.push(ws.name.as_str().to_owned());
                    }
                }
                return Err(ApiError::bad_request(format!(
                    "this user belongs to several workspaces: choose one with `workspace` ({})",
                    names.join(", ")
                )));
            }
        },
    };

    let (refresh, refresh_hash) = session::refresh_token().map_err(|e| ApiError::internal(&e))?;
    let now = time::OffsetDateTime::now_utc();
    let ttl = time::Duration::try_from(state.tokens().session_ttl()).unwrap_or(time::Duration::DAY);
    let session = SessionRecord {
        id: SessionId::new(),
        user_id: user.id,
        workspace_id: membership.workspace_id,
        created_at: now,
        expires_at: now + ttl,
        revoked_at: None,
    };
    state
        .store()
        .create_session(&session, &refresh_hash)
        .await?;
    let body = tokens(&state, &session, membership.role, refresh)?;
    metrics::counter!("keel_logins_total", "outcome" => "ok").increment(1);
    audit::record_as(
        &state,
        session.workspace_id,
        &user.id.to_string(),
        &caller,
        Action::new("auth.login", session.id),
    )
    .await;
    Ok(no_store(Json(body).into_response()))
}

fn tokens(
    state: &AppState,
    session: &SessionRecord,
    role: Role,
    refresh: String,
) -> Result<SessionTokens, ApiError> {
    let access = state
        .tokens()
        .issue(session.user_id, session.workspace_id, role, session.id)
        .map_err(|e| ApiError::internal(&e))?;
    Ok(SessionTokens {
        access_token: access,
        token_type: "Bearer",
        expires_in: state.tokens().access_ttl().as_secs(),
        refresh_token: refresh,
        session_id: session.id.to_string(),
        user_id: session.user_id.to_string(),
        workspace_id: session.workspace_id.to_string(),
        role: role.into(),
    })
}

/// Trades a refresh token for new tokens. The token is spent: presenting it again revokes
/// the whole session (it was stolen, or the client is broken).
#[utoipa::path(post, path = "/v1/auth/refresh", tag = super::AUTH, request_body = RefreshBody,
    responses(
        (status = 200, description = "New tokens", body = SessionTokens),
        (status = 401, description = "Unknown, spent, revoked or expired refresh token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many requests from this address", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn refresh(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<RefreshBody>,
) -> Result<Response, ApiError> {
    let old = session::refresh_hash(&body.refresh_token);
    let (new, new_hash) = session::refresh_token().map_err(|e| ApiError::internal(&e))?;
    match state.store().rotate_refresh(&old, &new_hash).await? {
        Refreshed::Rotated(session, role) => Ok(no_store(
            Json(tokens(&state, &session, role, new)?).into_response(),
        )),
        Refreshed::Reused(session) => {
            metrics::counter!("keel_refresh_reuse_total").increment(1);
            tracing::warn!(session_id = %session.id, user_id = %session.user_id, "refresh token reused: session revoked");
            audit::record_as(
                &state,
                session.workspace_id,
                &session.user_id.to_string(),
                &caller,
                Action::new("auth.refresh_reused", session.id),
            )
            .await;
            Err(ApiError::unauthorized(
                "this refresh token was already used, so the session has been revoked as a precaution; log in again",
            ))
        }
        Refreshed::Invalid => Err(ApiError::unauthorized(
            "the refresh token is not valid, has expired or its session was revoked; log in again",
        )),
    }
}

/// Ends the session the refresh token belongs to. Idempotent: 204 whether or not the
/// token was live. Access tokens already issued expire on their own (within
/// `auth.access_ttl`).
#[utoipa::path(post, path = "/v1/auth/logout", tag = super::AUTH, request_body = RefreshBody,
    responses(
        (status = 204, description = "Logged out"),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn logout(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<RefreshBody>,
) -> Result<StatusCode, ApiError> {
    let hash = session::refresh_hash(&body.refresh_token);
    if let Some(session) = state.store().revoke_session(&hash, "logout").await? {
        audit::record_as(
            &state,
            session.workspace_id,
            &session.user_id.to_string(),
            &caller,
            Action::new("auth.logout", session.id),
        )
        .await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Limits requests from one client address to the routes that take no credentials.
pub(crate) async fn per_ip(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let caller = Caller::of(
        req.headers(),
        req.extensions(),
        &state.config().server.trusted_proxies,
    );
    let ip = crate::auth::address_key(caller.ip.as_deref());
    let bucket = [(
        LimitKey::text(Kind::Ip, &ip),
        Rate::per_minute(state.config().limits.ip_rpm),
    )];
    let decision = state.limiter().check(&bucket, 1, Mode::Take).await;
    if !decision.allowed {
        metrics::counter!("keel_ratelimit_rejections_total", "limit" => "ip").increment(1);
        let secs = u32::try_from(decision.retry_after.as_secs().max(1)).unwrap_or(u32::MAX);
        let mut response = ApiError::too_many_requests(
            format!(
                "rate limit exceeded: this address is limited to {} requests per minute on routes without credentials; retry in {secs} s",
                decision.limit
            ),
            secs,
        )
        .into_response();
        crate::auth::rate_headers(response.headers_mut(), &decision);
        return response;
    }
    let mut response = next.run(req).await;
    crate::auth::rate_headers(response.headers_mut(), &decision);
    response
}
