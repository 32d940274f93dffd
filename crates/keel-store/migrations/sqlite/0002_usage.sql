-- Gateway accounting: one row per LLM request. Cost is in nano-USD (1e-9) so sums are
-- exact integers.
CREATE TABLE usage_records (
    id               BLOB PRIMARY KEY NOT NULL,
    workspace_id     BLOB NOT NULL REFERENCES workspaces (id),
    api_key_id       BLOB,
    route            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    upstream_model   TEXT NOT NULL,
    target           TEXT NOT NULL,
    input_tokens     INTEGER NOT NULL,
    output_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    cost_nanousd     INTEGER NOT NULL,
    latency_ms       INTEGER NOT NULL,
    ttft_ms          INTEGER,
    cache_hit        INTEGER NOT NULL,
    estimated        INTEGER NOT NULL,
    outcome          TEXT NOT NULL,
    created_at       TEXT NOT NULL
) STRICT;

CREATE INDEX usage_records_workspace_time ON usage_records (workspace_id, created_at);
