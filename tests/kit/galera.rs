//! The test Galera cluster (`scripts/galera.sh`, 3 nodes on loopback): a fresh database per test, created
//! through one node and read on each, and the node faults (kill -9, restart, desync) the tests inject.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use super::db::{create_database, drop_database};
use super::serial::{share, Share};
use super::util::{skip, workspace_root};

/// The Galera tests kill and desync nodes: one at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

/// A fresh database on the cluster for one test, dropped afterwards; the test holds the cluster meanwhile,
/// and every node is up and Synced again when it ends.
pub struct GaleraDb {
    pub name: String,
    /// The nodes' server URLs (no database), node 1 first.
    pub servers: Vec<String>,
    runtime: tokio::runtime::Runtime,
    _cluster: MutexGuard<'static, ()>,
    _share: Share,
}

impl GaleraDb {
    /// `None` (the test is skipped) when no cluster is configured: `TELEMETRY_TEST_GALERA_URLS`, the nodes'
    /// URLs separated by spaces, as `scripts/galera.sh urls` prints them (scripts/test.sh sets it).
    pub fn new() -> Option<GaleraDb> {
        let Ok(urls) = std::env::var("TELEMETRY_TEST_GALERA_URLS") else {
            skip("no Galera cluster: start one with scripts/galera.sh start, then export TELEMETRY_TEST_GALERA_URLS=\"$(scripts/galera.sh urls)\"");
            return None;
        };
        let cluster = CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
        let share = share();
        let servers: Vec<String> = urls.split_whitespace().map(str::to_string).collect();
        assert_eq!(servers.len(), 3, "TELEMETRY_TEST_GALERA_URLS holds {} URLs, not 3", servers.len());
        let name = format!("tag_{}_{}", std::process::id(), fastrand::u64(..));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let db = GaleraDb { name, servers, runtime, _cluster: cluster, _share: share };
        for node in 1..=3 {
            db.start_node(node);
            db.set_desync(node, false);
            db.admin(node, "SET GLOBAL wsrep_max_ws_size = DEFAULT");
        }
        db.runtime.block_on(create_database(&db.servers[0], &db.name));
        Some(db)
    }

    /// The database's URL through node `node` (1-based).
    pub fn url(&self, node: usize) -> String {
        format!("{}/{}", self.servers[node - 1], self.name)
    }

    /// `[mysql] urls` listing the nodes in `order`, with the tests' fast retries.
    pub fn section(&self, order: &[usize]) -> String {
        let urls: Vec<String> = order.iter().map(|&node| format!("{:?}", self.url(node))).collect();
        format!(
            "[mysql]\nurls = [{}]\nmax_linger_ms = 20\nretry_initial_ms = 20\nretry_max_ms = 300\nwrite_timeout_ms = 5000\n",
            urls.join(", ")
        )
    }

    /// `sql` on node `node`, after the node applied every write the cluster committed before (wsrep_sync_wait),
    /// so that a read on any node sees what was acknowledged on another.
    pub fn query<T: mysql_async::prelude::FromRow + Send + 'static>(&self, node: usize, sql: &str) -> Vec<T> {
        let url = self.url(node);
        self.runtime.block_on(async {
            let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap()).await.unwrap();
            conn.query_drop("SET SESSION wsrep_sync_wait = 1").await.unwrap();
            let rows = conn.query(sql).await.unwrap();
            let _ = conn.disconnect().await;
            rows
        })
    }

    /// A global setting or statement on node `node`, without a database.
    pub fn admin(&self, node: usize, sql: &str) {
        let url = self.servers[node - 1].clone();
        self.runtime.block_on(async {
            let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap()).await.unwrap();
            conn.query_drop(sql).await.unwrap();
            let _ = conn.disconnect().await;
        })
    }

    /// Node `node` leaves Synced for Donor/Desynced (as during a state transfer it donates), or comes back.
    pub fn set_desync(&self, node: usize, desync: bool) {
        self.admin(node, &format!("SET GLOBAL wsrep_desync = {}", if desync { "ON" } else { "OFF" }));
    }

    /// `kill -9` of node `node`.
    pub fn kill(&self, node: usize) {
        script(&["kill", &node.to_string()]);
    }

    /// Starts node `node` if it is down and waits until it is Synced (it rejoins by IST).
    pub fn start_node(&self, node: usize) {
        script(&["start-node", &node.to_string()]);
    }

    /// Waits until every node answers with `size` nodes in the cluster.
    pub fn wait_for_cluster_size(&self, node: usize, size: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let status: Vec<(String, String)> = self.query(node, "SHOW STATUS LIKE 'wsrep_cluster_size'");
            if status.first().and_then(|(_, v)| v.parse::<u64>().ok()) == Some(size) {
                return;
            }
            assert!(Instant::now() < deadline, "node {node}: cluster size {status:?}, not {size}, after {secs} s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for GaleraDb {
    fn drop(&mut self) {
        for node in 1..=3 {
            script(&["start-node", &node.to_string()]);
            let url = self.servers[node - 1].clone();
            self.runtime.block_on(async {
                if let Ok(mut conn) = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap()).await {
                    let _ = conn.query_drop("SET GLOBAL wsrep_desync = OFF").await;
                    let _ = conn.query_drop("SET GLOBAL wsrep_max_ws_size = DEFAULT").await;
                    let _ = conn.disconnect().await;
                }
            });
        }
        self.runtime.block_on(drop_database(&self.servers[0], &self.name));
    }
}

/// `scripts/galera.sh` with this process's environment (GALERA_DIR, GALERA_PORT).
fn script(args: &[&str]) {
    let output =
        std::process::Command::new("bash").arg(workspace_root().join("scripts/galera.sh")).args(args).output().unwrap();
    assert!(output.status.success(), "galera.sh {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}
