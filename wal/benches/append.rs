//! WAL append throughput in fsync mode against the raw fdatasync rate of the same disk, measured in the
//! same run. `cargo bench -p telemetry-wal --bench append` (BENCH_SECS sets seconds per case, default 3, 1
//! with BENCH_QUICK=1; BENCH_DIR the directory, default the system temp dir). With BENCH_REPORT_DIR (set by
//! scripts/bench.sh) it also writes its numbers to `{BENCH_REPORT_DIR}/append.jsonl`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use telemetry_wal::{Wal, WalOptions};

const RECORD_BYTES: usize = 180;

fn main() {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 1 } else { 3 });
    let base = std::env::var_os("BENCH_DIR").map(Into::into).unwrap_or_else(std::env::temp_dir);
    let run_for = Duration::from_secs(secs);
    let mut results = results_file();

    let fsync_rate = raw_fdatasync_rate(&base, run_for);
    println!("raw fdatasync rate (4 KiB write + fdatasync, one thread): {fsync_rate:.0}/s\n");
    record(&mut results, &format!(r#"{{"kind":"fdatasync","per_s":{fsync_rate:.1},"secs":{secs}}}"#));
    println!("| producers | records/s | records per flush | flushes/s | ratio to fsync rate x records per flush |");
    println!("|---|---|---|---|---|");
    for producers in [1usize, 16, 256] {
        let (rate, per_flush, flushes) = append_rate(&base, producers, run_for);
        let ceiling = fsync_rate * per_flush;
        println!("| {producers} | {rate:.0} | {per_flush:.1} | {flushes:.0} | {:.2} |", rate / ceiling);
        record(
            &mut results,
            &format!(
                r#"{{"kind":"append","producers":{producers},"records_per_s":{rate:.1},"records_per_flush":{per_flush:.2},"flushes_per_s":{flushes:.1},"ceiling_per_s":{ceiling:.1},"record_bytes":{RECORD_BYTES}}}"#
            ),
        );
    }
}

/// `{BENCH_REPORT_DIR}/append.jsonl` (a relative BENCH_REPORT_DIR is taken from the workspace root), or
/// `None` when BENCH_REPORT_DIR is unset.
fn results_file() -> Option<(PathBuf, std::fs::File)> {
    let dir = PathBuf::from(std::env::var_os("BENCH_REPORT_DIR").filter(|v| !v.is_empty())?);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let dir = if dir.is_absolute() { dir } else { root.join(dir) };
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let path = dir.join("append.jsonl");
    let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    Some((path, file))
}

/// One JSON line (only numbers in it, so it is written by hand: this crate has no JSON dependency).
fn record(results: &mut Option<(PathBuf, std::fs::File)>, line: &str) {
    if let Some((path, file)) = results {
        writeln!(file, "{line}").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

fn raw_fdatasync_rate(base: &std::path::Path, run_for: Duration) -> f64 {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let mut file = std::fs::File::create(dir.path().join("probe")).expect("probe file");
    let block = vec![0u8; 4096];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < run_for {
        file.write_all(&block).expect("write");
        file.sync_data().expect("fdatasync");
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Each producer keeps one append in flight, as a script waiting for its ack does.
fn append_rate(base: &std::path::Path, producers: usize, run_for: Duration) -> (f64, f64, f64) {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let wal = Wal::open(dir.path(), WalOptions::default()).expect("open WAL");
    let before = wal.stats().expect("stats");
    let started = Instant::now();
    let threads: Vec<_> = (0..producers)
        .map(|_| {
            let appender = wal.appender();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while started.elapsed() < run_for {
                    let pending = appender.blocking_append(vec![0x42; RECORD_BYTES]).expect("append");
                    pending.blocking_durable().expect("durable");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let records: u64 = threads.into_iter().map(|t| t.join().expect("producer")).sum();
    let elapsed = started.elapsed().as_secs_f64();
    let after = wal.stats().expect("stats");
    let flushes = (after.group_commits - before.group_commits).max(1);
    wal.close().expect("close");
    (records as f64 / elapsed, records as f64 / flushes as f64, flushes as f64 / elapsed)
}
