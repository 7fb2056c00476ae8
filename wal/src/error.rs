//! The one error type of the crate. A failed group commit answers each of its waiters with its own copy
//! (`WalError::shared_copy`); fail points inject what a failing disk returns.

use std::path::{Path, PathBuf};

/// What can go wrong in the WAL. Every variant names the directory or the limit involved.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The directory's disk usage reached `max_bytes`. Nothing was written; retry once sinks catch up.
    #[error("WAL is full: {used} bytes on disk, cap {max} bytes")]
    Full { used: u64, max: u64 },

    #[error("record of {len} bytes exceeds the largest record the WAL takes ({max} bytes)")]
    TooLarge { len: usize, max: usize },

    #[error("WAL is closed")]
    Closed,

    #[error(
        "WAL directory {} is in use by another process (pid {holder}); stop it first, or point this one at another directory",
        dir.display()
    )]
    Locked { dir: PathBuf, holder: String },

    /// [`crate::Wal::salvage`] keeps what is intact.
    #[error("WAL in {} is damaged: {detail}", dir.display())]
    Corrupt { dir: PathBuf, detail: String },

    #[error("WAL in {}: cannot {what}: {source}", dir.display())]
    Storage { dir: PathBuf, what: &'static str, source: sled::Error },

    /// An earlier write or sync failed; nothing more is accepted until the process restarts.
    #[error("WAL in {} stopped after a write failure ({detail}); restart the agent", dir.display())]
    Failed { dir: PathBuf, detail: String },

    #[error("{}: cannot {what}: {source}", path.display())]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
}

impl WalError {
    pub(crate) fn io(path: &Path, what: &'static str, source: std::io::Error) -> WalError {
        WalError::Io { path: path.to_path_buf(), what, source }
    }

    pub(crate) fn sled(dir: &Path, what: &'static str, source: sled::Error) -> WalError {
        match source {
            sled::Error::Corruption { at, bt: _ } => WalError::Corrupt {
                dir: dir.to_path_buf(),
                detail: format!("sled found corruption at {at:?} ({what})"),
            },
            source => WalError::Storage { dir: dir.to_path_buf(), what, source },
        }
    }

    /// A copy of the error for answering many waiters of one failed group commit.
    pub(crate) fn shared_copy(&self) -> WalError {
        match self {
            WalError::Full { used, max } => WalError::Full { used: *used, max: *max },
            WalError::TooLarge { len, max } => WalError::TooLarge { len: *len, max: *max },
            WalError::Closed => WalError::Closed,
            WalError::Locked { dir, holder } => WalError::Locked { dir: dir.clone(), holder: holder.clone() },
            WalError::Corrupt { dir, detail } => WalError::Corrupt { dir: dir.clone(), detail: detail.clone() },
            WalError::Storage { dir, what, source } => {
                WalError::Failed { dir: dir.clone(), detail: format!("cannot {what}: {source}") }
            }
            WalError::Failed { dir, detail } => WalError::Failed { dir: dir.clone(), detail: detail.clone() },
            WalError::Io { path, what, source } => WalError::Io {
                path: path.clone(),
                what,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}

/// The error a fail point injects: what a failing disk returns.
#[cfg(feature = "failpoints")]
pub(crate) fn injected(dir: &Path, what: &'static str) -> WalError {
    WalError::io(dir, what, std::io::Error::other("injected by a fail point"))
}
