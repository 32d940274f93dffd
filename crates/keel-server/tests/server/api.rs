use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use keel_core::auth::Role;
use keel_core::config::Config;
use keel_core::workspace::WorkspaceName;
use keel_server::{AppState, app};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

struct Harness {
    app: Router,
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn harness_with(config: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.data_dir = dir.path().to_owned();
    config(&mut cfg);
    let store = keel_store::open(&cfg).await.unwrap();
    store.migrate().await.unwrap();
    let state = state_for(store, cfg, CancellationToken::new()).await;
    Harness {
        app: app(state.clone()),
        state,
        _dir: dir,
    }
}

/// Server state over `store` and `cfg`, with the default model routes and a usage writer.
pub async fn state_for(
    store: Arc<dyn keel_store::Store>,
    cfg: Config,
    shutdown: CancellationToken,
) -> AppState {
    let (router, _) = keel_server::gateway::router(&cfg, &|_| None).unwrap();
    let (usage, _writer) = keel_server::usage::start(store.clone());
    let cache = keel_server::gateway::cache(&cfg).await;
    let (events, _tasks) = keel_server::events::start(store.clone(), &cfg)
        .await
        .unwrap();
    let router = Arc::new(router);
    let (runtime, _runtime_tasks) =
        keel_server::runtime::start(store.clone(), router.clone(), &events, &cfg)
            .await
            .unwrap();
    AppState::new(keel_server::Parts {
        store,
        events,
        runtime,
        config: Arc::new(cfg),
        router,
        usage,
        cache,
        shutdown,
    })
}

async fn harness() -> Harness {
    harness_with(|_| {}).await
}

impl Harness {
    async fn key(&self, workspace: &str, role: Role) -> String {
        let ws = self
            .state
            .store()
            .ensure_workspace(&WorkspaceName::parse(workspace).unwrap())
            .await
            .unwrap();
        let (token, _) =
            keel_server::auth::issue_key(self.state.store(), ws.id, role, None, Default::default())
                .await
                .unwrap();
        token.expose().to_owned()
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, body)
    }
}

fn get(uri: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::get(uri);
    if let Some(key) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    b.body(Body::empty()).unwrap()
}

fn post_json(uri: &str, key: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

/// Asserts an RFC 9457 problem with the given status, whose request_id matches the header.
fn assert_problem(
    status: StatusCode,
    headers: &axum::http::HeaderMap,
    body: &Value,
    expect: StatusCode,
    instance: &str,
) {
    assert_eq!(status, expect, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(body["status"], expect.as_u16(), "{body}");
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:keel:problem:"),
        "{body}"
    );
    assert!(!body["title"].as_str().unwrap().is_empty());
    assert!(!body["detail"].as_str().unwrap().is_empty());
    assert_eq!(body["instance"], instance);
    assert_eq!(
        body["request_id"].as_str().unwrap(),
        headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(
        body["error"]["message"], body["detail"],
        "OpenAI-shaped error member: {body}"
    );
}

#[tokio::test]
async fn current_workspace_needs_a_valid_key() {
    let h = harness().await;
    let key = h.key("acme", Role::Viewer).await;

    let (status, _, body) = h.send(get("/v1/workspaces/current", Some(&key))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "acme");
    assert_eq!(body["role"], "viewer");
    assert!(body["id"].as_str().unwrap().starts_with("ws_"));

    for (auth, needle) in [
        (None, "missing credentials"),
        (Some("Bearer keel_short"), "expected `keel_`"),
        (Some("Basic abc"), "must be `Bearer"),
        (
            Some(format!("Bearer keel_{}", "A".repeat(43))).as_deref(),
            "not valid, has expired or has been revoked",
        ),
    ] {
        let mut req = get("/v1/workspaces/current", None);
        if let Some(auth) = auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.parse().unwrap());
        }
        let (status, headers, body) = h.send(req).await;
        assert_problem(
            status,
            &headers,
            &body,
            StatusCode::UNAUTHORIZED,
            "/v1/workspaces/current",
        );
        assert!(body["detail"].as_str().unwrap().contains(needle), "{body}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer realm=\"keel\"");
    }
}

#[tokio::test]
async fn roles_are_enforced_by_the_route_group() {
    let h = harness().await;
    let viewer = h.key("acme", Role::Viewer).await;
    let (status, headers, body) = h
        .send(post_json("/v1/keys", &viewer, r#"{"role":"viewer"}"#))
        .await;
    assert_problem(status, &headers, &body, StatusCode::FORBIDDEN, "/v1/keys");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("requires role admin"),
        "{body}"
    );
    let (status, _, _) = h.send(get("/v1/keys", Some(&viewer))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_within_the_workspace() {
    let h = harness().await;
    let admin = h.key("acme", Role::Admin).await;
    let (status, _, created) = h
        .send(post_json(
            "/v1/keys",
            &admin,
            r#"{"role":"member","name":"ci"}"#,
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let new_key = created["key"].as_str().unwrap().to_owned();
    assert!(new_key.starts_with(created["prefix"].as_str().unwrap()));
    let id = created["id"].as_str().unwrap().to_owned();

    let (status, _, me) = h.send(get("/v1/workspaces/current", Some(&new_key))).await;
    assert_eq!(
        (status, me["role"].as_str()),
        (StatusCode::OK, Some("member"))
    );

    let (_, _, list) = h.send(get("/v1/keys", Some(&admin))).await;
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&id.as_str()));
    assert!(
        list.to_string().find("\"key\":").is_none(),
        "secrets never listed: {list}"
    );

    // Another workspace's admin cannot see or revoke it: 404, not 403 (no existence leak).
    let other = h.key("other", Role::Admin).await;
    let del = |key: &str, id: &str| {
        Request::delete(format!("/v1/keys/{id}"))
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    let (status, headers, body) = h.send(del(&other, &id)).await;
    assert_problem(
        status,
        &headers,
        &body,
        StatusCode::NOT_FOUND,
        &format!("/v1/keys/{id}"),
    );

    let (status, headers, body) = h.send(del(&admin, "key_nothex")).await;
    assert_problem(
        status,
        &headers,
        &body,
        StatusCode::BAD_REQUEST,
        "/v1/keys/key_nothex",
    );

    let (status, _, revoked) = h.send(del(&admin, &id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked["revoked_at"].is_string());
    let (status, _, _) = h.send(get("/v1/workspaces/current", Some(&new_key))).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a revoked key stops working at once"
    );
}

#[tokio::test]
async fn bad_bodies_get_problem_json_saying_what_to_fix() {
    let h = harness_with(|c| c.server.max_body_bytes = 64).await;
    let admin = h.key("acme", Role::Admin).await;

    let (status, headers, body) = h.send(post_json("/v1/keys", &admin, r#"{"role": "#)).await;
    assert_problem(status, &headers, &body, StatusCode::BAD_REQUEST, "/v1/keys");
    assert!(
        body["detail"].as_str().unwrap().contains("malformed JSON"),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("column"),
        "says where: {body}"
    );

    let (status, headers, body) = h
        .send(post_json("/v1/keys", &admin, r#"{"role":"root"}"#))
        .await;
    assert_problem(status, &headers, &body, StatusCode::BAD_REQUEST, "/v1/keys");
    assert!(
        body["detail"].as_str().unwrap().contains("role"),
        "names the field: {body}"
    );

    let (status, _, body) = h
        .send(post_json(
            "/v1/keys",
            &admin,
            r#"{"role":"admin","colour":1}"#,
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"].as_str().unwrap().contains("colour"),
        "unknown fields are named: {body}"
    );

    let (status, _, body) = h
        .send(post_json(
            "/v1/keys",
            &admin,
            r#"{"role":"admin","name":"  "}"#,
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"].as_str().unwrap().starts_with("name:"),
        "{body}"
    );

    let big = format!(r#"{{"role":"admin","name":"{}"}}"#, "x".repeat(100));
    let (status, headers, body) = h.send(post_json("/v1/keys", &admin, big)).await;
    assert_problem(
        status,
        &headers,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "/v1/keys",
    );
    assert!(
        body["detail"].as_str().unwrap().contains("64 bytes"),
        "{body}"
    );

    let mut req = post_json("/v1/keys", &admin, r#"{"role":"admin"}"#);
    req.headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    let (status, headers, body) = h.send(req).await;
    assert_problem(
        status,
        &headers,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "/v1/keys",
    );

    // Nothing half-written: only the admin key exists.
    let (_, _, list) = h.send(get("/v1/keys", Some(&admin))).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_too() {
    let h = harness().await;
    let (status, headers, body) = h.send(get("/v2/nothing", None)).await;
    assert_problem(
        status,
        &headers,
        &body,
        StatusCode::NOT_FOUND,
        "/v2/nothing",
    );
    let req = Request::builder()
        .method(Method::PATCH)
        .uri("/healthz")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = h.send(req).await;
    assert_problem(
        status,
        &headers,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "/healthz",
    );
}

#[tokio::test]
async fn request_ids_are_kept_when_well_formed_and_made_otherwise() {
    let h = harness().await;
    let mut req = get("/healthz", None);
    req.headers_mut()
        .insert("x-request-id", "client-id-42".parse().unwrap());
    let (_, headers, _) = h.send(req).await;
    assert_eq!(headers["x-request-id"], "client-id-42");

    let mut req = get("/healthz", None);
    req.headers_mut()
        .insert("x-request-id", "bad id\twith tab".parse().unwrap());
    let (_, headers, _) = h.send(req).await;
    let id = headers["x-request-id"].to_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "replaced with a fresh id: {id}"
    );

    let (_, a, _) = h.send(get("/healthz", None)).await;
    let (_, b, _) = h.send(get("/healthz", None)).await;
    assert_ne!(a["x-request-id"], b["x-request-id"]);
}

#[tokio::test]
async fn a_panicking_handler_gets_500_problem_and_the_server_keeps_serving() {
    let app = Router::new()
        .route(
            "/boom",
            axum::routing::get(|| async {
                if true {
                    panic!("kaboom")
                }
            }),
        )
        .route("/fine", axum::routing::get(|| async { "fine" }))
        .layer(axum::middleware::from_fn(
            keel_server::middleware::request_context,
        ));
    let res = app.clone().oneshot(get("/boom", None)).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_problem(
        status,
        &headers,
        &body,
        StatusCode::INTERNAL_SERVER_ERROR,
        "/boom",
    );
    assert!(
        !body["detail"].as_str().unwrap().contains("kaboom"),
        "internals never leak: {body}"
    );
    let res = app.oneshot(get("/fine", None)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn readiness_reports_schema_and_shutdown() {
    let h = harness().await;
    let (status, _, body) = h.send(get("/readyz", None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let version = keel_store::binary_schema_version(keel_store::Backend::Sqlite);
    assert_eq!(
        body,
        json!({"status": "ok", "database": "sqlite", "schema_version": version})
    );

    let token = CancellationToken::new();
    let store = keel_store::open(h.state.config()).await.unwrap();
    let draining = state_for(store, h.state.config().clone(), token.clone()).await;
    token.cancel();
    let res = app(draining).oneshot(get("/readyz", None)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn openapi_lists_every_route_and_every_listed_route_exists() {
    let h = harness().await;
    let (status, _, doc) = h.send(get("/openapi.json", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: BTreeSet<String> = [
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
        "GET /v1/workspaces/current",
        "POST /v1/keys",
        "GET /v1/keys",
        "DELETE /v1/keys/{id}",
        "POST /v1/chat/completions",
        "GET /v1/models",
        "GET /v1/usage",
        "POST /v1/embeddings",
        "GET /v1/events",
        "GET /v1/events/schemas",
        "GET /v1/ws",
        "POST /v1/events/ping",
        "GET /v1/webhooks",
        "POST /v1/webhooks",
        "GET /v1/webhooks/{id}",
        "DELETE /v1/webhooks/{id}",
        "GET /v1/webhooks/{id}/deliveries",
        "POST /v1/webhooks/{id}/deliveries/{delivery_id}/redeliver",
        "GET /v1/agents",
        "POST /v1/agents",
        "POST /v1/agents/reload",
        "GET /v1/agents/{name}",
        "PUT /v1/agents/{name}",
        "DELETE /v1/agents/{name}",
        "GET /v1/agents/{name}/status",
        "GET /v1/tasks",
        "POST /v1/tasks",
        "GET /v1/tasks/{id}",
        "GET /v1/tasks/{id}/steps",
        "POST /v1/tasks/{id}/cancel",
        "POST /v1/tasks/{id}/input",
        "POST /v1/threads",
        "GET /v1/threads/{id}/messages",
        "GET /v1/dead-letters",
        "POST /v1/dead-letters/{id}/replay",
        "DELETE /v1/dead-letters/{id}",
        "POST /v1/auth/login",
        "POST /v1/auth/refresh",
        "POST /v1/auth/logout",
        "GET /v1/members",
        "POST /v1/members",
        "PUT /v1/members/{id}",
        "DELETE /v1/members/{id}",
        "GET /v1/audit",
        "GET /v1/audit/verify",
        "GET /v1/workspaces/current/limits",
        "GET /v1/admin/workspaces/{id}/limits",
        "PUT /v1/admin/workspaces/{id}/limits",
        "GET /v1/budgets",
        "PUT /v1/budgets",
        "DELETE /v1/budgets",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(documented, expected);

    // Each documented operation is really routed (it never reaches the 404 fallback).
    for op in &documented {
        let (method, path) = op.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "key_00000000000000000000000000000000")
            .replace("{delivery_id}", "dlv_00000000000000000000000000000000")
            .replace("{name}", "nobody");
        let req = Request::builder()
            .method(method)
            .uri(&path)
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = h.send(req).await;
        assert_ne!(
            body["detail"].as_str(),
            Some("no route matches this path; see /openapi.json"),
            "{op}: {status}"
        );
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{op}");
    }
    // Protected operations say so.
    assert_eq!(
        doc["paths"]["/v1/keys"]["post"]["security"][0]["api_key"],
        json!([])
    );
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    assert!(doc["components"]["schemas"]["Problem"].is_object());
}

#[tokio::test]
async fn metrics_count_requests_by_matched_route() {
    let h = harness().await;
    let marker = "/v1/keys";
    let key = h.key("metrics", Role::Admin).await;
    let before = count(&h, "GET", marker, "200").await;
    for _ in 0..3 {
        let (status, _, _) = h.send(get(marker, Some(&key))).await;
        assert_eq!(status, StatusCode::OK);
    }
    // Other tests in this binary share the process's recorder, so compare a delta.
    let after = count(&h, "GET", marker, "200").await;
    assert!(after >= before + 3, "{before} -> {after}");
    let (_, _, text) = h.send(get("/metrics", None)).await;
    assert!(
        text.as_str()
            .unwrap()
            .contains("keel_http_request_duration_seconds_bucket")
    );
}

async fn count(h: &Harness, method: &str, route: &str, status: &str) -> u64 {
    let (_, _, text) = h.send(get("/metrics", None)).await;
    let needle = format!(
        "keel_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} "
    );
    text.as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// docs/security.md's role matrix is /openapi.json's access per operation, rendered: a
/// route added, moved to another group or given another scope must show in the docs.
#[tokio::test]
async fn the_documented_role_matrix_is_the_one_in_code() {
    let h = harness().await;
    let (_, _, doc) = h.send(get("/openapi.json", None)).await;
    let mut rows = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let role = op["x-required-role"].as_str().unwrap_or("none (public)");
            let scope = op["x-required-scope"]
                .as_str()
                .map_or("-".to_owned(), |s| format!("`{s}`"));
            let operator = if op["x-operator-only"] == true {
                "yes"
            } else {
                ""
            };
            rows.push(format!(
                "| {} | `{path}` | {role} | {scope} | {operator} |",
                method.to_uppercase()
            ));
        }
    }
    rows.sort();
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/security.md"
    ))
    .unwrap();
    let table = docs
        .split("<!-- role-matrix:begin -->\n")
        .nth(1)
        .and_then(|rest| rest.split("<!-- role-matrix:end -->").next())
        .unwrap();
    let mut documented: Vec<&str> = table.lines().skip(2).collect();
    documented.sort_unstable();
    assert_eq!(documented, rows, "regenerate the table in docs/security.md");
}
