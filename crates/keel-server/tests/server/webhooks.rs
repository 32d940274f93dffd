//! Webhooks over real HTTP: signed deliveries (checked by the Standard Webhooks reference
//! library), order, retries, dead letters, redelivery, the delivery log, and the SSRF
//! guard.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use keel_core::config::Config;
use serde_json::{Value, json};

use crate::events::Node;

/// A webhook endpoint of our own that records what it receives and fails while told to.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    /// Requests to fail (500) before succeeding again.
    fail_next: Arc<Mutex<usize>>,
}

impl Receiver {
    async fn start(&self) -> String {
        let this = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let this = this.clone();
                async move {
                    let fail = {
                        let mut n = this.fail_next.lock().unwrap();
                        let fail = *n > 0;
                        *n = n.saturating_sub(1);
                        fail
                    };
                    this.received.lock().unwrap().push((headers, body));
                    if fail {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hook")
    }

    fn fail(&self, n: usize) {
        *self.fail_next.lock().unwrap() = n;
    }

    fn received(&self) -> Vec<(HeaderMap, String)> {
        self.received.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<(HeaderMap, String)> {
        for _ in 0..200 {
            if self.received().len() >= n {
                return self.received();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("expected {n} requests, got {}", self.received().len());
    }
}

fn config(dir: &tempfile::TempDir) -> Config {
    let mut cfg = Config::default();
    cfg.data_dir = dir.path().to_owned();
    cfg.webhooks.allow_private = true;
    cfg.webhooks.retry_base_delay = Duration::from_millis(20);
    cfg.webhooks.retry_max_delay = Duration::from_millis(50);
    cfg.webhooks.max_attempts = 3;
    cfg
}

async fn create(node: &Node, body: Value) -> (StatusCode, Value) {
    let res = reqwest::Client::new()
        .post(format!("{}/v1/webhooks", node.url))
        .bearer_auth(&node.admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        StatusCode::from_u16(res.status().as_u16()).unwrap(),
        res.json().await.unwrap(),
    )
}

async fn get_json(node: &Node, path: &str) -> Value {
    let res = node.get(path, &[]).await;
    assert_eq!(res.status(), 200, "{path}");
    res.json().await.unwrap()
}

fn seq_of(body: &str) -> i64 {
    serde_json::from_str::<Value>(body).unwrap()["seq"]
        .as_i64()
        .unwrap()
}

/// Verifies every delivery with the `standardwebhooks` PyPI package in the test venv.
fn verify_with_reference_library(secret: &str, deliveries: &[(HeaderMap, String)]) {
    let python = std::env::var("KEEL_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("KEEL_TEST_PYTHON is not set: run the suite with ./scripts/test, which makes the test venv")
    });
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/sdk/verify_webhooks.py"
    );
    let request = json!({
        "secret": secret,
        "deliveries": deliveries.iter().map(|(h, body)| json!({
            "headers": {
                "webhook-id": h["webhook-id"].to_str().unwrap(),
                "webhook-timestamp": h["webhook-timestamp"].to_str().unwrap(),
                "webhook-signature": h["webhook-signature"].to_str().unwrap(),
            },
            "body": body,
        })).collect::<Vec<_>>(),
    });
    let mut child = std::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("verified seq=").count(),
        deliveries.len(),
        "{text}"
    );
}

#[tokio::test]
async fn deliveries_are_signed_ordered_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(&dir)).await;
    node.ping("before the webhook").await;
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let (status, hook) = create(
        &node,
        json!({ "url": url, "types": "system.*", "description": "ci" }),
    )
    .await;
    assert_eq!(status, 201, "{hook}");
    let secret = hook["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(hook["cursor_seq"], 1, "starts after the newest event");
    let id = hook["id"].as_str().unwrap().to_owned();

    let mut pinged = Vec::new();
    for i in 0..5 {
        pinged.push(node.ping(&format!("p{i}")).await);
    }
    let got = receiver.wait_for(5).await;
    assert_eq!(
        got.iter().map(|(_, b)| seq_of(b)).collect::<Vec<_>>(),
        vec![2, 3, 4, 5, 6]
    );
    for ((headers, body), event) in got.iter().zip(&pinged) {
        crate::events::assert_valid(&serde_json::from_str(body).unwrap());
        assert_eq!(headers["webhook-id"], event["event_id"].as_str().unwrap());
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(serde_json::from_str::<Value>(body).unwrap(), *event);
    }
    verify_with_reference_library(&secret, &got);

    // The log has one delivered attempt per event; the secret is not shown again.
    let log = get_json(&node, &format!("/v1/webhooks/{id}/deliveries")).await;
    let rows = log["data"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert!(
        rows.iter()
            .all(|r| r["outcome"] == "delivered" && r["attempt"] == 1 && r["status_code"] == 204)
    );
    let listed = get_json(&node, "/v1/webhooks").await;
    assert_eq!(listed["data"][0]["id"], id.as_str());
    assert!(listed["data"][0].get("secret").is_none());
    assert_eq!(
        get_json(&node, &format!("/v1/webhooks/{id}")).await["cursor_seq"],
        6
    );
    node.stop().await;
}

#[tokio::test]
async fn failures_are_retried_in_order_then_dead_lettered_and_can_be_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(&dir)).await;
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let (_, hook) = create(&node, json!({ "url": url })).await;
    let id = hook["id"].as_str().unwrap().to_owned();

    // Event 1 fails twice, then succeeds on its third attempt; event 2 waits behind it.
    receiver.fail(2);
    node.ping("one").await;
    node.ping("two").await;
    let got = receiver.wait_for(4).await;
    assert_eq!(
        got.iter().map(|(_, b)| seq_of(b)).collect::<Vec<_>>(),
        vec![1, 1, 1, 2]
    );
    let ids: Vec<&str> = got
        .iter()
        .take(3)
        .map(|(h, _)| h["webhook-id"].to_str().unwrap())
        .collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "retries keep the webhook-id"
    );

    // Event 3 fails all three attempts: dead-lettered; event 4 is delivered after it.
    receiver.fail(3);
    node.ping("three").await;
    node.ping("four").await;
    let got = receiver.wait_for(8).await;
    assert_eq!(
        got[4..8].iter().map(|(_, b)| seq_of(b)).collect::<Vec<_>>(),
        vec![3, 3, 3, 4]
    );
    let dead = get_json(
        &node,
        &format!("/v1/webhooks/{id}/deliveries?outcome=dead_lettered"),
    )
    .await;
    let dead = dead["data"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["event_seq"], 3);
    assert_eq!(dead[0]["attempt"], 3);
    assert_eq!(dead[0]["status_code"], 500);
    let failed = get_json(
        &node,
        &format!("/v1/webhooks/{id}/deliveries?outcome=failed"),
    )
    .await;
    assert_eq!(failed["data"].as_array().unwrap().len(), 4);

    // The dead letter is an event, committed with its log row, and (the webhook takes
    // every type) delivered like any other, after event 4.
    let log = get_json(&node, "/v1/events?format=json&types=dead_letter.created").await;
    let letters = log["data"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    crate::events::assert_valid(letter);
    assert_eq!(letter["seq"], 5);
    assert_eq!(letter["data"]["queue"], "webhooks");
    assert_eq!(letter["data"]["attempts"], 3);
    assert_eq!(letter["data"]["job_id"], dead[0]["id"]);
    assert_eq!(letter["data"]["webhook_id"], id.as_str());
    assert_eq!(letter["data"]["event_seq"], 3);
    assert!(
        letter["data"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 500"),
        "{letter}"
    );
    let got = receiver.wait_for(9).await;
    let delivered: Value = serde_json::from_str(&got[8].1).unwrap();
    assert_eq!(delivered["event_type"], "dead_letter.created");
    assert_eq!(delivered["seq"], 5);

    // The endpoint is fixed: redeliver the dead letter.
    let res = reqwest::Client::new()
        .post(format!(
            "{}/v1/webhooks/{id}/deliveries/{}/redeliver",
            node.url,
            dead[0]["id"].as_str().unwrap()
        ))
        .bearer_auth(&node.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let again: Value = res.json().await.unwrap();
    assert_eq!(again["outcome"], "delivered");
    assert_eq!(again["event_seq"], 3);
    assert_eq!(again["attempt"], 4);
    let got = receiver.wait_for(10).await;
    assert_eq!(seq_of(&got[9].1), 3);
    node.stop().await;
}

#[tokio::test]
async fn internal_urls_bad_filters_and_secrets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.webhooks.allow_private = false;
    let node = Node::start(cfg).await;
    for (body, expect) in [
        (
            json!({ "url": "http://127.0.0.1:8080/hook" }),
            "internal address",
        ),
        (
            json!({ "url": "http://169.254.169.254/latest/meta-data" }),
            "internal address",
        ),
        (json!({ "url": "http://[::1]/hook" }), "internal address"),
        (
            json!({ "url": "http://localhost/hook" }),
            "internal address",
        ),
        (
            json!({ "url": "file:///etc/passwd" }),
            "http:// or https://",
        ),
        (
            json!({ "url": "https://93.184.216.34/h", "types": "nope.*" }),
            "types:",
        ),
        (
            json!({ "url": "https://93.184.216.34/h", "secret": "plain" }),
            "secret:",
        ),
        (
            json!({ "url": "https://93.184.216.34/h", "extra": 1 }),
            "extra",
        ),
    ] {
        let (status, problem) = create(&node, body.clone()).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(expect),
            "{body}: {problem}"
        );
    }
    assert!(
        get_json(&node, "/v1/webhooks").await["data"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing half-made"
    );
    node.stop().await;
}
