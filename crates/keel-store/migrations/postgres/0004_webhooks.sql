-- Webhook subscriptions and their delivery log. A subscription delivers its workspace's
-- events in seq order from `cursor_seq`; one instance at a time holds its lease.
CREATE TABLE webhooks (
    id            UUID PRIMARY KEY,
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    url           TEXT NOT NULL,
    types         TEXT NOT NULL,
    secret        TEXT NOT NULL,
    description   TEXT,
    created_at    TIMESTAMPTZ NOT NULL,
    cursor_seq    BIGINT NOT NULL,
    lease_owner   UUID,
    lease_until   TIMESTAMPTZ
);

CREATE INDEX webhooks_workspace ON webhooks (workspace_id, id);

CREATE TABLE webhook_deliveries (
    id            UUID PRIMARY KEY,
    webhook_id    UUID NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    event_seq     BIGINT NOT NULL,
    event_id      UUID NOT NULL,
    event_type    TEXT NOT NULL,
    attempt       BIGINT NOT NULL,
    outcome       TEXT NOT NULL CHECK (outcome IN ('delivered', 'failed', 'dead_lettered')),
    status_code   BIGINT,
    error         TEXT,
    duration_ms   BIGINT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);

CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
