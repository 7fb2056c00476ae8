//! The agent as a service. [`serve`] opens the WAL, starts a run (`identity`), and serves the ingest socket,
//! the spool drain, the sinks and the operator endpoints until `shutdown` resolves or the WAL fails; then it
//! answers what was read, lets the sinks finish and closes the WAL. `telemetry-agent run` calls it with the
//! signals as `shutdown`; tests can call it in-process.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use telemetry_wal::{Durability, Wal, WalOptions};
use tokio::sync::watch;

use crate::clock::now_us;
use crate::config::{Config, DurabilityMode};
use crate::identity::Identity;
use crate::ops::commands;
use crate::ops::control;
use crate::ops::http;
use crate::ops::metrics::METRICS;
use crate::reload;
use crate::sink::mysql::{self as mysql_sink, ForwardSettings, Forwarder};
use crate::sink::redis::{self as mirror, Mirror};
use crate::sink::Sink;
use crate::source::socket::{self, IngestContext, Listener};
use crate::source::spool::SpoolDrain;

/// How [`serve`] runs besides its config.
#[derive(Default)]
pub struct Options {
    /// The config file: reloaded when it changes and on SIGHUP, and named in messages. `None`: no reloads.
    pub config_path: Option<PathBuf>,
    /// Changes the log level on a reload (`None` when `RUST_LOG` decides).
    pub log_level: Option<reload::LogLevelSetter>,
}

/// Runs the agent until `shutdown` resolves (or the WAL fails, which is an error: the supervisor restarts the
/// agent and sled's recovery establishes what is durable).
pub async fn serve(config: &Config, options: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let agent_id = config.agent_id()?;
    let wal = open_wal(&config.wal.dir, wal_options(config), options.config_path.as_deref())?;
    match wal.label("agent_id")? {
        None => wal.set_label("agent_id", &agent_id)?,
        Some(stored) if stored == agent_id => {}
        Some(stored) => bail!(
            "the WAL in {} belongs to agent `{stored}` but the config says `{agent_id}`; \
             set [agent] id = \"{stored}\" or move the WAL directory aside",
            config.wal.dir.display()
        ),
    }
    let identity = Arc::new(Identity::start_run(&wal, agent_id)?);
    raise_open_file_limit(config.ingest.max_connections);
    let result = serve_wal(config, &wal, identity, options, shutdown).await;
    // Every handler has finished: nothing waits on the WAL any more. (Closing waits for the writer thread, which
    // must not happen on a runtime thread.)
    let closing = wal.clone();
    let closed = tokio::task::spawn_blocking(move || closing.close()).await.context("the WAL close task failed")?;
    result?;
    // First: after a failure (from any path that syncs) `close` fails too, with less to say.
    if let Some(failure) = wal.failure() {
        bail!("stopped after a WAL failure: {failure}");
    }
    closed?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn serve_wal(
    config: &Config,
    wal: &Wal,
    identity: Arc<Identity>,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Options { config_path: reload_from, log_level } = options;
    let ingest = &config.ingest;
    let listener = socket::bind(&ingest.socket, config.socket_mode()?, ingest.socket_group.as_deref())
        .context("[ingest] socket")?;
    let context = Arc::new(IngestContext {
        appender: wal.appender(),
        identity: identity.clone(),
        max_line_bytes: ingest.max_line_bytes,
        max_pending: ingest.max_pending_per_connection,
        inflight_bytes: Arc::new(tokio::sync::Semaphore::new(ingest.max_inflight_bytes)),
        overload_timeout: Duration::from_millis(ingest.overload_timeout_ms),
        idle_timeout: (ingest.idle_timeout_secs > 0).then(|| Duration::from_secs(ingest.idle_timeout_secs)),
        answer_timeout: Duration::from_secs(ingest.answer_timeout_secs),
        max_future_secs: ingest.max_future_secs,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = match config.http.enabled {
        true => Some(http::bind(&config.http.listen).await?),
        false => None,
    };
    let http_addr = http.as_ref().and_then(|listener| listener.local_addr().ok());
    let nodes = config.mysql.as_ref().map(|mysql| mysql_sink::Nodes::new(mysql).map(Arc::new)).transpose()?;
    // Live settings: a config reload sends new values here.
    let forward_settings = watch::Sender::new(ForwardSettings::from(&config.mysql.clone().unwrap_or_default()));
    let redis_settings = watch::Sender::new(config.redis.clone().unwrap_or_default());
    let forwarder = match (&config.mysql, &nodes) {
        (Some(mysql), Some(nodes)) => {
            METRICS.sink_enabled(mysql_sink::SINK);
            let forwarder = Forwarder::new(
                wal.clone(),
                nodes.clone(),
                mysql_sink::WritePath::new(mysql.bulk),
                identity.clone(),
                forward_settings.subscribe(),
                mysql.parallel_batches,
                stop_rx.clone(),
            );
            Some(tokio::spawn(forwarder.run()))
        }
        _ => None,
    };
    let (mirror, resync) = match &config.redis {
        Some(_) => {
            METRICS.sink_enabled(mirror::SINK);
            let mirror = Mirror::new(wal.clone(), identity.clone(), redis_settings.subscribe(), stop_rx.clone())?;
            let resync = mirror.resync_handle();
            (Some(tokio::spawn(mirror.run())), Some(resync))
        }
        None => (None, None),
    };
    let spool = SpoolDrain {
        dir: config.spool.dir.clone(),
        max_file_bytes: config.spool.max_file_bytes,
        max_line_bytes: ingest.max_line_bytes,
        max_future_secs: ingest.max_future_secs,
        wal: wal.clone(),
        appender: wal.appender(),
    };
    let spool = Some(tokio::spawn(spool.run(stop_rx.clone())));
    if let Some(listener) = http {
        tokio::spawn(http::serve(listener, wal.clone(), stop_rx.clone()));
    }
    let control_mode = if config.control.group.is_some() { 0o660 } else { 0o600 };
    let control = socket::bind(&config.control.socket, control_mode, config.control.group.as_deref())
        .context("[control] socket")?;
    let admin_context = commands::Context {
        wal: wal.clone(),
        identity: identity.clone(),
        sinks: config.enabled_sinks(),
        mysql: nodes.clone(),
        bulk: config.mysql.as_ref().map(|mysql| mysql.bulk).unwrap_or_default(),
        redis: resync,
        spool: config.spool.dir.clone(),
        running: true,
    };
    tokio::spawn(control::serve(control, admin_context, stop_rx.clone()));
    if let Some(path) = reload_from {
        let live = reload::Live {
            forward: config.mysql.is_some().then_some(forward_settings),
            redis: config.redis.is_some().then_some(redis_settings),
            log_level,
        };
        reload::spawn(path, config.clone(), live, stop_rx.clone());
    }
    let sinks = config.enabled_sinks();
    let sink_names: Vec<&str> = sinks.iter().map(|sink| sink.name()).collect();
    tracing::info!(
        agent_id = identity.agent_id(),
        run = identity.run_id(),
        http = http_addr.map(|a| a.to_string()),
        socket = %ingest.socket.display(),
        wal = %config.wal.dir.display(),
        spool = %config.spool.dir.display(),
        sinks = ?sink_names,
        "telemetry-agent ready"
    );
    // Under systemd (Type=notify): the WAL is open and the socket bound. Elsewhere this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            () = housekeeping(wal, &sinks, nodes.as_deref()) => {}
        }
    };
    Listener::new(listener, context, ingest.max_connections).serve(stop).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    for task in [spool, forwarder, mirror].into_iter().flatten() {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&ingest.socket);
    let _ = std::fs::remove_file(&config.control.socket);
    Ok(())
}

/// Every connection is a file descriptor: raise the soft limit to the hard one, and say so if
/// `max_connections` still does not fit (the kernel would refuse connections before the agent's limit).
fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
        }
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft);
    // The WAL, the sinks' connections and the listeners need some too.
    if (max_connections as u64).saturating_add(256) > limit {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "[ingest] max_connections does not fit the open-file limit; raise it (LimitNOFILE=) or lower max_connections"
        );
    }
}

/// Every second: the housekeeping jobs below. Resolves when the WAL stopped after a write failure: the agent
/// then exits non-zero so that its supervisor restarts it and sled's recovery establishes what is durable.
async fn housekeeping(wal: &Wal, sinks: &[Sink], nodes: Option<&mysql_sink::Nodes>) {
    const EVERY: Duration = Duration::from_secs(1);
    let mut tick = tokio::time::interval(EVERY);
    let mut watchdog = Watchdog::from_env();
    let mut rate = EventRate::default();
    loop {
        tick.tick().await;
        if let Some(failure) = wal.failure() {
            tracing::error!(failure, "the WAL failed; stopping so that a restart can recover it");
            return;
        }
        watchdog.ping();
        truncate_and_measure(wal, sinks).await;
        if let Some(nodes) = nodes {
            measure_pool(&nodes.lease().pool);
        }
        METRICS.tick_outages(EVERY);
        rate.record(METRICS.events_received_total());
    }
}

/// systemd's watchdog (WatchdogSec): pinged from the housekeeping loop, so that a stuck runtime or WAL gets
/// the agent restarted.
struct Watchdog {
    period: Option<Duration>,
    pinged: Instant,
}

impl Watchdog {
    fn from_env() -> Self {
        Watchdog { period: sd_notify::watchdog_enabled(), pinged: Instant::now() }
    }

    fn ping(&mut self) {
        if self.period.is_some_and(|period| self.pinged.elapsed() >= period / 2) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            self.pinged = Instant::now();
        }
    }
}

/// Drops what every sink has passed (cheap when there is nothing to drop) and refreshes the WAL gauges.
async fn truncate_and_measure(wal: &Wal, sinks: &[Sink]) {
    let (wal, sinks) = (wal.clone(), sinks.to_vec());
    let truncated = crate::sink::blocking(move || {
        let truncated = wal.truncate();
        refresh_gauges(&wal, &sinks);
        truncated
    });
    match truncated.await {
        Ok(0) => {}
        Ok(records) => tracing::debug!(records, "truncated WAL"),
        Err(error) => tracing::error!(error, "WAL truncation failed"),
    }
}

fn measure_pool(pool: &mysql_async::Pool) {
    let pool = pool.metrics();
    METRICS.mysql_connections.set(pool.connection_count.load(Ordering::Relaxed) as i64);
    METRICS.mysql_connections_in_use.set(pool.connections_in_use.load(Ordering::Relaxed) as i64);
}

/// Events received per second, over the last ten seconds.
#[derive(Default)]
struct EventRate {
    received: VecDeque<(Instant, u64)>,
}

impl EventRate {
    fn record(&mut self, total: u64) {
        let now = (Instant::now(), total);
        self.received.push_back(now);
        while self.received.len() > 11 {
            self.received.pop_front();
        }
        if let Some(&(then, count)) = self.received.front() {
            let secs = now.0.duration_since(then).as_secs_f64();
            if secs > 0.0 {
                METRICS.events_per_second.set((now.1 - count) as f64 / secs);
            }
        }
    }
}

/// WAL size and each sink's lag, for `/metrics` and `status`.
fn refresh_gauges(wal: &Wal, sinks: &[Sink]) {
    let Ok(report) = commands::wal_report(wal, sinks) else { return };
    METRICS.wal_disk_bytes.set(report.disk_bytes as i64);
    METRICS.wal_max_bytes.set(report.max_bytes as i64);
    METRICS.wal_live_bytes.set(report.live_bytes as i64);
    METRICS.wal_records.set(report.records as i64);
    // Counted by the WAL since open, as is the agent's counter: add what is new.
    METRICS.wal_group_commits.inc_by(report.group_commits.saturating_sub(METRICS.wal_group_commits.get()));
    METRICS.wal_syncs.inc_by(report.syncs.saturating_sub(METRICS.wal_syncs.get()));
    METRICS.dead_letters.set(report.dead_letters as i64);
    for (sink, lag) in sinks.iter().zip(&report.sinks) {
        let labels = crate::ops::metrics::SinkLabel { sink: sink.name() };
        METRICS.sink_lag_records.get_or_create(&labels).set(lag.lag_records as i64);
        METRICS.sink_lag_seconds.get_or_create(&labels).set(lag.lag_seconds);
    }
}

/// The WAL as `run` opens it.
pub(crate) fn wal_options(config: &Config) -> WalOptions {
    let durability = match config.wal.durability {
        DurabilityMode::Fsync => Durability::Fsync,
        DurabilityMode::Interval => Durability::Interval { interval_ms: config.wal.flush_interval_ms },
    };
    WalOptions {
        durability,
        max_bytes: config.wal.max_bytes,
        cache_bytes: config.wal.cache_bytes,
        gating_cursors: config.enabled_sinks().into_iter().map(|sink| sink.name().to_string()).collect(),
        // A new WAL starts at the current time in microseconds: seqs then read as times, and a host whose
        // WAL was wiped never reuses an old seq (generated ids also name the run, see `identity`). `wal
        // salvage` restarts there too at least, as it cannot tell how far a damaged last chunk reached.
        first_seq: u64::try_from(now_us()).unwrap_or(1),
        retain: Duration::from_secs(config.wal.retain_secs),
        commit_delay: Duration::from_micros(config.wal.commit_delay_us),
    }
}

/// Opens a WAL; a damaged one is refused with what to do about it.
fn open_wal(dir: &Path, options: WalOptions, config_path: Option<&Path>) -> anyhow::Result<Wal> {
    Wal::open(dir, options).map_err(|e| open_error(e, dir, config_path))
}

pub(crate) fn open_error(e: telemetry_wal::WalError, dir: &Path, config_path: Option<&Path>) -> anyhow::Error {
    if !matches!(e, telemetry_wal::WalError::Corrupt { .. }) {
        return e.into();
    }
    let config = config_path.map(|p| format!(" --config {}", p.display())).unwrap_or_default();
    anyhow::anyhow!(
        "{e}. Nothing was forwarded from it. Run `telemetry-agent wal salvage{config}` to keep every intact record \
         and go on (what is lost is printed and logged), or move {} aside to start empty",
        dir.display()
    )
}
