//! telemetry-agent: scripts send events over a local Unix socket; the agent makes them durable in a WAL
//! and forwards them to MySQL and Redis. `main.rs` only parses the command line; the work is here.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod event;
pub mod identity;
pub mod migrate;
pub mod ops;
pub mod reload;
pub mod sink;
pub mod source;
