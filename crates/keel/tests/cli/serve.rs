//! The real binary end to end: CLI-created keys, the auth path, health, metrics, the
//! OpenAPI document, problem+json over the wire, and JSON logs.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Keel, assert_problem, client, create_key, run};

#[tokio::test]
async fn cli_key_auth_health_metrics_openapi_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let key = create_key(dir.path(), "acme", "admin", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    let http = client();

    let res = http
        .get(keel.url("/v1/workspaces/current"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = http
        .get(keel.url("/v1/workspaces/current"))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["name"], "acme");
    assert_eq!(body["role"], "admin");

    let res = http.get(keel.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["database"], "sqlite");
    assert_eq!(
        http.get(keel.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let metrics = http
        .get(keel.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"keel_http_requests_total{method="GET",route="/v1/workspaces/current",status="401"} 1"#,
        r#"keel_http_requests_total{method="GET",route="/v1/workspaces/current",status="200"} 1"#,
        r#"keel_http_requests_total{method="GET",route="/readyz",status="200"} 1"#,
        r#"keel_http_requests_total{method="GET",route="/healthz",status="200"} 1"#,
        "keel_log_lines_dropped_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line} in:\n{metrics}"
        );
    }

    let doc: Value = http
        .get(keel.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/v1/workspaces/current", "get"),
        ("/v1/keys", "post"),
        ("/v1/keys", "get"),
        ("/v1/keys/{id}", "delete"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} missing from /openapi.json"
        );
    }

    // JSON logs: the request's line carries its id, the caller's trace id and span fields.
    // Lines reach stdout in batches (within about 10 ms), so wait for them.
    let served =
        |l: &Value, route: &str| l["message"] == "request served" && l["http.route"] == route;
    crate::support::eventually(
        Duration::from_secs(5),
        "the requests' log lines",
        || async {
            let logs = keel.json_logs();
            logs.iter().any(|l| l["request_id"] == request_id.as_str())
                && logs.iter().any(|l| served(l, "/readyz"))
        },
    )
    .await;
    let logs = keel.json_logs();
    let line = logs
        .iter()
        .find(|l| l["message"] == "request served" && l["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no log line for {request_id}:\n{}", keel.output()));
    assert_eq!(
        line["trace_id"], trace_id,
        "an incoming traceparent is continued: {line}"
    );
    assert_eq!(line["span_id"].as_str().unwrap().len(), 16, "{line}");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["target"], "keel_server::middleware");
    assert_eq!(line["http.route"], "/v1/workspaces/current");
    assert!(
        line["workspace_id"].as_str().unwrap().starts_with("ws_"),
        "{line}"
    );
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
    let own = logs.iter().find(|l| served(l, "/readyz")).unwrap();
    assert_eq!(
        own["trace_id"].as_str().unwrap().len(),
        32,
        "requests without traceparent get a trace: {own}"
    );
}

#[tokio::test]
async fn bad_input_over_the_wire_is_problem_json() {
    let dir = tempfile::tempdir().unwrap();
    let key = create_key(dir.path(), "acme", "admin", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    let http = client();
    let post = || http.post(keel.url("/v1/keys")).bearer_auth(&key);

    let res = post()
        .header("content-type", "application/json")
        .body("{\"role\": ")
        .send()
        .await
        .unwrap();
    let body = assert_problem(res, 400).await;
    assert!(
        body["detail"].as_str().unwrap().contains("line 1 column"),
        "{body}"
    );

    let huge = format!(
        "{{\"role\":\"admin\",\"name\":\"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let res = post()
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["connection"],
        "close",
        "the unread body makes the connection unusable"
    );
    assert_problem(res, 413).await;

    let res = post()
        .header("content-type", "text/plain")
        .body("{\"role\":\"admin\"}")
        .send()
        .await
        .unwrap();
    assert_problem(res, 415).await;

    let res = http.get(keel.url("/no/such/route")).send().await.unwrap();
    assert_eq!(assert_problem(res, 404).await["instance"], "/no/such/route");

    let res = http.get(keel.url("/v1/keys")).send().await.unwrap();
    assert_problem(res, 401).await;
    let res = http
        .get(keel.url("/v1/keys"))
        .bearer_auth(format!("keel_{}", "x".repeat(43)))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;

    // None of it left anything behind.
    let keys: Value = http
        .get(keel.url("/v1/keys"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(keys["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn keys_cli_lists_and_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let keep = create_key(dir.path(), "acme", "member", &[]);
    let drop = create_key(dir.path(), "acme", "viewer", &[]);
    let listed = run(
        dir.path(),
        &["keys", "list", "--workspace", "acme", "--data-dir", "data"],
        &[],
    );
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(!listed.contains(&keep[6..]), "secrets are never listed");
    let viewer_line = listed.lines().find(|l| l.contains("\tviewer\t")).unwrap();
    let id = viewer_line.split('\t').next().unwrap();

    let out = run(
        dir.path(),
        &[
            "keys",
            "revoke",
            "--workspace",
            "other",
            id,
            "--data-dir",
            "data",
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "a key cannot be revoked through another workspace"
    );
    let out = run(
        dir.path(),
        &[
            "keys",
            "revoke",
            "--workspace",
            "acme",
            id,
            "--data-dir",
            "data",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let keel = Keel::start(dir.path(), &[]).await;
    let http = client();
    let res = http
        .get(keel.url("/v1/workspaces/current"))
        .bearer_auth(&drop)
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;
    let res = http
        .get(keel.url("/v1/workspaces/current"))
        .bearer_auth(&keep)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let out = run(
        dir.path(),
        &[
            "keys",
            "create",
            "--workspace",
            "Bad Name",
            "--data-dir",
            "data",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid workspace name"));
}

#[tokio::test]
async fn a_database_newer_than_the_binary_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let version = keel_store::binary_schema_version(keel_store::Backend::Sqlite);
    let out = run(dir.path(), &["migrate", "--data-dir", "data"], &[]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("migrated from version 0 to {version}"))
    );
    let out = run(dir.path(), &["migrate", "--data-dir", "data"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("already at version {version}"))
    );

    let db = dir.path().join("data").join("keel.db");
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&db))
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999, 'from a newer keel', TRUE, x'00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let out = run(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "schema is at version 999, newer than this binary knows ({version})"
        )),
        "{stderr}"
    );
}
