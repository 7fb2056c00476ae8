//! Where the WAL's events go: MySQL, every event exactly once (`mysql`), and Redis, the latest value of each
//! metric (`mirror`, to move here next).

pub mod mysql;
