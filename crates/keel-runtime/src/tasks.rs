//! Creating tasks — from the API, and from an agent delegating to another — and reading
//! agent spec files.

use std::path::{Path, PathBuf};

use keel_core::event::{EventType, NewEvent};
use keel_core::id::{TaskId, ThreadId};
use keel_core::task::Priority;
use keel_store::runtime::{AgentRecord, Created, NewTask};
use serde_json::{Value, json};

use crate::spec::AgentSpec;

/// A task to create.
#[derive(Debug)]
pub struct NewTaskRequest<'a> {
    /// The agent (its current version is pinned).
    pub agent: &'a AgentRecord,
    /// Input messages, as [`input_messages`] returns them.
    pub input: Value,
    /// A thread to continue.
    pub thread_id: Option<ThreadId>,
    /// The delegating task.
    pub parent_task_id: Option<TaskId>,
    /// Delegation depth.
    pub depth: i64,
    /// Queue priority.
    pub priority: Priority,
    /// Caller's metadata.
    pub metadata: Value,
    /// Caller's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// The queue's bound.
    pub max_queued: i64,
    /// The trace id of the request.
    pub correlation_id: Option<String>,
}

/// Creates and queues the task with its `task.created` event.
pub async fn create(
    store: &dyn keel_store::Store,
    r: NewTaskRequest<'_>,
) -> Result<Created, keel_store::Error> {
    let spec =
        AgentSpec::from_json(r.agent.spec.clone()).map_err(|e| keel_store::Error::Corrupt {
            what: "agent spec",
            detail: e.to_string(),
        })?;
    let id = TaskId::new();
    let mut created = NewEvent::new(
        EventType::TaskCreated,
        r.agent.workspace_id,
        json!({
            "agent": r.agent.name,
            "agent_version": r.agent.version,
            "priority": r.priority.as_str(),
            "thread_id": r.thread_id.map(|t| t.to_string()),
            "parent_task_id": r.parent_task_id.map(|t| t.to_string()),
        }),
    )
    .with_task(id)
    .correlated(r.correlation_id);
    created.agent_id = Some(r.agent.id);
    store
        .create_task(NewTask {
            id,
            workspace_id: r.agent.workspace_id,
            agent_id: r.agent.id,
            agent_name: r.agent.name.clone(),
            agent_version: r.agent.version,
            thread_id: r.thread_id,
            parent_task_id: r.parent_task_id,
            depth: r.depth,
            priority: r.priority,
            input: r.input,
            metadata: r.metadata,
            idempotency_key: r.idempotency_key,
            max_attempts: i64::from(spec.max_attempts),
            max_queued: r.max_queued,
            events: vec![created],
        })
        .await
}

/// A task's input as chat messages: a string is one user message; an array must hold
/// messages with a `role` of `user`, `assistant`, `system` or `developer` and a string (or
/// content-part array) `content`. The error names the offending element.
pub fn input_messages(input: &Value) -> Result<Value, String> {
    match input {
        Value::String(text) if !text.is_empty() => Ok(json!([{"role": "user", "content": text}])),
        Value::String(_) => Err("input: must not be empty".to_owned()),
        Value::Array(messages) if !messages.is_empty() => {
            for (i, m) in messages.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                if !matches!(role, Some("user" | "assistant" | "system" | "developer")) {
                    return Err(format!(
                        "input[{i}].role: must be one of user, assistant, system, developer"
                    ));
                }
                match m.get("content") {
                    Some(Value::String(_) | Value::Array(_)) => {}
                    _ => {
                        return Err(format!(
                            "input[{i}].content: must be a string or an array of content parts"
                        ));
                    }
                }
                if m.get("pinned").is_some_and(|p| !p.is_boolean()) {
                    return Err(format!(
                        "input[{i}].pinned: must be true (kept in the context whatever happens) or false"
                    ));
                }
            }
            Ok(input.clone())
        }
        Value::Array(_) => Err("input: must hold at least one message".to_owned()),
        _ => Err("input: must be a string or an array of messages".to_owned()),
    }
}

/// Every `*.toml` file in `dir`, parsed and validated against `routes`, in name order.
/// A missing directory holds no specs.
pub fn load_dir(
    dir: &Path,
    routes: &[&str],
) -> Vec<(PathBuf, Result<AgentSpec, crate::spec::Invalid>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let spec = std::fs::read_to_string(&path)
                .map_err(|e| {
                    crate::spec::Invalid(vec![crate::spec::Issue {
                        field: "file".to_owned(),
                        message: format!("cannot read: {e}"),
                    }])
                })
                .and_then(|text| AgentSpec::from_toml(&text))
                .and_then(|spec| spec.validate(routes).map(|()| spec));
            (path, spec)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_text_or_messages_and_a_bad_element_is_named() {
        assert_eq!(input_messages(&json!("hi")).unwrap()[0]["role"], "user");
        assert!(input_messages(&json!("")).is_err());
        let err = input_messages(
            &json!([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]),
        )
        .unwrap_err();
        assert!(err.starts_with("input[1].role"), "{err}");
        let err = input_messages(&json!([{"role": "user"}])).unwrap_err();
        assert!(err.starts_with("input[0].content"), "{err}");
        assert!(input_messages(&json!(42)).is_err());
        let err = input_messages(&json!([{"role": "user", "content": "a", "pinned": "yes"}]))
            .unwrap_err();
        assert!(err.starts_with("input[0].pinned"), "{err}");
        assert!(input_messages(&json!([{"role": "user", "content": "a", "pinned": true}])).is_ok());
    }
}
