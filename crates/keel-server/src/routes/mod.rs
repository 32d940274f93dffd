//! HTTP handlers, one module per resource. Handlers are thin: parse wire types into
//! domain types, call the store, shape the response. Authorisation is not here: it is
//! applied per route group in [`crate::app`].

pub(crate) mod agents;
pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod budgets;
pub(crate) mod events;
pub(crate) mod gateway;
pub(crate) mod keys;
pub(crate) mod limits;
pub(crate) mod members;
pub(crate) mod system;
pub(crate) mod tasks;
pub(crate) mod usage;
pub(crate) mod webhooks;
pub(crate) mod workspaces;
pub(crate) mod ws;

use serde::Serialize;
use utoipa::ToSchema;

/// The OpenAPI tag for operations endpoints.
pub(crate) const OPS: &str = "ops";
/// The OpenAPI tag for workspace endpoints.
pub(crate) const WORKSPACES: &str = "workspaces";
/// The OpenAPI tag for the OpenAI-compatible gateway.
pub(crate) const GATEWAY: &str = "gateway";
/// The OpenAPI tag for the event log.
pub(crate) const EVENTS: &str = "events";
/// The OpenAPI tag for agents.
pub(crate) const AGENTS: &str = "agents";
/// The OpenAPI tag for tasks, threads and dead letters.
pub(crate) const TASKS: &str = "tasks";
/// The OpenAPI tag for key endpoints.
pub(crate) const KEYS: &str = "keys";
/// The OpenAPI tag for login sessions.
pub(crate) const AUTH: &str = "auth";
/// The OpenAPI tag for workspace members.
pub(crate) const MEMBERS: &str = "members";
/// The OpenAPI tag for budgets.
pub(crate) const BUDGETS: &str = "budgets";
/// The OpenAPI tag for the audit log.
pub(crate) const AUDIT: &str = "audit";

/// A page of items.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct List<T> {
    /// The items.
    pub data: Vec<T>,
}

/// Formats a timestamp for the wire (RFC 3339).
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
