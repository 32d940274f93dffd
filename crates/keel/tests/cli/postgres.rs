//! Keel on Postgres: the same binary, `KEEL_DATABASE_URL` set; readiness follows the
//! database through an outage without a restart. The outage is real at the network level:
//! Keel reaches Postgres through a TCP proxy that the test cuts and restores.

use std::time::Duration;

use crate::support::{Keel, Proxy, client, create_key, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_postgres_down_and_back_without_a_restart() {
    let Some(url) = keel_store::testing::fresh_postgres_db().await.unwrap() else {
        return;
    };
    // postgres://user@host:port/db → the host:port part goes through the proxy.
    let (scheme_user, rest) = url.rsplit_once('@').unwrap();
    let (hostport, db) = rest.split_once('/').unwrap();
    let proxy = Proxy::start(hostport.to_owned()).await;
    let proxied = format!("{scheme_user}@127.0.0.1:{}/{db}", proxy.port);
    let env = [
        ("KEEL_DATABASE_URL", proxied.as_str()),
        ("KEEL_DATABASE__ACQUIRE_TIMEOUT", "1s"),
    ];

    let dir = tempfile::tempdir().unwrap();
    let key = create_key(dir.path(), "pg-team", "admin", &env);
    let keel = Keel::start(dir.path(), &env).await;
    let http = client();

    let ready = http.get(keel.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["database"],
        "postgres"
    );
    let me = http
        .get(keel.url("/v1/workspaces/current"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);

    proxy.down();
    eventually(
        Duration::from_secs(20),
        "readyz reports 503 while Postgres is away",
        || async {
            let res = http.get(keel.url("/readyz")).send().await.unwrap();
            if res.status() != 503 {
                return false;
            }
            let body = crate::support::assert_problem(res, 503).await;
            assert!(
                body["detail"]
                    .as_str()
                    .unwrap()
                    .contains("database (postgres)"),
                "{body}"
            );
            true
        },
    )
    .await;
    // An authenticated request during the outage is a 503 problem, never a 500.
    let res = http
        .get(keel.url("/v1/workspaces/current"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503, "{}", keel.output());
    crate::support::assert_problem(res, 503).await;

    proxy.restore();
    eventually(
        Duration::from_secs(20),
        "readyz recovers once Postgres is back",
        || async { http.get(keel.url("/readyz")).send().await.unwrap().status() == 200 },
    )
    .await;
    let me = http
        .get(keel.url("/v1/workspaces/current"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
}
