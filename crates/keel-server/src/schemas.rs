//! The published JSON Schemas of the event catalogue (`schemas/events/` in the repo,
//! embedded at build time) and a validator over them: used by GET /v1/events/schemas,
//! `keel events validate`, and the tests that check every event Keel emits.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

macro_rules! embed {
    ($($name:literal),* $(,)?) => {
        /// Every schema, by event type (plus `envelope`), as JSON text.
        pub const SCHEMAS: &[(&str, &str)] = &[
            $(($name, include_str!(concat!("../../../schemas/events/", $name, ".json"))),)*
        ];
    };
}

embed!(
    "envelope",
    "task.created",
    "task.started",
    "task.input_required",
    "task.completed",
    "task.error",
    "task.canceled",
    "run.resumed",
    "agent.message",
    "tool.call",
    "tool.result",
    "artifact.created",
    "artifact.updated",
    "workflow.started",
    "workflow.step.started",
    "workflow.step.completed",
    "workflow.completed",
    "system.resource.warning",
    "system.resource.critical",
    "security.suspicious_activity",
    "security.breach_detected",
    "billing.threshold.reached",
    "billing.usage_alert",
    "llm.provider.error",
    "llm.provider.fallback",
    "dead_letter.created",
    "system.ping",
);

struct Compiled {
    documents: BTreeMap<&'static str, Value>,
    validators: BTreeMap<&'static str, jsonschema::Validator>,
}

fn compiled() -> &'static Result<Compiled, String> {
    static COMPILED: OnceLock<Result<Compiled, String>> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let mut documents = BTreeMap::new();
        let mut validators = BTreeMap::new();
        for (name, text) in SCHEMAS {
            let doc: Value = serde_json::from_str(text)
                .map_err(|e| format!("schema {name} is not JSON: {e}"))?;
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(&doc)
                .map_err(|e| format!("schema {name} does not compile: {e}"))?;
            documents.insert(*name, doc);
            validators.insert(*name, validator);
        }
        Ok(Compiled {
            documents,
            validators,
        })
    })
}

/// Every schema document, by name.
pub fn documents() -> Result<&'static BTreeMap<&'static str, Value>, String> {
    compiled()
        .as_ref()
        .map(|c| &c.documents)
        .map_err(Clone::clone)
}

/// Checks one event envelope against its type's schema. Each error names the path in the
/// event and what is wrong.
pub fn validate(event: &Value) -> Result<(), Vec<String>> {
    let compiled = compiled().as_ref().map_err(|e| vec![e.clone()])?;
    let Some(event_type) = event.get("event_type").and_then(Value::as_str) else {
        return Err(vec!["event_type: missing or not a string".to_owned()]);
    };
    let Some(validator) = compiled
        .validators
        .get(event_type)
        .filter(|_| event_type != "envelope")
    else {
        return Err(vec![format!(
            "event_type: unknown type {event_type:?}; known types: {}",
            keel_core::event::EventType::known_list()
        )]);
    };
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| {
            let path = e.instance_path().to_string();
            let path = if path.is_empty() {
                "(event)".to_owned()
            } else {
                path
            };
            format!("{path}: {e}")
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::event::EventType;

    #[test]
    fn every_catalogue_type_has_a_schema_and_every_schema_a_type() {
        let docs = documents().unwrap();
        for t in EventType::ALL {
            assert!(docs.contains_key(t.as_str()), "no schema for {t}");
        }
        assert_eq!(
            docs.len(),
            EventType::ALL.len() + 1,
            "one schema per type, plus the envelope"
        );
    }

    #[test]
    fn events_are_checked_against_their_types_schema() {
        let mut event = serde_json::json!({
            "event_id": "evt_0190a8f6e3b07c3e8d0f1a2b3c4d5e6f",
            "event_type": "system.ping",
            "timestamp": "2026-11-22T10:00:00.123456Z",
            "seq": 1,
            "correlation_id": null,
            "workspace_id": "ws_0190a8f6e3b07c3e8d0f1a2b3c4d5e6f",
            "agent_id": null,
            "task_id": null,
            "run_id": null,
            "data": { "message": "hi" },
            "version": "1.0"
        });
        assert_eq!(validate(&event), Ok(()));
        event["seq"] = serde_json::json!(0);
        event["workspace_id"] = serde_json::json!("key_0190a8f6e3b07c3e8d0f1a2b3c4d5e6f");
        let errors = validate(&event).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("/seq")), "{errors:?}");
        event["event_type"] = serde_json::json!("task.exploded");
        assert!(validate(&event).unwrap_err()[0].contains("unknown type"));
        event["event_type"] = serde_json::json!("task.started");
        event["seq"] = serde_json::json!(1);
        event["workspace_id"] = serde_json::json!("ws_0190a8f6e3b07c3e8d0f1a2b3c4d5e6f");
        let errors = validate(&event).unwrap_err();
        assert!(errors.iter().any(|e| e.contains("attempt")), "{errors:?}");
    }
}
