-- Gateway accounting: one row per LLM request. Cost is in nano-USD (1e-9) so sums are
-- exact integers.
CREATE TABLE usage_records (
    id               UUID PRIMARY KEY,
    workspace_id     UUID NOT NULL REFERENCES workspaces (id),
    api_key_id       UUID,
    route            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    upstream_model   TEXT NOT NULL,
    target           TEXT NOT NULL,
    input_tokens     BIGINT NOT NULL,
    output_tokens    BIGINT NOT NULL,
    cached_tokens    BIGINT NOT NULL,
    cost_nanousd     BIGINT NOT NULL,
    latency_ms       BIGINT NOT NULL,
    ttft_ms          BIGINT,
    cache_hit        BOOLEAN NOT NULL,
    estimated        BOOLEAN NOT NULL,
    outcome          TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL
);

CREATE INDEX usage_records_workspace_time ON usage_records (workspace_id, created_at);
