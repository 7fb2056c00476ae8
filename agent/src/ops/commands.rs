//! Operator commands on a WAL: stats, dump, dead letters, replay, status. The running agent executes them for
//! the control socket; without a running agent the command line executes them on the WAL it opens itself.
//! Either way they produce the same [`Output`] stream, so the user sees the same thing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use telemetry_wal::{Record, Wal};
use tokio::sync::mpsc;

use crate::clock::now_ms;
use crate::event::Event;
use crate::identity::Identity;
use crate::ops::metrics::{SinkStatus, METRICS};
use crate::sink::mysql as mysql_sink;
use crate::sink::Sink;

/// A replay batch that takes longer is abandoned (the command says where to resume).
const REPLAY_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What an operator asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    WalStats,
    Dump(DumpFilter),
    DeadLetters { action: DeadLetterAction, sink: Option<String>, seqs: Vec<u64>, reason: Option<String> },
    Replay { sink: Sink, from: Option<u64>, to: Option<u64> },
    MirrorForget { profile: String, metric: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DumpFilter {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub profile: Option<String>,
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterAction {
    List,
    Retry,
    Drop,
}

/// One piece of an answer; a stream of these ends with `Done` or `Error`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Output {
    Status(Box<Status>),
    WalStats(WalReport),
    /// A dumped event, as a protocol line.
    Event {
        line: String,
    },
    DeadLetter(DeadLetterView),
    Progress {
        done: u64,
        total: u64,
        what: String,
    },
    Done {
        summary: String,
    },
    Error {
        error: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WalReport {
    pub dir: String,
    pub records: u64,
    pub disk_bytes: u64,
    pub live_bytes: u64,
    pub max_bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    /// When the oldest and newest stored records were written, epoch ms.
    pub oldest_ms: Option<u64>,
    pub newest_ms: Option<u64>,
    pub sinks: Vec<SinkLag>,
    pub dead_letters: u64,
    /// Since the WAL was opened.
    #[serde(default)]
    pub group_commits: u64,
    #[serde(default)]
    pub syncs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkLag {
    pub sink: String,
    pub cursor: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub agent_id: String,
    pub version: String,
    /// False when the command line read the WAL itself because no agent answered.
    pub running: bool,
    pub started_at_ms: Option<u64>,
    pub clients_connected: Option<i64>,
    pub events_per_second: Option<f64>,
    pub events_received: Option<u64>,
    pub errors: BTreeMap<String, u64>,
    pub sinks: Vec<SinkStatus>,
    pub wal: WalReport,
    /// Why events are not accepted right now, if they are not.
    pub not_ready: Option<String>,
    /// While the agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool: Option<crate::source::spool::SpoolStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterView {
    pub sink: String,
    pub seq: u64,
    pub error: String,
    pub at_ms: u64,
    /// The event as a protocol line (with its effective event id), or why it cannot be shown.
    pub event: String,
}

/// What the commands need: the WAL, this agent's id and the sinks it forwards to.
#[derive(Clone)]
pub struct Context {
    pub wal: Wal,
    pub identity: std::sync::Arc<Identity>,
    pub sinks: Vec<Sink>,
    pub mysql: Option<Arc<crate::sink::mysql::Nodes>>,
    /// `[mysql] bulk`
    pub bulk: crate::sink::mysql::Bulk,
    /// The running agent's Redis mirror.
    pub redis: Option<crate::sink::redis::Resync>,
    /// `[spool] dir`
    pub spool: std::path::PathBuf,
    /// Set inside the running agent.
    pub running: bool,
}

/// Executes `request`, sending its answer to `out`. Errors become a final `Output::Error`.
pub async fn execute(request: Request, context: Context, out: mpsc::Sender<Output>) {
    let result = match request {
        Request::Status => status(&context).await.map(|s| vec![Output::Status(Box::new(s))]),
        Request::WalStats => {
            blocking(&context, |c| wal_report(&c.wal, &c.sinks).map(|r| vec![Output::WalStats(r)])).await
        }
        Request::Dump(filter) => dump(&context, filter, &out).await,
        Request::DeadLetters { action, sink, seqs, reason } => {
            blocking(&context, move |c| dead_letters(c, action, sink.as_deref(), &seqs, reason.as_deref())).await
        }
        Request::Replay { sink, from, to } => replay(&context, sink, from, to, &out).await,
        Request::MirrorForget { profile, metric } => mirror_forget(&context, profile, metric).await,
    };
    let outputs = result.unwrap_or_else(|e| vec![Output::Error { error: format!("{e:#}") }]);
    for output in outputs {
        if out.send(output).await.is_err() {
            return;
        }
    }
}

async fn blocking(
    context: &Context,
    f: impl FnOnce(&Context) -> anyhow::Result<Vec<Output>> + Send + 'static,
) -> anyhow::Result<Vec<Output>> {
    let context = context.clone();
    tokio::task::spawn_blocking(move || f(&context)).await.context("the command's task failed")?
}

/// Records the WAL stores.
fn stored_records(stats: &telemetry_wal::WalStats) -> u64 {
    match (stats.first_seq, stats.last_record_seq) {
        (Some(first), Some(last)) => last + 1 - first,
        _ => 0,
    }
}

/// Stored records after `cursor` (a cursor never set, or behind truncation, counts from the oldest stored).
fn records_after(stats: &telemetry_wal::WalStats, cursor: u64) -> u64 {
    match (stats.first_seq, stats.last_record_seq) {
        (Some(first), Some(last)) => last.saturating_sub(cursor.max(first - 1)),
        _ => 0,
    }
}

/// The WAL's size, age and each sink's lag.
pub fn wal_report(wal: &Wal, sinks: &[Sink]) -> anyhow::Result<WalReport> {
    let stats = wal.stats()?;
    let appended_at =
        |after: u64| -> anyhow::Result<Option<u64>> { Ok(wal.read_after(after, 1)?.first().map(|r| r.appended_at_ms)) };
    let oldest_ms = match stats.first_seq {
        Some(first) => appended_at(first - 1)?,
        None => None,
    };
    let newest_ms = match stats.last_record_seq {
        Some(last) => appended_at(last - 1)?,
        None => None,
    };
    let mut lags = Vec::new();
    for sink in sinks {
        let cursor = wal.cursor(sink.name())?;
        let lag_seconds = appended_at(cursor)?.map_or(0.0, |at| now_ms().saturating_sub(at) as f64 / 1000.0);
        lags.push(SinkLag { sink: sink.to_string(), cursor, lag_records: records_after(&stats, cursor), lag_seconds });
    }
    Ok(WalReport {
        dir: wal.dir().display().to_string(),
        records: stored_records(&stats),
        disk_bytes: stats.disk_bytes,
        live_bytes: stats.live_bytes,
        max_bytes: stats.max_bytes,
        first_seq: stats.first_seq,
        last_seq: stats.last_seq,
        oldest_ms,
        newest_ms,
        sinks: lags,
        dead_letters: stats.dead_letters,
        group_commits: stats.group_commits,
        syncs: stats.data_syncs,
    })
}

async fn status(context: &Context) -> anyhow::Result<Status> {
    let wal = blocking(context, |c| wal_report(&c.wal, &c.sinks).map(|r| vec![Output::WalStats(r)])).await?;
    let Some(Output::WalStats(wal)) = wal.into_iter().next() else { bail!("no WAL report") };
    let running = context.running;
    let errors = if running {
        ["invalid_json", "invalid_event", "line_too_long", "wal_full", "overloaded", "shutting_down", "internal"]
            .into_iter()
            .map(|code| (code.to_string(), METRICS.errors.get_or_create(&crate::ops::metrics::Code { code }).get()))
            .filter(|(_, n)| *n > 0)
            .collect()
    } else {
        BTreeMap::new()
    };
    Ok(Status {
        agent_id: context.identity.agent_id().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        running,
        started_at_ms: running.then_some(METRICS.started_at_ms),
        clients_connected: running.then(|| METRICS.clients_connected.get()),
        events_per_second: running.then(|| METRICS.events_per_second.get()),
        events_received: running.then(|| METRICS.events_received_total()),
        errors,
        sinks: if running { METRICS.sinks() } else { Vec::new() },
        not_ready: if running { crate::ops::http::not_ready(&context.wal) } else { None },
        spool: running.then(|| crate::source::spool::SpoolStatus::current(&context.spool)),
        wal,
    })
}

/// Reads records in `[from, to]` in order, a batch at a time.
fn for_each_record(
    wal: &Wal,
    from: Option<u64>,
    to: Option<u64>,
    mut f: impl FnMut(Vec<Record>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let to = to.unwrap_or(u64::MAX);
    let mut after = from.unwrap_or(1).saturating_sub(1);
    loop {
        let mut batch = wal.read_after(after, 1000)?;
        batch.retain(|r| r.seq <= to);
        let Some(last) = batch.last().map(|r| r.seq) else { return Ok(()) };
        after = last;
        if !f(batch)? || last >= to {
            return Ok(());
        }
    }
}

async fn dump(context: &Context, filter: DumpFilter, out: &mpsc::Sender<Output>) -> anyhow::Result<Vec<Output>> {
    if let Some(kind) = &filter.kind {
        if kind != "trade" && kind != "metric" {
            bail!("--kind must be trade or metric, not {kind:?}");
        }
    }
    let (context, out) = (context.clone(), out.clone());
    tokio::task::spawn_blocking(move || {
        let (mut dumped, mut undecodable) = (0u64, 0u64);
        for_each_record(&context.wal, filter.from, filter.to, |batch| {
            for record in batch {
                let event = match Event::decode(&record.payload) {
                    Ok(event) => event,
                    Err(_) => {
                        undecodable += 1;
                        continue;
                    }
                };
                let kind = match event {
                    Event::Metric(_) => "metric",
                    Event::Trade(_) => "trade",
                };
                if filter.kind.as_deref().is_some_and(|k| k != kind)
                    || filter.profile.as_deref().is_some_and(|p| p != event.profile_id())
                {
                    continue;
                }
                // With its effective event id, so that sending the dump again creates no duplicates.
                let event_id = context.identity.event_id(event.client_event_id(), record.seq);
                if out.blocking_send(Output::Event { line: event.to_json(Some(&event_id)) }).is_err() {
                    return Ok(false);
                }
                dumped += 1;
            }
            Ok(true)
        })?;
        let skipped =
            if undecodable > 0 { format!(", {undecodable} undecodable records skipped") } else { String::new() };
        Ok(vec![Output::Done { summary: format!("{dumped} events dumped{skipped}") }])
    })
    .await
    .context("the dump task failed")?
}

fn dead_letters(
    context: &Context,
    action: DeadLetterAction,
    sink: Option<&str>,
    seqs: &[u64],
    reason: Option<&str>,
) -> anyhow::Result<Vec<Output>> {
    let wal = &context.wal;
    let chosen: Vec<_> = wal
        .dead_letters()?
        .into_iter()
        .filter(|l| sink.is_none_or(|s| s == l.sink) && (seqs.is_empty() || seqs.contains(&l.seq)))
        .collect();
    let mut out = Vec::new();
    match action {
        DeadLetterAction::List => {
            for letter in &chosen {
                let event = match Event::decode(&letter.payload) {
                    // A spool line that was never an event: shown as it was written.
                    _ if letter.sink == crate::source::spool::DEAD_LETTER_SINK => {
                        String::from_utf8_lossy(&letter.payload).into_owned()
                    }
                    Ok(event) => event.to_json(Some(&context.identity.event_id(event.client_event_id(), letter.seq))),
                    Err(e) => format!("(cannot show: {e})"),
                };
                out.push(Output::DeadLetter(DeadLetterView {
                    sink: letter.sink.clone(),
                    seq: letter.seq,
                    error: letter.error.clone(),
                    at_ms: letter.at_ms,
                    event,
                }));
            }
            out.push(Output::Done { summary: format!("{} dead letters", chosen.len()) });
        }
        DeadLetterAction::Drop => {
            let Some(reason) = reason.filter(|r| !r.trim().is_empty()) else {
                bail!("dropping dead letters needs --reason \"...\" (it is logged)");
            };
            if seqs.is_empty() && sink.is_none() {
                bail!("name the dead letters to drop: --seq N (repeatable) or --sink NAME for all of a sink");
            }
            for letter in &chosen {
                wal.remove_dead_letter(&letter.sink, letter.seq)?;
                tracing::warn!(
                    sink = letter.sink,
                    seq = letter.seq,
                    reason,
                    error = letter.error,
                    "dead letter dropped"
                );
            }
            out.push(Output::Done { summary: format!("{} dead letters dropped", chosen.len()) });
        }
        DeadLetterAction::Retry => {
            // Appended again as new records carrying the original event id, so the sinks deduplicate them
            // as the same event; the dead letter goes once the new record is durable.
            let appender = wal.appender();
            for (done, letter) in chosen.iter().enumerate() {
                let already =
                    |e: String| anyhow::anyhow!("{e} ({done} of {} were queued again before this)", chosen.len());
                if letter.sink == crate::source::spool::DEAD_LETTER_SINK {
                    return Err(already(format!(
                        "dead letter spool {}: an invalid spool line cannot be queued again as it is; correct it, send it \
                         with `telemetry-agent send`, then drop the dead letter",
                        letter.seq
                    )));
                }
                let mut event = Event::decode(&letter.payload).map_err(|e| {
                    already(format!("dead letter {} {}: {e}; drop it instead", letter.sink, letter.seq))
                })?;
                let event_id = context.identity.event_id(event.client_event_id(), letter.seq);
                match &mut event {
                    Event::Metric(m) => m.event_id = Some(event_id),
                    Event::Trade(t) => t.event_id = Some(event_id),
                }
                let seq = appender
                    .blocking_append(event.encode())
                    .and_then(|pending| pending.blocking_durable())
                    .map_err(|e| already(e.to_string()))?;
                wal.remove_dead_letter(&letter.sink, letter.seq).map_err(|e| already(e.to_string()))?;
                tracing::info!(sink = letter.sink, seq = letter.seq, new_seq = seq, "dead letter retried");
            }
            out.push(Output::Done { summary: format!("{} dead letters queued again", chosen.len()) });
        }
    }
    Ok(out)
}

/// How long `mirror forget` waits for Redis to take the removal before it leaves it to the running mirror.
const FORGET_PUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Forgets a metric in the mirror's table and (through the running mirror, or at the next start) in Redis.
async fn mirror_forget(context: &Context, profile: String, metric: String) -> anyhow::Result<Vec<Output>> {
    use crate::sink::redis::{forget_metric, Forgot};
    if !context.sinks.contains(&crate::sink::redis::SINK) {
        bail!("the config has no [redis] section: there is no mirror to forget {profile}/{metric} in");
    }
    let forgot = {
        let (wal, running) = (context.wal.clone(), context.running);
        let (profile, metric) = (profile.clone(), metric.clone());
        tokio::task::spawn_blocking(move || {
            let forgot = forget_metric(&wal, &profile, &metric)?;
            // Without a running agent nobody flushes this WAL later; the running agent's own flushes cover it.
            if !running {
                wal.flush()?;
            }
            anyhow::Ok(forgot)
        })
        .await
        .context("the forget task failed")??
    };
    let what = match forgot {
        Forgot::Unknown => bail!("the mirror's table holds no metric {metric:?} of profile {profile:?}"),
        Forgot::AlreadyForgotten => format!("{profile}/{metric} was forgotten already"),
        Forgot::Value { value, ts_us } => {
            format!("forgot {profile}/{metric} (value {value} at {})", crate::event::rfc3339_us(ts_us))
        }
    };
    let redis = match (&context.redis, context.running) {
        (Some(mirror), true) => {
            if mirror.push_metric(&profile, &metric, FORGET_PUSH_TIMEOUT).await {
                "removed from Redis"
            } else {
                "Redis has not taken the removal yet (unreachable?); the mirror removes it once Redis answers"
            }
        }
        _ => "Redis drops it when the agent starts (it pushes its whole table then)",
    };
    Ok(vec![Output::Done { summary: format!("{what}; {redis}; the next value is taken whatever its ts") }])
}

async fn replay(
    context: &Context,
    sink: Sink,
    from: Option<u64>,
    to: Option<u64>,
    out: &mpsc::Sender<Output>,
) -> anyhow::Result<Vec<Output>> {
    match sink {
        Sink::Mysql => {}
        Sink::Redis => {
            // Redis holds newest values only, and the mirror's table holds the newest of every acked event,
            // truncated or not: replaying means pushing that table again, whatever the range.
            let Some(resync) = &context.redis else {
                bail!("replay to redis needs the running agent (it pushes its whole table to Redis at every start)")
            };
            resync.request();
            return Ok(vec![Output::Done {
                summary: "the mirror is pushing the newest value of every key to Redis again (older values never                           overwrite newer ones, so --from/--to do not apply)"
                    .into(),
            }]);
        }
    }
    let Some(nodes) = &context.mysql else { bail!("the config has no [mysql] section") };
    let path = mysql_sink::WritePath::new(context.bulk);
    let stats = context.wal.stats()?;
    let first = stats.first_seq.unwrap_or(stats.last_seq + 1);
    let (from, to) = (from.unwrap_or(first).max(first), to.unwrap_or(stats.last_seq).min(stats.last_seq));
    if from > to {
        return Ok(vec![Output::Done { summary: "nothing to replay: the WAL holds no records in that range".into() }]);
    }
    let total = to - from + 1;
    let (mut done, mut inserted, mut present) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut after = from - 1;
    while after < to {
        let wal = context.wal.clone();
        let mut batch = tokio::task::spawn_blocking(move || wal.read_after(after, 1000)).await??;
        batch.retain(|r| r.seq <= to);
        let Some(last) = batch.last().map(|r| r.seq) else { break };
        after = last;
        let rows: Vec<(Record, Event)> = batch
            .into_iter()
            .filter_map(|record| Event::decode(&record.payload).ok().map(|event| (record, event)))
            .collect();
        done += rows.len() as u64;
        // Offset 0: the offset row keeps its value (GREATEST); replay is beside forwarding, not part of it.
        let again = rows.first().map_or(last, |r| r.0.seq);
        let written = loop {
            let lease = nodes.lease();
            let write = mysql_sink::write_rows(
                &lease.pool,
                &context.identity,
                &rows,
                mysql_sink::lock_wait(REPLAY_WRITE_TIMEOUT),
                &path,
                || 0,
            );
            let result = tokio::time::timeout(REPLAY_WRITE_TIMEOUT, write)
                .await
                .map_err(|_| anyhow::anyhow!("MySQL did not answer within {} s", REPLAY_WRITE_TIMEOUT.as_secs()))
                .and_then(|result| result.map_err(anyhow::Error::from));
            match result {
                Ok(written) => break written,
                // A cluster: the same rows again through the next usable node (re-sent rows are no-ops).
                Err(e) if nodes.failed(&lease, &format!("{e:#}")).await => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("writing seqs up to {last} failed; run the replay again with --from {again}")
                    })
                }
            }
        };
        inserted += written.inserted;
        present += written.already_present;
        if out.send(Output::Progress { done, total, what: "records replayed to MySQL".into() }).await.is_err() {
            tracing::warn!(from, done, inserted, "replay stopped: the operator went away");
            bail!("stopped");
        }
    }
    tracing::info!(from, to, inserted, already_present = present, "replayed to MySQL");
    Ok(vec![Output::Done {
        summary: format!(
            "replayed seqs {from}..={to} to MySQL in {:.1} s: {inserted} rows inserted, {present} already present",
            started.elapsed().as_secs_f64()
        ),
    }])
}

/// `wal salvage`, with the agent stopped: keeps every intact record of a damaged WAL and says what was lost.
pub fn salvage(config: &crate::config::Config) -> anyhow::Result<std::process::ExitCode> {
    let dir = &config.wal.dir;
    if !dir.join("sled").exists() {
        bail!("there is no WAL at {}; is --config right?", dir.display());
    }
    let salvage = match Wal::salvage(dir, &crate::daemon::wal_options(config)) {
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
    Ok(std::process::ExitCode::SUCCESS)
}
