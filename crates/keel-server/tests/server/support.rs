//! The gateway test harness shared by `gateway.rs` and `anthropic.rs`: two `keel
//! mock-llm`s on real TCP ports (one echoing, one playing a script) and a Keel app over a
//! fresh SQLite store, driven with `oneshot`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use keel_core::auth::Role;
use keel_core::config::{Config, Sources};
use keel_core::workspace::WorkspaceName;
use keel_server::mock_llm::{Options, Script, ScriptedReply};
use keel_server::{AppState, app};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// A Keel app and the mocks behind it.
pub struct Gateway {
    pub app: Router,
    /// A member key of workspace `gw`.
    pub key: String,
    /// The echoing mock's root URL (`MOCK` in configs).
    pub mock: String,
    /// The scripted mock's root URL (`SCRIPTED` in configs).
    pub scripted: String,
    pub store: Arc<dyn keel_store::Store>,
    writer: Option<keel_server::usage::Writer>,
    pub dir: tempfile::TempDir,
}

/// Starts a mock-llm on a free port and returns its root URL.
pub async fn start_mock(options: Options) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(keel_server::mock_llm::serve(
        listener,
        options,
        CancellationToken::new(),
    ));
    format!("http://{addr}")
}

/// A gateway whose `[models]` come from `models_toml`, where `MOCK` stands for the echoing
/// mock's root URL and `SCRIPTED` for the one playing `replies` (OpenAI targets add `/v1`;
/// Anthropic targets take the root, as Anthropic's SDKs do).
pub async fn gateway_with(models_toml: &str, replies: Vec<ScriptedReply>) -> Gateway {
    let echo = start_mock(Options::default()).await;
    let scripted = start_mock(Options {
        script: Script {
            replies,
            by_turn: false,
        },
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = models_toml
        .replace("SCRIPTED", &scripted)
        .replace("MOCK", &echo);
    let mut cfg = Config::load(Sources {
        file: Some(("test.toml".into(), text)),
        ..Sources::default()
    })
    .unwrap();
    cfg.data_dir = dir.path().to_owned();
    let store = keel_store::open(&cfg).await.unwrap();
    store.migrate().await.unwrap();
    let env = |var: &str| (var == "TEST_ANTHROPIC_KEY").then(|| "sk-ant-test".to_owned());
    let (router, _) = keel_server::gateway::router(&cfg, &env).unwrap();
    let ws = store
        .ensure_workspace(&WorkspaceName::parse("gw").unwrap())
        .await
        .unwrap();
    let (token, _) = keel_server::auth::issue_key(
        store.as_ref(),
        ws.id,
        Role::Member,
        None,
        Default::default(),
    )
    .await
    .unwrap();
    let (usage, writer) = keel_server::usage::start(store.clone());
    let (events, _tasks) = keel_server::events::start(store.clone(), &cfg)
        .await
        .unwrap();
    let router = Arc::new(router);
    let (runtime, _runtime_tasks) =
        keel_server::runtime::start(store.clone(), router.clone(), &events, &cfg)
            .await
            .unwrap();
    let state = AppState::new(keel_server::Parts {
        store: store.clone(),
        events,
        runtime,
        cache: keel_server::gateway::cache(&cfg).await,
        config: Arc::new(cfg),
        router,
        usage,
        shutdown: CancellationToken::new(),
    });
    Gateway {
        app: app(state),
        key: token.expose().to_owned(),
        mock: echo,
        scripted,
        store,
        writer: Some(writer),
        dir,
    }
}

/// A gateway with no scripted replies.
pub async fn gateway(models_toml: &str) -> Gateway {
    gateway_with(models_toml, Vec::new()).await
}

impl Gateway {
    /// The first `n` events of workspace `gw`, waiting up to 5 s for them to be committed.
    pub async fn events(&self, n: usize) -> Vec<Value> {
        let ws = self
            .store
            .workspace_by_name(&WorkspaceName::parse("gw").unwrap())
            .await
            .unwrap()
            .id;
        for _ in 0..100 {
            let events = self.store.events_after(ws, 0, 1000).await.unwrap();
            if events.len() >= n {
                return events
                    .iter()
                    .map(|e| serde_json::to_value(e).unwrap())
                    .collect();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("fewer than {n} events were committed");
    }

    /// POSTs a chat completion; returns status and body.
    pub async fn chat(&self, body: Value) -> (StatusCode, String) {
        let (status, _, body) = self.chat_with(body, &[]).await;
        (status, body)
    }

    /// POSTs a chat completion with extra headers; returns status, `x-keel-cache`, body.
    pub async fn chat_with(
        &self,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, String) {
        let mut req = Request::post("/v1/chat/completions")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let cache = res
            .headers()
            .get("x-keel-cache")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, cache, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// GETs `uri` with the key; returns status, content type, body.
    pub async fn get(&self, uri: &str) -> (StatusCode, String, String) {
        let req = Request::get(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .body(Body::empty())
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// Upstream calls for `model`, on both mocks.
    pub async fn calls(&self, model: &str) -> u64 {
        let mut total = 0;
        for mock in [&self.mock, &self.scripted] {
            let stats: Value = reqwest::get(format!("{mock}/_mock/stats"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            total += stats["calls"][model].as_u64().unwrap_or(0);
        }
        total
    }

    /// The Prometheus text.
    pub async fn metrics(&self) -> String {
        let req = Request::get("/metrics").body(Body::empty()).unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    /// Drains the usage writer: every record so far is in the store.
    pub async fn flush(&mut self) {
        self.writer.take().unwrap().finish().await;
    }

    /// Drains the usage writer, then sums workspace `gw`'s usage of the last hour.
    pub async fn usage(&mut self, group_by: keel_store::GroupBy) -> Vec<keel_store::UsageRow> {
        self.flush().await;
        let now = time::OffsetDateTime::now_utc();
        let ws = self
            .store
            .workspace_by_name(&WorkspaceName::parse("gw").unwrap())
            .await
            .unwrap();
        let hour = time::Duration::hours(1);
        self.store
            .usage_summary(ws.id, now - hour, now + hour, group_by)
            .await
            .unwrap()
    }
}
