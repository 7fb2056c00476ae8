//! Soak: the release agent under a steady load for a long time, its MySQL connection cut now and then; the
//! agent's memory and its WAL's disk use must stay flat, and every acknowledged event must reach MySQL.
//!
//! `cargo bench -p telemetry-agent --bench soak` (30 min). The agent runs as a child process with its own
//! temp directory (WAL), its own database `tat_soak_{pid}` (through a gate that cuts the connections) and its
//! own Redis key prefix `soak:{pid}`; all are removed at the end (and leftovers of a killed run at the next
//! start). Every sample (default every 10 s) prints a progress line: agent RSS (VmRSS), WAL disk use
//! (allocated blocks), events acked, rows in MySQL (from the agent's committed offset: seqs are
//! consecutive), backlog, open file descriptors. At the end: COUNT(*) must equal the events acked, and the
//! summary gives RSS and WAL disk at start/middle/end, the fitted slope over the second half and a verdict:
//! "flat" when the peak of the last quarter exceeds the peak of the second quarter by less than SOAK_FLAT_MIB
//! (default 10 MiB) or 5% of the value at the middle, whichever is larger (see `Trend` for why peaks; the
//! second quarter must start after the WAL's `retain_secs`). Exit status 1 if an event is missing or
//! something grows.
//! BENCH_QUICK=1 makes it a 2-minute smoke test (a cut every 30 s, a sample every 5 s). Ctrl-C ends the load early and still checks, summarises and cleans up.
//!
//! Environment: SOAK_SECS (default 1800), SOAK_RATE (events/s offered, default 5000), SOAK_CLIENTS (default
//! 64), SOAK_RETAIN_SECS (the WAL's `retain_secs`, default 300: its disk use levels off after that long),
//! SOAK_CUT_EVERY_SECS (default 60; 0: no cuts), SOAK_CUT_SECS (default 5), SOAK_SAMPLE_SECS (default
//! 10), SOAK_FLAT_MIB (default 10), TELEMETRY_TEST_MYSQL_URL, TELEMETRY_TEST_REDIS_URL, BENCH_AGENT_CONFIG
//! (lines for the agent's `[mysql]` section), BENCH_REPORT_DIR (default `target/bench-report`: `soak.csv`
//! goes there), BENCH_DOCS_DIR (default `docs/`: the summary `soak.md` and the plot `soak.png` go there).

mod common;
// The tests' kit (tests/kit): the agent launcher, the fault proxy, the test database. A bench uses a part.
#[path = "common/mysql.rs"]
mod db;
#[allow(dead_code)]
#[path = "../../tests/kit/mod.rs"]
mod kit;
#[path = "common/plot.rs"]
mod plot;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::Opts;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};

use common::{cpu_seconds, rss_kib, setting, start_agent};
use db::Database;
use kit::agent::Agent;
use kit::db::TestDb;
use kit::proxy::FaultProxy;
use kit::redis::TestRedis;

const MIB: f64 = 1024.0 * 1024.0;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    let ok = runtime.block_on(soak());
    drop(runtime);
    if !ok {
        std::process::exit(1);
    }
}

/// What the load generator's clients share.
#[derive(Default)]
struct Load {
    acked: AtomicU64,
    refused: AtomicU64,
    /// Lowest and highest seq acked (`first_seq` is `u64::MAX` before the first ack).
    first_seq: AtomicU64,
    max_seq: AtomicU64,
    first_refusal: Mutex<Option<String>>,
    stop: AtomicBool,
}

struct Sample {
    t: f64,
    rss_mib: f64,
    wal_mib: f64,
    acked: u64,
    in_mysql: u64,
    refused: u64,
    cpu_s: f64,
    fds: u64,
    threads: u64,
    gate_open: bool,
}

async fn soak() -> bool {
    let secs: u64 = setting("SOAK_SECS", 1800, 120);
    let rate: u64 = setting("SOAK_RATE", 5000, 5000);
    let clients: u64 = setting("SOAK_CLIENTS", 64, 64);
    let cut_every: u64 = setting("SOAK_CUT_EVERY_SECS", 60, 30);
    let cut_secs: u64 = setting("SOAK_CUT_SECS", 5, 5);
    let sample_secs: u64 = setting("SOAK_SAMPLE_SECS", 10, 5);
    let flat_mib: f64 = setting("SOAK_FLAT_MIB", 10.0, 10.0);
    // The WAL keeps forwarded records this long (for replay): its disk use levels off after that.
    let retain_secs: u64 = setting("SOAK_RETAIN_SECS", 300, 30);
    assert!(rate > 0 && clients > 0 && sample_secs > 0, "SOAK_RATE, SOAK_CLIENTS and SOAK_SAMPLE_SECS must be > 0");
    let server = TestDb::server();
    let redis_url = TestRedis::server();
    let out_dir = common::report_dir().unwrap_or_else(|| kit::util::workspace_root().join("target/bench-report"));
    std::fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", out_dir.display()));

    remove_leftovers(&server, &redis_url).await;
    let pid = std::process::id();
    let prefix = format!("soak:{pid}");
    let db = Database::create_named(&server, &format!("tat_soak_{pid}")).await;
    let _cleanup = Cleanup {
        server: server.clone(),
        database: db.name.clone(),
        redis_url: redis_url.clone(),
        prefix: prefix.clone(),
    };
    let gate = Arc::new(FaultProxy::start(TestDb::server_addr()));
    // Whether the gate lets MySQL through now (for the samples).
    let gate_open = Arc::new(AtomicBool::new(true));
    let agent = start_agent(&format!(
        "retain_secs = {retain_secs}\n[redis]\nurl = {redis_url:?}\nkey_prefix = {prefix:?}\n[mysql]\nurl = {:?}\n",
        db.url_via(gate.port)
    ));
    let wal_dir = agent.dir.path().join("wal");
    println!(
        "soak: {secs} s, {rate} events/s offered by {clients} clients, MySQL cut for {cut_secs} s every {cut_every} s, \
         a sample every {sample_secs} s; agent pid {}, WAL {}, database {}, Redis prefix {prefix}",
        agent.pid(),
        wal_dir.display(),
        db.name
    );

    let load = Arc::new(Load { first_seq: AtomicU64::new(u64::MAX), ..Load::default() });
    let started = Instant::now();
    let senders: Vec<_> = (0..clients)
        .map(|c| {
            let (socket, load) = (agent.socket.clone(), load.clone());
            let interval = Duration::from_secs_f64(clients as f64 / rate as f64);
            tokio::spawn(async move { client(socket, c, interval, load).await })
        })
        .collect();

    // Cuts: at k × cut_every (k ≥ 1) the gate closes (refusing and cutting connections) for cut_secs.
    let cuts: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let cutter = {
        let (gate, open, cuts, load) = (gate.clone(), gate_open.clone(), cuts.clone(), load.clone());
        tokio::spawn(async move {
            if cut_every == 0 {
                return;
            }
            let mut k = 1;
            while !load.stop.load(Ordering::SeqCst) {
                let at = started + Duration::from_secs(k * cut_every);
                if at >= started + Duration::from_secs(secs) {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                if load.stop.load(Ordering::SeqCst) {
                    break;
                }
                gate.set_down(true);
                open.store(false, Ordering::SeqCst);
                let from = started.elapsed().as_secs_f64();
                tokio::time::sleep(Duration::from_secs(cut_secs)).await;
                gate.set_down(false);
                open.store(true, Ordering::SeqCst);
                if let Ok(mut cuts) = cuts.lock() {
                    cuts.push((from, started.elapsed().as_secs_f64()));
                }
                k += 1;
            }
        })
    };

    let mut samples: Vec<Sample> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(sample_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
    let interrupted = loop {
        let ctrl_c = tokio::select! {
            _ = tick.tick() => false,
            _ = sigint.recv() => true,
        };
        let s = sample(&agent, &wal_dir, &db, &load, started, gate_open.load(Ordering::SeqCst)).await;
        progress(&s, samples.last(), cuts.lock().map(|c| c.len()).unwrap_or(0));
        samples.push(s);
        if ctrl_c {
            println!("soak: interrupted; stopping the load, then checking and cleaning up");
            break true;
        }
        if started.elapsed() >= Duration::from_secs(secs) {
            break false;
        }
    };
    load.stop.store(true, Ordering::SeqCst);
    for sender in senders {
        let _ = sender.await;
    }
    let _ = cutter.await;
    gate.set_down(false);
    gate_open.store(true, Ordering::SeqCst);
    let load_secs = started.elapsed().as_secs_f64();

    // Every acked event must reach MySQL.
    let (acked, refused) = (load.acked.load(Ordering::SeqCst), load.refused.load(Ordering::SeqCst));
    let last_seq = load.max_seq.load(Ordering::SeqCst);
    let wait_from = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let offset = db.offset().await;
        if offset >= last_seq {
            break;
        }
        if wait_from.elapsed() > Duration::from_secs(300) {
            println!("soak: MySQL did not catch up within 300 s (offset {offset}, last acked seq {last_seq})");
            break;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!("soak: waiting for MySQL to catch up: {} events behind", last_seq.saturating_sub(offset));
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up_secs = wait_from.elapsed().as_secs_f64();
    eprintln!("soak: counting rows in MySQL ...");
    let rows = db.count().await;
    let profiles = redis_profiles(&redis_url, &prefix).await;
    let cuts = cuts.lock().map(|c| c.clone()).unwrap_or_default();
    drop(agent);

    // Files: the samples beside the other benches' results; the summary and the plot are published.
    let csv = out_dir.join("soak.csv");
    write_csv(&csv, &samples).unwrap_or_else(|e| panic!("cannot write {}: {e}", csv.display()));
    let docs = common::docs_dir();
    std::fs::create_dir_all(&docs).unwrap_or_else(|e| panic!("cannot create {}: {e}", docs.display()));
    let png = docs.join("soak.png");
    let plotted = plot_soak(&png, &samples, &cuts, &Run { rate, secs, cut_every, sample_secs });

    let rows_ok = rows == acked && acked > 0;
    let rss = trend(&samples, |s| s.rss_mib, flat_mib);
    let wal = trend(&samples, |s| s.wal_mib, flat_mib);
    let flat = rss.flat && wal.flat;
    let mut summary = vec![
        format!(
            "soak summary: {load_secs:.0} s{} at {rate} events/s offered from {clients} clients; MySQL cut {} times \
             for {cut_secs} s; WAL retain_secs {retain_secs}",
            if interrupted { " (interrupted)" } else { "" },
            cuts.len()
        ),
        format!(
            "  events: {acked} acked ({:.0}/s), {refused} refused{}; rows in MySQL: {rows} (COUNT(*), \
             {caught_up_secs:.1} s after the load stopped): {}",
            acked as f64 / load_secs,
            load.first_refusal.lock().ok().and_then(|r| r.clone()).map_or(String::new(), |r| format!(" (first: {r})")),
            if rows_ok {
                "every acked event is there".to_string()
            } else {
                format!("MISMATCH: {} missing", acked as i64 - rows as i64)
            }
        ),
        format!("  Redis: {profiles} profiles mirrored (of 300)"),
        format!("  {}", rss.line("agent RSS")),
        format!("  {}", wal.line("WAL disk")),
    ];
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        summary.push(format!(
            "  open fds: {} at start, {} at the end; threads: {} / {}; agent CPU: {:.0}% of a core on average",
            first.fds,
            last.fds,
            first.threads,
            last.threads,
            (last.cpu_s - first.cpu_s) / (last.t - first.t).max(1.0) * 100.0
        ));
    }
    summary.push(format!(
        "  verdict: {} (flat: the last quarter's peak above the second quarter's by less than {flat_mib} MiB or 5% \
         of the middle value, whichever is larger)",
        if flat { "flat" } else { "GROWING" }
    ));
    println!("\n{}", summary.join("\n"));
    let md = docs.join("soak.md");
    std::fs::write(&md, soak_markdown(&summary, plotted.is_ok()))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", md.display()));
    println!(
        "  samples: {}; summary: {}{}",
        csv.display(),
        md.display(),
        match plotted {
            Ok(true) => format!("; plot: {}", png.display()),
            Ok(false) => format!("; plot (without text, no font found): {}", png.display()),
            Err(e) => format!(" (no plot: {e})"),
        }
    );
    rows_ok && flat
}

/// One paced client: metrics (agent-assigned ids) and every 4th a trade with its own event id, until `stop`;
/// then it closes its sending half and reads the remaining answers.
async fn client(socket: PathBuf, c: u64, interval: Duration, load: Arc<Load>) {
    let stream = tokio::net::UnixStream::connect(&socket).await.expect("connect to the agent");
    let (read, write) = stream.into_split();
    let reader = {
        let load = load.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let seq = line
                    .strip_prefix("{\"ok\":true,\"seq\":")
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|seq| seq.parse::<u64>().ok());
                match seq {
                    Some(seq) => {
                        load.first_seq.fetch_min(seq, Ordering::SeqCst);
                        load.max_seq.fetch_max(seq, Ordering::SeqCst);
                        load.acked.fetch_add(1, Ordering::SeqCst);
                    }
                    None => {
                        load.refused.fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut first) = load.first_refusal.lock() {
                            first.get_or_insert(line);
                        }
                    }
                }
            }
        })
    };
    let mut out = BufWriter::new(write);
    let mut tick = tokio::time::interval(interval);
    let mut i = 0u64;
    while !load.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let n = i * 64 + c;
        let profile = n % 300;
        let line = if i % 4 == 3 {
            format!(
                "{{\"kind\":\"trade\",\"profile_id\":\"p-{profile:03}\",\"symbol\":\"BTCUSDT\",\"side\":\"sell\",\"quantity\":\"0.5\",\"price\":\"43000.10\",\"pnl\":-1.5,\"fees\":\"0.02\",\"meta\":{{\"strategy\":\"grid\",\"i\":{n}}},\"event_id\":\"soak-{c}-{i}\"}}\n"
            )
        } else {
            format!(
                "{{\"kind\":\"metric\",\"profile_id\":\"p-{profile:03}\",\"name\":\"m{}\",\"value\":{n}.5,\"tags\":{{\"script\":\"risk\"}}}}\n",
                i % 10
            )
        };
        if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
            break;
        }
        i += 1;
    }
    let _ = out.shutdown().await;
    let _ = reader.await;
}

async fn sample(
    agent: &Agent,
    wal_dir: &Path,
    db: &Database,
    load: &Load,
    started: Instant,
    gate_open: bool,
) -> Sample {
    let first = load.first_seq.load(Ordering::SeqCst);
    let offset = db.offset().await;
    let in_mysql = if first == u64::MAX || offset < first { 0 } else { offset - first + 1 };
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
    let threads =
        status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).map(|d| d.count() as u64).unwrap_or(0);
    Sample {
        t: started.elapsed().as_secs_f64(),
        rss_mib: rss_kib(agent) as f64 / 1024.0,
        wal_mib: disk_use(wal_dir) as f64 / MIB,
        acked: load.acked.load(Ordering::SeqCst),
        in_mysql,
        refused: load.refused.load(Ordering::SeqCst),
        cpu_s: cpu_seconds(agent),
        fds,
        threads,
        gate_open,
    }
}

fn progress(s: &Sample, prev: Option<&Sample>, cuts: usize) {
    let per_s = prev.map_or(0.0, |p| (s.acked - p.acked) as f64 / (s.t - p.t).max(0.001));
    println!(
        "soak t={:>5.0}s  acked {:>9} ({:>5.0}/s)  in MySQL {:>9}  backlog {:>7}  refused {}  RSS {:>6.1} MiB  WAL {:>6.1} MiB  \
         fds {}  cuts {cuts}{}",
        s.t,
        s.acked,
        per_s,
        s.in_mysql,
        s.acked.saturating_sub(s.in_mysql),
        s.refused,
        s.rss_mib,
        s.wal_mib,
        s.fds,
        if s.gate_open { "" } else { "  (MySQL cut now)" }
    );
}

/// Bytes allocated on disk under `dir` (st_blocks × 512, as `du` counts).
fn disk_use(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => m.blocks() * 512 + disk_use(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Start, middle and end values; the peak of the second quarter against the peak of the last one (the
/// verdict), and the least-squares slope over the second half (for information).
///
/// Peaks, not the fit, decide: WAL disk use moves in whole sled segments (8 MiB) and RSS breathes with the
/// load and the cuts, so a bounded value saws up and down and a fit over the second half swings by where the
/// run happens to end (the first 30-minute run fitted +22 MiB to a WAL that stayed between 272 and 296 MiB
/// from minute 7 on). A leak raises every peak: at r MiB/h the last quarter's peak exceeds the second's by
/// r × half the run.
struct Trend {
    start: f64,
    middle: f64,
    end: f64,
    peaks: (f64, f64),
    slope_per_hour: f64,
    threshold: f64,
    flat: bool,
}

impl Trend {
    fn line(&self, what: &str) -> String {
        format!(
            "{what:<9} (MiB): start {:.1}, middle {:.1}, end {:.1}; peak {:.1} in the second quarter, {:.1} in the \
             last ({:+.1}) -> {} (threshold {:.1} MiB); fitted over the second half {:+.1} MiB/h",
            self.start,
            self.middle,
            self.end,
            self.peaks.0,
            self.peaks.1,
            self.peaks.1 - self.peaks.0,
            if self.flat { "flat" } else { "GROWING" },
            self.threshold,
            self.slope_per_hour,
        )
    }
}

fn trend(samples: &[Sample], value: impl Fn(&Sample) -> f64, flat_mib: f64) -> Trend {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Trend {
            start: 0.0,
            middle: 0.0,
            end: 0.0,
            peaks: (0.0, 0.0),
            slope_per_hour: 0.0,
            threshold: flat_mib,
            flat: true,
        };
    };
    let (t0, span) = (first.t, (last.t - first.t).max(1e-9));
    let at = |fraction: f64| t0 + fraction * span;
    let middle =
        samples.iter().min_by(|a, b| (a.t - at(0.5)).abs().total_cmp(&(b.t - at(0.5)).abs())).map_or(0.0, &value);
    let peak = |from: f64, to: f64| {
        samples.iter().filter(|s| s.t >= at(from) - 1e-6 && s.t <= at(to) + 1e-6).map(&value).fold(0.0, f64::max)
    };
    let peaks = (peak(0.25, 0.5), peak(0.75, 1.0));
    let half: Vec<(f64, f64)> = samples.iter().filter(|s| s.t >= at(0.5) - 1e-6).map(|s| (s.t, value(s))).collect();
    let n = half.len() as f64;
    let slope = if half.len() >= 2 {
        let (mx, my) = (half.iter().map(|p| p.0).sum::<f64>() / n, half.iter().map(|p| p.1).sum::<f64>() / n);
        let sxy: f64 = half.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
        let sxx: f64 = half.iter().map(|(x, _)| (x - mx).powi(2)).sum();
        if sxx > 0.0 {
            sxy / sxx
        } else {
            0.0
        }
    } else {
        0.0
    };
    let threshold = flat_mib.max(0.05 * middle);
    Trend {
        start: value(first),
        middle,
        end: value(last),
        peaks,
        slope_per_hour: slope * 3600.0,
        threshold,
        flat: peaks.1 - peaks.0 < threshold,
    }
}

/// `docs/soak.md`: the run's summary as printed, and its plot.
fn soak_markdown(summary: &[String], plotted: bool) -> String {
    let now = time::OffsetDateTime::now_utc();
    let finished = now
        .replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .map_or_else(|_| String::new(), |d| format!("; finished {d}"));
    let mut md = format!(
        "# Soak\n\nWritten by `scripts/bench.sh soak` (`cargo bench -p telemetry-agent --bench soak`; settings in the \
         comment at the top of `agent/benches/soak.rs`{finished}). The release agent runs as a child process under a \
         steady paced load while a gate cuts its MySQL connections now and then; agent RSS (VmRSS) and the WAL \
         directory's disk use (allocated blocks) are sampled throughout. \"Flat\" means the peak of the last quarter \
         exceeds the peak of the second quarter by less than the threshold. At the end every acked event must be in MySQL (COUNT(*)).\n\n```\n{}\n```\n",
        summary.join("\n")
    );
    if plotted {
        md += "\n![agent RSS, WAL disk use and backlog over the soak](soak.png)\n";
    }
    md
}

fn write_csv(path: &Path, samples: &[Sample]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "t_s,rss_mib,wal_disk_mib,acked,rows_in_mysql,backlog,refused,acked_per_s,agent_cpu_pct,fds,threads,mysql_reachable")?;
    let mut prev: Option<&Sample> = None;
    for s in samples {
        let dt = prev.map_or(0.0, |p| s.t - p.t);
        let per = |now: f64, then: f64| if dt > 0.0 { (now - then) / dt } else { 0.0 };
        writeln!(
            out,
            "{:.1},{:.2},{:.2},{},{},{},{},{:.1},{:.1},{},{},{}",
            s.t,
            s.rss_mib,
            s.wal_mib,
            s.acked,
            s.in_mysql,
            s.acked.saturating_sub(s.in_mysql),
            s.refused,
            prev.map_or(0.0, |p| per(s.acked as f64, p.acked as f64)),
            prev.map_or(0.0, |p| per(s.cpu_s, p.cpu_s) * 100.0),
            s.fds,
            s.threads,
            u8::from(s.gate_open)
        )?;
        prev = Some(s);
    }
    out.flush()
}

/// What the soak ran with, for the plot's titles.
#[derive(Clone, Copy)]
struct Run {
    rate: u64,
    secs: u64,
    cut_every: u64,
    sample_secs: u64,
}

fn plot_soak(path: &Path, samples: &[Sample], cuts: &[(f64, f64)], run: &Run) -> Result<bool, String> {
    let Run { rate, secs, cut_every, sample_secs } = *run;
    let points = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(|s| (s.t / 60.0, f(s))).collect::<Vec<_>>();
    let figure = plot::Figure {
        title: format!("soak: {rate} events/s for {:.0} min, MySQL cut every {} s", secs as f64 / 60.0, cut_every),
        x_desc: "time since start (min)".into(),
        shaded: cuts.iter().map(|(a, b)| (a / 60.0, b / 60.0)).collect(),
        shade_label: "MySQL connection cut".into(),
        panels: vec![
            plot::Panel {
                title: format!("agent memory and WAL disk use (sampled every {} s)", sample_secs),
                y_desc: "MiB".into(),
                y2_desc: None,
                series: vec![
                    plot::Series {
                        label: "agent RSS".into(),
                        color: plot::TAB_BLUE,
                        points: points(&|s| s.rss_mib),
                        right: false,
                    },
                    plot::Series {
                        label: "WAL disk use".into(),
                        color: plot::TAB_GREEN,
                        points: points(&|s| s.wal_mib),
                        right: false,
                    },
                ],
            },
            plot::Panel {
                title: "backlog held in the WAL".into(),
                y_desc: "events acked, not in MySQL".into(),
                y2_desc: None,
                series: vec![plot::Series {
                    label: "backlog".into(),
                    color: plot::TAB_PURPLE,
                    points: points(&|s| s.acked.saturating_sub(s.in_mysql) as f64),
                    right: false,
                }],
            },
        ],
        size: (1200, 800),
    };
    plot::draw(path, &figure)
}

async fn redis_profiles(url: &str, prefix: &str) -> u64 {
    let Ok(client) = redis::Client::open(url) else { return 0 };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return 0 };
    redis::cmd("SCARD").arg(format!("{prefix}:profiles")).query_async(&mut conn).await.unwrap_or(0)
}

/// Databases `tat_soak_{pid}` and Redis keys `soak:{pid}:*` of soak runs that are no longer running.
async fn remove_leftovers(server: &str, redis_url: &str) {
    let dead = |pid: &str| pid.parse::<u32>().is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    if let Ok(mut conn) = mysql_async::Conn::new(Opts::from_url(server).expect("MySQL URL")).await {
        let names: Vec<String> = conn.query("SHOW DATABASES LIKE 'tat\\_soak\\_%'").await.unwrap_or_default();
        for name in names {
            if name.strip_prefix("tat_soak_").is_some_and(dead) {
                println!("soak: dropping {name}, left by an earlier run");
                let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`")).await;
            }
        }
        let _ = conn.disconnect().await;
    }
    let Ok(client) = redis::Client::open(redis_url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    let mut cursor = 0u64;
    let mut stale = Vec::new();
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("soak:*")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        stale.extend(keys.into_iter().filter(|k| k.split(':').nth(1).is_some_and(dead)));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if !stale.is_empty() {
        println!("soak: deleting {} Redis keys left by earlier runs", stale.len());
        for chunk in stale.chunks(1000) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
    }
}

/// Drops the soak's database and Redis keys, also when the soak panics.
struct Cleanup {
    server: String,
    database: String,
    redis_url: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (server, database, redis_url, prefix) =
            (self.server.clone(), self.database.clone(), self.redis_url.clone(), self.prefix.clone());
        // A runtime of its own on a thread of its own: this may run inside the soak's runtime.
        let done = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async {
                if let Ok(mut conn) = mysql_async::Conn::new(Opts::from_url(&server).expect("MySQL URL")).await {
                    let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{database}`")).await;
                    let _ = conn.disconnect().await;
                }
                if let Ok(client) = redis::Client::open(redis_url.as_str()) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        let keys: Vec<String> = redis::cmd("KEYS")
                            .arg(format!("{prefix}:*"))
                            .query_async(&mut conn)
                            .await
                            .unwrap_or_default();
                        for chunk in keys.chunks(1000) {
                            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
                        }
                    }
                }
            });
        });
        let _ = done.join();
        println!("soak: removed database {} and Redis keys {}:*", self.database, self.prefix);
    }
}
