//! The end-to-end suites: the real agent binary as a child process, against the real MariaDB and Redis
//! (`scripts/services.sh`). One test binary, `e2e` (`[[test]]` of agent/Cargo.toml):
//! `cargo test -p telemetry-agent --test e2e` runs them all, `... --test e2e mysql::` one suite.
//! Its tests run on parallel threads; `kit::serial` keeps apart those that must not overlap.

mod kit;

mod access;
mod bulk;
mod chaos;
mod galera;
mod hostile;
mod monitoring;
mod mysql;
mod ops;
mod packaging;
mod protocol;
mod redis;
mod spool;
