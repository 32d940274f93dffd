//! Admission to the queue's bound (`runtime.max_queued`) without counting the queue at
//! every creation.
//!
//! Counting the waiting tasks is a scan of every one of them: at 6,400 queued it cost
//! Postgres ~6 ms a creation, so `POST /v1/tasks` got slower the deeper the queue — the
//! case the bound is for. An instance instead keeps the depth it last counted plus the
//! tasks it has admitted since, and counts again at most once a second (or, to confirm a
//! refusal, once every 100 ms). Starts are not subtracted between counts, and a count
//! is taken to miss every creation still in flight when it began (admitted, not yet
//! committed), so on one instance the estimate is never below the truth: the queue never
//! passes the bound, and a refusal right after tasks started is checked against a fresh
//! count. Several
//! instances each see the others' creations at their next count, so together they can
//! pass the bound by what the others admitted in that second; the bound is backpressure,
//! not an invariant (concurrent creations could always pass it by their number).

use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::Result;

/// How old the count may get before an admission recounts.
const RECOUNT_EVERY: Duration = Duration::from_secs(1);
/// How old the count must be before a refusal recounts to confirm it.
const RECOUNT_TO_REFUSE: Duration = Duration::from_millis(100);

/// What [`QueueGauge::admit`] decided.
#[derive(Debug)]
pub(crate) enum Admission<'a> {
    /// There is room; the task is counted as queued. Keep the ticket until the creation
    /// has committed or failed.
    Admitted(Ticket<'a>),
    /// The queue is at its bound; `queued` is the estimate (at least the tasks queued
    /// when it was last counted).
    Full {
        /// The estimated depth.
        queued: i64,
    },
}

/// One instance's view of the queue's depth (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct QueueGauge {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last count: the depth, when it began, and `admitted` at that moment.
    counted: Option<Count>,
    /// Tasks admitted by this instance, ever.
    admitted: i64,
    /// Of those, the ones whose creation has not yet committed or failed.
    in_flight: i64,
    /// A count is in flight; meanwhile the others go by the last one.
    counting: bool,
}

#[derive(Debug, Clone, Copy)]
struct Count {
    depth: i64,
    at: Instant,
    admitted: i64,
}

impl QueueGauge {
    /// Admits one task if the queue is below `max`; `count` counts the waiting tasks
    /// (called only when the last count is too old, never per admission). A task
    /// admitted but then not created (a lost idempotency race, a missing thread) stays
    /// counted until the next count: the estimate errs high.
    pub(crate) async fn admit<C, F>(&self, max: i64, count: C) -> Result<Admission<'_>>
    where
        C: Fn() -> F,
        F: Future<Output = Result<i64>>,
    {
        if max == i64::MAX {
            return Ok(Admission::Admitted(Ticket(None)));
        }
        let mut recounted = false;
        loop {
            let (started, admitted) = {
                let mut s = self.lock();
                if let Some(c) = s.counted {
                    let estimate = c.depth + (s.admitted - c.admitted);
                    let age = c.at.elapsed();
                    let recount = !recounted
                        && !s.counting
                        && (age >= RECOUNT_EVERY || (estimate >= max && age >= RECOUNT_TO_REFUSE));
                    if !recount {
                        if estimate < max {
                            s.admitted += 1;
                            s.in_flight += 1;
                            return Ok(Admission::Admitted(Ticket(Some(self))));
                        }
                        return Ok(Admission::Full { queued: estimate });
                    }
                }
                // The first admissions all count (there is nothing to go by yet). The
                // count may miss the creations in flight: they stay in the estimate.
                s.counting = true;
                (Instant::now(), s.admitted - s.in_flight)
            };
            let counting = Counting(self);
            let depth = count().await?;
            drop(counting);
            let mut s = self.lock();
            if s.counted.is_none_or(|c| c.at < started) {
                s.counted = Some(Count {
                    depth,
                    at: started,
                    admitted,
                });
            }
            recounted = true;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An admitted creation in flight; dropping it (committed or failed) ends that.
#[derive(Debug)]
pub(crate) struct Ticket<'a>(Option<&'a QueueGauge>);

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(gauge) = self.0 {
            gauge.lock().in_flight -= 1;
        }
    }
}

/// Clears `counting` when the count ends, also when it fails or its future is dropped.
struct Counting<'a>(&'a QueueGauge);

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.0.lock().counting = false;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Admitted,
        Full { queued: i64 },
    }

    /// A queue of `depth` tasks whose counts are counted.
    struct Queue {
        depth: AtomicI64,
        counts: AtomicUsize,
    }

    impl Queue {
        fn new(depth: i64) -> Self {
            Self {
                depth: AtomicI64::new(depth),
                counts: AtomicUsize::new(0),
            }
        }

        async fn count(&self) -> Result<i64> {
            self.counts.fetch_add(1, Ordering::SeqCst);
            Ok(self.depth.load(Ordering::SeqCst))
        }

        /// Admits and, when admitted, creates (the creation commits at once).
        async fn admit(&self, gauge: &QueueGauge, max: i64) -> Outcome {
            match gauge.admit(max, || self.count()).await.unwrap() {
                Admission::Admitted(_ticket) => {
                    self.depth.fetch_add(1, Ordering::SeqCst);
                    Outcome::Admitted
                }
                Admission::Full { queued } => Outcome::Full { queued },
            }
        }
    }

    #[tokio::test]
    async fn admissions_count_the_queue_once_not_once_each() {
        let (queue, gauge) = (Queue::new(10), QueueGauge::default());
        for _ in 0..90 {
            assert_eq!(queue.admit(&gauge, 100).await, Outcome::Admitted);
        }
        assert_eq!(queue.counts.load(Ordering::SeqCst), 1);
        assert_eq!(queue.depth.load(Ordering::SeqCst), 100);
    }

    #[tokio::test]
    async fn on_one_instance_the_queue_never_passes_its_bound() {
        let (queue, gauge) = (Queue::new(0), QueueGauge::default());
        for _ in 0..3 {
            assert_eq!(queue.admit(&gauge, 3).await, Outcome::Admitted);
        }
        // Full by the estimate; the count is fresh, so it is not counted again.
        assert_eq!(queue.admit(&gauge, 3).await, Outcome::Full { queued: 3 });
        assert_eq!(queue.counts.load(Ordering::SeqCst), 1);
        assert_eq!(queue.depth.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refusal_is_confirmed_by_a_fresh_count_once_tasks_have_started() {
        let (queue, gauge) = (Queue::new(0), QueueGauge::default());
        for _ in 0..3 {
            queue.admit(&gauge, 3).await;
        }
        // Two tasks start: the estimate does not know it yet.
        queue.depth.fetch_sub(2, Ordering::SeqCst);
        assert_eq!(queue.admit(&gauge, 3).await, Outcome::Full { queued: 3 });
        tokio::time::sleep(RECOUNT_TO_REFUSE).await;
        assert_eq!(queue.admit(&gauge, 3).await, Outcome::Admitted);
        assert_eq!(queue.admit(&gauge, 3).await, Outcome::Admitted);
        assert_eq!(queue.admit(&gauge, 3).await, Outcome::Full { queued: 3 });
        assert_eq!(queue.counts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn another_instances_tasks_are_seen_at_the_next_count() {
        let (queue, gauge) = (Queue::new(0), QueueGauge::default());
        assert_eq!(queue.admit(&gauge, 10).await, Outcome::Admitted);
        // Another instance fills the queue.
        queue.depth.store(10, Ordering::SeqCst);
        tokio::time::sleep(RECOUNT_EVERY).await;
        assert_eq!(queue.admit(&gauge, 10).await, Outcome::Full { queued: 10 });
        assert_eq!(queue.counts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_count_is_reported_and_the_next_admission_counts_again() {
        let gauge = QueueGauge::default();
        let failed = gauge
            .admit(5, || async {
                Err(crate::Error::Corrupt {
                    what: "count",
                    detail: "test".to_owned(),
                })
            })
            .await;
        assert!(failed.is_err());
        let queue = Queue::new(4);
        assert_eq!(queue.admit(&gauge, 5).await, Outcome::Admitted);
        assert_eq!(queue.admit(&gauge, 5).await, Outcome::Full { queued: 5 });
        assert_eq!(queue.counts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_count_taken_while_creations_are_in_flight_does_not_lose_them() {
        let (queue, gauge) = (Queue::new(0), QueueGauge::default());
        assert_eq!(queue.admit(&gauge, 3).await, Outcome::Admitted);
        // Two admitted, not yet committed: a count now cannot see them.
        let a = gauge.admit(3, || queue.count()).await.unwrap();
        let b = gauge.admit(3, || queue.count()).await.unwrap();
        assert!(matches!(
            (&a, &b),
            (Admission::Admitted(_), Admission::Admitted(_))
        ));
        tokio::time::sleep(RECOUNT_EVERY).await;
        // The recount (depth 1) still holds them: the queue is full.
        assert_eq!(queue.admit(&gauge, 3).await, Outcome::Full { queued: 3 });
        assert_eq!(queue.counts.load(Ordering::SeqCst), 2);
        drop((a, b));
    }

    #[tokio::test]
    async fn an_unbounded_creation_counts_nothing() {
        let (queue, gauge) = (Queue::new(1_000_000), QueueGauge::default());
        assert_eq!(queue.admit(&gauge, i64::MAX).await, Outcome::Admitted);
        assert_eq!(queue.counts.load(Ordering::SeqCst), 0);
    }
}
