//! The MySQL forwarder against the real MariaDB: one fresh database per test, faults injected for real
//! (a TCP proxy that cuts and stalls connections, kill -9 of the agent).

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::kit::agent::{output_with_stdin, Agent, BIN};
use crate::kit::client::Client;
use crate::kit::db::{migrate, mysql_section, TestDb};
use crate::kit::proxy::FaultProxy;
use crate::kit::util::raise_fd_limit;
use telemetry_wal::{Wal, WalOptions};

fn metric_line(i: usize) -> String {
    format!(
        r#"{{"kind":"metric","profile_id":"p-{:03}","name":"m{}","value":{i}.25,"ts":{},"event_id":"m-{i}"}}"#,
        i % 300,
        i % 5,
        1_795_773_600_000u64 + i as u64
    )
}

fn trade_line(i: usize) -> String {
    format!(
        r#"{{"kind":"trade","profile_id":"p-{:03}","symbol":"BTCUSDT","side":"sell","quantity":"0.{i:08}","price":"43000.{:02}","pnl":-1.5,"fees":"0.00000001","closed_at":"2026-11-27T10:00:00.{:06}Z","meta":{{"i":{i}}},"event_id":"t-{i}"}}"#,
        i % 300,
        i % 100,
        i % 1_000_000
    )
}

fn stored_ids(db: &TestDb) -> Vec<String> {
    let mut ids = db.query::<String>("SELECT event_id FROM dd_metrics");
    ids.extend(db.query::<String>("SELECT event_id FROM dd_trade_performance"));
    ids
}

fn assert_exactly_once(db: &TestDb, acked: &[String]) {
    let stored = stored_ids(db);
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "duplicate rows");
    let acked: HashSet<&String> = acked.iter().collect();
    let missing = acked.difference(&unique).count();
    let extra = unique.difference(&acked).count();
    assert_eq!((missing, extra), (0, 0), "{missing} acked events missing, {extra} rows never acked");
}

#[test]
fn every_event_becomes_exactly_one_row_with_exact_values() {
    let db = TestDb::migrated();
    let mut agent = Agent::start(&mysql_section(&db.url()));
    let lines: Vec<String> = (0..3000).map(|i| if i % 4 == 3 { trade_line(i) } else { metric_line(i) }).collect();
    let acked = agent.connect().send_all(&lines);
    db.wait_for_rows("dd_metrics", 2250, 60);
    db.wait_for_rows("dd_trade_performance", 750, 60);
    assert_exactly_once(&db, &acked);

    let metric: Vec<(String, String, f64, String)> = db.query(
        "SELECT profile_id, name, value, DATE_FORMAT(ts, '%Y-%m-%d %H:%i:%s.%f') FROM dd_metrics WHERE event_id = 'm-1'",
    );
    assert_eq!(metric, vec![("p-001".into(), "m1".into(), 1.25, "2026-11-27 10:00:00.001000".into())]);
    let trade: Vec<(String, String, String, String, String, String, String)> = db.query(
        "SELECT side, CAST(quantity AS CHAR), CAST(price AS CHAR), CAST(pnl AS CHAR), CAST(fees AS CHAR), \
         DATE_FORMAT(closed_at, '%Y-%m-%d %H:%i:%s.%f'), JSON_EXTRACT(meta, '$.i') \
         FROM dd_trade_performance WHERE event_id = 't-2999'",
    );
    assert_eq!(
        trade,
        vec![(
            "sell".into(),
            "0.00002999".into(),
            "43000.99000000".into(),
            "-1.50000000".into(),
            "0.00000001".into(),
            "2026-11-27 10:00:00.002999".into(),
            "2999".into()
        )]
    );
    // The offset reaches the last event, even when batches committed out of order.
    agent.connect().send_all(&[metric_line(5000)]);
    db.wait_for_rows("dd_metrics", 2251, 30);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let offsets: Vec<(String, u64)> =
            db.query("SELECT agent_id, last_seq FROM telemetry_run_offsets WHERE sink = 'mysql'");
        assert_eq!(offsets.len(), 1);
        assert_eq!(offsets[0].0, "test-agent");
        let newest: u64 = db.query::<u64>("SELECT MAX(wal_seq) FROM dd_metrics")[0];
        if offsets[0].1 == newest {
            break;
        }
        assert!(Instant::now() < deadline, "offset {} never reached the newest seq {newest}", offsets[0].1);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.stop().success());
}

#[test]
fn a_resent_event_id_gives_one_row() {
    let db = TestDb::migrated();
    let agent = Agent::start(&mysql_section(&db.url()));
    let mut client = agent.connect();
    let line = metric_line(7);
    let first = client.request(&line);
    let second = client.request(&line);
    assert_eq!((first["ok"].clone(), second["ok"].clone()), (true.into(), true.into()));
    assert_ne!(first["seq"], second["seq"], "two WAL records");
    client.request(&metric_line(8));
    db.wait_for_rows("dd_metrics", 2, 30);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(db.count("dd_metrics"), 2);
}

#[test]
fn mysql_down_at_start_is_normal_and_everything_arrives_when_it_answers() {
    let db = TestDb::migrated();
    let proxy = FaultProxy::start(TestDb::server_addr());
    proxy.set_down(true);
    let agent = Agent::start(&mysql_section(&db.url_via(proxy.port)));
    let lines: Vec<String> = (0..500).map(metric_line).collect();
    let acked = agent.connect().send_all(&lines);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(db.count("dd_metrics"), 0);
    assert!(proxy.accepted() > 0, "the agent never tried to connect");
    proxy.set_down(false);
    db.wait_for_rows("dd_metrics", 500, 60);
    assert_exactly_once(&db, &acked);
    // The outage is logged once when it starts and once when it ends, not once per retry.
    let log = agent.log();
    assert_eq!(log.matches("MySQL unavailable").count(), 1, "{log}");
    assert_eq!(log.matches("MySQL available again").count(), 1, "{log}");
    assert!(log.contains("outage_secs") && log.contains("records_held=500"), "{log}");
}

#[test]
fn connections_cut_mid_transaction_lose_and_duplicate_nothing() {
    let db = TestDb::migrated();
    let proxy = FaultProxy::start(TestDb::server_addr());
    let agent = Agent::start(&(mysql_section(&db.url_via(proxy.port)) + "max_batch_rows = 200\n"));
    let socket = agent.socket.clone();
    let sender = std::thread::spawn(move || {
        let mut client = Client::connect(&socket);
        let mut acked = Vec::new();
        for round in 0..20 {
            let lines: Vec<String> = (round * 500..(round + 1) * 500)
                .map(|i| if i % 4 == 3 { trade_line(i) } else { metric_line(i) })
                .collect();
            acked.extend(client.send_all(&lines));
            std::thread::sleep(Duration::from_millis(30));
        }
        acked
    });
    // Cut, stall, and take the link down while the stream runs.
    for i in 0..12 {
        std::thread::sleep(Duration::from_millis(80));
        match i % 3 {
            0 => proxy.cut(),
            1 => {
                proxy.set_stalled(true);
                std::thread::sleep(Duration::from_millis(150));
                proxy.cut();
                proxy.set_stalled(false);
            }
            _ => {
                proxy.set_down(true);
                std::thread::sleep(Duration::from_millis(150));
                proxy.set_down(false);
            }
        }
    }
    let acked = sender.join().unwrap();
    db.wait_for_rows("dd_metrics", 7500, 90);
    db.wait_for_rows("dd_trade_performance", 2500, 90);
    assert_exactly_once(&db, &acked);
}

#[test]
fn kill_9_while_forwarding_loses_and_duplicates_nothing() {
    let db = TestDb::migrated();
    let mut agent = Agent::start(&(mysql_section(&db.url()) + "max_batch_rows = 100\n"));
    let mut acked = Vec::new();
    for round in 0..8 {
        let lines: Vec<String> = (round * 600..(round + 1) * 600).map(metric_line).collect();
        acked.extend(agent.connect().send_all(&lines));
        // Kill while the forwarder is still draining this round.
        std::thread::sleep(Duration::from_millis(fastrand::u64(5..60)));
        agent.kill9();
        agent.restart();
    }
    db.wait_for_rows("dd_metrics", 4800, 90);
    assert_exactly_once(&db, &acked);
    assert!(agent.stop().success());
}

#[test]
fn a_record_mysql_refuses_is_dead_lettered_and_its_neighbours_arrive() {
    let db = TestDb::migrated();
    // Schema drift: a narrower column than the protocol allows.
    db.exec("ALTER TABLE dd_metrics MODIFY name VARCHAR(5) NOT NULL");
    let mut agent = Agent::start(&mysql_section(&db.url()));
    let mut lines: Vec<String> = (0..200).map(metric_line).collect();
    lines[120] = r#"{"kind":"metric","profile_id":"p","name":"much_too_long","value":1,"event_id":"poison"}"#.into();
    let acked = agent.connect().send_all(&lines);
    db.wait_for_rows("dd_metrics", 199, 60);
    let expected: Vec<String> = acked.into_iter().filter(|id| id != "poison").collect();
    assert_exactly_once(&db, &expected);
    // The forwarder went on: later events arrive too.
    agent.connect().request(&metric_line(500));
    db.wait_for_rows("dd_metrics", 200, 30);
    assert!(agent.stop().success());

    let wal = Wal::open(&agent.wal_dir, WalOptions::default()).unwrap();
    let letters = wal.dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].sink, "mysql");
    assert!(letters[0].error.contains("1406") && letters[0].error.contains("name"), "{}", letters[0].error);
    let event = telemetry_agent::event::Event::decode(&letters[0].payload).unwrap();
    assert_eq!(event.client_event_id(), Some("poison"));
}

#[test]
fn five_hundred_clients_share_a_bounded_pool() {
    // A thousand descriptors, in the table this process shares with other tests.
    raise_fd_limit();
    let db = TestDb::migrated();
    // Every agent connection goes through the proxy, which counts them.
    let proxy = FaultProxy::start(TestDb::server_addr());
    let agent = Agent::start(&(mysql_section(&db.url_via(proxy.port)) + "pool_size = 3\nmax_batch_rows = 50\n"));
    let socket = agent.socket.clone();
    let clients: Vec<_> = (0..500)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket);
                let lines: Vec<String> = (c * 10..(c + 1) * 10).map(metric_line).collect();
                client.send_all(&lines)
            })
        })
        .collect();
    let acked: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    db.wait_for_rows("dd_metrics", 5000, 60);
    let max = proxy.max_open();
    assert!((1..=3).contains(&max), "the agent held {max} connections at once with pool_size = 3");
    assert_exactly_once(&db, &acked);
}

#[test]
fn a_schema_behind_keeps_events_until_migrated() {
    let db = TestDb::new();
    let agent = Agent::start(&mysql_section(&db.url()));
    let acked = agent.connect().send_all(&(0..50).map(metric_line).collect::<Vec<_>>());
    assert!(migrate(&db.url()).status.success());
    db.wait_for_rows("dd_metrics", 50, 60);
    assert_exactly_once(&db, &acked);
}

#[test]
fn migrate_is_idempotent_concurrent_and_refuses_edited_files() {
    let db = TestDb::new();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url();
            std::thread::spawn(move || migrate(&url))
        })
        .collect();
    let outputs: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    for output in &outputs {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let applied = outputs.iter().filter(|o| String::from_utf8_lossy(&o.stdout).contains("applied: 0001_init")).count();
    assert_eq!(applied, 1, "exactly one concurrent run applies the migration");
    let again = migrate(&db.url());
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "schema is up to date");
    assert_eq!(
        db.query::<u64>("SELECT COUNT(*) FROM schema_migrations")[0],
        telemetry_agent::migrate::MIGRATIONS.len() as u64
    );

    db.exec("UPDATE schema_migrations SET checksum = REPEAT('0', 64) WHERE version = '0001_init'");
    let edited = migrate(&db.url());
    assert!(!edited.status.success());
    let stderr = String::from_utf8_lossy(&edited.stderr);
    assert!(stderr.contains("0001_init was edited after it was applied"), "{stderr}");
}

#[test]
fn restart_resumes_from_mysql_when_it_is_ahead_of_the_local_cursor() {
    let db = TestDb::migrated();
    let mut agent = Agent::start(&mysql_section(&db.url()));
    let acked = agent.connect().send_all(&(0..300).map(metric_line).collect::<Vec<_>>());
    db.wait_for_rows("dd_metrics", 300, 60);
    assert!(agent.stop().success());
    // Simulate a crash between COMMIT and the local cursor update: wind the local cursor back.
    {
        let wal = Wal::open(&agent.wal_dir, WalOptions::default()).unwrap();
        wal.set_cursor("mysql", 0).unwrap();
        wal.close().unwrap();
    }
    // Remove a row: if the agent re-sent from the local cursor, it would come back.
    db.exec("DELETE FROM dd_metrics WHERE event_id = 'm-0'");
    agent.restart();
    let started = Instant::now();
    let more = agent.connect().send_all(&[metric_line(1000)]);
    db.wait_for_rows("dd_metrics", 300, 30);
    assert!(started.elapsed() < Duration::from_secs(30));
    let stored: HashSet<String> = stored_ids(&db).into_iter().collect();
    assert!(!stored.contains("m-0"), "the agent re-sent what MySQL already had");
    assert!(stored.contains(&more[0]));
    assert_eq!(acked.len(), 300);
}

#[test]
fn the_password_file_must_be_private_and_is_used() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::migrated();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("mysql.password");
    // The test server's user has whatever password its URL carries (often none).
    let password = url::Url::parse(&db.url()).unwrap().password().unwrap_or("").to_string();
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let mut url = url::Url::parse(&db.url()).unwrap();
    url.set_password(None).unwrap();
    let section = format!("{}password_file = {:?}\n", mysql_section(url.as_str()), password_file.display().to_string());

    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[ingest]\nsocket = {:?}\n[wal]\ndir = {:?}\n{section}",
            dir.path().join("a.sock").display().to_string(),
            dir.path().join("wal").display().to_string()
        ),
    )
    .unwrap();
    let refused = Command::new(BIN).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("readable by others") && stderr.contains("chmod 600"), "{stderr}");

    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = Agent::start(&section);
    agent.connect().send_all(&[metric_line(1)]);
    db.wait_for_rows("dd_metrics", 1, 30);
}

/// A WAL as an older agent (or another host) left it: seqs from `first_seq`, this agent's id, no runs.
fn create_wal(dir: &std::path::Path, first_seq: u64, records: usize) {
    let wal = Wal::open(dir, WalOptions { first_seq, ..WalOptions::default() }).unwrap();
    wal.set_label("agent_id", "test-agent").unwrap();
    let appender = wal.appender();
    for i in 0..records {
        let line = format!(r#"{{"kind":"metric","profile_id":"old","name":"m","value":{i}}}"#);
        let event = telemetry_agent::event::parse_line(line.as_bytes(), 1_795_773_600_000_000, u64::MAX).unwrap();
        appender.blocking_append(event.encode()).unwrap().blocking_durable().unwrap();
    }
    wal.close().unwrap();
}

/// Metrics without event ids, so the agent names them.
fn idless(profile: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!(r#"{{"kind":"metric","profile_id":"{profile}","name":"m","value":{i}}}"#)).collect()
}

fn rows_per_profile(db: &TestDb) -> Vec<(String, u64)> {
    db.query("SELECT profile_id, COUNT(*) FROM dd_metrics GROUP BY profile_id ORDER BY profile_id")
}

#[test]
fn an_offset_the_wal_later_passes_never_makes_the_agent_skip() {
    let db = TestDb::migrated();
    let mut agent = Agent::configure(&mysql_section(&db.url()));
    // Seqs from 1 (one record of an older agent), so that the events below pass the offsets.
    create_wal(&agent.wal_dir, 1, 1);
    // Offsets under this agent id ahead of its WAL: another host's with the same id, in the table agents
    // before runs shared; and a huge one under an earlier run of this very WAL (a newer copy of it).
    db.exec(
        "INSERT INTO telemetry_offsets (agent_id, sink, last_seq, updated_at) \
         VALUES ('test-agent', 'mysql', 100, UTC_TIMESTAMP(6))",
    );
    {
        let wal = Wal::open(&agent.wal_dir, WalOptions::default()).unwrap();
        telemetry_agent::identity::Identity::start_run(&wal, "test-agent".into()).unwrap();
        let run = telemetry_agent::identity::Identity::load(&wal, "test-agent".into()).unwrap().run_id().to_string();
        db.exec(&format!(
            "INSERT INTO telemetry_run_offsets (agent_id, run_id, sink, last_seq, updated_at) \
             VALUES ('test-agent', '{run}', 'mysql', 1000000, UTC_TIMESTAMP(6))"
        ));
        wal.close().unwrap();
    }
    agent.restart();
    // The WAL passes both offsets: every event still arrives, none is skipped.
    let mut acked = agent.connect().send_all(&(0..300).map(metric_line).collect::<Vec<_>>());
    db.wait_for_rows("dd_metrics", 301, 30);
    acked.push("test-agent-1".into());
    assert_exactly_once(&db, &acked);
}

#[test]
fn two_agents_with_one_id_and_their_own_wals_lose_nothing() {
    let db = TestDb::migrated();
    let (mut a, mut b) = (Agent::configure(&mysql_section(&db.url())), Agent::configure(&mysql_section(&db.url())));
    // The worst case: both WALs hand out the same seqs (each holds one record of an older agent, which both
    // name `test-agent-1`: ids from before runs cannot be told apart, and MySQL keeps one).
    create_wal(&a.wal_dir, 1, 1);
    create_wal(&b.wal_dir, 1, 1);
    a.restart();
    b.restart();
    let mut acked = a.connect().send_all(&idless("a", 50));
    acked.extend(b.connect().send_all(&idless("b", 50)));
    acked.push("test-agent-1".into());
    db.wait_for_rows("dd_metrics", 101, 30);
    // The first restarts after its twin has forwarded, and both keep sending.
    a.kill9();
    a.restart();
    acked.extend(a.connect().send_all(&idless("a2", 50)));
    acked.extend(b.connect().send_all(&idless("b2", 50)));
    db.wait_for_rows("dd_metrics", 201, 30);
    assert_exactly_once(&db, &acked);
    let expected: Vec<(String, u64)> = [("a", 50), ("a2", 50), ("b", 50), ("b2", 50), ("old", 1)]
        .into_iter()
        .map(|(p, n)| (p.to_string(), n))
        .collect();
    assert_eq!(rows_per_profile(&db), expected);
}

#[test]
fn a_wal_copied_to_a_second_host_forwards_each_event_once() {
    let db = TestDb::migrated();
    let proxy = FaultProxy::start(TestDb::server_addr());
    proxy.set_down(true);
    // The original acks events MySQL has not seen yet (it is away), then its WAL is copied to a second host.
    let mut original = Agent::start(&mysql_section(&db.url_via(proxy.port)));
    let mut acked = original.connect().send_all(&idless("before", 40));
    assert!(original.stop().success());
    let mut copy = Agent::configure(&mysql_section(&db.url()));
    let status = Command::new("cp").arg("-a").arg(&original.wal_dir).arg(&copy.wal_dir).status().unwrap();
    assert!(status.success());
    proxy.set_down(false);
    original.restart();
    copy.restart();
    acked.extend(original.connect().send_all(&idless("original", 30)));
    acked.extend(copy.connect().send_all(&idless("copy", 30)));
    db.wait_for_rows("dd_metrics", 100, 30);
    assert_exactly_once(&db, &acked);
    let expected: Vec<(String, u64)> =
        [("before", 40), ("copy", 30), ("original", 30)].into_iter().map(|(p, n)| (p.to_string(), n)).collect();
    assert_eq!(rows_per_profile(&db), expected);
}

#[test]
fn records_from_before_runs_keep_their_ids_after_an_upgrade() {
    let db = TestDb::migrated();
    let mut agent = Agent::configure(&mysql_section(&db.url()));
    create_wal(&agent.wal_dir, 1, 20);
    agent.restart();
    let acked = agent.connect().send_all(&idless("new", 10));
    db.wait_for_rows("dd_metrics", 30, 30);
    let legacy: Vec<String> = (1..=20).map(|seq| format!("test-agent-{seq}")).collect();
    assert_exactly_once(&db, &[legacy, acked.clone()].concat());
    assert!(acked.iter().all(|id| telemetry_agent::identity::is_generated_id(id)), "{acked:?}");
    // Sent again from the start (a lost cursor): nothing comes back as new.
    assert!(agent.stop().success());
    {
        let wal = Wal::open(&agent.wal_dir, WalOptions::default()).unwrap();
        wal.set_cursor("mysql", 0).unwrap();
        wal.close().unwrap();
    }
    agent.restart();
    let more = agent.connect().send_all(&idless("later", 1));
    db.wait_for_rows("dd_metrics", 31, 30);
    assert!(stored_ids(&db).contains(&more[0]));
}

#[test]
fn a_script_cannot_send_an_id_the_agent_generates() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let db = TestDb::migrated();
    let agent = Agent::start(&mysql_section(&db.url()));
    let generated = agent.connect().send_all(&idless("p", 1)).remove(0);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED the script-user half: needs root to act as another user");
        return;
    }
    // A script running as its own user (nobody) sends the generated id as its own, and a natural id of its
    // own that has the old generated form.
    let bin = agent.dir.path().join("telemetry-agent");
    std::fs::copy(BIN, &bin).unwrap();
    for path in [agent.dir.path(), &bin, &agent.socket] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let lines = format!(
        "{{\"kind\":\"metric\",\"profile_id\":\"p\",\"name\":\"m\",\"value\":9,\"event_id\":\"{generated}\"}}\n\
         {{\"kind\":\"metric\",\"profile_id\":\"p\",\"name\":\"m\",\"value\":8,\"event_id\":\"test-agent-1796185805413002\"}}\n"
    );
    let mut send = Command::new(&bin);
    send.args(["send", "--socket"]).arg(&agent.socket).uid(65534).gid(65534);
    let output = output_with_stdin(&mut send, &lines);
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(printed.contains("1 acked, 1 failed"), "{printed}");
    assert!(printed.contains("invalid_event") && printed.contains("reserved"), "{printed}");
    db.wait_for_rows("dd_metrics", 2, 30);
    let mut stored = stored_ids(&db);
    stored.sort();
    assert_eq!(stored, vec!["test-agent-1796185805413002".to_string(), generated.clone()]);
    let value: Vec<f64> = db.query(&format!("SELECT value FROM dd_metrics WHERE event_id = '{generated}'"));
    assert_eq!(value, vec![0.0], "the script's event took the generated id's row");
}

/// A connection inside a transaction that inserted (and so locks) a metric row with `event_id`; ROLLBACK
/// on it releases the lock.
async fn hold_row(pool: &mysql_async::Pool, event_id: &str) -> mysql_async::Conn {
    use mysql_async::prelude::Queryable;
    let mut holder = pool.get_conn().await.unwrap();
    holder.query_drop("START TRANSACTION").await.unwrap();
    holder
        .exec_drop(
            "INSERT INTO dd_metrics (event_id, agent_id, wal_seq, profile_id, name, value, ts, received_at) \
             VALUES (?, 'other', 0, 'p', 'm', 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
            (event_id,),
        )
        .await
        .unwrap();
    holder
}

/// The lost events of the chaos runs, made deterministic. Batch B reserves its AUTO_INCREMENT ids, then waits
/// on a lock (an abandoned transaction holding B's first event); batch C, which holds a resent event that is
/// also in B, commits meanwhile with later ids; then the lock goes. With `ON DUPLICATE KEY UPDATE id = id`
/// MariaDB moved B's next id past C's copy of the resent event, the rows after it collided with C's ids and
/// were dropped as duplicates, and B's offset passed events that were not there.
#[test]
fn a_duplicate_holding_a_later_id_does_not_drop_the_rows_after_it() {
    use mysql_async::prelude::Queryable;
    use telemetry_agent::event::{parse_line, Event};
    use telemetry_wal::Record;

    const LOCK_WAIT: Duration = Duration::from_secs(10);
    let identity =
        || telemetry_agent::identity::Identity::new("test-agent".into(), vec![(1, "0123456789abcdef".into())]);
    // The INSERT path's id reservation is what this is about.
    let insert_only = || telemetry_agent::sink::mysql::WritePath::new(telemetry_agent::sink::mysql::Bulk::Insert);
    let db = TestDb::migrated();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let config = telemetry_agent::config::MysqlConfig { url: db.url(), write_timeout_ms: 20_000, ..Default::default() };
    let pool = telemetry_agent::sink::mysql::Nodes::new(&config).unwrap().lease().pool;
    let batch = |first_seq: u64, ids: &[&str]| -> Vec<(Record, Event)> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let line = format!(r#"{{"kind":"metric","profile_id":"p","name":"m","value":{i},"event_id":"{id}"}}"#);
                let record = Record { seq: first_seq + i as u64, appended_at_ms: 0, payload: Vec::new() };
                (record, parse_line(line.as_bytes(), 0, u64::MAX).unwrap())
            })
            .collect()
    };
    // Ten rows each: one statement per batch (the forwarder sends 1000, 300, 100, 30, 10, 3 or 1 rows at once).
    let b = batch(1, &["a-held", "b-2", "b-3", "resent", "b-5", "b-6", "b-7", "b-8", "b-9", "b-10"]);
    let c = batch(11, &["resent", "c-2", "c-3", "c-4", "c-5", "c-6", "c-7", "c-8", "c-9", "c-10"]);

    runtime.block_on(async {
        // The abandoned transaction: holds the lock on B's first event.
        let mut holder = hold_row(&pool, "a-held").await;
        let b_write = tokio::spawn({
            let pool = pool.clone();
            async move {
                telemetry_agent::sink::mysql::write_rows(&pool, &identity(), &b, LOCK_WAIT, &insert_only(), || 10).await
            }
        });
        // B is waiting on the held lock (its ids reserved) once its INSERT runs and does not finish.
        let mut probe = pool.get_conn().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            let running: Option<u64> = probe
                .query_first(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE db = DATABASE() \
                     AND info LIKE 'INSERT INTO dd_metrics%'",
                )
                .await
                .unwrap();
            if running == Some(1) {
                break;
            }
            assert!(!b_write.is_finished(), "batch B did not wait on the held lock: {:?}", b_write.await);
            assert!(Instant::now() < deadline, "batch B never started its INSERT");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!b_write.is_finished(), "batch B did not wait on the held lock");
        let c_written =
            telemetry_agent::sink::mysql::write_rows(&pool, &identity(), &c, LOCK_WAIT, &insert_only(), || 20)
                .await
                .unwrap();
        assert_eq!(c_written.inserted, 10);
        holder.query_drop("ROLLBACK").await.unwrap();
        let b_written = b_write.await.unwrap().expect("batch B commits");
        assert_eq!((b_written.inserted, b_written.already_present), (9, 1), "batch B: {b_written:?}");
        drop((holder, probe));
        pool.disconnect().await.unwrap();
    });

    let mut stored = stored_ids(&db);
    stored.sort();
    let mut expected: Vec<String> = ["a-held", "resent"]
        .into_iter()
        .map(String::from)
        .chain((2..=10).flat_map(|i| [format!("b-{i}"), format!("c-{i}")]))
        .filter(|id| id != "b-4")
        .collect();
    expected.sort();
    assert_eq!(stored, expected);
    assert_eq!(db.query::<u64>("SELECT last_seq FROM telemetry_run_offsets"), vec![20]);
}

#[test]
fn a_reloaded_write_timeout_shortens_lock_waits_too() {
    use mysql_async::prelude::Queryable;
    let db = TestDb::migrated();
    let agent = Agent::start(&(mysql_section(&db.url()) + "write_timeout_ms = 60000\n"));
    let original = std::fs::read_to_string(&agent.config_path).unwrap();
    let tmp = agent.config_path.with_extension("tmp");
    std::fs::write(&tmp, original.replace("write_timeout_ms = 60000", "write_timeout_ms = 10000")).unwrap();
    std::fs::rename(&tmp, &agent.config_path).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for_log("mysql.write_timeout_ms", 10);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let pool = mysql_async::Pool::new(db.url().as_str());
        // Another transaction holds the row the agent's event needs.
        let mut holder = hold_row(&pool, "held").await;
        let answer =
            agent.connect().request(r#"{"kind":"metric","profile_id":"p","name":"m","value":1,"event_id":"held"}"#);
        assert_eq!(answer["ok"], true, "{answer}");
        // The lock wait ends before the (reloaded) write timeout abandons the transaction.
        agent.wait_for_log("Lock wait timeout exceeded", 30);
        assert!(!agent.log().contains("did not finish within"), "{}", agent.log());
        holder.query_drop("ROLLBACK").await.unwrap();
        drop(holder);
        pool.disconnect().await.unwrap();
    });
    db.wait_for_rows("dd_metrics", 1, 30);
}
