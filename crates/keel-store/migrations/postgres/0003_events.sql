-- The event log: append-only, numbered per workspace by a gap-free `seq`. `event_heads`
-- holds each workspace's last seq (its row lock serialises appends, so seq order is commit
-- order) and how far retention has pruned.
CREATE TABLE event_heads (
    workspace_id    UUID PRIMARY KEY REFERENCES workspaces (id),
    last_seq        BIGINT NOT NULL,
    pruned_through  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE events (
    workspace_id    UUID NOT NULL REFERENCES workspaces (id),
    seq             BIGINT NOT NULL,
    event_id        UUID NOT NULL UNIQUE,
    event_type      TEXT NOT NULL,
    version         TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    correlation_id  TEXT,
    agent_id        UUID,
    task_id         UUID,
    run_id          UUID,
    data            TEXT NOT NULL,
    PRIMARY KEY (workspace_id, seq)
);

CREATE INDEX events_created ON events (created_at);
