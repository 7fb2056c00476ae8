//! Chaos: clients stream events while the agent is killed with SIGKILL and restarted, and the MySQL and
//! Redis connections are cut, then the clients' own record of acks is checked against MySQL and Redis:
//! every acked event exactly once with its exact value, no row that was never sent, the newest value per
//! (profile, metric) in Redis, bounded connections. Not in the default suite yet: it takes a minute, and
//! it fails in about 2 runs of 7 (tens of acked events missing from MySQL although its offset and the WAL
//! cursor passed them; under investigation, issue 6). Run it with
//! `cargo test -p telemetry-agent --test chaos -- --ignored --nocapture`.
//! CHAOS_SECS (default 30) and CHAOS_CLIENTS (default 60) make it longer or wider.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Agent, FaultProxy, TestDb, TestRedis};

const BASE_TS_MS: i64 = 1_795_000_000_000;

/// One event a client sent: (profile, metric, value, ts in ms).
type Sent = (String, String, i64, i64);

/// The seq each event was acked with.
static ACK_SEQS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Sends `line` until the agent acks it, over `conn` (reconnecting as needed), and returns the ack's seq;
/// `None` when `stop` is set before an ack arrives.
fn send_until_acked(
    socket: &Path,
    conn: &mut Option<(UnixStream, BufReader<UnixStream>)>,
    line: &str,
    stop: &AtomicBool,
) -> Option<u64> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        if conn.is_none() {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let reader = BufReader::new(stream.try_clone().expect("clone a socket"));
                    *conn = Some((stream, reader));
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        let Some((stream, reader)) = conn.as_mut() else { continue };
        let mut answer = String::new();
        let ok = stream.write_all(format!("{line}\n").as_bytes()).is_ok()
            && matches!(reader.read_line(&mut answer), Ok(n) if n > 0);
        if !ok {
            // The agent died or the connection broke: the ack may be lost; resend the same event id.
            *conn = None;
            continue;
        }
        if answer.starts_with("{\"ok\":true") {
            let ack: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            return Some(ack["seq"].as_u64().unwrap_or(0));
        }
        // overloaded, shutting_down, wal_full: retry shortly.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "chaos run (about a minute): cargo test -p telemetry-agent --test chaos -- --ignored"]
fn acked_events_survive_kill_9_and_connection_cuts_exactly_once() {
    let secs: u64 = std::env::var("CHAOS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let clients: usize = std::env::var("CHAOS_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let db = TestDb::migrated();
    let redis = TestRedis::new();
    let mysql_proxy = FaultProxy::start(TestDb::server_addr());
    let redis_proxy = FaultProxy::start(redis.addr());
    let mut agent = Agent::configure(&format!(
        "[mysql]\nurl = {:?}\npool_size = 4\nmax_linger_ms = 20\nretry_initial_ms = 20\nretry_max_ms = 500\n\
         write_timeout_ms = 3000\n{}retry_max_ms = 500\nresponse_timeout_ms = 500\n",
        db.url_via(mysql_proxy.port),
        redis.section(&redis.url_via(redis_proxy.port))
    ));
    if let Ok(filter) = std::env::var("CHAOS_RUST_LOG") {
        agent.env.push(("RUST_LOG".into(), filter));
    }
    agent.restart();
    let socket: PathBuf = agent.socket.clone();
    let stop = AtomicBool::new(false);
    let acked: Mutex<HashMap<String, Sent>> = Mutex::new(HashMap::new());
    let sent: Mutex<HashMap<String, Sent>> = Mutex::new(HashMap::new());
    let kills = AtomicU64::new(0);
    let cuts = AtomicU64::new(0);

    std::thread::scope(|scope| {
        for c in 0..clients {
            let (socket, stop, acked, sent) = (&socket, &stop, &acked, &sent);
            scope.spawn(move || {
                let mut conn = None;
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("c{c}-{i}");
                    let (profile, name) = (format!("p{}", c % 20), format!("m{}", i % 5));
                    let ts = BASE_TS_MS + (c as i64) * 10_000_000 + i;
                    let line = format!(
                        r#"{{"kind":"metric","profile_id":"{profile}","name":"{name}","value":{i},"ts":{ts},"event_id":"{id}"}}"#
                    );
                    sent.lock().unwrap().insert(id.clone(), (profile.clone(), name.clone(), i, ts));
                    if let Some(seq) = send_until_acked(socket, &mut conn, &line, stop) {
                        ACK_SEQS.lock().unwrap().get_or_insert_with(HashMap::new).insert(id.clone(), seq);
                        acked.lock().unwrap().insert(id, (profile, name, i, ts));
                    }
                    i += 1;
                }
            });
        }
        // The fault schedule.
        let started = Instant::now();
        let mut next_kill = Instant::now() + Duration::from_secs(3);
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(200 + fastrand::u64(..600)));
            match fastrand::u8(..4) {
                0 => mysql_proxy.cut(),
                1 => redis_proxy.cut(),
                2 => mysql_proxy.set_stalled(fastrand::bool()),
                _ => redis_proxy.set_stalled(fastrand::bool()),
            }
            cuts.fetch_add(1, Ordering::Relaxed);
            if Instant::now() >= next_kill {
                agent.kill9();
                kills.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(fastrand::u64(..300)));
                agent.restart();
                next_kill = Instant::now() + Duration::from_millis(2000 + fastrand::u64(..3000));
            }
        }
        mysql_proxy.set_stalled(false);
        redis_proxy.set_stalled(false);
        stop.store(true, Ordering::Relaxed);
    });

    // Everything acked reaches MySQL.
    let acked = acked.into_inner().unwrap();
    let sent = sent.into_inner().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored: HashSet<String> = db.query::<String>("SELECT event_id FROM dd_metrics").into_iter().collect();
        if acked.keys().all(|id| stored.contains(id)) {
            break;
        }
        if Instant::now() > deadline {
            // Where are they? In the WAL (forwarding stuck) or not (lost)?
            let missing: Vec<&String> = acked.keys().filter(|id| !stored.contains(*id)).collect();
            let offset = db.query::<u64>("SELECT last_seq FROM telemetry_offsets");
            assert!(agent.stop().success());
            let wal = telemetry_wal::Wal::open(&agent.wal_dir, telemetry_wal::WalOptions::default()).unwrap();
            let cursor = wal.cursor("mysql").unwrap();
            let stats = wal.stats().unwrap();
            drop(wal);
            let in_wal: HashMap<String, u64> = agent
                .wal_events()
                .into_iter()
                .filter_map(|(seq, e)| e.client_event_id().map(|id| (id.to_string(), seq)))
                .collect();
            let found: Vec<(&String, Option<&u64>)> =
                missing.iter().take(10).map(|id| (*id, in_wal.get(*id))).collect();
            // Which rows hold the seqs the missing events were acked with: another event (a seq handed out
            // twice) or none (a window never written)?
            let ack_seqs = ACK_SEQS.lock().unwrap().clone().unwrap_or_default();
            let mut seqs: Vec<u64> = missing.iter().filter_map(|id| ack_seqs.get(*id).copied()).collect();
            seqs.sort_unstable();
            for seq in seqs.iter().take(10) {
                let holders: Vec<(String, String)> =
                    db.query(&format!("SELECT event_id, agent_id FROM dd_metrics WHERE wal_seq = {seq}"));
                eprintln!("missing event acked with seq {seq}; rows with that wal_seq: {holders:?}");
            }
            eprintln!("missing acked seqs: {:?} .. {:?} ({} of them)", seqs.first(), seqs.last(), seqs.len());
            panic!(
                "{} acked events missing from MySQL after 120 s; MySQL offset {offset:?}, mysql cursor {cursor},                  WAL {stats:?}; first missing with their WAL seq: {found:?}\n{}",
                missing.len(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows: Vec<(String, String, String, f64)> = db.query("SELECT event_id, profile_id, name, value FROM dd_metrics");
    let mut seen = HashSet::new();
    let (mut duplicated, mut wrong, mut never_sent) = (0, 0, 0);
    for (id, profile, name, value) in &rows {
        duplicated += usize::from(!seen.insert(id.clone()));
        never_sent += usize::from(!sent.contains_key(id));
        if let Some((p, n, v, _)) = acked.get(id) {
            wrong += usize::from(p != profile || n != name || *v as f64 != *value);
        }
    }
    let lost = acked.keys().filter(|id| !seen.contains(*id)).count();

    // Redis: the newest acked value per (profile, metric), or a newer one that was sent and whose ack was lost
    // (stored, but the client stopped before it heard back).
    let mut newest: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (profile, name, _, ts) in acked.values() {
        let kept = newest.entry((profile.clone(), name.clone())).or_insert(*ts);
        *kept = (*kept).max(*ts);
    }
    let sent_values: HashSet<(String, String, String, String)> = sent
        .values()
        .map(|(profile, name, value, ts)| (profile.clone(), name.clone(), value.to_string(), ts.to_string()))
        .collect();
    let stale = || -> Vec<String> {
        newest
            .iter()
            .filter_map(|((profile, name), newest_ts)| {
                let value = redis.hash(&format!("{profile}:metrics")).get(name).cloned().unwrap_or_default();
                let ts = redis.hash(&format!("{profile}:metrics_ts")).get(name).cloned().unwrap_or_default();
                let ok = ts.parse::<i64>().is_ok_and(|ts| ts >= *newest_ts)
                    && sent_values.contains(&(profile.clone(), name.clone(), value.clone(), ts.clone()));
                (!ok).then(|| format!("{profile}/{name}: Redis has {value:?} at {ts:?}, newest acked at {newest_ts}"))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let redis_stale = loop {
        let stale = stale();
        if stale.is_empty() || Instant::now() > deadline {
            break stale;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let redis_wrong = redis_stale.len();
    if redis_wrong > 0 {
        eprintln!("stale in Redis: {redis_stale:#?}");
    }
    println!(
        "chaos: {} events acked, {} faults ({} kill -9, {} cuts/stalls), {lost} lost, {duplicated} duplicated, \
         {wrong} wrong values, {never_sent} never sent, {redis_wrong} stale in Redis, max MySQL connections {}",
        acked.len(),
        kills.load(Ordering::Relaxed) + cuts.load(Ordering::Relaxed),
        kills.load(Ordering::Relaxed),
        cuts.load(Ordering::Relaxed),
        mysql_proxy.max_open()
    );
    assert_eq!((lost, duplicated, wrong, never_sent, redis_wrong), (0, 0, 0, 0, 0), "{}", agent.log());
    // pool_size 4, per agent process: right after a kill -9 the dead agent's connections may linger in the
    // proxy for a poll (50 ms) beside the restarted agent's.
    assert!(mysql_proxy.max_open() <= 8, "MySQL connections reached {}", mysql_proxy.max_open());
    assert!(kills.load(Ordering::Relaxed) >= 3);
}
