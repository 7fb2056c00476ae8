//! The LOAD DATA path (`[mysql] bulk`): a batch it takes whole is stored exactly as the INSERT path stores it;
//! a batch it cannot take whole (a duplicate, a value the server would change, a poison row) ends exactly as
//! the INSERT path ends it; a server with `local_infile` OFF gets INSERTs, and the operator is told.

use std::time::Duration;

use telemetry_agent::event::{Event, Metric, Side, Trade};
use telemetry_agent::identity::Identity;
use telemetry_agent::sink::mysql::{write_rows, Bulk, Nodes, WritePath, Written};
use telemetry_wal::Record;

use crate::kit::agent::Agent;
use crate::kit::client::metric;
use crate::kit::db::{mysql_section, TestDb};
use crate::kit::serial::alone;
use crate::kit::util::http_get;

const LOCK_WAIT: Duration = Duration::from_secs(10);

fn identity() -> Identity {
    Identity::new("bulk-agent".into(), vec![(1, "0123456789abcdef".into())])
}

/// Writes `events` (seqs from `first_seq`) in one transaction the way `bulk` says.
fn write(db: &TestDb, bulk: Bulk, first_seq: u64, events: &[Event]) -> Result<Written, mysql_async::Error> {
    let rows: Vec<(Record, Event)> = events
        .iter()
        .enumerate()
        .map(|(i, event)| (Record { seq: first_seq + i as u64, appended_at_ms: 0, payload: Vec::new() }, event.clone()))
        .collect();
    let config = telemetry_agent::config::MysqlConfig { url: db.url(), ..Default::default() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let pool = Nodes::new(&config).unwrap().lease().pool;
        let written = write_rows(&pool, &identity(), &rows, LOCK_WAIT, &WritePath::new(bulk), || 0).await;
        pool.disconnect().await.unwrap();
        written
    })
}

/// Every column of both tables but `id` and `event_id`, by `wal_seq`, as text (NULL as None).
fn stored(db: &TestDb, table: &str, seqs: std::ops::Range<u64>) -> Vec<Vec<Option<String>>> {
    let columns = match table {
        "dd_metrics" => "agent_id, profile_id, name, value, ts, tags, received_at",
        _ => "agent_id, profile_id, symbol, side, quantity, price, pnl, fees, opened_at, closed_at, meta, received_at",
    };
    let n = columns.split(',').count();
    let sql = format!(
        "SELECT {columns} FROM {table} WHERE wal_seq >= {} AND wal_seq < {} ORDER BY wal_seq",
        seqs.start, seqs.end
    );
    let rows: Vec<mysql_async::Row> = db.query(&sql);
    rows.into_iter()
        .map(|row| {
            (0..n)
                .map(|i| match row.as_ref(i) {
                    Some(mysql_async::Value::NULL) | None => None,
                    Some(mysql_async::Value::Double(v)) => Some(format!("{:?}", v.to_bits())),
                    Some(value) => Some(value.as_sql(true)),
                })
                .collect()
        })
        .collect()
}

fn metric_event(id: String, profile: &str, name: &str, value: f64, tags: Option<&str>) -> Event {
    Event::Metric(Metric {
        profile_id: profile.into(),
        name: name.into(),
        value,
        ts_us: 1_795_773_600_123_456,
        tags: tags.map(str::to_string),
        event_id: Some(id),
        received_us: 1_795_773_601_000_001,
    })
}

#[allow(clippy::too_many_arguments)]
fn trade_event(
    id: String,
    quantity: &str,
    price: &str,
    pnl: Option<&str>,
    fees: Option<&str>,
    opened: Option<i64>,
    meta: Option<&str>,
) -> Event {
    Event::Trade(Trade {
        profile_id: "bulk-p".into(),
        symbol: "BTCUSDT".into(),
        side: Side::Sell,
        quantity: quantity.into(),
        price: price.into(),
        pnl: pnl.map(str::to_string),
        fees: fees.map(str::to_string),
        opened_at_us: opened,
        closed_at_us: 1_795_773_600_000_000,
        meta: meta.map(str::to_string),
        event_id: Some(id),
        received_us: 0,
    })
}

/// Strings with everything the LOAD DATA format escapes, and what it could mistake for its own syntax.
fn nasty_text(rng: &mut fastrand::Rng) -> String {
    const PIECES: &[&str] =
        &["\t", "\n", "\r", "\\", "\\N", "N", "\0", "\\t", "'", "\"", "é", "€", "𝄞", "😀", " ", ",", "x", "\u{7f}"];
    let len = rng.usize(0..12);
    (0..len).map(|_| PIECES[rng.usize(..PIECES.len())]).collect()
}

/// A JSON object whose strings hold the same characters, escaped as JSON.
fn nasty_json(rng: &mut fastrand::Rng) -> String {
    let value = serde_json::json!({ "s": nasty_text(rng), "n": null, "k": [1.5, nasty_text(rng)], "u": "𝄞" });
    value.to_string()
}

fn value(rng: &mut fastrand::Rng) -> f64 {
    const EXTREMES: &[f64] = &[0.0, -0.0, 1.0, -1.5, 0.1, 1e-300, 5e-324, f64::MIN_POSITIVE, f64::MAX, f64::MIN, 1e21];
    if rng.bool() {
        return EXTREMES[rng.usize(..EXTREMES.len())];
    }
    // Any finite double (JSON has no NaN nor infinity).
    loop {
        let v = f64::from_bits(rng.u64(..));
        if v.is_finite() {
            return v;
        }
    }
}

/// Random events that stress the format, written once by LOAD DATA and once by INSERT, are stored identically.
#[test]
fn load_data_stores_every_field_exactly_as_insert_does() {
    let db = TestDb::migrated();
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let decimals = ["9999999999999999.99999999", "-9999999999999999.99999999", "0.00000001", "-0", "0", "42"];
    let n = 300;
    let mut events = Vec::new();
    for i in 0..n {
        let id = format!("e{i}");
        let event = if i % 4 == 3 {
            let pick = |rng: &mut fastrand::Rng| decimals[rng.usize(..decimals.len())];
            let (q, p) = (pick(&mut rng), pick(&mut rng));
            let pnl = rng.bool().then(|| pick(&mut rng));
            let fees = rng.bool().then(|| pick(&mut rng));
            let opened = rng.bool().then_some(1_795_000_000_000_001);
            let meta = match rng.u8(..3) {
                0 => None,
                1 => Some("{}".to_string()),
                _ => Some(nasty_json(&mut rng)),
            };
            trade_event(id, q, p, pnl, fees, opened, meta.as_deref())
        } else {
            let name = nasty_text(&mut rng);
            let tags = match rng.u8(..3) {
                0 => None,
                1 => Some("{}".to_string()),
                _ => Some(nasty_json(&mut rng)),
            };
            metric_event(id, "bulk-p", &name, value(&mut rng), tags.as_deref())
        };
        events.push(event);
    }
    let loaded = write(&db, Bulk::LoadData, 1, &events).unwrap();
    assert!(loaded.loaded, "seed {seed}: LOAD DATA did not take the batch whole: {loaded:?}");
    assert_eq!(loaded.inserted, n);
    // The same values under other event ids, through INSERT.
    let again: Vec<Event> = events
        .iter()
        .map(|event| {
            let mut event = event.clone();
            match &mut event {
                Event::Metric(m) => m.event_id = m.event_id.as_ref().map(|id| format!("{id}-insert")),
                Event::Trade(t) => t.event_id = t.event_id.as_ref().map(|id| format!("{id}-insert")),
            }
            event
        })
        .collect();
    let inserted = write(&db, Bulk::Insert, 10_001, &again).unwrap();
    assert!(!inserted.loaded);
    for table in ["dd_metrics", "dd_trade_performance"] {
        let (by_load, by_insert) = (stored(&db, table, 1..10_000), stored(&db, table, 10_001..20_000));
        assert!(!by_load.is_empty());
        assert_eq!(by_load.len(), by_insert.len(), "seed {seed}: {table}");
        for (i, (l, r)) in by_load.iter().zip(&by_insert).enumerate() {
            assert_eq!(l, r, "seed {seed}: {table} row {i} differs between LOAD DATA and INSERT");
        }
    }
}

/// A duplicate: the load is rolled back, and INSERT writes the rest once.
#[test]
fn a_batch_holding_a_duplicate_goes_through_insert_and_is_stored_once() {
    let db = TestDb::migrated();
    let first = write(&db, Bulk::Auto, 1, &[metric_event("dup".into(), "p", "m", 1.0, None)]).unwrap();
    assert!(first.loaded, "{first:?}");
    let batch: Vec<Event> =
        ["a", "dup", "b"].iter().map(|id| metric_event(id.to_string(), "p", "m", 2.0, None)).collect();
    let written = write(&db, Bulk::Auto, 10, &batch).unwrap();
    assert_eq!((written.loaded, written.inserted, written.already_present), (false, 2, 1), "{written:?}");
    let ids: Vec<(String, f64)> = db.query("SELECT event_id, value FROM dd_metrics ORDER BY event_id");
    assert_eq!(ids, vec![("a".into(), 2.0), ("b".into(), 2.0), ("dup".into(), 1.0)]);
}

/// A value the server rounds (a ninth decimal): LOAD DATA's warning sends the batch to INSERT, which stores
/// what it always stored.
#[test]
fn a_value_the_server_would_round_ends_as_insert_ends_it() {
    let db = TestDb::migrated();
    let trade = |id: &str| trade_event(id.into(), "1.123456789", "2", None, None, None, None);
    let by_insert = write(&db, Bulk::Insert, 1, &[trade("i")]).unwrap();
    let by_auto = write(&db, Bulk::Auto, 2, &[trade("a")]).unwrap();
    assert_eq!((by_insert.inserted, by_auto.inserted, by_auto.loaded), (1, 1, false), "{by_auto:?}");
    assert_eq!(stored(&db, "dd_trade_performance", 1..2), stored(&db, "dd_trade_performance", 2..3));
}

/// A poison row (a profile id longer than its column): LOAD DATA would truncate it with a warning; the batch
/// goes to INSERT, which fails it as it always did (the forwarder then splits the batch and dead-letters the
/// row), and nothing of the batch is stored.
#[test]
fn a_poison_row_fails_the_batch_as_insert_fails_it() {
    let db = TestDb::migrated();
    let batch = [
        metric_event("ok-1".into(), "p", "m", 1.0, None),
        metric_event("poison".into(), &"p".repeat(65), "m", 1.0, None),
    ];
    for bulk in [Bulk::Insert, Bulk::Auto, Bulk::LoadData] {
        match write(&db, bulk, 1, &batch) {
            Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1406, "{bulk:?}: {e}"),
            other => panic!("{bulk:?}: expected MySQL's data-too-long error, got {other:?}"),
        }
    }
    assert_eq!(db.count("dd_metrics"), 0);
}

/// Restores `local_infile` when the test ends, however it ends.
struct LocalInfileOff(TestDb);

impl Drop for LocalInfileOff {
    fn drop(&mut self) {
        self.0.exec("SET GLOBAL local_infile = 1");
    }
}

/// With `local_infile` OFF, `bulk = "auto"` writes with INSERT, says so once in the log, in `status` and in
/// `/metrics`; `bulk = "load_data"` waits with an error that says what to change.
#[test]
fn a_server_refusing_load_data_gets_inserts_and_the_operator_is_told() {
    let _alone = alone();
    let db = TestDb::migrated();
    let setting: Vec<(String, String)> = db.query("SHOW GLOBAL VARIABLES LIKE 'local_infile'");
    if setting.first().map(|(_, value)| value.as_str()) != Some("ON") {
        crate::kit::util::skip("local_infile is OFF on this server already");
        return;
    }
    db.exec("SET GLOBAL local_infile = 0");
    let _restore = LocalInfileOff(TestDb::new());

    let mut agent = Agent::configure(&mysql_section(&db.url()));
    agent.restart();
    let acked = agent.connect().send_all(&[metric("p", "m", 1.0), metric("p", "m", 2.0)]);
    assert_eq!(acked.len(), 2);
    db.wait_for_rows("dd_metrics", 2, 30);
    for _ in 0..2 {
        // More batches after the first refusal: still said once.
        agent.connect().send_all(&[metric("p", "n", 3.0)]);
    }
    db.wait_for_rows("dd_metrics", 4, 30);
    let log = agent.log();
    assert_eq!(log.matches("refuses LOAD DATA LOCAL INFILE").count(), 1, "{log}");
    let (_, metrics) = http_get(agent.http_addr(), "/metrics");
    assert!(metrics.contains("telemetry_mysql_write_path{path=\"insert\"} 1"), "{metrics}");
    assert!(metrics.contains("telemetry_mysql_write_path{path=\"load_data\"} 0"), "{metrics}");
    let status = agent.command(&["status"], "");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("rows by insert (LOAD DATA refused"), "{status}");
    agent.stop();

    // `load_data` insists: the rows wait in the WAL, the sink reports why.
    let mut strict = Agent::configure(&format!("{}bulk = \"load_data\"\n", mysql_section(&db.url())));
    strict.restart();
    assert_eq!(strict.connect().send_all(&[metric("p", "strict", 1.0)]).len(), 1);
    strict.wait_for_log("requires it: enable local_infile on the server", 30);
    assert_eq!(db.count("dd_metrics"), 4);
    drop(_restore);
    // Once the server takes LOAD DATA again, the waiting row goes in.
    db.wait_for_rows("dd_metrics", 5, 60);
    strict.stop();
}
