//! MySQL write paths compared in one run, on the same MariaDB and the same row shapes (75% metrics, 25%
//! trades): (a) the old way, (b) the old review's fix, (c) LOAD DATA, the ceiling, (d) the agent draining a
//! backlog, (e) the agent end to end; then a one-minute outage under 5,000 events/s offered.
//!
//! `cargo bench -p telemetry-agent --bench mysql`. Environment: TELEMETRY_TEST_MYSQL_URL (server, no
//! database), BENCH_ROWS (rows for a/b/c/e, default 200000), BENCH_BACKLOG (d, default 500000),
//! BENCH_PREFILL (rows already in the tables for the second pass, default 5000000; 0 skips it),
//! BENCH_OUTAGE_SECS (default 60; 0 skips the outage run), BENCH_OUTAGE_TAIL_SECS (sending goes on this long
//! after the outage, default 60), BENCH_AGENT_CONFIG (lines appended to the agent's `[mysql]` section, `;`
//! between lines, e.g. `parallel_batches = 1`). BENCH_QUICK=1 makes the defaults 40000 rows, a 100000-event
//! backlog, no prefill pass and a 10 s outage with a 20 s tail.
//!
//! With BENCH_REPORT_DIR (set by scripts/bench.sh) it also writes its numbers to
//! `{BENCH_REPORT_DIR}/mysql.jsonl` and the outage's time series (every 250 ms) to `mysql-outage.csv`.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
// The tests' kit (tests/kit): the agent launcher, the fault proxy, the test database. A bench uses a part.
#[path = "common/mysql.rs"]
mod db;
#[allow(dead_code)]
#[path = "../../tests/kit/mod.rs"]
mod kit;

use bytes::Bytes;
use futures::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{Opts, Pool, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};

use common::{cpu_seconds, peak_rss_kib, process_cpu_seconds, setting, start_agent, Results};
use db::Database;
use kit::db::TestDb;
use kit::proxy::FaultProxy;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    runtime.block_on(bench());
}

async fn bench() {
    let server = TestDb::server();
    let rows: usize = setting("BENCH_ROWS", 200_000, 40_000);
    let backlog: usize = setting("BENCH_BACKLOG", 500_000, 100_000);
    let prefill: usize = setting("BENCH_PREFILL", 5_000_000, 0);
    let outage_secs: u64 = setting("BENCH_OUTAGE_SECS", 60, 10);
    let tail_secs: u64 = setting("BENCH_OUTAGE_TAIL_SECS", 60, 20);
    let mut results = Results::create("mysql");
    results.record(serde_json::json!({"kind": "mysql_server", "version": server_version(&server).await}));

    let mut passes = vec![0];
    if prefill > 0 {
        passes.push(prefill);
    }
    for prefilled in passes {
        let db = Database::create(&server).await;
        if prefilled > 0 {
            eprintln!("prefilling {prefilled} rows with time-ordered ids ...");
            let started = Instant::now();
            let mut done = 0;
            while done < prefilled {
                let n = (prefilled - done).min(250_000);
                load_data(&db.pool, &shapes("pre", done, n)).await;
                done += n;
                eprint!("\r  {done}/{prefilled} ({:.0} rows/s)", done as f64 / started.elapsed().as_secs_f64());
            }
            eprintln!();
        }
        println!("\n### tables holding {prefilled} rows at start\n");
        println!("| way | rows | rows/s | connections | server CPU s / 100k rows | agent CPU s / 100k rows | agent peak RSS |");
        println!("|---|---|---|---|---|---|---|");
        let old_rows = rows.min(60_000);
        let mut print = |m: &Measured, way: &str, label: &str, connections: u64, rss_kib: Option<u64>| {
            m.print(&format!("{way} {label}"), connections, rss_kib);
            m.record(&mut results, prefilled, way, label, connections, rss_kib);
        };
        let a = measure(&db, old_rows, || old_way(&db.url, shapes("a", 0, old_rows), 30)).await;
        print(&a, "(a)", "30 connections, one autocommit INSERT per row", 30, None);
        let b = measure(&db, rows, || review_fix(&db.url, shapes("b", 0, rows))).await;
        print(&b, "(b)", "pool of 5, 50-row INSERT per commit", 5, None);
        let c_rows = shapes("c", 0, rows);
        let c = measure(&db, rows, || load_data(&db.pool, &c_rows)).await;
        print(&c, "(c)", "LOAD DATA LOCAL INFILE, one connection", 1, None);
        let (d, d_conns, d_rss) = agent_catch_up(&db, backlog).await;
        print(&d, "(d)", "agent catch-up of a WAL backlog", d_conns, Some(d_rss));
        let (e, e_conns, e_rss) = agent_end_to_end(&db, rows).await;
        print(&e, "(e)", "agent end to end, 64 clients", e_conns, Some(e_rss));
        println!();
        println!(
            "ratios: (d)/(c) = {:.2}, (d)/(b) = {:.2}, (e)/(c) = {:.2}; server CPU per row (d)/(b) = {:.2}, (e)/(b) = {:.2}",
            d.rate() / c.rate(),
            d.rate() / b.rate(),
            e.rate() / c.rate(),
            d.cpu_per_100k() / b.cpu_per_100k(),
            e.cpu_per_100k() / b.cpu_per_100k()
        );
        db.drop().await;
    }
    if outage_secs > 0 {
        let db = Database::create(&server).await;
        outage_run(&db, outage_secs, tail_secs, &mut results).await;
        db.drop().await;
    }
}

struct Measured {
    rows: usize,
    elapsed: Duration,
    server_cpu: f64,
    agent_cpu: Option<f64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
    fn cpu_per_100k(&self) -> f64 {
        self.server_cpu / self.rows as f64 * 100_000.0
    }
    fn print(&self, way: &str, connections: u64, rss_kib: Option<u64>) {
        println!(
            "| {way} | {} | {:.0} | {connections} | {:.2} | {} | {} |",
            self.rows,
            self.rate(),
            self.cpu_per_100k(),
            self.agent_cpu.map_or("-".to_string(), |c| format!("{:.2}", c / self.rows as f64 * 100_000.0)),
            rss_kib.map_or("-".to_string(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
        );
    }

    fn record(
        &self,
        results: &mut Results,
        prefill: usize,
        way: &str,
        label: &str,
        connections: u64,
        rss_kib: Option<u64>,
    ) {
        results.record(serde_json::json!({
            "kind": "mysql", "prefill": prefill, "way": way.trim_matches(['(', ')']), "label": label,
            "rows": self.rows, "secs": self.elapsed.as_secs_f64(), "rows_per_s": self.rate(),
            "connections": connections, "server_cpu_s_per_100k": self.cpu_per_100k(),
            "agent_cpu_s_per_100k": self.agent_cpu.map(|c| c / self.rows as f64 * 100_000.0),
            "agent_peak_rss_mib": rss_kib.map(|k| k as f64 / 1024.0),
        }));
    }
}

async fn server_version(server: &str) -> String {
    let mut conn = mysql_async::Conn::new(Opts::from_url(server).expect("url")).await.expect("connect to MySQL");
    let version: Option<String> = conn.query_first("SELECT VERSION()").await.expect("SELECT VERSION()");
    let _ = conn.disconnect().await;
    version.unwrap_or_default()
}

async fn measure<F, Fut>(db: &Database, rows: usize, f: F) -> Measured
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = (db.count().await, server_cpu_seconds());
    let started = Instant::now();
    f().await;
    let elapsed = started.elapsed();
    let after = db.count().await;
    assert_eq!(after - before.0, rows as u64, "rows written do not match");
    Measured { rows, elapsed, server_cpu: server_cpu_seconds() - before.1, agent_cpu: None }
}

/// utime + stime of mariadbd (or mysqld), in seconds.
fn server_cpu_seconds() -> f64 {
    let pid = ["mariadbd", "mysqld"].iter().find_map(|name| {
        let out = Command::new("pidof").arg(name).output().ok()?;
        String::from_utf8_lossy(&out.stdout).split_whitespace().next()?.parse::<u32>().ok()
    });
    pid.map_or(0.0, process_cpu_seconds)
}

fn mysql_section(url: &str) -> String {
    format!("[mysql]\nurl = {url:?}\nretry_max_ms = 200")
}

// ---------------------------------------------------------------------------------------------------------
// Row shapes shared by every way of writing.

enum Shape {
    Metric { event_id: String, profile: String, name: String, value: f64, ts: (u32, u32), tags: String },
    Trade { event_id: String, profile: String, qty: String, price: String, pnl: String, ts: (u32, u32), meta: String },
}

/// `n` rows, 3 metrics then a trade; time-ordered event ids `{prefix}-{i:012}`. `ts` is (seconds into the
/// day, microseconds) on 2026-11-27.
fn shapes(prefix: &str, from: usize, n: usize) -> Vec<Shape> {
    (from..from + n)
        .map(|i| {
            let event_id = format!("{prefix}-{i:012}");
            let profile = format!("p-{:03}", i % 300);
            let ts = ((i / 1_000_000 % 86_400) as u32, (i % 1_000_000) as u32);
            if i % 4 == 3 {
                Shape::Trade {
                    event_id,
                    profile,
                    qty: format!("0.{:08}", i % 100_000_000),
                    price: format!("43000.{:02}", i % 100),
                    pnl: "-1.5".into(),
                    ts,
                    meta: format!(r#"{{"strategy":"grid","i":{i}}}"#),
                }
            } else {
                Shape::Metric {
                    event_id,
                    profile,
                    name: ["equity", "drawdown", "exposure"][i % 3].into(),
                    value: i as f64 + 0.5,
                    ts,
                    tags: r#"{"script":"risk"}"#.into(),
                }
            }
        })
        .collect()
}

fn dt((secs, us): (u32, u32)) -> Value {
    Value::Date(2026, 11, 27, (secs / 3600) as u8, (secs / 60 % 60) as u8, (secs % 60) as u8, us)
}

fn dt_text((secs, us): (u32, u32)) -> String {
    format!("2026-11-27 {:02}:{:02}:{:02}.{us:06}", secs / 3600, secs / 60 % 60, secs % 60)
}

const METRIC_INSERT: &str =
    "INSERT INTO dd_metrics (event_id, agent_id, wal_seq, profile_id, name, value, ts, tags, received_at) VALUES ";
const METRIC_ROW: &str = "(?,'bench',0,?,?,?,?,?,UTC_TIMESTAMP(6))";
const TRADE_INSERT: &str = "INSERT INTO dd_trade_performance (event_id, agent_id, wal_seq, profile_id, symbol, side, quantity, price, pnl, fees, opened_at, closed_at, meta, received_at) VALUES ";
const TRADE_ROW: &str = "(?,'bench',0,?,'BTCUSDT','sell',?,?,?,'0.02',NULL,?,?,UTC_TIMESTAMP(6))";

fn params(shape: &Shape) -> Vec<Value> {
    match shape {
        Shape::Metric { event_id, profile, name, value, ts, tags } => vec![
            event_id.as_str().into(),
            profile.as_str().into(),
            name.as_str().into(),
            (*value).into(),
            dt(*ts),
            tags.as_str().into(),
        ],
        Shape::Trade { event_id, profile, qty, price, pnl, ts, meta } => vec![
            event_id.as_str().into(),
            profile.as_str().into(),
            qty.as_str().into(),
            price.as_str().into(),
            pnl.as_str().into(),
            dt(*ts),
            meta.as_str().into(),
        ],
    }
}

fn multi_insert(head: &str, row: &str, n: usize) -> String {
    format!("{head}{}", vec![row; n].join(","))
}

/// (a): each of `connections` connections inserts its share one row per autocommit statement.
async fn old_way(url: &str, rows: Vec<Shape>, connections: usize) {
    let rows = Arc::new(rows);
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (rows, url) = (rows.clone(), url.to_string());
            tokio::spawn(async move {
                let mut conn = mysql_async::Conn::new(Opts::from_url(&url).expect("url")).await.expect("connect");
                for shape in rows.iter().skip(c).step_by(connections) {
                    let sql = match shape {
                        Shape::Metric { .. } => multi_insert(METRIC_INSERT, METRIC_ROW, 1),
                        Shape::Trade { .. } => multi_insert(TRADE_INSERT, TRADE_ROW, 1),
                    };
                    conn.exec_drop(sql, params(shape)).await.expect("insert");
                }
                conn.disconnect().await.expect("disconnect");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
}

/// (b): a pool of 5; each task takes 50 rows and inserts them with one multi-row INSERT per table, committed.
async fn review_fix(url: &str, rows: Vec<Shape>) {
    let chunks: Vec<Vec<Shape>> = {
        let mut chunks = Vec::new();
        let mut it = rows.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(50).collect());
        }
        chunks
    };
    let queue = Arc::new(std::sync::Mutex::new(chunks));
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (queue, url) = (queue.clone(), url.to_string());
            tokio::spawn(async move {
                let mut conn = mysql_async::Conn::new(Opts::from_url(&url).expect("url")).await.expect("connect");
                loop {
                    let Some(chunk) = queue.lock().expect("queue").pop() else { break };
                    let (metrics, trades): (Vec<&Shape>, Vec<&Shape>) =
                        chunk.iter().partition(|s| matches!(s, Shape::Metric { .. }));
                    let mut tx = conn.start_transaction(Default::default()).await.expect("begin");
                    for (head, row, group) in [(METRIC_INSERT, METRIC_ROW, metrics), (TRADE_INSERT, TRADE_ROW, trades)]
                    {
                        if !group.is_empty() {
                            let params: Vec<Value> = group.iter().flat_map(|s| params(s)).collect();
                            tx.exec_drop(multi_insert(head, row, group.len()), params).await.expect("insert");
                        }
                    }
                    tx.commit().await.expect("commit");
                }
                conn.disconnect().await.expect("disconnect");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
}

/// (c): LOAD DATA LOCAL INFILE, one connection, one load per table.
async fn load_data(pool: &Pool, rows: &[Shape]) {
    let mut metrics = String::new();
    let mut trades = String::new();
    for shape in rows {
        match shape {
            Shape::Metric { event_id, profile, name, value, ts, tags } => metrics
                .push_str(&format!("{event_id}\tbench\t0\t{profile}\t{name}\t{value}\t{}\t{tags}\n", dt_text(*ts))),
            Shape::Trade { event_id, profile, qty, price, pnl, ts, meta } => trades.push_str(&format!(
                "{event_id}\tbench\t0\t{profile}\tBTCUSDT\tsell\t{qty}\t{price}\t{pnl}\t0.02\t\\N\t{}\t{meta}\n",
                dt_text(*ts)
            )),
        }
    }
    let mut conn = pool.get_conn().await.expect("connect");
    for (table, columns, data) in [
        ("dd_metrics", "event_id, agent_id, wal_seq, profile_id, name, value, ts, tags", metrics),
        (
            "dd_trade_performance",
            "event_id, agent_id, wal_seq, profile_id, symbol, side, quantity, price, pnl, fees, opened_at, closed_at, meta",
            trades,
        ),
    ] {
        // Pieces of 1 MiB: each becomes a packet, which must stay under max_allowed_packet.
        let data = Bytes::from(data);
        let pieces: Vec<std::io::Result<Bytes>> =
            (0..data.len()).step_by(1 << 20).map(|at| Ok(data.slice(at..(at + (1 << 20)).min(data.len())))).collect();
        conn.set_infile_handler(async move { Ok(futures::stream::iter(pieces).boxed()) });
        conn.query_drop(format!(
            "LOAD DATA LOCAL INFILE 'rows' INTO TABLE {table} ({columns}) SET received_at = UTC_TIMESTAMP(6)"
        ))
        .await
        .expect("LOAD DATA");
    }
}

// ---------------------------------------------------------------------------------------------------------
// The agent.

/// (d): the agent stores a backlog while MySQL is unreachable (a closed gate), then drains it.
async fn agent_catch_up(db: &Database, backlog: usize) -> (Measured, u64, u64) {
    let gate = FaultProxy::start(TestDb::server_addr());
    gate.set_down(true);
    let agent = start_agent(&mysql_section(&db.url_via(gate.port)));
    eprintln!("(d) storing a backlog of {backlog} events while MySQL is unreachable ...");
    let last_seq = send_events(agent.socket.clone(), 64, backlog, "d", None).await;
    let before = (db.count().await, server_cpu_seconds(), cpu_seconds(&agent));
    gate.set_down(false);
    let (first, last) = wait_offset(db, last_seq, backlog, "(d) draining").await;
    assert_eq!(db.count().await - before.0, backlog as u64, "(d) rows do not match");
    let measured = Measured {
        rows: backlog,
        elapsed: last - first,
        server_cpu: server_cpu_seconds() - before.1,
        agent_cpu: Some(cpu_seconds(&agent) - before.2),
    };
    (measured, gate.max_open(), peak_rss_kib(&agent))
}

/// (e): 64 clients pipeline events into the socket; from the first send until the last row is committed.
async fn agent_end_to_end(db: &Database, rows: usize) -> (Measured, u64, u64) {
    let gate = FaultProxy::start(TestDb::server_addr());
    let agent = start_agent(&mysql_section(&db.url_via(gate.port)));
    let before = (db.count().await, server_cpu_seconds(), cpu_seconds(&agent));
    let started = Instant::now();
    let last_seq = send_events(agent.socket.clone(), 64, rows, "e", None).await;
    wait_offset(db, last_seq, rows, "(e) end to end").await;
    let elapsed = started.elapsed();
    assert_eq!(db.count().await - before.0, rows as u64, "(e) rows do not match");
    let measured = Measured {
        rows,
        elapsed,
        server_cpu: server_cpu_seconds() - before.1,
        agent_cpu: Some(cpu_seconds(&agent) - before.2),
    };
    (measured, gate.max_open(), peak_rss_kib(&agent))
}

/// Counters of a paced send, read by the outage run while it goes on.
#[derive(Default)]
struct Progress {
    /// Lines written to the socket.
    sent: AtomicU64,
    /// `ok` answers received.
    acked: AtomicU64,
    /// The lowest seq acked (`u64::MAX` before the first ack).
    first_seq: AtomicU64,
}

/// One sample of the outage run.
struct Sample {
    t: f64,
    gate_open: bool,
    sent: u64,
    acked: u64,
    written: u64,
}

/// 5,000 events/s offered; MySQL unreachable for `outage_secs` after 10 s, then `tail_secs` more of sending;
/// reports how fast the backlog drains while new events keep arriving, and records a time series every
/// 250 ms: events acked, rows committed to MySQL, the backlog held in the WAL and the lag (how long ago the
/// oldest event not yet in MySQL was acked).
async fn outage_run(db: &Database, outage_secs: u64, tail_secs: u64, results: &mut Results) {
    const LEAD_SECS: f64 = 10.0;
    const SAMPLE: Duration = Duration::from_millis(250);
    let gate = FaultProxy::start(TestDb::server_addr());
    let agent = start_agent(&mysql_section(&db.url_via(gate.port)));
    let rate = 5_000;
    let total = rate * (LEAD_SECS as usize + outage_secs as usize + tail_secs as usize);
    let progress = Arc::new(Progress { first_seq: AtomicU64::new(u64::MAX), ..Progress::default() });
    let sending = tokio::spawn(send_events(agent.socket.clone(), 64, total, "o", Some((rate, progress.clone()))));
    println!("\n### outage: {rate} events/s offered, MySQL unreachable for {outage_secs} s\n");
    println!("| t (s) | sent | acked | in MySQL | backlog |");
    println!("|---|---|---|---|---|");
    let outage = LEAD_SECS..LEAD_SECS + outage_secs as f64;
    let started = Instant::now();
    let mut reopened_at = None;
    let mut drained = None;
    let mut samples: Vec<Sample> = Vec::new();
    let mut finished_at = None;
    let mut tick = tokio::time::interval(SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        let closed = outage.contains(&t);
        if closed {
            gate.set_down(true);
        } else if t >= outage.end && reopened_at.is_none() {
            let backlog = progress.acked.load(Ordering::SeqCst).saturating_sub(rows_written(db, &progress).await);
            gate.set_down(false);
            reopened_at = Some((Instant::now(), backlog));
        }
        // Rows below the committed offset: seqs are consecutive from the first one acked, and the offset
        // moves in the transaction that inserts the rows (a primary-key read, unlike COUNT(*)).
        let written = rows_written(db, &progress).await;
        let (sent, acked) = (progress.sent.load(Ordering::SeqCst), progress.acked.load(Ordering::SeqCst));
        samples.push(Sample { t, gate_open: !closed, sent, acked, written });
        if samples.len() % 20 == 0 {
            println!("| {t:.0} | {sent} | {acked} | {written} | {} |", acked.saturating_sub(written));
        }
        if let (Some((at, backlog)), None) = (reopened_at, drained) {
            if acked.saturating_sub(written) < rate as u64 / 2 {
                drained = Some((at.elapsed(), backlog));
            }
        }
        if sending.is_finished() {
            if written >= acked {
                break;
            }
            let since = *finished_at.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(120) {
                println!("\nMySQL did not catch up within 120 s of the last event ({written} of {acked} rows)");
                break;
            }
        }
    }
    let acked = progress.acked.load(Ordering::SeqCst);
    let counted = db.count().await;
    let drain_rate = drained.map(|(took, backlog): (Duration, u64)| {
        (backlog as f64 + rate as f64 * took.as_secs_f64()) / took.as_secs_f64().max(0.001)
    });
    match (drained, drain_rate) {
        (Some((took, backlog)), Some(drain_rate)) => println!(
            "\nbacklog of {backlog} events at reconnect drained in {:.1} s (sampled every 0.25 s) while {rate}/s \
             kept arriving: {drain_rate:.0} rows/s written during the drain",
            took.as_secs_f64(),
        ),
        _ => println!("\nthe backlog did not drain"),
    }
    println!("{acked} events acked, {counted} rows in MySQL (COUNT(*))");
    assert_eq!(counted, acked, "outage run: rows in MySQL differ from events acked");

    let series = outage_series(&samples);
    let max_backlog = samples.iter().map(|s| s.acked.saturating_sub(s.written)).max().unwrap_or(0);
    let max_lag = series.iter().map(|r| r.lag_s).fold(0.0, f64::max);
    let peak_written = series.iter().map(|r| r.written_per_s).fold(0.0, f64::max);
    println!("max backlog {max_backlog} events, max lag {max_lag:.1} s, peak {peak_written:.0} rows/s (1 s window)");
    results.record(serde_json::json!({
        "kind": "outage", "offered_per_s": rate, "outage_from_s": LEAD_SECS, "outage_secs": outage_secs,
        "tail_secs": tail_secs, "acked": acked, "rows": counted, "max_backlog": max_backlog,
        "backlog_at_reconnect": drained.map(|(_, b)| b), "drain_secs": drained.map(|(t, _)| t.as_secs_f64()),
        "drain_rows_per_s": drain_rate, "peak_written_per_s": peak_written, "max_lag_s": max_lag,
        "sample_ms": SAMPLE.as_millis() as u64,
    }));
    if let Some(dir) = common::report_dir() {
        let path = dir.join("mysql-outage.csv");
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
            writeln!(out, "t_s,gate_open,sent,acked,written,backlog,acked_per_s,written_per_s,lag_s")?;
            for (s, r) in samples.iter().zip(&series) {
                writeln!(
                    out,
                    "{:.3},{},{},{},{},{},{:.1},{:.1},{:.3}",
                    s.t,
                    u8::from(s.gate_open),
                    s.sent,
                    s.acked,
                    s.written,
                    s.acked.saturating_sub(s.written),
                    r.acked_per_s,
                    r.written_per_s,
                    r.lag_s
                )?;
            }
            out.flush()
        };
        write().unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("time series: {}", path.display());
    }
}

/// Rows the agent has committed to MySQL in the outage run (0 before its offset row exists).
async fn rows_written(db: &Database, progress: &Progress) -> u64 {
    let first = progress.first_seq.load(Ordering::SeqCst);
    let offset = db.offset().await;
    if first == u64::MAX || offset < first {
        0
    } else {
        offset - first + 1
    }
}

struct Rates {
    acked_per_s: f64,
    written_per_s: f64,
    lag_s: f64,
}

/// Per sample: acked/s and written/s over the last second, and the lag: how long ago the oldest event not yet
/// in MySQL was acked (the time the acked count passed it, interpolated between samples), 0 when none waits.
fn outage_series(samples: &[Sample]) -> Vec<Rates> {
    let ack_time = |n: u64| -> Option<f64> {
        let j = samples.iter().position(|s| s.acked >= n)?;
        let Some(prev) = j.checked_sub(1).map(|i| &samples[i]) else { return Some(samples[j].t) };
        let cur = &samples[j];
        let share = (n - prev.acked) as f64 / (cur.acked - prev.acked).max(1) as f64;
        Some(prev.t + share * (cur.t - prev.t))
    };
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let back = &samples[samples[..i].iter().position(|p| s.t - p.t <= 1.0 + 1e-6).unwrap_or(i)];
            let dt = s.t - back.t;
            let per_s = |now: u64, then: u64| if dt > 0.0 { now.saturating_sub(then) as f64 / dt } else { 0.0 };
            let lag_s =
                if s.acked > s.written { ack_time(s.written + 1).map_or(0.0, |at| (s.t - at).max(0.0)) } else { 0.0 };
            Rates { acked_per_s: per_s(s.acked, back.acked), written_per_s: per_s(s.written, back.written), lag_s }
        })
        .collect()
}

/// Waits until the agent's MySQL offset reaches `seq` (a primary-key read: polling it costs the server
/// nearly nothing, unlike COUNT(*)). Returns when the offset first moved and when it arrived.
async fn wait_offset(db: &Database, seq: u64, rows: usize, label: &str) -> (Instant, Instant) {
    let started = Instant::now();
    let initial = db.offset().await;
    // The run's seqs are consecutive and end at `seq`.
    let before = seq.saturating_sub(rows as u64);
    let mut first = None;
    let mut shown = Instant::now();
    loop {
        let offset = db.offset().await;
        if offset != initial && first.is_none() {
            first = Some(Instant::now());
        }
        if offset >= seq {
            eprintln!("{label}: {rows} of {rows} rows in MySQL ({:.1} s)", started.elapsed().as_secs_f64());
            return (first.unwrap_or(started), Instant::now());
        }
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            let done = offset.saturating_sub(before);
            eprintln!("{label}: {done} of {rows} rows in MySQL ({:.0} s)", started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `total` events (75% metrics) from `clients` pipelining connections, paced at `rate` if given; returns
/// the highest seq acked.
async fn send_events(
    socket: PathBuf,
    clients: usize,
    total: usize,
    prefix: &'static str,
    rate: Option<(usize, Arc<Progress>)>,
) -> u64 {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let per_client = total / clients + usize::from(c < total % clients);
            let socket = socket.clone();
            let rate = rate.clone();
            tokio::spawn(async move {
                let stream = tokio::net::UnixStream::connect(&socket).await.expect("connect");
                let (read, write) = stream.into_split();
                let progress = rate.as_ref().map(|(_, progress)| progress.clone());
                let reader = tokio::spawn(async move {
                    let mut lines = BufReader::new(read).lines();
                    let (mut n, mut max_seq) = (0, 0u64);
                    while let Ok(Some(line)) = lines.next_line().await {
                        let seq = line
                            .strip_prefix("{\"ok\":true,\"seq\":")
                            .and_then(|rest| rest.split(',').next())
                            .and_then(|seq| seq.parse::<u64>().ok())
                            .unwrap_or_else(|| panic!("not an ack: {line}"));
                        max_seq = max_seq.max(seq);
                        if let Some(progress) = &progress {
                            progress.first_seq.fetch_min(seq, Ordering::SeqCst);
                            progress.acked.fetch_add(1, Ordering::SeqCst);
                        }
                        n += 1;
                        if n == per_client {
                            break;
                        }
                    }
                    max_seq
                });
                let mut out = BufWriter::new(write);
                let mut tick = rate.as_ref().map(|(r, _)| tokio::time::interval(Duration::from_secs_f64(clients as f64 / *r as f64)));
                for i in 0..per_client {
                    if let Some(tick) = &mut tick {
                        tick.tick().await;
                    }
                    let n = i * clients + c;
                    let line = if n % 4 == 3 {
                        format!(
                            "{{\"kind\":\"trade\",\"profile_id\":\"p-{:03}\",\"symbol\":\"BTCUSDT\",\"side\":\"sell\",\"quantity\":\"0.5\",\"price\":\"43000.10\",\"pnl\":-1.5,\"fees\":\"0.02\",\"meta\":{{\"strategy\":\"grid\",\"i\":{n}}},\"event_id\":\"{prefix}-{n:012}\"}}\n",
                            n % 300
                        )
                    } else {
                        format!(
                            "{{\"kind\":\"metric\",\"profile_id\":\"p-{:03}\",\"name\":\"equity\",\"value\":{n}.5,\"tags\":{{\"script\":\"risk\"}}}}\n",
                            n % 300
                        )
                    };
                    out.write_all(line.as_bytes()).await.expect("write");
                    if let Some((_, progress)) = &rate {
                        out.flush().await.expect("flush");
                        progress.sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
                out.flush().await.expect("flush");
                reader.await.expect("reader")
            })
        })
        .collect();
    let mut max_seq = 0;
    for task in tasks {
        max_seq = max_seq.max(task.await.expect("client"));
    }
    max_seq
}
