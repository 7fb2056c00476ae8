//! The servers the MySQL sink writes to: one, or the nodes of a Galera cluster (`[mysql] urls`). The agent
//! writes through one node at a time. When that node fails (unreachable, not ready, out of the primary
//! component, or a donor or desynced with `avoid_desynced`), it moves to the next node that passes the same
//! check. It does not move back by itself: every node holds the same rows, so moving back would only add a
//! switch; a restart begins with the first node again.

use std::sync::Mutex;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::Pool;

use super::pool;
use crate::config::MysqlConfig;
use crate::ops::metrics::METRICS;

/// A node that does not answer the check within this is passed over.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Nodes {
    config: MysqlConfig,
    urls: Vec<String>,
    current: Mutex<Current>,
}

struct Current {
    index: usize,
    pool: Pool,
    /// Counts switches, so that batches failing together on one node switch once.
    generation: u64,
}

/// The pool of the node in use, and which switch it belongs to.
#[derive(Clone)]
pub struct Lease {
    pub pool: Pool,
    generation: u64,
}

impl Nodes {
    /// Starts with the first node; nothing connects until the first use.
    pub fn new(config: &MysqlConfig) -> anyhow::Result<Nodes> {
        let urls: Vec<String> = config.node_urls().into_iter().map(str::to_string).collect();
        // Every URL must make a pool; the first one's is used now.
        let mut pools = urls.iter().map(|url| pool(config, url)).collect::<anyhow::Result<Vec<_>>>()?;
        let first = pools.swap_remove(0);
        METRICS.mysql_node(node_name(&urls[0]));
        Ok(Nodes {
            config: config.clone(),
            urls,
            current: Mutex::new(Current { index: 0, pool: first, generation: 0 }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn lease(&self) -> Lease {
        let current = self.lock();
        Lease { pool: current.pool.clone(), generation: current.generation }
    }

    /// More than one node to write through.
    pub fn is_cluster(&self) -> bool {
        self.urls.len() > 1
    }

    /// The node in use, as `host:port`.
    pub fn current(&self) -> String {
        node_name(&self.urls[self.lock().index])
    }

    /// Checks the node in use, as before a first write: an error says why it cannot take writes now.
    pub async fn check(&self, lease: &Lease) -> Result<(), String> {
        check(&lease.pool, self.config.avoid_desynced).await
    }

    /// A write through `lease` failed with `error`. With more than one node, and if its node fails the check
    /// too, moves to the next node that passes it, trying each in turn. Returns whether the node in use changed
    /// (or had already changed since the lease): false when the node passes the check (the error is not the
    /// node's: a missing table, say, would fail on every node) or no other node is usable now; the caller then
    /// backs off.
    pub async fn failed(&self, lease: &Lease, error: &str) -> bool {
        if self.lock().generation != lease.generation {
            return true;
        }
        if !self.is_cluster() {
            return false;
        }
        match self.check(lease).await {
            Ok(()) => false,
            Err(why) => self.fail_over(lease, &format!("{error}; then the check: {why}")).await,
        }
    }

    /// Moves from the node behind `lease` to the next one that passes the check.
    async fn fail_over(&self, lease: &Lease, error: &str) -> bool {
        let from = {
            let current = self.lock();
            if current.generation != lease.generation {
                return true;
            }
            current.index
        };
        for step in 1..self.urls.len() {
            let index = (from + step) % self.urls.len();
            let Ok(candidate) = pool(&self.config, &self.urls[index]) else { continue };
            match check(&candidate, self.config.avoid_desynced).await {
                Ok(()) => {
                    let old = {
                        let mut current = self.lock();
                        if current.generation != lease.generation {
                            // Another batch moved meanwhile.
                            drop(current);
                            tokio::spawn(candidate.disconnect());
                            return true;
                        }
                        let old = std::mem::replace(&mut current.pool, candidate);
                        current.index = index;
                        current.generation += 1;
                        old
                    };
                    let (failed, next) = (node_name(&self.urls[from]), node_name(&self.urls[index]));
                    tracing::warn!(
                        failed_node = failed,
                        node = next,
                        error,
                        "MySQL node unusable; writing through the next one"
                    );
                    METRICS.mysql_node_switched(next);
                    // Batches still on the old node finish or fail there; then its connections close.
                    tokio::spawn(old.disconnect());
                    return true;
                }
                Err(why) => {
                    tracing::info!(node = node_name(&self.urls[index]), why, "MySQL node passed over");
                    tokio::spawn(candidate.disconnect());
                }
            }
        }
        false
    }

    /// Checks the node in use and, when it fails, moves to the next one that passes: the pool of a usable node,
    /// or why the node in use is not one (and no other is).
    pub async fn usable(&self) -> Result<Pool, String> {
        let lease = self.lease();
        match self.check(&lease).await {
            Ok(()) => Ok(lease.pool),
            Err(why) if self.is_cluster() && self.fail_over(&lease, &why).await => Ok(self.lease().pool),
            Err(why) => Err(format!("MySQL at {} cannot take writes: {why}", self.current())),
        }
    }

    /// Closes the connections of the node in use.
    pub async fn disconnect(&self) {
        let pool = self.lock().pool.clone();
        if let Err(e) = pool.disconnect().await {
            tracing::debug!(error = %e, "MySQL pool disconnect");
        }
    }
}

/// Whether the node behind `pool` takes writes now: it answers and, when it is a Galera node, is ready, in the
/// primary component, and Synced (or, unless `avoid_desynced`, a donor or desynced).
async fn check(pool: &Pool, avoid_desynced: bool) -> Result<(), String> {
    let query = async {
        let mut conn = pool.get_conn().await?;
        let wsrep_on: Option<(String, String)> = conn.query_first("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'").await?;
        if wsrep_on.is_none_or(|(_, on)| on != "ON") {
            return Ok(Vec::new());
        }
        conn.query::<(String, String), _>(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state_comment')",
        )
        .await
    };
    let status = match tokio::time::timeout(CHECK_TIMEOUT, query).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("cannot reach it: {e}")),
        Err(_) => return Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    };
    wsrep_problem(&status, avoid_desynced).map_or(Ok(()), Err)
}

/// Why a Galera node with this `SHOW STATUS` cannot take writes; `None` when it can (or is not a Galera node).
fn wsrep_problem(status: &[(String, String)], avoid_desynced: bool) -> Option<String> {
    if status.is_empty() {
        return None;
    }
    let value = |name: &str| status.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    if value("wsrep_ready") != Some("ON") {
        return Some("wsrep_ready is not ON (the node is not ready for queries)".into());
    }
    match value("wsrep_cluster_status") {
        Some("Primary") => {}
        other => return Some(format!("the node is not in the primary component ({})", other.unwrap_or("unknown"))),
    }
    match value("wsrep_local_state_comment") {
        Some("Synced") => None,
        Some(state @ ("Donor/Desynced" | "Desynced")) if !avoid_desynced => {
            tracing::debug!(state, "writing through a desynced node (avoid_desynced = false)");
            None
        }
        other => Some(format!("the node is {}, not Synced", other.unwrap_or("in an unknown state"))),
    }
}

/// `host:port` of a URL, for logs and `status` (never the user or password).
pub fn node_name(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(url) => format!("{}:{}", url.host_str().unwrap_or("?"), url.port().unwrap_or(3306)),
        Err(_) => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_synced_primary_node_or_a_server_without_galera_takes_writes() {
        let synced = status(&[
            ("wsrep_cluster_status", "Primary"),
            ("wsrep_local_state_comment", "Synced"),
            ("wsrep_ready", "ON"),
        ]);
        assert_eq!(wsrep_problem(&synced, true), None);
        assert_eq!(wsrep_problem(&[], true), None);
    }

    #[test]
    fn a_node_not_ready_outside_the_primary_component_or_joining_does_not() {
        let node = |cluster: &str, state: &str, ready: &str| {
            status(&[("wsrep_cluster_status", cluster), ("wsrep_local_state_comment", state), ("wsrep_ready", ready)])
        };
        assert!(wsrep_problem(&node("Primary", "Synced", "OFF"), true).unwrap().contains("wsrep_ready"));
        assert!(wsrep_problem(&node("non-Primary", "Initialized", "ON"), true).unwrap().contains("non-Primary"));
        assert!(wsrep_problem(&node("Primary", "Joined", "ON"), false).unwrap().contains("Joined, not Synced"));
        let donor = node("Primary", "Donor/Desynced", "ON");
        assert!(wsrep_problem(&donor, true).unwrap().contains("Donor/Desynced"));
        assert_eq!(wsrep_problem(&donor, false), None, "a donor is used when not avoided");
    }

    #[test]
    fn node_names_hide_the_credentials() {
        assert_eq!(node_name("mysql://u:secret@db1.example:3307/telemetry"), "db1.example:3307");
        assert_eq!(node_name("mysql://u@127.0.0.1/telemetry"), "127.0.0.1:3306");
    }
}
