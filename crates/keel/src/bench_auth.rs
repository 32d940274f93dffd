//! `keel bench auth`: what admitting a request costs — authentication (API key from the
//! key cache, or a session's JWT), the route's access check and the rate-limit check —
//! measured in process, call by call; and the Redis-backed rate-limit check on its own,
//! over loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderValue, header};
use keel_core::auth::{Access, Role, Scope};
use keel_core::config::Tier;
use keel_core::id::SessionId;
use keel_core::workspace::WorkspaceName;
use tokio_util::sync::CancellationToken;

use crate::bench::percentile;
use crate::out;

/// What to measure.
#[derive(Debug)]
pub(crate) struct Options {
    /// Calls per in-process measurement.
    pub iterations: usize,
    /// A Redis for the shared check; skipped without one.
    pub redis: Option<String>,
}

struct Figures {
    p50: Duration,
    p99: Duration,
}

fn figures(mut v: Vec<Duration>) -> Figures {
    v.sort_unstable();
    Figures {
        p50: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub(crate) async fn run(o: Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("keel-bench-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = measure(&o, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(o: &Options, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut config = keel_core::config::Config {
        data_dir: dir.to_owned(),
        ..Default::default()
    };
    // Limits so high every check passes: the same code path as a real limit, never a 429.
    let huge = Some(u32::MAX);
    config.limits.tiers.insert(
        "bench".into(),
        Tier {
            rpm: huge,
            tpm: huge,
            key_rpm: huge,
            key_tpm: huge,
        },
    );
    config.limits.default_tier = "bench".into();
    config.auth.jwt_secret = Some(
        "bench-secret-long-enough-for-hs256-signing"
            .to_owned()
            .into(),
    );
    let store = keel_store::open(&config).await?;
    store.migrate().await?;
    let ws = store
        .ensure_workspace(&WorkspaceName::parse("bench")?)
        .await?;
    let (token, _) = keel_server::auth::issue_key(
        store.as_ref(),
        ws.id,
        Role::Member,
        None,
        Default::default(),
    )
    .await?;
    let user = store
        .create_user(
            &keel_core::auth::Email::parse("bench@example.com")?,
            "unused",
        )
        .await?;
    store.set_membership(ws.id, user.id, Role::Member).await?;

    let env = |_: &str| None;
    let (router, _) = keel_server::gateway::router(&config, &env)?;
    let config = Arc::new(config);
    let (usage, usage_writer) = keel_server::usage::start(store.clone());
    let (events, event_tasks) = keel_server::events::start(store.clone(), &config).await?;
    let router = Arc::new(router);
    let (runtime, runtime_tasks) =
        keel_server::runtime::start(store.clone(), router.clone(), &events, &config).await?;
    let shutdown = CancellationToken::new();
    let state = keel_server::AppState::new(keel_server::Parts {
        store: store.clone(),
        events,
        runtime,
        config,
        router,
        usage,
        cache: None,
        shutdown: shutdown.clone(),
    });
    let jwt = state
        .tokens()
        .issue(user.id, ws.id, Role::Member, SessionId::new())?;
    let access = Access::new(Role::Member, Scope::TasksWrite);

    let mut rows = Vec::new();
    for (name, credential) in [("API key", token.expose().to_owned()), ("session JWT", jwt)] {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {credential}"))?,
        );
        // The first call fills the key and limits caches, as the first request does.
        for _ in 0..1000 {
            admit(&state, &headers, access).await?;
        }
        let mut samples = Vec::with_capacity(o.iterations);
        for _ in 0..o.iterations {
            let t = Instant::now();
            admit(&state, &headers, access).await?;
            samples.push(t.elapsed());
        }
        rows.push((
            format!("auth + access + rate limit, {name}, in process"),
            figures(samples),
        ));
    }

    if let Some(url) = &o.redis {
        let stop = CancellationToken::new();
        let limiter = keel_server::ratelimit::Limiter::redis(url, None, stop.clone())
            .map_err(anyhow::Error::msg)?;
        for _ in 0..200 {
            if limiter.shared() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::ensure!(limiter.shared(), "cannot reach Redis at {url}");
        use keel_server::ratelimit::{Kind, LimitKey, Mode, Rate};
        let buckets = [
            (
                LimitKey::id(Kind::WorkspaceRequests, ws.id.as_uuid()),
                Rate::per_minute(u32::MAX),
            ),
            (
                LimitKey::id(Kind::PrincipalRequests, uuid::Uuid::now_v7()),
                Rate::per_minute(u32::MAX),
            ),
        ];
        for _ in 0..500 {
            limiter.check(&buckets, 1, Mode::Take).await;
        }
        let n = o.iterations.min(20_000);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let d = limiter.check(&buckets, 1, Mode::Take).await;
            samples.push(t.elapsed());
            anyhow::ensure!(
                limiter.shared() && d.allowed,
                "Redis check fell back or refused"
            );
        }
        rows.push((
            "rate-limit check in Redis (2 buckets, 1 script call), loopback".to_owned(),
            figures(samples),
        ));
        stop.cancel();
    }

    out("| measurement | p50 | p99 |");
    out("|---|---|---|");
    for (name, f) in &rows {
        out(&format!(
            "| {name} | {:.1} µs | {:.1} µs |",
            us(f.p50),
            us(f.p99)
        ));
    }
    shutdown.cancel();
    runtime_tasks.finish().await;
    usage_writer.finish().await;
    event_tasks.finish().await;
    store.close().await;
    Ok(())
}

async fn admit(
    state: &keel_server::AppState,
    headers: &HeaderMap,
    access: Access,
) -> anyhow::Result<()> {
    match keel_server::auth::admit(state, headers, access).await {
        Ok(_) => Ok(()),
        Err(response) => anyhow::bail!("admission refused: {}", response.status()),
    }
}
