//! The gateway against `keel mock-llm` over real TCP: retries, Retry-After, breaker,
//! fallback, no retry on 4xx, timeouts, malformed answers, streaming and mid-stream
//! failure. Upstream call counts come from the mock's own `/_mock/stats`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use keel_core::auth::Role;
use keel_core::config::{Config, Sources};
use keel_core::workspace::WorkspaceName;
use keel_server::{AppState, app};
use keel_store::GroupBy;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::support::gateway;

/// A request the cache leaves alone (no temperature: OpenAI's default is 1).
fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

/// A deterministic request, which the cache may answer.
fn hello0(model: &str) -> Value {
    let mut v = hello(model);
    v["temperature"] = json!(0);
    v
}

fn target(model: &str) -> String {
    format!(
        "[[models.m.targets]]\nprovider = \"openai\"\nmodel = \"{model}\"\nbase_url = \"MOCK/v1\"\n"
    )
}

fn route(retry: &str, targets: &[&str]) -> String {
    let mut toml = format!("[models.m]\ntimeout = \"20s\"\n[models.m.retry]\n{retry}\n");
    for t in targets {
        toml.push_str(&target(t));
    }
    toml
}

#[tokio::test]
async fn a_plain_completion_goes_through() {
    let g = gateway(&route("max_attempts = 1", &["echo-model"])).await;
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["model"], "m",
        "the public route name, not the upstream one"
    );
    assert_eq!(v["choices"][0]["message"]["content"], "hello there");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(g.calls("echo-model").await, 1);
}

#[tokio::test]
async fn retry_after_is_honoured_then_the_route_falls_back() {
    let g = gateway(&route(
        "max_attempts = 2\nmax_retry_after = \"5s\"",
        &["fault/429?retry_after=1", "ok"],
    ))
    .await;
    let started = Instant::now();
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the Retry-After second"
    );
    assert_eq!(g.calls("fault/429?retry_after=1").await, 2, "retried once");
    assert_eq!(g.calls("ok").await, 1, "then fell back");
    let metrics = g.metrics().await;
    assert!(
        metrics.contains("keel_llm_fallbacks_total{route=\"m\""),
        "{metrics}"
    );
    assert!(metrics.contains("kind=\"rate_limit\""), "{metrics}");
}

#[tokio::test]
async fn a_retry_after_past_the_cap_falls_back_at_once() {
    let g = gateway(&route(
        "max_attempts = 3\nmax_retry_after = \"2s\"",
        &["fault/429?retry_after=60", "ok"],
    ))
    .await;
    let (status, _) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        g.calls("fault/429?retry_after=60").await,
        1,
        "no 60 s wait, no retry"
    );
}

#[tokio::test]
async fn a_caller_error_from_upstream_is_not_retried_nor_fallen_back() {
    let g = gateway(&route("max_attempts = 3", &["fault/400", "ok"])).await;
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("the provider rejected the request"), "{body}");
    assert_eq!(g.calls("fault/400").await, 1);
    assert_eq!(g.calls("ok").await, 0);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_then_fall_back_in_order() {
    let g = gateway(&route(
        "max_attempts = 2\nbase_delay = \"10ms\"",
        &["fault/500", "fault/503", "ok"],
    ))
    .await;
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            g.calls("fault/500").await,
            g.calls("fault/503").await,
            g.calls("ok").await
        ),
        (2, 2, 1)
    );
    // Each failed attempt and each fallback is an event in the workspace's log.
    let events = g.events(6).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "llm.provider.error",
            "llm.provider.error",
            "llm.provider.fallback",
            "llm.provider.error",
            "llm.provider.error",
            "llm.provider.fallback"
        ]
    );
    for e in &events {
        crate::events::assert_valid(e);
    }
    assert_eq!(events[0]["data"]["kind"], "server");
    assert_eq!(events[0]["data"]["status"], 500);
    assert_eq!(events[0]["data"]["upstream_model"], "fault/500");
    assert_eq!(events[0]["data"]["phase"], "request");
    assert_eq!(
        (
            events[0]["data"]["attempt"].as_u64(),
            events[1]["data"]["attempt"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(events[2]["data"]["reason"], "server");
    assert_eq!(
        events[2]["data"]["from_target"],
        events[0]["data"]["target"]
    );
    assert_eq!(
        events[5]["data"]["to_target"]
            .as_str()
            .map(|t| t.contains("ok")),
        Some(true)
    );
}

#[tokio::test]
async fn when_every_target_fails_the_503_lists_each_ones_error() {
    let g = gateway(&route(
        "max_attempts = 1",
        &["fault/500", "fault/429?retry_after=0"],
    ))
    .await;
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("openai/fault/500@") && detail.contains(": server"),
        "{detail}"
    );
    assert!(detail.contains(": rate_limit"), "{detail}");
}

#[tokio::test]
async fn the_breaker_opens_after_failures_and_recovers_after_a_probe() {
    let toml = format!(
        "{}[models.m.breaker]\nfailure_threshold = 3\nfailure_ratio = 0.0\ncooldown = \"400ms\"\n",
        route("max_attempts = 1", &["flaky/500?fail=3", "ok"])
    );
    let g = gateway(&toml).await;
    for _ in 0..3 {
        assert_eq!(
            g.chat(hello("m")).await.0,
            StatusCode::OK,
            "fell back while failing"
        );
    }
    assert_eq!(g.calls("flaky/500?fail=3").await, 3);
    assert!(
        g.metrics()
            .await
            .contains("target=\"openai/flaky/500?fail=3@"),
        "breaker gauge exported"
    );
    // The label carries this test's mock address, so other tests' gauges never match.
    let label = format!(
        "openai/flaky/500?fail=3@{}",
        g.mock.trim_start_matches("http://")
    );
    let gauge = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("keel_llm_breaker_state") && l.contains(&label))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(gauge(&g.metrics().await).as_deref(), Some("2"), "open");

    assert_eq!(g.chat(hello("m")).await.0, StatusCode::OK);
    assert_eq!(
        g.calls("flaky/500?fail=3").await,
        3,
        "an open breaker sends nothing upstream"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(g.chat(hello("m")).await.0, StatusCode::OK);
    assert_eq!(
        g.calls("flaky/500?fail=3").await,
        4,
        "one probe after the cooldown"
    );
    assert_eq!(
        gauge(&g.metrics().await).as_deref(),
        Some("0"),
        "closed again"
    );
    let ok_before = g.calls("ok").await;
    g.chat(hello("m")).await;
    assert_eq!(
        g.calls("ok").await,
        ok_before,
        "traffic is back on the first target"
    );
}

#[tokio::test]
async fn a_hanging_target_times_out_and_a_refused_one_is_skipped() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = format!(
        "[models.m]\n[models.m.retry]\nmax_attempts = 1\n\
         [[models.m.targets]]\nprovider = \"openai\"\nmodel = \"refused\"\nbase_url = \"http://{closed}/v1\"\n\
         [[models.m.targets]]\nprovider = \"openai\"\nmodel = \"fault/hang\"\nbase_url = \"MOCK/v1\"\ntotal_timeout = \"300ms\"\n\
         {}",
        target("ok")
    );
    let g = gateway(&toml).await;
    let started = Instant::now();
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((g.calls("fault/hang").await, g.calls("ok").await), (1, 1));
    let metrics = g.metrics().await;
    assert!(metrics.contains("kind=\"connect\""), "{metrics}");
    assert!(metrics.contains("kind=\"timeout\""), "{metrics}");
}

#[tokio::test]
async fn malformed_upstream_json_is_a_502() {
    let g = gateway(&route("max_attempts = 1", &["fault/malformed"])).await;
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("malformed JSON"), "{body}");
    assert!(g.metrics().await.contains("kind=\"invalid_response\""));
}

/// Splits an SSE body into its `data` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn streams_arrive_as_sse_and_end_with_done() {
    let g = gateway(&route("max_attempts = 1", &["fault/503", "ok"])).await;
    let mut req = hello("m");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (status, body) = g.chat(req).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a stream that fails before its first byte falls back: {body}"
    );
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "hello there");
    assert!(chunks.iter().all(|c| c["model"] == "m"));
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        2,
        "include_usage is passed through"
    );
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_a_clean_error_event() {
    let g = gateway(&route("max_attempts = 2", &["fault/cut?after=2", "ok"])).await;
    let mut req = hello("m");
    req["stream"] = json!(true);
    let (status, body) = g.chat(req).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(data.len(), 3, "two chunks, then the error: {body}");
    let error: Value = serde_json::from_str(&data[2]).unwrap();
    assert_eq!(error["error"]["code"], "connect", "{error}");
    assert!(!body.contains("[DONE]"));
    assert_eq!(g.calls("ok").await, 0, "no fallback after the first byte");
}

#[tokio::test]
async fn unknown_models_and_bad_requests_say_what_to_fix() {
    let g = gateway(&route("max_attempts = 1", &["ok"])).await;
    let (status, body) = g.chat(hello("gpt-nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("available: m"), "{body}");
    let (status, body) = g.chat(json!({"model": "m", "messages": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("messages"), "{body}");
    let (status, body) = g.chat(json!({"model": "m"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("messages"), "names the missing field: {body}");
    assert_eq!(g.calls("ok").await, 0);
}

#[tokio::test]
async fn with_no_models_configured_default_is_a_plainly_labelled_echo() {
    let g = gateway("").await;
    let (status, body) = g.chat(hello("default")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let req = Request::get("/v1/models")
        .header(header::AUTHORIZATION, format!("Bearer {}", g.key))
        .body(Body::empty())
        .unwrap();
    let res = g.app.clone().oneshot(req).await.unwrap();
    let models: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(models["data"][0]["id"], "default");
    assert!(
        models["data"][0]["keel"]["note"]
            .as_str()
            .unwrap()
            .contains("echo mock"),
        "{models}"
    );
}

#[tokio::test]
async fn every_routed_request_leaves_a_usage_row_with_its_cost() {
    let toml = "[models.priced]\n[models.priced.retry]\nmax_attempts = 1\n\
                [[models.priced.targets]]\nprovider = \"openai\"\nmodel = \"echo\"\nbase_url = \"MOCK/v1\"\n\
                input_price_per_mtok = 1.0\noutput_price_per_mtok = 2.0\n\
                [models.broken]\n[models.broken.retry]\nmax_attempts = 1\n\
                [[models.broken.targets]]\nprovider = \"openai\"\nmodel = \"fault/500\"\nbase_url = \"MOCK/v1\"\n";
    let mut g = gateway(toml).await;
    for _ in 0..3 {
        assert_eq!(g.chat(hello("priced")).await.0, StatusCode::OK);
    }
    let mut streamed = hello("priced");
    streamed["stream"] = json!(true);
    let (status, body) = g.chat(streamed).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !body.contains("\"usage\""),
        "usage was not asked for, so not sent: {body}"
    );
    assert_eq!(
        g.chat(hello("broken")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        g.chat(hello("nonexistent")).await.0,
        StatusCode::NOT_FOUND,
        "not routed, not recorded"
    );
    let rows = g.usage(GroupBy::Route).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let broken = &rows[0];
    assert_eq!(
        (
            broken.group.as_str(),
            broken.requests,
            broken.errors,
            broken.cost_nanousd
        ),
        ("broken", 1, 1, 0)
    );
    let priced = &rows[1];
    assert_eq!(
        (priced.group.as_str(), priced.requests, priced.errors),
        ("priced", 4, 0)
    );
    // Each: 2 prompt tokens at $1/M + 2 completion tokens at $2/M = 6,000 nano-USD, exact
    // for the stream too, because Keel asked upstream for usage.
    assert_eq!((priced.input_tokens, priced.output_tokens), (8, 8));
    assert_eq!(priced.cost_nanousd, 4 * 6_000);

    let (status, _, json) = g.get("/v1/usage?group_by=model").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let v: Value = serde_json::from_str(&json).unwrap();
    let echo = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"] == "echo")
        .unwrap();
    assert_eq!(echo["requests"], 4);
    assert!(
        (echo["cost_usd"].as_f64().unwrap() - 0.000024).abs() < 1e-12,
        "{echo}"
    );

    let (status, content_type, csv) = g.get("/v1/usage?group_by=route&format=csv").await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/csv"));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "route,requests,input_tokens,output_tokens,cached_tokens,cost_usd,cache_hits,errors"
    );
    assert_eq!(lines[2], "priced,4,8,8,0,0.000024000,0,0");

    let (status, _, body) = g.get("/v1/usage?group_by=colour").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.contains("group_by: expected route, key, model or day"),
        "{body}"
    );
    let (status, _, body) = g.get("/v1/usage?from=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("from: expected an RFC 3339 time"), "{body}");
}

#[tokio::test]
async fn deterministic_requests_are_cached_and_replayed_streams_included() {
    let mut g = gateway(&route("max_attempts = 1", &["cached"])).await;
    let (status, cache, first) = g.chat_with(hello0("m"), &[]).await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("miss")));
    let (_, cache, second) = g.chat_with(hello0("m"), &[]).await;
    assert_eq!(cache.as_deref(), Some("hit"));
    assert_eq!(first, second, "the same answer, byte for byte");
    assert_eq!(g.calls("cached").await, 1, "the hit never reached upstream");

    let (_, cache, _) = g
        .chat_with(hello0("m"), &[("cache-control", "no-cache")])
        .await;
    assert_eq!(cache, None, "no-cache skips the cache");
    assert_eq!(g.calls("cached").await, 2);

    let mut warm = hello0("m");
    warm["temperature"] = json!(0.7);
    let (_, cache, _) = g.chat_with(warm.clone(), &[]).await;
    assert_eq!(cache, None, "a non-deterministic request is not cached");
    let (_, cache, _) = g.chat_with(warm.clone(), &[("x-keel-cache", "on")]).await;
    assert_eq!(cache.as_deref(), Some("miss"), "unless the caller opts in");
    let (_, cache, _) = g.chat_with(warm, &[("x-keel-cache", "on")]).await;
    assert_eq!(cache.as_deref(), Some("hit"));

    let mut streamed = hello0("m");
    streamed["stream"] = json!(true);
    let (_, cache, live) = g.chat_with(streamed.clone(), &[]).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    let (_, cache, replay) = g.chat_with(streamed, &[]).await;
    assert_eq!(cache.as_deref(), Some("hit"), "streams are cached too");
    assert_eq!(sse_data(&live).len(), sse_data(&replay).len());
    assert_eq!(sse_data(&replay).last().map(String::as_str), Some("[DONE]"));
    let text: String = sse_data(&replay)[..sse_data(&replay).len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "hello there", "replayed as a stream");
    assert!(
        !replay.contains("\"usage\""),
        "the usage chunk Keel asked for is not replayed unasked"
    );

    let rows = g.usage(GroupBy::Route).await;
    assert_eq!((rows[0].requests, rows[0].cache_hits), (8, 3), "{rows:?}");
}

#[tokio::test]
async fn errors_are_never_cached_and_workspaces_do_not_share_entries() {
    let g = gateway(&route("max_attempts = 1", &["flaky/500?fail=1"])).await;
    let (status, cache, _) = g.chat_with(hello0("m"), &[]).await;
    assert_eq!((status, cache), (StatusCode::SERVICE_UNAVAILABLE, None));
    let (status, cache, _) = g.chat_with(hello0("m"), &[]).await;
    assert_eq!(
        (status, cache.as_deref()),
        (StatusCode::OK, Some("miss")),
        "the failure was not cached"
    );
    let (_, cache, _) = g.chat_with(hello0("m"), &[]).await;
    assert_eq!(cache.as_deref(), Some("hit"));

    // The same request from another workspace is a miss: keyspaces are per workspace.
    let key_b = {
        let ws = g
            .store
            .ensure_workspace(&WorkspaceName::parse("other").unwrap())
            .await
            .unwrap();
        keel_server::auth::issue_key(
            g.store.as_ref(),
            ws.id,
            Role::Member,
            None,
            Default::default(),
        )
        .await
        .unwrap()
        .0
        .expose()
        .to_owned()
    };
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {key_b}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(hello0("m").to_string()))
        .unwrap();
    let res = g.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.headers()["x-keel-cache"], "miss");
}

fn redis_url() -> String {
    std::env::var("KEEL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

#[tokio::test]
async fn a_redis_cache_is_shared_by_instances() {
    let toml = format!(
        "[redis]\nurl = \"{}\"\n{}",
        redis_url(),
        route("max_attempts = 1", &["shared"])
    );
    let g = gateway(&toml).await;
    // A second instance: its own router and its own cache client, the same store and Redis.
    let cfg = {
        let text = toml.replace("MOCK", &g.mock);
        let mut cfg = Config::load(Sources {
            file: Some(("test.toml".into(), text)),
            ..Sources::default()
        })
        .unwrap();
        cfg.data_dir = g.dir.path().to_owned();
        cfg
    };
    let cache = keel_server::gateway::cache(&cfg).await.unwrap();
    assert_eq!(
        cache.backend(),
        "redis",
        "KEEL_TEST_REDIS_URL ({}) must be reachable",
        redis_url()
    );
    let (router, _) = keel_server::gateway::router(&cfg, &|_| None).unwrap();
    let (usage, _writer) = keel_server::usage::start(g.store.clone());
    let (events, _tasks) = keel_server::events::start(g.store.clone(), &cfg)
        .await
        .unwrap();
    let router = Arc::new(router);
    let (runtime, _runtime_tasks) =
        keel_server::runtime::start(g.store.clone(), router.clone(), &events, &cfg)
            .await
            .unwrap();
    let second = app(AppState::new(keel_server::Parts {
        store: g.store.clone(),
        events,
        runtime,
        config: Arc::new(cfg),
        router,
        usage,
        cache: Some(cache),
        shutdown: CancellationToken::new(),
    }));

    let (_, first, body_a) = g.chat_with(hello0("m"), &[]).await;
    assert_eq!(first.as_deref(), Some("miss"));
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {}", g.key))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(hello0("m").to_string()))
        .unwrap();
    let res = second.oneshot(req).await.unwrap();
    assert_eq!(
        res.headers()["x-keel-cache"],
        "hit",
        "the other instance's answer, from Redis"
    );
    let body_b = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body_a.as_bytes(), &body_b[..]);
    assert_eq!(g.calls("shared").await, 1);
}

#[tokio::test]
async fn an_unreachable_redis_at_start_falls_back_to_memory() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = Config::load(Sources {
        file: Some((
            "t.toml".into(),
            format!("[redis]\nurl = \"redis://{closed}/0\"\n"),
        )),
        ..Sources::default()
    })
    .unwrap();
    let cache = keel_server::gateway::cache(&cfg).await.unwrap();
    assert_eq!(cache.backend(), "memory");
}

#[tokio::test]
async fn an_upstream_that_refuses_keel_is_skipped_not_blamed_on_the_caller() {
    let g = gateway(&route("max_attempts = 1", &["flaky/401?fail=99", "ok"])).await;
    let (status, body) = g.chat(hello("m")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a bad upstream key falls back: {body}"
    );
    assert_eq!(g.calls("ok").await, 1);
    assert!(g.metrics().await.contains("kind=\"denied\""));
}

#[tokio::test]
async fn a_stream_that_fails_mid_way_counts_against_the_breaker() {
    let toml = format!(
        "{}[models.m.breaker]\nfailure_threshold = 1\nfailure_ratio = 0.0\ncooldown = \"60s\"\n",
        route("max_attempts = 1", &["fault/cut?after=2", "ok"])
    );
    let g = gateway(&toml).await;
    let mut req = hello("m");
    req["stream"] = json!(true);
    let (_, body) = g.chat(req.clone()).await;
    assert!(body.contains("\"error\""), "{body}");
    let (_, body) = g.chat(req).await;
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "the open breaker skipped the cutting target: {body}"
    );
    assert_eq!(g.calls("fault/cut?after=2").await, 1);
}

#[test]
fn the_default_model_follows_the_provider_keys_in_the_environment() {
    use keel_server::gateway::{Default as D, router};
    let cfg = Config::default();
    let pick = |vars: &'static [&'static str]| {
        router(&cfg, &|name| vars.contains(&name).then(|| "k".to_owned()))
            .unwrap()
            .1
    };
    assert_eq!(pick(&["OPENAI_API_KEY", "ANTHROPIC_API_KEY"]), D::OpenAi);
    assert_eq!(pick(&["ANTHROPIC_API_KEY"]), D::Anthropic);
    assert_eq!(pick(&[]), D::EchoMock);
}

#[tokio::test]
async fn embeddings_are_routed_with_fallback_and_accounted() {
    let toml = format!(
        "{}[models.claude]\n[[models.claude.targets]]\nprovider = \"anthropic\"\nmodel = \"c\"\nbase_url = \"MOCK\"\n",
        route("max_attempts = 1", &["fault/500", "embed"])
    );
    let mut g = gateway(&toml).await;
    let req = |model: &str, input: Value| {
        Request::post("/v1/embeddings")
            .header(header::AUTHORIZATION, format!("Bearer {}", g.key))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"model": model, "input": input}).to_string(),
            ))
            .unwrap()
    };
    let res = g
        .app
        .clone()
        .oneshot(req("m", json!(["hello", "world"])))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let v: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["model"], "m");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert_ne!(
        v["data"][0]["embedding"], v["data"][1]["embedding"],
        "different texts, different vectors"
    );
    assert_eq!(
        (g.calls("fault/500").await, g.calls("embed").await),
        (1, 1),
        "fell back"
    );

    let res = g.app.clone().oneshot(req("m", json!([]))).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST, "empty input");
    let res = g
        .app
        .clone()
        .oneshot(req("claude", json!("x")))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::BAD_REQUEST,
        "Anthropic has no embeddings API"
    );

    let rows = g.usage(GroupBy::Model).await;
    let embed = rows.iter().find(|r| r.group == "embed").unwrap();
    assert_eq!(
        (embed.requests, embed.input_tokens, embed.output_tokens),
        (1, 2, 0)
    );
}

#[tokio::test]
async fn without_provider_usage_tokens_are_counted_with_a_real_tokenizer() {
    let mut g = gateway(&route("max_attempts = 1", &["nousage"])).await;
    let word = json!({"model": "m", "messages": [{"role": "user", "content": "antidisestablishmentarianism"}]});
    assert_eq!(g.chat(word.clone()).await.0, StatusCode::OK);
    let mut streamed = word;
    streamed["stream"] = json!(true);
    assert_eq!(g.chat(streamed).await.0, StatusCode::OK);
    let rows = g.usage(GroupBy::Route).await;
    let expected = keel_llm::tokens::count("antidisestablishmentarianism");
    assert!(expected > 1, "one word, several BPE tokens");
    assert_eq!(
        (
            rows[0].requests,
            rows[0].input_tokens,
            rows[0].output_tokens
        ),
        (2, 2 * expected, 2 * expected),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_upstream_request() {
    let mut g = gateway(&route("max_attempts = 1", &["fault/drip?interval_ms=20"])).await;
    let mut body = hello("m");
    body["stream"] = json!(true);
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {}", g.key))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let res = g.app.clone().oneshot(req).await.unwrap();
    let mut stream = res.into_body();
    let first = stream.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    drop(stream); // the client goes away
    let mut abandoned = 0;
    for _ in 0..50 {
        let stats: Value = reqwest::get(format!("{}/_mock/stats", g.mock))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        abandoned = stats["abandoned_streams"].as_u64().unwrap_or(0);
        if abandoned > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        abandoned, 1,
        "the upstream stream was dropped, not left running"
    );
    let rows = g.usage(GroupBy::Route).await;
    assert_eq!(
        (rows[0].requests, rows[0].errors),
        (1, 1),
        "accounted as canceled: {rows:?}"
    );
}

#[tokio::test]
async fn stream_usage_off_leaves_include_usage_out_and_estimates_instead() {
    let toml = "[models.m]\n[models.m.retry]\nmax_attempts = 1\n\
                [[models.m.targets]]\nprovider = \"openai\"\nmodel = \"plain\"\nbase_url = \"MOCK/v1\"\nstream_usage = false\n";
    let mut g = gateway(toml).await;
    let word = "antidisestablishmentarianism";
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": word}]});
    assert_eq!(g.chat(body).await.0, StatusCode::OK);
    let rows = g.usage(GroupBy::Route).await;
    // The mock counts words (1) when asked for usage; the tokenizer counts BPE tokens.
    let tokens = keel_llm::tokens::count(word);
    assert_eq!(
        (rows[0].input_tokens, rows[0].output_tokens),
        (tokens, tokens),
        "{rows:?}"
    );
}

/// A redis-server of the test's own speaking TLS only, with a certificate from a private
/// authority made here (openssl); stopped when dropped.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
}

impl TlsRedis {
    fn start(dir: &std::path::Path) -> Self {
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl is installed on these machines");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=keel test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .current_dir(dir)
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed on these machines");
        let redis = Self {
            child,
            port,
            ca: dir.join("ca.pem"),
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server (TLS) did not start on {port}");
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_rediss_url_speaks_tls_and_trusts_only_the_configured_authority() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path());
    let config = |ca: Option<&std::path::Path>| {
        let mut text = format!("[redis]\nurl = \"rediss://127.0.0.1:{}/0\"\n", redis.port);
        if let Some(ca) = ca {
            text.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
        }
        Config::load(Sources {
            file: Some(("t.toml".into(), text)),
            ..Sources::default()
        })
    };
    let cache = keel_server::gateway::cache(&config(Some(&redis.ca)).unwrap())
        .await
        .unwrap();
    assert_eq!(cache.backend(), "redis", "connected over TLS");
    // A round trip through the TLS connection.
    let request: keel_llm::types::ChatRequest = serde_json::from_value(
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .unwrap();
    let response: keel_llm::types::ChatResponse = serde_json::from_value(json!({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    }))
    .unwrap();
    let key = || keel_llm::cache::Key::new("ws", &request);
    cache
        .put(key(), keel_llm::cache::Cached::Whole(response.clone()))
        .await;
    let got = cache
        .get(&key())
        .await
        .expect("stored in Redis and read back");
    assert!(matches!(&*got, keel_llm::cache::Cached::Whole(r) if r == &response));

    // The system's authorities do not know this one: the certificate is refused, and the
    // cache stays in process rather than talking to an unverified server.
    let cache = keel_server::gateway::cache(&config(None).unwrap())
        .await
        .unwrap();
    assert_eq!(cache.backend(), "memory");

    // A CA file is for rediss:// only, and must exist.
    let err = Config::load(Sources {
        file: Some((
            "t.toml".into(),
            format!(
                "[redis]\nurl = \"redis://127.0.0.1:1/0\"\nca_file = \"{}\"\n",
                redis.ca.display()
            ),
        )),
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("redis.ca_file"), "{err}");
    let err = config(Some(&dir.path().join("missing.pem")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redis.ca_file") && err.contains("missing.pem"),
        "{err}"
    );
}
