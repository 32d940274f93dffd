//! Gateway accounting, off the hot path: handlers hand a [`UsageRecord`] to the
//! [`Recorder`] (a bounded channel) and move on; one background task writes whatever has
//! queued up as one batch — under load, many requests share one transaction and fsync.
//!
//! Bounded and lossless: when the queue is full, `record` waits (backpressure) rather
//! than dropping; a failed write is retried with backoff; on shutdown the task drains the
//! queue and writes everything before it returns. Only the `Drop` path of an abandoned
//! stream uses a non-blocking send, and counts what it could not queue.

use std::sync::Arc;
use std::time::Duration;

use keel_store::{Store, UsageRecord};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Most records queued before `record` waits.
const QUEUE: usize = 8_192;
/// Most records written in one transaction.
const MAX_BATCH: usize = 2_000;
/// Pause after each write, so records coalesce into fewer transactions (and fsyncs).
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Attempts to write one batch before it is logged as lost.
const WRITE_ATTEMPTS: u32 = 8;

/// The cheap, cloneable handle handlers record through.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<UsageRecord>,
}

/// The background writer; [`Writer::finish`] drains and stops it.
#[derive(Debug)]
pub struct Writer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts the writer over `store`.
pub fn start(store: Arc<dyn Store>) -> (Recorder, Writer) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(store, rx, stop.clone()));
    (Recorder { tx }, Writer { stop, task })
}

impl Recorder {
    /// Queues a record, waiting only if the queue is full.
    pub async fn record(&self, record: UsageRecord) {
        if self.tx.send(record).await.is_err() {
            metrics::counter!("keel_usage_records_dropped_total").increment(1);
            tracing::error!("usage writer already stopped; a usage record was lost");
        }
    }

    /// Queues a record without waiting (for `Drop` paths); counts it if it cannot.
    pub fn record_now(&self, record: UsageRecord) {
        if self.tx.try_send(record).is_err() {
            metrics::counter!("keel_usage_records_dropped_total").increment(1);
            tracing::warn!("usage queue full or closed; a usage record was lost");
        }
    }
}

impl Writer {
    /// Stops accepting records, writes every queued one, and returns when done.
    pub async fn finish(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "usage writer task failed");
        }
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<UsageRecord>, stop: CancellationToken) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            received = rx.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                write(store.as_ref(), &mut batch).await;
                tokio::select! {
                    () = tokio::time::sleep(FLUSH_INTERVAL) => {}
                    () = stop.cancelled() => break,
                }
            }
            () = stop.cancelled() => break,
        }
    }
    rx.close();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write(store.as_ref(), &mut batch).await;
    }
}

async fn write(store: &dyn Store, batch: &mut Vec<UsageRecord>) {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=WRITE_ATTEMPTS {
        match store.insert_usage(batch).await {
            Ok(()) => {
                metrics::histogram!("keel_usage_batch_size").record(batch.len() as f64);
                metrics::histogram!("keel_usage_write_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                batch.clear();
                return;
            }
            Err(e) if attempt < WRITE_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, records = batch.len(), "usage write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                metrics::counter!("keel_usage_records_dropped_total").increment(batch.len() as u64);
                tracing::error!(error = %e, records = batch.len(), "usage write failed for good; records lost");
            }
        }
    }
    batch.clear();
}

pub use keel_llm::cost_nanousd;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_arithmetic_is_exact_to_the_nano_dollar() {
        // 1,000 input tokens at $0.15/M = $0.00015; 500 output at $0.60/M = $0.0003.
        assert_eq!(cost_nanousd(1_000, 500, 0.15, 0.60), 150_000 + 300_000);
        assert_eq!(
            cost_nanousd(1_000_000, 0, 2.5, 10.0),
            2_500_000_000,
            "a million tokens cost the list price"
        );
        assert_eq!(cost_nanousd(7, 3, 0.0, 0.0), 0);
        assert_eq!(cost_nanousd(1, 1, f64::NAN, 1.0), 0);
    }
}
