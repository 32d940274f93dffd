//! Agent specs: what an agent is (model route, system prompt template, tools, limits),
//! parsed from TOML files or JSON bodies and checked as a whole — an invalid spec is
//! rejected with every problem listed, each under the field it concerns.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An agent spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Unique in its workspace: lowercase letters, digits, `-` and `_`, at most 64.
    pub name: String,
    /// What it does (shown to people, and to other agents that delegate to it).
    #[serde(default)]
    pub description: String,
    /// The model route its LLM calls go to.
    #[serde(default = "default_model")]
    pub model: String,
    /// The system prompt: a minijinja template over `variables` and the task's
    /// `metadata.variables`.
    #[serde(default)]
    pub system_prompt: String,
    /// Default template variables.
    #[serde(default)]
    pub variables: BTreeMap<String, Value>,
    /// The tools it may call.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Most steps (LLM calls and tool calls) one run may take.
    #[serde(default = "default_max_steps")]
    pub max_steps: u32,
    /// Most tool calls one task may make.
    #[serde(default = "default_max_tool_calls")]
    pub max_tool_calls: u32,
    /// Wall-clock limit of a task, from its first run's start.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most tokens of conversation sent to the model; older turns go first.
    #[serde(default = "default_context_tokens")]
    pub context_tokens: u32,
    /// What becomes of the turns that no longer fit: `drop` (default) or `summarize`.
    #[serde(default, skip_serializing_if = "Overflow::is_drop")]
    pub context_overflow: Overflow,
    /// Most a task may spend, in USD.
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
    /// Most of this agent's tasks running at once, across every instance (others wait
    /// queued); none: only `runtime.workers` bounds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Runs (attempts) before a failing task is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each attempt.
    #[serde(default = "default_retry_delay", with = "humantime_serde")]
    pub retry_delay: Duration,
    /// What a task sees of its thread: `thread` (every earlier completed task's
    /// messages) or `none` (only its own input).
    #[serde(default)]
    pub memory: Memory,
}

/// What becomes of turns that no longer fit in the context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// They are left out.
    #[default]
    Drop,
    /// They are summarized (an LLM call through the agent's model route), and the summary
    /// is sent after the system prompt; the summary is a step, stored and reused.
    Summarize,
}

impl Overflow {
    const fn is_drop(&self) -> bool {
        matches!(self, Self::Drop)
    }
}

/// What a task remembers of its thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Memory {
    /// The thread's earlier completed tasks' messages.
    #[default]
    Thread,
    /// Only this task's input.
    None,
}

fn default_model() -> String {
    "default".to_owned()
}
const fn default_max_steps() -> u32 {
    20
}
const fn default_max_tool_calls() -> u32 {
    50
}
const fn default_timeout() -> Duration {
    Duration::from_secs(600)
}
const fn default_context_tokens() -> u32 {
    100_000
}
const fn default_max_attempts() -> u32 {
    3
}
const fn default_retry_delay() -> Duration {
    Duration::from_secs(1)
}

/// A tool an agent may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ToolSpec {
    /// An HTTP endpoint: the arguments are POSTed (or sent as the method says) as JSON.
    Http(HttpTool),
    /// Another agent of the workspace: the call is a child task.
    Agent(AgentTool),
    /// An MCP server (stdio or streamable HTTP): each of its tools is offered to the model
    /// as `<name>__<tool>`.
    Mcp(McpTool),
    /// The user: the model asks a question, the task waits (`input-required`) for the reply
    /// given through `POST /v1/tasks/{id}/input` (`action = "reply"`).
    Human(HumanTool),
}

/// A question to the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HumanTool {
    /// The name the model calls it by.
    pub name: String,
    /// What it is for, for the model.
    #[serde(default = "default_human_description")]
    pub description: String,
}

fn default_human_description() -> String {
    "Ask the user a question and wait for their reply. Use it when you need information only the user has.".to_owned()
}

/// Separates an MCP server's name from its tool's in the name the model calls.
pub const MCP_SEPARATOR: &str = "__";

/// An MCP server whose tools an agent may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpTool {
    /// The server's name; the model calls its tools `<name>__<tool>`.
    pub name: String,
    /// stdio: the program and its arguments, started by Keel and restarted if it dies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// stdio: environment of the program (`${VAR}` read from Keel's environment). The
    /// program inherits only `PATH`, `HOME`, `LANG`, `TZ`, `TMPDIR` and `USER` otherwise,
    /// never Keel's secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Streamable HTTP: the server's `http(s)://` endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Streamable HTTP: extra headers (`${VAR}` read from Keel's environment).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Only these of the server's tools are offered (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
    /// Time limit of starting the server, and of one call.
    #[serde(default = "default_tool_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after the first when the server cannot be reached, goes away or times out
    /// (not when it answers with an error).
    #[serde(default = "default_tool_retries")]
    pub retries: u32,
    /// Each call waits for a human's approval.
    #[serde(default)]
    pub requires_approval: bool,
}

/// An HTTP tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTool {
    /// The name the model calls it by (letters, digits, `_`, `-`; at most 64).
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of its arguments.
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
    /// `http://` or `https://` URL.
    pub url: String,
    /// `POST` (default), `PUT`, `PATCH`, `GET` or `DELETE`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra headers; `${VAR}` in a value is read from the environment at call time.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Time limit of one attempt.
    #[serde(default = "default_tool_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after the first for a connection error, timeout, 429 or 5xx.
    #[serde(default = "default_tool_retries")]
    pub retries: u32,
    /// Each call waits for a human's approval.
    #[serde(default)]
    pub requires_approval: bool,
}

/// An agent tool (delegation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTool {
    /// The name the model calls it by.
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: String,
    /// The agent it delegates to.
    pub agent: String,
    /// Each call waits for a human's approval.
    #[serde(default)]
    pub requires_approval: bool,
}

fn empty_object_schema() -> Value {
    serde_json::json!({"type": "object"})
}
fn default_method() -> String {
    "POST".to_owned()
}
const fn default_tool_timeout() -> Duration {
    Duration::from_secs(30)
}
const fn default_tool_retries() -> u32 {
    2
}

impl ToolSpec {
    /// The name the model calls it by.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::Http(t) => &t.name,
            Self::Agent(t) => &t.name,
            Self::Mcp(t) => &t.name,
            Self::Human(t) => &t.name,
        }
    }

    /// Whether each call waits for approval.
    #[must_use]
    pub const fn requires_approval(&self) -> bool {
        match self {
            Self::Http(t) => t.requires_approval,
            Self::Agent(t) => t.requires_approval,
            Self::Mcp(t) => t.requires_approval,
            Self::Human(_) => false,
        }
    }

    /// The OpenAI `tools[]` entry the model sees; `None` for an MCP server, whose tools
    /// are listed by the server itself.
    #[must_use]
    pub fn definition(&self) -> Option<Value> {
        let (name, description, parameters) = match self {
            Self::Mcp(_) => return None,
            Self::Human(t) => (
                &t.name,
                &t.description,
                serde_json::json!({
                    "type": "object",
                    "properties": {"question": {"type": "string", "description": "The question, as the user will read it."}},
                    "required": ["question"],
                }),
            ),
            Self::Http(t) => (&t.name, &t.description, t.parameters.clone()),
            Self::Agent(t) => (
                &t.name,
                &t.description,
                serde_json::json!({
                    "type": "object",
                    "properties": {"input": {"type": "string", "description": "What to ask the agent."}},
                    "required": ["input"],
                }),
            ),
        };
        Some(function_definition(name, description, parameters))
    }
}

/// An OpenAI `tools[]` entry.
#[must_use]
pub fn function_definition(name: &str, description: &str, parameters: Value) -> Value {
    serde_json::json!({
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    })
}

/// One problem with a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    /// The field, e.g. `tools[1].url`.
    pub field: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

/// Why a spec was rejected: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid agent spec: {}", .0.iter().map(|i| format!("{}: {}", i.field, i.message)).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<Issue>);

fn issue(field: impl Into<String>, message: impl Into<String>) -> Issue {
    Issue {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `name` is a valid agent name.
#[must_use]
pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl AgentSpec {
    /// Parses a spec from TOML text (an `agents/*.toml` file).
    pub fn from_toml(text: &str) -> Result<Self, Invalid> {
        toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| {
                    format!(
                        "line {}",
                        text[..s.start.min(text.len())].lines().count().max(1)
                    )
                })
                .unwrap_or_else(|| "spec".to_owned());
            Invalid(vec![issue(field, e.message().to_owned())])
        })
    }

    /// Parses a spec from a JSON value (an API body).
    pub fn from_json(value: Value) -> Result<Self, Invalid> {
        serde_json::from_value(value).map_err(|e| Invalid(vec![issue("spec", e.to_string())]))
    }

    /// Checks everything types do not: names, the model route (one of `routes`), the
    /// template, tool schemas and URLs, limits. Returns every problem at once.
    pub fn validate(&self, routes: &[&str]) -> Result<(), Invalid> {
        let mut out = Vec::new();
        if !valid_agent_name(&self.name) {
            out.push(issue(
                "name",
                format!(
                    "{:?} is not a valid agent name: use 1 to 64 lowercase letters, digits, '-' or '_'",
                    self.name
                ),
            ));
        }
        if !routes.contains(&self.model.as_str()) {
            out.push(issue(
                "model",
                format!(
                    "no model route {:?}; configured routes: {}",
                    self.model,
                    routes.join(", ")
                ),
            ));
        }
        if let Err(e) = minijinja::Environment::new().template_from_str(&self.system_prompt) {
            out.push(issue("system_prompt", format!("not a valid template: {e}")));
        }
        if self.max_steps == 0 {
            out.push(issue("max_steps", "must be at least 1"));
        }
        if self
            .max_concurrency
            .is_some_and(|n| !(1..=10_000).contains(&n))
        {
            out.push(issue("max_concurrency", "must be between 1 and 10000"));
        }
        if self.timeout.is_zero() {
            out.push(issue("timeout", "must be longer than 0s"));
        }
        if self.context_tokens < 256 {
            out.push(issue("context_tokens", "must be at least 256"));
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            out.push(issue("max_attempts", "must be between 1 and 100"));
        }
        if let Some(cost) = self.max_cost_usd
            && !(cost.is_finite() && cost > 0.0)
        {
            out.push(issue("max_cost_usd", "must be a positive number of USD"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            let at = |f: &str| format!("tools[{i}].{f}");
            let name = tool.name();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                out.push(issue(
                    at("name"),
                    format!(
                        "{name:?} is not a valid tool name: use 1 to 64 letters, digits, '_' or '-'"
                    ),
                ));
            }
            if !seen.insert(name) {
                out.push(issue(
                    at("name"),
                    format!("another tool is already named {name:?}"),
                ));
            }
            match tool {
                ToolSpec::Http(t) => {
                    if !(t.url.starts_with("http://") || t.url.starts_with("https://"))
                        || reqwest::Url::parse(&t.url).is_err()
                    {
                        out.push(issue(
                            at("url"),
                            format!("{:?} is not an http(s) URL", t.url),
                        ));
                    }
                    if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&t.method.as_str()) {
                        out.push(issue(
                            at("method"),
                            format!("{:?} is not one of GET, POST, PUT, PATCH, DELETE", t.method),
                        ));
                    }
                    if !t.parameters.is_object() {
                        out.push(issue(at("parameters"), "must be a JSON Schema object"));
                    } else if let Err(e) = jsonschema::validator_for(&t.parameters) {
                        out.push(issue(
                            at("parameters"),
                            format!("not a valid JSON Schema: {e}"),
                        ));
                    }
                    if t.timeout.is_zero() {
                        out.push(issue(at("timeout"), "must be longer than 0s"));
                    }
                    if t.retries > 10 {
                        out.push(issue(at("retries"), "must be at most 10"));
                    }
                    validate_headers(&t.headers, &at, &mut out);
                }
                ToolSpec::Agent(t) => {
                    if !valid_agent_name(&t.agent) {
                        out.push(issue(
                            at("agent"),
                            format!("{:?} is not a valid agent name", t.agent),
                        ));
                    }
                }
                ToolSpec::Mcp(t) => validate_mcp(t, &at, &mut out),
                ToolSpec::Human(_) => {}
            }
        }
        // `<server>__…` names belong to the MCP server: another tool there would be shadowed.
        for (i, tool) in self.tools.iter().enumerate() {
            if matches!(tool, ToolSpec::Mcp(_)) {
                continue;
            }
            if let Some(server) = self.tools.iter().find_map(|t| match t {
                ToolSpec::Mcp(m)
                    if tool
                        .name()
                        .starts_with(&format!("{}{MCP_SEPARATOR}", m.name)) =>
                {
                    Some(m.name.as_str())
                }
                _ => None,
            }) {
                out.push(issue(
                    format!("tools[{i}].name"),
                    format!(
                        "{:?} is in MCP server {server:?}'s names ({server}{MCP_SEPARATOR}…): rename one of them",
                        tool.name()
                    ),
                ));
            }
        }
        if out.is_empty() {
            Ok(())
        } else {
            Err(Invalid(out))
        }
    }

    /// The spec as stored (JSON).
    #[must_use]
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The tool the model called, by name: an MCP server's tools are `<server>__<tool>`.
    #[must_use]
    pub fn tool(&self, name: &str) -> Option<&ToolSpec> {
        if let Some(tool) = self
            .tools
            .iter()
            .find(|t| !matches!(t, ToolSpec::Mcp(_)) && t.name() == name)
        {
            return Some(tool);
        }
        // The MCP server with the longest name that prefixes the call (`x_` before `x`).
        self.tools
            .iter()
            .filter(|t| match t {
                ToolSpec::Mcp(m) => name
                    .strip_prefix(m.name.as_str())
                    .and_then(|rest| rest.strip_prefix(MCP_SEPARATOR))
                    .is_some_and(|rest| !rest.is_empty()),
                _ => false,
            })
            .max_by_key(|t| t.name().len())
    }

    /// Renders the system prompt over the spec's variables overlaid with `extra`.
    pub fn system_prompt(&self, extra: Option<&Value>) -> Result<String, String> {
        let mut vars: BTreeMap<String, Value> = self.variables.clone();
        if let Some(Value::Object(extra)) = extra {
            for (k, v) in extra {
                vars.insert(k.clone(), v.clone());
            }
        }
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.render_str(&self.system_prompt, minijinja::value::Serde(&vars))
            .map_err(|e| format!("system prompt: {e}"))
    }
}

/// Header names must be header names, and `${VAR}` in values well-formed.
fn validate_headers(
    headers: &BTreeMap<String, String>,
    at: &dyn Fn(&str) -> String,
    out: &mut Vec<Issue>,
) {
    for (header, value) in headers {
        if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
            out.push(issue(
                at("headers"),
                format!("{header:?} is not a header name"),
            ));
        }
        if let Err(e) = env_refs(value) {
            out.push(issue(at("headers"), format!("{header}: {e}")));
        }
    }
}

fn validate_mcp(t: &McpTool, at: &dyn Fn(&str) -> String, out: &mut Vec<Issue>) {
    if t.name.contains(MCP_SEPARATOR) {
        out.push(issue(
            at("name"),
            format!("an MCP server's name may not contain {MCP_SEPARATOR:?}"),
        ));
    }
    if t.name.len() > 32 {
        out.push(issue(
            at("name"),
            "an MCP server's name is at most 32 characters (the model sees <name>__<tool>, at most 64)",
        ));
    }
    match (&t.url, t.command.is_empty()) {
        (None, true) => out.push(issue(
            at("command"),
            "an MCP server needs `command` (stdio) or `url` (streamable HTTP)",
        )),
        (Some(_), false) => out.push(issue(
            at("url"),
            "give `command` (stdio) or `url` (streamable HTTP), not both",
        )),
        (Some(url), true) => {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || reqwest::Url::parse(url).is_err()
            {
                out.push(issue(at("url"), format!("{url:?} is not an http(s) URL")));
            }
            if !t.env.is_empty() {
                out.push(issue(at("env"), "`env` is for stdio servers (`command`)"));
            }
        }
        (None, false) => {
            if t.command[0].trim().is_empty() {
                out.push(issue(at("command"), "the program is empty"));
            }
            if !t.headers.is_empty() {
                out.push(issue(
                    at("headers"),
                    "`headers` is for HTTP servers (`url`)",
                ));
            }
        }
    }
    for (key, value) in &t.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            out.push(issue(at("env"), format!("{key:?} is not a variable name")));
        }
        if let Err(e) = env_refs(value) {
            out.push(issue(at("env"), format!("{key}: {e}")));
        }
    }
    validate_headers(&t.headers, at, out);
    if t.tools.as_ref().is_some_and(Vec::is_empty) {
        out.push(issue(
            at("tools"),
            "an empty list offers no tool; leave `tools` out to offer them all",
        ));
    }
    if t.timeout.is_zero() {
        out.push(issue(at("timeout"), "must be longer than 0s"));
    }
    if t.retries > 10 {
        out.push(issue(at("retries"), "must be at most 10"));
    }
}

/// The environment variables `${VAR}` references in `value`, or what is malformed.
pub fn env_refs(value: &str) -> Result<Vec<&str>, String> {
    let mut refs = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "an unclosed `${` (write `${NAME}`)".to_owned())?;
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "`${{{name}}}` is not an environment variable reference"
            ));
        }
        refs.push(name);
        rest = &after[end + 1..];
    }
    Ok(refs)
}

/// `value` with each `${VAR}` replaced by `env(VAR)`; the name of a variable that is not
/// set is an error.
pub fn expand_env(value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "an unclosed `${`".to_owned())?;
        let name = &after[..end];
        out.push_str(&env(name).ok_or_else(|| {
            format!("environment variable {name} is not set, or not listed in runtime.tool_env")
        })?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_with_many_problems_lists_every_one() {
        let spec = AgentSpec::from_toml(
            r#"
name = "Bad Name"
model = "nope"
system_prompt = "{{ unclosed"
max_steps = 0
max_concurrency = 0
[[tools]]
kind = "http"
name = "a b"
url = "ftp://x"
method = "FETCH"
parameters = { type = 12 }
[[tools]]
kind = "http"
name = "a b"
url = "http://127.0.0.1/"
headers = { "X-Token" = "${OPEN" }
"#,
        )
        .unwrap();
        let err = spec.validate(&["default"]).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|i| i.field.as_str()).collect();
        for f in [
            "name",
            "model",
            "system_prompt",
            "max_steps",
            "max_concurrency",
            "tools[0].name",
            "tools[0].url",
            "tools[0].method",
            "tools[0].parameters",
            "tools[1].name",
            "tools[1].headers",
        ] {
            assert!(fields.contains(&f), "{f} missing from {err}");
        }
        assert!(
            err.to_string().contains("configured routes: default"),
            "{err}"
        );
    }

    #[test]
    fn a_tool_named_inside_an_mcp_servers_names_is_refused() {
        let spec = AgentSpec::from_json(serde_json::json!({
            "name": "a",
            "tools": [
                {"kind": "mcp", "name": "files", "command": ["x"]},
                {"kind": "human", "name": "files__ask"},
                {"kind": "human", "name": "filesask"},
            ],
        }))
        .unwrap();
        let err = spec.validate(&["default"]).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].field, "tools[1].name");
        assert!(matches!(spec.tool("files__read"), Some(ToolSpec::Mcp(_))));
        assert!(matches!(spec.tool("filesask"), Some(ToolSpec::Human(_))));
        assert!(spec.tool("files__").is_none());
        let two = AgentSpec::from_json(serde_json::json!({
            "name": "a",
            "tools": [
                {"kind": "mcp", "name": "x", "command": ["x"]},
                {"kind": "mcp", "name": "x_", "command": ["y"]},
            ],
        }))
        .unwrap();
        assert_eq!(two.tool("x___t").map(ToolSpec::name), Some("x_"));
        assert_eq!(two.tool("x__t").map(ToolSpec::name), Some("x"));
    }

    #[test]
    fn unknown_fields_and_kinds_are_rejected_with_their_place() {
        let err = AgentSpec::from_toml("name = \"a\"\nmax_stepz = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_stepz"), "{err}");
        let err = AgentSpec::from_json(
            serde_json::json!({"name": "a", "tools": [{"kind": "ftp", "name": "x"}]}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ftp"), "{err}");
    }

    #[test]
    fn the_system_prompt_renders_variables_and_refuses_undefined_ones() {
        let spec = AgentSpec::from_json(serde_json::json!({
            "name": "a", "system_prompt": "You help {{ company }} in {{ lang }}.",
            "variables": {"company": "Acme", "lang": "English"}
        }))
        .unwrap();
        assert_eq!(
            spec.system_prompt(None).unwrap(),
            "You help Acme in English."
        );
        let overlay = serde_json::json!({"lang": "French"});
        assert_eq!(
            spec.system_prompt(Some(&overlay)).unwrap(),
            "You help Acme in French."
        );
        let bare = AgentSpec {
            variables: BTreeMap::new(),
            ..spec
        };
        assert!(bare.system_prompt(None).unwrap_err().contains("undefined"));
    }

    #[test]
    fn env_references_expand_and_a_missing_one_is_named() {
        let env = |k: &str| (k == "TOKEN").then(|| "s3cret".to_owned());
        assert_eq!(
            expand_env("Bearer ${TOKEN}", &env).unwrap(),
            "Bearer s3cret"
        );
        assert!(expand_env("${NOPE}", &env).unwrap_err().contains("NOPE"));
        assert_eq!(env_refs("a ${X} b ${Y_2}").unwrap(), vec!["X", "Y_2"]);
    }
}
