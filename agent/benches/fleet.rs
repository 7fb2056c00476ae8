//! A fleet into one database: 1, 4 and 16 agents (BENCH_FLEET_AGENTS, default "1,4,16"), each with its own
//! id, WAL, socket and BENCH_FLEET_SCRIPTS scripts (default 4) that send one event and wait for its ack,
//! paced to BENCH_FLEET_RATE events/s per agent (default 500), for BENCH_SECS (default 60; 10 with
//! BENCH_QUICK=1): into the single MariaDB (TELEMETRY_TEST_MYSQL_URL), then into the Galera cluster
//! (TELEMETRY_TEST_GALERA_URLS, as scripts/galera.sh prints it; skipped when unset), agents spread over its
//! nodes. Per run: rows/s committed by all agents, the worst agent's lag p99 (telemetry_sink_lag_seconds
//! sampled every 500 ms), the server connections (Threads_connected, summed over the nodes, highest sample),
//! and ratios against the single agent on the same target.
//!
//! Then two sizing runs: one agent draining a backlog of BENCH_FLEET_BACKLOG events (default 200000; 50000
//! quick) with pool_size 1, 2 and 4 (parallel_batches the same, at most 3); and on Galera, 4 agents writing
//! through node 1 while it is killed for BENCH_NODE_LOSS_SECS (default 60; 15 quick): the agents' worst lag,
//! how long until every agent is under 1 s behind again, and the node's rejoin (IST) once restarted.
//!
//! `cargo bench -p telemetry-agent --bench fleet`; with BENCH_REPORT_DIR (scripts/bench.sh) it also writes
//! `fleet.jsonl`.

mod common;
#[allow(dead_code)]
#[path = "../../tests/kit/mod.rs"]
mod kit;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{percentile, setting, Results};
use kit::agent::{Agent, Launch};
use kit::db::{migrate, TestDb};
use kit::galera::GaleraDb;
use kit::proxy::FaultProxy;
use kit::util::http_get;
use mysql_async::prelude::Queryable;

/// Where the rows go: the `[mysql]` section of agent `i`, and the servers whose connections are counted.
struct Target {
    name: &'static str,
    sections: Box<dyn Fn(usize) -> String>,
    servers: Vec<String>,
}

fn main() {
    let secs: u64 = setting("BENCH_SECS", 60, 10);
    let rate: u64 = setting("BENCH_FLEET_RATE", 500, 500);
    let scripts: usize = setting("BENCH_FLEET_SCRIPTS", 4, 4);
    let backlog: usize = setting("BENCH_FLEET_BACKLOG", 200_000, 50_000);
    let loss_secs: u64 = setting("BENCH_NODE_LOSS_SECS", 60, 15);
    let fleets: String = setting("BENCH_FLEET_AGENTS", "1,4,16".to_string(), "1,4,16".to_string());
    let fleets: Vec<usize> =
        fleets.split(',').map(|n| n.trim().parse().expect("BENCH_FLEET_AGENTS: numbers")).collect();
    kit::util::raise_fd_limit();
    let mut results = Results::create("fleet");

    println!("{scripts} scripts per agent, each sending one event and waiting for its ack; {rate} events/s per agent; {secs} s per run\n");
    println!("| target | agents | offered/s | rows/s | against 1 agent | worst agent's lag p99 | server connections | per agent |");
    println!("|---|---|---|---|---|---|---|---|");
    let single = TestDb::migrated();
    let url = single.url();
    let single_target = Target {
        name: "MariaDB",
        sections: Box::new(move |_| section(std::slice::from_ref(&url), "")),
        servers: vec![TestDb::server()],
    };
    let galera = GaleraDb::new();
    let galera_target = galera.as_ref().map(|cluster| {
        assert!(migrate(&cluster.url(1)).status.success(), "migrate on the cluster");
        let urls: Vec<String> = (1..=3).map(|node| cluster.url(node)).collect();
        Target {
            name: "Galera, 3 nodes",
            // Agent i starts at node i % 3 + 1: the fleet spread over the cluster.
            sections: Box::new(move |i| {
                let order: Vec<String> = (0..3).map(|k| urls[(i + k) % 3].clone()).collect();
                section(&order, "")
            }),
            servers: cluster.servers.clone(),
        }
    });
    for target in std::iter::once(&single_target).chain(galera_target.as_ref()) {
        let mut base_rows_per_s = None;
        for &agents in &fleets {
            let run = fleet_run(target, agents, scripts, rate, Duration::from_secs(secs));
            let base = *base_rows_per_s.get_or_insert(run.rows_per_s);
            println!(
                "| {} | {agents} | {} | {:.0} | {:.2}x | {:.2} s | {} (+{} for the agents) | {:.1} |",
                target.name,
                rate * agents as u64,
                run.rows_per_s,
                run.rows_per_s / base,
                run.worst_lag_p99,
                run.connections_max,
                run.connections_max.saturating_sub(run.connections_before),
                run.connections_max.saturating_sub(run.connections_before) as f64 / agents as f64,
            );
            results.record(serde_json::json!({
                "kind": "fleet", "target": target.name, "agents": agents, "offered_per_s": rate * agents as u64,
                "rows_per_s": run.rows_per_s, "ratio": run.rows_per_s / base, "lag_p99_s": run.worst_lag_p99,
                "connections_max": run.connections_max, "connections_before": run.connections_before,
            }));
        }
    }

    println!("\n### One agent draining a backlog of {backlog} events, by pool size\n");
    println!("| pool_size | parallel_batches | rows/s | against pool_size 1 |");
    println!("|---|---|---|---|");
    let mut base = None;
    for pool in [1usize, 2, 4] {
        let parallel = pool.min(3);
        let rows_per_s = drain_run(backlog, pool, parallel);
        let base = *base.get_or_insert(rows_per_s);
        println!("| {pool} | {parallel} | {rows_per_s:.0} | {:.2}x |", rows_per_s / base);
        results.record(serde_json::json!({
            "kind": "fleet_pool", "pool_size": pool, "parallel_batches": parallel, "rows_per_s": rows_per_s,
            "ratio": rows_per_s / base,
        }));
    }

    if let Some(cluster) = &galera {
        node_loss_run(cluster, 4, scripts, rate, Duration::from_secs(loss_secs), &mut results);
    }
}

/// The `[mysql]` section for a bench agent: `urls` in this order, the production defaults otherwise.
fn section(urls: &[String], extra: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!("[mysql]\nurls = [{}]\n{extra}", urls.join(", "))
}

/// An agent with its own id and directory, logging errors only, its /metrics on a port of its own.
fn start(id: &str, mysql: &str) -> (Agent, SocketAddr) {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").and_then(|probe| probe.local_addr()).expect("a free port");
    let launch = Launch {
        agent_id: id.into(),
        parent_dir: std::env::var_os("BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir),
        retain_secs: None,
        rust_log: "error".into(),
        log_to_file: false,
    };
    let mut agent = Agent::configure_with(&launch, &format!("[http]\nlisten = \"{metrics}\"\n{mysql}"));
    agent.restart();
    (agent, metrics)
}

/// A value of the agent's /metrics: the first line starting with `name` (labels included), 0 if none.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics");
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
}

fn rows_written(addr: SocketAddr) -> f64 {
    metric(addr, "telemetry_sink_batch_rows_sum{sink=\"mysql\"}")
}

fn lag_seconds(addr: SocketAddr) -> f64 {
    metric(addr, "telemetry_sink_lag_seconds{sink=\"mysql\"}")
}

/// Threads_connected, summed over `servers`.
fn connections(runtime: &tokio::runtime::Runtime, servers: &[String]) -> u64 {
    runtime.block_on(async {
        let mut total = 0;
        for server in servers {
            if let Ok(mut conn) = mysql_async::Conn::new(mysql_async::Opts::from_url(server).unwrap()).await {
                let row: Option<(String, u64)> =
                    conn.query_first("SHOW GLOBAL STATUS LIKE 'Threads_connected'").await.unwrap_or(None);
                // This connection is one of them.
                total += row.map_or(0, |(_, n)| n.saturating_sub(1));
                let _ = conn.disconnect().await;
            }
        }
        total
    })
}

/// `scripts` threads, each sending one event, waiting for its ack, paced to `rate / scripts` per second,
/// until `stop`.
fn paced_scripts(
    socket: &Path,
    tag: String,
    scripts: usize,
    rate: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let period = Duration::from_secs_f64(scripts as f64 / rate as f64);
    (0..scripts)
        .map(|s| {
            let (socket, tag, stop) = (socket.to_path_buf(), tag.clone(), stop.clone());
            std::thread::spawn(move || {
                let stream = UnixStream::connect(&socket).expect("connect");
                let mut writer = stream.try_clone().expect("clone");
                let mut reader = BufReader::new(stream);
                let mut answer = String::new();
                let mut next = Instant::now();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let line = format!(
                        "{{\"kind\":\"metric\",\"profile_id\":\"{tag}-{s}\",\"name\":\"m\",\"value\":{i},\"event_id\":\"{tag}-{s}-{i}\"}}\n"
                    );
                    writer.write_all(line.as_bytes()).expect("send");
                    answer.clear();
                    reader.read_line(&mut answer).expect("ack");
                    assert!(answer.contains("\"ok\":true"), "{answer}");
                    i += 1;
                    next += period;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        })
        .collect()
}

/// Agents, each with its paced scripts running.
struct Fleet {
    agents: Vec<(Agent, SocketAddr)>,
    stop: Arc<AtomicBool>,
    senders: Vec<std::thread::JoinHandle<()>>,
}

impl Fleet {
    /// `agents` agents `{tag}-{i}` with `[mysql]` section `mysql(i)`, and their scripts sending.
    fn start(tag: &str, agents: usize, mysql: impl Fn(usize) -> String, scripts: usize, rate: u64) -> Fleet {
        let agents: Vec<(Agent, SocketAddr)> = (0..agents).map(|i| start(&format!("{tag}-{i}"), &mysql(i))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let senders = agents
            .iter()
            .enumerate()
            .flat_map(|(i, (agent, _))| paced_scripts(&agent.socket, format!("{tag}-{i}"), scripts, rate, &stop))
            .collect();
        Fleet { agents, stop, senders }
    }

    fn metrics(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.agents.iter().map(|(_, metrics)| *metrics)
    }

    /// Stops the scripts, then the agents.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for sender in self.senders {
            let _ = sender.join();
        }
    }
}

struct FleetRun {
    rows_per_s: f64,
    worst_lag_p99: f64,
    connections_before: u64,
    connections_max: u64,
}

fn fleet_run(target: &Target, agents: usize, scripts: usize, rate: u64, secs: Duration) -> FleetRun {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let connections_before = connections(&runtime, &target.servers);
    let tag = format!("fleet{agents}-{}", fastrand::u32(..));
    let fleet = Fleet::start(&tag, agents, &target.sections, scripts, rate);
    // Warm-up: connections made, first batches out.
    std::thread::sleep(Duration::from_secs(3));
    let rows_before: f64 = fleet.metrics().map(rows_written).sum();
    let started = Instant::now();
    let mut lags: Vec<Vec<u64>> = vec![Vec::new(); agents];
    let mut connections_max = 0;
    while started.elapsed() < secs {
        std::thread::sleep(Duration::from_millis(500));
        for (i, metrics) in fleet.metrics().enumerate() {
            lags[i].push((lag_seconds(metrics) * 1000.0) as u64);
        }
        connections_max = connections_max.max(connections(&runtime, &target.servers));
    }
    let rows: f64 = fleet.metrics().map(rows_written).sum::<f64>() - rows_before;
    let elapsed = started.elapsed().as_secs_f64();
    fleet.stop();
    let worst_lag_p99 = lags.iter().map(|l| percentile(l, 0.99)).fold(0.0, f64::max) / 1000.0;
    FleetRun { rows_per_s: rows / elapsed, worst_lag_p99, connections_before, connections_max }
}

/// One agent stores `backlog` events while MySQL is unreachable, then drains them: rows/s.
fn drain_run(backlog: usize, pool: usize, parallel: usize) -> f64 {
    let db = TestDb::migrated();
    let gate = FaultProxy::start(TestDb::server_addr());
    gate.set_down(true);
    let extra = format!("pool_size = {pool}\nparallel_batches = {parallel}\n");
    let (agent, metrics) = start(&format!("drain-{pool}"), &section(&[db.url_via(gate.port)], &extra));
    let per_client = backlog / 8;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                let mut client = kit::client::Client::connect(&socket);
                for window in (0..per_client).collect::<Vec<_>>().chunks(500) {
                    let lines: Vec<String> = window
                        .iter()
                        .map(|i| {
                            format!("{{\"kind\":\"metric\",\"profile_id\":\"p-{c}\",\"name\":\"m\",\"value\":{i}}}")
                        })
                        .collect();
                    client.send_all(&lines);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let total = (per_client * 8) as f64;
    let started = Instant::now();
    gate.set_down(false);
    while rows_written(metrics) < total {
        assert!(started.elapsed() < Duration::from_secs(600), "the backlog did not drain in 10 minutes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rows_per_s = total / started.elapsed().as_secs_f64();
    drop(agent);
    rows_per_s
}

/// `agents` agents writing through node 1, which is killed for `loss`, then restarted.
fn node_loss_run(cluster: &GaleraDb, agents: usize, scripts: usize, rate: u64, loss: Duration, results: &mut Results) {
    let urls: Vec<String> = (1..=3).map(|node| cluster.url(node)).collect();
    let tag = format!("loss-{}", fastrand::u32(..));
    let fleet = Fleet::start(&tag, agents, |_| section(&urls, ""), scripts, rate);
    std::thread::sleep(Duration::from_secs(5));
    let worst_lag = || fleet.metrics().map(lag_seconds).fold(0.0, f64::max);
    eprintln!("node loss: killing node 1 for {} s under {agents} agents", loss.as_secs());
    let killed = Instant::now();
    cluster.kill(1);
    let (mut peak_lag, mut caught_up) = (0.0f64, None);
    while killed.elapsed() < loss {
        std::thread::sleep(Duration::from_millis(250));
        let lag = worst_lag();
        peak_lag = peak_lag.max(lag);
        if lag < 1.0 && peak_lag >= 1.0 && caught_up.is_none() {
            caught_up = Some(killed.elapsed());
        }
        if lag >= 1.0 {
            caught_up = None;
        }
    }
    let restarted = Instant::now();
    cluster.start_node(1);
    let rejoin = restarted.elapsed();
    fleet.stop();
    let caught_up = caught_up.map_or("not within the loss".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    println!(
        "\n### Galera: node 1 lost for {} s under {agents} agents ({} events/s)\n",
        loss.as_secs(),
        rate * agents as u64
    );
    println!("| worst agent lag during the loss | every agent under 1 s behind again after | node 1 Synced again after restart (IST) |");
    println!("|---|---|---|");
    println!("| {peak_lag:.1} s | {caught_up} | {:.1} s |", rejoin.as_secs_f64());
    results.record(serde_json::json!({
        "kind": "fleet_node_loss", "agents": agents, "loss_secs": loss.as_secs(), "peak_lag_s": peak_lag,
        "caught_up": caught_up, "rejoin_s": rejoin.as_secs_f64(),
    }));
}
