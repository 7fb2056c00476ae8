//! What an operator uses: `/metrics`, `/healthz`, `/readyz`, `status`, and `wal stats|dump|replay|
//! dead-letters`, through the running agent and directly on a stopped agent's WAL.

use std::time::{Duration, Instant};

use crate::kit::agent::Agent;
use crate::kit::client::{metric, Client};
use crate::kit::db::{mysql_section, TestDb};
use crate::kit::proxy::FaultProxy;
use crate::kit::serial::alone;
use crate::kit::util::http_get;

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The value of one sample in Prometheus text (0 when absent).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn scrape(agent: &Agent) -> prometheus_parse::Scrape {
    let (status, body) = http_get(agent.http_addr(), "/metrics");
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the metrics parse as Prometheus text")
}

#[test]
fn the_metrics_endpoint_parses_and_its_counters_move() {
    let agent = Agent::start("");
    let addr = agent.http_addr();
    assert_eq!(http_get(addr, "/healthz").0, 200);
    assert_eq!(http_get(addr, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(http_get(addr, "/nothing").0, 404);
    let before = scrape(&agent);
    assert_eq!(sample(&before, "telemetry_acks_total", None), 0.0);

    let mut client = agent.connect();
    for i in 0..5 {
        assert_eq!(client.request(&metric("p", "m", f64::from(i)))["ok"], true);
    }
    assert_eq!(client.request("{not json")["code"], "invalid_json");
    let after = scrape(&agent);
    assert_eq!(sample(&after, "telemetry_acks_total", None), 5.0);
    assert_eq!(sample(&after, "telemetry_events_received_total", Some(("kind", "metric"))), 5.0);
    assert_eq!(sample(&after, "telemetry_errors_total", Some(("code", "invalid_json"))), 1.0);
    assert_eq!(sample(&after, "telemetry_clients_connected", None), 1.0);
    // WAL gauges refresh every second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(&scrape(&agent), "telemetry_wal_records", None) < 5.0 {
        assert!(Instant::now() < deadline, "telemetry_wal_records never reached 5");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(client);
}

#[test]
fn the_http_endpoint_can_be_turned_off() {
    let agent = Agent::start("[http]\nenabled = false\n");
    agent.wait_for_log("telemetry-agent ready", 20);
    assert!(!agent.log().contains("http=\""), "{}", agent.log());
}

#[test]
fn status_shows_a_retrying_sink_and_reads_the_wal_when_the_agent_is_stopped() {
    let db = TestDb::migrated();
    let proxy = FaultProxy::start(TestDb::server_addr());
    proxy.set_down(true);
    let mut agent = Agent::start(&mysql_section(&db.url_via(proxy.port)));
    let mut client = agent.connect();
    for i in 0..3 {
        assert_eq!(client.request(&metric("p", "m", f64::from(i)))["ok"], true);
    }
    agent.wait_for_log("MySQL unavailable", 20);

    let status: serde_json::Value = serde_json::from_str(&stdout(&agent.command(&["status", "--json"], ""))).unwrap();
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["agent_id"], "test-agent");
    assert_eq!(status["clients_connected"], 1, "{status}");
    let sink = &status["sinks"][0];
    assert_eq!((sink["sink"].as_str(), sink["state"].as_str()), (Some("mysql"), Some("waiting")), "{status}");
    assert!(sink["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{status}");
    // Lag counts the records MySQL has not taken (not seqs since 0: a new WAL starts at the time in µs).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&stdout(&agent.command(&["status", "--json"], ""))).unwrap();
        if status["sinks"][0]["lag_records"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "lag should be 3 records: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats: serde_json::Value =
        serde_json::from_str(&stdout(&agent.command(&["wal", "stats", "--json"], ""))).unwrap();
    assert_eq!(stats["sinks"][0]["lag_records"], 3, "{stats}");
    let screen = stdout(&agent.command(&["status"], ""));
    assert!(screen.contains("RETRYING since") && screen.contains("accepting     yes"), "{screen}");

    proxy.set_down(false);
    db.wait_for_rows("dd_metrics", 3, 30);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&stdout(&agent.command(&["status", "--json"], ""))).unwrap();
        if status["sinks"][0]["state"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "the sink never showed ok again: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }

    drop(client);
    assert!(agent.stop().success());
    let status: serde_json::Value = serde_json::from_str(&stdout(&agent.command(&["status", "--json"], ""))).unwrap();
    assert_eq!(status["running"], false, "{status}");
    let stats: serde_json::Value =
        serde_json::from_str(&stdout(&agent.command(&["wal", "stats", "--json"], ""))).unwrap();
    assert_eq!(stats["sinks"][0]["lag_records"], 0, "{stats}");
    assert!(stats["last_seq"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn status_says_when_forwarding_waits_for_a_migration() {
    let db = TestDb::new();
    let agent = Agent::start(&mysql_section(&db.url()));
    agent.wait_for_log("not forwarding to MySQL", 20);
    let status: serde_json::Value = serde_json::from_str(&stdout(&agent.command(&["status", "--json"], ""))).unwrap();
    let sink = &status["sinks"][0];
    assert_eq!(sink["state"], "waiting", "{status}");
    assert!(sink["last_error"].as_str().is_some_and(|e| e.contains("telemetry-agent migrate")), "{status}");
    let metrics = scrape(&agent);
    assert_eq!(sample(&metrics, "telemetry_sink_up", Some(("sink", "mysql"))), 0.0);
}

#[test]
fn a_dump_sent_to_another_agent_recreates_the_same_events() {
    let mut original = Agent::start("");
    let mut lines = Vec::new();
    for i in 0..30 {
        lines.push(metric(&format!("p{}", i % 3), "equity", f64::from(i) + 0.5));
        lines.push(format!(
            r#"{{"kind":"trade","profile_id":"p{}","symbol":"BTC/USDT","side":"sell","quantity":"0.001","price":43000.1,"closed_at":{},"meta":{{"n":{i}}},"event_id":"t-{i}"}}"#,
            i % 3,
            1_795_000_000_000i64 + i64::from(i)
        ));
    }
    let mut client = original.connect();
    for line in &lines {
        assert_eq!(client.request(line)["ok"], true);
    }
    // Through the running agent.
    let dump = stdout(&original.command(&["wal", "dump"], ""));
    assert_eq!(dump.lines().count(), 60);
    let trades = stdout(&original.command(&["wal", "dump", "--kind", "trade", "--profile", "p1"], ""));
    assert_eq!(trades.lines().count(), 10, "{trades}");
    let from = original.command(&["wal", "dump", "--kind", "metric"], "");
    assert!(stderr(&from).contains("30 events dumped"), "{}", stderr(&from));
    drop(client);
    assert!(original.stop().success());
    // Directly on the stopped agent's WAL: the same.
    assert_eq!(stdout(&original.command(&["wal", "dump"], "")), dump);

    let mut copy = Agent::start("");
    let sent = copy.command(&["send"], &dump);
    assert!(String::from_utf8_lossy(&sent.stdout).contains("60 acked, 0 failed"), "{}", stderr(&sent));
    assert!(copy.stop().success());
    let (a, b) = (original.wal_events(), copy.wal_events());
    assert_eq!(a.len(), b.len());
    for ((seq, before), (_, after)) in a.iter().zip(&b) {
        // The original's own id, or the one it generated for that record (which `send`, run by root, may carry).
        let id = after.client_event_id().unwrap();
        match before.client_event_id() {
            Some(own) => assert_eq!(id, own),
            None => assert!(telemetry_agent::identity::is_generated_id(id) && id.ends_with(&format!("-{seq}")), "{id}"),
        }
        // Equal apart from the event id made explicit and the time of receipt.
        assert_eq!(after.to_json(None), before.to_json(None));
    }
}

#[test]
fn replay_restores_deleted_rows_without_duplicates() {
    let db = TestDb::migrated();
    let mut agent = Agent::start(&format!("{}[wal]\nretain_secs = 3600\n", mysql_section(&db.url())));
    let mut client = agent.connect();
    for i in 0..200 {
        assert_eq!(client.request(&metric(&format!("p{}", i % 7), "m", f64::from(i)))["ok"], true);
    }
    db.wait_for_rows("dd_metrics", 200, 60);
    // A restore from an older backup lost some rows.
    db.exec("DELETE FROM dd_metrics WHERE id % 4 = 0");
    let left = db.count("dd_metrics");
    let replay = agent.command(&["wal", "replay", "--sink", "mysql"], "");
    let summary = stderr(&replay);
    assert!(replay.status.success(), "{summary}");
    assert!(summary.contains(&format!("{} rows inserted, {left} already present", 200 - left)), "{summary}");
    assert_eq!(db.count("dd_metrics"), 200);
    assert_eq!(db.query::<u64>("SELECT COUNT(DISTINCT event_id) FROM dd_metrics")[0], 200);

    // Directly on the WAL, a range: nothing to insert any more.
    drop(client);
    assert!(agent.stop().success());
    let seqs: Vec<u64> = agent.wal_events().iter().map(|(seq, _)| *seq).collect();
    let (from, to) = (seqs[10].to_string(), seqs[19].to_string());
    let replay = agent.command(&["wal", "replay", "--from", &from, "--to", &to], "");
    assert!(stderr(&replay).contains("0 rows inserted, 10 already present"), "{}", stderr(&replay));
}

#[test]
fn a_wal_copied_from_another_host_reaches_mysql_exactly_once() {
    let db = TestDb::migrated();
    // Interval durability: after a reopen its newest seq is a reserved block beyond the last record.
    let mut dead_host = Agent::start("[agent]\nid = \"host-b\"\n[wal]\ndurability = \"interval\"\n");
    let mut client = dead_host.connect();
    for i in 0..100 {
        assert_eq!(client.request(&metric("p", "m", f64::from(i)))["ok"], true);
    }
    drop(client);
    assert!(dead_host.stop().success());
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp").arg("-a").arg(&dead_host.wal_dir).arg(copy.path()).status();
    assert!(status.unwrap().success());
    let copied = copy.path().join("wal");

    // This host's agent config (another agent id) names the MySQL to replay into.
    let here = Agent::start(&mysql_section(&db.url()));
    for round in 0..2 {
        let out = here.command(&["wal", "replay", "--wal-dir", copied.to_str().unwrap()], "");
        let text = stdout(&out);
        let want = if round == 0 { "100 rows inserted" } else { "0 rows inserted" };
        assert!(text.contains("agent host-b") && text.contains(want), "{text}{}", stderr(&out));
    }
    assert_eq!(db.query::<u64>("SELECT COUNT(*) FROM dd_metrics WHERE agent_id = 'host-b'")[0], 100);
    assert_eq!(db.count("dd_metrics"), 100);
}

#[test]
fn dead_letters_are_listed_retried_after_a_fix_and_dropped_with_a_reason() {
    let db = TestDb::migrated();
    db.exec("ALTER TABLE dd_metrics MODIFY name VARCHAR(5) NOT NULL");
    let agent = Agent::start(&mysql_section(&db.url()));
    let mut client = agent.connect();
    for (name, id) in [("ok", "e-1"), ("much_too_long", "poison-1"), ("also_too_long", "poison-2")] {
        let line = format!(r#"{{"kind":"metric","profile_id":"p","name":"{name}","value":1,"event_id":"{id}"}}"#);
        assert_eq!(client.request(&line)["ok"], true);
    }
    db.wait_for_rows("dd_metrics", 1, 30);
    let deadline = Instant::now() + Duration::from_secs(20);
    let letters = loop {
        let list = stdout(&agent.command(&["wal", "dead-letters", "list", "--json"], ""));
        let letters: Vec<serde_json::Value> = list.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if letters.len() == 2 {
            break letters;
        }
        assert!(Instant::now() < deadline, "expected 2 dead letters: {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(letters[0]["error"].as_str().unwrap().contains("1406"), "{:?}", letters[0]);
    assert!(letters[0]["event"].as_str().unwrap().contains("poison-1"), "{:?}", letters[0]);

    let refused = agent.command(&["wal", "dead-letters", "drop", "--seq", &letters[1]["seq"].to_string()], "");
    assert!(!refused.status.success() && stderr(&refused).contains("--reason"), "{}", stderr(&refused));
    let seq = letters[1]["seq"].to_string();
    let dropped = agent.command(&["wal", "dead-letters", "drop", "--seq", &seq, "--reason", "test data"], "");
    assert!(stderr(&dropped).contains("1 dead letters dropped"), "{}", stderr(&dropped));

    // The fix: the column is wide enough again. The retried event keeps its id.
    db.exec("ALTER TABLE dd_metrics MODIFY name VARCHAR(128) NOT NULL");
    let retried = agent.command(&["wal", "dead-letters", "retry"], "");
    assert!(stderr(&retried).contains("1 dead letters queued again"), "{}", stderr(&retried));
    db.wait_for_rows("dd_metrics", 2, 30);
    assert_eq!(db.query::<String>("SELECT event_id FROM dd_metrics ORDER BY event_id"), vec!["e-1", "poison-1"]);
    assert!(stdout(&agent.command(&["wal", "dead-letters", "list", "--json"], "")).is_empty());
    agent.wait_for_log("dead letter dropped", 10);
    assert!(agent.log().contains("test data"), "{}", agent.log());
}

#[test]
fn a_reload_changes_the_batch_size_live_names_restart_only_keys_and_rejects_a_broken_file() {
    let db = TestDb::migrated();
    let agent =
        Agent::start(&format!("[mysql]\nurl = {:?}\nmax_batch_rows = 1000\nmax_linger_ms = 600000\n", db.url()));
    let mut client = agent.connect();
    for i in 0..10 {
        assert_eq!(client.request(&metric("p", "m", f64::from(i)))["ok"], true);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(db.count("dd_metrics"), 0, "a 1000-row batch with a 10-minute linger should still be waiting");

    // As an editor saves: a new file renamed over the old one.
    let original = std::fs::read_to_string(&agent.config_path).unwrap();
    let replace = |text: &str| {
        let tmp = agent.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &agent.config_path).unwrap();
    };
    replace(&original.replace("max_batch_rows = 1000", "max_batch_rows = 5"));
    db.wait_for_rows("dd_metrics", 10, 20);
    agent.wait_for_log("mysql.max_batch_rows", 10);

    // A broken file is rejected whole; the agent goes on with what it runs.
    replace("[mysql\nmax_batch_rows = ");
    agent.wait_for_log("config file rejected", 10);
    for i in 10..15 {
        assert_eq!(client.request(&metric("p", "m", f64::from(i)))["ok"], true);
    }
    db.wait_for_rows("dd_metrics", 15, 20);

    // A change that needs a restart is named; SIGHUP reloads too.
    std::fs::write(&agent.config_path, original.replace("max_batch_rows = 1000", "max_batch_rows = 5\npool_size = 6"))
        .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for_log("mysql.pool_size", 10);
    agent.wait_for_log("SIGHUP", 10);
    assert!(agent.log().contains("only after a restart"), "{}", agent.log());
    assert_eq!(client.request(&metric("p", "m", 99.0))["ok"], true, "the agent still serves");
}

#[test]
fn a_damaged_wal_is_refused_with_the_salvage_command_and_salvage_forwards_only_intact_events() {
    let db = TestDb::migrated();
    let proxy = FaultProxy::start(TestDb::server_addr());
    proxy.set_down(true);
    let mut agent = Agent::start(&mysql_section(&db.url_via(proxy.port)));
    let mut client = agent.connect();
    let mut sent = std::collections::HashMap::new();
    for i in 0..3000 {
        let ack = client.request(&metric(&format!("p{}", i % 7), "m", f64::from(i)));
        sent.insert(ack["event_id"].as_str().unwrap().to_string(), f64::from(i));
    }
    drop(client);
    assert!(agent.stop().success());
    // Bytes flipped in the middle of sled's data file: sled keeps what comes before and drops the rest.
    let data = agent.wal_dir.join("sled").join("db");
    let mut bytes = std::fs::read(&data).unwrap();
    let at = bytes.len() / 2;
    bytes[at..at + 64].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&data, &bytes).unwrap();
    proxy.set_down(false);

    let refused = agent.command(&["run"], "");
    let message = stderr(&refused);
    assert!(!refused.status.success(), "a damaged WAL must not start: {message}");
    assert!(message.contains("acknowledged records are lost"), "{message}");
    assert!(message.contains("telemetry-agent wal salvage --config"), "{message}");
    assert_eq!(db.count("dd_metrics"), 0, "nothing is forwarded from a damaged WAL");

    let salvage = stdout(&agent.command(&["wal", "salvage"], ""));
    let kept: u64 = salvage
        .lines()
        .find_map(|l| l.strip_prefix("kept ")?.strip_suffix(" intact records")?.parse().ok())
        .unwrap_or_else(|| panic!("{salvage}"));
    assert!(kept > 0 && kept < 3000, "{salvage}");
    assert!(salvage.contains(&format!("lost {} acknowledged records", 3000 - kept)), "{salvage}");

    agent.restart();
    let after = agent.connect().request(&metric("p0", "m", 0.5));
    sent.insert(after["event_id"].as_str().unwrap().to_string(), 0.5);
    db.wait_for_rows("dd_metrics", kept + 1, 60);
    std::thread::sleep(Duration::from_millis(300));
    let rows: Vec<(String, f64)> = db.query("SELECT event_id, value FROM dd_metrics");
    assert_eq!(rows.len() as u64, kept + 1);
    for (event_id, value) in rows {
        assert_eq!(sent.get(&event_id), Some(&value), "row {event_id} is not an event that was sent");
    }
}

/// The daemon is a library function: a test runs it in-process, talks to it, and stops it through `shutdown`.
#[test]
fn the_daemon_serves_in_process_until_its_shutdown_resolves() {
    use telemetry_agent::config::Config;
    use telemetry_agent::daemon;
    // In this process, the daemon sets the umask for a moment (to create its socket 0600) and raises the
    // open-file limit: no other test may create files meanwhile.
    let _alone = alone();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.agent.id = Some("in-process".into());
    config.ingest.socket = dir.path().join("agent.sock");
    config.control.socket = dir.path().join("control.sock");
    config.wal.dir = dir.path().join("wal");
    config.spool.dir = dir.path().join("spool");
    config.http.enabled = false;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = runtime.spawn(async move {
        daemon::serve(&config, daemon::Options::default(), async {
            let _ = stopped.await;
        })
        .await
    });
    let socket = dir.path().join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match Client::try_connect(&socket) {
            Ok(client) => break client,
            Err(e) => assert!(Instant::now() < deadline, "the daemon does not listen: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let answer = client.request(&metric("p-inproc", "m", 1.5));
    assert_eq!(answer["ok"], true, "{answer}");
    stop.send(()).unwrap();
    runtime.block_on(served).unwrap().unwrap();
    assert!(!socket.exists(), "the socket is removed when the daemon stops");
}
