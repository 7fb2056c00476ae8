//! What the agent costs at ordinary rates: N scripts (BENCH_SCRIPTS, default 300), each sending one event and
//! waiting for its ack (how a script sends), paced together to each rate of BENCH_RATES (default
//! 500,5000,10000,20000 events/s) for BENCH_SECS each (default 60; 5 with BENCH_QUICK=1), against an agent
//! without sinks and one with MySQL and Redis on; and the agent idle (BENCH_IDLE_SECS, default 20).
//!
//! Per phase, over the phase after a warm-up: the agent's CPU per event and share of a core (utime+stime from
//! /proc/PID/stat), its context switches per event (voluntary and involuntary, summed over its threads from
//! /proc/PID/task/*/status), its WAL group commits and fdatasyncs per second (/metrics), ack latency p50/p99
//! seen by the scripts, and its RSS. `cargo bench -p telemetry-agent --bench steady`; with BENCH_REPORT_DIR
//! (scripts/bench.sh) it also writes `steady.jsonl`. The scripts' own side, and the old way's, is measured by
//! clients/python/benchmarks/steady.py.

mod common;
#[allow(dead_code)]
#[path = "../../tests/kit/mod.rs"]
mod kit;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{percentile, process_cpu_seconds, rss_kib, setting, start_agent, Results};
use kit::agent::Agent;
use kit::db::{mysql_section, TestDb};
use kit::redis::TestRedis;

fn main() {
    let secs: u64 = setting("BENCH_SECS", 60, 5);
    let idle_secs: u64 = setting("BENCH_IDLE_SECS", 20, 3);
    let scripts: usize = setting("BENCH_SCRIPTS", 300, 300);
    let rates: String = setting("BENCH_RATES", "500,5000,10000,20000".to_string(), "500,5000,20000".to_string());
    let rates: Vec<u64> = rates.split(',').map(|r| r.trim().parse().expect("BENCH_RATES: numbers")).collect();
    let sink_modes: String = setting("BENCH_SINKS", "none,all".to_string(), "none,all".to_string());
    kit::util::raise_fd_limit();
    let mut results = Results::create("steady");
    println!("{scripts} scripts, each sending one event and waiting for its ack; {secs} s per rate\n");
    println!("| sinks | offered/s | acked/s | agent CPU/event | agent CPU (core) | ctx switches/event (vol+invol) | group commits/s | fdatasyncs/s | events/commit | ack p50 | ack p99 | RSS |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for sinks in sink_modes.split(',').map(str::trim) {
        let (db, redis) = match sinks {
            "none" => (None, None),
            "all" => (Some(TestDb::migrated()), Some(TestRedis::new())),
            other => panic!("BENCH_SINKS: {other:?} is neither none nor all"),
        };
        let extra = match (&db, &redis) {
            (Some(db), Some(redis)) => format!("{}\n{}", mysql_section(&db.url()), redis.section(&TestRedis::server())),
            _ => String::new(),
        };
        // The bench agent logs errors only, so its ready line does not tell the HTTP port: give it one.
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .expect("a free port for the agent's /metrics");
        let agent = start_agent(&format!("[http]\nlisten = \"{metrics_addr}\"\n{extra}"));
        for &rate in &rates {
            let phase = run_phase(&agent, metrics_addr, scripts, rate, Duration::from_secs(secs));
            phase.print(sinks, rate);
            results.record(phase.json(sinks, scripts, rate));
            // The sinks drain what is left before the next rate starts.
            std::thread::sleep(Duration::from_secs(2));
        }
        let idle = measure(&agent, metrics_addr, Duration::from_secs(idle_secs), || 0);
        println!(
            "| {sinks} | idle | - | - | {:.2}% | {:.1}/s | {:.1}/s | {:.1}/s | - | - | - | {:.1} MiB |",
            idle.cpu_core * 100.0,
            idle.switches() as f64 / idle.secs,
            idle.commits as f64 / idle.secs,
            idle.syncs as f64 / idle.secs,
            idle.rss_kib as f64 / 1024.0
        );
        results.record(serde_json::json!({
            "kind": "steady_idle", "sinks": sinks, "secs": idle.secs, "cpu_core": idle.cpu_core,
            "switches_per_s": idle.switches() as f64 / idle.secs, "rss_mib": idle.rss_kib as f64 / 1024.0,
        }));
        drop(agent);
        drop(redis);
        drop(db);
    }
}

/// Counters of the agent process at one instant.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    cpu_s: f64,
    voluntary: u64,
    involuntary: u64,
    commits: u64,
    syncs: u64,
}

fn snapshot(agent: &Agent, metrics_addr: std::net::SocketAddr) -> Snapshot {
    let pid = agent.pid() as u32;
    let (mut voluntary, mut involuntary) = (0, 0);
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            voluntary += status_field(&status, "voluntary_ctxt_switches:");
            involuntary += status_field(&status, "nonvoluntary_ctxt_switches:");
        }
    }
    let (_, metrics) = kit::util::http_get(metrics_addr, "/metrics");
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Snapshot {
        cpu_s: process_cpu_seconds(pid),
        voluntary,
        involuntary,
        commits: counter("telemetry_wal_group_commits_total"),
        syncs: counter("telemetry_wal_syncs_total"),
    }
}

fn status_field(status: &str, field: &str) -> u64 {
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().parse().ok()).unwrap_or(0)
}

/// What happened in the agent between two snapshots, plus what the scripts saw.
struct Phase {
    secs: f64,
    events: u64,
    errors: u64,
    cpu_core: f64,
    cpu_us_per_event: f64,
    voluntary: u64,
    involuntary: u64,
    commits: u64,
    syncs: u64,
    rss_kib: u64,
    latencies_us: Vec<u64>,
}

impl Phase {
    fn switches(&self) -> u64 {
        self.voluntary + self.involuntary
    }

    fn per_event(&self, n: u64) -> f64 {
        n as f64 / self.events.max(1) as f64
    }

    fn print(&self, sinks: &str, rate: u64) {
        println!(
            "| {sinks} | {rate} | {:.0} | {:.1} µs | {:.1}% | {:.2} ({:.2}+{:.2}) | {:.0} | {:.0} | {:.1} | {:.2} ms | {:.2} ms | {:.1} MiB |{}",
            self.events as f64 / self.secs,
            self.cpu_us_per_event,
            self.cpu_core * 100.0,
            self.per_event(self.switches()),
            self.per_event(self.voluntary),
            self.per_event(self.involuntary),
            self.commits as f64 / self.secs,
            self.syncs as f64 / self.secs,
            self.events as f64 / self.commits.max(1) as f64,
            percentile(&self.latencies_us, 0.50) / 1000.0,
            percentile(&self.latencies_us, 0.99) / 1000.0,
            self.rss_kib as f64 / 1024.0,
            if self.errors > 0 { format!(" {} errors", self.errors) } else { String::new() },
        );
    }

    fn json(&self, sinks: &str, scripts: usize, rate: u64) -> serde_json::Value {
        serde_json::json!({
            "kind": "steady", "sinks": sinks, "scripts": scripts, "offered_per_s": rate, "secs": self.secs,
            "events": self.events, "errors": self.errors, "cpu_core": self.cpu_core,
            "cpu_us_per_event": self.cpu_us_per_event,
            "switches_per_event": self.per_event(self.switches()),
            "voluntary_per_event": self.per_event(self.voluntary),
            "involuntary_per_event": self.per_event(self.involuntary),
            "group_commits_per_s": self.commits as f64 / self.secs, "syncs_per_s": self.syncs as f64 / self.secs,
            "p50_ms": percentile(&self.latencies_us, 0.50) / 1000.0,
            "p99_ms": percentile(&self.latencies_us, 0.99) / 1000.0,
            "rss_mib": self.rss_kib as f64 / 1024.0,
        })
    }
}

/// Snapshots the agent, waits `length`, snapshots again; `events` tells how many events that window saw.
fn measure(agent: &Agent, metrics_addr: std::net::SocketAddr, length: Duration, events: impl FnOnce() -> u64) -> Phase {
    let before = snapshot(agent, metrics_addr);
    let started = Instant::now();
    std::thread::sleep(length);
    let after = snapshot(agent, metrics_addr);
    let secs = started.elapsed().as_secs_f64();
    let events = events();
    let cpu = after.cpu_s - before.cpu_s;
    Phase {
        secs,
        events,
        errors: 0,
        cpu_core: cpu / secs,
        cpu_us_per_event: cpu * 1e6 / events.max(1) as f64,
        voluntary: after.voluntary - before.voluntary,
        involuntary: after.involuntary - before.involuntary,
        // The agent refreshes these counters once a second.
        commits: after.commits.saturating_sub(before.commits),
        syncs: after.syncs.saturating_sub(before.syncs),
        rss_kib: rss_kib(agent),
        latencies_us: Vec::new(),
    }
}

/// `scripts` threads, each its own connection, together sending `rate` events/s, one at a time: each waits
/// for its ack before the next is due. The measured window starts after a warm-up and ends before the scripts
/// stop, so that connecting and disconnecting stay out of it.
fn run_phase(agent: &Agent, metrics_addr: std::net::SocketAddr, scripts: usize, rate: u64, length: Duration) -> Phase {
    const WARM_UP: Duration = Duration::from_secs(3);
    let interval = Duration::from_secs_f64(scripts as f64 / rate as f64);
    let start = Arc::new(Barrier::new(scripts + 1));
    let window = Arc::new(Window::default());
    let threads: Vec<_> = (0..scripts)
        .map(|i| {
            let (socket, start, window) = (agent.socket.clone(), start.clone(), window.clone());
            std::thread::spawn(move || script(&socket, i, scripts, interval, WARM_UP + length, &start, &window))
        })
        .collect();
    start.wait();
    std::thread::sleep(WARM_UP);
    window.open.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut phase = measure(agent, metrics_addr, length, || {
        window.open.store(false, std::sync::atomic::Ordering::SeqCst);
        window.acked.load(std::sync::atomic::Ordering::SeqCst)
    });
    let mut latencies = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let (script_latencies, script_errors) = thread.join().expect("script thread");
        latencies.extend(script_latencies);
        errors += script_errors;
    }
    phase.latencies_us = latencies;
    phase.errors = errors;
    phase
}

/// Whether the measured window is open, and the acks counted in it.
#[derive(Default)]
struct Window {
    open: std::sync::atomic::AtomicBool,
    acked: std::sync::atomic::AtomicU64,
}

/// One script: connects, then sends an event every `interval` (its first at a random offset, so that scripts
/// do not send in step) and reads its ack, until `run_for` has passed. Returns the ack latencies measured
/// while the window was open, and the count of answers that were not acks.
fn script(
    socket: &Path,
    index: usize,
    scripts: usize,
    interval: Duration,
    run_for: Duration,
    start: &Barrier,
    window: &Window,
) -> (Vec<u64>, u64) {
    use std::sync::atomic::Ordering;
    let stream = UnixStream::connect(socket).expect("connect to the agent");
    let mut answers = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut stream = stream;
    let profile = format!("steady-{:03}", index % scripts);
    let names = ["equity", "pnl", "exposure", "drawdown", "position", "margin", "orders", "fills", "latency", "spread"];
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut answer = String::new();
    start.wait();
    let began = Instant::now();
    let mut due = began + interval.mul_f64(fastrand::f64());
    let mut i = 0u64;
    while due < began + run_for {
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let line = format!(
            "{{\"kind\":\"metric\",\"profile_id\":\"{profile}\",\"name\":\"{}\",\"value\":{}.25}}\n",
            names[i as usize % names.len()],
            i
        );
        let sent = Instant::now();
        if stream.write_all(line.as_bytes()).is_err() {
            return (latencies, errors + 1);
        }
        answer.clear();
        if answers.read_line(&mut answer).unwrap_or(0) == 0 {
            return (latencies, errors + 1);
        }
        let took = sent.elapsed();
        if window.open.load(Ordering::Relaxed) {
            if answer.starts_with("{\"ok\":true") {
                window.acked.fetch_add(1, Ordering::Relaxed);
                latencies.push(took.as_micros() as u64);
            } else {
                errors += 1;
            }
        }
        i += 1;
        // Paced, not closed-loop: a slow ack does not lower the offered rate (the next is due at once).
        due += interval;
    }
    (latencies, errors)
}
