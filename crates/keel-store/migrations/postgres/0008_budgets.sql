-- Budgets: spend limits per workspace (key_id = the nil uuid) or per API key, daily or
-- monthly, in nano-USD. Requests reserve their maximum cost before they go upstream and
-- settle to the real cost after; a reservation that would pass the limit is refused, so
-- spend + reserved never exceeds it, whatever the number of instances.
CREATE TABLE budgets (
    workspace_id      UUID NOT NULL REFERENCES workspaces (id),
    key_id            UUID NOT NULL,
    period            TEXT NOT NULL CHECK (period IN ('daily', 'monthly')),
    limit_nanousd     BIGINT NOT NULL,
    thresholds        TEXT NOT NULL,
    period_start      TIMESTAMPTZ NOT NULL,
    spent_nanousd     BIGINT NOT NULL DEFAULT 0,
    reserved_nanousd  BIGINT NOT NULL DEFAULT 0,
    alerted_percent   BIGINT NOT NULL DEFAULT 0,
    updated_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, key_id, period)
);
