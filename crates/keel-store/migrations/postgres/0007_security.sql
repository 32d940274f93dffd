-- Security and tenancy: users and their workspace memberships, login sessions with
-- rotating refresh tokens, API-key scopes and expiry, per-workspace limits, and the
-- hash-chained audit log.

CREATE TABLE users (
    id             UUID PRIMARY KEY,
    email          TEXT NOT NULL UNIQUE,
    password_hash  TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    disabled_at    TIMESTAMPTZ
);

CREATE TABLE memberships (
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    user_id       UUID NOT NULL REFERENCES users (id),
    role          TEXT NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
);

CREATE INDEX memberships_user ON memberships (user_id);

-- A session is one family of refresh tokens: each refresh spends one token and issues
-- the next; presenting a spent token again revokes the whole family.
CREATE TABLE sessions (
    id              UUID PRIMARY KEY,
    user_id         UUID NOT NULL REFERENCES users (id),
    workspace_id    UUID NOT NULL REFERENCES workspaces (id),
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    revoked_at      TIMESTAMPTZ,
    revoked_reason  TEXT
);

CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY,
    session_id  UUID NOT NULL REFERENCES sessions (id),
    created_at  TIMESTAMPTZ NOT NULL,
    used_at     TIMESTAMPTZ
);

CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

ALTER TABLE api_keys ADD COLUMN expires_at TIMESTAMPTZ;
ALTER TABLE api_keys ADD COLUMN scopes TEXT;
ALTER TABLE api_keys ADD COLUMN models TEXT;
ALTER TABLE api_keys ADD COLUMN last_used_at TIMESTAMPTZ;
ALTER TABLE api_keys ADD COLUMN tier TEXT;

CREATE TABLE workspace_limits (
    workspace_id  UUID PRIMARY KEY REFERENCES workspaces (id),
    tier          TEXT,
    rpm           BIGINT,
    tpm           BIGINT,
    updated_at    TIMESTAMPTZ NOT NULL
);

-- Append-only: each entry's hash covers its fields and the previous entry's hash, so an
-- edited or deleted row breaks the chain. audit_heads holds each chain's newest entry
-- (a deleted tail is caught) and where retention cut it (verification starts there).
CREATE TABLE audit_log (
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    seq           BIGINT NOT NULL,
    id            UUID NOT NULL UNIQUE,
    created_at    TIMESTAMPTZ NOT NULL,
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
);

CREATE INDEX audit_log_created ON audit_log (created_at);

CREATE TABLE audit_heads (
    workspace_id  UUID PRIMARY KEY REFERENCES workspaces (id),
    seq           BIGINT NOT NULL,
    hash          TEXT NOT NULL,
    pruned_seq    BIGINT NOT NULL DEFAULT 0,
    pruned_hash   TEXT NOT NULL DEFAULT ''
);

-- Per-agent concurrency: runs of the agent's tasks at once, across every instance (from
-- the agent spec's max_concurrency; NULL for no limit).
ALTER TABLE agents ADD COLUMN max_concurrency BIGINT;
