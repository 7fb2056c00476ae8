//! End-to-end socket ingest: the release agent binary as a child, N clients pipelining metrics over the
//! Unix socket. Reports acked events/s, ack latency p50/p99 and the agent's peak RSS, plus latency at a
//! fixed offered rate. `cargo bench -p telemetry-agent --bench ingest` (BENCH_SECS per case, default 5, 2
//! with BENCH_QUICK=1; BENCH_CLIENTS runs only the cases with that many clients). With BENCH_REPORT_DIR
//! (set by scripts/bench.sh) it also writes its numbers to `{BENCH_REPORT_DIR}/ingest.jsonl`.

mod common;
// The tests' kit (tests/kit): the agent launcher, the fault proxy, the test database. A bench uses a part.
#[allow(dead_code)]
#[path = "../../tests/kit/mod.rs"]
mod kit;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, Semaphore};

use common::{peak_rss_kib, percentile, start_agent, Results};

/// Lines a pipelining client keeps in flight.
const WINDOW: usize = 512;

fn main() {
    let secs: u64 = common::setting("BENCH_SECS", 5, 2);
    let mut results = Results::create("ingest");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    println!("| clients | offered | acked events/s | ack p50 | ack p99 | agent peak RSS |");
    println!("|---|---|---|---|---|---|");
    let only: Option<usize> = std::env::var("BENCH_CLIENTS").ok().and_then(|v| v.parse().ok());
    for clients in [1usize, 64, 900].into_iter().filter(|c| only.is_none_or(|o| o == *c)) {
        let agent = start_agent("");
        let result = runtime.block_on(load(&agent.socket, clients, None, Duration::from_secs(secs)));
        report(&mut results, clients, None, &result, peak_rss_kib(&agent));
    }
    for (clients, rate) in
        [(64usize, 10_000u64), (900, 10_000)].into_iter().filter(|(c, _)| only.is_none_or(|o| o == *c))
    {
        let agent = start_agent("");
        let result = runtime.block_on(load(&agent.socket, clients, Some(rate), Duration::from_secs(secs)));
        report(&mut results, clients, Some(rate), &result, peak_rss_kib(&agent));
    }
}

fn report(results: &mut Results, clients: usize, rate: Option<u64>, result: &LoadResult, rss_kib: u64) {
    let offered = rate.map_or("as fast as acked".to_string(), |r| format!("{r}/s"));
    let acked_per_s = result.acked as f64 / result.elapsed.as_secs_f64();
    let (p50, p99) = (percentile(&result.latencies_us, 0.50) / 1000.0, percentile(&result.latencies_us, 0.99) / 1000.0);
    let rss_mib = rss_kib as f64 / 1024.0;
    println!("| {clients} | {offered} | {acked_per_s:.0} | {p50:.2} ms | {p99:.2} ms | {rss_mib:.1} MiB |");
    results.record(serde_json::json!({
        "kind": "ingest", "clients": clients, "offered_per_s": rate, "acked": result.acked,
        "secs": result.elapsed.as_secs_f64(), "acked_per_s": acked_per_s, "p50_ms": p50, "p99_ms": p99,
        "peak_rss_mib": rss_mib,
    }));
}

struct LoadResult {
    acked: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

/// `rate`: total events/s offered across clients (paced); `None`: each client keeps WINDOW in flight.
async fn load(socket: &Path, clients: usize, rate: Option<u64>, run_for: Duration) -> LoadResult {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let stream = UnixStream::connect(socket).await.expect("connect");
        let latencies = latencies.clone();
        let interval = rate.map(|r| Duration::from_secs_f64(clients as f64 / r as f64));
        tasks.push(tokio::spawn(async move { client(stream, c, interval, run_for, latencies).await }));
    }
    let mut acked = 0;
    for task in tasks {
        acked += task.await.expect("client task");
    }
    let elapsed = started.elapsed();
    let latencies_us = std::mem::take(&mut *latencies.lock().await);
    LoadResult { acked, elapsed, latencies_us }
}

async fn client(
    stream: UnixStream,
    c: usize,
    interval: Option<Duration>,
    run_for: Duration,
    latencies: Arc<Mutex<Vec<u64>>>,
) -> u64 {
    let (read, write) = stream.into_split();
    let window = Arc::new(Semaphore::new(WINDOW));
    let sent_at = Arc::new(std::sync::Mutex::new(VecDeque::new()));
    let writer = {
        let (window, sent_at) = (window.clone(), sent_at.clone());
        tokio::spawn(async move {
            let mut out = BufWriter::new(write);
            let mut tick = interval.map(tokio::time::interval);
            let started = Instant::now();
            let mut i = 0u64;
            while started.elapsed() < run_for {
                if let Some(tick) = &mut tick {
                    tick.tick().await;
                }
                let Ok(permit) = window.acquire().await else { break };
                permit.forget();
                let line = format!(
                    "{{\"kind\":\"metric\",\"profile_id\":\"p-{:03}\",\"name\":\"equity\",\"value\":{}.5,\"tags\":{{\"script\":\"risk\"}}}}\n",
                    c % 300,
                    i
                );
                i += 1;
                if let Ok(mut q) = sent_at.lock() {
                    q.push_back(Instant::now());
                }
                if out.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
                if tick.is_some() || window.available_permits() == 0 {
                    let _ = out.flush().await;
                }
            }
            let _ = out.flush().await;
            let _ = out.shutdown().await;
        })
    };
    let mut answers = BufReader::new(read).lines();
    let mut acked = 0u64;
    let mut local = Vec::new();
    while let Ok(Some(answer)) = answers.next_line().await {
        let sent = sent_at.lock().ok().and_then(|mut q| q.pop_front());
        if let Some(sent) = sent {
            local.push(sent.elapsed().as_micros() as u64);
        }
        if answer.starts_with("{\"ok\":true") {
            acked += 1;
        }
        window.add_permits(1);
    }
    let _ = writer.await;
    latencies.lock().await.extend(local);
    acked
}
