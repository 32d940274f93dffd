-- The `keel_tasks{status}` gauge counts the tasks still in play (submitted, working,
-- input-required) every few seconds. It counted every task ever stored by status — a
-- scan of the whole table (8 ms at ten thousand tasks, growing with history); finished
-- tasks are counted as they finish by `keel_tasks_finished_total{status}` instead. The
-- live ones are found through this index: a task enters it when created and leaves it
-- when it finishes, and a step's progress update (which changes no status) stays
-- heap-only.
CREATE INDEX tasks_live ON tasks (status) WHERE status IN ('submitted', 'working', 'input-required');
