-- The `keel_tasks{status}` gauge counts the tasks still in play (submitted, working,
-- input-required), through this index, instead of every task ever stored by status (a
-- scan of the whole table, growing with history); finished tasks are counted as they
-- finish by `keel_tasks_finished_total{status}`. The same schema on both backends.
CREATE INDEX tasks_live ON tasks (status) WHERE status IN ('submitted', 'working', 'input-required');
