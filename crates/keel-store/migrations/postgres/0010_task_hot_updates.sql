-- A task's per-step progress update (steps, tokens, cost, updated_at) changes no indexed
-- column, so Postgres can make it a heap-only (HOT) update: the new row version stays on
-- its page and no index gets a new entry. Before, `tasks_agent_errors` indexed
-- `updated_at`, so every checkpoint added an entry to each of the table's indexes (the
-- queue's among them, which every claim then walked past).
--
-- The latest error is now found by when it was recorded, not by the task's last change.
ALTER TABLE tasks ADD COLUMN errored_at TIMESTAMPTZ;
UPDATE tasks SET errored_at = updated_at WHERE error IS NOT NULL;
DROP INDEX tasks_agent_errors;
CREATE INDEX tasks_agent_errors ON tasks (agent_id, errored_at) WHERE error IS NOT NULL;
-- Room on each page for a task's next versions (a claim, its steps, heartbeats), so a HOT
-- update finds space beside the row it replaces. Applies to pages filled from now on.
ALTER TABLE tasks SET (fillfactor = 80);
