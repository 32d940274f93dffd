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
