//! The spool drain (docs/spool.md): files written by scripts while the agent was away reach the WAL and
//! MySQL exactly once; a live writer's file is left alone until it is closed; bad and hostile content is
//! contained.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kit::agent::Agent;
use crate::kit::client::metric;
use crate::kit::db::TestDb;
use crate::kit::proxy::FaultProxy;
use crate::kit::util::http_get;

fn spool_line(profile: &str, name: &str, value: f64, event_id: &str) -> String {
    format!(
        "{{\"kind\":\"metric\",\"profile_id\":\"{profile}\",\"name\":\"{name}\",\"value\":{value},\
         \"ts\":\"2026-11-27T10:00:00Z\",\"event_id\":\"{event_id}\"}}\n"
    )
}

fn write_file(path: &Path, content: &str) {
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o640)
        .open(path)
        .unwrap()
        .write_all(content.as_bytes())
        .unwrap();
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "after {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spool_section(dir: &Path, extra: &str) -> String {
    format!("[spool]\ndir = {:?}\n{extra}", dir.display().to_string())
}

fn metric_value(agent: &Agent, name: &str) -> f64 {
    let (_, body) = http_get(agent.http_addr(), "/metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn spooled_events_reach_mysql_exactly_once_and_a_held_file_waits_for_its_writer() {
    let db = TestDb::migrated();
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path();
    let lines: String =
        (1..=3).map(|i| spool_line("p-spool", "equity", 100.0 + f64::from(i), &format!("s-a-{i}"))).collect();
    // The same file twice: what a crash between the WAL sync and the delete leaves behind.
    write_file(&dir.join("a.spool"), &lines);
    write_file(&dir.join("a-again.spool"), &lines);
    // A writer that is still alive holds its lock.
    let held_path = dir.join("held.spool");
    write_file(&held_path, &spool_line("p-spool", "held", 1.5, "s-held-1"));
    let held = std::fs::OpenOptions::new().append(true).open(&held_path).unwrap();
    let mut held =
        nix::fcntl::Flock::lock(held, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).unwrap();

    let agent = Agent::start(&format!("[mysql]\nurl = {:?}\n{}", db.url(), spool_section(dir, "")));
    wait_until("a.spool and a-again.spool drained", 20, || {
        !dir.join("a.spool").exists() && !dir.join("a-again.spool").exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(held_path.exists(), "a file whose writer holds its lock must be left alone");
    assert_eq!(metric_value(&agent, "telemetry_spool_files_pending"), 1.0);

    // The writer adds a line and hands the file over by closing it: the close is noticed at once.
    held.write_all(spool_line("p-spool", "held", 2.5, "s-held-2").as_bytes()).unwrap();
    drop(held);
    wait_until("held.spool drained after its writer closed it", 10, || !held_path.exists());

    db.wait_for_rows("dd_metrics", 5, 30);
    let rows: Vec<(String, String, f64)> = db.query("SELECT event_id, name, value FROM dd_metrics ORDER BY event_id");
    assert_eq!(
        rows,
        vec![
            ("s-a-1".into(), "equity".into(), 101.0),
            ("s-a-2".into(), "equity".into(), 102.0),
            ("s-a-3".into(), "equity".into(), 103.0),
            ("s-held-1".into(), "held".into(), 1.5),
            ("s-held-2".into(), "held".into(), 2.5),
        ]
    );
    assert_eq!(metric_value(&agent, "telemetry_spool_events_total"), 8.0, "a.spool twice and held.spool");
    assert_eq!(metric_value(&agent, "telemetry_spool_files_drained_total"), 3.0);
    assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0, "the spool directory ends empty");
}

#[test]
fn a_crash_before_the_delete_drains_the_file_again_without_duplicates() {
    let db = TestDb::migrated();
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path();
    let path = dir.join("crash.spool");
    let lines: String =
        (1..=50).map(|i| spool_line("p-crash", "m", f64::from(i), &format!("s-crash-{i:03}"))).collect();
    write_file(&path, &lines);
    let mut agent = Agent::configure(&format!("[mysql]\nurl = {:?}\n{}", db.url(), spool_section(dir, "")));
    agent.env.push(("FAILPOINTS".into(), "spool::before_delete=sleep(60000)".into()));
    agent.restart();
    // Durable in the WAL, not yet deleted: kill -9 there.
    wait_until("the spool's events durable", 20, || metric_value(&agent, "telemetry_spool_events_total") >= 50.0);
    agent.kill9();
    assert!(path.exists(), "the file is deleted only after the fail point");
    agent.env.clear();
    agent.restart();
    wait_until("crash.spool drained again", 20, || !path.exists());
    db.wait_for_rows("dd_metrics", 50, 30);
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let copies = agent.wal_events().iter().filter(|(_, e)| e.client_event_id() == Some("s-crash-001")).count();
    assert_eq!(copies, 2, "the WAL took the file twice");
    let rows: Vec<(u64, u64)> = db.query("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM dd_metrics");
    assert_eq!(rows, vec![(50, 50)], "MySQL stores each event once");
}

#[test]
fn bad_and_hostile_spool_content_is_contained() {
    let spool = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = spool.path();
    let mixed = [
        spool_line("p-bad", "ok1", 1.0, "s-ok-1"),
        "{not json\n".to_string(),
        "{\"kind\":\"metric\",\"profile_id\":\"p-bad\",\"name\":\"noid\",\"value\":1}\n".to_string(),
        spool_line("p-bad", "tilde", 1.0, "~0123456789abcdef-7"),
        spool_line("p-bad", "ok2", 2.0, "s-ok-2"),
        // Torn: its writer died mid-write.
        spool_line("p-bad", "torn", 3.0, "s-torn").trim_end().to_string(),
    ]
    .concat();
    write_file(&dir.join("mixed.spool"), &mixed);
    // Names that must not make the agent read outside its directory, or block it.
    let secret = outside.path().join("secret.ndjson");
    write_file(&secret, &spool_line("p-bad", "secret", 9.0, "s-secret"));
    std::os::unix::fs::symlink(&secret, dir.join("link.spool")).unwrap();
    std::fs::hard_link(&secret, dir.join("hard.spool")).unwrap();
    nix::unistd::mkfifo(&dir.join("fifo.spool"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let big = spool_line("p-bad", "big", 1.0, "s-big").repeat(20_000); // ~2 MiB, over the 1 MiB cap
    write_file(&dir.join("big.spool"), &big);
    std::fs::create_dir(dir.join("sub.d")).unwrap();
    write_file(&dir.join("sub.d").join("nested.spool"), &spool_line("p-bad", "nested", 1.0, "s-nested"));
    write_file(&dir.join("notes.txt"), &spool_line("p-bad", "notes", 1.0, "s-notes"));

    // A live writer's file over the cap is not judged while its writer holds it (renaming it would send the
    // writer's next lines into a file nobody drains); once handed over, it is refused.
    let held_big_path = dir.join("held-big.spool");
    write_file(&held_big_path, &big);
    let held_big = std::fs::OpenOptions::new().append(true).open(&held_big_path).unwrap();
    let held_big =
        nix::fcntl::Flock::lock(held_big, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).unwrap();

    let mut agent = Agent::start(&spool_section(dir, "max_file_bytes = 1048576\n"));
    wait_until("mixed.spool drained", 20, || !dir.join("mixed.spool").exists());
    for name in ["link.spool", "hard.spool", "fifo.spool", "big.spool"] {
        let refused = PathBuf::from(format!("{}.refused", dir.join(name).display()));
        wait_until(&format!("{name} refused"), 20, || std::fs::symlink_metadata(&refused).is_ok());
    }
    assert!(held_big_path.exists(), "a file its writer still holds was refused");
    drop(held_big);
    let refused = PathBuf::from(format!("{}.refused", held_big_path.display()));
    wait_until("held-big.spool refused once handed over", 20, || refused.exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), spool_line("p-bad", "secret", 9.0, "s-secret"));
    assert!(dir.join("sub.d").join("nested.spool").exists() && dir.join("notes.txt").exists());
    let log = agent.log();
    for reason in ["a symbolic link", "hard-linked", "not a regular file", "over [spool] max_file_bytes"] {
        assert!(log.contains(reason), "the log names why a file was refused ({reason}):\n{log}");
    }

    let listed = agent.command(&["wal", "dead-letters", "list", "--sink", "spool"], "");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for (line, why) in [(2, "invalid_json"), (3, "needs its `event_id`"), (4, "reserved for ids the agent generates")] {
        let at = format!("mixed.spool:{line}:");
        assert!(listed.contains(&at) && listed.contains(why), "dead letter for line {line} ({why}):\n{listed}");
    }
    assert!(!listed.contains("mixed.spool:6"), "the torn last line is ignored:\n{listed}");
    let retried = agent.command(&["wal", "dead-letters", "retry", "--sink", "spool"], "");
    assert!(!retried.status.success(), "an invalid spool line cannot be queued again as it is");
    assert!(String::from_utf8_lossy(&retried.stderr).contains("telemetry-agent send"));

    let status = agent.command(&["status", "--json"], "");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["spool"]["lines_refused"], 3, "{status}");
    assert_eq!(status["spool"]["files_refused"], 5, "{status}");
    assert_eq!(status["spool"]["events_ingested"], 2, "{status}");

    // The agent kept serving.
    assert_eq!(agent.connect().request(&metric("p-bad", "live", 1.0))["ok"], true);
    agent.stop();
    let mut ids: Vec<String> =
        agent.wal_events().iter().filter_map(|(_, e)| e.client_event_id().map(str::to_string)).collect();
    ids.sort();
    assert_eq!(ids, ["s-ok-1", "s-ok-2"]);
}

#[test]
fn a_spool_file_larger_than_the_wal_drains_through_a_full_wal_exactly_once() {
    let db = TestDb::migrated();
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path();
    // ~100,000 events: several times what a 16 MiB WAL takes before it answers wal_full, so the drain must
    // resume where the full WAL stopped it (starting over would refill the WAL with the same first lines).
    const EVENTS: u32 = 100_000;
    let lines: String = (0..EVENTS).map(|i| spool_line("p-big", "m", f64::from(i), &format!("s-big-{i:06}"))).collect();
    write_file(&dir.join("big.spool"), &lines);
    // MySQL away at first: the WAL fills up with the spool's first part and refuses more.
    let proxy = FaultProxy::start(TestDb::server_addr());
    proxy.set_down(true);
    let agent = Agent::start(&format!(
        "[wal]\nmax_bytes = 16777216\n[mysql]\nurl = {:?}\nmax_linger_ms = 20\nretry_max_ms = 300\n{}",
        db.url_via(proxy.port),
        spool_section(dir, "")
    ));
    agent.wait_for_log("the WAL is full", 60);
    assert!(dir.join("big.spool").exists());
    proxy.set_down(false);
    wait_until("big.spool drained", 300, || !dir.join("big.spool").exists());
    db.wait_for_rows("dd_metrics", u64::from(EVENTS), 120);
    let rows: Vec<(u64, u64, f64)> = db.query("SELECT COUNT(*), COUNT(DISTINCT event_id), SUM(value) FROM dd_metrics");
    let sum = f64::from(EVENTS) * f64::from(EVENTS - 1) / 2.0;
    assert_eq!(rows, vec![(u64::from(EVENTS), u64::from(EVENTS), sum)]);
    // Each line appended once: the drain went on where the full WAL stopped it.
    assert_eq!(metric_value(&agent, "telemetry_spool_events_total"), f64::from(EVENTS));
}
