//! Security and tenancy storage: users and memberships, login sessions with rotating
//! refresh tokens, per-workspace limits, and the hash-chained audit log.
//!
//! The audit log is append-only and chained per workspace: entry n stores the hash of
//! entry n-1 and its own hash over its fields and that link. `audit_heads` holds each
//! chain's newest seq and hash (so a deleted tail is caught) and where retention cut the
//! chain (verification starts from that anchor). [`verify_chain`] recomputes it all.

use async_trait::async_trait;
use keel_core::auth::{Email, Role};
use keel_core::id::{AuditId, SessionId, UserId, WorkspaceId};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::Result;

/// A user (never the password hash, except where a login needs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its id.
    pub id: UserId,
    /// Its login name.
    pub email: Email,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was disabled, if it was.
    pub disabled_at: Option<OffsetDateTime>,
}

/// A user's role in a workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// The user.
    pub user_id: UserId,
    /// The user's email (for listings).
    pub email: Email,
    /// What the user may do there.
    pub role: Role,
    /// When the membership was created.
    pub created_at: OffsetDateTime,
}

/// A login session: one family of rotating refresh tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Its id.
    pub id: SessionId,
    /// Who logged in.
    pub user_id: UserId,
    /// The workspace the session acts in.
    pub workspace_id: WorkspaceId,
    /// When the user logged in.
    pub created_at: OffsetDateTime,
    /// When the session ends however often it is refreshed.
    pub expires_at: OffsetDateTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// The token was live: it is spent now and the new one issued. The session, with
    /// the member's current role.
    Rotated(SessionRecord, Role),
    /// The token was already spent: someone replayed it. The whole session is revoked.
    Reused(SessionRecord),
    /// Unknown token, or its session is revoked or expired, or the user no longer
    /// belongs to the workspace.
    Invalid,
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAuditEntry {
    /// The workspace whose log it goes in.
    pub workspace_id: WorkspaceId,
    /// Who acted: `usr_…`, `key_…`, an email for a failed login, or `system`.
    pub actor: String,
    /// What was done, e.g. `auth.login`, `key.created`, `task.canceled`.
    pub action: String,
    /// What it was done to (an id), if anything.
    pub target: Option<String>,
    /// The caller's address.
    pub ip: Option<String>,
    /// The caller's user agent.
    pub user_agent: Option<String>,
    /// The request's id.
    pub request_id: Option<String>,
    /// Details, as JSON.
    pub data: serde_json::Value,
}

/// An audit entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// Its place in the workspace's chain: 1, 2, 3, …
    pub seq: i64,
    /// Its id.
    pub id: AuditId,
    /// When it was recorded.
    pub created_at: OffsetDateTime,
    /// Who acted.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: Option<String>,
    /// The caller's address.
    pub ip: Option<String>,
    /// The caller's user agent.
    pub user_agent: Option<String>,
    /// The request's id.
    pub request_id: Option<String>,
    /// Details: JSON text exactly as hashed.
    pub data: String,
    /// The previous entry's hash (empty for the first).
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
}

impl AuditEntry {
    /// The hash this entry should have: SHA-256 over the previous hash and every field,
    /// each length-prefixed so no two different entries hash the same input.
    #[must_use]
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        let at = self
            .created_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let seq = self.seq.to_string();
        let id = self.id.to_string();
        let ws = self.workspace_id.to_string();
        for field in [
            Some(self.prev_hash.as_str()),
            Some(ws.as_str()),
            Some(seq.as_str()),
            Some(id.as_str()),
            Some(at.as_str()),
            Some(self.actor.as_str()),
            Some(self.action.as_str()),
            self.target.as_deref(),
            self.ip.as_deref(),
            self.user_agent.as_deref(),
            self.request_id.as_deref(),
            Some(self.data.as_str()),
        ] {
            match field {
                Some(f) => {
                    h.update((f.len() as u64).to_be_bytes());
                    h.update(f.as_bytes());
                }
                None => h.update(u64::MAX.to_be_bytes()),
            }
        }
        keel_core::auth::hex(&h.finalize())
    }
}

/// Where a workspace's audit chain stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditHead {
    /// The newest entry's seq (0 for none).
    pub seq: i64,
    /// The newest entry's hash.
    pub hash: String,
    /// Retention removed every entry through this seq.
    pub pruned_seq: i64,
    /// The hash of the last removed entry: where verification starts.
    pub pruned_hash: String,
}

/// Which audit entries to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this action, or actions under this prefix when it ends in `.*`.
    pub action: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only entries before this time.
    pub until: Option<OffsetDateTime>,
}

/// One break in an audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The seq where the chain breaks.
    pub seq: i64,
    /// What is wrong there.
    pub problem: String,
}

/// Checks a workspace's chain: `entries` in seq order (all of them, from
/// `head.pruned_seq + 1`), against its head. Returns every break found.
#[must_use]
pub fn verify_chain(head: &AuditHead, entries: &[AuditEntry]) -> Vec<ChainBreak> {
    let mut breaks = Vec::new();
    let mut expected_seq = head.pruned_seq + 1;
    let mut prev = head.pruned_hash.clone();
    for e in entries {
        if e.seq != expected_seq {
            breaks.push(ChainBreak {
                seq: expected_seq,
                problem: if e.seq > expected_seq {
                    format!(
                        "entries {expected_seq}..{} are missing (deleted)",
                        e.seq - 1
                    )
                } else {
                    format!("entry {} is out of order", e.seq)
                },
            });
        }
        if e.prev_hash != prev {
            breaks.push(ChainBreak {
                seq: e.seq,
                problem: "its link to the previous entry does not match (an earlier entry was edited or deleted)".to_owned(),
            });
        }
        if e.compute_hash() != e.hash {
            breaks.push(ChainBreak {
                seq: e.seq,
                problem: "its contents do not match its hash (the entry was edited)".to_owned(),
            });
        }
        prev = e.hash.clone();
        expected_seq = e.seq + 1;
    }
    let last = entries.last().map_or(head.pruned_seq, |e| e.seq);
    if last != head.seq {
        breaks.push(ChainBreak {
            seq: last + 1,
            problem: format!(
                "the chain ends at {last} but its head records {} (entries were deleted)",
                head.seq
            ),
        });
    } else if head.seq > 0 && prev != head.hash {
        breaks.push(ChainBreak {
            seq: last,
            problem: "the newest entry's hash does not match the head's".to_owned(),
        });
    }
    breaks
}

/// A workspace's rate limits, as an admin set them (each `None` falls back to the tier,
/// then the config's default tier).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkspaceLimits {
    /// A tier name from `[limits.tiers]`.
    pub tier: Option<String>,
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens per minute.
    pub tpm: Option<i64>,
}

/// Storage for identities, sessions, limits and the audit log.
#[async_trait]
pub trait SecurityStore: Send + Sync {
    /// Creates a user; `Conflict` if the email is taken.
    async fn create_user(&self, email: &Email, password_hash: &str) -> Result<UserRecord>;

    /// A user and its password hash, by email.
    async fn user_credentials(&self, email: &Email) -> Result<Option<(UserRecord, String)>>;

    /// A user by id.
    async fn user(&self, id: UserId) -> Result<UserRecord>;

    /// Gives a user a role in a workspace (or changes it).
    async fn set_membership(
        &self,
        workspace: WorkspaceId,
        user: UserId,
        role: Role,
    ) -> Result<Membership>;

    /// Removes a user from a workspace; `NotFound` if not a member.
    async fn remove_membership(&self, workspace: WorkspaceId, user: UserId) -> Result<()>;

    /// The user's memberships, oldest first.
    async fn memberships(&self, user: UserId) -> Result<Vec<Membership>>;

    /// A workspace's members, oldest first.
    async fn members(&self, workspace: WorkspaceId) -> Result<Vec<Membership>>;

    /// Starts a session whose first refresh token has this hash.
    async fn create_session(&self, session: &SessionRecord, token_hash: &str) -> Result<()>;

    /// Spends the refresh token `old` and issues `new` in its session, atomically; a
    /// replay of a spent token revokes the session.
    async fn rotate_refresh(&self, old: &str, new: &str) -> Result<Refreshed>;

    /// Revokes the session the refresh token belongs to; `None` for an unknown token or a
    /// session already revoked.
    async fn revoke_session(&self, token_hash: &str, reason: &str)
    -> Result<Option<SessionRecord>>;

    /// Removes sessions that expired or were revoked before `cutoff`, with their refresh
    /// tokens (a live session keeps its spent tokens, for reuse detection). Returns how
    /// many sessions were removed.
    async fn prune_sessions(&self, cutoff: OffsetDateTime) -> Result<u64>;

    /// Appends entries to their workspaces' chains in one transaction, in the order
    /// given. Returns them as stored.
    async fn append_audit(&self, entries: &[NewAuditEntry]) -> Result<Vec<AuditEntry>>;

    /// A workspace's entries with seq after `after`, oldest first.
    async fn list_audit(
        &self,
        workspace: WorkspaceId,
        filter: &AuditFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>>;

    /// Where a workspace's chain stands.
    async fn audit_head(&self, workspace: WorkspaceId) -> Result<AuditHead>;

    /// Every workspace with an audit chain.
    async fn audit_workspaces(&self) -> Result<Vec<WorkspaceId>>;

    /// Removes entries recorded before `cutoff`, moving each chain's anchor past them.
    async fn prune_audit(&self, cutoff: OffsetDateTime) -> Result<u64>;

    /// The limits an admin set for a workspace.
    async fn workspace_limits(&self, workspace: WorkspaceId) -> Result<WorkspaceLimits>;

    /// Sets a workspace's limits.
    async fn set_workspace_limits(
        &self,
        workspace: WorkspaceId,
        limits: &WorkspaceLimits,
    ) -> Result<WorkspaceLimits>;
}

/// A membership with its user's email (`m`, `u`); a `WHERE` follows.
macro_rules! membership_select {
    () => {
        "SELECT m.workspace_id, m.user_id, u.email, m.role, m.created_at FROM memberships m JOIN users u ON u.id = m.user_id "
    };
}
pub(crate) use membership_select;

macro_rules! audit_columns {
    () => {
        "workspace_id, seq, id, created_at, actor, action, target, ip, user_agent, request_id, data, prev_hash, hash"
    };
}
pub(crate) use audit_columns;

/// Stamps [`SecurityStore`] onto a backend (see `sql_store!`); uses its `LOCK_ROWS`.
macro_rules! security_store {
    ($store:ty, $db:ty) => {
        impl $store {
            fn user_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::security::UserRecord> {
                use sqlx::Row as _;
                let email: String = row.try_get("email")?;
                Ok($crate::security::UserRecord {
                    id: keel_core::id::UserId::from_uuid(row.try_get("id")?),
                    email: keel_core::auth::Email::parse(&email).map_err(|e| $crate::Error::Corrupt { what: "user email", detail: e.to_string() })?,
                    created_at: row.try_get("created_at")?,
                    disabled_at: row.try_get("disabled_at")?,
                })
            }

            fn membership_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::security::Membership> {
                use sqlx::Row as _;
                let email: String = row.try_get("email")?;
                let role: String = row.try_get("role")?;
                Ok($crate::security::Membership {
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    user_id: keel_core::id::UserId::from_uuid(row.try_get("user_id")?),
                    email: keel_core::auth::Email::parse(&email).map_err(|e| $crate::Error::Corrupt { what: "user email", detail: e.to_string() })?,
                    role: role.parse().map_err(|e: keel_core::Error| $crate::Error::Corrupt { what: "member role", detail: e.to_string() })?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn session_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::security::SessionRecord> {
                use sqlx::Row as _;
                Ok($crate::security::SessionRecord {
                    id: keel_core::id::SessionId::from_uuid(row.try_get("id")?),
                    user_id: keel_core::id::UserId::from_uuid(row.try_get("user_id")?),
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    created_at: row.try_get("created_at")?,
                    expires_at: row.try_get("expires_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                })
            }

            fn audit_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::security::AuditEntry> {
                use sqlx::Row as _;
                Ok($crate::security::AuditEntry {
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    seq: row.try_get("seq")?,
                    id: keel_core::id::AuditId::from_uuid(row.try_get("id")?),
                    created_at: row.try_get("created_at")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                    ip: row.try_get("ip")?,
                    user_agent: row.try_get("user_agent")?,
                    request_id: row.try_get("request_id")?,
                    data: row.try_get("data")?,
                    prev_hash: row.try_get("prev_hash")?,
                    hash: row.try_get("hash")?,
                })
            }
        }

        #[async_trait::async_trait]
        impl $crate::security::SecurityStore for $store {
            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn create_user(&self, email: &keel_core::auth::Email, password_hash: &str) -> $crate::Result<$crate::security::UserRecord> {
                let user = $crate::security::UserRecord {
                    id: keel_core::id::UserId::new(),
                    email: email.clone(),
                    created_at: $crate::now(),
                    disabled_at: None,
                };
                sqlx::query("INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(user.id.as_uuid())
                    .bind(email.as_str())
                    .bind(password_hash)
                    .bind(user.created_at)
                    .execute(&self.writer)
                    .await
                    .map_err($crate::sql::conflict_as("user with this email"))?;
                Ok(user)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn user_credentials(&self, email: &keel_core::auth::Email) -> $crate::Result<Option<($crate::security::UserRecord, String)>> {
                use sqlx::Row as _;
                let row = sqlx::query("SELECT id, email, password_hash, created_at, disabled_at FROM users WHERE email = $1")
                    .bind(email.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|row| Ok((Self::user_from_row(&row)?, row.try_get("password_hash")?))).transpose()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn user(&self, id: keel_core::id::UserId) -> $crate::Result<$crate::security::UserRecord> {
                let row = sqlx::query("SELECT id, email, created_at, disabled_at FROM users WHERE id = $1")
                    .bind(id.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "user" })?;
                Self::user_from_row(&row)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn set_membership(
                &self,
                workspace: keel_core::id::WorkspaceId,
                user: keel_core::id::UserId,
                role: keel_core::auth::Role,
            ) -> $crate::Result<$crate::security::Membership> {
                sqlx::query(
                    "INSERT INTO memberships (workspace_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = excluded.role",
                )
                .bind(workspace.as_uuid())
                .bind(user.as_uuid())
                .bind(role.as_str())
                .bind($crate::now())
                .execute(&self.writer)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(db) if db.is_foreign_key_violation() => $crate::Error::NotFound { what: "user" },
                    _ => $crate::Error::from(e),
                })?;
                let row = sqlx::query(concat!($crate::security::membership_select!(), "WHERE m.workspace_id = $1 AND m.user_id = $2"))
                .bind(workspace.as_uuid())
                .bind(user.as_uuid())
                .fetch_one(&self.writer)
                .await?;
                Self::membership_from_row(&row)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn remove_membership(&self, workspace: keel_core::id::WorkspaceId, user: keel_core::id::UserId) -> $crate::Result<()> {
                let mut tx = self.writer.begin().await?;
                let done = sqlx::query("DELETE FROM memberships WHERE workspace_id = $1 AND user_id = $2")
                    .bind(workspace.as_uuid())
                    .bind(user.as_uuid())
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::Error::NotFound { what: "member" });
                }
                // Their sessions in the workspace end with the membership.
                sqlx::query(
                    "UPDATE sessions SET revoked_at = $3, revoked_reason = 'membership removed' \
                     WHERE workspace_id = $1 AND user_id = $2 AND revoked_at IS NULL",
                )
                .bind(workspace.as_uuid())
                .bind(user.as_uuid())
                .bind($crate::now())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn memberships(&self, user: keel_core::id::UserId) -> $crate::Result<Vec<$crate::security::Membership>> {
                sqlx::query(concat!($crate::security::membership_select!(), "WHERE m.user_id = $1 ORDER BY m.created_at, m.workspace_id"))
                .bind(user.as_uuid())
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(Self::membership_from_row)
                .collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn members(&self, workspace: keel_core::id::WorkspaceId) -> $crate::Result<Vec<$crate::security::Membership>> {
                sqlx::query(concat!($crate::security::membership_select!(), "WHERE m.workspace_id = $1 ORDER BY m.created_at, m.user_id"))
                .bind(workspace.as_uuid())
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(Self::membership_from_row)
                .collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn create_session(&self, session: &$crate::security::SessionRecord, token_hash: &str) -> $crate::Result<()> {
                let mut tx = self.writer.begin().await?;
                sqlx::query("INSERT INTO sessions (id, user_id, workspace_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
                    .bind(session.id.as_uuid())
                    .bind(session.user_id.as_uuid())
                    .bind(session.workspace_id.as_uuid())
                    .bind(session.created_at)
                    .bind(session.expires_at)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
                    .bind(token_hash)
                    .bind(session.id.as_uuid())
                    .bind(session.created_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn rotate_refresh(&self, old: &str, new: &str) -> $crate::Result<$crate::security::Refreshed> {
                use sqlx::Row as _;
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT r.used_at, s.id, s.user_id, s.workspace_id, s.created_at, s.expires_at, s.revoked_at, m.role \
                     FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id \
                     LEFT JOIN memberships m ON m.workspace_id = s.workspace_id AND m.user_id = s.user_id \
                     JOIN users u ON u.id = s.user_id \
                     WHERE r.token_hash = $1 AND u.disabled_at IS NULL{}",
                    Self::LOCK_ROWS_OF_R
                )))
                .bind(old)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else { return Ok($crate::security::Refreshed::Invalid) };
                let session = Self::session_from_row(&row)?;
                let used_at: Option<time::OffsetDateTime> = row.try_get("used_at")?;
                let role: Option<String> = row.try_get("role")?;
                if session.revoked_at.is_some() || session.expires_at <= now {
                    return Ok($crate::security::Refreshed::Invalid);
                }
                if used_at.is_some() {
                    sqlx::query("UPDATE sessions SET revoked_at = $2, revoked_reason = 'refresh token reused' WHERE id = $1")
                        .bind(session.id.as_uuid())
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    return Ok($crate::security::Refreshed::Reused(session));
                }
                let Some(role) = role else { return Ok($crate::security::Refreshed::Invalid) };
                let role = role.parse().map_err(|e: keel_core::Error| $crate::Error::Corrupt { what: "member role", detail: e.to_string() })?;
                sqlx::query("UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1")
                    .bind(old)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
                    .bind(new)
                    .bind(session.id.as_uuid())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok($crate::security::Refreshed::Rotated(session, role))
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn revoke_session(&self, token_hash: &str, reason: &str) -> $crate::Result<Option<$crate::security::SessionRecord>> {
                let row = sqlx::query(
                    "UPDATE sessions SET revoked_at = $2, revoked_reason = $3 \
                     WHERE id = (SELECT session_id FROM refresh_tokens WHERE token_hash = $1) AND revoked_at IS NULL \
                     RETURNING id, user_id, workspace_id, created_at, expires_at, revoked_at",
                )
                .bind(token_hash)
                .bind($crate::now())
                .bind(reason)
                .fetch_optional(&self.writer)
                .await?;
                row.map(|r| Self::session_from_row(&r)).transpose()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn prune_sessions(&self, cutoff: time::OffsetDateTime) -> $crate::Result<u64> {
                let mut tx = self.writer.begin().await?;
                let dead = "SELECT id FROM sessions WHERE expires_at < $1 OR revoked_at < $1";
                sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM refresh_tokens WHERE session_id IN ({dead})")))
                    .bind(cutoff)
                    .execute(&mut *tx)
                    .await?;
                let removed = sqlx::query("DELETE FROM sessions WHERE expires_at < $1 OR revoked_at < $1")
                    .bind(cutoff)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(removed)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND, entries = entries.len()))]
            async fn append_audit(&self, entries: &[$crate::security::NewAuditEntry]) -> $crate::Result<Vec<$crate::security::AuditEntry>> {
                use sqlx::Row as _;
                if entries.is_empty() {
                    return Ok(Vec::new());
                }
                let mut workspaces: Vec<keel_core::id::WorkspaceId> = entries.iter().map(|e| e.workspace_id).collect();
                workspaces.sort_unstable();
                workspaces.dedup();
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                // Heads are locked in workspace order, so concurrent appends cannot deadlock.
                let mut heads = std::collections::HashMap::with_capacity(workspaces.len());
                for ws in &workspaces {
                    sqlx::query("INSERT INTO audit_heads (workspace_id, seq, hash) VALUES ($1, 0, '') ON CONFLICT (workspace_id) DO NOTHING")
                        .bind(ws.as_uuid())
                        .execute(&mut *tx)
                        .await?;
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT seq, hash FROM audit_heads WHERE workspace_id = $1{}",
                        Self::LOCK_ROWS
                    )))
                    .bind(ws.as_uuid())
                    .fetch_one(&mut *tx)
                    .await?;
                    let seq: i64 = row.try_get("seq")?;
                    let hash: String = row.try_get("hash")?;
                    heads.insert(*ws, (seq, hash));
                }
                let mut stored = Vec::with_capacity(entries.len());
                for e in entries {
                    let Some((seq, prev)) = heads.get_mut(&e.workspace_id) else { continue };
                    let mut entry = $crate::security::AuditEntry {
                        workspace_id: e.workspace_id,
                        seq: *seq + 1,
                        id: keel_core::id::AuditId::new(),
                        created_at: now,
                        actor: e.actor.clone(),
                        action: e.action.clone(),
                        target: e.target.clone(),
                        ip: e.ip.clone(),
                        user_agent: e.user_agent.clone(),
                        request_id: e.request_id.clone(),
                        data: e.data.to_string(),
                        prev_hash: prev.clone(),
                        hash: String::new(),
                    };
                    entry.hash = entry.compute_hash();
                    sqlx::query(concat!("INSERT INTO audit_log (", $crate::security::audit_columns!(), ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"))
                        .bind(entry.workspace_id.as_uuid())
                        .bind(entry.seq)
                        .bind(entry.id.as_uuid())
                        .bind(entry.created_at)
                        .bind(&entry.actor)
                        .bind(&entry.action)
                        .bind(&entry.target)
                        .bind(&entry.ip)
                        .bind(&entry.user_agent)
                        .bind(&entry.request_id)
                        .bind(&entry.data)
                        .bind(&entry.prev_hash)
                        .bind(&entry.hash)
                        .execute(&mut *tx)
                        .await?;
                    *seq = entry.seq;
                    prev.clone_from(&entry.hash);
                    stored.push(entry);
                }
                for (ws, (seq, hash)) in &heads {
                    sqlx::query("UPDATE audit_heads SET seq = $2, hash = $3 WHERE workspace_id = $1")
                        .bind(ws.as_uuid())
                        .bind(seq)
                        .bind(hash)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(stored)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn list_audit(
                &self,
                workspace: keel_core::id::WorkspaceId,
                filter: &$crate::security::AuditFilter,
                after: i64,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::security::AuditEntry>> {
                let mut q = sqlx::QueryBuilder::<$db>::new(concat!("SELECT ", $crate::security::audit_columns!(), " FROM audit_log WHERE workspace_id = "));
                q.push_bind(workspace.as_uuid());
                q.push(" AND seq > ").push_bind(after);
                if let Some(action) = &filter.action {
                    match action.strip_suffix('*') {
                        Some(prefix) => {
                            q.push(" AND substr(action, 1, ").push_bind(i32::try_from(prefix.len()).unwrap_or(0)).push(") = ").push_bind(prefix.to_owned());
                        }
                        None => {
                            q.push(" AND action = ").push_bind(action.clone());
                        }
                    }
                }
                if let Some(actor) = &filter.actor {
                    q.push(" AND actor = ").push_bind(actor.clone());
                }
                if let Some(target) = &filter.target {
                    q.push(" AND target = ").push_bind(target.clone());
                }
                if let Some(since) = filter.since {
                    q.push(" AND created_at >= ").push_bind(since);
                }
                if let Some(until) = filter.until {
                    q.push(" AND created_at < ").push_bind(until);
                }
                q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit));
                q.build()
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(Self::audit_from_row)
                    .collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn audit_head(&self, workspace: keel_core::id::WorkspaceId) -> $crate::Result<$crate::security::AuditHead> {
                use sqlx::Row as _;
                let row = sqlx::query("SELECT seq, hash, pruned_seq, pruned_hash FROM audit_heads WHERE workspace_id = $1")
                    .bind(workspace.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok($crate::security::AuditHead::default()) };
                Ok($crate::security::AuditHead {
                    seq: row.try_get("seq")?,
                    hash: row.try_get("hash")?,
                    pruned_seq: row.try_get("pruned_seq")?,
                    pruned_hash: row.try_get("pruned_hash")?,
                })
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn audit_workspaces(&self) -> $crate::Result<Vec<keel_core::id::WorkspaceId>> {
                let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT workspace_id FROM audit_heads ORDER BY workspace_id")
                    .fetch_all(&self.pool)
                    .await?;
                Ok(ids.into_iter().map(keel_core::id::WorkspaceId::from_uuid).collect())
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn prune_audit(&self, cutoff: time::OffsetDateTime) -> $crate::Result<u64> {
                use sqlx::Row as _;
                let mut tx = self.writer.begin().await?;
                // Per chain, the newest entry to remove becomes the anchor verification
                // starts from. Chains are taken in workspace order (the append's lock order).
                let rows = sqlx::query(
                    "SELECT a.workspace_id, a.seq, a.hash FROM audit_log a \
                     WHERE a.seq = (SELECT MAX(b.seq) FROM audit_log b WHERE b.workspace_id = a.workspace_id AND b.created_at < $1) \
                     ORDER BY a.workspace_id",
                )
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await?;
                let mut removed = 0;
                for row in rows {
                    let ws: uuid::Uuid = row.try_get("workspace_id")?;
                    let seq: i64 = row.try_get("seq")?;
                    let hash: String = row.try_get("hash")?;
                    sqlx::query("UPDATE audit_heads SET pruned_seq = $2, pruned_hash = $3 WHERE workspace_id = $1 AND pruned_seq < $2")
                        .bind(ws)
                        .bind(seq)
                        .bind(&hash)
                        .execute(&mut *tx)
                        .await?;
                    removed += sqlx::query("DELETE FROM audit_log WHERE workspace_id = $1 AND seq <= $2")
                        .bind(ws)
                        .bind(seq)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                Ok(removed)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn workspace_limits(&self, workspace: keel_core::id::WorkspaceId) -> $crate::Result<$crate::security::WorkspaceLimits> {
                use sqlx::Row as _;
                let row = sqlx::query("SELECT tier, rpm, tpm FROM workspace_limits WHERE workspace_id = $1")
                    .bind(workspace.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok($crate::security::WorkspaceLimits::default()) };
                Ok($crate::security::WorkspaceLimits {
                    tier: row.try_get("tier")?,
                    rpm: row.try_get("rpm")?,
                    tpm: row.try_get("tpm")?,
                })
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn set_workspace_limits(
                &self,
                workspace: keel_core::id::WorkspaceId,
                limits: &$crate::security::WorkspaceLimits,
            ) -> $crate::Result<$crate::security::WorkspaceLimits> {
                sqlx::query(
                    "INSERT INTO workspace_limits (workspace_id, tier, rpm, tpm, updated_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (workspace_id) DO UPDATE SET tier = excluded.tier, rpm = excluded.rpm, tpm = excluded.tpm, updated_at = excluded.updated_at",
                )
                .bind(workspace.as_uuid())
                .bind(&limits.tier)
                .bind(limits.rpm)
                .bind(limits.tpm)
                .bind($crate::now())
                .execute(&self.writer)
                .await?;
                Ok(limits.clone())
            }
        }
    };
}
pub(crate) use security_store;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, prev: &str) -> AuditEntry {
        let mut e = AuditEntry {
            workspace_id: WorkspaceId::new(),
            seq,
            id: AuditId::new(),
            created_at: crate::now(),
            actor: "key_x".into(),
            action: "key.created".into(),
            target: None,
            ip: Some("127.0.0.1".into()),
            user_agent: None,
            request_id: None,
            data: "{}".into(),
            prev_hash: prev.into(),
            hash: String::new(),
        };
        e.hash = e.compute_hash();
        e
    }

    fn chain(n: i64) -> (AuditHead, Vec<AuditEntry>) {
        let mut out: Vec<AuditEntry> = Vec::new();
        for seq in 1..=n {
            let prev = out.last().map(|e| e.hash.clone()).unwrap_or_default();
            out.push(entry(seq, &prev));
        }
        let head = AuditHead {
            seq: n,
            hash: out.last().map(|e| e.hash.clone()).unwrap_or_default(),
            ..AuditHead::default()
        };
        (head, out)
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (head, entries) = chain(5);
        assert_eq!(verify_chain(&head, &entries), vec![]);
        assert_eq!(verify_chain(&AuditHead::default(), &[]), vec![]);
    }

    #[test]
    fn edits_deletions_and_a_cut_tail_are_found() {
        let (head, mut entries) = chain(5);
        entries[2].actor = "someone else".into();
        let breaks = verify_chain(&head, &entries);
        assert_eq!(breaks.len(), 1, "{breaks:?}");
        assert_eq!(breaks[0].seq, 3);

        let (head, mut entries) = chain(5);
        entries.remove(1);
        let breaks = verify_chain(&head, &entries);
        assert!(
            breaks
                .iter()
                .any(|b| b.seq == 2 && b.problem.contains("missing")),
            "{breaks:?}"
        );

        let (head, mut entries) = chain(5);
        entries.pop();
        let breaks = verify_chain(&head, &entries);
        assert!(
            breaks.iter().any(|b| b.problem.contains("head records 5")),
            "{breaks:?}"
        );
    }

    #[test]
    fn fields_are_length_prefixed_so_moving_text_between_them_changes_the_hash() {
        let (_, entries) = chain(1);
        let mut a = entries[0].clone();
        let mut b = a.clone();
        a.actor = "ab".into();
        a.action = "c".into();
        b.actor = "a".into();
        b.action = "bc".into();
        assert_ne!(a.compute_hash(), b.compute_hash());
        a.target = Some(String::new());
        b.target = None;
        assert_ne!(a.compute_hash(), b.compute_hash());
    }
}
