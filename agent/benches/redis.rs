//! Redis, same server, same run:
//! (a) the old way: 30 connections, one `HSET` round trip per metric update, from a Rust client and, when
//!     `python3 -c "import redis"` works, from 30 Python processes with redis-py as the scripts do today;
//! (b) the agent's mirror end to end: 30 socket clients pipelining the same updates, timed from the first
//!     send until Redis holds the newest value of every key;
//! (c) mirror lag (event sent until Redis shows it) at 10,000 metrics/s offered.
//!
//! `cargo bench -p telemetry-agent --bench redis`; BENCH_UPDATES (default 300000), BENCH_SECS for (c)
//! (default 10), TELEMETRY_TEST_REDIS_URL (default redis://127.0.0.1:6379). BENCH_QUICK=1 makes the
//! defaults 60000 updates and 3 s. With BENCH_REPORT_DIR (set by scripts/bench.sh) it also writes its
//! numbers to `{BENCH_REPORT_DIR}/redis.jsonl`.

mod common;
// The tests' kit (tests/kit): the agent launcher, the fault proxy, the test database. A bench uses a part.
#[allow(dead_code)]
#[path = "../../tests/kit/mod.rs"]
mod kit;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use common::{start_agent, Results};
use kit::agent::Agent;
use kit::redis::TestRedis;

const CONNECTIONS: usize = 30;
const PROFILES: u64 = 300;
const NAMES: u64 = 10;
/// Lines a pipelining client keeps in flight.
const WINDOW: usize = 512;
const BASE_TS_MS: u64 = 1_795_000_000_000;

fn main() {
    let updates: u64 = common::setting("BENCH_UPDATES", 300_000, 60_000);
    let lag_secs: u64 = common::setting("BENCH_SECS", 10, 3);
    let mut results = Results::create("redis");
    let url = TestRedis::server();
    let prefix = format!("bench:{}", std::process::id());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    let client = redis::Client::open(url.as_str()).expect("Redis URL");
    let mut check = runtime.block_on(client.get_multiplexed_async_connection()).expect("Redis is not reachable");
    let version = runtime.block_on(redis_version(&mut check));
    results.record(serde_json::json!({"kind": "redis_server", "version": version}));

    eprintln!("(a) old way: {updates} updates over {CONNECTIONS} connections, one HSET each...");
    let cpu_before = runtime.block_on(redis_cpu_seconds(&mut check));
    let old = old_way(&client, &format!("{prefix}:old"), updates);
    let old_cpu = runtime.block_on(redis_cpu_seconds(&mut check)) - cpu_before;
    let python_updates = updates / 10;
    eprintln!("(a) old way from Python: {python_updates} updates over {CONNECTIONS} processes...");
    let python = old_way_python(&url, &format!("{prefix}:py"), python_updates);
    eprintln!("(b) mirror end to end: {updates} updates over {CONNECTIONS} socket clients...");
    let mirror_prefix = format!("{prefix}:mirror");
    let agent = start_agent(&format!("[redis]\nurl = {url:?}\nkey_prefix = {mirror_prefix:?}\n"));
    let scripts_before = runtime.block_on(evalsha_calls(&mut check));
    let cpu_before = runtime.block_on(redis_cpu_seconds(&mut check));
    let mirror = runtime.block_on(mirror_end_to_end(&agent, &mut check, &mirror_prefix, updates));
    let mirror_cpu = runtime.block_on(redis_cpu_seconds(&mut check)) - cpu_before;
    let scripts = runtime.block_on(evalsha_calls(&mut check)) - scripts_before;
    let connections = runtime.block_on(clients_named(&mut check, "telemetry-agent:bench"));
    drop(agent);

    eprintln!("(c) mirror lag at 10,000 metrics/s for {lag_secs} s...");
    let lag_prefix = format!("{prefix}:lag");
    let agent = start_agent(&format!("[redis]\nurl = {url:?}\nkey_prefix = {lag_prefix:?}\n"));
    let lags = runtime.block_on(lag_at_rate(&agent, &mut check, &lag_prefix, 10_000, Duration::from_secs(lag_secs)));
    drop(agent);
    runtime.block_on(delete_prefix(&mut check, &prefix));

    let old_rate = updates as f64 / old.as_secs_f64();
    let mirror_rate = updates as f64 / mirror.as_secs_f64();
    let per_update = |cpu: f64| cpu * 1e6 / updates as f64;
    println!(
        "| way | updates/s | vs (a) Rust | vs (a) Python | Redis connections | Redis commands | Redis CPU per update |"
    );
    println!("|---|---|---|---|---|---|---|");
    let python_rate = python.map(|elapsed| python_updates as f64 / elapsed.as_secs_f64());
    let vs_python = |rate: f64| python_rate.map_or("-".to_string(), |p| format!("{:.1}", rate / p));
    // `commands`: what Redis executed for the updates (HSETs, or the mirror's script calls).
    let record =
        |results: &mut Results, way: &str, n: u64, rate: f64, connections: usize, commands: u64, cpu: Option<f64>| {
            results.record(serde_json::json!({
                "kind": "redis", "way": way, "updates": n, "updates_per_s": rate, "connections": connections,
                "commands": commands, "redis_cpu_us_per_update": cpu,
            }))
        };
    if let Some(python_rate) = python_rate {
        record(&mut results, "python", python_updates, python_rate, CONNECTIONS, python_updates, None);
        println!(
            "| (a) Python scripts: 30 connections, one HSET per update | {python_rate:.0} | {:.2} | 1.0 | {CONNECTIONS} | {python_updates} | - |",
            python_rate / old_rate
        );
    }
    record(&mut results, "rust", updates, old_rate, CONNECTIONS, updates, Some(per_update(old_cpu)));
    record(&mut results, "mirror", updates, mirror_rate, connections, scripts, Some(per_update(mirror_cpu)));
    println!(
        "| (a) Rust client: 30 connections, one HSET per update | {old_rate:.0} | 1.0 | {} | {CONNECTIONS} | {updates} | {:.2} µs |",
        vs_python(old_rate),
        per_update(old_cpu)
    );
    println!(
        "| (b) agent mirror, end to end | {mirror_rate:.0} | {:.1} | {} | {connections} | {scripts} script calls | {:.2} µs |",
        mirror_rate / old_rate,
        vs_python(mirror_rate),
        per_update(mirror_cpu)
    );
    println!();
    println!("| offered | samples | lag p50 | lag p99 | lag max |");
    println!("|---|---|---|---|---|");
    println!(
        "| 10,000 metrics/s | {} | {} ms | {} ms | {} ms |",
        lags.len(),
        percentile(&lags, 0.50),
        percentile(&lags, 0.99),
        lags.iter().max().copied().unwrap_or(0)
    );
    results.record(serde_json::json!({
        "kind": "redis_lag", "offered_per_s": 10_000, "secs": lag_secs, "samples": lags.len(),
        "p50_ms": percentile(&lags, 0.50), "p99_ms": percentile(&lags, 0.99),
        "max_ms": lags.iter().max().copied().unwrap_or(0),
    }));
}

async fn redis_version(conn: &mut redis::aio::MultiplexedConnection) -> String {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await.expect("INFO");
    info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("?").trim().to_string()
}

/// Update `i`: its profile, metric name, value and timestamp (newer for every later `i` of the same key).
fn update(i: u64) -> (String, String, u64, u64) {
    (format!("p{}", i % PROFILES), format!("m{}", (i / PROFILES) % NAMES), i, BASE_TS_MS + i)
}

/// As scripts do it today: each its own connection, one blocking HSET per update.
fn old_way(client: &redis::Client, prefix: &str, updates: u64) -> Duration {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..CONNECTIONS as u64 {
            scope.spawn(move || {
                let mut conn = client.get_connection().expect("connect");
                let mut i = c;
                while i < updates {
                    let (profile, name, value, _) = update(i);
                    redis::cmd("HSET")
                        .arg(format!("{prefix}:{profile}:metrics"))
                        .arg(name)
                        .arg(value)
                        .exec(&mut conn)
                        .expect("HSET");
                    i += CONNECTIONS as u64;
                }
            });
        }
    });
    started.elapsed()
}

/// The same from 30 Python processes with redis-py, as the bot scripts do it; `None` without redis-py.
fn old_way_python(url: &str, prefix: &str, updates: u64) -> Option<Duration> {
    let probe = std::process::Command::new("python3").args(["-c", "import redis"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("    skipped: python3 with redis-py is not installed (pip install redis)");
        return None;
    }
    // Every process connects, then starts at the same wall-clock instant, so that interpreter start-up
    // is not counted.
    let script = r#"
import sys, time, redis
url, prefix = sys.argv[1], sys.argv[2]
start_ms, c, n, step, profiles, names = map(int, sys.argv[3:])
r = redis.Redis.from_url(url)
r.ping()
time.sleep(max(0, start_ms / 1000 - time.time()))
for i in range(c, n, step):
    r.hset(f"{prefix}:p{i % profiles}:metrics", f"m{(i // profiles) % names}", i)
"#;
    let start_ms = now_ms() + 3000;
    let children: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            std::process::Command::new("python3")
                .args(["-c", script, url, prefix])
                .args([start_ms, c as u64, updates, CONNECTIONS as u64, PROFILES, NAMES].map(|v| v.to_string()))
                .spawn()
                .expect("spawn python3")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().expect("python3").success(), "a Python client failed");
    }
    Some(Duration::from_millis(now_ms().saturating_sub(start_ms)))
}

async fn mirror_end_to_end(
    agent: &Agent,
    check: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    updates: u64,
) -> Duration {
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CONNECTIONS as u64 {
        let stream = UnixStream::connect(&agent.socket).await.expect("connect");
        clients.push(tokio::spawn(send_updates(stream, (c..updates).step_by(CONNECTIONS))));
    }
    for client in clients {
        client.await.expect("client");
    }
    let acked = started.elapsed();
    // The newest ts of every key.
    let mut newest: HashMap<(String, String), u64> = HashMap::new();
    for i in updates.saturating_sub(PROFILES * NAMES)..updates {
        let (profile, name, _, ts) = update(i);
        newest.insert((profile, name), ts);
    }
    loop {
        let mut pipe = redis::pipe();
        for p in 0..PROFILES {
            pipe.cmd("HGETALL").arg(format!("{prefix}:p{p}:metrics_ts"));
        }
        let stamps: Vec<HashMap<String, u64>> = pipe.query_async(check).await.expect("HGETALL");
        let done = newest.iter().all(|((profile, name), ts)| {
            let p: usize = profile[1..].parse().unwrap_or(0);
            stamps.get(p).and_then(|s| s.get(name)) == Some(ts)
        });
        if done {
            let elapsed = started.elapsed();
            eprintln!(
                "    all acked after {:.2} s, Redis up to date after {:.2} s",
                acked.as_secs_f64(),
                elapsed.as_secs_f64()
            );
            return elapsed;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn send_updates(stream: UnixStream, indexes: impl Iterator<Item = u64> + Send + 'static) {
    let (read, write) = stream.into_split();
    let window = Arc::new(Semaphore::new(WINDOW));
    let writer = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut out = BufWriter::new(write);
            for i in indexes {
                let Ok(permit) = window.acquire().await else { break };
                permit.forget();
                let (profile, name, value, ts) = update(i);
                let line = format!(
                    "{{\"kind\":\"metric\",\"profile_id\":\"{profile}\",\"name\":\"{name}\",\"value\":{value},\"ts\":{ts}}}\n"
                );
                out.write_all(line.as_bytes()).await.expect("write");
                if window.available_permits() == 0 {
                    out.flush().await.expect("flush");
                }
            }
            out.flush().await.expect("flush");
            out.shutdown().await.expect("shutdown");
        })
    };
    let mut answers = BufReader::new(read).lines();
    while let Some(answer) = answers.next_line().await.expect("answer") {
        assert!(answer.starts_with("{\"ok\":true"), "{answer}");
        window.add_permits(1);
    }
    writer.await.expect("writer");
}

/// Paced clients; every 10th event of client `c` is the probe metric `lag`/`c{c}`, stamped with the
/// wall clock. A poller reads the probes' timestamps every 2 ms: lag = when Redis first shows a stamp,
/// minus the stamp.
async fn lag_at_rate(
    agent: &Agent,
    check: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    rate: u64,
    run_for: Duration,
) -> Vec<u64> {
    let interval = Duration::from_secs_f64(CONNECTIONS as f64 / rate as f64);
    let mut clients = Vec::new();
    for c in 0..CONNECTIONS {
        let stream = UnixStream::connect(&agent.socket).await.expect("connect");
        clients.push(tokio::spawn(paced_client(stream, c, interval, run_for)));
    }
    let key = format!("{prefix}:lag:metrics_ts");
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut lags = Vec::new();
    let deadline = Instant::now() + run_for + Duration::from_secs(2);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    while Instant::now() < deadline {
        tick.tick().await;
        let stamps: HashMap<String, u64> = redis::cmd("HGETALL").arg(&key).query_async(check).await.expect("HGETALL");
        let now = now_ms();
        for (probe, ts) in stamps {
            if seen.get(&probe) != Some(&ts) {
                lags.push(now.saturating_sub(ts));
                seen.insert(probe, ts);
            }
        }
    }
    for client in clients {
        client.await.expect("client");
    }
    lags
}

async fn paced_client(stream: UnixStream, c: usize, interval: Duration, run_for: Duration) {
    let (read, write) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut answers = BufReader::new(read).lines();
        while let Ok(Some(answer)) = answers.next_line().await {
            assert!(answer.starts_with("{\"ok\":true"), "{answer}");
        }
    });
    let mut out = write;
    let mut tick = tokio::time::interval(interval);
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < run_for {
        tick.tick().await;
        let ts = now_ms();
        let line = if i % 10 == 0 {
            format!("{{\"kind\":\"metric\",\"profile_id\":\"lag\",\"name\":\"c{c}\",\"value\":{i},\"ts\":{ts}}}\n")
        } else {
            let (profile, name, _, _) = update(i * CONNECTIONS as u64 + c as u64);
            format!(
                "{{\"kind\":\"metric\",\"profile_id\":\"{profile}\",\"name\":\"{name}\",\"value\":{i},\"ts\":{ts}}}\n"
            )
        };
        out.write_all(line.as_bytes()).await.expect("write");
        i += 1;
    }
    out.shutdown().await.expect("shutdown");
    reader.await.expect("reader");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Redis server CPU (user + system) so far.
async fn redis_cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await.expect("INFO");
    info.lines()
        .filter_map(|l| l.strip_prefix("used_cpu_sys:").or_else(|| l.strip_prefix("used_cpu_user:")))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

async fn evalsha_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn clients_named(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> usize {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await.expect("CLIENT LIST");
    list.lines().filter(|l| l.split(' ').any(|f| f == format!("name={name}"))).count()
}

async fn delete_prefix(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(conn).await.unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(conn).await;
    }
}

fn percentile(values: &[u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
