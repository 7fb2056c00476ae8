//! Recovery: what open concludes from what sled recovered, and salvage of a WAL that open refused.
//!
//! On disk nothing of its own. Open reads every chunk once (a damaged one refuses the WAL); the newest seq
//! ever durable is the largest of the last chunk's end, `high_water` and `seq_lease` in `meta`; a mark in
//! `acked-seq` beyond it means sled dropped acknowledged records. Salvage deletes the damaged chunks and
//! raises `high_water` and the mark past every seq that may have been handed out.

use std::fs::File;
use std::path::Path;

use crate::append::META_SEQ_LEASE;
use crate::chunk::{be_u64, Chunk};
use crate::mark::AckMark;
use crate::open::{open_sled, take_lock};
use crate::truncate::META_HIGH_WATER;
use crate::{Wal, WalError, WalOptions};

pub(crate) struct Scan {
    pub(crate) last_seq: Option<u64>,
    pub(crate) live_bytes: u64,
}

/// Reads every chunk once at open: checks its CRC (a damaged WAL refuses to open rather than fail later, or
/// be forwarded), and sums what the records hold. Cheap next to what a sink does with the same bytes.
pub(crate) fn scan_records(records: &sled::Tree, dir: &Path) -> Result<Scan, WalError> {
    let mut scan = Scan { last_seq: None, live_bytes: 0 };
    for entry in records.iter() {
        let (key, value) = entry.map_err(|e| WalError::sled(dir, "read the WAL", e))?;
        let chunk = Chunk::decode(&key, &value).map_err(|reason| WalError::Corrupt {
            dir: dir.to_path_buf(),
            detail: format!("chunk at seq {}: {reason}", be_u64(&key)),
        })?;
        scan.last_seq = Some(chunk.last_seq());
        scan.live_bytes += value.len() as u64;
    }
    Ok(scan)
}

/// The newest seq ever made durable: the end of the last chunk, or the high-water mark kept by truncation,
/// or the lease taken in interval mode, whichever is largest. `None` for a new WAL.
pub(crate) fn last_durable_seq(
    from_records: Option<u64>,
    meta: &sled::Tree,
    dir: &Path,
) -> Result<Option<u64>, WalError> {
    let meta_u64 = |key: &[u8]| -> Result<Option<u64>, WalError> {
        Ok(meta.get(key).map_err(|e| WalError::sled(dir, "read WAL metadata", e))?.map(|v| be_u64(&v)))
    };
    let candidates = [from_records, meta_u64(META_HIGH_WATER)?, meta_u64(META_SEQ_LEASE)?];
    Ok(candidates.into_iter().flatten().max())
}

/// Acknowledged seqs that sled no longer has: after the newest it recovered, up to the acknowledged mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostRange {
    pub first: u64,
    pub last: u64,
}

impl LostRange {
    pub(crate) fn describe(&self) -> String {
        format!(
            "sled's log ends at seq {} but seqs up to {} were acknowledged: {} acknowledged records are lost \
             (sled's data file was truncated or damaged; sled drops everything after the damage)",
            self.first - 1,
            self.last,
            self.last - self.first + 1
        )
    }
}

pub(crate) fn lost_range(last_seq: Option<u64>, acknowledged: Option<u64>) -> Option<LostRange> {
    let (last, acknowledged) = (last_seq.unwrap_or(0), acknowledged?);
    (acknowledged > last).then_some(LostRange { first: last + 1, last: acknowledged })
}

/// What [`Wal::salvage`] kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Salvage {
    /// Records kept (every one passed its checksum).
    pub kept_records: u64,
    /// The first seq of every chunk dropped because it failed its checksum, with its size in bytes.
    pub damaged_chunks: Vec<(u64, usize)>,
    /// Acknowledged records sled no longer had.
    pub lost: Option<LostRange>,
    /// Seqs handed out from now on start after this one, so that no lost seq is ever reused.
    pub next_seq_after: u64,
}

impl Wal {
    /// Makes a damaged WAL usable again, keeping every intact record: drops the chunks that fail their
    /// checksum, accepts the loss of acknowledged records sled no longer has, and moves the seq high-water
    /// mark past everything ever acknowledged and to at least `options.first_seq - 1`, so that new seqs
    /// start at `first_seq` or later. Run it only on a WAL that [`Wal::open`] refused as corrupt; a
    /// WAL sled itself cannot open has nothing to salvage here.
    pub fn salvage(dir: impl AsRef<Path>, options: &WalOptions) -> Result<Salvage, WalError> {
        let dir = dir.as_ref().to_path_buf();
        let _lock = take_lock(&dir)?;
        let mark = AckMark::open(&dir)?;
        // A damaged mark says nothing; what sled holds is all there is.
        let acknowledged = mark.read().unwrap_or(None);
        let db = open_sled(&dir, options)?;
        let records = db.open_tree("records").map_err(|e| WalError::sled(&dir, "open a tree", e))?;
        let meta = db.open_tree("meta").map_err(|e| WalError::sled(&dir, "open a tree", e))?;
        let mut salvage = Salvage::default();
        let mut newest = None;
        let mut damaged = sled::Batch::default();
        for entry in records.iter() {
            let (key, value) = entry.map_err(|e| WalError::sled(&dir, "read the WAL", e))?;
            match Chunk::decode(&key, &value) {
                Ok(chunk) => {
                    salvage.kept_records += chunk.last_seq() - chunk.first_seq + 1;
                    newest = Some(chunk.last_seq());
                }
                Err(reason) => {
                    tracing::warn!(
                        first_seq = be_u64(&key),
                        bytes = value.len(),
                        reason,
                        "salvage drops a damaged chunk"
                    );
                    salvage.damaged_chunks.push((be_u64(&key), value.len()));
                    damaged.remove(key);
                }
            }
        }
        let last_seq = last_durable_seq(newest, &meta, &dir)?;
        salvage.lost = lost_range(last_seq, acknowledged);
        // A damaged last chunk may have held seqs beyond every intact one and beyond a lagging mark, how far
        // nobody can tell: skip past its key at least, and past `first_seq` (the agent passes the current time
        // in microseconds, as for a new WAL, which seqs handed out before the damage did not outrun).
        let damaged_max = salvage.damaged_chunks.iter().map(|(first, _)| *first).max();
        let fresh = options.first_seq.checked_sub(1);
        let high_water = [last_seq, acknowledged, damaged_max, fresh].into_iter().flatten().max().unwrap_or(0);
        salvage.next_seq_after = high_water;
        records.apply_batch(damaged).map_err(|e| WalError::sled(&dir, "drop damaged chunks", e))?;
        meta.insert(META_HIGH_WATER, &high_water.to_be_bytes())
            .map_err(|e| WalError::sled(&dir, "write the high-water mark", e))?;
        db.flush().map_err(|e| WalError::sled(&dir, "flush", e))?;
        let data_path = dir.join("sled").join("db");
        File::open(&data_path)
            .and_then(|f| f.sync_data())
            .map_err(|e| WalError::io(&data_path, "fsync sled's data file", e))?;
        mark.write_durably(high_water)?;
        if let Some(lost) = salvage.lost {
            tracing::warn!(
                first_seq = lost.first,
                last_seq = lost.last,
                "salvage accepts the loss of acknowledged records"
            );
        }
        Ok(salvage)
    }
}
