//! Budgets: daily and monthly spend limits per workspace or API key, kept exact across
//! instances by reserve-then-settle under row locks.
//!
//! A request reserves its maximum cost in every budget that covers it, in one
//! transaction; the reservation is refused if spent + reserved + cost would pass a limit.
//! After the request, the reservation is released and the real cost added — with the
//! `billing.threshold.reached` events of every threshold crossed, in the same
//! transaction, once per period. Periods are UTC days and months; a budget rolls into a
//! new period on its first use in it.

use async_trait::async_trait;
use keel_core::event::Event;
use keel_core::id::{ApiKeyId, WorkspaceId};
use time::OffsetDateTime;

use crate::Result;

/// A budget's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    /// A UTC day.
    Daily,
    /// A UTC calendar month.
    Monthly,
}

impl Period {
    /// Its wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }

    /// Parses `daily` or `monthly`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "daily" => Some(Period::Daily),
            "monthly" => Some(Period::Monthly),
            _ => None,
        }
    }

    /// When the period holding `t` began.
    #[must_use]
    pub fn start(self, t: OffsetDateTime) -> OffsetDateTime {
        let t = t.to_offset(time::UtcOffset::UTC);
        let day = t.replace_time(time::Time::MIDNIGHT);
        match self {
            Period::Daily => day,
            Period::Monthly => day.replace_day(1).unwrap_or(day),
        }
    }

    /// When the period that began at `start` ends.
    #[must_use]
    pub fn end(self, start: OffsetDateTime) -> OffsetDateTime {
        match self {
            Period::Daily => start + time::Duration::DAY,
            Period::Monthly => {
                let (y, m) = (start.year(), start.month());
                let (y, m) = if m == time::Month::December {
                    (y + 1, time::Month::January)
                } else {
                    (y, m.next())
                };
                start
                    .replace_day(1)
                    .and_then(|s| s.replace_month(m))
                    .and_then(|s| s.replace_year(y))
                    .unwrap_or(start + time::Duration::days(31))
            }
        }
    }
}

/// A budget and where its current period stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// The key it covers; `None` for the whole workspace.
    pub key_id: Option<ApiKeyId>,
    /// Daily or monthly.
    pub period: Period,
    /// The limit, in nano-USD.
    pub limit_nanousd: i64,
    /// Percentages of the limit that raise an alert when crossed.
    pub thresholds: Vec<i64>,
    /// When the current period began.
    pub period_start: OffsetDateTime,
    /// Spent this period, in nano-USD.
    pub spent_nanousd: i64,
    /// Reserved by requests in flight, in nano-USD.
    pub reserved_nanousd: i64,
    /// The highest threshold alerted this period.
    pub alerted_percent: i64,
}

impl Budget {
    /// When the current period ends and the budget resets.
    #[must_use]
    pub fn resets_at(&self) -> OffsetDateTime {
        self.period.end(self.period_start)
    }

    /// Its name in messages and events: `workspace daily`, `key key_… monthly`.
    #[must_use]
    pub fn name(&self) -> String {
        match self.key_id {
            None => format!("workspace {}", self.period.as_str()),
            Some(key) => format!("key {key} {}", self.period.as_str()),
        }
    }

    /// Moves the budget into the period holding `now`, if it has passed into a new one:
    /// spend, reservations and alerts start again. (A reservation a crashed process never
    /// settled is so forgotten at the next period at the latest; a request in flight
    /// across the boundary settles its real cost into the new period.)
    pub fn roll(&mut self, now: OffsetDateTime) {
        let current = self.period.start(now);
        if self.period_start < current {
            self.period_start = current;
            self.spent_nanousd = 0;
            self.reserved_nanousd = 0;
            self.alerted_percent = 0;
        }
    }

    /// The thresholds `spent` crosses that have not been alerted this period.
    #[must_use]
    pub fn crossed(&self) -> Vec<i64> {
        if self.limit_nanousd <= 0 {
            return Vec::new();
        }
        let percent = i128::from(self.spent_nanousd) * 100 / i128::from(self.limit_nanousd);
        self.thresholds
            .iter()
            .copied()
            .filter(|t| *t > self.alerted_percent && i128::from(*t) <= percent)
            .collect()
    }
}

/// A budget to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBudget {
    /// The workspace.
    pub workspace_id: WorkspaceId,
    /// The key it covers; `None` for the whole workspace.
    pub key_id: Option<ApiKeyId>,
    /// Daily or monthly.
    pub period: Period,
    /// The limit, in nano-USD.
    pub limit_nanousd: i64,
    /// Alert thresholds, in percent.
    pub thresholds: Vec<i64>,
}

/// One budget period a reservation was made in: settling releases the reservation only
/// there (not in a budget created since, nor in a period that has since rolled over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The budget's key (`None`: the workspace's).
    pub key_id: Option<ApiKeyId>,
    /// Its period.
    pub period: Period,
    /// The period the reservation was made in.
    pub period_start: OffsetDateTime,
}

/// What a reservation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved in every budget covering the request (possibly none), listed.
    Reserved(Vec<Held>),
    /// Refused: this budget would pass its limit. Nothing was reserved anywhere.
    Exceeded(Budget),
}

/// Budget storage.
#[async_trait]
pub trait BudgetStore: Send + Sync {
    /// Sets (or changes) a budget; `NotFound` for a key of another workspace.
    async fn set_budget(&self, budget: &NewBudget) -> Result<Budget>;

    /// Removes a budget; `NotFound` if there is none.
    async fn delete_budget(
        &self,
        workspace: WorkspaceId,
        key: Option<ApiKeyId>,
        period: Period,
    ) -> Result<()>;

    /// A workspace's budgets (its own and its keys'), as of now.
    async fn budgets(&self, workspace: WorkspaceId) -> Result<Vec<Budget>>;

    /// Reserves `amount` nano-USD in every budget covering a request of `key` in
    /// `workspace`, or in none.
    async fn reserve_budget(
        &self,
        workspace: WorkspaceId,
        key: Option<ApiKeyId>,
        amount: i64,
    ) -> Result<Reservation>;

    /// Releases a reservation of `reserved` from the budget periods it was `held` in and
    /// adds the real cost `actual` to every budget covering the request; appends and
    /// returns the `billing.threshold.reached` events of thresholds crossed.
    async fn settle_budget(
        &self,
        workspace: WorkspaceId,
        key: Option<ApiKeyId>,
        held: &[Held],
        reserved: i64,
        actual: i64,
    ) -> Result<Vec<Event>>;
}

pub(crate) fn usd(nano: i64) -> f64 {
    nano as f64 / 1e9
}

/// The event for one threshold crossed.
pub(crate) fn threshold_event(b: &Budget, threshold: i64) -> keel_core::event::NewEvent {
    keel_core::event::NewEvent::new(
        keel_core::event::EventType::BillingThresholdReached,
        b.workspace_id,
        serde_json::json!({
            "budget": b.name(),
            "scope": if b.key_id.is_some() { "key" } else { "workspace" },
            "key_id": b.key_id.map(|k| k.to_string()),
            "period": b.period.as_str(),
            "threshold_percent": threshold,
            "spent_usd": usd(b.spent_nanousd),
            "limit_usd": usd(b.limit_nanousd),
            "period_start": b.period_start.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        }),
    )
}

pub(crate) fn thresholds_text(t: &[i64]) -> String {
    t.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

pub(crate) fn thresholds_parse(s: &str) -> Vec<i64> {
    s.split(',').filter_map(|t| t.trim().parse().ok()).collect()
}

/// Selects a budget row; a `WHERE` follows.
macro_rules! budget_select {
    () => {
        "SELECT workspace_id, key_id, period, limit_nanousd, thresholds, period_start, spent_nanousd, reserved_nanousd, alerted_percent FROM budgets "
    };
}
pub(crate) use budget_select;

/// Stamps [`BudgetStore`] onto a backend (see `sql_store!`); uses its `LOCK_ROWS`.
macro_rules! budget_store {
    ($store:ty, $db:ty) => {
        impl $store {
            fn budget_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::Result<$crate::budgets::Budget> {
                use sqlx::Row as _;
                let key: uuid::Uuid = row.try_get("key_id")?;
                let period: String = row.try_get("period")?;
                let thresholds: String = row.try_get("thresholds")?;
                Ok($crate::budgets::Budget {
                    workspace_id: keel_core::id::WorkspaceId::from_uuid(row.try_get("workspace_id")?),
                    key_id: (!key.is_nil()).then(|| keel_core::id::ApiKeyId::from_uuid(key)),
                    period: $crate::budgets::Period::parse(&period).ok_or_else(|| $crate::Error::Corrupt { what: "budget period", detail: period.clone() })?,
                    limit_nanousd: row.try_get("limit_nanousd")?,
                    thresholds: $crate::budgets::thresholds_parse(&thresholds),
                    period_start: row.try_get("period_start")?,
                    spent_nanousd: row.try_get("spent_nanousd")?,
                    reserved_nanousd: row.try_get("reserved_nanousd")?,
                    alerted_percent: row.try_get("alerted_percent")?,
                })
            }

            /// The budgets covering a request of `key`, locked, in (key, period) order.
            async fn covering_budgets(
                tx: &mut sqlx::Transaction<'_, $db>,
                workspace: keel_core::id::WorkspaceId,
                key: Option<keel_core::id::ApiKeyId>,
            ) -> $crate::Result<Vec<$crate::budgets::Budget>> {
                let key = key.map_or(uuid::Uuid::nil(), |k| k.as_uuid());
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    concat!($crate::budgets::budget_select!(), "WHERE workspace_id = $1 AND key_id IN ($2, $3) ORDER BY key_id, period{}"),
                    Self::LOCK_ROWS
                )))
                .bind(workspace.as_uuid())
                .bind(uuid::Uuid::nil())
                .bind(key)
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(Self::budget_from_row)
                .collect()
            }

            async fn save_budget(tx: &mut sqlx::Transaction<'_, $db>, b: &$crate::budgets::Budget) -> $crate::Result<()> {
                sqlx::query(
                    "UPDATE budgets SET period_start = $4, spent_nanousd = $5, reserved_nanousd = $6, alerted_percent = $7, updated_at = $8 \
                     WHERE workspace_id = $1 AND key_id = $2 AND period = $3",
                )
                .bind(b.workspace_id.as_uuid())
                .bind(b.key_id.map_or(uuid::Uuid::nil(), |k| k.as_uuid()))
                .bind(b.period.as_str())
                .bind(b.period_start)
                .bind(b.spent_nanousd)
                .bind(b.reserved_nanousd)
                .bind(b.alerted_percent)
                .bind($crate::now())
                .execute(&mut **tx)
                .await?;
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::budgets::BudgetStore for $store {
            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn set_budget(&self, b: &$crate::budgets::NewBudget) -> $crate::Result<$crate::budgets::Budget> {
                let mut tx = self.writer.begin().await?;
                if let Some(key) = b.key_id {
                    let found: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM api_keys WHERE id = $1 AND workspace_id = $2")
                        .bind(key.as_uuid())
                        .bind(b.workspace_id.as_uuid())
                        .fetch_optional(&mut *tx)
                        .await?;
                    if found.is_none() {
                        return Err($crate::Error::NotFound { what: "API key" });
                    }
                }
                let now = $crate::now();
                sqlx::query(
                    "INSERT INTO budgets (workspace_id, key_id, period, limit_nanousd, thresholds, period_start, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (workspace_id, key_id, period) DO UPDATE \
                     SET limit_nanousd = excluded.limit_nanousd, thresholds = excluded.thresholds, updated_at = excluded.updated_at",
                )
                .bind(b.workspace_id.as_uuid())
                .bind(b.key_id.map_or(uuid::Uuid::nil(), |k| k.as_uuid()))
                .bind(b.period.as_str())
                .bind(b.limit_nanousd)
                .bind($crate::budgets::thresholds_text(&b.thresholds))
                .bind(b.period.start(now))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let row = sqlx::query(concat!($crate::budgets::budget_select!(), "WHERE workspace_id = $1 AND key_id = $2 AND period = $3"))
                .bind(b.workspace_id.as_uuid())
                .bind(b.key_id.map_or(uuid::Uuid::nil(), |k| k.as_uuid()))
                .bind(b.period.as_str())
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                let mut budget = Self::budget_from_row(&row)?;
                budget.roll(now);
                Ok(budget)
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn delete_budget(&self, workspace: keel_core::id::WorkspaceId, key: Option<keel_core::id::ApiKeyId>, period: $crate::budgets::Period) -> $crate::Result<()> {
                let done = sqlx::query("DELETE FROM budgets WHERE workspace_id = $1 AND key_id = $2 AND period = $3")
                    .bind(workspace.as_uuid())
                    .bind(key.map_or(uuid::Uuid::nil(), |k| k.as_uuid()))
                    .bind(period.as_str())
                    .execute(&self.writer)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::Error::NotFound { what: "budget" });
                }
                Ok(())
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn budgets(&self, workspace: keel_core::id::WorkspaceId) -> $crate::Result<Vec<$crate::budgets::Budget>> {
                let now = $crate::now();
                sqlx::query(concat!($crate::budgets::budget_select!(), "WHERE workspace_id = $1 ORDER BY key_id, period"))
                .bind(workspace.as_uuid())
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    let mut b = Self::budget_from_row(r)?;
                    b.roll(now);
                    Ok(b)
                })
                .collect()
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn reserve_budget(
                &self,
                workspace: keel_core::id::WorkspaceId,
                key: Option<keel_core::id::ApiKeyId>,
                amount: i64,
            ) -> $crate::Result<$crate::budgets::Reservation> {
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let mut budgets = Self::covering_budgets(&mut tx, workspace, key).await?;
                for b in &mut budgets {
                    b.roll(now);
                    if b.spent_nanousd.saturating_add(b.reserved_nanousd).saturating_add(amount) > b.limit_nanousd {
                        // Nothing reserved: the transaction is dropped (rolled back).
                        return Ok($crate::budgets::Reservation::Exceeded(b.clone()));
                    }
                }
                let mut held = Vec::with_capacity(budgets.len());
                for b in &mut budgets {
                    b.reserved_nanousd = b.reserved_nanousd.saturating_add(amount);
                    Self::save_budget(&mut tx, b).await?;
                    held.push($crate::budgets::Held { key_id: b.key_id, period: b.period, period_start: b.period_start });
                }
                tx.commit().await?;
                Ok($crate::budgets::Reservation::Reserved(held))
            }

            #[tracing::instrument(skip_all, fields(db.system = %Self::BACKEND))]
            async fn settle_budget(
                &self,
                workspace: keel_core::id::WorkspaceId,
                key: Option<keel_core::id::ApiKeyId>,
                held: &[$crate::budgets::Held],
                reserved: i64,
                actual: i64,
            ) -> $crate::Result<Vec<keel_core::event::Event>> {
                let now = $crate::now();
                let mut tx = self.writer.begin().await?;
                let mut budgets = Self::covering_budgets(&mut tx, workspace, key).await?;
                let mut events = Vec::new();
                for b in &mut budgets {
                    b.roll(now);
                    let was_held = held.iter().any(|h| h.key_id == b.key_id && h.period == b.period && h.period_start == b.period_start);
                    if was_held {
                        b.reserved_nanousd = (b.reserved_nanousd - reserved).max(0);
                    }
                    b.spent_nanousd = b.spent_nanousd.saturating_add(actual.max(0));
                    for t in b.crossed() {
                        events.push($crate::budgets::threshold_event(b, t));
                        b.alerted_percent = t;
                    }
                    Self::save_budget(&mut tx, b).await?;
                }
                let committed = Self::append_events_tx(&mut tx, &events).await?;
                tx.commit().await?;
                Ok(committed)
            }
        }
    };
}
pub(crate) use budget_store;

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn periods_start_and_end_on_utc_days_and_months() {
        let t = datetime!(2026-12-31 23:59:59 UTC);
        assert_eq!(Period::Daily.start(t), datetime!(2026-12-31 0:00 UTC));
        assert_eq!(
            Period::Daily.end(Period::Daily.start(t)),
            datetime!(2027-01-01 0:00 UTC)
        );
        assert_eq!(Period::Monthly.start(t), datetime!(2026-12-01 0:00 UTC));
        assert_eq!(
            Period::Monthly.end(Period::Monthly.start(t)),
            datetime!(2027-01-01 0:00 UTC)
        );
        assert_eq!(
            Period::Monthly.end(datetime!(2027-01-01 0:00 UTC)),
            datetime!(2027-02-01 0:00 UTC)
        );
        assert_eq!(
            Period::Monthly.start(datetime!(2026-03-15 12:00 +2)),
            datetime!(2026-03-01 0:00 UTC)
        );
    }

    #[test]
    fn thresholds_fire_once_each_per_period() {
        let mut b = Budget {
            workspace_id: WorkspaceId::new(),
            key_id: None,
            period: Period::Daily,
            limit_nanousd: 1000,
            thresholds: vec![50, 80, 100],
            period_start: datetime!(2026-11-29 0:00 UTC),
            spent_nanousd: 850,
            reserved_nanousd: 0,
            alerted_percent: 0,
        };
        assert_eq!(b.crossed(), vec![50, 80]);
        b.alerted_percent = 80;
        assert_eq!(b.crossed(), Vec::<i64>::new());
        b.spent_nanousd = 1000;
        assert_eq!(b.crossed(), vec![100]);
        b.reserved_nanousd = 70;
        b.roll(datetime!(2026-11-30 0:00:01 UTC));
        assert_eq!(
            (b.spent_nanousd, b.reserved_nanousd, b.alerted_percent),
            (0, 0, 0)
        );
        assert_eq!(b.resets_at(), datetime!(2026-12-01 0:00 UTC));
    }
}
