//! The command line: arguments, and one function a command, run on one tokio runtime. The work is elsewhere:
//! `daemon` (run), `ops` (the operator commands), `migrate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::daemon;
use crate::ops::client;
use crate::ops::commands::{self, DeadLetterAction, DumpFilter, Request};
use crate::ops::{replay, send};
use crate::reload;
use crate::sink::mysql as mysql_sink;
use crate::sink::Sink;

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

/// Runs the command on one tokio runtime and turns its error, if any, into a message and an exit code.
///
/// The runtime is single-threaded: the async work (sockets, sinks) is light per event and most of its cost
/// is waking threads, which a second worker only multiplies (a task woken on one worker is stolen by the
/// other); the WAL writes and syncs on its own threads, and blocking calls go to tokio's blocking pool.
/// docs/performance.md, "Steady state", has the measurements.
pub fn main(cli: Cli) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")
        .and_then(|runtime| runtime.block_on(dispatch(cli.command)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("telemetry-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(config.as_deref()).await,
        Command::Send { socket, config } => {
            let socket = match socket {
                Some(socket) => socket,
                None => Config::load(config.as_deref())?.ingest.socket,
            };
            send::send_stdin(&socket).await
        }
        Command::Migrate { config } => migrate(config.as_deref()).await,
        Command::CheckConfig { config } => {
            let config = Config::load(config.as_deref())?;
            print!("{}", config.to_masked_toml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config, json } => operate(config.as_deref(), Request::Status, json).await,
        Command::Wal { config, command } => match command {
            WalCommand::Stats { json } => operate(config.as_deref(), Request::WalStats, json).await,
            WalCommand::Dump { from, to, profile, kind } => {
                operate(config.as_deref(), Request::Dump(DumpFilter { from, to, profile, kind }), false).await
            }
            WalCommand::Replay { wal_dir: Some(dir), sink, .. } => {
                let config = Config::load(config.as_deref())?;
                // The forwarder says here why it waits (MySQL unreachable, schema behind, ...).
                init_logging_at(Some("warn"), &config);
                replay::replay_wal_dir(&config, &dir, sink).await
            }
            WalCommand::Replay { sink, from, to, wal_dir: None } => {
                operate(config.as_deref(), Request::Replay { sink, from, to }, false).await
            }
            WalCommand::DeadLetters { action, sink, seqs, reason, json } => {
                operate(config.as_deref(), Request::DeadLetters { action, sink, seqs, reason }, json).await
            }
            WalCommand::Salvage => {
                let config = Config::load(config.as_deref())?;
                init_logging_at(Some("warn"), &config);
                // sled's recovery and the WAL's threads block: not on the runtime's threads.
                tokio::task::spawn_blocking(move || commands::salvage(&config))
                    .await
                    .context("the salvage task failed")?
            }
        },
        Command::Mirror { config, command: MirrorCommand::Forget { profile, metric } } => {
            operate(config.as_deref(), Request::MirrorForget { profile, metric }, false).await
        }
    }
}

/// An operator command, through the running agent or on the WAL directly.
async fn operate(config_path: Option<&Path>, request: Request, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    // Without a running agent the command does the work here: its warnings (a dropped dead letter's
    // reason, say) go to stderr.
    init_logging_at(Some("warn"), &config);
    client::operate(&config, config_path, request, json).await
}

async fn migrate(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    init_logging(&config);
    let Some(mysql) = &config.mysql else { bail!("the config has no [mysql] section: nothing to migrate") };
    let nodes = mysql_sink::Nodes::new(mysql)?;
    let result = async {
        let pool = nodes.usable().await.map_err(anyhow::Error::msg)?;
        let mut conn = pool.get_conn().await.with_context(|| format!("cannot connect to {}", nodes.current()))?;
        crate::migrate::migrate(&mut conn).await
    }
    .await;
    nodes.disconnect().await;
    let applied = result?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        println!("applied: {}", applied.join(", "));
    }
    Ok(ExitCode::SUCCESS)
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

async fn run(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let log_level = init_logging(&config);
    // Test builds only: fail points named in FAILPOINTS (tests hold the agent at a chosen step).
    let _failpoints = fail::has_failpoints().then(fail::FailScenario::setup);
    let options = daemon::Options { config_path: Config::resolve_path(config_path), log_level };
    daemon::serve(&config, options, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves at SIGTERM or SIGINT. The handlers are installed here, before the agent listens: installed when the
/// future is first polled, a SIGTERM sent as soon as the socket answered could meet the default action and end
/// the process with a signal instead of a clean stop.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = signal(SignalKind::terminate()).and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    async move {
        let Ok((mut term, mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sigterm_before_the_shutdown_future_is_polled_stops_cleanly_instead_of_ending_the_process() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let stopped = super::shutdown_signal();
            // Not polled yet: only a handler that `shutdown_signal` itself installed stands between this signal
            // and its default action, which ends the process.
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
            let result = tokio::time::timeout(std::time::Duration::from_secs(10), stopped).await;
            assert!(result.is_ok(), "the SIGTERM was not seen");
        });
    }
}
