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
use keel_core::id::{ApiKeyId, WorkspaceId};
use keel_core::workspace::WorkspaceName;
use keel_store::{Error, GroupBy, NewApiKey, Store, UsageRecord, UsageRow};

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
        (ws.id, key.id, Role::Member)
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

async fn usage_batches_larger_than_one_statement_are_stored_whole(f: &Fixture) {
    let ws = f.store.create_workspace(&name("bulk")).await.unwrap();
    let at = time::OffsetDateTime::now_utc();
    let records: Vec<UsageRecord> = (0..1_234)
        .map(|_| usage(ws.id, None, "r", "m", at))
        .collect();
    f.store.insert_usage(&records).await.unwrap();
    let rows = f
        .store
        .usage_summary(
            ws.id,
            at - time::Duration::hours(1),
            at + time::Duration::hours(1),
            GroupBy::Route,
        )
        .await
        .unwrap();
    assert_eq!(rows[0].requests, 1_234);
    assert_eq!(rows[0].cost_nanousd, 1_234 * 1_500);
}
