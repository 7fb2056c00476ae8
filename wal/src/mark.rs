//! The acknowledged mark: a 12-byte file beside sled holding the newest seq acknowledged as durable. sled's
//! recovery silently drops everything after a damaged or missing part of its log (a truncated file, flipped
//! bytes); a mark beyond what sled recovered is how such a loss is noticed at open, instead of acknowledged
//! records vanishing and their seqs being handed out again.
//!
//! The mark is rewritten (one `pwrite`, no sync) every time the durable seq moves, after sled's data is
//! synced, so after a process crash it is exact; it is `fdatasync`ed about once a second, so after a power
//! cut it may lag by that much, never lead.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::WalError;

pub(crate) const MARK_FILE: &str = "acked-seq";

pub(crate) struct AckMark {
    file: File,
    path: PathBuf,
    /// Written since the last sync.
    dirty: AtomicBool,
    /// A write failed already (logged once).
    failed: AtomicBool,
}

impl AckMark {
    pub fn open(dir: &Path) -> Result<AckMark, WalError> {
        let path = dir.join(MARK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| WalError::io(&path, "open the acknowledged mark", e))?;
        Ok(AckMark { file, path, dirty: AtomicBool::new(false), failed: AtomicBool::new(false) })
    }

    /// The mark stored, `None` when none was ever written.
    pub fn read(&self) -> Result<Option<u64>, WalError> {
        let mut buf = [0u8; 12];
        let n =
            self.file.read_at(&mut buf, 0).map_err(|e| WalError::io(&self.path, "read the acknowledged mark", e))?;
        if n == 0 {
            return Ok(None);
        }
        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
        if n < 12 || crc32fast::hash(&buf[..8]).to_be_bytes() != buf[8..] {
            return Err(WalError::Corrupt {
                dir: self.path.parent().unwrap_or(&self.path).to_path_buf(),
                detail: format!("{} is damaged (bad checksum)", self.path.display()),
            });
        }
        Ok(Some(seq))
    }

    /// Records `seq` (callers only move it forward). One write within a sector: it lands whole or not at all.
    pub fn record(&self, seq: u64) {
        let mut buf = [0u8; 12];
        buf[..8].copy_from_slice(&seq.to_be_bytes());
        let crc = crc32fast::hash(&buf[..8]);
        buf[8..].copy_from_slice(&crc.to_be_bytes());
        match self.file.write_all_at(&buf, 0) {
            Ok(()) => self.dirty.store(true, Ordering::Release),
            Err(e) => self.failed_once(&e.to_string()),
        }
    }

    /// Makes the last recorded mark durable, if it changed. A failure is the caller's to act on (it fails
    /// the WAL, as any failed sync does).
    pub fn sync(&self) -> Result<(), WalError> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            fail::fail_point!("wal::mark_sync", |_| Err(crate::error::injected(&self.path, "fdatasync the mark")));
            self.file.sync_data().map_err(|e| WalError::io(&self.path, "fdatasync the acknowledged mark", e))?;
        }
        Ok(())
    }

    /// Records and syncs, reporting failure (salvage, where it matters).
    pub fn write_durably(&self, seq: u64) -> Result<(), WalError> {
        self.record(seq);
        self.file.sync_data().map_err(|e| WalError::io(&self.path, "write the acknowledged mark", e))
    }

    fn failed_once(&self, error: &str) {
        // A failed write (not sync) is not fatal: sled holds the records; only the detection of damage to sled's
        // log is weakened.
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(error, path = %self.path.display(), "cannot write the WAL's acknowledged mark");
        }
    }
}
