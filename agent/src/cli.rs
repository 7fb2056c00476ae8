//! The command line: `run`, `send`, `check-config`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing_subscriber::EnvFilter;

use crate::config::{mask_url, Config, DurabilityMode};
use crate::event::now_us;
use crate::forward::{self, ForwardSettings, Forwarder};
use crate::http;
use crate::ingest::{self, IngestContext, Listener};
use crate::metrics::METRICS;
use crate::mirror::{self, Mirror};
use telemetry_wal::{Durability, Wal, WalOptions};

#[derive(Parser)]
#[command(name = "telemetry-agent", version, about = "Durable local telemetry forwarder for trading hosts")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: listen on the socket, store events in the WAL, forward them.
    Run {
        /// TOML config file; without it, defaults that work in the current directory.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Send NDJSON events from stdin to a running agent; prints how many were acked and every error.
    Send {
        /// The agent's socket (default: `[ingest] socket` of --config, else ./data/agent.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply pending MySQL schema migrations (safe to run twice, and from several hosts at once).
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective configuration, secrets masked.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run { config } => run(config.as_deref()),
        Command::Send { socket, config } => send(socket, config.as_deref()),
        Command::Migrate { config } => migrate(config.as_deref()),
        Command::CheckConfig { config } => check_config(config.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("telemetry-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    print!("{}", config.to_masked_toml()?);
    Ok(ExitCode::SUCCESS)
}

fn migrate(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    init_logging(&config);
    let Some(mysql) = &config.mysql else { bail!("the config has no [mysql] section: nothing to migrate") };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start tokio")?;
    runtime.block_on(async {
        let pool = forward::pool(mysql)?;
        let result = async {
            let mut conn =
                pool.get_conn().await.with_context(|| format!("cannot connect to {}", mask_url(&mysql.url)))?;
            crate::migrate::migrate(&mut conn).await
        }
        .await;
        let _ = pool.disconnect().await;
        let applied = result?;
        if applied.is_empty() {
            println!("schema is up to date");
        } else {
            println!("applied: {}", applied.join(", "));
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.agent.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn run(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    init_logging(&config);
    let agent_id = config.agent_id()?;
    let durability = match config.wal.durability {
        DurabilityMode::Fsync => Durability::Fsync,
        DurabilityMode::Interval => Durability::Interval { interval_ms: config.wal.flush_interval_ms },
    };
    let options = WalOptions {
        durability,
        max_bytes: config.wal.max_bytes,
        cache_bytes: config.wal.cache_bytes,
        gating_cursors: config.enabled_sinks(),
        // A new WAL starts at the current time in microseconds, so that a host whose WAL was wiped never
        // reuses a generated event id (`{agent_id}-{seq}`) that MySQL already holds.
        first_seq: u64::try_from(now_us()).unwrap_or(1),
    };
    let wal = Wal::open(&config.wal.dir, options)?;
    match wal.label("agent_id")? {
        None => wal.set_label("agent_id", &agent_id)?,
        Some(stored) if stored == agent_id => {}
        Some(stored) => bail!(
            "the WAL in {} belongs to agent `{stored}` but the config says `{agent_id}`; \
             set [agent] id = \"{stored}\" or move the WAL directory aside",
            config.wal.dir.display()
        ),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    let result = runtime.block_on(serve(&config, &wal, agent_id));
    // Every handler has finished: nothing waits on the WAL any more.
    let closed = wal.close();
    drop(runtime);
    result?;
    closed?;
    if let Some(failure) = wal.failure() {
        bail!("stopped after a WAL failure: {failure}");
    }
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: &Config, wal: &Wal, agent_id: String) -> anyhow::Result<()> {
    let ingest = &config.ingest;
    let listener = ingest::bind(&ingest.socket, config.socket_mode()?, ingest.socket_group.as_deref())?;
    let context = Arc::new(IngestContext {
        appender: wal.appender(),
        agent_id: agent_id.clone(),
        max_line_bytes: ingest.max_line_bytes,
        max_pending: ingest.max_pending_per_connection,
        inflight_bytes: Arc::new(tokio::sync::Semaphore::new(ingest.max_inflight_bytes)),
        overload_timeout: Duration::from_millis(ingest.overload_timeout_ms),
        idle_timeout: (ingest.idle_timeout_secs > 0).then(|| Duration::from_secs(ingest.idle_timeout_secs)),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = match config.http.enabled {
        true => Some(http::bind(&config.http.listen).await?),
        false => None,
    };
    let http_addr = http.as_ref().and_then(http::local_addr);
    let pool = config.mysql.as_ref().map(forward::pool).transpose()?;
    let forwarder = match (&config.mysql, &pool) {
        (Some(mysql), Some(pool)) => {
            METRICS.sink_enabled(forward::SINK);
            let settings = ForwardSettings::from(mysql);
            let forwarder = Forwarder::new(
                wal.clone(),
                pool.clone(),
                agent_id.clone(),
                settings,
                mysql.parallel_batches,
                stop_rx.clone(),
            );
            Some(tokio::spawn(forwarder.run()))
        }
        _ => None,
    };
    let mirror = match &config.redis {
        Some(redis) => {
            METRICS.sink_enabled(mirror::SINK);
            let mirror = Mirror::new(wal.clone(), agent_id.clone(), redis, stop_rx.clone())?;
            Some(tokio::spawn(mirror.run()))
        }
        None => None,
    };
    if let Some(listener) = http {
        tokio::spawn(http::serve(listener, wal.clone(), stop_rx.clone()));
    }
    let sinks: Vec<&'static str> =
        [config.mysql.as_ref().map(|_| forward::SINK), config.redis.as_ref().map(|_| mirror::SINK)]
            .into_iter()
            .flatten()
            .collect();
    tracing::info!(
        agent_id,
        http = http_addr.map(|a| a.to_string()),
        socket = %ingest.socket.display(),
        wal = %config.wal.dir.display(),
        sinks = ?config.enabled_sinks(),
        "telemetry-agent ready"
    );
    let stop = async {
        tokio::select! {
            () = shutdown_signal() => {}
            () = housekeeping(wal, &sinks, pool.as_ref()) => {}
        }
    };
    Listener::new(listener, context, ingest.max_connections).serve(stop).await;
    let _ = stop_tx.send(true);
    for sink in [forwarder, mirror].into_iter().flatten() {
        let _ = sink.await;
    }
    let _ = std::fs::remove_file(&ingest.socket);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Every second: drops what every sink has passed (cheap when there is nothing to drop) and refreshes the
/// gauges. Resolves when the WAL stopped after a write failure: the agent then exits non-zero so that its
/// supervisor restarts it and sled's recovery establishes what is durable.
async fn housekeeping(wal: &Wal, sinks: &[&'static str], pool: Option<&mysql_async::Pool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut received: std::collections::VecDeque<(std::time::Instant, u64)> = std::collections::VecDeque::new();
    loop {
        tick.tick().await;
        if let Some(failure) = wal.failure() {
            tracing::error!(failure, "the WAL failed; stopping so that a restart can recover it");
            return;
        }
        let task = {
            let (wal, sinks) = (wal.clone(), sinks.to_vec());
            tokio::task::spawn_blocking(move || {
                let truncated = wal.truncate();
                refresh_gauges(&wal, &sinks);
                truncated
            })
        };
        match task.await {
            Ok(Ok(0)) => {}
            Ok(Ok(records)) => tracing::debug!(records, "truncated WAL"),
            Ok(Err(e)) => tracing::error!(error = %e, "WAL truncation failed"),
            Err(e) => tracing::error!(error = %e, "WAL housekeeping task failed"),
        }
        if let Some(pool) = pool {
            let pool = pool.metrics();
            METRICS.mysql_connections.set(pool.connection_count.load(std::sync::atomic::Ordering::Relaxed) as i64);
            METRICS
                .mysql_connections_in_use
                .set(pool.connections_in_use.load(std::sync::atomic::Ordering::Relaxed) as i64);
        }
        METRICS.tick_outages(Duration::from_secs(1));
        let now = (std::time::Instant::now(), METRICS.events_received_total());
        received.push_back(now);
        while received.len() > 11 {
            received.pop_front();
        }
        if let Some(&(then, count)) = received.front() {
            let secs = now.0.duration_since(then).as_secs_f64();
            if secs > 0.0 {
                METRICS.events_per_second.set((now.1 - count) as f64 / secs);
            }
        }
    }
}

/// WAL size and each sink's lag, for `/metrics` and `status`.
fn refresh_gauges(wal: &Wal, sinks: &[&'static str]) {
    let Ok(stats) = wal.stats() else { return };
    METRICS.wal_disk_bytes.set(stats.disk_bytes as i64);
    METRICS.wal_max_bytes.set(stats.max_bytes as i64);
    METRICS.wal_live_bytes.set(stats.live_bytes as i64);
    METRICS.wal_records.set(stats.first_seq.map_or(0, |first| stats.last_seq + 1 - first) as i64);
    METRICS.dead_letters.set(stats.dead_letters as i64);
    for &sink in sinks {
        let cursor = wal.cursor(sink).unwrap_or(0);
        let labels = crate::metrics::Sink { sink };
        METRICS.sink_lag_records.get_or_create(&labels).set(stats.last_seq.saturating_sub(cursor) as i64);
        let oldest = wal.read_after(cursor, 1).ok().and_then(|records| records.first().map(|r| r.appended_at_ms));
        let age_ms = oldest.map_or(0, |at| crate::metrics::now_ms().saturating_sub(at));
        METRICS.sink_lag_seconds.get_or_create(&labels).set(age_ms as f64 / 1000.0);
    }
}

fn send(socket: Option<PathBuf>, config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let socket = match socket {
        Some(socket) => socket,
        None => Config::load(config_path)?.ingest.socket,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start tokio")?;
    runtime.block_on(send_stdin(&socket))
}

/// Pipelines stdin's lines to the agent and matches each answer to its line number.
async fn send_stdin(socket: &Path) -> anyhow::Result<ExitCode> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the agent at {} (is it running?)", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let (numbers_tx, mut numbers_rx) = tokio::sync::mpsc::channel::<usize>(64 * 1024);
    let sender = tokio::spawn(async move {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        let mut number = 0;
        while let Some(line) = stdin.next_line().await.context("cannot read stdin")? {
            number += 1;
            if line.trim().is_empty() {
                continue;
            }
            write.write_all(line.as_bytes()).await.context("cannot write to the agent")?;
            write.write_all(b"\n").await.context("cannot write to the agent")?;
            if numbers_tx.send(number).await.is_err() {
                break;
            }
        }
        write.shutdown().await.context("cannot finish writing to the agent")?;
        anyhow::Ok(())
    });

    let mut answers = BufReader::new(read).lines();
    let (mut acked, mut failed) = (0u64, 0u64);
    let mut stderr = std::io::stderr().lock();
    while let Some(number) = numbers_rx.recv().await {
        let Some(answer) = answers.next_line().await.context("cannot read the agent's answer")? else {
            failed += 1;
            writeln!(stderr, "line {number}: no answer: the agent closed the connection")?;
            while let Some(number) = numbers_rx.recv().await {
                failed += 1;
                writeln!(stderr, "line {number}: no answer: the agent closed the connection")?;
            }
            break;
        };
        let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        if parsed["ok"] == true {
            acked += 1;
        } else {
            failed += 1;
            let code = parsed["code"].as_str().unwrap_or("?");
            let error = parsed["error"].as_str().unwrap_or(&answer);
            writeln!(stderr, "line {number}: {code}: {error}")?;
        }
    }
    if let Ok(Err(e)) = sender.await {
        writeln!(stderr, "{e:#}")?;
        failed += 1;
    }
    println!("{acked} acked, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
