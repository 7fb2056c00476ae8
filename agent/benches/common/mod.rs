//! What the bench binaries share beyond the tests' kit (`tests/kit`, included by each bench): the agent's
//! bench settings and measurements, and the quick mode and result files of `scripts/bench.sh`.

// Each bench binary uses a part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

use crate::kit::agent::{Agent, Launch};
use crate::kit::util::{proc_status_kib, workspace_root};

/// Starts an agent (the tests' launcher, `tests/kit/agent.rs`) as `bench`, in a fresh directory under
/// BENCH_DIR (default: the system temp dir), logging errors only, to this process's stderr. `extra` is TOML
/// appended to the config, then BENCH_AGENT_CONFIG (`;` between lines) for experiments: its keys land in the
/// last section (`[wal]` for the ingest bench, `[mysql]` for the MySQL bench).
pub fn start_agent(extra: &str) -> Agent {
    let launch = Launch {
        agent_id: "bench".into(),
        parent_dir: std::env::var_os("BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir),
        retain_secs: None,
        rust_log: "error".into(),
        log_to_file: false,
    };
    let experiment = std::env::var("BENCH_AGENT_CONFIG").unwrap_or_default().replace(';', "\n");
    let mut agent = Agent::configure_with(&launch, &format!("{extra}\n{experiment}\n"));
    agent.restart();
    agent
}

/// The agent's resident memory now (VmRSS), 0 once the process is gone.
pub fn rss_kib(agent: &Agent) -> u64 {
    proc_status_kib(agent.pid(), "VmRSS:").unwrap_or(0)
}

/// The agent's peak resident memory (VmHWM).
pub fn peak_rss_kib(agent: &Agent) -> u64 {
    proc_status_kib(agent.pid(), "VmHWM:").unwrap_or(0)
}

/// The agent's CPU time so far, in seconds.
pub fn cpu_seconds(agent: &Agent) -> f64 {
    process_cpu_seconds(agent.pid() as u32)
}

/// utime + stime of a process, in seconds.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The `p` quantile (0..=1) of `values`, 0 for none.
pub fn percentile(values: &[u64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64
}

/// `BENCH_QUICK=1`: every bench shortens its default sizes and durations (a smoke test of the whole
/// `scripts/bench.sh` in a few minutes). Explicit settings (BENCH_SECS, BENCH_ROWS, ...) still win.
#[allow(dead_code)] // Not every bench binary uses every helper.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The environment variable `name` if set and valid, else `full` (or `quick` in quick mode).
pub fn setting<T: std::str::FromStr>(name: &str, full: T, quick_value: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) if quick() => quick_value,
        Err(_) => full,
    }
}

/// BENCH_REPORT_DIR, where `scripts/bench.sh` collects every bench's key numbers; a relative path is taken
/// from the workspace root. `None` when unset: the bench then only prints.
pub fn report_dir() -> Option<PathBuf> {
    dir_setting("BENCH_REPORT_DIR")
}

/// BENCH_DOCS_DIR (default `docs/`), where the published report goes; a relative path is taken from the
/// workspace root.
pub fn docs_dir() -> PathBuf {
    dir_setting("BENCH_DOCS_DIR").unwrap_or_else(|| workspace_root().join("docs"))
}

/// The directory in the environment variable `name`, relative to the workspace root unless absolute.
fn dir_setting(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(name).filter(|v| !v.is_empty())?);
    Some(if dir.is_absolute() { dir } else { workspace_root().join(dir) })
}

/// A bench's result file, `{BENCH_REPORT_DIR}/{name}.jsonl`: one JSON object per line, rewritten by every
/// run of that bench. Without BENCH_REPORT_DIR, records go nowhere.
#[allow(dead_code)]
pub struct Results {
    file: Option<(PathBuf, std::fs::File)>,
}

#[allow(dead_code)]
impl Results {
    pub fn create(name: &str) -> Results {
        let file = report_dir().map(|dir| {
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            let path = dir.join(format!("{name}.jsonl"));
            let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            (path, file)
        });
        Results { file }
    }

    pub fn record(&mut self, value: serde_json::Value) {
        if let Some((path, file)) = &mut self.file {
            writeln!(file, "{value}").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
    }
}
