//! The durable run loop and its workers.
//!
//! A worker claims tasks from the queue (a lease it renews by heartbeat), and drives each
//! one step at a time: an LLM call through the gateway's router, or a tool call. Each step
//! is checkpointed when it completes — its result, the messages it adds and its events in
//! one transaction, shared with other runs' checkpoints (group commit). What to do next
//! is a pure function of the committed messages, so a run that resumes after a crash
//! (here after restart, or elsewhere once the lease expires) carries on after its last
//! committed step: a completed tool call is never repeated, and an interrupted one is
//! retried with the same idempotency key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_core::event::{Event, EventType, NewEvent};
use keel_core::id::{AgentId, RunId, TaskId, WorkspaceId};
use keel_llm::types::{ChatRequest, Message, ToolCall};
use keel_store::runtime::{
    BeginRun, Checkpoint, Committed, Finish, NewMessage, StepRecord, TaskRecord,
};
use keel_store::{Backend, Store, UsageRecord};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::context::Sizing;
use crate::spec::{AgentSpec, Overflow, ToolSpec};
use crate::tools;

/// Where committed events go to reach live followers, and how LLM failures are observed.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Hands events committed in a state change's transaction to live followers.
    fn publish(&self, events: &[Event]);
    /// An observer that records a workspace's LLM provider errors and fallbacks.
    fn llm_observer(&self, workspace: WorkspaceId) -> Box<dyn keel_llm::router::Observer>;
}

/// Most agent specs and tool breakers kept in memory.
const CACHE_ENTRIES: usize = 4_096;
/// How long a woken worker loop waits for more slots to free before claiming, when few
/// are free: claims for runs that end together share one transaction.
const CLAIM_COALESCE: Duration = Duration::from_millis(2);
/// Most checkpoints waiting for the committer.
const COMMIT_QUEUE: usize = 4_096;

/// How long the runtime trusts what it read about a workspace's budgets.
const BUDGETS_TTL: Duration = Duration::from_secs(5);

/// An LLM step's reservation in its workspace's budgets: the step's maximum cost (its
/// prompt's tokens, known exactly here, plus 4,096 output tokens, at the route's highest
/// prices), settled to the real cost when dropped — also when the step is canceled or
/// fails.
struct StepBudget {
    store: Arc<dyn Store>,
    sink: Arc<dyn EventSink>,
    workspace: WorkspaceId,
    held: Vec<keel_store::budgets::Held>,
    reserved: i64,
    actual: i64,
}

impl Drop for StepBudget {
    fn drop(&mut self) {
        let (store, sink) = (self.store.clone(), self.sink.clone());
        let (ws, reserved, actual) = (self.workspace, self.reserved, self.actual);
        let held = std::mem::take(&mut self.held);
        tokio::spawn(async move {
            match store.settle_budget(ws, None, &held, reserved, actual).await {
                Ok(events) => sink.publish(&events),
                Err(e) => {
                    tracing::error!(error = %e, workspace_id = %ws, "cannot settle a step's budget reservation")
                }
            }
        });
    }
}

/// Why a step could not reserve its budget.
enum BudgetRefusal {
    /// A budget would be passed: the task fails with this message.
    Exceeded(String),
    /// The store failed.
    Store(keel_store::Error),
}

impl Inner {
    /// Whether `ws` has budgets (cached for [`BUDGETS_TTL`], bounded).
    async fn budgeted(&self, ws: WorkspaceId) -> bool {
        let cached = self
            .budgeted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ws)
            .filter(|(_, at)| at.elapsed() < BUDGETS_TTL)
            .map(|(b, _)| *b);
        if let Some(b) = cached {
            return b;
        }
        let has = self.store.budgets(ws).await.map_or(true, |b| !b.is_empty());
        let mut map = self
            .budgeted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(ws, (has, Instant::now()));
        has
    }

    /// Reserves an LLM step's maximum cost in its workspace's budgets; `None` when it has
    /// none.
    async fn reserve_step(
        &self,
        ws: WorkspaceId,
        model: &str,
        prompt_tokens: u64,
    ) -> Result<Option<StepBudget>, BudgetRefusal> {
        if !self.budgeted(ws).await {
            return Ok(None);
        }
        let (input_price, output_price) = self
            .router
            .routes()
            .find(|r| r.name == model)
            .map_or((0.0, 0.0), keel_llm::router::Route::max_prices);
        let cost = keel_llm::cost_nanousd(prompt_tokens, 4096, input_price, output_price);
        let reserved = i64::try_from(cost).unwrap_or(i64::MAX);
        match self.store.reserve_budget(ws, None, reserved).await {
            Ok(keel_store::budgets::Reservation::Reserved(held)) => Ok(Some(StepBudget {
                held,
                store: self.store.clone(),
                sink: self.sink.clone(),
                workspace: ws,
                reserved,
                // Spent in full unless the step is accounted or the provider refused it
                // (a step canceled while the provider works may still be billed).
                actual: reserved,
            })),
            Ok(keel_store::budgets::Reservation::Exceeded(b)) => {
                Err(BudgetRefusal::Exceeded(format!(
                    "the {} budget of ${:.4} would be passed by this step (up to ${:.4}); it resets at {}",
                    b.name(),
                    b.limit_nanousd as f64 / 1e9,
                    reserved as f64 / 1e9,
                    b.resets_at()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                )))
            }
            Err(e) => Err(BudgetRefusal::Store(e)),
        }
    }
}

/// The runtime: cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

use crate::mcp::Env;

struct Inner {
    store: Arc<dyn Store>,
    router: Arc<keel_llm::Router>,
    sink: Arc<dyn EventSink>,
    config: keel_core::config::Runtime,
    owner: Uuid,
    http: reqwest::Client,
    env: Env,
    /// MCP servers' connections.
    mcp: Arc<crate::mcp::Servers>,
    /// Token watchers (stream mode).
    deltas: Deltas,
    /// Runs in progress here, by task.
    active: Mutex<HashMap<TaskId, CancellationToken>>,
    slots: Arc<Semaphore>,
    wake: Notify,
    commits: mpsc::Sender<Pending>,
    specs: Mutex<HashMap<(AgentId, i64), Arc<AgentSpec>>>,
    breakers: Mutex<HashMap<(AgentId, String), Arc<keel_llm::breaker::Breaker>>>,
    /// Whether each workspace has budgets, remembered for [`BUDGETS_TTL`].
    budgeted: Mutex<HashMap<WorkspaceId, (bool, Instant)>>,
    /// Cancelled at shutdown: runs stop at once (nothing uncommitted is kept) and let go of
    /// their tasks, which resume from their last checkpoint.
    stop: CancellationToken,
}

struct Pending {
    checkpoint: Checkpoint,
    reply: oneshot::Sender<Result<Committed, Arc<keel_store::Error>>>,
}

/// The runtime's background tasks; [`Tasks::finish`] stops them.
#[derive(Debug)]
pub struct Tasks {
    stop: CancellationToken,
    commit_stop: CancellationToken,
    workers: Vec<JoinHandle<()>>,
    committer: JoinHandle<()>,
    mcp: Arc<crate::mcp::Servers>,
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HTTP client for tools could not be built.
    #[error("cannot build the tool HTTP client: {0}")]
    Http(reqwest::Error),
}

/// Starts the runtime: the committer, and (with `runtime.enabled`) the workers, the
/// heartbeat and the wake-ups from other processes.
pub async fn start(
    store: Arc<dyn Store>,
    router: Arc<keel_llm::Router>,
    sink: Arc<dyn EventSink>,
    config: &keel_core::config::Runtime,
    env: Env,
) -> Result<(Runtime, Tasks), StartError> {
    let (tx, rx) = mpsc::channel(COMMIT_QUEUE);
    let stop = CancellationToken::new();
    let commit_stop = CancellationToken::new();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(StartError::Http)?;
    let mcp = Arc::new(crate::mcp::Servers::new(
        http.clone(),
        env.clone(),
        config.mcp_commands.clone(),
    ));
    let runtime = Runtime {
        inner: Arc::new(Inner {
            store: store.clone(),
            router,
            sink: sink.clone(),
            config: config.clone(),
            owner: Uuid::now_v7(),
            http,
            env,
            mcp: mcp.clone(),
            deltas: Deltas::default(),
            active: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(config.workers)),
            wake: Notify::new(),
            commits: tx,
            specs: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            budgeted: Mutex::new(HashMap::new()),
            stop: stop.clone(),
        }),
    };
    let committer = tokio::spawn(commit_loop(
        store.clone(),
        sink,
        rx,
        config.max_batch,
        commit_stop.clone(),
    ));
    let mut workers = Vec::new();
    if config.enabled {
        if store.backend() == Backend::Sqlite {
            // One process owns an SQLite file: a lease left behind is a crashed
            // predecessor's, and its runs resume now rather than when the lease expires.
            match store.expire_all_leases().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    tasks = n,
                    "resuming tasks a previous process left in flight"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot release stale task leases"),
            }
        }
        workers.push(tokio::spawn(runtime.clone().work_loop()));
        workers.push(tokio::spawn(runtime.clone().heartbeat_loop()));
        workers.push(tokio::spawn(runtime.clone().stats_loop()));
        if let Ok(Some(commits)) = store.listen_commits().await {
            // Another process committed to some log (a new task, an input): look.
            let rt = runtime.clone();
            workers.push(tokio::spawn(async move {
                use futures_util::StreamExt as _;
                let mut commits = commits;
                loop {
                    tokio::select! {
                        () = rt.inner.stop.cancelled() => break,
                        next = commits.next() => match next {
                            Some(_) => rt.inner.wake.notify_one(),
                            None => break,
                        },
                    }
                }
            }));
        }
    }
    Ok((
        runtime,
        Tasks {
            stop,
            commit_stop,
            workers,
            committer,
            mcp,
        },
    ))
}

impl Tasks {
    /// Stops claiming, stops runs in progress (they resume from their last checkpoint
    /// elsewhere or after restart), commits what is queued, and returns.
    pub async fn finish(self) {
        self.stop.cancel();
        for w in self.workers {
            let _ = w.await;
        }
        self.commit_stop.cancel();
        let _ = self.committer.await;
        self.mcp.close_all().await;
    }
}

/// The usage row of an LLM call an agent made.
fn llm_usage(
    workspace: WorkspaceId,
    served: &keel_llm::router::Served,
    usage: &keel_llm::types::Usage,
    estimated: bool,
    cost_nanousd: u64,
    latency_ms: u64,
) -> UsageRecord {
    UsageRecord {
        workspace_id: workspace,
        api_key_id: None,
        route: served.route.clone(),
        provider: served.provider.as_str().to_owned(),
        upstream_model: served.upstream_model.clone(),
        target: served.target.clone(),
        input_tokens: usage.prompt_tokens,
        output_tokens: usage.completion_tokens,
        cached_tokens: usage.cached_tokens(),
        cost_nanousd,
        latency_ms,
        ttft_ms: None,
        cache_hit: false,
        estimated,
        outcome: "ok".to_owned(),
        created_at: OffsetDateTime::now_utc(),
    }
}

/// Most tokens a summary of left-out turns takes (and the room left for it).
const SUMMARY_TOKENS: u64 = 1024;

/// How the summarizing call is asked.
const SUMMARY_PROMPT: &str = "You summarize the earlier part of a conversation between a user, an assistant and the assistant's tools, for the assistant, which will continue the conversation without seeing those messages. Keep every fact, decision, name, number, identifier and open question it may need; leave out pleasantries. Write plain, dense prose.";

/// The room left in a context budget for a summary.
fn summary_room(budget: u64) -> u64 {
    (budget / 4).min(SUMMARY_TOKENS)
}

/// A summary of the turns a run left out of its context (a `summary` step's data).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Summary {
    /// Positions (in the run's conversation) of the messages it covers; stored as
    /// `[first, last]` ranges, so the step stays small however long the thread.
    #[serde(with = "ranges")]
    dropped: Vec<usize>,
    /// The summary.
    text: String,
    /// Its tokens.
    tokens: u64,
}

/// Sorted positions as `[first, last]` ranges, and back.
mod ranges {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(positions: &[usize], s: S) -> Result<S::Ok, S::Error> {
        let mut out: Vec<[usize; 2]> = Vec::new();
        for &p in positions {
            match out.last_mut() {
                Some(last) if last[1] + 1 == p => last[1] = p,
                _ => out.push([p, p]),
            }
        }
        s.collect_seq(out)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
        let ranges = Vec::<[usize; 2]>::deserialize(d)?;
        // A range is at most as long as a conversation can be.
        Ok(ranges
            .into_iter()
            .flat_map(|[a, b]| a..=b.min(a.saturating_add(1_000_000)))
            .collect())
    }
}

/// One message as a line of a transcript to summarize.
fn transcript_line(out: &mut String, message: &Message) {
    use std::fmt::Write as _;
    let text = message.text();
    match message.role.as_str() {
        "tool" => {
            let _ = writeln!(out, "tool result: {text}");
        }
        role => {
            if !text.is_empty() {
                let _ = writeln!(out, "{role}: {text}");
            }
            for call in message.tool_calls.iter().flatten() {
                let _ = writeln!(
                    out,
                    "{role} called {}({})",
                    call.function.name, call.function.arguments
                );
            }
        }
    }
}

/// A piece of the model's answer, as it streams.
#[derive(Debug, Clone)]
pub struct TokenDelta {
    /// The step (LLM call) it belongs to.
    pub step: i64,
    /// The text added.
    pub content: Arc<str>,
}

/// Most bytes of one streamed answer (as for a whole one).
const MAX_STREAMED_BYTES: usize = 16 * 1024 * 1024;
/// Most tasks watched for tokens at once.
const MAX_WATCHED: usize = 10_000;
/// Deltas buffered per watched task.
const DELTA_BUFFER: usize = 256;

/// Who watches which task's tokens.
#[derive(Default)]
struct Deltas {
    watched: Mutex<HashMap<TaskId, tokio::sync::broadcast::Sender<TokenDelta>>>,
}

impl Deltas {
    fn watch(&self, task: TaskId) -> tokio::sync::broadcast::Receiver<TokenDelta> {
        let Ok(mut watched) = self.watched.lock() else {
            return tokio::sync::broadcast::channel(1).1;
        };
        if let Some(tx) = watched.get(&task) {
            return tx.subscribe();
        }
        if watched.len() >= MAX_WATCHED {
            watched.retain(|_, tx| tx.receiver_count() > 0);
            if watched.len() >= MAX_WATCHED {
                // Full: this watcher gets no deltas (the events still carry the text).
                return tokio::sync::broadcast::channel(1).1;
            }
        }
        let (tx, rx) = tokio::sync::broadcast::channel(DELTA_BUFFER);
        watched.insert(task, tx);
        rx
    }

    fn unwatch(&self, task: TaskId) {
        if let Ok(mut watched) = self.watched.lock()
            && watched
                .get(&task)
                .is_some_and(|tx| tx.receiver_count() == 0)
        {
            watched.remove(&task);
        }
    }

    /// The task's sender, if anyone still watches it; forgets it otherwise.
    fn sender(&self, task: TaskId) -> Option<tokio::sync::broadcast::Sender<TokenDelta>> {
        let mut watched = self.watched.lock().ok()?;
        match watched.get(&task) {
            Some(tx) if tx.receiver_count() > 0 => Some(tx.clone()),
            Some(_) => {
                watched.remove(&task);
                None
            }
            None => None,
        }
    }
}

/// One LLM call as a stream, its text handed to `tx` as it comes, the whole answer put
/// together. A failure mid-way is the call's failure (the run retries per its policy).
async fn streamed(
    router: &keel_llm::Router,
    mut request: ChatRequest,
    observer: Arc<dyn keel_llm::router::Observer>,
    tx: &tokio::sync::broadcast::Sender<TokenDelta>,
    step: i64,
) -> keel_llm::Result<(keel_llm::types::ChatResponse, keel_llm::router::Served)> {
    use futures_util::StreamExt as _;
    // Usage on streams is the provider's to ask for (per target: `stream_usage`); without
    // it, the step's tokens are counted with the tokenizer, as for any answer without usage.
    request.stream = Some(true);
    let (mut stream, served) = router.chat_stream(&request, observer).await?;
    let mut answer = keel_llm::types::Assembler::default();
    // As for a whole answer: a stream larger than this is not an answer.
    let mut bytes = 0usize;
    while let Some(item) = stream.next().await {
        let chunk = match item {
            Ok(chunk) => chunk,
            Err(e) if e.kind == keel_llm::ErrorKind::Client => {
                return Err(keel_llm::Error::Rejected(e));
            }
            Err(e) => {
                return Err(keel_llm::Error::AllTargetsFailed(vec![(
                    served.target.clone(),
                    e,
                )]));
            }
        };
        bytes += chunk
            .choices
            .iter()
            .map(|c| c.delta.to_string().len())
            .sum::<usize>();
        if bytes > MAX_STREAMED_BYTES {
            return Err(keel_llm::Error::InvalidResponse(
                keel_llm::ProviderError::new(
                    keel_llm::ErrorKind::InvalidResponse,
                    format!("the streamed answer passed {MAX_STREAMED_BYTES} bytes"),
                ),
            ));
        }
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            if let Some(text) = choice.delta.get("content").and_then(Value::as_str)
                && !text.is_empty()
            {
                // No watcher left is fine: the answer is still put together.
                let _ = tx.send(TokenDelta {
                    step,
                    content: Arc::from(text),
                });
            }
        }
        answer.push(&chunk);
    }
    Ok((answer.finish(), served))
}

/// Why a run stopped.
enum Exit {
    /// The task reached a terminal state, or waits for input.
    Settled,
    /// The lease is gone (taken over, or the task canceled or finished elsewhere).
    LeaseLost,
    /// Shutdown, or a store failure: the task should be picked up again.
    Abandoned,
}

/// What the run does next, decided from the committed messages alone.
enum Next {
    /// Ask the model.
    Llm,
    /// Call this tool (the `usize` is the position of the assistant message that asked for
    /// it among this run's messages, for its idempotency key).
    Tool(ToolCall, usize),
    /// The model answered without calling tools: the task is done.
    Answer(Option<String>),
}

/// A message of the conversation, as the run keeps it.
struct Turn {
    message: Message,
    tokens: u64,
    /// Kept in the context whatever happens (`"pinned": true` on an input message).
    pinned: bool,
    /// Position among this run's messages; `None` for earlier tasks' messages.
    run_pos: Option<usize>,
}

impl Runtime {
    /// The model's tokens for `task` as they stream, from the runs on this instance (only
    /// while someone watches is the model asked for a stream). Deltas a slow watcher
    /// misses are dropped: the `agent.message` event carries the whole text.
    #[must_use]
    pub fn watch_tokens(&self, task: TaskId) -> tokio::sync::broadcast::Receiver<TokenDelta> {
        self.inner.deltas.watch(task)
    }

    /// Forgets `task`'s token channel if nobody watches it any more (call after dropping a
    /// receiver from [`Runtime::watch_tokens`]).
    pub fn unwatch_tokens(&self, task: TaskId) {
        self.inner.deltas.unwatch(task);
    }

    /// This process's worker identity (the lease owner).
    #[must_use]
    pub fn owner(&self) -> Uuid {
        self.inner.owner
    }

    /// Looks for work now (a task was created or given input here).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Stops a run in progress here (the task was canceled).
    pub fn interrupt(&self, task: TaskId) {
        if let Ok(active) = self.inner.active.lock()
            && let Some(token) = active.get(&task)
        {
            token.cancel();
        }
    }

    /// Runs in progress here.
    #[must_use]
    pub fn active_runs(&self) -> usize {
        self.inner.active.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// The state of an agent's tool breakers here: (tool, state).
    #[must_use]
    pub fn breaker_states(&self, agent: AgentId) -> Vec<(String, keel_llm::breaker::State)> {
        let Ok(breakers) = self.inner.breakers.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = breakers
            .iter()
            .filter(|((a, _), _)| *a == agent)
            .map(|((_, tool), b)| (tool.clone(), b.state()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    async fn work_loop(self) {
        let inner = &self.inner;
        loop {
            let free = inner.slots.available_permits();
            if free > 0 && !inner.stop.is_cancelled() {
                let want = free.min(64);
                let until = deadline(inner.config.lease);
                match inner
                    .store
                    .claim_tasks(inner.owner, until, u32::try_from(want).unwrap_or(64))
                    .await
                {
                    Ok(tasks) => {
                        if !tasks.is_empty() {
                            tracing::debug!(claimed = tasks.len(), free, "claimed tasks");
                        }
                        let full = tasks.len() == want;
                        for task in tasks {
                            match inner.slots.clone().try_acquire_owned() {
                                Ok(permit) => {
                                    tokio::spawn(self.clone().run(task, permit));
                                }
                                Err(_) => {
                                    let _ =
                                        inner.store.release_leases(inner.owner, &[task.id]).await;
                                }
                            }
                        }
                        if full {
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim tasks; retrying in 1 s");
                        tokio::select! {
                            () = inner.stop.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                () = inner.stop.cancelled() => break,
                () = inner.wake.notified() => {
                    // Runs ending together free their slots within a moment: claim for
                    // all of them in one transaction rather than one each.
                    if inner.slots.available_permits() < inner.config.workers.div_ceil(4) {
                        tokio::time::sleep(CLAIM_COALESCE).await;
                    }
                }
                () = tokio::time::sleep(inner.config.poll_interval) => {}
            }
        }
        // Wait for runs in progress to let go.
        let _ = inner
            .slots
            .acquire_many(u32::try_from(inner.config.workers).unwrap_or(u32::MAX))
            .await;
    }

    async fn heartbeat_loop(self) {
        let inner = &self.inner;
        let every = inner.config.lease / 3;
        loop {
            tokio::select! {
                () = inner.stop.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            let ids: Vec<TaskId> = match inner.active.lock() {
                Ok(a) => a.keys().copied().collect(),
                Err(_) => continue,
            };
            if ids.is_empty() {
                continue;
            }
            match inner
                .store
                .renew_leases(inner.owner, &ids, deadline(inner.config.lease))
                .await
            {
                Ok(held) => {
                    let held: std::collections::HashSet<TaskId> = held.into_iter().collect();
                    if let Ok(active) = inner.active.lock() {
                        for id in ids.iter().filter(|id| !held.contains(id)) {
                            if let Some(token) = active.get(id) {
                                tracing::info!(task_id = %id, "lease lost (task canceled or taken over); stopping its run");
                                token.cancel();
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew task leases"),
            }
        }
    }

    async fn stats_loop(self) {
        let inner = &self.inner;
        loop {
            tokio::select! {
                () = inner.stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            metrics::gauge!("keel_runs_active").set(self.active_runs() as f64);
            metrics::gauge!("keel_mcp_connections").set(self.inner.mcp.open() as f64);
            if let Ok(depth) = inner.store.queue_depth().await {
                let now = OffsetDateTime::now_utc();
                for d in depth {
                    let p = d.priority.as_str();
                    metrics::gauge!("keel_queue_depth", "priority" => p).set(d.waiting as f64);
                    let age = d
                        .oldest
                        .map_or(0.0, |o| (now - o).as_seconds_f64().max(0.0));
                    metrics::gauge!("keel_queue_oldest_age_seconds", "priority" => p).set(age);
                }
            }
            if let Ok(n) = inner.store.dead_letter_count().await {
                metrics::gauge!("keel_dead_letters").set(n as f64);
            }
            if let Ok(counts) = inner.store.task_counts().await {
                // Live statuses only (finished tasks are `keel_tasks_finished_total`); one
                // with no tasks left is reported as 0, not left at its last value.
                for status in [
                    keel_core::task::TaskStatus::Submitted,
                    keel_core::task::TaskStatus::Working,
                    keel_core::task::TaskStatus::InputRequired,
                ] {
                    let n = counts
                        .iter()
                        .find(|(s, _)| *s == status)
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("keel_tasks", "status" => status.as_str()).set(n as f64);
                }
            }
        }
    }

    async fn run(self, task: TaskRecord, permit: OwnedSemaphorePermit) {
        let id = task.id;
        let token = self.inner.stop.child_token();
        if let Ok(mut active) = self.inner.active.lock() {
            active.insert(id, token.clone());
        }
        let span = tracing::info_span!("task", task_id = %id, agent = %task.agent_name, run_id = tracing::field::Empty);
        let exit = self.drive(task, &token).instrument(span).await;
        if let Ok(mut active) = self.inner.active.lock() {
            active.remove(&id);
        }
        match exit {
            Ok(Exit::Settled | Exit::LeaseLost) => {}
            Ok(Exit::Abandoned) => self.let_go(id).await,
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "run stopped; the task will resume from its last checkpoint");
                self.let_go(id).await;
            }
        }
        drop(permit);
        self.inner.wake.notify_one();
    }

    /// Releases the lease so the task resumes at once (here or elsewhere).
    async fn let_go(&self, id: TaskId) {
        if let Err(e) = self
            .inner
            .store
            .release_leases(self.inner.owner, &[id])
            .await
        {
            tracing::warn!(task_id = %id, error = %e, "cannot release a task's lease; it resumes when the lease expires");
        }
    }

    async fn spec(&self, task: &TaskRecord) -> Result<Arc<AgentSpec>, RunError> {
        let key = (task.agent_id, task.agent_version);
        if let Some(spec) = self
            .inner
            .specs
            .lock()
            .ok()
            .and_then(|s| s.get(&key).cloned())
        {
            return Ok(spec);
        }
        let record = self
            .inner
            .store
            .agent_version(task.workspace_id, task.agent_id, task.agent_version)
            .await?;
        let spec =
            Arc::new(AgentSpec::from_json(record.spec).map_err(|e| RunError::Spec(e.to_string()))?);
        if let Ok(mut specs) = self.inner.specs.lock() {
            if specs.len() >= CACHE_ENTRIES {
                specs.clear();
            }
            specs.insert(key, spec.clone());
        }
        Ok(spec)
    }

    fn breaker(&self, agent: AgentId, tool: &str) -> Arc<keel_llm::breaker::Breaker> {
        let Ok(mut breakers) = self.inner.breakers.lock() else {
            return Arc::new(keel_llm::breaker::Breaker::new(Default::default()));
        };
        if breakers.len() >= CACHE_ENTRIES {
            breakers.clear();
        }
        breakers
            .entry((agent, tool.to_owned()))
            .or_insert_with(|| Arc::new(keel_llm::breaker::Breaker::new(Default::default())))
            .clone()
    }

    async fn commit(&self, checkpoint: Checkpoint) -> Result<Committed, RunError> {
        let (reply, answer) = oneshot::channel();
        let started = Instant::now();
        self.inner
            .commits
            .send(Pending { checkpoint, reply })
            .await
            .map_err(|_| RunError::Stopped)?;
        let committed = answer
            .await
            .map_err(|_| RunError::Stopped)?
            .map_err(RunError::Store)?;
        metrics::histogram!("keel_checkpoint_wait_seconds").record(started.elapsed().as_secs_f64());
        Ok(committed)
    }

    #[expect(
        clippy::too_many_lines,
        reason = "the run loop reads best as one piece"
    )]
    async fn drive(&self, task: TaskRecord, token: &CancellationToken) -> Result<Exit, RunError> {
        let inner = &self.inner;
        let spec = match self.spec(&task).await {
            Ok(spec) => spec,
            Err(RunError::Spec(message)) => {
                let run = Run::new(
                    self,
                    &task,
                    task.run_id.unwrap_or_default(),
                    Arc::new(placeholder_spec(&task)),
                );
                return run.fail_for_good("agent_spec", &message, false).await;
            }
            Err(e) => return Err(e),
        };
        // A task that never ran has nothing to resume (and no runs to read).
        let resume = match task.run_id {
            None => false,
            Some(current) => inner
                .store
                .task_runs(task.workspace_id, task.id)
                .await?
                .iter()
                .rev()
                .find(|r| r.id == current)
                .is_some_and(|r| r.status == "working"),
        };
        let run_id;
        let (task, steps, messages): (TaskRecord, Vec<StepRecord>, Vec<(Value, i64, bool)>) =
            if resume {
                run_id = task.run_id.unwrap_or_default();
                tracing::Span::current().record("run_id", tracing::field::display(run_id));
                let event = event(
                    &task,
                    run_id,
                    EventType::RunResumed,
                    json!({
                        "attempt": task.attempts,
                        "after_step": task.steps,
                        "previous_owner": Value::Null,
                    }),
                );
                let begin = BeginRun {
                    task_id: task.id,
                    owner: inner.owner,
                    new_run: None,
                    events: vec![event],
                };
                let state = match inner.store.begin_run(begin).await {
                    Ok(state) => state,
                    Err(keel_store::Error::State { .. }) => return Ok(Exit::LeaseLost),
                    Err(e) => return Err(e.into()),
                };
                inner.sink.publish(&state.events);
                let messages = state
                    .messages
                    .into_iter()
                    .map(|m| {
                        let mine = m.run_id == run_id;
                        (m.body, m.tokens, mine)
                    })
                    .collect();
                (state.task, state.steps, messages)
            } else {
                // A new run starts with a checkpoint of its own, committed with other
                // runs' checkpoints: the task's input becomes the run's first messages.
                run_id = RunId::new();
                tracing::Span::current().record("run_id", tracing::field::display(run_id));
                let bodies = task.input.as_array().cloned().unwrap_or_default();
                let bytes = bodies.iter().map(text_bytes).sum();
                let input: Vec<NewMessage> = tokenize(bytes, move || {
                    bodies
                        .into_iter()
                        .map(|m| NewMessage {
                            tokens: message_tokens(&m),
                            body: m,
                        })
                        .collect()
                })
                .await;
                // A thread the claim saw empty has no earlier turns to read.
                let context = if spec.memory == crate::spec::Memory::Thread
                    && task.thread_empty != Some(true)
                {
                    inner
                        .store
                        .thread_context(task.workspace_id, task.thread_id, task.id)
                        .await?
                } else {
                    Vec::new()
                };
                let started = event(
                    &task,
                    run_id,
                    EventType::TaskStarted,
                    json!({"attempt": task.attempts + 1}),
                );
                let mut start = Run::new(self, &task, run_id, spec.clone()).checkpoint(
                    None,
                    input.clone(),
                    None,
                    vec![started],
                );
                start.start = Some(run_id);
                // A start shares the committer's batches like any step: on Postgres
                // several batches are in flight at once, so it waits behind none.
                let committed = self.commit(start).await?;
                if let Committed::LeaseLost = committed {
                    return Ok(Exit::LeaseLost);
                }
                let mut task = task;
                task.attempts += 1;
                task.run_id = Some(run_id);
                task.status = keel_core::task::TaskStatus::Working;
                task.started_at = task.started_at.or_else(|| Some(OffsetDateTime::now_utc()));
                let messages = context
                    .into_iter()
                    .map(|m| (m.body, m.tokens, false))
                    .chain(input.into_iter().map(|m| (m.body, m.tokens, true)))
                    .collect();
                (task, Vec::new(), messages)
            };
        tracing::debug!(
            resume,
            steps = steps.len(),
            messages = messages.len(),
            "run began"
        );
        let mut run = Run::new(self, &task, run_id, spec.clone());
        let system = match spec.system_prompt(task.metadata.get("variables")) {
            Ok(text) => text,
            Err(message) => return run.fail_for_good("agent_spec", &message, false).await,
        };
        let system_tokens = {
            let system = system.clone();
            tokenize(system.len(), move || keel_llm::tokens::count(&system)).await
        };
        let mut turns: Vec<Turn> = Vec::with_capacity(messages.len() + 8);
        let mut run_pos = 0;
        for (body, tokens, mine) in messages {
            if !mine && spec.memory == crate::spec::Memory::None {
                continue;
            }
            let Ok(mut message) = serde_json::from_value::<Message>(body) else {
                continue;
            };
            // Keel's mark, not the model's business.
            let pinned = message.extra.remove("pinned") == Some(Value::Bool(true));
            turns.push(Turn {
                message,
                pinned,
                tokens: u64::try_from(tokens).unwrap_or(0),
                run_pos: mine.then(|| {
                    run_pos += 1;
                    run_pos - 1
                }),
            });
        }
        let mut approvals: HashMap<String, Value> = steps
            .iter()
            .filter(|s| s.kind == "approval")
            .filter_map(|s| Some((s.data.get("call_id")?.as_str()?.to_owned(), s.data.clone())))
            .collect();
        let mut run_steps = steps
            .iter()
            .filter(|s| s.kind == "llm_call" || s.kind == "tool_call")
            .count();
        // The run's latest summary of the turns left out of the context, reused while the
        // same turns are left out.
        //
        // Kept in memory only: positions index this execution's conversation, which a
        // resume may rebuild differently (tasks of the thread that completed meanwhile), so
        // a resumed run summarizes afresh rather than trust positions from before.
        let mut summary: Option<Summary> = None;
        // A summary that failed (or came back empty) is not asked for again in this run.
        let mut summaries_off = false;
        let mut tool_defs: Vec<Value> = Vec::with_capacity(spec.tools.len());
        for tool in &spec.tools {
            match tool {
                ToolSpec::Mcp(server) => {
                    let listing = tokio::select! {
                        () = token.cancelled() => {
                            return Ok(if inner.stop.is_cancelled() { Exit::Abandoned } else { Exit::LeaseLost });
                        }
                        listing = inner.mcp.tools(run.task.workspace_id, server) => listing,
                    };
                    match listing {
                        Ok(listed) => tool_defs.extend(listed.iter().map(|t| t.definition.clone())),
                        Err(e) => return run.fail_attempt("mcp", &e, true).await,
                    }
                }
                _ => tool_defs.extend(tool.definition()),
            }
        }
        let started = task.started_at.unwrap_or_else(OffsetDateTime::now_utc);
        let deadline_at = started + spec.timeout;

        loop {
            if token.is_cancelled() {
                return Ok(if inner.stop.is_cancelled() {
                    Exit::Abandoned
                } else {
                    Exit::LeaseLost
                });
            }
            let remaining = deadline_at - OffsetDateTime::now_utc();
            if remaining.is_negative() {
                return run
                    .fail_for_good(
                        "timeout",
                        &format!("the task ran past its timeout of {:?}", spec.timeout),
                        false,
                    )
                    .await;
            }
            let remaining = Duration::try_from(remaining).unwrap_or_default();
            if let Some(max) = spec.max_cost_usd
                && run.cost_nanousd as f64 >= max * 1e9
            {
                return run
                    .fail_for_good(
                        "max_cost_usd",
                        &format!("the task spent its limit of {max} USD"),
                        false,
                    )
                    .await;
            }
            let next = next_step(&turns);
            if !matches!(next, Next::Answer(_)) && run_steps >= spec.max_steps as usize {
                return run
                    .fail_for_good(
                        "max_steps",
                        &format!("the run reached its limit of {} steps", spec.max_steps),
                        false,
                    )
                    .await;
            }
            match next {
                Next::Answer(output) => {
                    let ev = event(
                        &run.task,
                        run_id,
                        EventType::TaskCompleted,
                        json!({
                            "steps": run.steps,
                            "output": output,
                            "usage": {"input_tokens": run.input_tokens, "output_tokens": run.output_tokens, "cost_nanousd": run.cost_nanousd},
                        }),
                    );
                    let committed = self
                        .commit(run.checkpoint(
                            None,
                            Vec::new(),
                            Some(Finish::Completed { output }),
                            vec![ev],
                        ))
                        .await?;
                    finished(&committed, "completed");
                    return Ok(settled(committed));
                }
                Next::Llm => {
                    let sizing: Vec<Sizing> = turns
                        .iter()
                        .map(|t| Sizing {
                            tokens: t.tokens,
                            tool: t.message.role == "tool",
                            pinned: t.pinned,
                        })
                        .collect();
                    let budget_tokens = self.context_budget(&spec);
                    let mut keep = crate::context::plan(system_tokens, &sizing, budget_tokens);
                    let mut summary_text = None;
                    if spec.context_overflow == Overflow::Summarize
                        && keep.as_ref().is_none_or(|k| k.contains(&false))
                    {
                        // The summary so far, with exactly the turns it covers left out,
                        // while the rest still fits.
                        if let Some(s) = &summary {
                            let covered: std::collections::HashSet<usize> =
                                s.dropped.iter().copied().collect();
                            let with: Vec<bool> =
                                (0..turns.len()).map(|i| !covered.contains(&i)).collect();
                            let tokens = system_tokens
                                + s.tokens
                                + turns
                                    .iter()
                                    .zip(&with)
                                    .filter(|(_, k)| **k)
                                    .map(|(t, _)| t.tokens)
                                    .sum::<u64>();
                            if tokens <= budget_tokens {
                                summary_text = Some((s.text.clone(), s.tokens));
                                keep = Some(with);
                            }
                        }
                        if summary_text.is_none() && !summaries_off {
                            // Room for the summary, and down to three quarters of the
                            // budget, so the next steps fit without summarizing again.
                            let room = summary_room(budget_tokens);
                            let with_room = crate::context::plan(
                                system_tokens + room,
                                &sizing,
                                budget_tokens / 4 * 3,
                            )
                            .or_else(|| {
                                crate::context::plan(system_tokens + room, &sizing, budget_tokens)
                            });
                            if let Some(with_room) = with_room {
                                let dropped: Vec<usize> =
                                    (0..with_room.len()).filter(|&i| !with_room[i]).collect();
                                match self
                                    .summarize(
                                        &mut run,
                                        &turns,
                                        dropped,
                                        summary.as_ref(),
                                        token,
                                        remaining,
                                    )
                                    .await?
                                {
                                    Some(s) => {
                                        summary_text = Some((s.text.clone(), s.tokens));
                                        summary = Some(s);
                                        keep = Some(with_room);
                                    }
                                    None => summaries_off = true,
                                }
                            }
                        }
                    }
                    let Some(keep) = keep else {
                        return run
                            .fail_for_good("context_tokens", &format!("the latest turn alone exceeds the context budget of {budget_tokens} tokens (the agent's context_tokens, or its route's smallest context_window)"), false)
                            .await;
                    };
                    let kept_tokens: u64 = turns
                        .iter()
                        .zip(&keep)
                        .filter(|(_, k)| **k)
                        .map(|(t, _)| t.tokens)
                        .sum::<u64>()
                        + summary_text.as_ref().map_or(0, |(_, n)| *n);
                    let mut messages = Vec::with_capacity(turns.len() + 1);
                    let system_text = match &summary_text {
                        Some((text, _)) => format!(
                            "{system}\n\nSummary of the earlier conversation (its oldest messages were left out to fit the context):\n{text}"
                        ),
                        None => system.clone(),
                    };
                    if !system_text.trim().is_empty() {
                        messages.push(Message {
                            role: "system".to_owned(),
                            content: Some(Value::String(system_text)),
                            tool_calls: None,
                            tool_call_id: None,
                            extra: serde_json::Map::new(),
                        });
                    }
                    messages.extend(
                        turns
                            .iter()
                            .zip(&keep)
                            .filter(|(_, k)| **k)
                            .map(|(t, _)| t.message.clone()),
                    );
                    let request = ChatRequest {
                        model: spec.model.clone(),
                        messages,
                        stream: None,
                        stream_options: None,
                        temperature: None,
                        tools: (!tool_defs.is_empty()).then(|| tool_defs.clone()),
                        extra: serde_json::Map::new(),
                    };
                    let prompt_tokens = system_tokens + kept_tokens;
                    let mut budget = match inner
                        .reserve_step(run.task.workspace_id, &spec.model, prompt_tokens)
                        .await
                    {
                        Ok(b) => b,
                        Err(BudgetRefusal::Exceeded(message)) => {
                            metrics::counter!("keel_budget_rejections_total").increment(1);
                            return run.fail_for_good("budget", &message, false).await;
                        }
                        Err(BudgetRefusal::Store(e)) => return Err(e.into()),
                    };
                    let observer: Arc<dyn keel_llm::router::Observer> =
                        Arc::from(inner.sink.llm_observer(run.task.workspace_id));
                    // Someone follows this task's tokens (stream mode): ask for a stream.
                    let listener = inner.deltas.sender(run.task.id);
                    let t0 = Instant::now();
                    let step_index = run.steps;
                    let answer = tokio::select! {
                        () = token.cancelled() => continue,
                        () = tokio::time::sleep(remaining) => continue,
                        answer = async {
                            match &listener {
                                None => inner.router.chat(&request, observer.as_ref()).await,
                                Some(tx) => streamed(&inner.router, request.clone(), observer.clone(), tx, step_index).await,
                            }
                        }
                        .instrument(tracing::info_span!("step.llm", step = run.steps, model = %spec.model)) => answer,
                    };
                    let latency = t0.elapsed();
                    metrics::histogram!("keel_step_seconds", "kind" => "llm_call")
                        .record(latency.as_secs_f64());
                    let (response, served) = match answer {
                        Ok(ok) => ok,
                        Err(e) => {
                            if let Some(b) = &mut budget {
                                b.actual = 0;
                            }
                            let retryable = !matches!(
                                e,
                                keel_llm::Error::Rejected(_) | keel_llm::Error::UnknownModel { .. }
                            );
                            return run.fail_attempt("llm", &e.to_string(), retryable).await;
                        }
                    };
                    let Some(choice) = response.choices.into_iter().next() else {
                        return run
                            .fail_attempt("llm", "the model answered with no choices", true)
                            .await;
                    };
                    let mut message = choice.message;
                    message.role = "assistant".to_owned();
                    let (reported, estimated) = match response.usage {
                        Some(u) => (u, false),
                        None => {
                            let text = message.text();
                            let output =
                                tokenize(text.len(), move || keel_llm::tokens::count(&text)).await;
                            (keel_llm::types::Usage::new(prompt_tokens, output), true)
                        }
                    };
                    let (input_tokens, output_tokens) =
                        (reported.prompt_tokens, reported.completion_tokens);
                    let cost = served.prices.cost(&reported);
                    if let Some(b) = &mut budget {
                        b.actual = i64::try_from(cost).unwrap_or(i64::MAX);
                    }
                    let body = serde_json::to_value(&message).unwrap_or(Value::Null);
                    let tokens = {
                        let body = body.clone();
                        tokenize(text_bytes(&body), move || message_tokens(&body)).await
                    };
                    let calls = message.tool_calls.as_ref().map_or(0, Vec::len);
                    let idx = run.steps;
                    let mut events = Vec::new();
                    let text = message.text();
                    if !text.is_empty() {
                        events.push(event(
                            &run.task,
                            run_id,
                            EventType::AgentMessage,
                            json!({"role": "assistant", "content": &text, "step": idx}),
                        ));
                    }
                    let data = json!({
                        "route": served.route,
                        "target": served.target,
                        "upstream_model": served.upstream_model,
                        "finish_reason": choice.finish_reason,
                        "input_tokens": input_tokens,
                        "output_tokens": output_tokens,
                        "estimated": estimated,
                        "cost_nanousd": cost,
                        "latency_ms": u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
                        "tool_calls": calls,
                    });
                    let usage = llm_usage(
                        run.task.workspace_id,
                        &served,
                        &reported,
                        estimated,
                        cost,
                        u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
                    );
                    // An answer without tool calls ends the task: the step and the
                    // completion commit together (one transaction, not two).
                    let finish = (calls == 0).then(|| {
                        let output = (!text.is_empty()).then(|| text.clone());
                        events.push(event(
                            &run.task,
                            run_id,
                            EventType::TaskCompleted,
                            json!({
                                "steps": run.steps + 1,
                                "output": output,
                                "usage": {
                                    "input_tokens": run.input_tokens + i64::try_from(input_tokens).unwrap_or(0),
                                    "output_tokens": run.output_tokens + i64::try_from(output_tokens).unwrap_or(0),
                                    "cost_nanousd": run.cost_nanousd + i64::try_from(cost).unwrap_or(0),
                                },
                            }),
                        ));
                        Finish::Completed { output }
                    });
                    let completes = finish.is_some();
                    let mut checkpoint = run.checkpoint(
                        Some(("llm_call", data)),
                        vec![NewMessage { body, tokens }],
                        finish,
                        events,
                    );
                    checkpoint.input_tokens = i64::try_from(input_tokens).unwrap_or(i64::MAX);
                    checkpoint.output_tokens = i64::try_from(output_tokens).unwrap_or(i64::MAX);
                    checkpoint.cost_nanousd = i64::try_from(cost).unwrap_or(i64::MAX);
                    checkpoint.usage = Some(usage);
                    let committed = self.commit(checkpoint).await?;
                    if completes {
                        finished(&committed, "completed");
                        return Ok(settled(committed));
                    }
                    if let Committed::LeaseLost = committed {
                        return Ok(Exit::LeaseLost);
                    }
                    run.steps += 1;
                    run.input_tokens += i64::try_from(input_tokens).unwrap_or(0);
                    run.output_tokens += i64::try_from(output_tokens).unwrap_or(0);
                    run.cost_nanousd += i64::try_from(cost).unwrap_or(0);
                    run_steps += 1;
                    turns.push(Turn {
                        message,
                        tokens: u64::try_from(tokens).unwrap_or(0),
                        pinned: false,
                        run_pos: Some(run_pos),
                    });
                    run_pos += 1;
                }
                Next::Tool(call, asked_at) => {
                    if run.tool_calls >= i64::from(spec.max_tool_calls) {
                        return run
                            .fail_for_good(
                                "max_tool_calls",
                                &format!(
                                    "the task reached its limit of {} tool calls",
                                    spec.max_tool_calls
                                ),
                                false,
                            )
                            .await;
                    }
                    let key = format!("{run_id}.{asked_at}.{}", call.id);
                    let tool = spec.tool(&call.function.name);
                    if let Some(ToolSpec::Human(_)) = tool {
                        // A question to the user: the task waits; the reply is the result.
                        let question = serde_json::from_str::<Value>(&call.function.arguments)
                            .ok()
                            .and_then(|a| a.get("question")?.as_str().map(str::to_owned))
                            .unwrap_or_else(|| call.function.arguments.clone());
                        return self
                            .wait_for_input(
                                &run,
                                json!({
                                    "reason": "reply", "tool": call.function.name, "call_id": call.id, "question": question,
                                }),
                            )
                            .await;
                    }
                    let mut arguments = call.function.arguments.clone();
                    if let Some(tool) = tool
                        && tool.requires_approval()
                    {
                        match approvals.get(&call.id) {
                            None => {
                                let args: Value = serde_json::from_str(&call.function.arguments)
                                    .unwrap_or(Value::String(call.function.arguments.clone()));
                                return self
                                    .wait_for_input(
                                        &run,
                                        json!({
                                            "reason": "approval", "tool": call.function.name, "call_id": call.id, "arguments": args,
                                        }),
                                    )
                                    .await;
                            }
                            Some(decision) => {
                                if let Some(edited) =
                                    decision.get("arguments").filter(|a| !a.is_null())
                                {
                                    arguments = edited.to_string();
                                }
                            }
                        }
                    }
                    let t0 = Instant::now();
                    let outcome = match tool {
                        None => tools::Outcome::refused(format!(
                            "there is no tool named {:?}; the tools are: {}",
                            call.function.name,
                            tool_defs
                                .iter()
                                .filter_map(|d| d["function"]["name"].as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                        // Handled above: a question never reaches a call.
                        Some(ToolSpec::Human(_)) => continue,
                        Some(ToolSpec::Mcp(server)) => {
                            let breaker = self.breaker(run.task.agent_id, &server.name);
                            tokio::select! {
                                () = token.cancelled() => continue,
                                () = tokio::time::sleep(remaining) => continue,
                                outcome = inner.mcp.call(run.task.workspace_id, server, &call.function.name, &arguments, &key, &breaker)
                                .instrument(tracing::info_span!("step.tool", step = run.steps, tool = %call.function.name)) => outcome,
                            }
                        }
                        Some(ToolSpec::Http(http)) => {
                            match tools::check_arguments(&http.parameters, &arguments) {
                                Err(problem) => tools::Outcome::refused(problem),
                                Ok(args) => {
                                    let breaker = self.breaker(run.task.agent_id, &http.name);
                                    let env = inner.env.clone();
                                    let env_fn = move |k: &str| env(k);
                                    tokio::select! {
                                        () = token.cancelled() => continue,
                                        () = tokio::time::sleep(remaining) => continue,
                                        outcome = tools::call_http(&inner.http, http, &args, &key, &breaker, &env_fn)
                                        .instrument(tracing::info_span!("step.tool", step = run.steps, tool = %http.name)) => outcome,
                                    }
                                }
                            }
                        }
                        Some(ToolSpec::Agent(delegate)) => {
                            match self
                                .delegate(&run.task, delegate, &arguments, &key, token, remaining)
                                .await?
                            {
                                Some(outcome) => outcome,
                                None => continue,
                            }
                        }
                    };
                    metrics::histogram!("keel_step_seconds", "kind" => "tool_call")
                        .record(t0.elapsed().as_secs_f64());
                    let idx = run.steps;
                    let args: Value = serde_json::from_str(&arguments)
                        .unwrap_or(Value::String(arguments.clone()));
                    let duration_ms =
                        u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX);
                    let events = vec![
                        event(
                            &run.task,
                            run_id,
                            EventType::ToolCall,
                            json!({
                                "tool": call.function.name, "call_id": call.id, "arguments": args, "idempotency_key": key, "step": idx,
                            }),
                        ),
                        event(
                            &run.task,
                            run_id,
                            EventType::ToolResult,
                            json!({
                                "tool": call.function.name, "call_id": call.id, "ok": outcome.ok,
                                "result": if outcome.ok { Value::String(outcome.content.clone()) } else { Value::Null },
                                "error": if outcome.ok { Value::Null } else { Value::String(outcome.content.clone()) },
                                "duration_ms": duration_ms,
                            }),
                        ),
                    ];
                    let reply = Message {
                        role: "tool".to_owned(),
                        content: Some(Value::String(outcome.content.clone())),
                        tool_calls: None,
                        tool_call_id: Some(call.id.clone()),
                        extra: serde_json::Map::new(),
                    };
                    let body = serde_json::to_value(&reply).unwrap_or(Value::Null);
                    let tokens = {
                        let body = body.clone();
                        tokenize(text_bytes(&body), move || message_tokens(&body)).await
                    };
                    let data = json!({
                        "tool": call.function.name, "call_id": call.id, "ok": outcome.ok, "status": outcome.status,
                        "attempts": outcome.attempts, "duration_ms": duration_ms, "idempotency_key": key,
                    });
                    let mut checkpoint = run.checkpoint(
                        Some(("tool_call", data)),
                        vec![NewMessage { body, tokens }],
                        None,
                        events,
                    );
                    checkpoint.tool_calls = 1;
                    if let Committed::LeaseLost = self.commit(checkpoint).await? {
                        return Ok(Exit::LeaseLost);
                    }
                    approvals.remove(&call.id);
                    run.steps += 1;
                    run.tool_calls += 1;
                    run_steps += 1;
                    turns.push(Turn {
                        message: reply,
                        tokens: u64::try_from(tokens).unwrap_or(0),
                        pinned: false,
                        run_pos: Some(run_pos),
                    });
                    run_pos += 1;
                }
            }
        }
    }

    /// Ends the run where it stands, waiting for a person: the task becomes
    /// `input-required`, with a `task.input_required` event carrying `data`.
    async fn wait_for_input(&self, run: &Run<'_>, data: Value) -> Result<Exit, RunError> {
        let ev = event(&run.task, run.run_id, EventType::TaskInputRequired, data);
        let committed = self
            .commit(run.checkpoint(None, Vec::new(), Some(Finish::InputRequired), vec![ev]))
            .await?;
        Ok(settled(committed))
    }

    /// Most tokens of conversation an LLM call of `spec` may send: its `context_tokens`,
    /// cut to the smallest context window among its route's targets.
    fn context_budget(&self, spec: &AgentSpec) -> u64 {
        let window = self
            .inner
            .router
            .routes()
            .find(|r| r.name == spec.model)
            .and_then(keel_llm::router::Route::context_window);
        let budget = u64::from(spec.context_tokens);
        window.map_or(budget, |w| budget.min(u64::from(w)))
    }

    /// Summarizes the turns at `dropped` (building on `previous` when it covers the first
    /// of them) with an LLM call through the agent's model route, and commits it as a
    /// `summary` step (its usage and cost the task's). `None` when it could not be had (the
    /// call failed, a budget refused it, the run was interrupted): the turns are then left
    /// out without a summary.
    async fn summarize(
        &self,
        run: &mut Run<'_>,
        turns: &[Turn],
        dropped: Vec<usize>,
        previous: Option<&Summary>,
        token: &CancellationToken,
        remaining: Duration,
    ) -> Result<Option<Summary>, RunError> {
        let inner = &self.inner;
        let spec = run.spec.clone();
        let ws = run.task.workspace_id;
        let room = summary_room(self.context_budget(&spec));
        let (earlier, new) = match previous {
            Some(p) if dropped.starts_with(&p.dropped) => {
                (Some(p.text.as_str()), &dropped[p.dropped.len()..])
            }
            _ => (None, &dropped[..]),
        };
        let mut transcript = String::new();
        if let Some(earlier) = earlier {
            transcript.push_str("Summary so far:\n");
            transcript.push_str(earlier);
            transcript.push_str("\n\nThe conversation then went on:\n");
        }
        // One summarizing call reads at most about the agent's own context budget, each
        // left-out message its share of it, so every one is represented (if cut short).
        let cap =
            usize::try_from(self.context_budget(&spec).saturating_mul(3)).unwrap_or(usize::MAX);
        let share = (cap.saturating_sub(transcript.len()) / new.len().max(1)).max(256);
        let mut line = String::new();
        for &i in new {
            if let Some(turn) = turns.get(i) {
                line.clear();
                transcript_line(&mut line, &turn.message);
                if line.len() > share {
                    line.truncate(line.floor_char_boundary(share));
                    line.push_str(" […]\n");
                }
                transcript.push_str(&line);
            }
        }
        if transcript.len() > cap {
            transcript.truncate(transcript.floor_char_boundary(cap));
            transcript.push_str("\n[…]");
        }
        let prompt_tokens = u64::try_from(transcript.len() / 3).unwrap_or(u64::MAX) + 128;
        let text_message = |role: &str, text: String| Message {
            role: role.to_owned(),
            content: Some(Value::String(text)),
            tool_calls: None,
            tool_call_id: None,
            extra: serde_json::Map::new(),
        };
        let mut extra = serde_json::Map::new();
        extra.insert("max_tokens".to_owned(), json!(room));
        let request = ChatRequest {
            model: spec.model.clone(),
            messages: vec![
                text_message("system", SUMMARY_PROMPT.to_owned()),
                text_message("user", transcript),
            ],
            stream: None,
            stream_options: None,
            temperature: Some(0.0),
            tools: None,
            extra,
        };
        let mut budget = match inner.reserve_step(ws, &spec.model, prompt_tokens).await {
            Ok(b) => b,
            Err(BudgetRefusal::Exceeded(_)) => return Ok(None),
            Err(BudgetRefusal::Store(e)) => return Err(e.into()),
        };
        let observer = inner.sink.llm_observer(ws);
        let t0 = Instant::now();
        let answer = tokio::select! {
            () = token.cancelled() => None,
            () = tokio::time::sleep(remaining) => None,
            answer = inner
                .router
                .chat(&request, observer.as_ref())
                .instrument(tracing::info_span!("step.summary", step = run.steps, model = %spec.model)) => Some(answer),
        };
        let latency = t0.elapsed();
        let (response, served) = match answer {
            None => return Ok(None),
            Some(Ok(ok)) => ok,
            Some(Err(e)) => {
                if let Some(b) = &mut budget {
                    b.actual = 0;
                }
                metrics::counter!("keel_context_summaries_total", "outcome" => "error")
                    .increment(1);
                tracing::warn!(error = %e, "cannot summarize the turns left out of the context; leaving them out without a summary");
                return Ok(None);
            }
        };
        let mut text = response
            .choices
            .first()
            .map(|c| c.message.text())
            .unwrap_or_default();
        let mut tokens = {
            let text = text.clone();
            tokenize(text.len(), move || keel_llm::tokens::count(&text)).await
        };
        if tokens > room {
            // A model that ignored `max_tokens`: the summary is cut to its room.
            text.truncate(text.floor_char_boundary(
                usize::try_from(room.saturating_mul(3)).unwrap_or(usize::MAX),
            ));
            tokens = {
                let text = text.clone();
                tokenize(text.len(), move || keel_llm::tokens::count(&text)).await
            };
        }
        let (reported, estimated) = match response.usage {
            Some(u) => (u, false),
            None => (keel_llm::types::Usage::new(prompt_tokens, tokens), true),
        };
        let (input_tokens, output_tokens) = (reported.prompt_tokens, reported.completion_tokens);
        let cost = served.prices.cost(&reported);
        if let Some(b) = &mut budget {
            b.actual = i64::try_from(cost).unwrap_or(i64::MAX);
        }
        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let covers = serde_json::to_value(Summary {
            dropped: dropped.clone(),
            text: String::new(),
            tokens: 0,
        })
        .map(|v| v["dropped"].clone())
        .unwrap_or(Value::Null);
        let data = json!({
            "dropped": covers, "text": text, "tokens": tokens,
            "route": served.route, "target": served.target, "upstream_model": served.upstream_model,
            "input_tokens": input_tokens, "output_tokens": output_tokens, "estimated": estimated,
            "cost_nanousd": cost, "latency_ms": latency_ms,
        });
        let usage = llm_usage(ws, &served, &reported, estimated, cost, latency_ms);
        let mut checkpoint = run.checkpoint(Some(("summary", data)), Vec::new(), None, Vec::new());
        checkpoint.input_tokens = i64::try_from(input_tokens).unwrap_or(i64::MAX);
        checkpoint.output_tokens = i64::try_from(output_tokens).unwrap_or(i64::MAX);
        checkpoint.cost_nanousd = i64::try_from(cost).unwrap_or(i64::MAX);
        checkpoint.usage = Some(usage);
        if let Committed::LeaseLost = self.commit(checkpoint).await? {
            return Ok(None);
        }
        run.steps += 1;
        run.input_tokens += i64::try_from(input_tokens).unwrap_or(0);
        run.output_tokens += i64::try_from(output_tokens).unwrap_or(0);
        run.cost_nanousd += i64::try_from(cost).unwrap_or(0);
        if text.trim().is_empty() {
            metrics::counter!("keel_context_summaries_total", "outcome" => "empty").increment(1);
            return Ok(None);
        }
        metrics::counter!("keel_context_summaries_total", "outcome" => "ok").increment(1);
        Ok(Some(Summary {
            dropped,
            text,
            tokens,
        }))
    }

    /// Runs a child task for an agent tool and waits for it; `None` when the run was
    /// interrupted meanwhile. The child is created with the call's idempotency key, so a
    /// resumed parent finds the same child instead of starting another.
    async fn delegate(
        &self,
        parent: &TaskRecord,
        tool: &crate::spec::AgentTool,
        arguments: &str,
        key: &str,
        token: &CancellationToken,
        remaining: Duration,
    ) -> Result<Option<tools::Outcome>, RunError> {
        let inner = &self.inner;
        let t0 = Instant::now();
        let refused = |m: String| Ok(Some(tools::Outcome::refused(m)));
        if parent.depth + 1 > inner.config.max_depth {
            return refused(format!(
                "cannot delegate to {}: the chain of delegations would be deeper than {} (runtime.max_depth)",
                tool.agent, inner.config.max_depth
            ));
        }
        let input = match serde_json::from_str::<Value>(arguments) {
            Ok(v) => match v.get("input").and_then(Value::as_str) {
                Some(s) => s.to_owned(),
                None => {
                    return refused(
                        "the arguments need an `input` string: what to ask the agent".to_owned(),
                    );
                }
            },
            Err(e) => return refused(format!("the arguments are not valid JSON ({e})")),
        };
        let agent = match inner.store.agent(parent.workspace_id, &tool.agent).await {
            Ok(a) => a,
            Err(keel_store::Error::NotFound { .. }) => {
                return refused(format!("there is no agent named {:?}", tool.agent));
            }
            Err(e) => return Err(e.into()),
        };
        let child = crate::tasks::NewTaskRequest {
            agent: &agent,
            input: json!([{"role": "user", "content": input}]),
            thread_id: None,
            parent_task_id: Some(parent.id),
            depth: parent.depth + 1,
            priority: parent.priority,
            metadata: json!({"parent_task_id": parent.id.to_string()}),
            idempotency_key: Some(format!("delegation:{key}")),
            max_queued: i64::MAX,
            correlation_id: None,
        };
        let created = crate::tasks::create(inner.store.as_ref(), child).await?;
        let child = match created {
            keel_store::runtime::Created::New(task, events) => {
                inner.sink.publish(&events);
                self.wake();
                task
            }
            keel_store::runtime::Created::Existing(task) => task,
            keel_store::runtime::Created::QueueFull { .. } => {
                return refused("the task queue is full".to_owned());
            }
        };
        let until = tokio::time::Instant::now() + remaining;
        loop {
            let task = inner.store.task(parent.workspace_id, child.id).await?;
            let done = |ok: bool, content: String| {
                Ok(Some(tools::Outcome {
                    ok,
                    content,
                    status: None,
                    attempts: 1,
                    duration: t0.elapsed(),
                }))
            };
            match task.status {
                keel_core::task::TaskStatus::Completed => {
                    return done(true, task.output.unwrap_or_default());
                }
                s if s.is_terminal() => {
                    return done(
                        false,
                        format!("agent {} ended its task {} as {s}", tool.agent, task.id),
                    );
                }
                _ => {}
            }
            tokio::select! {
                () = token.cancelled() => return Ok(None),
                () = tokio::time::sleep_until(until) => return Ok(None),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

/// The settled outcome of a checkpoint that ends a run.
/// Counts a task this run finished — only if the ending was stored: a run whose lease
/// was lost (the task canceled, or taken over elsewhere) ended nothing.
fn finished(committed: &Committed, status: &'static str) {
    if let Committed::Stored { .. } = committed {
        metrics::counter!("keel_tasks_finished_total", "status" => status).increment(1);
    }
}

fn settled(committed: Committed) -> Exit {
    match committed {
        Committed::Stored { .. } => Exit::Settled,
        Committed::LeaseLost => Exit::LeaseLost,
    }
}

/// What a run keeps track of between steps.
struct Run<'a> {
    rt: &'a Runtime,
    task: TaskRecord,
    run_id: RunId,
    spec: Arc<AgentSpec>,
    steps: i64,
    tool_calls: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_nanousd: i64,
}

impl<'a> Run<'a> {
    fn new(rt: &'a Runtime, task: &TaskRecord, run_id: RunId, spec: Arc<AgentSpec>) -> Self {
        Self {
            rt,
            steps: task.steps,
            tool_calls: task.tool_calls,
            input_tokens: task.input_tokens,
            output_tokens: task.output_tokens,
            cost_nanousd: task.cost_nanousd,
            task: task.clone(),
            run_id,
            spec,
        }
    }

    fn checkpoint(
        &self,
        step: Option<(&str, Value)>,
        messages: Vec<NewMessage>,
        finish: Option<Finish>,
        events: Vec<NewEvent>,
    ) -> Checkpoint {
        Checkpoint {
            task_id: self.task.id,
            workspace_id: self.task.workspace_id,
            thread_id: self.task.thread_id,
            run_id: self.run_id,
            owner: self.rt.inner.owner,
            start: None,
            step: step.map(|(k, d)| (k.to_owned(), d)),
            messages,
            tool_calls: 0,
            input_tokens: 0,
            output_tokens: 0,
            cost_nanousd: 0,
            finish,
            events,
            usage: None,
        }
    }

    /// Ends the task as failed without retry (a limit, a broken spec).
    async fn fail_for_good(
        &self,
        kind: &str,
        message: &str,
        dead_letter: bool,
    ) -> Result<Exit, RunError> {
        let error = json!({"kind": kind, "message": message});
        let mut events = vec![event(
            &self.task,
            self.run_id,
            EventType::TaskError,
            json!({
                "attempt": self.task.attempts, "error": error, "will_retry": false,
            }),
        )];
        if dead_letter {
            events.push(dead_letter_event(&self.task, self.run_id, message));
        }
        tracing::info!(kind, message, "task failed");
        let committed = self
            .rt
            .commit(self.checkpoint(
                None,
                Vec::new(),
                Some(Finish::Failed { error, dead_letter }),
                events,
            ))
            .await?;
        finished(&committed, "failed");
        Ok(settled(committed))
    }

    /// Ends this run as failed: the task is retried by a new run after a backoff, or —
    /// out of attempts, or not retryable — dead-lettered.
    async fn fail_attempt(
        &self,
        kind: &str,
        message: &str,
        retryable: bool,
    ) -> Result<Exit, RunError> {
        let attempts = self.task.attempts.max(1);
        let will_retry = retryable && attempts < self.task.max_attempts;
        if !will_retry {
            return self.fail_for_good(kind, message, true).await;
        }
        let error = json!({"kind": kind, "message": message});
        let backoff = self
            .spec
            .retry_delay
            .saturating_mul(1 << (attempts - 1).clamp(0, 10))
            .min(Duration::from_secs(300));
        let retry_at = OffsetDateTime::now_utc() + backoff;
        let events = vec![event(
            &self.task,
            self.run_id,
            EventType::TaskError,
            json!({
                "attempt": attempts, "error": error, "will_retry": true,
            }),
        )];
        tracing::info!(
            kind,
            message,
            ?backoff,
            "run failed; the task will be retried"
        );
        let committed = self
            .rt
            .commit(self.checkpoint(
                None,
                Vec::new(),
                Some(Finish::Retry { error, retry_at }),
                events,
            ))
            .await?;
        Ok(settled(committed))
    }
}

fn dead_letter_event(task: &TaskRecord, run_id: RunId, reason: &str) -> NewEvent {
    event(
        task,
        run_id,
        EventType::DeadLetterCreated,
        json!({
            "queue": "tasks", "reason": reason, "attempts": task.attempts, "job_id": task.id.to_string(),
        }),
    )
}

/// A spec good enough to fail a task whose stored spec no longer parses.
fn placeholder_spec(task: &TaskRecord) -> AgentSpec {
    AgentSpec {
        name: task.agent_name.clone(),
        description: String::new(),
        model: String::new(),
        system_prompt: String::new(),
        variables: std::collections::BTreeMap::new(),
        tools: Vec::new(),
        max_steps: 1,
        max_tool_calls: 0,
        timeout: Duration::from_secs(1),
        context_tokens: 256,
        max_cost_usd: None,
        max_concurrency: None,
        max_attempts: 1,
        retry_delay: Duration::from_secs(1),
        memory: crate::spec::Memory::None,
        context_overflow: Overflow::Drop,
    }
}

/// An event about a task's run.
pub(crate) fn event(task: &TaskRecord, run_id: RunId, kind: EventType, data: Value) -> NewEvent {
    let mut e = NewEvent::new(kind, task.workspace_id, data).with_task(task.id);
    e.agent_id = Some(task.agent_id);
    e.run_id = Some(run_id);
    e
}

/// Runs CPU-bound work (tokenizing: its first use loads the tokenizer's tables) on the
/// blocking pool, never on the async workers.
async fn off_thread<T: Send + Default + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap_or_default()
}

/// Runs a token count over about `bytes` of text: here when it is short and the tokenizer
/// is loaded (microseconds), else on the blocking pool (the first count loads its tables;
/// a long text takes milliseconds). A hop to the pool per step cost more than the count.
async fn tokenize<T: Send + Default + 'static>(
    bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    if bytes <= keel_llm::tokens::INLINE_BYTES && keel_llm::tokens::ready() {
        work()
    } else {
        off_thread(work).await
    }
}

/// The bytes of text in a message body (its strings, as an estimate of the work of
/// counting its tokens).
fn text_bytes(body: &Value) -> usize {
    match body {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(text_bytes).sum(),
        Value::Object(map) => map.values().map(text_bytes).sum(),
        _ => 0,
    }
}

/// The tokens of a stored chat message (its text, plus its tool calls' names and
/// arguments, plus a few for the message's framing).
pub(crate) fn message_tokens(body: &Value) -> i64 {
    let mut n = 4;
    if let Some(text) = body.get("content").and_then(Value::as_str) {
        n += keel_llm::tokens::count(text);
    }
    if let Some(calls) = body.get("tool_calls").and_then(Value::as_array) {
        for c in calls {
            if let Some(f) = c.get("function") {
                n += f
                    .get("name")
                    .and_then(Value::as_str)
                    .map_or(0, keel_llm::tokens::count);
                n += f
                    .get("arguments")
                    .and_then(Value::as_str)
                    .map_or(0, keel_llm::tokens::count);
            }
        }
    }
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The next step, from the conversation alone.
fn next_step(turns: &[Turn]) -> Next {
    let Some(last_assistant) = turns.iter().rposition(|t| t.message.role == "assistant") else {
        return Next::Llm;
    };
    let assistant = &turns[last_assistant];
    let after = &turns[last_assistant + 1..];
    match &assistant.message.tool_calls {
        Some(calls) if !calls.is_empty() => {
            let answered: std::collections::HashSet<&str> = after
                .iter()
                .filter(|t| t.message.role == "tool")
                .filter_map(|t| t.message.tool_call_id.as_deref())
                .collect();
            match calls.iter().find(|c| !answered.contains(c.id.as_str())) {
                Some(call) => Next::Tool(call.clone(), assistant.run_pos.unwrap_or(last_assistant)),
                None => Next::Llm,
            }
        }
        _ if after.is_empty() => {
            let text = assistant.message.text();
            Next::Answer((!text.is_empty()).then_some(text))
        }
        _ => Next::Llm,
    }
}

fn deadline(lease: Duration) -> OffsetDateTime {
    OffsetDateTime::now_utc() + lease
}

/// Why a run stopped before settling.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    /// The store failed.
    #[error("store: {0}")]
    Store(Arc<keel_store::Error>),
    /// The agent's stored spec does not parse.
    #[error("agent spec: {0}")]
    Spec(String),
    /// The runtime is stopping.
    #[error("the runtime is stopping")]
    Stopped,
}

impl From<keel_store::Error> for RunError {
    fn from(e: keel_store::Error) -> Self {
        Self::Store(Arc::new(e))
    }
}

/// Batches taking turns on the database at once: Postgres takes transactions side by
/// side (their rows differ; a workspace's event head orders their ends), SQLite has one
/// writer.
fn commit_concurrency(backend: Backend) -> usize {
    match backend {
        Backend::Postgres => 4,
        Backend::Sqlite => 1,
    }
}

async fn commit_loop(
    store: Arc<dyn Store>,
    sink: Arc<dyn EventSink>,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    stop: CancellationToken,
) {
    use futures_util::StreamExt as _;
    let concurrency = commit_concurrency(store.backend());
    // Checkpoints are taken only while a batch may start: while every slot is busy they
    // queue, and the next batch is the bigger for it.
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut closed = false;
    loop {
        let may_start = in_flight.len() < concurrency;
        tokio::select! {
            biased;
            Some(()) = in_flight.next() => {}
            () = stop.cancelled(), if !closed => {
                rx.close();
                closed = true;
            }
            first = rx.recv(), if may_start => {
                let Some(first) = first else { break };
                let mut batch = Vec::with_capacity(max_batch.min(64));
                batch.push(first);
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                in_flight.push(commit_batch(store.clone(), sink.clone(), batch));
            }
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Commits one batch of checkpoints (retrying a deadlock or serialisation failure) and
/// answers each run.
async fn commit_batch(store: Arc<dyn Store>, sink: Arc<dyn EventSink>, batch: Vec<Pending>) {
    let (checkpoints, replies): (Vec<Checkpoint>, Vec<_>) =
        batch.into_iter().map(|p| (p.checkpoint, p.reply)).unzip();
    let started = Instant::now();
    let mut result = store.commit_checkpoints(&checkpoints).await;
    for attempt in 1..3 {
        match &result {
            Err(e) if !e.is_unavailable() => {
                // A deadlock or serialisation failure between instances: try again.
                tracing::debug!(error = %e, attempt, "checkpoint batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                result = store.commit_checkpoints(&checkpoints).await;
            }
            _ => break,
        }
    }
    metrics::histogram!("keel_checkpoint_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("keel_checkpoint_batch_size").record(checkpoints.len() as f64);
    match result {
        Ok(outcomes) => {
            for (outcome, reply) in outcomes.into_iter().zip(replies) {
                if let Committed::Stored { events, .. } = &outcome {
                    sink.publish(events);
                }
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, checkpoints = checkpoints.len(), "cannot commit checkpoints; their runs stop and resume from their last checkpoint");
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn a_summary_stores_what_it_covers_as_ranges() {
        let summary = Summary {
            dropped: vec![1, 2, 3, 4, 7, 9, 10],
            text: "t".to_owned(),
            tokens: 1,
        };
        let stored = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            stored["dropped"],
            serde_json::json!([[1, 4], [7, 7], [9, 10]])
        );
        let back: Summary = serde_json::from_value(stored).unwrap();
        assert_eq!(back.dropped, summary.dropped);
    }
}
