-- The latest error is found by when it was recorded (`errored_at`), not by the task's
-- last change: `updated_at` moves on every checkpoint, and indexing it made each step's
-- progress update rewrite an index entry (on Postgres, it kept the update from being
-- heap-only). The same schema on both backends.
ALTER TABLE tasks ADD COLUMN errored_at TEXT;
UPDATE tasks SET errored_at = updated_at WHERE error IS NOT NULL;
DROP INDEX tasks_agent_errors;
CREATE INDEX tasks_agent_errors ON tasks (agent_id, errored_at) WHERE error IS NOT NULL;
