//! OTLP trace export: spans reach a collector (a minimal OTLP/HTTP receiver of our own),
//! and a dead collector never fails or stalls a request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

use crate::support::{Keel, client, eventually};

/// One request the collector received: (method and path, content type, body).
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A minimal HTTP/1.1 server that records every request and answers 200.
async fn collector() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Received = Arc::default();
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut line = String::new();
                        stream.read_line(&mut line).await.unwrap();
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (name, value) = line.split_once(':').unwrap();
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap(),
                            "content-type" => content_type = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    let target = request_line
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ");
                    sink.lock().unwrap().push((target, content_type, body));
                    stream
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .unwrap();
                }
            });
        }
    });
    (port, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn spans_are_exported_over_otlp_http() {
    let (port, received) = collector().await;
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let dir = tempfile::tempdir().unwrap();
    let keel = Keel::start(
        dir.path(),
        &[("KEEL_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str())],
    )
    .await;

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let res = client()
        .get(keel.url("/healthz"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    eventually(
        Duration::from_secs(15),
        "the request's span reaches the collector",
        || async {
            received
                .lock()
                .unwrap()
                .iter()
                .any(|(target, content_type, body)| {
                    target == "POST /v1/traces"
                        && content_type == "application/x-protobuf"
                        && contains(body, b"GET /healthz")
                        && contains(body, &trace_bytes)
                        && contains(body, b"keel")
                })
        },
    )
    .await;
}

#[tokio::test]
async fn a_dead_collector_never_fails_a_request() {
    // A port with nothing listening on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let dir = tempfile::tempdir().unwrap();
    let mut keel = Keel::start(
        dir.path(),
        &[
            ("KEEL_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("KEEL_TELEMETRY__OTLP_TIMEOUT", "500ms"),
        ],
    )
    .await;
    let http = client();
    for _ in 0..200 {
        let res = http.get(keel.url("/healthz")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    // Export attempts have failed by now; requests still succeed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        http.get(keel.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    keel.stop_cleanly(Duration::from_secs(15)).await;
}
