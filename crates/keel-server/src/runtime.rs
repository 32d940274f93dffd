//! The server's side of the agent runtime: the event sink the runtime commits through,
//! loading agent spec files into a workspace, and telling when a task has settled.

use keel_core::event::{Event, EventType};
use keel_core::id::WorkspaceId;

use crate::events::EventLog;

/// The runtime's [`keel_runtime::EventSink`]: committed events go to live followers;
/// LLM provider errors and fallbacks become events like the gateway's.
#[derive(Debug, Clone)]
pub struct Sink(pub EventLog);

impl keel_runtime::EventSink for Sink {
    fn publish(&self, events: &[Event]) {
        self.0.publish(events);
    }

    fn llm_observer(&self, workspace: WorkspaceId) -> Box<dyn keel_llm::router::Observer> {
        Box::new(crate::gateway::EventObserver::new(
            self.0.clone(),
            workspace,
        ))
    }
}

/// Whether `event` means its task has settled for a caller waiting on it: finished, or
/// waiting for a human, or failed for good.
pub(crate) fn settles(event: &Event) -> bool {
    let t = event.event_type.as_str();
    t == EventType::TaskCompleted.as_str()
        || t == EventType::TaskCanceled.as_str()
        || t == EventType::TaskInputRequired.as_str()
        || (t == EventType::TaskError.as_str()
            && event
                .data
                .get("will_retry")
                .and_then(serde_json::Value::as_bool)
                == Some(false))
}

/// What loading a directory of agent specs did.
#[derive(Debug, Default, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Loaded {
    /// Agents stored (new, or a new version).
    pub stored: Vec<String>,
    /// Files rejected, with every problem of each.
    pub rejected: Vec<String>,
}

/// Loads every `*.toml` spec in `runtime.agents_dir` into `workspace` (a new version where
/// a spec changed). Invalid files, and files the operator policy refuses, are reported and
/// skipped; the others still load.
pub async fn load_agents(
    store: &dyn keel_store::Store,
    router: &keel_llm::Router,
    workspace: WorkspaceId,
    runtime: &keel_core::config::Runtime,
) -> Result<Loaded, keel_store::Error> {
    let routes: Vec<&str> = router.routes().map(|r| r.name.as_str()).collect();
    let mut loaded = Loaded::default();
    for (path, spec) in keel_runtime::tasks::load_dir(&runtime.agents_dir, &routes) {
        let spec = spec.and_then(|spec| {
            let refused = operator_policy(&spec, runtime);
            if refused.is_empty() {
                Ok(spec)
            } else {
                Err(keel_runtime::spec::Invalid(refused))
            }
        });
        match spec {
            Ok(spec) => {
                let record = store
                    .put_agent(workspace, &spec.name, &spec.to_json(), false, false)
                    .await?;
                loaded
                    .stored
                    .push(format!("{} v{}", record.name, record.version));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "agent spec rejected");
                loaded.rejected.push(format!("{}: {e}", path.display()));
            }
        }
    }
    Ok(loaded)
}

/// Starts the agent runtime over the server's store, routes and event log (tool header
/// secrets are read from the process environment, only the variables `runtime.tool_env`
/// lists).
pub async fn start(
    store: std::sync::Arc<dyn keel_store::Store>,
    router: std::sync::Arc<keel_llm::Router>,
    events: &EventLog,
    config: &keel_core::config::Config,
) -> Result<(keel_runtime::Runtime, keel_runtime::Tasks), keel_runtime::StartError> {
    keel_runtime::start(
        store,
        router,
        std::sync::Arc::new(Sink(events.clone())),
        &config.runtime,
        {
            // Only the variables the operator lets specs read.
            let runtime = config.runtime.clone();
            std::sync::Arc::new(move |name: &str| {
                runtime
                    .tool_env_allows(name)
                    .then(|| std::env::var(name).ok())
                    .flatten()
            })
        },
    )
    .await
}

/// What the operator's `[runtime]` allows a spec: programs for stdio MCP servers
/// (`mcp_commands`), environment variables for `${VAR}` (`tool_env`). Checked for specs
/// from the API and from files alike (and again at call time).
#[must_use]
pub fn operator_policy(
    spec: &keel_runtime::spec::AgentSpec,
    runtime: &keel_core::config::Runtime,
) -> Vec<keel_runtime::spec::Issue> {
    use keel_runtime::spec::{Issue, ToolSpec, env_refs};
    let mut out = Vec::new();
    for (i, tool) in spec.tools.iter().enumerate() {
        let mut values: Vec<(&str, &String)> = Vec::new();
        match tool {
            ToolSpec::Http(t) => values.extend(t.headers.values().map(|v| ("headers", v))),
            ToolSpec::Mcp(t) => {
                if let Some(program) = t.command.first()
                    && !runtime.mcp_commands.contains(program)
                {
                    out.push(Issue {
                        field: format!("tools[{i}].command"),
                        message: keel_runtime::mcp::not_allowed(&t.name, program),
                    });
                }
                values.extend(t.headers.values().map(|v| ("headers", v)));
                values.extend(t.env.values().map(|v| ("env", v)));
            }
            ToolSpec::Agent(_) | ToolSpec::Human(_) => {}
        }
        for (field, value) in values {
            for name in env_refs(value).unwrap_or_default() {
                if !runtime.tool_env_allows(name) {
                    out.push(Issue {
                        field: format!("tools[{i}].{field}"),
                        message: format!(
                            "${{{name}}} is not listed in runtime.tool_env (the operator lists the environment variables specs may read)"
                        ),
                    });
                }
            }
        }
    }
    out
}
