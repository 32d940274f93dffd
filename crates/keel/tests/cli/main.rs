//! Integration tests of the real `keel` binary: each test starts its own process on port
//! 0 with a fresh data directory (or a fresh Postgres database) and talks HTTP to it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code: a failed unwrap is a failed test"
)]

mod agents;
mod config;
mod events;
mod gateway;
mod mcp;
mod nats;
mod postgres;
mod sdk;
mod security;
mod serve;
mod shutdown;
mod support;
mod telemetry;
