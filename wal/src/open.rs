//! Open: takes the directory, opens sled, checks what sled recovered (see `recovery.rs`) and starts the
//! writer, mark and (interval mode) flusher threads. Also the handle itself: its stats, and close.
//!
//! On disk: `wal.lock`, flocked for the life of the WAL and holding the pid, so that a second process is
//! refused with the holder named; `acked-seq` (see `mark.rs`); sled under `sled/`, whose `conf` and directory
//! entries open fsyncs because sled never does.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};

use crate::append::{self, Request, Writer};
use crate::chunk::{be_u64, Chunk};
use crate::durability::{self, Shared};
use crate::mark::AckMark;
use crate::recovery::{last_durable_seq, lost_range, scan_records};
use crate::{Durability, WalError};

/// How to open a WAL.
#[derive(Debug, Clone)]
pub struct WalOptions {
    pub durability: Durability,
    /// Appends fail with [`WalError::Full`] while the directory uses this many bytes on disk and the
    /// records stored are at least a quarter of it. (sled does not give back the space of truncated records
    /// to the file system; it reuses it. So after truncation the directory may stay at the cap while new
    /// records are taken again.)
    pub max_bytes: u64,
    /// sled's page cache, in bytes of on-disk representation.
    pub cache_bytes: u64,
    /// The cursors that must pass a record before [`Wal::truncate`] may drop it. With none, nothing is
    /// ever truncated and the WAL keeps everything up to `max_bytes`.
    pub gating_cursors: Vec<String>,
    /// The first sequence number of a new WAL (ignored when the WAL already exists).
    pub first_seq: u64,
    /// Keep records this long after they were written even once every gating cursor passed them (so that
    /// they can be replayed), unless space runs short: records filling 1/[`PRESSURE_RECORDS_DIVISOR`] of
    /// `max_bytes`, or the directory [`PRESSURE_DISK_PERCENT`]% of it.
    ///
    /// [`PRESSURE_RECORDS_DIVISOR`]: crate::PRESSURE_RECORDS_DIVISOR
    /// [`PRESSURE_DISK_PERCENT`]: crate::PRESSURE_DISK_PERCENT
    pub retain: std::time::Duration,
    /// How long the writer waits for more appends when a group commit would hold only a few records (fewer
    /// than 64): at low rates one flush and sync then serves several appends, at the cost of this much
    /// latency. Zero writes every group at once.
    pub commit_delay: std::time::Duration,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            durability: Durability::Fsync,
            max_bytes: 8 << 30,
            cache_bytes: 16 << 20,
            gating_cursors: Vec::new(),
            first_seq: 1,
            retain: std::time::Duration::ZERO,
            commit_delay: std::time::Duration::ZERO,
        }
    }
}

/// sled's log segment size. A message larger than a quarter of it becomes a blob (see `MAX_RECORD_BYTES`).
const SEGMENT_BYTES: usize = 8 << 20;

const LOCK_FILE: &str = "wal.lock";
/// Requests waiting for the writer; beyond this, `append` waits (backpressure).
const QUEUE_CAPACITY: usize = 16 * 1024;

/// A point-in-time view of the WAL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalStats {
    /// The oldest record still stored, if any.
    pub first_seq: Option<u64>,
    /// The newest durable seq ever handed out (0 if none). In interval mode, after a reopen, this includes the
    /// seqs reserved (and skipped) for a crash; see `last_record_seq` for the newest record stored.
    pub last_seq: u64,
    /// The newest record still stored, if any.
    pub last_record_seq: Option<u64>,
    /// What the directory uses on disk (allocated blocks), as of the last group commit or truncation.
    pub disk_bytes: u64,
    /// Encoded bytes of the records stored; sled needs roughly 2-3 times this on disk.
    pub live_bytes: u64,
    pub max_bytes: u64,
    /// Group commits written since open.
    pub group_commits: u64,
    /// `fdatasync` calls on sled's data file since open.
    pub data_syncs: u64,
    /// Records kept as dead letters, all sinks.
    pub dead_letters: u64,
}

impl WalStats {
    /// Whether appends are refused with [`WalError::Full`] now (one more byte would not fit).
    pub fn is_full(&self) -> bool {
        append::at_cap(self.disk_bytes + 1, self.live_bytes + 1, self.max_bytes)
    }
}

/// A WAL opened by this process. Cheap to clone; every clone is the same log.
#[derive(Clone)]
pub struct Wal {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) db: sled::Db,
    pub(crate) records: sled::Tree,
    pub(crate) cursors: sled::Tree,
    pub(crate) meta: sled::Tree,
    pub(crate) dead_letters: sled::Tree,
    pub(crate) shared: Arc<Shared>,
    pub(crate) options: WalOptions,
    pub(crate) tx: mpsc::Sender<Request>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Held for the life of the WAL: a second process fails to take it.
    _lock: nix::fcntl::Flock<File>,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`. Fails with [`WalError::Locked`] when another process has it
    /// open and with [`WalError::Corrupt`] when sled or our checksums find damage.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<Wal, WalError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| WalError::io(&dir, "create the WAL directory", e))?;
        let lock = take_lock(&dir)?;
        let mark = AckMark::open(&dir)?;
        let acknowledged = mark.read()?;
        let db = open_sled(&dir, &options)?;
        let open_tree = |name: &str| db.open_tree(name).map_err(|e| WalError::sled(&dir, "open a tree", e));
        let records = open_tree("records")?;
        let cursors = open_tree("cursors")?;
        let meta = open_tree("meta")?;
        let dead_letters = open_tree("dead_letters")?;
        let data_path = dir.join("sled").join("db");
        let data_file = File::open(&data_path).map_err(|e| WalError::io(&data_path, "open sled's data file", e))?;
        // The files sled just created must survive a power cut too. sled never syncs its `conf` (found by the
        // power-loss test); a zeroed one could make sled refuse to open.
        let conf = dir.join("sled").join("conf");
        File::open(&conf).and_then(|f| f.sync_all()).map_err(|e| WalError::io(&conf, "fsync sled's conf", e))?;
        sync_dir(&dir.join("sled"))?;
        sync_dir(&dir)?;

        let scan = scan_records(&records, &dir)?;
        let last_seq = last_durable_seq(scan.last_seq, &meta, &dir)?;
        if let Some(lost) = lost_range(last_seq, acknowledged) {
            return Err(WalError::Corrupt { dir, detail: lost.describe() });
        }
        let live_bytes = scan.live_bytes;
        let next_seq = last_seq.map_or(options.first_seq.max(1), |s| s + 1);
        let (durable_seq, _) = watch::channel(next_seq - 1);
        let shared = Arc::new(Shared {
            durable_seq,
            appended_seq: AtomicU64::new(next_seq - 1),
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
            sync_lock: Mutex::new(()),
            disk_bytes: AtomicU64::new(0),
            live_bytes: AtomicU64::new(live_bytes),
            group_commits: AtomicU64::new(0),
            data_syncs: AtomicU64::new(0),
            data_file,
            mark,
            dir: dir.clone(),
        });
        shared.refresh_disk_bytes();

        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer::new(db.clone(), records.clone(), meta.clone(), shared.clone(), &options, next_seq, rx);
        let mark_syncer = {
            let shared = shared.clone();
            move || durability::mark_syncer(shared)
        };
        let mut threads = vec![
            std::thread::Builder::new()
                .name("wal-writer".into())
                .spawn(move || writer.run())
                .map_err(|e| WalError::io(&dir, "spawn the WAL writer thread", e))?,
            std::thread::Builder::new()
                .name("wal-mark".into())
                .spawn(mark_syncer)
                .map_err(|e| WalError::io(&dir, "spawn the WAL mark thread", e))?,
        ];
        if let Durability::Interval { interval_ms } = options.durability {
            let (db, shared) = (db.clone(), shared.clone());
            let flusher = move || durability::interval_flusher(db, shared, interval_ms);
            threads.push(
                std::thread::Builder::new()
                    .name("wal-flusher".into())
                    .spawn(flusher)
                    .map_err(|e| WalError::io(&dir, "spawn the WAL flusher thread", e))?,
            );
        }
        tracing::info!(dir = %dir.display(), next_seq, durability = ?options.durability, "WAL open");
        Ok(Wal {
            inner: Arc::new(Inner {
                dir,
                db,
                records,
                cursors,
                meta,
                dead_letters,
                shared,
                options,
                tx,
                threads: Mutex::new(threads),
                _lock: lock,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn stats(&self) -> Result<WalStats, WalError> {
        let shared = &self.inner.shared;
        let first = self.inner.records.first().map_err(|e| self.sled_err("read the WAL", e))?;
        let first_seq = first.map(|(key, _)| be_u64(&key));
        let last_record_seq = match self.inner.records.last().map_err(|e| self.sled_err("read the WAL", e))? {
            Some((key, value)) => {
                Some(Chunk::decode(&key, &value).map_err(|reason| self.corrupt(&key, reason))?.last_seq())
            }
            None => None,
        };
        let durable = *shared.durable_seq.borrow();
        Ok(WalStats {
            first_seq,
            last_seq: durable,
            // A chunk being written may reach beyond what is durable yet.
            last_record_seq: last_record_seq.map(|last| last.min(durable)),
            disk_bytes: shared.disk_bytes.load(Ordering::Relaxed),
            live_bytes: shared.live_bytes.load(Ordering::Relaxed),
            max_bytes: self.inner.options.max_bytes,
            group_commits: shared.group_commits.load(Ordering::Relaxed),
            data_syncs: shared.data_syncs.load(Ordering::Relaxed),
            // Few by nature, so counting them is cheap.
            dead_letters: self.inner.dead_letters.len() as u64,
        })
    }

    /// Stops the writer after it has answered everything queued, flushes and syncs. Appends after this
    /// fail with [`WalError::Closed`]. The database itself closes when the last clone is dropped.
    pub fn close(&self) -> Result<(), WalError> {
        // The writer drains its queue and exits when it sees `Close`; a full queue makes us wait, as it should.
        let _ = self.inner.tx.blocking_send(Request::Close);
        let threads: Vec<_> = match self.inner.threads.lock() {
            Ok(mut threads) => threads.drain(..).collect(),
            Err(poisoned) => poisoned.into_inner().drain(..).collect(),
        };
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a WAL thread panicked");
            }
        }
        self.flush()
    }

    pub(crate) fn sled_err(&self, what: &'static str, e: sled::Error) -> WalError {
        WalError::sled(&self.inner.dir, what, e)
    }

    pub(crate) fn corrupt(&self, key: &[u8], reason: String) -> WalError {
        WalError::Corrupt { dir: self.inner.dir.clone(), detail: format!("chunk at seq {}: {reason}", be_u64(key)) }
    }
}

pub(crate) fn take_lock(dir: &Path) -> Result<nix::fcntl::Flock<File>, WalError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| WalError::io(&path, "open the lock file", e))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, _)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(WalError::Locked { dir: dir.to_path_buf(), holder: holder.trim().to_string() });
        }
    };
    let pid = std::process::id().to_string();
    lock.set_len(0)
        .and_then(|_| lock.rewind())
        .and_then(|_| lock.write_all(pid.as_bytes()))
        .map_err(|e| WalError::io(&path, "write the lock file", e))?;
    Ok(lock)
}

/// Opens sled. We hold the directory's lock, so a sled lock conflict can only be this process's previous
/// handle, whose background threads release sled's file a moment after the last `Db` is dropped.
pub(crate) fn open_sled(dir: &Path, options: &WalOptions) -> Result<sled::Db, WalError> {
    let config = sled::Config::new()
        .path(dir.join("sled"))
        .cache_capacity(options.cache_bytes)
        .segment_size(SEGMENT_BYTES)
        .flush_every_ms(None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match config.open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() > deadline {
                    return Err(WalError::sled(dir, "open sled", sled::Error::Io(e)));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result.map_err(|e| WalError::sled(dir, "open sled", e)),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| WalError::io(dir, "fsync the directory", e))
}
