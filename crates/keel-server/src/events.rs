//! The event log at run time: appending (group commit), fan-out to live followers, the
//! cross-instance follower, and retention.
//!
//! - [`EventLog::append`] queues events for the one writer task, which commits whatever
//!   has queued as one transaction (many appenders share one fsync) and answers each
//!   caller with its committed events. [`EventLog::emit`] is the fire-and-forget form for
//!   events that are not part of a state change (a provider error, a fallback).
//! - Committed events go to the [`Hub`]: one bounded broadcast ring per workspace that has
//!   followers, each event rendered once (SSE frame and JSON) and shared by every follower.
//! - On Postgres, commits by other instances arrive by `LISTEN/NOTIFY`; the follower task
//!   reads them from the log and publishes them here too.
//! - Correctness never rests on the broadcast: a follower numbers what it has seen, skips
//!   what it has, and reads any gap from the store (see [`follow`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use futures_util::StreamExt as _;
use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use keel_core::config::Events as EventsConfig;
use keel_core::event::{Event, NewEvent, TypeFilter};
use keel_core::id::{AgentId, TaskId, WorkspaceId};
use keel_store::{Commit, Store};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Most append requests queued before `append` waits (and `emit` drops).
const QUEUE: usize = 16_384;
/// Most events committed in one transaction.
const MAX_BATCH: usize = 4_096;
/// Events read from the store per page when a follower catches up.
const PAGE: u32 = 500;
/// Store reads for catching-up followers at once; the rest wait their turn rather than
/// exhaust the connection pool (a reconnect storm is a thousand of them).
const CATCH_UP_READERS: usize = 4;
/// How long a follower keeps retrying a failed store read before it closes its stream
/// with `store_unavailable`.
const READ_RETRY_FOR: Duration = Duration::from_secs(10);

/// Why the event log could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store's commit listener could not start.
    #[error(transparent)]
    Store(keel_store::Error),
    /// The webhook HTTP client could not be built.
    #[error("cannot build the webhook HTTP client: {0}")]
    Http(reqwest::Error),
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The store refused or is down (shared by every append in the failed batch).
    #[error(transparent)]
    Store(Arc<keel_store::Error>),
    /// The writer has stopped (the server is shutting down).
    #[error("the event writer has stopped")]
    Stopped,
}

struct Job {
    events: Vec<NewEvent>,
    reply: Option<oneshot::Sender<Result<Vec<Event>, Arc<keel_store::Error>>>>,
}

/// The handle everything appends and follows through; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<LogInner>,
}

struct LogInner {
    tx: mpsc::Sender<Job>,
    hub: Arc<Hub>,
    webhooks: crate::webhooks::Dispatcher,
    store: Arc<dyn Store>,
    config: EventsConfig,
    clients: Arc<Semaphore>,
    history: History,
    /// Head reads in flight, one per workspace, shared by every stream opening meanwhile.
    heads: Mutex<HashMap<WorkspaceId, HeadRead>>,
}

type HeadRead = Shared<BoxFuture<'static, Result<keel_store::EventHead, ReadError>>>;

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

/// The background tasks of the event log; [`Tasks::finish`] drains and stops them.
#[derive(Debug)]
pub struct Tasks {
    stop: CancellationToken,
    writer: JoinHandle<()>,
    others: Vec<JoinHandle<()>>,
}

/// Starts the writer, the pruner and (on Postgres) the cross-instance follower.
pub async fn start(
    store: Arc<dyn Store>,
    full: &keel_core::config::Config,
) -> Result<(EventLog, Tasks), StartError> {
    let config = &full.events;
    let (tx, rx) = mpsc::channel(QUEUE);
    let stop = CancellationToken::new();
    let hub = Arc::new(Hub::new(config.stream_buffer));
    let webhooks = crate::webhooks::Dispatcher::new(store.clone(), hub.clone(), &full.webhooks)
        .map_err(StartError::Http)?;
    let log = EventLog {
        inner: Arc::new(LogInner {
            tx,
            hub,
            webhooks: webhooks.clone(),
            store: store.clone(),
            config: config.clone(),
            clients: Arc::new(Semaphore::new(config.max_stream_clients)),
            history: History::new(config.history_cache_bytes),
            heads: Mutex::new(HashMap::new()),
        }),
    };
    let writer = tokio::spawn(write_loop(log.clone(), rx, stop.clone()));
    let mut others = vec![tokio::spawn(prune_loop(
        store.clone(),
        config.clone(),
        stop.clone(),
    ))];
    if let Some(commits) = store.listen_commits().await.map_err(StartError::Store)? {
        others.push(tokio::spawn(follow_commits(
            log.clone(),
            commits,
            stop.clone(),
        )));
    }
    others.push(webhooks.start(stop.clone()));
    if full.nats.url.is_some() {
        others.push(tokio::spawn(crate::nats::run(
            log.clone(),
            full.nats.clone(),
            stop.clone(),
        )));
    }
    Ok((
        log,
        Tasks {
            stop,
            writer,
            others,
        },
    ))
}

impl Tasks {
    /// Commits everything queued, then stops every task.
    pub async fn finish(self) {
        self.stop.cancel();
        if let Err(e) = self.writer.await {
            tracing::error!(error = %e, "event writer task failed");
        }
        for task in self.others {
            let _ = task.await;
        }
    }
}

impl EventLog {
    /// Appends events and returns them as committed (with their ids and seqs), sharing a
    /// transaction with whatever else is being appended at the moment.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, AppendError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .tx
            .send(Job {
                events,
                reply: Some(reply),
            })
            .await
            .map_err(|_| AppendError::Stopped)?;
        match answer.await {
            Ok(Ok(events)) => Ok(events),
            Ok(Err(e)) => Err(AppendError::Store(e)),
            Err(_) => Err(AppendError::Stopped),
        }
    }

    /// Queues an event without waiting for its commit. Never blocks: if the queue is full
    /// (the store is far behind) the event is dropped, logged and counted in
    /// `keel_events_dropped_total`.
    pub fn emit(&self, event: NewEvent) {
        let job = Job {
            events: vec![event],
            reply: None,
        };
        if self.inner.tx.try_send(job).is_err() {
            metrics::counter!("keel_events_dropped_total").increment(1);
            tracing::warn!("event queue full or closed; an event was dropped");
        }
    }

    /// Hands events committed elsewhere (in a state change's own transaction) to live
    /// followers.
    pub fn publish(&self, events: &[Event]) {
        self.inner.hub.publish(events);
    }

    /// Ends every live follow (SSE, WebSocket, a task's stream or wait) with
    /// `shutting_down` once it has what its ring holds, and every follow that starts
    /// later: the server is stopping. Webhook deliveries go on, without wake-ups.
    pub fn close_streams(&self) {
        self.inner.hub.close();
    }

    /// The webhook dispatcher.
    pub fn webhooks(&self) -> &crate::webhooks::Dispatcher {
        &self.inner.webhooks
    }

    pub(crate) fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    pub(crate) fn config(&self) -> &EventsConfig {
        &self.inner.config
    }

    /// The workspace's log head. Streams opening at once (a reconnect storm) share one
    /// store read instead of queueing a thousand for the pool. The answer may predate the
    /// call by one read's duration: a live start then begins a few events early, and a
    /// cursor the pruner passes meanwhile is caught by `follow` (reason `expired`).
    pub(crate) async fn head(
        &self,
        workspace: WorkspaceId,
    ) -> Result<keel_store::EventHead, ReadError> {
        let read = {
            let mut heads = self
                .inner
                .heads
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match heads.get(&workspace) {
                // Only a read still in flight is joined: a finished one (its waiters all
                // gone before forgetting it) would be stale.
                Some(read) if read.peek().is_none() => read.clone(),
                _ => {
                    let store = self.inner.store.clone();
                    let task = tokio::spawn(async move {
                        store
                            .event_head(workspace)
                            .await
                            .map_err(|e| Arc::new(ReadFailure::Store(e)))
                    });
                    let read: HeadRead =
                        async move { task.await.map_err(|e| Arc::new(ReadFailure::Task(e)))? }
                            .boxed()
                            .shared();
                    heads.insert(workspace, read.clone());
                    read
                }
            }
        };
        let head = read.clone().await;
        let mut heads = self
            .inner
            .heads
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if heads.get(&workspace).is_some_and(|r| r.ptr_eq(&read)) {
            heads.remove(&workspace);
        }
        head
    }

    /// A slot for one live follower, or `None` when `events.max_stream_clients` are
    /// already connected.
    pub(crate) fn client_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.clients.clone().try_acquire_owned().ok()
    }
}

async fn write_loop(log: EventLog, mut rx: mpsc::Receiver<Job>, stop: CancellationToken) {
    let mut jobs: Vec<Job> = Vec::with_capacity(256);
    loop {
        tokio::select! {
            received = rx.recv_many(&mut jobs, 256) => {
                if received == 0 {
                    break;
                }
                commit(&log, &mut jobs).await;
            }
            () = stop.cancelled() => break,
        }
    }
    rx.close();
    while rx.recv_many(&mut jobs, 256).await > 0 {
        commit(&log, &mut jobs).await;
    }
}

/// Commits queued jobs, up to [`MAX_BATCH`] events a transaction.
async fn commit(log: &EventLog, jobs: &mut Vec<Job>) {
    let mut start = 0;
    while start < jobs.len() {
        let mut end = start;
        let mut count = 0;
        while end < jobs.len() && (count == 0 || count + jobs[end].events.len() <= MAX_BATCH) {
            count += jobs[end].events.len();
            end += 1;
        }
        let batch = &mut jobs[start..end];
        let events: Vec<NewEvent> = batch
            .iter()
            .flat_map(|j| j.events.iter().cloned())
            .collect();
        let started = std::time::Instant::now();
        let result = append_with_retry(
            log.store(),
            &events,
            batch.iter().all(|j| j.reply.is_some()),
        )
        .await;
        match result {
            Ok(committed) => {
                metrics::histogram!("keel_events_batch_size").record(committed.len() as f64);
                metrics::histogram!("keel_events_write_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                for event in &committed {
                    metrics::counter!("keel_events_total", "type" => event.event_type.clone())
                        .increment(1);
                }
                log.inner.hub.publish(&committed);
                let mut rest = committed.as_slice();
                for job in batch.iter_mut() {
                    let (mine, others) = rest.split_at(job.events.len().min(rest.len()));
                    rest = others;
                    if let Some(reply) = job.reply.take() {
                        let _ = reply.send(Ok(mine.to_vec()));
                    }
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for job in batch.iter_mut() {
                    match job.reply.take() {
                        Some(reply) => {
                            let _ = reply.send(Err(e.clone()));
                        }
                        None => {
                            metrics::counter!("keel_events_dropped_total")
                                .increment(job.events.len() as u64);
                        }
                    }
                }
                tracing::error!(error = %e, events = events.len(), "event append failed");
            }
        }
        start = end;
    }
    jobs.clear();
}

/// Callers waiting on the result get the first error at once; fire-and-forget events are
/// retried with backoff for a few seconds before they are given up.
async fn append_with_retry(
    store: &dyn Store,
    events: &[NewEvent],
    all_waiting: bool,
) -> Result<Vec<Event>, keel_store::Error> {
    let attempts = if all_waiting { 1 } else { 6 };
    let mut delay = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match store.append_events(events).await {
            Ok(committed) => return Ok(committed),
            Err(e) if attempt < attempts => {
                tracing::warn!(error = %e, attempt, "event append failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn prune_loop(store: Arc<dyn Store>, config: EventsConfig, stop: CancellationToken) {
    let mut tick = tokio::time::interval(config.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let cutoff = time::OffsetDateTime::now_utc()
            - time::Duration::try_from(config.retention).unwrap_or(time::Duration::MAX);
        match store.prune_events(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("keel_events_pruned_total").increment(n);
                tracing::info!(events = n, retention = ?config.retention, "pruned events past retention");
            }
            Err(e) => tracing::warn!(error = %e, "event pruning failed; will retry"),
        }
    }
}

/// Publishes other instances' commits to this instance's followers.
async fn follow_commits(
    log: EventLog,
    mut commits: keel_store::CommitStream,
    stop: CancellationToken,
) {
    loop {
        let commit = tokio::select! {
            commit = commits.next() => commit,
            () = stop.cancelled() => return,
        };
        let targets: Vec<(WorkspaceId, i64)> = match commit {
            None => return,
            Some(Commit::Appended {
                workspace_id,
                last_seq,
            }) => match log.inner.hub.published(workspace_id) {
                Some(published) if published < last_seq => vec![(workspace_id, published)],
                _ => Vec::new(),
            },
            Some(Commit::Resync) => log.inner.hub.followed(),
        };
        for (workspace, mut after) in targets {
            loop {
                match log.store().events_after(workspace, after, PAGE).await {
                    Ok(page) => {
                        let Some(last) = page.last() else { break };
                        after = last.seq;
                        log.inner.hub.publish(&page);
                        if page.len() < PAGE as usize {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read events committed by another instance");
                        break;
                    }
                }
            }
        }
    }
}

/// One committed event, rendered once for every follower.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) event: Event,
    /// `id: <seq>\nevent: <type>\ndata: <json>\n\n`.
    pub(crate) sse: Bytes,
    /// The envelope as JSON.
    pub(crate) json: Bytes,
}

impl Frame {
    pub(crate) fn new(event: Event) -> Self {
        let json = serde_json::to_vec(&event).unwrap_or_default();
        let mut sse = Vec::with_capacity(json.len() + 64);
        sse.extend_from_slice(b"id: ");
        sse.extend_from_slice(event.seq.to_string().as_bytes());
        sse.extend_from_slice(b"\nevent: ");
        sse.extend_from_slice(event.event_type.as_bytes());
        sse.extend_from_slice(b"\ndata: ");
        sse.extend_from_slice(&json);
        sse.extend_from_slice(b"\n\n");
        Self {
            event,
            sse: sse.into(),
            json: json.into(),
        }
    }
}

/// Per-workspace broadcast rings of committed events, for workspaces with followers.
///
/// Closing the hub (at shutdown) drops every channel's sender: each follower gets what its
/// ring still holds, then `Closed`, and ends its stream with `shutting_down`. So a follow
/// waits on its receiver alone — no shutdown token polled beside it on every event, which
/// with a thousand streams was a lock and a cache miss per delivery.
pub(crate) struct Hub {
    channels: Mutex<Channels>,
    capacity: usize,
}

#[derive(Default)]
struct Channels {
    open: HashMap<WorkspaceId, Channel>,
    closed: bool,
}

struct Channel {
    tx: broadcast::Sender<Arc<Frame>>,
    /// The highest seq sent on this channel.
    published: i64,
}

impl Hub {
    fn new(capacity: usize) -> Self {
        Self {
            channels: Mutex::new(Channels::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver of the workspace's commits; once the hub is closed, one that is closed.
    pub(crate) fn subscribe(&self, workspace: WorkspaceId) -> broadcast::Receiver<Arc<Frame>> {
        let mut channels = self.lock();
        if channels.closed {
            return broadcast::channel(1).1;
        }
        let rx = channels
            .open
            .entry(workspace)
            .or_insert_with(|| Channel {
                tx: broadcast::channel(self.capacity).0,
                published: 0,
            })
            .tx
            .subscribe();
        metrics::gauge!("keel_event_streams_followed_workspaces").set(channels.open.len() as f64);
        rx
    }

    /// Ends every follow (see the type's docs); later subscriptions are closed at once.
    pub(crate) fn close(&self) {
        let mut channels = self.lock();
        channels.closed = true;
        channels.open.clear();
        metrics::gauge!("keel_event_streams_followed_workspaces").set(0.0);
    }

    fn published(&self, workspace: WorkspaceId) -> Option<i64> {
        self.lock().open.get(&workspace).map(|c| c.published)
    }

    fn followed(&self) -> Vec<(WorkspaceId, i64)> {
        self.lock()
            .open
            .iter()
            .map(|(w, c)| (*w, c.published))
            .collect()
    }

    pub(crate) fn publish(&self, events: &[Event]) {
        // Find the followed workspaces under the lock; render outside it.
        let senders: HashMap<WorkspaceId, (broadcast::Sender<Arc<Frame>>, i64)> = {
            let mut channels = self.lock();
            channels.open.retain(|_, c| c.tx.receiver_count() > 0);
            events
                .iter()
                .filter_map(|e| {
                    channels
                        .open
                        .get(&e.workspace_id)
                        .map(|c| (e.workspace_id, (c.tx.clone(), c.published)))
                })
                .collect()
        };
        if senders.is_empty() {
            return;
        }
        let mut highest: HashMap<WorkspaceId, i64> = HashMap::new();
        for event in events {
            let Some((tx, published)) = senders.get(&event.workspace_id) else {
                continue;
            };
            if event.seq <= *published {
                continue;
            }
            let _ = tx.send(Arc::new(Frame::new(event.clone())));
            let top = highest.entry(event.workspace_id).or_insert(0);
            *top = (*top).max(event.seq);
        }
        let mut channels = self.lock();
        for (workspace, seq) in highest {
            if let Some(c) = channels.open.get_mut(&workspace) {
                c.published = c.published.max(seq);
            }
        }
    }
}

/// What a follower asked for.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    pub(crate) workspace: WorkspaceId,
    pub(crate) types: TypeFilter,
    pub(crate) task_id: Option<TaskId>,
    pub(crate) agent_id: Option<AgentId>,
}

impl Selection {
    pub(crate) fn matches(&self, event: &Event) -> bool {
        self.types.matches(&event.event_type)
            && self.task_id.is_none_or(|t| event.task_id == Some(t))
            && self.agent_id.is_none_or(|a| event.agent_id == Some(a))
    }
}

/// Why a live follow ended (sent to the client as `stream.closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The follower fell more than `events.stream_buffer` events behind.
    TooSlow,
    /// The server is shutting down.
    ShuttingDown,
    /// The store could not be read.
    Unavailable,
    /// Retention removed events the follower had not yet been sent (it was catching up
    /// while the pruner ran); resuming answers 410 with the oldest seq held.
    Expired,
}

impl Closed {
    pub(crate) const fn reason(self) -> &'static str {
        match self {
            Closed::TooSlow => "consumer_too_slow",
            Closed::ShuttingDown => "shutting_down",
            Closed::Unavailable => "store_unavailable",
            Closed::Expired => "expired",
        }
    }
}

/// What a follow hands its transport, in order.
#[derive(Debug)]
pub(crate) enum Item {
    /// An event that matches the selection.
    Event(Arc<Frame>),
    /// Nothing happened for a keep-alive interval.
    KeepAlive,
    /// The follow is over; `resume_after` is the last seq it had seen.
    Closed(Closed, i64),
}

/// Follows a workspace's log from `after` (exclusive): first what the store holds, then
/// live commits, delivering each matching event exactly once and in seq order, until the
/// client goes away, falls too far behind, or the server stops (the hub is closed:
/// [`EventLog::close_streams`]). `send` returns false when the client is gone.
///
/// The broadcast is a fast path only: an event at or below the last seq seen is skipped,
/// and a jump past it (a commit by another writer or instance that has not arrived yet, or
/// a notification lost on reconnect) is filled from the store.
pub(crate) async fn follow<F, Fut>(log: &EventLog, selection: &Selection, after: i64, mut send: F)
where
    F: FnMut(Item) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut live = log.inner.hub.subscribe(selection.workspace);
    let mut seen = after;
    // History first (subscribed already, so nothing committed meanwhile is missed).
    if !catch_up(log, selection, &mut seen, &mut send).await {
        return;
    }
    let keepalive = log.config().keepalive;
    // One timer for the whole follow, moved on lazily: no timer work per event.
    let mut last_sent = tokio::time::Instant::now();
    let idle = tokio::time::sleep(keepalive);
    tokio::pin!(idle);
    // Catching up on history can take longer than the ring holds, through no fault of the
    // client's: a lag before the first live event is made good from the store (a few
    // times at most); a lag after that means the client cannot keep up.
    let mut history_lags = 0u32;
    let mut live_started = false;
    loop {
        let received = tokio::select! {
            biased;
            received = live.recv() => received,
            () = &mut idle => {
                let due = last_sent + keepalive;
                if due > tokio::time::Instant::now() {
                    idle.as_mut().reset(due);
                    continue;
                }
                if !send(Item::KeepAlive).await {
                    return;
                }
                last_sent = tokio::time::Instant::now();
                idle.as_mut().reset(last_sent + keepalive);
                continue;
            }
        };
        let frame = match received {
            Ok(frame) => frame,
            Err(broadcast::error::RecvError::Lagged(_)) if !live_started && history_lags < 3 => {
                history_lags += 1;
                if !catch_up(log, selection, &mut seen, &mut send).await {
                    return;
                }
                last_sent = tokio::time::Instant::now();
                continue;
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                metrics::counter!("keel_event_streams_cut_total", "reason" => "consumer_too_slow")
                    .increment(1);
                tracing::info!(
                    missed,
                    resume_after = seen,
                    "event follower too slow; closing its stream"
                );
                send(Item::Closed(Closed::TooSlow, seen)).await;
                return;
            }
            // Only a closed hub closes a channel: the server is stopping.
            Err(broadcast::error::RecvError::Closed) => {
                send(Item::Closed(Closed::ShuttingDown, seen)).await;
                return;
            }
        };
        live_started = true;
        let seq = frame.event.seq;
        if seq <= seen {
            continue;
        }
        if seq > seen + 1 {
            if !catch_up(log, selection, &mut seen, &mut send).await {
                return;
            }
            last_sent = tokio::time::Instant::now();
            continue;
        }
        seen = seq;
        if selection.matches(&frame.event) {
            if !send(Item::Event(frame)).await {
                return;
            }
            last_sent = tokio::time::Instant::now();
        }
    }
}

/// Delivers what the store holds after `seen`; false when the follow is over (the client
/// went away, or the stream was closed with a reason it has been sent).
async fn catch_up<F, Fut>(
    log: &EventLog,
    selection: &Selection,
    seen: &mut i64,
    send: &mut F,
) -> bool
where
    F: FnMut(Item) -> Fut,
    Fut: Future<Output = bool>,
{
    match read_history(log, selection, seen, send).await {
        Ok(more) => more,
        Err(why) => {
            send(Item::Closed(why, *seen)).await;
            false
        }
    }
}

/// Delivers what the store holds after `seen`; Ok(false) when the client went away.
///
/// Whole pages come from the shared [`History`]; the newest, still filling page (or one
/// the pruner has cut into) is read straight from the store.
async fn read_history<F, Fut>(
    log: &EventLog,
    selection: &Selection,
    seen: &mut i64,
    send: &mut F,
) -> Result<bool, Closed>
where
    F: FnMut(Item) -> Fut,
    Fut: Future<Output = bool>,
{
    // The log is gap-free, so the next event held must be `seen + 1`; anything later
    // means the pruner got there first.
    let next = |seen: i64, seq: i64| {
        if seq == seen + 1 {
            Ok(())
        } else {
            tracing::info!(
                resume_after = seen,
                oldest = seq,
                "events a follower had not been sent were pruned; closing its stream"
            );
            Err(Closed::Expired)
        }
    };
    let history = &log.inner.history;
    let workspace = selection.workspace;
    loop {
        let index = seen.div_euclid(i64::from(PAGE));
        let page = retrying(|| history.page(&log.inner.store, workspace, index))
            .await
            .map_err(|()| Closed::Unavailable)?;
        let from = *seen;
        for frame in page.frames.iter().filter(|f| f.event.seq > from) {
            next(*seen, frame.event.seq)?;
            *seen = frame.event.seq;
            if selection.matches(&frame.event) && !send(Item::Event(frame.clone())).await {
                return Ok(false);
            }
        }
        if page.complete {
            continue;
        }
        let events = retrying(|| history.read(&log.inner.store, workspace, *seen))
            .await
            .map_err(|()| Closed::Unavailable)?;
        let full = events.len() == PAGE as usize;
        for event in events {
            next(*seen, event.seq)?;
            *seen = event.seq;
            if selection.matches(&event) && !send(Item::Event(Arc::new(Frame::new(event)))).await {
                return Ok(false);
            }
        }
        if !full {
            return Ok(true);
        }
    }
}

/// Runs a store read, retrying failures with backoff for [`READ_RETRY_FOR`]: a pool
/// that is busy for a moment should slow a follower down, not cut it off.
async fn retrying<T, F, Fut>(mut read: F) -> Result<T, ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ReadError>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match read().await {
            Ok(value) => return Ok(value),
            Err(e) if started.elapsed() + delay < READ_RETRY_FOR => {
                tracing::debug!(error = %e, "event log read for a follower failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the event log for a follower");
                return Err(());
            }
        }
    }
}

/// A page of history: the events with seq in `(index × PAGE, (index + 1) × PAGE]`.
#[derive(Debug)]
pub(crate) struct Page {
    frames: Vec<Arc<Frame>>,
    /// Whether it holds every seq of its range (so it can never change).
    complete: bool,
}

type PageKey = (WorkspaceId, i64);

/// Why a follower's store read failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFailure {
    /// The store refused or is down.
    #[error(transparent)]
    Store(keel_store::Error),
    /// The read's task panicked or was cancelled.
    #[error("the event log read task failed: {0}")]
    Task(tokio::task::JoinError),
}

/// A failed read, shared by everyone waiting on it.
pub(crate) type ReadError = Arc<ReadFailure>;

/// A page being read, or read: a spawned task, so it finishes however slowly the
/// follower that started it is being polled, and any waiter can take its result.
type Loading = Shared<BoxFuture<'static, Result<Arc<Page>, ReadError>>>;

/// Whole pages of the log, rendered once and shared by every follower catching up over
/// the same stretch (a reconnect storm reads each page from the store once, not once per
/// client); least recently used pages go first when `events.history_cache_bytes` is
/// reached. Concurrent readers of a page wait for the one read of it. Store reads of
/// catching-up followers are limited to [`CATCH_UP_READERS`] at once, and run in tasks of
/// their own: a follower whose client is slow never holds a pool connection or a reader's
/// place while it waits for its socket.
pub(crate) struct History {
    pages: Mutex<Pages>,
    budget: usize,
    reads: Arc<Semaphore>,
}

#[derive(Default)]
struct Pages {
    map: HashMap<PageKey, PageSlot>,
    order: BTreeMap<u64, PageKey>,
    tick: u64,
    bytes: usize,
}

struct PageSlot {
    load: Loading,
    /// Bytes held, once loaded and complete (0 while loading).
    size: usize,
    tick: u64,
}

impl History {
    fn new(budget: usize) -> Self {
        Self {
            pages: Mutex::new(Pages::default()),
            budget,
            reads: Arc::new(Semaphore::new(CATCH_UP_READERS)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pages> {
        // Every update leaves the maps consistent before anything can panic.
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Page `index` of a workspace's log, from memory or read once from the store.
    async fn page(
        &self,
        store: &Arc<dyn Store>,
        workspace: WorkspaceId,
        index: i64,
    ) -> Result<Arc<Page>, ReadError> {
        let key = (workspace, index);
        let load = {
            let mut pages = self.lock();
            pages.tick += 1;
            let tick = pages.tick;
            // A read in flight or a whole page is shared; a finished read that failed or
            // found the page incomplete (its waiters all gone before forgetting it) is
            // read again.
            let reusable = pages.map.get(&key).is_some_and(|slot| {
                slot.load
                    .peek()
                    .is_none_or(|done| done.as_ref().is_ok_and(|page| page.complete))
            });
            let (load, old) = match pages.map.get_mut(&key) {
                Some(slot) if reusable => (
                    slot.load.clone(),
                    Some(std::mem::replace(&mut slot.tick, tick)),
                ),
                stale => {
                    let old = stale.map(|slot| slot.tick);
                    let load = self.spawn_load(store.clone(), workspace, index);
                    pages.map.insert(
                        key,
                        PageSlot {
                            load: load.clone(),
                            size: 0,
                            tick,
                        },
                    );
                    (load, old)
                }
            };
            if let Some(old) = old {
                pages.order.remove(&old);
            }
            pages.order.insert(tick, key);
            load
        };
        let page = load.clone().await;
        self.settle(key, &load, page.as_ref().ok());
        page
    }

    fn spawn_load(&self, store: Arc<dyn Store>, workspace: WorkspaceId, index: i64) -> Loading {
        let reads = self.reads.clone();
        let task = tokio::spawn(async move {
            let start = index * i64::from(PAGE);
            let events = read_page(&reads, store.as_ref(), workspace, start).await?;
            let frames: Vec<Arc<Frame>> = events
                .into_iter()
                .take_while(|e| e.seq <= start + i64::from(PAGE))
                .map(|e| Arc::new(Frame::new(e)))
                .collect();
            let complete = frames.len() == PAGE as usize;
            Ok(Arc::new(Page { frames, complete }))
        });
        async move { task.await.map_err(|e| Arc::new(ReadFailure::Task(e)))? }
            .boxed()
            .shared()
    }

    /// Keeps a complete page within the budget; forgets a failed or incomplete one.
    fn settle(&self, key: PageKey, load: &Loading, page: Option<&Arc<Page>>) {
        let mut pages = self.lock();
        let Some(slot) = pages.map.get_mut(&key) else {
            return;
        };
        if !slot.load.ptr_eq(load) || slot.size > 0 {
            return;
        }
        let Some(page) = page.filter(|p| p.complete && self.budget > 0) else {
            let tick = slot.tick;
            pages.map.remove(&key);
            pages.order.remove(&tick);
            return;
        };
        let size = page
            .frames
            .iter()
            .map(|f| f.sse.len() + 2 * f.json.len() + size_of::<Frame>())
            .sum::<usize>()
            .max(1);
        slot.size = size;
        pages.bytes += size;
        while pages.bytes > self.budget {
            let Some((_, oldest)) = pages.order.pop_first() else {
                break;
            };
            if let Some(evicted) = pages.map.remove(&oldest) {
                pages.bytes -= evicted.size;
            }
        }
        metrics::gauge!("keel_event_history_cache_bytes").set(pages.bytes as f64);
    }

    /// One page of events after `after`, read from the store in turn with other followers.
    async fn read(
        &self,
        store: &Arc<dyn Store>,
        workspace: WorkspaceId,
        after: i64,
    ) -> Result<Vec<Event>, ReadError> {
        let (reads, store) = (self.reads.clone(), store.clone());
        tokio::spawn(async move { read_page(&reads, store.as_ref(), workspace, after).await })
            .await
            .map_err(|e| Arc::new(ReadFailure::Task(e)))?
    }
}

async fn read_page(
    reads: &Semaphore,
    store: &dyn Store,
    workspace: WorkspaceId,
    after: i64,
) -> Result<Vec<Event>, ReadError> {
    // The semaphore is never closed; without a permit the read just goes ahead.
    let _permit = reads.acquire().await.ok();
    metrics::counter!("keel_event_history_reads_total").increment(1);
    store
        .events_after(workspace, after, PAGE)
        .await
        .map_err(|e| Arc::new(ReadFailure::Store(e)))
}

/// Counts a live stream client in `keel_event_stream_clients` for as long as it lives.
pub(crate) struct ClientGauge(&'static str);

impl ClientGauge {
    pub(crate) fn new(transport: &'static str) -> Self {
        metrics::gauge!("keel_event_stream_clients", "transport" => transport).increment(1.0);
        Self(transport)
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        metrics::gauge!("keel_event_stream_clients", "transport" => self.0).decrement(1.0);
    }
}
