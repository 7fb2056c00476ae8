//! The database of the MySQL and soak benches: the tests' helpers (`tests/kit/db.rs`) create and drop it;
//! this adds what the benches read from it, through a small pool of their own.

#![allow(dead_code)] // Each bench binary that includes this uses a part of it.

use mysql_async::prelude::Queryable;
use mysql_async::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};

use crate::kit::db::{create_database, drop_database};
use crate::kit::util::url_via;

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
        create_database(server, name).await;
        let url = format!("{server}/{name}");
        let opts = OptsBuilder::from_opts(Opts::from_url(&url).expect("url"))
            .prefer_socket(false)
            .pool_opts(PoolOpts::default().with_constraints(PoolConstraints::new(0, 2).expect("constraints")));
        let pool = Pool::new(opts);
        let mut conn = pool.get_conn().await.expect("connect");
        telemetry_agent::migrate::migrate(&mut conn).await.expect("migrate");
        Database { url, name: name.to_string(), server: server.to_string(), pool }
    }

    pub fn url_via(&self, port: u16) -> String {
        url_via(&self.url, port)
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
        drop_database(&self.server, &self.name).await;
    }
}
