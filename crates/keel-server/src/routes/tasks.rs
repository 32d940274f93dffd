//! Tasks (create in `wait`, `background` or `stream` mode, read, list, steps, cancel,
//! human input), threads and their messages, and the dead-letter queue. All scoped to the
//! caller's workspace: another workspace's id is a 404.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt as _;
use keel_core::auth::Principal;
use keel_core::event::{EventType, NewEvent, TypeFilter};
use keel_core::id::{TaskId, ThreadId};
use keel_core::task::{Priority, TaskStatus};
use keel_store::runtime::{
    Created, MessageRecord, NewMessage, RunRecord, StepRecord, TaskFilter, TaskRecord, ThreadRecord,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::{List, rfc3339};
use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::events::{Item, Selection, follow};
use crate::extract::{AppJson, OptionalJson};
use crate::generator::{Generator, Yielder};

/// How the caller wants the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Answer when the task settles; past `runtime.wait_timeout` (or `timeout_ms`), 202
    /// with the task.
    #[default]
    Wait,
    /// 202 with the task at once.
    Background,
    /// An SSE stream of the task's events until it settles.
    Stream,
}

/// What POST /v1/tasks takes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTask {
    /// The agent's name.
    agent: String,
    /// Text (one user message) or an array of chat messages.
    #[schema(value_type = Object)]
    input: Value,
    /// A thread (`thr_…`) to continue; default: a new one.
    thread_id: Option<String>,
    /// `low`, `medium` (default), `high` or `critical`.
    #[schema(value_type = Option<String>)]
    priority: Option<Priority>,
    /// Any JSON object; `metadata.variables` fill the agent's system prompt template.
    #[schema(value_type = Object)]
    metadata: Option<Value>,
    /// `wait` (default), `background` or `stream`.
    mode: Option<Mode>,
    /// For `wait`: how long to wait, 1 to 600000 ms (default `runtime.wait_timeout`).
    timeout_ms: Option<u64>,
}

/// Token and cost totals.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageView {
    /// Prompt tokens.
    input_tokens: i64,
    /// Completion tokens.
    output_tokens: i64,
    /// USD.
    cost_usd: f64,
}

/// A task.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskView {
    /// `task_…`.
    id: String,
    /// The agent's name.
    agent: String,
    /// The agent version it runs with.
    agent_version: i64,
    /// `thr_…`.
    thread_id: String,
    /// The task that delegated it.
    parent_task_id: Option<String>,
    /// `submitted`, `working`, `input-required`, `completed`, `canceled`, `failed` or
    /// `rejected` (A2A task states).
    status: &'static str,
    /// Queue priority.
    priority: &'static str,
    /// The input messages.
    #[schema(value_type = Object)]
    input: Value,
    /// The caller's metadata.
    #[schema(value_type = Object)]
    metadata: Value,
    /// The answer, once completed.
    output: Option<String>,
    /// The last error: `{"kind", "message"}`; `kind` names the limit a task hit
    /// (`max_steps`, `timeout`, `max_cost_usd`, `max_tool_calls`, `context_tokens`).
    #[schema(value_type = Object)]
    error: Option<Value>,
    /// Runs started.
    attempts: i64,
    /// Runs allowed before the task is dead-lettered.
    max_attempts: i64,
    /// The current or last run (`run_…`).
    run_id: Option<String>,
    /// Steps checkpointed.
    steps: i64,
    /// Tool calls made.
    tool_calls: i64,
    /// Tokens and cost.
    usage: UsageView,
    /// In the dead-letter queue.
    dead_lettered: bool,
    /// RFC 3339.
    created_at: String,
    /// First run's start.
    started_at: Option<String>,
    /// Last change.
    updated_at: String,
    /// When it settled.
    finished_at: Option<String>,
}

impl From<TaskRecord> for TaskView {
    fn from(t: TaskRecord) -> Self {
        Self {
            id: t.id.to_string(),
            agent: t.agent_name,
            agent_version: t.agent_version,
            thread_id: t.thread_id.to_string(),
            parent_task_id: t.parent_task_id.map(|p| p.to_string()),
            status: t.status.as_str(),
            priority: t.priority.as_str(),
            input: t.input,
            metadata: t.metadata,
            output: t.output,
            error: t.error,
            attempts: t.attempts,
            max_attempts: t.max_attempts,
            run_id: t.run_id.map(|r| r.to_string()),
            steps: t.steps,
            tool_calls: t.tool_calls,
            usage: UsageView {
                input_tokens: t.input_tokens,
                output_tokens: t.output_tokens,
                cost_usd: t.cost_nanousd as f64 / 1e9,
            },
            dead_lettered: t.dead_lettered,
            created_at: rfc3339(t.created_at),
            started_at: t.started_at.map(rfc3339),
            updated_at: rfc3339(t.updated_at),
            finished_at: t.finished_at.map(rfc3339),
        }
    }
}

fn task_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse()
        .map_err(|e: keel_core::Error| ApiError::bad_request(e.to_string()))
}

fn thread_id(id: &str) -> Result<ThreadId, ApiError> {
    id.parse()
        .map_err(|e: keel_core::Error| ApiError::bad_request(e.to_string()))
}

/// Creates a task for an agent and queues it. With an `Idempotency-Key` header, a repeat
/// returns the task the first request created. Requires role: member.
#[utoipa::path(post, path = "/v1/tasks", tag = super::TASKS, security(("api_key" = [])),
    request_body = CreateTask,
    params(("Idempotency-Key" = Option<String>, Header, description = "Up to 255 characters; the same key returns the same task")),
    responses(
        (status = 200, description = "`wait`: the settled task", body = TaskView),
        (status = 202, description = "`background`, or `wait` past its timeout: the task so far", body = TaskView),
        (status = 400, description = "A bad field, named", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such agent or thread in this workspace", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The queue is full (`Retry-After`); nothing was created", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    AppJson(body): AppJson<CreateTask>,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let v = v
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 255)
                .ok_or_else(|| {
                    ApiError::bad_request("Idempotency-Key: 1 to 255 visible ASCII characters")
                })?;
            Some(v.to_owned())
        }
    };
    let input = keel_runtime::tasks::input_messages(&body.input).map_err(ApiError::bad_request)?;
    let metadata = body.metadata.unwrap_or_else(|| json!({}));
    if !metadata.is_object() {
        return Err(ApiError::bad_request("metadata: must be a JSON object"));
    }
    let thread = body.thread_id.as_deref().map(thread_id).transpose()?;
    let mode = body.mode.unwrap_or_default();
    let wait = match body.timeout_ms {
        None => state.config().runtime.wait_timeout,
        Some(ms @ 1..=600_000) => std::time::Duration::from_millis(ms),
        Some(_) => return Err(ApiError::bad_request("timeout_ms: 1 to 600000")),
    };
    // Answer 202 before `auth.request_timeout` would cut the request off with a 408.
    let wait = wait.min(
        state
            .config()
            .auth
            .request_timeout
            .saturating_sub(std::time::Duration::from_secs(1))
            .max(std::time::Duration::from_millis(1)),
    );
    let agent = state
        .store()
        .agent(principal.workspace_id, &body.agent)
        .await
        .map_err(|e| match e {
            keel_store::Error::NotFound { .. } => ApiError::not_found(format!(
                "agent {:?} not found in this workspace",
                body.agent
            )),
            e => e.into(),
        })?;
    // Follow the log from before the task exists, so no event of it is missed.
    let head = state.events().head(principal.workspace_id).await?;
    let created = keel_runtime::tasks::create(
        state.store(),
        keel_runtime::tasks::NewTaskRequest {
            agent: &agent,
            input,
            thread_id: thread,
            parent_task_id: None,
            depth: 0,
            priority: body.priority.unwrap_or_default(),
            metadata,
            idempotency_key: key,
            max_queued: state.config().runtime.max_queued,
            correlation_id: crate::telemetry::current_trace_id(),
        },
    )
    .await?;
    let streaming = matches!(mode, Mode::Stream);
    let mut tokens = None;
    let (task, after) = match created {
        Created::New(task, events) => {
            state.events().publish(&events);
            // Watch the tokens before a worker can take the task.
            if streaming {
                tokens = Some(state.runtime().watch_tokens(task.id));
            }
            state.runtime().wake();
            tracing::info!(task_id = %task.id, agent = %task.agent_name, "task created");
            (*task, head.last_seq)
        }
        Created::Existing(task) => (*task, head.last_seq),
        Created::QueueFull { queued } => {
            return Err(ApiError::unavailable(format!(
                "the task queue is full ({queued} tasks waiting, runtime.max_queued); nothing was created — retry later"
            )));
        }
    };
    let selection = Selection {
        workspace: principal.workspace_id,
        types: TypeFilter::all(),
        task_id: Some(task.id),
        agent_id: None,
    };
    match mode {
        Mode::Background => Ok((StatusCode::ACCEPTED, Json(TaskView::from(task))).into_response()),
        Mode::Wait => {
            if !task.status.is_terminal() && task.status != TaskStatus::InputRequired {
                let log = state.events().clone();
                let settled = tokio::time::timeout(wait, async {
                    let mut done = false;
                    follow(&log, &selection, after, |item| {
                        let stop_here = match item {
                            Item::Event(frame) => crate::runtime::settles(&frame.event),
                            Item::KeepAlive => false,
                            Item::Closed(..) => true,
                        };
                        done |= stop_here;
                        async move { !stop_here }
                    })
                    .await;
                    done
                })
                .await;
                let _ = settled;
            }
            let task = state.store().task(principal.workspace_id, task.id).await?;
            let status = if task.status.is_terminal() || task.status == TaskStatus::InputRequired {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok((status, Json(TaskView::from(task))).into_response())
        }
        Mode::Stream => {
            let Some(slot) = state.events().client_slot() else {
                return Err(ApiError::unavailable(
                    "too many stream clients on this instance; retry shortly",
                ));
            };
            let log = state.events().clone();
            // A repeat (same Idempotency-Key) of a task that has settled: the task alone.
            let settled = task.status.is_terminal() || task.status == TaskStatus::InputRequired;
            let task_id = task.id;
            let first = Bytes::from(format!(
                "event: task\ndata: {}\n\n",
                serde_json::to_string(&TaskView::from(task)).unwrap_or_default()
            ));
            let frames = Generator::new(move |out: Yielder<Bytes>| async move {
                let _slot = slot;
                out.send(first).await;
                if settled {
                    return;
                }
                follow(&log, &selection, after, |item| {
                    let out = out.clone();
                    async move {
                        match item {
                            Item::Event(frame) => {
                                let end = crate::runtime::settles(&frame.event);
                                out.send(frame.sse.clone()).await;
                                !end
                            }
                            Item::KeepAlive => {
                                out.send(Bytes::from_static(b": keep-alive\n\n")).await;
                                true
                            }
                            Item::Closed(why, seen) => {
                                out.send(Bytes::from(format!(
                                    "id: {seen}\nevent: stream.closed\ndata: {}\n\n",
                                    json!({"reason": why.reason(), "resume_after": seen})
                                )))
                                .await;
                                false
                            }
                        }
                    }
                })
                .await;
            });
            let tokens = tokens.unwrap_or_else(|| state.runtime().watch_tokens(task_id));
            Ok((
                [
                    (header::CONTENT_TYPE, "text/event-stream"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                Body::from_stream(
                    with_tokens(frames, tokens, task_id, state.clone()).map(Ok::<_, Infallible>),
                ),
            )
                .into_response())
        }
    }
}

/// The run's events with its token deltas mixed in (`event: token.delta`, no `id`: they are
/// not in the log, and a resume never asks for them); ends when the events end.
fn with_tokens(
    events: impl futures_util::Stream<Item = Bytes> + Send + 'static,
    tokens: tokio::sync::broadcast::Receiver<keel_runtime::TokenDelta>,
    task: TaskId,
    state: AppState,
) -> impl futures_util::Stream<Item = Bytes> + Send + 'static {
    use futures_util::stream;
    use tokio::sync::broadcast::error::RecvError;
    let events = events
        .map(Some)
        .chain(stream::once(std::future::ready(None)));
    let watch = Watch {
        rx: Some(tokens),
        state,
        task,
    };
    let deltas = stream::unfold(watch, move |mut w| async move {
        let rx = w.rx.as_mut()?;
        loop {
            match rx.recv().await {
                Ok(delta) => {
                    let data = json!({"task_id": task.to_string(), "step": delta.step, "content": &*delta.content});
                    return Some((
                        Some(Bytes::from(format!("event: token.delta\ndata: {data}\n\n"))),
                        w,
                    ));
                }
                // A slow client misses deltas, never events.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return None,
            }
        }
    });
    stream::select(events, deltas)
        .take_while(|frame| std::future::ready(frame.is_some()))
        .filter_map(std::future::ready)
}

/// A watcher of a task's tokens; when it goes, the task's channel is forgotten if it was
/// the last.
struct Watch {
    rx: Option<tokio::sync::broadcast::Receiver<keel_runtime::TokenDelta>>,
    state: AppState,
    task: TaskId,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The receiver first, so the count the runtime checks no longer includes it.
        drop(self.rx.take());
        self.state.runtime().unwatch_tokens(self.task);
    }
}

/// One task. Requires role: viewer.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = super::TASKS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id (`task_…`)")),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 404, description = "No such task in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let task = state
        .store()
        .task(principal.workspace_id, task_id(&id)?)
        .await?;
    Ok(Json(task.into()))
}

/// Query parameters of GET /v1/tasks.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct TasksQuery {
    /// Only tasks in this status.
    status: Option<String>,
    /// Only this agent's tasks.
    agent: Option<String>,
    /// Only this thread's tasks.
    thread_id: Option<String>,
    /// Tasks older than this task id (a cursor: `next_before` of the previous page).
    before: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<u32>,
}

/// A page of tasks, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskPage {
    /// The tasks.
    data: Vec<TaskView>,
    /// Pass as `before` for the next page; absent on the last.
    next_before: Option<String>,
}

async fn page(
    state: &AppState,
    principal: &Principal,
    filter: TaskFilter,
    before: Option<&str>,
    limit: Option<u32>,
) -> Result<Json<TaskPage>, ApiError> {
    let limit = limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit: expected 1 to 500"));
    }
    let before = before
        .map(task_id)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("before: {}", e.problem().detail)))?;
    let tasks = state
        .store()
        .list_tasks(principal.workspace_id, &filter, before, limit)
        .await?;
    let next_before = (tasks.len() == limit as usize)
        .then(|| tasks.last().map(|t| t.id.to_string()))
        .flatten();
    Ok(Json(TaskPage {
        data: tasks.into_iter().map(TaskView::from).collect(),
        next_before,
    }))
}

/// The workspace's tasks, newest first, filtered by status, agent and thread. Requires
/// role: viewer.
#[utoipa::path(get, path = "/v1/tasks", tag = super::TASKS, security(("api_key" = [])),
    responses(
        (status = 200, description = "A page of tasks", body = TaskPage),
        (status = 400, description = "A bad filter or cursor, named", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<TasksQuery>,
) -> Result<Json<TaskPage>, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(str::parse::<TaskStatus>)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("status: {e}")))?;
    let thread = q
        .thread_id
        .as_deref()
        .map(thread_id)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("thread_id: {}", e.problem().detail)))?;
    let filter = TaskFilter {
        status,
        agent: q.agent,
        thread_id: thread,
        dead_lettered: false,
    };
    page(&state, &principal, filter, q.before.as_deref(), q.limit).await
}

/// A checkpointed step.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StepView {
    /// Its position in the task (across runs).
    idx: i64,
    /// Its run.
    run_id: String,
    /// `llm_call`, `tool_call`, `approval` or `reply`.
    kind: String,
    /// What it did: model, tokens, cost, latency; tool, call id, outcome, idempotency key;
    /// the human's decision.
    #[schema(value_type = Object)]
    data: Value,
    /// RFC 3339.
    created_at: String,
}

impl From<StepRecord> for StepView {
    fn from(s: StepRecord) -> Self {
        Self {
            idx: s.idx,
            run_id: s.run_id.to_string(),
            kind: s.kind,
            data: s.data,
            created_at: rfc3339(s.created_at),
        }
    }
}

/// A run (attempt).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RunView {
    /// `run_…`.
    id: String,
    /// 1 for the first.
    attempt: i64,
    /// `working`, `input-required`, `completed`, `failed` or `canceled`.
    status: String,
    /// Why it failed.
    #[schema(value_type = Object)]
    error: Option<Value>,
    /// RFC 3339.
    started_at: String,
    /// RFC 3339.
    finished_at: Option<String>,
}

impl From<RunRecord> for RunView {
    fn from(r: RunRecord) -> Self {
        Self {
            id: r.id.to_string(),
            attempt: r.attempt,
            status: r.status,
            error: r.error,
            started_at: rfc3339(r.started_at),
            finished_at: r.finished_at.map(rfc3339),
        }
    }
}

/// A task's steps and runs.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StepsView {
    /// Steps, in order.
    data: Vec<StepView>,
    /// Runs, in order.
    runs: Vec<RunView>,
}

/// A task's checkpointed steps, and its runs. Requires role: viewer.
#[utoipa::path(get, path = "/v1/tasks/{id}/steps", tag = super::TASKS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id (`task_…`)")),
    responses(
        (status = 200, description = "Steps and runs", body = StepsView),
        (status = 404, description = "No such task in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn steps(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<StepsView>, ApiError> {
    let id = task_id(&id)?;
    let steps = state.store().task_steps(principal.workspace_id, id).await?;
    let runs = state.store().task_runs(principal.workspace_id, id).await?;
    Ok(Json(StepsView {
        data: steps.into_iter().map(StepView::from).collect(),
        runs: runs.into_iter().map(RunView::from).collect(),
    }))
}

/// What POST /v1/tasks/{id}/cancel takes.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelTask {
    /// Why (recorded in the `task.canceled` event).
    reason: Option<String>,
}

/// Cancels a task that has not finished; a tool call in progress is abandoned. Requires
/// role: member.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = super::TASKS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id (`task_…`)")),
    request_body(content = CancelTask, description = "`{}` or `{\"reason\": \"…\"}`"),
    responses(
        (status = 200, description = "The canceled task", body = TaskView),
        (status = 404, description = "No such task in this workspace", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The task has already finished", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<CancelTask>,
) -> Result<Json<TaskView>, ApiError> {
    let id = task_id(&id)?;
    let reason = body.reason;
    let task_reason = reason.clone();
    let current = state.store().task(principal.workspace_id, id).await?;
    let mut event = NewEvent::new(
        EventType::TaskCanceled,
        principal.workspace_id,
        json!({"reason": reason, "by": principal.actor()}),
    )
    .with_task(id)
    .correlated(crate::telemetry::current_trace_id());
    event.agent_id = Some(current.agent_id);
    event.run_id = current.run_id;
    let (task, events) = state
        .store()
        .cancel_task(principal.workspace_id, id, vec![event])
        .await?;
    state.events().publish(&events);
    state.runtime().interrupt(id);
    metrics::counter!("keel_tasks_finished_total", "status" => "canceled").increment(1);
    tracing::info!(task_id = %id, "task canceled");
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("task.canceled", id).data(json!({"reason": task_reason})),
    )
    .await;
    Ok(Json(task.into()))
}

/// What POST /v1/tasks/{id}/input takes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskInput {
    /// `approve` (run the tool call as asked), `edit` (run it with `arguments`),
    /// `reject` (do not run it; the model is told, with `message`), or `reply` (answer the
    /// question the agent asked, with `message`).
    action: String,
    /// For `edit`: the arguments to call the tool with.
    #[schema(value_type = Object)]
    arguments: Option<Value>,
    /// For `reject`: what the model is told. For `reply`: the user's answer.
    message: Option<String>,
    /// For `reject`: end the task as `rejected` instead of letting the model go on.
    #[serde(default)]
    end_task: bool,
}

/// Gives a human's input to a task waiting for it (`input-required`): approve, edit or
/// reject the tool call it waits on, or reply to the question it asked. Requires role:
/// member.
#[utoipa::path(post, path = "/v1/tasks/{id}/input", tag = super::TASKS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id (`task_…`)")),
    request_body = TaskInput,
    responses(
        (status = 200, description = "The task, queued to go on (or rejected)", body = TaskView),
        (status = 400, description = "A bad action or arguments, named", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task in this workspace", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The task is not waiting for input", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn input(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(body): AppJson<TaskInput>,
) -> Result<Json<TaskView>, ApiError> {
    let id = task_id(&id)?;
    let ws = principal.workspace_id;
    let task = state.store().task(ws, id).await?;
    if task.status != TaskStatus::InputRequired {
        return Err(ApiError::conflict(format!(
            "task is {}, not waiting for input",
            task.status
        )));
    }
    let (call_id, tool) = pending_call(&state, &task).await?;
    let version = state
        .store()
        .agent_version(ws, task.agent_id, task.agent_version)
        .await?;
    let question = keel_runtime::spec::AgentSpec::from_json(version.spec)
        .map_err(|e| ApiError::internal(&e))?
        .tool(&tool)
        .is_some_and(|t| matches!(t, keel_runtime::spec::ToolSpec::Human(_)));
    match (question, body.action.as_str()) {
        (true, "approve" | "edit") => {
            return Err(ApiError::bad_request(format!(
                "action: the task waits for a reply to its question ({tool}), not an approval: send action \"reply\" with the answer in \"message\""
            )));
        }
        (false, "reply") => {
            return Err(ApiError::bad_request(format!(
                "action: the task waits for approval of a call to {tool}, not a reply: send approve, edit or reject"
            )));
        }
        _ => {}
    }
    let by = principal.actor();
    let (kind, data, messages, finish) = match body.action.as_str() {
        "approve" => (
            "approval",
            json!({"call_id": call_id, "tool": tool, "action": "approve", "by": by}),
            Vec::new(),
            None,
        ),
        "edit" => {
            let Some(arguments) = body.arguments.filter(Value::is_object) else {
                return Err(ApiError::bad_request(
                    "arguments: `edit` needs the arguments to call the tool with, as an object",
                ));
            };
            (
                "approval",
                json!({"call_id": call_id, "tool": tool, "action": "edit", "arguments": arguments, "by": by}),
                Vec::new(),
                None,
            )
        }
        "reject" => {
            let message = body
                .message
                .unwrap_or_else(|| "The user rejected this tool call.".to_owned());
            let content = if question {
                format!("The user declined to answer: {message}")
            } else {
                format!("Rejected by a human: {message}")
            };
            (
                "approval",
                json!({"call_id": call_id, "tool": tool, "action": "reject", "message": message, "by": by}),
                vec![tool_message(&call_id, content).await],
                body.end_task.then_some(TaskStatus::Rejected),
            )
        }
        "reply" => {
            let Some(message) = body.message.filter(|m| !m.trim().is_empty()) else {
                return Err(ApiError::bad_request(
                    "message: `reply` needs the user's answer as a non-empty string",
                ));
            };
            (
                "reply",
                json!({"call_id": call_id, "tool": tool, "action": "reply", "by": by}),
                vec![tool_message(&call_id, message).await],
                None,
            )
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "action: expected approve, edit, reject or reply, got {other:?}"
            )));
        }
    };
    let mut events = Vec::new();
    if finish.is_some() {
        let mut e = NewEvent::new(
            EventType::TaskCanceled,
            ws,
            json!({"reason": "rejected by a human", "by": by}),
        )
        .with_task(id);
        e.agent_id = Some(task.agent_id);
        e.run_id = task.run_id;
        events.push(e);
    }
    let decision = data.clone();
    let (task, events) = state
        .store()
        .submit_input(ws, id, (kind.to_owned(), data), messages, finish, events)
        .await?;
    if let Some(status) = finish {
        metrics::counter!("keel_tasks_finished_total", "status" => status.as_str()).increment(1);
    }
    state.events().publish(&events);
    state.runtime().wake();
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("task.input", id).data(decision),
    )
    .await;
    Ok(Json(task.into()))
}

/// The tool result a human's input adds to the conversation, with its tokens counted.
async fn tool_message(call_id: &str, content: String) -> NewMessage {
    // The tokenizer may load its tables on first use: off the async threads.
    let text = content.clone();
    let counted = tokio::task::spawn_blocking(move || keel_llm::tokens::count(&text))
        .await
        .unwrap_or_default();
    NewMessage {
        body: json!({"role": "tool", "tool_call_id": call_id, "content": content}),
        tokens: i64::try_from(counted).unwrap_or(0) + 8,
    }
}

/// The tool call a task waits on: the first unanswered call of its run's last assistant
/// message.
async fn pending_call(state: &AppState, task: &TaskRecord) -> Result<(String, String), ApiError> {
    let messages = state
        .store()
        .thread_messages(task.workspace_id, task.thread_id, 0, 100_000)
        .await?;
    let run: Vec<&MessageRecord> = messages
        .iter()
        .filter(|m| Some(m.run_id) == task.run_id)
        .collect();
    let last = run
        .iter()
        .rposition(|m| m.body.get("role").and_then(Value::as_str) == Some("assistant"))
        .ok_or_else(|| ApiError::conflict("task is not waiting on a tool call"))?;
    let answered: Vec<&str> = run[last + 1..]
        .iter()
        .filter_map(|m| m.body.get("tool_call_id").and_then(Value::as_str))
        .collect();
    run[last]
        .body
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|c| {
            let id = c.get("id")?.as_str()?;
            (!answered.contains(&id)).then(|| {
                let tool = c
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                (id.to_owned(), tool.to_owned())
            })
        })
        .ok_or_else(|| ApiError::conflict("task is not waiting on a tool call"))
}

/// What POST /v1/threads takes.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateThread {
    /// Any JSON object.
    #[schema(value_type = Object)]
    metadata: Option<Value>,
}

/// A thread.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ThreadView {
    /// `thr_…`.
    id: String,
    /// The caller's metadata.
    #[schema(value_type = Object)]
    metadata: Value,
    /// Messages so far.
    messages: i64,
    /// RFC 3339.
    created_at: String,
}

impl From<ThreadRecord> for ThreadView {
    fn from(t: ThreadRecord) -> Self {
        Self {
            id: t.id.to_string(),
            metadata: t.metadata,
            messages: t.messages,
            created_at: rfc3339(t.created_at),
        }
    }
}

/// Creates a thread: tasks on it share their conversation. Requires role: member.
#[utoipa::path(post, path = "/v1/threads", tag = super::TASKS, security(("api_key" = [])),
    request_body(content = CreateThread, description = "`{}` or `{\"metadata\": {…}}`"),
    responses(
        (status = 201, description = "The thread", body = ThreadView),
        (status = 400, description = "Bad metadata", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_thread(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    OptionalJson(body): OptionalJson<CreateThread>,
) -> Result<(StatusCode, Json<ThreadView>), ApiError> {
    let metadata = body.metadata.unwrap_or_else(|| json!({}));
    if !metadata.is_object() {
        return Err(ApiError::bad_request("metadata: must be a JSON object"));
    }
    let thread = state
        .store()
        .create_thread(principal.workspace_id, &metadata)
        .await?;
    Ok((StatusCode::CREATED, Json(thread.into())))
}

/// A thread's message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageView {
    /// Position in the thread.
    seq: i64,
    /// The task that added it.
    task_id: String,
    /// The run that added it.
    run_id: String,
    /// The chat message (OpenAI shape).
    #[schema(value_type = Object)]
    message: Value,
    /// Its size in tokens.
    tokens: i64,
    /// RFC 3339.
    created_at: String,
}

/// Query parameters of GET /v1/threads/{id}/messages.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct MessagesQuery {
    /// Messages after this seq (a cursor).
    after: Option<i64>,
    /// 1 to 1000, default 100.
    limit: Option<u32>,
}

/// A thread's messages, oldest first (every run's, including failed attempts'). Requires
/// role: viewer.
#[utoipa::path(get, path = "/v1/threads/{id}/messages", tag = super::TASKS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The thread's id (`thr_…`)")),
    responses(
        (status = 200, description = "The messages", body = List<MessageView>),
        (status = 404, description = "No such thread in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn messages(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<MessagesQuery>,
) -> Result<Json<List<MessageView>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit: expected 1 to 1000"));
    }
    let rows = state
        .store()
        .thread_messages(
            principal.workspace_id,
            thread_id(&id)?,
            q.after.unwrap_or(0),
            limit,
        )
        .await?;
    Ok(Json(List {
        data: rows
            .into_iter()
            .map(|m| MessageView {
                seq: m.seq,
                task_id: m.task_id.to_string(),
                run_id: m.run_id.to_string(),
                message: m.body,
                tokens: m.tokens,
                created_at: rfc3339(m.created_at),
            })
            .collect(),
    }))
}

/// Query parameters of GET /v1/dead-letters.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct DeadLettersQuery {
    /// Only this agent's.
    agent: Option<String>,
    /// Tasks older than this task id (a cursor).
    before: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<u32>,
}

/// Tasks that ran out of attempts, newest first, each with its last error. Requires role:
/// viewer.
#[utoipa::path(get, path = "/v1/dead-letters", tag = super::TASKS, security(("api_key" = [])),
    responses((status = 200, description = "A page of dead-lettered tasks", body = TaskPage)))]
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<DeadLettersQuery>,
) -> Result<Json<TaskPage>, ApiError> {
    let filter = TaskFilter {
        agent: q.agent,
        dead_lettered: true,
        ..TaskFilter::default()
    };
    page(&state, &principal, filter, q.before.as_deref(), q.limit).await
}

/// Replays a dead-lettered task: a new run, with the agent's attempts again. Requires
/// role: member.
#[utoipa::path(post, path = "/v1/dead-letters/{id}/replay", tag = super::TASKS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id (`task_…`)")),
    responses(
        (status = 200, description = "The task, queued again", body = TaskView),
        (status = 404, description = "No such dead letter in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn replay(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let id = task_id(&id)?;
    let ws = principal.workspace_id;
    let task = state.store().task(ws, id).await?;
    let attempts = state
        .store()
        .agent_version(ws, task.agent_id, task.agent_version)
        .await
        .ok()
        .and_then(|a| keel_runtime::spec::AgentSpec::from_json(a.spec).ok())
        .map_or(1, |s| i64::from(s.max_attempts));
    let (task, events) = state
        .store()
        .replay_dead_letter(ws, id, attempts, Vec::new())
        .await?;
    state.events().publish(&events);
    state.runtime().wake();
    tracing::info!(task_id = %id, "dead letter replayed");
    Ok(Json(task.into()))
}

/// Removes a task from the dead-letter queue (it stays, failed). Requires role: member.
#[utoipa::path(delete, path = "/v1/dead-letters/{id}", tag = super::TASKS, security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id (`task_…`)")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such dead letter in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn discard(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .store()
        .discard_dead_letter(principal.workspace_id, task_id(&id)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
