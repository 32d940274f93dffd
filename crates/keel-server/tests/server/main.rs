//! keel-server's integration tests, compiled as one binary: the whole app driven with
//! `oneshot` over a real SQLite store in a temporary directory.

mod api;
