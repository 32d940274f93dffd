//! Authentication and authorisation: one middleware, applied per group of routes with the
//! role that group requires. A handler behind it reads the caller's [`Principal`] from
//! the request extensions; it never checks credentials itself.
//!
//! Today the only credential is an API key (`Authorization: Bearer keel_…`); users and
//! JWT sessions, scopes and rate limits extend this module, not the handlers.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use keel_core::auth::{ApiKey, ApiKeyToken, KeyName, Principal, Role};
use keel_core::id::WorkspaceId;
use keel_store::{NewApiKey, Store};

use crate::AppState;
use crate::error::ApiError;

/// Authenticates the request and checks the caller has at least the route's role.
pub(crate) async fn require(
    State((state, required)): State<(AppState, Role)>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let principal = authenticate(state.store(), req.headers()).await?;
    tracing::Span::current().record(
        "workspace_id",
        tracing::field::display(principal.workspace_id),
    );
    if !principal.role.satisfies(required) {
        return Err(ApiError::forbidden(format!(
            "this route requires role {required} or higher; this key has role {}",
            principal.role
        )));
    }
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

async fn authenticate(store: &dyn Store, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing credentials: send `Authorization: Bearer <API key>`")
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <API key>`",
            ));
        }
    };
    let token = ApiKeyToken::parse(token).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    store
        .authenticate(&token.hash())
        .await?
        .ok_or_else(|| ApiError::unauthorized("the API key is not valid or has been revoked"))
}

/// Creates a key for a workspace: a fresh random token, of which only the hash is stored.
/// Returns the token (to show once) and the stored key.
pub async fn issue_key(
    store: &dyn Store,
    workspace_id: WorkspaceId,
    role: Role,
    name: Option<KeyName>,
) -> Result<(ApiKeyToken, ApiKey), IssueError> {
    let token = ApiKeyToken::generate()?;
    let key = store
        .create_api_key(NewApiKey {
            workspace_id,
            name,
            role,
            prefix: token.prefix(),
            hash: token.hash(),
        })
        .await?;
    Ok((token, key))
}

/// Why a key could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// No randomness for the secret.
    #[error(transparent)]
    Random(#[from] keel_core::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] keel_store::Error),
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Random(e) => ApiError::internal(&e),
            IssueError::Store(e) => e.into(),
        }
    }
}
