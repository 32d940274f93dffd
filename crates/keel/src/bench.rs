//! `keel bench gateway`: the gateway's overhead, measured the way TensorZero publishes
//! it. A zero-latency `keel mock-llm` and a `keel serve` run as separate processes on this
//! machine; constant-rate open-loop load goes first straight to the mock, then through
//! Keel, at the same rate; the added latency is the difference of the client-side
//! percentiles. Also: the cache-hit path, Keel's peak RSS during the run, and maximum
//! sustained throughput (closed loop), streaming and not.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Requests per second for the open-loop scenarios.
    pub rate: u32,
    /// Measured time per scenario.
    pub duration: Duration,
    /// Unmeasured time before each scenario.
    pub warmup: Duration,
    /// Concurrent clients for the throughput scenarios.
    pub concurrency: usize,
    /// Blocks each open-loop scenario is split into, taking turns with the others.
    pub rounds: u32,
    /// Environment variables for `keel serve` only (say `TOKIO_WORKER_THREADS=1`), to
    /// compare settings without changing the load generator or the mock.
    pub keel_env: Vec<(String, String)>,
    /// When set, a second `keel serve` with these variables runs beside the first, and its
    /// via-keel and cache-hit scenarios take turns with the first's (an A/B comparison on
    /// the same machine at the same time).
    pub keel_env_b: Vec<(String, String)>,
}

/// Environment given to every `keel serve` a bench starts (`--keel-env`).
static SERVE_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

/// Parses `NAME=VALUE`.
pub(crate) fn env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

#[derive(Default)]
struct Stats {
    sent: usize,
    errors: usize,
    latencies: Vec<Duration>,
}

impl Stats {
    fn merge(&mut self, other: Self) {
        self.sent += other.sent;
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
    }

    fn pct(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

/// The `p` quantile (0 to 1, nearest rank) of sorted durations; zero when there are none.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the gateway benchmark and prints its figures.
pub async fn gateway(options: Options) -> anyhow::Result<()> {
    let _ = SERVE_ENV.set(options.keel_env.clone());
    let exe = std::env::current_exe().context("cannot find the keel binary")?;
    let dir = std::env::temp_dir().join(format!("keel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&exe, &dir, &options).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(exe: &Path, dir: &Path, o: &Options) -> anyhow::Result<()> {
    let (mut mock, mock_url) = start_mock(exe, dir).await?;
    let (config, key) = bench_config(exe, dir, &mock_url).await?;
    let (mut keel, keel_url, pid) = start_keel(exe, dir, &config).await?;
    let b = if o.keel_env_b.is_empty() {
        None
    } else {
        let dir_b = dir.join("b");
        std::fs::create_dir_all(&dir_b)?;
        let (config_b, key_b) = bench_config(exe, &dir_b, &mock_url).await?;
        let (child, url, _pid, _log) =
            start_keel_env(exe, &dir_b, &config_b, &o.keel_env_b).await?;
        Some((child, format!("{url}/v1/chat/completions"), key_b))
    };

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;
    let body = |temperature: Option<f64>, stream: bool| {
        let mut b = json!({"model": "default", "messages": [{"role": "user", "content": "Say hello to the benchmark."}]});
        if let Some(t) = temperature {
            b["temperature"] = json!(t);
        }
        if stream {
            b["stream"] = json!(true);
        }
        b
    };
    let direct = format!("{mock_url}/chat/completions");
    let via = format!("{keel_url}/v1/chat/completions");

    println_out(&format!(
        "keel bench gateway: {} req/s for {:?} per scenario in {} interleaved rounds (after {:?} warm-up), {} cores",
        o.rate,
        o.duration,
        o.rounds.max(1),
        o.warmup,
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    ));
    // The three scenarios take turns in `rounds` blocks, so a burst of load from elsewhere
    // on this shared machine lands on all three alike instead of on whichever ran then.
    let rounds = o.rounds.max(1);
    let block = Options {
        duration: o.duration / rounds,
        ..o.clone()
    };
    let (mut direct_stats, mut via_stats, mut hit_stats) =
        (Stats::default(), Stats::default(), Stats::default());
    let mut peak_rss = 0;
    let mut b_stats = (Stats::default(), Stats::default());
    for round in 0..rounds {
        let block = Options {
            warmup: if round == 0 { o.warmup } else { Duration::ZERO },
            ..block.clone()
        };
        direct_stats.merge(open_loop(&client, &direct, None, &body(None, false), &block).await);
        let rss = RssSampler::start(pid);
        via_stats.merge(open_loop(&client, &via, Some(&key), &body(None, false), &block).await);
        peak_rss = peak_rss.max(rss.stop().await);
        hit_stats
            .merge(open_loop(&client, &via, Some(&key), &body(Some(0.0), false), &block).await);
        if let Some((_, via_b, key_b)) = &b {
            b_stats
                .0
                .merge(open_loop(&client, via_b, Some(key_b), &body(None, false), &block).await);
            b_stats.1.merge(
                open_loop(&client, via_b, Some(key_b), &body(Some(0.0), false), &block).await,
            );
        }
    }
    if let Some((mut child, _, _)) = b {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }

    println_out("");
    println_out("scenario                         sent  errors   p50 ms   p90 ms   p99 ms");
    let mut rows = vec![
        ("direct to mock", &direct_stats),
        ("via keel (cache off)", &via_stats),
        ("via keel (cache hit)", &hit_stats),
    ];
    if !o.keel_env_b.is_empty() {
        rows.push(("B: via keel (cache off)", &b_stats.0));
        rows.push(("B: via keel (cache hit)", &b_stats.1));
    }
    for (name, s) in rows {
        println_out(&format!(
            "{name:<30} {:>6}  {:>6}  {:>7.3}  {:>7.3}  {:>7.3}",
            s.sent,
            s.errors,
            ms(s.pct(0.5)),
            ms(s.pct(0.9)),
            ms(s.pct(0.99))
        ));
    }
    let added = |p: f64| ms(via_stats.pct(p)) - ms(direct_stats.pct(p));
    let hit_added = |p: f64| ms(hit_stats.pct(p)) - ms(direct_stats.pct(p));
    println_out(&format!(
        "\nadded by keel at {} req/s: p50 {:+.3} ms, p90 {:+.3} ms, p99 {:+.3} ms",
        o.rate,
        added(0.5),
        added(0.9),
        added(0.99)
    ));
    println_out(&format!(
        "cache-hit path: p50 {:.3} ms, p99 {:.3} ms (vs direct: p99 {:+.3} ms)",
        ms(hit_stats.pct(0.5)),
        ms(hit_stats.pct(0.99)),
        hit_added(0.99)
    ));
    if !o.keel_env_b.is_empty() {
        let added_b = |p: f64| ms(b_stats.0.pct(p)) - ms(direct_stats.pct(p));
        println_out(&format!(
            "B ({}): added p50 {:+.3} ms, p90 {:+.3} ms, p99 {:+.3} ms; cache-hit p50 {:.3} ms, p99 {:.3} ms",
            o.keel_env_b
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            added_b(0.5),
            added_b(0.9),
            added_b(0.99),
            ms(b_stats.1.pct(0.5)),
            ms(b_stats.1.pct(0.99)),
        ));
    }
    println_out(&format!(
        "keel peak RSS during the via-keel run: {:.1} MB",
        peak_rss as f64 / 1e6
    ));

    for (name, stream) in [("non-streaming", false), ("streaming", true)] {
        let rps = closed_loop(
            &client,
            &via,
            &key,
            &body(None, stream),
            o.concurrency,
            o.duration,
        )
        .await;
        println_out(&format!(
            "max sustained throughput via keel, {name}, {} clients: {rps:.0} req/s",
            o.concurrency
        ));
    }
    let direct_rps = closed_loop(
        &client,
        &direct,
        "",
        &body(None, false),
        o.concurrency,
        o.duration,
    )
    .await;
    println_out(&format!(
        "max throughput of the mock alone, non-streaming, {} clients: {direct_rps:.0} req/s",
        o.concurrency
    ));

    let _ = keel.start_kill();
    let _ = mock.start_kill();
    let _ = keel.wait().await;
    let _ = mock.wait().await;
    Ok(())
}

/// Writes the bench's `keel.toml` in `dir` (routing `default` to the mock) and creates a
/// key; returns the config's path and the key.
async fn bench_config(exe: &Path, dir: &Path, mock_url: &str) -> anyhow::Result<(PathBuf, String)> {
    std::fs::write(
        dir.join("keel.toml"),
        format!(
            "data_dir = {data:?}\n[server]\nlisten = \"127.0.0.1:0\"\n[telemetry]\nlog_level = \"info\"\n\
             [models.default]\n[models.default.retry]\nmax_attempts = 1\n\
             [[models.default.targets]]\nprovider = \"openai\"\nmodel = \"bench\"\nbase_url = \"{mock_url}\"\n\
             input_price_per_mtok = 0.15\noutput_price_per_mtok = 0.6\n",
            data = dir.display().to_string(),
        ),
    )?;
    let config = dir.join("keel.toml");
    let key = create_key(exe, dir, &config, "member").await?;
    Ok((config, key))
}

/// Bench output is the command's result, so it goes to stdout.
pub(crate) fn println_out(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Sends `rate` requests a second for the warm-up and then the measured duration, each
/// on its own task, never waiting for answers (open loop); latency is measured per
/// request from its send to its last byte.
async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
    o: &Options,
) -> Stats {
    let body = Arc::new(serde_json::to_vec(body).unwrap_or_default());
    let interval = Duration::from_secs_f64(1.0 / f64::from(o.rate.max(1)));
    let warm = (o.warmup.as_secs_f64() * f64::from(o.rate)) as usize;
    let total = warm + (o.duration.as_secs_f64() * f64::from(o.rate)) as usize;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + interval * u32::try_from(i).unwrap_or(u32::MAX)).await;
        let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
        let key = key.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let mut req = client
                .post(url)
                .header("content-type", "application/json")
                .body((*body).clone());
            if let Some(key) = key {
                req = req.bearer_auth(key);
            }
            let ok = match req.send().await {
                Ok(res) => res.status().is_success() & res.bytes().await.is_ok(),
                Err(_) => false,
            };
            (i, sent.elapsed(), ok, sent)
        }));
    }
    let mut stats = Stats {
        sent: 0,
        errors: 0,
        latencies: Vec::with_capacity(total),
    };
    // BENCH_TIMELINE=FILE appends each measured request's send time (µs since the
    // scenario began) and latency (µs), to look for periodic stalls.
    let mut timeline = std::env::var_os("BENCH_TIMELINE").and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    let origin = Instant::now() - start.elapsed();
    for task in tasks {
        if let Ok((i, latency, ok, sent)) = task.await {
            if i < warm {
                continue;
            }
            if let Some(file) = timeline.as_mut() {
                use std::io::Write as _;
                let _ = writeln!(
                    file,
                    "{url} {} {}",
                    sent.duration_since(origin).as_micros(),
                    latency.as_micros()
                );
            }
            stats.sent += 1;
            if ok {
                stats.latencies.push(latency);
            } else {
                stats.errors += 1;
            }
        }
    }
    stats.latencies.sort_unstable();
    stats
}

/// `concurrency` clients each sending the next request as soon as the last is answered.
async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    concurrency: usize,
    duration: Duration,
) -> f64 {
    let body = Arc::new(serde_json::to_vec(body).unwrap_or_default());
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, body, done, stop, key) = (
            client.clone(),
            url.to_owned(),
            body.clone(),
            done.clone(),
            stop.clone(),
            key.to_owned(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut req = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body((*body).clone());
                if !key.is_empty() {
                    req = req.bearer_auth(&key);
                }
                if let Ok(res) = req.send().await
                    && res.status().is_success()
                    && res.bytes().await.is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let completed = done.load(Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    completed as f64 / elapsed.as_secs_f64()
}

/// Samples a process's resident set size every 50 ms and keeps the peak.
pub(crate) struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    pub(crate) fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        });
        Self { stop, task }
    }

    pub(crate) async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(0)
    }
}

pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

async fn start_mock(exe: &Path, dir: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args(["mock-llm", "--port", "0"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .context("mock-llm exited")?;
    let url = line.rsplit(' ').next().unwrap_or_default().to_owned();
    if !url.starts_with("http://") {
        bail!("unexpected mock-llm output: {line}");
    }
    Ok((child, url))
}

/// Creates a key in workspace `bench` with the CLI, before the server starts.
pub(crate) async fn create_key(
    exe: &Path,
    dir: &Path,
    config: &PathBuf,
    role: &str,
) -> anyhow::Result<String> {
    let out = Command::new(exe)
        .args([
            "keys",
            "create",
            "--workspace",
            "bench",
            "--role",
            role,
            "--config",
        ])
        .arg(config)
        .current_dir(dir)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Starts `keel serve` and waits for it to listen; returns it, its URL and its pid.
pub(crate) async fn start_keel(
    exe: &Path,
    dir: &Path,
    config: &PathBuf,
) -> anyhow::Result<(Child, String, u32)> {
    let (child, url, pid, _log) = start_keel_logged(exe, dir, config).await?;
    Ok((child, url, pid))
}

/// The warnings and errors in Keel's log, tallied while it is drained.
#[derive(Debug, Default)]
pub(crate) struct LogTally {
    pub(crate) warnings: u64,
    pub(crate) errors: u64,
    /// Count per distinct `message: error` text, for the first few distinct ones.
    pub(crate) kinds: std::collections::BTreeMap<String, u64>,
}

/// Distinct warning and error texts kept by [`LogTally`].
const LOG_KINDS: usize = 8;

impl LogTally {
    fn record(&mut self, line: &str) {
        let error = line.contains("\"level\":\"ERROR\"");
        if !error && !line.contains("\"level\":\"WARN\"") {
            return;
        }
        if error {
            self.errors += 1;
        } else {
            self.warnings += 1;
        }
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        let text = format!(
            "{} {}: {}",
            if error { "ERROR" } else { "WARN" },
            v["message"].as_str().unwrap_or("?"),
            v["error"].as_str().unwrap_or("")
        );
        if let Some(n) = self.kinds.get_mut(&text) {
            *n += 1;
        } else if self.kinds.len() < LOG_KINDS {
            self.kinds.insert(text, 1);
        }
    }
}

/// [`start_keel`], also tallying the warnings and errors Keel logs from then on.
pub(crate) async fn start_keel_logged(
    exe: &Path,
    dir: &Path,
    config: &PathBuf,
) -> anyhow::Result<(Child, String, u32, Arc<std::sync::Mutex<LogTally>>)> {
    start_keel_env(exe, dir, config, SERVE_ENV.get().map_or(&[], Vec::as_slice)).await
}

/// [`start_keel_logged`] with these environment variables.
async fn start_keel_env(
    exe: &Path,
    dir: &Path,
    config: &PathBuf,
    env: &[(String, String)],
) -> anyhow::Result<(Child, String, u32, Arc<std::sync::Mutex<LogTally>>)> {
    let mut child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("keel exited")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await??
            .context("keel exited before listening")?;
        if line.contains("\"message\":\"listening\"") {
            let v: Value = serde_json::from_str(&line)?;
            break v["addr"].as_str().unwrap_or_default().to_owned();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    let tally = Arc::new(std::sync::Mutex::new(LogTally::default()));
    let log = tally.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .record(&line);
        }
    });
    Ok((child, format!("http://{addr}"), pid, tally))
}
