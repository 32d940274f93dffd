//! keel-server's integration tests, compiled as one binary: the whole app driven with
//! `oneshot` over a real SQLite store in a temporary directory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code: a failed unwrap is a failed test"
)]

mod anthropic;
mod api;
mod events;
mod gateway;
mod security;
mod support;
mod webhooks;
