//! The spool drain: events that scripts wrote to spool files while they could not reach the agent are
//! appended to the WAL, with their own event ids, and each file is deleted once that is durable.
//!
//! The contract with the writers is in docs/spool.md. In short: a writer holds an exclusive `flock` on its
//! file for as long as it may write to it; a file whose lock the agent can take is finished and ours. A crash
//! between the WAL sync and the delete drains the file again at the next start, which the event ids make
//! harmless (the sinks store an event id once). So the only state kept here is in memory: how far a file
//! was drained before the WAL refused more (full), so that a large file still makes progress.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use telemetry_wal::{Appender, DeadLetter, Pending, Wal, WalError};
use tokio::sync::{mpsc, watch};

use crate::clock::{now_ms, now_us};
use crate::event::parse_line;
use crate::identity::is_generated_id;
use crate::ops::metrics::METRICS;

/// The sink name under which invalid spool lines are kept as dead letters.
pub const DEAD_LETTER_SINK: &str = "spool";
/// Spool files end with this; anything else in the directory is not ours to read.
const SPOOL_SUFFIX: &str = ".spool";
/// A refused file is renamed with this added, so the log reports it once.
const REFUSED_SUFFIX: &str = ".refused";
/// Notified paths waiting for the drain; beyond it, the next pass scans the directory.
const CHANGED_QUEUE: usize = 4096;
/// A lost notification is made up for by a scan this often (or at once when notify says it lost some).
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// After the WAL refused events (full), the next attempt waits this long, doubling up to the rescan interval.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Events appended before waiting for them to be durable: one group commit's worth, bounded memory.
const BATCH_EVENTS: usize = 1024;
/// Invalid lines of one file kept as dead letters (each one a sync); the rest are counted in the log. A file
/// of garbage must not turn into millions of syncs.
const MAX_DEAD_LETTERS_PER_FILE: u64 = 100;
/// Lines read between checks for a stop, whatever they hold.
const STOP_CHECK_LINES: u64 = 4096;
/// The bytes of an invalid line kept in its dead letter.
const DEAD_LETTER_LINE_BYTES: usize = 4096;

/// What the drain needs.
pub struct SpoolDrain {
    pub dir: PathBuf,
    pub max_file_bytes: u64,
    pub max_line_bytes: usize,
    pub max_future_secs: u64,
    pub wal: Wal,
    pub appender: Appender,
}

/// `status`' view of the spool.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpoolStatus {
    pub dir: String,
    /// Spool files in the directory at the last scan, waiting to be drained (or still being written).
    pub files_pending: i64,
    pub files_drained: u64,
    pub events_ingested: u64,
    /// Lines that were not valid events (dead letters, sink `spool`).
    pub lines_refused: u64,
    /// Files that were not regular, hard-linked or too large.
    pub files_refused: u64,
}

impl SpoolStatus {
    pub fn current(dir: &Path) -> SpoolStatus {
        SpoolStatus {
            dir: dir.display().to_string(),
            files_pending: METRICS.spool_files_pending.get(),
            files_drained: METRICS.spool_files_drained.get(),
            events_ingested: METRICS.spool_events.get(),
            lines_refused: METRICS.spool_lines_refused.get(),
            files_refused: METRICS.spool_files_refused.get(),
        }
    }
}

/// How one attempt at a file ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Drained {
        events: u64,
        refused: u64,
    },
    /// A writer still holds it.
    Busy,
    /// Gone before we got to it (drained already, or deleted).
    Gone,
    Refused(String),
    /// The WAL did not take its events (full, closing): try again later.
    Deferred(String),
}

impl SpoolDrain {
    /// Drains at start, then whenever a file in the directory is closed after writing or moved in, and on a
    /// slow rescan; returns when `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let dir = self.dir.clone();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot create the spool directory");
        }
        let (changed_tx, mut changed) = mpsc::channel::<PathBuf>(CHANGED_QUEUE);
        // Set when a notification was lost (inotify's queue, or ours, overflowed): the next pass scans.
        let lost = Arc::new(AtomicBool::new(false));
        let _watcher = match watch_dir(&dir, changed_tx, lost.clone()) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the spool directory is not watched; it is scanned every 30 s");
                None
            }
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let mut drainer =
            Some(Drainer { spool: self, resume: HashMap::new(), last_dead_letter: None, unrenamable: BTreeSet::new() });
        let mut retry = RETRY_INITIAL;
        let mut next_scan = Instant::now();
        let mut wanted: BTreeSet<PathBuf> = BTreeSet::new();
        let mut stopped = false;
        while !stopped {
            let scan = Instant::now() >= next_scan || lost.swap(false, Ordering::Relaxed);
            if scan || !wanted.is_empty() {
                let Some(mut drain) = drainer.take() else { break };
                let paths = std::mem::take(&mut wanted);
                let flag = stopping.clone();
                let pass = tokio::task::spawn_blocking(move || {
                    let deferred = drain.pass(scan, paths, &flag);
                    (drain, deferred)
                });
                tokio::pin!(pass);
                let result = tokio::select! {
                    result = &mut pass => result,
                    _ = stop.changed() => {
                        // Finish the batch in hand (the WAL is still open), then stop.
                        stopping.store(true, Ordering::Relaxed);
                        stopped = true;
                        (&mut pass).await
                    }
                };
                let Ok((drain, deferred)) = result else {
                    tracing::error!("the spool drain failed; spool files are no longer drained until a restart");
                    break;
                };
                drainer = Some(drain);
                next_scan = if deferred {
                    let at = Instant::now() + retry;
                    retry = (retry * 2).min(RESCAN_INTERVAL);
                    at
                } else {
                    retry = RETRY_INITIAL;
                    if scan {
                        Instant::now() + RESCAN_INTERVAL
                    } else {
                        next_scan
                    }
                };
                if stopped {
                    break;
                }
            }
            tokio::select! {
                _ = stop.changed() => break,
                Some(path) = changed.recv() => {
                    wanted.insert(path);
                    // Writers close many files at once when the agent comes back: take them in one pass.
                    while let Ok(path) = changed.try_recv() {
                        wanted.insert(path);
                    }
                }
                () = tokio::time::sleep_until(next_scan.into()) => {}
            }
        }
    }
}

/// Watches `dir` for files closed after writing or moved in, and sends their paths. (Not for files created:
/// a new file is empty and its writer is about to lock it.) A lost notification sets `lost`.
fn watch_dir(
    dir: &Path,
    changed: mpsc::Sender<PathBuf>,
    lost: Arc<AtomicBool>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::{EventKind, Watcher};
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        let event = match result {
            Ok(event) if !event.need_rescan() => event,
            _ => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
        };
        let finished = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write)) | EventKind::Modify(ModifyKind::Name(_))
        );
        if finished {
            for path in event.paths {
                if changed.try_send(path).is_err() {
                    lost.store(true, Ordering::Relaxed);
                }
            }
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

struct Drainer {
    spool: SpoolDrain,
    /// Lines already durable in the WAL, of files the WAL stopped taking midway.
    resume: HashMap<FileKey, u64>,
    /// The key of the last dead letter written: keys are microseconds, made unique.
    last_dead_letter: Option<u64>,
    /// Refused files that could not be renamed: skipped, so the log says it once.
    unrenamable: BTreeSet<PathBuf>,
}

impl Drainer {
    /// One pass: every spool file in the directory (`scan`) or the named ones. True if a file was deferred
    /// (the WAL refused its events), so the caller tries again soon.
    fn pass(&mut self, scan: bool, named: BTreeSet<PathBuf>, stopping: &AtomicBool) -> bool {
        let dir = self.spool.dir.clone();
        let paths: Vec<PathBuf> = if scan {
            match std::fs::read_dir(&dir) {
                Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_spool_name(p)).collect(),
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot read the spool directory");
                    return false;
                }
            }
        } else {
            // Only names directly in the directory: a notification is never a way to read elsewhere.
            named.into_iter().filter(|p| p.parent() == Some(dir.as_path()) && is_spool_name(p)).collect()
        };
        if scan {
            // Entries of files no longer there (deleted by their owner, say) would only grow the map.
            let present: std::collections::HashSet<(u64, u64)> =
                paths.iter().filter_map(|p| std::fs::symlink_metadata(p).ok()).map(|m| (m.dev(), m.ino())).collect();
            self.resume.retain(|key, _| present.contains(&(key.dev, key.ino)));
        }
        let mut deferred = false;
        for path in paths {
            if stopping.load(Ordering::Relaxed) {
                break;
            }
            if self.unrenamable.contains(&path) {
                continue;
            }
            let started = Instant::now();
            let file = file_name(&path);
            match self.drain(&path, stopping) {
                Outcome::Drained { events, refused } => {
                    METRICS.spool_files_drained.inc();
                    tracing::info!(
                        file,
                        events,
                        refused,
                        took_ms = started.elapsed().as_millis() as u64,
                        "spool file drained"
                    );
                }
                Outcome::Busy | Outcome::Gone => {}
                Outcome::Refused(reason) => {
                    let renamed = path.with_file_name(format!("{file}{REFUSED_SUFFIX}"));
                    let kept = match std::fs::rename(&path, &renamed) {
                        Ok(()) => format!("renamed {}", file_name(&renamed)),
                        Err(e) => {
                            // Said once: it stays where it is, and later passes skip it.
                            self.unrenamable.insert(path.clone());
                            format!("could not be renamed ({e}); left as it is")
                        }
                    };
                    METRICS.spool_files_refused.inc();
                    tracing::error!(file, reason, kept, "spool file refused; nothing of it was ingested");
                }
                Outcome::Deferred(reason) => {
                    deferred = true;
                    tracing::warn!(file, reason, "spool file not drained yet; trying again soon");
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let pending = entries.filter_map(|e| e.ok()).filter(|e| is_spool_name(&e.path())).count();
            METRICS.spool_files_pending.set(pending as i64);
        }
        deferred
    }

    fn drain(&mut self, path: &Path, stopping: &AtomicBool) -> Outcome {
        // No symlinks (O_NOFOLLOW); O_NONBLOCK so that a FIFO cannot hold us up in open().
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Outcome::Gone,
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Outcome::Refused("a symbolic link".into());
            }
            // A socket (ENXIO) is no writer's file either.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
                return Outcome::Refused("not a regular file".into())
            }
            // Perhaps a writer between its create and its fchmod to 0640: we cannot tell, so never refuse it.
            Err(e) => return Outcome::Deferred(format!("cannot open: {e}")),
        };
        let meta = match file.metadata() {
            Ok(meta) => meta,
            Err(e) => return Outcome::Deferred(format!("cannot stat: {e}")),
        };
        if !meta.file_type().is_file() {
            return Outcome::Refused("not a regular file".into());
        }
        // Only a file whose lock we hold may be judged further (and renamed): a live writer would go on writing
        // into a renamed file that nobody drains.
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Outcome::Busy,
            Err((_, e)) => return Outcome::Deferred(format!("cannot lock: {e}")),
        };
        // Its size now that no writer holds it: what we read (a script appending without the lock cannot keep
        // the drain busy).
        let meta = match lock.metadata() {
            Ok(meta) => meta,
            Err(e) => return Outcome::Deferred(format!("cannot stat: {e}")),
        };
        if meta.nlink() != 1 {
            // A hard link to a file elsewhere (the WAL's, say) would be read with the agent's rights.
            return Outcome::Refused(format!("hard-linked ({} names)", meta.nlink()));
        }
        if meta.len() > self.spool.max_file_bytes {
            return Outcome::Refused(format!(
                "{} bytes, over [spool] max_file_bytes ({})",
                meta.len(),
                self.spool.max_file_bytes
            ));
        }
        let key = FileKey::of(&meta);
        let done_before = self.resume.get(&key).copied().unwrap_or(0);
        let name = file_name(path);
        let drained = self.ingest(&lock, meta.len(), &name, done_before, stopping);
        match drained {
            Ingested::All { events, refused } => {
                self.resume.remove(&key);
                // Tests stop the agent here: its events are durable, the file is not yet deleted.
                fail::fail_point!("spool::before_delete");
                // Deleted while we still hold the lock: a writer that opened the name meanwhile sees the inode
                // change and starts a new file. The name must still be this file (a script may rename its own).
                match std::fs::symlink_metadata(path) {
                    Ok(now) if (now.dev(), now.ino()) == (key.dev, key.ino) => {
                        if let Err(e) = std::fs::remove_file(path) {
                            tracing::error!(file = name, error = %e, "cannot delete a drained spool file; it will be drained again (harmless, by event id)");
                        }
                    }
                    _ => {}
                }
                Outcome::Drained { events, refused }
            }
            Ingested::Partly { lines_done, reason } => {
                self.resume.insert(key, lines_done);
                Outcome::Deferred(reason)
            }
        }
    }

    /// Appends the file's events from line `skip + 1` on; every appended event is durable when this returns.
    fn ingest(&mut self, file: &File, len: u64, name: &str, skip: u64, stopping: &AtomicBool) -> Ingested {
        let max_line_bytes = self.spool.max_line_bytes;
        let mut reader = BufReader::with_capacity(64 * 1024, file.take(len));
        let mut line = Vec::new();
        let mut line_no = 0u64;
        // Appended events with their line numbers.
        let mut batch: Vec<(u64, Pending)> = Vec::with_capacity(BATCH_EVENTS);
        // Lines up to this one are durable or refused.
        let mut settled = skip;
        let (mut events, mut refused) = (0u64, 0u64);
        // Waits for the batch; lines up to `upto` are settled, or, after a refusal, those before the first refused
        // event (the WAL refuses in order: those after it were refused too, and are tried again).
        let finish_batch = |batch: &mut Vec<(u64, Pending)>, settled: &mut u64, upto: u64| -> Result<(), String> {
            let mut failure = None;
            for (line, pending) in batch.drain(..) {
                match pending.blocking_durable() {
                    Ok(_) if failure.is_none() => {
                        METRICS.spool_events.inc();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if failure.is_none() {
                            *settled = line - 1;
                            failure = Some(describe_wal_error(&e));
                        }
                    }
                }
            }
            match failure {
                Some(reason) => Err(reason),
                None => {
                    *settled = upto;
                    Ok(())
                }
            }
        };
        loop {
            line.clear();
            let read = match read_line(&mut reader, &mut line, max_line_bytes) {
                Ok(read) => read,
                Err(e) => return Ingested::Partly { lines_done: settled, reason: format!("read failed: {e}") },
            };
            let too_long = match read {
                Line::End => break,
                Line::Torn => {
                    tracing::info!(
                        file = name,
                        line = line_no + 1,
                        "ignoring a last line without its newline (its writer died mid-write)"
                    );
                    break;
                }
                Line::Complete => false,
                Line::TooLong => true,
            };
            line_no += 1;
            if line_no <= skip {
                continue;
            }
            let valid =
                if too_long { Err(format!("line_too_long: over {} bytes", max_line_bytes)) } else { self.check(&line) };
            match valid {
                Ok(payload) => match self.spool.appender.blocking_append(payload) {
                    Ok(pending) => {
                        batch.push((line_no, pending));
                        events += 1;
                    }
                    Err(e) => {
                        let _ = finish_batch(&mut batch, &mut settled, line_no - 1);
                        return Ingested::Partly { lines_done: settled, reason: describe_wal_error(&e) };
                    }
                },
                Err(error) => {
                    refused += 1;
                    METRICS.spool_lines_refused.inc();
                    if refused <= MAX_DEAD_LETTERS_PER_FILE {
                        if let Err(e) = self.dead_letter(name, line_no, &error, &line) {
                            let _ = finish_batch(&mut batch, &mut settled, line_no - 1);
                            return Ingested::Partly { lines_done: settled, reason: describe_wal_error(&e) };
                        }
                        tracing::warn!(file = name, line = line_no, error, "invalid spool line kept as a dead letter");
                    }
                    if batch.is_empty() {
                        // Settled: a retry after a full WAL must not keep it again.
                        settled = line_no;
                    }
                }
            }
            // A batch is full, or many lines were refused: a stop does not wait for the rest of a large file.
            if batch.len() >= BATCH_EVENTS || line_no % STOP_CHECK_LINES == 0 {
                if let Err(reason) = finish_batch(&mut batch, &mut settled, line_no) {
                    return Ingested::Partly { lines_done: settled, reason };
                }
                if stopping.load(Ordering::Relaxed) {
                    return Ingested::Partly { lines_done: settled, reason: "the agent is stopping".into() };
                }
            }
        }
        if let Err(reason) = finish_batch(&mut batch, &mut settled, line_no) {
            return Ingested::Partly { lines_done: settled, reason };
        }
        if refused > MAX_DEAD_LETTERS_PER_FILE {
            tracing::error!(
                file = name,
                refused,
                kept = MAX_DEAD_LETTERS_PER_FILE,
                "invalid spool lines beyond the first {MAX_DEAD_LETTERS_PER_FILE} were dropped, not kept"
            );
        }
        Ingested::All { events, refused }
    }

    /// The WAL payload of a valid spool line, or why it is not one.
    fn check(&self, line: &[u8]) -> Result<Vec<u8>, String> {
        let event = parse_line(line, now_us(), self.spool.max_future_secs)
            .map_err(|rejection| format!("{}: {}", rejection.code, rejection.error))?;
        match event.client_event_id() {
            None => Err("invalid_event: a spool line needs its `event_id` (without one, draining the file again \
                         after a crash would store the event twice)"
                .into()),
            Some(id) if is_generated_id(id) => {
                Err("invalid_event: `event_id` values starting with `~` are reserved for ids the agent generates"
                    .into())
            }
            Some(_) => Ok(event.encode()),
        }
    }

    fn dead_letter(&mut self, file: &str, line_no: u64, error: &str, line: &[u8]) -> Result<(), WalError> {
        let kept = &line[..line.len().min(DEAD_LETTER_LINE_BYTES)];
        // Keyed by time, so they list in order; the same key would replace an earlier letter, also one of an
        // earlier run (the clock may have stepped back).
        let last = match self.last_dead_letter {
            Some(last) => last,
            None => {
                let letters = self.spool.wal.dead_letters()?;
                letters.iter().filter(|l| l.sink == DEAD_LETTER_SINK).map(|l| l.seq).max().unwrap_or(0)
            }
        };
        let key = u64::try_from(now_us()).unwrap_or(0).max(last + 1);
        self.last_dead_letter = Some(key);
        self.spool.wal.add_dead_letter(&DeadLetter {
            sink: DEAD_LETTER_SINK.to_string(),
            seq: key,
            error: format!("{file}:{line_no}: {error}"),
            at_ms: now_ms(),
            payload: kept.to_vec(),
        })
    }
}

/// A finished spool file, as it was when its lock was taken: a handed-over file never changes, so a file with
/// the same key is the same file (an inode number alone is reused once a file is deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

enum Ingested {
    All {
        events: u64,
        refused: u64,
    },
    /// The WAL stopped taking events; lines up to `lines_done` are durable (or refused).
    Partly {
        lines_done: u64,
        reason: String,
    },
}

enum Line {
    Complete,
    /// Longer than the limit; its bytes up to the newline were skipped.
    TooLong,
    /// Bytes at the end of the file without a newline.
    Torn,
    End,
}

/// Reads one line into `line` (without its newline), keeping at most `max` bytes of it.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    let n = reader.by_ref().take(max as u64 + 1).read_until(b'\n', line)?;
    if n == 0 {
        return Ok(Line::End);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Line::Complete);
    }
    if line.len() <= max {
        return Ok(Line::Torn);
    }
    // Too long: skip to the newline without keeping the bytes.
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(Line::Torn);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(Line::TooLong);
            }
            None => {
                let len = buf.len();
                reader.consume(len);
            }
        }
    }
}

fn is_spool_name(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(SPOOL_SUFFIX) && !n.starts_with('.'))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn describe_wal_error(e: &WalError) -> String {
    match e {
        WalError::Full { .. } => format!("the WAL is full: {e}"),
        _ => e.to_string(),
    }
}
