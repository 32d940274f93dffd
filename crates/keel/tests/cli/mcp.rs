//! MCP tools against a real MCP server nobody here wrote: `@modelcontextprotocol/server-everything`
//! from npm (installed by `scripts/test`, which sets KEEL_TEST_MCP_EVERYTHING), over stdio
//! (started and restarted by Keel) and over streamable HTTP (started by this test).

use std::time::Duration;

use serde_json::{Value, json};

use crate::agents::{configure, get, mock_llm, post_task};
use crate::support::{Keel, assert_problem, client, create_key};

fn everything() -> String {
    std::env::var("KEEL_TEST_MCP_EVERYTHING").unwrap_or_else(|_| {
        panic!(
            "KEEL_TEST_MCP_EVERYTHING is not set: run the suite with ./scripts/test, which installs @modelcontextprotocol/server-everything"
        )
    })
}

/// Sums 2 and 3; sends a bad argument (the schema error goes back to the model); calls a
/// tool the allowlist leaves out (the answer names the ones offered); reads the server's
/// environment; answers with it.
fn script() -> Value {
    json!([
        {"tool_calls": [{"name": "everything__get-sum", "arguments": {"a": 2, "b": 3}}]},
        {"tool_calls": [{"name": "everything__get-sum", "arguments": {"a": "two", "b": 1}}]},
        {"tool_calls": [{"name": "everything__echo", "arguments": {"message": "hi"}}]},
        {"tool_calls": [{"name": "everything__get-env", "arguments": {}}]},
        {"content": "Answer: {{last}}"}
    ])
}

fn agent(name: &str, server: &str) -> String {
    format!(
        "name = \"{name}\"\ndescription = \"adds\"\nsystem_prompt = \"You add.\"\n\
         [[tools]]\nkind = \"mcp\"\nname = \"everything\"\n{server}\ntools = [\"get-sum\", \"get-env\"]\ntimeout = \"20s\"\n"
    )
}

/// The tool messages of a task's thread, in order.
async fn tool_results(keel: &Keel, key: &str, task: &Value) -> Vec<String> {
    let thread = task["thread_id"].as_str().unwrap();
    let messages = get(keel, key, &format!("/v1/threads/{thread}/messages")).await;
    messages["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["message"]["role"] == "tool")
        .map(|m| m["message"]["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs one task of `agent` and checks what each MCP call came to.
async fn run_and_check(keel: &Keel, key: &str, agent: &str) -> Value {
    let res = post_task(keel, key, json!({"agent": agent, "input": "2 + 3?"})).await;
    assert_eq!(res.status(), 200);
    let task: Value = res.json().await.unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["tool_calls"], 4, "{task}");
    let results = tool_results(keel, key, &task).await;
    assert_eq!(results.len(), 4, "{results:?}");
    assert_eq!(results[0], "The sum of 2 and 3 is 5.");
    assert!(
        results[1].contains("do not match the tool's schema") && results[1].contains("/a"),
        "{}",
        results[1]
    );
    assert!(
        results[2].contains("no tool named \"everything__echo\"")
            && results[2].contains("everything__get-sum")
            && results[2].contains("everything__get-env")
            && results[2].matches("everything__echo").count() == 1,
        "{}",
        results[2]
    );
    let env: Value = serde_json::from_str(&results[3]).unwrap();
    assert!(env.is_object(), "{}", results[3]);
    let id = task["id"].as_str().unwrap();
    let steps = get(keel, key, &format!("/v1/tasks/{id}/steps")).await;
    let oks: Vec<bool> = steps["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "tool_call")
        .map(|s| s["data"]["ok"].as_bool().unwrap())
        .collect();
    assert_eq!(oks, [true, false, false, true]);
    task
}

fn pid_in(file: &std::path::Path) -> u32 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test]
async fn an_agent_calls_a_stdio_mcp_server_that_keel_restarts_after_it_is_killed() {
    let entry = everything();
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_url) = mock_llm(dir.path(), script()).await;
    let pidfile = dir.path().join("mcp.pid");
    let server = format!(
        "command = [\"sh\", \"-c\", \"echo $$ > {}; exec node {entry} stdio\"]\n\
         env = {{ KEEL_MCP_MARK = \"${{MCP_MARK_SOURCE}}\" }}",
        pidfile.display()
    );
    // The operator lets specs start `sh` and read MCP_MARK_*; nothing else.
    configure(
        dir.path(),
        &mock_url,
        "mcp_commands = [\"sh\"]\ntool_env = [\"MCP_MARK_*\"]",
        &[("calc", agent("calc", &server))],
    );
    let key = create_key(dir.path(), "acme", "member", &[]);
    let secret = "jwt-secret-that-an-mcp-server-must-never-see-0123456789";
    let keel = Keel::start(
        dir.path(),
        &[("KEEL_JWT_SECRET", secret), ("MCP_MARK_SOURCE", "mark-42")],
    )
    .await;

    let task = run_and_check(&keel, &key, "calc").await;
    // The server got its configured environment and none of Keel's.
    let env = tool_results(&keel, &key, &task).await.pop().unwrap();
    let env: Value = serde_json::from_str(&env).unwrap();
    assert_eq!(env["KEEL_MCP_MARK"], "mark-42", "{env}");
    assert!(env.get("MCP_MARK_SOURCE").is_none(), "{env}");
    assert!(env.get("KEEL_JWT_SECRET").is_none(), "{env}");
    assert!(!env.to_string().contains(secret));
    assert!(env.get("PATH").is_some(), "{env}");

    // One process served all four calls; kill it as a crash would.
    let first = pid_in(&pidfile);
    assert!(alive(first));
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &first.to_string()])
            .status()
            .unwrap()
            .success()
    );
    for _ in 0..100 {
        if !alive(first) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The next task finds it dead, starts it again and completes.
    run_and_check(&keel, &key, "calc").await;
    let second = pid_in(&pidfile);
    assert_ne!(first, second);
    assert!(alive(second));
    let metrics = client()
        .get(keel.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("keel_mcp_restarts_total 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("mcp"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A clean stop stops the server too.
    let mut keel = keel;
    keel.stop_cleanly(Duration::from_secs(15)).await;
    for _ in 0..150 {
        if !alive(second) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(second), "the MCP server outlived keel");
}

#[tokio::test]
async fn an_agent_calls_a_streamable_http_mcp_server_and_bad_specs_are_named() {
    let entry = everything();
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = tokio::process::Command::new("node")
        .args([entry.as_str(), "streamableHttp"])
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "server-everything did not listen on {port}");

    let (_mock, mock_url) = mock_llm(dir.path(), script()).await;
    let url = format!("url = \"http://127.0.0.1:{port}/mcp\"");
    // A spec file that wants to start a program the operator did not list is not loaded.
    let rogue = agent("rogue", "command = [\"bash\", \"-c\", \"id\"]");
    configure(
        dir.path(),
        &mock_url,
        "",
        &[("web", agent("web", &url)), ("rogue", rogue)],
    );
    let admin = create_key(dir.path(), "acme", "admin", &[]);
    let keel = Keel::start(dir.path(), &[]).await;

    let res = client()
        .get(keel.url("/v1/agents/rogue"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "a refused spec file is not stored");
    assert!(
        keel.output().contains("runtime.mcp_commands"),
        "the refusal is logged with its reason"
    );

    let task = run_and_check(&keel, &admin, "web").await;
    let env = tool_results(&keel, &admin, &task).await.pop().unwrap();
    let env: Value = serde_json::from_str(&env).unwrap();
    assert_eq!(env["PORT"], port.to_string(), "the HTTP server's own env");

    // A spec naming both transports, neither, or a bad URL is refused with each problem.
    let res = client()
        .post(keel.url("/v1/agents"))
        .bearer_auth(&admin)
        .json(&json!({
            "name": "broken", "model": "default", "system_prompt": "x",
            "tools": [
                {"kind": "mcp", "name": "a", "command": ["node"], "url": "http://127.0.0.1:1/mcp"},
                {"kind": "mcp", "name": "b"},
                {"kind": "mcp", "name": "c__d", "url": "ftp://x"},
                {"kind": "mcp", "name": "e", "command": ["bash", "-c", "cat /etc/shadow"]},
                {"kind": "mcp", "name": "f", "url": "http://127.0.0.1:1/mcp",
                 "headers": {"authorization": "Bearer ${KEEL_JWT_SECRET}"}},
            ],
        }))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(res, 400).await;
    let text = problem.to_string();
    for field in [
        "tools[0].url",
        "tools[1].command",
        "tools[2].name",
        "tools[2].url",
        "tools[3].command",
        "tools[4].headers",
    ] {
        assert!(text.contains(field), "{field} not named: {text}");
    }
    // A workspace admin may neither start a program nor read Keel's environment.
    assert!(
        text.contains("runtime.mcp_commands") && text.contains("runtime.tool_env"),
        "{text}"
    );

    // The server going away fails the call as a tool result; the task does not hang.
    server.kill().await.unwrap();
    let res = post_task(&keel, &admin, json!({"agent": "web", "input": "2 + 3?"})).await;
    let task: Value = res.json().await.unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    let results = tool_results(&keel, &admin, &task).await;
    assert!(results[0].contains("MCP"), "{results:?}");
    let id = task["id"].as_str().unwrap();
    let steps = get(&keel, &admin, &format!("/v1/tasks/{id}/steps")).await;
    let first_tool = steps["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "tool_call")
        .unwrap();
    assert_eq!(first_tool["data"]["ok"], false, "{first_tool}");
    assert_eq!(
        first_tool["data"]["attempts"], 3,
        "retried twice (the default) before giving up: {first_tool}"
    );
}
