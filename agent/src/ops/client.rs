//! The operator's end of a command: sent to the running agent over its control socket, or, when no agent
//! answers, executed here on the WAL (which fails if an agent holds it after all); either way the answer is
//! rendered the same.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use telemetry_wal::{Wal, WalOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::Config;
use crate::daemon;
use crate::identity::Identity;
use crate::ops::commands::{self, Output, Request};
use crate::ops::render::render;
use crate::sink::mysql as mysql_sink;

/// Runs an operator command through the running agent's control socket, or on the WAL directly when no
/// agent answers, and prints its answer.
pub async fn operate(
    config: &Config,
    config_path: Option<&Path>,
    request: Request,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    match UnixStream::connect(&config.control.socket).await {
        Ok(stream) => {
            let request = serde_json::to_string(&request).context("cannot encode the request")?;
            tokio::spawn(relay(stream, request, tx));
        }
        Err(connect_error) => {
            let context = direct_context(config, config_path, &connect_error)?;
            tokio::spawn(commands::execute(request, context, tx));
        }
    }
    render(rx, json).await
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
) -> anyhow::Result<commands::Context> {
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
    let mysql = config.mysql.as_ref().map(|mysql| mysql_sink::Nodes::new(mysql).map(Arc::new)).transpose()?;
    let spool = config.spool.dir.clone();
    let bulk = config.mysql.as_ref().map(|mysql| mysql.bulk).unwrap_or_default();
    Ok(commands::Context {
        wal,
        identity,
        sinks: config.enabled_sinks(),
        mysql,
        bulk,
        redis: None,
        spool,
        running: false,
    })
}
