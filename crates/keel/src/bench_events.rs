//! `keel bench events`: the event log under load, measured from outside the process. Each
//! part starts its own `keel serve` (SQLite, a fresh data directory) as a child process;
//! events are emitted with `POST /v1/events/ping` and followed over `GET /v1/events`
//! (SSE) by clients in this process.
//!
//! 1. Fan-out latency: N live clients; pings at a constant rate (open loop), each carrying
//!    its send time; emit → client latency over every (client, event) pair.
//! 2. Write throughput: M writers posting pings as fast as they are answered while K
//!    clients follow.
//! 3. Reconnect storm: C clients resuming at once, each from a random point of an
//!    L-event log, until every one has caught up.
//!
//! Every client checks that it received each event of its range exactly once, in seq
//! order; the command fails when one did not.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::bench::{
    LogTally, RssSampler, create_key, ms, percentile, println_out, rss_bytes, start_keel_logged,
};
use crate::sse_client::find;

/// The parts, in the order they run.
pub const PARTS: [&str; 4] = ["fanout", "throughput", "append", "storm"];
/// Fan-out goal: emit → SSE client p99 with 1,000 clients on one instance.
const FANOUT_P99_GOAL: Duration = Duration::from_millis(10);
/// Write-throughput goal on SQLite, in events a second.
const THROUGHPUT_GOAL: f64 = 10_000.0;
/// How long clients get to receive the last event after the load stops.
const SETTLE: Duration = Duration::from_secs(30);
/// How long a client waits before resuming a cut stream (the server's `retry: 1000`).
const RETRY: Duration = Duration::from_millis(1000);
/// How long the reconnect storm may take before it is reported as unfinished.
const STORM_TIMEOUT: Duration = Duration::from_secs(600);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Live SSE clients in the fan-out part.
    pub clients: usize,
    /// Events a second emitted in the fan-out part.
    pub rate: u32,
    /// How long the fan-out part emits.
    pub duration: Duration,
    /// Concurrent writers in the throughput part.
    pub writers: usize,
    /// How long the writers write.
    pub write_duration: Duration,
    /// SSE clients following the throughput part.
    pub followers: usize,
    /// Events in the log before the reconnect storm.
    pub log_events: u64,
    /// Clients reconnecting at once in the storm.
    pub reconnect_clients: usize,
    /// Which parts to run: `fanout`, `throughput`, `storm`.
    pub parts: Vec<String>,
}

impl Options {
    /// The defaults, or smaller ones for a smoke run.
    pub fn defaults(quick: bool) -> Self {
        if quick {
            Self {
                clients: 50,
                rate: 100,
                duration: Duration::from_secs(2),
                writers: 16,
                write_duration: Duration::from_secs(2),
                followers: 4,
                log_events: 2_000,
                reconnect_clients: 50,
                parts: PARTS.iter().map(|p| (*p).to_owned()).collect(),
            }
        } else {
            Self {
                clients: 1_000,
                rate: 200,
                duration: Duration::from_secs(10),
                writers: 64,
                write_duration: Duration::from_secs(5),
                followers: 10,
                log_events: 20_000,
                reconnect_clients: 1_000,
                parts: PARTS.iter().map(|p| (*p).to_owned()).collect(),
            }
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("--clients", self.clients),
            ("--writers", self.writers),
            ("--followers", self.followers),
            ("--reconnect-clients", self.reconnect_clients),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.rate == 0 {
            bail!("--rate must be at least 1");
        }
        if self.log_events == 0 {
            bail!("--log-events must be at least 1");
        }
        if let Some(bad) = self.parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
            bail!(
                "--parts: unknown part {bad:?}; the parts are {}",
                PARTS.join(", ")
            );
        }
        if self.parts.is_empty() {
            bail!("--parts: name at least one of {}", PARTS.join(", "));
        }
        if self.duration.is_zero() || self.write_duration.is_zero() {
            bail!("--duration and --write-duration must be longer than 0s");
        }
        Ok(())
    }
}

/// Runs the three parts and prints their figures and a summary.
pub async fn run(o: Options) -> anyhow::Result<()> {
    o.validate()?;
    let exe = std::env::current_exe().context("cannot find the keel binary")?;
    println_out(&format!(
        "keel bench events: SQLite, one instance, {} cores shared by keel and this client",
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    ));

    let runs = |part: &str| o.parts.iter().any(|p| p == part);
    let mut fanout_result = None;
    let mut throughput_result = None;
    let mut storm_result = None;
    if runs("fanout") {
        println_out(&format!(
            "\n[fanout] {} SSE clients, {} events/s for {:?}",
            o.clients, o.rate, o.duration
        ));
        let r = fanout(&exe, &o).await.context("fan-out part")?;
        println_out(&r.line());
        fanout_result = Some(r);
    }
    if runs("throughput") {
        println_out(&format!(
            "\n[throughput] {} writers (HTTP POST per event) for {:?}, {} SSE followers",
            o.writers, o.write_duration, o.followers
        ));
        let r = throughput(&exe, &o)
            .await
            .context("write-throughput part")?;
        println_out(&r.line());
        throughput_result = Some(r);
    }
    let mut append_result = None;
    if runs("append") {
        println_out(&format!(
            "\n[append] {} in-process emitters for {:?}, {} SSE followers",
            o.writers, o.write_duration, o.followers
        ));
        let r = append(&o).await.context("append part")?;
        println_out(&r.line(&o));
        append_result = Some(r);
    }
    if runs("storm") {
        println_out(&format!(
            "\n[storm] {} events in the log, {} clients resuming at once from random seqs",
            o.log_events, o.reconnect_clients
        ));
        let r = storm(&exe, &o).await.context("reconnect-storm part")?;
        println_out(&r.line());
        storm_result = Some(r);
    }

    println_out("\nsummary");
    let mut exact = true;
    if let Some(f) = &fanout_result {
        println_out(&format!(
            "fan-out, {} clients at {} events/s: emit→client p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms \
             (emit = the event's commit timestamp) — goal p99 < {} ms: {}; POST sent→client p50 {:.3} ms, p99 {:.3} ms",
            o.clients,
            o.rate,
            ms(f.emit.p50),
            ms(f.emit.p99),
            ms(f.emit.max),
            FANOUT_P99_GOAL.as_millis(),
            met(f.emit.p99 < FANOUT_P99_GOAL),
            ms(f.sent.p50),
            ms(f.sent.p99),
        ));
        println_out(&format!(
            "  exactly-once in seq order: {}; keel RSS {}",
            f.delivery.verdict(),
            f.res.rss
        ));
        exact &= f.delivery.all_exact();
    }
    if let Some(t) = &throughput_result {
        println_out(&format!(
            "write throughput, {} writers: {:.0} events/s committed (HTTP POST + append, one event a request) — goal ≥ {:.0}/s: {}",
            o.writers,
            t.rate,
            THROUGHPUT_GOAL,
            met(t.rate >= THROUGHPUT_GOAL),
        ));
        println_out(&format!(
            "  followers complete: {}/{}, streams cut for falling behind: {} (no follower falling behind: {}); keel RSS {}",
            t.delivery.exact,
            t.delivery.clients,
            t.delivery.cut(),
            met(t.delivery.all_exact() && t.delivery.cut() == 0),
            t.res.rss
        ));
        exact &= t.delivery.all_exact();
    }
    if let Some(a) = &append_result {
        println_out(&format!(
            "append path, {} emitters: {:.0} events/s committed — goal ≥ {:.0}/s: {}; followers exact {}/{}, cut {} (no follower falling behind: {})",
            o.writers,
            a.rate,
            THROUGHPUT_GOAL,
            met(a.rate >= THROUGHPUT_GOAL),
            a.delivery.exact,
            a.delivery.clients,
            a.delivery.cut(),
            met(a.delivery.all_exact() && a.delivery.cut() == 0),
        ));
        exact &= a.delivery.all_exact();
    }
    if let Some(st) = &storm_result {
        println_out(&format!(
            "reconnect storm, {} clients over {} events: caught up p50 {:.0} ms, p99 {:.0} ms, all in {:.0} ms; exact {}/{} ({}); keel RSS {}",
            o.reconnect_clients,
            st.head,
            ms(st.p50),
            ms(st.p99),
            ms(st.total),
            st.delivery.exact,
            st.delivery.clients,
            st.delivery.verdict(),
            st.res.rss
        ));
        exact &= st.delivery.all_exact();
    }
    if !exact {
        bail!("some clients did not receive every event exactly once in order (see above)");
    }
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

// ---------------------------------------------------------------------------------------
// Part 1: fan-out latency.

struct Fanout {
    events: usize,
    post_errors: usize,
    post_p50: Duration,
    post_p99: Duration,
    deliveries: usize,
    /// From the event's commit timestamp (taken by Keel's writer) to the client.
    emit: Spread,
    /// From the bench sending the POST to the client.
    sent: Spread,
    /// Per event, from its commit timestamp to its first and to its last client.
    first: Spread,
    last: Spread,
    delivery: Delivery,
    res: Resources,
}

/// Percentiles of a set of latencies.
struct Spread {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Spread {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Self {
            p50: percentile(&v, 0.5),
            p99: percentile(&v, 0.99),
            max: v.last().copied().unwrap_or_default(),
        }
    }
}

impl Fanout {
    fn line(&self) -> String {
        format!(
            "fan-out: {} events × {} clients = {} deliveries; emit (commit timestamp)→client p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; \
             POST sent→client p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; \
             per event, emit→first client p50 {:.3} ms, emit→last client p50 {:.3} ms, p99 {:.3} ms; \
             POST→201 p50 {:.3} ms, p99 {:.3} ms, {} POST errors; {};\n  {}",
            self.events,
            self.delivery.clients,
            self.deliveries,
            ms(self.emit.p50),
            ms(self.emit.p99),
            ms(self.emit.max),
            ms(self.sent.p50),
            ms(self.sent.p99),
            ms(self.sent.max),
            ms(self.first.p50),
            ms(self.last.p50),
            ms(self.last.p99),
            ms(self.post_p50),
            ms(self.post_p99),
            self.post_errors,
            self.delivery,
            self.res
        )
    }
}

async fn fanout(exe: &Path, o: &Options) -> anyhow::Result<Fanout> {
    let keel = Keel::start(exe, "fanout", o.clients).await?;
    let sampler = RssSampler::start(keel.pid);
    let base = Instant::now();
    let base_wall = std::time::SystemTime::now();
    let followers = Followers::connect(&keel.server(), base, o.clients, true).await?;
    let ready = followers.sync(&keel.server()).await?;

    // Open loop: each ping on its own task at its scheduled time, never waiting for answers.
    let writer = writer_client()?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(o.rate));
    let total = ((o.duration.as_secs_f64() * f64::from(o.rate)) as usize).max(1);
    let cpu = CpuMeter::start(keel.pid);
    let start = tokio::time::Instant::now();
    let mut posts = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let (client, url, key) = (writer.clone(), keel.ping_url(), keel.key.clone());
        posts.push(tokio::spawn(async move {
            let sent = base.elapsed();
            let answer = ping_event(&client, &url, &key, &format!("t{}", sent.as_nanos())).await;
            (answer, sent, base.elapsed().saturating_sub(sent))
        }));
    }
    let mut last = ready;
    let mut post_errors = 0;
    let mut post_latencies = Vec::with_capacity(total);
    // seq → (sent, committed), both on the `base` clock.
    let mut times: std::collections::HashMap<i64, (Duration, Duration)> =
        std::collections::HashMap::with_capacity(total);
    for post in posts {
        match post.await {
            Ok((Ok((seq, committed)), sent, latency)) => {
                last = last.max(seq);
                post_latencies.push(latency);
                let committed = committed.duration_since(base_wall).unwrap_or_default();
                times.insert(seq, (sent, committed));
            }
            Ok((Err(_), _, _)) | Err(_) => post_errors += 1,
        }
    }
    let cpu = cpu.stop();
    post_latencies.sort_unstable();

    followers.settle(last).await;
    let rss = Rss::take(keel.pid, sampler).await;
    let log = keel.log_summary();
    let follows = followers.finish().await;
    keel.stop().await;

    let delivery = Delivery::assess(&follows, |_| (ready, last));
    let mut from_sent = Vec::new();
    let mut from_emit = Vec::new();
    // seq → (first, last) arrival after its commit.
    let mut spans: std::collections::HashMap<i64, (Duration, Duration)> =
        std::collections::HashMap::with_capacity(times.len());
    for (seq, at) in follows.iter().flat_map(|f| f.arrivals.iter()) {
        if let Some((sent, committed)) = times.get(seq) {
            let at = Duration::from_nanos(*at);
            from_sent.push(at.saturating_sub(*sent));
            let after = at.saturating_sub(*committed);
            from_emit.push(after);
            let span = spans.entry(*seq).or_insert((after, after));
            span.0 = span.0.min(after);
            span.1 = span.1.max(after);
        }
    }
    let first = Spread::of(spans.values().map(|s| s.0).collect());
    let last = Spread::of(spans.values().map(|s| s.1).collect());
    Ok(Fanout {
        events: total - post_errors,
        post_errors,
        post_p50: percentile(&post_latencies, 0.5),
        post_p99: percentile(&post_latencies, 0.99),
        deliveries: from_sent.len(),
        emit: Spread::of(from_emit),
        sent: Spread::of(from_sent),
        first,
        last,
        delivery,
        res: Resources { rss, cpu, log },
    })
}

// ---------------------------------------------------------------------------------------
// Part 2: write throughput.

struct Throughput {
    committed: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    rate: f64,
    delivery: Delivery,
    res: Resources,
}

impl Throughput {
    fn line(&self) -> String {
        let mut line = format!(
            "write throughput: {} events committed in {:.2} s = {:.0} events/s (one HTTP POST per event: \
             this measures HTTP + auth + append, client and server on the same cores), {} errors; \
             followers: {};\n  {}",
            self.committed,
            self.elapsed.as_secs_f64(),
            self.rate,
            self.errors,
            self.delivery,
            self.res
        );
        if let Some(e) = &self.first_error {
            line.push_str(&format!("\n  first error: {e}"));
        }
        if self.rate < THROUGHPUT_GOAL {
            line.push_str(&format!(
                "\n  below the {THROUGHPUT_GOAL:.0} events/s goal over HTTP on this machine; the figure is \
                 what one-request-per-event POSTs reach here, not the append path alone"
            ));
        }
        line
    }
}

async fn throughput(exe: &Path, o: &Options) -> anyhow::Result<Throughput> {
    let keel = Keel::start(exe, "throughput", o.followers).await?;
    let sampler = RssSampler::start(keel.pid);
    let base = Instant::now();
    let followers = Followers::connect(&keel.server(), base, o.followers, false).await?;
    let ready = followers.sync(&keel.server()).await?;

    let writer = writer_client()?;
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicI64::new(ready));
    let first_error = Arc::new(std::sync::OnceLock::new());
    let cpu = CpuMeter::start(keel.pid);
    let started = Instant::now();
    let mut workers = Vec::with_capacity(o.writers);
    for _ in 0..o.writers {
        let (client, url, key) = (writer.clone(), keel.ping_url(), keel.key.clone());
        let (stop, committed, errors, last, first_error) = (
            stop.clone(),
            committed.clone(),
            errors.clone(),
            last.clone(),
            first_error.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match ping(&client, &url, &key, "w").await {
                    Ok(seq) => {
                        committed.fetch_add(1, Ordering::Relaxed);
                        last.fetch_max(seq, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let _ = first_error.set(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(o.write_duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let done = committed.load(Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let cpu = cpu.stop();
    let last = last.load(Ordering::Relaxed);

    followers.settle(last).await;
    let rss = Rss::take(keel.pid, sampler).await;
    let log = keel.log_summary();
    let follows = followers.finish().await;
    keel.stop().await;

    Ok(Throughput {
        committed: done,
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.get().cloned(),
        elapsed,
        rate: done as f64 / elapsed.as_secs_f64(),
        delivery: Delivery::assess(&follows, |_| (ready, last)),
        res: Resources { rss, cpu, log },
    })
}

// ---------------------------------------------------------------------------------------
// Part 2b: the append path, in process.

struct Append {
    committed: u64,
    elapsed: Duration,
    rate: f64,
    delivery: Delivery,
    cores: f64,
    rss: u64,
}

impl Append {
    fn line(&self, o: &Options) -> String {
        format!(
            "append path: {} events committed in {:.2} s = {:.0} events/s by {} in-process emitters \
             (EventLog::append, one event a call, as the runtime emits; group commit on SQLite with \
             synchronous = full); followers over HTTP: {};\n  this process (Keel + emitters + followers) \
             used {:.2} cores, peak RSS {:.1} MB",
            self.committed,
            self.elapsed.as_secs_f64(),
            self.rate,
            o.writers,
            self.delivery,
            self.cores,
            self.rss as f64 / 1e6
        )
    }
}

/// Keel's server in this process (SQLite in a fresh directory), its event log appended to
/// directly by `writers` tasks, followed over real HTTP by `followers` SSE clients.
async fn append(o: &Options) -> anyhow::Result<Append> {
    use keel_core::auth::Role;
    use keel_core::event::{EventType, NewEvent};
    use keel_core::workspace::WorkspaceName;

    let dir = TempDir(
        std::env::temp_dir().join(format!("keel-bench-events-{}-append", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0)
        .with_context(|| format!("cannot create {}", dir.0.display()))?;
    let mut config = keel_core::config::Config {
        data_dir: dir.0.clone(),
        ..Default::default()
    };
    config.server.listen = "127.0.0.1:0".parse()?;
    config.events.max_stream_clients = o.followers.saturating_add(16).max(10_000);
    let store = keel_store::open(&config).await?;
    store.migrate().await?;
    let workspace = store
        .ensure_workspace(&WorkspaceName::parse("bench")?)
        .await?;
    let (token, _) = keel_server::auth::issue_key(
        store.as_ref(),
        workspace.id,
        Role::Admin,
        None,
        Default::default(),
    )
    .await?;
    let env = |_: &str| None;
    let (router, _) = keel_server::gateway::router(&config, &env)?;
    let config = Arc::new(config);
    let (usage, usage_writer) = keel_server::usage::start(store.clone());
    let (events, event_tasks) = keel_server::events::start(store.clone(), &config).await?;
    let shutdown = CancellationToken::new();
    let router = Arc::new(router);
    let (runtime, runtime_tasks) =
        keel_server::runtime::start(store.clone(), router.clone(), &events, &config).await?;
    let state = keel_server::AppState::new(keel_server::Parts {
        store: store.clone(),
        events: events.clone(),
        runtime,
        config,
        router,
        usage,
        cache: None,
        shutdown: shutdown.clone(),
    });
    let server = keel_server::Server::bind(state, shutdown.clone()).await?;
    let target = Server {
        url: format!("http://{}", server.local_addr()?),
        key: token.expose().to_owned(),
    };
    let serving = tokio::spawn(server.run());

    let base = Instant::now();
    let followers = Followers::connect(&target, base, o.followers, false).await?;
    let ready = followers.sync(&target).await?;
    let me = std::process::id();
    let sampler = RssSampler::start(me);
    let ticks = cpu_ticks(&format!("/proc/{me}/stat")).unwrap_or_default();
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicI64::new(ready));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(o.writers);
    for _ in 0..o.writers {
        let (events, stop, committed, last) = (
            events.clone(),
            stop.clone(),
            committed.clone(),
            last.clone(),
        );
        let ws = workspace.id;
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let event = NewEvent::new(
                    EventType::SystemPing,
                    ws,
                    serde_json::json!({ "message": "a" }),
                );
                let done = events.append(vec![event]).await?;
                committed.fetch_add(1, Ordering::Relaxed);
                if let Some(e) = done.last() {
                    last.fetch_max(e.seq, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(o.write_duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let done = committed.load(Ordering::Relaxed);
    for w in workers {
        w.await?.context("an append failed")?;
    }
    let cores = cpu_ticks(&format!("/proc/{me}/stat"))
        .map(|t| t.saturating_sub(ticks) as f64 / TICKS_PER_SEC / elapsed.as_secs_f64())
        .unwrap_or_default();
    let last = last.load(Ordering::Relaxed);
    followers.settle(last).await;
    let rss = sampler.stop().await;
    let follows = followers.finish().await;
    shutdown.cancel();
    let _ = serving.await;
    runtime_tasks.finish().await;
    usage_writer.finish().await;
    event_tasks.finish().await;
    store.close().await;
    Ok(Append {
        committed: done,
        elapsed,
        rate: done as f64 / elapsed.as_secs_f64(),
        delivery: Delivery::assess(&follows, |_| (ready, last)),
        cores,
        rss,
    })
}

// ---------------------------------------------------------------------------------------
// Part 3: reconnect storm.

struct Storm {
    head: i64,
    append_rate: f64,
    delivered: u64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    total: Duration,
    caught_up: usize,
    delivery: Delivery,
    res: Resources,
}

impl Storm {
    fn line(&self) -> String {
        format!(
            "reconnect storm: log of {} events (appended at {:.0}/s); {}/{} clients caught up, \
             {} events delivered ({:.0}/s); catch-up per client p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
             all caught up {:.0} ms after the storm began; {};\n  {}",
            self.head,
            self.append_rate,
            self.caught_up,
            self.delivery.clients,
            self.delivered,
            self.delivered as f64 / self.total.as_secs_f64().max(1e-9),
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            ms(self.total),
            self.delivery,
            self.res
        )
    }
}

async fn storm(exe: &Path, o: &Options) -> anyhow::Result<Storm> {
    let keel = Keel::start(exe, "storm", o.reconnect_clients).await?;

    // The log, written beforehand by concurrent writers.
    let writer = writer_client()?;
    let remaining = Arc::new(AtomicI64::new(i64::try_from(o.log_events)?));
    let head = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(o.writers);
    for _ in 0..o.writers {
        let (client, url, key) = (writer.clone(), keel.ping_url(), keel.key.clone());
        let (remaining, head) = (remaining.clone(), head.clone());
        workers.push(tokio::spawn(async move {
            while remaining.fetch_sub(1, Ordering::Relaxed) > 0 {
                let seq = ping(&client, &url, &key, "l").await?;
                head.fetch_max(seq, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await?.context("cannot append the log before the storm")?;
    }
    let append_rate = o.log_events as f64 / started.elapsed().as_secs_f64();
    let head = head.load(Ordering::Relaxed);

    // The storm: every client at once, each resuming from a random seq in [0, head).
    let sampler = RssSampler::start(keel.pid);
    let cpu = CpuMeter::start(keel.pid);
    let ctx = Arc::new(Ctx::new(&keel.server(), Instant::now())?);
    let mut random = SplitMix(0x5eed_cafe_f00d_0001);
    let mut cursors = Vec::with_capacity(o.reconnect_clients);
    let mut progress = Vec::with_capacity(o.reconnect_clients);
    let mut tasks = Vec::with_capacity(o.reconnect_clients);
    for _ in 0..o.reconnect_clients {
        let cursor = (random.next() % head.unsigned_abs().max(1)) as i64;
        let p = Arc::new(Progress::default());
        cursors.push(cursor);
        progress.push(p.clone());
        tasks.push(tokio::spawn(follow(ctx.clone(), Some(cursor), head, p)));
    }
    let followers = Followers {
        ctx,
        progress,
        tasks,
    };
    let finished = followers.wait(head, STORM_TIMEOUT).await;
    let cpu = cpu.stop();
    let rss = Rss::take(keel.pid, sampler).await;
    let log = keel.log_summary();
    let follows = followers.finish().await;
    keel.stop().await;
    if !finished {
        println_out(&format!(
            "  the storm had not finished after {STORM_TIMEOUT:?}; figures are for the clients that caught up"
        ));
    }

    let delivery = Delivery::assess(&follows, |i| {
        (cursors.get(i).copied().unwrap_or_default() + 1, head)
    });
    let mut catch_up: Vec<Duration> = follows.iter().filter_map(|f| f.caught_up).collect();
    catch_up.sort_unstable();
    let total = follows
        .iter()
        .filter_map(|f| f.caught_up_at)
        .max()
        .unwrap_or_default();
    Ok(Storm {
        head,
        append_rate,
        delivered: follows.iter().map(|f| f.check.received).sum(),
        p50: percentile(&catch_up, 0.5),
        p99: percentile(&catch_up, 0.99),
        max: catch_up.last().copied().unwrap_or_default(),
        total,
        caught_up: catch_up.len(),
        delivery,
        res: Resources { rss, cpu, log },
    })
}

/// A small deterministic generator (SplitMix64), so runs pick the same cursors.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------
// The server under test.

/// A `keel serve` in its own temporary directory, with an admin key.
/// Where clients connect: a base URL and an admin key.
struct Server {
    url: String,
    key: String,
}

struct Keel {
    child: Child,
    url: String,
    pid: u32,
    key: String,
    log: Arc<std::sync::Mutex<LogTally>>,
    _dir: TempDir,
}

/// Removed when dropped, also when a part fails half-way.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Keel {
    async fn start(exe: &Path, part: &str, clients: usize) -> anyhow::Result<Self> {
        let dir = TempDir(
            std::env::temp_dir().join(format!("keel-bench-events-{}-{part}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0)
            .with_context(|| format!("cannot create {}", dir.0.display()))?;
        let config = dir.0.join("keel.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n[server]\nlisten = \"127.0.0.1:0\"\n\
                 [events]\nstream_buffer = 4096\nmax_stream_clients = {max}\nkeepalive = \"15s\"\n",
                data = dir.0.display().to_string(),
                max = clients.saturating_add(16).max(10_000),
            ),
        )?;
        let key = create_key(exe, &dir.0, &config, "admin").await?;
        let (child, url, pid, log) = start_keel_logged(exe, &dir.0, &config).await?;
        Ok(Self {
            child,
            url,
            pid,
            key,
            log,
            _dir: dir,
        })
    }

    /// The warnings and errors Keel has logged, in one line.
    fn log_summary(&self) -> String {
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if log.warnings == 0 && log.errors == 0 {
            return "keel logged no warnings or errors".to_owned();
        }
        let kinds: Vec<String> = log
            .kinds
            .iter()
            .map(|(text, n)| format!("{text} ×{n}"))
            .collect();
        format!(
            "keel logged {} warnings, {} errors: {}",
            log.warnings,
            log.errors,
            kinds.join("; ")
        )
    }

    fn ping_url(&self) -> String {
        format!("{}/v1/events/ping", self.url)
    }

    fn server(&self) -> Server {
        Server {
            url: self.url.clone(),
            key: self.key.clone(),
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// CPU used over a window by Keel and by this process (the clients), in cores.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    keel: f64,
    bench: f64,
}

struct CpuMeter {
    pid: u32,
    keel: u64,
    bench: u64,
    at: Instant,
}

impl CpuMeter {
    fn start(pid: u32) -> Self {
        Self {
            pid,
            keel: cpu_ticks(&format!("/proc/{pid}/stat")).unwrap_or(0),
            bench: cpu_ticks("/proc/self/stat").unwrap_or(0),
            at: Instant::now(),
        }
    }

    fn stop(self) -> Cpu {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let cores = |now: Option<u64>, then: u64| {
            now.map_or(0.0, |n| {
                n.saturating_sub(then) as f64 / TICKS_PER_SEC / wall
            })
        };
        Cpu {
            keel: cores(cpu_ticks(&format!("/proc/{}/stat", self.pid)), self.keel),
            bench: cores(cpu_ticks("/proc/self/stat"), self.bench),
        }
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU keel {:.2} cores, bench clients {:.2} cores",
            self.keel, self.bench
        )
    }
}

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 a second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

/// User + system CPU ticks from a `/proc/…/stat` file.
fn cpu_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, `state`;
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Keel's resident memory: peak during the part and at its end.
#[derive(Debug, Clone, Copy)]
struct Rss {
    peak: u64,
    end: u64,
}

impl Rss {
    async fn take(pid: u32, sampler: RssSampler) -> Self {
        let end = rss_bytes(pid).unwrap_or(0);
        let peak = sampler.stop().await.max(end);
        Self { peak, end }
    }
}

/// What a part cost Keel, and the bench's own CPU for comparison.
#[derive(Debug)]
struct Resources {
    rss: Rss,
    /// Over the part's load (not its set-up).
    cpu: Cpu,
    log: String,
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "keel RSS peak / at end {}; under load {}\n  {}",
            self.rss, self.cpu, self.log
        )
    }
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MB / {:.1} MB",
            self.peak as f64 / 1e6,
            self.end as f64 / 1e6
        )
    }
}

fn writer_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Appends one `system.ping`; returns the committed event's JSON.
async fn post_ping(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    message: &str,
) -> anyhow::Result<Vec<u8>> {
    let res = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(format!("{{\"message\":\"{message}\"}}"))
        .send()
        .await
        .context("POST /v1/events/ping")?;
    let status = res.status();
    let body = res.bytes().await.context("POST /v1/events/ping")?;
    if status != reqwest::StatusCode::CREATED {
        bail!(
            "POST /v1/events/ping answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(body.to_vec())
}

/// Appends one `system.ping` and returns its seq (found without parsing the JSON: the
/// writers of the throughput part call this as fast as they can).
async fn ping(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    message: &str,
) -> anyhow::Result<i64> {
    let body = post_ping(client, url, key, message).await?;
    find(&body, b"\"seq\":")
        .and_then(|i| leading_int(&body[i + 6..]))
        .context("the ping's answer has no seq")
}

/// Appends one `system.ping`; returns its seq and commit timestamp.
async fn ping_event(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    message: &str,
) -> anyhow::Result<(i64, std::time::SystemTime)> {
    let body = post_ping(client, url, key, message).await?;
    let event: serde_json::Value =
        serde_json::from_slice(&body).context("the ping's answer is not JSON")?;
    let seq = event["seq"]
        .as_i64()
        .context("the ping's answer has no seq")?;
    let timestamp = event["timestamp"]
        .as_str()
        .context("the ping's answer has no timestamp")?;
    let at = humantime::parse_rfc3339_weak(timestamp)
        .with_context(|| format!("the ping's timestamp {timestamp:?} is not RFC 3339"))?;
    Ok((seq, at))
}

// ---------------------------------------------------------------------------------------
// SSE clients.

/// What every client of a part shares.
struct Ctx {
    /// Keel's address; streams are read with the lean client of `sse_client`.
    addr: std::net::SocketAddr,
    key: String,
    /// The clock that pings' send times are measured on.
    base: Instant,
    connected: AtomicUsize,
    stop: CancellationToken,
    /// Whether clients keep every event's arrival time (the fan-out part).
    record_arrivals: bool,
}

impl Ctx {
    fn new(server: &Server, base: Instant) -> anyhow::Result<Self> {
        let addr = server
            .url
            .strip_prefix("http://")
            .context("the server's URL is not http://")?
            .parse()
            .with_context(|| format!("the server's URL {} has no address", server.url))?;
        Ok(Self {
            addr,
            key: server.key.clone(),
            base,
            connected: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            record_arrivals: false,
        })
    }
}

/// How far one client has got, for the coordinator to watch.
#[derive(Default)]
struct Progress {
    seq: AtomicI64,
    finished: AtomicBool,
}

/// What one client saw.
#[derive(Default)]
struct Followed {
    check: Check,
    /// (seq, arrival on the `base` clock in ns), when the part records arrivals.
    arrivals: Vec<(i64, u64)>,
    /// Whether the server has answered it once with a stream.
    connected: bool,
    /// Why each of its streams ended early: a `stream.closed` reason or a refusal.
    cuts: Vec<String>,
    error: Option<String>,
    /// From this client's request to its receiving the target seq.
    caught_up: Option<Duration>,
    /// From the shared base to its receiving the target seq.
    caught_up_at: Option<Duration>,
}

/// A part's clients.
struct Followers {
    ctx: Arc<Ctx>,
    progress: Vec<Arc<Progress>>,
    tasks: Vec<tokio::task::JoinHandle<Followed>>,
}

impl Followers {
    /// Opens `n` live streams (no cursor) and waits until the server has answered each.
    async fn connect(
        server: &Server,
        base: Instant,
        n: usize,
        record_arrivals: bool,
    ) -> anyhow::Result<Self> {
        let ctx = Arc::new(Ctx {
            record_arrivals,
            ..Ctx::new(server, base)?
        });
        let mut progress = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let p = Arc::new(Progress::default());
            progress.push(p.clone());
            tasks.push(tokio::spawn(follow(ctx.clone(), None, i64::MAX, p)));
        }
        let started = Instant::now();
        loop {
            let connected = ctx.connected.load(Ordering::Acquire);
            if connected == n {
                break;
            }
            let failed = progress
                .iter()
                .filter(|p| p.finished.load(Ordering::Acquire))
                .count();
            if failed > 0 || started.elapsed() > Duration::from_secs(60) {
                let this = Self {
                    ctx,
                    progress,
                    tasks,
                };
                let follows = this.finish().await;
                let error = follows
                    .iter()
                    .find_map(|f| f.error.clone())
                    .unwrap_or_else(|| "timed out".to_owned());
                bail!("only {connected} of {n} SSE clients connected: {error}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            ctx,
            progress,
            tasks,
        })
    }

    /// Sends one ping and waits until every client has it: from then on every client is
    /// following live. Returns its seq, the first every client must receive.
    async fn sync(&self, server: &Server) -> anyhow::Result<i64> {
        let seq = ping(
            &writer_client()?,
            &format!("{}/v1/events/ping", server.url),
            &server.key,
            "ready",
        )
        .await?;
        if !self.wait(seq, SETTLE).await {
            bail!("not every SSE client received the first ping within {SETTLE:?}");
        }
        let cut = self
            .progress
            .iter()
            .filter(|p| p.finished.load(Ordering::Acquire))
            .count();
        if cut > 0 {
            bail!("{cut} SSE clients ended before the load began");
        }
        Ok(seq)
    }

    /// Waits until every client has received `seq` or has ended; false on timeout.
    async fn wait(&self, seq: i64, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            if self
                .progress
                .iter()
                .all(|p| p.finished.load(Ordering::Acquire) || p.seq.load(Ordering::Acquire) >= seq)
            {
                return true;
            }
            if started.elapsed() > timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Gives clients [`SETTLE`] to receive `last`; a client still behind then is reported
    /// by the check, not here.
    async fn settle(&self, last: i64) {
        let _ = self.wait(last, SETTLE).await;
    }

    /// Closes every stream and returns what each client saw, in order.
    async fn finish(self) -> Vec<Followed> {
        self.ctx.stop.cancel();
        let mut out = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            out.push(task.await.unwrap_or_else(|e| Followed {
                error: Some(format!("client task failed: {e}")),
                ..Followed::default()
            }));
        }
        out
    }
}

/// One SSE client: follows from `cursor` (or live), checking every event, until stopped.
/// As the protocol asks, a stream the server cuts (`stream.closed`) or refuses (503) is
/// resumed after the advertised `retry:` delay from the last seq the client has seen; each
/// cut is counted.
async fn follow(
    ctx: Arc<Ctx>,
    cursor: Option<i64>,
    target: i64,
    progress: Arc<Progress>,
) -> Followed {
    let mut out = Followed::default();
    if ctx.record_arrivals {
        out.arrivals.reserve(16 * 1024);
    }
    let started = Instant::now();
    let mut cursor = cursor;
    loop {
        match follow_stream(&ctx, cursor, target, started, &progress, &mut out).await {
            Ok(Ended::Stopped) => break,
            Ok(Ended::Cut {
                reason,
                resume_after,
            }) => {
                out.cuts.push(reason);
                cursor = Some(resume_after);
            }
            Ok(Ended::Refused(status)) => out.cuts.push(format!("HTTP {status} on connect")),
            Err(e) => {
                out.error = Some(format!("{e:#}"));
                break;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = ctx.stop.cancelled() => break,
        }
    }
    progress.finished.store(true, Ordering::Release);
    out
}

/// How one connection of a client ended.
enum Ended {
    /// The bench closed it.
    Stopped,
    /// The server ended it with `stream.closed`.
    Cut { reason: String, resume_after: i64 },
    /// The server answered 503 instead of streaming.
    Refused(u16),
}

async fn follow_stream(
    ctx: &Ctx,
    cursor: Option<i64>,
    target: i64,
    started: Instant,
    progress: &Progress,
    out: &mut Followed,
) -> anyhow::Result<Ended> {
    let auth = format!("Bearer {}", ctx.key);
    let cursor_text = cursor.map(|c| c.to_string());
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("accept", "text/event-stream"),
    ];
    if let Some(c) = &cursor_text {
        headers.push(("last-event-id", c.as_str()));
    }
    // Each client has its own token (a child of the part's): checking one shared token
    // from a thousand tasks is a lock they all contend for.
    let stop = ctx.stop.child_token();
    let mut res = tokio::select! {
        res = crate::sse_client::get(ctx.addr, "/v1/events", &headers) => res.context("GET /v1/events")?,
        () = stop.cancelled() => return Ok(Ended::Stopped),
    };
    let status = res.status;
    if status == 503 {
        return Ok(Ended::Refused(status));
    }
    if status != 200 {
        let body = res.text().await;
        bail!("GET /v1/events answered {status}: {body}");
    }
    if !out.connected {
        out.connected = true;
        ctx.connected.fetch_add(1, Ordering::Release);
    }
    let mut parser = Parser::default();
    let mut cut = None;
    let mut chunk = Vec::with_capacity(16 * 1024);
    // One registration with the token for the whole stream, not one per read.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        chunk.clear();
        let more = tokio::select! {
            biased;
            () = &mut stopped => return Ok(Ended::Stopped),
            more = res.read(&mut chunk) => more.context("reading the SSE stream")?,
        };
        if !more {
            return match cut {
                Some((reason, resume_after)) => Ok(Ended::Cut {
                    reason,
                    resume_after,
                }),
                None => bail!("the server ended the stream without stream.closed"),
            };
        }
        let now = ctx.base.elapsed();
        parser.feed(&chunk, &mut |frame: Frame<'_>| {
            if frame.event == b"stream.closed" {
                let reason = find(frame.data, b"\"reason\":\"")
                    .map(|i| &frame.data[i + 10..])
                    .and_then(|r| r.split(|&b| b == b'"').next())
                    .map_or_else(
                        || "stream.closed".to_owned(),
                        |r| String::from_utf8_lossy(r).into_owned(),
                    );
                cut = Some((reason, frame.id.unwrap_or_else(|| out.check.last())));
                return;
            }
            let Some(seq) = frame.id else { return };
            out.check.see(seq);
            if ctx.record_arrivals {
                out.arrivals
                    .push((seq, u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)));
            }
            if seq == target && out.caught_up.is_none() {
                out.caught_up = Some(started.elapsed());
                out.caught_up_at = Some(ctx.base.elapsed());
            }
        });
        progress.seq.store(out.check.last(), Ordering::Release);
    }
}

/// One SSE message, borrowed from the stream's bytes; only the fields the bench needs.
#[derive(Default)]
struct Frame<'a> {
    id: Option<i64>,
    event: &'a [u8],
    data: &'a [u8],
}

/// Splits a byte stream into SSE messages, copying only a partial message at a chunk's end.
#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    fn feed(&mut self, chunk: &[u8], f: &mut impl FnMut(Frame<'_>)) {
        if self.buf.is_empty() {
            let used = frames(chunk, f);
            self.buf.extend_from_slice(&chunk[used..]);
        } else {
            self.buf.extend_from_slice(chunk);
            let used = frames(&self.buf, f);
            self.buf.drain(..used);
        }
    }
}

/// Hands every complete message in `data` to `f`; returns the bytes consumed.
fn frames(data: &[u8], f: &mut impl FnMut(Frame<'_>)) -> usize {
    let mut consumed = 0;
    let mut pos = 0;
    let mut frame = Frame::default();
    while let Some(n) = memchr::memchr(b'\n', &data[pos..]) {
        let line = &data[pos..pos + n];
        pos += n + 1;
        if line.is_empty() {
            f(std::mem::take(&mut frame));
            consumed = pos;
        } else if let Some(v) = line.strip_prefix(b"id: ") {
            frame.id = leading_int(v);
        } else if let Some(v) = line.strip_prefix(b"event: ") {
            frame.event = v;
        } else if let Some(v) = line.strip_prefix(b"data: ") {
            frame.data = v;
        }
    }
    consumed
}

/// The decimal integer at the start of `b`.
fn leading_int(b: &[u8]) -> Option<i64> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    b[..digits].iter().try_fold(0i64, |n, d| {
        n.checked_mul(10)?.checked_add(i64::from(d - b'0'))
    })
}

// ---------------------------------------------------------------------------------------
// Exactly once, in order.

/// A client's running check of the seqs it received.
#[derive(Debug, Default)]
struct Check {
    first: Option<i64>,
    /// The seq expected next.
    next: i64,
    received: u64,
    /// Seqs skipped over and not (yet) received.
    gaps: BTreeSet<i64>,
    duplicates: u64,
    out_of_order: u64,
}

impl Check {
    fn see(&mut self, seq: i64) {
        self.received += 1;
        if self.first.is_none() {
            self.first = Some(seq);
            self.next = seq + 1;
        } else if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            self.gaps.extend(self.next..seq);
            self.next = seq + 1;
        } else if self.gaps.remove(&seq) {
            self.out_of_order += 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// The highest seq received in order so far (0 before any).
    fn last(&self) -> i64 {
        if self.first.is_some() {
            self.next - 1
        } else {
            0
        }
    }
}

/// Exactness over a part's clients.
#[derive(Debug, Default)]
struct Delivery {
    clients: usize,
    /// Clients that received exactly their range, once each, in order.
    exact: usize,
    missing: u64,
    duplicates: u64,
    out_of_order: u64,
    /// Events received outside the client's range.
    extra: u64,
    /// Streams the server cut or refused, by reason; each was resumed.
    cuts: std::collections::BTreeMap<String, usize>,
    errors: usize,
    error_example: Option<String>,
}

impl Delivery {
    /// `range(i)` is the inclusive range of seqs client `i` must receive.
    fn assess(follows: &[Followed], range: impl Fn(usize) -> (i64, i64)) -> Self {
        let mut d = Self {
            clients: follows.len(),
            ..Self::default()
        };
        for (i, f) in follows.iter().enumerate() {
            let (from, to) = range(i);
            let c = &f.check;
            let (mut missing, mut extra) = (0u64, 0u64);
            match c.first {
                None => missing += (to - from + 1).unsigned_abs(),
                Some(first) => {
                    let last = c.next - 1;
                    if first > from {
                        missing += (first - from).unsigned_abs();
                    } else {
                        extra += (from - first).unsigned_abs();
                    }
                    missing += c.gaps.range(from..=to).count() as u64;
                    if last < to {
                        missing += (to - last).unsigned_abs();
                    } else {
                        extra += (last - to).unsigned_abs();
                    }
                }
            }
            d.missing += missing;
            d.extra += extra;
            d.duplicates += c.duplicates;
            d.out_of_order += c.out_of_order;
            if missing == 0 && extra == 0 && c.duplicates == 0 && c.out_of_order == 0 {
                d.exact += 1;
            }
            for why in &f.cuts {
                *d.cuts.entry(why.clone()).or_default() += 1;
            }
            if let Some(e) = &f.error {
                d.errors += 1;
                d.error_example.get_or_insert_with(|| e.clone());
            }
        }
        d
    }

    fn all_exact(&self) -> bool {
        self.exact == self.clients
    }

    fn cut(&self) -> usize {
        self.cuts.values().sum()
    }

    fn verdict(&self) -> &'static str {
        if self.all_exact() { "ok" } else { "FAILED" }
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exact {}/{} clients (missing {}, duplicate {}, out-of-order {}, outside range {}, streams cut and resumed {}, errors {})",
            self.exact,
            self.clients,
            self.missing,
            self.duplicates,
            self.out_of_order,
            self.extra,
            self.cut(),
            self.errors
        )?;
        if !self.cuts.is_empty() {
            let reasons: Vec<String> = self.cuts.iter().map(|(r, n)| format!("{r} ×{n}")).collect();
            write!(f, " [cut: {}]", reasons.join(", "))?;
        }
        if let Some(e) = &self.error_example {
            write!(f, "; an error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_chunks_are_parsed_once() {
        let stream = b"retry: 1000\n\nid: 7\nevent: system.ping\ndata: {\"seq\":7,\"data\":{\"message\":\"t123\"},\"version\":\"1.0\"}\n\n: keep-alive\n\nid: 8\nevent: system.ping\ndata: {}\n\n";
        for split in 0..stream.len() {
            let mut parser = Parser::default();
            let mut seen = Vec::new();
            let mut f = |frame: Frame<'_>| {
                seen.push((frame.id, String::from_utf8_lossy(frame.data).into_owned()));
            };
            parser.feed(&stream[..split], &mut f);
            parser.feed(&stream[split..], &mut f);
            assert_eq!(
                seen,
                vec![
                    (None, String::new()),
                    (
                        Some(7),
                        r#"{"seq":7,"data":{"message":"t123"},"version":"1.0"}"#.to_owned()
                    ),
                    (None, String::new()),
                    (Some(8), "{}".to_owned())
                ]
            );
        }
    }

    #[test]
    fn check_counts_gaps_duplicates_and_late_events() {
        let mut c = Check::default();
        for seq in [5, 6, 8, 7, 7, 9] {
            c.see(seq);
        }
        assert_eq!((c.out_of_order, c.duplicates, c.gaps.len()), (1, 1, 0));
        let f = Followed {
            check: c,
            ..Followed::default()
        };
        let d = Delivery::assess(std::slice::from_ref(&f), |_| (5, 10));
        assert_eq!((d.missing, d.exact), (1, 0));
        let d = Delivery::assess(std::slice::from_ref(&f), |_| (5, 9));
        assert_eq!(d.missing, 0);
    }
}
