//! How command outputs look on a terminal: text for people, JSON with `--json`, a progress bar for long runs.

use std::io::Write as _;
use std::process::ExitCode;

use crate::ops::commands::{Output, Status, WalReport};

pub async fn render(mut rx: tokio::sync::mpsc::Receiver<Output>, json: bool) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut code = ExitCode::SUCCESS;
    while let Some(output) = rx.recv().await {
        match output {
            Output::Status(status) if json => writeln!(stdout, "{}", serde_json::to_string_pretty(&status)?)?,
            Output::Status(status) => write!(stdout, "{}", format_status(&status))?,
            Output::WalStats(report) if json => writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?,
            Output::WalStats(report) => write!(stdout, "{}", format_wal(&report))?,
            Output::Event { line } => writeln!(stdout, "{line}")?,
            Output::DeadLetter(letter) if json => writeln!(stdout, "{}", serde_json::to_string(&letter)?)?,
            Output::DeadLetter(letter) => writeln!(
                stdout,
                "{} seq {} at {}: {}\n    {}",
                letter.sink,
                letter.seq,
                crate::event::rfc3339_us(letter.at_ms as i64 * 1000),
                letter.error,
                letter.event
            )?,
            Output::Progress { done, total, what } => {
                let bar = bar.get_or_insert_with(|| {
                    let bar = indicatif::ProgressBar::new(total);
                    if let Ok(style) =
                        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({per_sec}, eta {eta})")
                    {
                        bar.set_style(style);
                    }
                    bar.set_message(what);
                    bar
                });
                bar.set_position(done);
            }
            Output::Done { summary } => {
                if let Some(bar) = bar.take() {
                    bar.finish_and_clear();
                }
                eprintln!("{summary}");
            }
            Output::Error { error } => {
                if let Some(bar) = bar.take() {
                    bar.abandon();
                }
                eprintln!("telemetry-agent: {error}");
                code = ExitCode::FAILURE;
            }
        }
    }
    stdout.flush()?;
    Ok(code)
}

fn format_time_ms(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), |ms| crate::event::rfc3339_us(ms as i64 * 1000))
}

fn format_bytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn format_wal(report: &WalReport) -> String {
    let mut out = format!(
        "WAL {}\n  records       {} (seq {} .. {})\n  written       {} .. {}\n  disk          {} of {} ({:.0}%), records {}\n  dead letters  {}\n",
        report.dir,
        report.records,
        report.first_seq.map_or_else(|| "-".into(), |s| s.to_string()),
        report.last_seq,
        format_time_ms(report.oldest_ms),
        format_time_ms(report.newest_ms),
        format_bytes(report.disk_bytes),
        format_bytes(report.max_bytes),
        report.disk_bytes as f64 * 100.0 / report.max_bytes.max(1) as f64,
        format_bytes(report.live_bytes),
        report.dead_letters,
    );
    for sink in &report.sinks {
        out += &format!(
            "  sink {:<8} cursor {}, lag {} records, {:.1} s\n",
            sink.sink, sink.cursor, sink.lag_records, sink.lag_seconds
        );
    }
    out
}

fn format_status(status: &Status) -> String {
    let mut out = format!("telemetry-agent {} (agent id {})\n", status.version, status.agent_id);
    if !status.running {
        out += "  NOT RUNNING: no agent answers on the control socket; the WAL as found on disk:\n";
    } else {
        let up = status.started_at_ms.map_or(0, |at| crate::clock::now_ms().saturating_sub(at) / 1000);
        out += &format!(
            "  up since      {} ({}h{:02}m)\n  clients       {}\n  events in     {:.0}/s ({} since start)\n",
            format_time_ms(status.started_at_ms),
            up / 3600,
            up % 3600 / 60,
            status.clients_connected.unwrap_or(0),
            status.events_per_second.unwrap_or(0.0),
            status.events_received.unwrap_or(0)
        );
        out += &format!(
            "  accepting     {}\n",
            status.not_ready.as_deref().map_or("yes".to_string(), |why| format!("NO: {why}"))
        );
        if !status.errors.is_empty() {
            let errors: Vec<String> = status.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
            out += &format!("  errors        {}\n", errors.join(", "));
        }
    }
    for sink in &status.sinks {
        let state = match sink.waiting_since_ms {
            Some(since) => format!("RETRYING since {}", format_time_ms(Some(since))),
            None => "ok".to_string(),
        };
        let path = sink.path.as_deref().map(|path| format!(", rows by {path}")).unwrap_or_default();
        let node = sink.node.as_deref().map(|node| format!(" to {node}")).unwrap_or_default();
        out += &format!(
            "  {:<13} {state}, lag {} records / {:.1} s{path}{node}\n",
            sink.sink, sink.lag_records, sink.lag_seconds
        );
        if let (Some(error), Some(at)) = (&sink.last_error, sink.last_error_at_ms) {
            out += &format!("                last error at {}: {error}\n", format_time_ms(Some(at)));
        }
    }
    if let Some(spool) = &status.spool {
        out += &format!(
            "  spool         {} files pending, {} drained ({} events), {} lines and {} files refused ({})\n",
            spool.files_pending,
            spool.files_drained,
            spool.events_ingested,
            spool.lines_refused,
            spool.files_refused,
            spool.dir
        );
    }
    out + &format_wal(&status.wal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::commands::SinkLag;
    use crate::ops::metrics::SinkStatus;
    use crate::source::spool::SpoolStatus;

    fn wal_report() -> WalReport {
        WalReport {
            dir: "/var/lib/telemetry-agent/wal".into(),
            records: 1500,
            disk_bytes: 3 << 20,
            live_bytes: 1 << 20,
            max_bytes: 12 << 20,
            first_seq: Some(101),
            last_seq: 1600,
            oldest_ms: Some(1_795_000_000_000),
            newest_ms: None,
            sinks: vec![SinkLag { sink: "mysql".into(), cursor: 1200, lag_records: 400, lag_seconds: 2.25 }],
            dead_letters: 3,
            ..WalReport::default()
        }
    }

    #[test]
    fn the_wal_report_shows_sizes_in_mib_times_in_rfc3339_and_each_sinks_lag() {
        let text = format_wal(&wal_report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "WAL /var/lib/telemetry-agent/wal");
        assert_eq!(lines[1], "  records       1500 (seq 101 .. 1600)");
        assert_eq!(lines[2], "  written       2026-11-18T11:06:40.000000Z .. -");
        assert_eq!(lines[3], "  disk          3.0 MiB of 12.0 MiB (25%), records 1.0 MiB");
        assert_eq!(lines[4], "  dead letters  3");
        assert_eq!(lines[5], "  sink mysql    cursor 1200, lag 400 records, 2.2 s");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn an_empty_wal_of_zero_size_renders_without_dividing_by_zero() {
        let text = format_wal(&WalReport { max_bytes: 0, first_seq: None, ..WalReport::default() });
        assert!(text.contains("(seq - .. 0)"), "{text}");
        assert!(text.contains("0.0 MiB of 0.0 MiB (0%)"), "{text}");
    }

    fn status(running: bool) -> Status {
        Status {
            agent_id: "host-1".into(),
            version: "0.1.0".into(),
            running,
            started_at_ms: Some(crate::clock::now_ms() - 3_723_000),
            clients_connected: Some(900),
            events_per_second: Some(2500.4),
            events_received: Some(9_000_000),
            errors: [("bad_json".to_string(), 2)].into(),
            sinks: vec![SinkStatus {
                sink: "mysql".into(),
                state: "waiting".into(),
                waiting_since_ms: Some(1_795_000_000_000),
                lag_records: 400,
                lag_seconds: 2.25,
                last_error: Some("connection refused".into()),
                path: Some("load_data".into()),
                node: Some("db1:3306".into()),
                last_error_at_ms: Some(1_795_000_001_000),
            }],
            wal: wal_report(),
            not_ready: Some("the WAL is full".into()),
            spool: Some(SpoolStatus {
                dir: "/var/spool/telemetry-agent".into(),
                files_pending: 1,
                files_drained: 2,
                events_ingested: 30,
                lines_refused: 4,
                files_refused: 5,
            }),
        }
    }

    #[test]
    fn a_running_agents_status_says_what_an_operator_checks_first() {
        let text = format_status(&status(true));
        assert!(text.starts_with("telemetry-agent 0.1.0 (agent id host-1)\n"), "{text}");
        for line in [
            "  up since      ",
            " (1h02m)\n",
            "  clients       900\n",
            "  events in     2500/s (9000000 since start)\n",
            "  accepting     NO: the WAL is full\n",
            "  errors        bad_json 2\n",
            "  mysql         RETRYING since 2026-11-18T11:06:40.000000Z, lag 400 records / 2.2 s, rows by load_data to db1:3306\n",
            "                last error at 2026-11-18T11:06:41.000000Z: connection refused\n",
            "  spool         1 files pending, 2 drained (30 events), 4 lines and 5 files refused (/var/spool/telemetry-agent)\n",
            "WAL /var/lib/telemetry-agent/wal\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(!text.contains("NOT RUNNING"), "{text}");
    }

    #[test]
    fn without_a_running_agent_the_status_says_so_and_shows_the_wal_on_disk() {
        let text = format_status(&status(false));
        assert!(text.contains("NOT RUNNING: no agent answers on the control socket"), "{text}");
        assert!(!text.contains("clients"), "{text}");
        assert!(text.contains("WAL /var/lib/telemetry-agent/wal"), "{text}");
    }
}
