//! Truncate: drops the chunks every gating cursor has passed (and, with `retain`, only once old enough
//! unless space runs short).
//!
//! On disk: whole chunks leave `records` in one batch, after a flush (so that what was written before the
//! cursors moved is durable first) and after `high_water` in `meta` is set to the durable seq: with every record
//! gone, it is what keeps seqs from restarting. sled reuses the freed space; it does not return it to the file
//! system.

use std::sync::atomic::Ordering;

use crate::chunk::{be_u64, Chunk};
use crate::{append, Wal, WalError};

/// Truncation ignores `retain` once records fill 1/this of `max_bytes`...
pub const PRESSURE_RECORDS_DIVISOR: u64 = 8;
/// ...or the directory this percentage of it: well before appends would be refused.
pub const PRESSURE_DISK_PERCENT: u64 = 80;

/// In `meta`: a seq that every seq handed out from now on exceeds; set by truncation and by salvage.
pub(crate) const META_HIGH_WATER: &[u8] = b"high_water";

impl Wal {
    /// Drops every chunk whose records all gating cursors have passed, and returns how many records went.
    /// With no gating cursors it does nothing.
    pub fn truncate(&self) -> Result<u64, WalError> {
        let mut upto = u64::MAX;
        for name in &self.inner.options.gating_cursors {
            upto = upto.min(self.cursor(name)?);
        }
        if self.inner.options.gating_cursors.is_empty() {
            return Ok(0);
        }
        let durable = *self.inner.shared.durable_seq.borrow();
        upto = upto.min(durable);
        let options = &self.inner.options;
        // Well before appends would be refused (the directory at the cap with records filling a quarter of it):
        // records reaching an eighth of the cap, or the directory 80% of it.
        let shared = &self.inner.shared;
        let under_pressure = shared.live_bytes.load(Ordering::Relaxed).saturating_mul(PRESSURE_RECORDS_DIVISOR)
            >= options.max_bytes
            || shared.disk_bytes.load(Ordering::Relaxed).saturating_mul(100)
                >= options.max_bytes.saturating_mul(PRESSURE_DISK_PERCENT);
        let retain_ms = u64::try_from(options.retain.as_millis()).unwrap_or(u64::MAX);
        let keep_newer_than_ms = (retain_ms > 0 && !under_pressure).then(|| append::now_ms().saturating_sub(retain_ms));
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let mut freed_bytes = 0;
        let mut chunks = self.inner.records.range(..=upto.to_be_bytes()).peekable();
        while let Some(entry) = chunks.next() {
            let (key, value) = entry.map_err(|e| self.sled_err("scan the WAL", e))?;
            if let Some(limit) = keep_newer_than_ms {
                let chunk = Chunk::decode(&key, &value).map_err(|reason| self.corrupt(&key, reason))?;
                if chunk.appended_at_ms > limit {
                    break;
                }
            }
            // A chunk ends where the next one starts; the last one ends at the durable seq.
            let next_first = match chunks.peek() {
                Some(Ok((next, _))) => be_u64(next),
                _ => self.next_chunk_first(&key)?.unwrap_or(durable + 1),
            };
            if next_first - 1 > upto {
                break;
            }
            removed += next_first - be_u64(&key);
            freed_bytes += value.len() as u64;
            batch.remove(key);
        }
        if removed == 0 {
            return Ok(0);
        }
        // Make durable what was written before the cursors moved (tables derived from these records, say)
        // before the records go: sled alone would persist both with the same flush, or neither.
        self.flush()?;
        // Keep the high-water mark first: with every record gone, it is what keeps seqs from restarting.
        self.inner
            .meta
            .insert(META_HIGH_WATER, &durable.to_be_bytes())
            .map_err(|e| self.sled_err("write the high-water mark", e))?;
        self.inner.records.apply_batch(batch).map_err(|e| self.sled_err("truncate", e))?;
        self.inner.shared.live_bytes.fetch_sub(freed_bytes, Ordering::Relaxed);
        self.flush()?;
        self.inner.shared.refresh_disk_bytes();
        tracing::debug!(records = removed, upto, "WAL truncated");
        Ok(removed)
    }

    fn next_chunk_first(&self, key: &[u8]) -> Result<Option<u64>, WalError> {
        let mut after =
            self.inner.records.range::<&[u8], _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded));
        match after.next() {
            Some(entry) => Ok(Some(be_u64(&entry.map_err(|e| self.sled_err("scan the WAL", e))?.0))),
            None => Ok(None),
        }
    }
}
