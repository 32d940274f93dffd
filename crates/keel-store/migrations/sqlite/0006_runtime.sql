-- The agent runtime: versioned agent specs, threads and their messages, tasks (which are
-- also the durable queue's entries), runs (attempts) and their checkpointed steps.

CREATE TABLE agents (
    id            BLOB PRIMARY KEY NOT NULL,
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    name          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    spec          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    deleted_at    TEXT
) STRICT;

CREATE UNIQUE INDEX agents_name ON agents (workspace_id, name);

CREATE TABLE agent_versions (
    agent_id    BLOB NOT NULL REFERENCES agents (id),
    version     INTEGER NOT NULL,
    spec        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (agent_id, version)
) STRICT;

CREATE TABLE threads (
    id            BLOB PRIMARY KEY NOT NULL,
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    metadata      TEXT NOT NULL,
    next_seq      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
) STRICT;

CREATE INDEX threads_workspace ON threads (workspace_id, id);

-- Start-time fair queuing: each workspace's lane hands its tasks increasing virtual
-- times, never behind the clock (the virtual time of the last task started), so a busy
-- workspace's backlog cannot starve a quiet one.
CREATE TABLE queue_lanes (
    workspace_id  BLOB PRIMARY KEY NOT NULL REFERENCES workspaces (id),
    last_vt       INTEGER NOT NULL
) STRICT;

CREATE TABLE queue_clock (
    id  INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    vt  INTEGER NOT NULL
) STRICT;

INSERT INTO queue_clock (id, vt) VALUES (1, 0);

CREATE TABLE tasks (
    id               BLOB PRIMARY KEY NOT NULL,
    workspace_id     BLOB NOT NULL REFERENCES workspaces (id),
    agent_id         BLOB NOT NULL REFERENCES agents (id),
    agent_name       TEXT NOT NULL,
    agent_version    INTEGER NOT NULL,
    thread_id        BLOB NOT NULL REFERENCES threads (id),
    parent_task_id   BLOB,
    depth            INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('submitted', 'working', 'input-required', 'completed', 'canceled', 'failed', 'rejected')),
    priority         INTEGER NOT NULL,
    input            TEXT NOT NULL,
    metadata         TEXT NOT NULL,
    idempotency_key  TEXT,
    output           TEXT,
    error            TEXT,
    attempts         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    run_id           BLOB,
    steps            INTEGER NOT NULL,
    tool_calls       INTEGER NOT NULL,
    input_tokens     INTEGER NOT NULL,
    output_tokens    INTEGER NOT NULL,
    cost_nanousd     INTEGER NOT NULL,
    queued           INTEGER NOT NULL,
    vt               INTEGER NOT NULL,
    run_at           TEXT NOT NULL,
    lease_owner      BLOB,
    lease_until      TEXT,
    dead_lettered    INTEGER NOT NULL,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    updated_at       TEXT NOT NULL,
    finished_at      TEXT
) STRICT;

CREATE UNIQUE INDEX tasks_idempotency ON tasks (workspace_id, idempotency_key);
CREATE INDEX tasks_workspace ON tasks (workspace_id, id);
CREATE INDEX tasks_thread ON tasks (thread_id, id);
CREATE INDEX tasks_status ON tasks (workspace_id, status, id);
CREATE INDEX tasks_queue ON tasks (priority DESC, vt, id) WHERE queued;
CREATE INDEX tasks_dead ON tasks (workspace_id, id) WHERE dead_lettered;

CREATE TABLE runs (
    id            BLOB PRIMARY KEY NOT NULL,
    task_id       BLOB NOT NULL REFERENCES tasks (id),
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    attempt       INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('working', 'completed', 'failed', 'canceled', 'input-required')),
    error         TEXT,
    started_at    TEXT NOT NULL,
    finished_at   TEXT
) STRICT;

CREATE INDEX runs_task ON runs (task_id, attempt);

-- One row per checkpointed step; a step stores only itself (never the history).
CREATE TABLE steps (
    task_id       BLOB NOT NULL REFERENCES tasks (id),
    idx           INTEGER NOT NULL,
    run_id        BLOB NOT NULL REFERENCES runs (id),
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    kind          TEXT NOT NULL,
    data          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (task_id, idx)
) STRICT;

CREATE TABLE messages (
    thread_id     BLOB NOT NULL REFERENCES threads (id),
    seq           INTEGER NOT NULL,
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    task_id       BLOB NOT NULL REFERENCES tasks (id),
    run_id        BLOB NOT NULL REFERENCES runs (id),
    body          TEXT NOT NULL,
    tokens        INTEGER NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (thread_id, seq)
) STRICT;

CREATE INDEX messages_run ON messages (run_id, seq);
