//! The `keel` command: runs the server and administers a Keel installation.
//!
//! It parses flags, builds the config from its layers, and hands off to the library
//! crates; no domain logic lives here.

mod admin_cli;
mod agents_cli;
mod bench;
mod bench_auth;
mod bench_events;
mod bench_runtime;
mod events_cli;
mod sse_client;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_core::auth::{KeyName, Role};
use keel_core::config::{Config, Sources};
use keel_core::id::ApiKeyId;
use keel_core::workspace::WorkspaceName;
use keel_server::{AppState, Parts, Server, telemetry};
use tokio_util::sync::CancellationToken;

/// jemalloc instead of the system allocator (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "keel",
    version,
    about = "Keel: a production runtime for AI agents.",
    long_about = "Keel: a production runtime for AI agents.\n\n\
        Config comes from defaults, then keel.toml (--config, KEEL_CONFIG, or ./keel.toml if present), \
        then KEEL_… environment variables (`__` nests: KEEL_SERVER__LISTEN), then flags.",
    after_help = "Examples:\n  keel serve\n  keel keys create --workspace acme --role admin\n  keel config check --config keel.toml"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Config file (TOML). Default: ./keel.toml when it exists.
    #[arg(long, global = true, env = "KEEL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the embedded SQLite database (keel.db). Default: current directory.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log format: json (machines) or pretty (people).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Json,
    Pretty,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server until SIGTERM or SIGINT.
    #[command(after_help = "Example:\n  keel serve --listen 0.0.0.0:8080 --data-dir /var/lib/keel")]
    Serve {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Apply pending database migrations, then exit.
    #[command(after_help = "Example:\n  KEEL_DATABASE_URL=postgres://keel@db/keel keel migrate")]
    Migrate,
    /// Check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Operator commands: users, workspace limits.
    #[command(subcommand)]
    Admin(admin_cli::AdminCommand),
    /// Verify the hash-chained audit log.
    #[command(subcommand)]
    Audit(admin_cli::AuditCommand),
    /// Check files of events, or follow a running server's event stream.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Run a task of an agent and show it live: tool calls as they happen, the answer.
    #[command(
        after_help = "Example:\n  KEEL_API_KEY=keel_… keel run assistant \"What is on my calendar?\""
    )]
    Run {
        /// The agent's name.
        agent: String,
        /// What to ask.
        input: String,
        /// Continue this thread (`thr_…`).
        #[arg(long)]
        thread: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Chat with an agent: each line is a task on one thread.
    #[command(after_help = "Example:\n  KEEL_API_KEY=keel_… keel chat assistant")]
    Chat {
        /// The agent's name.
        agent: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Manage a running server's agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Run a mock LLM server (OpenAI wire format) with scripted replies and injected faults.
    #[command(
        name = "mock-llm",
        long_about = "Run a mock LLM server speaking the OpenAI Chat Completions wire format.\n\n\
            The upstream model name picks the behaviour: fault/429?retry_after=S, fault/500, fault/503, \
            fault/400, fault/hang, fault/slow?first_token_ms=N, fault/cut?after=N, fault/malformed, \
            fault/close, flaky/STATUS?fail=N; any other name gets the next scripted reply, or an echo \
            of the last user message. GET /_mock/stats counts calls per model.",
        after_help = "Example:\n  keel mock-llm --port 9999 --script replies.json"
    )]
    MockLlm {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 9999)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// JSON script: {"replies": [{"content": "…"}, {"tool_calls": [{"name": "…", "arguments": {…}}]}]}.
        #[arg(long, value_name = "FILE")]
        script: Option<PathBuf>,
        /// Latency added before every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Append every chat request received to FILE, one JSON line each (what was sent).
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
    },
    /// Benchmarks, run against real processes on this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the version and the schema version this binary expects.
    #[command(after_help = "Example:\n  keel version")]
    Version,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Gateway overhead: added latency vs. a zero-latency mock at a constant rate (open
    /// loop), the cache-hit path, peak RSS, and maximum throughput.
    #[command(after_help = "Example:\n  keel bench gateway --rate 2000 --duration 10s")]
    Gateway {
        /// Requests per second for the open-loop scenarios.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Measured time per scenario.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Warm-up before each open-loop scenario.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Concurrent clients for the throughput scenarios.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Rounds the open-loop scenarios take turns in (each runs duration/rounds a turn).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// An environment variable for `keel serve` only, as NAME=VALUE (repeatable).
        #[arg(long = "keel-env", value_parser = bench::env_pair)]
        keel_env: Vec<(String, String)>,
        /// Also run a second `keel serve` with this variable (NAME=VALUE, repeatable), its
        /// scenarios taking turns with the first's: an A/B comparison.
        #[arg(long = "keel-env-b", value_parser = bench::env_pair)]
        keel_env_b: Vec<(String, String)>,
    },
    /// The event log: emit → SSE fan-out latency, write throughput with live followers,
    /// and a reconnect storm, every client checked for exactly-once in-order delivery;
    /// Keel's RSS after each part. Each part runs its own `keel serve` on SQLite.
    #[command(
        after_help = "Examples:\n  keel bench events\n  keel bench events --quick\n  keel bench events --clients 2000 --rate 500 --duration 30s"
    )]
    Events {
        /// Live SSE clients in the fan-out part [default: 1000; 50 with --quick].
        #[arg(long)]
        clients: Option<usize>,
        /// Events a second emitted in the fan-out part [default: 200; 100 with --quick].
        #[arg(long)]
        rate: Option<u32>,
        /// How long the fan-out part emits [default: 10s; 2s with --quick].
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Concurrent writers in the throughput part, and appending the storm's log
        /// [default: 64; 16 with --quick].
        #[arg(long)]
        writers: Option<usize>,
        /// How long the throughput part writes [default: 5s; 2s with --quick].
        #[arg(long, value_parser = humantime::parse_duration)]
        write_duration: Option<Duration>,
        /// SSE clients following the throughput part [default: 10; 4 with --quick].
        #[arg(long)]
        followers: Option<usize>,
        /// Events in the log before the reconnect storm [default: 20000; 2000 with --quick].
        #[arg(long)]
        log_events: Option<u64>,
        /// Clients resuming at once in the reconnect storm [default: 1000; 50 with --quick].
        #[arg(long)]
        reconnect_clients: Option<usize>,
        /// Parts to run, comma-separated: fanout, throughput, storm [default: all].
        #[arg(long, value_delimiter = ',')]
        parts: Option<Vec<String>>,
        /// Smaller defaults for a smoke run; flags given still win.
        #[arg(long)]
        quick: bool,
    },
    /// What admitting a request costs: authentication, access and rate-limit checks in
    /// process, and the Redis-backed limit check over loopback.
    #[command(after_help = "Example:\n  keel bench auth --redis redis://127.0.0.1:6379/15")]
    Auth {
        /// Calls per measurement.
        #[arg(long, default_value_t = 200_000)]
        iterations: usize,
        /// A Redis for the shared limit check [default: KEEL_BENCH_REDIS_URL; skipped
        /// without one].
        #[arg(long, env = "KEEL_BENCH_REDIS_URL")]
        redis: Option<String>,
    },
    /// The agent runtime: checkpointed steps a second on SQLite (1, 8, 64 concurrent runs)
    /// and Postgres, a step's commit next to one fsync, enqueue → start latency, bytes per
    /// step at turn 1 and 500 of a thread, and resumption after kill -9 with 100 runs in
    /// flight. Agents run in a real `keel serve`; the mock LLM answers at zero latency.
    #[command(
        after_help = "Examples:\n  keel bench runtime\n  keel bench runtime --parts sqlite,crash\n  keel bench runtime --postgres postgres://postgres@127.0.0.1:5432/test"
    )]
    Runtime {
        /// Tasks per concurrent run in the throughput parts.
        #[arg(long, default_value_t = 20)]
        tasks_per_worker: usize,
        /// A Postgres server for the postgres part (a fresh database is made and dropped on
        /// it) [default: KEEL_BENCH_POSTGRES_URL; the part is skipped without one].
        #[arg(long, env = "KEEL_BENCH_POSTGRES_URL")]
        postgres: Option<String>,
        /// Parts to run, comma-separated: sqlite, postgres, growth, crash [default: all].
        #[arg(long, value_delimiter = ',')]
        parts: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config; print every error with its key path. Exit 1 on errors.
    #[command(after_help = "Example:\n  keel config check --config keel.toml")]
    Check,
    /// Print the effective config as TOML, secrets redacted.
    #[command(after_help = "Example:\n  KEEL_SERVER__LISTEN=0.0.0.0:80 keel config show")]
    Show,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Check a file of events (one JSON envelope per line; `-` for stdin) against the
    /// published schemas, reporting each bad line. Exits 1 if any line is bad.
    #[command(after_help = "Example:\n  keel events validate exported.jsonl")]
    Validate {
        /// The file.
        file: PathBuf,
    },
    /// Follow a running server's event stream, printing one JSON event per line and
    /// resuming from the last one after a disconnect.
    #[command(
        after_help = "Example:\n  KEEL_API_KEY=keel_… keel events tail --types 'task.*,llm.provider.*'"
    )]
    Tail {
        /// Event types, comma-separated; `task.*` wildcards.
        #[arg(long)]
        types: Option<String>,
        /// Start after this seq (default: the next event).
        #[arg(long)]
        after: Option<i64>,
        /// The server (default: the configured `server.listen`).
        #[arg(long)]
        url: Option<String>,
        /// An API key of the workspace (viewer or above).
        #[arg(long, env = "KEEL_API_KEY", hide_env_values = true)]
        key: String,
    },
}

/// Where the server is and how to authenticate.
#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// The server (default: the configured `server.listen`).
    #[arg(long)]
    url: Option<String>,
    /// An API key of the workspace.
    #[arg(long, env = "KEEL_API_KEY", hide_env_values = true)]
    key: String,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Reload `runtime.agents_dir` into the agents workspace (as SIGHUP does); admin key.
    #[command(after_help = "Example:\n  KEEL_API_KEY=keel_… keel agents reload")]
    Reload {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key (and the workspace, if new). Prints the key once, on stdout.
    #[command(
        after_help = "Example:\n  export KEEL_API_KEY=$(keel keys create --workspace acme --role admin)"
    )]
    Create {
        /// Workspace name (created if it does not exist).
        #[arg(long)]
        workspace: String,
        /// Role: admin, member or viewer.
        #[arg(long, default_value = "member")]
        role: String,
        /// A label for the key.
        #[arg(long)]
        name: Option<String>,
        /// Limit the key to these scopes (comma-separated: read, gateway, tasks:write,
        /// agents:write, admin).
        #[arg(long)]
        scopes: Option<String>,
        /// The key stops working after this long (e.g. 30d, 12h).
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<humantime::Duration>,
        /// The only models the key may call (comma-separated).
        #[arg(long)]
        models: Option<String>,
        /// The key's own rate-limit tier (from [limits.tiers]).
        #[arg(long)]
        tier: Option<String>,
    },
    /// List a workspace's keys (never their secrets).
    #[command(after_help = "Example:\n  keel keys list --workspace acme")]
    List {
        /// Workspace name.
        #[arg(long)]
        workspace: String,
    },
    /// Revoke a key; requests with it get 401 from then on.
    #[command(
        after_help = "Example:\n  keel keys revoke --workspace acme key_0192f0c1d2e37a4b8c9d0e1f2a3b4c5d"
    )]
    Revoke {
        /// Workspace name.
        #[arg(long)]
        workspace: String,
        /// The key's id (key_…).
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (see DEPENDENCIES.md, pitfall 1).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Version => {
            out(&format!(
                "keel {} (schema: sqlite {}, postgres {})",
                env!("CARGO_PKG_VERSION"),
                keel_store::binary_schema_version(keel_store::Backend::Sqlite),
                keel_store::binary_schema_version(keel_store::Backend::Postgres),
            ));
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check) => match load_config(&cli.global, None) {
            Ok(config) => match telemetry::check_filter(&config.telemetry.log_level) {
                Ok(()) => {
                    out("config OK");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    out(&format!("1 config error:\n  telemetry.log_level: {e}"));
                    Ok(ExitCode::FAILURE)
                }
            },
            Err(ConfigLoadError::Invalid(e)) => {
                out(e.to_string().trim_end());
                Ok(ExitCode::FAILURE)
            }
            Err(ConfigLoadError::Other(e)) => Err(e),
        },
        Command::Config(ConfigCommand::Show) => {
            let config = load_config(&cli.global, None)?;
            out(config.to_redacted_toml()?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { listen } => {
            let config = load_config(&cli.global, listen)?;
            serve(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MockLlm {
            port,
            host,
            script,
            latency_ms,
            record,
        } => {
            let script = match script {
                Some(path) => {
                    keel_server::mock_llm::Script::load(&path).map_err(anyhow::Error::msg)?
                }
                None => keel_server::mock_llm::Script::default(),
            };
            let listener = tokio::net::TcpListener::bind((host, port))
                .await
                .with_context(|| format!("cannot listen on {host}:{port}"))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            note(&format!(
                "mock-llm listening on http://{}/v1",
                listener.local_addr()?
            ));
            let options = keel_server::mock_llm::Options {
                script,
                latency: Duration::from_millis(latency_ms),
                record,
            };
            keel_server::mock_llm::serve(listener, options, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Gateway {
            rate,
            duration,
            warmup,
            concurrency,
            rounds,
            keel_env,
            keel_env_b,
        }) => {
            bench::gateway(bench::Options {
                rate,
                duration,
                warmup,
                concurrency,
                rounds,
                keel_env,
                keel_env_b,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Auth { iterations, redis }) => {
            bench_auth::run(bench_auth::Options { iterations, redis }).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Runtime {
            tasks_per_worker,
            postgres,
            parts,
        }) => {
            bench_runtime::run(bench_runtime::Options {
                tasks_per_worker,
                postgres,
                parts: parts.unwrap_or_else(|| {
                    bench_runtime::PARTS
                        .iter()
                        .map(|p| (*p).to_owned())
                        .collect()
                }),
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Events {
            clients,
            rate,
            duration,
            writers,
            write_duration,
            followers,
            log_events,
            reconnect_clients,
            parts,
            quick,
        }) => {
            let d = bench_events::Options::defaults(quick);
            bench_events::run(bench_events::Options {
                clients: clients.unwrap_or(d.clients),
                rate: rate.unwrap_or(d.rate),
                duration: duration.unwrap_or(d.duration),
                writers: writers.unwrap_or(d.writers),
                write_duration: write_duration.unwrap_or(d.write_duration),
                followers: followers.unwrap_or(d.followers),
                log_events: log_events.unwrap_or(d.log_events),
                reconnect_clients: reconnect_clients.unwrap_or(d.reconnect_clients),
                parts: parts.unwrap_or(d.parts),
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let config = load_config(&cli.global, None)?;
            let store = keel_store::open(&config)
                .await
                .context("cannot open the database")?;
            let before = store.schema_state().await?;
            let after = store.migrate().await?;
            store.close().await;
            if before == after {
                out(&format!(
                    "{} schema already at version {}",
                    store.backend(),
                    after.database
                ));
            } else {
                out(&format!(
                    "{} schema migrated from version {} to {}",
                    store.backend(),
                    before.database,
                    after.database
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(command) => {
            let config = load_config(&cli.global, None)?;
            keys(&config, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(command) => {
            let config = load_config(&cli.global, None)?;
            admin_cli::admin(&config, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(command) => {
            let config = load_config(&cli.global, None)?;
            Ok(if admin_cli::audit(&config, command).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Events(EventsCommand::Validate { file }) => {
            events_cli::validate(&file)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events(EventsCommand::Tail {
            types,
            after,
            url,
            key,
        }) => {
            let url = server_url(&cli.global, url)?;
            events_cli::tail(&url, &key, types.as_deref(), after).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            agent,
            input,
            thread,
            server,
        } => {
            let url = server_url(&cli.global, server.url)?;
            let settled =
                agents_cli::run(&url, &server.key, &agent, &input, thread.as_deref()).await?;
            if settled.question.is_some() {
                out(&format!(
                    "answer with POST /v1/tasks/{}/input {{\"action\": \"reply\", \"message\": \"…\"}}, or talk to it with `keel chat`",
                    settled.task_id
                ));
            }
            Ok(
                if matches!(settled.status.as_str(), "completed" | "input-required") {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::Chat { agent, server } => {
            let url = server_url(&cli.global, server.url)?;
            agents_cli::chat(&url, &server.key, &agent).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents(AgentsCommand::Reload { server }) => {
            let url = server_url(&cli.global, server.url)?;
            Ok(if agents_cli::reload(&url, &server.key).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Writes one line to stdout (command output, as opposed to logs).
fn out(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Writes one line to stderr (notes for the person at the terminal).
fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[derive(Debug)]
enum ConfigLoadError {
    Invalid(keel_core::config::Error),
    Other(anyhow::Error),
}

impl std::fmt::Display for ConfigLoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigLoadError::Invalid(e) => write!(f, "{}", e.to_string().trim_end()),
            ConfigLoadError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ConfigLoadError {}

fn load_config(global: &Global, listen: Option<String>) -> Result<Config, ConfigLoadError> {
    let path = match &global.config {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from("keel.toml")).filter(|p| p.is_file()),
    };
    let file = match path {
        Some(path) => Some(read_config_file(&path).map_err(ConfigLoadError::Other)?),
        None => None,
    };
    let mut flags = Vec::new();
    if let Some(dir) = &global.data_dir {
        flags.push(("data_dir", dir.display().to_string(), "--data-dir"));
    }
    if let Some(format) = global.log_format {
        let value = match format {
            LogFormatArg::Json => "json",
            LogFormatArg::Pretty => "pretty",
        };
        flags.push(("telemetry.log_format", value.to_owned(), "--log-format"));
    }
    if let Some(listen) = listen {
        flags.push(("server.listen", listen, "--listen"));
    }
    Config::load(Sources {
        file,
        env: std::env::vars().collect(),
        flags,
    })
    .map_err(ConfigLoadError::Invalid)
}

fn read_config_file(path: &Path) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    Ok((path.display().to_string(), text))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let telemetry = telemetry::init(&config.telemetry)?;
    let result = serve_with_telemetry(config, started).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "keel serve failed");
    }
    telemetry.shutdown(Duration::from_secs(5)).await;
    result
}

async fn serve_with_telemetry(config: Config, started: Instant) -> anyhow::Result<()> {
    let store = keel_store::open(&config)
        .await
        .context("cannot open the database")?;
    let schema = store
        .migrate()
        .await
        .context("cannot migrate the database")?;

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let env = |name: &str| std::env::var(name).ok();
    let (router, default) =
        keel_server::gateway::router(&config, &env).context("cannot build the model routes")?;
    match default {
        keel_server::gateway::Default::EchoMock => tracing::warn!(
            "model `default` is the in-process echo mock, not a language model: configure [models] or set OPENAI_API_KEY"
        ),
        keel_server::gateway::Default::OpenAi => {
            tracing::info!("model `default` routes to OpenAI (OPENAI_API_KEY)")
        }
        keel_server::gateway::Default::Anthropic => {
            tracing::info!("model `default` routes to Anthropic (ANTHROPIC_API_KEY)")
        }
        keel_server::gateway::Default::Configured => {}
    }
    let config = Arc::new(config);
    let (usage, usage_writer) = keel_server::usage::start(store.clone());
    let (events, event_tasks) = keel_server::events::start(store.clone(), &config)
        .await
        .context("cannot start the event log")?;
    let router = Arc::new(router);
    let (runtime, runtime_tasks) =
        keel_server::runtime::start(store.clone(), router.clone(), &events, &config)
            .await
            .context("cannot start the agent runtime")?;
    load_agents(store.as_ref(), &router, &config).await?;
    tokio::spawn(reload_on_sighup(
        store.clone(),
        router.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(keel_server::audit::prune_loop(
        store.clone(),
        config.auth.audit_retention,
        shutdown.clone(),
    ));
    let state = AppState::new(Parts {
        store: store.clone(),
        events,
        runtime,
        config: config.clone(),
        router,
        usage,
        cache: keel_server::gateway::cache(&config).await,
        shutdown: shutdown.clone(),
    });
    let server = Server::bind(state, shutdown)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = server.local_addr()?;
    tracing::info!(
        addr = %addr,
        database = %store.backend(),
        schema_version = schema.database,
        startup_ms = started.elapsed().as_secs_f64() * 1000.0,
        "listening"
    );
    let served = server.run().await.context("server failed");
    // Runs in progress stop here and resume from their last checkpoint after restart.
    runtime_tasks.finish().await;
    // In-flight requests are done; write every usage record still queued.
    usage_writer.finish().await;
    event_tasks.finish().await;
    served?;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// `url`, or the configured `server.listen` as a URL (loopback for an unspecified address).
fn server_url(global: &Global, url: Option<String>) -> anyhow::Result<String> {
    if let Some(url) = url {
        return Ok(url);
    }
    let listen = load_config(global, None)?.server.listen;
    let host = if listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    Ok(format!(
        "http://{}",
        std::net::SocketAddr::new(host, listen.port())
    ))
}

/// Loads `runtime.agents_dir` into `runtime.agents_workspace` (created if needed).
async fn load_agents(
    store: &dyn keel_store::Store,
    router: &keel_llm::Router,
    config: &Config,
) -> anyhow::Result<()> {
    let name = WorkspaceName::parse(&config.runtime.agents_workspace)
        .context("runtime.agents_workspace")?;
    let dir = &config.runtime.agents_dir;
    if !dir.is_dir() {
        return Ok(());
    }
    let workspace = store
        .ensure_workspace(&name)
        .await
        .context("cannot create the agents workspace")?;
    let loaded = keel_server::runtime::load_agents(store, router, workspace.id, &config.runtime)
        .await
        .context("cannot store agent specs")?;
    tracing::info!(
        dir = %dir.display(),
        workspace = %name,
        stored = ?loaded.stored,
        rejected = loaded.rejected.len(),
        "agent specs loaded"
    );
    Ok(())
}

/// Reloads the agent specs on every SIGHUP.
async fn reload_on_sighup(
    store: Arc<dyn keel_store::Store>,
    router: Arc<keel_llm::Router>,
    config: Arc<Config>,
    shutdown: CancellationToken,
) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload agents with `keel agents reload`");
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hup.recv() => {}
        }
        tracing::info!(signal = "SIGHUP", "reloading agent specs");
        if let Err(e) = load_agents(store.as_ref(), &router, &config).await {
            tracing::warn!(error = format!("{e:#}"), "agent reload failed");
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "stop requested"),
        () = terminate => tracing::info!(signal = "SIGTERM", "stop requested"),
    }
    shutdown.cancel();
}

async fn keys(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    if let KeysCommand::Create {
        tier: Some(tier), ..
    } = &command
        && !config.limits.tiers.contains_key(tier)
    {
        bail!(
            "--tier: no tier {tier:?}; known: {}",
            config
                .limits
                .tiers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let store = admin_cli::open(config).await?;
    let result = keys_with(store.as_ref(), command).await;
    store.close().await;
    result
}

async fn keys_with(store: &dyn keel_store::Store, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            workspace,
            role,
            name,
            scopes,
            expires_in,
            models,
            tier,
        } => {
            let workspace = WorkspaceName::parse(&workspace)?;
            let role: Role = role.parse()?;
            let name = name.map(|n| KeyName::parse(&n)).transpose()?;
            let mut limits = keel_server::auth::KeyLimits::default();
            if let Some(scopes) = scopes {
                limits.scopes = keel_core::auth::Scopes::parse(&scopes)?;
            }
            if let Some(d) = expires_in {
                limits.expires_at = Some(
                    time::OffsetDateTime::now_utc() + time::Duration::try_from(Duration::from(d))?,
                );
            }
            limits.models = models.map(|m| {
                m.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect()
            });
            limits.tier = tier;
            let ws = store.ensure_workspace(&workspace).await?;
            let (token, key) =
                keel_server::auth::issue_key(store, ws.id, role, name, limits).await?;
            out(token.expose());
            note(&format!(
                "created {} ({role}) in workspace {} ({}); store the key now: it is not shown again",
                key.id, ws.name, ws.id
            ));
        }
        KeysCommand::List { workspace } => {
            let ws = store
                .workspace_by_name(&WorkspaceName::parse(&workspace)?)
                .await?;
            out("ID\tROLE\tPREFIX\tNAME\tCREATED\tREVOKED");
            for key in store.list_api_keys(ws.id).await? {
                out(&format!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    key.id,
                    key.role,
                    key.prefix,
                    key.name.as_ref().map_or("-", |n| n.as_str()),
                    key.created_at,
                    key.revoked_at
                        .map_or_else(|| "-".to_owned(), |t| t.to_string()),
                ));
            }
        }
        KeysCommand::Revoke { workspace, id } => {
            let ws = store
                .workspace_by_name(&WorkspaceName::parse(&workspace)?)
                .await?;
            let id: ApiKeyId = id.parse()?;
            let key = match store.revoke_api_key(ws.id, id).await {
                Err(keel_store::Error::NotFound { .. }) => {
                    bail!("no key {id} in workspace {}", ws.name)
                }
                other => other?,
            };
            note(&format!("revoked {} in workspace {}", key.id, ws.name));
        }
    }
    Ok(())
}
