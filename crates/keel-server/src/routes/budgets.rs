//! Budgets: daily and monthly USD limits on a workspace's spend, or one API key's. Past
//! one, gateway requests get 402 naming the budget and when it resets; thresholds raise
//! `billing.threshold.reached` events once per period.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_core::auth::Principal;
use keel_core::id::ApiKeyId;
use keel_store::budgets::{Budget, NewBudget, Period};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::audit::{self, Action};
use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::AppJson;

/// A budget and its current period.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BudgetView {
    /// The key it covers (`key_…`); absent for the whole workspace.
    key_id: Option<String>,
    /// `daily` or `monthly` (UTC).
    period: String,
    /// The limit, in USD.
    limit_usd: f64,
    /// Alert thresholds, in percent of the limit.
    thresholds: Vec<i64>,
    /// Spent this period, in USD.
    spent_usd: f64,
    /// Reserved by requests in flight, in USD.
    reserved_usd: f64,
    /// When this period began (RFC 3339).
    #[schema(format = DateTime)]
    period_start: String,
    /// When it resets (RFC 3339).
    #[schema(format = DateTime)]
    resets_at: String,
}

impl From<Budget> for BudgetView {
    fn from(b: Budget) -> Self {
        let usd = |n: i64| n as f64 / 1e9;
        Self {
            key_id: b.key_id.map(|k| k.to_string()),
            period: b.period.as_str().to_owned(),
            limit_usd: usd(b.limit_nanousd),
            thresholds: b.thresholds.clone(),
            spent_usd: usd(b.spent_nanousd),
            reserved_usd: usd(b.reserved_nanousd),
            period_start: super::rfc3339(b.period_start),
            resets_at: super::rfc3339(b.resets_at()),
        }
    }
}

/// A budget to set.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetBudget {
    /// `daily` or `monthly`.
    period: String,
    /// The limit in USD (0 or more; 0 refuses every priced request).
    limit_usd: f64,
    /// Limit one key (`key_…`) instead of the whole workspace.
    #[serde(default)]
    key_id: Option<String>,
    /// Alert thresholds in percent, 1 to 1000 (default 50, 80, 100).
    #[serde(default)]
    thresholds: Option<Vec<i64>>,
}

/// Which budget.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct WhichBudget {
    /// `daily` or `monthly`.
    period: String,
    /// The key's budget (`key_…`); absent for the workspace's.
    key_id: Option<String>,
}

fn period(s: &str) -> Result<Period, ApiError> {
    Period::parse(s)
        .ok_or_else(|| ApiError::bad_request(format!("period must be daily or monthly, not {s:?}")))
}

fn key(s: Option<&str>) -> Result<Option<ApiKeyId>, ApiError> {
    s.map(|k| {
        k.parse()
            .map_err(|e: keel_core::Error| ApiError::bad_request(format!("key_id: {e}")))
    })
    .transpose()
}

/// The workspace's budgets and their spend this period. Requires role: admin.
#[utoipa::path(get, path = "/v1/budgets", tag = super::BUDGETS,
    responses((status = 200, description = "The budgets", body = super::List<BudgetView>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<super::List<BudgetView>>, ApiError> {
    let budgets = state.store().budgets(principal.workspace_id).await?;
    Ok(Json(super::List {
        data: budgets.into_iter().map(BudgetView::from).collect(),
    }))
}

/// Sets a budget (or changes its limit and thresholds; spend this period is kept).
/// Requires role: admin.
#[utoipa::path(put, path = "/v1/budgets", tag = super::BUDGETS, request_body = SetBudget,
    responses(
        (status = 200, description = "The budget", body = BudgetView),
        (status = 400, description = "A bad period, limit or threshold, named", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key in this workspace", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn set(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    AppJson(body): AppJson<SetBudget>,
) -> Result<Json<BudgetView>, ApiError> {
    let period = period(&body.period)?;
    if !(body.limit_usd.is_finite() && (0.0..=1e9).contains(&body.limit_usd)) {
        return Err(ApiError::bad_request(
            "limit_usd must be between 0 and 1000000000",
        ));
    }
    let thresholds = body.thresholds.unwrap_or_else(|| vec![50, 80, 100]);
    if thresholds.iter().any(|t| !(1..=1000).contains(t)) {
        return Err(ApiError::bad_request(
            "thresholds must each be between 1 and 1000 (percent)",
        ));
    }
    let mut thresholds = thresholds;
    thresholds.sort_unstable();
    thresholds.dedup();
    let new = NewBudget {
        workspace_id: principal.workspace_id,
        key_id: key(body.key_id.as_deref())?,
        period,
        limit_nanousd: (body.limit_usd * 1e9).round() as i64,
        thresholds,
    };
    let budget = state.store().set_budget(&new).await?;
    state.limits_cache().forget(&principal.workspace_id);
    let data = serde_json::json!({"period": period.as_str(), "limit_usd": body.limit_usd, "key_id": body.key_id, "thresholds": new.thresholds});
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("budget.set", budget.name()).data(data),
    )
    .await;
    Ok(Json(budget.into()))
}

/// Removes a budget. Requires role: admin.
#[utoipa::path(delete, path = "/v1/budgets", tag = super::BUDGETS,
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such budget", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    Query(q): Query<WhichBudget>,
) -> Result<StatusCode, ApiError> {
    let period = period(&q.period)?;
    let key_id = key(q.key_id.as_deref())?;
    state
        .store()
        .delete_budget(principal.workspace_id, key_id, period)
        .await?;
    state.limits_cache().forget(&principal.workspace_id);
    let data = serde_json::json!({"period": period.as_str(), "key_id": q.key_id});
    audit::record(
        &state,
        &principal,
        &caller,
        Action::new("budget.deleted", period.as_str()).data(data),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
