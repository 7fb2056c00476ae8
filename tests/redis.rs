//! The Redis mirror against a real Redis: the newest value wins whatever the order of arrival, through
//! connection cuts, an outage longer than the WAL keeps records, and a MySQL outage.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::kit::agent::Agent;
use crate::kit::db::TestDb;
use crate::kit::proxy::FaultProxy;
use crate::kit::redis::TestRedis;

/// What Redis must hold once the mirror has caught up.
#[derive(Default)]
struct Expected {
    /// (profile, metric) -> (ts in ms, value)
    metrics: BTreeMap<(String, String), (i64, f64)>,
    /// profile -> (closed_at in ms, symbol)
    trades: BTreeMap<String, (i64, String)>,
}

impl Expected {
    /// `per_key` metric events for every (profile, metric) and `per_key` trades for every profile, each with
    /// its own timestamp from `base_ms` on, in shuffled order.
    fn stream(&mut self, profiles: usize, names: usize, per_key: i64, base_ms: i64) -> Vec<String> {
        let mut lines = Vec::new();
        for p in 0..profiles {
            let profile = format!("p{p}");
            for n in 0..names {
                let name = format!("m{n}");
                for k in 0..per_key {
                    let (ts, value) = (base_ms + k, (base_ms + k) as f64 / 4.0 - 1000.0);
                    lines.push(format!(
                        r#"{{"kind":"metric","profile_id":"{profile}","name":"{name}","value":{value},"ts":{ts}}}"#
                    ));
                    self.note_metric(&profile, &name, ts, value);
                }
            }
            for k in 0..per_key {
                let (closed_at, symbol) = (base_ms + k, format!("S{k}"));
                lines.push(format!(
                    r#"{{"kind":"trade","profile_id":"{profile}","symbol":"{symbol}","side":"buy","quantity":1,"price":"2.5","closed_at":{closed_at}}}"#
                ));
                let kept = self.trades.entry(profile.clone()).or_insert((closed_at, symbol.clone()));
                if closed_at > kept.0 {
                    *kept = (closed_at, symbol);
                }
            }
        }
        fastrand::shuffle(&mut lines);
        lines
    }

    fn note_metric(&mut self, profile: &str, name: &str, ts: i64, value: f64) {
        let kept = self.metrics.entry((profile.to_string(), name.to_string())).or_insert((ts, value));
        if ts > kept.0 {
            *kept = (ts, value);
        }
    }

    /// What differs between Redis and the expectation (empty when they agree).
    fn differences(&self, redis: &TestRedis) -> Vec<String> {
        let mut out = Vec::new();
        let profiles: BTreeSet<&String> = self.metrics.keys().map(|(p, _)| p).chain(self.trades.keys()).collect();
        let stored: BTreeSet<String> = redis.query(redis::cmd("SMEMBERS").arg(format!("{}:profiles", redis.prefix)));
        if stored.iter().collect::<BTreeSet<_>>() != profiles {
            out.push(format!("profiles set holds {stored:?}"));
        }
        for profile in profiles {
            let (values, stamps) =
                (redis.hash(&format!("{profile}:metrics")), redis.hash(&format!("{profile}:metrics_ts")));
            for ((_, name), (ts, value)) in self.metrics.iter().filter(|((p, _), _)| p == profile) {
                let got = (values.get(name).cloned(), stamps.get(name).cloned());
                let want = (Some(value.to_string()), Some(ts.to_string()));
                if got != want {
                    out.push(format!("{profile} {name}: {got:?}, expected {want:?}"));
                }
            }
            if let Some((closed_at, symbol)) = self.trades.get(profile) {
                let stored = redis.get(&format!("{profile}:last_trade"));
                let trade: serde_json::Value =
                    stored.as_deref().map(|s| serde_json::from_str(s).unwrap()).unwrap_or_default();
                let want_closed = rfc3339_ms(*closed_at);
                if trade["symbol"] != symbol.as_str() || trade["closed_at"] != want_closed.as_str() {
                    out.push(format!("{profile} last_trade {stored:?}, expected {symbol} at {want_closed}"));
                }
            }
        }
        out
    }

    /// Waits until Redis agrees; panics with the differences after `secs`.
    fn wait_for(&self, redis: &TestRedis, secs: u64, agent: &Agent) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let differences = self.differences(redis);
            if differences.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "Redis did not converge within {secs} s; {} differences, first: {:?}\nagent log:\n{}",
                    differences.len(),
                    &differences[..differences.len().min(5)],
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn rfc3339_ms(ms: i64) -> String {
    telemetry_agent::event::rfc3339_us(ms * 1000)
}

/// Sends `lines` over `clients` connections at once, each with `Client::send_all` (every line acked).
fn send_all_over(agent: &Agent, lines: &[String], clients: usize) {
    std::thread::scope(|scope| {
        for part in lines.chunks(lines.len().div_ceil(clients).max(1)) {
            let mut client = agent.connect();
            scope.spawn(move || client.send_all(part));
        }
    });
}

/// Waits (up to 15 s: closed connections take a moment to leave `CLIENT LIST`) for exactly one connection.
fn wait_for_one_connection(redis: &TestRedis, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis.clients_named(name) != 1 {
        assert!(Instant::now() < deadline, "the agent holds {} Redis connections, not 1", redis.clients_named(name));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn unique_agent_id() -> String {
    format!("rt-{}-{}", std::process::id(), fastrand::u32(..))
}

#[test]
fn redis_holds_the_newest_value_per_key_whatever_the_order_of_arrival() {
    let redis = TestRedis::new();
    let agent = Agent::start(&redis.section(&redis.url));
    // Something (a replay, another writer) already put a newer value in Redis: it must stay.
    let future_ts = 4_000_000_000_000i64;
    redis.query::<()>(redis::cmd("HSET").arg(format!("{}:p0:metrics", redis.prefix)).arg("m0").arg("42"));
    redis.query::<()>(redis::cmd("HSET").arg(format!("{}:p0:metrics_ts", redis.prefix)).arg("m0").arg(future_ts));

    let mut expected = Expected::default();
    let lines = expected.stream(20, 5, 20, 1_795_000_000_000);
    let streamed = expected.metrics.insert(("p0".into(), "m0".into()), (future_ts, 42.0)).unwrap();
    send_all_over(&agent, &lines, 4);
    expected.wait_for(&redis, 20, &agent);

    // A late event, older than what Redis shows, changes nothing.
    let mut client = agent.connect();
    let late = r#"{"kind":"metric","profile_id":"p1","name":"m1","value":-5,"ts":1000}"#;
    assert_eq!(client.request(late)["ok"], true);
    let late_trade =
        r#"{"kind":"trade","profile_id":"p1","symbol":"OLD","side":"sell","quantity":1,"price":1,"closed_at":1000}"#;
    assert_eq!(client.request(late_trade)["ok"], true);
    std::thread::sleep(Duration::from_millis(500));
    assert!(expected.differences(&redis).is_empty(), "{:?}", expected.differences(&redis));

    // Redis forgot the script (a restart does that): the mirror loads it again and goes on.
    redis.query::<()>(redis::cmd("SCRIPT").arg("FLUSH"));
    let newer = r#"{"kind":"metric","profile_id":"p1","name":"m1","value":7,"ts":1796000000000}"#;
    assert_eq!(client.request(newer)["ok"], true);
    expected.note_metric("p1", "m1", 1_796_000_000_000, 7.0);
    expected.wait_for(&redis, 10, &agent);
    assert!(agent.log().contains("loading it again"), "{}", agent.log());
    assert!(!agent.log().contains("ERROR"), "{}", agent.log());

    // Keys lost while the connection stayed up (a FLUSHDB, say): `wal replay --sink redis` restores them.
    redis.query::<()>(redis::cmd("DEL").arg(redis.keys()));
    // (The value someone else wrote is gone with them; the mirror restores its own.)
    expected.metrics.insert(("p0".into(), "m0".into()), streamed);
    let replay = agent.command(&["wal", "replay", "--sink", "redis"], "");
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    expected.wait_for(&redis, 10, &agent);
}

#[test]
fn connection_cuts_during_a_stream_converge_with_one_connection_at_a_time() {
    let redis = TestRedis::new();
    let proxy = FaultProxy::start(redis.addr());
    let agent_id = unique_agent_id();
    let agent = Agent::start(&format!("[agent]\nid = {agent_id:?}\n{}", redis.section(&redis.url_via(proxy.port))));
    let name = format!("telemetry-agent:{agent_id}");

    let mut expected = Expected::default();
    let batches: Vec<Vec<String>> = (0..10).map(|i| expected.stream(10, 4, 10, 1_795_000_000_000 + i * 1000)).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (samples, crowded, most) = std::thread::scope(|scope| {
        // A cut connection takes a moment to leave `CLIENT LIST` (the proxy closes it within 50 ms), so a
        // sample may rarely see it beside its successor; a connection per push would show everywhere.
        let sampler = scope.spawn(|| {
            let (mut samples, mut crowded, mut most) = (0, 0, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let n = redis.clients_named(&name);
                samples += 1;
                crowded += usize::from(n > 1);
                most = most.max(n);
                std::thread::sleep(Duration::from_millis(10));
            }
            (samples, crowded, most)
        });
        let cutter = scope.spawn(|| {
            let mut cuts = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100 + fastrand::u64(..150)));
                proxy.cut();
                cuts += 1;
            }
            cuts
        });
        for batch in &batches {
            send_all_over(&agent, batch, 3);
            std::thread::sleep(Duration::from_millis(200));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let cuts = cutter.join().unwrap();
        assert!(cuts >= 5, "only {cuts} cuts happened");
        sampler.join().unwrap()
    });
    expected.wait_for(&redis, 30, &agent);
    assert!(proxy.accepted() >= 5, "the mirror reconnected only {} times", proxy.accepted());
    assert!(
        most <= 2 && crowded * 20 <= samples,
        "the agent held more than one Redis connection in {crowded} of {samples} samples (at most {most})"
    );
    // The last cut may have hit an idle connection: the mirror's idle check replaces it within seconds.
    wait_for_one_connection(&redis, &name);
    agent.wait_for_log("Redis available again", 10);
    assert!(agent.log().contains("Redis unreachable"), "{}", agent.log());
}

#[test]
fn an_outage_longer_than_the_wal_keeps_records_still_converges() {
    let redis = TestRedis::new();
    let proxy = FaultProxy::start(redis.addr());
    proxy.set_down(true);
    let mut agent = Agent::start(&redis.section(&redis.url_via(proxy.port)));
    let mut expected = Expected::default();
    let lines = expected.stream(10, 5, 10, 1_795_000_000_000);
    send_all_over(&agent, &lines, 2);
    // The WAL truncates once a second behind the fold, whatever Redis does.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(agent.stop().success(), "{}", agent.log());
    assert_eq!(agent.wal_events().len(), 0, "the WAL still holds records: nothing was truncated");
    assert!(redis.keys().is_empty(), "nothing can have reached Redis: {:?}", redis.keys());

    // Back with Redis reachable: the mirror's table alone brings it up to date.
    proxy.set_down(false);
    agent.restart();
    expected.wait_for(&redis, 20, &agent);

    // The same without a restart: newer events during a second outage, truncated meanwhile.
    proxy.set_down(true);
    let mut client = agent.connect();
    for (ts, value) in [(1_796_000_000_002i64, 3.0), (1_796_000_000_001, 2.0)] {
        let line = format!(r#"{{"kind":"metric","profile_id":"p3","name":"m3","value":{value},"ts":{ts}}}"#);
        assert_eq!(client.request(&line)["ok"], true);
        expected.note_metric("p3", "m3", ts, value);
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!expected.differences(&redis).is_empty(), "Redis changed while it was unreachable");
    proxy.set_down(false);
    expected.wait_for(&redis, 20, &agent);

    // Redis restarted empty: after the reconnect the mirror writes everything again.
    let keys = redis.keys();
    redis.query::<()>(redis::cmd("DEL").arg(keys));
    proxy.cut();
    expected.wait_for(&redis, 20, &agent);
}

#[test]
fn a_mysql_outage_does_not_stop_redis_updates() {
    let redis = TestRedis::new();
    let db = TestDb::migrated();
    let mysql_proxy = FaultProxy::start(TestDb::server_addr());
    mysql_proxy.set_down(true);
    let agent = Agent::start(&format!(
        "[mysql]\nurl = {:?}\nretry_max_ms = 200\n{}",
        db.url_via(mysql_proxy.port),
        redis.section(&redis.url)
    ));
    let mut expected = Expected::default();
    let lines = expected.stream(5, 4, 10, 1_795_000_000_000);
    send_all_over(&agent, &lines, 2);
    expected.wait_for(&redis, 20, &agent);
    assert_eq!(db.count("dd_metrics"), 0);

    mysql_proxy.set_down(false);
    db.wait_for_rows("dd_metrics", 200, 60);
    db.wait_for_rows("dd_trade_performance", 50, 10);
}

#[test]
fn a_stalled_connection_is_replaced_and_nothing_is_lost() {
    let redis = TestRedis::new();
    let proxy = FaultProxy::start(redis.addr());
    let agent_id = unique_agent_id();
    let agent = Agent::start(&format!(
        "[agent]\nid = {agent_id:?}\n{}response_timeout_ms = 300\nconnect_timeout_ms = 300\nretry_max_ms = 500\n",
        redis.section(&redis.url_via(proxy.port))
    ));
    let mut expected = Expected::default();
    let first = expected.stream(5, 3, 5, 1_795_000_000_000);
    send_all_over(&agent, &first, 1);
    expected.wait_for(&redis, 20, &agent);

    // Redis stops answering (the connection stays open): pushes time out; the mirror keeps retrying.
    proxy.set_stalled(true);
    let second = expected.stream(5, 3, 5, 1_795_000_001_000);
    send_all_over(&agent, &second, 1);
    std::thread::sleep(Duration::from_secs(2));
    proxy.set_stalled(false);
    expected.wait_for(&redis, 20, &agent);
    agent.wait_for_log("Redis available again", 10);
    assert!(agent.log().contains("timed out"), "{}", agent.log());
    wait_for_one_connection(&redis, &format!("telemetry-agent:{agent_id}"));
}

/// Runs the mirror's script directly for one metric and returns what Redis then holds for it.
fn run_script(redis: &TestRedis, value: &str, ts_ms: i64, order: &str) -> (String, String) {
    let prefix = &redis.prefix;
    let _: i64 = redis.query(
        redis::cmd("EVAL")
            .arg(telemetry_agent::sink::redis::UPDATE_SCRIPT)
            .arg(5)
            .arg(format!("{prefix}:p:metrics"))
            .arg(format!("{prefix}:p:metrics_ts"))
            .arg(format!("{prefix}:profiles"))
            .arg(format!("{prefix}:p:last_trade"))
            .arg(format!("{prefix}:p:order"))
            .arg("")
            .arg("p")
            .arg(1)
            .arg("m")
            .arg(value)
            .arg(ts_ms)
            .arg(order),
    );
    let values = redis.hash("p:metrics");
    let stamps = redis.hash("p:metrics_ts");
    (values["m"].clone(), stamps["m"].clone())
}

#[test]
fn within_one_millisecond_the_script_still_keeps_the_newer_event() {
    let redis = TestRedis::new();
    // Orders are µs timestamp (18 digits) then WAL seq (20 digits).
    let order = |us: u64, seq: u64| format!("{us:018}{seq:020}");
    assert_eq!(run_script(&redis, "2", 1_000, &order(1_000_900, 5)), ("2".into(), "1000".into()));
    // A late push of an older event in the same millisecond (a pipeline on a dropped connection, say).
    assert_eq!(run_script(&redis, "1", 1_000, &order(1_000_100, 4)), ("2".into(), "1000".into()));
    assert_eq!(run_script(&redis, "3", 999, &order(999_999, 9)), ("2".into(), "1000".into()));
    assert_eq!(run_script(&redis, "4", 1_000, &order(1_000_900, 6)), ("4".into(), "1000".into()));
    assert_eq!(run_script(&redis, "5", 1_001, &order(1_001_000, 1)), ("5".into(), "1001".into()));

    // A value someone else wrote (no order) at the same millisecond: ours wins the tie, an older one loses.
    redis.query::<()>(redis::cmd("DEL").arg(format!("{}:p:order", redis.prefix)));
    redis.query::<()>(redis::cmd("HSET").arg(format!("{}:p:metrics", redis.prefix)).arg("m").arg("theirs"));
    assert_eq!(run_script(&redis, "6", 1_000, &order(1_000_000, 1)).0, "theirs");
    assert_eq!(run_script(&redis, "7", 1_001, &order(1_001_000, 1)).0, "7");
}

#[test]
fn a_profile_whose_keys_redis_refuses_does_not_hold_up_the_others() {
    let redis = TestRedis::new();
    // Something else uses the key the mirror needs for p0 as a string.
    redis.query::<()>(redis::cmd("SET").arg(format!("{}:p0:metrics", redis.prefix)).arg("not a hash"));
    let agent = Agent::start(&format!("{}retry_max_ms = 300\n", redis.section(&redis.url)));
    let mut expected = Expected::default();
    let lines = expected.stream(4, 2, 3, 1_795_000_000_000);
    send_all_over(&agent, &lines, 1);
    let others = Expected {
        metrics: expected.metrics.iter().filter(|((p, _), _)| p != "p0").map(|(k, v)| (k.clone(), *v)).collect(),
        trades: expected.trades.iter().filter(|(p, _)| *p != "p0").map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while others.differences(&redis).iter().any(|d| !d.starts_with("profiles set")) {
        assert!(Instant::now() < deadline, "other profiles did not converge: {:?}", others.differences(&redis));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.log().contains("a key of another type") && agent.log().contains("p0"), "{}", agent.log());

    // Once the key is free, p0 follows without a reconnect.
    redis.query::<()>(redis::cmd("DEL").arg(format!("{}:p0:metrics", redis.prefix)));
    expected.wait_for(&redis, 20, &agent);
}

/// Waits until `{prefix}:{profile}:metrics` holds `want` for `name` (`None`: no value).
fn wait_for_metric(redis: &TestRedis, profile: &str, name: &str, want: Option<&str>, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = redis.hash(&format!("{profile}:metrics")).get(name).cloned();
        if got.as_deref() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{profile} {name} is {got:?} in Redis, not {want:?}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mirror_forget_clears_a_stuck_metric_so_that_an_earlier_value_lands() {
    let redis = TestRedis::new();
    let mut agent = Agent::start(&redis.section(&redis.url));
    let now_ms = telemetry_agent::clock::now_us() / 1000;
    let at = |name: &str, value: i64, ts: i64| {
        format!(r#"{{"kind":"metric","profile_id":"p","name":"{name}","value":{value},"ts":{ts}}}"#)
    };
    // A script's clock ran an hour ahead: its values pin both metrics until that hour has passed.
    let mut client = agent.connect();
    for name in ["live", "stopped"] {
        assert_eq!(client.request(&at(name, 1, now_ms + 3_600_000))["ok"], true);
        wait_for_metric(&redis, "p", name, Some("1"), &agent);
        assert_eq!(client.request(&at(name, 2, now_ms))["ok"], true);
    }
    std::thread::sleep(Duration::from_millis(300));
    wait_for_metric(&redis, "p", "live", Some("1"), &agent);

    // Through the running agent: gone from Redis when the command returns; the next value is taken.
    let forget = agent.command(&["mirror", "forget", "--profile", "p", "--metric", "live"], "");
    assert!(forget.status.success(), "{}", String::from_utf8_lossy(&forget.stderr));
    assert_eq!(redis.hash("p:metrics").get("live"), None, "{}", String::from_utf8_lossy(&forget.stderr));
    assert_eq!(redis.hash("p:metrics_ts").get("live"), None);
    assert_eq!(client.request(&at("live", 3, now_ms + 1))["ok"], true);
    wait_for_metric(&redis, "p", "live", Some("3"), &agent);
    assert_eq!(redis.hash("p:metrics").get("stopped").map(String::as_str), Some("1"), "only the named metric");

    // With the agent stopped: the WAL's table forgets it now, Redis when the agent starts again.
    drop(client);
    assert!(agent.stop().success());
    let forget = agent.command(&["mirror", "forget", "--profile", "p", "--metric", "stopped"], "");
    assert!(forget.status.success(), "{}", String::from_utf8_lossy(&forget.stderr));
    agent.restart();
    wait_for_metric(&redis, "p", "stopped", None, &agent);
    assert_eq!(agent.connect().request(&at("stopped", 4, now_ms + 2))["ok"], true);
    wait_for_metric(&redis, "p", "stopped", Some("4"), &agent);
    assert_eq!(redis.hash("p:metrics").get("live").map(String::as_str), Some("3"));

    // A metric the mirror never saw is an error, not a silent success.
    let unknown = agent.command(&["mirror", "forget", "--profile", "p", "--metric", "nope"], "");
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("nope"), "{}", String::from_utf8_lossy(&unknown.stderr));
}
