//! `keel run`, `keel chat` and `keel agents reload`: agents for people at a terminal —
//! live output, tool calls shown as they happen.

use std::io::BufRead as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::out;

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?)
}

/// Runs one task of `agent` and prints what happens until it settles. Returns the task's
/// final status.
pub async fn run(
    url: &str,
    key: &str,
    agent: &str,
    input: &str,
    thread: Option<&str>,
) -> anyhow::Result<String> {
    let base = url.trim_end_matches('/');
    let mut body = json!({"agent": agent, "input": input, "mode": "stream"});
    if let Some(thread) = thread {
        body["thread_id"] = json!(thread);
    }
    let res = client()?
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach Keel at {base}"))?;
    if !res.status().is_success() {
        let status = res.status();
        let problem: Value = res.json().await.unwrap_or(Value::Null);
        bail!(
            "{status}: {}",
            problem["detail"]
                .as_str()
                .unwrap_or("the server refused the task")
        );
    }
    let mut stream = res.bytes_stream();
    let mut buffer = Vec::new();
    let mut status = String::from("working");
    let mut task_id = String::new();
    while let Some(chunk) = stream.next().await {
        buffer.extend_from_slice(&chunk.context("the stream broke")?);
        while let Some(end) = find(&buffer, b"\n\n") {
            let frame: Vec<u8> = buffer.drain(..end + 2).collect();
            let frame = String::from_utf8_lossy(&frame);
            let mut kind = "";
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = k;
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            let d = &v["data"];
            match kind {
                "task" => {
                    task_id = v["id"].as_str().unwrap_or_default().to_owned();
                    out(&format!(
                        "task {task_id} ({agent}, thread {})",
                        v["thread_id"].as_str().unwrap_or("-")
                    ));
                }
                "tool.call" => out(&format!(
                    "  → {} {}",
                    d["tool"].as_str().unwrap_or("?"),
                    d["arguments"]
                )),
                "tool.result" => {
                    let text = if d["ok"] == true {
                        d["result"].as_str()
                    } else {
                        d["error"].as_str()
                    };
                    let mut text = text.unwrap_or_default().replace('\n', " ");
                    if text.len() > 200 {
                        let mut cut = 200;
                        while !text.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        text.truncate(cut);
                        text.push('…');
                    }
                    let mark = if d["ok"] == true { "←" } else { "✗" };
                    out(&format!(
                        "  {mark} {} {text}",
                        d["tool"].as_str().unwrap_or("?")
                    ));
                }
                "agent.message" => out(&format!(
                    "{agent}: {}",
                    d["content"].as_str().unwrap_or_default()
                )),
                "task.input_required" => {
                    status = "input-required".to_owned();
                    out(&format!(
                        "waiting for approval of {} {} — POST /v1/tasks/{task_id}/input {{\"action\": \"approve\"}}",
                        d["tool"].as_str().unwrap_or("?"),
                        d["arguments"]
                    ));
                }
                "task.completed" => {
                    status = "completed".to_owned();
                    let cost = d["usage"]["cost_nanousd"].as_f64().unwrap_or(0.0) / 1e9;
                    out(&format!("✓ completed in {} steps (${cost:.6})", d["steps"]));
                }
                "task.error" if d["will_retry"] == false => {
                    status = "failed".to_owned();
                    out(&format!(
                        "✗ failed: {}",
                        d["error"]["message"].as_str().unwrap_or("?")
                    ));
                }
                "task.error" => out(&format!(
                    "  run failed, retrying: {}",
                    d["error"]["message"].as_str().unwrap_or("?")
                )),
                "task.canceled" => status = "canceled".to_owned(),
                "stream.closed" => {
                    bail!(
                        "the server closed the stream ({}); see GET /v1/tasks/{task_id}",
                        v["reason"]
                    );
                }
                _ => {}
            }
        }
    }
    Ok(status)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A conversation with `agent` on one thread: each line read is a task on it.
pub async fn chat(url: &str, key: &str, agent: &str) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/');
    let thread: Value = client()?
        .post(format!("{base}/v1/threads"))
        .bearer_auth(key)
        .json(&json!({"metadata": {"agent": agent}}))
        .send()
        .await
        .with_context(|| format!("cannot reach Keel at {base}"))?
        .error_for_status()?
        .json()
        .await?;
    let thread = thread["id"].as_str().context("no thread id")?.to_owned();
    out(&format!(
        "chatting with {agent} on thread {thread}; an empty line or /exit ends"
    ));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line == "/exit" {
            break;
        }
        if let Err(e) = run(base, key, agent, line, Some(&thread)).await {
            out(&format!("error: {e:#}"));
        }
    }
    Ok(())
}

/// Asks a running server to reload its agent spec files.
pub async fn reload(url: &str, key: &str) -> anyhow::Result<bool> {
    let base = url.trim_end_matches('/');
    let res = client()?
        .post(format!("{base}/v1/agents/reload"))
        .bearer_auth(key)
        .send()
        .await
        .with_context(|| format!("cannot reach Keel at {base}"))?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["detail"].as_str().unwrap_or("reload refused")
        );
    }
    for stored in body["stored"].as_array().into_iter().flatten() {
        out(&format!("stored {}", stored.as_str().unwrap_or_default()));
    }
    let rejected = body["rejected"].as_array().map_or(0, Vec::len);
    for r in body["rejected"].as_array().into_iter().flatten() {
        out(&format!("rejected {}", r.as_str().unwrap_or_default()));
    }
    Ok(rejected == 0)
}
