//! The agent runtime's storage: versioned agent specs, threads and their messages, tasks
//! (which are also the durable queue's entries), runs and their checkpointed steps.
//!
//! Durability rests on three rules kept here:
//! - A step is checkpointed with its messages, its events (the outbox) and its usage in
//!   one transaction, and only appends: storing a step costs the step's size.
//! - Every write a worker makes is fenced by its lease (`lease_owner`): a worker that lost
//!   its task (lease expired and taken over, or the task canceled) commits nothing more.
//! - The queue is the `tasks` table: a task wants a worker while `queued`; a worker holds
//!   it through a lease it renews; an expired lease makes it claimable again — which is
//!   how a crashed worker's runs resume elsewhere.
//!
//! A group commit locks its tasks' rows in task id order, then their threads' rows in
//! thread id order (one statement on Postgres), and the event heads last, in workspace
//! order. Two concurrent commits can only deadlock over threads shared by several running
//! tasks; Postgres then aborts one, and its checkpoints are retried.

use async_trait::async_trait;
use keel_core::event::{Event, NewEvent};
use keel_core::id::{AgentId, RunId, TaskId, ThreadId, WorkspaceId};
use keel_core::task::{Priority, TaskStatus};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Result, UsageRecord};

/// A stored agent spec (the current version, or a pinned one).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    /// Stable across versions.
    pub id: AgentId,
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// Its name, unique in the workspace.
    pub name: String,
    /// 1, 2, 3, … — every change makes a new version.
    pub version: i64,
    /// The spec as JSON (validated by the runtime before it is stored).
    pub spec: serde_json::Value,
    /// When the agent was first created.
    pub created_at: OffsetDateTime,
    /// When this version was stored.
    pub updated_at: OffsetDateTime,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// Its id.
    pub id: TaskId,
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// The agent.
    pub agent_id: AgentId,
    /// The agent's name.
    pub agent_name: String,
    /// The agent version it runs with.
    pub agent_version: i64,
    /// Its thread.
    pub thread_id: ThreadId,
    /// The task that delegated it, if any.
    pub parent_task_id: Option<TaskId>,
    /// Delegation depth (0 for a task a caller created).
    pub depth: i64,
    /// Where it stands.
    pub status: TaskStatus,
    /// Queue priority.
    pub priority: Priority,
    /// The input messages (a JSON array of chat messages).
    pub input: serde_json::Value,
    /// The caller's metadata.
    pub metadata: serde_json::Value,
    /// The caller's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// The answer, once completed.
    pub output: Option<String>,
    /// The last error (`{"kind", "message"}`), if any.
    pub error: Option<serde_json::Value>,
    /// Runs started so far.
    pub attempts: i64,
    /// Runs allowed before the task is dead-lettered.
    pub max_attempts: i64,
    /// The current (or last) run.
    pub run_id: Option<RunId>,
    /// Steps checkpointed, across runs.
    pub steps: i64,
    /// Tool calls made, across runs.
    pub tool_calls: i64,
    /// Prompt tokens used.
    pub input_tokens: i64,
    /// Completion tokens used.
    pub output_tokens: i64,
    /// Cost so far, nano-USD.
    pub cost_nanousd: i64,
    /// Whether it waits for (or holds) a worker.
    pub queued: bool,
    /// Not before this time.
    pub run_at: OffsetDateTime,
    /// The worker holding it.
    pub lease_owner: Option<Uuid>,
    /// Until when.
    pub lease_until: Option<OffsetDateTime>,
    /// In the dead-letter queue.
    pub dead_lettered: bool,
    /// Accepted at.
    pub created_at: OffsetDateTime,
    /// First run started at.
    pub started_at: Option<OffsetDateTime>,
    /// Last changed at.
    pub updated_at: OffsetDateTime,
    /// Reached a terminal status at.
    pub finished_at: Option<OffsetDateTime>,
    /// Whether its thread held no messages when the task was read: known for a task just
    /// claimed on Postgres (the claim reads it in the same statement), `None` otherwise.
    /// A new run of a task whose thread is empty has no earlier turns to load, so the
    /// engine skips [`RuntimeStore::thread_context`], a round trip per task started.
    pub thread_empty: Option<bool>,
}

/// A task to create.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id.
    pub id: TaskId,
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// The agent version it will run with.
    pub agent_id: AgentId,
    /// The agent's name.
    pub agent_name: String,
    /// The agent's version.
    pub agent_version: i64,
    /// An existing thread of the workspace to continue; `None` starts a new one.
    pub thread_id: Option<ThreadId>,
    /// The delegating task.
    pub parent_task_id: Option<TaskId>,
    /// Delegation depth.
    pub depth: i64,
    /// Queue priority.
    pub priority: Priority,
    /// Input messages (JSON array).
    pub input: serde_json::Value,
    /// Caller's metadata.
    pub metadata: serde_json::Value,
    /// Caller's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// Runs allowed.
    pub max_attempts: i64,
    /// Refuse (creating nothing) when this many tasks are already queued.
    pub max_queued: i64,
    /// Its `task.created` event (ids filled in by the caller).
    pub events: Vec<NewEvent>,
}

/// What [`RuntimeStore::create_task`] did.
#[derive(Debug, Clone)]
pub enum Created {
    /// A new task, with its committed events.
    New(Box<TaskRecord>, Vec<Event>),
    /// The task created earlier with the same `Idempotency-Key`.
    Existing(Box<TaskRecord>),
    /// The queue is at its bound; nothing was created.
    QueueFull {
        /// Tasks queued at the time.
        queued: i64,
    },
}

/// Filters for listing tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only tasks in this status.
    pub status: Option<TaskStatus>,
    /// Only tasks of this agent (by name).
    pub agent: Option<String>,
    /// Only tasks on this thread.
    pub thread_id: Option<ThreadId>,
    /// Only dead-lettered tasks.
    pub dead_lettered: bool,
}

/// A run (attempt) as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Its id.
    pub id: RunId,
    /// Its task.
    pub task_id: TaskId,
    /// 1 for the first attempt.
    pub attempt: i64,
    /// `working`, `completed`, `failed`, `canceled`, `input-required`.
    pub status: String,
    /// Why it failed.
    pub error: Option<serde_json::Value>,
    /// Started at.
    pub started_at: OffsetDateTime,
    /// Ended at.
    pub finished_at: Option<OffsetDateTime>,
}

/// A checkpointed step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Its task.
    pub task_id: TaskId,
    /// Its position in the task (0, 1, 2, … across runs).
    pub idx: i64,
    /// Its run.
    pub run_id: RunId,
    /// `llm_call`, `tool_call`, `approval`, `reply`.
    pub kind: String,
    /// What the step did and produced.
    pub data: serde_json::Value,
    /// Committed at.
    pub created_at: OffsetDateTime,
}

/// A message of a thread.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    /// Position in the thread.
    pub seq: i64,
    /// The task that added it.
    pub task_id: TaskId,
    /// The run that added it.
    pub run_id: RunId,
    /// The chat message (JSON object).
    pub body: serde_json::Value,
    /// Its size in tokens.
    pub tokens: i64,
    /// Added at.
    pub created_at: OffsetDateTime,
}

/// A message to append: the chat message and its token count.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// The chat message.
    pub body: serde_json::Value,
    /// Its size in tokens.
    pub tokens: i64,
}

/// A thread as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadRecord {
    /// Its id.
    pub id: ThreadId,
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// Caller's metadata.
    pub metadata: serde_json::Value,
    /// Messages so far.
    pub messages: i64,
    /// Created at.
    pub created_at: OffsetDateTime,
}

/// The start of a run, or its resumption after a crash.
#[derive(Debug, Clone)]
pub struct BeginRun {
    /// The task.
    pub task_id: TaskId,
    /// The worker holding it.
    pub owner: Uuid,
    /// A new run (first attempt or a retry) with the task's input as its first messages;
    /// `None` resumes the current run.
    pub new_run: Option<(RunId, Vec<NewMessage>)>,
    /// `task.started` or `run.resumed`.
    pub events: Vec<NewEvent>,
}

/// What a run needs to go on: its task, its run, the steps it has committed and the
/// conversation so far (earlier completed tasks of the thread, then this run).
#[derive(Debug, Clone)]
pub struct RunState {
    /// The task (after the run began).
    pub task: TaskRecord,
    /// The run.
    pub run: RunRecord,
    /// This run's committed steps, in order.
    pub steps: Vec<StepRecord>,
    /// The context, in thread order.
    pub messages: Vec<MessageRecord>,
    /// Events committed by beginning the run.
    pub events: Vec<Event>,
}

/// What [`RuntimeStore::agent_stats`] counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStats {
    /// Tasks waiting to run.
    pub submitted: u64,
    /// Tasks running.
    pub working: u64,
    /// Tasks waiting for a human.
    pub input_required: u64,
    /// One per `since` asked for.
    pub windows: Vec<WindowStats>,
    /// The task that failed (or had a failed attempt) most recently.
    pub last_error: Option<TaskRecord>,
}

/// Tasks finished after a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Finished (in any terminal status).
    pub finished: u64,
    /// Of which completed.
    pub completed: u64,
    /// 95th percentile of the completed ones' durations, created → finished, ms.
    pub p95_ms: Option<u64>,
}

/// How a checkpoint ends a run, if it does.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// The task completed with this answer.
    Completed {
        /// The answer.
        output: Option<String>,
    },
    /// The task waits for input; the worker lets go of it.
    InputRequired,
    /// The run failed and the task will be retried by a new run at `retry_at`.
    Retry {
        /// The error.
        error: serde_json::Value,
        /// When the next attempt may start.
        retry_at: OffsetDateTime,
    },
    /// The task failed for good; with `dead_letter`, it goes to the dead-letter queue.
    Failed {
        /// The error.
        error: serde_json::Value,
        /// Put it in the dead-letter queue.
        dead_letter: bool,
    },
}

/// One step's commit (or a run's start or ending), fenced by the worker's lease.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Starts a new run (attempt) with this id first: the task becomes `working`, its
    /// attempts count up, and `messages` are the run's input. Committed with other runs'
    /// checkpoints, so starting a run costs no transaction of its own.
    pub start: Option<RunId>,
    /// The task.
    pub task_id: TaskId,
    /// Its workspace.
    pub workspace_id: WorkspaceId,
    /// Its thread.
    pub thread_id: ThreadId,
    /// The run.
    pub run_id: RunId,
    /// The worker holding the lease.
    pub owner: Uuid,
    /// The step: kind and data. `None` for a checkpoint that only ends the run.
    pub step: Option<(String, serde_json::Value)>,
    /// Messages the step adds to the thread.
    pub messages: Vec<NewMessage>,
    /// Tool calls the step made.
    pub tool_calls: i64,
    /// Prompt tokens the step used.
    pub input_tokens: i64,
    /// Completion tokens the step used.
    pub output_tokens: i64,
    /// What the step cost, nano-USD.
    pub cost_nanousd: i64,
    /// How it ends the run, if it does.
    pub finish: Option<Finish>,
    /// Its events.
    pub events: Vec<NewEvent>,
    /// Its LLM call's accounting.
    pub usage: Option<UsageRecord>,
}

/// What became of one checkpoint of a group commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Committed {
    /// Stored, at this step index, with these events.
    Stored {
        /// The step's index (`None` without a step).
        idx: Option<i64>,
        /// The events as committed.
        events: Vec<Event>,
    },
    /// The worker no longer holds the task (lease taken over, or the task canceled or
    /// finished elsewhere): nothing was stored.
    LeaseLost,
}

/// Queue depth for one priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// The priority.
    pub priority: Priority,
    /// Tasks waiting for a worker (not leased).
    pub waiting: i64,
    /// When the oldest of them was accepted.
    pub oldest: Option<OffsetDateTime>,
}

/// The runtime's storage. Part of every [`Store`](crate::Store).
#[async_trait]
pub trait RuntimeStore: Send + Sync {
    /// Stores `spec` as the next version of agent `name` (creating it at version 1).
    /// With `create_only`, an existing (not deleted) agent is a `Conflict`; with
    /// `update_only`, a missing one is `NotFound`. An unchanged spec stores no new version.
    async fn put_agent(
        &self,
        workspace: WorkspaceId,
        name: &str,
        spec: &serde_json::Value,
        create_only: bool,
        update_only: bool,
    ) -> Result<AgentRecord>;

    /// The current version of an agent.
    async fn agent(&self, workspace: WorkspaceId, name: &str) -> Result<AgentRecord>;

    /// A given version of an agent (tasks are pinned to one).
    async fn agent_version(
        &self,
        workspace: WorkspaceId,
        id: AgentId,
        version: i64,
    ) -> Result<AgentRecord>;

    /// The workspace's agents (current versions), by name.
    async fn list_agents(&self, workspace: WorkspaceId) -> Result<Vec<AgentRecord>>;

    /// Deletes an agent (its versions stay, for the tasks that ran with them).
    async fn delete_agent(&self, workspace: WorkspaceId, name: &str) -> Result<()>;

    /// Creates a thread.
    async fn create_thread(
        &self,
        workspace: WorkspaceId,
        metadata: &serde_json::Value,
    ) -> Result<ThreadRecord>;

    /// A thread of this workspace.
    async fn thread(&self, workspace: WorkspaceId, id: ThreadId) -> Result<ThreadRecord>;

    /// A thread's messages with seq after `after`, oldest first.
    async fn thread_messages(
        &self,
        workspace: WorkspaceId,
        id: ThreadId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<MessageRecord>>;

    /// Creates a task and queues it, with its events, in one transaction — or returns the
    /// task an earlier request with the same `Idempotency-Key` created, or refuses when the
    /// queue is at `max_queued` (judged by this instance's estimate of the depth, which is
    /// not counted per creation; see the `admission` module).
    async fn create_task(&self, task: NewTask) -> Result<Created>;

    /// A task of this workspace.
    async fn task(&self, workspace: WorkspaceId, id: TaskId) -> Result<TaskRecord>;

    /// A workspace's tasks with id before `before` (newest first).
    async fn list_tasks(
        &self,
        workspace: WorkspaceId,
        filter: &TaskFilter,
        before: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>>;

    /// An agent's tasks at a glance, counted over all of them (not a page): how many wait,
    /// run and wait for input; for each of `since`, how many finished after it, how many
    /// of those completed and their p95 duration (created → finished); the latest error.
    async fn agent_stats(
        &self,
        workspace: WorkspaceId,
        agent: AgentId,
        since: &[OffsetDateTime],
    ) -> Result<AgentStats>;

    /// A task's steps, in order.
    async fn task_steps(&self, workspace: WorkspaceId, id: TaskId) -> Result<Vec<StepRecord>>;

    /// A task's runs, in order.
    async fn task_runs(&self, workspace: WorkspaceId, id: TaskId) -> Result<Vec<RunRecord>>;

    /// Leases up to `limit` runnable tasks to `owner` until `until`: highest priority
    /// first, then fairly across workspaces. Safe with several processes on one database.
    async fn claim_tasks(
        &self,
        owner: Uuid,
        until: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<TaskRecord>>;

    /// Extends `owner`'s leases on `tasks` to `until`; returns those it still holds.
    async fn renew_leases(
        &self,
        owner: Uuid,
        tasks: &[TaskId],
        until: OffsetDateTime,
    ) -> Result<Vec<TaskId>>;

    /// Lets go of tasks `owner` holds without ending them (shutdown): they are claimable
    /// again at once.
    async fn release_leases(&self, owner: Uuid, tasks: &[TaskId]) -> Result<()>;

    /// Makes every lease claimable at once — for a single-process SQLite store at start,
    /// when any lease left behind belongs to a process that is gone.
    async fn expire_all_leases(&self) -> Result<u64>;

    /// Begins (or resumes) the task's run, fenced by `owner`'s lease, and loads its state.
    /// `LeaseLost`-like failures come back as `State`. (A worker starts a new run more
    /// cheaply with a [`Checkpoint`] whose `start` is set, after [`Self::thread_context`].)
    async fn begin_run(&self, begin: BeginRun) -> Result<RunState>;

    /// The messages a new task of `thread` sees from before it: the final runs of the
    /// thread's tasks that completed and were created before `task`, in thread order.
    async fn thread_context(
        &self,
        workspace: WorkspaceId,
        thread: ThreadId,
        task: TaskId,
    ) -> Result<Vec<MessageRecord>>;

    /// Commits checkpoints of many runs in one transaction (group commit).
    async fn commit_checkpoints(&self, batch: &[Checkpoint]) -> Result<Vec<Committed>>;

    /// Cancels a task that has not finished; `State` if it has.
    async fn cancel_task(
        &self,
        workspace: WorkspaceId,
        id: TaskId,
        events: Vec<NewEvent>,
    ) -> Result<(TaskRecord, Vec<Event>)>;

    /// Records a human's input to a task waiting for it (as a step with its messages) and
    /// queues the task again, or ends it (`finish`: a rejection); `State` if the task is
    /// not waiting for input.
    async fn submit_input(
        &self,
        workspace: WorkspaceId,
        id: TaskId,
        step: (String, serde_json::Value),
        messages: Vec<NewMessage>,
        finish: Option<TaskStatus>,
        events: Vec<NewEvent>,
    ) -> Result<(TaskRecord, Vec<Event>)>;

    /// Takes a dead-lettered task out of the queue of dead letters and queues it for a
    /// new run with `more_attempts` more attempts.
    async fn replay_dead_letter(
        &self,
        workspace: WorkspaceId,
        id: TaskId,
        more_attempts: i64,
        events: Vec<NewEvent>,
    ) -> Result<(TaskRecord, Vec<Event>)>;

    /// Removes a task from the dead-letter queue (it stays, failed).
    async fn discard_dead_letter(&self, workspace: WorkspaceId, id: TaskId) -> Result<()>;

    /// Queue depth by priority (tasks waiting for a worker).
    async fn queue_depth(&self) -> Result<Vec<QueueDepth>>;

    /// Tasks per live status (submitted, working, input-required), all workspaces, for
    /// metrics; a status with none is left out. Finished tasks are not counted here (that
    /// would read the whole history): the runtime counts them as they finish.
    async fn task_counts(&self) -> Result<Vec<(TaskStatus, i64)>>;

    /// Tasks in the dead-letter queue, all workspaces (for metrics).
    async fn dead_letter_count(&self) -> Result<i64>;
}

/// A step row waiting to be inserted with the rest of its batch.
pub(crate) struct StepRow {
    pub(crate) task: Uuid,
    pub(crate) idx: i64,
    pub(crate) run: Uuid,
    pub(crate) workspace: Uuid,
    pub(crate) kind: String,
    pub(crate) data: String,
}

/// What a checkpoint batch's writes return: each checkpoint's step index (`None`: its
/// lease was lost), how many of the events are its, and the events as stored.
pub(crate) type BatchWrites = (Vec<Option<Option<i64>>>, Vec<usize>, Vec<Event>);

/// A message row waiting to be inserted with the rest of its batch.
///
/// Its seq is computed by the insert: the thread's `next_seq`, as the same transaction's
/// earlier update left it (the last seq handed out), minus `back`. So the update that
/// hands out a range needs to read nothing back, and can wait with the inserts for one
/// round trip (see `Gather`).
pub(crate) struct MessageRow {
    pub(crate) thread: Uuid,
    pub(crate) back: i64,
    pub(crate) workspace: Uuid,
    pub(crate) task: Uuid,
    pub(crate) run: Uuid,
    pub(crate) body: String,
    pub(crate) tokens: i64,
}

/// A round of a checkpoint batch's messages: their rows, and the seqs to hand out for
/// them (`(thread, n)`) where the insert hands them out (see `CHAINS_WRITES`).
#[derive(Default)]
pub(crate) struct RoundMessages {
    pub(crate) rows: Vec<MessageRow>,
    pub(crate) seqs: Vec<(Uuid, i64)>,
}

/// Rows per multi-row INSERT (8 parameters each: far under both databases' limits).
pub(crate) const ROW_BATCH: usize = 500;

/// The `tasks` columns, in a fixed order (a macro so queries stay static strings).
macro_rules! task_columns {
    () => {
        "id, workspace_id, agent_id, agent_name, agent_version, thread_id, parent_task_id, depth, \
         status, priority, input, metadata, idempotency_key, output, error, attempts, max_attempts, \
         run_id, steps, tool_calls, input_tokens, output_tokens, cost_nanousd, queued, vt, run_at, \
         lease_owner, lease_until, dead_lettered, created_at, started_at, updated_at, finished_at"
    };
}
pub(crate) use task_columns;

pub(crate) fn json(what: &'static str, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| crate::Error::Corrupt {
        what,
        detail: e.to_string(),
    })
}

pub(crate) fn status(text: &str) -> Result<TaskStatus> {
    text.parse()
        .map_err(|e: keel_core::Error| crate::Error::Corrupt {
            what: "task status",
            detail: e.to_string(),
        })
}

/// The task-status phrase for a `State` error.
pub(crate) fn not_waiting(status: TaskStatus) -> crate::Error {
    crate::Error::State {
        what: "task",
        state: format!("{status}, not waiting for input"),
    }
}

/// Stamps [`RuntimeStore`] onto a backend (see `sql_store!`); the backend provides
/// `LANE_SQL`, `CLAIM_SQL` and `CLOCK_SQL`, the three statements whose dialects differ, and
/// `LOCK_ROWS` (` FOR UPDATE`, or nothing where one writer at a time is the rule).
macro_rules! runtime_store {
    ($store:ty, $db:ty) => {
        impl $store {
            fn task_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::runtime::TaskRecord> {
                use sqlx::Row as _;
                use keel_core::id::*;
                let input: String = row.try_get("input")?;
                let metadata: String = row.try_get("metadata")?;
                let error: Option<String> = row.try_get("error")?;
                let status: String = row.try_get("status")?;
                Ok($crate::runtime::TaskRecord {
                    id: TaskId::from_uuid(row.try_get("id")?),
                    workspace_id: WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    agent_id: AgentId::from_uuid(row.try_get("agent_id")?),
                    agent_name: row.try_get("agent_name")?,
                    agent_version: row.try_get("agent_version")?,
                    thread_id: ThreadId::from_uuid(row.try_get("thread_id")?),
                    parent_task_id: row.try_get::<Option<uuid::Uuid>, _>("parent_task_id")?.map(TaskId::from_uuid),
                    depth: row.try_get("depth")?,
                    status: $crate::runtime::status(&status)?,
                    priority: keel_core::task::Priority::from_rank(row.try_get("priority")?),
                    input: $crate::runtime::json("task input", &input)?,
                    metadata: $crate::runtime::json("task metadata", &metadata)?,
                    idempotency_key: row.try_get("idempotency_key")?,
                    output: row.try_get("output")?,
                    error: error.map(|e| $crate::runtime::json("task error", &e)).transpose()?,
                    attempts: row.try_get("attempts")?,
                    max_attempts: row.try_get("max_attempts")?,
                    run_id: row.try_get::<Option<uuid::Uuid>, _>("run_id")?.map(RunId::from_uuid),
                    steps: row.try_get("steps")?,
                    tool_calls: row.try_get("tool_calls")?,
                    input_tokens: row.try_get("input_tokens")?,
                    output_tokens: row.try_get("output_tokens")?,
                    cost_nanousd: row.try_get("cost_nanousd")?,
                    queued: row.try_get("queued")?,
                    run_at: row.try_get("run_at")?,
                    lease_owner: row.try_get("lease_owner")?,
                    lease_until: row.try_get("lease_until")?,
                    dead_lettered: row.try_get("dead_lettered")?,
                    created_at: row.try_get("created_at")?,
                    started_at: row.try_get("started_at")?,
                    updated_at: row.try_get("updated_at")?,
                    finished_at: row.try_get("finished_at")?,
                    // Only a claim knows it (see `claim_tasks`).
                    thread_empty: None,
                })
            }

            fn agent_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::runtime::AgentRecord> {
                use sqlx::Row as _;
                let spec: String = row.try_get("spec")?;
                Ok($crate::runtime::AgentRecord {
                    id: keel_core::id::AgentId::from_uuid(row.try_get("id")?),
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    name: row.try_get("name")?,
                    version: row.try_get("version")?,
                    spec: $crate::runtime::json("agent spec", &spec)?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                })
            }

            fn run_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::runtime::RunRecord> {
                use sqlx::Row as _;
                let error: Option<String> = row.try_get("error")?;
                Ok($crate::runtime::RunRecord {
                    id: keel_core::id::RunId::from_uuid(row.try_get("id")?),
                    task_id: keel_core::id::TaskId::from_uuid(row.try_get("task_id")?),
                    attempt: row.try_get("attempt")?,
                    status: row.try_get("status")?,
                    error: error.map(|e| $crate::runtime::json("run error", &e)).transpose()?,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                })
            }

            fn step_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::runtime::StepRecord> {
                use sqlx::Row as _;
                let data: String = row.try_get("data")?;
                Ok($crate::runtime::StepRecord {
                    task_id: keel_core::id::TaskId::from_uuid(row.try_get("task_id")?),
                    idx: row.try_get("idx")?,
                    run_id: keel_core::id::RunId::from_uuid(row.try_get("run_id")?),
                    kind: row.try_get("kind")?,
                    data: $crate::runtime::json("step data", &data)?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn message_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::runtime::MessageRecord> {
                use sqlx::Row as _;
                let body: String = row.try_get("body")?;
                Ok($crate::runtime::MessageRecord {
                    seq: row.try_get("seq")?,
                    task_id: keel_core::id::TaskId::from_uuid(row.try_get("task_id")?),
                    run_id: keel_core::id::RunId::from_uuid(row.try_get("run_id")?),
                    body: $crate::runtime::json("message", &body)?,
                    tokens: row.try_get("tokens")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn thread_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::runtime::ThreadRecord> {
                use sqlx::Row as _;
                let metadata: String = row.try_get("metadata")?;
                Ok($crate::runtime::ThreadRecord {
                    id: keel_core::id::ThreadId::from_uuid(row.try_get("id")?),
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    metadata: $crate::runtime::json("thread metadata", &metadata)?,
                    messages: row.try_get("next_seq")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            /// The workspace's task with Idempotency-Key `key`, if any.
            async fn task_by_key(&self, workspace: uuid::Uuid, key: &str) -> $crate::Result<Option<$crate::runtime::TaskRecord>> {
                sqlx::query(concat!("SELECT ", $crate::runtime::task_columns!(), " FROM tasks WHERE workspace_id = $1 AND idempotency_key = $2"))
                    .bind(workspace)
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|row| Self::task_from_row(&row))
                    .transpose()
            }

            /// The task a unique violation on `t`'s Idempotency-Key says a concurrent
            /// request created first.
            async fn task_created_first(&self, t: &$crate::runtime::NewTask) -> $crate::Result<$crate::runtime::Created> {
                let key = t.idempotency_key.as_deref().unwrap_or_default();
                let task = self
                    .task_by_key(t.workspace_id.as_uuid(), key)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "task" })?;
                Ok($crate::runtime::Created::Existing(Box::new(task)))
            }

            /// Tasks waiting in the queue for a worker (what the queue bound counts).
            async fn queued_count(&self) -> $crate::Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE queued AND lease_owner IS NULL")
                    .fetch_one(&self.pool)
                    .await?)
            }

            /// The values of a new task's row, for `INSERT INTO tasks (<task_columns>)
            /// SELECT …`: its thread is `thread` (bound), or else CTE `thread`'s id; its
            /// virtual time is the fairness lane's (`lane.last_vt`), which the caller's
            /// `FROM` provides.
            fn push_new_task_row(
                qb: &mut sqlx::QueryBuilder<$db>,
                t: &$crate::runtime::NewTask,
                thread: Option<keel_core::id::ThreadId>,
                now: time::OffsetDateTime,
            ) {
                let mut row = qb.separated(", ");
                row.push_bind(t.id.as_uuid())
                    .push_bind(t.workspace_id.as_uuid())
                    .push_bind(t.agent_id.as_uuid())
                    .push_bind(t.agent_name.clone())
                    .push_bind(t.agent_version);
                match thread {
                    Some(id) => row.push_bind(id.as_uuid()),
                    None => row.push("thread.id"),
                };
                row.push_bind(t.parent_task_id.map(|p| p.as_uuid()))
                    .push_bind(t.depth)
                    .push("'submitted'")
                    .push_bind(t.priority.rank())
                    .push_bind(t.input.to_string())
                    .push_bind(t.metadata.to_string())
                    .push_bind(t.idempotency_key.clone())
                    .push("NULL, NULL, 0")
                    .push_bind(t.max_attempts)
                    .push("NULL, 0, 0, 0, 0, 0, TRUE, lane.last_vt")
                    .push_bind(now)
                    .push("NULL, NULL, FALSE")
                    .push_bind(now)
                    .push("NULL")
                    .push_bind(now)
                    .push("NULL");
            }

            /// Postgres: creates a task in one statement — the thread (found or made), the
            /// workspace's fairness lane, the task and its events — committed on its own,
            /// so the lane's and the event head's row locks last that statement and its
            /// commit, not a transaction's round trips. `None` when the events are not one
            /// workspace's (the transaction does it then).
            async fn create_task_at_once(
                &self,
                t: &$crate::runtime::NewTask,
            ) -> $crate::Result<Option<$crate::runtime::Created>> {
                use $crate::runtime::Created;
                use sqlx::Row as _;
                let ws = t.workspace_id.as_uuid();
                if t.events.is_empty()
                    || t.events.len() > $crate::events::EVENT_BATCH
                    || t.events.iter().any(|e| e.workspace_id != t.workspace_id)
                {
                    return Ok(None);
                }
                let mut events = $crate::events::stamped(&t.events);
                let now = $crate::now();
                let (thread, made) = match t.thread_id {
                    Some(id) => (id, false),
                    None => (keel_core::id::ThreadId::new(), true),
                };
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "WITH made AS (INSERT INTO threads (id, workspace_id, metadata, next_seq, created_at) SELECT ",
                );
                qb.push_bind(thread.as_uuid())
                    .push(", ")
                    .push_bind(ws)
                    .push(", '{}', 0, ")
                    .push_bind(now)
                    .push(" WHERE ")
                    .push_bind(made)
                    .push(" RETURNING id), thread AS (SELECT id FROM made UNION ALL SELECT t.id FROM threads t WHERE NOT ")
                    .push_bind(made)
                    .push(" AND t.id = ")
                    .push_bind(thread.as_uuid())
                    .push(" AND t.workspace_id = ")
                    .push_bind(ws)
                    .push("), lane AS (INSERT INTO queue_lanes (workspace_id, last_vt) SELECT ")
                    .push_bind(ws)
                    .push(
                        ", (SELECT vt FROM queue_clock WHERE id = 1) + 1 FROM thread ON CONFLICT (workspace_id) DO UPDATE \
                         SET last_vt = GREATEST(queue_lanes.last_vt, (SELECT vt FROM queue_clock WHERE id = 1)) + 1 RETURNING last_vt), \
                         task AS (INSERT INTO tasks (",
                    )
                    .push($crate::runtime::task_columns!())
                    .push(") SELECT ");
                Self::push_new_task_row(&mut qb, t, None, now);
                qb.push(" FROM thread CROSS JOIN lane RETURNING ").push($crate::runtime::task_columns!()).push(")");
                let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
                Self::push_announced_append(&mut qb, ws, n, Some("task"));
                qb.push(" FROM head CROSS JOIN announced CROSS JOIN (");
                {
                    let refs: Vec<&keel_core::event::Event> = events.iter().collect();
                    Self::push_event_values(&mut qb, &refs);
                }
                // The events' insert runs to completion though nothing reads it (every
                // data-modifying CTE does).
                qb.push(") AS v WHERE v.column2 IS NOT NULL RETURNING seq) SELECT task.*, head.last_seq AS head_seq FROM task CROSS JOIN head");
                let persistent = $crate::sql::persistent(events.len());
                let row = match qb.build().persistent(persistent).fetch_optional(&self.writer).await {
                    Ok(row) => row,
                    Err(sqlx::Error::Database(db)) if db.is_unique_violation() && t.idempotency_key.is_some() => {
                        // A concurrent request with the same key won the race.
                        return self.task_created_first(t).await.map(Some);
                    }
                    Err(e) => return Err(e.into()),
                };
                let Some(row) = row else {
                    // Nothing was written: the thread is not the workspace's.
                    return Err($crate::Error::NotFound { what: "thread" });
                };
                let head: i64 = row.try_get("head_seq")?;
                for (k, e) in (1i64..).zip(events.iter_mut()) {
                    e.seq = head - n + k;
                }
                Ok(Some(Created::New(Box::new(Self::task_from_row(&row)?), events)))
            }

            /// SQLite: creates a task with others waiting for the writer, in one
            /// transaction and one fsync (see `creations.rs`).
            async fn create_task_batched(
                &self,
                t: $crate::runtime::NewTask,
            ) -> $crate::Result<$crate::runtime::Created> {
                let (id, mut answer) = self.creations.push(t);
                // A caller that goes away before anyone took its creation takes it back:
                // it must not be made later, by whoever next gets the writer.
                let _withdraw = $crate::creations::WithdrawOnDrop::new(&self.creations, id);
                loop {
                    let conn = match self.writer.acquire().await {
                        Ok(conn) => conn,
                        // Give up only while nobody has taken the creation: once taken, it
                        // may be committed, and its answer is the one to give.
                        Err(e) if self.creations.withdraw(id) => return Err(e.into()),
                        Err(_) => break,
                    };
                    let batch = self.creations.take();
                    if batch.is_empty() {
                        break;
                    }
                    // In a task of its own, so the batch commits (and every caller in it
                    // is answered) even if this caller goes away half-way.
                    let store = self.clone();
                    let conn = $crate::sql::CloseUnlessReturned::new(conn);
                    tokio::spawn(async move { store.commit_creations(conn, batch).await })
                        .await
                        .map_err(|e| $crate::Error::Corrupt { what: "task creation", detail: e.to_string() })?;
                    if let Ok(created) = answer.try_recv() {
                        return created;
                    }
                }
                answer.await.unwrap_or_else(|_| {
                    Err($crate::Error::State { what: "task creation", state: "abandoned; retry".to_owned() })
                })
            }

            /// Commits `batch` in one transaction begun and committed by hand: per creation
            /// one round trip (a savepoint, the thread made or found to be the workspace's,
            /// the workspace's fairness lane, the task `RETURNING` its row), then every new
            /// task's events and `COMMIT` in one more. A creation that loses an idempotency
            /// race or names another workspace's thread rolls back to its savepoint alone.
            async fn commit_creations(
                &self,
                mut conn: $crate::sql::CloseUnlessReturned<$db>,
                batch: Vec<$crate::creations::Waiting>,
            ) {
                use $crate::runtime::Created;
                enum Made {
                    New(Box<$crate::runtime::TaskRecord>),
                    LostRace,
                    NotFound,
                    Failed($crate::Error),
                }
                let now = $crate::now();
                let mut made: Vec<Made> = Vec::with_capacity(batch.len());
                let committed = async {
                    let mut g = $crate::sql::Gather::<$db>::new(true);
                    g.qb.push("BEGIN IMMEDIATE");
                    let _ = g.end(0);
                    let mut open = false;
                    for w in &batch {
                        let t = &w.task;
                        if open {
                            g.qb.push("RELEASE c");
                            let _ = g.end(0);
                        }
                        g.qb.push("SAVEPOINT c");
                        let _ = g.end(0);
                        open = true;
                        let ws = t.workspace_id.as_uuid();
                        let (thread, new_thread) = match t.thread_id {
                            Some(id) => (id, false),
                            None => (keel_core::id::ThreadId::new(), true),
                        };
                        if new_thread {
                            g.qb.push("INSERT INTO threads (id, workspace_id, metadata, next_seq, created_at) VALUES (")
                                .push_bind(thread.as_uuid())
                                .push(", ")
                                .push_bind(ws)
                                .push(", '{}', 0, ")
                                .push_bind(now)
                                .push(")");
                            let _ = g.end(1);
                        }
                        g.qb.push("INSERT INTO queue_lanes (workspace_id, last_vt) VALUES (")
                            .push_bind(ws)
                            .push(
                                ", (SELECT vt FROM queue_clock WHERE id = 1) + 1) ON CONFLICT (workspace_id) DO UPDATE \
                                 SET last_vt = max(queue_lanes.last_vt, (SELECT vt FROM queue_clock WHERE id = 1)) + 1",
                            );
                        let _ = g.end(1);
                        g.qb.push("INSERT INTO tasks (").push($crate::runtime::task_columns!()).push(") SELECT ");
                        Self::push_new_task_row(&mut g.qb, t, Some(thread), now);
                        g.qb.push(" FROM queue_lanes lane WHERE lane.workspace_id = ")
                            .push_bind(ws)
                            .push(" AND EXISTS (SELECT 1 FROM threads WHERE id = ")
                            .push_bind(thread.as_uuid())
                            .push(" AND workspace_id = ")
                            .push_bind(ws)
                            .push(") RETURNING ")
                            .push($crate::runtime::task_columns!());
                        let _ = g.end(1);
                        let outcome = match Self::run_gathered(&mut **conn, &mut g).await {
                            Ok(rows) => match rows.first().map(Self::task_from_row) {
                                Some(Ok(task)) => Made::New(Box::new(task)),
                                Some(Err(e)) => Made::Failed(e),
                                None => Made::NotFound,
                            },
                            Err($crate::Error::Database(db))
                                if t.idempotency_key.is_some()
                                    && db.as_database_error().is_some_and(|d| d.is_unique_violation()) =>
                            {
                                Made::LostRace
                            }
                            // This creation's own statement failed (a constraint, say): it
                            // alone is rolled back and answered with the error.
                            Err(e @ $crate::Error::Database(_)) => Made::Failed(e),
                            // The connection or the disk: the whole batch fails.
                            Err(e) => return Err(e),
                        };
                        if !matches!(outcome, Made::New(_)) {
                            // Undo its thread and lane (the task was not written).
                            sqlx::query("ROLLBACK TO c").execute(&mut **conn).await?;
                            sqlx::query("RELEASE c").execute(&mut **conn).await?;
                            open = false;
                        }
                        made.push(outcome);
                    }
                    if open {
                        g.qb.push("RELEASE c");
                        let _ = g.end(0);
                    }
                    let events: Vec<keel_core::event::NewEvent> = batch
                        .iter()
                        .zip(&made)
                        .filter(|(_, m)| matches!(m, Made::New(_)))
                        .flat_map(|(w, _)| w.task.events.iter().cloned())
                        .collect();
                    Self::append_events_gathered(&mut **conn, &mut g, &events, true).await
                }
                .await;
                let mut events = match committed {
                    Ok(events) => {
                        conn.give_back();
                        events.into_iter()
                    }
                    Err(e) => {
                        if sqlx::query("ROLLBACK").execute(&mut **conn).await.is_ok() {
                            conn.give_back();
                        }
                        // Every creation of the batch failed with it.
                        let detail = e.to_string();
                        for w in batch {
                            let again = match &e {
                                $crate::Error::Unavailable(_) => $crate::Error::Unavailable(sqlx::Error::Protocol(detail.clone())),
                                _ => $crate::Error::Database(sqlx::Error::Protocol(detail.clone())),
                            };
                            let _ = w.reply.send(Err(again));
                        }
                        return;
                    }
                };
                for (w, m) in batch.into_iter().zip(made) {
                    let answer = match m {
                        Made::New(task) => Ok(Created::New(task, events.by_ref().take(w.task.events.len()).collect())),
                        Made::LostRace => self.task_created_first(&w.task).await,
                        Made::NotFound => Err($crate::Error::NotFound { what: "thread" }),
                        Made::Failed(e) => Err(e),
                    };
                    let _ = w.reply.send(answer);
                }
            }

            /// The claim skipped agents already at their concurrency limit; one batch can
            /// still take more of an agent's tasks than it has room for. The agents' rows
            /// are locked (serialising claims for them across instances), their running
            /// tasks counted, and the excess of `tasks` (sorted by priority, highest first)
            /// given back; returns the ids given back.
            async fn give_back_over_limit(
                tx: &mut sqlx::Transaction<'_, $db>,
                tasks: &[$crate::runtime::TaskRecord],
                now: time::OffsetDateTime,
            ) -> $crate::Result<Vec<keel_core::id::TaskId>> {
                let mut agents: Vec<keel_core::id::AgentId> = tasks.iter().map(|t| t.agent_id).collect();
                agents.sort_unstable();
                agents.dedup();
                let mut excess = Vec::new();
                if !agents.is_empty() {
                    // One round trip for the batch's agents with a limit (usually none),
                    // locked in id order.
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "SELECT id, max_concurrency FROM agents WHERE max_concurrency IS NOT NULL AND id IN (",
                    );
                    let ids: Vec<uuid::Uuid> = agents.iter().map(|a| a.as_uuid()).collect();
                    let persistent = $crate::sql::push_id_list(&mut qb, &ids);
                    qb.push(") ORDER BY id").push(Self::LOCK_ROWS);
                    let limited: Vec<(uuid::Uuid, i64)> = qb.build_query_as().persistent(persistent).fetch_all(&mut **tx).await?;
                    for (agent, limit) in limited {
                        let agent = keel_core::id::AgentId::from_uuid(agent);
                        let running: i64 = sqlx::query_scalar(
                            "SELECT count(*) FROM tasks WHERE agent_id = $1 AND lease_owner IS NOT NULL AND lease_until >= $2",
                        )
                        .bind(agent.as_uuid())
                        .bind(now)
                        .fetch_one(&mut **tx)
                        .await?;
                        let over = usize::try_from(running - limit).unwrap_or(0);
                        // The lowest-priority of this batch's tasks of the agent go back.
                        excess.extend(tasks.iter().rev().filter(|t| t.agent_id == agent).take(over).map(|t| t.id));
                    }
                }
                if !excess.is_empty() {
                    let mut qb = sqlx::QueryBuilder::<$db>::new("UPDATE tasks SET lease_owner = NULL, lease_until = NULL WHERE id IN (");
                    let ids: Vec<uuid::Uuid> = excess.iter().map(|t| t.as_uuid()).collect();
                    let persistent = $crate::sql::push_id_list(&mut qb, &ids);
                    qb.push(")");
                    qb.build().persistent(persistent).execute(&mut **tx).await?;
                }
                Ok(excess)
            }

            async fn task_in(
                conn: &mut <$db as sqlx::Database>::Connection,
                workspace: keel_core::id::WorkspaceId,
                id: keel_core::id::TaskId,
            ) -> $crate::Result<$crate::runtime::TaskRecord> {
                let row = sqlx::query(concat!("SELECT ", $crate::runtime::task_columns!(), " FROM tasks WHERE id = $1 AND workspace_id = $2"))
                    .bind(id.as_uuid())
                    .bind(workspace.as_uuid())
                    .fetch_optional(&mut *conn)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "task" })?;
                Self::task_from_row(&row)
            }

            /// Appends messages to a thread (allocating their seqs under the thread's row
            /// lock).
            async fn append_messages(
                conn: &mut <$db as sqlx::Database>::Connection,
                workspace: keel_core::id::WorkspaceId,
                thread: keel_core::id::ThreadId,
                task: keel_core::id::TaskId,
                run: keel_core::id::RunId,
                messages: &[$crate::runtime::NewMessage],
                now: time::OffsetDateTime,
            ) -> $crate::Result<()> {
                if messages.is_empty() {
                    return Ok(());
                }
                let n = i64::try_from(messages.len()).unwrap_or(i64::MAX);
                // Seqs start at 1, so `after = 0` reads a thread from its start: the range
                // handed out is next_seq + 1 ..= next_seq + n, the last message `back` 0.
                let mut g = $crate::sql::Gather::<$db>::new(Self::GATHERS_WRITES);
                Self::hand_out_seqs(&mut *conn, &mut g, &[(thread.as_uuid(), n)]).await?;
                let rows: Vec<$crate::runtime::MessageRow> = (0..n)
                    .rev()
                    .zip(messages)
                    .map(|(back, m)| $crate::runtime::MessageRow {
                        thread: thread.as_uuid(),
                        back,
                        workspace: workspace.as_uuid(),
                        task: task.as_uuid(),
                        run: run.as_uuid(),
                        body: m.body.to_string(),
                        tokens: m.tokens,
                    })
                    .collect();
                Self::insert_messages(&mut *conn, &mut g, &rows, now).await?;
                Self::run_gathered(&mut *conn, &mut g).await?;
                Ok(())
            }

            /// Hands out `n` seqs on each `(thread, n)`: one update, which reads nothing
            /// back and waits in `g` for the messages' inserts (each counts its seq back
            /// from the `next_seq` it leaves; see `MessageRow`).
            async fn hand_out_seqs(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                wanted: &[(uuid::Uuid, i64)],
            ) -> $crate::Result<()> {
                if wanted.is_empty() {
                    return Ok(());
                }
                Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(wanted.len())).await?;
                g.qb.push("UPDATE threads SET next_seq = next_seq + v.column2 FROM (");
                Self::push_seq_values(&mut g.qb, wanted);
                g.qb.push(") AS v WHERE threads.id = v.column1");
                if g.end($crate::sql::padded_rows(wanted.len())) {
                    Self::run_gathered(conn, g).await?;
                }
                Ok(())
            }

            /// The `(thread, n)` rows (padded) of a thread update's `VALUES` list.
            fn push_seq_values(qb: &mut sqlx::QueryBuilder<$db>, seqs: &[(uuid::Uuid, i64)]) {
                qb.push_values($crate::sql::padded(seqs), |mut row, w| {
                    row.push_bind(w.map(|w| w.0)).push_bind(w.map(|w| w.1));
                });
            }

            /// The message rows (padded) of a messages insert's `VALUES` list.
            fn push_message_values(
                qb: &mut sqlx::QueryBuilder<$db>,
                rows: &[$crate::runtime::MessageRow],
                now: time::OffsetDateTime,
            ) {
                qb.push_values($crate::sql::padded(rows), |mut row, m| {
                    row.push_bind(m.map(|m| m.thread))
                        .push_bind(m.map(|m| m.back))
                        .push_bind(m.map(|m| m.workspace))
                        .push_bind(m.map(|m| m.task))
                        .push_bind(m.map(|m| m.run))
                        .push_bind(m.map(|m| m.body.clone()))
                        .push_bind(m.map(|m| m.tokens))
                        .push_bind(now);
                });
            }

            async fn insert_messages(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                rows: &[$crate::runtime::MessageRow],
                now: time::OffsetDateTime,
            ) -> $crate::Result<()> {
                for chunk in rows.chunks($crate::sql::chunk_rows(Self::GATHERS_WRITES, $crate::runtime::ROW_BATCH)) {
                    Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(chunk.len())).await?;
                    g.start_statement();
                    g.qb.push(
                        "INSERT INTO messages (thread_id, seq, workspace_id, task_id, run_id, body, tokens, created_at) \
                         SELECT v.column1, (SELECT t.next_seq FROM threads t WHERE t.id = v.column1) - v.column2, \
                         v.column3, v.column4, v.column5, v.column6, v.column7, v.column8 FROM (",
                    );
                    Self::push_message_values(&mut g.qb, chunk, now);
                    g.qb.push(") AS v WHERE v.column1 IS NOT NULL");
                    if g.end($crate::sql::padded_rows(chunk.len())) {
                        Self::run_gathered(conn, g).await?;
                    }
                }
                Ok(())
            }

            /// Hands out the seqs in `seqs` (`(thread, n)`, see [`Self::hand_out_seqs`]) and
            /// inserts `rows`, which count back from them. With
            /// [`CHAINS_WRITES`](Self::CHAINS_WRITES) the thread update is a CTE
            /// of the first chunk's insert, which counts back from the `next_seq` it
            /// returns: one round trip for both. Else `seqs` was handed out already.
            async fn insert_messages_after_seqs(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                seqs: &[(uuid::Uuid, i64)],
                rows: &[$crate::runtime::MessageRow],
                now: time::OffsetDateTime,
            ) -> $crate::Result<()> {
                if !Self::CHAINS_WRITES || seqs.is_empty() || rows.is_empty() {
                    return Self::insert_messages(conn, g, rows, now).await;
                }
                let (first, rest) = rows.split_at(rows.len().min($crate::runtime::ROW_BATCH));
                // Kept prepared while each part is (as the two statements it replaces
                // were): its text is one of a few per pair of padded lengths.
                let shape = $crate::sql::padded_rows(seqs.len()).max($crate::sql::padded_rows(first.len()));
                Self::gather_room(&mut *conn, g, shape).await?;
                let lead = g.with_keyword();
                g.qb.push(lead).push("seqs AS (UPDATE threads SET next_seq = next_seq + v.column2 FROM (");
                Self::push_seq_values(&mut g.qb, seqs);
                // A message whose thread the update did not find gets no seq, and the
                // insert fails (seq is NOT NULL), as the subquery's would.
                g.qb.push(
                    ") AS v WHERE threads.id = v.column1 RETURNING threads.id, threads.next_seq) \
                     INSERT INTO messages (thread_id, seq, workspace_id, task_id, run_id, body, tokens, created_at) \
                     SELECT v.column1, s.next_seq - v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8 FROM (",
                );
                Self::push_message_values(&mut g.qb, first, now);
                g.qb.push(") AS v LEFT JOIN seqs s ON s.id = v.column1 WHERE v.column1 IS NOT NULL");
                if g.end(shape) {
                    Self::run_gathered(&mut *conn, g).await?;
                }
                // Later chunks read the next_seq the update left.
                Self::insert_messages(conn, g, rest, now).await
            }

            async fn insert_steps(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                rows: &[$crate::runtime::StepRow],
                now: time::OffsetDateTime,
            ) -> $crate::Result<()> {
                for chunk in rows.chunks($crate::sql::chunk_rows(Self::GATHERS_WRITES, $crate::runtime::ROW_BATCH)) {
                    Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(chunk.len())).await?;
                    g.open_write();
                    g.qb.push("INSERT INTO steps (task_id, idx, run_id, workspace_id, kind, data, created_at) SELECT * FROM (");
                    g.qb.push_values($crate::sql::padded(chunk), |mut row, s| {
                        row.push_bind(s.map(|s| s.task))
                            .push_bind(s.map(|s| s.idx))
                            .push_bind(s.map(|s| s.run))
                            .push_bind(s.map(|s| s.workspace))
                            .push_bind(s.map(|s| s.kind.clone()))
                            .push_bind(s.map(|s| s.data.clone()))
                            .push_bind(now);
                    });
                    g.qb.push(") AS v WHERE v.column1 IS NOT NULL");
                    if g.end_write($crate::sql::padded_rows(chunk.len())) {
                        Self::run_gathered(conn, g).await?;
                    }
                }
                Ok(())
            }

            async fn insert_usage_in(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                records: &[&$crate::UsageRecord],
            ) -> $crate::Result<()> {
                use $crate::usage::to_i64;
                for batch in records.chunks($crate::sql::chunk_rows(Self::GATHERS_WRITES, $crate::sql::USAGE_BATCH)) {
                    Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(batch.len())).await?;
                    g.open_write();
                    g.qb.push(
                        "INSERT INTO usage_records (id, workspace_id, api_key_id, route, provider, upstream_model, \
                         target, input_tokens, output_tokens, cached_tokens, cost_nanousd, latency_ms, ttft_ms, \
                         cache_hit, estimated, outcome, created_at) SELECT * FROM (",
                    );
                    g.qb.push_values($crate::sql::padded(batch), |mut row, r| {
                        row.push_bind(r.map(|_| uuid::Uuid::now_v7()))
                            .push_bind(r.map(|r| r.workspace_id.as_uuid()))
                            .push_bind(r.and_then(|r| r.api_key_id.map(|k| k.as_uuid())))
                            .push_bind(r.map(|r| r.route.clone()))
                            .push_bind(r.map(|r| r.provider.clone()))
                            .push_bind(r.map(|r| r.upstream_model.clone()))
                            .push_bind(r.map(|r| r.target.clone()))
                            .push_bind(r.map(|r| to_i64(r.input_tokens)))
                            .push_bind(r.map(|r| to_i64(r.output_tokens)))
                            .push_bind(r.map(|r| to_i64(r.cached_tokens)))
                            .push_bind(r.map(|r| to_i64(r.cost_nanousd)))
                            .push_bind(r.map(|r| to_i64(r.latency_ms)))
                            .push_bind(r.and_then(|r| r.ttft_ms.map(to_i64)))
                            .push_bind(r.map(|r| r.cache_hit))
                            .push_bind(r.map(|r| r.estimated))
                            .push_bind(r.map(|r| r.outcome.clone()))
                            .push_bind(r.map(|r| r.created_at));
                    });
                    g.qb.push(") AS v WHERE v.column1 IS NOT NULL");
                    if g.end_write($crate::sql::padded_rows(batch.len())) {
                        Self::run_gathered(conn, g).await?;
                    }
                }
                Ok(())
            }

            /// Stores the checkpoints at `order` (at most one per task) inside `tx`, with a
            /// fixed number of statements whatever their number: each phase (starts, fenced
            /// progress, thread sequences, finishes) is one set-based statement over all of
            /// them; their step and message rows are left for the caller to insert. Each
            /// gets `Some(step index)`, or `None` when its lease is lost.
            /// A checkpoint batch's writes on `conn`, inside a transaction begun by the
            /// caller (with `commit`, begun by hand and ended here, in the last query):
            /// each checkpoint's step index (`None`: lease lost), how many of the events
            /// are its, and the events as stored.
            async fn checkpoints_in(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                batch: &[$crate::runtime::Checkpoint],
                commit: bool,
            ) -> $crate::Result<$crate::runtime::BatchWrites> {
                let now = $crate::now();
                // Task rows in id order (see the module's lock order).
                let mut order: Vec<usize> = (0..batch.len()).collect();
                order.sort_by_key(|&i| (batch[i].task_id, i));
                let mut step_rows = Vec::with_capacity(batch.len());
                let mut messages = $crate::runtime::RoundMessages::default();
                // A task twice in one batch (never the engine's doing: a run waits for each
                // commit) is stored in rounds: its first checkpoint with the others' in the
                // first round, its second in the next, and so on, in batch order.
                let mut rounds: Vec<Vec<usize>> = Vec::new();
                for (k, &i) in order.iter().enumerate() {
                    let nth = order[..k].iter().rev().take_while(|&&j| batch[j].task_id == batch[i].task_id).count();
                    if rounds.len() <= nth {
                        rounds.push(Vec::new());
                    }
                    rounds[nth].push(i);
                }
                let mut idx: Vec<Option<Option<i64>>> = vec![None; batch.len()];
                // The batch's writes that read nothing back (finishes, steps, messages,
                // usage, events) wait in `g` to run together where the database allows.
                let last = rounds.len().saturating_sub(1);
                for (r, round) in rounds.iter().enumerate() {
                    let got = Self::checkpoints_set_in(&mut *conn, g, batch, round, now, &mut step_rows, &mut messages).await?;
                    for &i in round {
                        idx[i] = got[i];
                    }
                    if r == last {
                        // Every run's step rows in one statement (its messages: one per
                        // round), and the usage; where writes chain, both ride in the
                        // last round's messages' statement — not in the events' append,
                        // which holds the workspace's event head while it runs.
                        Self::insert_steps(&mut *conn, g, &step_rows, now).await?;
                        let usage: Vec<&$crate::UsageRecord> = batch.iter().zip(&idx)
                            .filter(|(_, stored)| stored.is_some())
                            .filter_map(|(c, _)| c.usage.as_ref())
                            .collect();
                        Self::insert_usage_in(&mut *conn, g, &usage).await?;
                    }
                    // A round's messages count their seqs back from the next_seq its
                    // threads' update leaves, so they go in before the next round's.
                    Self::insert_messages_after_seqs(&mut *conn, g, &messages.seqs, &messages.rows, now).await?;
                    messages.rows.clear();
                    messages.seqs.clear();
                }
                if Self::CHAINS_WRITES {
                    // Chained writes with no messages to ride with run on their own, still
                    // before the append.
                    Self::run_gathered(&mut *conn, g).await?;
                }
                let mut counts = Vec::with_capacity(batch.len());
                let mut all = Vec::new();
                for (c, stored) in batch.iter().zip(&idx) {
                    if stored.is_some() {
                        counts.push(c.events.len());
                        all.extend(c.events.iter().cloned());
                    } else {
                        counts.push(0);
                    }
                }
                let events = Self::append_events_gathered(&mut *conn, g, &all, commit).await?;
                Ok((idx, counts, events))
            }

            async fn checkpoints_set_in(
                conn: &mut <$db as sqlx::Database>::Connection,
                g: &mut $crate::sql::Gather<$db>,
                batch: &[$crate::runtime::Checkpoint],
                order: &[usize],
                now: time::OffsetDateTime,
                step_rows: &mut Vec<$crate::runtime::StepRow>,
                messages: &mut $crate::runtime::RoundMessages,
            ) -> $crate::Result<Vec<Option<Option<i64>>>> {
                use sqlx::Row as _;
                use $crate::runtime::Finish;
                let mut idx: Vec<Option<Option<i64>>> = vec![None; batch.len()];
                if !Self::LOCK_ROWS.is_empty() {
                    // Tasks, then threads, locked in id order up front (the module's lock
                    // order); the set-based statements below find them held.
                    let tasks: Vec<uuid::Uuid> = order.iter().map(|&i| batch[i].task_id.as_uuid()).collect();
                    let mut threads: Vec<uuid::Uuid> = order
                        .iter()
                        .filter(|&&i| !batch[i].messages.is_empty())
                        .map(|&i| batch[i].thread_id.as_uuid())
                        .collect();
                    threads.sort_unstable();
                    threads.dedup();
                    // Both in one round trip: the threads' scan is gated on a count of the
                    // locked tasks (a one-time filter, evaluated before the scan's first
                    // row, also when it finds none), so every task is locked before any
                    // thread is.
                    let mut qb = sqlx::QueryBuilder::<$db>::new("WITH locked AS MATERIALIZED (SELECT id FROM tasks WHERE id IN (");
                    let mut persistent = $crate::sql::push_id_list(&mut qb, &tasks);
                    qb.push(") ORDER BY id").push(Self::LOCK_ROWS).push(") ");
                    if threads.is_empty() {
                        qb.push("SELECT id FROM locked");
                    } else {
                        qb.push("SELECT id FROM threads WHERE id IN (");
                        persistent &= $crate::sql::push_id_list(&mut qb, &threads);
                        qb.push(") AND (SELECT count(*) FROM locked) >= 0 ORDER BY id").push(Self::LOCK_ROWS);
                    }
                    qb.build().persistent(persistent).fetch_all(&mut *conn).await?;
                }

                // Starts: the task becomes working under the new run, fenced by the lease.
                let mut live = vec![true; batch.len()];
                let starts: Vec<usize> = order.iter().copied().filter(|&i| batch[i].start.is_some()).collect();
                if !starts.is_empty() {
                    // The statements that read something back run with whatever waits in
                    // `g` (on SQLite, the transaction's BEGIN): one round trip.
                    Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(starts.len())).await?;
                    let qb = &mut g.qb;
                    qb.push("UPDATE tasks SET status = 'working', started_at = COALESCE(started_at, ");
                    qb.push_bind(now).push("), updated_at = ").push_bind(now)
                        .push(", attempts = attempts + 1, run_id = v.column3 FROM (");
                    qb.push_values($crate::sql::padded(&starts), |mut row, i| {
                        let c = i.map(|&i| &batch[i]);
                        row.push_bind(c.map(|c| c.task_id.as_uuid()))
                            .push_bind(c.map(|c| c.owner))
                            .push_bind(c.and_then(|c| c.start.map(|r| r.as_uuid())));
                    });
                    qb.push(") AS v WHERE tasks.id = v.column1 AND tasks.lease_owner = v.column2 AND tasks.queued \
                             AND tasks.status IN ('submitted', 'working') RETURNING id, attempts");
                    let _ = g.end($crate::sql::padded_rows(starts.len()));
                    let rows = Self::run_gathered(&mut *conn, g).await?;
                    let mut attempts: std::collections::HashMap<uuid::Uuid, i64> = std::collections::HashMap::with_capacity(rows.len());
                    for row in &rows {
                        attempts.insert(row.try_get("id")?, row.try_get("attempts")?);
                    }
                    let mut runs = Vec::with_capacity(starts.len());
                    for &i in &starts {
                        match attempts.get(&batch[i].task_id.as_uuid()) {
                            Some(&attempt) => runs.push((i, attempt)),
                            None => live[i] = false,
                        }
                    }
                    if !runs.is_empty() {
                        Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(runs.len())).await?;
                        let qb = &mut g.qb;
                        qb.push("INSERT INTO runs (id, task_id, workspace_id, attempt, status, started_at) SELECT * FROM (");
                        qb.push_values($crate::sql::padded(&runs), |mut row, run| {
                            let c = run.map(|&(i, _)| &batch[i]);
                            row.push_bind(c.and_then(|c| c.start.map(|r| r.as_uuid())))
                                .push_bind(c.map(|c| c.task_id.as_uuid()))
                                .push_bind(c.map(|c| c.workspace_id.as_uuid()))
                                .push_bind(run.map(|&(_, attempt)| attempt))
                                .push_bind("working")
                                .push_bind(now);
                        });
                        qb.push(") AS v WHERE v.column1 IS NOT NULL");
                        if g.end($crate::sql::padded_rows(runs.len())) {
                            Self::run_gathered(&mut *conn, g).await?;
                        }
                    }
                }

                // Progress, fenced by lease and run; what it returns is each step's index.
                let going: Vec<usize> = order.iter().copied().filter(|&i| live[i]).collect();
                if going.is_empty() {
                    return Ok(idx);
                }
                Self::gather_room(&mut *conn, g, $crate::sql::padded_rows(going.len())).await?;
                let qb = &mut g.qb;
                qb.push(
                    "UPDATE tasks SET steps = steps + v.column4, tool_calls = tool_calls + v.column5, \
                     input_tokens = input_tokens + v.column6, output_tokens = output_tokens + v.column7, \
                     cost_nanousd = cost_nanousd + v.column8, updated_at = ",
                );
                qb.push_bind(now).push(" FROM (");
                qb.push_values($crate::sql::padded(&going), |mut row, i| {
                    let c = i.map(|&i| &batch[i]);
                    row.push_bind(c.map(|c| c.task_id.as_uuid()))
                        .push_bind(c.map(|c| c.owner))
                        .push_bind(c.map(|c| c.run_id.as_uuid()))
                        .push_bind(c.map(|c| i64::from(c.step.is_some())))
                        .push_bind(c.map(|c| c.tool_calls))
                        .push_bind(c.map(|c| c.input_tokens))
                        .push_bind(c.map(|c| c.output_tokens))
                        .push_bind(c.map(|c| c.cost_nanousd));
                });
                qb.push(") AS v WHERE tasks.id = v.column1 AND tasks.lease_owner = v.column2 AND tasks.run_id = v.column3 \
                         AND tasks.status = 'working' RETURNING id, steps");
                let _ = g.end($crate::sql::padded_rows(going.len()));
                let rows = Self::run_gathered(&mut *conn, g).await?;
                let mut steps: std::collections::HashMap<uuid::Uuid, i64> = std::collections::HashMap::with_capacity(rows.len());
                for row in &rows {
                    steps.insert(row.try_get("id")?, row.try_get("steps")?);
                }
                let stored: Vec<usize> = going
                    .into_iter()
                    .filter(|&i| {
                        let c = &batch[i];
                        match steps.get(&c.task_id.as_uuid()) {
                            Some(&n) => {
                                idx[i] = Some(c.step.as_ref().map(|_| n - 1));
                                true
                            }
                            None => false,
                        }
                    })
                    .collect();

                // Thread sequences: one range per thread for the whole batch, shared out
                // in task order.
                let mut wanted: Vec<(uuid::Uuid, i64)> = Vec::new();
                for &i in &stored {
                    let c = &batch[i];
                    if c.messages.is_empty() {
                        continue;
                    }
                    let n = i64::try_from(c.messages.len()).unwrap_or(i64::MAX);
                    match wanted.iter_mut().find(|(t, _)| *t == c.thread_id.as_uuid()) {
                        Some((_, total)) => *total += n,
                        None => wanted.push((c.thread_id.as_uuid(), n)),
                    }
                }
                // Where the database allows, the seqs are handed out by the messages'
                // insert (`insert_messages_after_seqs`); else now.
                if Self::CHAINS_WRITES {
                    messages.seqs.clone_from(&wanted);
                } else {
                    Self::hand_out_seqs(&mut *conn, g, &wanted).await?;
                }
                // What is still to be handed out per thread, counted down in task order.
                let mut left: std::collections::HashMap<uuid::Uuid, i64> = wanted.into_iter().collect();
                for &i in &stored {
                    let c = &batch[i];
                    if let (Some((kind, data)), Some(Some(step))) = (&c.step, idx[i]) {
                        step_rows.push($crate::runtime::StepRow {
                            task: c.task_id.as_uuid(),
                            idx: step,
                            run: c.run_id.as_uuid(),
                            workspace: c.workspace_id.as_uuid(),
                            kind: kind.clone(),
                            data: data.to_string(),
                        });
                    }
                    if c.messages.is_empty() {
                        continue;
                    }
                    let Some(rest) = left.get_mut(&c.thread_id.as_uuid()) else {
                        return Err($crate::Error::Corrupt { what: "thread", detail: "a message's thread had no seq range counted".to_owned() });
                    };
                    messages.rows.extend(c.messages.iter().map(|m| {
                        *rest -= 1;
                        (*rest, m)
                    }).map(|(back, m)| $crate::runtime::MessageRow {
                        thread: c.thread_id.as_uuid(),
                        back,
                        workspace: c.workspace_id.as_uuid(),
                        task: c.task_id.as_uuid(),
                        run: c.run_id.as_uuid(),
                        body: m.body.to_string(),
                        tokens: m.tokens,
                    }));
                }

                // Finishes: the task's new state and its lease given up, and the run's end.
                struct Ending<'a> {
                    i: usize,
                    task_status: &'static str,
                    run_status: &'static str,
                    queued: bool,
                    dead: bool,
                    output: Option<&'a str>,
                    error: Option<String>,
                    run_at: time::OffsetDateTime,
                    finished: Option<time::OffsetDateTime>,
                }
                let endings: Vec<Ending<'_>> = stored
                    .iter()
                    .filter_map(|&i| {
                        let e = |task_status, run_status, queued, dead, output, error, run_at, finished| Ending {
                            i, task_status, run_status, queued, dead, output, error, run_at, finished,
                        };
                        Some(match batch[i].finish.as_ref()? {
                            Finish::Completed { output } => e("completed", "completed", false, false, output.as_deref(), None, now, Some(now)),
                            Finish::InputRequired => e("input-required", "input-required", false, false, None, None, now, None),
                            Finish::Retry { error, retry_at } => e("working", "failed", true, false, None, Some(error.to_string()), *retry_at, None),
                            Finish::Failed { error, dead_letter } => e("failed", "failed", false, *dead_letter, None, Some(error.to_string()), now, Some(now)),
                        })
                    })
                    .collect();
                if !endings.is_empty() {
                    // Nothing is read back: both statements wait in `g` for the batch's
                    // other writes.
                    let rows = $crate::sql::padded_rows(endings.len());
                    Self::gather_room(&mut *conn, g, rows).await?;
                    g.qb.push(
                        "UPDATE tasks SET status = v.column2, queued = v.column3, dead_lettered = v.column4, \
                         output = COALESCE(v.column5, output), error = COALESCE(v.column6, error), run_at = v.column7, \
                         finished_at = v.column8, lease_owner = NULL, lease_until = NULL, \
                         errored_at = CASE WHEN v.column6 IS NULL THEN errored_at ELSE ",
                    );
                    g.qb.push_bind(now).push(" END FROM (");
                    g.qb.push_values($crate::sql::padded(&endings), |mut row, e| {
                        row.push_bind(e.map(|e| batch[e.i].task_id.as_uuid()))
                            .push_bind(e.map(|e| e.task_status))
                            .push_bind(e.map(|e| e.queued))
                            .push_bind(e.map(|e| e.dead))
                            .push_bind(e.and_then(|e| e.output.map(str::to_owned)))
                            .push_bind(e.and_then(|e| e.error.clone()))
                            .push_bind(e.map(|e| e.run_at))
                            .push_bind(e.and_then(|e| e.finished));
                    });
                    g.qb.push(") AS v WHERE tasks.id = v.column1");
                    if g.end(rows) {
                        Self::run_gathered(&mut *conn, g).await?;
                    }
                    Self::gather_room(&mut *conn, g, rows).await?;
                    g.qb.push(
                        "UPDATE runs SET status = v.column2, error = COALESCE(v.column3, error), finished_at = v.column4 FROM (",
                    );
                    g.qb.push_values($crate::sql::padded(&endings), |mut row, e| {
                        row.push_bind(e.map(|e| batch[e.i].run_id.as_uuid()))
                            .push_bind(e.map(|e| e.run_status))
                            .push_bind(e.and_then(|e| e.error.clone()))
                            .push_bind(e.and_then(|e| (e.run_status != "input-required").then_some(now)));
                    });
                    g.qb.push(") AS v WHERE runs.id = v.column1");
                    if g.end(rows) {
                        Self::run_gathered(&mut *conn, g).await?;
                    }
                }
                Ok(idx)
            }
        }

        #[async_trait::async_trait]
        impl $crate::runtime::RuntimeStore for $store {
            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn put_agent(
                &self,
                workspace: keel_core::id::WorkspaceId,
                name: &str,
                spec: &serde_json::Value,
                create_only: bool,
                update_only: bool,
            ) -> $crate::Result<$crate::runtime::AgentRecord> {
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let existing = sqlx::query(
                    "SELECT id, workspace_id, name, version, spec, created_at, updated_at, deleted_at FROM agents \
                     WHERE workspace_id = $1 AND name = $2",
                )
                .bind(workspace.as_uuid())
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
                let text = spec.to_string();
                // Kept in a column too, for the claim to read without parsing specs.
                let max_concurrency = spec.get("max_concurrency").and_then(serde_json::Value::as_i64);
                let record = match existing {
                    None => {
                        if update_only {
                            return Err($crate::Error::NotFound { what: "agent" });
                        }
                        let id = keel_core::id::AgentId::new();
                        sqlx::query(
                            "INSERT INTO agents (id, workspace_id, name, version, spec, created_at, updated_at, max_concurrency) \
                             VALUES ($1, $2, $3, 1, $4, $5, $5, $6)",
                        )
                        .bind(id.as_uuid())
                        .bind(workspace.as_uuid())
                        .bind(name)
                        .bind(&text)
                        .bind(now)
                        .bind(max_concurrency)
                        .execute(&mut *tx)
                        .await
                        .map_err($crate::sql::conflict_as("agent"))?;
                        $crate::runtime::AgentRecord { id, workspace_id: workspace, name: name.to_owned(), version: 1, spec: spec.clone(), created_at: now, updated_at: now }
                    }
                    Some(row) => {
                        use sqlx::Row as _;
                        let deleted: Option<time::OffsetDateTime> = row.try_get("deleted_at")?;
                        let current = Self::agent_from_row(&row)?;
                        if deleted.is_none() && create_only {
                            return Err($crate::Error::Conflict { what: "agent" });
                        }
                        if deleted.is_some() && update_only {
                            return Err($crate::Error::NotFound { what: "agent" });
                        }
                        if deleted.is_none() && current.spec == *spec {
                            return Ok(current);
                        }
                        let version = current.version + 1;
                        sqlx::query("UPDATE agents SET version = $2, spec = $3, updated_at = $4, deleted_at = NULL, max_concurrency = $5 WHERE id = $1")
                            .bind(current.id.as_uuid())
                            .bind(version)
                            .bind(&text)
                            .bind(now)
                            .bind(max_concurrency)
                            .execute(&mut *tx)
                            .await?;
                        $crate::runtime::AgentRecord { version, spec: spec.clone(), updated_at: now, ..current }
                    }
                };
                sqlx::query("INSERT INTO agent_versions (agent_id, version, spec, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(record.id.as_uuid())
                    .bind(record.version)
                    .bind(&text)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(record)
            }

            async fn agent(&self, workspace: keel_core::id::WorkspaceId, name: &str) -> $crate::Result<$crate::runtime::AgentRecord> {
                let row = sqlx::query(
                    "SELECT id, workspace_id, name, version, spec, created_at, updated_at FROM agents \
                     WHERE workspace_id = $1 AND name = $2 AND deleted_at IS NULL",
                )
                .bind(workspace.as_uuid())
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
                .ok_or($crate::Error::NotFound { what: "agent" })?;
                Self::agent_from_row(&row)
            }

            async fn agent_version(
                &self,
                workspace: keel_core::id::WorkspaceId,
                id: keel_core::id::AgentId,
                version: i64,
            ) -> $crate::Result<$crate::runtime::AgentRecord> {
                let row = sqlx::query(
                    "SELECT a.id, a.workspace_id, a.name, v.version, v.spec, a.created_at, v.created_at AS updated_at \
                     FROM agents a JOIN agent_versions v ON v.agent_id = a.id \
                     WHERE a.workspace_id = $1 AND a.id = $2 AND v.version = $3",
                )
                .bind(workspace.as_uuid())
                .bind(id.as_uuid())
                .bind(version)
                .fetch_optional(&self.pool)
                .await?
                .ok_or($crate::Error::NotFound { what: "agent version" })?;
                Self::agent_from_row(&row)
            }

            async fn list_agents(&self, workspace: keel_core::id::WorkspaceId) -> $crate::Result<Vec<$crate::runtime::AgentRecord>> {
                let rows = sqlx::query(
                    "SELECT id, workspace_id, name, version, spec, created_at, updated_at FROM agents \
                     WHERE workspace_id = $1 AND deleted_at IS NULL ORDER BY name",
                )
                .bind(workspace.as_uuid())
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::agent_from_row).collect()
            }

            async fn delete_agent(&self, workspace: keel_core::id::WorkspaceId, name: &str) -> $crate::Result<()> {
                let done = sqlx::query(
                    "UPDATE agents SET deleted_at = $3 WHERE workspace_id = $1 AND name = $2 AND deleted_at IS NULL",
                )
                .bind(workspace.as_uuid())
                .bind(name)
                .bind($crate::now())
                .execute(&self.writer)
                .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::Error::NotFound { what: "agent" });
                }
                Ok(())
            }

            async fn create_thread(
                &self,
                workspace: keel_core::id::WorkspaceId,
                metadata: &serde_json::Value,
            ) -> $crate::Result<$crate::runtime::ThreadRecord> {
                let thread = $crate::runtime::ThreadRecord {
                    id: keel_core::id::ThreadId::new(),
                    workspace_id: workspace,
                    metadata: metadata.clone(),
                    messages: 0,
                    created_at: $crate::now(),
                };
                sqlx::query("INSERT INTO threads (id, workspace_id, metadata, next_seq, created_at) VALUES ($1, $2, $3, 0, $4)")
                    .bind(thread.id.as_uuid())
                    .bind(workspace.as_uuid())
                    .bind(metadata.to_string())
                    .bind(thread.created_at)
                    .execute(&self.writer)
                    .await?;
                Ok(thread)
            }

            async fn thread(&self, workspace: keel_core::id::WorkspaceId, id: keel_core::id::ThreadId) -> $crate::Result<$crate::runtime::ThreadRecord> {
                let row = sqlx::query("SELECT id, workspace_id, metadata, next_seq, created_at FROM threads WHERE id = $1 AND workspace_id = $2")
                    .bind(id.as_uuid())
                    .bind(workspace.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::Error::NotFound { what: "thread" })?;
                Self::thread_from_row(&row)
            }

            async fn thread_messages(
                &self,
                workspace: keel_core::id::WorkspaceId,
                id: keel_core::id::ThreadId,
                after: i64,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::runtime::MessageRecord>> {
                // The thread must be this workspace's: another's is NotFound, not empty.
                self.thread(workspace, id).await?;
                let rows = sqlx::query(
                    "SELECT seq, task_id, run_id, body, tokens, created_at FROM messages \
                     WHERE thread_id = $1 AND workspace_id = $2 AND seq > $3 ORDER BY seq LIMIT $4",
                )
                .bind(id.as_uuid())
                .bind(workspace.as_uuid())
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::message_from_row).collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn create_task(&self, t: $crate::runtime::NewTask) -> $crate::Result<$crate::runtime::Created> {
                use $crate::runtime::Created;
                if let Some(key) = &t.idempotency_key
                    && let Some(task) = self.task_by_key(t.workspace_id.as_uuid(), key).await?
                {
                    return Ok(Created::Existing(Box::new(task)));
                }
                // Held until the creation has committed or failed (see `admission.rs`).
                let _admitted = match self.queue.admit(t.max_queued, || self.queued_count()).await? {
                    $crate::admission::Admission::Admitted(ticket) => ticket,
                    $crate::admission::Admission::Full { queued } => return Ok(Created::QueueFull { queued }),
                };
                if Self::CREATES_AT_ONCE
                    && let Some(created) = self.create_task_at_once(&t).await?
                {
                    return Ok(created);
                }
                if Self::GATHERS_WRITES {
                    return self.create_task_batched(t).await;
                }
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let thread_id = match t.thread_id {
                    Some(id) => {
                        let found: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM threads WHERE id = $1 AND workspace_id = $2")
                            .bind(id.as_uuid())
                            .bind(t.workspace_id.as_uuid())
                            .fetch_optional(&mut *tx)
                            .await?;
                        found.ok_or($crate::Error::NotFound { what: "thread" })?;
                        id
                    }
                    None => {
                        let id = keel_core::id::ThreadId::new();
                        sqlx::query("INSERT INTO threads (id, workspace_id, metadata, next_seq, created_at) VALUES ($1, $2, '{}', 0, $3)")
                            .bind(id.as_uuid())
                            .bind(t.workspace_id.as_uuid())
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        id
                    }
                };
                let vt: i64 = sqlx::query_scalar(Self::LANE_SQL)
                    .bind(t.workspace_id.as_uuid())
                    .fetch_one(&mut *tx)
                    .await?;
                let inserted = sqlx::query(concat!(
                    "INSERT INTO tasks (", $crate::runtime::task_columns!(), ") VALUES ",
                    "($1, $2, $3, $4, $5, $6, $7, $8, 'submitted', $9, $10, $11, $12, NULL, NULL, 0, $13, NULL, 0, 0, 0, 0, 0, ",
                    "TRUE, $14, $15, NULL, NULL, FALSE, $15, NULL, $15, NULL)"
                ))
                .bind(t.id.as_uuid())
                .bind(t.workspace_id.as_uuid())
                .bind(t.agent_id.as_uuid())
                .bind(&t.agent_name)
                .bind(t.agent_version)
                .bind(thread_id.as_uuid())
                .bind(t.parent_task_id.map(|p| p.as_uuid()))
                .bind(t.depth)
                .bind(t.priority.rank())
                .bind(t.input.to_string())
                .bind(t.metadata.to_string())
                .bind(t.idempotency_key.as_deref())
                .bind(t.max_attempts)
                .bind(vt)
                .bind(now)
                .execute(&mut *tx)
                .await;
                match inserted {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                        // A concurrent request with the same key won the race.
                        drop(tx);
                        return self.task_created_first(&t).await;
                    }
                    Err(e) => return Err(e.into()),
                }
                // Events last: their workspace's head stays locked until the commit.
                let task = Self::task_in(&mut *tx, t.workspace_id, t.id).await?;
                let events = Self::append_events_tx(&mut tx, &t.events).await?;
                tx.commit().await?;
                Ok(Created::New(Box::new(task), events))
            }

            async fn task(&self, workspace: keel_core::id::WorkspaceId, id: keel_core::id::TaskId) -> $crate::Result<$crate::runtime::TaskRecord> {
                let mut conn = self.pool.acquire().await?;
                Self::task_in(&mut *conn, workspace, id).await
            }

            async fn list_tasks(
                &self,
                workspace: keel_core::id::WorkspaceId,
                filter: &$crate::runtime::TaskFilter,
                before: Option<keel_core::id::TaskId>,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::runtime::TaskRecord>> {
                let mut qb = sqlx::QueryBuilder::<$db>::new(concat!("SELECT ", $crate::runtime::task_columns!(), " FROM tasks WHERE workspace_id = "));
                qb.push_bind(workspace.as_uuid());
                if let Some(status) = filter.status {
                    qb.push(" AND status = ").push_bind(status.as_str());
                }
                if let Some(agent) = &filter.agent {
                    qb.push(" AND agent_name = ").push_bind(agent.clone());
                }
                if let Some(thread) = filter.thread_id {
                    qb.push(" AND thread_id = ").push_bind(thread.as_uuid());
                }
                if filter.dead_lettered {
                    qb.push(" AND dead_lettered");
                }
                if let Some(before) = before {
                    qb.push(" AND id < ").push_bind(before.as_uuid());
                }
                qb.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(limit));
                let rows = qb.build().fetch_all(&self.pool).await?;
                rows.iter().map(Self::task_from_row).collect()
            }

            async fn agent_stats(
                &self,
                workspace: keel_core::id::WorkspaceId,
                agent: keel_core::id::AgentId,
                since: &[time::OffsetDateTime],
            ) -> $crate::Result<$crate::runtime::AgentStats> {
                use sqlx::Row as _;
                let mut stats = $crate::runtime::AgentStats::default();
                let rows = sqlx::query(
                    "SELECT status, count(*) FROM tasks WHERE workspace_id = $1 AND agent_id = $2 \
                     AND status IN ('submitted', 'working', 'input-required') GROUP BY status",
                )
                .bind(workspace.as_uuid())
                .bind(agent.as_uuid())
                .fetch_all(&self.pool)
                .await?;
                for row in &rows {
                    let status: String = row.try_get(0)?;
                    let n = u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0);
                    match status.as_str() {
                        "submitted" => stats.submitted = n,
                        "working" => stats.working = n,
                        _ => stats.input_required = n,
                    }
                }
                for &from in since {
                    let row = sqlx::query(
                        "SELECT count(*), COALESCE(SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), 0) \
                         FROM tasks WHERE agent_id = $1 AND workspace_id = $2 AND finished_at >= $3",
                    )
                    .bind(agent.as_uuid())
                    .bind(workspace.as_uuid())
                    .bind(from)
                    .fetch_one(&self.pool)
                    .await?;
                    let finished = u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0);
                    let completed = u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0);
                    let mut p95_ms = None;
                    if completed > 0 {
                        // The nearest-rank 95th percentile, found by the index, not by reading them all.
                        let rank = i64::try_from((completed * 95).div_ceil(100).saturating_sub(1)).unwrap_or(0);
                        let sql = sqlx::AssertSqlSafe(format!(
                            "SELECT {} AS d FROM tasks WHERE agent_id = $1 AND workspace_id = $2 AND finished_at >= $3 \
                             AND status = 'completed' ORDER BY d LIMIT 1 OFFSET $4",
                            Self::DURATION_MS_EXPR
                        ));
                        let row = sqlx::query(sql)
                            .bind(agent.as_uuid())
                            .bind(workspace.as_uuid())
                            .bind(from)
                            .bind(rank)
                            .fetch_optional(&self.pool)
                            .await?;
                        if let Some(row) = row {
                            p95_ms = Some(u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0));
                        }
                    }
                    stats.windows.push($crate::runtime::WindowStats { finished, completed, p95_ms });
                }
                let row = sqlx::query(concat!(
                    "SELECT ", $crate::runtime::task_columns!(), " FROM tasks WHERE agent_id = $1 AND workspace_id = $2 \
                     AND error IS NOT NULL ORDER BY errored_at DESC LIMIT 1",
                ))
                .bind(agent.as_uuid())
                .bind(workspace.as_uuid())
                .fetch_optional(&self.pool)
                .await?;
                stats.last_error = row.as_ref().map(Self::task_from_row).transpose()?;
                Ok(stats)
            }

            async fn task_steps(&self, workspace: keel_core::id::WorkspaceId, id: keel_core::id::TaskId) -> $crate::Result<Vec<$crate::runtime::StepRecord>> {
                self.task(workspace, id).await?;
                let rows = sqlx::query("SELECT task_id, idx, run_id, kind, data, created_at FROM steps WHERE task_id = $1 AND workspace_id = $2 ORDER BY idx")
                    .bind(id.as_uuid())
                    .bind(workspace.as_uuid())
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(Self::step_from_row).collect()
            }

            async fn task_runs(&self, workspace: keel_core::id::WorkspaceId, id: keel_core::id::TaskId) -> $crate::Result<Vec<$crate::runtime::RunRecord>> {
                self.task(workspace, id).await?;
                let rows = sqlx::query("SELECT id, task_id, attempt, status, error, started_at, finished_at FROM runs WHERE task_id = $1 AND workspace_id = $2 ORDER BY attempt")
                    .bind(id.as_uuid())
                    .bind(workspace.as_uuid())
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(Self::run_from_row).collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn claim_tasks(
                &self,
                owner: uuid::Uuid,
                until: time::OffsetDateTime,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::runtime::TaskRecord>> {
                let now = $crate::now();
                if Self::CLAIMS_AT_ONCE {
                    // Claimed and the queue's clock moved in one statement, committed on
                    // its own. Agents with a concurrency limit are checked after, under
                    // their rows' locks, against what every claim has committed, so two
                    // instances claiming at once still keep within the limit.
                    let rows = sqlx::query(Self::CLAIM_AT_ONCE_SQL)
                        .bind(owner)
                        .bind(until)
                        .bind(now)
                        .bind(i64::from(limit))
                        .fetch_all(&self.writer)
                        .await?;
                    let mut tasks = rows
                        .iter()
                        .map(|row| {
                            let mut task = Self::task_from_row(row)?;
                            task.thread_empty = Some(sqlx::Row::try_get::<i64, _>(row, "thread_next_seq")? == 0);
                            Ok(task)
                        })
                        .collect::<$crate::Result<Vec<_>>>()?;
                    tasks.sort_by_key(|t| (std::cmp::Reverse(t.priority), t.id));
                    let limited = rows
                        .iter()
                        .map(|r| sqlx::Row::try_get::<bool, _>(r, "agent_limited"))
                        .collect::<Result<Vec<bool>, _>>()?;
                    if limited.contains(&true) {
                        let mut tx = self.writer.begin().await?;
                        let excess = Self::give_back_over_limit(&mut tx, &tasks, now).await?;
                        tx.commit().await?;
                        tasks.retain(|t| !excess.contains(&t.id));
                    }
                    return Ok(tasks);
                }
                let mut tx = self.writer.begin().await?;
                let rows = sqlx::query(Self::CLAIM_SQL)
                    .bind(owner)
                    .bind(until)
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(&mut *tx)
                    .await?;
                let mut tasks = rows.iter().map(Self::task_from_row).collect::<$crate::Result<Vec<_>>>()?;
                tasks.sort_by_key(|t| (std::cmp::Reverse(t.priority), t.id));
                let vts: std::collections::HashMap<keel_core::id::TaskId, i64> = rows
                    .iter()
                    .filter_map(|r| {
                        let id = sqlx::Row::try_get::<uuid::Uuid, _>(r, "id").ok()?;
                        Some((keel_core::id::TaskId::from_uuid(id), sqlx::Row::try_get::<i64, _>(r, "vt").ok()?))
                    })
                    .collect();
                let excess = Self::give_back_over_limit(&mut tx, &tasks, now).await?;
                tasks.retain(|t| !excess.contains(&t.id));
                if let Some(vt) = tasks.iter().filter_map(|t| vts.get(&t.id)).max() {
                    sqlx::query(Self::CLOCK_SQL).bind(*vt).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(tasks)
            }

            async fn renew_leases(
                &self,
                owner: uuid::Uuid,
                tasks: &[keel_core::id::TaskId],
                until: time::OffsetDateTime,
            ) -> $crate::Result<Vec<keel_core::id::TaskId>> {
                if tasks.is_empty() {
                    return Ok(Vec::new());
                }
                let mut held = Vec::with_capacity(tasks.len());
                for chunk in tasks.chunks(500) {
                                        // Rows are locked in id order, as a group commit locks them, so a
                    // heartbeat and a commit of the same tasks cannot deadlock.
                    let mut qb = sqlx::QueryBuilder::<$db>::new("UPDATE tasks SET lease_until = ");
                    qb.push_bind(until)
                        .push(" WHERE id IN (SELECT id FROM tasks WHERE lease_owner = ")
                        .push_bind(owner)
                        .push(" AND id IN (");
                    let ids: Vec<uuid::Uuid> = chunk.iter().map(|t| t.as_uuid()).collect();
                    let persistent = $crate::sql::push_id_list(&mut qb, &ids);
                    qb.push(") ORDER BY id").push(Self::LOCK_ROWS).push(") RETURNING id");
                    let rows: Vec<uuid::Uuid> = qb.build_query_scalar().persistent(persistent).fetch_all(&self.writer).await?;
                    held.extend(rows.into_iter().map(keel_core::id::TaskId::from_uuid));
                }
                Ok(held)
            }

            async fn release_leases(&self, owner: uuid::Uuid, tasks: &[keel_core::id::TaskId]) -> $crate::Result<()> {
                for chunk in tasks.chunks(500) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new("UPDATE tasks SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ");
                    qb.push_bind(owner).push(" AND id IN (");
                    let ids: Vec<uuid::Uuid> = chunk.iter().map(|t| t.as_uuid()).collect();
                    let persistent = $crate::sql::push_id_list(&mut qb, &ids);
                    qb.push(")");
                    qb.build().persistent(persistent).execute(&self.writer).await?;
                }
                Ok(())
            }

            async fn expire_all_leases(&self) -> $crate::Result<u64> {
                let done = sqlx::query("UPDATE tasks SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL")
                    .execute(&self.writer)
                    .await?;
                Ok(done.rows_affected())
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn begin_run(&self, b: $crate::runtime::BeginRun) -> $crate::Result<$crate::runtime::RunState> {
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let row = sqlx::query(concat!(
                    "UPDATE tasks SET status = 'working', started_at = COALESCE(started_at, $3), updated_at = $3 ",
                    "WHERE id = $1 AND lease_owner = $2 AND queued AND status IN ('submitted', 'working') RETURNING ",
                    $crate::runtime::task_columns!()
                ))
                .bind(b.task_id.as_uuid())
                .bind(b.owner)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| $crate::Error::State { what: "task", state: "no longer held by this worker".to_owned() })?;
                let mut task = Self::task_from_row(&row)?;
                if let Some((run_id, input)) = &b.new_run {
                    let attempt = task.attempts + 1;
                    sqlx::query("INSERT INTO runs (id, task_id, workspace_id, attempt, status, started_at) VALUES ($1, $2, $3, $4, 'working', $5)")
                        .bind(run_id.as_uuid())
                        .bind(task.id.as_uuid())
                        .bind(task.workspace_id.as_uuid())
                        .bind(attempt)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("UPDATE tasks SET attempts = $2, run_id = $3 WHERE id = $1")
                        .bind(task.id.as_uuid())
                        .bind(attempt)
                        .bind(run_id.as_uuid())
                        .execute(&mut *tx)
                        .await?;
                    task.attempts = attempt;
                    task.run_id = Some(*run_id);
                    Self::append_messages(&mut *tx, task.workspace_id, task.thread_id, task.id, *run_id, input, now).await?;
                }
                let run_id = task.run_id.ok_or_else(|| $crate::Error::State { what: "task", state: "without a run to resume".to_owned() })?;
                let run = sqlx::query("SELECT id, task_id, attempt, status, error, started_at, finished_at FROM runs WHERE id = $1")
                    .bind(run_id.as_uuid())
                    .fetch_one(&mut *tx)
                    .await?;
                let run = Self::run_from_row(&run)?;
                let steps = sqlx::query("SELECT task_id, idx, run_id, kind, data, created_at FROM steps WHERE task_id = $1 AND run_id = $2 ORDER BY idx")
                    .bind(task.id.as_uuid())
                    .bind(run_id.as_uuid())
                    .fetch_all(&mut *tx)
                    .await?;
                let steps = steps.iter().map(Self::step_from_row).collect::<$crate::Result<Vec<_>>>()?;
                // The context: the final runs of the thread's earlier completed tasks, then
                // this run.
                let messages = sqlx::query(
                    "SELECT seq, task_id, run_id, body, tokens, created_at FROM messages m WHERE m.thread_id = $1 AND \
                     (m.run_id = $2 OR m.run_id IN (SELECT t.run_id FROM tasks t WHERE t.thread_id = $1 AND t.status = 'completed' AND t.id < $3)) \
                     ORDER BY seq",
                )
                .bind(task.thread_id.as_uuid())
                .bind(run_id.as_uuid())
                .bind(task.id.as_uuid())
                .fetch_all(&mut *tx)
                .await?;
                let messages = messages.iter().map(Self::message_from_row).collect::<$crate::Result<Vec<_>>>()?;
                let events = Self::append_events_tx(&mut tx, &b.events).await?;
                tx.commit().await?;
                Ok($crate::runtime::RunState { task, run, steps, messages, events })
            }

                        async fn thread_context(
                &self,
                workspace: keel_core::id::WorkspaceId,
                thread: keel_core::id::ThreadId,
                task: keel_core::id::TaskId,
            ) -> $crate::Result<Vec<$crate::runtime::MessageRecord>> {
                let rows = sqlx::query(
                    "SELECT seq, task_id, run_id, body, tokens, created_at FROM messages m WHERE m.thread_id = $1 AND m.workspace_id = $2 AND \
                     m.run_id IN (SELECT t.run_id FROM tasks t WHERE t.thread_id = $1 AND t.status = 'completed' AND t.id < $3) \
                     ORDER BY seq",
                )
                .bind(thread.as_uuid())
                .bind(workspace.as_uuid())
                .bind(task.as_uuid())
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::message_from_row).collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND, checkpoints = batch.len()))]
            async fn commit_checkpoints(&self, batch: &[$crate::runtime::Checkpoint]) -> $crate::Result<Vec<$crate::runtime::Committed>> {
                use $crate::runtime::Committed;
                let mut conn = $crate::sql::CloseUnlessReturned::new(self.writer.acquire().await?);
                let (idx, counts, events) = if Self::GATHERS_WRITES {
                    // SQLite: each query is a round trip to the connection's thread, so the
                    // transaction is begun and committed by hand, in the queries of its
                    // first and last writes (two trips for a step). If this future is
                    // dropped half-way, the connection is closed, not pooled (closing rolls
                    // back); on an error it rolls back here. The events' seqs are read from
                    // the same query as the COMMIT, so a row that failed to decode (a broken
                    // invariant, not a caller's mistake) would be reported after the commit.
                    let mut g = $crate::sql::Gather::<$db>::new(true);
                    g.qb.push("BEGIN IMMEDIATE");
                    let _ = g.end(0);
                    match Self::checkpoints_in(&mut **conn, &mut g, batch, true).await {
                        Ok(done) => {
                            conn.give_back();
                            done
                        }
                        Err(e) => {
                            if sqlx::query("ROLLBACK").execute(&mut **conn).await.is_ok() {
                                conn.give_back();
                            }
                            return Err(e);
                        }
                    }
                } else {
                    let done = async {
                        let mut tx = sqlx::Connection::begin(&mut **conn).await?;
                        let mut g = $crate::sql::Gather::<$db>::new(false).chaining_writes(Self::CHAINS_WRITES);
                        let done = Self::checkpoints_in(&mut *tx, &mut g, batch, false).await?;
                        tx.commit().await?;
                        Ok::<_, $crate::Error>(done)
                    }
                    .await;
                    // sqlx's transaction rolled back whatever did not commit.
                    conn.give_back();
                    done?
                };
                let mut events = events.into_iter();
                Ok(idx.into_iter().zip(counts).map(|(stored, n)| match stored {
                    Some(idx) => Committed::Stored { idx, events: events.by_ref().take(n).collect() },
                    None => Committed::LeaseLost,
                }).collect())
            }

            async fn cancel_task(
                &self,
                workspace: keel_core::id::WorkspaceId,
                id: keel_core::id::TaskId,
                events: Vec<keel_core::event::NewEvent>,
            ) -> $crate::Result<($crate::runtime::TaskRecord, Vec<keel_core::event::Event>)> {
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let task = Self::task_in(&mut *tx, workspace, id).await?;
                if task.status.is_terminal() {
                    return Err($crate::Error::State { what: "task", state: format!("already {}", task.status) });
                }
                let row = sqlx::query(concat!(
                    "UPDATE tasks SET status = 'canceled', queued = FALSE, lease_owner = NULL, lease_until = NULL, ",
                    "updated_at = $2, finished_at = $2 WHERE id = $1 AND status NOT IN ('completed', 'canceled', 'failed', 'rejected') RETURNING ",
                    $crate::runtime::task_columns!()
                ))
                .bind(id.as_uuid())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| $crate::Error::State { what: "task", state: "already finished".to_owned() })?;
                if let Some(run) = task.run_id {
                    sqlx::query("UPDATE runs SET status = 'canceled', finished_at = $2 WHERE id = $1 AND finished_at IS NULL")
                        .bind(run.as_uuid())
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                let events = Self::append_events_tx(&mut tx, &events).await?;
                tx.commit().await?;
                Ok((Self::task_from_row(&row)?, events))
            }

            async fn submit_input(
                &self,
                workspace: keel_core::id::WorkspaceId,
                id: keel_core::id::TaskId,
                step: (String, serde_json::Value),
                messages: Vec<$crate::runtime::NewMessage>,
                finish: Option<keel_core::task::TaskStatus>,
                events: Vec<keel_core::event::NewEvent>,
            ) -> $crate::Result<($crate::runtime::TaskRecord, Vec<keel_core::event::Event>)> {
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let task = Self::task_in(&mut *tx, workspace, id).await?;
                if task.status != keel_core::task::TaskStatus::InputRequired {
                    return Err($crate::runtime::not_waiting(task.status));
                }
                let run = task.run_id.ok_or_else(|| $crate::runtime::not_waiting(task.status))?;
                let (status, queued, finished) = match finish {
                    Some(status) => (status.as_str(), false, Some(now)),
                    None => ("working", true, None),
                };
                let steps: Option<i64> = sqlx::query_scalar(
                    "UPDATE tasks SET steps = steps + 1, status = $2, queued = $3, run_at = $4, updated_at = $4, finished_at = $5 \
                     WHERE id = $1 AND status = 'input-required' RETURNING steps",
                )
                .bind(id.as_uuid())
                .bind(status)
                .bind(queued)
                .bind(now)
                .bind(finished)
                .fetch_optional(&mut *tx)
                .await?;
                let steps = steps.ok_or_else(|| $crate::runtime::not_waiting(task.status))?;
                sqlx::query("INSERT INTO steps (task_id, idx, run_id, workspace_id, kind, data, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                    .bind(id.as_uuid())
                    .bind(steps - 1)
                    .bind(run.as_uuid())
                    .bind(workspace.as_uuid())
                    .bind(step.0.as_str())
                    .bind(step.1.to_string())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                Self::append_messages(&mut *tx, workspace, task.thread_id, id, run, &messages, now).await?;
                sqlx::query("UPDATE runs SET status = $2, finished_at = $3 WHERE id = $1")
                    .bind(run.as_uuid())
                    .bind(match finish { Some(_) => "failed", None => "working" })
                    .bind(finished)
                    .execute(&mut *tx)
                    .await?;
                let task = Self::task_in(&mut *tx, workspace, id).await?;
                let events = Self::append_events_tx(&mut tx, &events).await?;
                tx.commit().await?;
                Ok((task, events))
            }

            async fn replay_dead_letter(
                &self,
                workspace: keel_core::id::WorkspaceId,
                id: keel_core::id::TaskId,
                more_attempts: i64,
                events: Vec<keel_core::event::NewEvent>,
            ) -> $crate::Result<($crate::runtime::TaskRecord, Vec<keel_core::event::Event>)> {
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let done = sqlx::query(
                    "UPDATE tasks SET status = 'working', queued = TRUE, dead_lettered = FALSE, max_attempts = attempts + $3, \
                     run_at = $4, updated_at = $4, finished_at = NULL, error = NULL, errored_at = NULL WHERE id = $1 AND workspace_id = $2 AND dead_lettered",
                )
                .bind(id.as_uuid())
                .bind(workspace.as_uuid())
                .bind(more_attempts)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::Error::NotFound { what: "dead letter" });
                }
                let task = Self::task_in(&mut *tx, workspace, id).await?;
                let events = Self::append_events_tx(&mut tx, &events).await?;
                tx.commit().await?;
                Ok((task, events))
            }

            async fn discard_dead_letter(&self, workspace: keel_core::id::WorkspaceId, id: keel_core::id::TaskId) -> $crate::Result<()> {
                let done = sqlx::query("UPDATE tasks SET dead_lettered = FALSE WHERE id = $1 AND workspace_id = $2 AND dead_lettered")
                    .bind(id.as_uuid())
                    .bind(workspace.as_uuid())
                    .execute(&self.writer)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::Error::NotFound { what: "dead letter" });
                }
                Ok(())
            }

            async fn queue_depth(&self) -> $crate::Result<Vec<$crate::runtime::QueueDepth>> {
                let mut depth = Vec::with_capacity(4);
                for priority in [keel_core::task::Priority::Low, keel_core::task::Priority::Medium, keel_core::task::Priority::High, keel_core::task::Priority::Critical] {
                    let waiting: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE queued AND lease_owner IS NULL AND priority = $1")
                        .bind(priority.rank())
                        .fetch_one(&self.pool)
                        .await?;
                    let oldest: Option<time::OffsetDateTime> = if waiting == 0 {
                        None
                    } else {
                        sqlx::query_scalar("SELECT created_at FROM tasks WHERE queued AND lease_owner IS NULL AND priority = $1 ORDER BY created_at LIMIT 1")
                            .bind(priority.rank())
                            .fetch_optional(&self.pool)
                            .await?
                    };
                    depth.push($crate::runtime::QueueDepth { priority, waiting, oldest });
                }
                Ok(depth)
            }

                        async fn dead_letter_count(&self) -> $crate::Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE dead_lettered")
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn task_counts(&self) -> $crate::Result<Vec<(keel_core::task::TaskStatus, i64)>> {
                use sqlx::Row as _;
                // The predicate is `tasks_live`'s, so only that index is read.
                let rows = sqlx::query(
                    "SELECT status, COUNT(*) AS n FROM tasks \
                     WHERE status IN ('submitted', 'working', 'input-required') GROUP BY status",
                )
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(|r| {
                    let s: String = r.try_get("status")?;
                    Ok(($crate::runtime::status(&s)?, r.try_get("n")?))
                }).collect()
            }
        }
    };
}
pub(crate) use runtime_store;
