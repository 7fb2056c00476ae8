//! Append: producers queue records through an [`Appender`]; the group-commit writer, one thread, drains the
//! request queue, writes everything it got with one flush, then answers every waiter.
//!
//! On disk: each group becomes chunks of about `CHUNK_TARGET_BYTES` in the `records` tree, keyed by their
//! first seq and written in one sled batch. In interval mode the writer also keeps a seq lease in `meta`,
//! synced before any seq under it is handed out, so that seqs lost in a crash are never handed out again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::chunk::Chunk;
use crate::durability::Shared;
use crate::{Durability, Wal, WalError, WalOptions};

pub(crate) enum Request {
    Append { payload: Vec<u8>, reply: oneshot::Sender<Result<u64, WalError>> },
    Close,
}

/// The largest payload one record may carry. Bounded so that a sled leaf (at most 17 values) never
/// exceeds sled's blob threshold: sled writes blobs to separate files that it never fsyncs.
pub const MAX_RECORD_BYTES: usize = 112 * 1024;

/// A producer's handle: cheap to clone.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Request>,
}

/// An append the writer has accepted; resolves once the record is durable (per the durability mode).
#[must_use = "an append is not durable until its Pending resolves"]
pub struct Pending(oneshot::Receiver<Result<u64, WalError>>);

impl Appender {
    /// Queues `payload`, waiting for room in the queue. The returned [`Pending`] yields the record's seq.
    pub async fn append(&self, payload: Vec<u8>) -> Result<Pending, WalError> {
        let (request, pending) = Self::request(payload)?;
        self.tx.send(request).await.map_err(|_| WalError::Closed)?;
        Ok(pending)
    }

    /// [`Appender::append`] for threads outside an async runtime.
    pub fn blocking_append(&self, payload: Vec<u8>) -> Result<Pending, WalError> {
        let (request, pending) = Self::request(payload)?;
        self.tx.blocking_send(request).map_err(|_| WalError::Closed)?;
        Ok(pending)
    }

    fn request(payload: Vec<u8>) -> Result<(Request, Pending), WalError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(WalError::TooLarge { len: payload.len(), max: MAX_RECORD_BYTES });
        }
        let (reply, rx) = oneshot::channel();
        Ok((Request::Append { payload, reply }, Pending(rx)))
    }
}

impl Pending {
    /// Waits until the record is durable and returns its seq.
    pub async fn durable(self) -> Result<u64, WalError> {
        self.0.await.map_err(|_| WalError::Closed)?
    }

    /// [`Pending::durable`] for threads outside an async runtime.
    pub fn blocking_durable(self) -> Result<u64, WalError> {
        self.0.blocking_recv().map_err(|_| WalError::Closed)?
    }
}

impl Wal {
    /// A handle for producers.
    pub fn appender(&self) -> Appender {
        Appender { tx: self.inner.tx.clone() }
    }
}

/// Bounds on one group commit: enough to amortise a flush, small enough to keep latency and memory low.
const MAX_GROUP_RECORDS: usize = 8192;
const MAX_GROUP_BYTES: usize = 8 << 20;
/// Groups smaller than this wait `WalOptions::commit_delay` for more before they are written.
const GATHER_BELOW: usize = 64;
/// See `Writer::measure_disk`.
const MEASURE_DISK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// Records are packed into sled values of about this size (see `MAX_RECORD_BYTES` for the upper bound).
const CHUNK_TARGET_BYTES: usize = 4 * 1024;
/// See `WalOptions::max_bytes`.
const LIVE_FRACTION_AT_CAP: u64 = 4;

/// Whether appends are refused: the directory at the cap and the records stored filling a quarter of it.
pub(crate) fn at_cap(disk_bytes: u64, live_bytes: u64, max_bytes: u64) -> bool {
    disk_bytes >= max_bytes && live_bytes >= max_bytes / LIVE_FRACTION_AT_CAP
}
/// In `meta`, interval mode: seqs up to this may have been handed out; open starts after it.
pub(crate) const META_SEQ_LEASE: &[u8] = b"seq_lease";
/// In interval mode, seqs are leased durably this many at a time so that none is handed out twice.
const LEASE_STEP: u64 = 1 << 20;

pub(crate) struct Writer {
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    shared: Arc<Shared>,
    durability: Durability,
    max_bytes: u64,
    commit_delay: std::time::Duration,
    /// When `disk_bytes` was last read off the directory.
    disk_measured: std::time::Instant,
    next_seq: u64,
    /// Seqs below this are covered by a durable lease (interval mode only).
    leased_until: u64,
    rx: mpsc::Receiver<Request>,
}

type Waiter = oneshot::Sender<Result<u64, WalError>>;

/// A group commit in the making: the requests taken from the queue.
#[derive(Default)]
struct Group {
    payloads: Vec<Vec<u8>>,
    waiters: Vec<Waiter>,
    bytes: usize,
}

impl Group {
    fn full(&self) -> bool {
        self.payloads.len() >= MAX_GROUP_RECORDS || self.bytes >= MAX_GROUP_BYTES
    }

    /// Adds `first` and whatever else is queued, up to the bounds. True if a close request came.
    fn gather(&mut self, first: Request, rx: &mut mpsc::Receiver<Request>) -> bool {
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Append { payload, reply } => {
                    self.bytes += payload.len();
                    self.waiters.push(reply);
                    self.payloads.push(payload);
                }
                Request::Close => return true,
            }
            if !self.full() {
                next = rx.try_recv().ok();
            }
        }
        false
    }
}

impl Writer {
    pub fn new(
        db: sled::Db,
        records: sled::Tree,
        meta: sled::Tree,
        shared: Arc<Shared>,
        options: &WalOptions,
        next_seq: u64,
        rx: mpsc::Receiver<Request>,
    ) -> Writer {
        Writer {
            db,
            records,
            meta,
            shared,
            durability: options.durability,
            max_bytes: options.max_bytes,
            commit_delay: options.commit_delay,
            disk_measured: std::time::Instant::now(),
            next_seq,
            leased_until: next_seq,
            rx,
        }
    }

    pub fn run(mut self) {
        let mut group = Group::default();
        while let Some(first) = self.rx.blocking_recv() {
            let mut closing = group.gather(first, &mut self.rx);
            // A small group at a low rate: wait briefly for more, so that one flush and sync serves them all.
            // (At high rates the previous commit's sync was the wait: the group is large already.)
            if !closing && self.gathers() && group.payloads.len() < GATHER_BELOW && !group.full() {
                std::thread::sleep(self.commit_delay);
                if let Ok(next) = self.rx.try_recv() {
                    closing = group.gather(next, &mut self.rx);
                }
            }
            if !group.payloads.is_empty() {
                self.commit(&mut group.payloads, &mut group.waiters);
            }
            group.bytes = 0;
            if closing {
                break;
            }
        }
        self.shared.closing.store(true, Ordering::Relaxed);
    }

    /// Keeps `disk_bytes` current for the cap after a commit of `written` bytes: walking the directory costs as
    /// much as a small group's sync, so it is done at most every `MEASURE_DISK_EVERY`, and in between the
    /// bytes written are added (an overestimate: sled also reuses freed space). Within 1/8 of the cap it is
    /// walked after every commit, so that the cap is decided on the real figure, as it always was.
    fn measure_disk(&mut self, written: u64) {
        let estimate = self.shared.disk_bytes.fetch_add(written, Ordering::Relaxed) + written;
        let near_cap = estimate >= self.max_bytes - self.max_bytes / 8;
        if near_cap || self.disk_measured.elapsed() >= MEASURE_DISK_EVERY {
            self.shared.refresh_disk_bytes();
            self.disk_measured = std::time::Instant::now();
        }
    }

    /// Whether small groups wait for more: only where each group costs a sync.
    fn gathers(&self) -> bool {
        self.durability == Durability::Fsync && !self.commit_delay.is_zero()
    }

    /// Writes the group, makes it durable (fsync mode) and answers every waiter.
    fn commit(&mut self, payloads: &mut Vec<Vec<u8>>, waiters: &mut Vec<Waiter>) {
        if let Some(failure) = self.shared.failure() {
            for waiter in waiters.drain(..) {
                let _ = waiter.send(Err(WalError::Failed { dir: self.shared.dir.clone(), detail: failure.clone() }));
            }
            payloads.clear();
            return;
        }
        // The cap: refuse what does not fit, in order, and write the rest. sled reuses the space of
        // truncated records, so a directory at the cap that holds few live records still has room.
        let used = self.shared.disk_bytes.load(Ordering::Relaxed);
        let live = self.shared.live_bytes.load(Ordering::Relaxed);
        let mut group_bytes = 0u64;
        let mut accepted = Vec::with_capacity(waiters.len());
        let mut accepted_payloads: Vec<&[u8]> = Vec::with_capacity(payloads.len());
        for (waiter, payload) in waiters.drain(..).zip(payloads.iter()) {
            let after = group_bytes + payload.len() as u64;
            if at_cap(used + after, live + after, self.max_bytes) {
                let _ = waiter.send(Err(WalError::Full { used, max: self.max_bytes }));
            } else {
                group_bytes = after;
                accepted_payloads.push(payload);
                accepted.push(waiter);
            }
        }
        if !accepted.is_empty() {
            let first_seq = self.next_seq;
            let result = self.write(first_seq, &accepted_payloads);
            match result {
                Ok(()) => {
                    for (i, waiter) in accepted.into_iter().enumerate() {
                        let _ = waiter.send(Ok(first_seq + i as u64));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, records = accepted.len(), first_seq, "WAL group commit failed");
                    // The records may be in sled already, and a failed sync leaves the disk's state unknown:
                    // acknowledging anything later could build on a hole.
                    self.shared.fail(&e);
                    for waiter in accepted {
                        let _ = waiter.send(Err(e.shared_copy()));
                    }
                }
            }
        }
        payloads.clear();
    }

    fn write(&mut self, first_seq: u64, payloads: &[&[u8]]) -> Result<(), WalError> {
        let last_seq = first_seq + payloads.len() as u64 - 1;
        // Seqs are spent even if the write fails: a record may still reach disk, and its seq must stay unique.
        self.next_seq = last_seq + 1;
        let dir = &self.shared.dir;
        if matches!(self.durability, Durability::Interval { .. }) && last_seq >= self.leased_until {
            // Acked records can be lost in this mode; their seqs must not come back after a restart.
            let lease = last_seq + LEASE_STEP;
            self.meta.insert(META_SEQ_LEASE, &lease.to_be_bytes()).map_err(|e| WalError::sled(dir, "lease seqs", e))?;
            self.shared.flush_and_sync(&self.db)?;
            self.leased_until = lease;
        }

        let appended_at_ms = now_ms();
        let mut batch = sled::Batch::default();
        let mut chunk_bytes_total = 0u64;
        let mut chunk_start = 0;
        let mut chunk_bytes = 0;
        for (i, payload) in payloads.iter().enumerate() {
            if i > chunk_start && chunk_bytes + payload.len() > CHUNK_TARGET_BYTES {
                let key = (first_seq + chunk_start as u64).to_be_bytes();
                let value = Chunk::encode(appended_at_ms, &payloads[chunk_start..i]);
                chunk_bytes_total += value.len() as u64;
                batch.insert(&key, value);
                chunk_start = i;
                chunk_bytes = 0;
            }
            chunk_bytes += payload.len();
        }
        let key = (first_seq + chunk_start as u64).to_be_bytes();
        let value = Chunk::encode(appended_at_ms, &payloads[chunk_start..]);
        chunk_bytes_total += value.len() as u64;
        batch.insert(&key, value);
        self.records.apply_batch(batch).map_err(|e| WalError::sled(dir, "append", e))?;
        fail::fail_point!("wal::after_append", |_| Err(crate::error::injected(dir, "flush")));
        self.shared.live_bytes.fetch_add(chunk_bytes_total, Ordering::Relaxed);
        self.shared.group_commits.fetch_add(1, Ordering::Relaxed);

        match self.durability {
            Durability::Fsync => {
                // sled's flush is sync_file_range: it does not reach the disk's cache nor metadata, hence the
                // fdatasync. Fails (and answers the group with the failure) once any caller's sync failed.
                self.shared.flush_and_sync(&self.db)?;
                self.shared.mark.record(last_seq);
                self.shared.durable_seq.send_replace(last_seq);
                self.measure_disk(chunk_bytes_total);
            }
            Durability::Interval { .. } => {
                self.shared.appended_seq.store(last_seq, Ordering::Release);
            }
        }
        tracing::trace!(first_seq, records = payloads.len(), "group commit");
        Ok(())
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
