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
use crate::id::{ApiKeyId, WorkspaceId};

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
        let digest = Sha256::digest(self.0.expose_secret().as_bytes());
        let mut hex = String::with_capacity(64);
        for b in digest {
            use fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
        }
        KeyHash(hex)
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
}

/// Who a request acts as, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The workspace every read and write of the request is scoped to.
    pub workspace_id: WorkspaceId,
    /// The key that authenticated it.
    pub key_id: ApiKeyId,
    /// What it may do.
    pub role: Role,
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
