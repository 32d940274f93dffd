-- The agent runtime: versioned agent specs, threads and their messages, tasks (which are
-- also the durable queue's entries), runs (attempts) and their checkpointed steps.

CREATE TABLE agents (
    id            UUID PRIMARY KEY,
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    name          TEXT NOT NULL,
    version       BIGINT NOT NULL,
    spec          TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    deleted_at    TIMESTAMPTZ
);

CREATE UNIQUE INDEX agents_name ON agents (workspace_id, name);

CREATE TABLE agent_versions (
    agent_id    UUID NOT NULL REFERENCES agents (id),
    version     BIGINT NOT NULL,
    spec        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (agent_id, version)
);

CREATE TABLE threads (
    id            UUID PRIMARY KEY,
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    metadata      TEXT NOT NULL,
    next_seq      BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL
);

CREATE INDEX threads_workspace ON threads (workspace_id, id);

-- Start-time fair queuing: each workspace's lane hands its tasks increasing virtual
-- times, never behind the clock (the virtual time of the last task started), so a busy
-- workspace's backlog cannot starve a quiet one.
CREATE TABLE queue_lanes (
    workspace_id  UUID PRIMARY KEY REFERENCES workspaces (id),
    last_vt       BIGINT NOT NULL
);

CREATE TABLE queue_clock (
    id  SMALLINT PRIMARY KEY CHECK (id = 1),
    vt  BIGINT NOT NULL
);

INSERT INTO queue_clock (id, vt) VALUES (1, 0);

CREATE TABLE tasks (
    id               UUID PRIMARY KEY,
    workspace_id     UUID NOT NULL REFERENCES workspaces (id),
    agent_id         UUID NOT NULL REFERENCES agents (id),
    agent_name       TEXT NOT NULL,
    agent_version    BIGINT NOT NULL,
    thread_id        UUID NOT NULL REFERENCES threads (id),
    parent_task_id   UUID,
    depth            BIGINT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('submitted', 'working', 'input-required', 'completed', 'canceled', 'failed', 'rejected')),
    priority         BIGINT NOT NULL,
    input            TEXT NOT NULL,
    metadata         TEXT NOT NULL,
    idempotency_key  TEXT,
    output           TEXT,
    error            TEXT,
    attempts         BIGINT NOT NULL,
    max_attempts     BIGINT NOT NULL,
    run_id           UUID,
    steps            BIGINT NOT NULL,
    tool_calls       BIGINT NOT NULL,
    input_tokens     BIGINT NOT NULL,
    output_tokens    BIGINT NOT NULL,
    cost_nanousd     BIGINT NOT NULL,
    queued           BOOLEAN NOT NULL,
    vt               BIGINT NOT NULL,
    run_at           TIMESTAMPTZ NOT NULL,
    lease_owner      UUID,
    lease_until      TIMESTAMPTZ,
    dead_lettered    BOOLEAN NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ
);

CREATE UNIQUE INDEX tasks_idempotency ON tasks (workspace_id, idempotency_key);
CREATE INDEX tasks_workspace ON tasks (workspace_id, id);
CREATE INDEX tasks_thread ON tasks (thread_id, id);
CREATE INDEX tasks_status ON tasks (workspace_id, status, id);
CREATE INDEX tasks_queue ON tasks (priority DESC, vt, id) WHERE queued;
CREATE INDEX tasks_dead ON tasks (workspace_id, id) WHERE dead_lettered;

CREATE TABLE runs (
    id            UUID PRIMARY KEY,
    task_id       UUID NOT NULL REFERENCES tasks (id),
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    attempt       BIGINT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('working', 'completed', 'failed', 'canceled', 'input-required')),
    error         TEXT,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ
);

CREATE INDEX runs_task ON runs (task_id, attempt);

-- One row per checkpointed step; a step stores only itself (never the history).
CREATE TABLE steps (
    task_id       UUID NOT NULL REFERENCES tasks (id),
    idx           BIGINT NOT NULL,
    run_id        UUID NOT NULL REFERENCES runs (id),
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    kind          TEXT NOT NULL,
    data          TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (task_id, idx)
);

CREATE TABLE messages (
    thread_id     UUID NOT NULL REFERENCES threads (id),
    seq           BIGINT NOT NULL,
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    task_id       UUID NOT NULL REFERENCES tasks (id),
    run_id        UUID NOT NULL REFERENCES runs (id),
    body          TEXT NOT NULL,
    tokens        BIGINT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (thread_id, seq)
);

CREATE INDEX messages_run ON messages (run_id, seq);
