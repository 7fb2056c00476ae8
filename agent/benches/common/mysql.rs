//! MariaDB helpers for the MySQL and soak benches: a gate in front of the server that can refuse and cut
//! connections, and a throwaway database with the agent's schema.

#![allow(dead_code)] // Each bench binary that includes this uses a part of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};

/// A TCP gate in front of MariaDB: closed, it refuses connections and cuts open ones; it counts the most
/// connections open at once.
pub struct Gate {
    pub port: u16,
    pub open: Arc<AtomicBool>,
    pub max_open: Arc<AtomicU64>,
}

impl Gate {
    pub async fn start() -> Gate {
        let target = mysql_addr();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let open = Arc::new(AtomicBool::new(true));
        let max_open = Arc::new(AtomicU64::new(0));
        let now_open = Arc::new(AtomicU64::new(0));
        let (gate_open, gate_max) = (open.clone(), max_open.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if !gate_open.load(Ordering::SeqCst) {
                    continue;
                }
                let (gate_open, gate_max, now_open) = (gate_open.clone(), gate_max.clone(), now_open.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    // Without this, Nagle and delayed ACKs add 40 ms to every statement.
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let n = now_open.fetch_add(1, Ordering::SeqCst) + 1;
                    gate_max.fetch_max(n, Ordering::SeqCst);
                    let closed = async {
                        while gate_open.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = closed => {}
                    }
                    now_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Gate { port, open, max_open }
    }
}

fn mysql_addr() -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let server = std::env::var("TELEMETRY_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let url = url::Url::parse(&server).expect("url");
    (url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(3306))
        .to_socket_addrs()
        .expect("resolve")
        .next()
        .expect("address")
}

pub struct Database {
    pub url: String,
    pub name: String,
    server: String,
    pub pool: Pool,
}

impl Database {
    /// `tat_bench_{pid}`, dropped and created again, migrated.
    pub async fn create(server: &str) -> Database {
        Database::create_named(server, &format!("tat_bench_{}", std::process::id())).await
    }

    pub async fn create_named(server: &str, name: &str) -> Database {
        let name = name.to_string();
        let mut admin = mysql_async::Conn::new(Opts::from_url(server).expect("url")).await.expect("connect");
        admin.query_drop(format!("DROP DATABASE IF EXISTS {name}")).await.expect("drop");
        admin.query_drop(format!("CREATE DATABASE {name}")).await.expect("create");
        admin.disconnect().await.expect("disconnect");
        let url = format!("{server}/{name}");
        let opts = OptsBuilder::from_opts(Opts::from_url(&url).expect("url"))
            .prefer_socket(false)
            .pool_opts(PoolOpts::default().with_constraints(PoolConstraints::new(0, 2).expect("constraints")));
        let pool = Pool::new(opts);
        let mut conn = pool.get_conn().await.expect("connect");
        telemetry_agent::migrate::migrate(&mut conn).await.expect("migrate");
        Database { url, name, server: server.to_string(), pool }
    }

    pub fn url_via(&self, port: u16) -> String {
        let mut url = url::Url::parse(&self.url).expect("url");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(port)).expect("port");
        url.to_string()
    }

    pub async fn offset(&self) -> u64 {
        let mut conn = self.pool.get_conn().await.expect("connect");
        conn.query_first::<Option<u64>, _>(
            "SELECT MAX(last_seq) FROM telemetry_run_offsets WHERE agent_id = 'bench' AND sink = 'mysql'",
        )
        .await
        .expect("offset")
        .flatten()
        .unwrap_or(0)
    }

    pub async fn count(&self) -> u64 {
        let mut conn = self.pool.get_conn().await.expect("connect");
        // Exact counts: the tables are InnoDB, so this scans; the benches keep it off the timed paths where
        // they can (it is polled every 50 ms in d/e, a small constant cost for both).
        let metrics: u64 = conn.query_first("SELECT COUNT(*) FROM dd_metrics").await.expect("count").unwrap_or(0);
        let trades: u64 =
            conn.query_first("SELECT COUNT(*) FROM dd_trade_performance").await.expect("count").unwrap_or(0);
        metrics + trades
    }

    pub async fn drop(self) {
        let _ = self.pool.disconnect().await;
        if let Ok(mut admin) = mysql_async::Conn::new(Opts::from_url(&self.server).expect("url")).await {
            let _ = admin.query_drop(format!("DROP DATABASE IF EXISTS {}", self.name)).await;
            let _ = admin.disconnect().await;
        }
    }
}
