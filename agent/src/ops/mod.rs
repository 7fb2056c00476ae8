//! What operators use. The control socket (`control`) takes the commands (`commands`: status, WAL stats,
//! dump, dead letters, replay, mirror forget) to the running agent; the command line's end of them
//! (`client`) relays them there or runs them on the WAL itself, and prints the answer (`render`).
//! `replay` forwards a WAL from another host, `send` pipes NDJSON to the ingest socket. The agent's own
//! metrics (`metrics`) are served over local HTTP with health and readiness (`http`).

pub mod client;
pub mod commands;
pub mod control;
pub mod http;
pub mod metrics;
pub mod render;
pub mod replay;
pub mod send;
