//! The event log over real HTTP: live SSE streams, resume without gap or duplicate (after
//! a disconnect and after a restart), filters, history pages, slow consumers, retention,
//! and fan-out between two instances sharing Postgres.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use keel_core::auth::Role;
use keel_core::config::Config;
use keel_core::event::{EventType, NewEvent};
use keel_core::id::{TaskId, WorkspaceId};
use keel_core::workspace::WorkspaceName;
use keel_server::{AppState, Server};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::state_for;

/// One running server.
pub struct Node {
    pub url: String,
    pub state: AppState,
    pub shutdown: CancellationToken,
    pub workspace: WorkspaceId,
    pub admin: String,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    pub async fn start(cfg: Config) -> Node {
        let store = keel_store::open(&cfg).await.unwrap();
        store.migrate().await.unwrap();
        Self::on(store, cfg).await
    }

    pub async fn on(store: Arc<dyn keel_store::Store>, mut cfg: Config) -> Node {
        cfg.server.listen = "127.0.0.1:0".parse().unwrap();
        let shutdown = CancellationToken::new();
        let state = state_for(store, cfg, shutdown.clone()).await;
        let ws = state
            .store()
            .ensure_workspace(&WorkspaceName::parse("events").unwrap())
            .await
            .unwrap();
        let (token, _) = keel_server::auth::issue_key(
            state.store(),
            ws.id,
            Role::Admin,
            None,
            Default::default(),
        )
        .await
        .unwrap();
        let server = Server::bind(state.clone(), shutdown.clone()).await.unwrap();
        let url = format!("http://{}", server.local_addr().unwrap());
        let task = tokio::spawn(async move {
            server.run().await.unwrap();
        });
        Node {
            url,
            state,
            shutdown,
            workspace: ws.id,
            admin: token.expose().to_owned(),
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops within its drain timeout")
            .unwrap();
    }

    pub async fn ping(&self, message: &str) -> Value {
        let res = reqwest::Client::new()
            .post(format!("{}/v1/events/ping", self.url))
            .bearer_auth(&self.admin)
            .json(&json!({ "message": message }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        res.json().await.unwrap()
    }

    pub async fn get(&self, path_and_query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = reqwest::Client::new()
            .get(format!("{}{path_and_query}", self.url))
            .bearer_auth(&self.admin);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    pub async fn stream(&self, query: &str, last_event_id: Option<i64>) -> Sse {
        let id = last_event_id.map(|n| n.to_string());
        let headers: Vec<(&str, &str)> = id.iter().map(|v| ("last-event-id", v.as_str())).collect();
        let res = self.get(&format!("/v1/events{query}"), &headers).await;
        assert_eq!(
            res.status(),
            200,
            "{}",
            res.text().await.unwrap_or_default()
        );
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Sse {
            body: Box::pin(res.bytes_stream()),
            buffer: Vec::new(),
        }
    }
}

/// One SSE frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: Option<i64>,
    pub event: Option<String>,
    pub data: Value,
}

/// A minimal SSE reader.
pub struct Sse {
    body: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>,
    >,
    buffer: Vec<u8>,
}

impl Sse {
    /// The next frame with data (comments and `retry:` lines are skipped), or `None` at
    /// the end of the stream or after `wait` with nothing.
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(raw).unwrap();
                let mut frame = Frame {
                    id: None,
                    event: None,
                    data: Value::Null,
                };
                let mut has_data = false;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        frame.id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        frame.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        frame.data = serde_json::from_str(v).unwrap();
                        has_data = true;
                    }
                }
                if has_data {
                    if frame.event.as_deref() != Some("stream.closed") {
                        assert_valid(&frame.data);
                    }
                    return Some(frame);
                }
                continue;
            }
            match tokio::time::timeout(wait, self.body.next()).await {
                Ok(Some(Ok(bytes))) => self.buffer.extend_from_slice(&bytes),
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }

    /// The next `n` frames; fails the test if they do not arrive within 10 s.
    pub async fn take(&mut self, n: usize) -> Vec<Frame> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next(Duration::from_secs(10)).await {
                Some(f) => out.push(f),
                None => panic!(
                    "stream ended or stalled after {} of {n} frames: {out:?}",
                    out.len()
                ),
            }
        }
        out
    }
}

/// Every event a test sees must match its type's published schema.
pub fn assert_valid(event: &Value) {
    if let Err(errors) = keel_server::schemas::validate(event) {
        panic!("event does not match its schema: {errors:?}\n{event}");
    }
}

fn sqlite_config(dir: &tempfile::TempDir) -> Config {
    let mut cfg = Config::default();
    cfg.data_dir = dir.path().to_owned();
    cfg
}

fn seqs(frames: &[Frame]) -> Vec<i64> {
    frames.iter().map(|f| f.id.unwrap()).collect()
}

#[tokio::test]
async fn a_live_stream_resumes_after_a_disconnect_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(sqlite_config(&dir)).await;
    let mut sse = node.stream("", None).await;
    for i in 0..5 {
        node.ping(&format!("m{i}")).await;
    }
    let first = sse.take(3).await;
    assert_eq!(seqs(&first), vec![1, 2, 3]);
    assert_eq!(first[0].event.as_deref(), Some("system.ping"));
    assert_eq!(first[0].data["event_type"], "system.ping");
    assert_eq!(first[0].data["seq"], 1);
    assert_eq!(first[0].data["data"]["message"], "m0");
    drop(sse);
    for i in 5..9 {
        node.ping(&format!("m{i}")).await;
    }
    let mut resumed = node.stream("", Some(3)).await;
    let rest = resumed.take(6).await;
    assert_eq!(seqs(&rest), vec![4, 5, 6, 7, 8, 9]);
    node.ping("m9").await;
    assert_eq!(seqs(&resumed.take(1).await), vec![10]);
    assert!(
        resumed.next(Duration::from_millis(300)).await.is_none(),
        "nothing is delivered twice"
    );
    // `after` in the query works as Last-Event-ID does.
    let mut again = node.stream("?after=8", None).await;
    assert_eq!(seqs(&again.take(2).await), vec![9, 10]);
    node.stop().await;
}

#[tokio::test]
async fn a_stream_resumes_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(sqlite_config(&dir)).await;
    let mut sse = node.stream("?after=0", None).await;
    for i in 0..4 {
        node.ping(&format!("before {i}")).await;
    }
    assert_eq!(seqs(&sse.take(4).await), vec![1, 2, 3, 4]);
    // Shutdown ends the stream with a reason and the seq to resume after.
    node.shutdown.cancel();
    let closed = sse.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(closed.event.as_deref(), Some("stream.closed"));
    assert_eq!(
        closed.data,
        json!({ "reason": "shutting_down", "resume_after": 4 })
    );
    node.stop().await;

    let node = Node::start(sqlite_config(&dir)).await;
    node.ping("after").await;
    let mut resumed = node.stream("", Some(2)).await;
    let frames = resumed.take(3).await;
    assert_eq!(seqs(&frames), vec![3, 4, 5]);
    assert_eq!(frames[2].data["data"]["message"], "after");
    node.stop().await;
}

async fn append(node: &Node, events: Vec<NewEvent>) {
    node.state.events().append(events).await.unwrap();
}

/// Appends `n` pings (a multiple of 100), each message padded with `pad` bytes, 100 a
/// transaction.
async fn flood(node: &Node, n: usize, pad: usize) {
    let big = "x".repeat(pad);
    for chunk in 0..n / 100 {
        let events = (0..100)
            .map(|i| {
                NewEvent::new(
                    EventType::SystemPing,
                    node.workspace,
                    json!({ "message": format!("{}:{big}", chunk * 100 + i) }),
                )
            })
            .collect();
        append(node, events).await;
    }
}

#[tokio::test]
async fn filters_select_by_type_wildcard_task_and_agent() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(sqlite_config(&dir)).await;
    let task = TaskId::new();
    let ws = node.workspace;
    let created = |t: Option<TaskId>| {
        let mut e = NewEvent::new(
            EventType::TaskCreated,
            ws,
            json!({ "agent": "a", "priority": "low" }),
        );
        e.task_id = t;
        e
    };
    let mut sse = node
        .stream(&format!("?types=task.*&task_id={task}"), None)
        .await;
    let mut all = node.stream("?types=task.created,system.ping", None).await;
    append(
        &node,
        vec![
            created(None),
            NewEvent::new(EventType::SystemPing, ws, json!({})),
            created(Some(task)),
            NewEvent::new(EventType::TaskStarted, ws, json!({ "attempt": 1 })).with_task(task),
            NewEvent::new(
                EventType::ToolCall,
                ws,
                json!({ "tool": "t", "call_id": "c", "arguments": {} }),
            )
            .with_task(task),
        ],
    )
    .await;
    let mine = sse.take(2).await;
    assert_eq!(seqs(&mine), vec![3, 4]);
    assert_eq!(mine[1].event.as_deref(), Some("task.started"));
    let typed = all.take(3).await;
    assert_eq!(seqs(&typed), vec![1, 2, 3]);
    assert!(sse.next(Duration::from_millis(200)).await.is_none());

    // The same selection over history.
    let page: Value = node
        .get(
            &format!("/v1/events?format=json&after=0&types=task.*&task_id={task}"),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .for_each(assert_valid);
    let got: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![3, 4]);
    assert_eq!(page["next_after"], 5);
    assert_eq!(page["has_more"], false);
    node.stop().await;
}

#[tokio::test]
async fn history_pages_with_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(sqlite_config(&dir)).await;
    let ws = node.workspace;
    append(
        &node,
        (0..25)
            .map(|i| {
                NewEvent::new(
                    EventType::SystemPing,
                    ws,
                    json!({ "message": i.to_string() }),
                )
            })
            .collect(),
    )
    .await;
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page: Value = node
            .get(
                &format!("/v1/events?format=json&limit=10&after={after}"),
                &[],
            )
            .await
            .json()
            .await
            .unwrap();
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_i64().unwrap()),
        );
        after = page["next_after"].as_i64().unwrap();
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    node.stop().await;
}

#[tokio::test]
async fn bad_filters_and_cursors_are_400s_that_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(sqlite_config(&dir)).await;
    for (query, headers, expect) in [
        ("?types=task.craeted", vec![], "known types: task.created"),
        ("?types=ta*", vec![], "dotted prefix"),
        ("", vec![("last-event-id", "abc")], "Last-Event-ID"),
        ("", vec![("last-event-id", "-4")], "Last-Event-ID"),
        ("?after=x", vec![], "after:"),
        ("?format=xml", vec![], "format:"),
        ("?format=json&limit=0", vec![], "limit:"),
        ("?version=2.0", vec![], "version:"),
        ("?version=1.7", vec![], "version:"),
        ("?task_id=run_0", vec![], "task_id:"),
    ] {
        let res = node.get(&format!("/v1/events{query}"), &headers).await;
        assert_eq!(res.status(), 400, "{query} {headers:?}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let body: Value = res.json().await.unwrap();
        assert!(
            body["detail"].as_str().unwrap().contains(expect),
            "{query}: {body}"
        );
    }
    assert_eq!(
        node.get("/v1/events?format=json&version=1", &[])
            .await
            .status(),
        200
    );
    node.stop().await;
}

#[tokio::test]
async fn retention_prunes_and_older_cursors_answer_410_with_the_oldest_seq() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sqlite_config(&dir);
    cfg.events.retention = Duration::from_millis(600);
    cfg.events.prune_interval = Duration::from_millis(100);
    let node = Node::start(cfg).await;
    for i in 0..3 {
        node.ping(&i.to_string()).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.ping("kept").await;
    // Wait for the pruner.
    let mut head = node.state.store().event_head(node.workspace).await.unwrap();
    for _ in 0..50 {
        if head.pruned_through == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        head = node.state.store().event_head(node.workspace).await.unwrap();
    }
    assert_eq!(
        head.pruned_through, 3,
        "the three old events are pruned, the new one kept"
    );
    for (query, headers) in [
        ("?format=json&after=0", vec![]),
        ("?format=json", vec![]),
        ("", vec![("last-event-id", "1")]),
    ] {
        let res = node.get(&format!("/v1/events{query}"), &headers).await;
        assert_eq!(res.status(), 410, "{query}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["oldest_seq"], 4, "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("oldest held is seq 4"),
            "{body}"
        );
    }
    let page: Value = node
        .get("/v1/events?format=json&after=3", &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"][0]["data"]["message"], "kept");
    node.stop().await;
}

#[tokio::test]
async fn a_follower_overtaken_by_retention_is_told_and_its_resume_answers_410() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sqlite_config(&dir);
    cfg.events.retention = Duration::from_secs(4);
    cfg.events.prune_interval = Duration::from_millis(100);
    let node = Node::start(cfg).await;
    let ws = node.workspace;
    // More than socket buffers hold, so the follower is stuck mid-history while the
    // client reads nothing.
    let total = 1500;
    flood(&node, 1500, 16 * 1024).await;
    let mut sse = node.stream("", Some(0)).await;
    // Let retention remove every one of them, then commit one more.
    let mut head = node.state.store().event_head(ws).await.unwrap();
    for _ in 0..100 {
        if head.pruned_through == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        head = node.state.store().event_head(ws).await.unwrap();
    }
    assert_eq!(head.pruned_through, total, "retention pruned the history");
    node.ping("after the prune").await;
    let mut got: Vec<i64> = Vec::new();
    let closed = loop {
        let frame = sse
            .next(Duration::from_secs(10))
            .await
            .expect("the stream ends with stream.closed");
        if frame.event.as_deref() == Some("stream.closed") {
            break frame;
        }
        got.push(frame.id.unwrap());
    };
    assert_eq!(closed.data["reason"], "expired", "{:?}", closed.data);
    let resume = closed.id.unwrap();
    assert!(resume < total, "the follower was overtaken: {resume}");
    assert_eq!(
        got,
        (1..=resume).collect::<Vec<_>>(),
        "no gap before the cut"
    );
    let res = node
        .get("/v1/events", &[("last-event-id", &resume.to_string())])
        .await;
    assert_eq!(res.status(), 410);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["oldest_seq"], total + 1, "{body}");
    node.stop().await;
}

#[tokio::test]
async fn a_consumer_too_slow_is_cut_off_and_loses_nothing_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sqlite_config(&dir);
    cfg.events.stream_buffer = 16;
    let node = Node::start(cfg).await;
    let mut sse = node.stream("", None).await;
    // The stream is live (it has delivered a live event)...
    node.ping("first").await;
    assert_eq!(seqs(&sse.take(1).await), vec![1]);
    // ...then far more than the socket buffers and the ring hold, while the client reads
    // nothing.
    let total = 1201;
    flood(&node, 1200, 32 * 1024).await;
    let mut got: Vec<i64> = Vec::new();
    let mut closed = None;
    while let Some(frame) = sse.next(Duration::from_secs(5)).await {
        if frame.event.as_deref() == Some("stream.closed") {
            closed = Some(frame);
            break;
        }
        got.push(frame.id.unwrap());
    }
    let closed = closed.expect("the slow stream is closed with a reason");
    assert_eq!(closed.data["reason"], "consumer_too_slow");
    let resume = closed.id.unwrap();
    assert_eq!(closed.data["resume_after"], resume);
    assert!(
        got.len() < total,
        "the stream was cut before the end: got {}",
        got.len()
    );
    assert_eq!(
        got,
        (2..=resume).collect::<Vec<_>>(),
        "in order, no gap, before the cut"
    );
    let mut resumed = node.stream("", Some(resume)).await;
    let rest = resumed
        .take(usize::try_from(total as i64 - resume).unwrap())
        .await;
    assert_eq!(
        seqs(&rest),
        ((resume + 1)..=total as i64).collect::<Vec<_>>()
    );
    node.stop().await;
}

/// A counter's value in the server's Prometheus text (0 when not yet recorded).
async fn counter(node: &Node, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", node.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn clients_resuming_at_once_each_get_exactly_their_events_and_share_store_reads() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(sqlite_config(&dir)).await;
    // Three whole pages of history (the server reads 500 events a page).
    let total: i64 = 1500;
    flood(&node, total as usize, 0).await;
    let reads_before = counter(&node, "keel_event_history_reads_total").await;
    let clients: i64 = 40;
    let mut streams = Vec::new();
    for i in 0..clients {
        streams.push(node.stream("", Some(i * 10)).await);
    }
    let results = futures_util::future::join_all(streams.into_iter().enumerate().map(
        |(i, mut sse)| async move {
            let from = i as i64 * 10;
            let got = seqs(&sse.take(usize::try_from(total - from).unwrap()).await);
            assert!(
                sse.next(Duration::from_millis(200)).await.is_none(),
                "client {i}: nothing past the end"
            );
            (from, got)
        },
    ))
    .await;
    for (from, got) in results {
        assert_eq!(got, ((from + 1)..=total).collect::<Vec<_>>(), "from {from}");
    }
    // Each whole page is read from the store once and shared; each client then reads the
    // (empty) newest page and the tail itself. Without sharing, every client would read
    // every page it crosses: 40 × 3 and more.
    let reads = counter(&node, "keel_event_history_reads_total").await - reads_before;
    assert!(
        reads <= (3 + 2 * clients) as f64,
        "{reads} store reads for {clients} clients over 3 pages"
    );
    node.stop().await;
}

#[tokio::test]
async fn an_event_committed_on_one_instance_reaches_streams_on_another() {
    let Some(url) = keel_store::testing::fresh_postgres_db().await.unwrap() else {
        return;
    };
    let mut cfg = Config::default();
    cfg.database.url = Some(url.into());
    let a = Node::start(cfg.clone()).await;
    let b = Node::start(cfg).await;
    assert_eq!(a.workspace, b.workspace);
    let mut on_b = b.stream("", None).await;
    let mut on_a = a.stream("", None).await;
    for i in 0..3 {
        a.ping(&format!("from a {i}")).await;
    }
    b.ping("from b").await;
    let frames = on_b.take(4).await;
    assert_eq!(seqs(&frames), vec![1, 2, 3, 4]);
    assert_eq!(frames[0].data["data"]["message"], "from a 0");
    assert_eq!(seqs(&on_a.take(4).await), vec![1, 2, 3, 4]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_schemas_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(sqlite_config(&dir)).await;
    let body: Value = node
        .get("/v1/events/schemas", &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["version"], "1.0");
    for t in EventType::ALL {
        assert_eq!(
            body["schemas"][t.as_str()]["properties"]["event_type"]["const"],
            t.as_str(),
            "{t}"
        );
    }
    node.stop().await;
}

mod websocket {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    use super::*;

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn connect(node: &Node) -> Socket {
        let mut request = format!("{}/v1/ws", node.url.replace("http://", "ws://"))
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", node.admin).parse().unwrap(),
        );
        tokio_tungstenite::connect_async(request).await.unwrap().0
    }

    async fn send(socket: &mut Socket, message: Value) {
        socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON message (pings skipped).
    async fn recv(socket: &mut Socket) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
                .await
                .expect("a message within 10 s")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = message {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] == "event" {
                    assert_valid(&value["event"]);
                }
                return value;
            }
        }
    }

    #[tokio::test]
    async fn subscriptions_filter_resume_and_unsubscribe_over_one_socket() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(sqlite_config(&dir)).await;
        let ws = node.workspace;
        node.ping("old").await;
        let mut socket = connect(&node).await;
        send(
            &mut socket,
            json!({ "type": "subscribe", "id": "all", "after": 0 }),
        )
        .await;
        assert_eq!(
            recv(&mut socket).await,
            json!({ "type": "subscribed", "id": "all", "after": 0 })
        );
        let first = recv(&mut socket).await;
        assert_eq!(
            (
                first["subscription"].as_str(),
                first["event"]["seq"].as_i64()
            ),
            (Some("all"), Some(1))
        );
        send(
            &mut socket,
            json!({ "type": "subscribe", "id": "tasks", "types": "task.*" }),
        )
        .await;
        assert_eq!(recv(&mut socket).await["type"], "subscribed");
        append(
            &node,
            vec![
                NewEvent::new(EventType::SystemPing, ws, json!({})),
                NewEvent::new(EventType::TaskStarted, ws, json!({ "attempt": 1 })),
            ],
        )
        .await;
        let mut got: Vec<(String, i64)> = Vec::new();
        for _ in 0..3 {
            let m = recv(&mut socket).await;
            got.push((
                m["subscription"].as_str().unwrap().to_owned(),
                m["event"]["seq"].as_i64().unwrap(),
            ));
        }
        got.sort();
        assert_eq!(
            got,
            vec![("all".into(), 2), ("all".into(), 3), ("tasks".into(), 3)]
        );

        // Resume "all" from seq 1: events 2 and 3 again, in order, on that subscription.
        send(
            &mut socket,
            json!({ "type": "resume", "id": "all", "after": 1 }),
        )
        .await;
        assert_eq!(
            recv(&mut socket).await,
            json!({ "type": "subscribed", "id": "all", "after": 1 })
        );
        let again: Vec<i64> = [recv(&mut socket).await, recv(&mut socket).await]
            .iter()
            .map(|m| m["event"]["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(again, vec![2, 3]);

        send(&mut socket, json!({ "type": "unsubscribe", "id": "tasks" })).await;
        assert_eq!(
            recv(&mut socket).await,
            json!({ "type": "unsubscribed", "id": "tasks" })
        );
        append(
            &node,
            vec![NewEvent::new(
                EventType::TaskStarted,
                ws,
                json!({ "attempt": 2 }),
            )],
        )
        .await;
        let m = recv(&mut socket).await;
        assert_eq!(
            (m["subscription"].as_str(), m["event"]["seq"].as_i64()),
            (Some("all"), Some(4))
        );

        // Bad messages get an error and the socket stays open.
        for (bad, expect) in [
            (
                json!({ "type": "subscribe", "id": "x", "types": "nope" }),
                "types:",
            ),
            (json!({ "type": "subscribe", "id": "all" }), "exists"),
            (json!({ "type": "dance" }), "not a valid message"),
            (
                json!({ "type": "unsubscribe", "id": "ghost" }),
                "no such subscription",
            ),
        ] {
            send(&mut socket, bad.clone()).await;
            let m = recv(&mut socket).await;
            assert_eq!(m["type"], "error", "{bad}");
            assert!(m["detail"].as_str().unwrap().contains(expect), "{bad}: {m}");
        }
        node.ping("still open").await;
        assert_eq!(recv(&mut socket).await["event"]["seq"], 5);

        // Shutdown closes the live subscription with the seq to resume after; the one
        // unsubscribed earlier says nothing.
        node.shutdown.cancel();
        assert_eq!(
            recv(&mut socket).await,
            json!({ "type": "closed", "subscription": "all", "reason": "shutting_down", "resume_after": 5 })
        );
        // Nothing else before the socket closes.
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(10), socket.next()).await
        {
            match message {
                Ok(Message::Text(text)) => panic!("after the last subscription closed: {text}"),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        node.stop().await;
    }

    #[tokio::test]
    async fn a_websocket_needs_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(sqlite_config(&dir)).await;
        let request = format!("{}/v1/ws", node.url.replace("http://", "ws://"))
            .into_client_request()
            .unwrap();
        let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
        assert!(err.to_string().contains("401"), "{err}");
        node.stop().await;
    }
}
