//! Writing the audit log: who did what, when, from where. Handlers call [`record`] after
//! a sensitive action succeeds (or a login fails); the store chains the entry onto its
//! workspace's log.
//!
//! An entry that cannot be written is logged at error level and counted
//! (`keel_audit_write_errors_total`); the action it describes has already happened and is
//! not undone.

use keel_core::auth::Principal;
use keel_core::id::WorkspaceId;
use keel_store::security::NewAuditEntry;

use crate::AppState;
use crate::auth::Caller;

/// Removes audit entries older than `retention`, and sessions that expired or were
/// revoked over a day ago, hourly, until `stop`. Each audit chain's anchor moves past what
/// was removed, so `keel audit verify` still checks the rest.
pub async fn prune_loop(
    store: std::sync::Arc<dyn keel_store::Store>,
    retention: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = time::OffsetDateTime::now_utc();
        match store.prune_sessions(now - time::Duration::DAY).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "removed ended sessions"),
            Err(e) => tracing::warn!(error = %e, "session pruning failed; will retry"),
        }
        let cutoff = now - time::Duration::try_from(retention).unwrap_or(time::Duration::MAX);
        match store.prune_audit(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(entries = n, retention = ?retention, "pruned audit entries past retention")
            }
            Err(e) => tracing::warn!(error = %e, "audit pruning failed; will retry"),
        }
    }
}

/// What happened, to record.
#[derive(Debug)]
pub(crate) struct Action<'a> {
    /// e.g. `key.created`.
    pub action: &'a str,
    /// The id acted on.
    pub target: Option<String>,
    /// Details.
    pub data: serde_json::Value,
}

impl<'a> Action<'a> {
    pub(crate) fn new(action: &'a str, target: impl ToString) -> Self {
        Self {
            action,
            target: Some(target.to_string()),
            data: serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    pub(crate) fn data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }
}

/// Records an action a principal took in its workspace.
pub(crate) async fn record(
    state: &AppState,
    principal: &Principal,
    caller: &Caller,
    action: Action<'_>,
) {
    record_as(
        state,
        principal.workspace_id,
        &principal.actor(),
        caller,
        action,
    )
    .await;
}

/// Records an action in `workspace` by `actor` (an id, or an email for a failed login).
pub(crate) async fn record_as(
    state: &AppState,
    workspace: WorkspaceId,
    actor: &str,
    caller: &Caller,
    action: Action<'_>,
) {
    let entry = NewAuditEntry {
        workspace_id: workspace,
        actor: actor.to_owned(),
        action: action.action.to_owned(),
        target: action.target,
        ip: caller.ip.clone(),
        user_agent: caller.user_agent.clone(),
        request_id: caller.request_id.clone(),
        data: action.data,
    };
    if let Err(e) = state
        .store()
        .append_audit(std::slice::from_ref(&entry))
        .await
    {
        metrics::counter!("keel_audit_write_errors_total").increment(1);
        tracing::error!(error = %e, action = %entry.action, workspace_id = %workspace, "cannot write audit entry");
    }
}
