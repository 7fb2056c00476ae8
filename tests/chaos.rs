//! Chaos: 300 profiles x 3 scripts stream trades and metrics over their own connections while a fault
//! schedule runs: `kill -9` of the agent (restarted each time), the MySQL and Redis connections cut and
//! stalled through fault proxies, Redis "restarted" (unreachable, then back empty), MySQL held down until the
//! WAL reaches its cap (clients must get `wal_full`), SIGTERM under full load, and in the long run a real
//! MariaDB restart. Then the clients' own record of acks is checked against MySQL and Redis: every acked
//! event exactly once with its exact values, no row nobody sent, the newest value per (profile, metric) and
//! the newest trade per profile in Redis, connections within their bounds. One summary line says it all.
//!
//! The short run (about a minute) is part of the default suite. The long one:
//! `CHAOS_LONG=1 cargo test --release -p telemetry-agent --test e2e chaos:: -- --nocapture` (5 minutes, at
//! least 20 kills; `CHAOS_RESTART_MARIADB=1` adds real MariaDB restarts: it stops and starts the server, so run
//! it alone, as this command does). `CHAOS_SECS` and `CHAOS_PROFILES` override the length and width.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::kit::agent::Agent;
use crate::kit::client::Client;
use crate::kit::db::TestDb;
use crate::kit::proxy::FaultProxy;
use crate::kit::redis::TestRedis;
use crate::kit::serial::alone;
use crate::kit::util::raise_fd_limit;

const BASE_TS_MS: i64 = 1_795_000_000_000;
const SCRIPTS_PER_PROFILE: usize = 3;

struct Plan {
    secs: u64,
    profiles: usize,
    /// Between two kills, in ms.
    kill_every: (u64, u64),
    /// Each script waits this long between events (ms), so that the load is steady rather than a flood.
    pace_ms: u64,
    restart_mariadb: bool,
}

impl Plan {
    fn from_env() -> Plan {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let long = std::env::var_os("CHAOS_LONG").is_some();
        Plan {
            secs: var("CHAOS_SECS").unwrap_or(if long { 300 } else { 30 }),
            profiles: var("CHAOS_PROFILES").map_or(300, |p| p as usize),
            kill_every: if long { (5_000, 12_000) } else { (2_000, 5_000) },
            pace_ms: var("CHAOS_PACE_MS").unwrap_or(if long { 50 } else { 150 }),
            restart_mariadb: long && std::env::var_os("CHAOS_RESTART_MARIADB").is_some(),
        }
    }
}

/// What a script sent, as it will check it.
#[derive(Clone, Debug, PartialEq)]
enum Sent {
    Metric { profile: String, name: String, value: i64, ts_ms: i64 },
    Trade { profile: String, symbol: String, quantity: f64, price: f64, closed_at_ms: i64 },
}

impl Sent {
    fn line(&self, event_id: Option<&str>) -> String {
        let id = event_id.map(|id| format!(r#","event_id":"{id}""#)).unwrap_or_default();
        match self {
            Sent::Metric { profile, name, value, ts_ms } => format!(
                r#"{{"kind":"metric","profile_id":"{profile}","name":"{name}","value":{value},"ts":{ts_ms}{id}}}"#
            ),
            Sent::Trade { profile, symbol, quantity, price, closed_at_ms } => format!(
                r#"{{"kind":"trade","profile_id":"{profile}","symbol":"{symbol}","side":"sell","quantity":"{quantity:.8}","price":"{price:.2}","closed_at":{closed_at_ms}{id}}}"#
            ),
        }
    }
}

/// The clients' shared record.
#[derive(Default)]
struct Ledger {
    /// Effective event id -> event, for every ack received.
    acked: HashMap<String, Sent>,
    /// Events sent with their own id (acked or not).
    sent_with_id: HashMap<String, Sent>,
    /// Events without an id whose answer was lost with the connection: stored at most once, or not at all.
    unanswered: Vec<Sent>,
    /// The event each WAL seq was acked for: two events acked with one seq means a seq was handed out twice.
    acked_seqs: HashMap<u64, String>,
    reused_seqs: Vec<(u64, String, String)>,
}

#[derive(Default)]
struct Counters {
    wal_full: AtomicU64,
    shutting_down: AtomicU64,
    overloaded: AtomicU64,
    resent: AtomicU64,
    kills: AtomicU64,
    cuts: AtomicU64,
    sigterms: AtomicU64,
    redis_restarts: AtomicU64,
    mariadb_restarts: AtomicU64,
}

/// One script: kind 0 sends trades with its own event ids, kind 1 metrics with its own ids (both resend
/// after a broken connection until acked), kind 2 metrics without ids (it never resends once a line may have
/// been stored: the agent would store it twice).
fn script(
    profile: usize,
    kind: usize,
    socket: &Path,
    plan: &Plan,
    stop: &AtomicBool,
    ledger: &Mutex<Ledger>,
    counters: &Counters,
) {
    let profile_id = format!("p{profile:03}");
    let mut conn: Option<Client> = None;
    let mut i: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let sent = match kind {
            0 => Sent::Trade {
                profile: profile_id.clone(),
                symbol: format!("S{}", i % 5),
                quantity: (i + 1) as f64 / 1e8,
                price: 43_000.0 + (i % 100) as f64 / 100.0,
                closed_at_ms: BASE_TS_MS + i * 10,
            },
            _ => Sent::Metric {
                profile: profile_id.clone(),
                name: format!("m{}", i % 4),
                value: i,
                ts_ms: BASE_TS_MS + i * 10 + kind as i64,
            },
        };
        let own_id = (kind < 2).then(|| format!("{}{profile}-{i}", if kind == 0 { "t" } else { "m" }));
        if let Some(id) = &own_id {
            ledger.lock().unwrap().sent_with_id.insert(id.clone(), sent.clone());
        }
        let line = sent.line(own_id.as_deref());
        let mut attempts = 0;
        loop {
            if stop.load(Ordering::Relaxed) {
                if own_id.is_none() && attempts > 0 {
                    ledger.lock().unwrap().unanswered.push(sent.clone());
                }
                return;
            }
            let Some(c) = conn.as_mut() else {
                conn = Client::try_connect(socket).ok();
                if conn.is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            };
            attempts += 1;
            let Some(answer) = c.try_request(&line) else {
                conn = None;
                if own_id.is_none() {
                    // Maybe stored, maybe not: without an id, a resend could store it twice.
                    ledger.lock().unwrap().unanswered.push(sent.clone());
                    break;
                }
                counters.resent.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if answer["ok"] == true {
                let id = answer["event_id"].as_str().expect("an ack carries its event id").to_string();
                let seq = answer["seq"].as_u64().expect("an ack carries its seq");
                let mut ledger = ledger.lock().unwrap();
                if let Some(before) = ledger.acked_seqs.insert(seq, id.clone()) {
                    if before != id {
                        eprintln!("chaos: seq {seq} acked for {before} and again for {id}");
                        ledger.reused_seqs.push((seq, before, id.clone()));
                    }
                }
                ledger.acked.insert(id, sent.clone());
                break;
            }
            // Not stored: retry shortly.
            let counter = match answer["error"]["code"].as_str().or(answer["code"].as_str()) {
                Some("wal_full") => &counters.wal_full,
                Some("shutting_down") => &counters.shutting_down,
                Some("overloaded") => &counters.overloaded,
                other => panic!("unexpected answer {answer} ({other:?}) to {line}"),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(plan.pace_ms / 2 + fastrand::u64(..plan.pace_ms.max(1))));
    }
}

#[test]
fn acked_events_reach_mysql_exactly_once_and_redis_stays_newest_under_every_fault() {
    // 900 connections and both cores: the fault schedule's timing (the WAL must fill up within 30 s with MySQL
    // away) needs the machine to itself, and so do other tests' timings.
    let _alone = alone();
    let plan = Plan::from_env();
    // Two descriptors per script connection.
    let limit = raise_fd_limit();
    assert!(limit as usize > plan.profiles * SCRIPTS_PER_PROFILE * 2 + 256, "open-file limit {limit} too low");
    let db = TestDb::migrated();
    let redis = TestRedis::new();
    let mysql_proxy = FaultProxy::start(TestDb::server_addr());
    let redis_proxy = FaultProxy::start(redis.addr());
    let mut agent = Agent::configure(&format!(
        "[wal]\nmax_bytes = {}\n[mysql]\nurl = {:?}\npool_size = 4\nmax_linger_ms = 20\nretry_initial_ms = 20\n\
         retry_max_ms = 500\nwrite_timeout_ms = 3000\n{}retry_max_ms = 500\nresponse_timeout_ms = 500\n",
        16 << 20,
        db.url_via(mysql_proxy.port),
        redis.section(&redis.url_via(redis_proxy.port))
    ));
    if let Ok(filter) = std::env::var("CHAOS_RUST_LOG") {
        agent.env.push(("RUST_LOG".into(), filter));
    }
    agent.restart();
    let socket = agent.socket.clone();
    let stop = AtomicBool::new(false);
    let ledger = Mutex::new(Ledger::default());
    let counters = Counters::default();
    let started = Instant::now();

    std::thread::scope(|scope| {
        for profile in 0..plan.profiles {
            for kind in 0..SCRIPTS_PER_PROFILE {
                let (socket, plan, stop, ledger, counters) = (&socket, &plan, &stop, &ledger, &counters);
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || script(profile, kind, socket, plan, stop, ledger, counters))
                    .expect("spawn a script thread");
            }
        }
        run_faults(&plan, &mut agent, &db, &redis, &mysql_proxy, &redis_proxy, &ledger, &counters, started);
        mysql_proxy.set_stalled(false);
        redis_proxy.set_stalled(false);
        stop.store(true, Ordering::Relaxed);
    });

    let ledger = ledger.into_inner().unwrap();
    let report = check(&db, &redis, &ledger, &mut agent);
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let faults = c(&counters.kills)
        + c(&counters.cuts)
        + c(&counters.sigterms)
        + c(&counters.redis_restarts)
        + c(&counters.mariadb_restarts);
    println!(
        "chaos: {} events acked by {} scripts in {} s; {faults} faults ({} kill -9, {} SIGTERM, {} MySQL/Redis cuts \
         and stalls, {} Redis restarts, {} MariaDB restarts); answers: {} wal_full, {} shutting_down, {} overloaded; \
         {} resends; {} lost, {} duplicated, {} wrong values, {} never sent, {} stale in Redis; max connections: \
         MySQL {}, Redis {}",
        ledger.acked.len(),
        plan.profiles * SCRIPTS_PER_PROFILE,
        plan.secs,
        c(&counters.kills),
        c(&counters.sigterms),
        c(&counters.cuts),
        c(&counters.redis_restarts),
        c(&counters.mariadb_restarts),
        c(&counters.wal_full),
        c(&counters.shutting_down),
        c(&counters.overloaded),
        c(&counters.resent),
        report.lost,
        report.duplicated,
        report.wrong,
        report.never_sent,
        report.stale_in_redis,
        mysql_proxy.max_open(),
        redis_proxy.max_open(),
    );
    assert!(ledger.reused_seqs.is_empty(), "seqs handed out twice: {:?}", ledger.reused_seqs);
    assert_eq!(
        (report.lost, report.duplicated, report.wrong, report.never_sent, report.stale_in_redis),
        (0, 0, 0, 0, 0),
        "{}",
        report.detail
    );
    // Per agent process: 4 pooled MySQL connections, 1 Redis connection. Right after a kill the dead
    // agent's connections may linger in the proxy for a poll (50 ms) beside the restarted agent's.
    assert!(mysql_proxy.max_open() <= 8, "MySQL connections reached {}", mysql_proxy.max_open());
    assert!(redis_proxy.max_open() <= 2, "Redis connections reached {}", redis_proxy.max_open());
    assert!(c(&counters.wal_full) > 0, "the WAL never reached its cap: the wal_full phase proved nothing");
    assert!(c(&counters.kills) >= if plan.secs >= 300 { 20 } else { 3 }, "too few kills");
}

/// The fault schedule, until `plan.secs` have passed.
#[allow(clippy::too_many_arguments)]
fn run_faults(
    plan: &Plan,
    agent: &mut Agent,
    db: &TestDb,
    redis: &TestRedis,
    mysql_proxy: &FaultProxy,
    redis_proxy: &FaultProxy,
    ledger: &Mutex<Ledger>,
    counters: &Counters,
    started: Instant,
) {
    let total = Duration::from_secs(plan.secs);
    let next_kill = |from: Instant| from + Duration::from_millis(fastrand::u64(plan.kill_every.0..plan.kill_every.1));
    let mut kill_at = next_kill(Instant::now());
    // Once per cycle (the short run has one): Redis restart, WAL full, SIGTERM, MariaDB restart (long run).
    let cycle = Duration::from_secs(60).min(total);
    let mut cycle_start = started;
    let mut done: HashSet<&str> = HashSet::new();
    while started.elapsed() < total {
        std::thread::sleep(Duration::from_millis(300 + fastrand::u64(..600)));
        if cycle_start.elapsed() >= cycle {
            cycle_start = Instant::now();
            done.clear();
        }
        let phase = cycle_start.elapsed().as_secs_f64() / cycle.as_secs_f64();
        if phase > 0.3 && done.insert("redis restart") {
            // Redis goes away and comes back empty (our keys only): the mirror's full push restores it.
            redis_proxy.set_down(true);
            std::thread::sleep(Duration::from_millis(800));
            redis.delete_all();
            redis_proxy.set_down(false);
            counters.redis_restarts.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if phase > 0.45 && done.insert("wal full") {
            // MySQL away until the WAL reaches its cap and clients hear `wal_full`.
            let before = counters.wal_full.load(Ordering::Relaxed);
            let down_since = Instant::now();
            mysql_proxy.set_down(true);
            let deadline = Instant::now() + Duration::from_secs(30);
            while counters.wal_full.load(Ordering::Relaxed) == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(500));
            mysql_proxy.set_down(false);
            counters.cuts.fetch_add(1, Ordering::Relaxed);
            eprintln!("chaos: MySQL was down {:.1} s until the WAL was full", down_since.elapsed().as_secs_f64());
            continue;
        }
        if phase > 0.7 && done.insert("sigterm") {
            agent.signal(nix::sys::signal::Signal::SIGTERM);
            let status = agent.wait();
            assert!(status.success(), "SIGTERM under load did not stop cleanly: {status:?}\n{}", agent.log());
            agent.restart();
            counters.sigterms.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if plan.restart_mariadb && phase > 0.55 && done.insert("mariadb") {
            restart_mariadb();
            counters.mariadb_restarts.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match fastrand::u8(..4) {
            0 => mysql_proxy.cut(),
            1 => redis_proxy.cut(),
            2 => mysql_proxy.set_stalled(fastrand::bool()),
            _ => redis_proxy.set_stalled(fastrand::bool()),
        }
        counters.cuts.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= kill_at {
            agent.kill9();
            counters.kills.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(fastrand::u64(..300)));
            agent.restart();
            kill_at = next_kill(Instant::now());
        }
        if started.elapsed().as_millis() % 10_000 < 900 {
            eprintln!("chaos: {:>4} s, {} acked", started.elapsed().as_secs(), ledger.lock().unwrap().acked.len());
        }
    }
    let _ = db;
}

/// Stops MariaDB (a real server restart) and starts it again the way scripts/services.sh does.
fn restart_mariadb() {
    let run = |script: &str| {
        let status = std::process::Command::new("bash").args(["-c", script]).status().expect("run bash");
        assert!(status.success(), "`{script}` failed");
    };
    // Through the socket as root: works where root may not log in over TCP (Debian's default) too.
    run("mysqladmin -uroot shutdown");
    std::thread::sleep(Duration::from_secs(2));
    run("install -d -o mysql -g mysql /run/mysqld && start-stop-daemon --start --oknodo --background \
         --exec /usr/sbin/mariadbd -- --user=mysql && for i in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && exit 0; sleep 0.5; done; exit 1");
}

struct Report {
    lost: usize,
    duplicated: usize,
    wrong: usize,
    never_sent: usize,
    stale_in_redis: usize,
    detail: String,
}

fn check(db: &TestDb, redis: &TestRedis, ledger: &Ledger, agent: &mut Agent) -> Report {
    // Everything acked reaches MySQL.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (metrics, trades) = loop {
        let metrics: Vec<(String, String, String, f64, i64)> = db.query(
            "SELECT event_id, profile_id, name, value, CAST(UNIX_TIMESTAMP(ts) * 1000 AS SIGNED) FROM dd_metrics",
        );
        let trades: Vec<(String, String, String, f64, f64)> =
            db.query("SELECT event_id, profile_id, symbol, CAST(quantity AS DOUBLE), CAST(price AS DOUBLE) FROM dd_trade_performance");
        let stored: HashSet<&str> =
            metrics.iter().map(|r| r.0.as_str()).chain(trades.iter().map(|r| r.0.as_str())).collect();
        if ledger.acked.keys().all(|id| stored.contains(id.as_str())) || Instant::now() > deadline {
            break (metrics, trades);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut detail = String::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut unanswered: Vec<Option<&Sent>> = ledger.unanswered.iter().map(Some).collect();
    let (mut duplicated, mut wrong, mut never_sent) = (0, 0, 0);
    let rows = metrics
        .iter()
        .map(|(id, profile, name, value, ts_ms)| {
            (id, Sent::Metric { profile: profile.clone(), name: name.clone(), value: *value as i64, ts_ms: *ts_ms })
        })
        .chain(trades.iter().map(|(id, profile, symbol, quantity, price)| {
            (
                id,
                Sent::Trade {
                    profile: profile.clone(),
                    symbol: symbol.clone(),
                    quantity: *quantity,
                    price: *price,
                    closed_at_ms: 0,
                },
            )
        }));
    for (id, row) in rows {
        duplicated += usize::from(!seen.insert(id.clone()));
        let expected = ledger.acked.get(id).or_else(|| ledger.sent_with_id.get(id));
        match expected {
            Some(sent) if same(sent, &row) => {}
            Some(sent) => {
                wrong += 1;
                detail += &format!("row {id} holds {row:?}, sent {sent:?}\n");
            }
            // A row not acked and not sent with an id: an unanswered event without id, each at most once.
            None => match unanswered.iter_mut().find(|u| u.is_some_and(|u| same(u, &row))) {
                Some(slot) => *slot = None,
                None => {
                    never_sent += 1;
                    detail += &format!("row {id} {row:?} matches nothing sent\n");
                }
            },
        }
    }
    let missing: Vec<&String> = ledger.acked.keys().filter(|id| !seen.contains(*id)).collect();
    if !missing.is_empty() {
        detail += &format!(
            "{} acked events missing from MySQL, e.g. {:?}\n",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }

    // Redis: per (profile, metric) the newest acked value or a newer one sent whose answer was lost; per
    // profile the newest trade likewise.
    let stale = redis_stale(redis, ledger);
    let stale_in_redis = stale.len();
    if stale_in_redis > 0 {
        detail += &format!("stale in Redis: {stale:#?}\n");
    }
    if !detail.is_empty() {
        detail += &agent.log();
    }
    assert!(agent.stop().success(), "the agent did not stop cleanly at the end\n{}", agent.log());
    Report { lost: missing.len(), duplicated, wrong, never_sent, stale_in_redis, detail }
}

/// A stored row against what was sent (trades: the columns MySQL keeps exactly).
fn same(sent: &Sent, row: &Sent) -> bool {
    match (sent, row) {
        (
            Sent::Trade { profile, symbol, quantity, price, .. },
            Sent::Trade { profile: p, symbol: s, quantity: q, price: pr, .. },
        ) => profile == p && symbol == s && (quantity - q).abs() < 1e-9 && (price - pr).abs() < 1e-6,
        (a, b) => a == b,
    }
}

fn redis_stale(redis: &TestRedis, ledger: &Ledger) -> Vec<String> {
    let mut newest_metric: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut newest_trade: BTreeMap<String, i64> = BTreeMap::new();
    for sent in ledger.acked.values() {
        match sent {
            Sent::Metric { profile, name, ts_ms, .. } => {
                let kept = newest_metric.entry((profile.clone(), name.clone())).or_insert(*ts_ms);
                *kept = (*kept).max(*ts_ms);
            }
            Sent::Trade { profile, closed_at_ms, .. } => {
                let kept = newest_trade.entry(profile.clone()).or_insert(*closed_at_ms);
                *kept = (*kept).max(*closed_at_ms);
            }
        }
    }
    let everything_sent: Vec<&Sent> =
        ledger.acked.values().chain(ledger.sent_with_id.values()).chain(ledger.unanswered.iter()).collect();
    let sent_metrics: HashSet<(String, String, String, String)> = everything_sent
        .iter()
        .filter_map(|s| match s {
            Sent::Metric { profile, name, value, ts_ms } => {
                Some((profile.clone(), name.clone(), value.to_string(), ts_ms.to_string()))
            }
            Sent::Trade { .. } => None,
        })
        .collect();
    let trade_times: HashMap<String, i64> = ledger
        .sent_with_id
        .iter()
        .filter_map(|(id, s)| match s {
            Sent::Trade { closed_at_ms, .. } => Some((id.clone(), *closed_at_ms)),
            Sent::Metric { .. } => None,
        })
        .collect();
    let check = || -> Vec<String> {
        let mut stale = Vec::new();
        let profiles: HashSet<&String> = newest_metric.keys().map(|(p, _)| p).chain(newest_trade.keys()).collect();
        for profile in profiles {
            let values = redis.hash(&format!("{profile}:metrics"));
            let times = redis.hash(&format!("{profile}:metrics_ts"));
            for ((p, name), newest) in newest_metric.range((profile.clone(), String::new())..) {
                if p != profile {
                    break;
                }
                let (value, ts) =
                    (values.get(name).cloned().unwrap_or_default(), times.get(name).cloned().unwrap_or_default());
                let ok = ts.parse::<i64>().is_ok_and(|ts| ts >= *newest)
                    && sent_metrics.contains(&(profile.clone(), name.clone(), value.clone(), ts.clone()));
                if !ok {
                    stale.push(format!("{profile}/{name}: Redis has {value:?} at {ts:?}, newest acked at {newest}"));
                }
            }
            if let Some(newest) = newest_trade.get(profile) {
                let last: Option<String> =
                    redis.query(redis::cmd("GET").arg(format!("{}:{profile}:last_trade", redis.prefix)));
                let last_id = last
                    .as_deref()
                    .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
                    .and_then(|v| v["event_id"].as_str().map(str::to_string));
                let ok = last_id.as_ref().and_then(|id| trade_times.get(id)).is_some_and(|at| at >= newest);
                if !ok {
                    stale.push(format!("{profile}: last_trade {last:?}, newest acked trade at {newest}"));
                }
            }
        }
        stale
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stale = check();
        if stale.is_empty() || Instant::now() > deadline {
            return stale;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
