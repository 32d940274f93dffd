//! The storage conformance suite: every test here runs against SQLite and Postgres alike
//! (a fresh file or a fresh database each), so both backends keep one behaviour.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::Arc;

use keel_core::auth::{ApiKeyToken, KeyName, Role};
use keel_core::config::Config;
use keel_core::event::{EventType, NewEvent};
use keel_core::id::{AgentId, RunId, TaskId};
use keel_core::id::{ApiKeyId, WorkspaceId};
use keel_core::workspace::WorkspaceName;
use keel_store::{Commit, Error, EventHead, GroupBy, NewApiKey, Store, UsageRecord, UsageRow};

struct Fixture {
    store: Arc<dyn Store>,
    config: Config,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Option<Fixture> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.data_dir = dir.path().join("nested").join("data");
    Some(open(config, Some(dir)).await)
}

async fn postgres() -> Option<Fixture> {
    let url = keel_store::testing::fresh_postgres_db().await.unwrap()?;
    let mut config = Config::default();
    config.database.url = Some(url.into());
    Some(open(config, None).await)
}

async fn open(config: Config, dir: Option<tempfile::TempDir>) -> Fixture {
    let store = keel_store::open(&config).await.unwrap();
    let state = store.migrate().await.unwrap();
    assert!(state.is_current(), "{state:?}");
    Fixture {
        store,
        config,
        _dir: dir,
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                let f = super::sqlite().await.unwrap();
                super::$test(&f).await;
                f.store.close().await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $test() {
                let Some(f) = super::postgres().await else { return };
                super::$test(&f).await;
                f.store.close().await;
            })*
        }
    };
}

conformance!(
    fresh_database_migrates_to_the_binary_schema,
    migrate_is_idempotent_and_reopen_keeps_data,
    a_database_newer_than_the_binary_is_refused,
    workspaces_are_unique_by_name,
    ensure_workspace_creates_once,
    unknown_workspaces_are_not_found,
    keys_authenticate_until_revoked,
    keys_are_scoped_to_their_workspace,
    duplicate_key_hashes_conflict,
    usage_is_summed_by_each_grouping_within_the_window,
    usage_batches_larger_than_one_statement_are_stored_whole,
    events_are_numbered_per_workspace_without_gaps,
    concurrent_appends_never_share_or_skip_a_seq,
    events_round_trip_every_field,
    pruning_removes_a_prefix_and_records_it,
    postgres_announces_commits_to_listeners,
    webhooks_are_scoped_leased_and_log_their_deliveries,
    exporters_lease_and_track_a_cursor_per_workspace,
    agents_are_versioned_and_scoped,
    claims_are_exclusive_and_checkpoints_are_fenced_by_the_lease,
    a_failed_checkpoint_batch_stores_nothing_of_any_run,
    a_claim_on_postgres_says_whether_the_thread_is_empty,
    one_batch_starts_steps_and_finishes_many_runs_as_each_alone_would,
    a_batch_longer_than_one_prepared_statement_is_stored_whole,
    the_queue_orders_by_priority_then_fairly_across_workspaces,
    idempotency_keys_and_the_queue_bound_hold,
    cancel_and_input_follow_the_task_state,
    keys_expire_and_carry_scopes_and_models,
    users_belong_to_workspaces_with_a_role,
    refresh_tokens_rotate_and_a_replay_revokes_the_session,
    the_audit_log_chains_and_verify_finds_edits_and_deletions,
    audit_retention_moves_the_anchor_and_the_chain_still_verifies,
    workspace_limits_are_stored_per_workspace,
    budgets_reserve_exactly_and_alert_once_per_threshold,
    claims_respect_each_agents_concurrency_limit,
    agent_stats_count_every_task_of_the_agent,
    the_last_error_is_the_latest_recorded_not_the_latest_touched,
    task_counts_are_of_the_live_statuses_only,
    concurrent_creations_with_one_key_make_one_task,
    a_refused_creation_leaves_the_others_made_with_it,
);

fn name(s: &str) -> WorkspaceName {
    WorkspaceName::parse(s).unwrap()
}

fn new_key(workspace_id: WorkspaceId, role: Role) -> (ApiKeyToken, NewApiKey) {
    let token = ApiKeyToken::generate().unwrap();
    let key = NewApiKey {
        workspace_id,
        name: Some(KeyName::parse("ci key").unwrap()),
        role,
        prefix: token.prefix(),
        hash: token.hash(),
        expires_at: None,
        scopes: keel_core::auth::Scopes::ALL,
        models: None,
        tier: None,
    };
    (token, key)
}

async fn fresh_database_migrates_to_the_binary_schema(f: &Fixture) {
    let state = f.store.schema_state().await.unwrap();
    assert!(state.binary >= 1);
    assert_eq!(state.database, state.binary);
}

async fn migrate_is_idempotent_and_reopen_keeps_data(f: &Fixture) {
    let ws = f.store.create_workspace(&name("keep")).await.unwrap();
    assert!(f.store.migrate().await.unwrap().is_current());
    let reopened = keel_store::open(&f.config).await.unwrap();
    assert_eq!(reopened.workspace(ws.id).await.unwrap(), ws);
    reopened.close().await;
}

async fn a_database_newer_than_the_binary_is_refused(f: &Fixture) {
    let binary = f.store.schema_state().await.unwrap().binary;
    let future = binary + 1;
    // Record a migration this binary does not have, as a newer Keel would.
    match f.store.backend() {
        keel_store::Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect_with(
                sqlx::sqlite::SqliteConnectOptions::new().filename(f.config.sqlite_path()),
            )
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES ($1, 'from the future', TRUE, x'00', 0)",
            )
            .bind(future)
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        keel_store::Backend::Postgres => {
            use secrecy::ExposeSecret;
            let url = f
                .config
                .database
                .url
                .as_ref()
                .unwrap()
                .expose_secret()
                .to_owned();
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES ($1, 'from the future', TRUE, '\\x00', 0)",
            )
            .bind(future)
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
    }
    let err = keel_store::open(&f.config).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { database, binary: b } if database == future && b == binary),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this binary"), "{err}");
    let err = f.store.migrate().await.unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { .. }), "{err}");
    assert!(!f.store.schema_state().await.unwrap().is_current());
}

async fn workspaces_are_unique_by_name(f: &Fixture) {
    let ws = f.store.create_workspace(&name("acme")).await.unwrap();
    assert_eq!(ws.name.as_str(), "acme");
    let err = f.store.create_workspace(&name("acme")).await.unwrap_err();
    assert!(
        matches!(err, Error::Conflict { what: "workspace" }),
        "{err}"
    );
    assert_eq!(
        f.store.workspace(ws.id).await.unwrap(),
        ws,
        "timestamps round-trip exactly"
    );
    assert_eq!(f.store.workspace_by_name(&name("acme")).await.unwrap(), ws);
}

async fn ensure_workspace_creates_once(f: &Fixture) {
    let a = f.store.ensure_workspace(&name("team")).await.unwrap();
    let b = f.store.ensure_workspace(&name("team")).await.unwrap();
    assert_eq!(a, b);
    let race = name("race");
    let (x, y) = tokio::join!(
        f.store.ensure_workspace(&race),
        f.store.ensure_workspace(&race)
    );
    assert_eq!(x.unwrap().id, y.unwrap().id);
}

async fn unknown_workspaces_are_not_found(f: &Fixture) {
    let err = f.store.workspace(WorkspaceId::new()).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { what: "workspace" }),
        "{err}"
    );
    let err = f.store.workspace_by_name(&name("ghost")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

async fn keys_authenticate_until_revoked(f: &Fixture) {
    let ws = f.store.create_workspace(&name("keys")).await.unwrap();
    let (token, new) = new_key(ws.id, Role::Member);
    let key = f.store.create_api_key(new).await.unwrap();
    assert_eq!(key.prefix, token.prefix());
    assert_eq!(key.role, Role::Member);
    assert!(key.revoked_at.is_none());

    let principal = f.store.authenticate(&token.hash()).await.unwrap().unwrap();
    assert_eq!(
        (principal.workspace_id, principal.key_id, principal.role),
        (ws.id, Some(key.id), Role::Member)
    );

    let other = ApiKeyToken::generate().unwrap();
    assert!(f.store.authenticate(&other.hash()).await.unwrap().is_none());

    let revoked = f.store.revoke_api_key(ws.id, key.id).await.unwrap();
    let revoked_at = revoked.revoked_at.unwrap();
    assert!(f.store.authenticate(&token.hash()).await.unwrap().is_none());
    let again = f.store.revoke_api_key(ws.id, key.id).await.unwrap();
    assert_eq!(
        again.revoked_at,
        Some(revoked_at),
        "revoking twice keeps the first time"
    );

    let listed = f.store.list_api_keys(ws.id).await.unwrap();
    assert_eq!(listed, vec![again]);
}

async fn keys_are_scoped_to_their_workspace(f: &Fixture) {
    let a = f.store.create_workspace(&name("alpha")).await.unwrap();
    let b = f.store.create_workspace(&name("beta")).await.unwrap();
    let (_, ka) = new_key(a.id, Role::Admin);
    let (tb, kb) = new_key(b.id, Role::Viewer);
    let ka = f.store.create_api_key(ka).await.unwrap();
    let kb = f.store.create_api_key(kb).await.unwrap();
    let (_, ka2) = new_key(a.id, Role::Viewer);
    let ka2 = f.store.create_api_key(ka2).await.unwrap();

    let listed: Vec<ApiKeyId> = f
        .store
        .list_api_keys(a.id)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(
        listed,
        vec![ka.id, ka2.id],
        "only alpha's keys, oldest first"
    );

    let err = f.store.revoke_api_key(a.id, kb.id).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { what: "API key" }), "{err}");
    assert!(
        f.store.authenticate(&tb.hash()).await.unwrap().is_some(),
        "beta's key untouched"
    );
}

async fn duplicate_key_hashes_conflict(f: &Fixture) {
    let ws = f.store.create_workspace(&name("dup")).await.unwrap();
    let (_, key) = new_key(ws.id, Role::Admin);
    f.store.create_api_key(key.clone()).await.unwrap();
    let err = f.store.create_api_key(key).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { what: "API key" }), "{err}");
}

fn usage(
    ws: WorkspaceId,
    key: Option<ApiKeyId>,
    route: &str,
    model: &str,
    at: time::OffsetDateTime,
) -> UsageRecord {
    UsageRecord {
        workspace_id: ws,
        api_key_id: key,
        route: route.to_owned(),
        provider: "openai".to_owned(),
        upstream_model: model.to_owned(),
        target: format!("openai/{model}"),
        input_tokens: 10,
        output_tokens: 5,
        cached_tokens: 0,
        cost_nanousd: 1_500,
        latency_ms: 12,
        ttft_ms: None,
        cache_hit: false,
        estimated: false,
        outcome: "ok".to_owned(),
        created_at: at,
    }
}

async fn usage_is_summed_by_each_grouping_within_the_window(f: &Fixture) {
    use time::macros::datetime;
    let ws = f.store.create_workspace(&name("billing")).await.unwrap();
    let other = f.store.create_workspace(&name("elsewhere")).await.unwrap();
    let (_, k) = new_key(ws.id, Role::Member);
    let key = f.store.create_api_key(k).await.unwrap();
    let day1 = datetime!(2026-11-20 10:00:00.123456 UTC);
    let day2 = datetime!(2026-11-21 23:59:59 UTC);
    let mut failed = usage(ws.id, None, "fast", "mini", day2);
    failed.outcome = "server".to_owned();
    failed.output_tokens = 0;
    failed.cost_nanousd = 0;
    let mut hit = usage(ws.id, Some(key.id), "fast", "mini", day2);
    hit.cache_hit = true;
    hit.cached_tokens = 10;
    let records = vec![
        usage(ws.id, Some(key.id), "default", "gpt-x", day1),
        usage(ws.id, Some(key.id), "default", "gpt-x", day2),
        hit,
        failed,
        usage(other.id, None, "default", "gpt-x", day1),
        usage(
            ws.id,
            None,
            "default",
            "gpt-x",
            datetime!(2026-11-25 00:00:00 UTC),
        ),
    ];
    f.store.insert_usage(&records).await.unwrap();

    let from = datetime!(2026-11-20 00:00:00 UTC);
    let to = datetime!(2026-11-22 00:00:00 UTC);
    let by_route = f
        .store
        .usage_summary(ws.id, from, to, GroupBy::Route)
        .await
        .unwrap();
    assert_eq!(by_route.len(), 2, "{by_route:?}");
    assert_eq!(
        by_route[0],
        UsageRow {
            group: "default".into(),
            requests: 2,
            input_tokens: 20,
            output_tokens: 10,
            cached_tokens: 0,
            cost_nanousd: 3_000,
            cache_hits: 0,
            errors: 0
        }
    );
    assert_eq!(
        by_route[1],
        UsageRow {
            group: "fast".into(),
            requests: 2,
            input_tokens: 20,
            output_tokens: 5,
            cached_tokens: 10,
            cost_nanousd: 1_500,
            cache_hits: 1,
            errors: 1
        }
    );

    let by_day = f
        .store
        .usage_summary(ws.id, from, to, GroupBy::Day)
        .await
        .unwrap();
    let days: Vec<(&str, u64)> = by_day
        .iter()
        .map(|r| (r.group.as_str(), r.requests))
        .collect();
    assert_eq!(days, vec![("2026-11-20", 1), ("2026-11-21", 3)]);

    let by_key = f
        .store
        .usage_summary(ws.id, from, to, GroupBy::Key)
        .await
        .unwrap();
    let keys: Vec<(String, u64)> = by_key
        .iter()
        .map(|r| (r.group.clone(), r.requests))
        .collect();
    let mut expected = vec![(key.id.to_string(), 3), ("-".to_owned(), 1)];
    expected.sort();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort();
    assert_eq!(keys_sorted, expected);

    let by_model = f
        .store
        .usage_summary(ws.id, from, to, GroupBy::Model)
        .await
        .unwrap();
    assert_eq!(
        by_model
            .iter()
            .map(|r| r.group.as_str())
            .collect::<Vec<_>>(),
        vec!["gpt-x", "mini"]
    );

    let theirs = f
        .store
        .usage_summary(other.id, from, to, GroupBy::Route)
        .await
        .unwrap();
    assert_eq!(theirs.len(), 1, "another workspace sees only its own");
    assert_eq!(theirs[0].requests, 1);
}

/// A workspace's usage by route within an hour either side of `at`.
async fn usage_by_route_around(
    f: &Fixture,
    ws: WorkspaceId,
    at: time::OffsetDateTime,
) -> Vec<UsageRow> {
    f.store
        .usage_summary(
            ws,
            at - time::Duration::hours(1),
            at + time::Duration::hours(1),
            GroupBy::Route,
        )
        .await
        .unwrap()
}

async fn usage_batches_larger_than_one_statement_are_stored_whole(f: &Fixture) {
    let ws = f.store.create_workspace(&name("bulk")).await.unwrap();
    let at = time::OffsetDateTime::now_utc();
    let records: Vec<UsageRecord> = (0..1_234)
        .map(|_| usage(ws.id, None, "r", "m", at))
        .collect();
    f.store.insert_usage(&records).await.unwrap();
    let rows = usage_by_route_around(f, ws.id, at).await;
    assert_eq!(rows[0].requests, 1_234);
    assert_eq!(rows[0].cost_nanousd, 1_234 * 1_500);
}

fn ping(workspace: WorkspaceId, n: usize) -> NewEvent {
    NewEvent::new(
        EventType::SystemPing,
        workspace,
        serde_json::json!({ "message": n.to_string() }),
    )
}

async fn events_are_numbered_per_workspace_without_gaps(f: &Fixture) {
    let a = f.store.create_workspace(&name("a")).await.unwrap().id;
    let b = f.store.create_workspace(&name("b")).await.unwrap().id;
    assert_eq!(f.store.event_head(a).await.unwrap(), EventHead::default());
    // Interleaved in one batch: each workspace still numbers its own from 1.
    let batch: Vec<NewEvent> = (0..6)
        .map(|i| ping(if i % 2 == 0 { a } else { b }, i))
        .collect();
    let committed = f.store.append_events(&batch).await.unwrap();
    assert_eq!(committed.len(), 6);
    for ws in [a, b] {
        let seqs: Vec<i64> = committed
            .iter()
            .filter(|e| e.workspace_id == ws)
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }
    let more = f.store.append_events(&[ping(a, 6)]).await.unwrap();
    assert_eq!(more[0].seq, 4);
    assert_eq!(
        f.store.event_head(a).await.unwrap(),
        EventHead {
            last_seq: 4,
            pruned_through: 0
        }
    );
    assert_eq!(f.store.event_head(b).await.unwrap().last_seq, 3);

    let read = f.store.events_after(a, 1, 2).await.unwrap();
    assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(
        read[0].data["message"], "2",
        "order within a workspace is the batch's order"
    );
    assert!(f.store.events_after(a, 4, 10).await.unwrap().is_empty());
    assert!(
        f.store
            .events_after(WorkspaceId::new(), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // One append larger than a statement's share (500 events of a workspace): still
    // numbered in order, without a gap, in one transaction.
    let big: Vec<NewEvent> = (0..1_100)
        .map(|i| ping(if i % 22 == 0 { b } else { a }, i))
        .collect();
    let committed = f.store.append_events(&big).await.unwrap();
    let seqs = |ws| -> Vec<i64> {
        committed
            .iter()
            .filter(|e| e.workspace_id == ws)
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(seqs(a), (5..=1_054).collect::<Vec<_>>());
    assert_eq!(seqs(b), (4..=53).collect::<Vec<_>>());
    let stored = f.store.events_after(a, 4, 2_000).await.unwrap();
    assert_eq!(stored.len(), 1_050);
    for (e, c) in stored
        .iter()
        .zip(committed.iter().filter(|e| e.workspace_id == a))
    {
        assert_eq!((e.seq, e.event_id), (c.seq, c.event_id));
    }
}

async fn concurrent_appends_never_share_or_skip_a_seq(f: &Fixture) {
    let ws = f.store.create_workspace(&name("busy")).await.unwrap().id;
    let mut handles = Vec::new();
    for writer in 0..8 {
        let store = f.store.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..10 {
                store
                    .append_events(&[ping(ws, writer * 100 + i), ping(ws, writer * 100 + i)])
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let all = f.store.events_after(ws, 0, 1000).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=160).collect::<Vec<_>>()
    );
    // A batch's two events are adjacent: nobody else's append landed between them.
    for pair in all.chunks(2) {
        assert_eq!(pair[0].data, pair[1].data);
    }
}

async fn events_round_trip_every_field(f: &Fixture) {
    let ws = f.store.create_workspace(&name("full")).await.unwrap().id;
    let mut event = NewEvent::new(
        EventType::ToolCall,
        ws,
        serde_json::json!({ "tool": "search", "call_id": "c1", "arguments": { "q": "ü", "n": [1, 2.5, null] } }),
    )
    .correlated(Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned()));
    event.agent_id = Some(AgentId::new());
    event.task_id = Some(TaskId::new());
    event.run_id = Some(RunId::new());
    let committed = f
        .store
        .append_events(std::slice::from_ref(&event))
        .await
        .unwrap();
    let read = f.store.events_after(ws, 0, 10).await.unwrap();
    assert_eq!(read, committed);
    let e = &read[0];
    assert_eq!(e.event_type, "tool.call");
    assert_eq!(e.version, "1.0");
    assert_eq!(
        (e.agent_id, e.task_id, e.run_id),
        (event.agent_id, event.task_id, event.run_id)
    );
    assert_eq!(e.data, event.data);
}

async fn pruning_removes_a_prefix_and_records_it(f: &Fixture) {
    let ws = f.store.create_workspace(&name("old")).await.unwrap().id;
    let other = f.store.create_workspace(&name("new")).await.unwrap().id;
    f.store
        .append_events(&[ping(ws, 1), ping(ws, 2), ping(other, 1)])
        .await
        .unwrap();
    let cutoff = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    f.store.append_events(&[ping(ws, 3)]).await.unwrap();
    assert_eq!(f.store.prune_events(cutoff).await.unwrap(), 3);
    assert_eq!(
        f.store.event_head(ws).await.unwrap(),
        EventHead {
            last_seq: 3,
            pruned_through: 2
        }
    );
    assert_eq!(f.store.event_head(ws).await.unwrap().oldest_held(), 3);
    assert_eq!(
        f.store.event_head(other).await.unwrap(),
        EventHead {
            last_seq: 1,
            pruned_through: 1
        }
    );
    let left = f.store.events_after(ws, 0, 10).await.unwrap();
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    // Nothing older is left: a second pass removes nothing, and new appends continue the seq.
    assert_eq!(f.store.prune_events(cutoff).await.unwrap(), 0);
    assert_eq!(
        f.store.append_events(&[ping(other, 2)]).await.unwrap()[0].seq,
        2
    );
}

async fn postgres_announces_commits_to_listeners(f: &Fixture) {
    use futures_util::StreamExt as _;
    let listener = f.store.listen_commits().await.unwrap();
    let Some(mut commits) = listener else {
        assert_eq!(f.store.backend(), keel_store::Backend::Sqlite);
        return;
    };
    let ws = f.store.create_workspace(&name("loud")).await.unwrap().id;
    f.store
        .append_events(&[ping(ws, 1), ping(ws, 2)])
        .await
        .unwrap();
    let commit = tokio::time::timeout(std::time::Duration::from_secs(5), commits.next())
        .await
        .unwrap();
    assert_eq!(
        commit,
        Some(Commit::Appended {
            workspace_id: ws,
            last_seq: 2
        })
    );
}

async fn webhooks_are_scoped_leased_and_log_their_deliveries(f: &Fixture) {
    use keel_store::{Delivery, NewWebhook, Outcome};
    let ws = f.store.create_workspace(&name("hooks")).await.unwrap().id;
    let other = f.store.create_workspace(&name("other")).await.unwrap().id;
    f.store
        .append_events(&[ping(ws, 1), ping(ws, 2)])
        .await
        .unwrap();
    let hook = f
        .store
        .create_webhook(NewWebhook {
            workspace_id: ws,
            url: "https://example.com/hook".into(),
            types: "task.*".into(),
            secret: "whsec_abc".into(),
            description: Some("ci".into()),
        })
        .await
        .unwrap();
    assert_eq!(
        hook.cursor_seq, 2,
        "a new webhook starts after the newest event"
    );
    assert_eq!(f.store.list_webhooks(ws).await.unwrap(), vec![hook.clone()]);
    assert!(f.store.list_webhooks(other).await.unwrap().is_empty());
    assert!(matches!(
        f.store.webhook(other, hook.id).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(f.store.all_webhooks().await.unwrap().len(), 1);

    let (me, rival) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(30);
    assert!(f.store.lease_webhook(hook.id, me, later).await.unwrap());
    assert!(
        !f.store.lease_webhook(hook.id, rival, later).await.unwrap(),
        "held by another"
    );
    assert!(
        f.store.lease_webhook(hook.id, me, later).await.unwrap(),
        "renewable by its owner"
    );
    assert!(!f.store.advance_webhook(hook.id, rival, 5).await.unwrap());
    assert!(f.store.advance_webhook(hook.id, me, 5).await.unwrap());
    assert!(
        !f.store.advance_webhook(hook.id, me, 4).await.unwrap(),
        "never backwards"
    );
    assert_eq!(f.store.webhook(ws, hook.id).await.unwrap().cursor_seq, 5);
    let past = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    assert!(f.store.lease_webhook(hook.id, me, past).await.unwrap());
    assert!(
        f.store.lease_webhook(hook.id, rival, later).await.unwrap(),
        "an expired lease is taken over"
    );

    let event = f.store.events_after(ws, 0, 1).await.unwrap().remove(0);
    let mut ids = Vec::new();
    for (attempt, outcome) in [
        (1, Outcome::Failed),
        (2, Outcome::DeadLettered),
        (3, Outcome::Delivered),
    ] {
        let d = Delivery {
            id: keel_core::id::DeliveryId::new(),
            webhook_id: hook.id,
            workspace_id: ws,
            event_seq: event.seq,
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            attempt,
            outcome,
            status_code: Some(500),
            error: Some("boom".into()),
            duration_ms: 3,
            created_at: time::OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap(),
        };
        let events = if outcome == Outcome::DeadLettered {
            vec![NewEvent::new(
                EventType::DeadLetterCreated,
                ws,
                serde_json::json!({ "queue": "webhooks", "reason": "boom", "attempts": attempt }),
            )]
        } else {
            Vec::new()
        };
        let committed = f.store.record_delivery(&d, &events).await.unwrap();
        assert_eq!(committed.len(), events.len());
        ids.push(d);
    }
    // The dead letter's event committed with its row; a row that fails takes its event
    // with it (the outbox: no event without its change).
    let head = f.store.event_head(ws).await.unwrap();
    let letters = f.store.events_after(ws, 0, 100).await.unwrap();
    assert_eq!(
        letters
            .iter()
            .filter(|e| e.event_type == "dead_letter.created")
            .count(),
        1
    );
    let duplicate = f
        .store
        .record_delivery(
            &ids[0],
            &[NewEvent::new(
                EventType::DeadLetterCreated,
                ws,
                serde_json::json!({ "queue": "webhooks", "reason": "dup", "attempts": 1 }),
            )],
        )
        .await;
    assert!(duplicate.is_err(), "a delivery id is logged once");
    assert_eq!(f.store.event_head(ws).await.unwrap(), head);
    let all = f
        .store
        .list_deliveries(ws, hook.id, None, None, 10)
        .await
        .unwrap();
    assert_eq!(all, ids);
    let dead = f
        .store
        .list_deliveries(ws, hook.id, Some(Outcome::DeadLettered), None, 10)
        .await
        .unwrap();
    assert_eq!(dead, vec![ids[1].clone()]);
    let after = f
        .store
        .list_deliveries(ws, hook.id, None, Some(ids[0].id), 1)
        .await
        .unwrap();
    assert_eq!(after, vec![ids[1].clone()]);
    assert_eq!(
        f.store.delivery(ws, hook.id, ids[2].id).await.unwrap(),
        ids[2]
    );
    assert!(
        f.store
            .list_deliveries(other, hook.id, None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    assert!(matches!(
        f.store.delete_webhook(other, hook.id).await,
        Err(Error::NotFound { .. })
    ));
    f.store.delete_webhook(ws, hook.id).await.unwrap();
    assert!(f.store.list_webhooks(ws).await.unwrap().is_empty());
    assert!(
        f.store
            .list_deliveries(ws, hook.id, None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn exporters_lease_and_track_a_cursor_per_workspace(f: &Fixture) {
    let a = f.store.create_workspace(&name("xa")).await.unwrap().id;
    let b = f.store.create_workspace(&name("xb")).await.unwrap().id;
    let (me, rival) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(30);
    assert!(f.store.lease_exporter("nats", me, later).await.unwrap());
    assert!(!f.store.lease_exporter("nats", rival, later).await.unwrap());
    assert!(f.store.lease_exporter("nats", me, later).await.unwrap());
    assert!(
        f.store.lease_exporter("other", rival, later).await.unwrap(),
        "leases are per exporter"
    );
    assert!(f.store.export_backlog("nats").await.unwrap().is_empty());
    f.store
        .append_events(&[ping(a, 1), ping(a, 2), ping(b, 1)])
        .await
        .unwrap();
    let mut backlog = f.store.export_backlog("nats").await.unwrap();
    backlog.sort_by_key(|x| x.last_seq);
    assert_eq!(backlog.len(), 2);
    assert_eq!((backlog[0].exported, backlog[0].last_seq), (0, 1));
    assert_eq!(
        (
            backlog[1].workspace_id,
            backlog[1].exported,
            backlog[1].last_seq
        ),
        (a, 0, 2)
    );
    f.store.advance_export("nats", a, 2).await.unwrap();
    f.store.advance_export("nats", a, 1).await.unwrap();
    let backlog = f.store.export_backlog("nats").await.unwrap();
    assert_eq!(
        backlog.iter().map(|x| x.workspace_id).collect::<Vec<_>>(),
        vec![b],
        "a is done; never moved back"
    );
    assert_eq!(
        f.store.export_backlog("other").await.unwrap().len(),
        2,
        "cursors are per exporter"
    );
}

mod runtime_fixtures {
    use super::*;
    use keel_store::runtime::{
        AgentRecord, BeginRun, Checkpoint, Created, Finish, NewMessage, NewTask, TaskRecord,
    };

    pub async fn agent(f: &Fixture, ws: WorkspaceId) -> AgentRecord {
        f.store
            .put_agent(
                ws,
                "helper",
                &serde_json::json!({"name": "helper"}),
                false,
                false,
            )
            .await
            .unwrap()
    }

    pub fn new_task(
        agent: &AgentRecord,
        priority: keel_core::task::Priority,
        key: Option<&str>,
    ) -> NewTask {
        let id = TaskId::new();
        NewTask {
            id,
            workspace_id: agent.workspace_id,
            agent_id: agent.id,
            agent_name: agent.name.clone(),
            agent_version: agent.version,
            thread_id: None,
            parent_task_id: None,
            depth: 0,
            priority,
            input: serde_json::json!([{"role": "user", "content": "hi"}]),
            metadata: serde_json::json!({}),
            idempotency_key: key.map(str::to_owned),
            max_attempts: 3,
            max_queued: 1_000,
            events: vec![
                NewEvent::new(
                    EventType::TaskCreated,
                    agent.workspace_id,
                    serde_json::json!({"agent": "helper", "priority": "medium"}),
                )
                .with_task(id),
            ],
        }
    }

    /// Queues `n` medium-priority tasks of `agent`, each on a thread of its own.
    pub async fn create_many(f: &Fixture, agent: &AgentRecord, n: usize) {
        for _ in 0..n {
            create(f, new_task(agent, keel_core::task::Priority::Medium, None)).await;
        }
    }

    pub async fn create(f: &Fixture, t: NewTask) -> TaskRecord {
        match f.store.create_task(t).await.unwrap() {
            Created::New(task, events) => {
                assert_eq!(events.len(), 1, "the task and its event commit together");
                // The event came back with the seq it was stored under.
                let stored = f
                    .store
                    .events_after(task.workspace_id, events[0].seq - 1, 1)
                    .await
                    .unwrap();
                assert_eq!(stored[0].event_id, events[0].event_id);
                *task
            }
            other => panic!("expected a new task, got {other:?}"),
        }
    }

    pub fn later(secs: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc() + time::Duration::seconds(secs)
    }

    /// A new run `run` of `task` for `owner`, opening with one user message.
    pub fn new_run(task: TaskId, owner: uuid::Uuid, run: RunId) -> BeginRun {
        BeginRun {
            task_id: task,
            owner,
            new_run: Some((
                run,
                vec![NewMessage {
                    body: serde_json::json!({"role": "user", "content": "hi"}),
                    tokens: 3,
                }],
            )),
            events: vec![],
        }
    }

    /// Begins a new run of a task `owner` has claimed; its id.
    pub async fn start(f: &Fixture, task: &TaskRecord, owner: uuid::Uuid) -> RunId {
        let run = RunId::new();
        f.store
            .begin_run(new_run(task.id, owner, run))
            .await
            .unwrap();
        run
    }

    /// Ends `run` with `finish` alone: no step, message, event or usage.
    pub async fn end(
        f: &Fixture,
        task: &TaskRecord,
        run: RunId,
        owner: uuid::Uuid,
        finish: Finish,
    ) {
        f.store
            .commit_checkpoints(&[Checkpoint {
                task_id: task.id,
                workspace_id: task.workspace_id,
                thread_id: task.thread_id,
                run_id: run,
                owner,
                start: None,
                step: None,
                messages: vec![],
                tool_calls: 0,
                input_tokens: 0,
                output_tokens: 0,
                cost_nanousd: 0,
                finish: Some(finish),
                events: vec![],
                usage: None,
            }])
            .await
            .unwrap();
    }
}

async fn agents_are_versioned_and_scoped(f: &Fixture) {
    let a = f.store.ensure_workspace(&name("agents-a")).await.unwrap();
    let b = f.store.ensure_workspace(&name("agents-b")).await.unwrap();
    let v1 = f
        .store
        .put_agent(
            a.id,
            "helper",
            &serde_json::json!({"name": "helper", "max_steps": 1}),
            true,
            false,
        )
        .await
        .unwrap();
    assert_eq!(v1.version, 1);
    assert!(matches!(
        f.store
            .put_agent(
                a.id,
                "helper",
                &serde_json::json!({"name": "helper"}),
                true,
                false
            )
            .await,
        Err(Error::Conflict { .. })
    ));
    let same = f
        .store
        .put_agent(a.id, "helper", &v1.spec, false, true)
        .await
        .unwrap();
    assert_eq!(same.version, 1, "an unchanged spec stores no new version");
    let v2 = f
        .store
        .put_agent(
            a.id,
            "helper",
            &serde_json::json!({"name": "helper", "max_steps": 2}),
            false,
            true,
        )
        .await
        .unwrap();
    assert_eq!((v2.version, v2.id), (2, v1.id));
    assert_eq!(
        f.store.agent_version(a.id, v1.id, 1).await.unwrap().spec["max_steps"],
        1
    );
    assert!(matches!(
        f.store.agent(b.id, "helper").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        f.store.agent_version(b.id, v1.id, 1).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        f.store
            .put_agent(b.id, "helper", &serde_json::json!({}), false, true)
            .await,
        Err(Error::NotFound { .. })
    ));
    f.store.delete_agent(a.id, "helper").await.unwrap();
    assert!(matches!(
        f.store.agent(a.id, "helper").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        f.store.agent_version(a.id, v1.id, 2).await.unwrap().version,
        2,
        "versions outlive deletion"
    );
    let v3 = f
        .store
        .put_agent(
            a.id,
            "helper",
            &serde_json::json!({"name": "helper"}),
            true,
            false,
        )
        .await
        .unwrap();
    assert_eq!(v3.version, 3, "re-creating continues the version line");
}

async fn claims_are_exclusive_and_checkpoints_are_fenced_by_the_lease(f: &Fixture) {
    use keel_store::runtime::{BeginRun, Checkpoint, Committed, Finish, NewMessage};
    let ws = f.store.ensure_workspace(&name("claims")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let task = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, keel_core::task::Priority::Medium, None),
    )
    .await;
    let (one, two) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let claimed = f
        .store
        .claim_tasks(one, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(
        f.store
            .claim_tasks(two, runtime_fixtures::later(60), 10)
            .await
            .unwrap()
            .is_empty(),
        "a held task is not claimed twice"
    );
    let run = RunId::new();
    let state = f
        .store
        .begin_run(runtime_fixtures::new_run(task.id, one, run))
        .await
        .unwrap();
    assert_eq!(state.messages.len(), 1);
    assert_eq!(state.task.attempts, 1);
    let step = |owner: uuid::Uuid, finish: Option<Finish>| Checkpoint {
        task_id: task.id,
        workspace_id: ws.id,
        thread_id: task.thread_id,
        run_id: run,
        owner,
        start: None,
        step: Some(("llm_call".to_owned(), serde_json::json!({"n": 1}))),
        messages: vec![NewMessage {
            body: serde_json::json!({"role": "assistant", "content": "ok"}),
            tokens: 2,
        }],
        tool_calls: 0,
        input_tokens: 10,
        output_tokens: 2,
        cost_nanousd: 5,
        finish,
        events: vec![
            NewEvent::new(
                EventType::AgentMessage,
                ws.id,
                serde_json::json!({"role": "assistant", "content": "ok"}),
            )
            .with_task(task.id),
        ],
        usage: None,
    };
    // The holder commits; a stranger is refused and stores nothing.
    let out = f
        .store
        .commit_checkpoints(&[step(one, None), step(two, None)])
        .await
        .unwrap();
    assert!(
        matches!(&out[0], Committed::Stored { idx: Some(0), events } if events.len() == 1),
        "{out:?}"
    );
    assert_eq!(out[1], Committed::LeaseLost);
    assert_eq!(f.store.task_steps(ws.id, task.id).await.unwrap().len(), 1);
    // The lease expires and someone else takes over: the old holder is fenced out.
    f.store.release_leases(one, &[task.id]).await.unwrap();
    assert_eq!(
        f.store
            .renew_leases(one, &[task.id], runtime_fixtures::later(60))
            .await
            .unwrap(),
        vec![]
    );
    let retaken = f
        .store
        .claim_tasks(two, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert_eq!(retaken.len(), 1);
    let resumed = f
        .store
        .begin_run(BeginRun {
            task_id: task.id,
            owner: two,
            new_run: None,
            events: vec![],
        })
        .await
        .unwrap();
    assert_eq!(
        (resumed.steps.len(), resumed.messages.len()),
        (1, 2),
        "a resume sees exactly what was committed"
    );
    assert_eq!(
        f.store
            .commit_checkpoints(&[step(one, None)])
            .await
            .unwrap(),
        vec![Committed::LeaseLost]
    );
    let done = f
        .store
        .commit_checkpoints(&[step(
            two,
            Some(Finish::Completed {
                output: Some("ok".into()),
            }),
        )])
        .await
        .unwrap();
    assert!(matches!(&done[0], Committed::Stored { idx: Some(1), .. }));
    let task = f.store.task(ws.id, task.id).await.unwrap();
    assert_eq!(task.status, keel_core::task::TaskStatus::Completed);
    assert_eq!(
        (task.steps, task.input_tokens, task.cost_nanousd),
        (2, 20, 10)
    );
    assert!(!task.queued && task.lease_owner.is_none());
    assert!(
        f.store
            .claim_tasks(one, runtime_fixtures::later(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let messages = f
        .store
        .thread_messages(ws.id, task.thread_id, 0, 100)
        .await
        .unwrap();
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

/// A claim on Postgres reads whether each task's thread holds messages yet (a new run on
/// an empty thread has no earlier turns to load); SQLite's claim, and every other read,
/// leave it unknown.
async fn a_claim_on_postgres_says_whether_the_thread_is_empty(f: &Fixture) {
    use keel_core::task::Priority;
    use keel_store::runtime::{BeginRun, NewMessage, NewTask};
    let ws = f.store.ensure_workspace(&name("fresh")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let known = |empty: bool| match f.store.backend() {
        keel_store::Backend::Postgres => Some(empty),
        keel_store::Backend::Sqlite => None,
    };
    let first = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, Priority::Medium, None),
    )
    .await;
    let owner = uuid::Uuid::now_v7();
    let claimed = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].thread_empty, known(true));
    // Its run's first message goes into the thread; a second task on it finds it there.
    f.store
        .begin_run(BeginRun {
            task_id: first.id,
            owner,
            new_run: Some((
                RunId::new(),
                vec![NewMessage {
                    body: serde_json::json!({"role": "user", "content": "hello"}),
                    tokens: 1,
                }],
            )),
            events: vec![],
        })
        .await
        .unwrap();
    let second = runtime_fixtures::create(
        f,
        NewTask {
            thread_id: Some(first.thread_id),
            ..runtime_fixtures::new_task(&agent, Priority::Medium, None)
        },
    )
    .await;
    let claimed = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, second.id);
    assert_eq!(claimed[0].thread_empty, known(false));
    assert_eq!(
        f.store.task(ws.id, second.id).await.unwrap().thread_empty,
        None
    );
}

async fn a_failed_checkpoint_batch_stores_nothing_of_any_run(f: &Fixture) {
    use keel_store::runtime::{BeginRun, Checkpoint, NewMessage};
    let ws = f.store.ensure_workspace(&name("atomic")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let task = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, keel_core::task::Priority::Medium, None),
    )
    .await;
    let owner = uuid::Uuid::now_v7();
    f.store
        .claim_tasks(owner, runtime_fixtures::later(60), 1)
        .await
        .unwrap();
    let run = RunId::new();
    f.store
        .begin_run(BeginRun {
            task_id: task.id,
            owner,
            new_run: Some((run, vec![])),
            events: vec![],
        })
        .await
        .unwrap();
    let head = f.store.event_head(ws.id).await.unwrap();
    let good = Checkpoint {
        task_id: task.id,
        workspace_id: ws.id,
        thread_id: task.thread_id,
        run_id: run,
        owner,
        start: None,
        step: Some(("llm_call".to_owned(), serde_json::json!({}))),
        messages: vec![NewMessage {
            body: serde_json::json!({"role": "assistant", "content": "x"}),
            tokens: 1,
        }],
        tool_calls: 0,
        input_tokens: 0,
        output_tokens: 0,
        cost_nanousd: 0,
        finish: None,
        events: vec![
            NewEvent::new(EventType::AgentMessage, ws.id, serde_json::json!({})).with_task(task.id),
        ],
        usage: None,
    };
    // The second checkpoint's thread does not exist: the batch fails as a whole.
    let mut bad = good.clone();
    bad.thread_id = keel_core::id::ThreadId::new();
    assert!(
        f.store
            .commit_checkpoints(&[good.clone(), bad])
            .await
            .is_err()
    );
    assert_eq!(f.store.task_steps(ws.id, task.id).await.unwrap().len(), 0);
    assert_eq!(
        f.store.event_head(ws.id).await.unwrap(),
        head,
        "no event without its step"
    );
    assert_eq!(f.store.task(ws.id, task.id).await.unwrap().steps, 0);
    assert!(f.store.commit_checkpoints(&[good]).await.is_ok());
}

/// A batch of many runs' checkpoints — starts, steps, finishes of every kind, a stranger's
/// checkpoint, two tasks on one thread — stores for each what it would alone.
async fn one_batch_starts_steps_and_finishes_many_runs_as_each_alone_would(f: &Fixture) {
    use keel_core::task::{Priority, TaskStatus};
    use keel_store::runtime::{Checkpoint, Committed, Finish, NewMessage};
    let ws = f.store.ensure_workspace(&name("sets")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let a = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, Priority::Medium, None),
    )
    .await;
    // `b` shares `a`'s thread.
    let b = runtime_fixtures::create(
        f,
        keel_store::runtime::NewTask {
            thread_id: Some(a.thread_id),
            ..runtime_fixtures::new_task(&agent, Priority::Medium, None)
        },
    )
    .await;
    let c = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, Priority::Medium, None),
    )
    .await;
    let d = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, Priority::Medium, None),
    )
    .await;
    let owner = uuid::Uuid::now_v7();
    let claimed = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    let runs: std::collections::HashMap<TaskId, RunId> = [a.id, b.id, c.id, d.id]
        .into_iter()
        .map(|t| (t, RunId::new()))
        .collect();
    let tasks = [&a, &b, &c, &d];
    let checkpoint = |t: &keel_store::runtime::TaskRecord, text: &str| Checkpoint {
        task_id: t.id,
        workspace_id: ws.id,
        thread_id: t.thread_id,
        run_id: runs[&t.id],
        owner,
        start: None,
        step: Some(("llm_call".to_owned(), serde_json::json!({"text": text}))),
        messages: vec![NewMessage {
            body: serde_json::json!({"role": "assistant", "content": text}),
            tokens: 1,
        }],
        tool_calls: 1,
        input_tokens: 3,
        output_tokens: 1,
        cost_nanousd: 7,
        finish: None,
        events: vec![
            NewEvent::new(
                EventType::AgentMessage,
                ws.id,
                serde_json::json!({"content": text}),
            )
            .with_task(t.id),
        ],
        usage: None,
    };
    // Every run starts in one batch (with its input), and a stranger's start is refused.
    let mut starts: Vec<Checkpoint> = tasks
        .iter()
        .map(|t| Checkpoint {
            start: Some(runs[&t.id]),
            step: None,
            tool_calls: 0,
            input_tokens: 0,
            output_tokens: 0,
            cost_nanousd: 0,
            messages: vec![NewMessage {
                body: serde_json::json!({"role": "user", "content": "hi"}),
                tokens: 1,
            }],
            ..checkpoint(t, "start")
        })
        .collect();
    starts.push(Checkpoint {
        owner: uuid::Uuid::now_v7(),
        start: Some(RunId::new()),
        ..checkpoint(&d, "stranger")
    });
    let out = f.store.commit_checkpoints(&starts).await.unwrap();
    for o in &out[..4] {
        assert!(
            matches!(o, Committed::Stored { idx: None, events } if events.len() == 1),
            "{out:?}"
        );
    }
    assert_eq!(out[4], Committed::LeaseLost);
    // Then steps and every kind of ending, together.
    let retry_at = runtime_fixtures::later(30);
    let retry_at = retry_at
        .replace_nanosecond(retry_at.nanosecond() / 1000 * 1000)
        .unwrap();
    let batch = vec![
        Checkpoint {
            finish: Some(Finish::Completed {
                output: Some("done".into()),
            }),
            ..checkpoint(&a, "a1")
        },
        Checkpoint {
            finish: Some(Finish::InputRequired),
            ..checkpoint(&b, "b1")
        },
        Checkpoint {
            finish: Some(Finish::Retry {
                error: serde_json::json!({"kind": "x"}),
                retry_at,
            }),
            ..checkpoint(&c, "c1")
        },
        checkpoint(&d, "d1"),
        Checkpoint {
            finish: Some(Finish::Failed {
                error: serde_json::json!({"kind": "y"}),
                dead_letter: true,
            }),
            ..checkpoint(&d, "d2")
        },
    ];
    let out = f.store.commit_checkpoints(&batch).await.unwrap();
    let idx: Vec<Option<i64>> = out
        .iter()
        .map(|o| match o {
            Committed::Stored { idx, .. } => *idx,
            Committed::LeaseLost => panic!("lost: {out:?}"),
        })
        .collect();
    assert_eq!(idx, vec![Some(0), Some(0), Some(0), Some(0), Some(1)]);

    let get = |id| async move { f.store.task(ws.id, id).await.unwrap() };
    let (a, b, c, d) = (
        get(a.id).await,
        get(b.id).await,
        get(c.id).await,
        get(d.id).await,
    );
    assert_eq!(
        (a.status, a.output.as_deref(), a.queued),
        (TaskStatus::Completed, Some("done"), false)
    );
    assert_eq!((b.status, b.queued), (TaskStatus::InputRequired, false));
    assert_eq!(
        (c.status, c.queued, c.run_at),
        (TaskStatus::Working, true, retry_at)
    );
    assert_eq!(
        (d.status, d.dead_lettered, d.steps),
        (TaskStatus::Failed, true, 2)
    );
    for t in [&a, &b, &c, &d] {
        assert_eq!(t.attempts, 1);
        assert!(t.lease_owner.is_none(), "every ending gives up the lease");
    }
    assert_eq!((d.tool_calls, d.input_tokens, d.cost_nanousd), (2, 6, 14));
    let d_id = d.id;
    let run_status = |t: keel_store::runtime::TaskRecord| async move {
        let runs = f.store.task_runs(ws.id, t.id).await.unwrap();
        assert_eq!(runs.len(), 1);
        (runs[0].status.clone(), runs[0].finished_at.is_some())
    };
    assert_eq!(run_status(a).await, ("completed".to_owned(), true));
    assert_eq!(run_status(b).await, ("input-required".to_owned(), false));
    assert_eq!(run_status(c).await, ("failed".to_owned(), true));
    assert_eq!(run_status(d).await, ("failed".to_owned(), true));
    // The shared thread's messages are numbered without a gap: each task's start, then
    // its step, in task order within each batch.
    let messages_of = |thread| async move {
        f.store
            .thread_messages(ws.id, thread, 0, 100)
            .await
            .unwrap()
    };
    let thread = messages_of(starts[0].thread_id).await;
    assert_eq!(
        thread.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let (first, second) = if starts[0].task_id < starts[1].task_id {
        ("a1", "b1")
    } else {
        ("b1", "a1")
    };
    assert_eq!(thread[2].body["content"], first);
    assert_eq!(thread[3].body["content"], second);
    let d_steps = f.store.task_steps(ws.id, d_id).await.unwrap();
    assert_eq!(
        d_steps.iter().map(|s| s.idx).collect::<Vec<_>>(),
        vec![0, 1]
    );
    // `d` twice in one batch (stored in rounds): its thread's messages in batch order,
    // numbered without a gap.
    let d_thread = messages_of(batch[3].thread_id).await;
    assert_eq!(numbered(&d_thread), vec![(1, "hi"), (2, "d1"), (3, "d2")]);
}

/// A thread's messages as (seq, content).
fn numbered(messages: &[keel_store::runtime::MessageRecord]) -> Vec<(i64, &str)> {
    messages
        .iter()
        .map(|m| (m.seq, m.body["content"].as_str().unwrap_or_default()))
        .collect()
}

/// Forty runs in a batch: more rows than one gathered query keeps prepared (SQLite sends
/// a commit's statements in several queries then, and its events in chunks), and every
/// row must still land, numbered as one batch of four would be.
async fn a_batch_longer_than_one_prepared_statement_is_stored_whole(f: &Fixture) {
    use keel_core::task::{Priority, TaskStatus};
    use keel_store::runtime::{Checkpoint, Committed, Finish, NewMessage};
    const RUNS: usize = 40;
    let ws = f.store.ensure_workspace(&name("long-batch")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let mut tasks = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        tasks.push(
            runtime_fixtures::create(
                f,
                runtime_fixtures::new_task(&agent, Priority::Medium, None),
            )
            .await,
        );
    }
    let owner = uuid::Uuid::now_v7();
    let claimed = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), RUNS as u32)
        .await
        .unwrap();
    assert_eq!(claimed.len(), RUNS);
    let at = time::OffsetDateTime::now_utc();
    let event = |t: &keel_store::runtime::TaskRecord, text: &str| {
        NewEvent::new(
            EventType::AgentMessage,
            ws.id,
            serde_json::json!({"content": text}),
        )
        .with_task(t.id)
    };
    let message = |text: &str| NewMessage {
        body: serde_json::json!({"role": "assistant", "content": text}),
        tokens: 1,
    };
    let runs: Vec<RunId> = tasks.iter().map(|_| RunId::new()).collect();
    let starts: Vec<Checkpoint> = tasks
        .iter()
        .zip(&runs)
        .map(|(t, run)| Checkpoint {
            task_id: t.id,
            workspace_id: ws.id,
            thread_id: t.thread_id,
            run_id: *run,
            owner,
            start: Some(*run),
            step: None,
            messages: vec![message("hi")],
            tool_calls: 0,
            input_tokens: 0,
            output_tokens: 0,
            cost_nanousd: 0,
            finish: None,
            events: vec![event(t, "started")],
            usage: None,
        })
        .collect();
    let steps: Vec<Checkpoint> = starts
        .iter()
        .zip(&tasks)
        .map(|(start, t)| Checkpoint {
            start: None,
            step: Some(("llm_call".to_owned(), serde_json::json!({"text": "x"}))),
            messages: vec![message("x1"), message("x2")],
            tool_calls: 1,
            input_tokens: 10,
            output_tokens: 5,
            cost_nanousd: 1_500,
            finish: Some(Finish::Completed {
                output: Some("done".into()),
            }),
            events: vec![event(t, "x1"), event(t, "x2")],
            usage: Some(usage(ws.id, None, "long", "m", at)),
            ..start.clone()
        })
        .collect();
    let mut returned = std::collections::HashMap::new();
    for (batch, per_run) in [(&starts, 1), (&steps, 2)] {
        let out = f.store.commit_checkpoints(batch).await.unwrap();
        assert_eq!(out.len(), RUNS);
        for o in &out {
            match o {
                Committed::Stored { events, .. } => {
                    assert_eq!(events.len(), per_run, "{o:?}");
                    for e in events {
                        assert!(returned.insert(e.event_id, e.seq).is_none());
                    }
                }
                Committed::LeaseLost => panic!("lost: {out:?}"),
            }
        }
    }
    // Each event came back with the seq it is stored under, and the log has no gap.
    let log = f.store.events_after(ws.id, 0, 1_000).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=i64::try_from(log.len()).unwrap()).collect::<Vec<_>>()
    );
    let stored: std::collections::HashMap<_, _> = log.iter().map(|e| (e.event_id, e.seq)).collect();
    assert_eq!(returned.len(), 3 * RUNS);
    for (id, seq) in &returned {
        assert_eq!(stored.get(id), Some(seq));
    }
    for t in &tasks {
        let t = f.store.task(ws.id, t.id).await.unwrap();
        assert_eq!(
            (t.status, t.steps, t.tool_calls, t.lease_owner),
            (TaskStatus::Completed, 1, 1, None)
        );
        let messages = f
            .store
            .thread_messages(ws.id, t.thread_id, 0, 100)
            .await
            .unwrap();
        assert_eq!(numbered(&messages), vec![(1, "hi"), (2, "x1"), (3, "x2")]);
        let steps = f.store.task_steps(ws.id, t.id).await.unwrap();
        assert_eq!(steps.iter().map(|s| s.idx).collect::<Vec<_>>(), vec![0]);
    }
    let usage = usage_by_route_around(f, ws.id, at).await;
    assert_eq!(usage[0].requests, RUNS as u64);
}

async fn the_queue_orders_by_priority_then_fairly_across_workspaces(f: &Fixture) {
    use keel_core::task::Priority;
    let busy = f.store.ensure_workspace(&name("busy")).await.unwrap();
    let quiet = f.store.ensure_workspace(&name("quiet")).await.unwrap();
    let busy_agent = runtime_fixtures::agent(f, busy.id).await;
    let quiet_agent = runtime_fixtures::agent(f, quiet.id).await;
    let mut busy_ids = Vec::new();
    for _ in 0..5 {
        busy_ids.push(
            runtime_fixtures::create(
                f,
                runtime_fixtures::new_task(&busy_agent, Priority::Medium, None),
            )
            .await
            .id,
        );
    }
    let low = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&busy_agent, Priority::Low, None),
    )
    .await
    .id;
    let quiet_id = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&quiet_agent, Priority::Medium, None),
    )
    .await
    .id;
    let critical = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&busy_agent, Priority::Critical, None),
    )
    .await
    .id;
    let owner = uuid::Uuid::now_v7();
    let mut order = Vec::new();
    loop {
        let got = f
            .store
            .claim_tasks(owner, runtime_fixtures::later(60), 1)
            .await
            .unwrap();
        let Some(t) = got.into_iter().next() else {
            break;
        };
        order.push(t.id);
    }
    assert_eq!(order.len(), 8);
    assert_eq!(order[0], critical);
    assert_eq!(*order.last().unwrap(), low);
    let quiet_at = order.iter().position(|id| *id == quiet_id).unwrap();
    assert!(
        quiet_at <= 2,
        "the quiet workspace's first task goes ahead of most of the busy one's backlog: {quiet_at}"
    );
    assert_eq!(order.iter().filter(|id| busy_ids.contains(id)).count(), 5);
}

async fn idempotency_keys_and_the_queue_bound_hold(f: &Fixture) {
    use keel_core::task::Priority;
    use keel_store::runtime::Created;
    let ws = f.store.ensure_workspace(&name("idem")).await.unwrap();
    let other = f.store.ensure_workspace(&name("idem-other")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let other_agent = runtime_fixtures::agent(f, other.id).await;
    let first = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, Priority::Medium, Some("k1")),
    )
    .await;
    match f
        .store
        .create_task(runtime_fixtures::new_task(
            &agent,
            Priority::Medium,
            Some("k1"),
        ))
        .await
        .unwrap()
    {
        Created::Existing(t) => assert_eq!(t.id, first.id),
        other => panic!("{other:?}"),
    }
    // Keys are per workspace.
    runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&other_agent, Priority::Medium, Some("k1")),
    )
    .await;
    let mut full = runtime_fixtures::new_task(&agent, Priority::Medium, None);
    full.max_queued = 1;
    let head = f.store.event_head(ws.id).await.unwrap();
    assert!(matches!(
        f.store.create_task(full).await.unwrap(),
        Created::QueueFull { .. }
    ));
    assert_eq!(
        f.store.event_head(ws.id).await.unwrap(),
        head,
        "a refused task leaves no event"
    );
    // A thread of another workspace is not found, and nothing is written.
    let foreign = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&other_agent, Priority::Medium, None),
    )
    .await;
    let mut astray = runtime_fixtures::new_task(&agent, Priority::Medium, None);
    astray.thread_id = Some(foreign.thread_id);
    assert!(matches!(
        f.store.create_task(astray).await,
        Err(Error::NotFound { what: "thread" })
    ));
    assert_eq!(f.store.event_head(ws.id).await.unwrap(), head);
    let listed = f
        .store
        .list_tasks(ws.id, &keel_store::runtime::TaskFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        matches!(
            f.store.task(other.id, first.id).await,
            Err(Error::NotFound { .. })
        ),
        "another workspace's task is not found"
    );
}

async fn cancel_and_input_follow_the_task_state(f: &Fixture) {
    use keel_core::task::{Priority, TaskStatus};
    let ws = f.store.ensure_workspace(&name("states")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let task = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, Priority::Medium, None),
    )
    .await;
    assert!(matches!(
        f.store
            .submit_input(
                ws.id,
                task.id,
                ("approval".into(), serde_json::json!({})),
                vec![],
                None,
                vec![]
            )
            .await,
        Err(Error::State { .. })
    ));
    let other = f
        .store
        .ensure_workspace(&name("states-other"))
        .await
        .unwrap();
    assert!(matches!(
        f.store.cancel_task(other.id, task.id, vec![]).await,
        Err(Error::NotFound { .. })
    ));
    let ev =
        NewEvent::new(EventType::TaskCanceled, ws.id, serde_json::json!({})).with_task(task.id);
    let (canceled, events) = f.store.cancel_task(ws.id, task.id, vec![ev]).await.unwrap();
    assert_eq!(canceled.status, TaskStatus::Canceled);
    assert_eq!(events.len(), 1);
    assert!(matches!(
        f.store.cancel_task(ws.id, task.id, vec![]).await,
        Err(Error::State { .. })
    ));
    assert!(
        f.store
            .claim_tasks(uuid::Uuid::now_v7(), runtime_fixtures::later(60), 10)
            .await
            .unwrap()
            .is_empty(),
        "a canceled task is not claimed"
    );
}

/// Runs one statement on the fixture's database behind the store's back (a tamperer's
/// view).
async fn raw_exec(f: &Fixture, sql: &str) -> u64 {
    use secrecy::ExposeSecret as _;
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match &f.config.database.url {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url.expose_secret()).await.unwrap();
            let n = sqlx::query(sql)
                .execute(&pool)
                .await
                .unwrap()
                .rows_affected();
            pool.close().await;
            n
        }
        None => {
            let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(f.config.sqlite_path());
            let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
            let n = sqlx::query(sql)
                .execute(&pool)
                .await
                .unwrap()
                .rows_affected();
            pool.close().await;
            n
        }
    }
}

async fn keys_expire_and_carry_scopes_and_models(f: &Fixture) {
    use keel_core::auth::{Scope, Scopes};
    let ws = f.store.create_workspace(&name("scoped")).await.unwrap();
    let (token, mut new) = new_key(ws.id, Role::Member);
    new.scopes = Scopes::from_list(&[Scope::Read, Scope::Gateway]).unwrap();
    new.models = Some(vec!["small".into()]);
    new.tier = Some("pro".into());
    let key = f.store.create_api_key(new).await.unwrap();
    let p = f.store.authenticate(&token.hash()).await.unwrap().unwrap();
    assert!(p.scopes.contains(Scope::Gateway) && !p.scopes.contains(Scope::TasksWrite));
    assert!(p.may_use_model("small") && !p.may_use_model("large"));
    let listed = f.store.list_api_keys(ws.id).await.unwrap();
    assert_eq!(listed[0].scopes, p.scopes);
    assert_eq!(listed[0].models.as_deref(), Some(&["small".to_owned()][..]));
    assert!(
        listed[0].last_used_at.is_some(),
        "authentication records last use"
    );
    assert_eq!(listed[0].tier.as_deref(), Some("pro"));
    assert_eq!(p.tier.as_deref(), Some("pro"));
    assert_eq!(listed[0].id, key.id);

    let (expired, mut new) = new_key(ws.id, Role::Admin);
    new.expires_at = Some(time::OffsetDateTime::now_utc() - time::Duration::SECOND);
    f.store.create_api_key(new).await.unwrap();
    assert!(
        f.store
            .authenticate(&expired.hash())
            .await
            .unwrap()
            .is_none()
    );
    let (later, mut new) = new_key(ws.id, Role::Admin);
    new.expires_at = Some(time::OffsetDateTime::now_utc() + time::Duration::HOUR);
    f.store.create_api_key(new).await.unwrap();
    assert!(f.store.authenticate(&later.hash()).await.unwrap().is_some());
}

async fn users_belong_to_workspaces_with_a_role(f: &Fixture) {
    use keel_core::auth::Email;
    let a = f.store.create_workspace(&name("team-a")).await.unwrap();
    let b = f.store.create_workspace(&name("team-b")).await.unwrap();
    let email = Email::parse("Ada@Example.com").unwrap();
    let user = f.store.create_user(&email, "$argon2id$fake").await.unwrap();
    let err = f.store.create_user(&email, "x").await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    let (found, hash) = f.store.user_credentials(&email).await.unwrap().unwrap();
    assert_eq!((found.id, hash.as_str()), (user.id, "$argon2id$fake"));
    assert!(
        f.store
            .user_credentials(&Email::parse("x@y.z").unwrap())
            .await
            .unwrap()
            .is_none()
    );

    f.store
        .set_membership(a.id, user.id, Role::Viewer)
        .await
        .unwrap();
    let m = f
        .store
        .set_membership(a.id, user.id, Role::Admin)
        .await
        .unwrap();
    assert_eq!((m.role, m.email.as_str()), (Role::Admin, "ada@example.com"));
    f.store
        .set_membership(b.id, user.id, Role::Member)
        .await
        .unwrap();
    let ms = f.store.memberships(user.id).await.unwrap();
    assert_eq!(
        ms.iter()
            .map(|m| (m.workspace_id, m.role))
            .collect::<Vec<_>>(),
        vec![(a.id, Role::Admin), (b.id, Role::Member)]
    );
    assert_eq!(f.store.members(b.id).await.unwrap().len(), 1);
    let ghost = f
        .store
        .set_membership(a.id, keel_core::id::UserId::new(), Role::Admin)
        .await
        .unwrap_err();
    assert!(matches!(ghost, Error::NotFound { what: "user" }), "{ghost}");

    f.store.remove_membership(b.id, user.id).await.unwrap();
    assert!(f.store.members(b.id).await.unwrap().is_empty());
    let err = f.store.remove_membership(b.id, user.id).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

async fn refresh_tokens_rotate_and_a_replay_revokes_the_session(f: &Fixture) {
    use keel_core::auth::Email;
    use keel_store::security::{Refreshed, SessionRecord};
    let ws = f.store.create_workspace(&name("sessions")).await.unwrap();
    let user = f
        .store
        .create_user(&Email::parse("s@x.io").unwrap(), "h")
        .await
        .unwrap();
    f.store
        .set_membership(ws.id, user.id, Role::Member)
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let session = SessionRecord {
        id: keel_core::id::SessionId::new(),
        user_id: user.id,
        workspace_id: ws.id,
        created_at: now,
        expires_at: now + time::Duration::DAY,
        revoked_at: None,
    };
    f.store.create_session(&session, "t1").await.unwrap();
    let r = f.store.rotate_refresh("t1", "t2").await.unwrap();
    assert!(
        matches!(&r, Refreshed::Rotated(s, Role::Member) if s.id == session.id),
        "{r:?}"
    );
    let r = f.store.rotate_refresh("t2", "t3").await.unwrap();
    assert!(matches!(r, Refreshed::Rotated(..)), "{r:?}");
    assert_eq!(
        f.store.rotate_refresh("nope", "t9").await.unwrap(),
        Refreshed::Invalid
    );

    // t1 was spent: presenting it again is theft; the whole family dies, t3 included.
    let r = f.store.rotate_refresh("t1", "t4").await.unwrap();
    assert!(
        matches!(&r, Refreshed::Reused(s) if s.id == session.id),
        "{r:?}"
    );
    assert_eq!(
        f.store.rotate_refresh("t3", "t5").await.unwrap(),
        Refreshed::Invalid
    );

    // Logout revokes; an expired session cannot refresh; a removed member cannot either.
    let s2 = SessionRecord {
        id: keel_core::id::SessionId::new(),
        ..session.clone()
    };
    f.store.create_session(&s2, "u1").await.unwrap();
    let revoked = f
        .store
        .revoke_session("u1", "logout")
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(
        f.store.rotate_refresh("u1", "u2").await.unwrap(),
        Refreshed::Invalid
    );
    assert!(
        f.store
            .revoke_session("unknown", "logout")
            .await
            .unwrap()
            .is_none()
    );
    let s3 = SessionRecord {
        id: keel_core::id::SessionId::new(),
        expires_at: now - time::Duration::SECOND,
        ..session.clone()
    };
    f.store.create_session(&s3, "v1").await.unwrap();
    assert_eq!(
        f.store.rotate_refresh("v1", "v2").await.unwrap(),
        Refreshed::Invalid
    );
    let s4 = SessionRecord {
        id: keel_core::id::SessionId::new(),
        ..session
    };
    f.store.create_session(&s4, "w1").await.unwrap();
    f.store.remove_membership(ws.id, user.id).await.unwrap();
    assert_eq!(
        f.store.rotate_refresh("w1", "w2").await.unwrap(),
        Refreshed::Invalid
    );

    // Ended sessions (revoked, expired) go with their tokens; nothing live does.
    let live = SessionRecord {
        id: keel_core::id::SessionId::new(),
        ..s4
    };
    f.store.create_session(&live, "z1").await.unwrap();
    let cutoff = time::OffsetDateTime::now_utc() + time::Duration::SECOND;
    let removed = f.store.prune_sessions(cutoff).await.unwrap();
    assert_eq!(removed, 4, "reused, logged out, expired, member removed");
    let stays = f.store.revoke_session("z1", "logout").await.unwrap();
    assert!(stays.is_some(), "the live session stays");
}

fn audit(ws: WorkspaceId, action: &str) -> keel_store::security::NewAuditEntry {
    keel_store::security::NewAuditEntry {
        workspace_id: ws,
        actor: "key_test".into(),
        action: action.into(),
        target: Some("task_1".into()),
        ip: Some("10.0.0.1".into()),
        user_agent: Some("curl/8".into()),
        request_id: Some("req-1".into()),
        data: serde_json::json!({"n": action.len()}),
    }
}

async fn verify(f: &Fixture, ws: WorkspaceId) -> Vec<keel_store::security::ChainBreak> {
    let head = f.store.audit_head(ws).await.unwrap();
    let entries = f
        .store
        .list_audit(ws, &Default::default(), 0, 10_000)
        .await
        .unwrap();
    keel_store::security::verify_chain(&head, &entries)
}

async fn the_audit_log_chains_and_verify_finds_edits_and_deletions(f: &Fixture) {
    let a = f.store.create_workspace(&name("audit-a")).await.unwrap();
    let b = f.store.create_workspace(&name("audit-b")).await.unwrap();
    let stored = f
        .store
        .append_audit(&[
            audit(a.id, "key.created"),
            audit(b.id, "auth.login"),
            audit(a.id, "key.revoked"),
        ])
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 1, 2]
    );
    assert_eq!(stored[2].prev_hash, stored[0].hash);
    // Concurrent appends each extend the chain.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let store = f.store.clone();
        let ws = a.id;
        handles.push(tokio::spawn(async move {
            store
                .append_audit(&[audit(ws, "task.canceled")])
                .await
                .unwrap()
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let all = f
        .store
        .list_audit(a.id, &Default::default(), 0, 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 10);
    assert_eq!(all, {
        let mut sorted = all.clone();
        sorted.sort_by_key(|e| e.seq);
        sorted
    });
    assert_eq!(all[0], stored[0], "an entry reads back exactly as stored");
    assert_eq!(verify(f, a.id).await, vec![]);
    assert_eq!(verify(f, b.id).await, vec![]);
    let mut ws = f.store.audit_workspaces().await.unwrap();
    ws.sort();
    let mut want = vec![a.id, b.id];
    want.sort();
    assert_eq!(ws, want);

    // Filters.
    let filter = keel_store::security::AuditFilter {
        action: Some("key.*".into()),
        ..Default::default()
    };
    assert_eq!(
        f.store
            .list_audit(a.id, &filter, 0, 100)
            .await
            .unwrap()
            .len(),
        2
    );
    let filter = keel_store::security::AuditFilter {
        action: Some("task.canceled".into()),
        ..Default::default()
    };
    let page = f.store.list_audit(a.id, &filter, 5, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6, 7]);

    // Edit a row directly: verify names it. Then delete one: verify names the gap.
    let table_ws = match f.store.backend() {
        keel_store::Backend::Postgres => format!("'{}'::uuid", a.id.as_uuid()),
        keel_store::Backend::Sqlite => format!("X'{}'", a.id.as_uuid().simple()),
    };
    assert_eq!(
        raw_exec(
            f,
            &format!(
                "UPDATE audit_log SET actor = 'nobody' WHERE workspace_id = {table_ws} AND seq = 4"
            )
        )
        .await,
        1
    );
    let breaks = verify(f, a.id).await;
    assert_eq!(
        breaks.iter().map(|b| b.seq).collect::<Vec<_>>(),
        vec![4],
        "{breaks:?}"
    );
    assert_eq!(
        raw_exec(
            f,
            &format!("DELETE FROM audit_log WHERE workspace_id = {table_ws} AND seq = 7")
        )
        .await,
        1
    );
    let breaks = verify(f, a.id).await;
    assert!(
        breaks
            .iter()
            .any(|b| b.seq == 7 && b.problem.contains("missing")),
        "{breaks:?}"
    );
    assert_eq!(
        raw_exec(
            f,
            &format!("DELETE FROM audit_log WHERE workspace_id = {table_ws} AND seq = 10")
        )
        .await,
        1
    );
    let breaks = verify(f, a.id).await;
    assert!(
        breaks.iter().any(|b| b.problem.contains("head records 10")),
        "{breaks:?}"
    );
    assert_eq!(
        verify(f, b.id).await,
        vec![],
        "another workspace's chain is untouched"
    );
}

async fn audit_retention_moves_the_anchor_and_the_chain_still_verifies(f: &Fixture) {
    let ws = f
        .store
        .create_workspace(&name("audit-prune"))
        .await
        .unwrap();
    f.store
        .append_audit(&[audit(ws.id, "a"), audit(ws.id, "b"), audit(ws.id, "c")])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let cutoff = time::OffsetDateTime::now_utc();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    f.store.append_audit(&[audit(ws.id, "d")]).await.unwrap();
    assert_eq!(f.store.prune_audit(cutoff).await.unwrap(), 3);
    let head = f.store.audit_head(ws.id).await.unwrap();
    assert_eq!((head.seq, head.pruned_seq), (4, 3));
    assert_eq!(verify(f, ws.id).await, vec![]);
    f.store.append_audit(&[audit(ws.id, "e")]).await.unwrap();
    assert_eq!(verify(f, ws.id).await, vec![]);
    assert_eq!(f.store.prune_audit(cutoff).await.unwrap(), 0);
}

async fn workspace_limits_are_stored_per_workspace(f: &Fixture) {
    use keel_store::security::WorkspaceLimits;
    let a = f.store.create_workspace(&name("lim-a")).await.unwrap();
    let b = f.store.create_workspace(&name("lim-b")).await.unwrap();
    assert_eq!(
        f.store.workspace_limits(a.id).await.unwrap(),
        WorkspaceLimits::default()
    );
    let set = WorkspaceLimits {
        tier: Some("pro".into()),
        rpm: Some(600),
        tpm: None,
    };
    f.store.set_workspace_limits(a.id, &set).await.unwrap();
    assert_eq!(f.store.workspace_limits(a.id).await.unwrap(), set);
    assert_eq!(
        f.store.workspace_limits(b.id).await.unwrap(),
        WorkspaceLimits::default()
    );
    let changed = WorkspaceLimits {
        rpm: Some(60),
        ..set
    };
    f.store.set_workspace_limits(a.id, &changed).await.unwrap();
    assert_eq!(f.store.workspace_limits(a.id).await.unwrap().rpm, Some(60));
}

async fn budgets_reserve_exactly_and_alert_once_per_threshold(f: &Fixture) {
    use keel_store::budgets::{NewBudget, Period, Reservation};
    let ws = f.store.create_workspace(&name("budget")).await.unwrap();
    let other = f
        .store
        .create_workspace(&name("budget-other"))
        .await
        .unwrap();
    let (_, new) = new_key(ws.id, Role::Member);
    let key = f.store.create_api_key(new).await.unwrap();
    let (_, new) = new_key(other.id, Role::Member);
    let foreign = f.store.create_api_key(new).await.unwrap();
    let budget = |key_id, limit| NewBudget {
        workspace_id: ws.id,
        key_id,
        period: Period::Daily,
        limit_nanousd: limit,
        thresholds: vec![50, 80, 100],
    };
    let err = f
        .store
        .set_budget(&budget(Some(foreign.id), 10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    f.store.set_budget(&budget(None, 1000)).await.unwrap();
    f.store
        .set_budget(&budget(Some(key.id), 600))
        .await
        .unwrap();

    // Concurrent reservations of 100 against the key's 600: exactly 6 succeed.
    let mut handles = Vec::new();
    for _ in 0..20 {
        let store = f.store.clone();
        let key = key.id;
        handles.push(tokio::spawn(async move {
            store.reserve_budget(ws.id, Some(key), 100).await.unwrap()
        }));
    }
    let mut reserved = 0;
    let mut key_held = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Reservation::Reserved(held) => {
                reserved += 1;
                assert_eq!(held.len(), 2, "the workspace's budget and the key's");
                key_held = held;
            }
            Reservation::Exceeded(b) => {
                assert_eq!(b.key_id, Some(key.id), "the key's budget refuses first")
            }
        }
    }
    assert_eq!(reserved, 6);
    // A request without the key sees only the workspace budget: 1000 - 600 reserved.
    let Reservation::Reserved(ws_held) = f.store.reserve_budget(ws.id, None, 400).await.unwrap()
    else {
        panic!("400 fits the workspace's budget")
    };
    assert_eq!(ws_held.len(), 1);
    assert!(
        matches!(f.store.reserve_budget(ws.id, None, 1).await.unwrap(), Reservation::Exceeded(b) if b.key_id.is_none())
    );

    // Settle: the reservations go, the real (smaller) costs stay; thresholds fire once.
    let mut fired = Vec::new();
    for _ in 0..6 {
        for e in f
            .store
            .settle_budget(ws.id, Some(key.id), &key_held, 100, 90)
            .await
            .unwrap()
        {
            fired.push((
                e.data["budget"].as_str().unwrap().to_owned(),
                e.data["threshold_percent"].as_i64().unwrap(),
            ));
        }
    }
    f.store
        .settle_budget(ws.id, None, &ws_held, 400, 0)
        .await
        .unwrap();
    // A settlement does not release a hold from a budget it was not reserved in: a
    // budget created after the reservation keeps others' holds.
    let (_, new) = new_key(ws.id, Role::Member);
    let late_key = f.store.create_api_key(new).await.unwrap();
    let Reservation::Reserved(late_held) = f
        .store
        .reserve_budget(ws.id, Some(late_key.id), 50)
        .await
        .unwrap()
    else {
        panic!("fits")
    };
    f.store
        .set_budget(&budget(Some(late_key.id), 500))
        .await
        .unwrap();
    let Reservation::Reserved(_) = f
        .store
        .reserve_budget(ws.id, Some(late_key.id), 70)
        .await
        .unwrap()
    else {
        panic!("fits")
    };
    f.store
        .settle_budget(ws.id, Some(late_key.id), &late_held, 50, 0)
        .await
        .unwrap();
    let budgets = f.store.budgets(ws.id).await.unwrap();
    let late = budgets
        .iter()
        .find(|b| b.key_id == Some(late_key.id))
        .unwrap();
    assert_eq!(late.reserved_nanousd, 70, "the later hold stays");
    let whole = budgets.iter().find(|b| b.key_id.is_none()).unwrap();
    assert_eq!(
        whole.reserved_nanousd, 70,
        "the workspace's: 50 released, 70 held"
    );
    // Key: 540 of 600 = 90 % → 50, 80. Workspace: 540 of 1000 = 54 % → 50.
    fired.sort();
    assert_eq!(
        fired,
        vec![
            (format!("key {} daily", key.id), 50),
            (format!("key {} daily", key.id), 80),
            ("workspace daily".to_owned(), 50),
        ]
    );
    let budgets = f.store.budgets(ws.id).await.unwrap();
    let mine = budgets.iter().find(|b| b.key_id == Some(key.id)).unwrap();
    assert_eq!(
        (
            mine.spent_nanousd,
            mine.reserved_nanousd,
            mine.alerted_percent
        ),
        (540, 0, 80)
    );
    // The events are in the workspace's log, with the change.
    let head = f.store.event_head(ws.id).await.unwrap();
    assert_eq!(head.last_seq, 3);
    f.store
        .delete_budget(ws.id, Some(key.id), Period::Daily)
        .await
        .unwrap();
    let err = f
        .store
        .delete_budget(ws.id, Some(key.id), Period::Daily)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

async fn claims_respect_each_agents_concurrency_limit(f: &Fixture) {
    use keel_core::task::Priority;
    let ws = f.store.ensure_workspace(&name("per-agent")).await.unwrap();
    let limited = f
        .store
        .put_agent(
            ws.id,
            "limited",
            &serde_json::json!({"name": "limited", "max_concurrency": 2}),
            false,
            false,
        )
        .await
        .unwrap();
    let free = runtime_fixtures::agent(f, ws.id).await;
    for _ in 0..5 {
        runtime_fixtures::create(
            f,
            runtime_fixtures::new_task(&limited, Priority::High, None),
        )
        .await;
    }
    for _ in 0..3 {
        runtime_fixtures::create(f, runtime_fixtures::new_task(&free, Priority::Low, None)).await;
    }
    // One batch could take everything: the limited agent gets 2, the rest go to others.
    let (one, two) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let first = f
        .store
        .claim_tasks(one, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    let count = |ts: &[keel_store::runtime::TaskRecord], a: &keel_store::runtime::AgentRecord| {
        ts.iter().filter(|t| t.agent_id == a.id).count()
    };
    assert_eq!(
        (count(&first, &limited), count(&first, &free)),
        (2, 3),
        "{first:?}"
    );
    // Another worker (another instance) gets none of the limited agent's while two run.
    let second = f
        .store
        .claim_tasks(two, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert!(second.is_empty(), "{second:?}");
    // One lets go: one more may start, and only one.
    let done = first.iter().find(|t| t.agent_id == limited.id).unwrap().id;
    f.store.release_leases(one, &[done]).await.unwrap();
    let third = f
        .store
        .claim_tasks(two, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert_eq!(count(&third, &limited), 1, "{third:?}");
    // Raising the limit (a new spec version) lets more start.
    f.store
        .put_agent(
            ws.id,
            "limited",
            &serde_json::json!({"name": "limited", "max_concurrency": 10}),
            false,
            false,
        )
        .await
        .unwrap();
    let fourth = f
        .store
        .claim_tasks(two, runtime_fixtures::later(60), 10)
        .await
        .unwrap();
    assert_eq!(
        count(&fourth, &limited),
        3,
        "the five, less the two running: {fourth:?}"
    );
}

async fn agent_stats_count_every_task_of_the_agent(f: &Fixture) {
    use keel_store::runtime::Finish;
    let ws = f.store.ensure_workspace(&name("stats")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    runtime_fixtures::create_many(f, &agent, 6).await;
    let owner = uuid::Uuid::now_v7();
    let claimed = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), 4)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    for (i, task) in claimed.iter().enumerate() {
        let run = runtime_fixtures::start(f, task, owner).await;
        let finish = match i {
            0 => Finish::Completed { output: None },
            1 => {
                // A slower one: the p95 of two is the slower.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                Finish::Completed { output: None }
            }
            2 => Finish::Failed {
                error: serde_json::json!({"kind": "llm", "message": "boom"}),
                dead_letter: false,
            },
            _ => continue,
        };
        runtime_fixtures::end(f, task, run, owner, finish).await;
    }
    let now = time::OffsetDateTime::now_utc();
    let stats = f
        .store
        .agent_stats(
            ws.id,
            agent.id,
            &[
                now - time::Duration::hours(1),
                now + time::Duration::hours(1),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        (stats.submitted, stats.working, stats.input_required),
        (2, 1, 0)
    );
    let hour = stats.windows[0];
    assert_eq!((hour.finished, hour.completed), (3, 2));
    let p95 = hour.p95_ms.unwrap();
    assert!((300..60_000).contains(&p95), "p95 {p95} ms");
    assert_eq!(
        stats.windows[1],
        keel_store::runtime::WindowStats::default()
    );
    assert_eq!(stats.last_error.map(|t| t.id), Some(claimed[2].id));
    // Another workspace sees none of them.
    let other = f
        .store
        .ensure_workspace(&name("stats-other"))
        .await
        .unwrap();
    let none = f
        .store
        .agent_stats(other.id, agent.id, &[now])
        .await
        .unwrap();
    assert_eq!((none.submitted, none.working), (0, 0));
    assert!(none.last_error.is_none());
}

/// An agent's last error is the task whose error was recorded last, even when an earlier
/// failure's task has changed since (retried and started again): the status reads
/// `errored_at`, and a checkpoint's progress leaves every indexed column alone.
async fn the_last_error_is_the_latest_recorded_not_the_latest_touched(f: &Fixture) {
    use keel_store::runtime::Finish;
    let ws = f.store.ensure_workspace(&name("last-error")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    runtime_fixtures::create_many(f, &agent, 2).await;
    let owner = uuid::Uuid::now_v7();
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(20));
    let claimed = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), 2)
        .await
        .unwrap();
    let [first, second] = claimed.as_slice() else {
        panic!("claimed {claimed:?}");
    };
    let run = runtime_fixtures::start(f, first, owner).await;
    let retry = Finish::Retry {
        error: serde_json::json!({"kind": "tool", "message": "first"}),
        retry_at: time::OffsetDateTime::now_utc(),
    };
    runtime_fixtures::end(f, first, run, owner, retry).await;
    pause().await;
    let run = runtime_fixtures::start(f, second, owner).await;
    let failed = Finish::Failed {
        error: serde_json::json!({"kind": "llm", "message": "second"}),
        dead_letter: false,
    };
    runtime_fixtures::end(f, second, run, owner, failed).await;
    pause().await;
    // The first is due again: claimed and started anew, it changes after the second's
    // failure while still holding its own, older error.
    let again = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), 2)
        .await
        .unwrap();
    assert_eq!(
        again.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![first.id]
    );
    runtime_fixtures::start(f, first, owner).await;
    let (first_now, second_now) = (
        f.store.task(ws.id, first.id).await.unwrap(),
        f.store.task(ws.id, second.id).await.unwrap(),
    );
    assert!(first_now.error.is_some(), "{first_now:?}");
    assert!(
        first_now.updated_at > second_now.updated_at,
        "the first changed last: {first_now:?} {second_now:?}"
    );
    let stats = f
        .store
        .agent_stats(ws.id, agent.id, &[time::OffsetDateTime::now_utc()])
        .await
        .unwrap();
    assert_eq!(stats.last_error.map(|t| t.id), Some(second.id));
}

async fn task_counts_are_of_the_live_statuses_only(f: &Fixture) {
    use keel_core::task::TaskStatus;
    use keel_store::runtime::Finish;
    let ws = f
        .store
        .ensure_workspace(&name("live-counts"))
        .await
        .unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    runtime_fixtures::create_many(f, &agent, 3).await;
    let owner = uuid::Uuid::now_v7();
    let claimed = f
        .store
        .claim_tasks(owner, runtime_fixtures::later(60), 2)
        .await
        .unwrap();
    let [done, working] = claimed.as_slice() else {
        panic!("claimed {claimed:?}");
    };
    let run = runtime_fixtures::start(f, done, owner).await;
    runtime_fixtures::end(
        f,
        done,
        run,
        owner,
        Finish::Completed {
            output: Some("ok".to_owned()),
        },
    )
    .await;
    runtime_fixtures::start(f, working, owner).await;
    let mut counts = f.store.task_counts().await.unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(
        counts,
        vec![(TaskStatus::Submitted, 1), (TaskStatus::Working, 1)],
        "the completed task is not counted, and no status without tasks is listed"
    );
}

async fn concurrent_creations_with_one_key_make_one_task(f: &Fixture) {
    use keel_store::runtime::Created;
    let ws = f.store.ensure_workspace(&name("key-race")).await.unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let head = f.store.event_head(ws.id).await.unwrap().last_seq;
    // Both look the key up before either has created its task, so one of them finds the
    // key taken only when it writes, and must answer with the other's task.
    let tries = (0..8).map(|_| {
        f.store.create_task(runtime_fixtures::new_task(
            &agent,
            keel_core::task::Priority::Medium,
            Some("same-key"),
        ))
    });
    let created = futures_util::future::join_all(tries).await;
    let mut ids = Vec::new();
    let mut new = 0;
    for c in created {
        match c.unwrap() {
            Created::New(task, events) => {
                new += 1;
                assert_eq!(events.len(), 1);
                ids.push(task.id);
            }
            Created::Existing(task) => ids.push(task.id),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(new, 1, "exactly one creation wrote a task");
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(
        f.store.event_head(ws.id).await.unwrap().last_seq,
        head + 1,
        "one task.created, no event of the losers"
    );
    // The writer is usable after the losers rolled back.
    runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&agent, keel_core::task::Priority::Medium, None),
    )
    .await;
    assert_eq!(f.store.event_head(ws.id).await.unwrap().last_seq, head + 2);
}

async fn a_refused_creation_leaves_the_others_made_with_it(f: &Fixture) {
    use keel_core::task::Priority;
    use keel_store::runtime::Created;
    let ws = f
        .store
        .ensure_workspace(&name("mixed-batch"))
        .await
        .unwrap();
    let other = f
        .store
        .ensure_workspace(&name("mixed-batch-other"))
        .await
        .unwrap();
    let agent = runtime_fixtures::agent(f, ws.id).await;
    let other_agent = runtime_fixtures::agent(f, other.id).await;
    let foreign = runtime_fixtures::create(
        f,
        runtime_fixtures::new_task(&other_agent, Priority::Medium, None),
    )
    .await;
    let head = f.store.event_head(ws.id).await.unwrap().last_seq;
    // Made together (on SQLite, in one transaction): the one naming another workspace's
    // thread is refused; the others, before and after it, are made with their events.
    let tasks = (0..5).map(|k| {
        let mut t = runtime_fixtures::new_task(&agent, Priority::Medium, None);
        if k == 2 {
            t.thread_id = Some(foreign.thread_id);
        }
        t
    });
    let created = futures_util::future::join_all(tasks.map(|t| f.store.create_task(t))).await;
    let mut made = Vec::new();
    for (k, c) in created.into_iter().enumerate() {
        match (k, c) {
            (2, Err(Error::NotFound { what: "thread" })) => {}
            (k, Ok(Created::New(task, events))) if k != 2 => {
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].task_id, Some(task.id));
                made.push(task.id);
            }
            (k, other) => panic!("creation {k}: {other:?}"),
        }
    }
    assert_eq!(made.len(), 4);
    assert_eq!(f.store.event_head(ws.id).await.unwrap().last_seq, head + 4);
    for id in made {
        assert_eq!(f.store.task(ws.id, id).await.unwrap().id, id);
    }
}
