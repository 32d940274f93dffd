//! A circuit breaker per target. Closed: calls pass. It opens after `failure_threshold`
//! consecutive failures, or when the failure ratio over the last `window` calls reaches
//! `failure_ratio`. Open: calls are refused (the router falls back) until `cooldown` has
//! passed; then one probe is let through (half-open): its success closes the breaker, its
//! failure opens it again.
//!
//! State sits behind a std mutex held for a few instructions, never across `.await`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use keel_core::config;

/// The breaker's state, as exported in the `keel_llm_breaker_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls pass (gauge 0).
    Closed,
    /// One probe is allowed (gauge 1).
    HalfOpen,
    /// Calls are refused (gauge 2).
    Open,
}

impl State {
    /// The gauge value.
    #[must_use]
    pub const fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    opened_at: Option<Instant>,
    /// When the half-open probe was let through; a probe that never reports back (its
    /// caller gave up) lapses after `cooldown`, so the breaker cannot stick half-open.
    probe_started: Option<Instant>,
    consecutive: u32,
    window: VecDeque<bool>,
}

/// One target's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: config::Breaker,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker.
    #[must_use]
    pub fn new(config: config::Breaker) -> Self {
        let window = usize::try_from(config.window).unwrap_or(0);
        Self {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                opened_at: None,
                probe_started: None,
                consecutive: 0,
                window: VecDeque::with_capacity(window),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the state inconsistent (every
        // update is a few assignments), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Whether a call may go to this target now. In half-open, only one probe at a time.
    pub fn allow(&self) -> bool {
        let mut inner = self.lock();
        let cooldown = self.config.cooldown;
        match inner.state {
            State::Closed => true,
            State::Open => {
                let cooled = inner.opened_at.is_none_or(|t| t.elapsed() >= cooldown);
                if cooled {
                    inner.state = State::HalfOpen;
                    inner.probe_started = Some(Instant::now());
                }
                cooled
            }
            State::HalfOpen => {
                let free = inner.probe_started.is_none_or(|t| t.elapsed() >= cooldown);
                if free {
                    inner.probe_started = Some(Instant::now());
                }
                free
            }
        }
    }

    /// Records a success; returns the new state.
    pub fn record_success(&self) -> State {
        let mut inner = self.lock();
        inner.consecutive = 0;
        inner.probe_started = None;
        if inner.state == State::HalfOpen {
            inner.state = State::Closed;
            inner.window.clear();
        }
        self.push(&mut inner, true);
        inner.state
    }

    /// Records a failure; returns the new state.
    pub fn record_failure(&self) -> State {
        let mut inner = self.lock();
        inner.probe_started = None;
        inner.consecutive = inner.consecutive.saturating_add(1);
        self.push(&mut inner, false);
        let window_full =
            self.config.window > 0 && inner.window.len() >= self.config.window as usize;
        let failures = inner.window.iter().filter(|ok| !**ok).count();
        let ratio_tripped = self.config.failure_ratio > 0.0
            && window_full
            && failures as f64 / inner.window.len() as f64 >= self.config.failure_ratio;
        if inner.state == State::HalfOpen
            || inner.consecutive >= self.config.failure_threshold
            || ratio_tripped
        {
            inner.state = State::Open;
            inner.opened_at = Some(Instant::now());
        }
        inner.state
    }

    fn push(&self, inner: &mut Inner, ok: bool) {
        if self.config.window == 0 {
            return;
        }
        if inner.window.len() >= self.config.window as usize {
            inner.window.pop_front();
        }
        inner.window.push_back(ok);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(threshold: u32, cooldown_ms: u64) -> Breaker {
        Breaker::new(config::Breaker {
            failure_threshold: threshold,
            failure_ratio: 0.0,
            window: 10,
            cooldown: Duration::from_millis(cooldown_ms),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cooldown() {
        let b = breaker(3, 30);
        assert_eq!(b.record_failure(), State::Closed);
        assert_eq!(b.record_failure(), State::Closed);
        assert_eq!(b.record_failure(), State::Open);
        assert!(!b.allow(), "open refuses");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "one probe after cooldown");
        assert_eq!(b.state(), State::HalfOpen);
        assert!(!b.allow(), "only one probe at a time");
        assert_eq!(b.record_failure(), State::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        assert_eq!(b.record_success(), State::Closed, "a good probe closes");
        assert!(b.allow());
    }

    #[test]
    fn a_probe_that_never_reports_back_lapses() {
        let b = breaker(1, 30);
        b.record_failure();
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "the probe");
        assert!(!b.allow(), "while it is in flight");
        // Its caller gave up without recording anything.
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "a lapsed probe frees the slot");
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let b = breaker(2, 1000);
        b.record_failure();
        b.record_success();
        assert_eq!(b.record_failure(), State::Closed);
        assert_eq!(b.record_failure(), State::Open);
    }

    #[test]
    fn opens_on_failure_ratio_over_a_full_window() {
        let b = Breaker::new(config::Breaker {
            failure_threshold: 100,
            failure_ratio: 0.5,
            window: 4,
            cooldown: Duration::from_secs(10),
        });
        b.record_failure();
        b.record_success();
        b.record_failure();
        assert_eq!(b.state(), State::Closed, "window not yet full");
        b.record_success();
        assert_eq!(
            b.state(),
            State::Closed,
            "the ratio is checked on failures only"
        );
        assert_eq!(b.record_failure(), State::Open, "half of the last 4 failed");
    }
}
