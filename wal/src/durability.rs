//! Durability: when an append counts as durable, and the one way anything becomes so.
//!
//! On disk: sled's data file (`sled/db`) is made durable by a flush of sled followed by an `fdatasync` of
//! that file; and `acked-seq`, the acknowledged mark, is rewritten whenever the durable seq moves and synced
//! about once a second by a thread of its own. The first failed flush or sync stops the WAL, since what is
//! on disk is unknown from then on.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::mark::AckMark;
use crate::{Wal, WalError};

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge only after the group's flush and `fdatasync` returned: an acked record survives a
    /// process crash and a power cut.
    Fsync,
    /// Acknowledge once the record is in sled's memory; a flusher makes it durable every `interval_ms`.
    /// A crash (of the process or the machine) loses the records acked in the last `interval_ms` plus the
    /// duration of one flush. Their sequence numbers are never handed out again.
    Interval { interval_ms: u64 },
}

/// State the writer thread and the readers share.
pub(crate) struct Shared {
    /// The newest durable seq; readers never see past it.
    pub(crate) durable_seq: watch::Sender<u64>,
    /// The newest seq written to sled (interval mode: not yet durable until the flusher runs).
    pub(crate) appended_seq: AtomicU64,
    /// Set when the writer has stopped; the interval flusher stops too.
    pub(crate) closing: AtomicBool,
    /// The first write, flush or sync failure, whichever thread met it. After it nothing more is acknowledged
    /// nor made durable: the state on disk is unknown (a failed fdatasync may have dropped dirty pages), so
    /// only a restart and sled's recovery can tell what is durable.
    pub(crate) failure: Mutex<Option<String>>,
    /// Held across every flush and sync (see `Shared::flush_and_sync`).
    pub(crate) sync_lock: Mutex<()>,
    pub(crate) disk_bytes: AtomicU64,
    /// Bytes of the chunks currently stored (summed at open, kept up to date by appends and truncation).
    pub(crate) live_bytes: AtomicU64,
    pub(crate) group_commits: AtomicU64,
    pub(crate) data_syncs: AtomicU64,
    /// sled's data file, opened by us so that we can `fdatasync` it (fsync works per inode).
    pub(crate) data_file: File,
    /// The newest acknowledged seq, kept beside sled (see `mark.rs`).
    pub(crate) mark: AckMark,
    pub(crate) dir: PathBuf,
}

impl Shared {
    fn lock_failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.lock_failure().clone()
    }

    /// Records the first failure; later appends are refused with it.
    pub(crate) fn fail(&self, error: &WalError) {
        let mut failure = self.lock_failure();
        if failure.is_none() {
            tracing::error!(error = %error, dir = %self.dir.display(), "WAL write failed; refusing all further appends");
            *failure = Some(error.to_string());
        }
    }

    /// Flushes sled and fdatasyncs its data file: the only way anything is made durable. A failure of either
    /// fails the WAL, whoever asked: the kernel reports a failed writeback to one fsync only, so the next
    /// caller's sync would succeed over dropped pages. Serialised, with the failure checked under the lock, so
    /// that no sync counts as success once another has failed.
    pub(crate) fn flush_and_sync(&self, db: &sled::Db) -> Result<(), WalError> {
        let _serial = self.sync_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(detail) = self.failure() {
            return Err(WalError::Failed { dir: self.dir.clone(), detail });
        }
        let result = db.flush().map_err(|e| WalError::sled(&self.dir, "flush", e)).and_then(|_| self.sync_data());
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    fn sync_data(&self) -> Result<(), WalError> {
        fail::fail_point!("wal::sync_data", |_| Err(crate::error::injected(&self.dir, "fdatasync sled's data file")));
        self.data_file.sync_data().map_err(|e| WalError::io(&self.dir, "fdatasync sled's data file", e))?;
        self.data_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Re-reads what the directory uses on disk (allocated blocks, so sparse and punched files count right).
    pub(crate) fn refresh_disk_bytes(&self) {
        self.disk_bytes.store(dir_disk_bytes(&self.dir), Ordering::Relaxed);
    }
}

fn dir_disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => dir_disk_bytes(&entry.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

impl Wal {
    /// Flushes everything written so far (cursors included) and syncs it to disk. A failure fails the WAL
    /// (see [`Wal::failure`]); after one, this returns [`WalError::Failed`].
    pub fn flush(&self) -> Result<(), WalError> {
        self.inner.shared.flush_and_sync(&self.inner.db)
    }

    /// The write, flush or sync failure that stopped the WAL, if any, from appends or from any other call
    /// that syncs (labels, dead letters, truncation, [`Wal::flush`]). The process should restart.
    pub fn failure(&self) -> Option<String> {
        self.inner.shared.failure()
    }
}

/// Interval mode: makes everything appended durable every `interval_ms`, until the writer closes.
pub(crate) fn interval_flusher(db: sled::Db, shared: Arc<Shared>, interval_ms: u64) {
    let interval = Duration::from_millis(interval_ms.max(1));
    while !shared.closing.load(Ordering::Relaxed) {
        std::thread::sleep(interval);
        let target = shared.appended_seq.load(Ordering::Acquire);
        match shared.flush_and_sync(&db) {
            Ok(()) => {
                if target > *shared.durable_seq.borrow() {
                    shared.mark.record(target);
                    shared.durable_seq.send_replace(target);
                }
                shared.refresh_disk_bytes();
            }
            // Failed here or in another caller's sync (recorded there): nothing more is made durable.
            Err(_) => return,
        }
    }
}

/// How often the acknowledged mark is synced (see `mark.rs`).
const MARK_SYNC_EVERY: Duration = Duration::from_secs(1);

/// Syncs the acknowledged mark about once a second, off the ack path, and once more after the writer closed.
pub(crate) fn mark_syncer(shared: Arc<Shared>) {
    let mut last_sync = std::time::Instant::now();
    loop {
        let closing = shared.closing.load(Ordering::Relaxed);
        if closing || last_sync.elapsed() >= MARK_SYNC_EVERY {
            if let Err(e) = shared.mark.sync() {
                // As for sled's file: the disk reports a failed writeback once, so stop rather than go on.
                shared.fail(&e);
                return;
            }
            last_sync = std::time::Instant::now();
        }
        if closing {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
