//! Keel's LLM gateway core: the [`Provider`] trait with one file per provider, and the
//! [`Router`] that sends each request to a route's targets with retries, a circuit
//! breaker per target and fallback.
//!
//! This crate speaks HTTP only as a client of upstream providers; it knows nothing of
//! axum or of Keel's own API. It never retries a caller's mistake (an upstream 4xx), and
//! never waits past a route's total timeout.

pub mod breaker;
pub mod cache;
pub mod error;
pub mod provider;
pub mod providers;
pub mod router;
pub mod sse;
pub mod tokens;
pub mod types;

pub use error::{Error, ErrorKind, ProviderError, Result};
pub use provider::{ChunkStream, Provider};
pub use router::Router;

/// A target's prices in USD per million tokens, as the router charges them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    /// Prompt tokens the provider's prompt cache did not handle.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Prompt tokens read from the provider's prompt cache.
    pub cached_input: f64,
    /// Prompt tokens written to the provider's prompt cache.
    pub cache_write: f64,
}

impl Prices {
    /// A target's prices; an unset cache price is the input price.
    #[must_use]
    pub fn of(target: &keel_core::config::Target) -> Self {
        let input = target.input_price_per_mtok;
        Self {
            input,
            output: target.output_price_per_mtok,
            cached_input: target.cached_input_price_per_mtok.unwrap_or(input),
            cache_write: target.cache_write_price_per_mtok.unwrap_or(input),
        }
    }

    /// The most a prompt token can cost, whatever the cache does with it: what a budget
    /// must reserve before the answer says.
    #[must_use]
    pub fn max_input(&self) -> f64 {
        self.input.max(self.cached_input).max(self.cache_write)
    }

    /// Cost in nano-USD of `usage`: cache reads and writes at their prices, the rest of the
    /// prompt at the input price. Counts a provider reports inconsistently (more cached
    /// than prompt tokens) are charged as reported, never below zero.
    #[must_use]
    pub fn cost(&self, usage: &types::Usage) -> u64 {
        let cached = usage.cached_tokens();
        let written = usage.cache_write_tokens();
        let fresh = usage
            .prompt_tokens
            .saturating_sub(cached)
            .saturating_sub(written);
        nanousd(
            fresh as f64 * self.input
                + cached as f64 * self.cached_input
                + written as f64 * self.cache_write
                + usage.completion_tokens as f64 * self.output,
        )
    }
}

/// Tokens × USD per million tokens as whole nano-USD (USD per token = price / 1e6;
/// nano-USD per token = price × 1e3); 0 for a negative or non-finite sum.
fn nanousd(token_price_sum: f64) -> u64 {
    let cost = token_price_sum * 1e3;
    if cost.is_finite() && cost > 0.0 {
        cost.round() as u64
    } else {
        0
    }
}

/// Cost in nano-USD of `tokens` at `price_per_mtok` USD per million tokens.
#[must_use]
pub fn cost_nanousd(
    input_tokens: u64,
    output_tokens: u64,
    input_price_per_mtok: f64,
    output_price_per_mtok: f64,
) -> u64 {
    nanousd(
        input_tokens as f64 * input_price_per_mtok + output_tokens as f64 * output_price_per_mtok,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_prices_default_to_the_input_price_and_bound_the_reservation() {
        let mut target: keel_core::config::Target = serde_json::from_value(serde_json::json!({
            "provider": "anthropic", "model": "m",
            "input_price_per_mtok": 3.0, "output_price_per_mtok": 15.0,
        }))
        .unwrap();
        let plain = Prices::of(&target);
        assert_eq!((plain.cached_input, plain.cache_write), (3.0, 3.0));
        target.cached_input_price_per_mtok = Some(0.3);
        target.cache_write_price_per_mtok = Some(3.75);
        let cached = Prices::of(&target);
        assert_eq!(
            cached.max_input(),
            3.75,
            "a cache write costs more than input"
        );

        let mut usage = types::Usage::new(1_000, 10);
        assert_eq!(cached.cost(&usage), 3_000_000 + 150_000);
        usage.prompt_tokens_details = Some(types::PromptTokensDetails {
            cached_tokens: 600,
            cache_write_tokens: 300,
        });
        assert_eq!(cached.cost(&usage), 1_755_000);
        assert_eq!(plain.cost(&usage), 3_150_000, "same prices, same cost");
        usage.prompt_tokens = 100;
        assert_eq!(
            cached.cost(&usage),
            180_000 + 1_125_000 + 150_000,
            "inconsistent counts are charged as reported, the fresh part floored at 0"
        );
    }
}
