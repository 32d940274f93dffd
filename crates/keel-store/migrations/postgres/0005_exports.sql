-- Event exporters (e.g. NATS JetStream): a lease so one instance exports at a time, and a
-- cursor per workspace that only moves once the target has acknowledged.
CREATE TABLE exporters (
    name         TEXT PRIMARY KEY,
    lease_owner  UUID NOT NULL,
    lease_until  TIMESTAMPTZ NOT NULL
);

CREATE TABLE export_cursors (
    name          TEXT NOT NULL,
    workspace_id  UUID NOT NULL REFERENCES workspaces (id),
    seq           BIGINT NOT NULL,
    PRIMARY KEY (name, workspace_id)
);
