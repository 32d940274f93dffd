//! SQLite: task creations waiting for the one writer connection, committed together.
//!
//! A creation is pushed here, then its caller queues for the writer. Whoever gets the
//! writer takes what waits (its own creation and those pushed meanwhile, up to
//! [`BATCH`]) and commits them in one transaction — one fsync for all, as checkpoints
//! are — then answers each through its channel. A caller whose creation someone else
//! took just waits for the answer. The queue holds at most one creation per caller in
//! flight, so it is as bounded as the requests are.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::Result;
use crate::runtime::{Created, NewTask};

/// Creations committed in one transaction at most.
pub(crate) const BATCH: usize = 64;

/// A creation waiting, with where its answer goes.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// Identifies the entry for [`Creations::withdraw`].
    pub(crate) id: u64,
    pub(crate) task: NewTask,
    pub(crate) reply: oneshot::Sender<Result<Created>>,
}

/// The creations waiting for the writer (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct Creations {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: Vec<Waiting>,
    next_id: u64,
}

impl Creations {
    /// Queues `task`; the answer comes on the returned receiver once someone has
    /// committed it.
    pub(crate) fn push(&self, task: NewTask) -> (u64, oneshot::Receiver<Result<Created>>) {
        let (reply, answer) = oneshot::channel();
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.waiting.push(Waiting { id, task, reply });
        (id, answer)
    }

    /// Up to [`BATCH`] of the creations waiting, oldest first.
    pub(crate) fn take(&self) -> Vec<Waiting> {
        let mut s = self.lock();
        let n = s.waiting.len().min(BATCH);
        s.waiting.drain(..n).collect()
    }

    /// Takes creation `id` back if nobody has taken it yet (its caller gives up).
    pub(crate) fn withdraw(&self, id: u64) -> bool {
        let mut s = self.lock();
        let before = s.waiting.len();
        s.waiting.retain(|w| w.id != id);
        s.waiting.len() < before
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Withdraws a creation when its caller's future ends, whether it returned or was
/// dropped; a creation someone has taken is left to them.
pub(crate) struct WithdrawOnDrop<'a> {
    creations: &'a Creations,
    id: u64,
}

impl<'a> WithdrawOnDrop<'a> {
    pub(crate) fn new(creations: &'a Creations, id: u64) -> Self {
        Self { creations, id }
    }
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        self.creations.withdraw(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> NewTask {
        NewTask {
            id: keel_core::id::TaskId::new(),
            workspace_id: keel_core::id::WorkspaceId::new(),
            agent_id: keel_core::id::AgentId::new(),
            agent_name: "a".to_owned(),
            agent_version: 1,
            thread_id: None,
            parent_task_id: None,
            depth: 0,
            priority: keel_core::task::Priority::Medium,
            input: serde_json::json!([]),
            metadata: serde_json::json!({}),
            idempotency_key: None,
            max_attempts: 1,
            max_queued: 10,
            events: Vec::new(),
        }
    }

    #[test]
    fn a_caller_that_goes_away_takes_back_what_nobody_took() {
        let creations = Creations::default();
        let (first, _a) = creations.push(task());
        let (second, _b) = creations.push(task());
        drop(WithdrawOnDrop::new(&creations, first));
        let taken = creations.take();
        assert_eq!(taken.iter().map(|w| w.id).collect::<Vec<_>>(), vec![second]);
        // Taken already: withdrawing it does nothing.
        assert!(!creations.withdraw(second));
    }

    #[test]
    fn a_batch_takes_at_most_its_size_oldest_first() {
        let creations = Creations::default();
        let ids: Vec<u64> = (0..BATCH + 3).map(|_| creations.push(task()).0).collect();
        let first: Vec<u64> = creations.take().iter().map(|w| w.id).collect();
        assert_eq!(first, ids[..BATCH].to_vec());
        assert_eq!(creations.take().len(), 3);
        assert!(creations.take().is_empty());
    }
}
