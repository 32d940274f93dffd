//! The agent runtime across real processes: `keel serve` running agents whose model is
//! `keel mock-llm` (scripted by turn) and whose tools are small HTTP servers in this test
//! process that count their side effects by `Idempotency-Key`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::support::{Keel, assert_problem, client, create_key, eventually, keel_command};

/// Starts `keel mock-llm` with a by-turn script; returns the process and its base URL.
pub async fn mock_llm(dir: &Path, replies: Value) -> (tokio::process::Child, String) {
    mock_llm_slow(dir, replies, 0).await
}

/// [`mock_llm`] with `latency_ms` added before every answer.
pub async fn mock_llm_slow(
    dir: &Path,
    replies: Value,
    latency_ms: u64,
) -> (tokio::process::Child, String) {
    let script = dir.join("script.json");
    std::fs::write(
        &script,
        json!({"by_turn": true, "replies": replies}).to_string(),
    )
    .unwrap();
    let mut cmd: tokio::process::Command = keel_command(dir).into();
    cmd.args([
        "mock-llm",
        "--port",
        "0",
        "--latency-ms",
        &latency_ms.to_string(),
        "--script",
    ])
    .arg(&script)
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (child, line.rsplit(' ').next().unwrap().to_owned())
}

/// A tool server: POST /{name} answers `{"tool": name, "args": …, "n": …}`. It performs
/// its "side effect" once per `Idempotency-Key` (a repeat gets the first answer back) and
/// counts how often each key's effect ran — which must never exceed one.
#[derive(Clone, Default)]
pub struct Tools {
    inner: Arc<ToolsInner>,
}

#[derive(Default)]
struct ToolsInner {
    effects: Mutex<HashMap<String, (u64, Value)>>,
    requests: AtomicU64,
    delay_ms: AtomicU64,
    args: Mutex<Vec<Value>>,
}

impl Tools {
    pub async fn start() -> (Tools, String) {
        let tools = Tools::default();
        let app = axum::Router::new()
            .route("/{name}", axum::routing::post(tool))
            .with_state(tools.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (tools, url)
    }

    /// Each call waits this long before its effect.
    pub fn delay(&self, ms: u64) {
        self.inner.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Requests received (retries and repeats included).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// How many times each key's effect ran.
    pub fn effects(&self) -> HashMap<String, u64> {
        self.inner
            .effects
            .lock()
            .unwrap()
            .iter()
            .map(|(k, (n, _))| (k.clone(), *n))
            .collect()
    }

    /// The arguments of every effect, in order.
    pub fn args(&self) -> Vec<Value> {
        self.inner.args.lock().unwrap().clone()
    }
}

async fn tool(
    State(tools): State<Tools>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    axum::Json(args): axum::Json<Value>,
) -> axum::Json<Value> {
    let inner = &tools.inner;
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned())
        .expect("every tool call carries an Idempotency-Key");
    if let Some((_, answer)) = inner.effects.lock().unwrap().get(&key) {
        return axum::Json(answer.clone());
    }
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut effects = inner.effects.lock().unwrap();
    let n = effects.len() as u64 + 1;
    let answer = json!({"tool": name, "args": args, "n": n});
    let entry = effects.entry(key).or_insert((0, answer.clone()));
    entry.0 += 1;
    inner.args.lock().unwrap().push(args);
    axum::Json(entry.1.clone())
}

/// Writes `keel.toml` (model `default` → the mock) and `agents/<name>.toml` files.
pub fn configure(dir: &Path, mock_url: &str, extra: &str, agents: &[(&str, String)]) {
    std::fs::write(
        dir.join("keel.toml"),
        format!(
            "[models.default]\n[models.default.retry]\nmax_attempts = 1\n[[models.default.targets]]\n\
             provider = \"openai\"\nmodel = \"agent\"\nbase_url = \"{mock_url}\"\n\
             input_price_per_mtok = 1.0\noutput_price_per_mtok = 2.0\n\n\
             [runtime]\nagents_workspace = \"acme\"\n{extra}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("agents")).unwrap();
    for (name, spec) in agents {
        std::fs::write(dir.join("agents").join(format!("{name}.toml")), spec).unwrap();
    }
}

/// An agent with one HTTP tool `lookup` at `tools_url`.
pub fn lookup_agent(name: &str, tools_url: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ndescription = \"looks things up\"\nsystem_prompt = \"You help {{{{ company }}}}.\"\n\
         variables = {{ company = \"Acme\" }}\n{extra}\n\
         [[tools]]\nkind = \"http\"\nname = \"lookup\"\nurl = \"{tools_url}/lookup\"\n\
         parameters = {{ type = \"object\", properties = {{ city = {{ type = \"string\" }} }}, required = [\"city\"] }}\n"
    )
}

/// Turn 0 calls `lookup` for Oslo; turn 1 answers with the tool's result.
pub fn lookup_script() -> Value {
    json!([
        {"tool_calls": [{"name": "lookup", "arguments": {"city": "Oslo"}}]},
        {"content": "Answer: {{last}}"}
    ])
}

pub async fn post_task(keel: &Keel, key: &str, body: Value) -> reqwest::Response {
    client()
        .post(keel.url("/v1/tasks"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

pub async fn get(keel: &Keel, key: &str, path: &str) -> Value {
    let res = client()
        .get(keel.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{path}");
    res.json().await.unwrap()
}

#[tokio::test]
async fn an_agent_calls_its_tool_and_answers_with_every_step_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let (tools, tools_url) = Tools::start().await;
    let (_mock, mock_url) = mock_llm(dir.path(), lookup_script()).await;
    configure(
        dir.path(),
        &mock_url,
        "",
        &[("helper", lookup_agent("helper", &tools_url, ""))],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;

    let res = post_task(
        &keel,
        &key,
        json!({"agent": "helper", "input": "Weather in Oslo?"}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let task: Value = res.json().await.unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    let output = task["output"].as_str().unwrap();
    assert!(
        output.starts_with("Answer: ") && output.contains("\"city\":\"Oslo\""),
        "{output}"
    );
    assert_eq!(task["steps"], 3);
    assert_eq!(task["tool_calls"], 1);
    assert_eq!(task["attempts"], 1);
    assert!(task["usage"]["cost_usd"].as_f64().unwrap() > 0.0, "{task}");
    assert_eq!(tools.effects().len(), 1);
    assert_eq!(tools.args(), vec![json!({"city": "Oslo"})]);

    let id = task["id"].as_str().unwrap();
    let steps = get(&keel, &key, &format!("/v1/tasks/{id}/steps")).await;
    let kinds: Vec<&str> = steps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["llm_call", "tool_call", "llm_call"]);
    let key_sent = steps["data"][1]["data"]["idempotency_key"]
        .as_str()
        .unwrap();
    assert_eq!(
        tools.effects().keys().next().map(String::as_str),
        Some(key_sent)
    );
    assert_eq!(steps["runs"].as_array().unwrap().len(), 1);

    // The thread holds the conversation; the system prompt was rendered, not stored.
    let thread = task["thread_id"].as_str().unwrap();
    let messages = get(&keel, &key, &format!("/v1/threads/{thread}/messages")).await;
    let roles: Vec<&str> = messages["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"]["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);

    // Every transition is an event of the task, in order.
    let events = get(&keel, &key, &format!("/v1/events?format=json&task_id={id}")).await;
    let types: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "task.created",
            "task.started",
            "tool.call",
            "tool.result",
            "agent.message",
            "task.completed"
        ]
    );

    // Usage is accounted like the gateway's.
    let usage = get(&keel, &key, "/v1/usage?group_by=route").await;
    assert_eq!(usage["data"][0]["requests"], 2, "{usage}");
}

#[tokio::test]
async fn bad_requests_are_named_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_tools, tools_url) = Tools::start().await;
    let (_mock, mock_url) = mock_llm(dir.path(), lookup_script()).await;
    configure(
        dir.path(),
        &mock_url,
        "",
        &[("helper", lookup_agent("helper", &tools_url, ""))],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let admin = create_key(dir.path(), "acme", "admin", &[]);
    let keel = Keel::start(dir.path(), &[]).await;

    let p = assert_problem(
        post_task(&keel, &key, json!({"agent": "nobody", "input": "x"})).await,
        404,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("nobody"), "{p}");
    let p = assert_problem(
        post_task(&keel, &key, json!({"agent": "helper", "input": 7})).await,
        400,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().starts_with("input"), "{p}");
    let p = assert_problem(
        post_task(
            &keel,
            &key,
            json!({"agent": "helper", "input": "x", "priority": "urgent"}),
        )
        .await,
        400,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("priority"), "{p}");
    let p = assert_problem(
        post_task(
            &keel,
            &key,
            json!({"agent": "helper", "input": [{"role": "robot", "content": "x"}]}),
        )
        .await,
        400,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("input[0].role"),
        "{p}"
    );
    let tasks = get(&keel, &key, "/v1/tasks").await;
    assert_eq!(
        tasks["data"].as_array().unwrap().len(),
        0,
        "nothing was created"
    );

    // An invalid spec is rejected with every problem listed.
    let res = client()
        .post(keel.url("/v1/agents"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Bad Name", "model": "nope", "max_steps": 0,
                      "tools": [{"kind": "http", "name": "t", "url": "ftp://x"}]}))
        .send()
        .await
        .unwrap();
    let p = assert_problem(res, 400).await;
    let detail = p["detail"].as_str().unwrap();
    for field in ["name:", "model:", "max_steps:", "tools[0].url:"] {
        assert!(detail.contains(field), "{field} missing: {detail}");
    }
    // A member may not change agents.
    let res = client()
        .post(keel.url("/v1/agents"))
        .bearer_auth(&key)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 403).await;

    // Input to a task that is not waiting for any: 409.
    let done: Value = post_task(&keel, &key, json!({"agent": "helper", "input": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    let res = client()
        .post(keel.url(&format!("/v1/tasks/{}/input", done["id"].as_str().unwrap())))
        .bearer_auth(&key)
        .json(&json!({"action": "approve"}))
        .send()
        .await
        .unwrap();
    let p = assert_problem(res, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("completed"), "{p}");
}

/// Counts a workspace's tasks in `status`.
async fn count(keel: &Keel, key: &str, status: &str) -> usize {
    let page = get(keel, key, &format!("/v1/tasks?status={status}&limit=500")).await;
    page["data"].as_array().unwrap().len()
}

#[tokio::test]
async fn kill_9_mid_run_twice_and_every_task_completes_with_each_side_effect_once() {
    let dir = tempfile::tempdir().unwrap();
    let (tools, tools_url) = Tools::start().await;
    tools.delay(300);
    let (_mock, mock_url) = mock_llm_slow(dir.path(), lookup_script(), 40).await;
    configure(
        dir.path(),
        &mock_url,
        "lease = \"2s\"",
        &[("helper", lookup_agent("helper", &tools_url, ""))],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let mut keel = Keel::start(dir.path(), &[]).await;
    const TASKS: usize = 30;
    for i in 0..TASKS {
        let res = post_task(
            &keel,
            &key,
            json!({"agent": "helper", "input": format!("question {i}"), "mode": "background"}),
        )
        .await;
        assert_eq!(res.status(), 202);
    }
    // First kill: some tool calls done, others in flight, LLM calls in between.
    eventually(Duration::from_secs(20), "tool calls under way", || async {
        tools.requests() >= 6
    })
    .await;
    keel.signal("-KILL");
    keel.wait(Duration::from_secs(10)).await;
    let before = tools.requests();
    keel = Keel::start(dir.path(), &[]).await;
    // Second kill, later in the work.
    eventually(Duration::from_secs(20), "more tool calls", || async {
        tools.requests() >= before + 8
    })
    .await;
    keel.signal("-KILL");
    keel.wait(Duration::from_secs(10)).await;
    let keel = Keel::start(dir.path(), &[]).await;
    eventually(Duration::from_secs(60), "every task completed", || {
        let (keel, key) = (&keel, &key);
        async move { count(keel, key, "completed").await == TASKS }
    })
    .await;

    let effects = tools.effects();
    assert_eq!(effects.len(), TASKS, "one tool side effect per task");
    assert!(
        effects.values().all(|&n| n == 1),
        "a side effect ran twice: {effects:?}"
    );
    let page = get(&keel, &key, "/v1/tasks?limit=500").await;
    let mut resumed = 0;
    for task in page["data"].as_array().unwrap() {
        assert_eq!(task["steps"], 3, "{task}");
        assert_eq!(task["tool_calls"], 1, "{task}");
        assert_eq!(
            task["attempts"], 1,
            "a crash resumes the run, it does not start another: {task}"
        );
        let id = task["id"].as_str().unwrap();
        let events = get(
            &keel,
            &key,
            &format!("/v1/events?format=json&task_id={id}&types=run.resumed"),
        )
        .await;
        resumed += events["data"].as_array().unwrap().len();
        let out = task["output"].as_str().unwrap();
        assert!(out.contains("Oslo"), "{out}");
    }
    assert!(resumed > 0, "some runs were interrupted and resumed");
}
