//! Workspaces: the unit of tenancy. Everything a team owns — keys, agents, tasks, usage —
//! belongs to exactly one workspace, and no read or write crosses from one to another.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Error;
use crate::id::WorkspaceId;

/// A workspace's unique, human-chosen name: 1–64 characters of lowercase ASCII letters,
/// digits, `-` and `_`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct WorkspaceName(String);

impl WorkspaceName {
    /// The longest name accepted.
    pub const MAX_LEN: usize = 64;

    /// Parses a name, saying what to fix when it is not one.
    pub fn parse(s: &str) -> Result<Self, Error> {
        const WHAT: &str = "workspace name";
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(Error::invalid(
                WHAT,
                format!("must be 1 to {} characters, got {}", Self::MAX_LEN, s.len()),
            ));
        }
        if !s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return Err(Error::invalid(
                WHAT,
                format!("must start with a lowercase letter or digit, got {s:?}"),
            ));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(Error::invalid(
                WHAT,
                format!("may hold only a-z, 0-9, '-' and '_'; {bad:?} is not allowed"),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkspaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WorkspaceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A workspace as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workspace {
    /// Its id.
    pub id: WorkspaceId,
    /// Its unique name.
    pub name: WorkspaceName,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_parse() {
        for ok in ["acme", "team-7", "a", "0day", "x_y", &"a".repeat(64)] {
            assert_eq!(WorkspaceName::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn bad_names_say_what_to_fix() {
        let cases = [
            ("", "1 to 64"),
            ("-lead", "must start"),
            ("Acme", "must start"),
            ("ac me", "' '"),
            ("acmé", "'é'"),
        ];
        for (bad, expect) in cases {
            let err = WorkspaceName::parse(bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad:?}: {err}");
        }
        assert!(WorkspaceName::parse(&"a".repeat(65)).is_err());
    }
}
