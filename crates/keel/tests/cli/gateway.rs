//! The gateway across real processes: `keel serve` routing to `keel mock-llm`, OpenAI
//! wire format in and out, and accounting that survives a SIGTERM right after a burst.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Keel, client, create_key, eventually};

/// Starts `keel mock-llm --port 0` and returns the process and its base URL.
async fn mock_llm(dir: &std::path::Path) -> (tokio::process::Child, String) {
    crate::support::mock_llm(dir, &[]).await
}

#[tokio::test]
async fn serve_routes_to_mock_llm_and_accounts_every_request_through_a_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_url) = mock_llm(dir.path()).await;
    let quickstart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/quickstart/keel.toml"
    ))
    .unwrap();
    std::fs::write(
        dir.path().join("keel.toml"),
        quickstart.replace("http://127.0.0.1:9999/v1", &mock_url),
    )
    .unwrap();
    let key = create_key(dir.path(), "acme", "member", &[]);
    let mut keel = Keel::start(dir.path(), &[]).await;
    let http = client();

    let models: Value = http
        .get(keel.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "default");
    assert!(
        models["data"][0]["keel"]["note"].is_null(),
        "a configured route is not the echo mock"
    );

    let ask = |stream: bool| {
        http.post(keel.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "default", "stream": stream, "messages": [{"role": "user", "content": "ping from the quickstart"}]}))
            .send()
    };
    let whole: Value = ask(false).await.unwrap().json().await.unwrap();
    assert_eq!(
        whole["choices"][0]["message"]["content"],
        "ping from the quickstart"
    );
    let streamed = ask(true).await.unwrap();
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let text = streamed.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // A burst, then SIGTERM at once: every request's usage row must still be written.
    let burst = 40;
    let mut pending = Vec::new();
    for _ in 0..burst {
        pending.push(ask(false));
    }
    for response in futures_util::future::join_all(pending).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    keel.stop_cleanly(Duration::from_secs(20)).await;

    let keel = Keel::start(dir.path(), &[]).await;
    eventually(
        Duration::from_secs(10),
        "the restarted server is ready",
        || async {
            http.get(keel.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    let summary: Value = http
        .get(keel.url("/v1/usage"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = &summary["data"][0];
    assert_eq!(row["group"], "default", "{summary}");
    assert_eq!(
        row["requests"],
        burst + 2,
        "no usage row lost to the shutdown: {summary}"
    );
    assert!(row["cost_nanousd"].as_u64().unwrap() > 0);
}
