//! Fitting a conversation into an agent's token budget: the system prompt always stays;
//! the oldest turns go first; a tool call is never separated from its results (an
//! assistant message and the `tool` messages answering it are dropped or kept together).

/// Where the kept part of `tokens` (one count per message, in order; `is_tool[i]` marks
/// `tool` messages, which belong to the turn before them) starts, so that `system` plus
/// the kept messages fit in `budget`. `None` when even the last turn does not fit.
#[must_use]
pub fn fit(system: u64, tokens: &[u64], is_tool: &[bool], budget: u64) -> Option<usize> {
    let mut total: u64 = system + tokens.iter().sum::<u64>();
    if total <= budget {
        return Some(0);
    }
    // Turn starts: every message that is not a tool result.
    let starts: Vec<usize> = (0..tokens.len()).filter(|&i| !is_tool[i]).collect();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(tokens.len());
        if end == tokens.len() {
            // The last turn is never dropped.
            return None;
        }
        total -= tokens[start..end].iter().sum::<u64>();
        if total <= budget {
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn everything_is_kept_when_it_fits() {
        assert_eq!(fit(10, &[5, 5, 5], &[false; 3], 25), Some(0));
    }

    #[test]
    fn the_oldest_turns_go_first_and_tool_results_stay_with_their_call() {
        // user, assistant(call), tool, tool, user, assistant
        let tokens = [10, 10, 30, 30, 10, 10];
        let tool = [false, false, true, true, false, false];
        // Dropping the first user message (10) is not enough; the call and both results
        // go together, never the call alone.
        assert_eq!(fit(5, &tokens, &tool, 100), Some(1));
        assert_eq!(fit(5, &tokens, &tool, 90), Some(4));
        assert_eq!(fit(5, &tokens, &tool, 25), Some(4));
        assert_eq!(fit(5, &tokens, &tool, 20), Some(5));
    }

    #[test]
    fn a_last_turn_larger_than_the_budget_does_not_fit() {
        assert_eq!(fit(5, &[10, 100], &[false, false], 50), None);
    }
}
