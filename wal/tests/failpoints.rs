//! Failures injected at crash-sensitive steps (`cargo test -p telemetry-wal --features failpoints`).
//! One test per process step, run in sequence: fail points are global to the process.
#![cfg(feature = "failpoints")]

use telemetry_wal::{Wal, WalError, WalOptions};

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
