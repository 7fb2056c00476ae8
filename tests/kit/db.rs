//! The test MySQL server (TELEMETRY_TEST_MYSQL_URL): a fresh database per test, and the agent's `[mysql]`
//! section for the tests.

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use super::agent::BIN;
use super::serial::{share, Share};
use super::util::{addr_of, url_via};

/// The agent's `[mysql]` section with fast linger and retries, so that the tests do not wait on production
/// defaults, and a short write timeout.
pub fn mysql_section(url: &str) -> String {
    format!("[mysql]\nurl = {url:?}\nmax_linger_ms = 20\nretry_initial_ms = 20\nretry_max_ms = 300\nwrite_timeout_ms = 3000\n")
}

/// `telemetry-agent migrate` against `url`.
pub fn migrate(url: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("migrate.toml");
    std::fs::write(&config, format!("[mysql]\nurl = {url:?}\n")).unwrap();
    std::process::Command::new(BIN).args(["migrate", "--config"]).arg(&config).output().unwrap()
}

/// Database `name` on `server`, empty (dropped first if it exists).
pub async fn create_database(server: &str, name: &str) {
    let opts = mysql_async::Opts::from_url(server).unwrap();
    let mut admin = mysql_async::Conn::new(opts).await.expect("MySQL is not reachable; run scripts/test.sh");
    admin.query_drop(format!("DROP DATABASE IF EXISTS {name}")).await.unwrap();
    admin.query_drop(format!("CREATE DATABASE {name}")).await.unwrap();
    admin.disconnect().await.unwrap();
}

/// Drops database `name` on `server`, if it can.
pub async fn drop_database(server: &str, name: &str) {
    if let Ok(mut admin) = mysql_async::Conn::new(mysql_async::Opts::from_url(server).unwrap()).await {
        let _ = admin.query_drop(format!("DROP DATABASE IF EXISTS {name}")).await;
        let _ = admin.disconnect().await;
    }
}

/// A fresh MySQL database for one test, dropped afterwards.
pub struct TestDb {
    pub name: String,
    pub server_url: String,
    runtime: tokio::runtime::Runtime,
    pool: mysql_async::Pool,
    _share: Share,
}

impl TestDb {
    /// The test server's URL (no database).
    pub fn server() -> String {
        std::env::var("TELEMETRY_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_string())
    }

    pub fn new() -> TestDb {
        let share = share();
        let server_url = TestDb::server();
        let name = format!("tat_{}_{}", std::process::id(), fastrand::u64(..));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(create_database(&server_url, &name));
        let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&format!("{server_url}/{name}")).unwrap());
        TestDb { name, server_url, runtime, pool, _share: share }
    }

    /// A fresh database with the schema applied by `telemetry-agent migrate`.
    pub fn migrated() -> TestDb {
        let db = TestDb::new();
        let output = migrate(&db.url());
        assert!(output.status.success(), "migrate failed: {}", String::from_utf8_lossy(&output.stderr));
        db
    }

    /// The test server's address, for a proxy in front of it.
    pub fn server_addr() -> std::net::SocketAddr {
        addr_of(&TestDb::server(), 3306)
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server_url, self.name)
    }

    /// The URL of this database through a proxy listening on `port`.
    pub fn url_via(&self, port: u16) -> String {
        url_via(&self.url(), port)
    }

    pub fn query<T: mysql_async::prelude::FromRow + Send + 'static>(&self, sql: &str) -> Vec<T> {
        self.runtime.block_on(async {
            let mut conn = self.pool.get_conn().await.unwrap();
            conn.query(sql).await.unwrap()
        })
    }

    pub fn exec(&self, sql: &str) {
        self.runtime.block_on(async {
            let mut conn = self.pool.get_conn().await.unwrap();
            conn.query_drop(sql).await.unwrap()
        })
    }

    pub fn count(&self, table: &str) -> u64 {
        self.query::<u64>(&format!("SELECT COUNT(*) FROM {table}"))[0]
    }

    /// Waits until `table` holds `n` rows; panics with what it holds after `secs`.
    pub fn wait_for_rows(&self, table: &str, n: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let have = self.count(table);
            if have == n {
                return;
            }
            assert!(have < n, "{table} holds {have} rows, more than the {n} expected");
            assert!(Instant::now() < deadline, "{table} holds {have} of {n} rows after {secs} s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        self.runtime.block_on(async {
            let _ = pool.disconnect().await;
            drop_database(&self.server_url, &self.name).await;
        });
    }
}
