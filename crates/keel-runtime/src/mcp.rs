//! MCP tools, through the official Rust SDK (rmcp): a server is started (stdio) or
//! reached (streamable HTTP) on first use, per workspace and configuration, and kept for
//! later calls. Its tools are listed once per connection and offered to the model as
//! `<server>__<tool>`; the model's arguments are checked against the tool's input schema
//! before the call. A stdio server that dies is started again on the next use (and a call
//! that found it dead is sent once more to the new process); every call carries the step's
//! idempotency key in `_meta` (`io.keel/idempotency-key`), the same on a repeat.
//!
//! A stdio server inherits none of Keel's environment but `PATH`, `HOME`, `LANG`, `TZ`,
//! `TMPDIR` and `USER`, plus what its spec's `env` names. At most [`MAX_SERVERS`]
//! connections are kept; past it the least recently used one is closed.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_core::id::WorkspaceId;
use keel_llm::breaker::Breaker;
use rmcp::model::{CallToolRequestParams, CallToolResponse, Tool};
use rmcp::service::{Peer, RunningService, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::spec::{MCP_SEPARATOR, McpTool, expand_env, function_definition};
use crate::tools::{Outcome, check_arguments, truncate};

/// Most MCP connections (server processes or HTTP sessions) kept open.
pub const MAX_SERVERS: usize = 64;
/// What a stdio server inherits of Keel's environment.
const INHERITED: [&str; 6] = ["PATH", "HOME", "LANG", "TZ", "TMPDIR", "USER"];
/// Longest stderr line of a server that is logged.
const MAX_LOG_LINE: usize = 2048;
/// After a failed connection, how long its error is handed to callers before another try.
const RECONNECT_AFTER_MS: u64 = 1_000;
/// Time a closing server gets before it is killed.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// The `_meta` key that carries a call's idempotency key.
pub const IDEMPOTENCY_META: &str = "io.keel/idempotency-key";

/// Reads Keel's environment (for `${VAR}` in `env` and `headers`).
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// One tool of an MCP server, as the model sees it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The name the model calls (`<server>__<tool>`).
    pub name: String,
    /// The tool's own name on the server.
    pub remote: String,
    /// The OpenAI `tools[]` entry.
    pub definition: Value,
    /// Its input schema.
    pub schema: Value,
}

/// The MCP connections of one runtime.
pub struct Servers {
    slots: Mutex<HashMap<(WorkspaceId, String), Arc<Slot>>>,
    http: reqwest::Client,
    env: Env,
    /// Programs stdio servers may be started with (`runtime.mcp_commands`).
    commands: Vec<String>,
    epoch: Instant,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers").finish_non_exhaustive()
    }
}

/// One server of one workspace: its connection (if any) and its last tool list.
struct Slot {
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    live: Mutex<Option<Arc<Live>>>,
    tools: Mutex<Option<Arc<[Listed]>>>,
    /// Connections made, to tell a restart from a first start.
    starts: AtomicU64,
    /// The last failed connection (when, in ms since the epoch, and why).
    failed: Mutex<Option<(u64, String)>>,
    /// Milliseconds since the runtime's epoch at the last use.
    used: AtomicU64,
}

struct Live {
    peer: Peer<RoleClient>,
    service: Mutex<Option<RunningService<RoleClient, ()>>>,
}

impl Live {
    fn closed(&self) -> bool {
        self.peer.is_transport_closed()
    }

    /// Ends the session (a stdio server gets its stdin closed, then SIGTERM, then SIGKILL).
    async fn close(&self) {
        let service = self.service.lock().ok().and_then(|mut s| s.take());
        if let Some(mut service) = service {
            let _closed = service.close_with_timeout(CLOSE_GRACE).await;
        }
    }
}

impl Servers {
    /// Connections are made with `http` (streamable HTTP) and read `env` for `${VAR}`;
    /// stdio servers start only the programs in `commands`.
    #[must_use]
    pub fn new(http: reqwest::Client, env: Env, commands: Vec<String>) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            http,
            env,
            commands,
            epoch: Instant::now(),
        }
    }

    /// The server's tools as the model sees them: listed on connecting. When the server
    /// cannot be reached, the last list is used (a call then fails as a tool result); with
    /// no list at all, the error says why.
    pub async fn tools(
        &self,
        workspace: WorkspaceId,
        spec: &McpTool,
    ) -> Result<Arc<[Listed]>, String> {
        let slot = self.slot(workspace, spec)?;
        match self.live(&slot, spec).await {
            Ok(_) => {}
            Err(e) => {
                if let Some(tools) = slot.tools.lock().ok().and_then(|t| t.clone()) {
                    tracing::warn!(server = %spec.name, error = %e, "MCP server unreachable; offering its last tool list");
                    return Ok(tools);
                }
                return Err(e);
            }
        }
        slot.tools
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .ok_or_else(|| format!("MCP server {} listed no tools", spec.name))
    }

    /// Calls the server's tool the model named `name` with `arguments` (JSON text).
    pub async fn call(
        &self,
        workspace: WorkspaceId,
        spec: &McpTool,
        name: &str,
        arguments: &str,
        idempotency_key: &str,
        breaker: &Breaker,
    ) -> Outcome {
        let started = Instant::now();
        let failed = |content: String, attempts: u32| Outcome {
            ok: false,
            content,
            status: None,
            attempts,
            duration: started.elapsed(),
        };
        if !breaker.allow() {
            return failed(
                format!(
                    "MCP server {} is unavailable (its circuit breaker is open after repeated failures); try later or another way",
                    spec.name
                ),
                0,
            );
        }
        let tools = match self.tools(workspace, spec).await {
            Ok(tools) => tools,
            Err(e) => {
                breaker.record_failure();
                return failed(e, 1);
            }
        };
        let Some(tool) = tools.iter().find(|t| t.name == name) else {
            return Outcome::refused(format!(
                "there is no tool named {name:?}; MCP server {} offers: {}",
                spec.name,
                tools
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let args = match check_arguments(&tool.schema, arguments) {
            Ok(args) => args,
            Err(problem) => return Outcome::refused(problem),
        };
        let params = match call_params(&tool.remote, args, idempotency_key) {
            Ok(p) => p,
            Err(e) => return Outcome::refused(format!("the arguments cannot be sent: {e}")),
        };
        let slot = match self.slot(workspace, spec) {
            Ok(slot) => slot,
            Err(e) => return failed(e, 0),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.live(&slot, spec).await {
                Err(e) => e,
                Ok(live) => {
                    let call = live.peer.call_tool_once(params.clone());
                    match tokio::time::timeout(spec.timeout, call).await {
                        Err(_) => format!("MCP tool {name} timed out after {:?}", spec.timeout),
                        Ok(Ok(CallToolResponse::Complete(result))) => {
                            breaker.record_success();
                            let content =
                                render(&result.content, result.structured_content.as_ref());
                            return Outcome {
                                ok: !result.is_error.unwrap_or(false),
                                content,
                                status: None,
                                attempts: attempt,
                                duration: started.elapsed(),
                            };
                        }
                        Ok(Ok(_)) => {
                            breaker.record_success();
                            return failed(
                                format!(
                                    "MCP tool {name} asked for input or a deferred task, which Keel does not provide"
                                ),
                                attempt,
                            );
                        }
                        Ok(Err(ServiceError::McpError(e))) => {
                            // The server answered: it is up; the call itself was refused.
                            breaker.record_success();
                            return failed(
                                format!("MCP tool {name} failed: {}", e.message),
                                attempt,
                            );
                        }
                        Ok(Err(
                            e @ (ServiceError::TransportClosed | ServiceError::TransportSend(_)),
                        )) => {
                            forget(&slot, &live);
                            if attempt == 1 {
                                // Found dead (a crash): started again and called at once.
                                tracing::warn!(server = %spec.name, error = %e, "MCP server went away; restarting it and calling again");
                                continue;
                            }
                            format!("MCP tool {name} failed: {e}")
                        }
                        Ok(Err(e)) => format!("MCP tool {name} failed: {e}"),
                    }
                }
            };
            breaker.record_failure();
            if attempt > spec.retries || !breaker.allow() {
                return failed(failure, attempt);
            }
            tokio::time::sleep(crate::tools::backoff(attempt)).await;
        }
    }

    /// Closes every connection (stdio servers are stopped).
    pub async fn close_all(&self) {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .map(|mut s| s.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        let lives: Vec<Arc<Live>> = slots
            .iter()
            .filter_map(|s| s.live.lock().ok().and_then(|mut l| l.take()))
            .collect();
        futures_util::future::join_all(lives.iter().map(|l| l.close())).await;
    }

    /// Open connections.
    #[must_use]
    pub fn open(&self) -> usize {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        slots
            .iter()
            .filter(|s| {
                s.live
                    .lock()
                    .ok()
                    .and_then(|l| l.as_ref().map(|l| !l.closed()))
                    .unwrap_or(false)
            })
            .count()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The server's slot, made if new. Past [`MAX_SERVERS`], the least recently used slot
    /// nobody is using is closed to make room; if every one is in use, the error says so.
    fn slot(&self, workspace: WorkspaceId, spec: &McpTool) -> Result<Arc<Slot>, String> {
        let key = (workspace, serde_json::to_string(spec).unwrap_or_default());
        let now = self.now_ms();
        let mut evicted = None;
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| "MCP connections are unavailable (a lock was poisoned)".to_owned())?;
            if let Some(slot) = slots.get(&key) {
                slot.used.store(now, Ordering::Relaxed);
                return Ok(slot.clone());
            }
            if slots.len() >= MAX_SERVERS {
                // Only the map holds an idle slot; a call in progress holds it too.
                let oldest = slots
                    .iter()
                    .filter(|(_, s)| Arc::strong_count(s) == 1)
                    .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
                    .map(|(k, _)| k.clone());
                let Some(oldest) = oldest else {
                    return Err(format!(
                        "MCP server {} cannot be reached: all {MAX_SERVERS} MCP connections are in use; try again shortly",
                        spec.name
                    ));
                };
                evicted = slots.remove(&oldest);
            }
            let slot = Arc::new(Slot::new(now));
            slots.insert(key, slot.clone());
            slot
        };
        if let Some(old) = evicted.and_then(|s| s.live.lock().ok().and_then(|mut l| l.take())) {
            tokio::spawn(async move { old.close().await });
        }
        Ok(slot)
    }

    /// The slot's open connection, made (or made again) if there is none.
    async fn live(&self, slot: &Slot, spec: &McpTool) -> Result<Arc<Live>, String> {
        if let Some(live) = slot.current() {
            return Ok(live);
        }
        // Single flight: whoever waited here finds the connection the first one made —
        // or its failure, for a moment, rather than waiting through an attempt of its own.
        let _gate = slot.connecting.lock().await;
        if let Some(live) = slot.current() {
            return Ok(live);
        }
        let now = self.now_ms();
        if let Some((at, error)) = slot.failed.lock().ok().and_then(|f| f.clone())
            && now.saturating_sub(at) < RECONNECT_AFTER_MS
        {
            return Err(error);
        }
        let connected = tokio::time::timeout(spec.timeout, self.connect(spec))
            .await
            .map_err(|_| {
                format!(
                    "MCP server {} did not start within {:?}",
                    spec.name, spec.timeout
                )
            })
            .and_then(|r| r);
        let (live, tools) = match connected {
            Ok(ok) => ok,
            Err(e) => {
                if let Ok(mut f) = slot.failed.lock() {
                    *f = Some((self.now_ms(), e.clone()));
                }
                return Err(e);
            }
        };
        if let Ok(mut f) = slot.failed.lock() {
            *f = None;
        }
        if slot.starts.fetch_add(1, Ordering::Relaxed) > 0 {
            metrics::counter!("keel_mcp_restarts_total").increment(1);
            tracing::info!(server = %spec.name, "MCP server restarted");
        }
        let live = Arc::new(live);
        if let Ok(mut l) = slot.live.lock() {
            *l = Some(live.clone());
        }
        if let Ok(mut t) = slot.tools.lock() {
            *t = Some(tools.into());
        }
        Ok(live)
    }

    async fn connect(&self, spec: &McpTool) -> Result<(Live, Vec<Listed>), String> {
        let service = if let Some(url) = &spec.url {
            let mut headers = HashMap::new();
            for (name, value) in &spec.headers {
                let value = expand_env(value, &*self.env)
                    .map_err(|e| format!("MCP server {} is misconfigured: {e}", spec.name))?;
                let (Ok(name), Ok(value)) = (
                    reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                    reqwest::header::HeaderValue::from_str(&value),
                ) else {
                    return Err(format!(
                        "MCP server {} has an invalid header {name:?}",
                        spec.name
                    ));
                };
                headers.insert(name, value);
            }
            let config =
                StreamableHttpClientTransportConfig::with_uri(url.as_str()).custom_headers(headers);
            let transport = StreamableHttpClientTransport::with_client(self.http.clone(), config);
            ().serve(transport).await.map_err(|e| {
                format!(
                    "MCP server {} at {url} could not be reached: {e}",
                    spec.name
                )
            })?
        } else {
            let (program, args) = spec
                .command
                .split_first()
                .ok_or_else(|| format!("MCP server {} has no command", spec.name))?;
            if !self.commands.iter().any(|c| c == program) {
                return Err(not_allowed(&spec.name, program));
            }
            let mut command = tokio::process::Command::new(program);
            command.args(args).env_clear().kill_on_drop(true);
            for name in INHERITED {
                if let Some(value) = std::env::var_os(name) {
                    command.env(name, value);
                }
            }
            for (name, value) in &spec.env {
                let value = expand_env(value, &*self.env)
                    .map_err(|e| format!("MCP server {} is misconfigured: {e}", spec.name))?;
                command.env(name, value);
            }
            let (process, stderr) = TokioChildProcess::builder(command)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| {
                    format!(
                        "MCP server {} could not be started ({program}): {e}",
                        spec.name
                    )
                })?;
            if let Some(stderr) = stderr {
                let server = spec.name.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut reader = tokio::io::BufReader::new(stderr);
                    let limit = u64::try_from(MAX_LOG_LINE).unwrap_or(u64::MAX);
                    let mut line = Vec::with_capacity(256);
                    loop {
                        line.clear();
                        // At most MAX_LOG_LINE bytes of a line are held; the rest is skipped.
                        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        let complete = line.last() == Some(&b'\n');
                        tracing::debug!(server = %server, line = %String::from_utf8_lossy(&line).trim_end(), "MCP server stderr");
                        // The rest of an overlong line is read and dropped.
                        let mut skipping = !complete;
                        while skipping {
                            line.clear();
                            match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => skipping = line.last() != Some(&b'\n'),
                            }
                        }
                    }
                });
            }
            ().serve(process)
                .await
                .map_err(|e| format!("MCP server {} ({program}) failed to start: {e}", spec.name))?
        };
        let listed = service
            .peer()
            .list_all_tools()
            .await
            .map_err(|e| format!("MCP server {} could not list its tools: {e}", spec.name))?;
        let tools = offered(spec, &listed);
        Ok((
            Live {
                peer: service.peer().clone(),
                service: Mutex::new(Some(service)),
            },
            tools,
        ))
    }
}

impl Slot {
    fn new(now: u64) -> Self {
        Self {
            connecting: tokio::sync::Mutex::new(()),
            live: Mutex::new(None),
            tools: Mutex::new(None),
            starts: AtomicU64::new(0),
            failed: Mutex::new(None),
            used: AtomicU64::new(now),
        }
    }

    /// The open connection, if there is one; a closed one is forgotten.
    fn current(&self) -> Option<Arc<Live>> {
        let mut live = self.live.lock().ok()?;
        if live.as_ref().is_some_and(|l| l.closed()) {
            *live = None;
        }
        live.clone()
    }
}

/// Why a stdio server's program was refused.
#[must_use]
pub fn not_allowed(server: &str, program: &str) -> String {
    format!(
        "MCP server {server}: program {program:?} is not in runtime.mcp_commands (the operator lists the programs agents may start on this host)"
    )
}

/// Forgets `live` if it is still the slot's connection (another call may have replaced it).
fn forget(slot: &Slot, live: &Arc<Live>) {
    if let Ok(mut current) = slot.live.lock()
        && current.as_ref().is_some_and(|c| Arc::ptr_eq(c, live))
    {
        *current = None;
    }
}

/// A `tools/call` request carrying the step's idempotency key in `_meta`.
fn call_params(
    remote: &str,
    arguments: Value,
    idempotency_key: &str,
) -> Result<CallToolRequestParams, serde_json::Error> {
    serde_json::from_value(json!({
        "name": remote,
        "arguments": arguments,
        "_meta": {IDEMPOTENCY_META: idempotency_key},
    }))
}

/// The server's tools the spec offers, named for the model.
fn offered(spec: &McpTool, tools: &[Tool]) -> Vec<Listed> {
    if let Some(wanted) = &spec.tools {
        for w in wanted {
            if !tools.iter().any(|t| t.name == w.as_str()) {
                tracing::warn!(server = %spec.name, tool = %w, "MCP server has no tool of this name");
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    tools
        .iter()
        .filter(|t| {
            spec.tools
                .as_ref()
                .is_none_or(|w| w.iter().any(|w| t.name == w.as_str()))
        })
        .filter_map(|t| {
            let clean: String = t
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                .collect();
            let name = format!("{}{MCP_SEPARATOR}{clean}", spec.name);
            if name.len() > 64 {
                tracing::warn!(server = %spec.name, tool = %t.name, "MCP tool name too long for the model (64); not offered");
                return None;
            }
            if !seen.insert(name.clone()) {
                tracing::warn!(server = %spec.name, tool = %t.name, "MCP tool name clashes with another once made callable; not offered");
                return None;
            }
            let schema = Value::Object((*t.input_schema).clone());
            let description = t
                .description
                .as_deref()
                .or(t.title.as_deref())
                .unwrap_or_default();
            Some(Listed {
                definition: function_definition(&name, description, schema.clone()),
                name,
                remote: t.name.to_string(),
                schema,
            })
        })
        .collect()
}

/// What the model is told of a tool's result: text as it is, other blocks as JSON (images
/// and audio by type and size only).
fn render(content: &[rmcp::model::ContentBlock], structured: Option<&Value>) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(content.len());
    for block in content {
        let value = serde_json::to_value(block).unwrap_or(Value::Null);
        match value.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(
                value
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            ),
            Some(kind @ ("image" | "audio")) => parts.push(format!(
                "[{kind} {}, {} bytes of base64]",
                value.get("mimeType").and_then(Value::as_str).unwrap_or("?"),
                value
                    .get("data")
                    .and_then(Value::as_str)
                    .map_or(0, str::len)
            )),
            _ => parts.push(value.to_string()),
        }
    }
    if parts.is_empty()
        && let Some(structured) = structured
    {
        parts.push(structured.to_string());
    }
    truncate(&parts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tools: Option<Vec<&str>>) -> McpTool {
        serde_json::from_value(json!({
            "name": "everything", "command": ["x"],
            "tools": tools,
        }))
        .unwrap()
    }

    fn tool(name: &str) -> Tool {
        serde_json::from_value(json!({
            "name": name, "description": "d",
            "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}}},
        }))
        .unwrap()
    }

    #[test]
    fn tools_are_offered_under_the_server_name_and_the_allowlist_holds() {
        let tools = [
            tool("echo"),
            tool("get-sum"),
            tool("weird.name/x"),
            tool("weird/name.x"),
        ];
        let all = offered(&spec(None), &tools);
        let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "everything__echo",
                "everything__get-sum",
                "everything__weird_name_x"
            ]
        );
        assert_eq!(
            all[2].remote, "weird.name/x",
            "the clashing second is left out"
        );
        assert_eq!(all[1].definition["function"]["name"], "everything__get-sum");
        let some = offered(&spec(Some(vec!["get-sum"])), &tools);
        assert_eq!(some.len(), 1);
        assert_eq!(some[0].remote, "get-sum");
    }

    #[test]
    fn a_call_carries_its_idempotency_key_in_meta() {
        let params = call_params("get-sum", json!({"a": 1}), "run.3.call_1").unwrap();
        let wire = serde_json::to_value(&params).unwrap();
        assert_eq!(wire["_meta"][IDEMPOTENCY_META], "run.3.call_1", "{wire}");
        assert_eq!(wire["name"], "get-sum");
        assert_eq!(wire["arguments"]["a"], 1);
    }

    #[test]
    fn results_are_rendered_as_text_with_images_by_size() {
        let content: Vec<rmcp::model::ContentBlock> = serde_json::from_value(json!([
            {"type": "text", "text": "hello"},
            {"type": "image", "data": "AAAA", "mimeType": "image/png"},
        ]))
        .unwrap();
        assert_eq!(
            render(&content, None),
            "hello\n[image image/png, 4 bytes of base64]"
        );
        assert_eq!(render(&[], Some(&json!({"n": 1}))), r#"{"n":1}"#);
    }
}
