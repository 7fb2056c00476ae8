//! The report of `scripts/bench.sh`: reads the JSON lines every bench wrote to BENCH_REPORT_DIR (default
//! `target/bench-report`) and writes `docs/benchmarks.md` (ratios within the run, against the old ways and
//! the ceilings) and `docs/mysql-outage.png` (throughput, backlog and lag through the MySQL outage).
//! BENCH_DOCS_DIR writes them elsewhere. `cargo bench -p telemetry-agent --bench report` after the benches
//! (scripts/bench.sh runs it last).

mod common;
// The tests' kit (tests/kit): the agent launcher, the fault proxy, the test database. A bench uses a part.
#[allow(dead_code)]
#[path = "../../tests/kit/mod.rs"]
mod kit;
#[path = "common/plot.rs"]
mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn main() {
    let dir = common::report_dir().unwrap_or_else(|| kit::util::workspace_root().join("target/bench-report"));
    let docs = common::docs_dir();
    let data = Data::load(&dir);
    if data.lines.is_empty() {
        eprintln!("report: no results in {} (run scripts/bench.sh)", dir.display());
        std::process::exit(1);
    }
    std::fs::create_dir_all(&docs).unwrap_or_else(|e| panic!("cannot create {}: {e}", docs.display()));

    let outage_png = docs.join("mysql-outage.png");
    let plotted = match plot_outage(&dir.join("mysql-outage.csv"), &outage_png, &data) {
        Ok(Some(text)) => {
            eprintln!("report: wrote {}{}", outage_png.display(), if text { "" } else { " (without text: no font)" });
            true
        }
        Ok(None) => {
            eprintln!("report: no outage time series in {}; no plot", dir.display());
            false
        }
        Err(e) => {
            eprintln!("report: cannot plot the outage: {e}");
            false
        }
    };
    let markdown = render(&data, plotted);
    let md_path = docs.join("benchmarks.md");
    std::fs::write(&md_path, &markdown).unwrap_or_else(|e| panic!("cannot write {}: {e}", md_path.display()));
    eprintln!("report: wrote {}", md_path.display());
    println!("{markdown}");
}

/// Every JSON line of `{dir}/*.jsonl`, tagged with its file's stem in `"file"`.
struct Data {
    lines: Vec<Value>,
}

impl Data {
    fn load(dir: &Path) -> Data {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
        files.sort();
        let mut lines = Vec::new();
        for path in files {
            let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                match serde_json::from_str::<Value>(line) {
                    Ok(Value::Object(mut map)) => {
                        map.insert("file".into(), Value::String(stem.clone()));
                        lines.push(Value::Object(map));
                    }
                    _ => eprintln!("report: {}:{}: not a JSON object, skipped", path.display(), i + 1),
                }
            }
        }
        Data { lines }
    }

    fn all<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
        let kind = kind.to_string();
        self.lines.iter().filter(move |v| v["kind"] == kind.as_str())
    }

    fn one(&self, kind: &str) -> Option<&Value> {
        self.all(kind).last()
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// 1234567.8 -> "1,234,568".
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < -0.5 {
        format!("-{out}")
    } else {
        out
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b <= 0.0 {
        return "-".into();
    }
    let r = a / b;
    if r >= 10.0 {
        format!("{r:.1}x")
    } else {
        format!("{r:.2}x")
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

/// A row of the summary table.
struct Row {
    area: String,
    measured: String,
    against: String,
    ratio: String,
    target: String,
}

fn render(data: &Data, plotted: bool) -> String {
    let mut md = String::new();
    let run = data.one("run");
    let quick = run.and_then(|r| r.get("quick")).and_then(Value::as_bool).unwrap_or(false);
    let steps: Vec<(String, f64)> =
        data.all("step").filter_map(|s| Some((s.get("name")?.as_str()?.to_string(), num(s, "secs")?))).collect();
    let total_secs: f64 = steps.iter().map(|(_, s)| s).sum();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `{}` on {} ({}). Do not edit by hand: run the command again; the numbers below all come \
         from that one run.\n",
        if quick { "BENCH_QUICK=1 scripts/bench.sh" } else { "scripts/bench.sh" },
        run.and_then(|r| r.get("finished").or(r.get("started"))).and_then(Value::as_str).unwrap_or("an unknown date"),
        if quick {
            "**quick mode**: smaller sizes, 1-3 s per case, a 10 s outage, no 5M-row pass; a smoke test, not numbers to quote"
        } else {
            "full run: every bench with its default sizes and durations"
        }
    );
    let _ = writeln!(md, "**Machine.** {}\n", machine_summary(data));
    let _ = writeln!(
        md,
        "Everything (load generators, agent, MariaDB, Redis) shares the same cores, and numbers move by about ±20% \
         between runs on this kind of machine: **compare the ratios within one run**, each taken against a baseline \
         measured minutes apart on the same machine.\n"
    );

    let _ = writeln!(md, "## Summary\n");
    let rows = summary_rows(data);
    let _ = writeln!(md, "| area | measured | compared with (same run) | ratio | target |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(md, "| {} | {} | {} | {} | {} |", r.area, r.measured, r.against, r.ratio, r.target);
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Ratios are *measured ÷ compared with*. The old ways are what the bot scripts did before the agent (one \
         autocommit INSERT or one HSET per event, a connection per script); (b) is the batching fix proposed \
         before the agent; the ceilings are what the disk allows (one fdatasync per write) and what MariaDB takes \
         from one connection's LOAD DATA (the agent's bulk path runs several at once). Targets are the project's \
         (see docs/performance.md).\n"
    );

    details(&mut md, data, plotted);

    let _ = writeln!(md, "## How this was produced\n");
    let _ = writeln!(
        md,
        "```sh\nscripts/bench.sh                  # full run (about 20 min here)\nBENCH_QUICK=1 scripts/bench.sh    # smoke test (about 4-5 min)\n```\n"
    );
    let _ = writeln!(
        md,
        "`scripts/bench.sh` makes sure MariaDB and Redis answer (as the tests do), installs redis-py for the Python \
         baseline when missing, builds every bench in release once, then runs `cargo bench -p telemetry-wal --bench \
         append`, `cargo bench -p telemetry-agent --bench` `ingest`, `steady`, `mysql` and `redis`, and the Python client's \
         `clients/python/benchmarks/compare.py` (in the test venv, `target/pyvenv`), one after the other, with `BENCH_REPORT_DIR` set: each bench prints its own tables as before and also writes \
         its numbers as JSON lines there (`append.jsonl`, `ingest.jsonl`, `steady.jsonl`, `mysql.jsonl`, `redis.jsonl`, \
         `python.jsonl`, the outage time series `mysql-outage.csv`, each bench's output in `*.log`). Last, `cargo \
         bench -p telemetry-agent --bench report` turns them into this page and `mysql-outage.png`. Every bench \
         still runs alone as docs/performance.md describes.\n"
    );
    if !steps.is_empty() {
        let list: Vec<String> = steps.iter().map(|(n, s)| format!("{n} {}", duration(*s))).collect();
        let _ = writeln!(md, "This run took {} in all: {}.\n", duration(total_secs), list.join(", "));
    }
    let _ = writeln!(
        md,
        "The soak test is separate (`scripts/bench.sh soak`, 30 min by default); its last result is in \
         [soak.md](soak.md)."
    );
    md
}

fn duration(secs: f64) -> String {
    if secs >= 90.0 {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{secs:.0} s")
    }
}

fn machine_summary(data: &Data) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or("?".to_string(), |kib| format!("{:.0}", kib / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let fsync = data.one("fdatasync").and_then(|f| num(f, "per_s"));
    let mysql = data.one("mysql_server").and_then(|v| v["version"].as_str()).unwrap_or("?");
    let redis = data.one("redis_server").and_then(|v| v["version"].as_str()).unwrap_or("?");
    let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{cores} cores ({model}), {mem_gib} GiB of memory, Linux {kernel}; disk: {} fdatasync/s (4 KiB write + \
         fdatasync, one thread, measured in this run); MariaDB {mysql} and Redis {redis} with default settings on the \
         same machine; {rustc}.",
        fsync.map_or("?".into(), thousands)
    )
}

fn summary_rows(data: &Data) -> Vec<Row> {
    let mut rows = Vec::new();
    // WAL append against one record per fdatasync.
    let fsync = data.one("fdatasync").and_then(|f| num(f, "per_s"));
    for a in data.all("append") {
        let (Some(p), Some(rate), Some(per_flush), Some(fsync)) =
            (num(a, "producers"), num(a, "records_per_s"), num(a, "records_per_flush"), fsync)
        else {
            continue;
        };
        rows.push(Row {
            area: format!("WAL append, fsync mode, {p:.0} producer{}", if p > 1.0 { "s" } else { "" }),
            measured: format!("{} records/s ({per_flush:.1} per flush)", thousands(rate)),
            against: format!("ceiling of one record per fdatasync: {}/s", thousands(fsync)),
            ratio: ratio(rate, fsync),
            target: "-".into(),
        });
    }
    // The old way of writing telemetry: one autocommit INSERT per row (empty tables).
    let mysql_way = |prefill: f64, way: &str| {
        data.all("mysql").filter(|m| num(m, "prefill") == Some(prefill) && m["way"] == way).last()
    };
    let old_a = mysql_way(0.0, "a").and_then(|a| num(a, "rows_per_s"));
    for i in data.all("ingest") {
        let (Some(clients), Some(acked)) = (num(i, "clients"), num(i, "acked_per_s")) else { continue };
        let offered = num(i, "offered_per_s");
        match offered {
            None => {
                let target = match clients as u64 {
                    64 => format!("≥ 150,000/s: {}", verdict(acked >= 150_000.0)),
                    900 => num(i, "peak_rss_mib").map_or("-".into(), |rss| {
                        format!("peak RSS < 128 MiB: {} ({rss:.0} MiB)", verdict(rss < 128.0))
                    }),
                    _ => "-".into(),
                };
                rows.push(Row {
                    area: format!(
                        "Socket ingest, {clients:.0} pipelining client{}",
                        if clients > 1.0 { "s" } else { "" }
                    ),
                    measured: format!("{} acked events/s", thousands(acked)),
                    against: old_a.map_or("old way (a) not measured".into(), |a| {
                        format!("old way (a), one INSERT per event over 30 connections: {} rows/s", thousands(a))
                    }),
                    ratio: old_a.map_or("-".into(), |a| ratio(acked, a)),
                    target,
                });
            }
            Some(rate) => {
                let Some(p99) = num(i, "p99_ms") else { continue };
                rows.push(Row {
                    area: format!("Socket ingest, ack p99 at {} events/s from {clients:.0} clients", thousands(rate)),
                    measured: format!("{p99:.2} ms (p50 {:.2} ms)", num(i, "p50_ms").unwrap_or(0.0)),
                    against: "target 10 ms".into(),
                    ratio: ratio(p99, 10.0),
                    target: format!("< 10 ms: {}", verdict(p99 < 10.0)),
                });
            }
        }
    }
    steady_rows(data, &mut rows);
    // MySQL: the agent against (a), (b) and one connection's LOAD DATA (c), per pass.
    let mut prefills: Vec<f64> = data.all("mysql").filter_map(|m| num(m, "prefill")).collect();
    prefills.sort_by(f64::total_cmp);
    prefills.dedup();
    for prefill in prefills {
        let rate = |way: &str| mysql_way(prefill, way).and_then(|m| num(m, "rows_per_s"));
        let tables =
            if prefill > 0.0 { format!("tables holding {} rows", thousands(prefill)) } else { "empty tables".into() };
        let (a, b, c) = (rate("a"), rate("b"), rate("c"));
        for (way, what, targets) in [
            // Issue 17's targets for the bulk path (LOAD DATA), against one connection's LOAD DATA.
            ("d", "agent catch-up of a WAL backlog", [None, Some(1.6), Some(1.2)]),
            ("e", "agent end to end, 64 socket clients", [None, None, Some(0.85)]),
        ] {
            let Some(rate) = rate(way) else { continue };
            let baselines = [
                ("(a) old way, one autocommit INSERT per row, 30 connections", a),
                ("(b) pool of 5, 50-row INSERT per commit", b),
                ("(c) LOAD DATA, one connection", c),
            ];
            for (k, ((name, base), target)) in baselines.iter().zip(targets).enumerate() {
                let Some(base) = base else { continue };
                rows.push(Row {
                    area: if k == 0 { format!("MySQL ({way}) {what}, {tables}") } else { "".into() },
                    measured: if k == 0 { format!("{} rows/s", thousands(rate)) } else { "".into() },
                    against: format!("{name}: {} rows/s", thousands(*base)),
                    ratio: ratio(rate, *base),
                    target: target.map_or("-".into(), |t| format!("≥ {t}x: {}", verdict(rate >= t * base))),
                });
            }
        }
    }
    // The server's CPU per row: the agent's writes against LOAD DATA's own (empty tables).
    let server_cpu = |way: &str| mysql_way(0.0, way).and_then(|m| num(m, "server_cpu_s_per_100k"));
    if let (Some(d), Some(c)) = (server_cpu("d"), server_cpu("c")) {
        rows.push(Row {
            area: "MySQL server CPU per row, (d) agent catch-up, empty tables".into(),
            measured: format!("{:.1} µs per row", d * 10.0),
            against: format!("(c) LOAD DATA, one connection: {:.1} µs per row", c * 10.0),
            ratio: ratio(d, c),
            target: format!("≤ 1.0x: {}", verdict(d <= c)),
        });
    }
    if let Some(o) = data.one("outage") {
        let c = mysql_way(0.0, "c").and_then(|c| num(c, "rows_per_s"));
        if let Some(drain) = num(o, "drain_rows_per_s") {
            rows.push(Row {
                area: format!(
                    "MySQL outage of {:.0} s at {} events/s: drain after reconnect",
                    num(o, "outage_secs").unwrap_or(0.0),
                    thousands(num(o, "offered_per_s").unwrap_or(0.0))
                ),
                measured: format!(
                    "{} rows/s; backlog of {} drained in {:.1} s",
                    thousands(drain),
                    thousands(num(o, "backlog_at_reconnect").unwrap_or(0.0)),
                    num(o, "drain_secs").unwrap_or(0.0)
                ),
                against: c.map_or("-".into(), |c| format!("(c) LOAD DATA, one connection: {} rows/s", thousands(c))),
                ratio: c.map_or("-".into(), |c| ratio(drain, c)),
                target: format!(
                    "nothing lost: {} ({} acked, {} rows)",
                    verdict(num(o, "acked") == num(o, "rows")),
                    thousands(num(o, "acked").unwrap_or(0.0)),
                    thousands(num(o, "rows").unwrap_or(0.0))
                ),
            });
        }
    }
    // Redis: the mirror against the old way.
    let redis = |way: &str| data.all("redis").filter(|r| r["way"] == way).last();
    if let Some(mirror) = redis("mirror") {
        let m = num(mirror, "updates_per_s").unwrap_or(0.0);
        let mut first = true;
        for (way, name) in [
            ("python", "old way (a), Python scripts (redis-py), one HSET per update, 30 connections"),
            ("rust", "old way (a) from a Rust client, same round trips, 30 connections"),
        ] {
            let Some(base) = redis(way).and_then(|r| num(r, "updates_per_s")) else { continue };
            rows.push(Row {
                area: if first {
                    "Redis mirror, end to end (30 clients → 1 Redis connection)".into()
                } else {
                    "".into()
                },
                measured: if first {
                    format!(
                        "{} updates/s over {:.0} connection",
                        thousands(m),
                        num(mirror, "connections").unwrap_or(0.0)
                    )
                } else {
                    "".into()
                },
                against: format!("{name}: {} updates/s", thousands(base)),
                ratio: ratio(m, base),
                target: format!("≥ 10x: {}", verdict(m >= 10.0 * base)),
            });
            first = false;
        }
    }
    if let Some(lag) = data.one("redis_lag") {
        if let Some(p99) = num(lag, "p99_ms") {
            rows.push(Row {
                area: format!(
                    "Redis mirror lag p99 at {} metrics/s",
                    thousands(num(lag, "offered_per_s").unwrap_or(0.0))
                ),
                measured: format!("{p99:.0} ms (p50 {:.0} ms)", num(lag, "p50_ms").unwrap_or(0.0)),
                against: "target 200 ms".into(),
                ratio: ratio(p99, 200.0),
                target: format!("< 200 ms: {}", verdict(p99 < 200.0)),
            });
        }
    }
    python_rows(data, &mut rows);
    rows
}

/// The Python client benchmark's row of `way` with `processes` script processes.
/// The steady-state targets of issue 17, against the agent before it (measured with the same bench on
/// 2026-12-02, docs/performance.md "Steady state"): CPU per event at 1/5 of that, at most one context switch
/// per event at 5,000/s, idle under 0.5% of a core, ack p99 under 10 ms at 10,000/s.
const STEADY_BEFORE_US: [(f64, f64); 2] = [(500.0, 866.0), (5000.0, 198.0)];

fn steady_rows(data: &Data, rows: &mut Vec<Row>) {
    for s in data.all("steady").filter(|s| s["sinks"] == "all") {
        let (Some(rate), Some(cpu), Some(switches)) =
            (num(s, "offered_per_s"), num(s, "cpu_us_per_event"), num(s, "switches_per_event"))
        else {
            continue;
        };
        let scripts = num(s, "scripts").unwrap_or(0.0);
        let area = format!(
            "Steady state, {scripts:.0} scripts each sending one event and waiting for its ack, {} events/s, MySQL and Redis on",
            thousands(rate)
        );
        if let Some(&(_, before)) = STEADY_BEFORE_US.iter().find(|(r, _)| *r == rate) {
            rows.push(Row {
                area: area.clone(),
                measured: format!("agent CPU {cpu:.1} µs per event, {switches:.2} context switches per event"),
                against: format!("the agent before issue 17: {before:.0} µs per event"),
                ratio: ratio(cpu, before),
                target: format!(
                    "≤ 0.2x: {}{}",
                    verdict(cpu <= before / 5.0),
                    if rate == 5000.0 {
                        format!("; ≤ 1 switch per event: {}", verdict(switches <= 1.0))
                    } else {
                        String::new()
                    }
                ),
            });
        }
        if rate == 10_000.0 {
            if let Some(p99) = num(s, "p99_ms") {
                rows.push(Row {
                    area,
                    measured: format!("ack p99 {p99:.2} ms (p50 {:.2} ms)", num(s, "p50_ms").unwrap_or(0.0)),
                    against: "target 10 ms".into(),
                    ratio: ratio(p99, 10.0),
                    target: format!("< 10 ms: {}", verdict(p99 < 10.0)),
                });
            }
        }
    }
    // The host's side: what a script's client spends per event (compare.py, 30 processes) plus the agent at
    // 5,000/s, against what the old way costs a script per event.
    let agent_us = data
        .all("steady")
        .find(|s| s["sinks"] == "all" && num(s, "offered_per_s") == Some(5000.0))
        .and_then(|s| num(s, "cpu_us_per_event"));
    let client_us = python_row(data, "client", 30.0).and_then(|c| num(c, "cpu_us_per_event"));
    let old_us = python_row(data, "old", 30.0).and_then(|c| num(c, "cpu_us_per_event"));
    if let (Some(agent_us), Some(client_us), Some(old_us)) = (agent_us, client_us, old_us) {
        let host = agent_us + client_us;
        rows.push(Row {
            area: "Steady state, host CPU per event at 5,000 events/s (scripts' client plus agent)".into(),
            measured: format!("{host:.1} µs ({client_us:.1} µs client + {agent_us:.1} µs agent)"),
            against: format!("(a) old way's script CPU per event, 30 processes: {old_us:.1} µs"),
            ratio: ratio(host, old_us),
            target: format!("≤ 0.25x: {}", verdict(host <= old_us / 4.0)),
        });
    }
    for s in data.all("steady_idle").filter(|s| s["sinks"] == "all") {
        let Some(core) = num(s, "cpu_core") else { continue };
        rows.push(Row {
            area: "Steady state, idle (no events), MySQL and Redis on".into(),
            measured: format!("{:.2}% of a core", core * 100.0),
            against: "target 0.5%".into(),
            ratio: ratio(core * 100.0, 0.5),
            target: format!("≤ 0.5%: {}", verdict(core * 100.0 <= 0.5)),
        });
    }
}

fn python_row<'a>(data: &'a Data, way: &str, processes: f64) -> Option<&'a Value> {
    data.all("python").filter(|r| r["way"] == way && num(r, "processes") == Some(processes)).last()
}

/// The process counts the Python client benchmark ran, ascending.
fn python_processes(data: &Data) -> Vec<f64> {
    let mut counts: Vec<f64> = data.all("python").filter_map(|r| num(r, "processes")).collect();
    counts.sort_by(f64::total_cmp);
    counts.dedup();
    counts
}

fn plural(n: f64, word: &str) -> String {
    format!("{n:.0} {word}{}", if n == 1.0 { "" } else { "es" })
}

/// The Python client's three targets: the metric() call's p99, the script's CPU per event against the old
/// way's, and acked events/s from one process.
fn python_rows(data: &Data, rows: &mut Vec<Row>) {
    for p in python_processes(data) {
        let Some(c) = python_row(data, "client", p) else { continue };
        if let Some(p99) = num(c, "call_p99_us") {
            rows.push(Row {
                area: format!("Python client, `metric()` call p99, {}", plural(p, "process")),
                measured: format!("{p99:.1} µs (p50 {:.1} µs)", num(c, "call_p50_us").unwrap_or(0.0)),
                against: "target 50 µs".into(),
                ratio: ratio(p99, 50.0),
                target: format!("< 50 µs: {}", verdict(p99 < 50.0)),
            });
        }
        let old_cpu = python_row(data, "old", p).and_then(|a| num(a, "cpu_us_per_event"));
        if let (Some(cpu), Some(old_cpu)) = (num(c, "cpu_us_per_event"), old_cpu) {
            rows.push(Row {
                area: format!("Python client, script CPU per event, {}", plural(p, "process")),
                measured: format!("{cpu:.1} µs"),
                against: format!(
                    "(a) old way, mysql.connector + redis-py, a row and an HSET at a time: {old_cpu:.1} µs"
                ),
                ratio: ratio(cpu, old_cpu),
                target: format!("≤ 0.2x: {}", verdict(cpu <= 0.2 * old_cpu)),
            });
        }
        if p == 1.0 {
            let Some(rate) = num(c, "events_per_sec") else { continue };
            let baselines = [
                ("(a) old way, autocommit INSERT per row", python_row(data, "old", 1.0)),
                ("(b) pool of 5, 50-row INSERTs", python_row(data, "pool", 1.0)),
            ];
            let mut first = true;
            for (name, base) in baselines {
                let Some(base) = base.and_then(|b| num(b, "events_per_sec")) else { continue };
                rows.push(Row {
                    area: if first { "Python client, one process, acked events/s".into() } else { "".into() },
                    measured: if first { format!("{} acked events/s", thousands(rate)) } else { "".into() },
                    against: format!("{name}, 1 process: {} rows/s", thousands(base)),
                    ratio: ratio(rate, base),
                    target: if first { one_process_verdict(rate) } else { "".into() },
                });
                first = false;
            }
            if first {
                rows.push(one_process_row("Python client, one process, acked events/s", rate));
            }
            // The same client to an agent without sinks: what the client and the WAL sustain when MariaDB and the
            // sinks do not share the two cores.
            if let Some(rate) = python_row(data, "acks", 1.0).and_then(|d| num(d, "events_per_sec")) {
                rows.push(one_process_row("Python client, one process, acked events/s, agent without sinks", rate));
            }
        }
    }
}

/// The Python client's target for one process: acked events/s.
const ONE_PROCESS_TARGET: f64 = 50_000.0;

fn one_process_verdict(rate: f64) -> String {
    format!("≥ {}/s: {}", thousands(ONE_PROCESS_TARGET), verdict(rate >= ONE_PROCESS_TARGET))
}

/// A one-process rate measured against the target alone.
fn one_process_row(area: &str, rate: f64) -> Row {
    Row {
        area: area.into(),
        measured: format!("{} acked events/s", thousands(rate)),
        against: format!("target {}/s", thousands(ONE_PROCESS_TARGET)),
        ratio: ratio(rate, ONE_PROCESS_TARGET),
        target: one_process_verdict(rate),
    }
}

fn details(md: &mut String, data: &Data, plotted: bool) {
    let _ = writeln!(md, "## Details\n");
    if data.one("fdatasync").is_some() {
        let _ = writeln!(md, "### WAL append (`cargo bench -p telemetry-wal --bench append`)\n");
        let _ = writeln!(
            md,
            "fsync mode, 180-byte records, each producer waiting for its ack before its next append. The second \
             ratio compares with what the disk allows for the group size reached (fdatasync rate × records per \
             flush).\n"
        );
        let fsync = data.one("fdatasync").and_then(|f| num(f, "per_s")).unwrap_or(0.0);
        let _ = writeln!(md, "| producers | records/s | records per flush | flushes/s | ÷ fdatasync rate | ÷ (fdatasync rate × records per flush) |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for a in data.all("append") {
            let g = |k| num(a, k).unwrap_or(0.0);
            let _ = writeln!(
                md,
                "| {:.0} | {} | {:.1} | {} | {} | {} |",
                g("producers"),
                thousands(g("records_per_s")),
                g("records_per_flush"),
                thousands(g("flushes_per_s")),
                ratio(g("records_per_s"), fsync),
                ratio(g("records_per_s"), g("ceiling_per_s"))
            );
        }
        let _ = writeln!(md, "\nRaw fdatasync rate in the same run: {}/s.\n", thousands(fsync));
    }
    if data.one("ingest").is_some() {
        let _ = writeln!(md, "### Socket ingest (`cargo bench -p telemetry-agent --bench ingest`)\n");
        let _ = writeln!(
            md,
            "Release agent binary, clients pipelining up to 512 metric lines each (or paced at the offered rate); \
             the load generator runs on the same cores.\n"
        );
        let _ = writeln!(md, "| clients | offered | acked events/s | ack p50 | ack p99 | agent peak RSS |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for i in data.all("ingest") {
            let g = |k| num(i, k).unwrap_or(0.0);
            let offered = num(i, "offered_per_s").map_or("as fast as acked".into(), |r| format!("{}/s", thousands(r)));
            let _ = writeln!(
                md,
                "| {:.0} | {offered} | {} | {:.2} ms | {:.2} ms | {:.1} MiB |",
                g("clients"),
                thousands(g("acked_per_s")),
                g("p50_ms"),
                g("p99_ms"),
                g("peak_rss_mib")
            );
        }
        let _ = writeln!(md);
    }
    if data.one("steady").is_some() {
        let _ = writeln!(md, "### Steady state (`cargo bench -p telemetry-agent --bench steady`)\n");
        let _ = writeln!(
            md,
            "Scripts each sending one metric and waiting for its ack, paced together to the offered rate; the agent's \
             CPU (utime+stime), context switches (all its threads) and WAL counters over the measured window.\n"
        );
        let _ = writeln!(
            md,
            "| sinks | offered | acked/s | agent CPU per event | agent CPU (of a core) | context switches per event | \
             group commits/s | fdatasyncs/s | ack p50 | ack p99 | RSS |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
        for s in data.all("steady") {
            let g = |k| num(s, k).unwrap_or(0.0);
            let _ = writeln!(
                md,
                "| {} | {}/s | {} | {:.1} µs | {:.1}% | {:.2} | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {:.1} MiB |",
                s["sinks"].as_str().unwrap_or("?"),
                thousands(g("offered_per_s")),
                thousands(g("events") / g("secs").max(1e-9)),
                g("cpu_us_per_event"),
                g("cpu_core") * 100.0,
                g("switches_per_event"),
                g("group_commits_per_s"),
                g("syncs_per_s"),
                g("p50_ms"),
                g("p99_ms"),
                g("rss_mib")
            );
        }
        for s in data.all("steady_idle") {
            let _ = writeln!(
                md,
                "| {} | idle | - | - | {:.2}% | {:.1}/s | - | - | - | - | {:.1} MiB |",
                s["sinks"].as_str().unwrap_or("?"),
                num(s, "cpu_core").unwrap_or(0.0) * 100.0,
                num(s, "switches_per_s").unwrap_or(0.0),
                num(s, "rss_mib").unwrap_or(0.0)
            );
        }
        let _ = writeln!(md);
    }
    if data.one("mysql").is_some() {
        let _ = writeln!(md, "### MySQL write paths (`cargo bench -p telemetry-agent --bench mysql`)\n");
        let _ = writeln!(
            md,
            "Same MariaDB, same rows (75% metrics, 25% trades, time-ordered ids); client and server share the cores.\n"
        );
        let mut by_prefill: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
        for m in data.all("mysql") {
            by_prefill.entry(num(m, "prefill").unwrap_or(0.0) as u64).or_default().push(m);
        }
        for (prefill, ways) in by_prefill {
            let c = ways.iter().find(|m| m["way"] == "c").and_then(|m| num(m, "rows_per_s"));
            let b_cpu = ways.iter().find(|m| m["way"] == "b").and_then(|m| num(m, "server_cpu_s_per_100k"));
            let _ = writeln!(md, "Tables holding {} rows at start:\n", thousands(prefill as f64));
            let _ = writeln!(
                md,
                "| way | rows | rows/s | ÷ (c) | connections | server CPU s / 100k rows | ÷ (b) | agent CPU s / 100k rows | agent peak RSS |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
            for m in ways {
                let g = |k| num(m, k).unwrap_or(0.0);
                let opt = |k: &str, unit: &str| num(m, k).map_or("-".to_string(), |v| format!("{v:.2}{unit}"));
                let _ = writeln!(
                    md,
                    "| ({}) {} | {} | {} | {} | {:.0} | {:.2} | {} | {} | {} |",
                    m["way"].as_str().unwrap_or("?"),
                    m["label"].as_str().unwrap_or(""),
                    thousands(g("rows")),
                    thousands(g("rows_per_s")),
                    c.map_or("-".into(), |c| ratio(g("rows_per_s"), c)),
                    g("connections"),
                    g("server_cpu_s_per_100k"),
                    b_cpu.map_or("-".into(), |b| ratio(g("server_cpu_s_per_100k"), b)),
                    opt("agent_cpu_s_per_100k", ""),
                    num(m, "agent_peak_rss_mib").map_or("-".into(), |v| format!("{v:.0} MiB"))
                );
            }
            let _ = writeln!(md);
        }
    }
    if let Some(o) = data.one("outage") {
        let g = |k| num(o, k).unwrap_or(0.0);
        let _ = writeln!(md, "### MySQL outage and catch-up\n");
        let _ = writeln!(
            md,
            "{} events/s offered by 64 clients; MySQL unreachable (a gate in front of it refuses and cuts connections) \
             from t = {:.0} s for {:.0} s; sending goes on {:.0} s after it. Sampled every {:.0} ms: events acked, \
             rows committed to MySQL (the agent's committed offset), the backlog held in the WAL (acked − written) and \
             the lag (how long ago the oldest event not yet in MySQL was acked).\n",
            thousands(g("offered_per_s")),
            g("outage_from_s"),
            g("outage_secs"),
            g("tail_secs"),
            g("sample_ms")
        );
        if plotted {
            let _ = writeln!(md, "![throughput, backlog and lag during a MySQL outage](mysql-outage.png)\n");
        }
        let _ = writeln!(
            md,
            "- acked: {} events, all of them answered `ok` during the outage too; rows in MySQL at the end: {} (COUNT(*))\n\
             - largest backlog: {} events; backlog at reconnect: {}; drained in {:.1} s at {} rows/s while new events \
             kept arriving; fastest second: {} rows/s\n\
             - largest lag: {:.1} s (the outage itself plus the drain)\n",
            thousands(g("acked")),
            thousands(g("rows")),
            thousands(g("max_backlog")),
            thousands(g("backlog_at_reconnect")),
            g("drain_secs"),
            thousands(g("drain_rows_per_s")),
            thousands(g("peak_written_per_s")),
            g("max_lag_s")
        );
    }
    if data.one("redis").is_some() {
        let _ = writeln!(md, "### Redis mirror (`cargo bench -p telemetry-agent --bench redis`)\n");
        let _ = writeln!(
            md,
            "Metric updates to 300 profiles × 10 metrics. The old way sends one HSET round trip per update over 30 \
             connections; the mirror gets the same updates from 30 pipelining socket clients and is timed until \
             Redis holds the newest value of every key.\n"
        );
        let python = data.all("redis").filter(|r| r["way"] == "python").last().and_then(|r| num(r, "updates_per_s"));
        let _ = writeln!(
            md,
            "| way | updates | updates/s | ÷ Python (a) | Redis connections | Redis commands | Redis CPU per update |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for r in data.all("redis") {
            let g = |k| num(r, k).unwrap_or(0.0);
            let name = match r["way"].as_str() {
                Some("python") => "(a) Python scripts (redis-py), one HSET per update",
                Some("rust") => "(a) Rust client, one HSET per update",
                Some("mirror") => "(b) agent mirror, end to end",
                _ => "?",
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {:.0} | {}{} | {} |",
                thousands(g("updates")),
                thousands(g("updates_per_s")),
                python.map_or("-".into(), |p| ratio(g("updates_per_s"), p)),
                g("connections"),
                thousands(g("commands")),
                if r["way"] == "mirror" { " script calls" } else { "" },
                num(r, "redis_cpu_us_per_update").map_or("-".into(), |v| format!("{v:.2} µs"))
            );
        }
        if python.is_none() {
            let _ = writeln!(md, "\n(The Python row is missing: python3 with redis-py was not available.)");
        }
        if let Some(lag) = data.one("redis_lag") {
            let g = |k| num(lag, k).unwrap_or(0.0);
            let _ = writeln!(
                md,
                "\nMirror lag (event sent until Redis shows it, polled every 2 ms) at {} metrics/s from 30 clients for \
                 {:.0} s: {} samples, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms.",
                thousands(g("offered_per_s")),
                g("secs"),
                thousands(g("samples")),
                g("p50_ms"),
                g("p99_ms"),
                g("max_ms")
            );
        }
        let _ = writeln!(md);
    }
    if data.one("python").is_some() {
        python_details(md, data);
    }
}

fn python_details(md: &mut String, data: &Data) {
    let _ = writeln!(md, "### Python client (`clients/python/benchmarks/compare.py`)\n");
    let first = data.one("python");
    let secs = first.and_then(|r| num(r, "phase_secs").or(num(r, "secs"))).unwrap_or(0.0);
    let _ = writeln!(
        md,
        "What a trading script pays, from its own side: script processes (1, then many) each send 3 metrics then 1 \
         trade, over and over, for {secs:.0} s per case (then until what they sent is durable), with at most {} events \
         per process not yet acked in (c) (100 and 500 not yet written in (a) and (b), enough for their flushers). (a) the \
         scripts' old `TelemetryStorage`: `metric()` puts the event on a queue, one flusher thread writes each row with \
         an autocommit INSERT (mysql.connector) and each metric with an HSET (redis-py); (b) the review's fix: the \
         same queue, 5 flusher threads over a mysql.connector pool of 5, one 50-row INSERT per table and commit, the \
         HSETs pipelined over a redis-py pool; (c) `telemetry_agent.Client` sending to the release agent (MySQL and \
         Redis sinks on), counting only events whose `Pending.wait()` said acked; (d) the same to an agent without \
         sinks (what the client and the WAL sustain when the sinks and MariaDB do not share the cores). Events/s are durable events (rows \
         committed, or acked) over the whole span, summed over the processes; script CPU is the script processes' \
         own user+sys (their background threads included) per event; `metric()` p50/p99 is the wall time of the \
         call (what the trading loop pays), pooled over the processes; agent CPU is the agent's user+sys per acked \
         event (ingest, WAL, both sinks). Python {}, mysql-connector-python {}.\n",
        data.all("python").find(|r| r["way"] == "client").and_then(|r| num(r, "window")).map_or("?".into(), thousands),
        first.and_then(|r| r["python"].as_str()).unwrap_or("?"),
        first.and_then(|r| r["mysql_connector"].as_str()).unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "| way | processes | events | secs | events/s | ÷ (a) | script CPU µs/event | ÷ (a) | `metric()` p50 | \
         `metric()` p99 | `trade()` p99 | agent CPU µs/event |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in python_processes(data) {
        let old = python_row(data, "old", p);
        for way in ["old", "pool", "client", "acks"] {
            let Some(r) = python_row(data, way, p) else { continue };
            let g = |k| num(r, k).unwrap_or(0.0);
            let vs_old =
                |k: &str| old.and_then(|a| num(a, k)).zip(num(r, k)).map_or("-".to_string(), |(a, v)| ratio(v, a));
            let name = match way {
                "old" => "(a) old way: queue, autocommit INSERT per row, HSET per metric".to_string(),
                "pool" => {
                    format!("(b) pool of {:.0}, 50-row INSERTs, redis-py pool", num(r, "pool_size").unwrap_or(5.0))
                }
                "client" => "(c) Python client → agent (acked)".to_string(),
                _ => "(d) Python client → agent without sinks (acked)".to_string(),
            };
            let _ = writeln!(
                md,
                "| {name} | {p:.0} | {} | {:.1} | {} | {} | {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {} |",
                thousands(g("events")),
                g("secs"),
                thousands(g("events_per_sec")),
                vs_old("events_per_sec"),
                num(r, "cpu_us_per_event").map_or("-".into(), |v| format!("{v:.1}")),
                vs_old("cpu_us_per_event"),
                g("call_p50_us"),
                g("call_p99_us"),
                g("trade_call_p99_us"),
                num(r, "agent_cpu_us_per_event").map_or("-".into(), |v| format!("{v:.1}"))
            );
        }
    }
    let _ = writeln!(md);
    let way_letter = |r: &Value| match r["way"].as_str() {
        Some("old") => "(a)",
        Some("pool") => "(b)",
        Some("client") => "(c)",
        Some("acks") => "(d)",
        _ => "?",
    };
    for r in data.all("python") {
        if let Some(note) = r["note"].as_str() {
            let _ = writeln!(md, "Note, {} with {:.0} processes: {note}.\n", way_letter(r), g0(r, "processes"));
        }
    }
    // (a) and (b) count rows in MySQL; (c) counts acks (in the agent's WAL): how far behind MySQL was.
    let lags: Vec<String> = data
        .all("python")
        .filter(|r| r["way"] == "client")
        .filter_map(|r| {
            Some(format!("{:.1} s with {}", num(r, "sink_catch_up_s")?, plural(g0(r, "processes"), "process")))
        })
        .collect();
    if !lags.is_empty() {
        let _ = writeln!(
            md,
            "(c) counts events acked (durable in the agent's WAL), (a) and (b) rows committed to MySQL. The agent's \
             MySQL sink had every acked event in MySQL {} after the last ack.\n",
            lags.join(", ")
        );
    }
}

fn g0(v: &Value, key: &str) -> f64 {
    num(v, key).unwrap_or(0.0)
}

/// Plots `mysql-outage.csv`; `Ok(None)` without one, else whether text was drawn.
fn plot_outage(csv: &Path, png: &Path, data: &Data) -> Result<Option<bool>, String> {
    let Ok(text) = std::fs::read_to_string(csv) else { return Ok(None) };
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty CSV")?.split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).ok_or(format!("no column {name}"));
    let (t, gate, acked_s, written_s, backlog, lag) =
        (col("t_s")?, col("gate_open")?, col("acked_per_s")?, col("written_per_s")?, col("backlog")?, col("lag_s")?);
    let rows: Vec<Vec<f64>> = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|v| v.trim().parse::<f64>().map_err(|e| format!("{l:?}: {e}"))).collect())
        .collect::<Result<_, _>>()?;
    if rows.is_empty() {
        return Ok(None);
    }
    let series = |c: usize| rows.iter().map(|r| (r[t], r[c])).collect::<Vec<_>>();
    // The outage window: from the first closed sample to the next open one.
    let mut shaded = Vec::new();
    let mut from = None;
    for r in &rows {
        match (r[gate] == 0.0, from) {
            (true, None) => from = Some(r[t]),
            (false, Some(f)) => {
                shaded.push((f, r[t]));
                from = None;
            }
            _ => {}
        }
    }
    if let Some(f) = from {
        shaded.push((f, rows.last().map_or(f, |r| r[t])));
    }
    let o = data.one("outage");
    let rate = o.and_then(|o| num(o, "offered_per_s")).unwrap_or(5000.0);
    let secs = o.and_then(|o| num(o, "outage_secs")).unwrap_or(0.0);
    let figure = plot::Figure {
        title: format!("MySQL outage: {} events/s offered, MySQL unreachable for {secs:.0} s", thousands(rate)),
        x_desc: "time since start (s)".into(),
        shaded,
        shade_label: "MySQL unreachable".into(),
        panels: vec![
            plot::Panel {
                title: "throughput (1 s window)".into(),
                y_desc: "events/s".into(),
                y2_desc: None,
                series: vec![
                    plot::Series {
                        label: "acked by the agent".into(),
                        color: plot::TAB_BLUE,
                        points: series(acked_s),
                        right: false,
                    },
                    plot::Series {
                        label: "rows written to MySQL".into(),
                        color: plot::TAB_ORANGE,
                        points: series(written_s),
                        right: false,
                    },
                ],
            },
            plot::Panel {
                title: "held in the WAL, and lag".into(),
                y_desc: "backlog (events acked, not in MySQL)".into(),
                y2_desc: Some("lag (s)".into()),
                series: vec![
                    plot::Series {
                        label: "backlog".into(),
                        color: plot::TAB_PURPLE,
                        points: series(backlog),
                        right: false,
                    },
                    plot::Series {
                        label: "lag: age of the oldest event not in MySQL".into(),
                        color: plot::TAB_RED,
                        points: series(lag),
                        right: true,
                    },
                ],
            },
        ],
        size: (1200, 800),
    };
    plot::draw(png, &figure).map(Some)
}
