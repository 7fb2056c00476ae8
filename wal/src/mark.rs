//! The acknowledged mark: a 12-byte file beside sled holding the newest seq acknowledged as durable, rewritten
//! about once a second and at close. sled's recovery silently drops everything after a damaged or missing
//! part of its log (a truncated file, flipped bytes); a mark beyond what sled recovered is how such a loss is
//! noticed at open, instead of acknowledged records vanishing and their seqs being handed out again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::WalError;

pub(crate) const MARK_FILE: &str = "acked-seq";

pub(crate) struct AckMark {
    file: File,
    path: PathBuf,
    written: u64,
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
        Ok(AckMark { file, path, written: 0 })
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

    /// Records `seq` durably, if it is newer than what was written.
    pub fn write(&mut self, seq: u64) -> Result<(), WalError> {
        if seq <= self.written {
            return Ok(());
        }
        let mut buf = [0u8; 12];
        buf[..8].copy_from_slice(&seq.to_be_bytes());
        let crc = crc32fast::hash(&buf[..8]);
        buf[8..].copy_from_slice(&crc.to_be_bytes());
        // One small write within a sector: it lands whole or not at all.
        self.file
            .write_all_at(&buf, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| WalError::io(&self.path, "write the acknowledged mark", e))?;
        self.written = seq;
        Ok(())
    }
}
