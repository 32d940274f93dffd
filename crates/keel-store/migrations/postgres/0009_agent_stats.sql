-- An agent's status counts what finished in a window and finds its p95 through this index,
-- and its latest error through the partial one, however many tasks the agent has.
CREATE INDEX tasks_agent_finished ON tasks (agent_id, finished_at);
CREATE INDEX tasks_agent_errors ON tasks (agent_id, updated_at) WHERE error IS NOT NULL;
