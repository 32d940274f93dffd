//! Login sessions: argon2id password hashes, short-lived access tokens (JWT, HS256, with a
//! `kid` so the signing secret can rotate) and opaque refresh tokens that rotate on every
//! use (the store revokes a session whose spent token is presented again).
//!
//! Access tokens are checked without touching the database: signature, `alg` (HS256
//! only: `none` and every other algorithm are refused), `kid`, `exp`, `nbf`, `iss` and
//! `aud`. They carry the member's role at issue time and live `auth.access_ttl` (15
//! minutes by default): a role change or a logout takes effect at the next refresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use keel_core::auth::{Principal, Role, Scopes};
use keel_core::config::Auth;
use keel_core::id::{SessionId, UserId, WorkspaceId};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};

/// Why a password operation failed (never because the password was wrong: that is
/// `Ok(false)`).
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Hashing failed (no randomness, or a stored hash that is not a PHC string).
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The blocking pool is gone (shutting down).
    #[error("password hashing was interrupted")]
    Interrupted,
    /// Every hashing slot stayed busy for [`HASH_WAIT`]: too many logins at once.
    #[error("too many password checks at once; retry shortly")]
    Busy,
}

/// Password hashes computed at once. Each takes 19 MiB and most of a core for tens of
/// milliseconds, so without a bound a burst of logins could exhaust memory; past it,
/// callers wait up to [`HASH_WAIT`], then get [`PasswordError::Busy`] (503).
const HASH_SLOTS: usize = 4;
/// Longest a password check waits for a slot.
const HASH_WAIT: Duration = Duration::from_secs(2);
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HASH_SLOTS);

async fn hash_slot() -> Result<tokio::sync::SemaphorePermit<'static>, PasswordError> {
    match tokio::time::timeout(HASH_WAIT, HASHING.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err(PasswordError::Interrupted),
        Err(_) => Err(PasswordError::Busy),
    }
}

/// Hashes a password with argon2id (19 MiB, 2 passes: OWASP's minimum) and a random
/// salt, off the async threads. Returns the PHC string to store.
pub async fn hash_password(password: String) -> Result<String, PasswordError> {
    let _slot = hash_slot().await?;
    tokio::task::spawn_blocking(move || {
        argon2::Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| PasswordError::Hash(e.to_string()))
    })
    .await
    .map_err(|_| PasswordError::Interrupted)?
}

/// Checks a password against a stored hash, off the async threads. With no stored hash
/// (unknown user) it still spends the time of a check, so response time does not tell
/// whether an account exists.
pub async fn verify_password(
    password: String,
    stored: Option<String>,
) -> Result<bool, PasswordError> {
    let _slot = hash_slot().await?;
    tokio::task::spawn_blocking(move || {
        let argon = argon2::Argon2::default();
        match stored {
            Some(hash) => match argon.verify_password(password.as_bytes(), hash.as_str()) {
                Ok(()) => Ok(true),
                Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
                Err(e) => Err(PasswordError::Hash(e.to_string())),
            },
            None => {
                let _ = argon.hash_password(password.as_bytes());
                Ok(false)
            }
        }
    })
    .await
    .map_err(|_| PasswordError::Interrupted)?
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user (`usr_…`).
    pub sub: String,
    /// The workspace the token acts in (`ws_…`).
    pub ws: String,
    /// The member's role when the token was issued.
    pub role: Role,
    /// The session (`ses_…`).
    pub sid: String,
    /// Issuer and audience: `auth.jwt_audience`.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before (Unix seconds).
    pub nbf: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
}

/// Why an access token was refused. Every variant is a 401; the text says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or a header, payload or claim that does not parse.
    #[error("the access token is malformed")]
    Malformed,
    /// `alg` is not HS256 (e.g. `none`).
    #[error("the access token's algorithm is not accepted (only HS256)")]
    Algorithm,
    /// No key with this `kid`, or the signature does not match.
    #[error("the access token's signature is not valid")]
    Signature,
    /// Past `exp`.
    #[error("the access token has expired; refresh it at POST /v1/auth/refresh")]
    Expired,
    /// Before `nbf`.
    #[error("the access token is not valid yet")]
    NotYetValid,
    /// Wrong `aud` or `iss`.
    #[error("the access token is for another audience")]
    Audience,
}

/// Why an access token could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// No signing key (no secret configured and no randomness to make one).
    #[error("no key to sign access tokens: set auth.jwt_secret")]
    NoKey,
    /// Signing failed.
    #[error("cannot sign the access token: {0}")]
    Sign(String),
    /// No randomness for a refresh token.
    #[error("no randomness for a refresh token: {0}")]
    Random(String),
}

/// Signs and checks access tokens; makes refresh tokens.
pub struct Tokens {
    signing: Option<(String, EncodingKey)>,
    verifying: HashMap<String, DecodingKey>,
    validation: Validation,
    audience: String,
    access_ttl: Duration,
    session_ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("kid", &self.signing.as_ref().map(|(k, _)| k))
            .field("keys", &self.verifying.len())
            .finish_non_exhaustive()
    }
}

/// A key id: the first 16 hex digits of the secret's SHA-256 (names the key, reveals
/// nothing usable about it).
fn kid(secret: &[u8]) -> String {
    let mut hex = keel_core::auth::sha256_hex(secret);
    hex.truncate(16);
    hex
}

impl Tokens {
    /// Tokens per the `[auth]` config. Without `jwt_secret`, a random secret for this
    /// process; the second value is a warning to log when that happened (or when there was
    /// no randomness for it, in which case logins fail and API keys still work).
    #[must_use]
    pub fn new(config: &Auth) -> (Self, Option<&'static str>) {
        let (secret, warning) = match &config.jwt_secret {
            Some(s) => (Some(s.expose_secret().as_bytes().to_vec()), None),
            None => {
                let mut bytes = vec![0u8; 48];
                match getrandom::fill(&mut bytes) {
                    Ok(()) => (
                        Some(bytes),
                        Some(
                            "auth.jwt_secret is not set: login sessions use a random per-process key, \
                             so they end when Keel restarts and do not work across instances",
                        ),
                    ),
                    Err(_) => (
                        None,
                        Some(
                            "auth.jwt_secret is not set and the system has no randomness: logins are disabled",
                        ),
                    ),
                }
            }
        };
        let mut verifying = HashMap::new();
        let signing = secret.map(|secret| {
            let current = kid(&secret);
            verifying.insert(current.clone(), DecodingKey::from_secret(&secret));
            (current, EncodingKey::from_secret(&secret))
        });
        for old in &config.jwt_previous_secrets {
            let old = old.expose_secret().as_bytes();
            verifying.insert(kid(old), DecodingKey::from_secret(old));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_audience(&[&config.jwt_audience]);
        validation.set_issuer(&[&config.jwt_audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        (
            Self {
                signing,
                verifying,
                validation,
                audience: config.jwt_audience.clone(),
                access_ttl: config.access_ttl,
                session_ttl: config.session_ttl,
            },
            warning,
        )
    }

    /// How long access tokens live.
    #[must_use]
    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// How long sessions live.
    #[must_use]
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// Signs an access token for a session.
    pub fn issue(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        role: Role,
        session: SessionId,
    ) -> Result<String, IssueError> {
        let (kid, key) = self.signing.as_ref().ok_or(IssueError::NoKey)?;
        let now = time::OffsetDateTime::now_utc()
            .unix_timestamp()
            .max(0)
            .cast_unsigned();
        let claims = Claims {
            sub: user.to_string(),
            ws: workspace.to_string(),
            role,
            sid: session.to_string(),
            iss: self.audience.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + self.access_ttl.as_secs(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        jsonwebtoken::encode(&header, &claims, key).map_err(|e| IssueError::Sign(e.to_string()))
    }

    /// Checks an access token and returns who it acts as.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            K::InvalidAlgorithmName | K::InvalidAlgorithm => TokenError::Algorithm,
            // `none` and other names jsonwebtoken does not know fail to parse at all: say
            // it is the algorithm when the header names one.
            _ if header_names_an_algorithm(token) => TokenError::Algorithm,
            _ => TokenError::Malformed,
        })?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Algorithm);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|k| self.verifying.get(k))
            .ok_or(TokenError::Signature)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    K::InvalidSignature => TokenError::Signature,
                    K::ExpiredSignature => TokenError::Expired,
                    K::ImmatureSignature => TokenError::NotYetValid,
                    K::InvalidAudience | K::InvalidIssuer => TokenError::Audience,
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => TokenError::Algorithm,
                    _ => TokenError::Malformed,
                }
            })?;
        let c = data.claims;
        Ok(Principal {
            workspace_id: c.ws.parse().map_err(|_| TokenError::Malformed)?,
            key_id: None,
            user_id: Some(c.sub.parse().map_err(|_| TokenError::Malformed)?),
            role: c.role,
            scopes: Scopes::ALL,
            models: None,
            expires_at: time::OffsetDateTime::from_unix_timestamp(
                i64::try_from(c.exp).unwrap_or(i64::MAX),
            )
            .ok(),
            tier: None,
        })
    }
}

/// Whether the token's header is JSON with a string `alg` (for a clear refusal of
/// `alg: none` and the like).
fn header_names_an_algorithm(token: &str) -> bool {
    token
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .is_some_and(|h| h.get("alg").is_some_and(serde_json::Value::is_string))
}

/// A new opaque refresh token (`keel_rt_` and 43 URL-safe characters) and its stored hash.
pub fn refresh_token() -> Result<(String, String), IssueError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| IssueError::Random(e.to_string()))?;
    let mut token = String::from("keel_rt_");
    URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
    let hash = refresh_hash(&token);
    Ok((token, hash))
}

/// The stored form of a refresh token: hex SHA-256 (the token has 256 random bits, so a
/// fast hash is enough, as for API keys).
#[must_use]
pub fn refresh_hash(token: &str) -> String {
    keel_core::auth::sha256_hex(token.as_bytes())
}

/// Shared handle.
pub type SharedTokens = Arc<Tokens>;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret: &str) -> Auth {
        Auth {
            jwt_secret: Some(secret.to_owned().into()),
            ..Auth::default()
        }
    }

    const A: &str = "a-secret-that-is-long-enough-for-hs256-0001";
    const B: &str = "b-secret-that-is-long-enough-for-hs256-0002";

    fn forge(
        claims: &serde_json::Value,
        alg: Algorithm,
        secret: &str,
        kid: Option<String>,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid;
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn claims(offset_exp: i64, offset_nbf: i64, aud: &str) -> serde_json::Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        serde_json::json!({
            "sub": UserId::new().to_string(), "ws": WorkspaceId::new().to_string(),
            "role": "admin", "sid": SessionId::new().to_string(), "iss": "keel", "aud": aud,
            "iat": now, "nbf": now + offset_nbf, "exp": now + offset_exp,
        })
    }

    #[test]
    fn issued_tokens_verify_and_carry_the_session() {
        let (tokens, warning) = Tokens::new(&config(A));
        assert!(warning.is_none());
        let (user, ws) = (UserId::new(), WorkspaceId::new());
        let token = tokens
            .issue(user, ws, Role::Member, SessionId::new())
            .unwrap();
        let p = tokens.verify(&token).unwrap();
        assert_eq!(
            (p.user_id, p.workspace_id, p.role, p.key_id),
            (Some(user), ws, Role::Member, None)
        );
    }

    #[test]
    fn the_attack_set_is_refused() {
        let (tokens, _) = Tokens::new(&config(A));
        let kid_a = Some(kid(A.as_bytes()));
        // alg = none: header {"alg":"none"} with an empty signature.
        let payload = URL_SAFE_NO_PAD.encode(claims(600, 0, "keel").to_string());
        let none = format!(
            "{}.{payload}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#)
        );
        assert_eq!(tokens.verify(&none), Err(TokenError::Algorithm));
        // Another algorithm, signed with the right secret.
        let hs512 = forge(&claims(600, 0, "keel"), Algorithm::HS512, A, kid_a.clone());
        assert_eq!(tokens.verify(&hs512), Err(TokenError::Algorithm));
        // Wrong key, under the right kid and under its own.
        let wrong = forge(&claims(600, 0, "keel"), Algorithm::HS256, B, kid_a.clone());
        assert_eq!(tokens.verify(&wrong), Err(TokenError::Signature));
        let wrong = forge(
            &claims(600, 0, "keel"),
            Algorithm::HS256,
            B,
            Some(kid(B.as_bytes())),
        );
        assert_eq!(tokens.verify(&wrong), Err(TokenError::Signature));
        // Expired, not yet valid, other audience.
        let t = forge(
            &claims(-60, -120, "keel"),
            Algorithm::HS256,
            A,
            kid_a.clone(),
        );
        assert_eq!(tokens.verify(&t), Err(TokenError::Expired));
        let t = forge(
            &claims(600, 300, "keel"),
            Algorithm::HS256,
            A,
            kid_a.clone(),
        );
        assert_eq!(tokens.verify(&t), Err(TokenError::NotYetValid));
        let t = forge(&claims(600, 0, "other"), Algorithm::HS256, A, kid_a.clone());
        assert_eq!(tokens.verify(&t), Err(TokenError::Audience));
        // A tampered payload under a valid signature.
        let good = forge(&claims(600, 0, "keel"), Algorithm::HS256, A, kid_a);
        let mut parts: Vec<&str> = good.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(claims(600, 0, "keel").to_string());
        parts[1] = &evil;
        assert_eq!(tokens.verify(&parts.join(".")), Err(TokenError::Signature));
        assert_eq!(tokens.verify("not.a.jwt"), Err(TokenError::Malformed));
    }

    #[test]
    fn a_rotated_secret_still_verifies_old_tokens_but_signs_with_the_new() {
        let (old, _) = Tokens::new(&config(A));
        let token = old
            .issue(
                UserId::new(),
                WorkspaceId::new(),
                Role::Viewer,
                SessionId::new(),
            )
            .unwrap();
        let rotated = Auth {
            jwt_secret: Some(B.to_owned().into()),
            jwt_previous_secrets: vec![A.to_owned().into()],
            ..Auth::default()
        };
        let (new, _) = Tokens::new(&rotated);
        assert!(new.verify(&token).is_ok());
        let (only_b, _) = Tokens::new(&config(B));
        assert_eq!(only_b.verify(&token), Err(TokenError::Signature));
        let fresh = new
            .issue(
                UserId::new(),
                WorkspaceId::new(),
                Role::Viewer,
                SessionId::new(),
            )
            .unwrap();
        assert!(only_b.verify(&fresh).is_ok());
    }

    #[tokio::test]
    async fn passwords_hash_with_argon2id_and_verify() {
        let hash = hash_password("correct horse battery".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(
            verify_password("correct horse battery".into(), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(
            !verify_password("wrong horse battery".into(), Some(hash))
                .await
                .unwrap()
        );
        assert!(
            !verify_password("anything at all".into(), None)
                .await
                .unwrap()
        );
    }

    #[test]
    fn refresh_tokens_are_random_and_stored_hashed() {
        let (a, ha) = refresh_token().unwrap();
        let (b, _) = refresh_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("keel_rt_") && a.len() == 8 + 43);
        assert_eq!(refresh_hash(&a), ha);
        assert_eq!(ha.len(), 64);
    }
}
