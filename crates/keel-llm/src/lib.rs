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

/// Cost in nano-USD of `tokens` at `price_per_mtok` USD per million tokens.
#[must_use]
pub fn cost_nanousd(
    input_tokens: u64,
    output_tokens: u64,
    input_price_per_mtok: f64,
    output_price_per_mtok: f64,
) -> u64 {
    // USD per token = price / 1e6; nano-USD per token = price * 1e3.
    let cost = input_tokens as f64 * input_price_per_mtok * 1e3
        + output_tokens as f64 * output_price_per_mtok * 1e3;
    if cost.is_finite() && cost > 0.0 {
        cost.round() as u64
    } else {
        0
    }
}
