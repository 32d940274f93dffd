//! The one typed config tree, and the loader that builds it from its layers:
//! defaults → `keel.toml` → `KEEL_…` environment variables (`__` nests) → CLI flags.
//!
//! The loader is pure: the caller reads the file and the environment and passes their
//! text in. It never stops at the first problem: an unknown key (a typo must not pass
//! silently), a value of the wrong type and a value out of range are all reported
//! together, each with its key path and where the value came from.
//!
//! Every key is documented in docs/configuration.md; a key added here goes there too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

pub use crate::model_route::{Breaker, ModelRoute, ProviderKind, Retry, Strategy, Target};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// Where the embedded SQLite database (`keel.db`) and other local state live.
    pub data_dir: PathBuf,
    /// The HTTP server.
    pub server: Server,
    /// Storage: embedded SQLite by default, Postgres when `database.url` is set.
    pub database: Database,
    /// Logs, traces and metrics.
    pub telemetry: Telemetry,
    /// Public model names and their provider targets (`[models.<name>]`).
    pub models: BTreeMap<String, ModelRoute>,
    /// The gateway's response cache.
    pub cache: Cache,
    /// Redis, shared by instances (response cache today).
    pub redis: Redis,
    /// The event log and its streams.
    pub events: Events,
    /// Webhook delivery.
    pub webhooks: Webhooks,
    /// NATS JetStream export of the event log.
    pub nats: Nats,
    /// The agent runtime: workers, leases, the task queue.
    pub runtime: Runtime,
    /// Logins, sessions, CORS and the audit log.
    pub auth: Auth,
    /// Rate limits: tiers of requests and tokens per minute.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("."),
            server: Server::default(),
            database: Database::default(),
            telemetry: Telemetry::default(),
            models: BTreeMap::new(),
            cache: Cache::default(),
            redis: Redis::default(),
            events: Events::default(),
            webhooks: Webhooks::default(),
            nats: Nats::default(),
            runtime: Runtime::default(),
            auth: Auth::default(),
            limits: Limits::default(),
        }
    }
}

/// `[server]`: the HTTP listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Server {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// How long an authenticated API key is remembered in process (0s: look it up on every
    /// request). A key revoked elsewhere keeps working here for at most this long.
    #[serde(with = "humantime_serde")]
    pub key_cache_ttl: Duration,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Reverse proxies (addresses or CIDR ranges, e.g. `10.0.0.0/8`) whose
    /// `X-Forwarded-For` is believed: a request from one of them is from the last address
    /// in that header that is not itself a trusted proxy. Empty: the peer address, always.
    pub trusted_proxies: Vec<IpNet>,
}

/// An address range: an IP and a prefix length (`10.0.0.0/8`, `::1/128`, or a bare
/// address for one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as its IPv4).
    #[must_use]
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR range like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            key_cache_ttl: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Database {
    /// `postgres://…` to use Postgres; unset for the embedded SQLite in `data_dir`.
    #[serde(serialize_with = "redact_url")]
    pub url: Option<SecretString>,
    /// Most connections the pool opens. Few is faster: each Postgres connection is a
    /// server process that prepares and plans every statement anew, and the pool hands
    /// out its idle connections in turn, so all of them stay busy (docs/BENCHMARKS.md).
    pub max_connections: u32,
    /// How long a query waits for a free (or new) connection before failing.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// SQLite's `synchronous` pragma. `full` (the default) makes every committed write
    /// survive power loss.
    pub sqlite_synchronous: SqliteSynchronous,
    /// How long a SQLite writer waits for the lock before failing.
    #[serde(with = "humantime_serde")]
    pub sqlite_busy_timeout: Duration,
}

impl Default for Database {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(3),
            sqlite_synchronous: SqliteSynchronous::Full,
            sqlite_busy_timeout: Duration::from_secs(5),
        }
    }
}

/// SQLite's durability level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// No fsync: fastest, a crash of the machine can lose committed writes.
    Off,
    /// fsync at checkpoints only: a power loss can lose the latest commits.
    Normal,
    /// fsync at every commit: committed writes survive power loss.
    Full,
    /// As `full`, and the directory too.
    Extra,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Telemetry {
    /// `json` (one object a line, for machines) or `pretty` (for people).
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `keel=debug,sqlx=warn`. `RUST_LOG`, when set,
    /// takes precedence.
    pub log_level: String,
    /// OTLP/HTTP (protobuf) endpoint for traces, e.g. `http://127.0.0.1:4318/v1/traces`.
    /// Unset: no export.
    pub otlp_endpoint: Option<String>,
    /// Longest time one OTLP export may take.
    #[serde(with = "humantime_serde")]
    pub otlp_timeout: Duration,
    /// `service.name` on exported traces.
    pub service_name: String,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".to_owned(),
            otlp_endpoint: None,
            otlp_timeout: Duration::from_secs(5),
            service_name: "keel".to_owned(),
        }
    }
}

/// `[cache]`: exact-match response cache for deterministic requests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Cache {
    /// Whether the cache is used at all.
    pub enabled: bool,
    /// How long an answer stays cached.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Memory budget of the in-process cache, in bytes (ignored with Redis).
    pub max_bytes: usize,
    /// Largest single answer cached, in bytes.
    pub max_entry_bytes: usize,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_secs(600),
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
        }
    }
}

/// `[events]`: the event log, its retention and its live streams.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Events {
    /// How long events are kept; older ones are pruned in the background, and asking for
    /// them answers 410.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the pruner runs.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// How many events a live stream may fall behind before it is closed with
    /// `consumer_too_slow` (the client then resumes from its last id).
    pub stream_buffer: usize,
    /// Interval of the keep-alive comment on idle streams.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// Most live stream clients (SSE and WebSocket) at once; past it, 503.
    pub max_stream_clients: usize,
    /// Memory for pages of history shared by followers catching up (rendered once, read
    /// from the store once); 0 turns the cache off.
    pub history_cache_bytes: usize,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            stream_buffer: 4096,
            keepalive: Duration::from_secs(15),
            max_stream_clients: 10_000,
            history_cache_bytes: 32 * 1024 * 1024,
        }
    }
}

/// `[webhooks]`: how events are delivered to subscribers' URLs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Webhooks {
    /// Whether webhook URLs may point at loopback, private, link-local or other internal
    /// addresses. Off in production: such URLs are refused when created and when
    /// delivered to (the address is checked after DNS resolution, every time).
    pub allow_private: bool,
    /// Attempts per event before it is dead-lettered for that webhook.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each attempt (with jitter).
    #[serde(with = "humantime_serde")]
    pub retry_base_delay: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Time limit of one delivery request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Webhooks {
    fn default() -> Self {
        Self {
            allow_private: false,
            max_attempts: 8,
            retry_base_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

/// `[nats]`: export of every workspace's events to a NATS JetStream stream, on subjects
/// `<subject_prefix>.<workspace id>.<event type>`, with `Nats-Msg-Id` = event id.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Nats {
    /// `nats://host:port`; unset: no export. Env: `KEEL_NATS_URL`.
    #[serde(serialize_with = "redact_url")]
    pub url: Option<SecretString>,
    /// The JetStream stream, created if missing (subjects `<subject_prefix>.>`).
    pub stream: String,
    /// First subject token.
    pub subject_prefix: String,
    /// Most events in flight (published, not yet acknowledged) at once.
    pub batch: usize,
}

impl Default for Nats {
    fn default() -> Self {
        Self {
            url: None,
            stream: "KEEL_EVENTS".to_owned(),
            subject_prefix: "keel".to_owned(),
            batch: 256,
        }
    }
}

/// `[runtime]`: the agent runtime — where agent specs are loaded from, how many runs a
/// process works on at once, and how the durable task queue behaves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Runtime {
    /// Whether this process runs agents (workers). Off: it serves the API only.
    pub enabled: bool,
    /// Directory of `*.toml` agent specs loaded at start and on SIGHUP / `keel agents
    /// reload` (relative to the working directory); missing is fine.
    pub agents_dir: PathBuf,
    /// The workspace agents from `agents_dir` belong to.
    pub agents_workspace: String,
    /// Runs this process works on at once.
    pub workers: usize,
    /// How long a worker's hold on a task lasts without a heartbeat; after a crash, the
    /// task resumes elsewhere once it expires.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often an idle worker looks for tasks whose retry time has come (new tasks wake
    /// it at once).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most tasks waiting in the queue; past it, POST /v1/tasks answers 503 and creates
    /// nothing.
    pub max_queued: i64,
    /// How long `mode = "wait"` waits before answering 202 with the task.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Deepest chain of agents delegating to agents.
    pub max_depth: i64,
    /// Most checkpoints committed in one transaction.
    pub max_batch: usize,
    /// Environment variables agent specs may read with `${VAR}` (tool headers, MCP `env`
    /// and `headers`): names, or prefixes ending in `*`. None by default: a workspace
    /// admin who writes a spec must not be able to read Keel's own secrets.
    pub tool_env: Vec<String>,
    /// Programs a stdio MCP server may be started with (`command[0]`, as written). None by
    /// default: starting a program on this host is the operator's decision.
    pub mcp_commands: Vec<String>,
}

impl Runtime {
    /// Whether specs may read environment variable `name`.
    #[must_use]
    pub fn tool_env_allows(&self, name: &str) -> bool {
        self.tool_env.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            enabled: true,
            agents_dir: PathBuf::from("agents"),
            agents_workspace: "default".to_owned(),
            workers: 64,
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_millis(500),
            max_queued: 10_000,
            wait_timeout: Duration::from_secs(60),
            max_depth: 3,
            max_batch: 256,
            tool_env: Vec::new(),
            mcp_commands: Vec::new(),
        }
    }
}

/// `[auth]`: login sessions, browser access and the audit log.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Auth {
    /// The secret access tokens (JWT, HS256) are signed with: at least 32 characters.
    /// Unset: a random one per process, so sessions end at restart and do not cross
    /// instances. Env: `KEEL_JWT_SECRET`.
    #[serde(serialize_with = "redact_secret")]
    pub jwt_secret: Option<SecretString>,
    /// Secrets that signed earlier tokens, still accepted (not used to sign) while those
    /// tokens live out: rotation without logging everyone out.
    #[serde(serialize_with = "redact_secrets")]
    pub jwt_previous_secrets: Vec<SecretString>,
    /// The `iss` and `aud` of access tokens; a token for another audience is refused.
    pub jwt_audience: String,
    /// How long an access token lives.
    #[serde(with = "humantime_serde")]
    pub access_ttl: Duration,
    /// How long a session lives, however often it is refreshed.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Failed logins allowed per account per `login_window` before further attempts get
    /// 429 until the window allows one more.
    pub login_failures: u32,
    /// Login attempts allowed per client address per `login_window`.
    pub login_attempts_per_ip: u32,
    /// The window login throttling counts over.
    #[serde(with = "humantime_serde")]
    pub login_window: Duration,
    /// Origins browsers may call the API from (e.g. `https://app.example.com`); empty:
    /// no cross-origin access.
    pub cors_origins: Vec<String>,
    /// How long a request may take to produce its response head; 408 past it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long audit entries are kept.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
    /// The workspace whose admins operate this Keel: they may change other workspaces'
    /// limits (`/v1/admin/…`) and reload agent files (`/v1/agents/reload`). By default
    /// the `default` workspace, where agents from `runtime.agents_dir` live too.
    pub operator_workspace: String,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_previous_secrets: Vec::new(),
            jwt_audience: "keel".to_owned(),
            access_ttl: Duration::from_secs(15 * 60),
            session_ttl: Duration::from_secs(30 * 24 * 3600),
            login_failures: 5,
            login_attempts_per_ip: 30,
            login_window: Duration::from_secs(15 * 60),
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(120),
            audit_retention: Duration::from_secs(365 * 24 * 3600),
            operator_workspace: "default".to_owned(),
        }
    }
}

fn redact_secret<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(_) => s.serialize_str("[redacted]"),
    }
}

fn redact_secrets<S: Serializer>(v: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for _ in v {
        seq.serialize_element("[redacted]")?;
    }
    seq.end()
}

/// `[limits]`: rate limits. A workspace is on `default_tier` unless an admin assigns
/// another (PUT /v1/workspaces/current/limits); each tier limits the workspace as a whole
/// and each credential (API key or user) in it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Limits {
    /// The tier of workspaces not assigned one.
    pub default_tier: String,
    /// Tiers by name. Built in: `unlimited`, `free`, `pro`, `enterprise`.
    pub tiers: BTreeMap<String, Tier>,
    /// Requests per minute per client address on routes without credentials (login,
    /// refresh).
    pub ip_rpm: u32,
}

impl Default for Limits {
    fn default() -> Self {
        let tier = |rpm, tpm, key_rpm, key_tpm| Tier {
            rpm: Some(rpm),
            tpm: Some(tpm),
            key_rpm: Some(key_rpm),
            key_tpm: Some(key_tpm),
        };
        Self {
            default_tier: "unlimited".to_owned(),
            tiers: BTreeMap::from([
                ("unlimited".to_owned(), Tier::default()),
                ("free".to_owned(), tier(60, 40_000, 60, 40_000)),
                ("pro".to_owned(), tier(1_000, 1_000_000, 500, 500_000)),
                (
                    "enterprise".to_owned(),
                    tier(10_000, 10_000_000, 5_000, 5_000_000),
                ),
            ]),
            ip_rpm: 120,
        }
    }
}

/// One rate-limit tier; an unset limit is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tier {
    /// Requests per minute for the whole workspace.
    pub rpm: Option<u32>,
    /// LLM tokens per minute for the whole workspace.
    pub tpm: Option<u32>,
    /// Requests per minute per API key or user.
    pub key_rpm: Option<u32>,
    /// LLM tokens per minute per API key or user.
    pub key_tpm: Option<u32>,
}

/// `[redis]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Redis {
    /// `redis://host:port/db`; unset: everything stays in-process. Env: `KEEL_REDIS_URL`.
    #[serde(serialize_with = "redact_url")]
    pub url: Option<SecretString>,
    /// For `rediss://`: a PEM file of the certificate authorities to trust instead of the
    /// system's (a private CA). Env: `KEEL_REDIS_CA_FILE`.
    pub ca_file: Option<PathBuf>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line.
    Json,
    /// Human-readable, coloured when on a terminal.
    Pretty,
}

/// Shows a database URL with its password replaced, or `[redacted]` when it has an
/// unexpected form: a config dump must never carry a secret.
fn redact_url<S: Serializer>(url: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        None => s.serialize_none(),
        Some(url) => s.serialize_str(&redacted_url(url.expose_secret())),
    }
}

/// `scheme://user:secret@host/db` → `scheme://user:[redacted]@host/db`.
#[must_use]
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "[redacted]".to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let secret = if userinfo.contains(':') {
                ":[redacted]"
            } else {
                ""
            };
            // Query strings may carry passwords too (`?password=`): drop them from display.
            let tail = tail.split_once('?').map_or(tail, |(path, _)| path);
            format!("{scheme}://{user}{secret}@{host}{tail}")
        }
        None => {
            let tail = tail.split_once('?').map_or(tail, |(path, _)| path);
            format!("{scheme}://{authority}{tail}")
        }
    }
}

/// One problem found while loading the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted key path, e.g. `server.listen`; empty for the file as a whole.
    pub key: String,
    /// Where the value came from: the file's name, `env KEEL_…`, `flag --…`.
    pub origin: Option<String>,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.is_empty() {
            "(file)"
        } else {
            &self.key
        };
        match &self.origin {
            Some(origin) => write!(f, "{key} (from {origin}): {}", self.message),
            None => write!(f, "{key}: {}", self.message),
        }
    }
}

/// Every problem found in the config; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error(pub Vec<Issue>);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} config error{}:", if n == 1 { "" } else { "s" })?;
        for issue in &self.0 {
            writeln!(f, "  {issue}")?;
        }
        Ok(())
    }
}

/// The layers to build a [`Config`] from, lowest precedence first.
#[derive(Debug, Default)]
pub struct Sources {
    /// The config file: its name (for messages) and its text.
    pub file: Option<(String, String)>,
    /// The process environment; only `KEEL_…` variables are read.
    pub env: Vec<(String, String)>,
    /// CLI flags: (dotted key path, value, flag name).
    pub flags: Vec<(&'static str, String, &'static str)>,
}

/// Environment variables that start with `KEEL_` but are not config keys.
const NOT_CONFIG_ENV: &[&str] = &["KEEL_CONFIG", "KEEL_PASSWORD"];
/// Prefixes of environment variables reserved for tooling (e.g. the test suite).
const NOT_CONFIG_ENV_PREFIXES: &[&str] = &["KEEL_TEST_"];
/// Well-known short names, kept because they are what operators expect to type.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("KEEL_DATABASE_URL", "database.url"),
    ("KEEL_REDIS_URL", "redis.url"),
    ("KEEL_REDIS_CA_FILE", "redis.ca_file"),
    ("KEEL_NATS_URL", "nats.url"),
    ("KEEL_JWT_SECRET", "auth.jwt_secret"),
];

/// The most type errors collected before giving up (each pass removes one bad value).
const MAX_PASSES: usize = 64;

impl Config {
    /// Builds the config from its layers, or returns every problem found.
    pub fn load(sources: Sources) -> Result<Self, Error> {
        let mut issues = Vec::new();
        let mut origins: BTreeMap<String, String> = BTreeMap::new();
        let file_origin = sources.file.as_ref().map(|(name, _)| name.clone());

        let mut table = match &sources.file {
            Some((name, text)) => match toml::from_str::<toml::Table>(text) {
                Ok(table) => table,
                Err(e) => {
                    return Err(Error(vec![Issue {
                        key: String::new(),
                        origin: Some(name.clone()),
                        message: format!("not valid TOML: {}", e.to_string().trim_end()),
                    }]));
                }
            },
            None => toml::Table::new(),
        };

        for (name, raw) in &sources.env {
            let Some(path) = env_key_path(name) else {
                continue;
            };
            let origin = format!("env {name}");
            match path {
                Ok(path) => {
                    if let Err(message) = insert(&mut table, &path, env_value(raw)) {
                        issues.push(Issue {
                            key: path.join("."),
                            origin: Some(origin),
                            message,
                        });
                    } else {
                        origins.insert(path.join("."), origin);
                    }
                }
                Err(message) => issues.push(Issue {
                    key: String::new(),
                    origin: Some(origin),
                    message,
                }),
            }
        }

        for (key, value, flag) in &sources.flags {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            let origin = format!("flag {flag}");
            if let Err(message) = insert(&mut table, &path, toml::Value::String(value.clone())) {
                issues.push(Issue {
                    key: (*key).to_owned(),
                    origin: Some(origin),
                    message,
                });
            } else {
                origins.insert((*key).to_owned(), origin);
            }
        }

        let origin_of = |key: &str| origins.get(key).cloned().or_else(|| file_origin.clone());

        let mut unknown = BTreeSet::new();
        let mut config = None;
        for _ in 0..MAX_PASSES {
            let mut track = serde_path_to_error::Track::new();
            let de = serde_path_to_error::Deserializer::new(
                toml::Value::Table(table.clone()),
                &mut track,
            );
            let result: Result<Config, _> = serde_ignored::deserialize(de, |path| {
                unknown.insert(path.to_string());
            });
            match result {
                Ok(c) => {
                    config = Some(c);
                    break;
                }
                Err(e) => {
                    let path = track.path();
                    let key = path.to_string();
                    issues.push(Issue {
                        origin: origin_of(&key),
                        key,
                        message: clean_serde_message(&e.to_string()),
                    });
                    if !remove(&mut table, &path) {
                        break;
                    }
                }
            }
        }
        for key in unknown {
            let message = match known_keys_near(&key) {
                Some(hint) => format!("unknown key; did you mean `{hint}`?"),
                None => "unknown key".to_owned(),
            };
            issues.push(Issue {
                origin: origin_of(&key),
                key,
                message,
            });
        }

        if let Some(config) = &config {
            for (key, message) in config.validate() {
                issues.push(Issue {
                    origin: origin_of(&key),
                    key,
                    message,
                });
            }
        }
        match config {
            Some(config) if issues.is_empty() => Ok(config),
            _ => Err(Error(issues)),
        }
    }

    /// Checks the rules types alone do not express; each failure is (key, message).
    fn validate(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (name, route) in &self.models {
            if !crate::model_route::valid_route_name(name) {
                out.push((
                    format!("models.{name}"),
                    "model names are 1-128 characters of letters, digits and -_.:/".to_owned(),
                ));
            }
            for (key, message) in route.validate() {
                out.push((format!("models.{name}.{key}"), message));
            }
        }
        let mut push = |key: &'static str, message: String| out.push((key.to_owned(), message));
        if self.events.retention.is_zero() {
            push("events.retention", "must be longer than 0s".to_owned());
        }
        if self.events.prune_interval.is_zero() {
            push("events.prune_interval", "must be longer than 0s".to_owned());
        }
        if self.events.keepalive.is_zero() {
            push("events.keepalive", "must be longer than 0s".to_owned());
        }
        if !(16..=1_048_576).contains(&self.events.stream_buffer) {
            push(
                "events.stream_buffer",
                "must be between 16 and 1048576".to_owned(),
            );
        }
        if self.events.max_stream_clients == 0 {
            push("events.max_stream_clients", "must be at least 1".to_owned());
        }
        if !(1..=100).contains(&self.webhooks.max_attempts) {
            push(
                "webhooks.max_attempts",
                "must be between 1 and 100".to_owned(),
            );
        }
        if self.webhooks.timeout.is_zero() {
            push("webhooks.timeout", "must be longer than 0s".to_owned());
        }
        if self.webhooks.retry_max_delay < self.webhooks.retry_base_delay {
            push(
                "webhooks.retry_max_delay",
                "must be at least webhooks.retry_base_delay".to_owned(),
            );
        }
        if !(1..=10_000).contains(&self.runtime.workers) {
            push("runtime.workers", "must be between 1 and 10000".to_owned());
        }
        if self.runtime.lease < Duration::from_secs(1) {
            push("runtime.lease", "must be at least 1s".to_owned());
        }
        if self.runtime.poll_interval.is_zero() {
            push("runtime.poll_interval", "must be longer than 0s".to_owned());
        }
        if self.runtime.max_queued < 1 {
            push("runtime.max_queued", "must be at least 1".to_owned());
        }
        if !(0..=16).contains(&self.runtime.max_depth) {
            push("runtime.max_depth", "must be between 0 and 16".to_owned());
        }
        if !(1..=10_000).contains(&self.runtime.max_batch) {
            push(
                "runtime.max_batch",
                "must be between 1 and 10000".to_owned(),
            );
        }
        if let Some(url) = &self.nats.url {
            let url = url.expose_secret();
            if !(url.starts_with("nats://") || url.starts_with("tls://")) {
                push("nats.url", "must start with nats:// or tls://".to_owned());
            }
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !token_ok(&self.nats.stream) {
            push("nats.stream", "must be letters, digits, - and _".to_owned());
        }
        if !token_ok(&self.nats.subject_prefix) {
            push(
                "nats.subject_prefix",
                "must be one subject token: letters, digits, - and _".to_owned(),
            );
        }
        if !(1..=10_000).contains(&self.nats.batch) {
            push("nats.batch", "must be between 1 and 10000".to_owned());
        }
        if self.server.max_body_bytes == 0 {
            push("server.max_body_bytes", "must be at least 1".to_owned());
        }
        if !(1..=10_000).contains(&self.database.max_connections) {
            push(
                "database.max_connections",
                "must be between 1 and 10000".to_owned(),
            );
        }
        if self.database.acquire_timeout.is_zero() {
            push(
                "database.acquire_timeout",
                "must be longer than 0s".to_owned(),
            );
        }
        if let Some(url) = &self.database.url {
            let url = url.expose_secret();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                push(
                    "database.url",
                    "must start with postgres:// or postgresql://; for the embedded SQLite leave it unset and set data_dir".to_owned(),
                );
            }
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            push(
                "telemetry.otlp_endpoint",
                format!("must be an http:// or https:// URL, got {endpoint:?}"),
            );
        }
        if let Some(url) = &self.redis.url {
            let url = url.expose_secret();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                push(
                    "redis.url",
                    "must start with redis:// or rediss://".to_owned(),
                );
            }
        }
        if let Some(ca) = &self.redis.ca_file {
            if !self
                .redis
                .url
                .as_ref()
                .is_some_and(|u| u.expose_secret().starts_with("rediss://"))
            {
                push(
                    "redis.ca_file",
                    "is for TLS: set redis.url to a rediss:// URL, or leave ca_file out".to_owned(),
                );
            } else if !ca.is_file() {
                push(
                    "redis.ca_file",
                    format!("{} is not a readable file", ca.display()),
                );
            }
        }
        if let Some(secret) = &self.auth.jwt_secret
            && secret.expose_secret().len() < 32
        {
            push(
                "auth.jwt_secret",
                "must be at least 32 characters (e.g. `openssl rand -base64 48`)".to_owned(),
            );
        }
        if self
            .auth
            .jwt_previous_secrets
            .iter()
            .any(|s| s.expose_secret().len() < 32)
        {
            push(
                "auth.jwt_previous_secrets",
                "each must be at least 32 characters".to_owned(),
            );
        }
        if self.auth.access_ttl < Duration::from_secs(1) {
            push("auth.access_ttl", "must be at least 1s".to_owned());
        }
        if self.auth.session_ttl < self.auth.access_ttl {
            push(
                "auth.session_ttl",
                "must be at least auth.access_ttl".to_owned(),
            );
        }
        if self.auth.login_failures == 0 || self.auth.login_attempts_per_ip == 0 {
            push(
                "auth.login_failures",
                "login_failures and login_attempts_per_ip must be at least 1".to_owned(),
            );
        }
        if self.auth.login_window.is_zero() {
            push("auth.login_window", "must be longer than 0s".to_owned());
        }
        for origin in &self.auth.cors_origins {
            let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.trim_end_matches('/').contains(['*', ' '])
                && origin.matches('/').count() == 2;
            if !ok {
                out.push((
                    "auth.cors_origins".to_owned(),
                    format!(
                        "{origin:?} is not an origin: give scheme://host[:port], no path or wildcard"
                    ),
                ));
            }
        }
        let mut push = |key: &'static str, message: String| out.push((key.to_owned(), message));
        if self.auth.request_timeout < Duration::from_secs(1) {
            push("auth.request_timeout", "must be at least 1s".to_owned());
        }
        if !self.limits.tiers.contains_key(&self.limits.default_tier) {
            push(
                "limits.default_tier",
                format!(
                    "no tier {:?}; known: {}",
                    self.limits.default_tier,
                    self.limits
                        .tiers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if self.limits.ip_rpm == 0 {
            push("limits.ip_rpm", "must be at least 1".to_owned());
        }
        for (name, tier) in &self.limits.tiers {
            if [tier.rpm, tier.tpm, tier.key_rpm, tier.key_tpm].contains(&Some(0)) {
                out.push((
                    format!("limits.tiers.{name}"),
                    "a limit must be at least 1; leave it out for no limit".to_owned(),
                ));
            }
        }
        let mut push = |key: &'static str, message: String| out.push((key.to_owned(), message));
        if self.cache.max_entry_bytes > self.cache.max_bytes {
            push(
                "cache.max_entry_bytes",
                "must not exceed cache.max_bytes".to_owned(),
            );
        }
        if self.telemetry.service_name.trim().is_empty() {
            push("telemetry.service_name", "must not be empty".to_owned());
        }
        if self.telemetry.log_level.trim().is_empty() {
            push(
                "telemetry.log_level",
                "must not be empty; e.g. \"info\"".to_owned(),
            );
        }
        out
    }

    /// The effective config as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }

    /// The SQLite database file this config points at.
    #[must_use]
    pub fn sqlite_path(&self) -> PathBuf {
        self.data_dir.join("keel.db")
    }
}

/// Maps `KEEL_SERVER__LISTEN` to `["server", "listen"]`; `None` for variables that are
/// not config keys.
fn env_key_path(name: &str) -> Option<Result<Vec<String>, String>> {
    let rest = name.strip_prefix("KEEL_")?;
    if NOT_CONFIG_ENV.contains(&name) || NOT_CONFIG_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
    {
        return None;
    }
    if let Some((_, key)) = ENV_ALIASES.iter().find(|(alias, _)| *alias == name) {
        return Some(Ok(key.split('.').map(str::to_owned).collect()));
    }
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if path.iter().any(String::is_empty) {
        return Some(Err(format!(
            "{name} is not a config key: use `__` between sections, e.g. KEEL_SERVER__LISTEN"
        )));
    }
    Some(Ok(path))
}

/// An environment value is read as a TOML scalar or array when it is one (`8`, `true`,
/// `["a"]`, `"quoted"`), else taken as a plain string (`127.0.0.1:8080`, `30s`).
fn env_value(raw: &str) -> toml::Value {
    if !raw.contains('\n')
        && let Ok(mut t) = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        && t.len() == 1
        && let Some(
            v @ (toml::Value::Integer(_)
            | toml::Value::Float(_)
            | toml::Value::Boolean(_)
            | toml::Value::String(_)
            | toml::Value::Array(_)),
        ) = t.remove("v")
    {
        return v;
    }
    toml::Value::String(raw.to_owned())
}

fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".to_owned());
    };
    let mut current = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(format!(
                    "`{}` is a value, not a section",
                    path[..=i].join(".")
                ));
            }
        };
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// Removes the value at `path` so the next pass can use its default; false if nothing
/// could be removed (the error is at the root).
fn remove(table: &mut toml::Table, path: &serde_path_to_error::Path) -> bool {
    let keys: Vec<String> = path
        .iter()
        .map_while(|seg| match seg {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
        .collect();
    let Some((last, parents)) = keys.split_last() else {
        return false;
    };
    let mut current = table;
    for part in parents {
        match current.get_mut(part) {
            Some(toml::Value::Table(t)) => current = t,
            _ => return false,
        }
    }
    current.remove(last).is_some()
}

/// serde's messages name Rust types; say what the config file needs instead.
fn clean_serde_message(message: &str) -> String {
    // The TOML deserializer appends "in `key`" lines; the key is already shown.
    let message = message.lines().next().unwrap_or(message).trim_end();
    message
        .replace(
            "invalid type: string",
            "expected another type, got a string",
        )
        .replace(", expected struct ", ", expected a section ")
}

/// Every valid dotted key, for "did you mean" hints.
fn known_keys() -> Vec<String> {
    let value = match toml::Value::try_from(Config::default()) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    collect_keys(&value, String::new(), &mut out);
    // Optional keys are absent from the default; list them by hand.
    out.extend(
        [
            "database.url",
            "telemetry.otlp_endpoint",
            "redis.url",
            "auth.jwt_secret",
            "auth.jwt_previous_secrets",
        ]
        .map(str::to_owned),
    );
    out
}

fn collect_keys(value: &toml::Value, prefix: String, out: &mut Vec<String>) {
    if let toml::Value::Table(t) = value {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                collect_keys(v, key, out);
            } else {
                out.push(key);
            }
        }
    }
}

fn known_keys_near(unknown: &str) -> Option<String> {
    known_keys()
        .into_iter()
        .map(|k| (edit_distance(&k, unknown), k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Config, Error> {
        Config::load(Sources {
            file: Some(("keel.toml".to_owned(), file.to_owned())),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            flags: Vec::new(),
        })
    }

    #[test]
    fn defaults_load_from_nothing() {
        let c = Config::load(Sources::default()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 1 << 20);
        assert_eq!(c.database.sqlite_synchronous, SqliteSynchronous::Full);
        assert_eq!(c.sqlite_path(), PathBuf::from("./keel.db"));
        assert!(c.database.url.is_none());
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let c = Config::load(Sources {
            file: Some((
                "keel.toml".into(),
                "data_dir = \"/file\"\n[server]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 10\n"
                    .into(),
            )),
            env: vec![
                ("KEEL_SERVER__LISTEN".into(), "127.0.0.1:2".into()),
                ("KEEL_SERVER__DRAIN_TIMEOUT".into(), "250ms".into()),
                ("KEEL_DATABASE__MAX_CONNECTIONS".into(), "4".into()),
                ("PATH".into(), "/bin".into()),
            ],
            flags: vec![("server.listen", "127.0.0.1:3".into(), "--listen")],
        })
        .unwrap();
        assert_eq!(c.server.listen.port(), 3, "flag beats env beats file");
        assert_eq!(c.server.max_body_bytes, 10, "file beats default");
        assert_eq!(c.server.drain_timeout, Duration::from_millis(250));
        assert_eq!(c.database.max_connections, 4);
        assert_eq!(c.data_dir, PathBuf::from("/file"));
    }

    #[test]
    fn database_url_alias_and_redaction() {
        let c = load(
            "",
            &[(
                "KEEL_DATABASE_URL",
                "postgres://app:hunter2@db:5432/keel?password=x",
            )],
        )
        .unwrap();
        let shown = c.to_redacted_toml().unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("password=x"), "{shown}");
        assert!(
            shown.contains("postgres://app:[redacted]@db:5432/keel"),
            "{shown}"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn every_error_is_reported_with_its_key_and_origin() {
        let err = load(
            "data_dir = 5\n[server]\nlisten = \"nope\"\nlistn = 1\n[database]\nmax_connections = 0\n[telemetry]\nlog_format = \"xml\"\n",
            &[("KEEL_SERVER__MAX_BODY_BYTES", "lots"), ("KEEL_BOGUS", "1"), ("KEEL_TEST_POSTGRES", "skip")],
        )
        .unwrap_err();
        let text = err.to_string();
        let keys: Vec<&str> = err.0.iter().map(|i| i.key.as_str()).collect();
        for key in [
            "data_dir",
            "server.listen",
            "server.listn",
            "server.max_body_bytes",
            "telemetry.log_format",
            "bogus",
        ] {
            assert!(keys.contains(&key), "missing {key} in:\n{text}");
        }
        assert!(
            text.contains(
                "server.listn (from keel.toml): unknown key; did you mean `server.listen`?"
            ),
            "{text}"
        );
        assert!(
            text.contains("server.max_body_bytes (from env KEEL_SERVER__MAX_BODY_BYTES)"),
            "{text}"
        );
        assert!(
            !keys.contains(&"test_postgres"),
            "KEEL_TEST_* is not config: {text}"
        );
        // max_connections = 0 is only checked once types are right; the pass that removed the
        // bad values still validates what remains.
        assert!(keys.contains(&"database.max_connections"), "{text}");
    }

    #[test]
    fn syntax_errors_name_the_file_and_position() {
        let err = load("[server\nlisten = 1", &[]).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.to_string().contains("keel.toml"), "{err}");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn non_postgres_url_is_rejected_with_a_hint() {
        let err = load("[database]\nurl = \"mysql://x\"\n", &[]).unwrap_err();
        assert!(
            err.to_string().contains("leave it unset and set data_dir"),
            "{err}"
        );
    }

    #[test]
    fn env_values_are_typed_when_they_look_typed() {
        assert_eq!(env_value("8"), toml::Value::Integer(8));
        assert_eq!(env_value("true"), toml::Value::Boolean(true));
        assert_eq!(env_value("\"8\""), toml::Value::String("8".into()));
        assert_eq!(
            env_value("127.0.0.1:80"),
            toml::Value::String("127.0.0.1:80".into())
        );
        assert_eq!(
            env_value("1\nx = 2"),
            toml::Value::String("1\nx = 2".into())
        );
    }

    #[test]
    fn malformed_env_names_are_reported() {
        let err = load("", &[("KEEL_SERVER____LISTEN", "x")]).unwrap_err();
        assert!(
            err.to_string().contains("use `__` between sections"),
            "{err}"
        );
    }

    #[test]
    fn url_redaction_handles_odd_shapes() {
        assert_eq!(redacted_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redacted_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redacted_url("garbage"), "[redacted]");
        assert_eq!(
            redacted_url("postgres://u:p@h"),
            "postgres://u:[redacted]@h"
        );
    }
}
