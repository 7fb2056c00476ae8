//! The MySQL sink against a real 3-node Galera cluster (`scripts/galera.sh`): the node in use killed with
//! -9 and restarted, two agents writing through different nodes, a node that leaves Synced. After each,
//! every acked event is in the cluster exactly once with its values, and every node holds the same tables.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kit::agent::{Agent, Launch};
use crate::kit::client::Client;
use crate::kit::db::migrate;
use crate::kit::galera::GaleraDb;
use crate::kit::util::{addr_of, http_get};

fn line(tag: &str, client: usize, i: usize) -> String {
    if i % 4 == 3 {
        format!(
            r#"{{"kind":"trade","profile_id":"p-{client}","symbol":"ETHUSDT","side":"buy","quantity":"0.{i:08}","price":"2500.25","pnl":0.5,"fees":"0.001","closed_at":"2026-12-03T08:00:00Z","event_id":"{tag}-{client}-{i}"}}"#
        )
    } else {
        format!(
            r#"{{"kind":"metric","profile_id":"p-{client}","name":"m{}","value":{i}.5,"event_id":"{tag}-{client}-{i}"}}"#,
            i % 3
        )
    }
}

/// Clients sending windows of 20 events each until `stop`; each returns the ids acked.
fn senders(socket: &Path, tag: &str, clients: usize, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|client| {
            let (socket, tag, stop) = (socket.to_path_buf(), tag.to_string(), stop.clone());
            std::thread::spawn(move || {
                let mut connection = Client::connect(&socket);
                let mut acked = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let window: Vec<String> = (i..i + 20).map(|i| line(&tag, client, i)).collect();
                    acked.extend(connection.send_all(&window));
                    i += 20;
                    std::thread::sleep(Duration::from_millis(10));
                }
                acked
            })
        })
        .collect()
}

fn stop_and_collect(stop: &AtomicBool, senders: Vec<JoinHandle<Vec<String>>>) -> Vec<String> {
    stop.store(true, Ordering::Relaxed);
    senders.into_iter().flat_map(|s| s.join().unwrap()).collect()
}

fn rows_on(cluster: &GaleraDb, node: usize) -> u64 {
    cluster.query::<u64>(node, "SELECT (SELECT COUNT(*) FROM dd_metrics) + (SELECT COUNT(*) FROM dd_trade_performance)")
        [0]
}

fn wait_for_rows(cluster: &GaleraDb, node: usize, n: u64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let have = rows_on(cluster, node);
        assert!(have <= n, "node {node} holds {have} rows, more than the {n} acked");
        if have == n {
            return;
        }
        assert!(Instant::now() < deadline, "node {node} holds {have} of {n} rows after {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// On every node: each acked event once, no other row, the values as sent, and the same table checksums.
fn assert_exactly_once_on_every_node(cluster: &GaleraDb, acked: &[String]) {
    let acked: HashSet<&String> = acked.iter().collect();
    let mut checksums = Vec::new();
    for node in 1..=3 {
        let mut ids = cluster.query::<String>(node, "SELECT event_id FROM dd_metrics");
        ids.extend(cluster.query::<String>(node, "SELECT event_id FROM dd_trade_performance"));
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "node {node}: duplicate rows");
        let (missing, extra) = (acked.difference(&unique).count(), unique.difference(&acked).count());
        assert_eq!((missing, extra), (0, 0), "node {node}: {missing} acked events missing, {extra} rows never acked");
        // Values as sent: metric i has value i.5; trade i has quantity 0.i.
        let wrong: Vec<u64> = cluster.query(
            node,
            "SELECT COUNT(*) FROM dd_metrics WHERE value <> CAST(SUBSTRING_INDEX(event_id, '-', -1) AS DOUBLE) + 0.5",
        );
        assert_eq!(wrong, vec![0], "node {node}: metrics with values other than sent");
        let wrong: Vec<u64> = cluster.query(
            node,
            "SELECT COUNT(*) FROM dd_trade_performance \
             WHERE quantity * 100000000 <> CAST(SUBSTRING_INDEX(event_id, '-', -1) AS UNSIGNED) OR price <> 2500.25",
        );
        assert_eq!(wrong, vec![0], "node {node}: trades with values other than sent");
        checksums.push(cluster.query::<(String, Option<u64>)>(node, "CHECKSUM TABLE dd_metrics, dd_trade_performance"));
    }
    let names = |c: &[(String, Option<u64>)]| {
        c.iter().map(|(t, s)| (t.rsplit('.').next().unwrap_or(t).to_string(), *s)).collect::<Vec<_>>()
    };
    assert_eq!(names(&checksums[0]), names(&checksums[1]), "nodes 1 and 2 differ");
    assert_eq!(names(&checksums[0]), names(&checksums[2]), "nodes 1 and 3 differ");
}

/// `host:port` of node `node`, as the agent's `telemetry_mysql_node` names it.
fn node_name(cluster: &GaleraDb, node: usize) -> String {
    addr_of(&cluster.servers[node - 1], 3306).to_string()
}

/// The node the agent says it writes through, from `/metrics`.
fn node_in_use(agent: &Agent) -> Option<String> {
    let (_, metrics) = http_get(agent.http_addr(), "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("telemetry_mysql_node{node=\"")?.strip_suffix("\"} 1").map(str::to_string))
}

fn wait_for_node_in_use(agent: &Agent, node: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while node_in_use(agent).as_deref() != Some(node) {
        assert!(
            Instant::now() < deadline,
            "the agent writes through {:?}, not {node}, after {secs} s",
            node_in_use(agent)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Which node (1-3) the agent writes through.
fn node_number(cluster: &GaleraDb, agent: &Agent) -> usize {
    let now = node_in_use(agent);
    (1..=3).find(|&n| now == Some(node_name(cluster, n))).unwrap_or_else(|| panic!("the agent writes through {now:?}"))
}

/// GALERA_ROUNDS (default 1; the long run: docs/testing.md) kills of the node in use, each restarted by IST
/// before the next, while 8 clients stream.
#[test]
fn kill_9_of_the_node_in_use_loses_and_duplicates_nothing() {
    let Some(cluster) = GaleraDb::new() else { return };
    let rounds: usize = std::env::var("GALERA_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    assert!(migrate(&cluster.url(1)).status.success());
    let agent = Agent::start(&cluster.section(&[1, 2, 3]));
    let stop = Arc::new(AtomicBool::new(false));
    let sending = senders(&agent.socket, "k", 8, &stop);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_on(&cluster, 1) < 1000 {
        assert!(Instant::now() < deadline, "node 1 holds {} rows after 60 s", rows_on(&cluster, 1));
        std::thread::sleep(Duration::from_millis(100));
    }
    for round in 0..rounds {
        let victim = node_number(&cluster, &agent);
        let witness = victim % 3 + 1;
        let before = rows_on(&cluster, witness);
        cluster.kill(victim);
        // Acks go on while the agent moves to another node, and rows arrive there.
        std::thread::sleep(Duration::from_secs(4));
        let deadline = Instant::now() + Duration::from_secs(60);
        while node_number(&cluster, &agent) == victim || rows_on(&cluster, witness) <= before {
            assert!(Instant::now() < deadline, "round {round}: the agent did not move away from node {victim}");
            std::thread::sleep(Duration::from_millis(200));
        }
        // The node comes back by IST, holding what was written while it was away.
        cluster.start_node(victim);
        cluster.wait_for_cluster_size(victim, 3, 60);
        eprintln!(
            "galera: round {round}: node {victim} killed and back; the agent writes through node {}",
            node_number(&cluster, &agent)
        );
    }
    let acked = stop_and_collect(&stop, sending);
    wait_for_rows(&cluster, 1, acked.len() as u64, 120);
    assert!(agent.log().contains("MySQL node unusable; writing through the next one"), "{}", agent.log());
    assert_exactly_once_on_every_node(&cluster, &acked);
    eprintln!("galera: {} events acked through {rounds} kills; each once on every node, same checksums", acked.len());
}

#[test]
fn two_agents_writing_through_different_nodes_lose_and_duplicate_nothing() {
    let Some(cluster) = GaleraDb::new() else { return };
    assert!(migrate(&cluster.url(1)).status.success());
    let launch = |id: &str| Launch { agent_id: id.into(), ..Launch::test() };
    let a = Agent::configure_with(&launch("galera-a"), &cluster.section(&[1, 2, 3]));
    let b = Agent::configure_with(&launch("galera-b"), &cluster.section(&[2, 3, 1]));
    let (mut a, mut b) = (a, b);
    a.restart();
    b.restart();
    let stop = Arc::new(AtomicBool::new(false));
    let mut sending = senders(&a.socket, "a", 4, &stop);
    sending.extend(senders(&b.socket, "b", 4, &stop));
    std::thread::sleep(Duration::from_secs(5));
    let acked = stop_and_collect(&stop, sending);
    wait_for_rows(&cluster, 3, acked.len() as u64, 120);
    assert_eq!(node_in_use(&a), Some(node_name(&cluster, 1)));
    assert_eq!(node_in_use(&b), Some(node_name(&cluster, 2)));
    assert_exactly_once_on_every_node(&cluster, &acked);
    let offsets: Vec<String> =
        cluster.query(3, "SELECT DISTINCT agent_id FROM telemetry_run_offsets ORDER BY agent_id");
    assert_eq!(offsets, vec!["galera-a", "galera-b"]);
}

#[test]
fn a_node_that_is_not_synced_is_passed_over_at_start_and_left_while_running() {
    let Some(cluster) = GaleraDb::new() else { return };
    assert!(migrate(&cluster.url(1)).status.success());
    // Node 1 is a donor (desynced) before the agent starts: it starts on node 2.
    cluster.set_desync(1, true);
    let agent = Agent::start(&cluster.section(&[1, 2, 3]));
    let first: Vec<String> = (0..500).map(|i| line("d", 0, i)).collect();
    let mut acked = agent.connect().send_all(&first);
    wait_for_rows(&cluster, 2, acked.len() as u64, 60);
    assert_eq!(node_in_use(&agent), Some(node_name(&cluster, 2)));
    // Node 2 leaves Synced while the agent writes through it: its periodic check moves it to node 3.
    cluster.set_desync(2, true);
    wait_for_node_in_use(&agent, &node_name(&cluster, 3), 30);
    let second: Vec<String> = (500..1000).map(|i| line("d", 0, i)).collect();
    acked.extend(agent.connect().send_all(&second));
    wait_for_rows(&cluster, 3, acked.len() as u64, 60);
    let log = agent.log();
    assert!(log.contains("Donor/Desynced, not Synced"), "{log}");
    cluster.set_desync(1, false);
    cluster.set_desync(2, false);
    assert_exactly_once_on_every_node(&cluster, &acked);
}

#[test]
fn a_batch_above_the_write_set_limit_is_split_not_refused() {
    let Some(cluster) = GaleraDb::new() else { return };
    assert!(migrate(&cluster.url(1)).status.success());
    // 64 KiB: a few hundred rows; the agent's batches reach 10,000 rows and 4 MiB.
    cluster.admin(1, "SET GLOBAL wsrep_max_ws_size = 65536");
    // A long linger: the 4,000 events go out as a few large batches however slowly the machine answers.
    let agent = Agent::start(&cluster.section(&[1, 2, 3]).replace("max_linger_ms = 20\n", "max_linger_ms = 2000\n"));
    let lines: Vec<String> = (0..4000).map(|i| line("w", 0, i)).collect();
    let acked = agent.connect().send_all(&lines);
    wait_for_rows(&cluster, 1, acked.len() as u64, 60);
    // Split on node 1, not moved to a node without the limit.
    assert_eq!(node_in_use(&agent), Some(node_name(&cluster, 1)));
    let (_, metrics) = http_get(agent.http_addr(), "/metrics");
    assert!(metrics.contains("\ntelemetry_dead_letters 0\n"), "{metrics}");
    assert!(agent.log().contains("MySQL refused a batch; splitting it"), "{}", agent.log());
    assert_exactly_once_on_every_node(&cluster, &acked);
}

#[test]
fn the_same_events_through_two_nodes_at_once_are_stored_once() {
    let Some(cluster) = GaleraDb::new() else { return };
    assert!(migrate(&cluster.url(1)).status.success());
    let launch = |id: &str| Launch { agent_id: id.into(), ..Launch::test() };
    let mut a = Agent::configure_with(&launch("galera-a"), &cluster.section(&[1, 2, 3]));
    let mut b = Agent::configure_with(&launch("galera-b"), &cluster.section(&[3, 2, 1]));
    a.restart();
    b.restart();
    // A script that resends its events to another host's agent (its own was away): the same event ids reach
    // the cluster through two nodes at once, and certification lets one transaction of each pair commit.
    let lines: Vec<String> = (0..6000).map(|i| line("s", 0, i)).collect();
    let (socket_a, socket_b) = (a.socket.clone(), b.socket.clone());
    let windows = |socket: std::path::PathBuf, lines: Vec<String>| {
        std::thread::spawn(move || {
            let mut client = Client::connect(&socket);
            lines.chunks(50).flat_map(|window| client.send_all(window)).collect::<Vec<String>>()
        })
    };
    let (sent_a, sent_b) = (windows(socket_a, lines.clone()), windows(socket_b, lines));
    let mut acked = sent_a.join().unwrap();
    acked.extend(sent_b.join().unwrap());
    acked.sort();
    acked.dedup();
    wait_for_rows(&cluster, 2, acked.len() as u64, 60);
    // Both agents are done when their lag is 0; a row missing or doubled shows below either way.
    for agent in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http_get(agent.http_addr(), "/metrics").1.contains("telemetry_sink_lag_records{sink=\"mysql\"} 0") {
            assert!(Instant::now() < deadline, "an agent still has events for MySQL after 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let conflicts: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|agent| {
            let (_, metrics) = http_get(agent.http_addr(), "/metrics");
            metrics
                .lines()
                .filter(|l| l.starts_with("telemetry_mysql_conflicts_total"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!("conflicts retried: {conflicts:?}");
    assert_eq!(conflicts.len(), 2, "both agents count conflicts in /metrics");
    assert_exactly_once_on_every_node(&cluster, &acked);
}

#[test]
fn an_error_every_node_would_give_is_waited_out_on_the_node_in_use() {
    let Some(cluster) = GaleraDb::new() else { return };
    assert!(migrate(&cluster.url(1)).status.success());
    let agent = Agent::start(&cluster.section(&[1, 2, 3]));
    let first: Vec<String> = (0..100).map(|i| line("e", 0, i)).collect();
    let mut acked = agent.connect().send_all(&first);
    wait_for_rows(&cluster, 1, acked.len() as u64, 60);
    // A missing table fails the write on every node, and node 1 passes the check: moving would not help.
    cluster.admin(1, &format!("RENAME TABLE {0}.dd_metrics TO {0}.dd_metrics_away", cluster.name));
    let second: Vec<String> = (100..400).map(|i| line("e", 0, i)).collect();
    acked.extend(agent.connect().send_all(&second));
    agent.wait_for_log("MySQL unavailable", 30);
    std::thread::sleep(Duration::from_secs(2));
    cluster.admin(1, &format!("RENAME TABLE {0}.dd_metrics_away TO {0}.dd_metrics", cluster.name));
    wait_for_rows(&cluster, 1, acked.len() as u64, 60);
    assert_eq!(node_in_use(&agent), Some(node_name(&cluster, 1)));
    assert!(!agent.log().contains("MySQL node unusable"), "{}", agent.log());
    assert_exactly_once_on_every_node(&cluster, &acked);
}
