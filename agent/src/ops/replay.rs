//! `telemetry-agent wal replay --wal-dir`: a WAL copied from another (dead) host, forwarded to MySQL under
//! that host's agent id by the same forwarder the agent runs, with a progress bar, until it is caught up.
//! (`wal replay --from/--to` is a command of the running agent: `commands::replay`.)

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use telemetry_wal::{Wal, WalOptions};
use tokio::sync::watch;

use crate::config::Config;
use crate::identity::Identity;
use crate::sink::mysql::{self as mysql_sink, ForwardSettings, Forwarder};
use crate::sink::Sink;

/// Forwards a WAL copied from another host to MySQL under that host's agent id, until it is caught up.
pub async fn replay_wal_dir(config: &Config, dir: &Path, sink: Sink) -> anyhow::Result<ExitCode> {
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
    let result = async {
        let nodes = Arc::new(mysql_sink::Nodes::new(mysql)?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let settings = watch::channel(ForwardSettings::from(mysql)).1;
        let identity = Arc::new(Identity::load(&wal, agent_id.clone())?);
        let forwarder = Forwarder::new(
            wal.clone(),
            nodes,
            mysql_sink::WritePath::new(mysql.bulk),
            identity,
            settings,
            mysql.parallel_batches,
            stop_rx,
        );
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
    }
    .await;
    // Closing waits for the WAL's writer thread: not on the runtime's threads.
    tokio::task::spawn_blocking(move || wal.close()).await.context("the WAL close task failed")??;
    result.map(|()| ExitCode::SUCCESS)
}
