//! Where events come from: scripts' connections to the Unix socket (`socket`), and the spool files scripts
//! wrote while the agent was away (`spool`). Both end in the WAL: an event is acknowledged (or its file
//! deleted) only once it is durable there.

pub mod socket;
pub mod spool;
