//! Who is calling: roles, API-key tokens and the principal a request acts as.
//!
//! An API key is `keel_` followed by 43 characters of URL-safe base64 (32 random bytes from
//! the operating system). It is shown once, at creation; only its SHA-256 is stored. A
//! fast hash is right here (unlike passwords): the secret has 256 bits of entropy, so no
//! amount of hashing speed makes guessing it feasible, and authentication stays a single
//! indexed lookup.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::Error;
use crate::id::{ApiKeyId, UserId, WorkspaceId};

/// What a principal may do in its workspace. Ordered: `Viewer < Member < Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything in the workspace, changes nothing.
    Viewer,
    /// Uses the workspace: runs agents, calls models.
    Member,
    /// Manages the workspace: keys, members, limits.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Member, Role::Admin];

    /// The role's wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }

    /// Whether this role includes everything `required` may do.
    #[must_use]
    pub fn satisfies(self, required: Role) -> bool {
        self >= required
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "role",
                    format!("expected admin, member or viewer, got {s:?}"),
                )
            })
    }
}

/// The stored fingerprint of an API key: hex SHA-256 of the whole token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl KeyHash {
    /// The fingerprint as stored (64 lowercase hex digits).
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A fingerprint read back from storage.
    #[must_use]
    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }
}

/// A full API-key token, as presented by a caller or just generated. Never logged: its
/// `Debug` is redacted.
pub struct ApiKeyToken(SecretString);

impl ApiKeyToken {
    /// What every token starts with.
    pub const SCHEME: &'static str = "keel_";
    const SECRET_BYTES: usize = 32;
    /// Length of a token: the scheme plus unpadded base64 of the secret bytes.
    pub const LEN: usize = Self::SCHEME.len() + (Self::SECRET_BYTES * 4).div_ceil(3);
    /// How many leading characters are kept as the key's visible prefix.
    pub const PREFIX_LEN: usize = Self::SCHEME.len() + 8;

    /// A new token from the operating system's random source.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = [0u8; Self::SECRET_BYTES];
        getrandom::fill(&mut bytes)
            .map_err(|e| Error::invalid("API key", format!("no randomness available: {e}")))?;
        let mut token = String::with_capacity(Self::LEN);
        token.push_str(Self::SCHEME);
        URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
        Ok(Self(token.into()))
    }

    /// Checks that presented text has a token's form (without looking it up). The error
    /// never repeats the text, since it may be a secret pasted in the wrong place.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let well_formed = s.len() == Self::LEN
            && s.starts_with(Self::SCHEME)
            && s[Self::SCHEME.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if well_formed {
            Ok(Self(s.into()))
        } else {
            Err(Error::invalid(
                "API key",
                format!(
                    "expected `{}` followed by 43 URL-safe base64 characters",
                    Self::SCHEME
                ),
            ))
        }
    }

    /// The fingerprint stored for this token.
    #[must_use]
    pub fn hash(&self) -> KeyHash {
        KeyHash(sha256_hex(self.0.expose_secret().as_bytes()))
    }

    /// The visible prefix (e.g. `keel_Ab3dE9xZ`), safe to show and store for support.
    #[must_use]
    pub fn prefix(&self) -> String {
        self.0.expose_secret()[..Self::PREFIX_LEN].to_owned()
    }

    /// The secret itself, to show once to whoever created it.
    #[must_use]
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for ApiKeyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKeyToken([redacted])")
    }
}

/// Lowercase hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Lowercase hex of the SHA-256 of `bytes`: how Keel fingerprints its high-entropy
/// secrets (API keys, refresh tokens) for storage.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A label for a key, chosen by whoever creates it: up to 128 printable characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct KeyName(String);

impl KeyName {
    /// Parses a label.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.trim().is_empty() || s.chars().count() > 128 {
            return Err(Error::invalid(
                "key name",
                "must be 1 to 128 characters and not blank",
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(Error::invalid(
                "key name",
                "must not contain control characters",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The label as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An API key as stored: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// Its id.
    pub id: ApiKeyId,
    /// The workspace it acts in.
    pub workspace_id: WorkspaceId,
    /// Its label.
    pub name: Option<KeyName>,
    /// What it may do.
    pub role: Role,
    /// The visible start of the token, for support.
    pub prefix: String,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// When it stops working, if it expires.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// The routes it may reach (within its role).
    #[serde(skip)]
    pub scopes: Scopes,
    /// The models it may call; `None` for any.
    pub models: Option<Vec<String>>,
    /// When it last authenticated a request (updated at most once a minute).
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// The rate-limit tier of the key itself (its per-credential limits); `None`: the
    /// workspace's tier.
    pub tier: Option<String>,
}

/// One thing a credential may be limited to. A key with no scopes may do everything its
/// role allows; a key with scopes may only reach routes whose scope it holds (and its
/// role still applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Every read (`GET`) route.
    #[serde(rename = "read")]
    Read,
    /// The OpenAI-compatible gateway: chat completions, embeddings.
    #[serde(rename = "gateway")]
    Gateway,
    /// Creating, answering and canceling tasks; threads.
    #[serde(rename = "tasks:write")]
    TasksWrite,
    /// Creating, changing and deleting agents.
    #[serde(rename = "agents:write")]
    AgentsWrite,
    /// Managing the workspace: keys, members, webhooks, limits, budgets, audit.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 5] = [
        Scope::Read,
        Scope::Gateway,
        Scope::TasksWrite,
        Scope::AgentsWrite,
        Scope::Admin,
    ];

    /// The scope's wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Gateway => "gateway",
            Scope::TasksWrite => "tasks:write",
            Scope::AgentsWrite => "agents:write",
            Scope::Admin => "admin",
        }
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "scope",
                    format!(
                        "expected one of read, gateway, tasks:write, agents:write, admin; got {s:?}"
                    ),
                )
            })
    }
}

/// A set of scopes; [`Scopes::ALL`] is what an unscoped credential holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope (a credential not limited by scopes).
    pub const ALL: Scopes = Scopes(0b1_1111);

    /// Whether `scope` is in the set.
    #[must_use]
    pub const fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Whether this is every scope.
    #[must_use]
    pub const fn is_all(self) -> bool {
        self.0 == Self::ALL.0
    }

    /// The scopes in the set, in [`Scope::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// The set of these scopes; `Invalid` for an empty list (a key that can reach
    /// nothing is a mistake).
    pub fn from_list(scopes: &[Scope]) -> Result<Self, Error> {
        if scopes.is_empty() {
            return Err(Error::invalid(
                "scopes",
                "must name at least one scope, or be left out for all",
            ));
        }
        Ok(Scopes(scopes.iter().fold(0, |acc, s| acc | s.bit())))
    }

    /// Parses a comma- or space-separated list (`read,gateway`).
    pub fn parse(list: &str) -> Result<Self, Error> {
        let scopes = list
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Scope>, Error>>()?;
        Self::from_list(&scopes)
    }

    /// The stored form: `None` for every scope, else a comma-separated list.
    #[must_use]
    pub fn to_stored(self) -> Option<String> {
        (!self.is_all()).then(|| self.iter().map(Scope::as_str).collect::<Vec<_>>().join(","))
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(s.as_str())?;
        }
        Ok(())
    }
}

/// What a route needs: a role, and a scope a scoped credential must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The lowest role allowed.
    pub role: Role,
    /// The scope a scoped credential needs.
    pub scope: Scope,
    /// Only the operator workspace's credentials (`auth.operator_workspace`): actions on
    /// other workspaces, such as changing their limits.
    pub operator: bool,
}

impl Access {
    /// A route for `role` and `scope` in the caller's own workspace.
    #[must_use]
    pub const fn new(role: Role, scope: Scope) -> Self {
        Self {
            role,
            scope,
            operator: false,
        }
    }
}

/// Why a principal may not use a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Its role is too low.
    #[error("this route requires role {required} or higher; this credential has role {actual}")]
    Role {
        /// The route's role.
        required: Role,
        /// The principal's.
        actual: Role,
    },
    /// It lacks the route's scope.
    #[error("this route requires scope `{required}`; this key has scopes {actual}")]
    Scope {
        /// The route's scope.
        required: Scope,
        /// The principal's.
        actual: Scopes,
    },
    /// The route is for the operator workspace only.
    #[error("this route is for the operator workspace's admins only")]
    Operator,
}

/// Who a request acts as, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The workspace every read and write of the request is scoped to.
    pub workspace_id: WorkspaceId,
    /// The key that authenticated it, when a key did.
    pub key_id: Option<ApiKeyId>,
    /// The user it acts for, when a login session did.
    pub user_id: Option<UserId>,
    /// What it may do.
    pub role: Role,
    /// Which routes it may reach (within its role).
    pub scopes: Scopes,
    /// The models it may call through the gateway; `None` for any.
    pub models: Option<std::sync::Arc<[String]>>,
    /// When the credential stops working, if it expires.
    pub expires_at: Option<OffsetDateTime>,
    /// The credential's own rate-limit tier, if it has one.
    pub tier: Option<std::sync::Arc<str>>,
}

impl Principal {
    /// A principal for an API key with every scope and any model.
    #[must_use]
    pub fn for_key(workspace_id: WorkspaceId, key_id: ApiKeyId, role: Role) -> Self {
        Self {
            workspace_id,
            key_id: Some(key_id),
            user_id: None,
            role,
            scopes: Scopes::ALL,
            models: None,
            expires_at: None,
            tier: None,
        }
    }

    /// Whether the principal may use a route that needs `access`; `operator` says whether
    /// its workspace is the operator workspace.
    pub fn check(&self, access: Access, operator: bool) -> Result<(), Denied> {
        if access.operator && !operator {
            return Err(Denied::Operator);
        }
        if !self.role.satisfies(access.role) {
            return Err(Denied::Role {
                required: access.role,
                actual: self.role,
            });
        }
        if !self.scopes.contains(access.scope) {
            return Err(Denied::Scope {
                required: access.scope,
                actual: self.scopes,
            });
        }
        Ok(())
    }

    /// Whether the principal may call this public model name.
    #[must_use]
    pub fn may_use_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == model))
    }

    /// Who acted, for records: the user (`usr_…`) or else the key (`key_…`).
    #[must_use]
    pub fn actor(&self) -> String {
        match (self.user_id, self.key_id) {
            (Some(user), _) => user.to_string(),
            (None, Some(key)) => key.to_string(),
            (None, None) => "system".to_owned(),
        }
    }
}

/// A user's login name: an email address, stored lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Parses an address: `local@domain`, 3–254 characters, no spaces or control
    /// characters. Lower-cased, so logins are case-insensitive.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let ok = (3..=254).contains(&s.len())
            && !s.chars().any(|c| c.is_whitespace() || c.is_control())
            && s.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && !domain.is_empty() && !domain.contains('@')
            });
        if ok {
            Ok(Self(s.to_lowercase()))
        } else {
            Err(Error::invalid(
                "email",
                "must be an address like name@example.com (3 to 254 characters, no spaces)",
            ))
        }
    }

    /// The address.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The minimum password policy: 12 to 1,024 characters, not all the same character, and
/// not the email address. (Length beats composition rules: NIST SP 800-63B.)
pub fn check_password(password: &str, email: &Email) -> Result<(), Error> {
    let chars = password.chars().count();
    if chars < 12 {
        return Err(Error::invalid("password", "must be at least 12 characters"));
    }
    if chars > 1024 {
        return Err(Error::invalid(
            "password",
            "must be at most 1024 characters",
        ));
    }
    let mut it = password.chars();
    let first = it.next();
    if it.all(|c| Some(c) == first) {
        return Err(Error::invalid(
            "password",
            "must not be one character repeated",
        ));
    }
    if password.eq_ignore_ascii_case(email.as_str())
        || password.eq_ignore_ascii_case(email.as_str().split('@').next().unwrap_or_default())
    {
        return Err(Error::invalid("password", "must not be the email address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_hash_stably() {
        let token = ApiKeyToken::generate().unwrap();
        assert_eq!(token.expose().len(), ApiKeyToken::LEN);
        let again = ApiKeyToken::parse(token.expose()).unwrap();
        assert_eq!(token.hash(), again.hash());
        assert_eq!(token.hash().as_str().len(), 64);
        assert!(token.prefix().starts_with("keel_"));
        assert_eq!(token.prefix().len(), ApiKeyToken::PREFIX_LEN);
        assert_ne!(token.expose(), ApiKeyToken::generate().unwrap().expose());
    }

    #[test]
    fn malformed_tokens_are_rejected_without_echoing_them() {
        let good = ApiKeyToken::generate().unwrap();
        let truncated = &good.expose()[..ApiKeyToken::LEN - 1];
        for bad in [
            "",
            "keel_",
            truncated,
            &good.expose().replace("keel_", "kell_"),
        ] {
            let err = ApiKeyToken::parse(bad).unwrap_err().to_string();
            assert!(
                bad.is_empty() || bad == "keel_" || !err.contains(bad),
                "{err}"
            );
        }
        let mut with_space = good.expose().to_owned();
        with_space.replace_range(10..11, " ");
        assert!(ApiKeyToken::parse(&with_space).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = ApiKeyToken::generate().unwrap();
        assert!(!format!("{token:?}").contains(&token.expose()[5..]));
    }

    #[test]
    fn scopes_parse_store_and_gate_routes() {
        let scopes = Scopes::parse("read, gateway").unwrap();
        assert!(scopes.contains(Scope::Read) && scopes.contains(Scope::Gateway));
        assert!(!scopes.contains(Scope::Admin));
        assert_eq!(scopes.to_stored().as_deref(), Some("read,gateway"));
        assert_eq!(Scopes::parse(&scopes.to_stored().unwrap()).unwrap(), scopes);
        assert_eq!(Scopes::ALL.to_stored(), None);
        assert!(Scopes::parse("").is_err());
        assert!(
            Scopes::parse("read,root")
                .unwrap_err()
                .to_string()
                .contains("tasks:write")
        );

        let mut p = Principal::for_key(WorkspaceId::new(), ApiKeyId::new(), Role::Member);
        let gateway = Access::new(Role::Member, Scope::Gateway);
        let admin = Access::new(Role::Admin, Scope::Admin);
        assert_eq!(p.check(gateway, false), Ok(()));
        assert!(matches!(p.check(admin, false), Err(Denied::Role { .. })));
        let operator = Access {
            operator: true,
            ..gateway
        };
        assert_eq!(p.check(operator, false), Err(Denied::Operator));
        assert_eq!(p.check(operator, true), Ok(()));
        p.scopes = Scopes::parse("read").unwrap();
        let denied = p.check(gateway, false).unwrap_err();
        assert!(denied.to_string().contains("scope `gateway`"), "{denied}");
    }

    #[test]
    fn model_allowlists_and_actors() {
        let mut p = Principal::for_key(WorkspaceId::new(), ApiKeyId::new(), Role::Member);
        assert!(p.may_use_model("anything"));
        p.models = Some(vec!["small".to_owned()].into());
        assert!(p.may_use_model("small") && !p.may_use_model("large"));
        assert!(p.actor().starts_with("key_"));
        p.user_id = Some(UserId::new());
        assert!(p.actor().starts_with("usr_"));
    }

    #[test]
    fn emails_and_passwords_follow_the_policy() {
        let email = Email::parse(" Ada@Example.COM ").unwrap();
        assert_eq!(email.as_str(), "ada@example.com");
        for bad in ["", "ada", "@x", "a@", "a b@c.d", "a@b@c"] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
        assert!(check_password("correct horse battery", &email).is_ok());
        assert!(
            check_password("short", &email)
                .unwrap_err()
                .to_string()
                .contains("12")
        );
        assert!(check_password("aaaaaaaaaaaaaaaa", &email).is_err());
        assert!(check_password("ADA@example.com", &email).is_err());
    }

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Admin.satisfies(Role::Member));
        assert!(Role::Member.satisfies(Role::Member));
        assert!(!Role::Viewer.satisfies(Role::Member));
        assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .to_string()
                .contains("admin, member or viewer")
        );
    }
}
