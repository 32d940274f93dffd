//! Keel's agent runtime: agent specs, tools (HTTP, MCP, other agents), the durable run loop
//! with per-step checkpoints and crash resume, and the workers that take tasks from the
//! queue in the store.
//!
//! Rules this crate keeps:
//! - A step's result, messages and events commit together (the store's group commit); a
//!   run's next step is decided from committed messages alone, so resuming after a crash
//!   repeats no completed step.
//! - Every write a worker makes is fenced by its lease.
//! - No lock is held across `.await`; every queue and cache is bounded.

pub mod context;
mod engine;
pub mod mcp;
pub mod spec;
pub mod tasks;
pub mod tools;

pub use engine::{EventSink, Runtime, StartError, Tasks, TokenDelta, start};
