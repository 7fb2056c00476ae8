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

use crate::admin::{self, DeadLetterAction, DumpFilter, Output, Request};
use crate::config::{mask_url, Config};
use crate::daemon;
use crate::identity::Identity;
use crate::reload;
use crate::sink::mysql::{self as mysql_sink, ForwardSettings, Forwarder};
use crate::sink::Sink;
use telemetry_wal::{Wal, WalOptions};
use tokio::sync::watch;

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
        /// TOML config file; default: /etc/telemetry-agent/agent.toml if it exists, else defaults that work in
        /// the current directory (./data).
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
    /// One screen: up since, clients, events/s, each sink's state and lag, WAL use, last error.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and repair the WAL (through the running agent, or directly when it does not run).
    Wal {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: WalCommand,
    },
    /// The Redis mirror's state (through the running agent, or directly when it does not run).
    Mirror {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: MirrorCommand,
    },
}

#[derive(Subcommand)]
enum MirrorCommand {
    /// Forget a metric's newest value (a `ts` wrong in the future pins it, as the mirror never goes back
    /// in time): removed from the mirror's table and from Redis, so the next value is taken whatever its ts.
    Forget {
        #[arg(long)]
        profile: String,
        #[arg(long)]
        metric: String,
    },
}

#[derive(Subcommand)]
enum WalCommand {
    /// Records and bytes, oldest and newest seq and time, each sink's cursor and lag, dead letters.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Events as NDJSON in the protocol's shape (with their event ids): pipe them into `send` again.
    Dump {
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        to: Option<u64>,
        #[arg(long)]
        profile: Option<String>,
        /// trade or metric
        #[arg(long)]
        kind: Option<String>,
    },
    /// Forward a range again, idempotently (after restoring MySQL from an older backup, say), or forward a
    /// WAL directory copied from another (dead) host, under that host's agent id.
    Replay {
        #[arg(long, default_value = "mysql")]
        sink: Sink,
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        to: Option<u64>,
        /// A WAL directory from another host; its records reach MySQL exactly once under its agent id.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        wal_dir: Option<PathBuf>,
    },
    /// Make a WAL the agent refused as damaged usable again: keep every intact record, drop damaged chunks,
    /// accept (and print) the loss of what sled no longer has, and never hand out a lost seq again. Stop the
    /// agent first.
    Salvage,
    /// Records a sink could not deliver: list them, retry them (after a fix) or drop them with a reason.
    DeadLetters {
        action: DeadLetterAction,
        #[arg(long)]
        sink: Option<String>,
        /// Only these (repeatable); default: all (of --sink).
        #[arg(long = "seq")]
        seqs: Vec<u64>,
        /// Why they are dropped (logged); required for drop.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run { config } => run(config.as_deref()),
        Command::Send { socket, config } => send(socket, config.as_deref()),
        Command::Migrate { config } => migrate(config.as_deref()),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Status { config, json } => operate(config.as_deref(), Request::Status, json),
        Command::Wal { config, command } => match command {
            WalCommand::Stats { json } => operate(config.as_deref(), Request::WalStats, json),
            WalCommand::Dump { from, to, profile, kind } => {
                operate(config.as_deref(), Request::Dump(DumpFilter { from, to, profile, kind }), false)
            }
            WalCommand::Replay { wal_dir: Some(dir), sink, .. } => replay_wal_dir(config.as_deref(), &dir, sink),
            WalCommand::Replay { sink, from, to, wal_dir: None } => {
                operate(config.as_deref(), Request::Replay { sink, from, to }, false)
            }
            WalCommand::DeadLetters { action, sink, seqs, reason, json } => {
                operate(config.as_deref(), Request::DeadLetters { action, sink, seqs, reason }, json)
            }
            WalCommand::Salvage => salvage(config.as_deref()),
        },
        Command::Mirror { config, command: MirrorCommand::Forget { profile, metric } } => {
            operate(config.as_deref(), Request::MirrorForget { profile, metric }, false)
        }
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
        let pool = mysql_sink::pool(mysql)?;
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

fn init_logging(config: &Config) -> Option<reload::LogLevelSetter> {
    init_logging_at(None, config)
}

/// Sets up logging to stderr at `level` (default: the config's); returns how to change the level later
/// (`None` when `RUST_LOG` decides).
fn init_logging_at(level: Option<&str>, config: &Config) -> Option<reload::LogLevelSetter> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or(&config.agent.log_level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let output = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry().with(filter).with(output).try_init();
    let set: reload::LogLevelSetter = Box::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| format!("log_level {level:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    (!from_env).then_some(set)
}

fn salvage(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    init_logging_at(Some("warn"), &config);
    let dir = &config.wal.dir;
    if !dir.join("sled").exists() {
        bail!("there is no WAL at {}; is --config right?", dir.display());
    }
    let salvage = match Wal::salvage(dir, &daemon::wal_options(&config)) {
        Err(telemetry_wal::WalError::Locked { holder, .. }) => {
            bail!("the agent (pid {holder}) holds the WAL in {}; stop it first", dir.display())
        }
        result => result?,
    };
    println!("kept {} intact records", salvage.kept_records);
    for (first_seq, bytes) in &salvage.damaged_chunks {
        println!("dropped a damaged chunk starting at seq {first_seq} ({bytes} bytes)");
    }
    match salvage.lost {
        Some(lost) => println!(
            "lost {} acknowledged records that sled no longer had: seqs {}..={}",
            lost.last - lost.first + 1,
            lost.first,
            lost.last
        ),
        None => println!("no acknowledged record is missing beyond the damaged chunks"),
    }
    println!("new records start after seq {}; the agent can start again", salvage.next_seq_after);
    Ok(ExitCode::SUCCESS)
}

fn run(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let log_level = init_logging(&config);
    // Test builds only: fail points named in FAILPOINTS (tests hold the agent at a chosen step).
    let _failpoints = fail::has_failpoints().then(fail::FailScenario::setup);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    let options = daemon::Options { config_path: Config::resolve_path(config_path), log_level };
    runtime.block_on(daemon::serve(&config, options, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
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

/// Runs an operator command through the running agent's control socket, or on the WAL directly when no
/// agent answers, and prints its answer.
fn operate(config_path: Option<&Path>, request: Request, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    // Without a running agent the command does the work here: its warnings (a dropped dead letter's
    // reason, say) go to stderr.
    init_logging_at(Some("warn"), &config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        match UnixStream::connect(&config.control.socket).await {
            Ok(stream) => {
                let request = serde_json::to_string(&request).context("cannot encode the request")?;
                tokio::spawn(relay(stream, request, tx));
            }
            Err(connect_error) => {
                let context = direct_context(&config, config_path, &connect_error)?;
                tokio::spawn(admin::execute(request, context, tx));
            }
        }
        render(rx, json).await
    })
}

/// The agent's answer, line by line, as outputs.
async fn relay(stream: UnixStream, request: String, tx: tokio::sync::mpsc::Sender<Output>) {
    let (read, mut write) = stream.into_split();
    if let Err(e) = write.write_all(format!("{request}\n").as_bytes()).await {
        let _ = tx.send(Output::Error { error: format!("cannot send the request to the agent: {e}") }).await;
        return;
    }
    let mut lines = BufReader::new(read).lines();
    loop {
        let output = match lines.next_line().await {
            Ok(Some(line)) => serde_json::from_str(&line)
                .unwrap_or_else(|e| Output::Error { error: format!("unreadable answer from the agent: {e}") }),
            Ok(None) => return,
            Err(e) => Output::Error { error: format!("the agent's answer broke off: {e}") },
        };
        if tx.send(output).await.is_err() {
            return;
        }
    }
}

/// No agent answers: open the WAL ourselves (which fails if an agent holds it after all).
fn direct_context(
    config: &Config,
    config_path: Option<&Path>,
    connect_error: &std::io::Error,
) -> anyhow::Result<admin::Context> {
    let dir = &config.wal.dir;
    if !dir.join("sled").exists() {
        bail!(
            "no agent answers at {} ({connect_error}) and there is no WAL at {}; is --config right?",
            config.control.socket.display(),
            dir.display()
        );
    }
    let options =
        WalOptions { max_bytes: config.wal.max_bytes, cache_bytes: config.wal.cache_bytes, ..WalOptions::default() };
    let wal = match Wal::open(dir, options) {
        Ok(wal) => wal,
        Err(telemetry_wal::WalError::Locked { holder, .. }) => bail!(
            "the agent (pid {holder}) holds the WAL in {} but does not answer on its control socket {}: {connect_error}",
            dir.display(),
            config.control.socket.display()
        ),
        Err(e) => return Err(daemon::open_error(e, dir, config_path)),
    };
    let agent_id = match wal.label("agent_id")? {
        Some(id) => id,
        None => config.agent_id()?,
    };
    let identity = Arc::new(Identity::load(&wal, agent_id)?);
    let mysql = config.mysql.as_ref().map(mysql_sink::pool).transpose()?;
    let spool = config.spool.dir.clone();
    Ok(admin::Context { wal, identity, sinks: config.enabled_sinks(), mysql, redis: None, spool, running: false })
}

async fn render(mut rx: tokio::sync::mpsc::Receiver<Output>, json: bool) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut code = ExitCode::SUCCESS;
    while let Some(output) = rx.recv().await {
        match output {
            Output::Status(status) if json => writeln!(stdout, "{}", serde_json::to_string_pretty(&status)?)?,
            Output::Status(status) => write!(stdout, "{}", format_status(&status))?,
            Output::WalStats(report) if json => writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?,
            Output::WalStats(report) => write!(stdout, "{}", format_wal(&report))?,
            Output::Event { line } => writeln!(stdout, "{line}")?,
            Output::DeadLetter(letter) if json => writeln!(stdout, "{}", serde_json::to_string(&letter)?)?,
            Output::DeadLetter(letter) => writeln!(
                stdout,
                "{} seq {} at {}: {}\n    {}",
                letter.sink,
                letter.seq,
                crate::event::rfc3339_us(letter.at_ms as i64 * 1000),
                letter.error,
                letter.event
            )?,
            Output::Progress { done, total, what } => {
                let bar = bar.get_or_insert_with(|| {
                    let bar = indicatif::ProgressBar::new(total);
                    if let Ok(style) =
                        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({per_sec}, eta {eta})")
                    {
                        bar.set_style(style);
                    }
                    bar.set_message(what);
                    bar
                });
                bar.set_position(done);
            }
            Output::Done { summary } => {
                if let Some(bar) = bar.take() {
                    bar.finish_and_clear();
                }
                eprintln!("{summary}");
            }
            Output::Error { error } => {
                if let Some(bar) = bar.take() {
                    bar.abandon();
                }
                eprintln!("telemetry-agent: {error}");
                code = ExitCode::FAILURE;
            }
        }
    }
    stdout.flush()?;
    Ok(code)
}

fn format_time_ms(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), |ms| crate::event::rfc3339_us(ms as i64 * 1000))
}

fn format_bytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn format_wal(report: &admin::WalReport) -> String {
    let mut out = format!(
        "WAL {}\n  records       {} (seq {} .. {})\n  written       {} .. {}\n  disk          {} of {} ({:.0}%), records {}\n  dead letters  {}\n",
        report.dir,
        report.records,
        report.first_seq.map_or_else(|| "-".into(), |s| s.to_string()),
        report.last_seq,
        format_time_ms(report.oldest_ms),
        format_time_ms(report.newest_ms),
        format_bytes(report.disk_bytes),
        format_bytes(report.max_bytes),
        report.disk_bytes as f64 * 100.0 / report.max_bytes.max(1) as f64,
        format_bytes(report.live_bytes),
        report.dead_letters,
    );
    for sink in &report.sinks {
        out += &format!(
            "  sink {:<8} cursor {}, lag {} records, {:.1} s\n",
            sink.sink, sink.cursor, sink.lag_records, sink.lag_seconds
        );
    }
    out
}

fn format_status(status: &admin::Status) -> String {
    let mut out = format!("telemetry-agent {} (agent id {})\n", status.version, status.agent_id);
    if !status.running {
        out += "  NOT RUNNING: no agent answers on the control socket; the WAL as found on disk:\n";
    } else {
        let up = status.started_at_ms.map_or(0, |at| crate::clock::now_ms().saturating_sub(at) / 1000);
        out += &format!(
            "  up since      {} ({}h{:02}m)\n  clients       {}\n  events in     {:.0}/s ({} since start)\n",
            format_time_ms(status.started_at_ms),
            up / 3600,
            up % 3600 / 60,
            status.clients_connected.unwrap_or(0),
            status.events_per_second.unwrap_or(0.0),
            status.events_received.unwrap_or(0)
        );
        out += &format!(
            "  accepting     {}\n",
            status.not_ready.as_deref().map_or("yes".to_string(), |why| format!("NO: {why}"))
        );
        if !status.errors.is_empty() {
            let errors: Vec<String> = status.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
            out += &format!("  errors        {}\n", errors.join(", "));
        }
    }
    for sink in &status.sinks {
        let state = match sink.waiting_since_ms {
            Some(since) => format!("RETRYING since {}", format_time_ms(Some(since))),
            None => "ok".to_string(),
        };
        out += &format!("  {:<13} {state}, lag {} records / {:.1} s\n", sink.sink, sink.lag_records, sink.lag_seconds);
        if let (Some(error), Some(at)) = (&sink.last_error, sink.last_error_at_ms) {
            out += &format!("                last error at {}: {error}\n", format_time_ms(Some(at)));
        }
    }
    if let Some(spool) = &status.spool {
        out += &format!(
            "  spool         {} files pending, {} drained ({} events), {} lines and {} files refused ({})\n",
            spool.files_pending,
            spool.files_drained,
            spool.events_ingested,
            spool.lines_refused,
            spool.files_refused,
            spool.dir
        );
    }
    out + &format_wal(&status.wal)
}

/// Forwards a WAL copied from another host to MySQL under that host's agent id, until it is caught up.
fn replay_wal_dir(config_path: Option<&Path>, dir: &Path, sink: Sink) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    // The forwarder says here why it waits (MySQL unreachable, schema behind, ...).
    init_logging_at(Some("warn"), &config);
    if sink != Sink::Mysql {
        bail!("--wal-dir replays to mysql only");
    }
    let Some(mysql) = &config.mysql else { bail!("the config has no [mysql] section") };
    if !dir.join("sled").exists() {
        bail!("{} holds no WAL", dir.display());
    }
    let wal = Wal::open(dir, WalOptions { max_bytes: u64::MAX, ..WalOptions::default() })?;
    let Some(agent_id) = wal.label("agent_id")? else { bail!("the WAL in {} has no agent id", dir.display()) };
    let stats = wal.stats()?;
    let Some(last) = stats.last_record_seq else {
        println!("agent {agent_id}: the WAL in {} holds no records; nothing to replay", dir.display());
        return Ok(ExitCode::SUCCESS);
    };
    // Not the copy's own progress: MySQL may have been restored since. Everything is sent again; rows already
    // present are no-ops (the records keep the event ids of the runs that appended them).
    wal.set_cursor(mysql_sink::SINK.name(), 0)?;
    let dead_letters_before = stats.dead_letters;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    let result = runtime.block_on(async {
        let pool = mysql_sink::pool(mysql)?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let settings = watch::channel(ForwardSettings::from(mysql)).1;
        let identity = Arc::new(Identity::load(&wal, agent_id.clone())?);
        let forwarder = Forwarder::new(wal.clone(), pool, identity, settings, mysql.parallel_batches, stop_rx);
        let totals = forwarder.totals();
        let task = tokio::spawn(forwarder.run());
        let start = stats.first_seq.unwrap_or(last).saturating_sub(1);
        let bar = indicatif::ProgressBar::new(last.saturating_sub(start));
        eprintln!("replaying {} (agent id {agent_id}) to MySQL up to seq {last}", dir.display());
        loop {
            let cursor = wal.cursor(mysql_sink::SINK.name())?;
            bar.set_position(cursor.saturating_sub(start));
            if cursor >= last {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bar.finish_and_clear();
        let _ = stop_tx.send(true);
        let _ = task.await;
        let (inserted, present) = (
            totals.inserted.load(std::sync::atomic::Ordering::Relaxed),
            totals.already_present.load(std::sync::atomic::Ordering::Relaxed),
        );
        let dead = wal.stats()?.dead_letters.saturating_sub(dead_letters_before);
        let dead =
            if dead > 0 { format!(", {dead} refused by MySQL (see wal dead-letters list)") } else { String::new() };
        println!("agent {agent_id}: {inserted} rows inserted, {present} already present{dead}; up to seq {last}");
        anyhow::Ok(())
    });
    wal.close()?;
    result.map(|()| ExitCode::SUCCESS)
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
