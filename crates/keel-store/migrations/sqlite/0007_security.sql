-- Security and tenancy: users and their workspace memberships, login sessions with
-- rotating refresh tokens, API-key scopes and expiry, per-workspace limits, and the
-- hash-chained audit log.

CREATE TABLE users (
    id             BLOB PRIMARY KEY NOT NULL,
    email          TEXT NOT NULL UNIQUE,
    password_hash  TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    disabled_at    TEXT
) STRICT;

CREATE TABLE memberships (
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    user_id       BLOB NOT NULL REFERENCES users (id),
    role          TEXT NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    created_at    TEXT NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
) STRICT;

CREATE INDEX memberships_user ON memberships (user_id);

-- A session is one family of refresh tokens: each refresh spends one token and issues
-- the next; presenting a spent token again revokes the whole family.
CREATE TABLE sessions (
    id              BLOB PRIMARY KEY NOT NULL,
    user_id         BLOB NOT NULL REFERENCES users (id),
    workspace_id    BLOB NOT NULL REFERENCES workspaces (id),
    created_at      TEXT NOT NULL,
    expires_at      TEXT NOT NULL,
    revoked_at      TEXT,
    revoked_reason  TEXT
) STRICT;

CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY NOT NULL,
    session_id  BLOB NOT NULL REFERENCES sessions (id),
    created_at  TEXT NOT NULL,
    used_at     TEXT
) STRICT;

CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

ALTER TABLE api_keys ADD COLUMN expires_at TEXT;
ALTER TABLE api_keys ADD COLUMN scopes TEXT;
ALTER TABLE api_keys ADD COLUMN models TEXT;
ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE api_keys ADD COLUMN tier TEXT;

CREATE TABLE workspace_limits (
    workspace_id  BLOB PRIMARY KEY NOT NULL REFERENCES workspaces (id),
    tier          TEXT,
    rpm           INTEGER,
    tpm           INTEGER,
    updated_at    TEXT NOT NULL
) STRICT;

-- Append-only: each entry's hash covers its fields and the previous entry's hash, so an
-- edited or deleted row breaks the chain. audit_heads holds each chain's newest entry
-- (a deleted tail is caught) and where retention cut it (verification starts there).
CREATE TABLE audit_log (
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    seq           INTEGER NOT NULL,
    id            BLOB NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT,
    ip            TEXT,
    user_agent    TEXT,
    request_id    TEXT,
    data          TEXT NOT NULL,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL,
    PRIMARY KEY (workspace_id, seq)
) STRICT;

CREATE INDEX audit_log_created ON audit_log (created_at);

CREATE TABLE audit_heads (
    workspace_id  BLOB PRIMARY KEY NOT NULL REFERENCES workspaces (id),
    seq           INTEGER NOT NULL,
    hash          TEXT NOT NULL,
    pruned_seq    INTEGER NOT NULL DEFAULT 0,
    pruned_hash   TEXT NOT NULL DEFAULT ''
) STRICT;

-- Per-agent concurrency: runs of the agent's tasks at once, across every instance (from
-- the agent spec's max_concurrency; NULL for no limit).
ALTER TABLE agents ADD COLUMN max_concurrency INTEGER;
