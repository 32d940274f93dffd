//! Security and tenancy over real HTTP: the isolation sweep of every documented route,
//! the JWT attack set, refresh rotation and reuse, login throttling, scopes and model
//! allowlists, rate limits (in process, shared through a real Redis, and Redis stopped),
//! the audit log, CORS and security headers.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keel_core::auth::{Email, Role};
use keel_core::config::{Config, Tier};
use keel_core::workspace::WorkspaceName;
use keel_server::{AppState, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-secret-long-enough-for-hs256-signing-0001";
const PASSWORD: &str = "correct horse battery staple";

struct Node {
    url: String,
    state: AppState,
    http: reqwest::Client,
    shutdown: CancellationToken,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn node_with(config: impl FnOnce(&mut Config)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.data_dir = dir.path().to_owned();
    cfg.auth.jwt_secret = Some(SECRET.to_owned().into());
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    config(&mut cfg);
    let store = keel_store::open(&cfg).await.unwrap();
    store.migrate().await.unwrap();
    start(store, cfg, Some(dir)).await
}

async fn start(
    store: Arc<dyn keel_store::Store>,
    cfg: Config,
    dir: Option<tempfile::TempDir>,
) -> Node {
    let shutdown = CancellationToken::new();
    let state = super::api::state_for(store, cfg, shutdown.clone()).await;
    let server = Server::bind(state.clone(), shutdown.clone()).await.unwrap();
    let url = format!("http://{}", server.local_addr().unwrap());
    tokio::spawn(server.run());
    Node {
        url,
        state,
        http: reqwest::Client::new(),
        shutdown,
        _dir: dir,
    }
}

impl Node {
    async fn key(&self, workspace: &str, role: Role) -> String {
        self.key_with(workspace, role, Default::default()).await
    }

    async fn key_with(
        &self,
        workspace: &str,
        role: Role,
        limits: keel_server::auth::KeyLimits,
    ) -> String {
        let ws = self.workspace(workspace).await;
        let (token, _) = keel_server::auth::issue_key(self.state.store(), ws, role, None, limits)
            .await
            .unwrap();
        token.expose().to_owned()
    }

    async fn workspace(&self, name: &str) -> keel_core::id::WorkspaceId {
        self.state
            .store()
            .ensure_workspace(&WorkspaceName::parse(name).unwrap())
            .await
            .unwrap()
            .id
    }

    async fn user(&self, email: &str, workspace: &str, role: Role) -> keel_core::id::UserId {
        let hash = keel_server::session::hash_password(PASSWORD.to_owned())
            .await
            .unwrap();
        let user = self
            .state
            .store()
            .create_user(&Email::parse(email).unwrap(), &hash)
            .await
            .unwrap();
        let ws = self.workspace(workspace).await;
        self.state
            .store()
            .set_membership(ws, user.id, role)
            .await
            .unwrap();
        user.id
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }

    async fn get(&self, path: &str, key: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.call(reqwest::Method::GET, path, Some(key), None).await
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.call(reqwest::Method::POST, path, key, Some(body))
            .await
    }

    async fn login(&self, email: &str, password: &str) -> (StatusCode, Value) {
        let (status, _, body) = self
            .post(
                "/v1/auth/login",
                None,
                json!({"email": email, "password": password}),
            )
            .await;
        (status, body)
    }
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn every_route_refuses_another_workspaces_credentials_and_ids() {
    let n = node_with(|c| c.webhooks.allow_private = true).await;
    let a = n.key("tenant-a", Role::Admin).await;
    let b = n.key("tenant-b", Role::Admin).await;
    let a_ws = n.workspace("tenant-a").await;

    // Workspace A's resources, one of each kind a path can name.
    let (st, _, agent) = n
        .post("/v1/agents", Some(&a), json!({"name": "secret-agent"}))
        .await;
    assert_eq!(st, 201, "{agent}");
    let (st, _, task) = n
        .post(
            "/v1/tasks",
            Some(&a),
            json!({"agent": "secret-agent", "input": "hi", "mode": "background"}),
        )
        .await;
    assert_eq!(st, 202, "{task}");
    let (st, _, thread) = n.post("/v1/threads", Some(&a), json!({})).await;
    assert_eq!(st, 201, "{thread}");
    let (st, _, hook) = n
        .post(
            "/v1/webhooks",
            Some(&a),
            json!({"url": "http://127.0.0.1:9/a"}),
        )
        .await;
    assert_eq!(st, 201, "{hook}");
    let (st, _, key) = n
        .post("/v1/keys", Some(&a), json!({"role": "viewer"}))
        .await;
    assert_eq!(st, 201, "{key}");
    let (st, _, member) = n
        .post(
            "/v1/members",
            Some(&a),
            json!({"email": "alice@a.example", "role": "member", "password": PASSWORD}),
        )
        .await;
    assert_eq!(st, 201, "{member}");
    let ids: BTreeMap<&str, String> = BTreeMap::from([
        ("/v1/keys/", s(&key["id"])),
        ("/v1/webhooks/", s(&hook["id"])),
        ("/v1/tasks/", s(&task["id"])),
        ("/v1/threads/", s(&thread["id"])),
        ("/v1/dead-letters/", s(&task["id"])),
        ("/v1/agents/", s(&agent["name"])),
        ("/v1/members/", s(&member["user_id"])),
        ("/v1/admin/workspaces/", a_ws.to_string()),
    ]);
    let secrets: Vec<String> = ids
        .values()
        .cloned()
        .chain([a_ws.to_string(), s(&agent["id"])])
        .collect();
    // A valid body for each route that takes one and names an id, so a 400 for a bad
    // body cannot hide whether B reached A's resource.
    let bodies: BTreeMap<&str, Value> = BTreeMap::from([
        ("PUT /v1/agents/{name}", json!({"name": "secret-agent"})),
        ("POST /v1/tasks/{id}/cancel", json!({})),
        ("POST /v1/tasks/{id}/input", json!({"action": "approve"})),
        ("PUT /v1/members/{id}", json!({"role": "viewer"})),
        (
            "PUT /v1/admin/workspaces/{id}/limits",
            json!({"tier": "free"}),
        ),
        ("POST /v1/dead-letters/{id}/replay", json!({})),
    ]);

    let (_, _, doc) = n
        .call(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    let mut swept = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(role) = op.get("x-required-role") else {
                continue; // public: health, metrics, the API description, login
            };
            assert!(
                op.get("x-required-scope").is_some(),
                "{method} {path} states no scope"
            );
            assert!(["viewer", "member", "admin"].contains(&role.as_str().unwrap()));
            let op_name = format!("{} {path}", method.to_uppercase());
            let mut concrete = path.clone();
            let has_ids = path.contains('{');
            if has_ids {
                let prefix = ids
                    .keys()
                    .find(|p| path.starts_with(*p))
                    .unwrap_or_else(|| {
                        panic!(
                            "{op_name}: the sweep has no id of workspace A for this path; add one"
                        )
                    });
                let id = &ids[prefix];
                let name = path[prefix.len()..].split('/').next().unwrap().to_owned();
                concrete = concrete.replacen(&name, id, 1);
                concrete = concrete.replace(
                    "{delivery_id}",
                    &keel_core::id::DeliveryId::new().to_string(),
                );
            }
            if op_name == "GET /v1/ws" || op_name == "GET /v1/events" {
                // Streams: the status of the response head is what can leak.
                let res = n
                    .http
                    .get(format!("{}{concrete}", n.url))
                    .bearer_auth(&b)
                    .send()
                    .await
                    .unwrap();
                assert!(
                    !res.status().is_server_error(),
                    "{op_name}: {}",
                    res.status()
                );
                continue;
            }
            let m: reqwest::Method = method.to_uppercase().parse().unwrap();
            let body = bodies.get(op_name.as_str()).cloned().or_else(|| {
                matches!(m, reqwest::Method::POST | reqwest::Method::PUT).then(|| json!({}))
            });
            let (status, _, response) = n.call(m, &concrete, Some(&b), body).await;
            swept += 1;
            assert!(
                !status.is_server_error(),
                "{op_name} as B: {status} {response}"
            );
            if has_ids {
                assert!(
                    status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN,
                    "{op_name} with A's id as B: {status} {response}"
                );
            }
            // A problem's `instance` repeats the path the caller sent: not a leak.
            let mut response = response;
            if let Some(o) = response.as_object_mut() {
                o.remove("instance");
            }
            let text = response.to_string();
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "{op_name} as B leaked {secret}: {text}"
                );
            }
        }
    }
    assert!(swept >= 40, "only {swept} routes swept");
    // A's things are untouched.
    let (st, _, again) = n
        .get(&format!("/v1/agents/{}", s(&agent["name"])), &a)
        .await;
    assert_eq!((st, again["version"].as_i64()), (StatusCode::OK, Some(1)));
    let (st, _, keys) = n.get("/v1/keys", &a).await;
    assert_eq!(st, 200);
    assert!(
        keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["revoked_at"].is_null()),
        "{keys}"
    );
}

fn forge(claims: Value, alg: Algorithm, secret: &str, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn sessions_resist_the_jwt_attack_set() {
    use base64::Engine as _;
    let n = node_with(|_| {}).await;
    n.user("ada@example.com", "jwt", Role::Viewer).await;
    let (st, tokens) = n.login("ADA@example.com", PASSWORD).await;
    assert_eq!(st, 200, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["role"], "viewer");
    let access = s(&tokens["access_token"]);
    let (st, _, ws) = n.get("/v1/workspaces/current", &access).await;
    assert_eq!((st, ws["name"].as_str()), (StatusCode::OK, Some("jwt")));

    // Role too low: 403 naming the role needed.
    let (st, _, p) = n
        .post(
            "/v1/tasks",
            Some(&access),
            json!({"agent": "x", "input": "y"}),
        )
        .await;
    assert_eq!(st, 403);
    assert!(s(&p["detail"]).contains("requires role member"), "{p}");

    // The attack set, each against the same route: 401 with a reason.
    let header_b64 = access.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header_b64)
            .unwrap(),
    )
    .unwrap();
    let kid = header["kid"].as_str().unwrap().to_owned();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(access.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let with = |patch: Value| {
        let mut c = claims.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let none = format!(
        "{}.{}.",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        access.split('.').nth(1).unwrap()
    );
    let attacks = [
        ("alg none", none, "algorithm"),
        (
            "HS512",
            forge(claims.clone(), Algorithm::HS512, SECRET, Some(&kid)),
            "algorithm",
        ),
        (
            "wrong key",
            forge(
                claims.clone(),
                Algorithm::HS256,
                "another-secret-that-is-long-enough-000000",
                Some(&kid),
            ),
            "signature",
        ),
        (
            "no kid",
            forge(claims.clone(), Algorithm::HS256, SECRET, None),
            "signature",
        ),
        (
            "expired",
            forge(
                with(json!({"exp": now - 120, "nbf": now - 1000})),
                Algorithm::HS256,
                SECRET,
                Some(&kid),
            ),
            "expired",
        ),
        (
            "not yet valid",
            forge(
                with(json!({"nbf": now + 600})),
                Algorithm::HS256,
                SECRET,
                Some(&kid),
            ),
            "not valid yet",
        ),
        (
            "wrong audience",
            forge(
                with(json!({"aud": "someone-else"})),
                Algorithm::HS256,
                SECRET,
                Some(&kid),
            ),
            "audience",
        ),
        (
            "role raised, old signature",
            {
                let forged = forge(
                    with(json!({"role": "admin"})),
                    Algorithm::HS256,
                    "x-secret-that-is-long-enough-for-a-forgery",
                    Some(&kid),
                );
                let mut parts: Vec<&str> = forged.split('.').collect();
                parts[2] = access.split('.').nth(2).unwrap();
                parts.join(".")
            },
            "signature",
        ),
    ];
    for (name, token, reason) in attacks {
        let (st, headers, p) = n.get("/v1/workspaces/current", &token).await;
        assert_eq!(st, 401, "{name}: {p}");
        assert!(s(&p["detail"]).contains(reason), "{name}: {p}");
        assert_eq!(
            headers["www-authenticate"], "Bearer realm=\"keel\"",
            "{name}"
        );
    }
    // A forged token signed with the real secret would pass: the attack set is refused
    // for the right reasons, not because every token is.
    let genuine = forge(claims.clone(), Algorithm::HS256, SECRET, Some(&kid));
    assert_eq!(n.get("/v1/workspaces/current", &genuine).await.0, 200);

    // Revoked and expired API keys: 401.
    let key = n.key("jwt", Role::Admin).await;
    let (_, _, keys) = n.get("/v1/keys", &key).await;
    let id = s(&keys["data"][0]["id"]);
    let (st, _, _) = n
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/keys/{id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(n.get("/v1/workspaces/current", &key).await.0, 401);
    let expiring = n
        .key_with(
            "jwt",
            Role::Admin,
            keel_server::auth::KeyLimits {
                expires_at: Some(
                    time::OffsetDateTime::now_utc() + time::Duration::milliseconds(300),
                ),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(n.get("/v1/workspaces/current", &expiring).await.0, 200);
    // Remembered by the key cache (5 s), yet refused the moment it expires.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (st, _, p) = n.get("/v1/workspaces/current", &expiring).await;
    assert_eq!(st, 401);
    assert!(s(&p["detail"]).contains("expired"), "{p}");
}

#[tokio::test]
async fn refresh_rotates_and_a_replayed_token_revokes_the_session() {
    let n = node_with(|_| {}).await;
    n.user("bo@example.com", "sessions", Role::Member).await;
    let (_, first) = n.login("bo@example.com", PASSWORD).await;
    let r1 = s(&first["refresh_token"]);
    let (st, _, second) = n
        .post("/v1/auth/refresh", None, json!({"refresh_token": r1}))
        .await;
    assert_eq!(st, 200, "{second}");
    let r2 = s(&second["refresh_token"]);
    assert_ne!(r1, r2);
    assert_eq!(second["session_id"], first["session_id"]);
    assert_eq!(
        n.get("/v1/workspaces/current", &s(&second["access_token"]))
            .await
            .0,
        200
    );

    // r1 again: theft. 401, and r2 (the live one) dies with its session.
    let (st, _, p) = n
        .post("/v1/auth/refresh", None, json!({"refresh_token": r1}))
        .await;
    assert_eq!(st, 401);
    assert!(s(&p["detail"]).contains("already used"), "{p}");
    let (st, _, _) = n
        .post("/v1/auth/refresh", None, json!({"refresh_token": r2}))
        .await;
    assert_eq!(st, 401);

    // Logout: the refresh token stops working; logging out twice is fine.
    let (_, third) = n.login("bo@example.com", PASSWORD).await;
    let r3 = s(&third["refresh_token"]);
    let (st, _, _) = n
        .post("/v1/auth/logout", None, json!({"refresh_token": r3}))
        .await;
    assert_eq!(st, 204);
    assert_eq!(
        n.post("/v1/auth/logout", None, json!({"refresh_token": r3}))
            .await
            .0,
        204
    );
    assert_eq!(
        n.post("/v1/auth/refresh", None, json!({"refresh_token": r3}))
            .await
            .0,
        401
    );

    // The audit log has the login, the reuse and the logout, with where they came from.
    let admin = n.key("sessions", Role::Admin).await;
    let (_, _, log) = n.get("/v1/audit?action=auth.*", &admin).await;
    let actions: Vec<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "auth.login",
            "auth.refresh_reused",
            "auth.login",
            "auth.logout"
        ],
        "{log}"
    );
    assert_eq!(log["data"][0]["ip"], "127.0.0.1");
    assert!(log["data"][0]["request_id"].is_string());
}

#[tokio::test]
async fn logins_are_throttled_per_account_and_per_address() {
    let n = node_with(|c| {
        c.auth.login_failures = 3;
        c.auth.login_attempts_per_ip = 8;
    })
    .await;
    n.user("cy@example.com", "throttle", Role::Member).await;
    n.user("di@example.com", "throttle", Role::Member).await;
    for _ in 0..3 {
        let (st, p) = n.login("cy@example.com", "wrong password!!").await;
        assert_eq!(st, 401, "{p}");
        assert_eq!(s(&p["detail"]), "wrong email or password");
    }
    // Locked: even the right password gets 429, without being checked.
    let (st, _, p) = n
        .post(
            "/v1/auth/login",
            None,
            json!({"email": "cy@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(st, 429, "{p}");
    assert!(
        s(&p["detail"]).contains("failed logins for this account"),
        "{p}"
    );
    // Another account from the same address still logs in...
    assert_eq!(n.login("di@example.com", PASSWORD).await.0, 200);
    // ...an unknown account answers like a wrong password...
    assert_eq!(n.login("nobody@example.com", PASSWORD).await.0, 401);
    // ...until the address has spent its 8 attempts (5 so far: the locked one was
    // refused before it counted).
    for _ in 0..3 {
        assert_ne!(n.login("di@example.com", PASSWORD).await.0, 429);
    }
    let (st, headers, p) = n
        .post(
            "/v1/auth/login",
            None,
            json!({"email": "di@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(st, 429, "{p}");
    assert!(s(&p["detail"]).contains("from this address"), "{p}");
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // The failed logins are on the workspace's record.
    let admin = n.key("throttle", Role::Admin).await;
    // (Written in the background, so a wrong password answers as fast as for nobody.)
    let mut log = Value::Null;
    for _ in 0..100 {
        log = n.get("/v1/audit?action=auth.login_failed", &admin).await.2;
        if log["data"].as_array().is_some_and(|d| d.len() >= 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(log["data"].as_array().unwrap().len(), 3, "{log}");
    assert_eq!(log["data"][0]["actor"], "cy@example.com");
}

#[tokio::test]
async fn scopes_and_model_allowlists_limit_a_key_within_its_role() {
    use keel_core::auth::{Scope, Scopes};
    let n = node_with(|_| {}).await;
    let read_only = n
        .key_with(
            "scoped",
            Role::Admin,
            keel_server::auth::KeyLimits {
                scopes: Scopes::from_list(&[Scope::Read]).unwrap(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(n.get("/v1/tasks", &read_only).await.0, 200);
    let (st, _, p) = n
        .post("/v1/keys", Some(&read_only), json!({"role": "viewer"}))
        .await;
    assert_eq!(st, 403);
    assert!(s(&p["detail"]).contains("scope `admin`"), "{p}");

    let small_only = n
        .key_with(
            "scoped",
            Role::Member,
            keel_server::auth::KeyLimits {
                models: Some(vec!["small".into()]),
                ..Default::default()
            },
        )
        .await;
    let chat = json!({"model": "default", "messages": [{"role": "user", "content": "hi"}]});
    let (st, _, p) = n
        .post("/v1/chat/completions", Some(&small_only), chat.clone())
        .await;
    assert_eq!(st, 403);
    assert!(
        s(&p["detail"]).contains("may not call model \"default\""),
        "{p}"
    );
    let any = n.key("scoped", Role::Member).await;
    assert_eq!(
        n.post("/v1/chat/completions", Some(&any), chat).await.0,
        200
    );

    // Created through the API, a key states its limits; a bad scope is named.
    let admin = n.key("scoped", Role::Admin).await;
    let (st, _, created) = n
        .post("/v1/keys", Some(&admin), json!({"role": "member", "scopes": ["gateway"], "models": ["small"], "expires_at": "2099-01-01T00:00:00Z"}))
        .await;
    assert_eq!(st, 201, "{created}");
    assert_eq!(created["scopes"], json!(["gateway"]));
    assert_eq!(created["models"], json!(["small"]));
    assert_eq!(created["expires_at"], "2099-01-01T00:00:00Z");
    let (st, _, p) = n
        .post(
            "/v1/keys",
            Some(&admin),
            json!({"role": "member", "scopes": ["root"]}),
        )
        .await;
    assert_eq!(st, 400);
    assert!(s(&p["detail"]).contains("tasks:write"), "{p}");
    let (st, _, _) = n
        .post(
            "/v1/keys",
            Some(&admin),
            json!({"role": "member", "expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(st, 400);
}

fn tight_tiers(c: &mut Config) {
    c.limits.tiers.insert(
        "tight".into(),
        Tier {
            rpm: Some(5),
            key_rpm: Some(3),
            tpm: Some(2_000),
            key_tpm: None,
        },
    );
    c.limits.default_tier = "tight".into();
}

#[tokio::test]
async fn requests_past_a_limit_get_429_with_rate_limit_headers() {
    let n = node_with(tight_tiers).await;
    let one = n.key("limited", Role::Member).await;
    let two = n.key("limited", Role::Member).await;
    for remaining in [2, 1, 0] {
        let (st, h, _) = n.get("/v1/tasks", &one).await;
        assert_eq!(st, 200);
        assert_eq!(h["ratelimit-limit"], "3");
        assert_eq!(h["ratelimit-remaining"], remaining.to_string().as_str());
        assert!(
            h["ratelimit-reset"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                <= 60
        );
    }
    let (st, h, p) = n.get("/v1/tasks", &one).await;
    assert_eq!(st, 429, "{p}");
    assert!(
        s(&p["detail"]).contains("this credential's requests per minute"),
        "{p}"
    );
    assert!(s(&p["detail"]).contains("tier tight"), "{p}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(h["ratelimit-remaining"], "0");
    // The second key has its own 3, within the workspace's 5 (3 spent): 2 left.
    assert_eq!(n.get("/v1/tasks", &two).await.0, 200);
    assert_eq!(n.get("/v1/tasks", &two).await.0, 200);
    let (st, _, p) = n.get("/v1/tasks", &two).await;
    assert_eq!(st, 429);
    assert!(
        s(&p["detail"]).contains("the workspace's requests per minute"),
        "{p}"
    );

    // An operator lifts the workspace's limit at run time; a workspace's own admin cannot.
    let own_admin = n.key("limited", Role::Admin).await;
    let ws = n.workspace("limited").await;
    let path = format!("/v1/admin/workspaces/{ws}/limits");
    let (st, _, _) = n
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&own_admin),
            Some(json!({"tier": "unlimited"})),
        )
        .await;
    assert_eq!(st, 403);
    let operator = n.key("default", Role::Admin).await;
    let (st, _, p) = n
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&operator),
            Some(json!({"tier": "gold"})),
        )
        .await;
    assert_eq!(st, 400);
    assert!(s(&p["detail"]).contains("unlimited"), "{p}");
    let (st, _, view) = n
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&operator),
            Some(json!({"tier": "unlimited"})),
        )
        .await;
    assert_eq!(st, 200, "{view}");
    assert_eq!(view["tier"], "unlimited");
    let (st, h, _) = n.get("/v1/tasks", &two).await;
    assert_eq!(st, 200);
    assert!(h.get("ratelimit-limit").is_none());
    let (_, _, mine) = n.get("/v1/workspaces/current/limits", &two).await;
    assert_eq!(mine["tier"], "unlimited");
    let (_, _, log) = n.get("/v1/audit?action=limits.changed", &own_admin).await;
    assert_eq!(log["data"].as_array().unwrap().len(), 1, "{log}");
}

#[tokio::test]
async fn tokens_per_minute_are_reserved_and_settled() {
    let n = node_with(|c| {
        c.limits.tiers.insert(
            "tokens".into(),
            Tier {
                tpm: Some(2_000),
                ..Tier::default()
            },
        );
        c.limits.default_tier = "tokens".into();
    })
    .await;
    let key = n.key("tokens", Role::Member).await;
    // Each request reserves its prompt / 4 + max_tokens (900): two fit in 2,000 at once,
    // a third does not — until the first two are settled to what they really used.
    let chat = json!({"model": "default", "max_tokens": 900, "messages": [{"role": "user", "content": "hi"}]});
    let big = json!({"model": "default", "max_tokens": 1900, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        n.post("/v1/chat/completions", Some(&key), chat.clone())
            .await
            .0,
        200
    );
    assert_eq!(
        n.post("/v1/chat/completions", Some(&key), chat.clone())
            .await
            .0,
        200
    );
    // Settled: the echo mock used a handful of tokens each, so 1,900 fits now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        n.post("/v1/chat/completions", Some(&key), big.clone())
            .await
            .0,
        200
    );
    // A request asking for more than the whole limit reserves the whole bucket (it could
    // otherwise never pass): the next one waits while its reservation is held.
    let huge = json!({"model": "default", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]});
    let mut first = StatusCode::TOO_MANY_REQUESTS;
    for _ in 0..50 {
        first = n
            .post("/v1/chat/completions", Some(&key), huge.clone())
            .await
            .0;
        if first == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the bucket refills
    }
    assert_eq!(
        first, 200,
        "a request over the limit passes on a full bucket"
    );
    // A request that uses more than it reserved (the echo repeats a 1,500-word prompt:
    // about 3,000 tokens) overdraws the bucket when it settles; then nothing fits for a
    // while.
    let long = json!({"model": "default", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "word ".repeat(1500)}]});
    let mut passed = false;
    for _ in 0..50 {
        if n.post("/v1/chat/completions", Some(&key), long.clone())
            .await
            .0
            == StatusCode::OK
        {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(passed, "the long request got through");
    let small = json!({"model": "default", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
    let mut refused = Value::Null;
    for _ in 0..50 {
        let (st, _, p) = n
            .post("/v1/chat/completions", Some(&key), small.clone())
            .await;
        if st == StatusCode::TOO_MANY_REQUESTS {
            refused = p;
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(
        s(&refused["detail"]).contains("the workspace's tokens per minute"),
        "{refused}"
    );
}

/// A redis-server of the test's own on a free port, so stopping it disturbs nobody.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed on these machines");
        // Owned at once, so a failure below still stops and reaps it (Drop).
        let redis = Self { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(redis);
        panic!("redis-server did not start on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn two_instances_share_one_limit_through_redis_and_fall_back_when_it_stops() {
    let mut redis = OwnRedis::start();
    let url = keel_store::testing::fresh_postgres_db().await.unwrap();
    let Some(url) = url else {
        panic!("Postgres is needed for two instances sharing a database");
    };
    let config = |c: &mut Config| {
        tight_tiers(c);
        c.database.url = Some(url.clone().into());
        c.redis.url = Some(redis.url().into());
    };
    let first = node_with(config).await;
    let second = node_with(config).await;
    for n in [&first, &second] {
        for _ in 0..100 {
            if n.state.limiter().shared() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            n.state.limiter().shared(),
            "the limiter never connected to Redis"
        );
    }
    let key = first.key("shared", Role::Member).await;
    // One credential, limit 3 per minute, requests alternating between the instances.
    let mut statuses = Vec::new();
    for i in 0..5 {
        let n = if i % 2 == 0 { &first } else { &second };
        statuses.push(n.get("/v1/tasks", &key).await.0.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "one limit across instances"
    );

    // Redis stops: limits fall back to each instance, requests are still served (never
    // a 5xx), and the fallback is counted.
    redis.stop();
    let other = first.key("fallback", Role::Member).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(first.get("/v1/tasks", &other).await.0.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "local limits while Redis is down"
    );
    assert!(!first.state.limiter().shared());
    let (_, _, metrics) = first
        .call(reqwest::Method::GET, "/metrics", None, None)
        .await;
    assert!(
        s(&metrics).contains("keel_ratelimit_redis_errors_total"),
        "not counted"
    );
}

#[tokio::test]
async fn the_audit_log_records_exports_and_verifies() {
    let n = node_with(|_| {}).await;
    let admin = n.key("audited", Role::Admin).await;
    let (_, _, key) = n
        .post(
            "/v1/keys",
            Some(&admin),
            json!({"role": "viewer", "name": "ci"}),
        )
        .await;
    let id = s(&key["id"]);
    n.call(
        reqwest::Method::DELETE,
        &format!("/v1/keys/{id}"),
        Some(&admin),
        None,
    )
    .await;
    n.post("/v1/agents", Some(&admin), json!({"name": "audited-agent"}))
        .await;
    let (st, _, member) = n
        .post(
            "/v1/members",
            Some(&admin),
            json!({"email": "eve@example.com", "role": "viewer", "password": PASSWORD}),
        )
        .await;
    assert_eq!(st, 201, "{member}");
    let user = s(&member["user_id"]);
    n.call(
        reqwest::Method::PUT,
        &format!("/v1/members/{user}"),
        Some(&admin),
        Some(json!({"role": "member"})),
    )
    .await;

    let res = n
        .http
        .get(format!("{}/v1/audit", n.url))
        .bearer_auth(&admin)
        .header("user-agent", "audit-test/1.0")
        .send()
        .await
        .unwrap();
    let log: Value = res.json().await.unwrap();
    let actions: Vec<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.created",
            "key.revoked",
            "agent.created",
            "user.created",
            "member.role_set",
            "member.role_set"
        ],
        "{log}"
    );
    let first = &log["data"][0];
    assert_eq!(first["target"], id.as_str());
    assert_eq!(first["ip"], "127.0.0.1");
    assert!(first["actor"].as_str().unwrap().starts_with("key_"));
    assert_eq!(log["data"][5]["data"]["previous"], "viewer");
    // Paging with the cursor.
    let (_, _, page) = n.get("/v1/audit?limit=4", &admin).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 4);
    let (_, _, rest) = n
        .get(&format!("/v1/audit?after={}", page["next_after"]), &admin)
        .await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 2);
    assert!(rest["next_after"].is_null());
    // Exports.
    let csv = n
        .http
        .get(format!("{}/v1/audit?format=csv", n.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = csv.text().await.unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .starts_with("seq,id,at,actor,action")
    );
    let jsonl = n
        .http
        .get(format!("{}/v1/audit?format=jsonl", n.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[3]["action"], "user.created");
    let (st, _, p) = n.get("/v1/audit?format=xml", &admin).await;
    assert_eq!(st, 400);
    assert!(s(&p["detail"]).contains("json, jsonl or csv"));
    // A viewer may not read it.
    let viewer = n.key("audited", Role::Viewer).await;
    assert_eq!(n.get("/v1/audit", &viewer).await.0, 403);

    let (_, _, ok) = n.get("/v1/audit/verify", &admin).await;
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["checked"], 6);
    // An entry edited in the database behind Keel's back is found.
    let path = n.state.config().sqlite_path();
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
    let changed = sqlx::query("UPDATE audit_log SET action = 'nothing.happened' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
    pool.close().await;
    let (_, _, broken) = n.get("/v1/audit/verify", &admin).await;
    assert_eq!(broken["ok"], false, "{broken}");
    assert_eq!(broken["breaks"][0]["seq"], 2, "{broken}");
}

#[tokio::test]
async fn cors_is_an_allowlist_and_responses_carry_security_headers() {
    let n = node_with(|c| c.auth.cors_origins = vec!["https://app.example.com".into()]).await;
    let preflight = |origin: &'static str| {
        n.http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/tasks", n.url))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let denied = preflight("https://evil.example.com").await.unwrap();
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let key = n.key("headers", Role::Viewer).await;
    let (_, h, _) = n.get("/v1/tasks", &key).await;
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );

    let closed = node_with(|_| {}).await;
    let res = closed
        .http
        .get(format!("{}/healthz", closed.url))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(
        res.headers().get("access-control-allow-origin").is_none(),
        "no CORS by default"
    );
}

#[tokio::test]
async fn budgets_hold_across_two_instances_under_concurrent_load() {
    let url = keel_store::testing::fresh_postgres_db()
        .await
        .unwrap()
        .expect("Postgres");
    let config = |c: &mut Config| {
        c.database.url = Some(url.clone().into());
        // The in-process echo at $1,000 per million tokens: a few cents a request.
        let route: keel_core::config::ModelRoute = serde_json::from_value(json!({
            "targets": [{"provider": "mock", "model": "echo",
                         "input_price_per_mtok": 1000.0, "output_price_per_mtok": 1000.0}]
        }))
        .unwrap();
        c.models.insert("priced".into(), route);
    };
    let first = node_with(config).await;
    let second = node_with(config).await;
    let admin = first.key("spender", Role::Admin).await;
    let (st, _, b) = first
        .call(
            reqwest::Method::PUT,
            "/v1/budgets",
            Some(&admin),
            Some(json!({"period": "daily", "limit_usd": 0.25})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["resets_at"].as_str().unwrap().len(), 20, "{b}");
    let member = first.key("spender", Role::Member).await;
    let chat = json!({"model": "priced", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "spend a little money please"}]});
    // 60 requests at once, half through each instance.
    let mut handles = Vec::new();
    for i in 0..60 {
        let (http, url, key, chat) = (
            first.http.clone(),
            if i % 2 == 0 {
                first.url.clone()
            } else {
                second.url.clone()
            },
            member.clone(),
            chat.clone(),
        );
        handles.push(tokio::spawn(async move {
            let res = http
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&chat)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }));
    }
    let mut ok = 0;
    let mut refused = None;
    for h in handles {
        match h.await.unwrap() {
            (200, _) => ok += 1,
            (402, p) => refused = Some(p),
            (other, p) => panic!("{other}: {p}"),
        }
    }
    let p = refused.expect("the budget refused some requests");
    assert!(s(&p["detail"]).contains("workspace daily budget"), "{p}");
    assert!(s(&p["detail"]).contains("resets at"), "{p}");
    // Each request reserves its maximum ($0.051) while in flight: at least 4 fit at once.
    assert!(ok >= 4, "{ok}");
    // Then, one at a time, the rest of the budget is spent until a request would pass it.
    let ws = first.workspace("spender").await;
    let mut last = 0;
    for i in 0..200 {
        let n = if i % 2 == 0 { &first } else { &second };
        last = n
            .post("/v1/chat/completions", Some(&member), chat.clone())
            .await
            .0
            .as_u16();
        if last == 402 {
            break;
        }
        assert_eq!(last, 200);
        // Let this request settle before the next reserves.
        for _ in 0..100 {
            if first.state.store().budgets(ws).await.unwrap()[0].reserved_nanousd == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(last, 402, "the budget never refused");
    let mut budget = None;
    for _ in 0..100 {
        let b = first.state.store().budgets(ws).await.unwrap().remove(0);
        if b.reserved_nanousd == 0 {
            budget = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let budget = budget.expect("reservations drained");
    // The usage log agrees with the budget: it is what was really spent.
    let mut spent_in_usage = 0i64;
    for _ in 0..100 {
        let (_, _, usage) = first.get("/v1/usage?group_by=route", &admin).await;
        spent_in_usage = usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["cost_usd"].as_f64().unwrap_or(0.0) * 1e9).round() as i64)
            .sum();
        if spent_in_usage == budget.spent_nanousd {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let one_request_max = 64_000_000; // (27 + 8 prompt bytes + 16 out) tokens at $1,000/M, with room
    assert!(
        budget.spent_nanousd <= budget.limit_nanousd + one_request_max,
        "overspent: {budget:?}"
    );
    assert!(
        budget.spent_nanousd <= budget.limit_nanousd,
        "reservations keep spend within the limit: {budget:?}"
    );
    assert!(
        budget.spent_nanousd >= budget.limit_nanousd / 2,
        "the budget was used: {budget:?}"
    );
    assert_eq!(
        spent_in_usage, budget.spent_nanousd,
        "usage and budget agree"
    );

    // Embeddings are held to the budget too: 100 KB of input at $1,000/M tokens is more
    // than what is left.
    let big = json!({"model": "priced", "input": "x".repeat(100_000)});
    let (st, _, p) = first.post("/v1/embeddings", Some(&member), big).await;
    assert_eq!(st, 402, "{p}");

    // Alerts: 50 and 80 % once each (100 % only if spend reached the limit exactly).
    let events = first.state.store().events_after(ws, 0, 1000).await.unwrap();
    let alerts: Vec<i64> = events
        .iter()
        .filter(|e| e.event_type == "billing.threshold.reached")
        .map(|e| e.data["threshold_percent"].as_i64().unwrap())
        .collect();
    assert!(
        alerts.starts_with(&[50, 80]) && alerts.len() <= 3,
        "{alerts:?}"
    );
    let alert = events
        .iter()
        .find(|e| e.event_type == "billing.threshold.reached")
        .unwrap();
    assert_eq!(alert.data["scope"], "workspace");
    assert_eq!(alert.data["period"], "daily");
    assert_eq!(alert.data["limit_usd"], 0.25);
}

#[tokio::test]
async fn agent_runs_are_held_to_the_workspace_budget_too() {
    let n = node_with(|c| {
        let route: keel_core::config::ModelRoute = serde_json::from_value(json!({
            "targets": [{"provider": "mock", "model": "echo",
                         "input_price_per_mtok": 1000.0, "output_price_per_mtok": 1000.0}]
        }))
        .unwrap();
        c.models.insert("priced".into(), route);
    })
    .await;
    let admin = n.key("agents-spend", Role::Admin).await;
    let (st, _, _) = n
        .post(
            "/v1/agents",
            Some(&admin),
            json!({"name": "spender", "model": "priced"}),
        )
        .await;
    assert_eq!(st, 201);
    // Room for one step's reservation (prompt + 4,096 output tokens at $1,000/M ≈ $4.1).
    let (st, _, _) = n
        .call(
            reqwest::Method::PUT,
            "/v1/budgets",
            Some(&admin),
            Some(json!({"period": "monthly", "limit_usd": 5.0})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _, task) = n
        .post(
            "/v1/tasks",
            Some(&admin),
            json!({"agent": "spender", "input": "hello"}),
        )
        .await;
    assert_eq!(st, 200, "{task}");
    assert_eq!(task["status"], "completed", "{task}");
    let ws = n.workspace("agents-spend").await;
    let mut spent = 0;
    for _ in 0..100 {
        let b = n.state.store().budgets(ws).await.unwrap().remove(0);
        if b.reserved_nanousd == 0 && b.spent_nanousd > 0 {
            spent = b.spent_nanousd;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cost = (task["usage"]["cost_usd"].as_f64().unwrap() * 1e9).round() as i64;
    assert!(cost > 0, "{task}");
    assert_eq!(spent, cost, "the budget holds what the step cost: {task}");

    // A budget too small for a step's maximum cost: the task fails, naming it.
    let (st, _, _) = n
        .call(
            reqwest::Method::PUT,
            "/v1/budgets",
            Some(&admin),
            Some(json!({"period": "monthly", "limit_usd": 1.0})),
        )
        .await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(5_100)).await; // the runtime's budget cache
    let (st, _, task) = n
        .post(
            "/v1/tasks",
            Some(&admin),
            json!({"agent": "spender", "input": "hello again"}),
        )
        .await;
    assert_eq!(st, 200, "{task}");
    assert_eq!(task["status"], "failed", "{task}");
    assert_eq!(task["error"]["kind"], "budget", "{task}");
    assert!(
        s(&task["error"]["message"]).contains("workspace monthly budget"),
        "{task}"
    );
}

#[tokio::test]
async fn a_key_can_have_its_own_tier() {
    let n = node_with(|c| {
        c.limits.tiers.insert(
            "tiny".into(),
            Tier {
                key_rpm: Some(2),
                ..Tier::default()
            },
        );
    })
    .await;
    let admin = n.key("tiers", Role::Admin).await;
    let (st, _, created) = n
        .post(
            "/v1/keys",
            Some(&admin),
            json!({"role": "viewer", "tier": "tiny"}),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    assert_eq!(created["tier"], "tiny");
    let tiny = s(&created["key"]);
    assert_eq!(n.get("/v1/tasks", &tiny).await.0, 200);
    assert_eq!(n.get("/v1/tasks", &tiny).await.0, 200);
    let (st, _, p) = n.get("/v1/tasks", &tiny).await;
    assert_eq!(st, 429, "{p}");
    assert!(
        s(&p["detail"])
            .contains("this credential's requests per minute is limited to 2 (tier tiny)"),
        "{p}"
    );
    // The workspace (tier unlimited) and its other keys are not limited by it.
    for _ in 0..5 {
        assert_eq!(n.get("/v1/tasks", &admin).await.0, 200);
    }
    let (st, _, p) = n
        .post(
            "/v1/keys",
            Some(&admin),
            json!({"role": "viewer", "tier": "gold"}),
        )
        .await;
    assert_eq!(st, 400);
    assert!(
        s(&p["detail"]).contains("known: enterprise, free, pro, tiny, unlimited"),
        "{p}"
    );
}
