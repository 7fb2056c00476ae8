//! The e2e suites' kit, one module per concern; the benches include it too (`#[path]`), so each helper
//! exists once. Fixtures are made on the test's own thread (see `serial`).

pub mod agent;
pub mod client;
pub mod db;
pub mod galera;
pub mod proxy;
pub mod redis;
pub mod serial;
pub mod util;
