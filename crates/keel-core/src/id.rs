//! Typed, prefixed identifiers (`ws_…`, `key_…`): a UUIDv7 underneath, so ids sort by
//! creation time and index well, and a prefix on the wire so an id pasted into the wrong
//! place is rejected instead of silently matching nothing.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::Error;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// The prefix this id carries on the wire.
            pub const PREFIX: &'static str = $prefix;

            /// A new, time-ordered id.
            #[must_use]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id from its UUID (as stored in a database).
            #[must_use]
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID underneath (what a database stores).
            #[must_use]
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, self.0.simple())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self, Error> {
                let rest = s
                    .strip_prefix($prefix)
                    .and_then(|r| r.strip_prefix('_'))
                    .ok_or_else(|| {
                        Error::invalid($what, format!("expected `{}_` followed by 32 hex digits, got {s:?}", $prefix))
                    })?;
                if rest.len() != 32 {
                    return Err(Error::invalid($what, format!("expected 32 hex digits after `{}_`, got {}", $prefix, rest.len())));
                }
                Uuid::try_parse(rest)
                    .map(Self)
                    .map_err(|_| Error::invalid($what, format!("expected 32 hex digits after `{}_`, got {rest:?}", $prefix)))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A workspace (tenant).
    WorkspaceId,
    "ws",
    "workspace id"
);
id_type!(
    /// An API key (its id, never its secret).
    ApiKeyId,
    "key",
    "API key id"
);

id_type!(
    /// An event in a workspace's log.
    EventId,
    "evt",
    "event id"
);
id_type!(
    /// An agent.
    AgentId,
    "agt",
    "agent id"
);
id_type!(
    /// A task: what was asked of an agent.
    TaskId,
    "task",
    "task id"
);
id_type!(
    /// A run: one attempt at a task.
    RunId,
    "run",
    "run id"
);

id_type!(
    /// A conversation thread (A2A `contextId`): the messages tasks on it share.
    ThreadId,
    "thr",
    "thread id"
);

id_type!(
    /// A webhook subscription.
    WebhookId,
    "whk",
    "webhook id"
);
id_type!(
    /// One attempt to deliver an event to a webhook.
    DeliveryId,
    "dlv",
    "delivery id"
);

id_type!(
    /// A user: a person who logs in with a password.
    UserId,
    "usr",
    "user id"
);
id_type!(
    /// A login session: one family of rotating refresh tokens.
    SessionId,
    "ses",
    "session id"
);
id_type!(
    /// An entry of a workspace's audit log.
    AuditId,
    "aud",
    "audit entry id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_their_wire_form() {
        let id = WorkspaceId::new();
        let text = id.to_string();
        assert!(text.starts_with("ws_"), "{text}");
        assert_eq!(text.len(), 3 + 32);
        assert_eq!(text.parse::<WorkspaceId>(), Ok(id));
    }

    #[test]
    fn an_id_with_the_wrong_prefix_is_rejected() {
        let key = ApiKeyId::new().to_string();
        let err = key.parse::<WorkspaceId>().unwrap_err();
        assert!(err.to_string().contains("expected `ws_`"), "{err}");
        assert!("ws_xyz".parse::<WorkspaceId>().is_err());
        assert!("ws_".parse::<WorkspaceId>().is_err());
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = ApiKeyId::new();
        let b = ApiKeyId::new();
        assert!(a < b);
    }
}
