//! The event envelope (version 1.0, DESIGN.md "Event envelope") and the catalogue of event
//! types. Every state change in Keel is recorded as an [`Event`] in its workspace's
//! append-only log, numbered by a gap-free, per-workspace `seq`.
//!
//! Versioning: the envelope and each type's `data` carry a `major.minor` version. A minor
//! version only adds optional fields; a major version may remove or change them, and the
//! older major stays readable through an upcaster for a deprecation window.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Error;
use crate::id::{AgentId, EventId, RunId, TaskId, WorkspaceId};

/// The envelope version this binary writes.
pub const ENVELOPE_VERSION: &str = "1.0";

macro_rules! catalogue {
    ($($(#[$meta:meta])* $variant:ident = $name:literal,)*) => {
        /// Every event type Keel emits. Its wire name is dotted (`task.created`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType {
            $($(#[$meta])* $variant,)*
        }

        impl EventType {
            /// The whole catalogue, in documentation order.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// The wire name, e.g. `task.created`.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $name,)*
                }
            }
        }
    };
}

catalogue! {
    /// A task was accepted.
    TaskCreated = "task.created",
    /// A run of a task began (or a retry began a new run).
    TaskStarted = "task.started",
    /// A task needs a human decision or reply before it can go on.
    TaskInputRequired = "task.input_required",
    /// A task finished successfully.
    TaskCompleted = "task.completed",
    /// A run of a task failed.
    TaskError = "task.error",
    /// A task was canceled.
    TaskCanceled = "task.canceled",
    /// A run resumed after a crash or restart, after its last committed step.
    RunResumed = "run.resumed",
    /// An agent produced a message.
    AgentMessage = "agent.message",
    /// An agent called a tool.
    ToolCall = "tool.call",
    /// A tool call returned.
    ToolResult = "tool.result",
    /// An artifact was created.
    ArtifactCreated = "artifact.created",
    /// An artifact was updated.
    ArtifactUpdated = "artifact.updated",
    /// A workflow execution began.
    WorkflowStarted = "workflow.started",
    /// A workflow step began.
    WorkflowStepStarted = "workflow.step.started",
    /// A workflow step finished.
    WorkflowStepCompleted = "workflow.step.completed",
    /// A workflow execution finished.
    WorkflowCompleted = "workflow.completed",
    /// A resource is nearing its limit.
    SystemResourceWarning = "system.resource.warning",
    /// A resource is at its limit.
    SystemResourceCritical = "system.resource.critical",
    /// Something looks like an attack.
    SecuritySuspiciousActivity = "security.suspicious_activity",
    /// A breach was detected.
    SecurityBreachDetected = "security.breach_detected",
    /// Spend crossed a budget threshold.
    BillingThresholdReached = "billing.threshold.reached",
    /// Usage is unusual.
    BillingUsageAlert = "billing.usage_alert",
    /// An LLM provider failed one attempt.
    LlmProviderError = "llm.provider.error",
    /// A route moved on from one target to the next.
    LlmProviderFallback = "llm.provider.fallback",
    /// A job or task ran out of attempts and was dead-lettered.
    DeadLetterCreated = "dead_letter.created",
    /// A test event sent to check a webhook or stream end to end.
    SystemPing = "system.ping",
}

impl EventType {
    /// The version of this type's `data` this binary writes.
    #[must_use]
    pub const fn version(self) -> &'static str {
        ENVELOPE_VERSION
    }

    /// The catalogue's names, comma-separated (for error messages).
    #[must_use]
    pub fn known_list() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
        names.join(", ")
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "event type",
                    format!("unknown type {s:?}; known types: {}", Self::known_list()),
                )
            })
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of event types to follow: comma-separated names, each exact (`task.created`), a
/// dotted prefix wildcard (`task.*`, `workflow.step.*`) or `*`. Every pattern must match
/// at least one type in the catalogue, so a typo is an error rather than a silent stream of
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeFilter {
    /// The types selected, sorted; empty means every type.
    types: Vec<EventType>,
    all: bool,
}

impl TypeFilter {
    /// Every type.
    #[must_use]
    pub const fn all() -> Self {
        Self {
            types: Vec::new(),
            all: true,
        }
    }

    /// Parses `task.*,llm.provider.error`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut types = Vec::new();
        for pattern in text.split(',').map(str::trim) {
            if pattern.is_empty() {
                continue;
            }
            if pattern == "*" {
                return Ok(Self::all());
            }
            let matched: Vec<EventType> = if let Some(prefix) = pattern.strip_suffix('*') {
                if !prefix.ends_with('.') || prefix.contains('*') {
                    return Err(Error::invalid(
                        "event type filter",
                        format!(
                            "{pattern:?}: a wildcard may only end a dotted prefix, as in `task.*`"
                        ),
                    ));
                }
                EventType::ALL
                    .iter()
                    .copied()
                    .filter(|t| t.as_str().starts_with(prefix))
                    .collect()
            } else {
                EventType::ALL
                    .iter()
                    .copied()
                    .filter(|t| t.as_str() == pattern)
                    .collect()
            };
            if matched.is_empty() {
                return Err(Error::invalid(
                    "event type filter",
                    format!(
                        "{pattern:?} matches no event type; known types: {}",
                        EventType::known_list()
                    ),
                ));
            }
            types.extend(matched);
        }
        if types.is_empty() {
            return Ok(Self::all());
        }
        types.sort_unstable();
        types.dedup();
        Ok(Self { types, all: false })
    }

    /// Whether every type passes.
    #[must_use]
    pub const fn is_all(&self) -> bool {
        self.all
    }

    /// Whether an event of this wire type passes.
    #[must_use]
    pub fn matches(&self, event_type: &str) -> bool {
        self.all || self.types.iter().any(|t| t.as_str() == event_type)
    }

    /// The selected types' wire names (empty when every type passes).
    #[must_use]
    pub fn names(&self) -> Vec<&'static str> {
        self.types.iter().map(|t| t.as_str()).collect()
    }
}

/// An event to append: the log assigns its id, seq and timestamp when it commits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// What happened.
    pub event_type: EventType,
    /// The workspace whose log it goes to.
    pub workspace_id: WorkspaceId,
    /// The trace id of the request or run that caused it.
    pub correlation_id: Option<String>,
    /// The agent concerned, if any.
    pub agent_id: Option<AgentId>,
    /// The task concerned, if any.
    pub task_id: Option<TaskId>,
    /// The run concerned, if any.
    pub run_id: Option<RunId>,
    /// The type's payload (validated against its JSON Schema in tests).
    pub data: serde_json::Value,
}

impl NewEvent {
    /// An event with no agent, task or run.
    #[must_use]
    pub const fn new(
        event_type: EventType,
        workspace_id: WorkspaceId,
        data: serde_json::Value,
    ) -> Self {
        Self {
            event_type,
            workspace_id,
            correlation_id: None,
            agent_id: None,
            task_id: None,
            run_id: None,
            data,
        }
    }

    /// Sets the task.
    #[must_use]
    pub const fn with_task(mut self, task_id: TaskId) -> Self {
        self.task_id = Some(task_id);
        self
    }

    /// Sets the correlation (trace) id.
    #[must_use]
    pub fn correlated(mut self, correlation_id: Option<String>) -> Self {
        self.correlation_id = correlation_id;
        self
    }
}

/// A committed event, as stored and as sent (envelope version 1.0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `evt_<uuidv7>`.
    pub event_id: EventId,
    /// The wire name of its type. A string, not [`EventType`], so a log written by a newer
    /// binary stays readable.
    pub event_type: String,
    /// When it was committed (RFC 3339, UTC, microseconds).
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// Its position in the workspace's log: 1, 2, 3, … with no gaps.
    pub seq: i64,
    /// The trace id of what caused it.
    pub correlation_id: Option<String>,
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// The agent concerned.
    pub agent_id: Option<AgentId>,
    /// The task concerned.
    pub task_id: Option<TaskId>,
    /// The run concerned.
    pub run_id: Option<RunId>,
    /// The payload.
    pub data: serde_json::Value,
    /// `major.minor` of the envelope and payload.
    pub version: String,
}

/// A `major.minor` version as events carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Breaking changes bump this.
    pub major: u16,
    /// Additive changes bump this.
    pub minor: u16,
}

impl FromStr for Version {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::invalid(
                "event version",
                format!("expected `major.minor` such as `1.0`, got {s:?}"),
            )
        };
        let (major, minor) = s.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            major: major.parse().map_err(|_| bad())?,
            minor: minor.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Rewrites one type's stored `data` from an older major version to the next one.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    /// The event type.
    pub event_type: &'static str,
    /// The major version it reads.
    pub from_major: u16,
    /// The version it produces.
    pub to: &'static str,
    /// The rewrite.
    pub apply: fn(&mut serde_json::Value),
}

/// Every upcaster. Empty while 1.0 is the only version ever written; a breaking change to
/// a type adds one here, so events stored before it still read in the new shape.
pub const UPCASTERS: &[Upcaster] = &[];

/// Brings a stored event up to the current version of its type (see [`UPCASTERS`]).
#[must_use]
pub fn upcast(event: Event) -> Event {
    upcast_with(event, UPCASTERS)
}

/// [`upcast`] with a given set of upcasters, applied in turn until none matches.
#[must_use]
pub fn upcast_with(mut event: Event, upcasters: &[Upcaster]) -> Event {
    // Each step raises the major version, so this ends.
    while let Ok(version) = event.version.parse::<Version>() {
        let Some(step) = upcasters
            .iter()
            .find(|u| u.event_type == event.event_type && u.from_major == version.major)
        else {
            break;
        };
        (step.apply)(&mut event.data);
        event.version = step.to.to_owned();
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_its_name() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(*t));
        }
        assert!(EventType::ALL.len() >= 25);
    }

    #[test]
    fn filters_take_exact_names_and_dotted_wildcards() {
        let f =
            TypeFilter::parse("task.*, llm.provider.error").unwrap_or_else(|e| unreachable!("{e}"));
        assert!(f.matches("task.created"));
        assert!(f.matches("task.canceled"));
        assert!(f.matches("llm.provider.error"));
        assert!(!f.matches("llm.provider.fallback"));
        assert!(!f.matches("tool.call"));
        let step = TypeFilter::parse("workflow.step.*").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            step.names(),
            vec!["workflow.step.started", "workflow.step.completed"]
        );
        assert!(TypeFilter::parse("*").is_ok_and(|f| f.is_all()));
        assert!(TypeFilter::parse("").is_ok_and(|f| f.is_all()));
    }

    #[test]
    fn a_filter_that_matches_nothing_lists_the_catalogue() {
        let err = TypeFilter::parse("task.craeted").unwrap_err().to_string();
        assert!(
            err.contains("\"task.craeted\" matches no event type"),
            "{err}"
        );
        assert!(err.contains("task.created"), "{err}");
        let err = TypeFilter::parse("nope.*").unwrap_err().to_string();
        assert!(err.contains("matches no event type"), "{err}");
        let err = TypeFilter::parse("ta*").unwrap_err().to_string();
        assert!(err.contains("dotted prefix"), "{err}");
    }

    #[test]
    fn versions_parse_and_order() {
        let v: Version = "1.10".parse().unwrap_or_else(|e| unreachable!("{e}"));
        assert!(v > "1.9".parse().unwrap_or_else(|e| unreachable!("{e}")));
        assert_eq!(v.to_string(), "1.10");
        assert!("1".parse::<Version>().is_err());
        assert!("a.b".parse::<Version>().is_err());
    }

    #[test]
    fn older_majors_are_upcast_step_by_step() {
        fn rename(data: &mut serde_json::Value) {
            if let Some(obj) = data.as_object_mut()
                && let Some(v) = obj.remove("model")
            {
                obj.insert("upstream_model".to_owned(), v);
            }
        }
        fn add_phase(data: &mut serde_json::Value) {
            data["phase"] = serde_json::json!("request");
        }
        let steps = [
            Upcaster {
                event_type: "llm.provider.error",
                from_major: 0,
                to: "1.0",
                apply: rename,
            },
            Upcaster {
                event_type: "llm.provider.error",
                from_major: 1,
                to: "2.0",
                apply: add_phase,
            },
        ];
        let old = Event {
            event_id: EventId::new(),
            event_type: "llm.provider.error".to_owned(),
            timestamp: OffsetDateTime::UNIX_EPOCH,
            seq: 1,
            correlation_id: None,
            workspace_id: WorkspaceId::new(),
            agent_id: None,
            task_id: None,
            run_id: None,
            data: serde_json::json!({ "model": "gpt" }),
            version: "0.3".to_owned(),
        };
        let new = upcast_with(old.clone(), &steps);
        assert_eq!(new.version, "2.0");
        assert_eq!(
            new.data,
            serde_json::json!({ "upstream_model": "gpt", "phase": "request" })
        );
        let other = Event {
            event_type: "tool.call".to_owned(),
            ..old.clone()
        };
        assert_eq!(
            upcast_with(other.clone(), &steps),
            other,
            "other types are left alone"
        );
        assert_eq!(
            upcast(old.clone()),
            old,
            "no upcasters are registered while 1.0 is the only version"
        );
    }
}
