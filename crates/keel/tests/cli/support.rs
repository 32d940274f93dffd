//! Starting and driving `keel` processes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_keel");

/// A `keel` command with no inherited `KEEL_…` config (tests set exactly what they mean),
/// run in `dir` so no stray ./keel.toml is read.
pub fn keel_command(dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("KEEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir).env_remove("RUST_LOG");
    cmd
}

/// Runs a CLI command to completion.
pub fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = keel_command(dir);
    cmd.args(args).envs(env.iter().copied());
    cmd.output().unwrap()
}

/// Creates a key with the CLI and returns it.
pub fn create_key(dir: &Path, workspace: &str, role: &str, env: &[(&str, &str)]) -> String {
    let out = run(
        dir,
        &[
            "keys",
            "create",
            "--workspace",
            workspace,
            "--role",
            role,
            "--data-dir",
            "data",
        ],
        env,
    );
    assert!(
        out.status.success(),
        "keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("keel_"), "{key}");
    key
}

/// Starts `keel mock-llm --port 0` with `args` and returns the process and its base URL.
pub async fn mock_llm(dir: &Path, args: &[&str]) -> (Child, String) {
    let mut cmd: Command = keel_command(dir).into();
    cmd.args(["mock-llm", "--port", "0"])
        .args(args)
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
    let url = line.rsplit(' ').next().unwrap().to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/v1"),
        "{line}"
    );
    (child, url)
}

/// A running `keel serve`.
pub struct Keel {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Keel {
    /// Starts `keel serve --listen 127.0.0.1:0 --data-dir data` in `dir` and waits until it
    /// listens.
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> Keel {
        let mut cmd: Command = keel_command(dir).into();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"message\":\"listening\"") {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        let addr = match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "keel did not start listening; output:\n{}",
                logs.lock().unwrap().join("\n")
            ),
        };
        Keel { child, addr, logs }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap().code(),
            Err(_) => panic!(
                "keel did not exit within {limit:?}; output:\n{}",
                self.output()
            ),
        }
    }

    /// Sends SIGTERM and asserts a clean exit (code 0) within `limit`.
    pub async fn stop_cleanly(&mut self, limit: Duration) {
        self.signal("-TERM");
        assert_eq!(self.wait(limit).await, Some(0), "{}", self.output());
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The JSON log lines printed so far.
    pub fn json_logs(&self) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Asserts an RFC 9457 problem+json response with this status, and returns its body.
pub async fn assert_problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    let headers = res.headers().clone();
    assert_eq!(headers["content-type"], "application/problem+json");
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    for field in ["type", "title", "detail", "instance"] {
        assert!(body[field].is_string(), "{field} missing: {body}");
    }
    assert_eq!(body["status"], status);
    assert_eq!(body["request_id"], request_id.as_str());
    body
}

/// Polls `check` every 100 ms until it is true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not true within {limit:?}");
}

/// A TCP proxy (to Postgres, NATS, …) that can be cut (existing connections dropped, new ones reset)
/// and restored.
pub struct Proxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (is_up, cuts) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_up.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { port, up, cut }
    }

    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
