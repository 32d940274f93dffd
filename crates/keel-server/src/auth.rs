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

/// Remembers authenticated keys for a few seconds, so the hot path does not hit the
/// database on every request. Bounded; only valid keys are remembered (an attacker's
/// guesses cannot fill it); a revoke through this instance forgets the key at once.
#[derive(Debug)]
pub struct KeyCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<std::collections::HashMap<String, (Principal, std::time::Instant)>>,
}

impl KeyCache {
    /// Most keys remembered.
    const MAX: usize = 10_000;

    /// A cache with this time-to-live (zero disables it).
    #[must_use]
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: std::sync::Mutex::default(),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (Principal, std::time::Instant)>>
    {
        // Inserts and removals leave the map consistent, so a poisoned lock is usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, hash: &str) -> Option<Principal> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.lock();
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(p, _)| p.clone())
    }

    fn insert(&self, hash: String, principal: Principal) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= Self::MAX {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if entries.len() >= Self::MAX {
                entries.clear();
            }
        }
        entries.insert(hash, (principal, std::time::Instant::now()));
    }

    /// Forgets a key (after it is revoked).
    pub fn forget(&self, key_id: keel_core::id::ApiKeyId) {
        self.lock().retain(|_, (p, _)| p.key_id != key_id);
    }
}

/// Authenticates the request and checks the caller has at least the route's role.
pub(crate) async fn require(
    State((state, required)): State<(AppState, Role)>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let principal = authenticate(state.store(), state.key_cache(), req.headers()).await?;
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

async fn authenticate(
    store: &dyn Store,
    cache: &KeyCache,
    headers: &HeaderMap,
) -> Result<Principal, ApiError> {
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
    let hash = token.hash();
    if let Some(principal) = cache.get(hash.as_str()) {
        return Ok(principal);
    }
    let principal = store
        .authenticate(&hash)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the API key is not valid or has been revoked"))?;
    cache.insert(hash.as_str().to_owned(), principal.clone());
    Ok(principal)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_core::auth::{Principal, Role};
    use keel_core::id::{ApiKeyId, WorkspaceId};

    use super::KeyCache;

    fn principal() -> Principal {
        Principal {
            workspace_id: WorkspaceId::new(),
            key_id: ApiKeyId::new(),
            role: Role::Member,
        }
    }

    #[test]
    fn keys_are_remembered_until_the_ttl_or_a_forget() {
        let cache = KeyCache::new(Duration::from_millis(40));
        let p = principal();
        cache.insert("h1".into(), p.clone());
        assert_eq!(cache.get("h1"), Some(p.clone()));
        cache.forget(p.key_id);
        assert_eq!(cache.get("h1"), None, "forgotten on revoke");
        cache.insert("h2".into(), p);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(cache.get("h2"), None, "expired");
    }

    #[test]
    fn a_zero_ttl_disables_the_cache() {
        let cache = KeyCache::new(Duration::ZERO);
        cache.insert("h".into(), principal());
        assert_eq!(cache.get("h"), None);
    }
}
