//! Agents: versioned specs managed through the API (and loaded from `agents/*.toml`), and
//! each agent's status for an operator's dashboard.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_core::auth::Principal;
use keel_runtime::spec::AgentSpec;
use keel_store::runtime::AgentRecord;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{List, rfc3339};
use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;

/// An agent (its current version).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AgentView {
    /// `agt_…`, stable across versions.
    id: String,
    /// Its name.
    name: String,
    /// 1, 2, 3, …: every change is a new version; tasks record the one they ran with.
    version: i64,
    /// The spec.
    #[schema(value_type = Object)]
    spec: Value,
    /// RFC 3339.
    created_at: String,
    /// When this version was stored.
    updated_at: String,
}

impl From<AgentRecord> for AgentView {
    fn from(a: AgentRecord) -> Self {
        Self {
            id: a.id.to_string(),
            name: a.name,
            version: a.version,
            spec: a.spec,
            created_at: rfc3339(a.created_at),
            updated_at: rfc3339(a.updated_at),
        }
    }
}

/// Parses and checks a spec; every problem is listed in the 400.
fn checked(state: &AppState, body: Value, name: Option<&str>) -> Result<AgentSpec, ApiError> {
    let mut body = body;
    if let (Some(name), Some(map)) = (name, body.as_object_mut()) {
        match map.get("name") {
            None => {
                map.insert("name".to_owned(), Value::String(name.to_owned()));
            }
            Some(Value::String(n)) if n == name => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "name: the body names {other}, the path {name:?}; they must match"
                )));
            }
        }
    }
    let spec = AgentSpec::from_json(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let routes: Vec<&str> = state.router().routes().map(|r| r.name.as_str()).collect();
    let mut issues = spec
        .validate(&routes)
        .err()
        .map(|e| e.0)
        .unwrap_or_default();
    issues.extend(crate::runtime::operator_policy(
        &spec,
        &state.config().runtime,
    ));
    if !issues.is_empty() {
        return Err(ApiError::bad_request(
            keel_runtime::spec::Invalid(issues).to_string(),
        ));
    }
    Ok(spec)
}

/// Creates an agent from a spec (version 1). Requires role: admin.
#[utoipa::path(post, path = "/v1/agents", tag = super::AGENTS, security(("api_key" = [])),
    request_body(content = Object, description = "The agent spec (see docs/agents.md)"),
    responses(
        (status = 201, description = "The agent", body = AgentView),
        (status = 400, description = "An invalid spec, with every problem listed", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An agent with this name exists", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    AppJson(body): AppJson<Value>,
) -> Result<(StatusCode, Json<AgentView>), ApiError> {
    let spec = checked(&state, body, None)?;
    let agent = state
        .store()
        .put_agent(
            principal.workspace_id,
            &spec.name,
            &spec.to_json(),
            true,
            false,
        )
        .await?;
    tracing::info!(agent = %agent.name, version = agent.version, "agent created");
    let action = Action::new("agent.created", agent.id)
        .data(serde_json::json!({"name": agent.name, "version": agent.version}));
    audit::record(&state, &principal, &caller, action).await;
    Ok((StatusCode::CREATED, Json(agent.into())))
}

/// Stores a new version of an agent (an unchanged spec stores none). Requires role: admin.
#[utoipa::path(put, path = "/v1/agents/{name}", tag = super::AGENTS, security(("api_key" = [])),
    params(("name" = String, Path, description = "The agent's name")),
    request_body(content = Object, description = "The whole new spec"),
    responses(
        (status = 200, description = "The agent, at its new version", body = AgentView),
        (status = 400, description = "An invalid spec, with every problem listed", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such agent in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn update(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(name): Path<String>,
    AppJson(body): AppJson<Value>,
) -> Result<Json<AgentView>, ApiError> {
    let spec = checked(&state, body, Some(&name))?;
    let agent = state
        .store()
        .put_agent(
            principal.workspace_id,
            &spec.name,
            &spec.to_json(),
            false,
            true,
        )
        .await?;
    tracing::info!(agent = %agent.name, version = agent.version, "agent updated");
    let action = Action::new("agent.updated", agent.id)
        .data(serde_json::json!({"name": agent.name, "version": agent.version}));
    audit::record(&state, &principal, &caller, action).await;
    Ok(Json(agent.into()))
}

/// The workspace's agents. Requires role: viewer.
#[utoipa::path(get, path = "/v1/agents", tag = super::AGENTS, security(("api_key" = [])),
    responses((status = 200, description = "The agents, by name", body = List<AgentView>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<List<AgentView>>, ApiError> {
    let agents = state.store().list_agents(principal.workspace_id).await?;
    Ok(Json(List {
        data: agents.into_iter().map(AgentView::from).collect(),
    }))
}

/// One agent. Requires role: viewer.
#[utoipa::path(get, path = "/v1/agents/{name}", tag = super::AGENTS, security(("api_key" = [])),
    params(("name" = String, Path, description = "The agent's name")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 404, description = "No such agent in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    Ok(Json(
        state
            .store()
            .agent(principal.workspace_id, &name)
            .await?
            .into(),
    ))
}

/// Deletes an agent. Its tasks keep the versions they ran with. Requires role: admin.
#[utoipa::path(delete, path = "/v1/agents/{name}", tag = super::AGENTS, security(("api_key" = [])),
    params(("name" = String, Path, description = "The agent's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such agent in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .store()
        .delete_agent(principal.workspace_id, &name)
        .await?;
    tracing::info!(agent = %name, "agent deleted");
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("agent.deleted", &name),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Reloads `runtime.agents_dir` into the configured agents workspace (as SIGHUP does).
/// Requires role: admin.
#[utoipa::path(post, path = "/v1/agents/reload", tag = super::AGENTS, security(("api_key" = [])),
    responses((status = 200, description = "What was stored and what was rejected", body = crate::runtime::Loaded)))]
pub(crate) async fn reload(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
) -> Result<Json<crate::runtime::Loaded>, ApiError> {
    let name = keel_core::workspace::WorkspaceName::parse(&state.config().runtime.agents_workspace)
        .map_err(|e| ApiError::internal(&e))?;
    let workspace = state.store().ensure_workspace(&name).await?;
    let loaded = crate::runtime::load_agents(
        state.store(),
        state.router(),
        workspace.id,
        &state.config().runtime,
    )
    .await?;
    let action = Action::new("agents.reloaded", workspace.id)
        .data(serde_json::to_value(&loaded).unwrap_or_default());
    audit::record(&state, &principal, &caller, action).await;
    Ok(Json(loaded))
}

/// An agent's health, for a dashboard.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AgentStatus {
    /// The agent's name.
    name: String,
    /// Its current version.
    version: i64,
    /// Tasks being worked on or waiting to resume.
    active: u64,
    /// Tasks waiting for their first run.
    queued: u64,
    /// Tasks waiting for a human.
    input_required: u64,
    /// Over the last hour and the last day (every task of the agent).
    windows: Vec<Window>,
    /// Each tool's circuit breaker on this instance: `closed`, `half_open` or `open`.
    #[schema(value_type = Object)]
    tools: Value,
    /// The most recent failure.
    #[schema(value_type = Object)]
    last_error: Value,
}

/// Success and duration over a window.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Window {
    /// `1h` or `24h`.
    window: &'static str,
    /// Tasks that finished in it.
    finished: u64,
    /// Share of them that completed (`null` when none finished).
    success_rate: Option<f64>,
    /// 95th percentile of completed tasks' durations, ms.
    p95_duration_ms: Option<u64>,
}

/// An agent's status: version, active and queued tasks, success rate and p95 duration
/// over recent windows, each tool's breaker state, last error. Requires role: viewer.
#[utoipa::path(get, path = "/v1/agents/{name}/status", tag = super::AGENTS, security(("api_key" = [])),
    params(("name" = String, Path, description = "The agent's name")),
    responses(
        (status = 200, description = "The status", body = AgentStatus),
        (status = 404, description = "No such agent in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn status(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<AgentStatus>, ApiError> {
    let agent = state.store().agent(principal.workspace_id, &name).await?;
    let now = time::OffsetDateTime::now_utc();
    let spans = [
        ("1h", time::Duration::hours(1)),
        ("24h", time::Duration::days(1)),
    ];
    let since: Vec<time::OffsetDateTime> = spans.iter().map(|(_, span)| now - *span).collect();
    let stats = state
        .store()
        .agent_stats(principal.workspace_id, agent.id, &since)
        .await?;
    let windows = spans
        .iter()
        .zip(&stats.windows)
        .map(|((label, _), w)| Window {
            window: label,
            finished: w.finished,
            success_rate: (w.finished > 0).then(|| w.completed as f64 / w.finished as f64),
            p95_duration_ms: w.p95_ms,
        })
        .collect();
    let tools: serde_json::Map<String, Value> = state
        .runtime()
        .breaker_states(agent.id)
        .into_iter()
        .map(|(tool, s)| {
            let s = match s {
                keel_llm::breaker::State::Closed => "closed",
                keel_llm::breaker::State::HalfOpen => "half_open",
                keel_llm::breaker::State::Open => "open",
            };
            (tool, Value::String(s.to_owned()))
        })
        .collect();
    let last_error = stats.last_error.as_ref().map_or(Value::Null, |t| {
            serde_json::json!({"task_id": t.id.to_string(), "error": t.error, "at": rfc3339(t.updated_at)})
        });
    Ok(Json(AgentStatus {
        name: agent.name,
        version: agent.version,
        active: stats.working,
        queued: stats.submitted,
        input_required: stats.input_required,
        windows,
        tools: Value::Object(tools),
        last_error,
    }))
}
