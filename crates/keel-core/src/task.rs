//! Tasks: what was asked of an agent, their status (A2A's task states) and queue priority.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Where a task stands. Follows A2A: `submitted` → `working` → one of the terminal states,
/// with `input-required` while it waits for a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskStatus {
    /// Accepted and queued; no run has started.
    Submitted,
    /// A run is in progress (or queued to resume or retry).
    Working,
    /// Waiting for a decision or a reply (POST /v1/tasks/{id}/input).
    InputRequired,
    /// Finished with an answer.
    Completed,
    /// Canceled by a caller.
    Canceled,
    /// Out of attempts, or stopped by a limit.
    Failed,
    /// A human rejected it.
    Rejected,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [Self; 7] = [
        Self::Submitted,
        Self::Working,
        Self::InputRequired,
        Self::Completed,
        Self::Canceled,
        Self::Failed,
        Self::Rejected,
    ];

    /// The wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Working => "working",
            Self::InputRequired => "input-required",
            Self::Completed => "completed",
            Self::Canceled => "canceled",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }

    /// Whether nothing more will happen to the task (until a replay).
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Canceled | Self::Failed | Self::Rejected
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "task status",
                    format!(
                        "expected one of submitted, working, input-required, completed, canceled, failed, rejected; got {s:?}"
                    ),
                )
            })
    }
}

/// Queue priority: higher runs first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Runs when nothing else waits.
    Low,
    /// The default.
    #[default]
    Medium,
    /// Ahead of medium and low.
    High,
    /// Ahead of everything.
    Critical,
}

impl Priority {
    /// The number the queue orders by.
    #[must_use]
    pub const fn rank(self) -> i64 {
        match self {
            Self::Low => 0,
            Self::Medium => 1,
            Self::High => 2,
            Self::Critical => 3,
        }
    }

    /// The priority of a stored rank (unknown ranks clamp).
    #[must_use]
    pub const fn from_rank(rank: i64) -> Self {
        match rank {
            i64::MIN..=0 => Self::Low,
            1 => Self::Medium,
            2 => Self::High,
            _ => Self::Critical,
        }
    }

    /// The wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_unknown_ones_are_named() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>(), Ok(s));
        }
        let err = "done".parse::<TaskStatus>().unwrap_err().to_string();
        assert!(
            err.contains("input-required") && err.contains("\"done\""),
            "{err}"
        );
        assert!(TaskStatus::Completed.is_terminal());
        assert!(!TaskStatus::InputRequired.is_terminal());
    }

    #[test]
    fn priorities_order_and_round_trip_through_their_rank() {
        assert!(Priority::Critical > Priority::High && Priority::Medium > Priority::Low);
        for p in [
            Priority::Low,
            Priority::Medium,
            Priority::High,
            Priority::Critical,
        ] {
            assert_eq!(Priority::from_rank(p.rank()), p);
        }
    }
}
