//! Event export to NATS JetStream through a real outage: Keel reaches the local NATS
//! through a TCP proxy that the test cuts mid-stream and restores. Every event arrives
//! exactly once (JetStream drops re-published duplicates by `Nats-Msg-Id`), in order.

use std::time::Duration;

use async_nats::jetstream;
use serde_json::Value;

use crate::support::{Keel, Proxy, client, create_key, eventually};

fn nats_hostport() -> String {
    std::env::var("KEEL_TEST_NATS").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

async fn ping(keel: &Keel, key: &str, n: usize) {
    let res = client()
        .post(keel.url("/v1/events/ping"))
        .bearer_auth(key)
        .json(&serde_json::json!({ "message": format!("m{n}") }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
}

async fn messages(stream: &mut jetstream::stream::Stream) -> u64 {
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_jetstream_in_order_through_a_nats_outage() {
    let nats = async_nats::connect(nats_hostport())
        .await
        .unwrap_or_else(|e| panic!("NATS for tests is not reachable at {} ({e}); start it (see README) or set KEEL_TEST_NATS", nats_hostport()));
    let js = jetstream::new(nats);
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (stream_name, prefix) = (format!("KEEL_TEST_{id}"), format!("keeltest{id}"));

    let proxy = Proxy::start(nats_hostport()).await;
    let url = format!("nats://127.0.0.1:{}", proxy.port);
    let env = [
        ("KEEL_NATS_URL", url.as_str()),
        ("KEEL_NATS__STREAM", stream_name.as_str()),
        ("KEEL_NATS__SUBJECT_PREFIX", prefix.as_str()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let key = create_key(dir.path(), "nats-team", "admin", &env);
    let mut keel = Keel::start(dir.path(), &env).await;

    for n in 0..20 {
        ping(&keel, &key, n).await;
    }
    eventually(
        Duration::from_secs(15),
        "the first 20 events in JetStream",
        || {
            let js = js.clone();
            let name = stream_name.clone();
            async move {
                match js.get_stream(&name).await {
                    Ok(mut s) => messages(&mut s).await == 20,
                    Err(_) => false,
                }
            }
        },
    )
    .await;

    // NATS goes away mid-stream: events keep committing in Keel, none reach the stream.
    proxy.down();
    for n in 20..40 {
        ping(&keel, &key, n).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    assert_eq!(
        messages(&mut stream).await,
        20,
        "nothing arrives during the outage"
    );

    // It comes back: the rest arrive, once each.
    proxy.restore();
    eventually(
        Duration::from_secs(30),
        "all 40 events in JetStream",
        || {
            let js = js.clone();
            let name = stream_name.clone();
            async move { messages(&mut js.get_stream(&name).await.unwrap()).await >= 40 }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(messages(&mut stream).await, 40, "no duplicates");
    let mut ids = std::collections::BTreeSet::new();
    for seq in 1..=40u64 {
        let message = stream.get_raw_message(seq).await.unwrap();
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(event["seq"].as_u64(), Some(seq), "in seq order");
        assert_eq!(event["data"]["message"], format!("m{}", seq - 1));
        let workspace = event["workspace_id"].as_str().unwrap();
        assert_eq!(
            message.subject.as_str(),
            format!("{prefix}.{workspace}.system.ping")
        );
        let msg_id = message
            .headers
            .get("Nats-Msg-Id")
            .unwrap()
            .as_str()
            .to_owned();
        assert_eq!(msg_id, event["event_id"].as_str().unwrap());
        ids.insert(msg_id);
    }
    assert_eq!(ids.len(), 40);
    js.delete_stream(&stream_name).await.unwrap();
    keel.stop_cleanly(Duration::from_secs(15)).await;
}
