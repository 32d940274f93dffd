//! `keel bench runtime`: the durable agent runtime on this machine. Agents run in a real
//! `keel serve` process; their model is Keel's mock LLM at zero latency and their tool a
//! small HTTP server, both in this process. Every task is 3 steps: an LLM call asking for
//! the tool, the tool call, an LLM call answering.
//!
//! Parts:
//! - `sqlite`: checkpointed steps a second with 1, 8 and 64 concurrent runs
//!   (`synchronous = FULL`), and one step's commit latency next to one fsync of this disk.
//! - `postgres`: steps a second with 64 concurrent runs, and enqueue → start latency at a
//!   steady rate.
//! - `growth`: bytes stored for the step of turn 1 and of turn 500 of one thread.
//! - `crash`: kill -9 with 100 runs in flight (each inside a tool call); the time from the
//!   restart until every one of them has resumed (called its tool again with its key).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use keel_core::id::{RunId, TaskId, ThreadId};
use keel_store::runtime::{BeginRun, Checkpoint, NewMessage, NewTask};
use serde_json::{Value, json};
use tokio::process::Child;

use crate::bench::{create_key, start_keel};

/// The parts, in the order they run.
pub const PARTS: [&str; 4] = ["sqlite", "postgres", "growth", "crash"];

/// Options of `keel bench runtime`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tasks per worker in the throughput parts.
    pub tasks_per_worker: usize,
    /// Postgres server URL (a fresh database is made on it); `None` skips that part.
    pub postgres: Option<String>,
    /// Which parts to run.
    pub parts: Vec<String>,
}

/// Runs the benchmark and prints its report.
pub async fn run(o: Options) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the keel binary")?;
    let peers = Peers::start().await?;
    println_report(&format!(
        "keel bench runtime — {} cores; mock LLM at zero latency; 3 steps a task (LLM, HTTP tool, LLM)",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    ));
    for part in &o.parts {
        match part.as_str() {
            "sqlite" => {
                let fsync = fsync_p50(&std::env::temp_dir())?;
                let commit = commit_p50(keel_core::config::SqliteSynchronous::Full).await?;
                let statements = commit_p50(keel_core::config::SqliteSynchronous::Off).await?;
                println_report(&format!(
                    "sqlite step commit (synchronous=FULL, one run): p50 {:.3} ms ({:.3} ms of it without the fsync); one fsync on this disk: p50 {:.3} ms → {} (goal: ≤ one fsync)",
                    ms(commit),
                    ms(statements),
                    ms(fsync),
                    met(commit <= fsync)
                ));
                for workers in [1usize, 8, 64] {
                    let t = throughput(&exe, &peers, None, workers, o.tasks_per_worker).await?;
                    println_report(&format!(
                        "sqlite, {workers:>2} concurrent runs: {:>7.0} checkpointed steps/s ({} tasks, {} steps in {:.2} s{}; {}){}",
                        t.steps_per_sec,
                        t.tasks,
                        t.steps,
                        t.elapsed.as_secs_f64(),
                        t.busy_note(),
                        t.fill,
                        if workers == 64 {
                            format!(" → {} (goal ≥ 5,000)", met(t.steps_per_sec >= 5_000.0))
                        } else {
                            String::new()
                        }
                    ));
                }
            }
            "postgres" => {
                let Some(server) = &o.postgres else {
                    println_report("postgres: skipped (no --postgres URL)");
                    continue;
                };
                let (url, db) = fresh_database(server).await?;
                let t = throughput(&exe, &peers, Some(&url), 64, o.tasks_per_worker).await;
                drop_database(server, &db).await;
                let t = t?;
                println_report(&format!(
                    "postgres, 64 concurrent runs: {:.0} checkpointed steps/s ({} tasks, {} steps in {:.2} s{}; {}) → {} (goal ≥ 3,000)",
                    t.steps_per_sec,
                    t.tasks,
                    t.steps,
                    t.elapsed.as_secs_f64(),
                    t.busy_note(),
                    t.fill,
                    met(t.steps_per_sec >= 3_000.0)
                ));
                let (url, db) = fresh_database(server).await?;
                let waits = enqueue_to_start(&exe, &peers, &url).await;
                drop_database(server, &db).await;
                let w = waits?;
                println_report(&format!(
                    "postgres enqueue → start at 100 tasks/s: p50 {:.2} ms, p99 {:.2} ms over {} tasks after {WARMUP_TASKS} in a first second (p50 {:.2} ms) → {} (goal: p50 < 5 ms)",
                    ms(w.p50),
                    ms(w.p99),
                    w.measured,
                    ms(w.warmup_p50),
                    met(w.p50 < Duration::from_millis(5))
                ));
            }
            "growth" => {
                let (first, last) = growth(&exe, &peers).await?;
                // The only bytes that may differ are the digits of a turn's counters (its
                // prompt's token count grows with the thread; latencies vary).
                println_report(&format!(
                    "bytes stored for one turn of a thread (3 steps, 4 messages): turn 1 {first} B, turn 500 {last} B ({:+} B) → {} (goal: the same; the history is never re-stored)",
                    last as i64 - first as i64,
                    met(last.abs_diff(first) <= 16)
                ));
            }
            "crash" => {
                let (resumed, n) = crash(&exe, &peers).await?;
                println_report(&format!(
                    "kill -9 with {n} runs in flight: all resumed {:.0} ms after the restart began → {} (goal < 2 s)",
                    ms(resumed),
                    met(resumed < Duration::from_secs(2))
                ));
            }
            other => bail!("unknown part {other:?}; the parts are {}", PARTS.join(", ")),
        }
    }
    Ok(())
}

#[expect(clippy::print_stdout, reason = "the benchmark's report is its output")]
fn println_report(line: &str) {
    println!("{line}");
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).saturating_sub(1);
    v.get(i).copied().unwrap_or_default()
}

/// The mock LLM and the tool server, in this process, over real HTTP.
struct Peers {
    mock_url: String,
    tool_url: String,
    tool: Arc<ToolState>,
}

#[derive(Default)]
struct ToolState {
    /// Held this long before answering.
    delay_ms: AtomicU64,
    /// Requests seen per idempotency key, with when the latest arrived.
    seen: Mutex<HashMap<String, (u32, Option<Instant>)>>,
    in_flight: AtomicU64,
}

impl Peers {
    async fn start() -> anyhow::Result<Self> {
        let script = keel_server::mock_llm::Script {
            replies: serde_json::from_value(json!([
                {"tool_calls": [{"name": "lookup", "arguments": {"city": "Oslo"}}]},
                {"content": "done"}
            ]))?,
            by_turn: true,
        };
        let mock = keel_server::mock_llm::app(keel_server::mock_llm::Options {
            script,
            latency: Duration::ZERO,
            record: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mock_url = format!("http://{}/v1", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, mock).await });

        let tool = Arc::new(ToolState::default());
        let state = tool.clone();
        let app = axum::Router::new().route(
            "/lookup",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let state = state.clone();
                    async move {
                        let key = headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        {
                            let mut seen = state
                                .seen
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            let e = seen.entry(key).or_insert((0, None));
                            e.0 += 1;
                            e.1 = Some(Instant::now());
                        }
                        state.in_flight.fetch_add(1, Ordering::SeqCst);
                        let delay = state.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        state.in_flight.fetch_sub(1, Ordering::SeqCst);
                        let _ = body;
                        axum::Json(json!({"temperature_c": 4}))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let tool_url = format!("http://{}/lookup", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            mock_url,
            tool_url,
            tool,
        })
    }

    fn reset(&self, delay_ms: u64) {
        self.tool.delay_ms.store(delay_ms, Ordering::SeqCst);
        self.tool
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// A `keel serve` with the bench's agent, on SQLite (or `database`).
struct Keel {
    child: Child,
    url: String,
    key: String,
    dir: PathBuf,
    config: PathBuf,
    exe: PathBuf,
    name: String,
}

impl Keel {
    async fn start(
        exe: &Path,
        peers: &Peers,
        database: Option<&str>,
        workers: usize,
        name: &str,
    ) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("keel-bench-runtime-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("agents"))?;
        // The pool is the product's default size: the figure is what a deployment gets.
        let database = database.map_or(String::new(), |url| format!("url = {url:?}\n"));
        let config = dir.join("keel.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n[server]\nlisten = \"127.0.0.1:0\"\n[database]\n{database}\n\
                 [runtime]\nenabled = true\nworkers = {workers}\nagents_workspace = \"bench\"\nagents_dir = {agents:?}\nlease = \"5s\"\nmax_queued = 100000\n\
                 [models.default]\n[[models.default.targets]]\nprovider = \"openai\"\nmodel = \"agent\"\nbase_url = {mock:?}\nmax_concurrency = 1024\n",
                data = dir.display().to_string(),
                agents = dir.join("agents").display().to_string(),
                mock = peers.mock_url,
            ),
        )?;
        std::fs::write(
            dir.join("agents").join("bench.toml"),
            format!(
                "name = \"bench\"\nmax_attempts = 1\n[[tools]]\nkind = \"http\"\nname = \"lookup\"\nurl = {:?}\ntimeout = \"60s\"\nretries = 0\n\
                 parameters = {{ type = \"object\", properties = {{ city = {{ type = \"string\" }} }} }}\n",
                peers.tool_url
            ),
        )?;
        let key = create_key(exe, &dir, &config, "member").await?;
        let (child, url, _) = start_keel(exe, &dir, &config).await?;
        Ok(Self {
            child,
            url,
            key,
            dir,
            config,
            exe: exe.to_owned(),
            name: name.to_owned(),
        })
    }

    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        let (child, url, _) = start_keel(&self.exe, &self.dir, &self.config).await?;
        self.child = child;
        self.url = url;
        Ok(())
    }

    /// Restarts with the runtime's workers on or off.
    async fn run_agents(&mut self, enabled: bool) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        let text = text
            .replace("enabled = true", &format!("enabled = {enabled}"))
            .replace("enabled = false", &format!("enabled = {enabled}"));
        std::fs::write(&self.config, text)?;
        self.child.start_kill()?;
        let _ = self.child.wait().await;
        self.restart().await
    }

    async fn stop(mut self) {
        // BENCH_METRICS=DIR keeps each server's /metrics (DIR/<part>.prom) for a look at
        // where the time went: commit latency and batch sizes, checkpoint waits.
        if let Some(dir) = std::env::var_os("BENCH_METRICS") {
            let scraped = async {
                let text = http()?
                    .get(format!("{}/metrics", self.url))
                    .send()
                    .await?
                    .text()
                    .await?;
                std::fs::write(Path::new(&dir).join(format!("{}.prom", self.name)), text)?;
                anyhow::Ok(())
            };
            if let Err(e) = scraped.await {
                tracing::warn!(part = %self.name, error = %format!("{e:#}"), "cannot keep /metrics");
            }
        }
        self.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(120))
        .build()?)
}

async fn post_task(client: &reqwest::Client, keel: &Keel, body: Value) -> anyhow::Result<Value> {
    let res = client
        .post(format!("{}/v1/tasks", keel.url))
        .bearer_auth(&keel.key)
        .json(&body)
        .send()
        .await?;
    if !res.status().is_success() {
        bail!(
            "POST /v1/tasks: {} {}",
            res.status(),
            res.text().await.unwrap_or_default()
        );
    }
    Ok(res.json().await?)
}

/// Every task of the workspace (newest first).
async fn all_tasks(client: &reqwest::Client, keel: &Keel) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/tasks?limit=500", keel.url);
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let page: Value = client
            .get(url)
            .bearer_auth(&keel.key)
            .send()
            .await?
            .json()
            .await?;
        let data = page["data"].as_array().cloned().unwrap_or_default();
        out.extend(data);
        match page["next_before"].as_str() {
            Some(b) => before = Some(b.to_owned()),
            None => return Ok(out),
        }
    }
}

fn timestamp(v: &Value) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339).ok()
}

struct Throughput {
    tasks: usize,
    steps: i64,
    elapsed: Duration,
    steps_per_sec: f64,
    busy: Option<Busy>,
    fill: Fill,
}

/// The fill before a throughput part: `POST /v1/tasks` 32 at a time into a queue no
/// worker takes from, so each creation finds the queue as deep as the tasks before it.
#[derive(Debug, Clone, Copy)]
struct Fill {
    /// Tasks created a second over the whole fill.
    per_sec: f64,
    /// `POST` p50 of the first tenth of the tasks (queue nearly empty).
    first_tenth: Duration,
    /// `POST` p50 of the last tenth (queue nearly full).
    last_tenth: Duration,
}

impl std::fmt::Display for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue filled at {:.0} tasks/s, POST /v1/tasks p50 {:.2} ms for the first tenth, {:.2} ms for the last",
            self.per_sec,
            ms(self.first_tenth),
            ms(self.last_tenth)
        )
    }
}

/// Creates `workers × per_worker` tasks at once and lets `workers` runs at a time work
/// them off; steps/s over the span from the first start to the last finish.
async fn throughput(
    exe: &Path,
    peers: &Peers,
    database: Option<&str>,
    workers: usize,
    per_worker: usize,
) -> anyhow::Result<Throughput> {
    peers.reset(0);
    // The queue is filled first, with no worker running, so the figure is the run path's
    // alone (not task creation's); then the workers start.
    let mut keel = Keel::start(exe, peers, database, workers, &format!("tp{workers}")).await?;
    keel.run_agents(false).await?;
    let client = http()?;
    let n = (workers * per_worker).max(50);
    let filling = Instant::now();
    let mut posts = futures_util::stream::iter(0..n)
        .map(|i| {
            let (client, keel) = (&client, &keel);
            async move {
                let sent = Instant::now();
                post_task(
                    client,
                    keel,
                    json!({"agent": "bench", "input": format!("task {i}"), "mode": "background"}),
                )
                .await
                .map(|_| (i, sent.elapsed()))
            }
        })
        .buffer_unordered(32);
    use futures_util::StreamExt as _;
    let mut took = vec![Duration::ZERO; n];
    while let Some(r) = posts.next().await {
        let (i, d) = r?;
        took[i] = d;
    }
    drop(posts);
    let tenth = (n / 10).max(1);
    let fill = Fill {
        per_sec: n as f64 / filling.elapsed().as_secs_f64().max(1e-9),
        first_tenth: median(took[..tenth].to_vec()),
        last_tenth: median(took[n - tenth..].to_vec()),
    };
    keel.run_agents(true).await?;
    // Wait cheaply (one small query a second, so the polling does not load Keel), then
    // read every task once.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut busy = false;
        for status in ["submitted", "working"] {
            let page: Value = client
                .get(format!("{}/v1/tasks?status={status}&limit=1", keel.url))
                .bearer_auth(&keel.key)
                .send()
                .await?
                .json()
                .await?;
            busy |= page["data"].as_array().is_some_and(|d| !d.is_empty());
        }
        if !busy {
            break;
        }
        if Instant::now() > deadline {
            bail!("the tasks did not finish in 10 minutes");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let tasks = all_tasks(&client, &keel).await?;
    let done = tasks.iter().filter(|t| t["status"] == "completed").count();
    if done != n {
        let bad = tasks.iter().find(|t| t["status"] != "completed");
        bail!("{done} of {n} tasks completed; e.g. {bad:?}");
    }
    let first = tasks
        .iter()
        .filter_map(|t| timestamp(&t["started_at"]))
        .min();
    let last = tasks
        .iter()
        .filter_map(|t| timestamp(&t["finished_at"]))
        .max();
    let (Some(first), Some(last)) = (first, last) else {
        bail!("tasks without start or finish times");
    };
    let steps: i64 = tasks.iter().filter_map(|t| t["steps"].as_i64()).sum();
    let elapsed = Duration::try_from(last - first).unwrap_or_default();
    let busy = Busy::of(&tasks, workers, last);
    keel.stop().await;
    Ok(Throughput {
        tasks: n,
        steps,
        elapsed,
        steps_per_sec: steps as f64 / elapsed.as_secs_f64().max(1e-9),
        busy,
        fill,
    })
}

impl Throughput {
    /// `; <the busy stretch>`, or nothing when it was too short to say.
    fn busy_note(&self) -> String {
        self.busy.map(|b| format!("; {b}")).unwrap_or_default()
    }
}

/// The stretch of a throughput part when every run was busy: from the start that filled
/// the last free run (the ramp-up before it: the first claims, the pool's connections
/// opening, the tokenizer loading) to the last start (after it the queue is empty and
/// runs fall idle one by one). Steps are counted for the tasks that finished inside it.
#[derive(Debug, Clone, Copy)]
struct Busy {
    /// From the first start to the start that filled every run.
    ramp: Duration,
    /// From the last start to the last finish.
    drain: Duration,
    /// The busy stretch.
    span: Duration,
    steps_per_sec: f64,
}

impl Busy {
    /// `last_finish`: the part's last finish, as the whole span counts it.
    fn of(tasks: &[Value], workers: usize, last_finish: time::OffsetDateTime) -> Option<Self> {
        let mut starts: Vec<time::OffsetDateTime> = tasks
            .iter()
            .filter_map(|t| timestamp(&t["started_at"]))
            .collect();
        starts.sort_unstable();
        let (first, full, last_start) = (
            *starts.first()?,
            *starts.get(workers.checked_sub(1)?)?,
            *starts.last()?,
        );
        let steps: i64 = tasks
            .iter()
            .filter(|t| timestamp(&t["finished_at"]).is_some_and(|f| f > full && f <= last_start))
            .filter_map(|t| t["steps"].as_i64())
            .sum();
        let span = Duration::try_from(last_start - full).ok()?;
        // Too short a stretch says nothing steady.
        if span < Duration::from_millis(250) {
            return None;
        }
        Some(Self {
            ramp: Duration::try_from(full - first).unwrap_or_default(),
            drain: Duration::try_from(last_finish - last_start).unwrap_or_default(),
            span,
            steps_per_sec: steps as f64 / span.as_secs_f64(),
        })
    }
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} steps/s while every run was busy ({:.2} s; ramp-up {:.0} ms, drain {:.0} ms)",
            self.steps_per_sec,
            self.span.as_secs_f64(),
            self.ramp.as_secs_f64() * 1e3,
            self.drain.as_secs_f64() * 1e3
        )
    }
}

/// Median time of writing 4 KiB and `fdatasync` to a file in `dir`.
fn fsync_p50(dir: &Path) -> anyhow::Result<Duration> {
    use std::io::Write as _;
    let path = dir.join(format!("keel-bench-fsync-{}", std::process::id()));
    let mut file = std::fs::File::create(&path)?;
    let block = [7u8; 4096];
    let mut times = Vec::with_capacity(300);
    for _ in 0..300 {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(t.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(median(times))
}

/// Median latency of committing one step (a step row, a message, two events and a usage
/// row) on SQLite with `synchronous = FULL`, one run at a time.
async fn commit_p50(synchronous: keel_core::config::SqliteSynchronous) -> anyhow::Result<Duration> {
    let dir = std::env::temp_dir().join(format!("keel-bench-commit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut config = keel_core::config::Config::default();
    config.data_dir.clone_from(&dir);
    config.database.sqlite_synchronous = synchronous;
    let store = keel_store::open(&config).await?;
    store.migrate().await?;
    let ws = store
        .ensure_workspace(&keel_core::workspace::WorkspaceName::parse("bench")?)
        .await?;
    let agent = store
        .put_agent(ws.id, "bench", &json!({"name": "bench"}), false, false)
        .await?;
    let task_id = TaskId::new();
    store
        .create_task(NewTask {
            id: task_id,
            workspace_id: ws.id,
            agent_id: agent.id,
            agent_name: agent.name.clone(),
            agent_version: agent.version,
            thread_id: None,
            parent_task_id: None,
            depth: 0,
            priority: keel_core::task::Priority::Medium,
            input: json!([{"role": "user", "content": "hi"}]),
            metadata: json!({}),
            idempotency_key: None,
            max_attempts: 1,
            max_queued: 1_000,
            events: Vec::new(),
        })
        .await?;
    let owner = uuid::Uuid::now_v7();
    let claimed = store
        .claim_tasks(
            owner,
            time::OffsetDateTime::now_utc() + Duration::from_secs(600),
            1,
        )
        .await?;
    let task = claimed
        .into_iter()
        .next()
        .context("the task was not claimed")?;
    let run_id = RunId::new();
    store
        .begin_run(BeginRun {
            task_id,
            owner,
            new_run: Some((
                run_id,
                vec![NewMessage {
                    body: json!({"role": "user", "content": "hi"}),
                    tokens: 5,
                }],
            )),
            events: Vec::new(),
        })
        .await?;
    let thread: ThreadId = task.thread_id;
    let mut times = Vec::with_capacity(500);
    for i in 0..500 {
        let mut tool = keel_core::event::NewEvent::new(
            keel_core::event::EventType::ToolCall,
            ws.id,
            json!({"tool": "lookup", "call_id": format!("call_{i}"), "arguments": {"city": "Oslo"}}),
        )
        .with_task(task_id);
        tool.run_id = Some(run_id);
        let checkpoint = Checkpoint {
            task_id,
            workspace_id: ws.id,
            thread_id: thread,
            run_id,
            owner,
            start: None,
            step: Some((
                "tool_call".to_owned(),
                json!({"tool": "lookup", "call_id": format!("call_{i}"), "ok": true, "duration_ms": 1}),
            )),
            messages: vec![NewMessage {
                body: json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": "{\"temperature_c\": 4}"}),
                tokens: 12,
            }],
            tool_calls: 1,
            input_tokens: 0,
            output_tokens: 0,
            cost_nanousd: 0,
            finish: None,
            events: vec![tool.clone(), tool],
            usage: None,
        };
        let t = Instant::now();
        store
            .commit_checkpoints(std::slice::from_ref(&checkpoint))
            .await?;
        times.push(t.elapsed());
    }
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(median(times))
}

/// Tasks sent before the measured ones, in the first second (see [`EnqueueToStart`]).
const WARMUP_TASKS: usize = 100;
/// Tasks measured, at 100 a second.
const MEASURED_TASKS: usize = 500;

/// Enqueue → start latency (created_at → started_at) at 100 tasks/s.
struct EnqueueToStart {
    p50: Duration,
    p99: Duration,
    measured: usize,
    /// p50 of the first second's tasks, not in the figures above: the server's first
    /// second includes its pool's connections being opened and the tokenizer being
    /// loaded (on the first count).
    warmup_p50: Duration,
}

/// Enqueue → start latency at 100 tasks/s: one second of warm-up, then 5 s measured.
async fn enqueue_to_start(
    exe: &Path,
    peers: &Peers,
    database: &str,
) -> anyhow::Result<EnqueueToStart> {
    peers.reset(0);
    let keel = Keel::start(exe, peers, Some(database), 64, "enqueue").await?;
    let client = http()?;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut pending = Vec::new();
    let total = WARMUP_TASKS + MEASURED_TASKS;
    for i in 0..total {
        tick.tick().await;
        let (client, body) = (
            client.clone(),
            json!({"agent": "bench", "input": format!("t{i}"), "mode": "background"}),
        );
        let (url, key) = (format!("{}/v1/tasks", keel.url), keel.key.clone());
        pending.push(tokio::spawn(async move {
            client.post(url).bearer_auth(key).json(&body).send().await
        }));
    }
    for p in pending {
        p.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let tasks = loop {
        let tasks = all_tasks(&client, &keel).await?;
        if tasks.iter().all(|t| t["started_at"].is_string()) && tasks.len() == total {
            break tasks;
        }
        if Instant::now() > deadline {
            bail!("tasks did not start");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    keel.stop().await;
    let mut waits: Vec<(time::OffsetDateTime, Duration)> = Vec::with_capacity(total);
    for t in &tasks {
        let created = timestamp(&t["created_at"]).context("a task without created_at")?;
        let started = timestamp(&t["started_at"]).context("a task without started_at")?;
        waits.push((
            created,
            Duration::try_from(started - created).unwrap_or_default(),
        ));
    }
    waits.sort_by_key(|w| w.0);
    let warmup: Vec<Duration> = waits[..WARMUP_TASKS].iter().map(|w| w.1).collect();
    let measured: Vec<Duration> = waits[WARMUP_TASKS..].iter().map(|w| w.1).collect();
    Ok(EnqueueToStart {
        p50: quantile(&measured, 0.5),
        p99: quantile(&measured, 0.99),
        measured: measured.len(),
        warmup_p50: quantile(&warmup, 0.5),
    })
}

/// Bytes stored for the step of turn 1 and of turn 500 of one thread (step data plus the
/// messages the turn added, as stored).
async fn growth(exe: &Path, peers: &Peers) -> anyhow::Result<(usize, usize)> {
    peers.reset(0);
    let keel = Keel::start(exe, peers, None, 4, "growth").await?;
    let client = http()?;
    let thread: Value = client
        .post(format!("{}/v1/threads", keel.url))
        .bearer_auth(&keel.key)
        .json(&json!({}))
        .send()
        .await?
        .json()
        .await?;
    let thread = thread["id"].as_str().context("no thread id")?.to_owned();
    let mut sizes = Vec::new();
    for turn in 1..=500 {
        let task = post_task(&client, &keel, json!({"agent": "bench", "input": "same question", "thread_id": thread, "mode": "wait"})).await?;
        if task["status"] != "completed" {
            bail!("turn {turn} did not complete: {task}");
        }
        if turn == 1 || turn == 500 {
            let id = task["id"].as_str().unwrap_or_default();
            let steps: Value = client
                .get(format!("{}/v1/tasks/{id}/steps", keel.url))
                .bearer_auth(&keel.key)
                .send()
                .await?
                .json()
                .await?;
            let messages: Value = client
                .get(format!(
                    "{}/v1/threads/{thread}/messages?limit=1000&after={}",
                    keel.url,
                    (turn - 1) * 4
                ))
                .bearer_auth(&keel.key)
                .send()
                .await?
                .json()
                .await?;
            let step_bytes: usize = steps["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| s["data"].to_string().len())
                .sum();
            let message_bytes: usize = messages["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["task_id"] == task["id"])
                .map(|m| m["message"].to_string().len())
                .sum();
            sizes.push(step_bytes + message_bytes);
        }
    }
    keel.stop().await;
    Ok((
        sizes.first().copied().unwrap_or(0),
        sizes.last().copied().unwrap_or(0),
    ))
}

/// kill -9 with 100 runs inside a tool call; the time from the restart until every one
/// has called its tool again (resumed after its last checkpoint, same key).
async fn crash(exe: &Path, peers: &Peers) -> anyhow::Result<(Duration, usize)> {
    const RUNS: usize = 100;
    peers.reset(30_000);
    let mut keel = Keel::start(exe, peers, None, 128, "crash").await?;
    let client = http()?;
    for i in 0..RUNS {
        post_task(
            &client,
            &keel,
            json!({"agent": "bench", "input": format!("t{i}"), "mode": "background"}),
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while peers.tool.in_flight.load(Ordering::SeqCst) < RUNS as u64 {
        if Instant::now() > deadline {
            bail!("the runs did not all reach their tool call");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    keel.kill().await;
    let restarted = Instant::now();
    keel.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let resumed = loop {
        let done = {
            let seen = peers
                .tool
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let again: Vec<Instant> = seen
                .values()
                .filter(|(n, _)| *n >= 2)
                .filter_map(|(_, at)| *at)
                .collect();
            (again.len() >= RUNS).then(|| again.into_iter().max())
        };
        if let Some(Some(last)) = done {
            break last.saturating_duration_since(restarted);
        }
        if Instant::now() > deadline {
            bail!("the runs did not all resume within a minute");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    peers.reset(0);
    keel.stop().await;
    Ok((resumed, RUNS))
}

/// A fresh database on the Postgres server at `server` (its URL names any database):
/// its URL and name.
async fn fresh_database(server: &str) -> anyhow::Result<(String, String)> {
    use sqlx::Connection as _;
    let name = format!("keel_bench_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(server)
        .await
        .context("cannot connect to --postgres")?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} TEMPLATE template0"
    )))
    .execute(&mut conn)
    .await?;
    let _ = conn.close().await;
    let (base, _) = server
        .rsplit_once('/')
        .context("--postgres must name a database")?;
    Ok((format!("{base}/{name}"), name))
}

/// Drops a database [`fresh_database`] made.
async fn drop_database(server: &str, name: &str) {
    use sqlx::Connection as _;
    if let Ok(mut conn) = sqlx::PgConnection::connect(server).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
    }
}
