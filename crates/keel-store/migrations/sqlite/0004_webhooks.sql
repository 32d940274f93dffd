-- Webhook subscriptions and their delivery log. A subscription delivers its workspace's
-- events in seq order from `cursor_seq`; one instance at a time holds its lease.
CREATE TABLE webhooks (
    id            BLOB PRIMARY KEY NOT NULL,
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    url           TEXT NOT NULL,
    types         TEXT NOT NULL,
    secret        TEXT NOT NULL,
    description   TEXT,
    created_at    TEXT NOT NULL,
    cursor_seq    INTEGER NOT NULL,
    lease_owner   BLOB,
    lease_until   TEXT
) STRICT;

CREATE INDEX webhooks_workspace ON webhooks (workspace_id, id);

CREATE TABLE webhook_deliveries (
    id            BLOB PRIMARY KEY NOT NULL,
    webhook_id    BLOB NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    event_seq     INTEGER NOT NULL,
    event_id      BLOB NOT NULL,
    event_type    TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    outcome       TEXT NOT NULL CHECK (outcome IN ('delivered', 'failed', 'dead_lettered')),
    status_code   INTEGER,
    error         TEXT,
    duration_ms   INTEGER NOT NULL,
    created_at    TEXT NOT NULL
) STRICT;

CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
