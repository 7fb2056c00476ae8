//! `telemetry-wal`: a durable, ordered append log on sled.
//!
//! Producers [`Appender::append`] opaque records; one writer thread gathers everything queued (group commit),
//! writes it as a few sled values, makes it durable with one flush plus an `fdatasync` of sled's data file,
//! and only then answers every waiter with the record's sequence number. Readers see durable records only,
//! in sequence order, through [`Wal::read_after`], and keep their position in named, persisted cursors.
//! [`Wal::truncate`] drops what every gating cursor has passed.
//!
//! Vocabulary: a *record* is one payload with its `seq`; a *chunk* is the sled value that holds a run of
//! consecutive records (keyed by its first seq, big-endian, so sled iterates in order); a *group commit*
//! writes one or more chunks with one flush.

mod append;
mod chunk;
mod dead_letters;
mod error;
/// Entry points for the fuzz targets in `fuzz/` (not part of the API).
#[doc(hidden)]
pub mod fuzzing;
mod mark;
mod read;
mod tables;
mod truncate;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};

pub use append::{Appender, Pending, MAX_RECORD_BYTES};
pub use dead_letters::DeadLetter;
pub use error::WalError;
pub use read::Record;
pub use tables::Table;
pub use truncate::{PRESSURE_DISK_PERCENT, PRESSURE_RECORDS_DIVISOR};

use append::{Request, Writer};
use chunk::Chunk;
use mark::AckMark;
use truncate::META_HIGH_WATER;

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
    pub retain: std::time::Duration,
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
        }
    }
}

/// sled's log segment size. A message larger than a quarter of it becomes a blob (see `MAX_RECORD_BYTES`).
const SEGMENT_BYTES: usize = 8 << 20;

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
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    db: sled::Db,
    records: sled::Tree,
    cursors: sled::Tree,
    meta: sled::Tree,
    dead_letters: sled::Tree,
    shared: Arc<Shared>,
    options: WalOptions,
    tx: mpsc::Sender<Request>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Held for the life of the WAL: a second process fails to take it.
    _lock: nix::fcntl::Flock<File>,
}

/// State the writer thread and the readers share.
struct Shared {
    /// The newest durable seq; readers never see past it.
    durable_seq: watch::Sender<u64>,
    /// The newest seq written to sled (interval mode: not yet durable until the flusher runs).
    appended_seq: AtomicU64,
    /// Set when the writer has stopped; the interval flusher stops too.
    closing: AtomicBool,
    /// The first write, flush or sync failure, whichever thread met it. After it nothing more is acknowledged
    /// nor made durable: the state on disk is unknown (a failed fdatasync may have dropped dirty pages), so
    /// only a restart and sled's recovery can tell what is durable.
    failure: Mutex<Option<String>>,
    /// Held across every flush and sync (see `Shared::flush_and_sync`).
    sync_lock: Mutex<()>,
    disk_bytes: AtomicU64,
    /// Bytes of the chunks currently stored (summed at open, kept up to date by appends and truncation).
    live_bytes: AtomicU64,
    group_commits: AtomicU64,
    data_syncs: AtomicU64,
    /// sled's data file, opened by us so that we can `fdatasync` it (fsync works per inode).
    data_file: File,
    /// The newest acknowledged seq, kept beside sled (see `mark.rs`).
    mark: AckMark,
    dir: PathBuf,
}

const META_SEQ_LEASE: &[u8] = b"seq_lease";
const LOCK_FILE: &str = "wal.lock";
/// Requests waiting for the writer; beyond this, `append` waits (backpressure).
const QUEUE_CAPACITY: usize = 16 * 1024;

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
            move || append::mark_syncer(shared)
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
            let flusher = move || append::interval_flusher(db, shared, interval_ms);
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

    fn sled_err(&self, what: &'static str, e: sled::Error) -> WalError {
        WalError::sled(&self.inner.dir, what, e)
    }

    fn corrupt(&self, key: &[u8], reason: String) -> WalError {
        WalError::Corrupt { dir: self.inner.dir.clone(), detail: format!("chunk at seq {}: {reason}", be_u64(key)) }
    }
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
    fn refresh_disk_bytes(&self) {
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

fn take_lock(dir: &Path) -> Result<nix::fcntl::Flock<File>, WalError> {
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
fn open_sled(dir: &Path, options: &WalOptions) -> Result<sled::Db, WalError> {
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

struct Scan {
    last_seq: Option<u64>,
    live_bytes: u64,
}

/// Reads every chunk once at open: checks its CRC (a damaged WAL refuses to open rather than fail later, or
/// be forwarded), and sums what the records hold. Cheap next to what a sink does with the same bytes.
fn scan_records(records: &sled::Tree, dir: &Path) -> Result<Scan, WalError> {
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
fn last_durable_seq(from_records: Option<u64>, meta: &sled::Tree, dir: &Path) -> Result<Option<u64>, WalError> {
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
    fn describe(&self) -> String {
        format!(
            "sled's log ends at seq {} but seqs up to {} were acknowledged: {} acknowledged records are lost \
             (sled's data file was truncated or damaged; sled drops everything after the damage)",
            self.first - 1,
            self.last,
            self.last - self.first + 1
        )
    }
}

fn lost_range(last_seq: Option<u64>, acknowledged: Option<u64>) -> Option<LostRange> {
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

fn be_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(buf)
}
