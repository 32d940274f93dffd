//! The audit log: list with filters and a cursor, export as CSV or JSON Lines, verify the
//! chain.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use keel_core::auth::Principal;
use keel_store::security::{AuditEntry, AuditFilter};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::{ApiError, Problem};

/// Filters and paging.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct AuditQuery {
    /// Only this action (`key.created`), or a family (`auth.*`).
    action: Option<String>,
    /// Only this actor (`usr_…`, `key_…`).
    actor: Option<String>,
    /// Only this target id.
    target: Option<String>,
    /// Only entries at or after this time (RFC 3339).
    since: Option<String>,
    /// Only entries before this time (RFC 3339).
    until: Option<String>,
    /// Entries after this seq (the cursor: `next_after` of the previous page).
    after: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// `json` (default, paged), `jsonl` or `csv` (every matching entry after `after`).
    format: Option<String>,
}

/// An audit entry.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditView {
    /// Its place in the workspace's chain.
    seq: i64,
    /// Its id (`aud_…`).
    id: String,
    /// When (RFC 3339).
    #[schema(format = DateTime)]
    at: String,
    /// Who acted.
    actor: String,
    /// What was done.
    action: String,
    /// To what.
    target: Option<String>,
    /// From which address.
    ip: Option<String>,
    /// With which client.
    user_agent: Option<String>,
    /// In which request.
    request_id: Option<String>,
    /// Details.
    data: serde_json::Value,
    /// The previous entry's hash.
    prev_hash: String,
    /// This entry's hash.
    hash: String,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        Self {
            seq: e.seq,
            id: e.id.to_string(),
            at: super::rfc3339(e.created_at),
            actor: e.actor,
            action: e.action,
            target: e.target,
            ip: e.ip,
            user_agent: e.user_agent,
            request_id: e.request_id,
            data: serde_json::from_str(&e.data).unwrap_or(serde_json::Value::String(e.data)),
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

/// A page of entries.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditPage {
    /// The entries, oldest first.
    data: Vec<AuditView>,
    /// Pass as `after` for the next page; absent on the last.
    next_after: Option<i64>,
}

fn time_param(name: &str, v: Option<&str>) -> Result<Option<time::OffsetDateTime>, ApiError> {
    v.map(|v| {
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).map_err(
            |_| {
                ApiError::bad_request(format!(
                    "{name} must be an RFC 3339 time, e.g. 2026-11-29T12:00:00Z"
                ))
            },
        )
    })
    .transpose()
}

/// The workspace's audit log. Requires role: admin.
#[utoipa::path(get, path = "/v1/audit", tag = super::AUDIT,
    responses(
        (status = 200, description = "A page of entries (json), or every matching entry (jsonl, csv)", body = AuditPage),
        (status = 400, description = "A bad filter, cursor or format, named", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let filter = AuditFilter {
        action: q.action,
        actor: q.actor,
        target: q.target,
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
    };
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request("after must be a seq, 0 or more"));
    }
    let format = q.format.as_deref().unwrap_or("json");
    match format {
        "json" => {
            let limit = q.limit.unwrap_or(100);
            if !(1..=1000).contains(&limit) {
                return Err(ApiError::bad_request("limit must be between 1 and 1000"));
            }
            let entries = state
                .store()
                .list_audit(principal.workspace_id, &filter, after, limit + 1)
                .await?;
            let more = entries.len() > limit as usize;
            let data: Vec<AuditView> = entries
                .into_iter()
                .take(limit as usize)
                .map(AuditView::from)
                .collect();
            let next_after = more.then(|| data.last().map(|e| e.seq)).flatten();
            Ok(Json(AuditPage { data, next_after }).into_response())
        }
        "jsonl" | "csv" => export(state, principal, filter, after, format == "csv"),
        other => Err(ApiError::bad_request(format!(
            "format must be json, jsonl or csv, not {other:?}"
        ))),
    }
}

/// Streams every matching entry, a page at a time, so an export of any size holds one
/// page in memory.
fn export(
    state: AppState,
    principal: Principal,
    filter: AuditFilter,
    after: i64,
    csv: bool,
) -> Result<Response, ApiError> {
    const PAGE: u32 = 500;
    let stream = futures_util::stream::unfold((Some(after), csv), move |(cursor, first)| {
        let state = state.clone();
        let filter = filter.clone();
        async move {
            let after = cursor?;
            let mut out = String::new();
            if first {
                out.push_str(
                    "seq,id,at,actor,action,target,ip,user_agent,request_id,data,prev_hash,hash\n",
                );
            }
            let entries = match state
                .store()
                .list_audit(principal.workspace_id, &filter, after, PAGE)
                .await
            {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::error!(error = %e, "audit export failed mid-way");
                    return Some((
                        Err(std::io::Error::other("audit export failed")),
                        (None, false),
                    ));
                }
            };
            let next = (entries.len() == PAGE as usize)
                .then(|| entries.last().map(|e| e.seq))
                .flatten();
            for e in entries {
                if csv {
                    let at = super::rfc3339(e.created_at);
                    let fields = [
                        e.seq.to_string(),
                        e.id.to_string(),
                        at,
                        e.actor,
                        e.action,
                        e.target.unwrap_or_default(),
                        e.ip.unwrap_or_default(),
                        e.user_agent.unwrap_or_default(),
                        e.request_id.unwrap_or_default(),
                        e.data,
                        e.prev_hash,
                        e.hash,
                    ];
                    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                    out.push_str(&line.join(","));
                    out.push('\n');
                } else {
                    let view = AuditView::from(e);
                    if let Ok(line) = serde_json::to_string(&view) {
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
            }
            if out.is_empty() && next.is_none() {
                return None;
            }
            Some((Ok::<_, std::io::Error>(out), (next, false)))
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    let (ctype, ext) = if csv {
        ("text/csv; charset=utf-8", "csv")
    } else {
        ("application/jsonl", "jsonl")
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"audit.{ext}\"")) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// RFC 4180 quoting, and a leading `'` on text a spreadsheet would run as a formula.
fn csv_field(f: &str) -> String {
    let f = if f.starts_with(['=', '+', '-', '@']) {
        format!("'{f}")
    } else {
        f.to_owned()
    };
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f
    }
}

/// The result of checking a chain.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Verification {
    /// Whether the chain is intact.
    ok: bool,
    /// Entries checked.
    checked: u64,
    /// The newest seq the head records.
    head_seq: i64,
    /// The newest hash (keep it elsewhere to detect a rewrite of the whole chain).
    head_hash: String,
    /// Each break: the seq and what is wrong there.
    breaks: Vec<Break>,
}

/// One break.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Break {
    /// Where.
    seq: i64,
    /// What.
    problem: String,
}

/// Recomputes the workspace's audit chain and reports any edited or deleted entry.
/// Requires role: admin.
#[utoipa::path(get, path = "/v1/audit/verify", tag = super::AUDIT,
    responses((status = 200, description = "The verification", body = Verification)))]
pub(crate) async fn verify(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Verification>, ApiError> {
    let ChainCheck {
        head,
        checked,
        breaks,
    } = verify_workspace(state.store(), principal.workspace_id).await?;
    Ok(Json(Verification {
        ok: breaks.is_empty(),
        checked,
        head_seq: head.seq,
        head_hash: head.hash,
        breaks: breaks
            .into_iter()
            .map(|b| Break {
                seq: b.seq,
                problem: b.problem,
            })
            .collect(),
    }))
}

/// What checking one workspace's chain found.
#[derive(Debug)]
pub struct ChainCheck {
    /// The head the check read.
    pub head: keel_store::security::AuditHead,
    /// Entries checked.
    pub checked: u64,
    /// Every break found.
    pub breaks: Vec<keel_store::security::ChainBreak>,
}

/// Checks one workspace's chain, a page at a time; also used by `keel audit verify`.
/// Entries appended while it reads are beyond the head it read, and are left for the next
/// check; a break seen once is checked again from a fresh head, so retention pruning the
/// start of the chain meanwhile is not reported as a deletion.
pub async fn verify_workspace(
    store: &dyn keel_store::Store,
    workspace: keel_core::id::WorkspaceId,
) -> Result<ChainCheck, keel_store::Error> {
    let first = verify_once(store, workspace).await?;
    if first.breaks.is_empty() {
        return Ok(first);
    }
    verify_once(store, workspace).await
}

async fn verify_once(
    store: &dyn keel_store::Store,
    workspace: keel_core::id::WorkspaceId,
) -> Result<ChainCheck, keel_store::Error> {
    use keel_store::security::{AuditHead, verify_chain};
    const PAGE: u32 = 1000;
    let head = store.audit_head(workspace).await?;
    let mut breaks = Vec::new();
    let mut checked = 0u64;
    // Page by page, each page checked against a head made of where the previous one ended.
    let mut from = AuditHead {
        seq: 0,
        hash: String::new(),
        pruned_seq: head.pruned_seq,
        pruned_hash: head.pruned_hash.clone(),
    };
    let mut after = 0;
    loop {
        let mut page = store
            .list_audit(workspace, &AuditFilter::default(), after, PAGE)
            .await?;
        let full = page.len() == PAGE as usize;
        page.retain(|e| e.seq <= head.seq);
        let last = page.last().map(|e| (e.seq, e.hash.clone()));
        let end = !full || last.as_ref().is_none_or(|(seq, _)| *seq >= head.seq);
        checked += page.len() as u64;
        let against = if end {
            AuditHead {
                seq: head.seq,
                hash: head.hash.clone(),
                ..from.clone()
            }
        } else {
            let (seq, hash) = last.clone().unwrap_or_default();
            AuditHead {
                seq,
                hash,
                ..from.clone()
            }
        };
        breaks.extend(verify_chain(&against, &page));
        match last {
            Some((seq, hash)) if !end => {
                after = seq;
                from.pruned_seq = seq;
                from.pruned_hash = hash;
            }
            _ => break,
        }
    }
    Ok(ChainCheck {
        head,
        checked,
        breaks,
    })
}
