//! Integration tests of the real `keel` binary: each test starts its own process on port
//! 0 with a fresh data directory (or a fresh Postgres database) and talks HTTP to it.

mod config;
mod postgres;
mod serve;
mod shutdown;
mod support;
mod telemetry;
