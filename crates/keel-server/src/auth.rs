//! Authentication, authorisation and request rate limits: one middleware, applied per
//! group of routes with the [`Access`] (role, scope, operator-only) that group requires.
//! A handler behind it reads the caller's [`Principal`] from the request extensions; it
//! never checks credentials, roles or limits itself.
//!
//! Two credentials: an API key (`Authorization: Bearer keel_…`) or a session's access
//! token (`Authorization: Bearer <JWT>` from POST /v1/auth/login). Secrets are compared
//! by hash lookup (API keys) or by HMAC verification (JWT), both constant-time in the
//! secret.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use keel_core::auth::{Access, ApiKey, ApiKeyToken, KeyName, Principal, Role, Scopes};
use keel_core::id::WorkspaceId;
use keel_store::{NewApiKey, Store};

use crate::AppState;
use crate::error::ApiError;
use crate::ratelimit::{Decision, Kind, LimitKey, Mode, Rate};

/// A small map whose entries live `ttl` (zero: it holds nothing), at most `max` of them:
/// full, it drops what has expired, then everything. The one cache the auth path uses for
/// keys and workspace limits.
#[derive(Debug)]
pub(crate) struct TtlMap<K, V> {
    ttl: Duration,
    max: usize,
    entries: std::sync::Mutex<std::collections::HashMap<K, (V, std::time::Instant)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> TtlMap<K, V> {
    pub(crate) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            entries: std::sync::Mutex::default(),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<K, (V, std::time::Instant)>> {
        // Inserts and removals leave the map consistent, so a poisoned lock is usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if self.ttl.is_zero() {
            return None;
        }
        self.lock()
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| v.clone())
    }

    pub(crate) fn insert(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.max {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if entries.len() >= self.max {
                entries.clear();
            }
        }
        entries.insert(key, (value, std::time::Instant::now()));
    }

    pub(crate) fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.lock().retain(|k, (v, _)| keep(k, v));
    }

    pub(crate) fn forget<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.lock().remove(key);
    }
}

/// Remembers authenticated keys for a few seconds, so the hot path does not hit the
/// database on every request. Bounded; only valid keys are remembered (an attacker's
/// guesses cannot fill it); a revoke through this instance forgets the key at once; a key
/// past its expiry is never served from here.
#[derive(Debug)]
pub struct KeyCache(TtlMap<String, Principal>);

impl KeyCache {
    /// A cache with this time-to-live (zero disables it).
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self(TtlMap::new(ttl, 10_000))
    }

    fn get(&self, hash: &str) -> Option<Principal> {
        let now = time::OffsetDateTime::now_utc();
        self.0
            .get(hash)
            .filter(|p| p.expires_at.is_none_or(|e| e > now))
    }

    fn insert(&self, hash: String, principal: Principal) {
        self.0.insert(hash, principal);
    }

    /// Forgets a key (after it is revoked).
    pub fn forget(&self, key_id: keel_core::id::ApiKeyId) {
        self.0.retain(|_, p| p.key_id != Some(key_id));
    }
}

/// Authenticates the request, checks the caller may use the route, and takes one request
/// from the caller's and its workspace's rate limits.
pub(crate) async fn require(
    State((state, access)): State<(AppState, Access)>,
    mut req: Request,
    next: Next,
) -> Response {
    let (principal, decision) = match admit(&state, req.headers(), access).await {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    tracing::Span::current().record(
        "workspace_id",
        tracing::field::display(principal.workspace_id),
    );
    req.extensions_mut().insert(principal);
    let mut response = next.run(req).await;
    rate_headers(response.headers_mut(), &decision);
    response
}

/// The whole admission check of a request: who is calling, may they use a route that
/// needs `access`, and is a request left in their limits (taking it). The error is the
/// response to send (401, 403 or 429 with its headers).
pub async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    access: Access,
) -> Result<(Principal, Decision), Box<Response>> {
    let principal = authenticate(state, headers)
        .await
        .map_err(|e| Box::new(e.into_response()))?;
    let operator = access.operator && state.is_operator(principal.workspace_id).await;
    if let Err(denied) = principal.check(access, operator) {
        return Err(Box::new(
            ApiError::forbidden(denied.to_string()).into_response(),
        ));
    }
    let limits = state
        .limits_for(principal.workspace_id)
        .await
        .for_credential(&state.config().limits, &principal);
    let decision = state
        .limiter()
        .check(&limits.request_buckets(&principal), 1, Mode::Take)
        .await;
    if !decision.allowed {
        metrics::counter!("keel_ratelimit_rejections_total", "limit" => "requests").increment(1);
        let mut response = too_many(&decision, &limits).into_response();
        rate_headers(response.headers_mut(), &decision);
        return Err(Box::new(response));
    }
    Ok((principal, decision))
}

/// The 429 for a refused check, naming the limit.
pub(crate) fn too_many(decision: &Decision, limits: &ResolvedLimits) -> ApiError {
    let what = decision.denied_by.map_or("a rate limit", Kind::describe);
    let tier = match (decision.denied_by, &limits.credential_tier) {
        (Some(Kind::PrincipalRequests | Kind::PrincipalTokens), Some(own)) => own,
        _ => &limits.tier,
    };
    ApiError::too_many_requests(
        format!(
            "rate limit exceeded: {what} is limited to {} (tier {tier}); retry in {} s",
            decision.limit,
            decision.retry_after.as_secs().max(1)
        ),
        retry_secs(decision.retry_after),
    )
}

fn retry_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// `RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the bucket is full), per
/// the IETF RateLimit header fields draft; nothing when no limit applies.
pub(crate) fn rate_headers(headers: &mut HeaderMap, decision: &Decision) {
    if decision.limit == 0 {
        return;
    }
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert(
        "ratelimit-reset",
        HeaderValue::from(retry_secs(decision.reset)),
    );
}

/// A workspace's effective limits: its tier, with an admin's overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedLimits {
    /// The tier's name.
    pub tier: String,
    /// Workspace requests per minute.
    pub rpm: Option<u32>,
    /// Workspace tokens per minute.
    pub tpm: Option<u32>,
    /// Per-credential requests per minute.
    pub key_rpm: Option<u32>,
    /// Per-credential tokens per minute.
    pub key_tpm: Option<u32>,
    /// Whether the workspace or any of its keys has a budget.
    pub has_budgets: bool,
    /// The credential's own tier, when it has one (it sets `key_rpm` and `key_tpm`).
    pub credential_tier: Option<String>,
}

impl ResolvedLimits {
    /// Resolves stored overrides against the config's tiers (an unknown stored tier
    /// falls back to the default tier: the config may have dropped it).
    pub(crate) fn resolve(
        config: &keel_core::config::Limits,
        stored: &keel_store::security::WorkspaceLimits,
    ) -> Self {
        let name = stored
            .tier
            .as_deref()
            .filter(|t| config.tiers.contains_key(*t))
            .unwrap_or(&config.default_tier);
        let tier = config.tiers.get(name).cloned().unwrap_or_default();
        let clamp = |v: i64| u32::try_from(v.max(1)).unwrap_or(u32::MAX);
        Self {
            tier: name.to_owned(),
            rpm: stored.rpm.map(clamp).or(tier.rpm),
            tpm: stored.tpm.map(clamp).or(tier.tpm),
            key_rpm: tier.key_rpm,
            key_tpm: tier.key_tpm,
            has_budgets: false,
            credential_tier: None,
        }
    }

    fn principal_id(principal: &Principal) -> uuid::Uuid {
        principal
            .user_id
            .map(|u| u.as_uuid())
            .or(principal.key_id.map(|k| k.as_uuid()))
            .unwrap_or_default()
    }

    /// These limits with the credential's own tier, if it has one, for its per-credential
    /// limits (the workspace's limits stay).
    #[must_use]
    pub(crate) fn for_credential(
        mut self,
        config: &keel_core::config::Limits,
        principal: &Principal,
    ) -> Self {
        if let Some(tier) = principal.tier.as_deref().and_then(|t| config.tiers.get(t)) {
            self.key_rpm = tier.key_rpm;
            self.key_tpm = tier.key_tpm;
            self.credential_tier = principal.tier.as_deref().map(str::to_owned);
        }
        self
    }

    /// The request buckets for one request of `principal`.
    pub(crate) fn request_buckets(&self, principal: &Principal) -> Vec<(LimitKey, Rate)> {
        Self::buckets(
            principal,
            (Kind::WorkspaceRequests, self.rpm),
            (Kind::PrincipalRequests, self.key_rpm),
        )
    }

    /// The token buckets for `principal`.
    pub(crate) fn token_buckets(&self, principal: &Principal) -> Vec<(LimitKey, Rate)> {
        Self::buckets(
            principal,
            (Kind::WorkspaceTokens, self.tpm),
            (Kind::PrincipalTokens, self.key_tpm),
        )
    }

    /// The workspace's bucket and the credential's, each where a limit is set.
    fn buckets(
        principal: &Principal,
        (ws_kind, ws_limit): (Kind, Option<u32>),
        (own_kind, own_limit): (Kind, Option<u32>),
    ) -> Vec<(LimitKey, Rate)> {
        let ws = ws_limit.map(|l| {
            (
                LimitKey::id(ws_kind, principal.workspace_id.as_uuid()),
                Rate::per_minute(l),
            )
        });
        let own = own_limit.map(|l| {
            (
                LimitKey::id(own_kind, Self::principal_id(principal)),
                Rate::per_minute(l),
            )
        });
        ws.into_iter().chain(own).collect()
    }
}

/// Each workspace's resolved limits, remembered like keys (`server.key_cache_ttl`), so
/// the hot path does not read them from the database per request.
pub(crate) type LimitsCache = TtlMap<WorkspaceId, ResolvedLimits>;

/// Who is calling, from where: for the audit log and per-address limits.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    /// The peer's address (not `X-Forwarded-For`, which any client can write).
    pub ip: Option<String>,
    /// The `User-Agent`, cut to 256 characters.
    pub user_agent: Option<String>,
    /// The request's id.
    pub request_id: Option<String>,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self::of(
            &parts.headers,
            &parts.extensions,
            &state.config().server.trusted_proxies,
        ))
    }
}

/// The client's address: the peer's, or — when the peer is a trusted proxy — the last
/// address in `X-Forwarded-For` that is not itself a trusted proxy.
fn client_ip(
    peer: std::net::IpAddr,
    headers: &HeaderMap,
    trusted: &[keel_core::config::IpNet],
) -> std::net::IpAddr {
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    // From the right: each trusted proxy appended the address it saw. The first hop that
    // is not a trusted proxy is the client; anything to its left the client wrote.
    for hop in hops.into_iter().rev() {
        match hop.trim().parse::<std::net::IpAddr>() {
            Ok(ip) if is_trusted(ip) => {}
            Ok(ip) => return ip,
            Err(_) => break,
        }
    }
    peer
}

/// What per-address limits count by: the address, or for IPv6 its /64 (one host is
/// usually given a whole /64, so counting single addresses would not bind it).
pub(crate) fn address_key(ip: Option<&str>) -> String {
    match ip.and_then(|ip| ip.parse::<std::net::IpAddr>().ok()) {
        Some(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let net = u128::from(v6) & (u128::MAX << 64);
            format!("{}/64", std::net::Ipv6Addr::from(net))
        }
        Some(ip) => ip.to_string(),
        None => "unknown".to_owned(),
    }
}

impl Caller {
    pub(crate) fn of(
        headers: &HeaderMap,
        extensions: &axum::http::Extensions,
        trusted: &[keel_core::config::IpNet],
    ) -> Self {
        Self {
            ip: extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| client_ip(c.0.ip(), headers, trusted).to_string()),
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|ua| ua.chars().take(256).collect()),
            request_id: extensions
                .get::<crate::middleware::RequestId>()
                .map(|r| r.0.clone()),
        }
    }
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized(
            "missing credentials: send `Authorization: Bearer <API key or access token>`",
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <API key or access token>`",
            ));
        }
    };
    if !token.starts_with(ApiKeyToken::SCHEME) && token.bytes().filter(|b| *b == b'.').count() == 2
    {
        return state
            .tokens()
            .verify(token)
            .map_err(|e| ApiError::unauthorized(e.to_string()));
    }
    let token = ApiKeyToken::parse(token).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let hash = token.hash();
    let cache = state.key_cache();
    if let Some(principal) = cache.get(hash.as_str()) {
        return Ok(principal);
    }
    let principal = state.store().authenticate(&hash).await?.ok_or_else(|| {
        ApiError::unauthorized("the API key is not valid, has expired or has been revoked")
    })?;
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
    limits: KeyLimits,
) -> Result<(ApiKeyToken, ApiKey), IssueError> {
    let token = ApiKeyToken::generate()?;
    let key = store
        .create_api_key(NewApiKey {
            workspace_id,
            name,
            role,
            prefix: token.prefix(),
            hash: token.hash(),
            expires_at: limits.expires_at,
            scopes: limits.scopes,
            models: limits.models,
            tier: limits.tier,
        })
        .await?;
    Ok((token, key))
}

/// What a new key is limited to, beyond its role.
#[derive(Debug, Clone)]
pub struct KeyLimits {
    /// When it stops working.
    pub expires_at: Option<time::OffsetDateTime>,
    /// The routes it may reach.
    pub scopes: Scopes,
    /// The models it may call; `None` for any.
    pub models: Option<Vec<String>>,
    /// Its own rate-limit tier (a name from `[limits.tiers]`).
    pub tier: Option<String>,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self {
            expires_at: None,
            scopes: Scopes::ALL,
            models: None,
            tier: None,
        }
    }
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
    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        use axum::http::{HeaderMap, HeaderValue};
        let trusted: Vec<keel_core::config::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.1.2.3"),
        );
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        // From a trusted proxy: the last untrusted hop (a client cannot spoof past it).
        assert_eq!(
            super::client_ip(ip("10.0.0.1"), &h, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(super::client_ip(ip("::1"), &h, &trusted), ip("203.0.113.9"));
        // From anyone else: the peer, whatever the header says.
        assert_eq!(
            super::client_ip(ip("198.51.100.7"), &h, &trusted),
            ip("198.51.100.7")
        );
        assert_eq!(super::client_ip(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"));
        // Garbage in the header: the peer; garbage a client wrote left of a real hop:
        // the real hop.
        h.insert("x-forwarded-for", HeaderValue::from_static("not-an-ip"));
        assert_eq!(
            super::client_ip(ip("10.0.0.1"), &h, &trusted),
            ip("10.0.0.1")
        );
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("junk, 203.0.113.9"),
        );
        assert_eq!(
            super::client_ip(ip("10.0.0.1"), &h, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            super::address_key(Some("2001:db8:1:2:aaaa::1")),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            super::address_key(Some("2001:db8:1:2:bbbb::9")),
            "2001:db8:1:2::/64"
        );
        assert_eq!(super::address_key(Some("192.0.2.1")), "192.0.2.1");
        assert_eq!(super::address_key(None), "unknown");
        let net: keel_core::config::IpNet = "192.168.0.0/16".parse().unwrap();
        assert!(net.contains(ip("192.168.4.5")) && !net.contains(ip("192.169.0.1")));
        assert!(net.contains(ip("::ffff:192.168.1.1")), "IPv4-mapped");
        assert!("10.0.0.0/33".parse::<keel_core::config::IpNet>().is_err());
        assert!("nope".parse::<keel_core::config::IpNet>().is_err());
    }

    use std::time::Duration;

    use keel_core::auth::{Principal, Role};
    use keel_core::id::{ApiKeyId, WorkspaceId};

    use super::KeyCache;

    fn principal() -> Principal {
        Principal::for_key(WorkspaceId::new(), ApiKeyId::new(), Role::Member)
    }

    #[test]
    fn keys_are_remembered_until_the_ttl_or_a_forget() {
        let cache = KeyCache::new(Duration::from_millis(40));
        let p = principal();
        cache.insert("h1".into(), p.clone());
        assert_eq!(cache.get("h1"), Some(p.clone()));
        cache.forget(p.key_id.unwrap());
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
