//! Where the WAL's events go: MySQL, every event exactly once (`mysql`), and Redis, the newest value of
//! every metric and trade (`redis`, the mirror).

pub mod mysql;
pub mod redis;
