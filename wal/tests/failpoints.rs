//! Failures injected at crash-sensitive steps (`cargo test -p telemetry-wal --features failpoints`).
//! One test per process step, run in sequence: fail points are global to the process.
#![cfg(feature = "failpoints")]

use std::time::{Duration, Instant};

use telemetry_wal::{DeadLetter, Durability, Wal, WalError, WalOptions};

fn append(wal: &Wal, payload: &[u8]) -> Result<u64, WalError> {
    wal.appender().blocking_append(payload.to_vec())?.blocking_durable()
}

#[test]
fn a_failed_sync_stops_the_wal_until_reopened() {
    let scenario = fail::FailScenario::setup();
    for point in ["wal::sync_data", "wal::after_append"] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let before = append(&wal, b"before").unwrap();

        fail::cfg(point, "return").unwrap();
        let failed = append(&wal, b"during");
        fail::remove(point);
        assert!(failed.is_err(), "{point}: a failed write was acknowledged");
        // The disk may be fine again, but what is durable is unknown: nothing more is acknowledged.
        match append(&wal, b"after") {
            Err(e @ WalError::Failed { .. }) => assert!(e.to_string().contains("restart"), "{e}"),
            other => panic!("{point}: append after a failure gave {other:?}"),
        }
        assert!(wal.failure().is_some());
        let _ = wal.close();
        drop(wal);

        // A restart recovers: what was acknowledged is there, and appends work again.
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let records = wal.read_after(0, 10).unwrap();
        assert_eq!(records[0].seq, before);
        assert_eq!(records[0].payload, b"before");
        assert!(append(&wal, b"again").unwrap() > before);
    }
    scenario.teardown();
}

/// The kernel reports a failed writeback once, to whichever fsync comes first. When that is a flush outside
/// the writer (a label, a dead letter, truncation), the writer's next fdatasync succeeds although pages it
/// depends on were dropped: the WAL must stop acknowledging all the same.
#[test]
fn a_failed_sync_outside_the_writer_stops_the_wal() {
    type Step = fn(&Wal) -> Result<(), WalError>;
    fn letter() -> DeadLetter {
        DeadLetter { sink: "mysql".into(), seq: 1, error: "e".into(), at_ms: 1, payload: b"p".to_vec() }
    }
    let steps: [(&str, Step); 5] = [
        ("set_label", |wal| wal.set_label("agent_id", "a")),
        ("add_dead_letter", |wal| wal.add_dead_letter(&letter())),
        ("remove_dead_letter", |wal| wal.remove_dead_letter("mysql", 1).map(drop)),
        ("truncate", |wal| wal.truncate().map(drop)),
        ("flush", |wal| wal.flush()),
    ];
    let scenario = fail::FailScenario::setup();
    for (name, step) in steps {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions { gating_cursors: vec!["sink".into()], ..WalOptions::default() };
        let wal = Wal::open(dir.path(), options.clone()).unwrap();
        let before = append(&wal, b"before").unwrap();
        wal.add_dead_letter(&letter()).unwrap();
        // Something for truncate to drop, so that it syncs.
        wal.set_cursor("sink", before).unwrap();

        // The writer is idle: the one failure goes to `step`.
        fail::cfg("wal::sync_data", "1*return").unwrap();
        let failed = step(&wal);
        fail::remove("wal::sync_data");
        assert!(failed.is_err(), "{name}: the injected sync failure was not reported");
        match append(&wal, b"after") {
            Err(WalError::Failed { .. }) => {}
            other => panic!("{name}: append after a failed sync in {name} gave {other:?}, not the failure"),
        }
        assert!(wal.failure().is_some(), "{name}: Wal::failure() does not report it (the agent would not stop)");
        let _ = wal.close();
        drop(wal);

        let wal = Wal::open(dir.path(), options).unwrap();
        assert!(append(&wal, b"again").unwrap() > before, "{name}");
    }
    scenario.teardown();
}

/// Interval mode: records acknowledged in memory must never be reported durable after any sync failed, even
/// though the flusher's own next sync succeeds.
#[test]
fn a_failed_sync_outside_the_flusher_stops_interval_mode_durability() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions { durability: Durability::Interval { interval_ms: 50 }, ..WalOptions::default() };
    let wal = Wal::open(dir.path(), options).unwrap();
    let before = append(&wal, b"before").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while *wal.subscribe().borrow() < before {
        assert!(Instant::now() < deadline, "the flusher never made the first record durable");
        std::thread::sleep(Duration::from_millis(5));
    }

    fail::cfg("wal::sync_data", "1*return").unwrap();
    let _ = wal.set_label("agent_id", "a");
    fail::remove("wal::sync_data");
    // Acknowledged in memory (interval mode), not yet durable.
    let after = append(&wal, b"after");
    std::thread::sleep(Duration::from_millis(300));
    let durable = *wal.subscribe().borrow();
    if let Ok(seq) = after {
        assert!(durable < seq, "seq {seq}, written after a failed sync, was made durable (durable seq {durable})");
    }
    assert!(wal.failure().is_some(), "the failed sync did not fail the WAL");
    let _ = wal.close();
    scenario.teardown();
}

/// The acknowledged mark's sync (about once a second, off the ack path) follows the same rule.
#[test]
fn a_failed_sync_of_the_acknowledged_mark_stops_the_wal() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    fail::cfg("wal::mark_sync", "1*return").unwrap();
    append(&wal, b"before").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while wal.failure().is_none() {
        assert!(Instant::now() < deadline, "a failed sync of the mark did not fail the WAL");
        std::thread::sleep(Duration::from_millis(20));
    }
    fail::remove("wal::mark_sync");
    assert!(matches!(append(&wal, b"after"), Err(WalError::Failed { .. })));
    let _ = wal.close();
    scenario.teardown();
}
