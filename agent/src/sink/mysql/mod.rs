//! The MySQL forwarder: tails the WAL from cursor `mysql` and writes each batch as one transaction — a
//! multi-row `INSERT ... ON DUPLICATE KEY UPDATE event_id = event_id` per table plus this run's
//! `telemetry_run_offsets` row — so a batch is in MySQL exactly once however often it is sent. After COMMIT
//! the local cursor moves, which lets the WAL truncate.
//!
//! Forwarding resumes from the local cursor, never from an offset read from MySQL: the cursor only moves
//! after COMMIT, so it can be behind (re-sent rows are no-ops) but never past a record MySQL lacks, whereas
//! an offset in MySQL may be another host's or a newer copy's of this WAL.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mysql_async::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use telemetry_wal::{DeadLetter, Record, Wal};
use tokio::sync::{watch, Semaphore};

use crate::clock::now_ms;
use crate::config::{mask_url, read_secret_file, MysqlConfig};
use crate::event::Event;
use crate::identity::Identity;
use crate::migrate::{self, SchemaState};
use crate::ops::metrics::METRICS;
use crate::sink::{backoff_delay, blocking, pause, read_wal, Outage, Sink, Stopped};

mod load;
mod nodes;
mod progress;
mod sql;

pub use load::{Bulk, WritePath};
pub use nodes::{Lease, Nodes};
use progress::{Committed, Progress};
pub use sql::{lock_wait, write_rows, Written};

pub const SINK: Sink = Sink::Mysql;

/// Earlier runs whose offsets a start reads: the newest ones hold the highest.
const EARLIER_RUNS_READ: usize = 100;
/// How often to look again when the schema is behind.
const SCHEMA_RECHECK: Duration = Duration::from_secs(10);

/// How often the node in use is checked when there are several (a node can fall out of Synced without failing
/// a write).
const NODE_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Connection options for one server: a bounded, lazy pool that keeps prepared statements across uses.
fn pool(config: &MysqlConfig, url: &str) -> anyhow::Result<Pool> {
    let opts = Opts::from_url(url).with_context(|| format!("[mysql] url {} is invalid", mask_url(url)))?;
    let constraints = PoolConstraints::new(0, config.pool_size).context("[mysql] pool_size")?;
    let mut builder = OptsBuilder::from_opts(opts)
        // Keep idle connections (and their prepared statements) for a while: with mysql_async's default
        // TTL of 0 and min 0, every connection returned to the pool would be closed at once.
        .pool_opts(
            PoolOpts::default()
                .with_constraints(constraints)
                .with_inactive_connection_ttl(Duration::from_secs(300))
                .with_reset_connection(false),
        )
        // Never switch from the configured TCP address to a local socket behind our back.
        .prefer_socket(false)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .stmt_cache_size(32)
        // LOAD DATA LOCAL INFILE reads only the batch in memory (`load.rs`), never a file the server names.
        .local_infile_handler(Some(load::infile_handler))
        .init(vec![
            "SET time_zone = '+00:00'".to_string(),
            "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'".to_string(),
        ]);
    if let Some(path) = &config.password_file {
        builder = builder.pass(Some(read_secret_file(path, "[mysql] password_file")?));
    }
    if config.tls {
        let mut ssl = mysql_async::SslOpts::default();
        if let Some(ca) = &config.tls_ca_file {
            ssl = ssl.with_root_certs(vec![ca.clone().into()]);
        }
        builder = builder.ssl_opts(ssl);
    }
    Ok(Pool::new(builder))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardSettings {
    pub max_batch_rows: usize,
    pub max_batch_bytes: usize,
    pub max_linger: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub write_timeout: Duration,
}

impl From<&MysqlConfig> for ForwardSettings {
    fn from(c: &MysqlConfig) -> Self {
        ForwardSettings {
            max_batch_rows: c.max_batch_rows,
            max_batch_bytes: c.max_batch_bytes,
            max_linger: Duration::from_millis(c.max_linger_ms),
            retry_initial: Duration::from_millis(c.retry_initial_ms),
            retry_max: Duration::from_millis(c.retry_max_ms),
            write_timeout: Duration::from_millis(c.write_timeout_ms),
        }
    }
}

/// Why a write failed, and so what to do next.
enum WriteError {
    /// Connection lost, server restarting, node not ready, timeout: retry the same rows later, through another
    /// node if there is a usable one.
    Transient(String),
    /// Deadlock or lock wait; on Galera, a certification conflict or a brute-force abort at COMMIT. The node is
    /// fine: retry the same rows there after a backoff.
    Conflict(String),
    /// MySQL refuses the data itself: split the batch to find the record(s), dead-letter them.
    Data(String),
    /// The statement is too large for the server: split the batch.
    TooLarge(String),
}

pub struct Forwarder {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    /// Batches in flight at once, each on its own connection.
    parallel: usize,
}

/// What the dispatcher and the batch tasks share.
struct Shared {
    wal: Wal,
    nodes: Arc<Nodes>,
    /// LOAD DATA or INSERT.
    path: WritePath,
    identity: Arc<Identity>,
    /// Live: a config reload changes batch sizes, linger, retries and the write timeout.
    settings: watch::Receiver<ForwardSettings>,
    outage: Mutex<Outage>,
    progress: Mutex<Progress>,
    shutdown: watch::Receiver<bool>,
    /// Watermarks to record on their own (one writer task, the latest value wins).
    offset_catch_up: watch::Sender<u64>,
    totals: Arc<Totals>,
}

/// Rows written since start.
#[derive(Debug, Default)]
pub struct Totals {
    pub inserted: std::sync::atomic::AtomicU64,
    pub already_present: std::sync::atomic::AtomicU64,
}

/// Why forwarding cannot start yet.
enum StartError {
    /// Retry with backoff, or through another node; an outage.
    Unreachable(String, Lease),
    /// The operator must act; checked again periodically.
    Schema(String),
}

impl Forwarder {
    pub fn new(
        wal: Wal,
        nodes: Arc<Nodes>,
        path: WritePath,
        identity: Arc<Identity>,
        settings: watch::Receiver<ForwardSettings>,
        parallel: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        METRICS.mysql_path(path.in_use(), None);
        let shared = Shared {
            wal,
            nodes,
            path,
            identity,
            settings,
            outage: Mutex::new(Outage::new(SINK)),
            progress: Mutex::new(Progress::default()),
            shutdown: shutdown.clone(),
            offset_catch_up: watch::channel(0).0,
            totals: Arc::default(),
        };
        Forwarder { shared: Arc::new(shared), shutdown, parallel: parallel.max(1) }
    }

    /// Rows written so far (`wal replay --wal-dir` reports them).
    pub fn totals(&self) -> Arc<Totals> {
        self.shared.totals.clone()
    }

    /// Forwards until shutdown. MySQL being down or behind on its schema is a state to wait out, not an error.
    pub async fn run(mut self) {
        let slots = Arc::new(Semaphore::new(self.parallel));
        let catch_up = {
            let (shared, mut watermarks) = (self.shared.clone(), self.shared.offset_catch_up.subscribe());
            tokio::spawn(async move {
                while watermarks.changed().await.is_ok() {
                    let watermark = *watermarks.borrow_and_update();
                    shared.write_offset(watermark).await;
                }
            })
        };
        let node_check = tokio::spawn(self.shared.clone().check_node_periodically());
        let _ = self.forward(&slots).await;
        catch_up.abort();
        node_check.abort();
        // Let batches in flight finish or give up (they stop at their next wait).
        let _ = slots.acquire_many(self.parallel as u32).await;
        self.shared.nodes.disconnect().await;
        tracing::info!("MySQL forwarder stopped");
    }

    async fn forward(&mut self, slots: &Arc<Semaphore>) -> Result<(), Stopped> {
        let start = self.shared.start_point().await?;
        self.shared.lock_progress().start(start);
        let mut read_to = start;
        loop {
            let batch = self.next_batch(read_to).await?;
            let (Some(first), Some(last)) = (batch.first().map(|r| r.seq), batch.last().map(|r| r.seq)) else {
                continue;
            };
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.map_err(|_| Stopped)?,
                _ = self.shutdown.changed() => return Err(Stopped),
            };
            self.shared.lock_progress().dispatched(first, last);
            read_to = last;
            let shared = self.shared.clone();
            tokio::spawn(async move {
                if let Ok(offset_written) = shared.deliver(batch).await {
                    shared.committed(first, offset_written);
                }
                drop(permit);
            });
        }
    }

    /// The next batch after `after`: as soon as it is full (rows or bytes), or when the WAL has nothing more
    /// and the oldest record has lingered `max_linger`.
    async fn next_batch(&mut self, after: u64) -> Result<Vec<Record>, Stopped> {
        let mut durable = self.shared.wal.subscribe();
        let mut reloaded = self.shared.settings.clone();
        let mut batch: Vec<Record> = Vec::new();
        let mut bytes = 0;
        let mut last = after;
        loop {
            durable.borrow_and_update();
            let settings = *reloaded.borrow_and_update();
            let (wal, max) = (self.shared.wal.clone(), settings.max_batch_rows.saturating_sub(batch.len()));
            let more = read_wal(SINK, last, move || wal.read_after(last, max), &mut self.shutdown).await?;
            for record in more {
                if !batch.is_empty() && bytes + record.payload.len() > settings.max_batch_bytes {
                    return Ok(batch);
                }
                bytes += record.payload.len();
                last = record.seq;
                batch.push(record);
            }
            if batch.len() >= settings.max_batch_rows || bytes >= settings.max_batch_bytes {
                return Ok(batch);
            }
            let linger_left = batch.first().map(|oldest| {
                let age = Duration::from_millis(now_ms().saturating_sub(oldest.appended_at_ms));
                settings.max_linger.saturating_sub(age)
            });
            if linger_left == Some(Duration::ZERO) {
                return Ok(batch);
            }
            let linger = async {
                match linger_left {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            // While a batch lingers, a new group commit is read only once it could fill the batch: reading each
            // one as it comes would cost a WAL read (a blocking-pool hop) per group at ordinary rates.
            let room = settings.max_batch_rows.saturating_sub(batch.len());
            let enough = async {
                while durable.changed().await.is_ok() {
                    // Seqs are consecutive within a WAL (a gap only after a crash), so this is the records' count.
                    if batch.is_empty() || durable.borrow().saturating_sub(last) >= room as u64 {
                        return;
                    }
                }
                std::future::pending().await
            };
            tokio::select! {
                () = enough => {}
                _ = reloaded.changed() => {}
                // Lingered long enough: one more read takes what came meanwhile, then the batch goes.
                () = linger => {}
                _ = self.shutdown.changed() => return Err(Stopped),
            }
        }
    }
}

impl Shared {
    fn settings(&self) -> ForwardSettings {
        *self.settings.borrow()
    }

    fn lock_progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_outage(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the batch starting at `first` committed and moves the watermark over every committed batch at
    /// the front.
    fn committed(&self, first: u64, offset_written: u64) {
        let Committed { moved, lagging } = self.lock_progress().committed(first, offset_written);
        if let Some(watermark) = moved {
            if let Err(e) = self.wal.set_cursor(SINK.name(), watermark) {
                // MySQL has the rows and the offset; a restart resumes from there.
                tracing::error!(error = %e, seq = watermark, "cannot move the local mysql cursor");
            }
            // Batches that finished out of order recorded an older offset; catch MySQL's up now rather than
            // with the next batch, which may be long in coming.
            if lagging {
                self.offset_catch_up.send_replace(watermark);
            }
        }
    }

    /// With several nodes: moves away from the node in use when it stops passing the check, even while its
    /// writes still succeed (a donor or desynced node, with `avoid_desynced`).
    async fn check_node_periodically(self: Arc<Self>) {
        if !self.nodes.is_cluster() {
            return;
        }
        while self.sleep(NODE_CHECK_EVERY).await.is_ok() {
            // A failed check was logged by the move, or is met by the next write.
            let _ = self.nodes.usable().await;
        }
    }

    /// Records a watermark on its own (best effort: a lagging offset only means re-sending no-ops).
    async fn write_offset(&self, watermark: u64) {
        let pool = self.nodes.lease().pool;
        let result = async {
            let mut conn = pool.get_conn().await?;
            sql::record_offset(&mut conn, &self.identity, watermark).await
        };
        match tokio::time::timeout(self.settings().write_timeout, result).await {
            Ok(Ok(())) => self.lock_progress().offset_recorded(watermark),
            Ok(Err(e)) => tracing::debug!(error = %e, watermark, "cannot record the offset; the next batch will"),
            Err(_) => tracing::debug!(watermark, "recording the offset timed out; the next batch will"),
        }
    }

    fn offset_for(&self, first: u64, last: u64) -> u64 {
        self.lock_progress().offset_for(first, last)
    }

    /// Waits for MySQL with a usable schema, then resumes after the local cursor.
    async fn start_point(&self) -> Result<u64, Stopped> {
        let mut reported: Option<String> = None;
        loop {
            let lease = self.nodes.lease();
            let check = tokio::time::timeout(self.settings().write_timeout, self.check_schema_and_offset(&lease));
            let mut shutdown = self.shutdown.clone();
            let result = tokio::select! {
                result = check => result.unwrap_or_else(|_| Err(StartError::Unreachable("MySQL did not answer in time".into(), lease.clone()))),
                _ = shutdown.changed() => return Err(Stopped),
            };
            let problem = match result {
                Ok(committed) => {
                    self.end_outage();
                    let local = self.wal.cursor(SINK.name()).unwrap_or(0);
                    if committed > local {
                        // A crash between COMMIT and the cursor update.
                        tracing::info!(local, committed, "an earlier run committed more than the local cursor says");
                        if let Err(e) = self.wal.set_cursor(SINK.name(), committed) {
                            tracing::error!(error = %e, "cannot move the local mysql cursor");
                        }
                    }
                    let after_seq = local.max(committed);
                    tracing::info!(after_seq, run = self.identity.run_id(), "MySQL forwarding started");
                    return Ok(after_seq);
                }
                Err(StartError::Unreachable(error, lease)) => {
                    if !self.nodes.failed(&lease, &error).await {
                        self.note_failure(&error);
                        self.backoff().await?;
                    }
                    continue;
                }
                Err(StartError::Schema(problem)) => {
                    self.end_outage();
                    problem
                }
            };
            // Not an outage (MySQL answers), but not ok either: status and sink_up say so.
            METRICS.sink_blocked(SINK, &problem);
            if reported.as_deref() != Some(problem.as_str()) {
                tracing::error!(problem, "not forwarding to MySQL; checking again every 10 s");
                reported = Some(problem);
            }
            self.sleep(self.settings().retry_max.min(SCHEMA_RECHECK)).await?;
        }
    }

    /// Once the schema is usable: the seq up to which earlier runs of this WAL committed, bounded by this
    /// run's first seq (see `identity`). Offsets of other agents, other WALs or records this run appended
    /// are never read, so they can never make the forwarder skip a record.
    async fn check_schema_and_offset(&self, lease: &Lease) -> Result<u64, StartError> {
        let unreachable =
            |e: mysql_async::Error| StartError::Unreachable(format!("cannot reach MySQL: {e}"), lease.clone());
        self.nodes.check(lease).await.map_err(|why| {
            StartError::Unreachable(
                format!("MySQL node {} cannot take writes: {why}", self.nodes.current()),
                lease.clone(),
            )
        })?;
        let mut conn = lease.pool.get_conn().await.map_err(unreachable)?;
        match migrate::state(&mut conn).await {
            Ok(SchemaState::Current) => {}
            Ok(SchemaState::Behind(missing)) => {
                return Err(StartError::Schema(format!(
                    "the MySQL schema lacks migrations {missing:?}; run `telemetry-agent migrate --config <file>`"
                )))
            }
            Ok(SchemaState::Ahead(unknown)) => {
                tracing::warn!(?unknown, "the MySQL schema has migrations this agent does not know; forwarding anyway");
            }
            Err(migrate::StateError::Schema(e)) => return Err(StartError::Schema(format!("{e:#}"))),
            Err(migrate::StateError::Connection(e)) => return Err(unreachable(e)),
        }
        let earlier: Vec<&str> = self.identity.earlier_runs().take(EARLIER_RUNS_READ).collect();
        let Some(first_seq) = self.identity.run_first_seq().filter(|_| !earlier.is_empty()) else { return Ok(0) };
        let committed = sql::committed_offset(&mut conn, &self.identity, &earlier).await.map_err(unreachable)?;
        Ok(committed.unwrap_or(0).min(first_seq.saturating_sub(1)))
    }

    /// Writes the batch, retrying transient failures for as long as it takes; dead-letters what MySQL
    /// refuses for its data.
    /// Returns the highest offset its transactions recorded.
    async fn deliver(&self, batch: Vec<Record>) -> Result<u64, Stopped> {
        let Some(first) = batch.first().map(|r| r.seq) else { return Ok(0) };
        let mut rows = Vec::with_capacity(batch.len());
        for record in batch {
            match Event::decode(&record.payload) {
                Ok(event) => rows.push((record, event)),
                Err(reason) => {
                    let error = format!("undecodable WAL record: {reason}");
                    while let Err(e) = self.dead_letter(&record, None, &error).await {
                        self.note_failure(&e);
                        self.backoff().await?;
                    }
                }
            }
        }
        let mut offset_written = 0;
        let mut conflicts = 0;
        // Ranges still to write, in order. A data error splits its range until the bad record is alone.
        let mut pending = VecDeque::from([(0, rows.len())]);
        while let Some((lo, hi)) = pending.pop_front() {
            if lo == hi {
                continue;
            }
            let started = Instant::now();
            let lease = self.nodes.lease();
            match self.write(&lease, first, &rows[lo..hi]).await {
                Ok(written) => {
                    self.end_outage();
                    METRICS.sink_wrote(SINK, hi - lo, started.elapsed());
                    self.totals.inserted.fetch_add(written.inserted, std::sync::atomic::Ordering::Relaxed);
                    self.totals
                        .already_present
                        .fetch_add(written.already_present, std::sync::atomic::Ordering::Relaxed);
                    offset_written = offset_written.max(written.offset);
                    tracing::debug!(
                        rows = hi - lo,
                        inserted = written.inserted,
                        first_seq = rows[lo].0.seq,
                        last_seq = rows[hi - 1].0.seq,
                        offset = written.offset,
                        ms = started.elapsed().as_millis() as u64,
                        "batch committed"
                    );
                }
                Err(WriteError::Transient(error)) => {
                    // If the node fails the check, another that passes it takes the batch at once; otherwise this is
                    // an outage.
                    if !self.nodes.failed(&lease, &error).await {
                        self.note_failure(&error);
                        self.backoff().await?;
                    }
                    pending.push_front((lo, hi));
                }
                Err(WriteError::Conflict(error)) => {
                    conflicts += 1;
                    METRICS.mysql_conflict();
                    tracing::info!(
                        rows = hi - lo,
                        first_seq = rows[lo].0.seq,
                        conflicts,
                        error,
                        "MySQL transaction conflicted (deadlock, lock wait or Galera certification); retrying it"
                    );
                    let settings = self.settings();
                    self.sleep(backoff_delay(conflicts - 1, settings.retry_initial, settings.retry_max)).await?;
                    pending.push_front((lo, hi));
                }
                Err(WriteError::Data(error) | WriteError::TooLarge(error)) if hi - lo == 1 => {
                    let (record, event) = &rows[lo];
                    // Only a stored dead letter lets the batch count as done (and the WAL truncate it).
                    if let Err(e) = self.dead_letter(record, Some(event), &error).await {
                        self.note_failure(&e);
                        self.backoff().await?;
                        pending.push_front((lo, hi));
                    }
                }
                Err(WriteError::Data(error) | WriteError::TooLarge(error)) => {
                    tracing::warn!(
                        rows = hi - lo,
                        first_seq = rows[lo].0.seq,
                        error,
                        "MySQL refused a batch; splitting it"
                    );
                    let mid = lo + (hi - lo) / 2;
                    pending.push_front((mid, hi));
                    pending.push_front((lo, mid));
                }
            }
        }
        Ok(offset_written)
    }

    /// One transaction: the rows, then the offset.
    async fn write(&self, lease: &Lease, batch_first: u64, rows: &[(Record, Event)]) -> Result<Written, WriteError> {
        let timeout = self.settings().write_timeout;
        let last = rows.last().map_or(0, |(r, _)| r.seq);
        let offset = || self.offset_for(batch_first, last);
        match tokio::time::timeout(
            timeout,
            write_rows(&lease.pool, &self.identity, rows, lock_wait(timeout), &self.path, offset),
        )
        .await
        {
            Ok(result) => result.map_err(classify),
            Err(_) => {
                Err(WriteError::Transient(format!("transaction did not finish within {} ms", timeout.as_millis())))
            }
        }
    }

    /// Stores the record as a dead letter (durably) and logs it.
    async fn dead_letter(&self, record: &Record, event: Option<&Event>, error: &str) -> Result<(), String> {
        let event_id = event.map(|e| self.identity.event_id(e.client_event_id(), record.seq));
        let profile_id = event.map(Event::profile_id);
        let letter = DeadLetter {
            sink: SINK.name().to_string(),
            seq: record.seq,
            error: error.to_string(),
            at_ms: now_ms(),
            payload: record.payload.clone(),
        };
        let wal = self.wal.clone();
        blocking(move || wal.add_dead_letter(&letter)).await.map_err(|e| format!("cannot store a dead letter: {e}"))?;
        tracing::error!(seq = record.seq, event_id, profile_id, error, "MySQL refused an event; moved to dead letters");
        Ok(())
    }

    fn note_failure(&self, error: &str) {
        self.lock_outage().failed(error, || Some(self.records_held()));
    }

    fn end_outage(&self) {
        self.lock_outage().ended(|| Some(self.records_held()));
    }

    /// Records in the WAL that MySQL does not have yet.
    fn records_held(&self) -> u64 {
        let Ok(stats) = self.wal.stats() else { return 0 };
        let Some(first) = stats.first_seq else { return 0 };
        let from = self.wal.cursor(SINK.name()).unwrap_or(0).max(first - 1);
        stats.last_seq.saturating_sub(from)
    }

    async fn backoff(&self) -> Result<(), Stopped> {
        let settings = self.settings();
        let delay = self.lock_outage().backoff(settings.retry_initial, settings.retry_max);
        self.sleep(delay).await
    }

    async fn sleep(&self, delay: Duration) -> Result<(), Stopped> {
        pause(delay, &mut self.shutdown.clone()).await
    }
}

/// Sorts a failure into retry, split-and-dead-letter, or split.
fn classify(e: mysql_async::Error) -> WriteError {
    match &e {
        mysql_async::Error::Server(server) => match server.code {
            // Packet too large; on Galera, a write set above wsrep_max_ws_size ("Maximum writeset size
            // exceeded", or "Got error 90 \"Message too long\" during COMMIT").
            1153 | 1301 => WriteError::TooLarge(e.to_string()),
            1105 if server.message.contains("writeset size exceeded") => WriteError::TooLarge(e.to_string()),
            1180 if server.message.contains("Message too long") => WriteError::TooLarge(e.to_string()),
            // Deadlock (and Galera's certification failures and brute-force aborts, reported as one), lock
            // wait timeout.
            1213 | 1205 => WriteError::Conflict(e.to_string()),
            // Out of range, truncated, incorrect value, too long, NULL, bad datetime, bad JSON, CHECK failed,
            // incorrect string (charset).
            1048 | 1264 | 1265 | 1292 | 1366 | 1367 | 1406 | 1690 | 3140 | 3157 | 4025 | 3819 => {
                WriteError::Data(e.to_string())
            }
            // Server shutting down, too many connections, a Galera node not ready (1047), missing table (schema
            // being changed) and everything unknown: retry. Dropping data on a guess is worse than waiting.
            _ => WriteError::Transient(e.to_string()),
        },
        // mysql_async refuses, on the client side, a packet above the server's max_allowed_packet.
        mysql_async::Error::Io(io) if format!("{io:?}").contains("PacketTooLarge") => {
            WriteError::TooLarge(e.to_string())
        }
        _ => WriteError::Transient(e.to_string()),
    }
}
