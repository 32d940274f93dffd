//! Keel's core: the domain vocabulary every other crate speaks — typed ids, names, roles,
//! API-key tokens, the config tree and its loader, and the one error type for values that
//! fail to parse.
//!
//! This crate must never do I/O of its own (no files, sockets, databases or HTTP): it knows
//! nothing of axum, sqlx or reqwest. Callers read files and the environment and hand the
//! text in; that keeps every rule here testable without a machine around it.

pub mod auth;
pub mod config;
pub mod event;
pub mod id;
mod model_route;
pub mod task;
pub mod workspace;

mod error;

pub use error::{Error, Result};
