//! The test Redis (TELEMETRY_TEST_REDIS_URL): a key prefix per test.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::serial::{share, Share};
use super::util::{addr_of, url_via};

/// A unique key prefix in the test Redis for one test; its keys are deleted afterwards.
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
    conn: Mutex<redis::Connection>,
    _share: Share,
}

impl TestRedis {
    /// The test server's URL.
    pub fn server() -> String {
        std::env::var("TELEMETRY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
    }

    pub fn new() -> TestRedis {
        let share = share();
        let url = TestRedis::server();
        let prefix = format!("tat:{}:{}", std::process::id(), fastrand::u64(..));
        let conn = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("Redis is not reachable; run scripts/test.sh");
        TestRedis { url, prefix, conn: Mutex::new(conn), _share: share }
    }

    /// The server's address, for a proxy in front of it.
    pub fn addr(&self) -> std::net::SocketAddr {
        addr_of(&self.url, 6379)
    }

    /// The agent's `[redis]` section for this prefix, reaching Redis at `url`.
    pub fn section(&self, url: &str) -> String {
        format!("[redis]\nurl = {url:?}\nkey_prefix = {:?}\n", self.prefix)
    }

    /// This server's URL with the port of a proxy in front of it.
    pub fn url_via(&self, port: u16) -> String {
        url_via(&self.url, port)
    }

    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut conn = self.conn.lock().unwrap();
        cmd.query(&mut *conn).unwrap()
    }

    /// `HGETALL {prefix}:{suffix}`
    pub fn hash(&self, suffix: &str) -> BTreeMap<String, String> {
        self.query(redis::cmd("HGETALL").arg(format!("{}:{suffix}", self.prefix)))
    }

    /// `GET {prefix}:{suffix}`
    pub fn get(&self, suffix: &str) -> Option<String> {
        self.query(redis::cmd("GET").arg(format!("{}:{suffix}", self.prefix)))
    }

    pub fn keys(&self) -> Vec<String> {
        let mut conn = self.conn.lock().unwrap();
        let mut scan = redis::cmd("SCAN");
        scan.cursor_arg(0).arg("MATCH").arg(format!("{}:*", self.prefix)).arg("COUNT").arg(1000);
        scan.iter::<String>(&mut *conn).unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// Names of the connected clients that call themselves `name`.
    pub fn clients_named(&self, name: &str) -> usize {
        let list: String = self.query(&redis::cmd("CLIENT").arg("LIST").clone());
        list.lines().filter(|l| l.split(' ').any(|field| field == format!("name={name}"))).count()
    }

    /// Deletes every key under this test's prefix (what a Redis restarted empty looks like to the agent).
    pub fn delete_all(&self) {
        let keys = self.keys();
        if !keys.is_empty() {
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut *conn);
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.delete_all();
    }
}
