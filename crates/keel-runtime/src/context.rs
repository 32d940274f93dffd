//! Fitting a conversation into an agent's token budget: the system prompt always stays;
//! pinned messages always stay; the oldest turns go first; a tool call is never separated
//! from its results (an assistant message and the `tool` messages answering it are dropped
//! or kept together); the latest turn is never dropped.

/// One message, as far as fitting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Its tokens.
    pub tokens: u64,
    /// A `tool` message: it belongs to the turn before it.
    pub tool: bool,
    /// Kept whatever happens (with the rest of its turn).
    pub pinned: bool,
}

/// Which messages to keep so that `system` plus the kept ones fit in `budget`: dropping
/// whole turns, oldest first, never a pinned one nor the latest. `None` when even that does
/// not fit.
#[must_use]
pub fn plan(system: u64, messages: &[Sizing], budget: u64) -> Option<Vec<bool>> {
    let mut keep = vec![true; messages.len()];
    let mut total: u64 = system + messages.iter().map(|m| m.tokens).sum::<u64>();
    if total <= budget {
        return Some(keep);
    }
    // Turns: each starts at a message that is not a tool result.
    let starts: Vec<usize> = (0..messages.len()).filter(|&i| !messages[i].tool).collect();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(messages.len());
        if end == messages.len() {
            // The latest turn is never dropped.
            return None;
        }
        let turn = &messages[start..end];
        if turn.iter().any(|m| m.pinned) {
            continue;
        }
        total -= turn.iter().map(|m| m.tokens).sum::<u64>();
        keep[start..end].fill(false);
        if total <= budget {
            return Some(keep);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{Sizing, plan};

    fn sizes(tokens: &[u64], tool: &[bool], pinned: &[usize]) -> Vec<Sizing> {
        tokens
            .iter()
            .zip(tool)
            .enumerate()
            .map(|(i, (&tokens, &tool))| Sizing {
                tokens,
                tool,
                pinned: pinned.contains(&i),
            })
            .collect()
    }

    fn kept(keep: Option<Vec<bool>>) -> Option<Vec<usize>> {
        keep.map(|k| (0..k.len()).filter(|&i| k[i]).collect())
    }

    #[test]
    fn everything_is_kept_when_it_fits() {
        let m = sizes(&[5, 5, 5], &[false; 3], &[]);
        assert_eq!(kept(plan(10, &m, 25)), Some(vec![0, 1, 2]));
    }

    #[test]
    fn the_oldest_turns_go_first_and_tool_results_stay_with_their_call() {
        // user, assistant(call), tool, tool, user, assistant
        let tool = [false, false, true, true, false, false];
        let m = sizes(&[10, 10, 30, 30, 10, 10], &tool, &[]);
        // Dropping the first user message (10) is not enough; the call and both results
        // go together, never the call alone.
        assert_eq!(kept(plan(5, &m, 100)), Some(vec![1, 2, 3, 4, 5]));
        assert_eq!(kept(plan(5, &m, 90)), Some(vec![4, 5]));
        assert_eq!(kept(plan(5, &m, 25)), Some(vec![4, 5]));
        assert_eq!(kept(plan(5, &m, 20)), Some(vec![5]));
    }

    #[test]
    fn pinned_messages_stay_with_their_turn_and_newer_turns_go_instead() {
        // user (pinned), assistant(call), tool, user, assistant
        let tool = [false, false, true, false, false];
        let m = sizes(&[10, 10, 30, 10, 10], &tool, &[0]);
        assert_eq!(kept(plan(5, &m, 35)), Some(vec![0, 3, 4]));
        // A pinned tool result keeps its call too.
        let m = sizes(&[10, 10, 30, 10, 10], &tool, &[2]);
        assert_eq!(kept(plan(5, &m, 65)), Some(vec![1, 2, 3, 4]));
        assert_eq!(kept(plan(5, &m, 40)), None);
    }

    #[test]
    fn a_last_turn_larger_than_the_budget_does_not_fit() {
        let m = sizes(&[10, 100], &[false, false], &[]);
        assert_eq!(plan(5, &m, 50), None);
    }
}
