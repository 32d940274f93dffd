//! `keel events validate` checks a file of events against the published schemas.

use crate::support::run;

#[test]
fn validate_reports_each_bad_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"event_id":"evt_0190a8f6e3b07c3e8d0f1a2b3c4d5e6f","event_type":"system.ping","timestamp":"2026-11-22T10:00:00.123456Z","seq":1,"correlation_id":null,"workspace_id":"ws_0190a8f6e3b07c3e8d0f1a2b3c4d5e6f","agent_id":null,"task_id":null,"run_id":null,"data":{"message":"hi"},"version":"1.0"}"#;
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, format!("{good}\n\n{good}\n")).unwrap();
    let ok = run(
        dir.path(),
        &["events", "validate", file.to_str().unwrap()],
        &[],
    );
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("2 events, all valid"));

    let missing_attempt = good.replace("system.ping", "task.started");
    let bad_seq = good.replace(r#""seq":1"#, r#""seq":0"#);
    std::fs::write(
        &file,
        format!("{good}\nnot json\n{missing_attempt}\n{bad_seq}\n"),
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["events", "validate", file.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("line 2: not JSON"), "{stdout}");
    assert!(
        stdout.contains("line 3:") && stdout.contains("attempt"),
        "{stdout}"
    );
    assert!(stdout.contains("line 4: /seq"), "{stdout}");
    assert!(!stdout.contains("line 1:"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 of 4 events are invalid"),
        "{out:?}"
    );
}

/// `keel events tail ARGS` with `KEEL_API_KEY`, and its stdout as lines.
fn tail(
    dir: &std::path::Path,
    key: &str,
    args: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt as _;

    let mut cmd: tokio::process::Command = crate::support::keel_command(dir).into();
    let mut child = cmd
        .args(["events", "tail"])
        .args(args)
        .env("KEEL_API_KEY", key)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The next event `keel events tail` prints; fails the test after 10 s.
async fn next_event(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .expect("tail prints the next event within 10 s")
        .unwrap()
        .unwrap();
    serde_json::from_str(&line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_the_stream_one_json_event_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = crate::support::create_key(dir.path(), "tail-team", "admin", &[]);
    let mut keel = crate::support::Keel::start(dir.path(), &[]).await;
    let url = keel.url("");
    let (mut tail, mut lines) = tail(
        dir.path(),
        &key,
        &["--types", "system.*", "--after", "0", "--url", &url],
    );
    let http = crate::support::client();
    for n in 0..3 {
        let res = http
            .post(keel.url("/v1/events/ping"))
            .bearer_auth(&key)
            .json(&serde_json::json!({ "message": format!("t{n}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    for n in 0..3 {
        let event = next_event(&mut lines).await;
        assert_eq!(event["seq"], n + 1);
        assert_eq!(event["data"]["message"], format!("t{n}"));
    }
    tail.kill().await.unwrap();
    keel.stop_cleanly(std::time::Duration::from_secs(15)).await;
}

/// Two `keel serve` processes on one Postgres database: an event committed by either
/// reaches a stream on the other, in seq order, through `LISTEN/NOTIFY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_postgres_stream_each_others_events_in_order() {
    let Some(url) = keel_store::testing::fresh_postgres_db().await.unwrap() else {
        return;
    };
    let env = [("KEEL_DATABASE_URL", url.as_str())];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = crate::support::create_key(dir_a.path(), "two-team", "admin", &env);
    let mut a = crate::support::Keel::start(dir_a.path(), &env).await;
    let mut b = crate::support::Keel::start(dir_b.path(), &env).await;
    let b_url = b.url("");
    let (mut tail, mut lines) = tail(dir_b.path(), &key, &["--after", "0", "--url", &b_url]);
    let http = crate::support::client();
    // p0 on B, read back: the tail is live from then on. Then A, B, A, A: the last two
    // reach B's stream only through the notification, not by filling a gap when B
    // commits something itself.
    for (n, node) in [&b, &a, &b, &a, &a].into_iter().enumerate() {
        let res = http
            .post(node.url("/v1/events/ping"))
            .bearer_auth(&key)
            .json(&serde_json::json!({ "message": format!("p{n}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        if n > 0 {
            continue;
        }
        let event = next_event(&mut lines).await;
        assert_eq!(event["seq"], 1, "{event}");
    }
    for n in 1..5 {
        let event = next_event(&mut lines).await;
        assert_eq!(event["seq"], n + 1, "{event}");
        assert_eq!(event["data"]["message"], format!("p{n}"), "{event}");
    }
    tail.kill().await.unwrap();
    for keel in [&mut a, &mut b] {
        keel.stop_cleanly(std::time::Duration::from_secs(15)).await;
    }
}
