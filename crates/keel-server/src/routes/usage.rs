//! GET /v1/usage: the workspace's LLM usage and cost, summed and grouped, as JSON or CSV.

use axum::Extension;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use keel_core::auth::Principal;
use keel_store::GroupBy;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::{ApiError, Problem};

/// Query parameters of GET /v1/usage.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct UsageQuery {
    /// Start, inclusive (RFC 3339). Default: 30 days before `to`.
    from: Option<String>,
    /// End, exclusive (RFC 3339). Default: now.
    to: Option<String>,
    /// `route` (default), `key`, `model` or `day`.
    group_by: Option<String>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

/// One group of usage.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageGroup {
    /// The route, key id, upstream model or day.
    group: String,
    /// Requests.
    requests: u64,
    /// Prompt tokens.
    input_tokens: u64,
    /// Completion tokens.
    output_tokens: u64,
    /// Prompt tokens served from a cache (Keel's response cache, or the provider's prompt
    /// cache at its cached price); part of `input_tokens`.
    cached_tokens: u64,
    /// Cost in USD.
    cost_usd: f64,
    /// Cost in nano-USD (exact).
    cost_nanousd: u64,
    /// Requests served from Keel's cache.
    cache_hits: u64,
    /// Requests that failed.
    errors: u64,
}

/// A usage summary.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageSummary {
    /// Start (RFC 3339).
    from: String,
    /// End (RFC 3339).
    to: String,
    /// The grouping.
    group_by: String,
    /// The groups, ordered.
    data: Vec<UsageGroup>,
}

fn parse_time(name: &str, value: &str) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::parse(value, &Rfc3339).map_err(|e| {
        ApiError::bad_request(format!(
            "{name}: expected an RFC 3339 time such as 2026-11-01T00:00:00Z ({e})"
        ))
    })
}

/// Usage and cost of the caller's workspace, grouped by route, key, upstream model or
/// day. Requires role: viewer.
#[utoipa::path(get, path = "/v1/usage", tag = super::GATEWAY, security(("api_key" = [])),
    responses(
        (status = 200, description = "The summary (JSON, or CSV with format=csv)", body = UsageSummary),
        (status = 400, description = "A bad parameter, named", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    let to = match &query.to {
        Some(v) => parse_time("to", v)?,
        None => OffsetDateTime::now_utc(),
    };
    let from = match &query.from {
        Some(v) => parse_time("from", v)?,
        None => to - time::Duration::days(30),
    };
    if from >= to {
        return Err(ApiError::bad_request("from: must be before to"));
    }
    let (group_by, group_name) = match query.group_by.as_deref().unwrap_or("route") {
        "route" => (GroupBy::Route, "route"),
        "key" => (GroupBy::Key, "key"),
        "model" => (GroupBy::Model, "model"),
        "day" => (GroupBy::Day, "day"),
        other => {
            return Err(ApiError::bad_request(format!(
                "group_by: expected route, key, model or day, got {other:?}"
            )));
        }
    };
    let csv = match query.format.as_deref().unwrap_or("json") {
        "json" => false,
        "csv" => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "format: expected json or csv, got {other:?}"
            )));
        }
    };
    let rows = state
        .store()
        .usage_summary(principal.workspace_id, from, to, group_by)
        .await?;
    let data: Vec<UsageGroup> = rows
        .into_iter()
        .map(|r| UsageGroup {
            group: r.group,
            requests: r.requests,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cached_tokens: r.cached_tokens,
            cost_usd: r.cost_nanousd as f64 / 1e9,
            cost_nanousd: r.cost_nanousd,
            cache_hits: r.cache_hits,
            errors: r.errors,
        })
        .collect();
    if csv {
        let mut out = format!(
            "{group_name},requests,input_tokens,output_tokens,cached_tokens,cost_usd,cache_hits,errors\n"
        );
        for g in &data {
            out.push_str(&format!(
                "{},{},{},{},{},{:.9},{},{}\n",
                csv_field(&g.group),
                g.requests,
                g.input_tokens,
                g.output_tokens,
                g.cached_tokens,
                g.cost_usd,
                g.cache_hits,
                g.errors
            ));
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response());
    }
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    Ok(Json(UsageSummary {
        from: fmt(from),
        to: fmt(to),
        group_by: group_name.to_owned(),
        data,
    })
    .into_response())
}

/// Quotes a CSV field when it needs it (RFC 4180), and defuses spreadsheet formulas.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) && value != "-" {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("default"), "default");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-"), "-");
    }
}
