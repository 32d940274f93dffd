//! Export of the event log to NATS JetStream, at least once, in seq order per workspace.
//!
//! One instance at a time exports (it holds the `nats` exporter lease). For each workspace
//! with events past its persisted cursor, the exporter publishes up to `nats.batch` events
//! on `<prefix>.<workspace id>.<event type>` with `Nats-Msg-Id` = the event id, awaits the
//! stream's acknowledgements in order, and moves the cursor past the acknowledged prefix.
//! A NATS outage only stops the cursor: nothing is lost, and what was published but not
//! acknowledged is published again — JetStream drops the duplicate by its message id.

use std::time::Duration;

use async_nats::jetstream;
use keel_core::config::Nats as NatsConfig;
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;

use crate::events::EventLog;

/// The exporter's name in the store (lease and cursors).
const EXPORTER: &str = "nats";
/// How long the lease lasts; renewed every pass.
const LEASE: Duration = Duration::from_secs(15);
/// Pause between passes when there is nothing to export.
const IDLE: Duration = Duration::from_millis(100);
/// Longest wait for one acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the exporter until `stop` is cancelled. Never returns early: a NATS or database
/// outage is logged, counted and retried.
pub async fn run(log: EventLog, config: NatsConfig, stop: CancellationToken) {
    let Some(url) = config.url.as_ref().map(|u| u.expose_secret().to_owned()) else {
        return;
    };
    let owner = uuid::Uuid::now_v7();
    let connect = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(ACK_TIMEOUT))
        .name("keel-event-export")
        .connect(url.as_str());
    let client = tokio::select! {
        c = connect => c,
        () = stop.cancelled() => return,
    };
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot configure the NATS client; event export is off");
            return;
        }
    };
    let js = jetstream::new(client);
    let mut stream_ready = false;
    let mut delay = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let outcome = pass(&log, &config, &js, owner, &mut stream_ready).await;
        let wait = match outcome {
            Ok(0) => {
                delay = Duration::from_millis(100);
                IDLE
            }
            Ok(_) => {
                delay = Duration::from_millis(100);
                Duration::ZERO
            }
            Err(e) => {
                metrics::counter!("keel_events_export_errors_total").increment(1);
                tracing::warn!(error = %e, retry_in = ?delay, "event export to NATS failed; will retry");
                let wait = delay;
                delay = (delay * 2).min(Duration::from_secs(5));
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One pass over every workspace with a backlog; returns how many events were exported.
async fn pass(
    log: &EventLog,
    config: &NatsConfig,
    js: &jetstream::Context,
    owner: uuid::Uuid,
    stream_ready: &mut bool,
) -> Result<usize, String> {
    let store = log.store();
    let until = time::OffsetDateTime::now_utc()
        + time::Duration::try_from(LEASE).unwrap_or(time::Duration::MAX);
    if !store
        .lease_exporter(EXPORTER, owner, until)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(0);
    }
    let backlog = store
        .export_backlog(EXPORTER)
        .await
        .map_err(|e| e.to_string())?;
    let lag: i64 = backlog
        .iter()
        .map(|b| b.last_seq - b.exported.max(b.pruned_through))
        .sum();
    metrics::gauge!("keel_events_export_lag").set(lag as f64);
    if backlog.is_empty() {
        metrics::gauge!("keel_events_export_oldest_pending_seconds").set(0.0);
        return Ok(0);
    }
    if !*stream_ready {
        js.get_or_create_stream(jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: vec![format!("{}.>", config.subject_prefix)],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot create or find stream {}: {e}", config.stream))?;
        *stream_ready = true;
    }
    let mut exported = 0;
    let mut oldest: Option<time::OffsetDateTime> = None;
    for b in backlog {
        let after = b.exported.max(b.pruned_through);
        if b.exported < b.pruned_through {
            tracing::warn!(workspace_id = %b.workspace_id, from = b.exported + 1, through = b.pruned_through,
                "events were pruned by retention before they could be exported");
        }
        let limit = u32::try_from(config.batch).unwrap_or(256);
        let events = store
            .events_after(b.workspace_id, after, limit)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(first) = events.first() {
            oldest = Some(oldest.map_or(first.timestamp, |o| o.min(first.timestamp)));
        }
        // Publish the batch, then await the acknowledgements in order.
        let mut acks = Vec::with_capacity(events.len());
        for event in &events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
            let subject = format!(
                "{}.{}.{}",
                config.subject_prefix, event.workspace_id, event.event_type
            );
            let payload = serde_json::to_vec(event).map_err(|e| e.to_string())?;
            match js
                .publish_with_headers(subject, headers, payload.into())
                .await
            {
                Ok(ack) => acks.push((event.seq, ack)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish an event to NATS");
                    break;
                }
            }
        }
        let mut through = after;
        let mut failure = None;
        for (seq, ack) in acks {
            match tokio::time::timeout(ACK_TIMEOUT, ack).await {
                Ok(Ok(_)) => through = seq,
                Ok(Err(e)) => {
                    failure = Some(format!("NATS did not acknowledge seq {seq}: {e}"));
                    break;
                }
                Err(_) => {
                    failure = Some(format!(
                        "NATS did not acknowledge seq {seq} within {ACK_TIMEOUT:?}"
                    ));
                    break;
                }
            }
        }
        if through > after {
            store
                .advance_export(EXPORTER, b.workspace_id, through)
                .await
                .map_err(|e| e.to_string())?;
            let n = usize::try_from(through - after).unwrap_or(0);
            metrics::counter!("keel_events_exported_total").increment(n as u64);
            exported += n;
        }
        if let Some(failure) = failure {
            return Err(failure);
        }
        if through < after + i64::try_from(events.len()).unwrap_or(0) {
            return Err("publishing to NATS failed".to_owned());
        }
    }
    if let Some(oldest) = oldest {
        let age = (time::OffsetDateTime::now_utc() - oldest)
            .as_seconds_f64()
            .max(0.0);
        metrics::gauge!("keel_events_export_oldest_pending_seconds").set(age);
    }
    Ok(exported)
}
