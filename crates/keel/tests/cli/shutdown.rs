//! Graceful shutdown: SIGTERM stops new connections, lets an in-flight request finish,
//! and exits 0.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{Keel, create_key};

#[tokio::test]
async fn sigterm_during_a_slow_request_lets_it_finish_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let key = create_key(dir.path(), "acme", "admin", &[]);
    let mut keel = Keel::start(dir.path(), &[]).await;

    // A slow client: headers now, half the body, the rest after SIGTERM.
    let body = br#"{"role":"viewer","name":"sent slowly"}"#;
    let (first, rest) = body.split_at(body.len() / 2);
    let mut conn = TcpStream::connect(keel.addr).await.unwrap();
    let head = format!(
        "POST /v1/keys HTTP/1.1\r\nHost: keel\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(first).await.unwrap();
    conn.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    keel.signal("-TERM");
    crate::support::eventually(Duration::from_secs(10), "shutdown begins", || async {
        keel.output().contains("shutting down")
    })
    .await;
    // No new connections are accepted while draining.
    assert!(
        TcpStream::connect(keel.addr).await.is_err(),
        "listener closed on SIGTERM"
    );

    conn.write_all(rest).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the in-flight request completed: {response}"
    );
    assert!(response.contains("sent slowly"));

    assert_eq!(
        keel.wait(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        keel.output()
    );
    assert!(keel.output().contains("\"message\":\"stopped\""));
}

#[tokio::test]
async fn sigint_stops_an_idle_server_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut keel = Keel::start(dir.path(), &[]).await;
    // An idle keep-alive connection must not hold shutdown up.
    let _idle = TcpStream::connect(keel.addr).await.unwrap();
    keel.signal("-INT");
    assert_eq!(
        keel.wait(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        keel.output()
    );
}
