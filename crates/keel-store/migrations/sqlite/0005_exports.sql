-- Event exporters (e.g. NATS JetStream): a lease so one instance exports at a time, and a
-- cursor per workspace that only moves once the target has acknowledged.
CREATE TABLE exporters (
    name         TEXT PRIMARY KEY NOT NULL,
    lease_owner  BLOB NOT NULL,
    lease_until  TEXT NOT NULL
) STRICT;

CREATE TABLE export_cursors (
    name          TEXT NOT NULL,
    workspace_id  BLOB NOT NULL REFERENCES workspaces (id),
    seq           INTEGER NOT NULL,
    PRIMARY KEY (name, workspace_id)
) STRICT;
