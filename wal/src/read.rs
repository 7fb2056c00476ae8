//! Read: durable records in seq order, and named cursors that keep each reader's position.
//!
//! On disk: readers only read; a record is in the chunk with the greatest key at or below its seq, and nothing
//! past the durable seq is returned. Cursors are the `cursors` tree (name -> last seq passed, big-endian),
//! persisted with the next flush: after a crash a cursor may be behind (records are read again), never ahead.

use tokio::sync::watch;

use crate::chunk::{be_u64, Chunk};
use crate::{Wal, WalError};

/// One durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Milliseconds since the Unix epoch at which the group holding this record was written.
    pub appended_at_ms: u64,
    pub payload: Vec<u8>,
}

impl Wal {
    /// Up to `max_records` durable records with `seq > after`, in order.
    pub fn read_after(&self, after: u64, max_records: usize) -> Result<Vec<Record>, WalError> {
        let durable = *self.inner.shared.durable_seq.borrow();
        let mut out = Vec::new();
        if after >= durable || max_records == 0 {
            return Ok(out);
        }
        let from = after + 1;
        // The chunk holding `from` starts at or before it.
        let start = match self.inner.records.range(..=from.to_be_bytes()).next_back() {
            Some(entry) => entry.map_err(|e| self.sled_err("read the WAL", e))?.0,
            None => sled::IVec::from(&from.to_be_bytes()),
        };
        for entry in self.inner.records.range(start..) {
            let (key, value) = entry.map_err(|e| self.sled_err("read the WAL", e))?;
            let chunk = Chunk::decode(&key, &value).map_err(|reason| self.corrupt(&key, reason))?;
            for (seq, payload) in chunk.records() {
                if seq > durable || out.len() == max_records {
                    return Ok(out);
                }
                if seq >= from {
                    out.push(Record { seq, appended_at_ms: chunk.appended_at_ms, payload: payload.to_vec() });
                }
            }
        }
        Ok(out)
    }

    /// The newest durable seq, and a way to wait for it to move.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.shared.durable_seq.subscribe()
    }

    /// The last seq the named cursor has passed (0 if it was never set).
    pub fn cursor(&self, name: &str) -> Result<u64, WalError> {
        let value = self.inner.cursors.get(name).map_err(|e| self.sled_err("read a cursor", e))?;
        Ok(value.map_or(0, |v| be_u64(&v)))
    }

    /// Moves the named cursor to `seq`. Persisted with the next flush (group commit, truncation or
    /// [`Wal::flush`]); after a crash a cursor may be found behind, never ahead.
    pub fn set_cursor(&self, name: &str, seq: u64) -> Result<(), WalError> {
        self.inner.cursors.insert(name, &seq.to_be_bytes()).map_err(|e| self.sled_err("write a cursor", e))?;
        Ok(())
    }
}
