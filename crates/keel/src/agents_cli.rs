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

/// Where a task followed at the terminal stopped.
#[derive(Debug, Default)]
pub struct Settled {
    /// Its status: `completed`, `failed`, `canceled`, `input-required`, or `working` if the
    /// stream ended first.
    pub status: String,
    /// The task.
    pub task_id: String,
    /// The question it waits on a reply to, if it asked one.
    pub question: Option<String>,
    /// The last event's seq (to follow on from).
    pub seq: Option<u64>,
}

/// Runs one task of `agent` and prints what happens until it settles.
pub async fn run(
    url: &str,
    key: &str,
    agent: &str,
    input: &str,
    thread: Option<&str>,
) -> anyhow::Result<Settled> {
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
    let res = accepted(res, "the server refused the task").await?;
    follow(res, agent, Settled::default()).await
}

/// Answers the question task `task_id` asked, then prints what happens until it settles
/// again (following the task's events after `seq`).
pub async fn reply(
    url: &str,
    key: &str,
    agent: &str,
    task_id: &str,
    seq: Option<u64>,
    message: &str,
) -> anyhow::Result<Settled> {
    let base = url.trim_end_matches('/');
    let http = client()?;
    let res = http
        .post(format!("{base}/v1/tasks/{task_id}/input"))
        .bearer_auth(key)
        .json(&json!({"action": "reply", "message": message}))
        .send()
        .await
        .with_context(|| format!("cannot reach Keel at {base}"))?;
    accepted(res, "the reply was refused").await?;
    let after = seq.map_or_else(String::new, |s| format!("&after={s}"));
    let res = http
        .get(format!("{base}/v1/events?task_id={task_id}{after}"))
        .bearer_auth(key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .with_context(|| format!("cannot reach Keel at {base}"))?
        .error_for_status()?;
    let settled = Settled {
        task_id: task_id.to_owned(),
        ..Settled::default()
    };
    follow(res, agent, settled).await
}

/// Prints a task's events from an SSE response until the task settles or waits for input.
async fn follow(res: reqwest::Response, agent: &str, mut at: Settled) -> anyhow::Result<Settled> {
    let mut stream = res.bytes_stream();
    let mut buffer = Vec::new();
    let mut status = String::from("working");
    let mut task_id = std::mem::take(&mut at.task_id);
    let mut question = None;
    let mut seq = at.seq;
    // Whether the current answer's tokens are being printed as they stream.
    let mut streaming = false;
    'frames: while let Some(chunk) = stream.next().await {
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
                } else if let Some(id) = line.strip_prefix("id: ") {
                    seq = id.trim().parse().ok().or(seq);
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
                        text.truncate(text.floor_char_boundary(200));
                        text.push('…');
                    }
                    let mark = if d["ok"] == true { "←" } else { "✗" };
                    out(&format!(
                        "  {mark} {} {text}",
                        d["tool"].as_str().unwrap_or("?")
                    ));
                }
                "token.delta" => {
                    use std::io::Write as _;
                    let mut stdout = std::io::stdout().lock();
                    if !streaming {
                        let _ = write!(stdout, "{agent}: ");
                        streaming = true;
                    }
                    let _ = write!(stdout, "{}", v["content"].as_str().unwrap_or_default());
                    let _ = stdout.flush();
                }
                // Its tokens are on the screen already: end the line.
                "agent.message" if streaming => {
                    streaming = false;
                    out("");
                }
                "agent.message" => out(&format!(
                    "{agent}: {}",
                    d["content"].as_str().unwrap_or_default()
                )),
                "task.input_required" if d["reason"] == "reply" => {
                    status = "input-required".to_owned();
                    let asked = d["question"].as_str().unwrap_or_default().to_owned();
                    out(&format!("{agent} asks: {asked}"));
                    question = Some(asked);
                }
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
            if status != "working" {
                break 'frames;
            }
        }
    }
    Ok(Settled {
        status,
        task_id,
        question,
        seq,
    })
}

/// The response if it succeeded; else an error with the problem's detail (or `otherwise`).
async fn accepted(res: reqwest::Response, otherwise: &str) -> anyhow::Result<reqwest::Response> {
    if res.status().is_success() {
        return Ok(res);
    }
    let status = res.status();
    let problem: Value = res.json().await.unwrap_or(Value::Null);
    bail!(
        "{status}: {}",
        problem["detail"].as_str().unwrap_or(otherwise)
    )
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
    let mut waiting: Option<Settled> = None;
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line == "/exit" {
            break;
        }
        let outcome = match waiting.take() {
            // The agent asked a question: this line is the answer.
            Some(asked) => reply(base, key, agent, &asked.task_id, asked.seq, line).await,
            None => run(base, key, agent, line, Some(&thread)).await,
        };
        match outcome {
            Ok(settled) if settled.question.is_some() => waiting = Some(settled),
            Ok(_) => {}
            Err(e) => out(&format!("error: {e:#}")),
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
