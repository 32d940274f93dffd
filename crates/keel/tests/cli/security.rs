//! The operator's security commands against a real `keel serve`: users made with
//! `keel admin create-user` log in over HTTP, and `keel audit verify` catches an audit
//! row edited directly in the database.

use serde_json::{Value, json};

use crate::support::{Keel, client, run};

const SECRET: &str = "cli-test-secret-long-enough-for-hs256-000001";

#[tokio::test]
async fn users_log_in_and_audit_verify_catches_an_edited_row() {
    let dir = tempfile::tempdir().unwrap();
    let create = |password: &str| {
        run(
            dir.path(),
            &[
                "admin",
                "create-user",
                "--email",
                "ada@example.com",
                "--workspace",
                "acme",
                "--role",
                "admin",
                "--data-dir",
                "data",
            ],
            &[("KEEL_PASSWORD", password)],
        )
    };
    let weak = create("short");
    assert!(!weak.status.success());
    assert!(
        String::from_utf8_lossy(&weak.stderr).contains("at least 12 characters"),
        "{weak:?}"
    );
    let made = create("correct horse battery staple");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert!(
        String::from_utf8_lossy(&made.stdout)
            .trim()
            .starts_with("usr_")
    );

    let keel = Keel::start(dir.path(), &[("KEEL_JWT_SECRET", SECRET)]).await;
    let http = client();
    let res = http
        .post(keel.url("/v1/auth/login"))
        .json(&json!({"email": "ada@example.com", "password": "correct horse battery staple"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let session: Value = res.json().await.unwrap();
    let access = session["access_token"].as_str().unwrap();
    let res = http
        .post(keel.url("/v1/keys"))
        .bearer_auth(access)
        .json(&json!({"role": "viewer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let key: Value = res.json().await.unwrap();
    let res = http
        .delete(keel.url(&format!("/v1/keys/{}", key["id"].as_str().unwrap())))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let verify = || run(dir.path(), &["audit", "verify", "--data-dir", "data"], &[]);
    let ok = verify();
    let stdout = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(ok.status.success(), "{stdout}");
    // create-user's role, the login, the key created and revoked.
    assert!(stdout.contains("\tok\t4 entries"), "{stdout}");

    // Someone with database access rewrites who revoked the key.
    let db = dir.path().join("data").join("keel.db");
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&db))
            .await
            .unwrap();
    let edited = sqlx::query("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 4")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(edited.rows_affected(), 1);
    let broken = verify();
    let stdout = String::from_utf8_lossy(&broken.stdout).into_owned();
    assert_eq!(broken.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("BROKEN\tseq 4\tits contents do not match its hash"),
        "{stdout}"
    );

    // Deleting a row to hide it is caught too.
    sqlx::query("DELETE FROM audit_log WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let broken = verify();
    let stdout = String::from_utf8_lossy(&broken.stdout).into_owned();
    assert_eq!(broken.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("seq 2\tentries 2..2 are missing"),
        "{stdout}"
    );

    // An operator changes the workspace's limits from the command line.
    let set = run(
        dir.path(),
        &[
            "admin",
            "set-limits",
            "--workspace",
            "acme",
            "--tier",
            "free",
            "--data-dir",
            "data",
        ],
        &[],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let bad = run(
        dir.path(),
        &[
            "admin",
            "set-limits",
            "--workspace",
            "acme",
            "--tier",
            "gold",
            "--data-dir",
            "data",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("known: enterprise, free, pro, unlimited"),
        "{bad:?}"
    );
}
