//! `keel admin …` and `keel audit …`: operator commands that work on the database directly
//! (no server needed): create users, set a workspace's limits, verify audit chains.

use anyhow::{Context as _, bail};
use clap::Subcommand;
use keel_core::auth::{Email, Role, check_password};
use keel_core::workspace::WorkspaceName;
use keel_store::Store;

use crate::{note, out};

#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Create a user (or give an existing one a role) in a workspace (created if new). The
    /// password is read from KEEL_PASSWORD, or the first line of stdin.
    #[command(
        after_help = "Example:\n  KEEL_PASSWORD='correct horse battery' keel admin create-user --email ada@example.com --workspace acme --role admin"
    )]
    CreateUser {
        /// The user's email (their login).
        #[arg(long)]
        email: String,
        /// Workspace name.
        #[arg(long)]
        workspace: String,
        /// Role: admin, member or viewer.
        #[arg(long, default_value = "member")]
        role: String,
    },
    /// Set a workspace's rate-limit tier and overrides (as PUT /v1/admin/workspaces/{id}/limits).
    #[command(
        after_help = "Example:\n  keel admin set-limits --workspace acme --tier pro --rpm 2000"
    )]
    SetLimits {
        /// Workspace name.
        #[arg(long)]
        workspace: String,
        /// A tier from [limits.tiers].
        #[arg(long)]
        tier: Option<String>,
        /// Workspace requests per minute (overrides the tier's).
        #[arg(long)]
        rpm: Option<u32>,
        /// Workspace LLM tokens per minute (overrides the tier's).
        #[arg(long)]
        tpm: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Recompute audit chains and report every edited or deleted entry. Exits 1 on any
    /// break.
    #[command(after_help = "Example:\n  keel audit verify --workspace acme")]
    Verify {
        /// Only this workspace (default: every workspace with an audit log).
        #[arg(long)]
        workspace: Option<String>,
    },
}

/// Opens the configured store and brings its schema up to date.
pub(crate) async fn open(
    config: &keel_core::config::Config,
) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let store = keel_store::open(config)
        .await
        .context("cannot open the database")?;
    store
        .migrate()
        .await
        .context("cannot migrate the database")?;
    Ok(store)
}

pub(crate) async fn admin(
    config: &keel_core::config::Config,
    command: AdminCommand,
) -> anyhow::Result<()> {
    let store = open(config).await?;
    let result = admin_with(store.as_ref(), config, command).await;
    store.close().await;
    result
}

async fn admin_with(
    store: &dyn Store,
    config: &keel_core::config::Config,
    command: AdminCommand,
) -> anyhow::Result<()> {
    match command {
        AdminCommand::CreateUser {
            email,
            workspace,
            role,
        } => {
            let email = Email::parse(&email)?;
            let role: Role = role.parse()?;
            let workspace = WorkspaceName::parse(&workspace)?;
            let ws = store.ensure_workspace(&workspace).await?;
            let user = match store.user_credentials(&email).await? {
                Some((user, _)) => {
                    note(&format!("user {} exists; setting their role", user.id));
                    user
                }
                None => {
                    let password = match std::env::var("KEEL_PASSWORD") {
                        Ok(p) => p,
                        Err(_) => {
                            let mut line = String::new();
                            std::io::stdin()
                                .read_line(&mut line)
                                .context("cannot read the password from stdin")?;
                            line.trim_end_matches(['\r', '\n']).to_owned()
                        }
                    };
                    check_password(&password, &email)?;
                    let hash = keel_server::session::hash_password(password).await?;
                    store.create_user(&email, &hash).await?
                }
            };
            store.set_membership(ws.id, user.id, role).await?;
            store
                .append_audit(&[keel_store::security::NewAuditEntry {
                    workspace_id: ws.id,
                    actor: "cli".to_owned(),
                    action: "member.role_set".to_owned(),
                    target: Some(user.id.to_string()),
                    ip: None,
                    user_agent: Some("keel admin create-user".to_owned()),
                    request_id: None,
                    data: serde_json::json!({"role": role.as_str(), "email": email.as_str()}),
                }])
                .await?;
            out(&user.id.to_string());
            note(&format!(
                "{} is {role} in workspace {} ({})",
                email.as_str(),
                ws.name,
                ws.id
            ));
        }
        AdminCommand::SetLimits {
            workspace,
            tier,
            rpm,
            tpm,
        } => {
            if let Some(tier) = &tier
                && !config.limits.tiers.contains_key(tier)
            {
                bail!(
                    "no tier {tier:?}; known: {}",
                    config
                        .limits
                        .tiers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if rpm == Some(0) || tpm == Some(0) {
                bail!("--rpm and --tpm must be at least 1; leave one out to use the tier's");
            }
            let ws = store
                .workspace_by_name(&WorkspaceName::parse(&workspace)?)
                .await?;
            let limits = keel_store::security::WorkspaceLimits {
                tier,
                rpm: rpm.map(i64::from),
                tpm: tpm.map(i64::from),
            };
            store.set_workspace_limits(ws.id, &limits).await?;
            store
                .append_audit(&[keel_store::security::NewAuditEntry {
                    workspace_id: ws.id,
                    actor: "cli".to_owned(),
                    action: "limits.changed".to_owned(),
                    target: Some(ws.id.to_string()),
                    ip: None,
                    user_agent: Some("keel admin set-limits".to_owned()),
                    request_id: None,
                    data: serde_json::json!({"tier": limits.tier, "rpm": limits.rpm, "tpm": limits.tpm}),
                }])
                .await?;
            note(&format!(
                "limits of {} set; running servers apply them within server.key_cache_ttl",
                ws.name
            ));
        }
    }
    Ok(())
}

/// Verifies chains; returns whether every one is intact.
pub(crate) async fn audit(
    config: &keel_core::config::Config,
    command: AuditCommand,
) -> anyhow::Result<bool> {
    let store = open(config).await?;
    let result = audit_with(store.as_ref(), command).await;
    store.close().await;
    result
}

async fn audit_with(store: &dyn Store, command: AuditCommand) -> anyhow::Result<bool> {
    let AuditCommand::Verify { workspace } = command;
    let workspaces = match workspace {
        Some(name) => vec![
            store
                .workspace_by_name(&WorkspaceName::parse(&name)?)
                .await?
                .id,
        ],
        None => store.audit_workspaces().await?,
    };
    let mut intact = true;
    for ws in workspaces {
        let keel_server::ChainCheck {
            head,
            checked,
            breaks,
        } = keel_server::audit_verify(store, ws).await?;
        if breaks.is_empty() {
            out(&format!(
                "{ws}\tok\t{checked} entries\thead {} {}",
                head.seq, head.hash
            ));
        } else {
            intact = false;
            for b in &breaks {
                out(&format!("{ws}\tBROKEN\tseq {}\t{}", b.seq, b.problem));
            }
        }
    }
    Ok(intact)
}
