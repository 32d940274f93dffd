-- The event log: append-only, numbered per workspace by a gap-free `seq`. `event_heads`
-- holds each workspace's last seq (its row lock serialises appends, so seq order is commit
-- order) and how far retention has pruned.
CREATE TABLE event_heads (
    workspace_id    BLOB PRIMARY KEY NOT NULL REFERENCES workspaces (id),
    last_seq        INTEGER NOT NULL,
    pruned_through  INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE events (
    workspace_id    BLOB NOT NULL REFERENCES workspaces (id),
    seq             INTEGER NOT NULL,
    event_id        BLOB NOT NULL UNIQUE,
    event_type      TEXT NOT NULL,
    version         TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    correlation_id  TEXT,
    agent_id        BLOB,
    task_id         BLOB,
    run_id          BLOB,
    data            TEXT NOT NULL,
    PRIMARY KEY (workspace_id, seq)
) STRICT;

CREATE INDEX events_created ON events (created_at);
