//! The agent's own metrics: one registry, rendered as Prometheus text at `/metrics` and read back by
//! `telemetry-agent status`, so both always agree.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::clock::now_ms;

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: &'static str,
}

type HistogramFamily = Family<SinkLabel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub started: Instant,
    pub started_at_ms: u64,
    pub events_received: Family<Kind, Counter>,
    pub acks: Counter,
    pub errors: Family<Code, Counter>,
    pub clients_connected: Gauge,
    pub wal_disk_bytes: Gauge,
    pub wal_max_bytes: Gauge,
    pub wal_live_bytes: Gauge,
    pub wal_records: Gauge,
    pub wal_group_commits: Counter,
    pub wal_syncs: Counter,
    pub dead_letters: Gauge,
    pub sink_up: Family<SinkLabel, Gauge>,
    pub sink_lag_records: Family<SinkLabel, Gauge>,
    pub sink_lag_seconds: Family<SinkLabel, Gauge<f64, AtomicU64>>,
    pub sink_batch_rows: HistogramFamily,
    pub sink_commit_seconds: HistogramFamily,
    pub sink_retries: Family<SinkLabel, Counter>,
    pub sink_outage_seconds: Family<SinkLabel, Counter<f64, AtomicU64>>,
    pub mysql_connections: Gauge,
    /// 1 for the path rows take to MySQL now (`load_data` or `insert`), 0 for the other.
    pub mysql_write_path: Family<PathLabel, Gauge>,
    /// Batches that LOAD DATA could not take whole (duplicates, conversions) and INSERT wrote.
    pub mysql_load_data_fallbacks: Counter,
    pub mysql_connections_in_use: Gauge,
    /// 1 for the node the sink writes through now, 0 for nodes it used before.
    pub mysql_node: Family<NodeLabel, Gauge>,
    pub mysql_node_switches: Counter,
    /// Transactions retried after a deadlock, lock wait or Galera certification conflict.
    pub mysql_conflicts: Counter,
    pub redis_pending_keys: Gauge,
    pub spool_files_pending: Gauge,
    pub spool_files_drained: Counter,
    pub spool_events: Counter,
    pub spool_lines_refused: Counter,
    pub spool_files_refused: Counter,
    /// Over the last 10 s; for `status` (Prometheus computes its own rates).
    pub events_per_second: Gauge<f64, AtomicU64>,
    /// Per sink: waiting since when, and the last error; for `status`.
    health: Mutex<BTreeMap<&'static str, SinkHealth>>,
}

#[derive(Debug, Clone, Default)]
struct SinkHealth {
    waiting_since: Option<(Instant, u64)>,
    last_error: Option<(String, u64)>,
    /// How rows are written, and why, if not the configured way.
    path: Option<String>,
    /// The server written to (`host:port`).
    node: Option<String>,
}

/// One sink as `status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SinkStatus {
    pub sink: String,
    /// `ok` or `waiting` (retrying after an error).
    pub state: String,
    /// Epoch ms since when it has been waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_since_ms: Option<u64>,
    pub lag_records: i64,
    pub lag_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at_ms: Option<u64>,
    /// MySQL: `load_data` or `insert`, with why when the server refused LOAD DATA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// MySQL: the server (`host:port`) written through now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn histogram_rows() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 9))
}

fn histogram_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::default(),
            started: Instant::now(),
            started_at_ms: now_ms(),
            events_received: Family::default(),
            acks: Counter::default(),
            errors: Family::default(),
            clients_connected: Gauge::default(),
            wal_disk_bytes: Gauge::default(),
            wal_max_bytes: Gauge::default(),
            wal_live_bytes: Gauge::default(),
            wal_records: Gauge::default(),
            wal_group_commits: Counter::default(),
            wal_syncs: Counter::default(),
            dead_letters: Gauge::default(),
            sink_up: Family::default(),
            sink_lag_records: Family::default(),
            sink_lag_seconds: Family::default(),
            sink_batch_rows: Family::new_with_constructor(histogram_rows),
            sink_commit_seconds: Family::new_with_constructor(histogram_seconds),
            sink_retries: Family::default(),
            sink_outage_seconds: Family::default(),
            mysql_connections: Gauge::default(),
            mysql_connections_in_use: Gauge::default(),
            mysql_node: Family::default(),
            mysql_node_switches: Counter::default(),
            mysql_conflicts: Counter::default(),
            mysql_write_path: Family::default(),
            mysql_load_data_fallbacks: Counter::default(),
            redis_pending_keys: Gauge::default(),
            spool_files_pending: Gauge::default(),
            spool_files_drained: Counter::default(),
            spool_events: Counter::default(),
            spool_lines_refused: Counter::default(),
            spool_files_refused: Counter::default(),
            events_per_second: Gauge::default(),
            health: Mutex::new(BTreeMap::new()),
        };
        metrics.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        let p = "telemetry";
        r.register(
            format!("{p}_events_received"),
            "Events read from the socket that parsed, by kind",
            self.events_received.clone(),
        );
        r.register(format!("{p}_acks"), "Events acknowledged (durable in the WAL)", self.acks.clone());
        r.register(format!("{p}_errors"), "Error answers to clients, by protocol code", self.errors.clone());
        r.register(format!("{p}_clients_connected"), "Open client connections", self.clients_connected.clone());
        r.register(format!("{p}_wal_disk_bytes"), "Disk the WAL directory uses", self.wal_disk_bytes.clone());
        r.register(format!("{p}_wal_max_bytes"), "The WAL's cap ([wal] max_bytes)", self.wal_max_bytes.clone());
        r.register(format!("{p}_wal_live_bytes"), "Bytes of records the WAL holds", self.wal_live_bytes.clone());
        r.register(format!("{p}_wal_records"), "Records the WAL holds", self.wal_records.clone());
        r.register(
            format!("{p}_wal_group_commits"),
            "Group commits written to the WAL (one write and, in fsync mode, one sync each)",
            self.wal_group_commits.clone(),
        );
        r.register(format!("{p}_wal_syncs"), "fdatasync calls on the WAL's data file", self.wal_syncs.clone());
        r.register(format!("{p}_dead_letters"), "Records kept as dead letters", self.dead_letters.clone());
        r.register(
            format!("{p}_sink_up"),
            "1 while the sink writes, 0 while it waits after an error",
            self.sink_up.clone(),
        );
        r.register(
            format!("{p}_sink_lag_records"),
            "Records in the WAL the sink has not taken yet",
            self.sink_lag_records.clone(),
        );
        r.register(
            format!("{p}_sink_lag_seconds"),
            "Age of the oldest record the sink has not taken yet",
            self.sink_lag_seconds.clone(),
        );
        r.register(format!("{p}_sink_batch_rows"), "Records per batch written", self.sink_batch_rows.clone());
        r.register(
            format!("{p}_sink_commit_seconds"),
            "Time to write one batch (MySQL: the transaction; Redis: the pipeline)",
            self.sink_commit_seconds.clone(),
        );
        r.register(format!("{p}_sink_retries"), "Failed attempts, retried", self.sink_retries.clone());
        r.register(
            format!("{p}_sink_outage_seconds"),
            "Time spent waiting for the sink after errors",
            self.sink_outage_seconds.clone(),
        );
        r.register(
            format!("{p}_mysql_connections"),
            "Connections to MySQL the pool holds",
            self.mysql_connections.clone(),
        );
        r.register(
            format!("{p}_mysql_connections_in_use"),
            "Connections to MySQL in use",
            self.mysql_connections_in_use.clone(),
        );
        r.register(
            format!("{p}_mysql_write_path"),
            "1 for the way rows are sent to MySQL now (path=load_data or insert), 0 for the other",
            self.mysql_write_path.clone(),
        );
        r.register(
            format!("{p}_mysql_load_data_fallbacks"),
            "Batches LOAD DATA could not take whole (duplicates, conversions), written with INSERT instead",
            self.mysql_load_data_fallbacks.clone(),
        );
        r.register(
            format!("{p}_mysql_node"),
            "1 for the MySQL server (node=host:port) written through now, 0 for servers written through before",
            self.mysql_node.clone(),
        );
        r.register(
            format!("{p}_mysql_node_switches"),
            "Moves to another node of the cluster after the node in use failed",
            self.mysql_node_switches.clone(),
        );
        r.register(
            format!("{p}_mysql_conflicts"),
            "Transactions retried after a deadlock, lock wait or Galera certification conflict",
            self.mysql_conflicts.clone(),
        );
        r.register(
            format!("{p}_redis_pending_keys"),
            "Latest values not yet pushed to Redis",
            self.redis_pending_keys.clone(),
        );
        r.register(
            format!("{p}_spool_files_pending"),
            "Spool files waiting to be drained (or still being written)",
            self.spool_files_pending.clone(),
        );
        r.register(
            format!("{p}_spool_files_drained"),
            "Spool files drained into the WAL and deleted",
            self.spool_files_drained.clone(),
        );
        r.register(
            format!("{p}_spool_events"),
            "Events appended to the WAL from spool files",
            self.spool_events.clone(),
        );
        r.register(
            format!("{p}_spool_lines_refused"),
            "Spool lines that were not valid events (dead letters, sink spool)",
            self.spool_lines_refused.clone(),
        );
        r.register(
            format!("{p}_spool_files_refused"),
            "Spool files refused: not regular, hard-linked, unreadable or over max_file_bytes",
            self.spool_files_refused.clone(),
        );
        self
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot render metrics");
        }
        out
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, SinkHealth>> {
        self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The sink is configured (it shows in `status` and `/metrics` before its first write).
    pub fn sink_enabled(&self, sink: crate::sink::Sink) {
        self.lock_health().entry(sink.name()).or_default();
        let label = SinkLabel { sink: sink.name() };
        self.sink_up.get_or_create(&label).set(1);
        // At 0 from the start: a dashboard's rate() and an alert's increase() need the series before the
        // first failure.
        let _ = self.sink_retries.get_or_create(&label);
        let _ = self.sink_outage_seconds.get_or_create(&label);
    }

    /// A write failed and will be retried.
    pub fn sink_failed(&self, sink: crate::sink::Sink, error: &str) {
        self.sink_retries.get_or_create(&SinkLabel { sink: sink.name() }).inc();
        self.sink_up.get_or_create(&SinkLabel { sink: sink.name() }).set(0);
        let mut health = self.lock_health();
        let entry = health.entry(sink.name()).or_default();
        entry.waiting_since.get_or_insert((Instant::now(), now_ms()));
        entry.last_error = Some((error.to_string(), now_ms()));
    }

    /// The sink cannot go on until an operator acts (say, a schema to migrate); checked again periodically.
    pub fn sink_blocked(&self, sink: crate::sink::Sink, problem: &str) {
        self.sink_up.get_or_create(&SinkLabel { sink: sink.name() }).set(0);
        let mut health = self.lock_health();
        let entry = health.entry(sink.name()).or_default();
        entry.waiting_since.get_or_insert((Instant::now(), now_ms()));
        entry.last_error = Some((problem.to_string(), now_ms()));
    }

    /// A write went through.
    pub fn sink_ok(&self, sink: crate::sink::Sink) {
        self.sink_up.get_or_create(&SinkLabel { sink: sink.name() }).set(1);
        self.lock_health().entry(sink.name()).or_default().waiting_since = None;
    }

    /// A batch was written: its size and how long it took.
    pub fn sink_wrote(&self, sink: crate::sink::Sink, rows: usize, took: Duration) {
        self.sink_batch_rows.get_or_create(&SinkLabel { sink: sink.name() }).observe(rows as f64);
        self.sink_commit_seconds.get_or_create(&SinkLabel { sink: sink.name() }).observe(took.as_secs_f64());
    }

    /// The MySQL sink writes rows by `path` (`load_data` or `insert`); `why`, when not as configured.
    pub fn mysql_path(&self, path: &'static str, why: Option<String>) {
        for p in ["load_data", "insert"] {
            self.mysql_write_path.get_or_create(&PathLabel { path: p }).set(i64::from(p == path));
        }
        let shown = match why {
            Some(why) => format!("{path} ({why})"),
            None => path.to_string(),
        };
        self.lock_health().entry(crate::sink::Sink::Mysql.name()).or_default().path = Some(shown);
    }

    /// The MySQL sink writes through `node` (`host:port`) now.
    pub fn mysql_node(&self, node: String) {
        let mut health = self.lock_health();
        let entry = health.entry(crate::sink::Sink::Mysql.name()).or_default();
        if let Some(before) = entry.node.take() {
            self.mysql_node.get_or_create(&NodeLabel { node: before }).set(0);
        }
        self.mysql_node.get_or_create(&NodeLabel { node: node.clone() }).set(1);
        entry.node = Some(node);
    }

    /// The node in use failed and the sink moved to `node`.
    pub fn mysql_node_switched(&self, node: String) {
        self.mysql_node_switches.inc();
        self.mysql_node(node);
    }

    pub fn mysql_conflict(&self) {
        self.mysql_conflicts.inc();
    }

    pub fn error(&self, code: &'static str) {
        self.errors.get_or_create(&Code { code }).inc();
    }

    /// Adds `elapsed` to the outage time of every sink that is waiting.
    pub fn tick_outages(&self, elapsed: Duration) {
        for (sink, health) in self.lock_health().iter() {
            if health.waiting_since.is_some() {
                self.sink_outage_seconds.get_or_create(&SinkLabel { sink }).inc_by(elapsed.as_secs_f64());
            }
        }
    }

    pub fn sinks(&self) -> Vec<SinkStatus> {
        self.lock_health()
            .iter()
            .map(|(sink, health)| {
                let labels = SinkLabel { sink };
                SinkStatus {
                    sink: sink.to_string(),
                    state: if health.waiting_since.is_some() { "waiting" } else { "ok" }.to_string(),
                    waiting_since_ms: health.waiting_since.map(|(_, ms)| ms),
                    lag_records: self.sink_lag_records.get_or_create(&labels).get(),
                    lag_seconds: self.sink_lag_seconds.get_or_create(&labels).get(),
                    last_error: health.last_error.as_ref().map(|(e, _)| e.clone()),
                    last_error_at_ms: health.last_error.as_ref().map(|(_, at)| *at),
                    path: health.path.clone(),
                    node: health.node.clone(),
                }
            })
            .collect()
    }

    pub fn events_received_total(&self) -> u64 {
        ["metric", "trade"].iter().map(|kind| self.events_received.get_or_create(&Kind { kind }).get()).sum()
    }
}
