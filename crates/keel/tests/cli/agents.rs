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

use crate::support::{Keel, assert_problem, client, create_key, eventually, keel_command, run};

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
    let latency = latency_ms.to_string();
    let script = script.to_str().unwrap().to_owned();
    crate::support::mock_llm(dir, &["--latency-ms", &latency, "--script", &script]).await
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
             [auth]\noperator_workspace = \"acme\"\n[runtime]\nagents_workspace = \"acme\"\n{extra}\n"
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

/// Checks every event of the key's workspace against the published schemas with
/// `keel events validate`, and returns how many there were.
pub async fn assert_events_valid(dir: &Path, keel: &Keel, key: &str) -> usize {
    let page = get(keel, key, "/v1/events?format=json&after=0&limit=1000").await;
    let events = page["data"].as_array().unwrap();
    let lines: Vec<String> = events.iter().map(Value::to_string).collect();
    let file = dir.join("events.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = run(dir, &["events", "validate", file.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "events do not match their schemas:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    events.len()
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
    let World {
        dir,
        tools,
        _mock,
        key,
        keel,
    } = world("").await;

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
    assert_eq!(assert_events_valid(dir.path(), &keel, &key).await, 6);

    // The agent's status counts it.
    let status = get(&keel, &key, "/v1/agents/helper/status").await;
    assert_eq!(status["version"], 1, "{status}");
    assert_eq!(
        (status["active"].as_u64(), status["queued"].as_u64()),
        (Some(0), Some(0))
    );
    for window in status["windows"].as_array().unwrap() {
        assert_eq!(window["finished"], 1, "{status}");
        assert_eq!(window["success_rate"], 1.0, "{status}");
        assert!(window["p95_duration_ms"].is_u64(), "{status}");
    }
    assert_eq!(status["tools"]["lookup"], "closed", "{status}");
    assert!(status["last_error"].is_null(), "{status}");
}

#[tokio::test]
async fn bad_requests_are_named_and_create_nothing() {
    let World {
        dir,
        tools: _,
        _mock,
        key,
        keel,
    } = world("").await;
    let admin = create_key(dir.path(), "acme", "admin", &[]);

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

/// A `keel serve` whose workspace `acme` has agent `helper` (tool `lookup` on [`Tools`],
/// the mock LLM scripted by [`lookup_script`]), and a member key; `extra` goes under
/// `[runtime]` in keel.toml.
struct World {
    dir: tempfile::TempDir,
    tools: Tools,
    _mock: tokio::process::Child,
    key: String,
    keel: Keel,
}

async fn world(extra: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let (tools, tools_url) = Tools::start().await;
    let (mock, mock_url) = mock_llm(dir.path(), lookup_script()).await;
    configure(
        dir.path(),
        &mock_url,
        extra,
        &[("helper", lookup_agent("helper", &tools_url, ""))],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    World {
        dir,
        tools,
        _mock: mock,
        key,
        keel,
    }
}

/// `keel mock-llm` serving `replies` in order (not by turn) and recording every request it
/// gets; returns the process, its URL and the record file.
async fn mock_recording(
    dir: &Path,
    replies: Value,
) -> (tokio::process::Child, String, std::path::PathBuf) {
    let script = dir.join("script.json");
    std::fs::write(&script, json!({"replies": replies}).to_string()).unwrap();
    let record = dir.join("requests.jsonl");
    let (child, url) = crate::support::mock_llm(
        dir,
        &[
            "--script",
            script.to_str().unwrap(),
            "--record",
            record.to_str().unwrap(),
        ],
    )
    .await;
    (child, url, record)
}

/// Runs `keel chat AGENT` with `lines` on its stdin and returns what it did.
async fn keel_chat(
    dir: std::path::PathBuf,
    agent: &'static str,
    url: String,
    key: String,
    lines: &'static [u8],
) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = keel_command(&dir)
            .args(["chat", agent, "--url", &url])
            .env("KEEL_API_KEY", &key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(lines).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
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
    // Second kill, once the restarted process is calling tools again (resumed calls
    // retried with their keys). How far the first process got before its kill varies:
    // when no tool call was left to make, the work just finishes and there is no second
    // kill.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if tools.requests() > before {
            keel.signal("-KILL");
            keel.wait(Duration::from_secs(10)).await;
            break;
        }
        if count(&keel, &key, "completed").await == TASKS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress after the restart ({} tool requests); keel's output:\n{}",
            tools.requests(),
            keel.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(keel);
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
    assert!(assert_events_valid(dir.path(), &keel, &key).await >= TASKS * 6);
}

async fn post_json(keel: &Keel, key: &str, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(keel.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Waits until the task reaches `status` and returns it.
async fn settle(keel: &Keel, key: &str, id: &str, status: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = get(keel, key, &format!("/v1/tasks/{id}")).await;
        if last["status"] == status {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("task {id} did not reach {status}: {last}");
}

#[tokio::test]
async fn a_tool_that_needs_approval_waits_for_approve_edit_or_reject() {
    let dir = tempfile::tempdir().unwrap();
    let (tools, tools_url) = Tools::start().await;
    let (_mock, mock_url) = mock_llm(dir.path(), lookup_script()).await;
    let spec = lookup_agent("careful", &tools_url, "").replace(
        "[[tools]]\nkind = \"http\"",
        "[[tools]]\nkind = \"http\"\nrequires_approval = true",
    );
    configure(dir.path(), &mock_url, "", &[("careful", spec)]);
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    let ask = || post_task(&keel, &key, json!({"agent": "careful", "input": "Oslo?"}));

    // Approve: the call runs as the model asked.
    let task: Value = ask().await.json().await.unwrap();
    assert_eq!(task["status"], "input-required", "{task}");
    let id = task["id"].as_str().unwrap();
    let events = get(
        &keel,
        &key,
        &format!("/v1/events?format=json&task_id={id}&types=task.input_required"),
    )
    .await;
    let waiting = &events["data"][0]["data"];
    assert_eq!(waiting["reason"], "approval");
    assert_eq!(waiting["tool"], "lookup");
    assert_eq!(waiting["arguments"], json!({"city": "Oslo"}));
    assert_eq!(tools.requests(), 0, "nothing runs before the approval");
    let res = post_json(
        &keel,
        &key,
        &format!("/v1/tasks/{id}/input"),
        json!({"action": "approve"}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let done = settle(&keel, &key, id, "completed").await;
    assert!(done["output"].as_str().unwrap().contains("Oslo"), "{done}");
    let steps = get(&keel, &key, &format!("/v1/tasks/{id}/steps")).await;
    let kinds: Vec<&str> = steps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["llm_call", "approval", "tool_call", "llm_call"]);

    // Edit: the call runs with the human's arguments.
    let task: Value = ask().await.json().await.unwrap();
    let id = task["id"].as_str().unwrap();
    let res = post_json(
        &keel,
        &key,
        &format!("/v1/tasks/{id}/input"),
        json!({"action": "edit", "arguments": {"city": "Bergen"}}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let done = settle(&keel, &key, id, "completed").await;
    assert!(
        done["output"].as_str().unwrap().contains("Bergen"),
        "{done}"
    );
    assert_eq!(tools.args().last(), Some(&json!({"city": "Bergen"})));

    // Reject: the call does not run; the model is told and goes on.
    let before = tools.requests();
    let task: Value = ask().await.json().await.unwrap();
    let id = task["id"].as_str().unwrap();
    let p = assert_problem(
        post_json(
            &keel,
            &key,
            &format!("/v1/tasks/{id}/input"),
            json!({"action": "maybe"}),
        )
        .await,
        400,
    )
    .await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("approve, edit, reject or reply"),
        "{p}"
    );
    // A reply answers a question, not a call waiting for approval.
    let p = assert_problem(
        post_json(
            &keel,
            &key,
            &format!("/v1/tasks/{id}/input"),
            json!({"action": "reply", "message": "Oslo"}),
        )
        .await,
        400,
    )
    .await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("approval of a call to lookup"),
        "{p}"
    );
    let res = post_json(
        &keel,
        &key,
        &format!("/v1/tasks/{id}/input"),
        json!({"action": "reject", "message": "not Oslo"}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let done = settle(&keel, &key, id, "completed").await;
    assert!(
        done["output"]
            .as_str()
            .unwrap()
            .contains("Rejected by a human: not Oslo"),
        "{done}"
    );
    assert_eq!(tools.requests(), before, "a rejected call never runs");

    // Reject and end: the task is `rejected`.
    let task: Value = ask().await.json().await.unwrap();
    let id = task["id"].as_str().unwrap();
    let res = post_json(
        &keel,
        &key,
        &format!("/v1/tasks/{id}/input"),
        json!({"action": "reject", "end_task": true}),
    )
    .await;
    let task: Value = res.json().await.unwrap();
    assert_eq!(task["status"], "rejected", "{task}");
    assert_eq!(tools.requests(), before);
    assert!(assert_events_valid(dir.path(), &keel, &key).await > 20);
}

#[tokio::test]
async fn cancel_during_a_tool_call_abandons_it_and_the_task_stays_canceled() {
    let World {
        dir: _dir,
        tools,
        _mock,
        key,
        keel,
    } = world("").await;
    tools.delay(3_000);
    let task: Value = post_task(
        &keel,
        &key,
        json!({"agent": "helper", "input": "x", "mode": "background"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = task["id"].as_str().unwrap();
    eventually(
        Duration::from_secs(10),
        "the tool call is in flight",
        || async { tools.requests() == 1 },
    )
    .await;
    let res = post_json(
        &keel,
        &key,
        &format!("/v1/tasks/{id}/cancel"),
        json!({"reason": "changed my mind"}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let task: Value = res.json().await.unwrap();
    assert_eq!(task["status"], "canceled");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let task = get(&keel, &key, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["status"], "canceled", "{task}");
    assert_eq!(
        task["steps"], 1,
        "the abandoned tool call was not checkpointed: {task}"
    );
    let events = get(&keel, &key, &format!("/v1/events?format=json&task_id={id}")).await;
    let types: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["task.created", "task.started", "task.canceled"]);
    assert_eq!(events["data"][2]["data"]["reason"], "changed my mind");
    let p = assert_problem(
        post_json(&keel, &key, &format!("/v1/tasks/{id}/cancel"), json!({})).await,
        409,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("canceled"), "{p}");
    // Cancel without a body works too.
    let task: Value = post_task(
        &keel,
        &key,
        json!({"agent": "helper", "input": "y", "mode": "background"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let res = client()
        .post(keel.url(&format!(
            "/v1/tasks/{}/cancel",
            task["id"].as_str().unwrap()
        )))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn each_limit_fails_the_task_with_a_reason_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (tools, tools_url) = Tools::start().await;
    tools.delay(2_500);
    let (_mock, mock_url) = mock_llm(dir.path(), lookup_script()).await;
    configure(
        dir.path(),
        &mock_url,
        "",
        &[
            ("steps", lookup_agent("steps", &tools_url, "max_steps = 1")),
            (
                "calls",
                lookup_agent("calls", &tools_url, "max_tool_calls = 0"),
            ),
            ("slow", lookup_agent("slow", &tools_url, "timeout = \"1s\"")),
            (
                "costly",
                lookup_agent("costly", &tools_url, "max_cost_usd = 0.0000001"),
            ),
            (
                "tight",
                lookup_agent("tight", &tools_url, "context_tokens = 256"),
            ),
        ],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    let long = "word ".repeat(400);
    for (agent, kind, input) in [
        ("steps", "max_steps", "x"),
        ("calls", "max_tool_calls", "x"),
        ("slow", "timeout", "x"),
        ("costly", "max_cost_usd", "x"),
        ("tight", "context_tokens", long.as_str()),
    ] {
        let task: Value = post_task(&keel, &key, json!({"agent": agent, "input": input}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(task["status"], "failed", "{agent}: {task}");
        assert_eq!(task["error"]["kind"], kind, "{agent}: {task}");
        assert_eq!(
            task["dead_lettered"], false,
            "a limit is not a retryable failure: {task}"
        );
        let id = task["id"].as_str().unwrap();
        let events = get(
            &keel,
            &key,
            &format!("/v1/events?format=json&task_id={id}&types=task.error"),
        )
        .await;
        assert_eq!(events["data"][0]["data"]["will_retry"], false, "{agent}");
    }
}

#[tokio::test]
async fn a_task_out_of_attempts_is_dead_lettered_and_a_replay_runs_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_url) = mock_llm(dir.path(), json!([{"content": "fine now"}])).await;
    let flaky = format!(
        "[models.flaky]\n[models.flaky.retry]\nmax_attempts = 1\n[[models.flaky.targets]]\n\
         provider = \"openai\"\nmodel = \"flaky/500?fail=2\"\nbase_url = \"{mock_url}\"\n"
    );
    configure(
        dir.path(),
        &mock_url,
        &flaky,
        &[(
            "shaky",
            "name = \"shaky\"\nmodel = \"flaky\"\nmax_attempts = 2\nretry_delay = \"100ms\"\n"
                .to_owned(),
        )],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    let task: Value = post_task(&keel, &key, json!({"agent": "shaky", "input": "x"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(task["status"], "failed", "{task}");
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["dead_lettered"], true);
    assert_eq!(task["error"]["kind"], "llm");
    let id = task["id"].as_str().unwrap();
    let dlq = get(&keel, &key, "/v1/dead-letters").await;
    assert_eq!(dlq["data"][0]["id"], id);
    let events = get(&keel, &key, &format!("/v1/events?format=json&task_id={id}")).await;
    let types: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"dead_letter.created"), "{types:?}");
    let retries: Vec<bool> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event_type"] == "task.error")
        .map(|e| e["data"]["will_retry"].as_bool().unwrap())
        .collect();
    assert_eq!(retries, [true, false]);

    // Replay: a new run; the flaky model answers now.
    let res = post_json(
        &keel,
        &key,
        &format!("/v1/dead-letters/{id}/replay"),
        json!({}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let done = settle(&keel, &key, id, "completed").await;
    assert_eq!(done["output"], "fine now");
    assert_eq!(done["attempts"], 3);
    let steps = get(&keel, &key, &format!("/v1/tasks/{id}/steps")).await;
    assert_eq!(
        steps["runs"].as_array().unwrap().len(),
        3,
        "each attempt is a run"
    );
    assert_eq!(
        get(&keel, &key, "/v1/dead-letters").await["data"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let res = client()
        .delete(keel.url(&format!("/v1/dead-letters/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
    assert_events_valid(dir.path(), &keel, &key).await;
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_creates_nothing() {
    let World {
        dir: _dir,
        tools: _,
        _mock,
        key,
        keel,
    } = world("enabled = false\nmax_queued = 2").await;
    for _ in 0..2 {
        assert_eq!(
            post_task(
                &keel,
                &key,
                json!({"agent": "helper", "input": "x", "mode": "background"})
            )
            .await
            .status(),
            202
        );
    }
    let res = post_task(
        &keel,
        &key,
        json!({"agent": "helper", "input": "x", "mode": "background"}),
    )
    .await;
    assert!(res.headers().get("retry-after").is_some());
    let p = assert_problem(res, 503).await;
    assert!(
        p["detail"].as_str().unwrap().contains("runtime.max_queued"),
        "{p}"
    );
    assert_eq!(
        get(&keel, &key, "/v1/tasks").await["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_task() {
    let World {
        dir: _dir,
        tools,
        _mock,
        key,
        keel,
    } = world("").await;
    let send = || {
        client()
            .post(keel.url("/v1/tasks"))
            .bearer_auth(&key)
            .header("idempotency-key", "order-42")
            .json(&json!({"agent": "helper", "input": "x"}))
            .send()
    };
    let a: Value = send().await.unwrap().json().await.unwrap();
    let b: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(b["status"], "completed");
    assert_eq!(
        get(&keel, &key, "/v1/tasks").await["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(tools.effects().len(), 1);
    // A repeat in stream mode of a settled task sends the task and ends.
    let res = client()
        .post(keel.url("/v1/tasks"))
        .bearer_auth(&key)
        .header("idempotency-key", "order-42")
        .json(&json!({"agent": "helper", "input": "x", "mode": "stream"}))
        .send()
        .await
        .unwrap();
    let text = tokio::time::timeout(Duration::from_secs(10), res.text())
        .await
        .expect("the stream of a settled task ends at once")
        .unwrap();
    assert!(
        text.starts_with("event: task\n") && text.contains(a["id"].as_str().unwrap()),
        "{text}"
    );
    assert_eq!(text.matches("event: ").count(), 1, "{text}");
}

#[tokio::test]
async fn higher_priorities_start_first_and_a_busy_workspace_does_not_starve_a_quiet_one() {
    let dir = tempfile::tempdir().unwrap();
    let (tools, tools_url) = Tools::start().await;
    // The first task's tool call holds the one worker while the others queue up.
    tools.delay(2_000);
    let (_mock, mock_url) = mock_llm(dir.path(), lookup_script()).await;
    configure(
        dir.path(),
        &mock_url,
        "workers = 1",
        &[("helper", lookup_agent("helper", &tools_url, ""))],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let other_admin = create_key(dir.path(), "other", "admin", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    let spec = json!({"name": "helper", "tools": [{"kind": "http", "name": "lookup", "url": format!("{tools_url}/lookup")}]});
    assert_eq!(
        post_json(&keel, &other_admin, "/v1/agents", spec)
            .await
            .status(),
        201
    );
    let bg = |k: &str, p: &str, i: &str| {
        let body = json!({"agent": "helper", "input": i, "priority": p, "mode": "background"});
        let k = k.to_owned();
        let keel = &keel;
        async move {
            post_task(keel, &k, body)
                .await
                .json::<Value>()
                .await
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    // The one worker is busy with this.
    let first = bg(&key, "medium", "first").await;
    eventually(
        Duration::from_secs(10),
        "the first task's tool call",
        || async { tools.requests() >= 1 },
    )
    .await;
    let low = bg(&key, "low", "low").await;
    let mut busy = Vec::new();
    for i in 0..4 {
        busy.push(bg(&key, "medium", &format!("busy {i}")).await);
    }
    let quiet = bg(&other_admin, "medium", "quiet").await;
    let critical = bg(&key, "critical", "critical").await;
    tools.delay(100);
    eventually(Duration::from_secs(60), "all done", || {
        let keel = &keel;
        let key = &key;
        async move { count(keel, key, "completed").await == 7 }
    })
    .await;
    let started = |id: String, k: String| {
        let keel = &keel;
        async move {
            get(keel, &k, &format!("/v1/tasks/{id}")).await["started_at"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let mut order = vec![
        ("first", started(first, key.clone()).await),
        ("low", started(low, key.clone()).await),
        ("quiet", started(quiet, other_admin.clone()).await),
        ("critical", started(critical, key.clone()).await),
    ];
    for (i, id) in busy.into_iter().enumerate() {
        order.push((
            ["busy0", "busy1", "busy2", "busy3"][i],
            started(id, key.clone()).await,
        ));
    }
    order.sort_by(|a, b| a.1.cmp(&b.1));
    let names: Vec<&str> = order.iter().map(|(n, _)| *n).collect();
    assert_eq!(names[0], "first", "{names:?}");
    assert_eq!(names[1], "critical", "critical goes first: {names:?}");
    assert_eq!(names[7], "low", "low goes last: {names:?}");
    let quiet_at = names.iter().position(|n| *n == "quiet").unwrap();
    assert!(
        quiet_at <= 3,
        "the quiet workspace's task waits behind at most one busy task: {names:?}"
    );
}

#[tokio::test]
async fn an_agent_delegates_to_another_and_a_depth_limit_cuts_loops() {
    let dir = tempfile::tempdir().unwrap();
    let (tools, tools_url) = Tools::start().await;
    let (_mock, mock_url) = mock_llm(dir.path(), lookup_script()).await;
    let boss_dir = tempfile::tempdir().unwrap();
    let (_boss_mock, boss_url) = mock_llm(
        boss_dir.path(),
        json!([
            {"tool_calls": [{"name": "ask", "arguments": {"input": "What about Oslo?"}}]},
            {"content": "Boss says: {{last}}"}
        ]),
    )
    .await;
    let boss_route = format!(
        "max_depth = 1\n[models.boss]\n[[models.boss.targets]]\nprovider = \"openai\"\nmodel = \"boss\"\nbase_url = \"{boss_url}\"\n"
    );
    let delegate = |name: &str, to: &str| {
        format!(
            "name = \"{name}\"\nmodel = \"boss\"\n[[tools]]\nkind = \"agent\"\nname = \"ask\"\nagent = \"{to}\"\n"
        )
    };
    configure(
        dir.path(),
        &mock_url,
        &boss_route,
        &[
            ("helper", lookup_agent("helper", &tools_url, "")),
            ("boss", delegate("boss", "helper")),
            ("looper", delegate("looper", "looper")),
        ],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;

    let task: Value = post_task(
        &keel,
        &key,
        json!({"agent": "boss", "input": "Ask the helper"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    let out = task["output"].as_str().unwrap();
    assert!(
        out.starts_with("Boss says: Answer: ") && out.contains("Oslo"),
        "{out}"
    );
    assert_eq!(tools.effects().len(), 1);
    let children = get(&keel, &key, "/v1/tasks?agent=helper").await;
    let child = &children["data"][0];
    assert_eq!(
        child["parent_task_id"], task["id"],
        "the child is linked to its parent"
    );
    assert_eq!(child["status"], "completed");

    // looper → looper (depth 1) → looper (depth 2 > max_depth 1): refused, and the
    // refusal is the innermost agent's tool result.
    let task: Value = post_task(&keel, &key, json!({"agent": "looper", "input": "loop"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    let out = task["output"].as_str().unwrap();
    assert!(out.contains("deeper than 1"), "{out}");
    let loops = get(&keel, &key, "/v1/tasks?agent=looper").await;
    assert_eq!(
        loops["data"].as_array().unwrap().len(),
        2,
        "only one level of delegation ran"
    );
    assert_events_valid(dir.path(), &keel, &key).await;
}

#[tokio::test]
async fn stream_mode_sends_the_runs_events_as_they_happen_and_ends_when_it_settles() {
    let World {
        dir: _dir,
        tools: _,
        _mock,
        key,
        keel,
    } = world("").await;
    let res = post_task(
        &keel,
        &key,
        json!({"agent": "helper", "input": "x", "mode": "stream"}),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(Duration::from_secs(20), res.text())
        .await
        .expect("the stream ends")
        .unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .filter(|k| *k != "token.delta")
        .collect();
    assert_eq!(
        kinds,
        [
            "task",
            "task.created",
            "task.started",
            "tool.call",
            "tool.result",
            "agent.message",
            "task.completed"
        ],
        "{text}"
    );
    // The answer's tokens came as they streamed, and add up to the message.
    let frames: Vec<Value> = text
        .split("\n\n")
        .filter(|f| f.starts_with("event: token.delta\n"))
        .map(|f| serde_json::from_str(f.split_once("data: ").unwrap().1).unwrap())
        .collect();
    assert!(frames.len() > 1, "streamed in pieces: {text}");
    assert!(
        frames.iter().all(|f| f["step"] == 2),
        "only the last LLM call writes text: {text}"
    );
    let streamed: String = frames
        .iter()
        .map(|f| f["content"].as_str().unwrap())
        .collect();
    let message = text
        .split("\n\n")
        .find(|f| f.contains("event: agent.message\n"))
        .unwrap();
    let message: Value = serde_json::from_str(message.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(message["data"]["content"], streamed.as_str(), "{text}");
    assert!(streamed.starts_with("Answer: "), "{streamed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_processes_share_200_tasks_and_survive_one_being_killed() {
    let Some(url) = keel_store::testing::fresh_postgres_db().await.unwrap() else {
        return;
    };
    let env = [("KEEL_DATABASE_URL", url.as_str())];
    let (tools, tools_url) = Tools::start().await;
    tools.delay(100);
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let (_mock, mock_url) = mock_llm_slow(dir_a.path(), lookup_script(), 20).await;
    for dir in [dir_a.path(), dir_b.path()] {
        configure(
            dir,
            &mock_url,
            "lease = \"2s\"",
            &[("helper", lookup_agent("helper", &tools_url, ""))],
        );
    }
    let key = create_key(dir_a.path(), "acme", "member", &env);
    let mut a = Keel::start(dir_a.path(), &env).await;
    let b = Keel::start(dir_b.path(), &env).await;
    const TASKS: usize = 200;
    for i in 0..TASKS {
        let keel = if i % 2 == 0 { &a } else { &b };
        let res = post_task(
            keel,
            &key,
            json!({"agent": "helper", "input": format!("q{i}"), "mode": "background"}),
        )
        .await;
        assert_eq!(res.status(), 202);
    }
    eventually(
        Duration::from_secs(30),
        "a third of the work done",
        || async { tools.effects().len() >= TASKS / 3 },
    )
    .await;
    a.signal("-KILL");
    a.wait(Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(90),
        "every task completed on the survivor",
        || {
            let (b, key) = (&b, &key);
            async move { count(b, key, "completed").await == TASKS }
        },
    )
    .await;
    let effects = tools.effects();
    assert_eq!(effects.len(), TASKS, "one side effect per task");
    assert!(effects.values().all(|&n| n == 1), "a side effect ran twice");
    let page = get(&b, &key, "/v1/tasks?limit=500").await;
    for task in page["data"].as_array().unwrap() {
        assert_eq!(task["steps"], 3, "{task}");
        assert_eq!(task["attempts"], 1, "{task}");
    }
}

#[tokio::test]
async fn keel_run_and_chat_show_tool_calls_and_answers_at_the_terminal() {
    let World {
        dir,
        tools: _,
        _mock,
        key,
        keel,
    } = world("").await;
    let admin = create_key(dir.path(), "acme", "admin", &[]);
    let url = keel.url("");
    let (dir_path, url_run, key_run) = (dir.path().to_owned(), url.clone(), key.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            &dir_path,
            &["run", "helper", "Weather in Oslo?", "--url", &url_run],
            &[("KEEL_API_KEY", &key_run)],
        )
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("→ lookup {\"city\":\"Oslo\"}"), "{stdout}");
    assert!(stdout.contains("← lookup"), "{stdout}");
    assert!(stdout.contains("helper: Answer: "), "{stdout}");
    assert!(stdout.contains("✓ completed in 3 steps"), "{stdout}");

    // chat: each line is a task on one thread.
    let (dir_path, url_chat, key_chat) = (dir.path().to_owned(), url.clone(), key.clone());
    let out = keel_chat(
        dir_path,
        "helper",
        url_chat,
        key_chat,
        b"first question\nsecond question\n",
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("✓ completed").count(), 2, "{stdout}");
    let threads: Vec<&str> = stdout
        .match_indices("thr_")
        .map(|(i, _)| &stdout[i..i + 36])
        .collect();
    assert_eq!(threads.len(), 3, "{stdout}");
    assert!(
        threads.windows(2).all(|w| w[0] == w[1]),
        "one thread for the whole chat: {stdout}"
    );

    // agents reload: the spec files are read again.
    std::fs::write(
        dir.path().join("agents").join("second.toml"),
        "name = \"second\"\n",
    )
    .unwrap();
    let (dir_path, url_reload) = (dir.path().to_owned(), url.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            &dir_path,
            &["agents", "reload", "--url", &url_reload],
            &[("KEEL_API_KEY", &admin)],
        )
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("stored second v1"), "{stdout}");
    assert_eq!(get(&keel, &key, "/v1/agents/second").await["version"], 1);
}

#[tokio::test]
async fn an_agent_asks_the_user_a_question_and_goes_on_with_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_url) = mock_llm(
        dir.path(),
        json!([
            {"tool_calls": [{"name": "ask_user", "arguments": {"question": "Which city?"}}]},
            {"content": "Answer: {{last}}"}
        ]),
    )
    .await;
    let spec = "name = \"asker\"\nsystem_prompt = \"Ask when unsure.\"\n\
                [[tools]]\nkind = \"human\"\nname = \"ask_user\"\n";
    configure(dir.path(), &mock_url, "", &[("asker", spec.to_owned())]);
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;

    let task: Value = post_task(&keel, &key, json!({"agent": "asker", "input": "Weather?"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(task["status"], "input-required", "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    let events = get(
        &keel,
        &key,
        &format!("/v1/events?format=json&task_id={id}&types=task.input_required"),
    )
    .await;
    let waiting = &events["data"][0]["data"];
    assert_eq!(waiting["reason"], "reply", "{waiting}");
    assert_eq!(waiting["question"], "Which city?");
    assert_eq!(waiting["tool"], "ask_user");

    // A question takes a reply, with a message; nothing else.
    let input = format!("/v1/tasks/{id}/input");
    let problem = assert_problem(
        post_json(&keel, &key, &input, json!({"action": "approve"})).await,
        400,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("\"reply\""),
        "{problem}"
    );
    let problem = assert_problem(
        post_json(
            &keel,
            &key,
            &input,
            json!({"action": "reply", "message": " "}),
        )
        .await,
        400,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().starts_with("message:"),
        "{problem}"
    );
    assert_eq!(
        get(&keel, &key, &format!("/v1/tasks/{id}")).await["status"],
        "input-required"
    );

    let res = post_json(
        &keel,
        &key,
        &input,
        json!({"action": "reply", "message": "Oslo"}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let done = settle(&keel, &key, &id, "completed").await;
    assert_eq!(done["output"], "Answer: Oslo", "{done}");
    let steps = get(&keel, &key, &format!("/v1/tasks/{id}/steps")).await;
    let kinds: Vec<&str> = steps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["llm_call", "reply", "llm_call"]);
    assert_problem(
        post_json(
            &keel,
            &key,
            &input,
            json!({"action": "reply", "message": "again"}),
        )
        .await,
        409,
    )
    .await;

    // At the terminal, `keel chat` shows the question and sends the next line as the reply.
    let (dir_path, url_chat, key_chat) = (dir.path().to_owned(), keel.url(""), key.clone());
    let out = keel_chat(dir_path, "asker", url_chat, key_chat, b"Weather?\nBergen\n").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("asker asks: Which city?"), "{stdout}");
    assert!(stdout.contains("asker: Answer: Bergen"), "{stdout}");
    assert_eq!(stdout.matches("✓ completed").count(), 1, "{stdout}");
    assert_events_valid(dir.path(), &keel, &key).await;
}

#[tokio::test]
async fn turns_past_the_context_budget_are_summarized_once_and_pinned_messages_stay() {
    let dir = tempfile::tempdir().unwrap();
    let (_tools, tools_url) = Tools::start().await;
    // Served in order: tasks 1–3 answer "ok"; task 4's first call is the summary, then a
    // tool call, then the answer.
    let (_mock, mock_url, record) = mock_recording(
        dir.path(),
        json!([
            {"content": "ok"}, {"content": "ok"}, {"content": "ok"},
            {"content": "SUMMARY: the user talked about bravo and river."},
            {"tool_calls": [{"name": "lookup", "arguments": {"city": "Oslo"}}]},
            {"content": "done"},
        ]),
    )
    .await;
    let spec = lookup_agent(
        "long",
        &tools_url,
        "context_tokens = 512\ncontext_overflow = \"summarize\"",
    );
    configure(dir.path(), &mock_url, "", &[("long", spec)]);
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;

    let thread: Value = post_json(&keel, &key, "/v1/threads", json!({}))
        .await
        .json()
        .await
        .unwrap();
    let thread = thread["id"].as_str().unwrap();
    let long = |word: &str| format!("{word} ").repeat(200);
    let inputs = [
        json!([{"role": "user", "content": "My name is Zed, remember it.", "pinned": true}]),
        json!(long("bravo")),
        json!(long("river")),
        json!(long("delta")),
    ];
    let mut last = Value::Null;
    for input in inputs {
        last = post_task(
            &keel,
            &key,
            json!({"agent": "long", "input": input, "thread_id": thread}),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(last["status"], "completed", "{last}");
    }
    assert_eq!(last["output"], "done");

    let requests: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(requests.len(), 6, "one summary, reused for the second call");
    let text = |m: &Value| m["content"].as_str().unwrap_or_default().to_owned();
    // Tasks 1–3 fit: nothing left out; Keel's `pinned` mark never reaches the model.
    assert_eq!(requests[2]["messages"].as_array().unwrap().len(), 6);
    assert!(!requests[0].to_string().contains("pinned"));
    // The summary call reads what is left out — not the pinned message, not the latest turn.
    let summary = &requests[3]["messages"];
    assert!(text(&summary[0]).starts_with("You summarize"), "{summary}");
    let transcript = text(&summary[1]);
    assert!(
        transcript.contains("bravo bravo") && transcript.contains("river river"),
        "{transcript}"
    );
    assert!(!transcript.contains("Zed") && !transcript.contains("delta"));
    // Both of task 4's calls get the summary after the system prompt, the pinned
    // message, and the latest turn; the summarized turns are gone.
    for request in &requests[4..] {
        let messages = request["messages"].as_array().unwrap();
        let system = text(&messages[0]);
        assert!(
            system.starts_with("You help Acme.")
                && system.contains("SUMMARY: the user talked about bravo and river."),
            "{system}"
        );
        let rest: Vec<String> = messages[1..].iter().map(text).collect();
        assert!(rest[0].contains("Zed"), "{rest:?}");
        assert!(rest.iter().any(|m| m.contains("delta delta")), "{rest:?}");
        assert!(
            !rest
                .iter()
                .any(|m| m.contains("bravo") || m.contains("river")),
            "{rest:?}"
        );
    }
    // The summary is a step of the task, its usage the task's.
    let id = last["id"].as_str().unwrap();
    let steps = get(&keel, &key, &format!("/v1/tasks/{id}/steps")).await;
    let kinds: Vec<&str> = steps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["summary", "llm_call", "tool_call", "llm_call"]);
    assert_eq!(
        steps["data"][0]["data"]["text"],
        "SUMMARY: the user talked about bravo and river."
    );
    let usage = get(&keel, &key, "/v1/usage?group_by=route").await;
    assert_eq!(usage["data"][0]["requests"], 6, "{usage}");
}

#[tokio::test]
async fn an_agent_never_sends_more_than_its_routes_context_window() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_url, record) = mock_recording(dir.path(), json!([{"content": "ok"}])).await;
    // The agent allows 100,000 tokens; the route's model has a window of 300.
    let spec = "name = \"wide\"\nsystem_prompt = \"Be brief.\"\n".to_owned();
    configure(dir.path(), &mock_url, "", &[("wide", spec)]);
    let toml = std::fs::read_to_string(dir.path().join("keel.toml")).unwrap();
    std::fs::write(
        dir.path().join("keel.toml"),
        toml.replacen(
            "output_price_per_mtok = 2.0\n",
            "output_price_per_mtok = 2.0\ncontext_window = 300\n",
            1,
        ),
    )
    .unwrap();
    let key = create_key(dir.path(), "acme", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;
    let thread: Value = post_json(&keel, &key, "/v1/threads", json!({}))
        .await
        .json()
        .await
        .unwrap();
    let thread = thread["id"].as_str().unwrap();
    for word in ["bravo", "river"] {
        let task: Value = post_task(
            &keel,
            &key,
            json!({"agent": "wide", "input": format!("{word} ").repeat(200), "thread_id": thread}),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(task["status"], "completed", "{task}");
    }
    let requests: Vec<String> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(requests.len(), 2);
    assert!(requests[0].contains("bravo bravo"));
    assert!(
        requests[1].contains("river river") && !requests[1].contains("bravo"),
        "the first turn left out to fit the window: {}",
        requests[1]
    );
}
