//! The fold: tails the WAL from cursor `redis` into the mirror's table, the newest entry per key.

use std::collections::HashMap;

use telemetry_wal::{Table, Wal, MAX_RECORD_BYTES};

use super::table::Latest;
use super::{Mirror, SINK};
use crate::identity::Identity;
use crate::ops::metrics::METRICS;
use crate::sink::{read_wal, Stopped};

/// After the WAL had nothing more, a step waits this long past the next durable record; Redis lags the WAL
/// by at most about this much more.
const FOLD_GATHER: std::time::Duration = std::time::Duration::from_millis(20);
/// Records folded per step...
const FOLD_BATCH: usize = 10_000;
/// ...and at most this many payload bytes read per step (records can be 112 KiB each).
const FOLD_BATCH_BYTES: usize = 8 << 20;

impl Mirror {
    pub(super) async fn fold(&self) -> Result<(), Stopped> {
        let mut shutdown = self.shutdown.clone();
        let mut durable = self.wal.subscribe();
        let mut after = match self.wal.cursor(SINK.name()) {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the redis cursor; the mirror is off until a restart");
                return Err(Stopped);
            }
        };
        loop {
            // A long backlog (the mirror newly enabled on a full WAL) must not hold up a stop.
            if *shutdown.borrow() {
                return Err(Stopped);
            }
            durable.borrow_and_update();
            let (wal, table, identity) = (self.wal.clone(), self.table.clone(), self.identity.clone());
            let step = read_wal(SINK, after, move || fold_step(&wal, &table, &identity, after), &mut shutdown).await?;
            if let Some(Folded { last_seq, changed }) = step {
                after = last_seq;
                if !changed.is_empty() {
                    let mut dirty = self.lock_dirty();
                    dirty.mark(changed);
                    METRICS.redis_pending_keys.set((dirty.keys.len() + dirty.parked.len()) as i64);
                    drop(dirty);
                    self.changed.notify_one();
                }
                continue;
            }
            tokio::select! {
                _ = durable.changed() => {}
                _ = shutdown.changed() => return Err(Stopped),
            }
            // Fold what came in the next moment too: one step per group commit would cost a WAL read and a
            // table write per group at ordinary rates, for values only a little newer.
            tokio::select! {
                () = tokio::time::sleep(FOLD_GATHER) => {}
                _ = shutdown.changed() => return Err(Stopped),
            }
        }
    }
}

/// What one fold step did.
struct Folded {
    last_seq: u64,
    /// Table keys whose entry changed.
    changed: Vec<Vec<u8>>,
}

/// Folds the records after `after` into the table and moves the cursor past them; `None` when there was
/// nothing to read.
fn fold_step(
    wal: &Wal,
    table: &Table,
    identity: &Identity,
    after: u64,
) -> Result<Option<Folded>, telemetry_wal::WalError> {
    let mut newest: HashMap<Vec<u8>, Latest> = HashMap::new();
    let (mut last_seq, mut records, mut bytes) = (None, 0, 0);
    // Read in pieces that fit in what is left of the byte budget even if every record is as large as it may be.
    loop {
        let room = (FOLD_BATCH_BYTES.saturating_sub(bytes) / MAX_RECORD_BYTES).min(FOLD_BATCH - records);
        if room == 0 {
            break;
        }
        let batch = wal.read_after(last_seq.unwrap_or(after), room)?;
        let Some(last) = batch.last().map(|r| r.seq) else { break };
        last_seq = Some(last);
        records += batch.len();
        for record in &batch {
            bytes += record.payload.len();
            match Latest::from_record(record, identity) {
                Ok((key, latest)) => match newest.get(&key) {
                    Some(kept) if kept.order() >= latest.order() => {}
                    _ => {
                        newest.insert(key, latest);
                    }
                },
                // The MySQL forwarder dead-letters such a record; the mirror has nothing to show for it.
                Err(e) => {
                    tracing::error!(seq = record.seq, error = %e, "the Redis mirror skips an undecodable record")
                }
            }
        }
        if batch.len() < room {
            break; // Caught up.
        }
    }
    let Some(last_seq) = last_seq else { return Ok(None) };
    let mut writes = Vec::with_capacity(newest.len());
    for (key, latest) in newest {
        let stored = table.get(&key)?.and_then(|bytes| Latest::decode(&bytes).ok());
        if stored.is_some_and(|stored| stored.order() >= latest.order()) {
            continue;
        }
        writes.push((key, latest.encode()));
    }
    let changed: Vec<Vec<u8>> = writes.iter().map(|(k, _)| k.clone()).collect();
    table.insert_all(writes)?;
    // After the table write: a crash between the two refolds these records, which changes nothing.
    wal.set_cursor(SINK.name(), last_seq)?;
    Ok(Some(Folded { last_seq, changed }))
}

#[cfg(test)]
mod tests {
    use super::super::table::TABLE;
    use super::*;

    #[test]
    fn a_fold_step_reads_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), telemetry_wal::WalOptions::default()).unwrap();
        let table = wal.table(TABLE).unwrap();
        let appender = wal.appender();
        let pending: Vec<_> = (0..200).map(|_| appender.blocking_append(vec![b'x'; 100_000]).unwrap()).collect();
        let seqs: Vec<u64> = pending.into_iter().map(|p| p.blocking_durable().unwrap()).collect();
        let folded = fold_step(&wal, &table, &Identity::new("a".into(), Vec::new()), 0).unwrap().unwrap();
        let count = seqs.iter().filter(|&&seq| seq <= folded.last_seq).count();
        assert!(count * 100_000 <= FOLD_BATCH_BYTES, "{count} records of 100 kB folded in one step");
        // The next steps take the rest.
        let mut after = folded.last_seq;
        while let Some(folded) = fold_step(&wal, &table, &Identity::new("a".into(), Vec::new()), after).unwrap() {
            after = folded.last_seq;
        }
        assert_eq!(Some(&after), seqs.last());
    }
}
